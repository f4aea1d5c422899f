// Kernels that test the CPU emulator itself (tests/emu.rs): block barriers and shared memory,
// dynamic shared memory, poisoning, scheduling order, built-in variables, atomics.
#include "../../kernels/common.cuh"

// y[b] = sum of x[b*256 .. b*256+256) (0 past n): a tree in shared memory, blockDim.x = 256.
extern "C" __global__ void emu_block_sum(const float* __restrict__ x, float* __restrict__ y, int n) {
    __shared__ float s[256];
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

// The same sum through common.cuh's nla_block_sum (shuffles + shared memory + two barriers),
// written by every thread: y[b*blockDim.x + t] = block sum.
extern "C" __global__ void emu_common_block_sum(const float* __restrict__ x, float* __restrict__ y) {
    long long i = nla_gtid();
    y[i] = nla_block_sum(x[i]);
}

// Reverses each block's slice through dynamic shared memory (blockDim.x floats).
extern "C" __global__ void emu_dyn_reverse(const float* __restrict__ x, float* __restrict__ y) {
    NLA_DYNAMIC_SMEM(float, s);
    unsigned t = threadIdx.x, n = blockDim.x;
    long long base = (long long)blockIdx.x * n;
    s[t] = x[base + t];
    __syncthreads();
    y[base + t] = s[n - 1 - t];
}

// A `__shared__` array in a function template and one in an inline function: gcc puts the
// template's outside the shared-memory section, and build/emu.rs moves it back in.
template <class T> __device__ T unwritten_in_template(unsigned t) {
    __shared__ T s[64];
    T v = s[t];
    __syncthreads();
    s[t] = T(5);
    return v;
}
__device__ __forceinline__ unsigned unwritten_in_inline(unsigned t) {
    __shared__ unsigned s[64];
    unsigned v = s[t];
    __syncthreads();
    s[t] = 3;
    return v;
}

// Every thread reads its shared slots (static, dynamic, in a template, in an inline function)
// before anything writes them, then writes them (a later block reading 7, 9, 5 or 3 would mean
// poisoning happens only once per launch). blockDim.x <= 64, dynamic shared memory blockDim.x * 4
// bytes; out has 4 words per thread.
extern "C" __global__ void emu_read_unwritten(unsigned* __restrict__ out) {
    __shared__ unsigned s[64];
    NLA_DYNAMIC_SMEM(unsigned, d);
    unsigned t = threadIdx.x;
    long long base = 4 * nla_gtid();
    out[base] = s[t];
    out[base + 1] = d[t];
    out[base + 2] = unwritten_in_template<unsigned>(t);
    out[base + 3] = unwritten_in_inline(t);
    __syncthreads();
    s[t] = 7;
    d[t] = 9;
}

// The order in which threads first run: order[k] = global thread index of the k-th to run.
extern "C" __global__ void emu_record_order(unsigned* __restrict__ order, unsigned* __restrict__ counter) {
    unsigned k = atomicAdd(counter, 1u);
    order[k] = blockIdx.x * blockDim.x + threadIdx.x;
}

// The order of three steps of every thread around a warp collective and a block barrier:
// order[k] = 3 * (global thread index) + step of the k-th step to run.
extern "C" __global__ void emu_record_steps(unsigned* __restrict__ order, unsigned* __restrict__ counter) {
    unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    order[atomicAdd(counter, 1u)] = 3 * g;
    __syncwarp();
    order[atomicAdd(counter, 1u)] = 3 * g + 1;
    __syncthreads();
    order[atomicAdd(counter, 1u)] = 3 * g + 2;
}

// Built-in variables of a 3D launch: per thread, 9 words (threadIdx, blockIdx, blockDim) at its
// linear index (block-major, x fastest).
extern "C" __global__ void emu_builtins(unsigned* __restrict__ out) {
    unsigned tb = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned bl = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned* o = out + 9ull * (bl * (blockDim.x * blockDim.y * blockDim.z) + tb);
    unsigned v[9] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                     blockDim.x, blockDim.y, blockDim.z};
    for (int i = 0; i < 9; ++i) o[i] = v[i];
}

// Atomics from every thread of every block.
extern "C" __global__ void emu_atomics(float* fsum, int* isum, unsigned* umax, int* winner, float* xchg,
                                       __nv_bfloat16* hsum) {
    int g = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(fsum, 1.0f);
    atomicAdd(isum, (int)threadIdx.x);
    atomicMax(umax, blockIdx.x * 1000u + threadIdx.x);
    atomicCAS(winner, -1, g);  // exactly one thread wins
    atomicExch(xchg, 2.5f);
    if (g < 16) atomicAdd(hsum, __float2bfloat16(1.0f));
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_block_sum);
NLA_EMU_KERNEL(emu_common_block_sum);
NLA_EMU_KERNEL(emu_dyn_reverse);
NLA_EMU_KERNEL(emu_read_unwritten);
NLA_EMU_KERNEL(emu_record_order);
NLA_EMU_KERNEL(emu_record_steps);
NLA_EMU_KERNEL(emu_builtins);
NLA_EMU_KERNEL(emu_atomics);
#endif
