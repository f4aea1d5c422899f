// The CPU emulator of the CUDA execution model: the part a kernel file sees.
//
// kernels/common.cuh includes this header when NLA_EMU is defined, so kernels/*.cu compile
// unchanged as C++20 with g++ (build/emu.rs). One launch runs its blocks one at a time (in order,
// or shuffled); inside a block every CUDA thread is a fiber with its own 256 KiB stack (its
// "registers"), switched only at __syncthreads, warp collectives and exit, a warp at a time (a
// warp runs until each of its threads waits at a block barrier or has exited, then the next
// warp), or, in the OS-thread mode (for ThreadSanitizer), a std::thread. Launches are
// serialised by one process-wide lock, so `__shared__` (a `static` moved into a dedicated section, poisoned with 0xFF bytes at each block
// start) and the built-in variables (thread-locals) are never seen by two launches at once. Built
// with the `memcheck` feature, the fiber modes also report out-of-bounds and misaligned accesses
// and races between blocks (memcheck.h).
//
// Sections:
//   1. qualifiers and attributes          5. atomics
//   2. vector types, built-in variables   6. barriers, warp shuffles, votes, cp.async
//   3. __nv_bfloat16 / __half             7. the kernel registry (NLA_EMU_KERNEL) and the C ABI
//   4. math intrinsics, bit casts
//
// Not emulated: tensor cores / inline PTX (kernels keep a plain C++ path under #ifdef NLA_EMU),
// cooperative groups, cub, `extern __shared__` (use NLA_DYNAMIC_SMEM), __CUDA_ARCH__ (undefined).
#pragma once
#ifndef NLA_EMU
#define NLA_EMU 1
#endif

// Every header a kernel may reasonably include is included here, before build/emu.rs opens the
// per-file namespace around the kernel file (so a later #include of these is a no-op), and before
// the macros below (libstdc++ uses `__attribute__((__noinline__))`).
#include <atomic>
#include <bit>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <source_location>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// 1. Qualifiers and attributes
// ---------------------------------------------------------------------------------------------
// Every kernel file is compiled inside its own namespace (build/emu.rs), so helpers that CUDA
// keeps per-module (non-inline __device__ functions in common.cuh, same-named helpers in two .cu
// files) do not collide at link time; `extern "C"` kernels keep their plain symbol names.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __cluster_dims__(...)
// `__shared__ float s[N];` -> a function-local static. Blocks run one at a time, so one copy
// serves every block. build/emu.rs moves every zero-initialised function-local static of a kernel
// object (section .bss._ZZ*, one per variable under -fdata-sections) into section nla_emu_smem,
// which the runtime poisons (0xFF bytes: NaN as float, -1 as int) at each block start. (A section
// attribute here would not do: gcc ignores it in templates and, in inline functions, refuses to
// mix it with plain functions' in one file.) Write plain `__shared__ T name[...]` (no `static`,
// no initializer, no `extern`: dynamic shared memory goes through NLA_DYNAMIC_SMEM).
#define __shared__ __attribute__((aligned(16))) static

