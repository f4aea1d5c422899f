// Kernels for tests/tsan.rs, the ThreadSanitizer check (EmuMode::Threads only, C++ side built
// with -fsanitize=thread): a shared-memory reduction with a barrier missing, which TSan must
// report, and the same reduction with every barrier, which it must not.
//
// Both first hold every thread until all of the block's threads have left the barrier
// (`nla_tsan_all_in_flight`). Why: the emulator's OS-thread mode guards its bookkeeping with one
// mutex per block, which each thread takes when it leaves a barrier and when it exits, and TSan
// counts every such lock as synchronisation. Without the hold, a thread that runs its whole
// racy loop and exits before a slower thread has even left the barrier is ordered before that
// thread by the mutex, and TSan misses the race (about 1 run in 10 with 256 threads on 2
// cores). With it, no thread exits while another has yet to leave the barrier, so every racing
// pair is unordered for TSan, and the report comes every run. The hold itself adds no ordering:
// relaxed atomics are no synchronisation for TSan (or CUDA). It spins: Threads mode only (a
// fiber would spin forever), and small blocks (every thread burns CPU until the last arrives).
#include "../../kernels/common.cuh"

__device__ void nla_tsan_all_in_flight(unsigned* count) {
    atomicAdd(count, 1u);
    while (atomicAdd(count, 0u) < blockDim.x) {
    }
}

// y[b] = sum of x[b*blockDim.x .. +blockDim.x) (0 past n); blockDim.x a power of 2 <= 1024.
extern "C" __global__ void emu_tsan_racy_block_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[1024];
    __shared__ unsigned count;
    unsigned t = threadIdx.x;
    long long i = (long long)blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    if (t == 0) count = 0;
    __syncthreads();
    nla_tsan_all_in_flight(&count);
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (t < k) s[t] += s[t + k];  // reads s[t + k], which thread t + k wrote at the step before
        // BUG: __syncthreads() missing: the next step may read a partial sum not yet written
    }
    if (t == 0) y[blockIdx.x] = s[0];
}

// The fixed twin: a barrier after every step.
extern "C" __global__ void emu_tsan_block_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[1024];
    __shared__ unsigned count;
    unsigned t = threadIdx.x;
    long long i = (long long)blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    if (t == 0) count = 0;
    __syncthreads();
    nla_tsan_all_in_flight(&count);
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
