// rope: rotary position embedding, HF transformers' "rotate_half" convention, in place.
//
// Math    for every row (b, t) and head of x [B,T,H,HS], p = pos0 + t, for i < HS/2:
//           inv_freq_i = 1 / theta^((2i) / HS), angle = f32(p) * inv_freq_i (both in f32, as HF
//           transformers and the CPU twin), c = cos(angle), s = sin(angle) (evaluated in f64 of
//           that f32 angle and rounded to f32, as the CPU twin; the angle reaches thousands of
//           radians, where the fast sinf/cosf have no range reduction);
//         fwd: (x_i, x_{i+HS/2}) <- (x_i c - x_{i+HS/2} s, x_{i+HS/2} c + x_i s)   (= in place)
//         bwd: the transpose rotation (angle -> -angle), in place on dx:
//              (d_i, d_{i+HS/2}) <- (d_i c + d_{i+HS/2} s, d_{i+HS/2} c - d_i s)   (= in place)
//         The pairs are (i, i + HS/2) of one head (rotate_half), not adjacent elements.
//         theta^e is pow in f64 of the f32 exponent, rounded to f32 (the correctly rounded powf,
//         as glibc's powf gives the CPU twin in nearly all cases).
// Shapes  x, dx [B,T,H,HS] (H heads of a q or k); HS even, HS <= 2 * ROPE_MAX_HALF = 512.
// Dtypes  T; rotation in f32.
// Threads one block per row (b, t) (grid-stride over the B*T rows): the first HS/2 threads
//         compute the row's cos/sin into shared memory, then the block's threads take the
//         H * HS/2 pairs of the row. Launch: grid B*T, block 32 * ceil(H * HS / 2 / 32) capped
//         at 256.
// Position pos0 is the position of row t = 0: the `pos0` argument, or where `pos` is not null
//         pos[0] (a device word the host writes between steps, so that a decode step's launch
//         is the same at every position: what a replayed CUDA graph needs).
// Symbols rope_fwd_f32, rope_fwd_bf16, rope_bwd_f32, rope_bwd_bf16
//         (T* x, const uint32_t* pos, int b, int t, int h, int hs, int pos0, float theta)
//
// qkv_rope: the attention's q, k and v from the one matmul that projects all three, and back;
//         k and v go straight to their positions in a KV cache (or in [B,T] buffers: TMAX = T,
//         pos0 = 0, as training has them).
// Math    qkv [B,TQ,QKV] row-major, QKV = (NH + 2 NKV) HS: each row is q's NH heads, k's NKV
//         heads, v's NKV heads. Row (b, t) is at position p = pos0 + t. With rope as above:
//         fwd: q[b,t] = rope(q part), k[b,p] = rope(k part), v[b,p] = v part   (all =)
//         bwd: dqkv[b,t]'s q part = rope_bwd(dq[b,t]), k part = rope_bwd(dk[b,p]),
//              v part = dv[b,p]                                                (=)
//         k's and v's other positions are neither read nor written. The same table and rotation
//         code as rope_fwd / rope_bwd (rope_table, rope_rotate).
// Shapes  q, dq [B,TQ,NH,HS]; k, v, dk, dv [B,TMAX,NKV,HS]; qkv, dqkv [B,TQ,NH+2NKV,HS];
//         0 <= pos0 <= TMAX - TQ (a launch whose pos0 breaks this writes nothing, q included).
// Threads as rope: one block per row (b, t), the table in shared memory, then the block's
//         threads take the (NH + NKV) HS/2 pairs (q's and k's heads are adjacent in a qkv row),
//         then v's NKV HS elements. Launch: grid B*TQ, block 32 * ceil((NH + NKV) HS / 2 / 32)
//         capped at 256. Outputs must not overlap inputs.
// Symbols qkv_rope_fwd_f32, qkv_rope_fwd_bf16
//           (T* q, T* k, T* v, const T* qkv, const uint32_t* pos, int b, int tq, int tmax,
//            int nh, int nkv, int hs, int pos0, float theta)
//         qkv_rope_bwd_f32, qkv_rope_bwd_bf16
//           (T* dqkv, const T* dq, const T* dk, const T* dv, const uint32_t* pos, int b, int tq,
//            int tmax, int nh, int nkv, int hs, int pos0, float theta)
//
// nla: hot qkv_rope_fwd_f32 qkv_rope_fwd_bf16 qkv_rope_bwd_f32 qkv_rope_bwd_bf16

#include "common.cuh"

#define ROPE_MAX_HALF 256

// cos and sin of position p's angles into cs, sn [HS/2] (the block's threads share the work)
__device__ __forceinline__ void rope_table(float* cs, float* sn, int half, int hs, int p,
                                           float theta) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float e = (float)(2 * i) / (float)hs;
        const float inv_freq = 1.0f / (float)pow((double)theta, (double)e);
        const float angle = (float)p * inv_freq;
        cs[i] = (float)cos((double)angle);
        sn[i] = (float)sin((double)angle);
    }
}

// (x1, x2) rotated by the angle (c, s), or by minus it where `inverse`
__device__ __forceinline__ void rope_rotate(float x1, float x2, float c, float s, bool inverse,
                                            float& y1, float& y2) {
    if (inverse) {
        y1 = x1 * c + x2 * s;
        y2 = x2 * c - x1 * s;
    } else {
        y1 = x1 * c - x2 * s;
        y2 = x2 * c + x1 * s;
    }
}