// ---------------------------------------------------------------------------------------------
// 2. Vector types and built-in variables
// ---------------------------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct __align__(8) int2 {
    int x, y;
};
struct __align__(8) uint2 {
    unsigned x, y;
};
struct __align__(16) int4 {
    int x, y, z, w;
};
struct __align__(16) uint4 {
    unsigned x, y, z, w;
};
struct __align__(8) float2 {
    float x, y;
};
struct __align__(16) float4 {
    float x, y, z, w;
};
struct __align__(4) ushort2 {
    unsigned short x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// Set by the runtime for the CUDA thread that runs: per OS thread, and rewritten at every fiber
// switch. initial-exec TLS: the library is linked into executables, never dlopen'ed.
#define NLA_EMU_TLS __thread __attribute__((tls_model("initial-exec")))
extern NLA_EMU_TLS uint3 threadIdx;
extern NLA_EMU_TLS uint3 blockIdx;
extern NLA_EMU_TLS dim3 blockDim;
extern NLA_EMU_TLS dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// 3. __nv_bfloat16 and __half: 2-byte structs, float conversions round to nearest even, NaN
//    becomes the canonical 0x7FFF (as cvt.rn does on the GPU). Arithmetic goes through float and
//    rounds once, like the sm_80+ operators of cuda_bf16.h / cuda_fp16.h.
// ---------------------------------------------------------------------------------------------
namespace nla_emu {
inline unsigned short f32_to_bf16_bits(float f) {
    uint32_t x = std::bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    uint32_t lsb = (x >> 16) & 1u;
    return (unsigned short)((x + 0x7fffu + lsb) >> 16);  // ties to even; overflow -> inf
}
inline float bf16_bits_to_f32(unsigned short h) { return std::bit_cast<float>((uint32_t)h << 16); }
inline unsigned short f32_to_f16_bits(float f) {
    uint32_t x = std::bit_cast<uint32_t>(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return 0x7fff;                           // NaN
    if (x >= 0x47800000u) return (unsigned short)(sign | 0x7c00u);  // >= 2^16 (and inf) -> inf
    if (x < 0x38800000u) {  // below 2^-14: subnormal or zero; the float add rounds to even
        float r = std::bit_cast<float>(x) + 0.5f;  // 0.5 = 2^-1: ulp 2^-24 = the f16 subnormal step
        return (unsigned short)(sign | (std::bit_cast<uint32_t>(r) - 0x3f000000u));
    }
    uint32_t lsb = (x >> 13) & 1u;
    x += 0xc8000fffu + lsb;  // rebias (127 -> 15) and round half to even; carries into inf
    return (unsigned short)(sign | (x >> 13));
}
inline float f16_bits_to_f32(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) return std::bit_cast<float>(sign) + (sign ? -1.0f : 1.0f) * (float)m * 0x1p-24f;
    return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace nla_emu

#define NLA_EMU_HALF_TYPE(T, TO_BITS, FROM_BITS)                                        \
    struct __align__(2) T {                                                             \
        unsigned short __x;                                                             \
        T() = default;                                                                  \
        T(float f) : __x(nla_emu::TO_BITS(f)) {}                                        \
        operator float() const { return nla_emu::FROM_BITS(__x); }                      \
        T& operator+=(T o) { return *this = T(float(*this) + float(o)); }               \
        T& operator-=(T o) { return *this = T(float(*this) - float(o)); }               \
        T& operator*=(T o) { return *this = T(float(*this) * float(o)); }               \
        T& operator/=(T o) { return *this = T(float(*this) / float(o)); }               \
    };                                                                                  \
    inline T operator+(T a, T b) { return T(float(a) + float(b)); }                     \
    inline T operator-(T a, T b) { return T(float(a) - float(b)); }                     \
    inline T operator*(T a, T b) { return T(float(a) * float(b)); }                     \
    inline T operator/(T a, T b) { return T(float(a) / float(b)); }                     \
    inline T operator-(T a) {                                                           \
        T r;                                                                            \
        r.__x = (unsigned short)(a.__x ^ 0x8000u);                                      \
        return r;                                                                       \
    }
NLA_EMU_HALF_TYPE(__nv_bfloat16, f32_to_bf16_bits, bf16_bits_to_f32)
NLA_EMU_HALF_TYPE(__half, f32_to_f16_bits, f16_bits_to_f32)
#undef NLA_EMU_HALF_TYPE
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct __align__(4) __half2 {
    __half x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;
typedef __half half;
typedef __half2 half2;

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.__x = u;
    return h;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) {
    __half h;
    h.__x = u;
    return h;
}
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }

// ---------------------------------------------------------------------------------------------
// 4. Math intrinsics and bit casts. The fast variants (__expf, ...) are exact here: tests compare
//    against the CPU twin with tolerances that cover the GPU's approximations.
// ---------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x), *c = cosf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero((unsigned)x); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
// CUDA's integer/float min and max overloads (device code has no std::min).
#define NLA_EMU_MINMAX(T)                            \
    inline T max(T a, T b) { return a > b ? a : b; } \
    inline T min(T a, T b) { return a < b ? a : b; }
NLA_EMU_MINMAX(int)
NLA_EMU_MINMAX(unsigned)
NLA_EMU_MINMAX(long)
NLA_EMU_MINMAX(unsigned long)
NLA_EMU_MINMAX(long long)
NLA_EMU_MINMAX(unsigned long long)
#undef NLA_EMU_MINMAX
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
// Cache-hinted loads and stores: plain accesses here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
long long clock64();  // nanoseconds of a monotonic clock (no clock(): it would clash with <time.h>)
inline void __nanosleep(unsigned) {}

// ---------------------------------------------------------------------------------------------
// 5. Atomics: relaxed read-modify-writes through std::atomic_ref (real atomics in the OS-thread
//    mode, where ThreadSanitizer sees them); CAS loops for half types. Return the old value.
// ---------------------------------------------------------------------------------------------
namespace nla_emu {
template <class T> inline std::atomic_ref<T> aref(T* p) { return std::atomic_ref<T>(*p); }
constexpr auto relaxed = std::memory_order_relaxed;
template <class H> inline H atomic_add_half(H* p, float v) {
    auto a = aref(&p->__x);
    unsigned short old = a.load(relaxed), nw;
    do {
        H h;
        h.__x = old;
        nw = H(float(h) + v).__x;
    } while (!a.compare_exchange_weak(old, nw, relaxed));
    H r;
    r.__x = old;
    return r;
}
}  // namespace nla_emu
#define NLA_EMU_ATOMIC_INT(T)                                                                  \
    inline T atomicAdd(T* p, T v) { return nla_emu::aref(p).fetch_add(v, nla_emu::relaxed); } \
    inline T atomicSub(T* p, T v) { return nla_emu::aref(p).fetch_sub(v, nla_emu::relaxed); } \
    inline T atomicAnd(T* p, T v) { return nla_emu::aref(p).fetch_and(v, nla_emu::relaxed); } \
    inline T atomicOr(T* p, T v) { return nla_emu::aref(p).fetch_or(v, nla_emu::relaxed); }   \
    inline T atomicXor(T* p, T v) { return nla_emu::aref(p).fetch_xor(v, nla_emu::relaxed); } \
    inline T atomicExch(T* p, T v) { return nla_emu::aref(p).exchange(v, nla_emu::relaxed); } \
    inline T atomicCAS(T* p, T cmp, T v) {                                                     \
        nla_emu::aref(p).compare_exchange_strong(cmp, v, nla_emu::relaxed);                    \
        return cmp;                                                                            \
    }                                                                                          \
    inline T atomicMax(T* p, T v) {                                                            \
        auto a = nla_emu::aref(p);                                                             \
        T old = a.load(nla_emu::relaxed);                                                      \
        while (old < v && !a.compare_exchange_weak(old, v, nla_emu::relaxed)) {}               \
        return old;                                                                            \
    }                                                                                          \
    inline T atomicMin(T* p, T v) {                                                            \
        auto a = nla_emu::aref(p);                                                             \
        T old = a.load(nla_emu::relaxed);                                                      \
        while (old > v && !a.compare_exchange_weak(old, v, nla_emu::relaxed)) {}               \
        return old;                                                                            \
    }
NLA_EMU_ATOMIC_INT(int)
NLA_EMU_ATOMIC_INT(unsigned)
NLA_EMU_ATOMIC_INT(unsigned long long)
#undef NLA_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
    nla_emu::aref(p).compare_exchange_strong(cmp, v, nla_emu::relaxed);
    return cmp;
}
inline float atomicAdd(float* p, float v) { return nla_emu::aref(p).fetch_add(v, nla_emu::relaxed); }
inline double atomicAdd(double* p, double v) { return nla_emu::aref(p).fetch_add(v, nla_emu::relaxed); }
inline float atomicExch(float* p, float v) { return nla_emu::aref(p).exchange(v, nla_emu::relaxed); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) { return nla_emu::atomic_add_half(p, float(v)); }
inline __half atomicAdd(__half* p, __half v) { return nla_emu::atomic_add_half(p, float(v)); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// 6. Barriers, warp shuffles and votes (and, at the end, asynchronous copies). Each of the
//    first is a call into the runtime (emu/runtime.cpp) that switches fibers; the call site (file:line:column, a default argument) names the barrier
//    in error messages. A block barrier is one counting barrier: every thread of the block must
//    reach the SAME call site, and none may have exited. A warp collective waits for every lane
//    of its mask that exists in the block (the mask must contain the caller; lanes past the end
//    of a partial last warp are left out), all with the same mask and kind (any call sites, as
//    on sm_70+); it fails when a lane of the mask has exited, or when lanes are stuck in two
//    collectives that wait for each other. Shuffles follow PTX shfl.sync (lane, clamp and width
//    rules); reading a lane outside the mask gives poison (all bits set).
// ---------------------------------------------------------------------------------------------
namespace nla_emu {
enum WarpOp : int {
    SHFL_IDX,
    SHFL_UP,
    SHFL_DOWN,
    SHFL_XOR,
    VOTE,
    SYNC,
    REDUCE_ADD,
    REDUCE_MIN_U,
    REDUCE_MAX_U,
    REDUCE_MIN_I,
    REDUCE_MAX_I,
    REDUCE_AND,
    REDUCE_OR,
    REDUCE_XOR,
    MATCH_ANY,
};
enum BarOp : int { BAR_SYNC, BAR_COUNT, BAR_AND, BAR_OR };
using Site = std::source_location;
// The call site of a barrier: a default argument, so it is the caller's file:line:column.
#define NLA_EMU_SITE nla_emu::Site site = nla_emu::Site::current()
int block_barrier(int op, int pred, const Site& site);
unsigned long long warp_collective(int op, unsigned mask, unsigned long long value, int b, int width,
                                   const Site& site);
unsigned active_mask();
void* dynamic_smem();
[[noreturn]] void trap(const Site& site);
// Fails the block: a `bytes`-wide access at p, which is not a multiple of `bytes` (kernels'
// vector access through nla_load / nla_store checks this: x86 would fault or let it pass).
[[noreturn]] void misaligned(const void* p, unsigned bytes, bool write, const Site& site);
// The memory clobbers stop the compiler from keeping shared memory in registers across a barrier.
inline unsigned long long warp_call(int op, unsigned mask, unsigned long long v, int b, int width,
                                    const Site& site) {
    asm volatile("" ::: "memory");
    unsigned long long r = warp_collective(op, mask, v, b, width, site);
    asm volatile("" ::: "memory");
    return r;
}
template <class T> inline T shfl(int op, unsigned mask, T var, int b, int width, const Site& site) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type > 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_call(op, mask, bits, b, width, site);
    std::memcpy(&var, &bits, sizeof(T));
    return var;
}
}  // namespace nla_emu

inline void __syncthreads(NLA_EMU_SITE) {
    asm volatile("" ::: "memory");
    nla_emu::block_barrier(nla_emu::BAR_SYNC, 0, site);
    asm volatile("" ::: "memory");
}
inline int __syncthreads_count(int pred, NLA_EMU_SITE) {
    asm volatile("" ::: "memory");
    int r = nla_emu::block_barrier(nla_emu::BAR_COUNT, pred, site);
    asm volatile("" ::: "memory");
    return r;
}
inline int __syncthreads_and(int pred, NLA_EMU_SITE) {
    asm volatile("" ::: "memory");
    int r = nla_emu::block_barrier(nla_emu::BAR_AND, pred, site);
    asm volatile("" ::: "memory");
    return r;
}
inline int __syncthreads_or(int pred, NLA_EMU_SITE) {
    asm volatile("" ::: "memory");
    int r = nla_emu::block_barrier(nla_emu::BAR_OR, pred, site);
    asm volatile("" ::: "memory");
    return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, NLA_EMU_SITE) {
    nla_emu::warp_call(nla_emu::SYNC, mask, 0, 0, 32, site);
}
template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, NLA_EMU_SITE) {
    return nla_emu::shfl(nla_emu::SHFL_IDX, mask, var, srcLane, width, site);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, NLA_EMU_SITE) {
    return nla_emu::shfl(nla_emu::SHFL_UP, mask, var, (int)delta, width, site);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, NLA_EMU_SITE) {
    return nla_emu::shfl(nla_emu::SHFL_DOWN, mask, var, (int)delta, width, site);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, NLA_EMU_SITE) {
    return nla_emu::shfl(nla_emu::SHFL_XOR, mask, var, laneMask, width, site);
}
// A vote returns the ballot (low 32 bits) and the lanes that took part (high 32 bits: the lanes
// of the mask that exist in the block).
inline unsigned __ballot_sync(unsigned mask, int pred, NLA_EMU_SITE) {
    return (unsigned)nla_emu::warp_call(nla_emu::VOTE, mask, pred != 0, 0, 32, site);
}
inline int __any_sync(unsigned mask, int pred, NLA_EMU_SITE) {
    return (unsigned)nla_emu::warp_call(nla_emu::VOTE, mask, pred != 0, 0, 32, site) != 0;
}
inline int __all_sync(unsigned mask, int pred, NLA_EMU_SITE) {
    unsigned long long v = nla_emu::warp_call(nla_emu::VOTE, mask, pred != 0, 0, 32, site);
    return (unsigned)v == (unsigned)(v >> 32);
}
inline unsigned __activemask() { return nla_emu::active_mask(); }
inline unsigned __match_any_sync(unsigned mask, unsigned long long v, NLA_EMU_SITE) {
    return (unsigned)nla_emu::warp_call(nla_emu::MATCH_ANY, mask, v, 0, 32, site);
}
#define NLA_EMU_REDUCE(NAME, T, OP)                                                                       \
    inline T NAME(unsigned mask, T v, NLA_EMU_SITE) {                                                     \
        return (T)nla_emu::warp_call(nla_emu::OP, mask, (unsigned long long)(unsigned)v, 0, 32, site); \
    }
