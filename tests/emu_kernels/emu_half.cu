// Kernels that test the emulator's 16-bit floats (tests/emu.rs): f32 -> bf16 / f16 bits rounded
// to nearest even, and back.
#include "../../kernels/common.cuh"

extern "C" __global__ void emu_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ bits,
                                       float* __restrict__ back, long long n) {
    for (long long i = nla_gtid(); i < n; i += nla_gstride()) {
        __nv_bfloat16 h = __float2bfloat16(x[i]);
        bits[i] = __bfloat16_as_ushort(h);
        back[i] = __bfloat162float(h);
    }
}

extern "C" __global__ void emu_to_half(const float* __restrict__ x, unsigned short* __restrict__ bits,
                                       float* __restrict__ back, long long n) {
    for (long long i = nla_gtid(); i < n; i += nla_gstride()) {
        __half h = __float2half(x[i]);
        bits[i] = __half_as_ushort(h);
        back[i] = __half2float(h);
    }
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_to_bf16);
NLA_EMU_KERNEL(emu_to_half);
#endif
