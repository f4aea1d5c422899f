// cross_entropy: masked softmax cross-entropy over the vocabulary in chunks (one chunk of all V
// columns for whole logits), one row per block, so that the LM head's [N, V] logits need never
// exist whole and their gradient overwrites them.
//
// Math    (Device::cross_entropy_chunk_fwd / _chunk_bwd; CPU twin
//         src/device/cpu/cross_entropy.rs)
//         M = max_v x[n,v] (NaN skipped), S = sum_v e^(x[n,v] - M), y = targets[n]:
//         loss: losses[n] = mask[n] * ((M - x[n,y]) + ln S); mask[n] = 0: losses[n] = 0
//         gradient: w = mask[n] * scale; dlogits[n,v] = e^(x[n,v] - M) * (w * (1/S)) - w [v = y]
//         chunk_fwd over logits [N,VC] = columns [v0, v0+VC) of the V-wide rows, issued in
//              order of v0: state[n] = (M, S, x_y) of the columns seen so far (x_y 0 until its
//              chunk); v0 = 0 starts it (=), later chunks merge into it with the pair rule
//              below (+=); the chunk ending at V writes losses[n] (=). mask 0: the row is
//              skipped without reading it (state untouched, loss 0; padding may hold anything).
//         chunk_bwd, in place on the chunk's logits: x[n,j] <- the gradient at column v0 + j,
//              M and S from the state (=); w = 0: the row is 0 without reading it. (In place,
//              the [N,VC] gradient needs no buffer of its own.)
//         e^x is the CPU twin's f32 `vexp` op for op (Cody-Waite reduction, degree-6
//         polynomial, no FMA contraction: __fmul_rn / __fadd_rn), so each e^(x - M) equals the
//         twin's bit for bit; S differs from the twin's f64 sum only by f32 rounding (see
//         Threads). Rows of -inf logits contribute 0 per -inf entry; a row whose max is -inf or
//         +inf gives NaN, as on the twin.
// Shapes  logits [N,VC] (VC = V: whole rows); targets [N] (< V, checked by the launcher); mask,
//         losses [N]; state [N,3].
// Dtypes  logits: T; targets u32; mask, losses, state: f32 in both modes; scale f32.
//         Arithmetic in f32: each thread keeps an online (max, sum) pair over its elements in
//         chunks (8 bf16 / 4 f32 per 16-byte load, or 4 strided elements), rescaling its sum
//         by e^(m_old - m_new) when a chunk raises the max (one extra exp per chunk, not per
//         element); pairs merge with (m, s) + (m', s') = (max, s e^(m - max) + s' e^(m' - max)).
// Threads one block per row (grid-stride over rows). chunk_fwd: one pass over the row (online
//         max/sum), a fixed-tree block merge (xor butterfly in the warp, then the warps' pairs
//         in warp order: deterministic), thread 0 merges into the row's state and writes the
//         loss. chunk_bwd reads M and S from the state and makes one pass, each element read
//         then written by the same thread. 16-byte accesses when VC is a multiple of the pack
//         and the pointer is 16-byte aligned, else strided scalar accesses.
// Launch  grid N (or fewer: grid-stride), block 256 (any multiple of 32 up to 1024), no
//         dynamic shared memory.
// Symbols cross_entropy_chunk_fwd_f32, cross_entropy_chunk_fwd_bf16
//           (float* losses, float* state, const T* logits, const uint32_t* targets,
//            const float* mask, int n, int vc, int v, int v0)
//         cross_entropy_chunk_bwd_f32, cross_entropy_chunk_bwd_bf16
//           (T* logits, const float* state, const uint32_t* targets, const float* mask,
//            int n, int vc, int v0, float scale)
//
// nla: hot

#include "common.cuh"

// e^x as the CPU twin's `Real::vexp` for f32 (src/device/cpu/mod.rs), operation for operation:
// clamp to [-87.33655, 88] (NaN stays NaN), n = round-half-even(x log2 e), r = x - n ln2_hi -
// n ln2_lo, a degree-6 polynomial, times 2^n; 0 below -87.33655. Every product and sum rounds
// on its own (the intrinsics are never fused into FMAs), so the result is the twin's, bit for
// bit. (common.cuh could host this; the row kernels carry a copy each.)
__device__ __forceinline__ float ce_vexp(float v) {
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
    const int ni = n == n ? (int)n : 0;  // NaN -> 0, as Rust's `as i32`
    const float scale = __uint_as_float((unsigned)(ni + 127) << 23);
    return v < MIN_X ? 0.0f : __fmul_rn(e, scale);
}

