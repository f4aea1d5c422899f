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
// Shapes  x, dx [B,T,H,HS] (H = NH for q, NKV for k); HS even, HS <= 2 * ROPE_MAX_HALF = 512.
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

#include "common.cuh"

#define ROPE_MAX_HALF 256

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
        const int ti = (int)(row % t);
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float e = (float)(2 * i) / (float)hs;
            const float inv_freq = 1.0f / (float)pow((double)theta, (double)e);
            const float angle = (float)(pos0 + ti) * inv_freq;
            cs[i] = (float)cos((double)angle);
            sn[i] = (float)sin((double)angle);
        }
        __syncthreads();
        T* xr = x + row * h * hs;
        for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
            const int head = k / half, i = k % half;
            T* xh = xr + (long long)head * hs;
            const float x1 = nla_f32(xh[i]), x2 = nla_f32(xh[i + half]);
            const float c = cs[i], s = sn[i];
            if (inverse) {
                xh[i] = nla_from_f32<T>(x1 * c + x2 * s);
                xh[i + half] = nla_from_f32<T>(x2 * c - x1 * s);
            } else {
                xh[i] = nla_from_f32<T>(x1 * c - x2 * s);
                xh[i + half] = nla_from_f32<T>(x2 * c + x1 * s);
            }
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

#ifdef NLA_EMU
NLA_EMU_KERNEL(rope_fwd_f32);
NLA_EMU_KERNEL(rope_fwd_bf16);
NLA_EMU_KERNEL(rope_bwd_f32);
NLA_EMU_KERNEL(rope_bwd_bf16);
#endif
