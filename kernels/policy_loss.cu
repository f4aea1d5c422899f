// policy_loss: the clipped policy-gradient token loss of GRPO / PPO, with an optional KL loss.
//
// Math    over N = S*T response tokens (S sequences of T, row-major), per token with mask 1
//         (PolicyLossSpec in src/device/mod.rs; the CPU twin's order and clamps):
//           ratio = exp(clamp(logp - old_logp, -20, 20))
//           pg = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)); "clipped" where the
//           clipped term is strictly larger; with dual clip c (> 1; 0 = off) and A < 0:
//           pg = min(pg, -A c) ("dual clipped" where -A c is taken)
//           kl (when ref_logp is given): 0 k1 logp - ref; 1 k2 (logp - ref)^2 / 2;
//           2 k3 exp(x) - x - 1 with x = clamp(ref - logp, -20, 20), clamped to [-10, 10]
//           l = pg + kl_coef kl
//         aggregation weight w_s of every token of sequence s: 0 token-mean 1 / sum(mask);
//         1 seq-mean-token-mean 1 / (count_s * live) (live = sequences with a masked token;
//         0 for the others); 2 seq-mean-token-sum-norm 1 / (S * T). loss = sum_n w m l.
//         fwd: stats[7] (=), slots of PolicyStat: 0 loss = pg + kl_coef kl, 1 pg, 2 kl (the
//              aggregated terms), 3 clip fraction, 4 dual-clip fraction, 5 mean of
//              old_logp - logp (clamped log ratio), 6 mean ratio (3-6: means over masked tokens).
//         bwd: dlogp[n] = w m (dpg + kl_coef dkl) (=): 0 where mask = 0, where a clipped term is
//              taken, and where a clamp is active (ties take the unclipped branch's gradient).
// Precision as the CPU twin: every token's terms and every sum in f64, results rounded to f32
//         once. Sums are fixed-tree reductions (per lane in sequence order, then the warp, then
//         the block), so the f32 results agree with the CPU twin's except on rare rounding ties.
// Shapes  logp, old_logp, adv (each token carries its sample's advantage), mask, ref_logp,
//         dlogp: [N = S*T]; stats [7].
// Dtypes  f32 only: per-token log-probabilities stay f32 in both precision modes (a bf16 logp
//         would put ~0.4% noise on a ratio that must be exactly 1 on-policy), so there is no
//         bf16 variant.
// Threads ONE block for the whole batch (runs once per micro-batch; N up to a few hundred
//         thousand tokens). One warp per sequence (s = warp, warp + warps, ...), lanes over its
//         T tokens: pass 1 counts the masked tokens of each sequence (total and live sequences by
//         block reductions); pass 2 recounts its sequence for w_s and computes the tokens.
//         Launch: grid 1, block 512 (at most PL_MAX_BLOCK = 512: the f64 token math needs more
//         than the 64 registers per thread a 1024-thread block leaves). ref_logp may be null (no
//         KL term; kl_coef must then be 0: the launcher checks the spec as the CPU device does,
//         and that mask has a 1).
// Symbols policy_loss_fwd_f32 (float* stats, const float* logp, const float* old_logp,
//                              const float* adv, const float* mask, const float* ref_logp,
//                              int s, int t, float clip_low, float clip_high, float dual_clip,
//                              float kl_coef, int kl_type, int agg)
//         policy_loss_bwd_f32 (float* dlogp, the same inputs and parameters)

#include "common.cuh"

// the f64 token math needs more than the 64 registers a 1024-thread block allows
#define PL_MAX_BLOCK 512
#define PL_LOG_RATIO_CLAMP 20.0
#define PL_K3_CLAMP 10.0

struct PlSpec {
    float clip_low, clip_high, dual_clip, kl_coef;
    int kl_type, agg;
};

struct PlToken {
    double pg, dpg, kl, dkl, ratio, log_ratio;
    bool clipped, dual_clipped;
};

