// sample: the next token of each row of logits: temperature, top-k, top-p, inverse CDF.
//
// Math    (Device::sample_fwd; CPU twin src/device/cpu/sample.rs), per row n of logits [N,V]:
//         temperature <= 0 (greedy): ids[n] = the lowest id of the largest logit (NaN logits
//           skipped; 0 when x[0] is NaN or every logit is -inf/NaN, as the twin's sequential
//           `x[i] > x[best]` scan), logp[n] = 0                                              (=)
//         else: inv_t = 1 / temperature, m = max_v(x) * inv_t (NaN skipped),
//           p_v = vexp(x_v * inv_t - m) in f32 (the twin's e^x op for op, products and sums
//           never fused, so every p_v is the twin's bit for bit), total = sum_v p_v in f64;
//           order = all ids by (p desc, id asc); kept = the first k' ids of the order, where
//           top_k > 0 keeps the first min(top_k, V), then top_p < 1 keeps the first n with
//           sum_{first n} p >= top_p * (mass of the top-k set);
//           ids[n] = the first kept id, in id order, where the running sum of kept p exceeds
//           u[n] * (mass of the kept set), else the last kept id                             (=)
//           logp[n] = ln(p_id) - ln(total) in f64, rounded to f32 (the unrestricted
//           distribution's log-probability, what the policy ratio uses)                     (=)
// Shapes  logits [N,V]; u [N] in [0, 1) (checked by the launcher); ids [N]; logp [N].
// Dtypes  logits: T; u, logp: f32 in both modes; ids u32; sums of p in f64 (as the twin).
// Select  the kept set is never sorted. Keys are the f32 bit patterns of the p_v (p >= 0, so
//         bit order = value order). "The first k' of the order" = {key > tau} plus the r
//         lowest ids with key == tau, for a threshold tau and tie count r found by a radix
//         search: 8 passes of 4 bits (MSB first), each building a 16-bin histogram of the
//         weight of the tokens that match the prefix fixed so far (per-thread bins in shared
//         memory, summed in a fixed order: deterministic), descending to the largest tau with
//         W(key >= tau) >= target; W(key > tau) comes out of the same search.
//           top-k: W = count, target = k: tau_k, r_k = k - count(key > tau_k).
//           top-p: W = mass over the top-k set, target = top_p * mass(top-k set): tau_p, and
//             r_p = the smallest r with mass(key > tau_p) + r tau_p >= target, at most the
//             ties available (all of them when tau_p = 0: zeros never reach the target).
//         Tie ranks (a token's number of equal keys at lower ids) come from a block exclusive
//         scan of per-thread tie counts, then a sequential count inside each thread's chunk.
//         Agreement with the twin: the same p_v bits, the same order and tie rule (lower id
//         first), the same selection; the f64 sums (total, the masses, the running sum of the
//         inverse CDF) are added in a different order, so a threshold compare (top_p, or u
//         against the CDF) can flip only when it sits within ~1e-16 relative of the boundary;
//         logp agrees to ~1e-15 absolute (f32-equal except where logp is tiny, e.g. -1e-10 for
//         p_id ~ 1). Checked in the emulator against a port of the twin: every id equal over
//         V in {1, 7, 300, 4099, 49152}, ties planted, bf16 logits (many ties), greedy, top-k,
//         top-p and both. Rows with NaN logits (and temperature > 0) give an unspecified id, as
//         the twin's NaN ordering does.
// Threads one block of 256 threads per row (grid-stride over rows). Thread t owns the
//         contiguous ids [t c, (t+1) c), c = ceil(V / 256), and walks them in id order (so
//         per-thread sums and tie ranks follow id order; the chunks are L1-resident). Passes
//         over the row (each recomputes p_v from the logits): greedy: 1; sampling: max, total,
//         then with top-k 8 + 1 (search, ties), with top-p 8 + 1, then the kept mass and the
//         inverse CDF (a block exclusive scan of per-thread kept masses; each thread re-walks
//         its chunk from its prefix; the pick is the lowest id where the sum first exceeds the
//         goal). Every block reduction and scan has a fixed order: results do not depend on
//         scheduling.
// Launch  grid N (or fewer: grid-stride), block 256 exactly (SMP_NT), no dynamic shared memory
//         (static: 34 KiB, the 16 x 256 f64 bins).
// Symbols sample_fwd_f32, sample_fwd_bf16
//           (uint32_t* ids, float* logp, const T* logits, const float* u, int n, int v,
//            float temperature, int top_k, float top_p)
//         top_k = 0: off; top_p = 1: off (the launcher checks 0 < top_p <= 1, temperature >= 0,
//         passes min(top_k, V)).
//
// nla: hot

