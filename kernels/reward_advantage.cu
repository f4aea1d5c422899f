// reward_advantage: the fused reward path of an RL step (forward only): reconstruction MSE ->
// reward -> advantage.
//
// Math    for each sample i < S, in this order (the CPU twin's; RewardSpec in src/device/mod.rs):
//         1. mse[i] = mean_a (n(pred_i) - n(target_i))^2, n(x) = x * mse_scale / max(||x||, 1e-12)
//            (identity when mse_scale = 0, i.e. None); for every sample, valid or not      (=)
//         2. r = transform(mse) * scale: 0 negative -mse; 1 exp exp(-mse * temperature);
//            2 bounded 1 / (1 + mse); 3 log -ln(max(mse, 1e-8))
//         3. r = failure_value where valid[i] == 0 (not scaled)
//         4. batch_normalize: r = (r - mean) / (std + 1e-8) over all S (unbiased std)
//         5. clip: r = clamp(r, clip_lo, clip_hi)                                reward[i] = r (=)
//         6. advantage 0 GRPO: groups of G consecutive samples (G divides S), a group of one
//            has mean 0 and std 1: A = (r - mean_g) / (std_g + eps) (unbiased std), or r - mean_g
//            without norm_by_std;
//            advantage 1 PPO: A = r - mean(r) over the batch, then with whiten
//            (A - mean A) / (std A + 1e-8)                                    advantage[i] = A (=)
// Precision as the CPU twin: the MSE (norms and squared differences) and steps 2-6 run in
//         f64 and are rounded to f32 once when stored. Batch sums are fixed-tree block
//         reductions in f64 (the CPU sums in order: the f32 results agree except on rare
//         rounding ties); a GRPO group is summed in order by one thread, as the CPU twin.
// Shapes  pred, target [S,A]; valid [S] (0/1); mse, reward, advantage [S].
// Dtypes  pred, target: T; valid, mse, reward, advantage: f32.
// Threads ONE block for the whole batch (S is the number of rollouts of a step, at most a few
//         thousand; this runs once per RL step). Step 1: one warp per sample, lanes over A;
//         steps 2-5: one thread per sample with the f64 rewards in dynamic shared memory;
//         step 6: one thread per GRPO group, or block reductions for PPO.
//         Launch: grid 1, block 1024, dynamic shared memory S * 8 bytes (past 48 KiB with the static
//         shared memory, from S = 6113, the max dynamic shared memory attribute must be raised:
//         the CUDA launcher does). The launcher checks the spec as the CPU
//         device does (G > 0 divides S, S >= 2 for a z-score, lo <= hi, mse_scale > 0 or None).
// Symbol  reward_advantage_f32, reward_advantage_bf16
//         (float* mse, float* reward, float* advantage, const T* pred, const T* target,
//          const float* valid, int s, int a, float mse_scale, float failure_value,
//          int transform, float temperature, float scale, int batch_normalize, int clip,
//          float clip_lo, float clip_hi, int advantage_kind, int group, int norm_by_std,
//          int whiten, float eps)

#include "common.cuh"

#define REWARD_NORM_EPS 1e-12
#define REWARD_STD_EPS 1e-8
#define REWARD_LOG_MSE_FLOOR 1e-8

// Mean and unbiased std of r[0..n) over the block (std 0 when n < 2); every thread must call.
__device__ __forceinline__ void reward_mean_std(const double* r, int n, double& mean, double& std) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += r[i];
    mean = nla_block_sum(s) / (double)n;
    double q = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) q += (r[i] - mean) * (r[i] - mean);
    q = nla_block_sum(q);
    std = n < 2 ? 0.0 : sqrt(q / (double)(n - 1));
}

