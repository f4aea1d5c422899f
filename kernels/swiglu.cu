// swiglu: the gating of the Llama MLP, elementwise.
//
// Math    s = sigmoid(g) = 1 / (1 + exp(-g)), silu(g) = g s, silu'(g) = s (1 + g (1 - s))
//         gu = [gate; up] and dgu = [dgate; dup]: one matmul writes gate and up, one buffer
//         holds their gradients, so the MLP's two projections stay one matmul in the backward.
//         fwd: out = silu(gate) * up                                  (=)
//         bwd: dgate = dout * up * silu'(gate); dup = dout * silu(gate) (both =: activation
//              gradients)
//         s = __fdividef(1, 1 + expf(-g)): expf within 2 ulp (the CPU twin's vexp also), the
//         division within 2 ulp, and 0 where 1 + e^-g > 2^126 (g < -87.3, where the exact s is
//         below 1.2e-38; the CPU twin's vexp saturates there too). The IEEE division would be as
//         good but its slow path is a subroutine call, which makes the unrolled 16-byte loop
//         spill. Products in the CPU twin's order: g * s * u, d * u * s * (1 + g (1 - s)),
//         d * g * s.
// Shapes  out, dout: n = N*F (i64); gu, dgu: 2n, gate = gu[0, n), up = gu[n, 2n), dgu alike.
// Dtypes  T everywhere; math in f32.
// Threads elementwise, grid-stride, 16 bytes per access (4 f32 / 8 bf16) when every pointer
//         (gate, up, dgate and dup included) is 16-byte aligned, else one element at a time.
//         up = gu + n and dup = dgu + n, so the 16-byte path needs n a multiple of the pack too:
//         a launch runs all of it 16 bytes at a time or all of it one element at a time (the
//         templates' tail loop serves callers with separate buffers). Launch: block 256, grid
//         ceil(n / (256 * pack)) (any grid is correct). Outputs must not overlap inputs.
// Symbols swiglu_fwd_f32, swiglu_fwd_bf16 (T* out, const T* gu, i64 n)
//         swiglu_bwd_f32, swiglu_bwd_bf16 (T* dgu, const T* dout, const T* gu, i64 n)
//
// nla: hot

#include "common.cuh"

__device__ __forceinline__ float swiglu_sigmoid(float g) {
    return __fdividef(1.0f, 1.0f + expf(-g));
}

__device__ __forceinline__ float swiglu_fwd_one(float g, float u) {
    return g * swiglu_sigmoid(g) * u;
}

__device__ __forceinline__ void swiglu_bwd_one(float d, float g, float u, float& dg, float& du) {
    const float s = swiglu_sigmoid(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd(T* __restrict__ out, const T* __restrict__ gate,
                                           const T* __restrict__ up, long long n) {
    constexpr int P = NlaPack<T>::N;
    long long start = 0;
    if (nla_aligned(out, 16) && nla_aligned(gate, 16) && nla_aligned(up, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<T, P> vg = nla_load<P>(gate + i * P), vu = nla_load<P>(up + i * P), vo;
            NLA_UNROLL
            for (int k = 0; k < P; ++k)
                vo.v[k] = nla_from_f32<T>(swiglu_fwd_one(nla_f32(vg.v[k]), nla_f32(vu.v[k])));
            nla_store<P>(out + i * P, vo);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride())
        out[i] = nla_from_f32<T>(swiglu_fwd_one(nla_f32(gate[i]), nla_f32(up[i])));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(T* __restrict__ dgate, T* __restrict__ dup,
                                           const T* __restrict__ dout, const T* __restrict__ gate,
                                           const T* __restrict__ up, long long n) {
    constexpr int P = NlaPack<T>::N;
    long long start = 0;
    if (nla_aligned(dgate, 16) && nla_aligned(dup, 16) && nla_aligned(dout, 16) &&
        nla_aligned(gate, 16) && nla_aligned(up, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<T, P> vd = nla_load<P>(dout + i * P), vg = nla_load<P>(gate + i * P),
                         vu = nla_load<P>(up + i * P), odg, odu;
            NLA_UNROLL
            for (int k = 0; k < P; ++k) {
                float dg, du;
                swiglu_bwd_one(nla_f32(vd.v[k]), nla_f32(vg.v[k]), nla_f32(vu.v[k]), dg, du);
                odg.v[k] = nla_from_f32<T>(dg);
                odu.v[k] = nla_from_f32<T>(du);
            }
            nla_store<P>(dgate + i * P, odg);
            nla_store<P>(dup + i * P, odu);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride()) {
        float dg, du;
        swiglu_bwd_one(nla_f32(dout[i]), nla_f32(gate[i]), nla_f32(up[i]), dg, du);
        dgate[i] = nla_from_f32<T>(dg);
        dup[i] = nla_from_f32<T>(du);
    }
}

#define NLA_SWIGLU(S, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        swiglu_fwd_##S(T* __restrict__ out, const T* __restrict__ gu, long long n) {               \
        swiglu_fwd<T>(out, gu, gu + n, n);                                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) swiglu_bwd_##S(                    \
        T* __restrict__ dgu, const T* __restrict__ dout, const T* __restrict__ gu, long long n) {  \
        swiglu_bwd<T>(dgu, dgu + n, dout, gu, gu + n, n);                                          \
    }
NLA_SWIGLU(f32, float)
NLA_SWIGLU(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(swiglu_fwd_f32);
NLA_EMU_KERNEL(swiglu_fwd_bf16);
NLA_EMU_KERNEL(swiglu_bwd_f32);
NLA_EMU_KERNEL(swiglu_bwd_bf16);
#endif
