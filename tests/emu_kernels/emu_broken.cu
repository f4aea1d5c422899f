// Deliberately broken kernels (and two fixed twins) that the emulator or the test harness must
// catch (tests/emu.rs). Each BUG comment says what is wrong.
#include "../../kernels/common.cuh"

// y[t] = x[(t+1) % n] through shared memory, one block.
extern "C" __global__ void emu_broken_no_sync(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    s[t] = x[t];
    // BUG: __syncthreads() missing: the neighbour's slot may not be written yet
    y[t] = s[(t + 1) % n];
}
extern "C" __global__ void emu_fixed_sync(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    s[t] = x[t];
    __syncthreads();
    y[t] = s[(t + 1) % n];
}

extern "C" __global__ void emu_broken_divergent(float* __restrict__ y) {
    unsigned t = threadIdx.x;
    if (t < 32) {
        __syncthreads();  // BUG: only warp 0 reaches this barrier
        y[t] = 1.0f;
    }
    __syncthreads();
    y[t] += 1.0f;
}

extern "C" __global__ void emu_broken_early_exit(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x;
    if ((int)t >= n) return;  // BUG: threads past n skip the barrier below
    s[t] = x[t];
    __syncthreads();
    y[t] = s[n - 1 - t];
}

// y[i] = 1 for i < n (grid-stride).
extern "C" __global__ void emu_fill(float* __restrict__ y, int n) {
    for (long long i = nla_gtid(); i < n; i += nla_gstride()) y[i] = 1.0f;
}
extern "C" __global__ void emu_broken_off_by_one(float* __restrict__ y, int n) {
    for (long long i = nla_gtid(); i <= n; i += nla_gstride()) y[i] = 1.0f;  // BUG: <= writes y[n]
}

extern "C" __global__ void emu_broken_shfl_exit(float* __restrict__ y) {
    unsigned lane = threadIdx.x & 31;
    if (lane >= 16) return;  // BUG: the full-mask shuffle below needs all 32 lanes
    y[lane] = __shfl_xor_sync(0xffffffffu, (float)lane, 1);
}

extern "C" __global__ void emu_broken_warp_divergence(unsigned* __restrict__ y) {
    unsigned lane = threadIdx.x & 31;
    if (lane < 16)
        y[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
    else
        y[lane] = __ballot_sync(0xffffffffu, 1);  // BUG: a different collective, same mask
}

extern "C" __global__ void emu_broken_mask(float* __restrict__ y) {
    // BUG: lanes 1..31 call a shuffle whose mask does not contain them
    y[threadIdx.x] = __shfl_sync(0x1u, (float)threadIdx.x, 0);
}

extern "C" __global__ void emu_broken_deadlock(float* __restrict__ y) {
    unsigned t = threadIdx.x;
    float v = (float)t;
    if (t < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // BUG: lanes 16..31 never come: they wait below
    __syncthreads();
    y[t] = v;
}

// Recursion with 4 KiB frames: depth 16 fits a fiber's 256 KiB stack, depth 1000 does not.
__device__ __noinline__ int emu_deep(volatile int* p, int n) {
    volatile char pad[4096];
    pad[0] = (char)n;
    pad[4095] = (char)n;
    if (n == 0) return *p;
    return emu_deep(p, n - 1) + pad[0] + pad[4095];
}
extern "C" __global__ void emu_recursion(int* __restrict__ y, int depth) {
    y[threadIdx.x] = emu_deep(y + threadIdx.x, depth);
}

extern "C" __global__ void emu_broken_trap(float* __restrict__ y) {
    if (threadIdx.x == 3) __trap();
    y[threadIdx.x] = 1.0f;
}

// BUG: writes one float past the blockDim.x floats of dynamic shared memory the launch gives.
extern "C" __global__ void emu_broken_dyn_overflow(float* __restrict__ y) {
    NLA_DYNAMIC_SMEM(float, s);
    s[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x + 1];
}

// y[t] = x[(t ^ 3) + 32 mod n] through shared memory (a slot of the next warp, exchanged across
// lanes by two shuffles), then each thread refills its own slot for a second use.
extern "C" __global__ void emu_broken_refill(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    s[t] = x[t];
    __syncthreads();
    float v = s[(t + 32) % n];
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    v = __shfl_xor_sync(0xffffffffu, v, 2);
    // BUG: __syncthreads() missing: the warp that reads this slot may not have read it yet
    s[t] = -x[t];
    y[t] = v;
}
extern "C" __global__ void emu_fixed_refill(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    s[t] = x[t];
    __syncthreads();
    float v = s[(t + 32) % n];
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    v = __shfl_xor_sync(0xffffffffu, v, 2);
    __syncthreads();
    s[t] = -x[t];
    y[t] = v;
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_broken_no_sync);
NLA_EMU_KERNEL(emu_fixed_sync);
NLA_EMU_KERNEL(emu_broken_refill);
NLA_EMU_KERNEL(emu_fixed_refill);
NLA_EMU_KERNEL(emu_broken_divergent);
NLA_EMU_KERNEL(emu_broken_early_exit);
NLA_EMU_KERNEL(emu_fill);
NLA_EMU_KERNEL(emu_broken_off_by_one);
NLA_EMU_KERNEL(emu_broken_shfl_exit);
NLA_EMU_KERNEL(emu_broken_warp_divergence);
NLA_EMU_KERNEL(emu_broken_mask);
NLA_EMU_KERNEL(emu_broken_deadlock);
NLA_EMU_KERNEL(emu_recursion);
NLA_EMU_KERNEL(emu_broken_trap);
NLA_EMU_KERNEL(emu_broken_dyn_overflow);
#endif