NLA_EMU_REDUCE(__reduce_add_sync, unsigned, REDUCE_ADD)
NLA_EMU_REDUCE(__reduce_add_sync, int, REDUCE_ADD)
NLA_EMU_REDUCE(__reduce_min_sync, unsigned, REDUCE_MIN_U)
NLA_EMU_REDUCE(__reduce_max_sync, unsigned, REDUCE_MAX_U)
NLA_EMU_REDUCE(__reduce_min_sync, int, REDUCE_MIN_I)
NLA_EMU_REDUCE(__reduce_max_sync, int, REDUCE_MAX_I)
NLA_EMU_REDUCE(__reduce_and_sync, unsigned, REDUCE_AND)
NLA_EMU_REDUCE(__reduce_or_sync, unsigned, REDUCE_OR)
NLA_EMU_REDUCE(__reduce_xor_sync, unsigned, REDUCE_XOR)
#undef NLA_EMU_REDUCE
[[noreturn]] inline void __trap(NLA_EMU_SITE) { nla_emu::trap(site); }

// Asynchronous copies (cp.async, sm_80+), reached through nla_cp_async16 / _commit / _wait of
// kernels/common.cuh. The runtime keeps each CUDA thread's copies in flight and their commit
// groups; the data moves here, in the kernel's own code, so that the memory check sees the
// source read (at issue) and the shared-memory write (when the copy lands). A copy lands at the
// wait that completes its group in the forward order, and at issue in the reversed order and
// the OS-thread mode: a read before the wait sees poisoned memory in one order, a refill before
// the readers' barrier overwrites what a lagging warp has still to read in the other.
namespace nla_emu {
// Records a copy of `data` to dst (which must be shared memory); true when it lands now.
bool async_issue(void* dst, const uint4& data, const Site& site);
void async_commit();
// The next copy the wait for all but the `n` newest groups must land (false: none left); copies
// that landed at issue are retired without coming back.
bool async_landing(int n, void** dst, uint4* data);
}  // namespace nla_emu
// 16 bytes from src (global memory, 16-byte aligned) to dst (shared, 16-byte aligned); zero
// bytes, reading nothing, when !in.
inline void nla_emu_cp_async16(void* dst, const void* src, bool in, NLA_EMU_SITE) {
    if (reinterpret_cast<std::uintptr_t>(dst) & 15u) nla_emu::misaligned(dst, 16, true, site);
    uint4 v{0, 0, 0, 0};
    if (in) {
        if (reinterpret_cast<std::uintptr_t>(src) & 15u) nla_emu::misaligned(src, 16, false, site);
        v = *static_cast<const uint4*>(src);
    }
    if (nla_emu::async_issue(dst, v, site)) *static_cast<uint4*>(dst) = v;
}
inline void nla_emu_cp_async_commit() { nla_emu::async_commit(); }
inline void nla_emu_cp_async_wait(int n) {
    asm volatile("" ::: "memory");
    void* dst;
    uint4 v;
    while (nla_emu::async_landing(n, &dst, &v)) *static_cast<uint4*>(dst) = v;
    asm volatile("" ::: "memory");
}
// The dynamic shared memory of the running launch (16-byte aligned, poisoned at each block
// start); kernels reach it through NLA_DYNAMIC_SMEM(T, name) of kernels/common.cuh.
inline void* nla_emu_dynamic_smem() { return nla_emu::dynamic_smem(); }

