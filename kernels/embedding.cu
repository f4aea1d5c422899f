// embedding: the token embedding, a row gather forward and a row scatter-add backward.
//
// Math    fwd: out[n, :] = wte[ids[n], :]                          (=)
//         bwd: dwte[ids[n], :] += dout[n, :] for every n            (+=: a parameter gradient)
// Shapes  ids [N] (uint32, each < V), wte and dwte [V,C], out and dout [N,C].
// Dtypes  out, wte, dout: T; dwte: f32 (parameter gradients are f32 in both modes).
// Threads fwd: one block per row n (grid-stride over rows), the block's threads over the C
//         channels, 16 bytes per access (4 f32 / 8 bf16) when out, wte and C allow it, else one
//         element at a time. Launch: grid N, block 32 * ceil(C / pack / 32) capped at 256.
//         An id >= V (a bug upstream; the launcher checks ids it uploads) fills its row with NaN.
//         bwd: one block per row n of dout, threads over C, one atomicAdd(float) per element
//         (ids may repeat). The order in which rows with the same id are added depends on
//         scheduling: the CPU twin sums them in increasing n, so results agree to f32 rounding,
//         not bit for bit. Rows with an id >= V are skipped. Launch: grid N, block 256.
// Symbols embedding_fwd_f32, embedding_fwd_bf16 (T* out, const u32* ids, const T* wte, int n,
//                                                int c, int v)
//         embedding_bwd_f32, embedding_bwd_bf16 (float* dwte, const u32* ids, const T* dout,
//                                                int n, int c, int v)
//
// nla: hot

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embedding_fwd(T* __restrict__ out, const unsigned* __restrict__ ids,
                                              const T* __restrict__ wte, int n, int c, int v) {
    constexpr int P = NlaPack<T>::N;
    const bool vec = c % P == 0 && nla_aligned(out, 16) && nla_aligned(wte, 16);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const unsigned id = ids[row];
        T* o = out + (long long)row * c;
        if (id >= (unsigned)v) {
            for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = nla_from_f32<T>(nla_nan());
            continue;
        }
        const T* w = wte + (long long)id * c;
        if (vec) {
            for (int j = threadIdx.x * P; j < c; j += blockDim.x * P)
                nla_store<P>(o + j, nla_load<P>(w + j));
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = w[j];
        }
    }
}

template <typename T>
__device__ __forceinline__ void embedding_bwd(float* dwte, const unsigned* __restrict__ ids,
                                              const T* __restrict__ dout, int n, int c, int v) {
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const unsigned id = ids[row];
        if (id >= (unsigned)v) continue;
        float* d = dwte + (long long)id * c;
        const T* g = dout + (long long)row * c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) atomicAdd(d + j, nla_f32(g[j]));
    }
}

#define NLA_EMBEDDING(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        embedding_fwd_##S(T* __restrict__ out, const unsigned* __restrict__ ids,                   \
                          const T* __restrict__ wte, int n, int c, int v) {                        \
        embedding_fwd<T>(out, ids, wte, n, c, v);                                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        embedding_bwd_##S(float* dwte, const unsigned* __restrict__ ids,                           \
                          const T* __restrict__ dout, int n, int c, int v) {                       \
        embedding_bwd<T>(dwte, ids, dout, n, c, v);                                                \
    }
NLA_EMBEDDING(f32, float)
NLA_EMBEDDING(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(embedding_fwd_f32);
NLA_EMU_KERNEL(embedding_fwd_bf16);
NLA_EMU_KERNEL(embedding_bwd_f32);
NLA_EMU_KERNEL(embedding_bwd_bf16);
#endif
