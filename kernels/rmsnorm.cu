// rmsnorm: Llama's RMSNorm over the C channels of each row.
//
// Math    fwd: rstd[n] = 1 / sqrt(mean_c(x^2) + eps)                              (=)
//              out[n,c] = x[n,c] * rstd[n] * w[c]                                  (=)
//         bwd: dx[n,c] = rstd (w dout) - x rstd^3 mean_c(w dout x)     (=, or += when acc != 0:
//              an activation gradient, added to the residual stream's where acc is set)
//              dw[c] += sum_n dout[n,c] x[n,c] rstd[n]                             (+=: parameter
//              gradient)
//         mean_c(.) = sum_c(.) * (1/C) and 1/sqrt is IEEE (as the CPU twin); sums over c in f32.
// Shapes  x, out, dout, dx [N,C]; w [C]; dw [C]; rstd [N].
// Dtypes  x, out, w, dout, dx: T; rstd and dw: f32 in both modes.
// Threads fwd: one block per row (grid-stride over rows). Pass 1: each thread sums the squares
//         of its channels, the block sums the partials (fixed tree); pass 2 re-reads x and w
//         (L1/L2 hits) and writes out. 16 bytes per access (4 f32 / 8 bf16) when C is a multiple
//         of the pack and x, out, w are 16-byte aligned, else one element at a time. Launch:
//         grid N, block 32 * ceil(C / pack / 32) capped at 1024 (one 16-byte access per thread
//         and row: 512 for C = 4096 in bf16); 256 is a fine default.
//         bwd: G blocks, each taking rows blockIdx.x, + G, ...; per row a block reduction of
//         sum_c(w dout x), then dx. dw: every block keeps a partial sum over its rows for each
//         of the C columns in dynamic shared memory (each column owned by one thread, so no
//         atomics inside the block), and at the end adds the C partials to dw with one
//         atomicAdd(float) each: G*C atomics in all. The order of the G additions depends on
//         scheduling (results agree with the CPU twin to f32 rounding, not bit for bit).
//         Launch: grid G = min(N, 2 * SMs), block 256, dynamic shared memory C * 4 bytes
//         (past 48 KiB with the static shared memory, from C = 12257, the function's max dynamic
//         shared memory attribute must be raised: the CUDA launcher does).
// Symbols rmsnorm_fwd_f32, rmsnorm_fwd_bf16 (T* out, float* rstd, const T* x, const T* w,
//                                            int n, int c, float eps)
//         rmsnorm_bwd_f32, rmsnorm_bwd_bf16 (T* dx, float* dw, const T* dout, const T* x,
//                                            const T* w, const float* rstd, int n, int c,
//                                            int acc)
//
// nla: hot

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(T* __restrict__ out, float* __restrict__ rstd,
                                            const T* __restrict__ x, const T* __restrict__ w, int n,
                                            int c, float eps) {
    constexpr int P = NlaPack<T>::N;
    const bool vec = c % P == 0 && nla_aligned(out, 16) && nla_aligned(x, 16) && nla_aligned(w, 16);
    const float inv_c = 1.0f / (float)c;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (long long)row * c;
        T* o = out + (long long)row * c;
        float ss = 0.0f;
        if (vec) {
            for (int j = threadIdx.x * P; j < c; j += blockDim.x * P) {
                const NlaVec<T, P> vx = nla_load<P>(xr + j);
                NLA_UNROLL
                for (int k = 0; k < P; ++k) {
                    const float f = nla_f32(vx.v[k]);
                    ss += f * f;
                }
            }
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const float f = nla_f32(xr[j]);
                ss += f * f;
            }
        }
        ss = nla_block_sum(ss);
        const float r = 1.0f / sqrtf(ss * inv_c + eps);
        if (threadIdx.x == 0) rstd[row] = r;
        if (vec) {
            for (int j = threadIdx.x * P; j < c; j += blockDim.x * P) {
                const NlaVec<T, P> vx = nla_load<P>(xr + j), vw = nla_load<P>(w + j);
                NlaVec<T, P> vo;
                NLA_UNROLL
                for (int k = 0; k < P; ++k)
                    vo.v[k] = nla_from_f32<T>(nla_f32(vx.v[k]) * r * nla_f32(vw.v[k]));
                nla_store<P>(o + j, vo);
            }
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x)
                o[j] = nla_from_f32<T>(nla_f32(xr[j]) * r * nla_f32(w[j]));
        }
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(T* __restrict__ dx, float* __restrict__ dw,
                                            const T* __restrict__ dout, const T* __restrict__ x,
                                            const T* __restrict__ w, const float* __restrict__ rstd,
                                            int n, int c, int acc) {
    constexpr int P = NlaPack<T>::N;
    NLA_DYNAMIC_SMEM(float, dw_part);  // [C]: this block's sum over its rows of dout x rstd
    const bool vec = c % P == 0 && nla_aligned(dx, 16) && nla_aligned(dout, 16) &&
                     nla_aligned(x, 16) && nla_aligned(w, 16);
    const float inv_c = 1.0f / (float)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dw_part[j] = 0.0f;
    __syncthreads();
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const long long off = (long long)row * c;
        const T *xr = x + off, *gr = dout + off;
        T* dr = dx + off;
        const float r = rstd[row];
        // pass 1: sum_c (w dout) x
        float dot = 0.0f;
        if (vec) {
            for (int j = threadIdx.x * P; j < c; j += blockDim.x * P) {
                const NlaVec<T, P> vx = nla_load<P>(xr + j), vg = nla_load<P>(gr + j),
                                   vw = nla_load<P>(w + j);
                NLA_UNROLL
                for (int k = 0; k < P; ++k)
                    dot += nla_f32(vg.v[k]) * nla_f32(vw.v[k]) * nla_f32(vx.v[k]);
            }
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x)
                dot += nla_f32(gr[j]) * nla_f32(w[j]) * nla_f32(xr[j]);
        }
        dot = nla_block_sum(dot);
        const float kk = r * r * r * dot * inv_c;
        // pass 2: dx, and this block's dw partials (16-byte shared accesses: no bank conflicts)
        if (vec) {
            for (int j = threadIdx.x * P; j < c; j += blockDim.x * P) {
                const NlaVec<T, P> vx = nla_load<P>(xr + j), vg = nla_load<P>(gr + j),
                                   vw = nla_load<P>(w + j);
                NlaVec<T, P> vd;
                if (acc) vd = nla_load<P>(dr + j);
                NLA_UNROLL
                for (int q = 0; q < P; q += 4) {
                    NlaVec<float, 4> part = nla_load<4>(dw_part + j + q);
                    NLA_UNROLL
                    for (int k = 0; k < 4; ++k) {
                        const float g = nla_f32(vg.v[q + k]), xf = nla_f32(vx.v[q + k]);
                        float d = r * (g * nla_f32(vw.v[q + k])) - xf * kk;
                        if (acc) d += nla_f32(vd.v[q + k]);
                        vd.v[q + k] = nla_from_f32<T>(d);
                        part.v[k] += g * xf * r;
                    }
                    nla_store<4>(dw_part + j + q, part);
                }
                nla_store<P>(dr + j, vd);
            }
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const float g = nla_f32(gr[j]), xf = nla_f32(xr[j]);
                float d = r * (g * nla_f32(w[j])) - xf * kk;
                if (acc) d += nla_f32(dr[j]);
                dr[j] = nla_from_f32<T>(d);
                dw_part[j] += g * xf * r;
            }
        }
    }
    __syncthreads();
    if ((int)blockIdx.x < n)
        for (int j = threadIdx.x; j < c; j += blockDim.x) atomicAdd(dw + j, dw_part[j]);
}

#define NLA_RMSNORM(S, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        rmsnorm_fwd_##S(T* __restrict__ out, float* __restrict__ rstd, const T* __restrict__ x,    \
                        const T* __restrict__ w, int n, int c, float eps) {                        \
        rmsnorm_fwd<T>(out, rstd, x, w, n, c, eps);                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        rmsnorm_bwd_##S(T* __restrict__ dx, float* __restrict__ dw, const T* __restrict__ dout,    \
                        const T* __restrict__ x, const T* __restrict__ w,                          \
                        const float* __restrict__ rstd, int n, int c, int acc) {                   \
        rmsnorm_bwd<T>(dx, dw, dout, x, w, rstd, n, c, acc);                                       \
    }
NLA_RMSNORM(f32, float)
NLA_RMSNORM(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(rmsnorm_fwd_f32);
NLA_EMU_KERNEL(rmsnorm_fwd_bf16);
NLA_EMU_KERNEL(rmsnorm_bwd_f32);
NLA_EMU_KERNEL(rmsnorm_bwd_bf16);
#endif
