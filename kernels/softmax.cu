// softmax: row softmax over the last dimension and its backward, one row per block.
//
// Math    (Device::softmax_fwd / softmax_bwd; CPU twin src/device/cpu/softmax.rs)
//         fwd: M = max_v x[n,v] (NaN skipped), S = sum_v e^(x[n,v] - M):
//              out[n,v] = e^(x[n,v] - M) * (1 / S)                                         (=)
//         bwd: dx[n,v] = out[n,v] * (dout[n,v] - sum_u dout[n,u] out[n,u])                 (=)
//         e^x is the CPU twin's f32 `vexp` op for op (no FMA contraction), so each
//         e^(x - M) is the twin's bit for bit; S is an f32 sum (the twin's is f64), so outputs
//         agree to 1-2 ulp. A row whose max is -inf or +inf gives NaN, as on the twin.
// Shapes  x, out, dout, dx [N,V].
// Dtypes  all T; arithmetic in f32.
// Threads one block per row (grid-stride over rows). fwd: pass 1 keeps an online (max, sum)
//         pair per thread over its chunks (one rescale exp per chunk that raises the max),
//         merged over the block in a fixed order (deterministic); pass 2 (L2 hits) writes
//         out. bwd: pass 1 sums dout * out (f32, fixed-tree block sum), pass 2 writes dx.
//         16-byte accesses when V is a multiple of the pack and every pointer is 16-byte
//         aligned, else strided scalar accesses.
// Launch  grid N (or fewer: grid-stride), block 256 (any multiple of 32 up to 1024), no
//         dynamic shared memory.
// Symbols softmax_fwd_f32, softmax_fwd_bf16 (T* out, const T* x, int n, int v)
//         softmax_bwd_f32, softmax_bwd_bf16 (T* dx, const T* dout, const T* out, int n, int v)

#include "common.cuh"

// e^x as the CPU twin's `Real::vexp` for f32, bit for bit (see cross_entropy.cu, ce_vexp).
__device__ __forceinline__ float softmax_vexp(float v) {
    const float LOG2E = 1.44269504088896340736f, LN2_HI = 0.6933594f, LN2_LO = -2.1219444e-4f;
    const float MIN_X = -87.33655f;
    const float x = v < MIN_X ? MIN_X : (v > 88.0f ? 88.0f : v);
    const float n = rintf(__fmul_rn(x, LOG2E));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 0.16666665f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    const int ni = n == n ? (int)n : 0;
    const float scale = __uint_as_float((unsigned)(ni + 127) << 23);
    return v < MIN_X ? 0.0f : __fmul_rn(e, scale);
}

struct SoftmaxMs {
    float m, s;
};

__device__ __forceinline__ float softmax_rescale(float s, float m, float mn) {
    return m == mn ? s : __fmul_rn(s, softmax_vexp(m - mn));
}

__device__ __forceinline__ SoftmaxMs softmax_merge(SoftmaxMs a, SoftmaxMs b) {
    const float mn = fmaxf(a.m, b.m);
    return {mn, softmax_rescale(a.s, a.m, mn) + softmax_rescale(b.s, b.m, mn)};
}

template <int U>
__device__ __forceinline__ void softmax_update(SoftmaxMs& st, const float (&v)[U]) {
    float mn = st.m;
#pragma unroll
    for (int u = 0; u < U; ++u) mn = fmaxf(mn, v[u]);
    float s = softmax_rescale(st.s, st.m, mn);
#pragma unroll
    for (int u = 0; u < U; ++u) s += v[u] == -INFINITY ? 0.0f : softmax_vexp(v[u] - mn);
    st = {mn, s};
}

__device__ __forceinline__ SoftmaxMs softmax_block_merge(SoftmaxMs st) {
    __shared__ float softmax_pm_[NLA_WARP], softmax_ps_[NLA_WARP];
#pragma unroll
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) {
        const SoftmaxMs other = {__shfl_xor_sync(0xffffffffu, st.m, o),
                                 __shfl_xor_sync(0xffffffffu, st.s, o)};
        st = softmax_merge(st, other);
    }
    if (nla_lane() == 0) {
        softmax_pm_[nla_warp()] = st.m;
        softmax_ps_[nla_warp()] = st.s;
    }
    __syncthreads();
    SoftmaxMs r = {softmax_pm_[0], softmax_ps_[0]};
    for (int w = 1; w < nla_warps(); ++w) r = softmax_merge(r, {softmax_pm_[w], softmax_ps_[w]});
    __syncthreads();
    return r;
}