template <typename T>
__device__ __forceinline__ void rope(T* x, const uint32_t* pos, int b, int t, int h, int hs,
                                     int pos0, float theta, bool inverse) {
    __shared__ float cs[ROPE_MAX_HALF], sn[ROPE_MAX_HALF];
    const int half = hs / 2;
    if (half <= 0 || half > ROPE_MAX_HALF) return;
    if (pos) pos0 = (int)pos[0];
    const long long rows = (long long)b * t;
    const int pairs = h * half;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        rope_table(cs, sn, half, hs, pos0 + (int)(row % t), theta);
        __syncthreads();
        T* xr = x + row * h * hs;
        for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
            const int head = k / half, i = k % half;
            T* xh = xr + (long long)head * hs;
            float y1, y2;
            rope_rotate(nla_f32(xh[i]), nla_f32(xh[i + half]), cs[i], sn[i], inverse, y1, y2);
            xh[i] = nla_from_f32<T>(y1);
            xh[i + half] = nla_from_f32<T>(y2);
        }
        __syncthreads();  // the table is rewritten for the next row
    }
}

#define NLA_ROPE(S, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        rope_fwd_##S(T* x, const uint32_t* pos, int b, int t, int h, int hs, int pos0,             \
                     float theta) {                                                                \
        rope<T>(x, pos, b, t, h, hs, pos0, theta, false);                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        rope_bwd_##S(T* dx, const uint32_t* pos, int b, int t, int h, int hs, int pos0,            \
                     float theta) {                                                                \
        rope<T>(dx, pos, b, t, h, hs, pos0, theta, true);                                          \
    }
NLA_ROPE(f32, float)
NLA_ROPE(bf16, nla_bf16)

// fwd (BWD false): q, k, v <- qkv. bwd: qkv <- dq, dk, dv (the pointers keep their names: in
// the backward q, k, v are the gradients read and qkv the one written).
template <typename T, bool BWD>
__device__ __forceinline__ void qkv_rope(T* q, T* k, T* v, T* qkv, const uint32_t* pos, int b,
                                         int tq, int tmax, int nh, int nkv, int hs, int pos0,
                                         float theta) {
    __shared__ float cs[ROPE_MAX_HALF], sn[ROPE_MAX_HALF];
    const int half = hs / 2;
    if (half <= 0 || half > ROPE_MAX_HALF) return;
    if (pos) pos0 = (int)pos[0];
    if (pos0 < 0 || pos0 > tmax - tq) return;
    const long long rows = (long long)b * tq;
    const int qd = nh * hs, kvd = nkv * hs, ld = qd + 2 * kvd;
    const int pairs = (nh + nkv) * half;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int t = (int)(row % tq);
        rope_table(cs, sn, half, hs, pos0 + t, theta);
        __syncthreads();
        T* fr = qkv + row * ld;
        // the row's position in k and v: b * TMAX + pos0 + t
        const long long kvrow = (row / tq) * tmax + pos0 + t;
        for (int kk = threadIdx.x; kk < pairs; kk += blockDim.x) {
            const int head = kk / half, i = kk % half;
            // q's heads then k's, adjacent in the fused row
            T* f = fr + (long long)head * hs;
            T* x = head < nh ? q + row * qd + (long long)head * hs
                             : k + kvrow * kvd + (long long)(head - nh) * hs;
            T* src = BWD ? x : f;
            T* dst = BWD ? f : x;
            float y1, y2;
            rope_rotate(nla_f32(src[i]), nla_f32(src[i + half]), cs[i], sn[i], BWD, y1, y2);
            dst[i] = nla_from_f32<T>(y1);
            dst[i + half] = nla_from_f32<T>(y2);
        }
        T* vr = v + kvrow * kvd;
        for (int j = threadIdx.x; j < kvd; j += blockDim.x) {
            if (BWD)
                fr[qd + kvd + j] = vr[j];
            else
                vr[j] = fr[qd + kvd + j];
        }
        __syncthreads();  // the table is rewritten for the next row
    }
}

#define NLA_QKV_ROPE(S, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        qkv_rope_fwd_##S(T* q, T* k, T* v, const T* qkv, const uint32_t* pos, int b, int tq,       \
                         int tmax, int nh, int nkv, int hs, int pos0, float theta) {               \
        qkv_rope<T, false>(q, k, v, const_cast<T*>(qkv), pos, b, tq, tmax, nh, nkv, hs, pos0,      \
                           theta);                                                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        qkv_rope_bwd_##S(T* dqkv, const T* dq, const T* dk, const T* dv, const uint32_t* pos,      \
                         int b, int tq, int tmax, int nh, int nkv, int hs, int pos0,               \
                         float theta) {                                                            \
        qkv_rope<T, true>(const_cast<T*>(dq), const_cast<T*>(dk), const_cast<T*>(dv), dqkv, pos,  \
                          b, tq, tmax, nh, nkv, hs, pos0, theta);                                  \
    }
NLA_QKV_ROPE(f32, float)
NLA_QKV_ROPE(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(rope_fwd_f32);
NLA_EMU_KERNEL(rope_fwd_bf16);
NLA_EMU_KERNEL(rope_bwd_f32);
NLA_EMU_KERNEL(rope_bwd_bf16);
NLA_EMU_KERNEL(qkv_rope_fwd_f32);
NLA_EMU_KERNEL(qkv_rope_fwd_bf16);
NLA_EMU_KERNEL(qkv_rope_bwd_f32);
NLA_EMU_KERNEL(qkv_rope_bwd_bf16);
#endif
