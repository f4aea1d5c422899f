// Kernels for the memory check (emu/memcheck.h, tests/emu.rs): three races between blocks that no
// block order can reveal or that order alone reveals only by chance, an out-of-bounds read,
// misaligned loads, a read of unwritten shared memory, and twins free of these that the check
// must pass. Each BUG comment says what is wrong.
#include "../../kernels/common.cuh"

// y[0] = sum of x[0 .. gridDim.x), one value per block.
// BUG: a plain read-modify-write from every block. Blocks run one at a time in the emulator, so
// the sum is right in every block order; on a GPU two blocks read the same old y[0].
extern "C" __global__ void emu_race_plain_sum(const float* __restrict__ x, float* __restrict__ y) {
    if (threadIdx.x == 0) y[0] += x[blockIdx.x];
}

// The fixed twin: one atomicAdd per block.
extern "C" __global__ void emu_race_atomic_sum(const float* __restrict__ x, float* __restrict__ y) {
    if (threadIdx.x == 0) atomicAdd(y, x[blockIdx.x]);
}

// y[b * per .. (b + 1) * per) = 1 for block b.
// BUG: `<=` writes one element past the block's range, into the next block's first element. Every
// block writes the same value, so the result does not depend on the block order either.
extern "C" __global__ void emu_race_overlap(float* __restrict__ y, int per) {
    for (int i = threadIdx.x; i <= per; i += blockDim.x) y[blockIdx.x * per + i] = 1.0f;
}

// y[b] = x[b]; z[b] = y[b - 1] (0 for b = 0).
// BUG: reads what another block writes in the same launch (a stencil that needs two launches).
extern "C" __global__ void emu_race_neighbour(const float* __restrict__ x, float* y, float* __restrict__ z) {
    unsigned b = blockIdx.x;
    if (threadIdx.x == 0) {
        y[b] = x[b];
        z[b] = b > 0 ? y[b - 1] : 0.0f;
    }
}

// Race-free: y[b] = bf16(x[0] + b). Neighbouring blocks write the two halves of one 4-byte word
// (bytes, not words, are the unit of a race), and every block reads x[0].
extern "C" __global__ void emu_race_free_halves(const float* __restrict__ x, __nv_bfloat16* __restrict__ y) {
    if (threadIdx.x == 0) y[blockIdx.x] = __float2bfloat16(x[0] + (float)blockIdx.x);
}

// y[i] = x[i] + x[i + 1] (x[n] read as 0), i < n.
// BUG: the last element reads x[n], one past the end: x has n elements. On a GPU this reads
// whatever lies there (or faults); in the emulator, whatever the host heap holds there.
extern "C" __global__ void emu_oob_pair_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    long long i = nla_gtid();
    if (i < n) y[i] = x[i] + x[i + 1];  // BUG: should be i + 1 < n ? x[i + 1] : 0
}

// The fixed twin.
extern "C" __global__ void emu_pair_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    long long i = nla_gtid();
    if (i < n) y[i] = x[i] + (i + 1 < n ? x[i + 1] : 0.0f);
}

// y[4i .. 4i+4) = x[off + 4i .. off + 4i + 4), one 16-byte access each way.
// BUG: with off not a multiple of 4, the float4 load is not 16-byte aligned: a GPU faults
// ("misaligned address"), x86 does not. (nla_load is how kernels/ do vector access.)
extern "C" __global__ void emu_misaligned_copy(const float* __restrict__ x, float* __restrict__ y, int off, int n4) {
    long long i = nla_gtid();
    if (i < n4) nla_store<4>(y + 4 * i, nla_load<4>(x + off + 4 * i));
}

// y[2i .. 2i+2) = x[off + 2i ..), one 8-byte access each way, through float2 directly.
// BUG: with an odd off the float2 load is not 8-byte aligned: a GPU faults; x86 does not (an
// unaligned 8-byte move is legal there), so only the memory check sees it.
extern "C" __global__ void emu_misaligned_float2(const float* __restrict__ x, float* __restrict__ y, int off, int n2) {
    long long i = nla_gtid();
    if (i < n2) reinterpret_cast<float2*>(y)[i] = *reinterpret_cast<const float2*>(x + off + 2 * i);
}

// y[b] = max of x[32b .. 32b + n) through shared memory, one block of 32 threads per row.
// BUG: with n < 32 the slots n.. are never written, and thread 0 reads all 32. The emulator
// poisons them with NaN, but fmaxf(m, NaN) is m: the output is the right maximum and finite, so
// no check of the output shows it (on a GPU the slots hold what the last block left there).
extern "C" __global__ void emu_uninit_max(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[32];
    unsigned t = threadIdx.x;
    if (t < (unsigned)n) s[t] = x[blockIdx.x * 32 + t];
    __syncthreads();
    if (t == 0) {
        float m = -INFINITY;
        for (int i = 0; i < 32; ++i) m = fmaxf(m, s[i]);  // BUG: i < n
        y[blockIdx.x] = m;
    }
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_uninit_max);
NLA_EMU_KERNEL(emu_misaligned_float2);
NLA_EMU_KERNEL(emu_oob_pair_sum);
NLA_EMU_KERNEL(emu_pair_sum);
NLA_EMU_KERNEL(emu_misaligned_copy);
NLA_EMU_KERNEL(emu_race_plain_sum);
NLA_EMU_KERNEL(emu_race_atomic_sum);
NLA_EMU_KERNEL(emu_race_overlap);
NLA_EMU_KERNEL(emu_race_neighbour);
NLA_EMU_KERNEL(emu_race_free_halves);
#endif