template <typename T>
__device__ __forceinline__ void reward_advantage(float* mse, float* reward, float* adv,
                                                 const T* pred, const T* target, const float* valid,
                                                 int s, int a, float mse_scale, float failure_value,
                                                 int transform, float temperature, float scale,
                                                 int batch_normalize, int clip, float clip_lo,
                                                 float clip_hi, int advantage_kind, int group,
                                                 int norm_by_std, int whiten, float eps) {
    NLA_DYNAMIC_SMEM(double, r);  // [S]
    if (blockIdx.x != 0 || a <= 0) return;
    // 1. mse, one warp per sample
    const double inv_a = 1.0 / (double)a;
    for (int i = nla_warp(); i < s; i += nla_warps()) {
        const T *p = pred + (long long)i * a, *g = target + (long long)i * a;
        double kp = 1.0, kg = 1.0;
        if (mse_scale > 0.0f) {
            double sp = 0.0, sg = 0.0;
            for (int j = nla_lane(); j < a; j += NLA_WARP) {
                const double pj = nla_f32(p[j]), gj = nla_f32(g[j]);
                sp += pj * pj;
                sg += gj * gj;
            }
            sp = nla_warp_sum(sp);
            sg = nla_warp_sum(sg);
            kp = (double)mse_scale / fmax(sqrt(sp), REWARD_NORM_EPS);
            kg = (double)mse_scale / fmax(sqrt(sg), REWARD_NORM_EPS);
        }
        double sum = 0.0;
        for (int j = nla_lane(); j < a; j += NLA_WARP) {
            const double d = (double)nla_f32(p[j]) * kp - (double)nla_f32(g[j]) * kg;
            sum += d * d;
        }
        sum = nla_warp_sum(sum);
        if (nla_lane() == 0) r[i] = sum * inv_a;
    }
    __syncthreads();
    // 2-3. transform, scale, failures
    for (int i = threadIdx.x; i < s; i += blockDim.x) {
        const double m = r[i];
        mse[i] = (float)m;
        double x;
        if (valid[i] == 0.0f) {
            x = (double)failure_value;
        } else {
            switch (transform) {
                case 0:
                    x = -m;
                    break;
                case 1:
                    x = exp(-m * (double)temperature);
                    break;
                case 2:
                    x = 1.0 / (1.0 + m);
                    break;
                default:
                    x = -log(fmax(m, REWARD_LOG_MSE_FLOOR));
                    break;
            }
            x *= (double)scale;
        }
        r[i] = x;
    }
    __syncthreads();
    // 4. batch z-score
    if (batch_normalize) {
        double mean, std;
        reward_mean_std(r, s, mean, std);
        for (int i = threadIdx.x; i < s; i += blockDim.x)
            r[i] = (r[i] - mean) / (std + REWARD_STD_EPS);
    }
    // 5. clip; the reward is final
    for (int i = threadIdx.x; i < s; i += blockDim.x) {
        if (clip) r[i] = fmin(fmax(r[i], (double)clip_lo), (double)clip_hi);
        reward[i] = (float)r[i];
    }
    __syncthreads();
    // 6. advantage
    if (advantage_kind == 0) {
        const int gs = group > 0 ? group : 1;
        for (int gi = threadIdx.x; gi < s / gs; gi += blockDim.x) {
            const double* rg = r + (long long)gi * gs;
            double mean = 0.0, std = 1.0;
            if (gs > 1) {
                double sum = 0.0;
                for (int k = 0; k < gs; ++k) sum += rg[k];
                mean = sum / (double)gs;
                double q = 0.0;
                for (int k = 0; k < gs; ++k) q += (rg[k] - mean) * (rg[k] - mean);
                std = sqrt(q / (double)(gs - 1));
            }
            for (int k = 0; k < gs; ++k) {
                const double x = rg[k] - mean;
                adv[(long long)gi * gs + k] = (float)(norm_by_std ? x / (std + (double)eps) : x);
            }
        }
    } else {
        double mean, std;
        reward_mean_std(r, s, mean, std);
        for (int i = threadIdx.x; i < s; i += blockDim.x) r[i] -= mean;
        __syncthreads();
        if (whiten) {
            double m2, s2;
            reward_mean_std(r, s, m2, s2);
            for (int i = threadIdx.x; i < s; i += blockDim.x)
                r[i] = (r[i] - m2) / (s2 + REWARD_STD_EPS);
        }
        for (int i = threadIdx.x; i < s; i += blockDim.x) adv[i] = (float)r[i];
    }
}

#define NLA_REWARD(S, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) reward_advantage_##S(              \
        float* mse, float* reward, float* advantage, const T* pred, const T* target,               \
        const float* valid, int s, int a, float mse_scale, float failure_value, int transform,     \
        float temperature, float scale, int batch_normalize, int clip, float clip_lo,              \
        float clip_hi, int advantage_kind, int group, int norm_by_std, int whiten, float eps) {    \
        reward_advantage<T>(mse, reward, advantage, pred, target, valid, s, a, mse_scale,          \
                            failure_value, transform, temperature, scale, batch_normalize, clip,   \
                            clip_lo, clip_hi, advantage_kind, group, norm_by_std, whiten, eps);    \
    }
NLA_REWARD(f32, float)
NLA_REWARD(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(reward_advantage_f32);
NLA_EMU_KERNEL(reward_advantage_bf16);
#endif