// clamp that lets NaN through (as Rust's f64::clamp)
__device__ __forceinline__ double pl_clamp(double x, double lo, double hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ PlToken pl_token(double logp, double old, double adv, bool has_ref,
                                            double ref, const PlSpec& sp) {
    PlToken k;
    const double lr = logp - old;
    const double lrc = pl_clamp(lr, -PL_LOG_RATIO_CLAMP, PL_LOG_RATIO_CLAMP);
    const double ratio = exp(lrc);
    const double dratio = lr == lrc ? ratio : 0.0;
    const double lo = 1.0 - (double)sp.clip_low, hi = 1.0 + (double)sp.clip_high;
    const double pg1 = -adv * ratio;
    const double pg2 = -adv * pl_clamp(ratio, lo, hi);
    k.clipped = pg2 > pg1;
    if (k.clipped) {
        k.pg = pg2;
        k.dpg = 0.0;
    } else {
        k.pg = pg1;
        k.dpg = -adv * dratio;
    }
    k.dual_clipped = false;
    if (sp.dual_clip > 0.0f) {
        const double pg3 = -adv * (double)sp.dual_clip;
        if (adv < 0.0 && k.pg > pg3) {
            k.dual_clipped = true;
            k.pg = pg3;
            k.dpg = 0.0;
        }
    }
    k.kl = 0.0;
    k.dkl = 0.0;
    if (has_ref) {
        if (sp.kl_type == 0) {
            k.kl = logp - ref;
            k.dkl = 1.0;
        } else if (sp.kl_type == 1) {
            k.kl = 0.5 * (logp - ref) * (logp - ref);
            k.dkl = logp - ref;
        } else {
            const double x = ref - logp;
            const double xc = pl_clamp(x, -PL_LOG_RATIO_CLAMP, PL_LOG_RATIO_CLAMP);
            const double e = exp(xc);
            const double kk = e - xc - 1.0;
            const double kc = pl_clamp(kk, -PL_K3_CLAMP, PL_K3_CLAMP);
            k.kl = kc;
            k.dkl = (x == xc && kk == kc) ? 1.0 - e : 0.0;
        }
    }
    k.ratio = ratio;
    k.log_ratio = lrc;
    return k;
}

// Masked tokens of sequence s, summed by its warp (every lane gets it).
__device__ __forceinline__ double pl_count(const float* mask, int s, int t) {
    const float* m = mask + (long long)s * t;
    double c = 0.0;
    for (int i = nla_lane(); i < t; i += NLA_WARP) c += (double)m[i];
    return nla_warp_sum(c);
}

// total masked tokens and live sequences; every thread of the block must call.
__device__ __forceinline__ void pl_totals(const float* mask, int s, int t, double& total,
                                          double& live) {
    double tot = 0.0, lv = 0.0;
    for (int q = nla_warp(); q < s; q += nla_warps()) {
        const double c = pl_count(mask, q, t);
        if (nla_lane() == 0) {
            tot += c;
            lv += c > 0.0 ? 1.0 : 0.0;
        }
    }
    total = nla_block_sum(tot);
    live = nla_block_sum(lv);
}

__device__ __forceinline__ double pl_weight(double count, double total, double live, int s, int t,
                                            int agg) {
    if (agg == 0) return 1.0 / total;
    if (agg == 1) return count > 0.0 ? 1.0 / (count * live) : 0.0;
    return 1.0 / ((double)s * (double)t);
}

__device__ void policy_loss_fwd(float* stats, const float* logp, const float* old_logp,
                                const float* adv, const float* mask, const float* ref_logp, int s,
                                int t, const PlSpec sp) {
    if (blockIdx.x != 0) return;
    double total, live;
    pl_totals(mask, s, t, total, live);
    // pg, kl (weighted), clipped, dual, approx_kl, ratio
    double acc[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int q = nla_warp(); q < s; q += nla_warps()) {
        const double w = pl_weight(pl_count(mask, q, t), total, live, s, t, sp.agg);
        for (int i = nla_lane(); i < t; i += NLA_WARP) {
            const long long n = (long long)q * t + i;
            const double m = (double)mask[n];
            if (m == 0.0) continue;
            const PlToken k = pl_token(logp[n], old_logp[n], adv[n], ref_logp != nullptr,
                                       ref_logp ? (double)ref_logp[n] : 0.0, sp);
            acc[0] += w * m * k.pg;
            acc[1] += w * m * k.kl;
            acc[2] += k.clipped ? m : 0.0;
            acc[3] += k.dual_clipped ? m : 0.0;
            acc[4] -= m * k.log_ratio;
            acc[5] += m * k.ratio;
        }
    }
    NLA_UNROLL
    for (int j = 0; j < 6; ++j) acc[j] = nla_block_sum(acc[j]);
    if (threadIdx.x == 0) {
        stats[0] = (float)(acc[0] + (double)sp.kl_coef * acc[1]);
        stats[1] = (float)acc[0];
        stats[2] = (float)acc[1];
        stats[3] = (float)(acc[2] / total);
        stats[4] = (float)(acc[3] / total);
        stats[5] = (float)(acc[4] / total);
        stats[6] = (float)(acc[5] / total);
    }
}

__device__ void policy_loss_bwd(float* dlogp, const float* logp, const float* old_logp,
                                const float* adv, const float* mask, const float* ref_logp, int s,
                                int t, const PlSpec sp) {
    if (blockIdx.x != 0) return;
    double total, live;
    pl_totals(mask, s, t, total, live);
    const double coef = (double)sp.kl_coef;
    for (int q = nla_warp(); q < s; q += nla_warps()) {
        const double w = pl_weight(pl_count(mask, q, t), total, live, s, t, sp.agg);
        for (int i = nla_lane(); i < t; i += NLA_WARP) {
            const long long n = (long long)q * t + i;
            const double m = (double)mask[n];
            if (m == 0.0) {
                dlogp[n] = 0.0f;
                continue;
            }
            const PlToken k = pl_token(logp[n], old_logp[n], adv[n], ref_logp != nullptr,
                                       ref_logp ? (double)ref_logp[n] : 0.0, sp);
            dlogp[n] = (float)(w * m * (k.dpg + coef * k.dkl));
        }
    }
}

#define NLA_PL_ARGS                                                                                \
    const float *logp, const float *old_logp, const float *adv, const float *mask,                 \
        const float *ref_logp, int s, int t, float clip_low, float clip_high, float dual_clip,     \
        float kl_coef, int kl_type, int agg
#define NLA_PL_SPEC {clip_low, clip_high, dual_clip, kl_coef, kl_type, agg}

extern "C" __global__ void __launch_bounds__(PL_MAX_BLOCK)
    policy_loss_fwd_f32(float* stats, NLA_PL_ARGS) {
    policy_loss_fwd(stats, logp, old_logp, adv, mask, ref_logp, s, t, PlSpec NLA_PL_SPEC);
}
extern "C" __global__ void __launch_bounds__(PL_MAX_BLOCK)
    policy_loss_bwd_f32(float* dlogp, NLA_PL_ARGS) {
    policy_loss_bwd(dlogp, logp, old_logp, adv, mask, ref_logp, s, t, PlSpec NLA_PL_SPEC);
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(policy_loss_fwd_f32);
NLA_EMU_KERNEL(policy_loss_bwd_f32);
#endif
