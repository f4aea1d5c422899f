// pool: critic pooling, one vector per sequence from the hidden states of its real tokens.
//
// Math    over the real tokens of row b (mask 1 = real, 0 = padding; right padding; every row
//         has a real token: the launcher checks, as the CPU device does), len = sum_t mask[b,t]:
//         mode 0 last:     out[b] = h[b, len - 1]                                          (=)
//         mode 1 mean:     out[b] = (sum_t m_t h_t) * (1 / len)                             (=)
//         mode 2 max:      out[b,c] = h[b, t*, c], t* = the first real t with the largest value
//                          (a NaN wins over numbers and the first NaN stays, as the CPU twin)  (=)
//         mode 3 weighted: p = softmax(w[:T]) (max-subtracted, expf), D = sum_t p_t m_t + 1e-8,
//                          alpha_t = p_t m_t / D, out[b] = sum_{alpha_t != 0} alpha_t h_t    (=)
//         bwd: dh[B,T,C] (=, zero where out does not depend on h):
//              last: dh[b, len-1] = dout[b]; mean: dh[b,t] = (m_t / len) dout[b];
//              max: dh[b,t*,c] = dout[b,c]; weighted: dh[b,t] = alpha_t dout[b], and
//              dw[t] += sum_b p_t (dp_t - sum_u p_u dp_u) for t < T                         (+=)
//              with g_t = dout[b] . h[b,t], gbar = sum_t alpha_t g_t, dp_t = m_t (g_t - gbar) / D.
// Shapes  h, dh [B,T,C]; mask [B,T]; out, dout [B,C]; w, dw [Tmax >= T] (weighted only; other
//         modes may pass null).
// Dtypes  h, dh, out, dout, w: T; mask and dw: f32. Sums in f32.
// Threads one block per sequence b (grid-stride over B). The mask sum and the softmax sums
//         are block reductions (fixed trees); pooling is one thread per channel looping over t
//         in order (coalesced over channels), so max's first-argmax rule is the CPU twin's.
//         Weighted keeps per-position values in dynamic shared memory: fwd alpha [T]; bwd
//         p, alpha, g [3T], g_t one warp per position. dw: one atomicAdd(float) per (b, t), so
//         the order of the B contributions depends on scheduling (f32 rounding, not bit for
//         bit, against the CPU twin's row order).
//         Launch: grid B, block 256; dynamic shared memory for weighted: fwd T * 4 bytes, bwd
//         3 * T * 4 bytes (past 48 KiB with the 256 bytes of static shared memory, from T = 4075
//         for the backward, the max dynamic shared memory attribute must be raised: the CUDA
//         launcher does); other modes need none.
// Symbols pool_fwd_f32, pool_fwd_bf16 (T* out, const T* h, const float* mask, const T* w, int b,
//                                      int t, int c, int mode)
//         pool_bwd_f32, pool_bwd_bf16 (T* dh, float* dw, const T* dout, const T* h,
//                                      const float* mask, const T* w, int b, int t, int c,
//                                      int mode)

#include "common.cuh"

#define POOL_LAST 0
#define POOL_MEAN 1
#define POOL_MAX 2
#define POOL_WEIGHTED 3
#define POOL_EPS 1e-8f

// Number of real tokens of a row (sum of its 0/1 mask); every thread gets it.
__device__ __forceinline__ float pool_len(const float* mb, int t) {
    float cnt = 0.0f;
    for (int i = threadIdx.x; i < t; i += blockDim.x) cnt += mb[i];
    return nla_block_sum(cnt);
}

// Index of the last real token: round(len) clamped to [1, T], minus 1 (as the CPU twin).
__device__ __forceinline__ int pool_last(float len, int t) {
    const int n = (int)rintf(len);
    return (n < 1 ? 1 : n > t ? t : n) - 1;
}

// For channel j of a row: the first real position holding the largest value.
template <typename T>
__device__ __forceinline__ int pool_argmax(const T* hb, const float* mb, int t, int c, int j) {
    int idx = 0;
    bool found = false;
    float best = 0.0f;
    for (int i = 0; i < t; ++i) {
        if (mb[i] == 0.0f) continue;
        const float v = nla_f32(hb[(long long)i * c + j]);
        if (!found || v > best || (isnan(v) && !isnan(best))) {
            best = v;
            idx = i;
            found = true;
        }
    }
    return idx;
}

// Weighted pooling's p_t = softmax(w[:T])_t into p (may be null), alpha_t into alpha; returns D.
// Every thread of the block must call; p and alpha are complete when it returns.
template <typename T>
__device__ __forceinline__ float pool_alphas(float* p, float* alpha, const T* w, const float* mb,
                                             int t) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < t; i += blockDim.x) mx = fmaxf(mx, nla_f32(w[i]));
    mx = nla_block_max(mx);
    float z = 0.0f;
    for (int i = threadIdx.x; i < t; i += blockDim.x) {
        const float e = expf(nla_f32(w[i]) - mx);
        alpha[i] = e;
        z += e;
    }
    const float inv = 1.0f / nla_block_sum(z);
    float pm = 0.0f;
    for (int i = threadIdx.x; i < t; i += blockDim.x) {
        const float pi = alpha[i] * inv;
        if (p) p[i] = pi;
        alpha[i] = pi;
        pm += pi * mb[i];
    }
    const float den = nla_block_sum(pm) + POOL_EPS;
    for (int i = threadIdx.x; i < t; i += blockDim.x) alpha[i] = alpha[i] * mb[i] / den;
    __syncthreads();
    return den;
}

