// Shared by every kernel file: dtypes, conversions, warp/block reductions, and the one macro for
// dynamic shared memory. Compiled by nvcc for the GPU, and as C++ against the CPU emulator
// (emu/cuda_emu.h) when NLA_EMU is defined.
#pragma once

#ifdef NLA_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#ifdef __CUDACC_RTC__
// NVRTC (tests/nvrtc.rs) has no host headers: what the kernels use of <stdint.h> and <math.h>
typedef unsigned int uint32_t;
#define INFINITY __int_as_float(0x7f800000)  // CUDART_INF_F of math_constants.h
#else
#include <stdint.h>
#endif
#endif

// Dynamic shared memory of a launch, as an array of T: the one place that differs between the
// GPU and the emulator.
#ifdef NLA_EMU
#define NLA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(nla_emu_dynamic_smem())
#else
#define NLA_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) unsigned char nla_smem_raw_[]; \
    T* name = reinterpret_cast<T*>(nla_smem_raw_)
#endif

// ---- Conventions of every kernel file ----------------------------------------------------------
//
// Symbols: extern "C" <op>_<fwd|bwd>_<f32|bf16> (ops without a backward: <op>_<f32|bf16>), each a
// thin wrapper around one template instantiated for T = float and T = __nv_bfloat16.
// dtypes: T is the storage type of activations, activation gradients and weights (the bf16
//   working copy of the parameters in bf16 mode). Arithmetic is f32 (f64 where a file says so);
//   bf16 results are rounded once, to nearest even, when stored.
//   f32 whatever T: parameter gradients (they accumulate over micro-batches and the optimizer
//   reads them), AdamW master weights and moments, masks and valid flags (0/1), per-row and
//   per-sample statistics (rstd, mse, reward, advantage, stats), per-token log-probabilities.
//   Token ids and row indices are uint32.
// Sizes: dims are int (i32); flat element counts are long long (i64); every offset into a
//   buffer is computed in 64 bits.
// Launch: grid and block as each file's header says. Block sizes are multiples of 32 (kernels
//   that reduce over a block need whole warps) and at most the kernel's __launch_bounds__
//   (NLA_MAX_BLOCK unless its file says otherwise; the bound also caps a thread at 64
//   registers). Grid-stride loops make any grid size correct; the header gives the efficient
//   one.
// Portability: every file compiles unchanged against the emulator (emu/cuda_emu.h, NLA_EMU):
//   inline PTX needs a plain C++ path under #ifdef NLA_EMU, `#pragma unroll` is NLA_UNROLL,
//   dynamic shared memory is NLA_DYNAMIC_SMEM. Kernels are compiled without --use_fast_math
//   (build/nvcc.rs says why): a kernel that wants an approximate intrinsic calls it by name.

#define NLA_MAX_BLOCK 1024

// `#pragma unroll` for the loop that follows (the emulator's g++ would warn about the pragma).
#ifdef NLA_EMU
#define NLA_UNROLL
#else
#define NLA_UNROLL _Pragma("unroll")
#endif

#define NLA_WARP 32

typedef __nv_bfloat16 nla_bf16;

// ---- conversions

__device__ __forceinline__ float nla_f32(float x) { return x; }
__device__ __forceinline__ float nla_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T nla_from_f32(float x);
template <> __device__ __forceinline__ float nla_from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 nla_from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);  // round to nearest even
}

// A quiet NaN (what a kernel writes where its input is out of range, so that the error shows).
#ifdef NLA_EMU
__device__ __forceinline__ float nla_nan() { return __builtin_nanf(""); }
#else
__device__ __forceinline__ float nla_nan() { return __int_as_float(0x7fffffff); }
#endif

// ---- vector access: 16 bytes per load/store where every pointer involved is aligned

// N elements of T, aligned to their size (16 bytes: 4 f32 or 8 bf16), moved as one access.
template <typename T, int N> struct alignas(sizeof(T) * N) NlaVec {
    T v[N];
};

// Elements of T per 16-byte access.
template <typename T> struct NlaPack {
    static constexpr int N = 16 / sizeof(T);
};

// Whether p is a multiple of `bytes` (a power of two).
__device__ __forceinline__ bool nla_aligned(const void* p, unsigned bytes) {
    return (reinterpret_cast<unsigned long long>(p) & (bytes - 1)) == 0;
}
// p must be a multiple of the vector's size, as on the GPU (which faults otherwise); the emulator
// checks it and fails the launch naming the call site (x86 would crash on an aligned SSE move, or
// let it pass).
#ifdef NLA_EMU
#define NLA_VEC_SITE , NLA_EMU_SITE
#define NLA_VEC_CHECK(p, bytes, write) \
    if (!nla_aligned(p, bytes)) nla_emu::misaligned(p, bytes, write, site)
