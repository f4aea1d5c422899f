// inject: activation vectors written into the rows of the hidden states at marker sites.
//
// Math    fwd, for k < S: replace (add = 0): h[sites[k], :] = vecs[k, :]                (=)
//                         add (add = 1):     h[sites[k], :] += vecs[k, :]               (+=)
//              every other row of h is untouched.
//         bwd, for k < S: dvecs[k, :] = dh[sites[k], :]                   (=: activation gradient)
//              replace also sets dh[sites[k], :] = 0 in place (the overwritten row had no
//              influence on the output); add leaves dh as it is.
// Shapes  h, dh [N,C] (N = B*T rows); sites [S] (uint32 row indices, distinct, < N: the
//         launcher checks, as the CPU device does; a site >= N is skipped here); vecs, dvecs [S,C].
// Dtypes  h, dh, vecs, dvecs: T (add sums in f32 and rounds once).
// Threads one block per site k (grid-stride over S), the block's threads over C. Sites are
//         distinct, so no two blocks touch one row. Launch: grid S, block 256.
// Symbols inject_fwd_f32, inject_fwd_bf16 (T* h, const u32* sites, const T* vecs, int s, int n,
//                                          int c, int add)
//         inject_bwd_f32, inject_bwd_bf16 (T* dvecs, T* dh, const u32* sites, int s, int n,
//                                          int c, int add)

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void inject_fwd(T* h, const unsigned* __restrict__ sites,
                                           const T* __restrict__ vecs, int s, int n, int c,
                                           int add) {
    for (int k = blockIdx.x; k < s; k += gridDim.x) {
        const unsigned site = sites[k];
        if (site >= (unsigned)n) continue;
        T* row = h + (long long)site * c;
        const T* v = vecs + (long long)k * c;
        if (add) {
            for (int j = threadIdx.x; j < c; j += blockDim.x)
                row[j] = nla_from_f32<T>(nla_f32(row[j]) + nla_f32(v[j]));
        } else {
            for (int j = threadIdx.x; j < c; j += blockDim.x) row[j] = v[j];
        }
    }
}

template <typename T>
__device__ __forceinline__ void inject_bwd(T* __restrict__ dvecs, T* dh,
                                           const unsigned* __restrict__ sites, int s, int n, int c,
                                           int add) {
    for (int k = blockIdx.x; k < s; k += gridDim.x) {
        const unsigned site = sites[k];
        if (site >= (unsigned)n) continue;
        T* row = dh + (long long)site * c;
        T* dv = dvecs + (long long)k * c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            dv[j] = row[j];
            if (!add) row[j] = nla_from_f32<T>(0.0f);
        }
    }
}

#define NLA_INJECT(S, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        inject_fwd_##S(T* h, const unsigned* __restrict__ sites, const T* __restrict__ vecs,       \
                       int s, int n, int c, int add) {                                             \
        inject_fwd<T>(h, sites, vecs, s, n, c, add);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK)                                    \
        inject_bwd_##S(T* __restrict__ dvecs, T* dh, const unsigned* __restrict__ sites, int s,    \
                       int n, int c, int add) {                                                    \
        inject_bwd<T>(dvecs, dh, sites, s, n, c, add);                                             \
    }
NLA_INJECT(f32, float)
NLA_INJECT(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(inject_fwd_f32);
NLA_EMU_KERNEL(inject_fwd_bf16);
NLA_EMU_KERNEL(inject_bwd_f32);
NLA_EMU_KERNEL(inject_bwd_bf16);
#endif
