// residual: the add of a residual connection, and its gradient.
//
// Math    fwd: out = a + b                                   (=)
//         bwd: da += dout                                    (+=: the gradient reaching each
//              input of an add is dout; da usually already holds the gradient of the branch)
// Shapes  out, a, b, da, dout: any equal lengths n (e.g. [N,C]); n is an element count (i64).
// Dtypes  T everywhere (f32 or bf16; the sum is formed in f32 and rounded once).
// Threads elementwise, grid-stride: each thread moves 16 bytes per access (4 f32 / 8 bf16) when
//         every pointer is 16-byte aligned, one element at a time otherwise; the n % pack tail
//         is done one element at a time. Launch: block 256, grid ceil(n / (256 * pack)) (any
//         grid is correct). out must not overlap a or b, da must not overlap dout.
// Symbols residual_fwd_f32, residual_fwd_bf16 (T* out, const T* a, const T* b, i64 n)
//         residual_bwd_f32, residual_bwd_bf16 (T* da, const T* dout, i64 n)
//
// nla: hot

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void residual_fwd(T* __restrict__ out, const T* __restrict__ a,
                                             const T* __restrict__ b, long long n) {
    constexpr int P = NlaPack<T>::N;
    long long start = 0;
    if (nla_aligned(out, 16) && nla_aligned(a, 16) && nla_aligned(b, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<T, P> va = nla_load<P>(a + i * P), vb = nla_load<P>(b + i * P), vo;
            NLA_UNROLL
            for (int k = 0; k < P; ++k)
                vo.v[k] = nla_from_f32<T>(nla_f32(va.v[k]) + nla_f32(vb.v[k]));
            nla_store<P>(out + i * P, vo);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride())
        out[i] = nla_from_f32<T>(nla_f32(a[i]) + nla_f32(b[i]));
}

template <typename T>
__device__ __forceinline__ void residual_bwd(T* __restrict__ da, const T* __restrict__ dout,
                                             long long n) {
    constexpr int P = NlaPack<T>::N;
    long long start = 0;
    if (nla_aligned(da, 16) && nla_aligned(dout, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<T, P> vd = nla_load<P>(da + i * P), vg = nla_load<P>(dout + i * P);
            NLA_UNROLL
            for (int k = 0; k < P; ++k)
                vd.v[k] = nla_from_f32<T>(nla_f32(vd.v[k]) + nla_f32(vg.v[k]));
            nla_store<P>(da + i * P, vd);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride())
        da[i] = nla_from_f32<T>(nla_f32(da[i]) + nla_f32(dout[i]));
}

#define NLA_RESIDUAL(S, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) residual_fwd_##S(                  \
        T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, long long n) {      \
        residual_fwd<T>(out, a, b, n);                                                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        residual_bwd_##S(T* __restrict__ da, const T* __restrict__ dout, long long n) {            \
        residual_bwd<T>(da, dout, n);                                                              \
    }
NLA_RESIDUAL(f32, float)
NLA_RESIDUAL(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(residual_fwd_f32);
NLA_EMU_KERNEL(residual_fwd_bf16);
NLA_EMU_KERNEL(residual_bwd_f32);
NLA_EMU_KERNEL(residual_bwd_bf16);
#endif