template <typename T>
__device__ __forceinline__ void softmax_fwd(T* __restrict__ out, const T* __restrict__ x, int n,
                                            int v) {
    constexpr int P = NlaPack<T>::N, U = 4;
    const bool vec = v % P == 0 && nla_aligned(x, 16) && nla_aligned(out, 16);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (long long)row * v;
        T* o = out + (long long)row * v;
        SoftmaxMs st = {-INFINITY, 0.0f};
        if (vec) {
            for (int j = threadIdx.x * P; j < v; j += blockDim.x * P) {
                const NlaVec<T, P> xv = nla_load<P>(xr + j);
                float c[P];
#pragma unroll
                for (int k = 0; k < P; ++k) c[k] = nla_f32(xv.v[k]);
                softmax_update<P>(st, c);
            }
        } else {
            for (int j = threadIdx.x; j < v; j += blockDim.x * U) {
                float c[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int i = j + u * blockDim.x;
                    c[u] = i < v ? nla_f32(xr[i]) : -INFINITY;
                }
                softmax_update<U>(st, c);
            }
        }
        st = softmax_block_merge(st);
        const float inv = 1.0f / st.s;
        if (vec) {
            for (int j = threadIdx.x * P; j < v; j += blockDim.x * P) {
                const NlaVec<T, P> xv = nla_load<P>(xr + j);
                NlaVec<T, P> ov;
#pragma unroll
                for (int k = 0; k < P; ++k)
                    ov.v[k] = nla_from_f32<T>(__fmul_rn(softmax_vexp(nla_f32(xv.v[k]) - st.m), inv));
                nla_store<P>(o + j, ov);
            }
        } else {
            for (int j = threadIdx.x; j < v; j += blockDim.x)
                o[j] = nla_from_f32<T>(__fmul_rn(softmax_vexp(nla_f32(xr[j]) - st.m), inv));
        }
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(T* __restrict__ dx, const T* __restrict__ dout,
                                            const T* __restrict__ out, int n, int v) {
    constexpr int P = NlaPack<T>::N;
    const bool vec = v % P == 0 && nla_aligned(dx, 16) && nla_aligned(dout, 16) &&
                     nla_aligned(out, 16);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const long long off = (long long)row * v;
        const T* g = dout + off;
        const T* o = out + off;
        T* d = dx + off;
        float s = 0.0f;
        if (vec) {
            for (int j = threadIdx.x * P; j < v; j += blockDim.x * P) {
                const NlaVec<T, P> gv = nla_load<P>(g + j), ov = nla_load<P>(o + j);
#pragma unroll
                for (int k = 0; k < P; ++k) s = fmaf(nla_f32(gv.v[k]), nla_f32(ov.v[k]), s);
            }
        } else {
            for (int j = threadIdx.x; j < v; j += blockDim.x)
                s = fmaf(nla_f32(g[j]), nla_f32(o[j]), s);
        }
        s = nla_block_sum(s);
        if (vec) {
            for (int j = threadIdx.x * P; j < v; j += blockDim.x * P) {
                const NlaVec<T, P> gv = nla_load<P>(g + j), ov = nla_load<P>(o + j);
                NlaVec<T, P> dv;
#pragma unroll
                for (int k = 0; k < P; ++k)
                    dv.v[k] = nla_from_f32<T>(nla_f32(ov.v[k]) * (nla_f32(gv.v[k]) - s));
                nla_store<P>(d + j, dv);
            }
        } else {
            for (int j = threadIdx.x; j < v; j += blockDim.x)
                d[j] = nla_from_f32<T>(nla_f32(o[j]) * (nla_f32(g[j]) - s));
        }
    }
}

#define SOFTMAX_KERNELS(S, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) softmax_fwd_##S(                \
        T* __restrict__ out, const T* __restrict__ x, int n, int v) {                           \
        softmax_fwd<T>(out, x, n, v);                                                           \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) softmax_bwd_##S(                \
        T* __restrict__ dx, const T* __restrict__ dout, const T* __restrict__ out, int n,       \
        int v) {                                                                                \
        softmax_bwd<T>(dx, dout, out, n, v);                                                    \
    }

SOFTMAX_KERNELS(f32, float)
SOFTMAX_KERNELS(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(softmax_fwd_f32);
NLA_EMU_KERNEL(softmax_fwd_bf16);
NLA_EMU_KERNEL(softmax_bwd_f32);
NLA_EMU_KERNEL(softmax_bwd_bf16);
#endif
