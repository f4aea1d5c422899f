// norm_scale: the row-wise fixed-norm rescale n_s(x) = x * s / max(||x||_2, 1e-12).
//
// Math    fwd: y[n, :] = x[n, :] * (s / max(||x_n||, 1e-12))                               (=)
//         bwd: dx = (s / ||x||) (dy - x (x . dy) / ||x||^2)  where ||x|| >= 1e-12,
//              dx = (s / 1e-12) dy                            where the clamp is active      (=)
//              (x: the forward's input). ||x|| = sqrtf of a sum of squares in f32, as the CPU
//              twin; 1/||x|| and s/max(.) are IEEE divisions.
// Shapes  x, y, dy, dx [N,D]: injected vectors (N = S, D = C, s = injection_scale) or critic
//         predictions and targets (N = B, D = A, s = mse_scale); s > 0.
// Dtypes  T; math in f32.
// Threads one block per row (grid-stride over N): block reductions (fixed tree) of x.x (and
//         x.dy for the backward), then the row is rescaled. y may be x (in place) and dx may be
//         dy: each element is read before the same thread writes it. Launch: grid N, block 256.
// Symbols norm_scale_fwd_f32, norm_scale_fwd_bf16 (T* y, const T* x, int n, int d, float s)
//         norm_scale_bwd_f32, norm_scale_bwd_bf16 (T* dx, const T* dy, const T* x, int n,
//                                                  int d, float s)

#include "common.cuh"

#define NORM_SCALE_EPS 1e-12f

template <typename T>
__device__ __forceinline__ void norm_scale_fwd(T* y, const T* x, int n, int d, float s) {
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (long long)row * d;
        T* yr = y + (long long)row * d;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float f = nla_f32(xr[j]);
            ss += f * f;
        }
        ss = nla_block_sum(ss);
        const float k = s / fmaxf(sqrtf(ss), NORM_SCALE_EPS);
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            yr[j] = nla_from_f32<T>(nla_f32(xr[j]) * k);
    }
}

template <typename T>
__device__ __forceinline__ void norm_scale_bwd(T* dx, const T* dy, const T* x, int n, int d,
                                               float s) {
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const long long off = (long long)row * d;
        const T *xr = x + off, *gr = dy + off;
        T* dr = dx + off;
        float xx = 0.0f, xg = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float f = nla_f32(xr[j]);
            xx += f * f;
            xg += f * nla_f32(gr[j]);
        }
        xx = nla_block_sum(xx);
        xg = nla_block_sum(xg);
        const float norm = sqrtf(xx);
        if (norm < NORM_SCALE_EPS) {
            const float k = s / NORM_SCALE_EPS;
            for (int j = threadIdx.x; j < d; j += blockDim.x)
                dr[j] = nla_from_f32<T>(nla_f32(gr[j]) * k);
        } else {
            const float inv = 1.0f / norm;
            const float proj = xg * inv * inv, k = s * inv;
            for (int j = threadIdx.x; j < d; j += blockDim.x)
                dr[j] = nla_from_f32<T>(k * (nla_f32(gr[j]) - nla_f32(xr[j]) * proj));
        }
    }
}

#define NLA_NORM_SCALE(S, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        norm_scale_fwd_##S(T* y, const T* x, int n, int d, float s) {                              \
        norm_scale_fwd<T>(y, x, n, d, s);                                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        norm_scale_bwd_##S(T* dx, const T* dy, const T* x, int n, int d, float s) {                \
        norm_scale_bwd<T>(dx, dy, x, n, d, s);                                                     \
    }
NLA_NORM_SCALE(f32, float)
NLA_NORM_SCALE(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(norm_scale_fwd_f32);
NLA_EMU_KERNEL(norm_scale_fwd_bf16);
NLA_EMU_KERNEL(norm_scale_bwd_f32);
NLA_EMU_KERNEL(norm_scale_bwd_bf16);
#endif