// A running (max, sum of e^(x - max)) pair.
struct CeMs {
    float m, s;
};

// s e^(m - mn), mn >= m; exactly s when m == mn (which also covers m = mn = -inf).
__device__ __forceinline__ float ce_rescale(float s, float m, float mn) {
    return m == mn ? s : __fmul_rn(s, ce_vexp(m - mn));
}

__device__ __forceinline__ CeMs ce_merge(CeMs a, CeMs b) {
    const float mn = fmaxf(a.m, b.m);
    return {mn, ce_rescale(a.s, a.m, mn) + ce_rescale(b.s, b.m, mn)};  // commutative
}

// Adds U values to the pair (-inf entries, also used as padding, add 0).
template <int U> __device__ __forceinline__ void ce_update(CeMs& st, const float (&v)[U]) {
    float mn = st.m;
#pragma unroll
    for (int u = 0; u < U; ++u) mn = fmaxf(mn, v[u]);
    float s = ce_rescale(st.s, st.m, mn);
#pragma unroll
    for (int u = 0; u < U; ++u) s += v[u] == -INFINITY ? 0.0f : ce_vexp(v[u] - mn);
    st = {mn, s};
}

// The block's merged pair; every thread gets it. Every thread must call (two barriers).
__device__ __forceinline__ CeMs ce_block_merge(CeMs st) {
    __shared__ float ce_pm_[NLA_WARP], ce_ps_[NLA_WARP];
#pragma unroll
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) {
        const CeMs other = {__shfl_xor_sync(0xffffffffu, st.m, o),
                            __shfl_xor_sync(0xffffffffu, st.s, o)};
        st = ce_merge(st, other);
    }
    if (nla_lane() == 0) {
        ce_pm_[nla_warp()] = st.m;
        ce_ps_[nla_warp()] = st.s;
    }
    __syncthreads();
    CeMs r = {ce_pm_[0], ce_ps_[0]};
    for (int w = 1; w < nla_warps(); ++w) r = ce_merge(r, {ce_pm_[w], ce_ps_[w]});
    __syncthreads();
    return r;
}

// (max, sum) of one row, one pass.
template <typename T>
__device__ __forceinline__ CeMs ce_row_stats(const T* __restrict__ x, int v, bool vec) {
    constexpr int P = NlaPack<T>::N, U = 4;
    CeMs st = {-INFINITY, 0.0f};
    if (vec) {
        for (int j = threadIdx.x * P; j < v; j += blockDim.x * P) {
            const NlaVec<T, P> xv = nla_load<P>(x + j);
            float c[P];
#pragma unroll
            for (int k = 0; k < P; ++k) c[k] = nla_f32(xv.v[k]);
            ce_update<P>(st, c);
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x * U) {
            float c[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = j + u * blockDim.x;
                c[u] = i < v ? nla_f32(x[i]) : -INFINITY;
            }
            ce_update<U>(st, c);
        }
    }
    return ce_block_merge(st);
}

// Row gradient dlogits[j] = e^(x[j] - m) * ws - w [j = y] over VC columns (y may be outside).
// d may be x (in place): each element is read, then written, by the same thread; so neither
// pointer is __restrict__.
template <typename T>
__device__ __forceinline__ void ce_write_grad(T* d, const T* x, int vc, bool vec, float m,
                                              float ws, float w, int y) {
    constexpr int P = NlaPack<T>::N;
    if (vec) {
        for (int j = threadIdx.x * P; j < vc; j += blockDim.x * P) {
            const NlaVec<T, P> xv = nla_load<P>(x + j);
            NlaVec<T, P> dv;
#pragma unroll
            for (int k = 0; k < P; ++k) {
                float g = __fmul_rn(ce_vexp(nla_f32(xv.v[k]) - m), ws);
                if (j + k == y) g -= w;
                dv.v[k] = nla_from_f32<T>(g);
            }
            nla_store<P>(d + j, dv);
        }
    } else {
        for (int j = threadIdx.x; j < vc; j += blockDim.x) {
            float g = __fmul_rn(ce_vexp(nla_f32(x[j]) - m), ws);
            if (j == y) g -= w;
            d[j] = nla_from_f32<T>(g);
        }
    }
}