#include "common.cuh"

#define SMP_NT 256
#define SMP_NW (SMP_NT / NLA_WARP)
#define SMP_NONE 0x7fffffff  // "no id" in min/max reductions

// e^x as the CPU twin's `Real::vexp` for f32, bit for bit (see cross_entropy.cu, ce_vexp).
__device__ __forceinline__ float sample_vexp(float v) {
    const float LOG2E = 1.44269504088896340736f, LN2_HI = 0.6933594f, LN2_LO = -2.1219444e-4f;
    const float MIN_X = -87.33655f;
    const float x = v < MIN_X ? MIN_X : (v > 88.0f ? 88.0f : v);
    const float n = rintf(__fmul_rn(x, LOG2E));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 0.16666665f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    const int ni = n == n ? (int)n : 0;
    const float scale = __uint_as_float((unsigned)(ni + 127) << 23);
    return v < MIN_X ? 0.0f : __fmul_rn(e, scale);
}

// p_i = vexp(x_i * inv_t - m), as the twin (two roundings: no FMA).
template <typename T>
__device__ __forceinline__ float sample_p(const T* __restrict__ x, int i, float inv_t, float m) {
    return sample_vexp(__fsub_rn(__fmul_rn(nla_f32(x[i]), inv_t), m));
}

// ---- block primitives (256 threads; every thread must call; fixed orders)

// Exclusive prefix of v over threads 0..tid-1 (warp totals first, then the warp's own lanes,
// each added in thread order) and the block total in *total.
template <typename F> __device__ __forceinline__ F sample_excl_scan(F v, F* total) {
    __shared__ F sample_buf_[SMP_NT];
    __shared__ F sample_wsum_[SMP_NW];
    const int tid = threadIdx.x, warp = nla_warp();
    sample_buf_[tid] = v;
    __syncthreads();
    if (tid < SMP_NW) {
        F s = F(0);
        for (int k = 0; k < NLA_WARP; ++k) s += sample_buf_[tid * NLA_WARP + k];
        sample_wsum_[tid] = s;
    }
    __syncthreads();
    F e = F(0), t = F(0);
    for (int w = 0; w < SMP_NW; ++w) {
        if (w < warp) e += sample_wsum_[w];
        t += sample_wsum_[w];
    }
    for (int k = warp * NLA_WARP; k < tid; ++k) e += sample_buf_[k];
    __syncthreads();
    *total = t;
    return e;
}

__device__ __forceinline__ int sample_block_min(int v) {
    __shared__ int sample_min_[SMP_NW];
#pragma unroll
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (nla_lane() == 0) sample_min_[nla_warp()] = v;
    __syncthreads();
    int r = sample_min_[0];
    for (int w = 1; w < SMP_NW; ++w) r = min(r, sample_min_[w]);
    __syncthreads();
    return r;
}

__device__ __forceinline__ int sample_block_max(int v) {
    __shared__ int sample_max_[SMP_NW];
#pragma unroll
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (nla_lane() == 0) sample_max_[nla_warp()] = v;
    __syncthreads();
    int r = sample_max_[0];
    for (int w = 1; w < SMP_NW; ++w) r = max(r, sample_max_[w]);
    __syncthreads();
    return r;
}