// ---------------------------------------------------------------------------------------------
// 7. The kernel registry. At the end of each .cu file, one line per extern "C" kernel:
//
//        #ifdef NLA_EMU
//        NLA_EMU_KERNEL(rmsnorm_fwd_f32);
//        #endif
//
//    registers the kernel under its symbol name with a trampoline that unpacks `void** args`
//    exactly like cuLaunchKernel (argument i is `*(Ai*)args[i]`), and records the parameter sizes
//    and kinds so the Rust layer can check what it packed. The C ABI:
//
//      int nla_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3],
//                         size_t dyn_smem, void** args, const unsigned long long* extents,
//                         int mode, unsigned long long seed, char* err, size_t err_len);
//          mode 0: fibers, a warp at a time, warps and lanes in order; 1: fibers, warps and
//          lanes in reverse order and blocks in a seeded random order; 2: one OS thread per
//          CUDA thread. Returns 0, or an error code
//          (NLA_EMU_E_*) with a message in err. Never aborts the process. extents (nullable):
//          the bytes of each pointer argument's buffer (one entry per parameter), for the
//          memory check's bounds.
//      int nla_emu_kernel_params(const char* name, size_t* sizes, int* kinds, size_t* elems,
//                                size_t cap);
//          the kernel's parameter count (-1: no such kernel, -2: registered twice); writes the
//          first `cap` parameters' sizes, kinds (ParamKind) and pointee sizes.
//      int nla_emu_memcheck();
//          1 when built with the memory check (then modes 0 and 1 fail a launch with
//          NLA_EMU_E_MEMORY at an out-of-bounds or misaligned access, NLA_EMU_E_RACE when two of
//          its blocks race), else 0.
// ---------------------------------------------------------------------------------------------
namespace nla_emu {
using Generic = void (*)();
using Tramp = void (*)(Generic, void**);
// What a parameter is (the Rust layer checks what it packed against this) and, for a pointer,
// the size of what it points to (0 for void).
enum ParamKind : int { KIND_OTHER = 0, KIND_PTR_CONST = 1, KIND_FLOAT = 2, KIND_INT = 3, KIND_PTR_MUT = 4 };
template <class A> constexpr int param_kind() {
    if constexpr (std::is_pointer_v<A>)
        return std::is_const_v<std::remove_pointer_t<A>> ? KIND_PTR_CONST : KIND_PTR_MUT;
    if (std::is_floating_point_v<A>) return KIND_FLOAT;
    if (std::is_integral_v<A> || std::is_enum_v<A>) return KIND_INT;
    return KIND_OTHER;
}
template <class A> constexpr std::size_t param_elem() {
    if constexpr (std::is_pointer_v<A> && !std::is_void_v<std::remove_pointer_t<A>>)
        return sizeof(std::remove_pointer_t<A>);
    return 0;
}
template <class... A, std::size_t... I>
inline void call_unpacked(void (*f)(A...), void** args, std::index_sequence<I...>) {
    (void)args;
    f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A> void trampoline(Generic g, void** args) {
    call_unpacked(reinterpret_cast<void (*)(A...)>(g), args, std::index_sequence_for<A...>{});
}
struct KernelReg {
    const char* name;
    Generic fn;
    Tramp tramp;
    int nparams;
    const std::size_t* sizes;
    const int* kinds;
    const std::size_t* elems;
    KernelReg* next;
    template <class... A>
    KernelReg(const char* n, void (*f)(A...))
        : name(n), fn(reinterpret_cast<Generic>(f)), tramp(&trampoline<A...>), nparams(sizeof...(A)),
          sizes(sizes_of<A...>), kinds(kinds_of<A...>), elems(elems_of<A...>), next(nullptr) {
        register_kernel(this);
    }
    template <class... A> static constexpr std::size_t sizes_of[sizeof...(A) + 1] = {sizeof(A)..., 0};
    template <class... A> static constexpr int kinds_of[sizeof...(A) + 1] = {param_kind<A>()..., 0};
    template <class... A> static constexpr std::size_t elems_of[sizeof...(A) + 1] = {param_elem<A>()..., 0};
    static void register_kernel(KernelReg* k);
};
}  // namespace nla_emu
#define NLA_EMU_KERNEL(name) static ::nla_emu::KernelReg nla_emu_kernel_reg_##name(#name, &name)

enum {
    NLA_EMU_OK = 0,
    NLA_EMU_E_UNKNOWN_KERNEL = 1,  // no kernel registered under that name (or registered twice)
    NLA_EMU_E_CONFIG = 2,          // grid/block/shared memory/mode out of range
    NLA_EMU_E_BARRIER = 3,         // __syncthreads divergence, or a thread exited while others wait
    NLA_EMU_E_WARP = 4,            // warp collective: bad mask/width, divergence, exited lane
    NLA_EMU_E_DEADLOCK = 5,        // every live thread waits and no barrier can complete
    NLA_EMU_E_STACK = 6,           // a fiber overflowed its 256 KiB stack
    NLA_EMU_E_SMEM = 7,            // a write past the launch's dynamic shared memory
    NLA_EMU_E_TRAP = 8,            // the kernel called __trap()
    NLA_EMU_E_INTERNAL = 9,        // could not allocate stacks / start threads
    NLA_EMU_E_RACE = 10,           // two blocks access one byte, one writes (memcheck builds)
    NLA_EMU_E_MEMORY = 11,         // a misaligned nla_load/nla_store; in memcheck builds any
                                   // out-of-bounds or misaligned access
    NLA_EMU_E_ASYNC = 12,          // a cp.async into memory that is not shared, or a thread that
                                   // exits with copies it never waited for
};
extern "C" int nla_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], size_t dyn_smem,
                              void** args, const unsigned long long* extents, int mode, unsigned long long seed,
                              char* err, size_t err_len);
extern "C" int nla_emu_kernel_params(const char* name, size_t* sizes, int* kinds, size_t* elems, size_t cap);
extern "C" int nla_emu_memcheck();  // 1 when built with the memory check (emu/memcheck.h)