template <typename T> __device__ __forceinline__ void ce_zero_row(T* __restrict__ d, int vc) {
    const T z = nla_from_f32<T>(0.0f);
    for (int j = threadIdx.x; j < vc; j += blockDim.x) d[j] = z;
}

// One vocabulary chunk (columns [v0, v0 + vc) of a v-wide row) of the forward: merges the
// chunk's (max, sum) into state[row] = (M, S, x_y), v0 == 0 starting it; the last chunk
// writes the loss. Thread 0 alone touches the state (after the block merge).
template <typename T>
__device__ __forceinline__ void ce_chunk_fwd(float* __restrict__ losses,
                                             float* __restrict__ state,
                                             const T* __restrict__ logits,
                                             const uint32_t* __restrict__ targets,
                                             const float* __restrict__ mask, int n, int vc, int v,
                                             int v0) {
    constexpr int P = NlaPack<T>::N;
    const bool vec = vc % P == 0 && nla_aligned(logits, 16);
    const bool last = v0 + vc == v;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const float mk = mask[row];
        if (mk == 0.0f) {  // block-uniform
            if (last && threadIdx.x == 0) losses[row] = 0.0f;
            continue;
        }
        const T* x = logits + (long long)row * vc;
        const CeMs c = ce_row_stats(x, vc, vec);
        if (threadIdx.x == 0) {
            float* st = state + 3LL * row;
            const int j = (int)targets[row] - v0;
            const bool here = j >= 0 && j < vc;
            CeMs r = c;
            float t = here ? nla_f32(x[j]) : 0.0f;
            if (v0 > 0) {
                r = ce_merge({st[0], st[1]}, c);
                if (!here) t = st[2];
            }
            st[0] = r.m;
            st[1] = r.s;
            st[2] = t;
            if (last) losses[row] = mk * ((r.m - t) + logf(r.s));
        }
    }
}

// The backward of one chunk, in place on its logits (made again), from the forward's state
// (M, S, _).
template <typename T>
__device__ __forceinline__ void ce_chunk_bwd(T* logits, const float* __restrict__ state,
                                             const uint32_t* __restrict__ targets,
                                             const float* __restrict__ mask, int n, int vc,
                                             int v0, float scale) {
    constexpr int P = NlaPack<T>::N;
    const bool vec = vc % P == 0 && nla_aligned(logits, 16);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const float w = mask[row] * scale;
        T* x = logits + (long long)row * vc;
        if (w == 0.0f) {  // block-uniform
            ce_zero_row(x, vc);
            continue;
        }
        const float m = state[3LL * row], s = state[3LL * row + 1];
        ce_write_grad(x, x, vc, vec, m, w * (1.0f / s), w, (int)targets[row] - v0);
    }
}

#define CE_KERNELS(S, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) cross_entropy_chunk_fwd_##S(   \
        float* __restrict__ losses, float* __restrict__ state, const T* __restrict__ logits,   \
        const uint32_t* __restrict__ targets, const float* __restrict__ mask, int n, int vc,   \
        int v, int v0) {                                                                       \
        ce_chunk_fwd<T>(losses, state, logits, targets, mask, n, vc, v, v0);                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) cross_entropy_chunk_bwd_##S(   \
        T* logits, const float* __restrict__ state, const uint32_t* __restrict__ targets,      \
        const float* __restrict__ mask, int n, int vc, int v0, float scale) {                  \
        ce_chunk_bwd<T>(logits, state, targets, mask, n, vc, v0, scale);                       \
    }

CE_KERNELS(f32, float)
CE_KERNELS(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(cross_entropy_chunk_fwd_f32);
NLA_EMU_KERNEL(cross_entropy_chunk_fwd_bf16);
NLA_EMU_KERNEL(cross_entropy_chunk_bwd_f32);
NLA_EMU_KERNEL(cross_entropy_chunk_bwd_bf16);
#endif
