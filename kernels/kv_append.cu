// kv_append: a step's new keys and values written into the KV cache, both in one launch (one
// launch per layer and step, where a copy per row would be 2 B). The model's decode and prefill
// do not call it: qkv_rope_fwd (rope.cu) writes the keys and values into the cache as it splits
// them; the tests use this op as the reference for that write.
//
// Math    (Device::kv_append_fwd; CPU twin src/device/cpu/kv_append.rs)
//         kcache[b, pos0 + t, :] = k[b, t, :];  vcache[b, pos0 + t, :] = v[b, t, :]   (=)
//         for b < B, t < TQ; every other cache position is left as it was.
// Shapes  k, v [B,TQ,D]; kcache, vcache [B,TMAX,D]; D = NKV*HS; pos0 + TQ <= TMAX (a launch
//         whose pos0 breaks this writes nothing).
// Position pos0: the argument, or where `pos` is not null pos[0] (a device word the host writes
//         between steps: the launch is then the same at every position, as a replayed CUDA
//         graph needs).
// Dtypes  T everywhere (f32 or bf16): a copy, bits unchanged.
// Threads one block per new row r = b * TQ + t (grid-stride over rows), its threads over the
//         row's D elements in packs of p: p = 16 bytes (4 f32 / 8 bf16) when D is a multiple of
//         it and every pointer is 16-byte aligned, else p = 1; each thread moves the same p
//         elements of k and of v. Launch: block 32 * ceil(D / p / 32) capped at 256 (p as the
//         launcher computes it from D alone), grid B*TQ (any grid and block are correct). The
//         caches must not overlap k or v.
// Symbols kv_append_fwd_f32, kv_append_fwd_bf16
//           (T* kcache, T* vcache, const T* k, const T* v, const uint32_t* pos, int rows,
//            int tq, int tmax, int d, int pos0)   rows = B*TQ
//
// nla: hot

#include "common.cuh"

template <int P, typename T>
__device__ __forceinline__ void kv_append_rows(T* __restrict__ kcache, T* __restrict__ vcache,
                                               const T* __restrict__ k,
                                               const T* __restrict__ v, int rows, int tq,
                                               int tmax, int d, int pos0) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int b = r / tq, t = r - b * tq;
        const long long dst = ((long long)b * tmax + pos0 + t) * d, src = (long long)r * d;
        for (int c = threadIdx.x * P; c < d; c += blockDim.x * P) {
            nla_store<P>(kcache + dst + c, nla_load<P>(k + src + c));
            nla_store<P>(vcache + dst + c, nla_load<P>(v + src + c));
        }
    }
}

template <typename T>
__device__ __forceinline__ void kv_append_fwd(T* __restrict__ kcache, T* __restrict__ vcache,
                                              const T* __restrict__ k, const T* __restrict__ v,
                                              const uint32_t* pos, int rows, int tq, int tmax,
                                              int d, int pos0) {
    constexpr int P = NlaPack<T>::N;
    if (pos) pos0 = (int)pos[0];
    if (pos0 < 0 || pos0 > tmax - tq) return;
    if (d % P == 0 && nla_aligned(kcache, 16) && nla_aligned(vcache, 16) && nla_aligned(k, 16) &&
        nla_aligned(v, 16))
        kv_append_rows<P>(kcache, vcache, k, v, rows, tq, tmax, d, pos0);
    else
        kv_append_rows<1>(kcache, vcache, k, v, rows, tq, tmax, d, pos0);
}

#define NLA_KV_APPEND(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        kv_append_fwd_##S(T* __restrict__ kcache, T* __restrict__ vcache,                         \
                          const T* __restrict__ k, const T* __restrict__ v, const uint32_t* pos,   \
                          int rows, int tq, int tmax, int d, int pos0) {                           \
        kv_append_fwd<T>(kcache, vcache, k, v, pos, rows, tq, tmax, d, pos0);                      \
    }
NLA_KV_APPEND(f32, float)
NLA_KV_APPEND(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(kv_append_fwd_f32);
NLA_EMU_KERNEL(kv_append_fwd_bf16);
#endif
