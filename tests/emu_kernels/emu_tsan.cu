// Kernels for tests/tsan.rs, the ThreadSanitizer check (EmuMode::Threads only, C++ side built
// with -fsanitize=thread): a shared-memory reduction with a barrier missing, which TSan must
// report, and the same reduction with every barrier, which it must not.
//
// The emulator makes the ordering TSan sees the one CUDA defines (emu/runtime.cpp, TsanQuiet):
// its own bookkeeping mutex orders nothing, barriers do, so the race is unordered for TSan on
// every run, however the OS schedules the threads.
#include "../../kernels/common.cuh"

// y[b] = sum of x[b*blockDim.x .. +blockDim.x) (0 past n); blockDim.x a power of 2 <= 1024.
extern "C" __global__ void emu_tsan_racy_block_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x;
    long long i = (long long)blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (t < k) s[t] += s[t + k];  // reads s[t + k], which thread t + k wrote at the step before
        // BUG: __syncthreads() missing: the next step may read a partial sum not yet written
    }
    if (t == 0) y[blockIdx.x] = s[0];
}

// The fixed twin: a barrier after every step.
extern "C" __global__ void emu_tsan_block_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[1024];
    unsigned t = threadIdx.x;
    long long i = (long long)blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (t < k) s[t] += s[t + k];
        __syncthreads();
    }
    if (t == 0) y[blockIdx.x] = s[0];
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_tsan_racy_block_sum);
NLA_EMU_KERNEL(emu_tsan_block_sum);
#endif