#else
#define NLA_VEC_SITE
#define NLA_VEC_CHECK(p, bytes, write)
#endif
template <int N, typename T> __device__ __forceinline__ NlaVec<T, N> nla_load(const T* p NLA_VEC_SITE) {
    NLA_VEC_CHECK(p, sizeof(NlaVec<T, N>), false);
    return *reinterpret_cast<const NlaVec<T, N>*>(p);
}
template <int N, typename T>
__device__ __forceinline__ void nla_store(T* p, const NlaVec<T, N>& x NLA_VEC_SITE) {
    NLA_VEC_CHECK(p, sizeof(NlaVec<T, N>), true);
    *reinterpret_cast<NlaVec<T, N>*>(p) = x;
}

// ---- indices

__device__ __forceinline__ int nla_lane() { return threadIdx.x & (NLA_WARP - 1); }
__device__ __forceinline__ int nla_warp() { return threadIdx.x / NLA_WARP; }
__device__ __forceinline__ int nla_warps() { return blockDim.x / NLA_WARP; }
// First index and stride of a grid-stride loop over threads (64-bit).
__device__ __forceinline__ long long nla_gtid() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long nla_gstride() { return (long long)gridDim.x * blockDim.x; }

// ---- tensor cores: one warp-wide mma.sync m16n8k16, bf16 inputs, f32 accumulators
//
// d[16x8] += A[16x16] B[16x8] for a whole warp (PTX ISA, "Matrix fragments for mma.m16n8k16"
// with .bf16). With gr = lane / 4 and tc = lane % 4 each lane holds (a register's low 16 bits
// are the first of its two bf16):
//   a: a[0] = A[gr][2tc, 2tc+1], a[1] = A[gr+8][2tc, 2tc+1], a[2] = A[gr][2tc+8, 2tc+9],
//      a[3] = A[gr+8][2tc+8, 2tc+9];
//   b: b[0] = B[2tc, 2tc+1][gr], b[1] = B[2tc+8, 2tc+9][gr] (B's column gr: "col" layout);
//   d: d[0], d[1] = D[gr][2tc, 2tc+1]; d[2], d[3] = D[gr+8][2tc, 2tc+1].
// On the GPU: the mma.sync instruction (sm_80 and newer). On the emulator: the same product
// from the same fragments, through a per-warp exchange in shared memory (the bf16 products are
// exact in f32; each output sums its 16 in k order, then adds d), so the emulated tests check
// every kernel's fragment layout; only the instruction itself is the GPU's.
#ifdef NLA_EMU
__device__ inline void nla_mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    static float As[32][16][16], Bs[32][16][8];  // per warp (blocks run one at a time)
    const int lin = (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    const int w = lin / NLA_WARP, lane = lin % NLA_WARP, gr = lane >> 2, tc = lane & 3;
    auto lo = [](uint32_t r) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(r & 0xffffu))); };
    auto hi = [](uint32_t r) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(r >> 16))); };
    for (int j = 0; j < 4; ++j) {
        const int row = gr + 8 * (j & 1), col = 2 * tc + 8 * (j >> 1);
        As[w][row][col] = lo(a[j]);
        As[w][row][col + 1] = hi(a[j]);
    }
    for (int j = 0; j < 2; ++j) {
        Bs[w][2 * tc + 8 * j][gr] = lo(b[j]);
        Bs[w][2 * tc + 8 * j + 1][gr] = hi(b[j]);
    }
    __syncwarp();
    for (int i = 0; i < 4; ++i) {
        const int row = gr + 8 * (i >> 1), col = 2 * tc + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s = fmaf(As[w][row][k], Bs[w][k][col], s);
        d[i] += s;
    }
    __syncwarp();  // every lane has read before the next product overwrites
}
#else
__device__ __forceinline__ void nla_mma_bf16_16816(float d[4], const uint32_t a[4],
                                                   const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Two f32 rounded to bf16 (nearest even) in one register, `lo` in the low half (a fragment
// register of nla_mma_bf16_16816).
__device__ __forceinline__ uint32_t nla_pack_bf16(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(nla_from_f32<nla_bf16>(lo)) |
           ((uint32_t)__bfloat16_as_ushort(nla_from_f32<nla_bf16>(hi)) << 16);
}

// Two bf16 in one register, `lo` in the low half.
__device__ __forceinline__ uint32_t nla_pack_bf16(nla_bf16 lo, nla_bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// ---- ldmatrix: four 8 x 8 bf16 matrices from shared memory into fragment registers, per warp
//
// Lane l gives the address of row l % 8 of matrix l / 8 (16 contiguous bytes, 16-byte aligned,
// in shared memory); with gr = lane / 4 and tc = lane % 4, r[j] receives of matrix j (M its
// rows as addressed, the register's low half first):
//   plain: M[gr][2tc], M[gr][2tc + 1]      (a row's pair: a B fragment of a [key][d] tile)
//   TRANS: M[2tc][gr], M[2tc + 1][gr]      (a column's pair: a B fragment of a [key][d] tile
//                                           read as [d][key])
// One instruction loads what 8 two-byte shared loads per lane would. On the emulator: the same
// registers through a per-warp exchange of the row addresses (so the tests check every
// caller's addressing); each address's alignment is checked, as the GPU faults on it.
#ifdef NLA_EMU
template <bool TRANS>
__device__ inline void nla_ldmatrix_x4(uint32_t r[4], const nla_bf16* p NLA_VEC_SITE) {
    NLA_VEC_CHECK(p, 16, false);
    static const nla_bf16* rows[32][NLA_WARP];  // per warp (blocks run one at a time)
    const int lin = (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    const int w = lin / NLA_WARP, lane = lin % NLA_WARP, gr = lane >> 2, tc = lane & 3;
    rows[w][lane] = p;
    __syncwarp();
    for (int j = 0; j < 4; ++j) {
        const nla_bf16* const* m = rows[w] + 8 * j;
        r[j] = TRANS ? nla_pack_bf16(m[2 * tc][gr], m[2 * tc + 1][gr])
                     : nla_pack_bf16(m[gr][2 * tc], m[gr][2 * tc + 1]);
    }
    __syncwarp();  // every lane has read before the next call overwrites
}
#else
template <bool TRANS>
__device__ __forceinline__ void nla_ldmatrix_x4(uint32_t r[4], const nla_bf16* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
}
#endif

// ---- cp.async: 16-byte copies from global to shared memory that complete asynchronously
//
// nla_cp_async16(dst, src, in): copies the 16 bytes at src (global memory) to dst (shared), both
//   16-byte aligned; when !in it writes 16 zero bytes and reads nothing (src must still be a
//   valid address: pass an in-range row). The copy is in flight until waited for.
// nla_cp_async_commit(): closes this thread's group of the copies issued since its last commit.
// nla_cp_async_wait<N>(): waits until at most N of this thread's committed groups are in flight.
// A thread's copies are visible to the other threads of its block only after its wait and then
// a __syncthreads; a buffer may be refilled only after a __syncthreads that follows its readers'
// last read. On the emulator (emu/cuda_emu.h) a copy lands at its wait in one thread order and
// at issue in the other, so a missing wait or barrier shows; a thread that exits with copies it
// never waited for fails the launch.
#ifdef NLA_EMU
#define nla_cp_async16 nla_emu_cp_async16
__device__ inline void nla_cp_async_commit() { nla_emu_cp_async_commit(); }
template <int N> __device__ inline void nla_cp_async_wait() { nla_emu_cp_async_wait(N); }
#else
__device__ __forceinline__ void nla_cp_async16(void* dst, const void* src, bool in) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(d), "l"(__cvta_generic_to_global(src)), "r"(in ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void nla_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void nla_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// ---- reductions (fixed trees: the result does not depend on scheduling)

// Sum over the 32 lanes of a warp (butterfly: every lane gets the sum). All lanes must call.
template <typename F> __device__ __forceinline__ F nla_warp_sum(F v) {
    NLA_UNROLL
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Largest value over the lanes of a warp (NaN lanes are skipped, as fmaxf does).
__device__ __forceinline__ float nla_warp_max(float v) {
    NLA_UNROLL
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets it. Every thread of the block must call (it holds two
// barriers); blockDim.x a multiple of 32. Warp sums go through 32 slots of shared memory, each
// warp then sums the slots itself. The trailing barrier makes back-to-back calls safe.
template <typename F> __device__ __forceinline__ F nla_block_sum(F v) {
    __shared__ F nla_part_[NLA_WARP];
    v = nla_warp_sum(v);
    if (nla_lane() == 0) nla_part_[nla_warp()] = v;
    __syncthreads();
    F r = nla_lane() < nla_warps() ? nla_part_[nla_lane()] : F(0);
    r = nla_warp_sum(r);
    __syncthreads();
    return r;
}

// Largest value over the block, as nla_block_sum (NaN skipped; -inf when all are).
__device__ __forceinline__ float nla_block_max(float v) {
    __shared__ float nla_pmax_[NLA_WARP];
    v = nla_warp_max(v);
    if (nla_lane() == 0) nla_pmax_[nla_warp()] = v;
    __syncthreads();
    float r = nla_lane() < nla_warps() ? nla_pmax_[nla_lane()] : -INFINITY;
    r = nla_warp_max(r);
    __syncthreads();
    return r;
}
