// adamw: one fused AdamW step over a window of the flat buffers, and the sum of squares behind
// the global gradient norm.
//
// Math    adamw, elementwise over i < n (p, m, v updated in place):
//           g' = g * grad_scale
//           m  = b1 m + (1 - b1) g'                                         (=, in place)
//           v  = b2 v + (1 - b2) g' g'                                      (=, in place)
//           p -= lr (wd p + (m inv_bc1) / (sqrt(v inv_bc2) + eps))          (in place; decoupled
//                                                                             weight decay)
//         with inv_bc1 = 1 / (1 - b1^step), inv_bc2 = 1 / (1 - b2^step): the launcher computes
//         them in f64 from the 1-based step and passes them rounded to f32 (as the CPU twin).
//         The terms are formed in the CPU twin's order; sqrtf and the division are IEEE.
//         adamw_bf16 also writes the bf16 working copy p16[i] = bf16(p[i]) of the new p (=).
//         sum_squares: out[0] += sum_i x_i^2 (+=: the launcher zeroes the slot first, or adds
//         several windows — ZeRO shards, parameter groups — into one slot).
// Shapes  p, g, m, v, p16: [n], a window of the flat parameter buffers; x: [n]; out: [1].
// Dtypes  adamw: p, g, m, v f32 in both symbols (master weights, moments and parameter
//         gradients are f32); p16 bf16. sum_squares: x f32 or bf16, out f64.
// Threads adamw: elementwise, grid-stride, 4 elements per access when p, g, m, v are 16-byte
//         aligned and p16 8-byte aligned, else one at a time. Launch: block 256, grid
//         ceil(n / 1024) (any grid is correct). No two of p, g, m, v, p16 may overlap.
//         sum_squares: grid-stride; each thread squares and sums 4 f32 / 8 bf16 at a time in f32,
//         adds that to its f64 sum; the block sums in f64 (fixed tree) and adds its sum to out
//         with one atomicAdd(double). Launch: block 256, grid min(ceil(n / 2048), 2 * SMs).
// Precision sum_squares: the CPU twin sums in f64 in a fixed order. Here the squares of one
//         16-byte pack (4 f32 / 8 bf16) are summed in f32: the terms are >= 0, so the relative
//         error of each pack sum, and hence of the total, is below 5e-7; everything after is
//         f64, and the blocks add in a scheduling-dependent order (~1e-16 relative). Ample for
//         a gradient norm used to clip.
// Symbols adamw_f32  (float* p, const float* g, float* m, float* v, i64 n, float lr, float b1,
//                     float b2, float eps, float wd, float inv_bc1, float inv_bc2,
//                     float grad_scale)
//         adamw_bf16 (float* p, bf16* p16, const float* g, float* m, float* v, i64 n, ... as above)
//         sum_squares_f32, sum_squares_bf16 (double* out, const T* x, i64 n)
//
// nla: hot

#include "common.cuh"

struct AdamwHp {
    float lr, b1, b2, eps, wd, inv_bc1, inv_bc2, gs;
};

// One element: updates m, v, returns the new p.
__device__ __forceinline__ float adamw_one(float p, float g, float& m, float& v, const AdamwHp& h) {
    g = g * h.gs;
    m = h.b1 * m + (1.0f - h.b1) * g;
    v = h.b2 * v + (1.0f - h.b2) * g * g;
    const float update = (m * h.inv_bc1) / (sqrtf(v * h.inv_bc2) + h.eps);
    return p - h.lr * (h.wd * p + update);
}

template <bool COPY>
__device__ __forceinline__ void adamw(float* __restrict__ p, nla_bf16* __restrict__ p16,
                                      const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, long long n, const AdamwHp h) {
    constexpr int P = 4;
    long long start = 0;
    if (nla_aligned(p, 16) && nla_aligned(g, 16) && nla_aligned(m, 16) && nla_aligned(v, 16) &&
        (!COPY || nla_aligned(p16, 8))) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<float, P> vp = nla_load<P>(p + i * P), vg = nla_load<P>(g + i * P),
                             vm = nla_load<P>(m + i * P), vv = nla_load<P>(v + i * P);
            NlaVec<nla_bf16, P> vb;
            NLA_UNROLL
            for (int k = 0; k < P; ++k) {
                vp.v[k] = adamw_one(vp.v[k], vg.v[k], vm.v[k], vv.v[k], h);
                if (COPY) vb.v[k] = nla_from_f32<nla_bf16>(vp.v[k]);
            }
            nla_store<P>(p + i * P, vp);
            nla_store<P>(m + i * P, vm);
            nla_store<P>(v + i * P, vv);
            if (COPY) nla_store<P>(p16 + i * P, vb);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride()) {
        float mi = m[i], vi = v[i];
        const float pi = adamw_one(p[i], g[i], mi, vi, h);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (COPY) p16[i] = nla_from_f32<nla_bf16>(pi);
    }
}

template <typename T>
__device__ __forceinline__ void sum_squares(double* out, const T* __restrict__ x, long long n) {
    constexpr int P = NlaPack<T>::N;
    double acc = 0.0;
    long long start = 0;
    if (nla_aligned(x, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<T, P> vx = nla_load<P>(x + i * P);
            float s = 0.0f;
            NLA_UNROLL
            for (int k = 0; k < P; ++k) {
                const float f = nla_f32(vx.v[k]);
                s += f * f;
            }
            acc += (double)s;
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride()) {
        const double f = (double)nla_f32(x[i]);
        acc += f * f;
    }
    acc = nla_block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

#define NLA_ADAMW_ARGS                                                                             \
    const float *__restrict__ g, float *__restrict__ m, float *__restrict__ v, long long n,        \
        float lr, float b1, float b2, float eps, float wd, float inv_bc1, float inv_bc2,           \
        float grad_scale
#define NLA_ADAMW_HP {lr, b1, b2, eps, wd, inv_bc1, inv_bc2, grad_scale}

extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    adamw_f32(float* __restrict__ p, NLA_ADAMW_ARGS) {
    adamw<false>(p, nullptr, g, m, v, n, AdamwHp NLA_ADAMW_HP);
}
extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    adamw_bf16(float* __restrict__ p, nla_bf16* __restrict__ p16, NLA_ADAMW_ARGS) {
    adamw<true>(p, p16, g, m, v, n, AdamwHp NLA_ADAMW_HP);
}
extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    sum_squares_f32(double* out, const float* __restrict__ x, long long n) {
    sum_squares<float>(out, x, n);
}
extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    sum_squares_bf16(double* out, const nla_bf16* __restrict__ x, long long n) {
    sum_squares<nla_bf16>(out, x, n);
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(adamw_f32);
NLA_EMU_KERNEL(adamw_bf16);
NLA_EMU_KERNEL(sum_squares_f32);
NLA_EMU_KERNEL(sum_squares_bf16);
#endif
