// convert: a buffer's elements in another storage type (the `copy` of the devices between
// buffers of different dtypes: master weights to their bf16 working copy, f32 inputs to bf16
// activations, bf16 results to f32).
//
// Math    out[i] = x[i] for i < n (=): f32 -> bf16 rounds to nearest even (__float2bfloat16_rn:
//         NaN stays NaN, values beyond bf16's range become +-inf); bf16 -> f32 is exact.
// Shapes  out, x [n].
// Dtypes  convert_f32_bf16: x f32, out bf16; convert_bf16_f32: x bf16, out f32.
// Threads elementwise, grid-stride, 4 elements per access when out and x are 16-byte aligned
//         (16 bytes of f32, 8 of bf16), else one at a time. Launch: block 256, grid
//         ceil(n / 1024) (any grid is correct). out and x may not overlap.
// Symbols convert_f32_bf16 (nla_bf16* out, const float* x, i64 n)
//         convert_bf16_f32 (float* out, const nla_bf16* x, i64 n)
//
// nla: hot

#include "common.cuh"

template <typename To, typename From>
__device__ __forceinline__ void convert(To* __restrict__ out, const From* __restrict__ x,
                                        long long n) {
    constexpr int P = 4;
    long long start = 0;
    if (nla_aligned(out, 16) && nla_aligned(x, 16)) {
        const long long packs = n / P;
        for (long long i = nla_gtid(); i < packs; i += nla_gstride()) {
            NlaVec<From, P> vx = nla_load<P>(x + i * P);
            NlaVec<To, P> vo;
            NLA_UNROLL
            for (int k = 0; k < P; ++k)
                vo.v[k] = nla_from_f32<To>(nla_f32(vx.v[k]));
            nla_store<P>(out + i * P, vo);
        }
        start = packs * P;
    }
    for (long long i = start + nla_gtid(); i < n; i += nla_gstride())
        out[i] = nla_from_f32<To>(nla_f32(x[i]));
}

extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    convert_f32_bf16(nla_bf16* __restrict__ out, const float* __restrict__ x, long long n) {
    convert<nla_bf16, float>(out, x, n);
}
extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)
    convert_bf16_f32(float* __restrict__ out, const nla_bf16* __restrict__ x, long long n) {
    convert<float, nla_bf16>(out, x, n);
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(convert_f32_bf16);
NLA_EMU_KERNEL(convert_bf16_f32);
#endif