template <typename T>
__device__ __forceinline__ void pool_fwd(T* out, const T* h, const float* mask, const T* w, int b,
                                         int t, int c, int mode) {
    NLA_DYNAMIC_SMEM(float, alpha);  // weighted: [T]
    for (int bi = blockIdx.x; bi < b; bi += gridDim.x) {
        const T* hb = h + (long long)bi * t * c;
        const float* mb = mask + (long long)bi * t;
        T* o = out + (long long)bi * c;
        const float len = pool_len(mb, t);
        if (mode == POOL_LAST) {
            const int last = pool_last(len, t);
            for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = hb[(long long)last * c + j];
        } else if (mode == POOL_MEAN) {
            const float inv = 1.0f / len;
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                float acc = 0.0f;
                for (int i = 0; i < t; ++i) {
                    const float m = mb[i];
                    if (m != 0.0f) acc += m * nla_f32(hb[(long long)i * c + j]);
                }
                o[j] = nla_from_f32<T>(acc * inv);
            }
        } else if (mode == POOL_MAX) {
            for (int j = threadIdx.x; j < c; j += blockDim.x)
                o[j] = hb[(long long)pool_argmax(hb, mb, t, c, j) * c + j];
        } else if (mode == POOL_WEIGHTED) {
            pool_alphas<T>(nullptr, alpha, w, mb, t);
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                float acc = 0.0f;
                for (int i = 0; i < t; ++i) {
                    const float a = alpha[i];
                    if (a != 0.0f) acc += a * nla_f32(hb[(long long)i * c + j]);
                }
                o[j] = nla_from_f32<T>(acc);
            }
            __syncthreads();  // alpha is rewritten for the next row
        }
    }
}

template <typename T>
__device__ __forceinline__ void pool_bwd(T* dh, float* dw, const T* dout, const T* h,
                                         const float* mask, const T* w, int b, int t, int c,
                                         int mode) {
    NLA_DYNAMIC_SMEM(float, sm);  // weighted: p [T], alpha [T], g [T]
    for (int bi = blockIdx.x; bi < b; bi += gridDim.x) {
        const T* hb = h + (long long)bi * t * c;
        T* db = dh + (long long)bi * t * c;
        const float* mb = mask + (long long)bi * t;
        const T* g = dout + (long long)bi * c;
        const float len = pool_len(mb, t);
        const T zero = nla_from_f32<T>(0.0f);
        if (mode == POOL_LAST) {
            const int last = pool_last(len, t);
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const T gj = g[j];
                for (int i = 0; i < t; ++i) db[(long long)i * c + j] = i == last ? gj : zero;
            }
        } else if (mode == POOL_MEAN) {
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const float gj = nla_f32(g[j]);
                for (int i = 0; i < t; ++i) {
                    const float m = mb[i];
                    db[(long long)i * c + j] = m != 0.0f ? nla_from_f32<T>(m / len * gj) : zero;
                }
            }
        } else if (mode == POOL_MAX) {
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const int idx = pool_argmax(hb, mb, t, c, j);
                const T gj = g[j];
                for (int i = 0; i < t; ++i) db[(long long)i * c + j] = i == idx ? gj : zero;
            }
        } else if (mode == POOL_WEIGHTED) {
            float *p = sm, *alpha = sm + t, *gt = sm + 2 * t;
            const float den = pool_alphas<T>(p, alpha, w, mb, t);
            // g_t = dout[b] . h[b,t], one warp per position
            for (int i = nla_warp(); i < t; i += nla_warps()) {
                const T* hr = hb + (long long)i * c;
                float acc = 0.0f;
                for (int j = nla_lane(); j < c; j += NLA_WARP)
                    acc += nla_f32(g[j]) * nla_f32(hr[j]);
                acc = nla_warp_sum(acc);
                if (nla_lane() == 0) gt[i] = acc;
            }
            __syncthreads();
            for (int j = threadIdx.x; j < c; j += blockDim.x) {
                const float gj = nla_f32(g[j]);
                for (int i = 0; i < t; ++i)
                    db[(long long)i * c + j] = nla_from_f32<T>(alpha[i] * gj);
            }
            float gbar = 0.0f;
            for (int i = threadIdx.x; i < t; i += blockDim.x) gbar += alpha[i] * gt[i];
            gbar = nla_block_sum(gbar);
            float pdp = 0.0f;
            for (int i = threadIdx.x; i < t; i += blockDim.x)
                pdp += p[i] * (mb[i] * (gt[i] - gbar) / den);
            pdp = nla_block_sum(pdp);
            for (int i = threadIdx.x; i < t; i += blockDim.x) {
                const float dp = mb[i] * (gt[i] - gbar) / den;
                atomicAdd(dw + i, p[i] * (dp - pdp));
            }
            __syncthreads();  // p, alpha, g are rewritten for the next row
        }
    }
}

#define NLA_POOL(S, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) pool_fwd_##S(                      \
        T* out, const T* h, const float* mask, const T* w, int b, int t, int c, int mode) {        \
        pool_fwd<T>(out, h, mask, w, b, t, c, mode);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        pool_bwd_##S(T* dh, float* dw, const T* dout, const T* h, const float* mask, const T* w,   \
                     int b, int t, int c, int mode) {                                              \
        pool_bwd<T>(dh, dw, dout, h, mask, w, b, t, c, mode);                                      \
    }
NLA_POOL(f32, float)
NLA_POOL(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(pool_fwd_f32);
NLA_EMU_KERNEL(pool_fwd_bf16);
NLA_EMU_KERNEL(pool_bwd_f32);
NLA_EMU_KERNEL(pool_bwd_bf16);
#endif
