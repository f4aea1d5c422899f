// Kernels that test the emulator's warp collectives (tests/emu.rs): shuffles by the PTX
// shfl.sync rules, votes and reductions, with full, partial and split masks.
#include "../../kernels/common.cuh"

// Per warp w, 8 rows of 32 ints at out[w*256 + row*32 + lane] (row meanings in tests/emu.rs).
extern "C" __global__ void emu_shuffles(const int* __restrict__ in, int* __restrict__ out) {
    unsigned lane = threadIdx.x & 31;
    int v = in[threadIdx.x];
    int* o = out + (threadIdx.x / 32) * 256;
    int s = v;
    for (int k = 16; k; k >>= 1) s += __shfl_xor_sync(0xffffffffu, s, k);
    o[0 * 32 + lane] = s;
    s = v;
    for (int k = 4; k; k >>= 1) s += __shfl_xor_sync(0xffffffffu, s, k, 8);
    o[1 * 32 + lane] = s;
    o[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[3 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 5);
    o[4 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 2, 8);
    o[5 * 32 + lane] = __shfl_sync(0xffffffffu, v, 35, 16);
    o[6 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 16, 16);
    if (lane < 16)
        o[7 * 32 + lane] = __shfl_sync(0x0000ffffu, v, 0);
    else
        o[7 * 32 + lane] = __shfl_sync(0xffff0000u, v, 31);
}

// A float and a 64-bit shuffle: out[t] = in[t ^ 1] as float, out64[t] = in64[(t + 1) within the
// warp, own value for lane 31].
extern "C" __global__ void emu_shuffle_types(const float* __restrict__ in, float* __restrict__ out,
                                             const double* __restrict__ in64, double* __restrict__ out64) {
    unsigned t = threadIdx.x;
    out[t] = __shfl_xor_sync(0xffffffffu, in[t], 1);
    out64[t] = __shfl_down_sync(0xffffffffu, in64[t], 1);
}

// Per warp w, 6 rows of 32 words at out[w*192 + row*32 + lane]: ballot, any, all (full mask),
// ballot over 0x0f0f0f0f / all over 0xf0f0f0f0 (split), __reduce_add_sync, __syncwarp'd copy.
extern "C" __global__ void emu_votes(const int* __restrict__ pred, unsigned* __restrict__ out) {
    unsigned lane = threadIdx.x & 31;
    int p = pred[threadIdx.x];
    unsigned* o = out + (threadIdx.x / 32) * 192;
    o[0 * 32 + lane] = __ballot_sync(0xffffffffu, p);
    o[1 * 32 + lane] = __any_sync(0xffffffffu, p);
    o[2 * 32 + lane] = __all_sync(0xffffffffu, p);
    if (0x0f0f0f0fu >> lane & 1u)
        o[3 * 32 + lane] = __ballot_sync(0x0f0f0f0fu, p);
    else
        o[3 * 32 + lane] = __all_sync(0xf0f0f0f0u, p);
    o[4 * 32 + lane] = __reduce_add_sync(0xffffffffu, lane);
    __shared__ unsigned s[1024];
    s[threadIdx.x] = lane * 3;
    __syncwarp();
    unsigned next = (threadIdx.x & ~31u) | ((lane + 1) & 31u);
    if (next < blockDim.x) o[5 * 32 + lane] = s[next];  // the next lane's slot, where it exists
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_shuffles);
NLA_EMU_KERNEL(emu_shuffle_types);
NLA_EMU_KERNEL(emu_votes);
#endif