// (value, id) with the largest value, the lowest id on ties; (-inf, SMP_NONE) = no candidate.
__device__ __forceinline__ void sample_argmax_merge(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

__device__ __forceinline__ int sample_block_argmax(float bv, int bi) {
    __shared__ float sample_av_[SMP_NW];
    __shared__ int sample_ai_[SMP_NW];
#pragma unroll
    for (int o = NLA_WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        sample_argmax_merge(bv, bi, ov, oi);
    }
    if (nla_lane() == 0) {
        sample_av_[nla_warp()] = bv;
        sample_ai_[nla_warp()] = bi;
    }
    __syncthreads();
    float rv = sample_av_[0];
    int ri = sample_ai_[0];
    for (int w = 1; w < SMP_NW; ++w) sample_argmax_merge(rv, ri, sample_av_[w], sample_ai_[w]);
    __syncthreads();
    return ri;
}

// ---- radix search

// The largest key tau with W(key >= tau) >= target over the eligible ids of this thread's
// chunk [i0, i1) and every other thread's, and W(key > tau) in *above. W counts ids (mass =
// false) or sums their p (mass = true). Eligible: key > etau, or key == etau with tie rank <
// erank (the top-k set; etau = 0 with erank >= V: every id); eexcl = the number of ids with key
// == etau before this thread's chunk.
template <typename T>
__device__ unsigned sample_search(const T* __restrict__ x, int i0, int i1, float inv_t, float m,
                                  bool mass, unsigned etau, long long erank, int eexcl,
                                  double target, double* above_out) {
    __shared__ double sample_bins_[16 * SMP_NT];  // [bin][thread]
    __shared__ double sample_hist_[16];
    const int tid = threadIdx.x, lane = nla_lane(), warp = nla_warp();
    double* mine = sample_bins_ + tid;
    unsigned prefix = 0u;
    double above = 0.0;
    for (int shift = 28; shift >= 0; shift -= 4) {
        const unsigned hmask = shift == 28 ? 0u : ~0u << (shift + 4);
#pragma unroll
        for (int b = 0; b < 16; ++b) mine[b * SMP_NT] = 0.0;
        long long rank = eexcl;
        for (int i = i0; i < i1; ++i) {
            const float p = sample_p(x, i, inv_t, m);
            const unsigned key = __float_as_uint(p);
            const bool elig = key > etau || (key == etau && rank < erank);
            if (key == etau) ++rank;
            if (elig && (key & hmask) == prefix)
                mine[((key >> shift) & 15u) * SMP_NT] += mass ? (double)p : 1.0;
        }
        __syncthreads();
        for (int b = warp; b < 16; b += SMP_NW) {  // each warp sums whole bins, fixed order
            double s = 0.0;
            for (int k = lane; k < SMP_NT; k += NLA_WARP) s += sample_bins_[b * SMP_NT + k];
            s = nla_warp_sum(s);
            if (lane == 0) sample_hist_[b] = s;
        }
        __syncthreads();
        double acc = above;
        int d = 15;
        for (; d > 0; --d) {
            if (acc + sample_hist_[d] >= target) break;
            acc += sample_hist_[d];
        }
        above = acc;  // weight of the eligible ids whose key is above every key of digit d
        prefix |= (unsigned)d << shift;
        __syncthreads();  // bins and hist are rewritten by the next pass
    }
    *above_out = above;
    return prefix;
}

// This thread's count of ids with key == tau and (optionally) its mass of ids with key > tau.
template <typename T>
__device__ __forceinline__ int sample_ties(const T* __restrict__ x, int i0, int i1, float inv_t,
                                           float m, unsigned tau, double* gt) {
    int c = 0;
    double s = 0.0;
    for (int i = i0; i < i1; ++i) {
        const float p = sample_p(x, i, inv_t, m);
        const unsigned key = __float_as_uint(p);
        c += key == tau;
        if (key > tau) s += (double)p;
    }
    *gt = s;
    return c;
}

// ---- the kernel

template <typename T>
__device__ __forceinline__ void sample_fwd(uint32_t* __restrict__ ids, float* __restrict__ logp,
                                           const T* __restrict__ logits,
                                           const float* __restrict__ u, int n, int v,
                                           float temperature, int top_k, float top_p) {
    const int tid = threadIdx.x;
    const int per = (v + SMP_NT - 1) / SMP_NT;
    const int i0 = min(v, tid * per), i1 = min(v, i0 + per);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* x = logits + (long long)row * v;
        if (temperature <= 0.0f) {
            float bv = -INFINITY;
            int bi = SMP_NONE;
            for (int i = i0; i < i1; ++i) {
                const float xi = nla_f32(x[i]);
                if (xi > bv) {  // first of the chunk's largest; NaN and -inf never taken
                    bv = xi;
                    bi = i;
                }
            }
            bi = sample_block_argmax(bv, bi);
            if (tid == 0) {
                const float x0 = nla_f32(x[0]);
                ids[row] = x0 != x0 || bi == SMP_NONE ? 0u : (uint32_t)bi;
                logp[row] = 0.0f;
            }
            continue;
        }
        const float inv_t = 1.0f / temperature;
        float mx = -INFINITY;
        for (int i = i0; i < i1; ++i) mx = fmaxf(mx, nla_f32(x[i]));
        const float m = __fmul_rn(nla_block_max(mx), inv_t);
        double mine = 0.0;
        for (int i = i0; i < i1; ++i) mine += (double)sample_p(x, i, inv_t, m);
        const double total = nla_block_sum(mine);

        // the kept set: key > tau, or key == tau with tie rank < rcut (tie ranks from texcl)
        unsigned tau = 0u;
        long long rcut = (long long)v;  // no filter: every id (every key >= 0)
        int texcl = 0;
        const int keep_k = top_k > 0 ? min(top_k, v) : v;
        if (keep_k < v || top_p < 1.0f) {
            unsigned tau_k = 0u;
            long long r_k = (long long)v;
            int tk_excl = 0;
            double kept_mass = total;
            if (keep_k < v) {
                double above;
                tau_k = sample_search(x, i0, i1, inv_t, m, false, 0u, (long long)v, 0,
                                      (double)keep_k, &above);
                r_k = (long long)keep_k - (long long)above;
                double gt;
                const int c = sample_ties(x, i0, i1, inv_t, m, tau_k, &gt);
                int ctot;
                tk_excl = sample_excl_scan(c, &ctot);
                kept_mass = nla_block_sum(gt) +
                            (double)min(r_k, (long long)ctot) * (double)__uint_as_float(tau_k);
            }
            tau = tau_k;
            rcut = r_k;
            texcl = tk_excl;
            if (top_p < 1.0f) {
                const double target = (double)top_p * kept_mass;
                double above;
                const unsigned tau_p = sample_search(x, i0, i1, inv_t, m, true, tau_k, r_k,
                                                     tk_excl, target, &above);
                double gt;
                const int c = sample_ties(x, i0, i1, inv_t, m, tau_p, &gt);
                int ctot;
                const int tp_excl = sample_excl_scan(c, &ctot);
                long long avail = ctot;
                if (tau_p == tau_k) avail = min(avail, r_k);
                const double tp = (double)__uint_as_float(tau_p);
                long long r_p = avail;
                if (tp > 0.0) {
                    const double need = ceil((target - above) / tp);
                    r_p = need < 1.0 ? 1 : (need > (double)avail ? avail : (long long)need);
                    // settle the division's rounding: the smallest r with above + r tp >= target
                    while (r_p > 1 && above + (double)(r_p - 1) * tp >= target) --r_p;
                    while (r_p < avail && above + (double)r_p * tp < target) ++r_p;
                }
                tau = tau_p;
                rcut = r_p;
                texcl = tp_excl;
            }
        }

        // inverse CDF over the kept ids in id order
        double km = 0.0;
        int last = -1;
        {
            long long rank = texcl;
            for (int i = i0; i < i1; ++i) {
                const float p = sample_p(x, i, inv_t, m);
                const unsigned key = __float_as_uint(p);
                const bool kept = key > tau || (key == tau && rank < rcut);
                if (key == tau) ++rank;
                if (kept) {
                    km += (double)p;
                    last = i;
                }
            }
        }
        double mass;
        double acc = sample_excl_scan(km, &mass);
        const double goal = (double)u[row] * mass;
        int cand = SMP_NONE;
        if (acc + km > goal) {  // the crossing may be in this chunk (re-walked to find it)
            long long rank = texcl;
            for (int i = i0; i < i1; ++i) {
                const float p = sample_p(x, i, inv_t, m);
                const unsigned key = __float_as_uint(p);
                const bool kept = key > tau || (key == tau && rank < rcut);
                if (key == tau) ++rank;
                if (kept) {
                    acc += (double)p;
                    if (acc > goal) {
                        cand = i;
                        break;
                    }
                }
            }
        }
        cand = sample_block_min(cand);
        last = sample_block_max(last);
        if (tid == 0) {
            const int pick = cand != SMP_NONE ? cand : (last >= 0 ? last : 0);
            ids[row] = (uint32_t)pick;
            logp[row] = (float)(log((double)sample_p(x, pick, inv_t, m)) - log(total));
        }
    }
}

#define SAMPLE_KERNELS(S, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(SMP_NT, 4) sample_fwd_##S(                      \
        uint32_t* __restrict__ ids, float* __restrict__ logp, const T* __restrict__ logits,   \
        const float* __restrict__ u, int n, int v, float temperature, int top_k,              \
        float top_p) {                                                                        \
        sample_fwd<T>(ids, logp, logits, u, n, v, temperature, top_k, top_p);                 \
    }

SAMPLE_KERNELS(f32, float)
SAMPLE_KERNELS(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(sample_fwd_f32);
NLA_EMU_KERNEL(sample_fwd_bf16);
#endif
