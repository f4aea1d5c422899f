//! The fused reward path of an RL step: reconstruction MSE -> reward -> advantage.

use rayon::prelude::*;

use super::norm_scale::NORM_EPS;
use super::{real, Real};
use crate::device::{Advantage, RewardSpec, RewardTransform};

/// Added to the batch std when rewards are z-scored, and to the std of PPO whitening ([V]).
pub const STD_EPS: f64 = 1e-8;
/// Lower bound on the MSE under the log transform ([O]).
pub const LOG_MSE_FLOOR: f64 = 1e-8;

/// `x * s / max(||x||, 1e-12)` as a factor on x (1 without a scale), in f64.
fn norm_factor<T: Real>(x: &[T], scale: Option<f32>) -> f64 {
    match scale {
        None => 1.0,
        Some(s) => {
            let norm = x
                .iter()
                .map(|&v| v.to_f64() * v.to_f64())
                .sum::<f64>()
                .sqrt();
            s as f64 / norm.max(NORM_EPS)
        }
    }
}

/// Mean and unbiased standard deviation (0 for fewer than two values).
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// `mse[S]`, `reward[S]`, `adv[S]` (all `=`) from pred, target [S,A] and valid [S] (1 = a
/// completed sample, 0 = failed or truncated), in this order:
/// 1. `mse = mean_a (n(pred) - n(target))^2`, n = the fixed-norm rescale with `mse_scale`
///    (identity when None); computed for every sample, valid or not;
/// 2. transform, times `scale`;
/// 3. `failure_value` for invalid samples (not scaled);
/// 4. optional batch z-score over all S (unbiased std + 1e-8);
/// 5. optional clip to `[lo, hi]`;
/// 6. advantage: GRPO per group of G consecutive samples, or PPO over the batch.
///
/// The per-sample MSE sums in f64; steps 2-6 (over S scalars) run in f64 and are rounded once.
#[allow(clippy::too_many_arguments)]
pub fn reward_advantage<T: Real>(
    mse: &mut [T],
    reward: &mut [T],
    adv: &mut [T],
    pred: &[T],
    target: &[T],
    valid: &[T],
    a: usize,
    spec: &RewardSpec,
) {
    if a == 0 {
        return;
    }
    let inv_a = 1.0 / a as f64;
    let mse64: Vec<f64> = pred
        .par_chunks(a)
        .zip(target.par_chunks(a))
        .map(|(p, g)| {
            let (kp, kg) = (
                norm_factor(p, spec.mse_scale),
                norm_factor(g, spec.mse_scale),
            );
            let sum: f64 = p
                .iter()
                .zip(g)
                .map(|(&p, &g)| {
                    let d = p.to_f64() * kp - g.to_f64() * kg;
                    d * d
                })
                .sum();
            sum * inv_a
        })
        .collect();
    let scale = spec.scale as f64;
    let mut r: Vec<f64> = mse64
        .iter()
        .zip(valid)
        .map(|(&m, &v)| {
            if v == T::zero() {
                return spec.failure_value as f64;
            }
            let x = match spec.transform {
                RewardTransform::Negative => -m,
                RewardTransform::Exp { temperature } => (-m * temperature as f64).exp(),
                RewardTransform::Bounded => 1.0 / (1.0 + m),
                RewardTransform::Log => -m.max(LOG_MSE_FLOOR).ln(),
            };
            x * scale
        })
        .collect();
    if spec.batch_normalize {
        let (mean, std) = mean_std(&r);
        for x in r.iter_mut() {
            *x = (*x - mean) / (std + STD_EPS);
        }
    }
    if let Some((lo, hi)) = spec.clip {
        for x in r.iter_mut() {
            *x = x.clamp(lo as f64, hi as f64);
        }
    }
    let mut a64 = vec![0.0f64; r.len()];
    match spec.advantage {
        Advantage::Grpo { group, norm_by_std } => {
            let eps = spec.eps as f64;
            for (ag, rg) in a64.chunks_mut(group.max(1)).zip(r.chunks(group.max(1))) {
                // a group of one: mean 0, std 1 (as verl)
                let (mean, std) = if rg.len() == 1 {
                    (0.0, 1.0)
                } else {
                    mean_std(rg)
                };
                for (a, &x) in ag.iter_mut().zip(rg) {
                    *a = if norm_by_std {
                        (x - mean) / (std + eps)
                    } else {
                        x - mean
                    };
                }
            }
        }
        Advantage::Ppo { whiten } => {
            let (mean, _) = mean_std(&r);
            for (a, &x) in a64.iter_mut().zip(&r) {
                *a = x - mean;
            }
            if whiten {
                let (mean, std) = mean_std(&a64);
                for a in a64.iter_mut() {
                    *a = (*a - mean) / (std + STD_EPS);
                }
            }
        }
    }
    for (o, &x) in mse.iter_mut().zip(&mse64) {
        *o = real(x);
    }
    for (o, &x) in reward.iter_mut().zip(&r) {
        *o = real(x);
    }
    for (o, &x) in adv.iter_mut().zip(&a64) {
        *o = real(x);
    }
}

/// The spec's values for a batch of `s` samples (the device's check).
pub(crate) fn check_spec(op: &'static str, spec: &RewardSpec, s: usize) -> crate::Result<()> {
    let bad = |msg: String| Err(crate::Error::invalid(op, msg));
    if let Some(m) = spec.mse_scale {
        if !(m.is_finite() && m > 0.0) {
            return bad(format!("mse_scale = {m} must be finite and > 0"));
        }
    }
    if let RewardTransform::Exp { temperature } = spec.transform {
        if !temperature.is_finite() {
            return bad(format!("temperature = {temperature} must be finite"));
        }
    }
    for (name, x) in [("failure_value", spec.failure_value), ("scale", spec.scale)] {
        if !x.is_finite() {
            return bad(format!("{name} = {x} must be finite"));
        }
    }
    if !(spec.eps.is_finite() && spec.eps >= 0.0) {
        return bad(format!("eps = {} must be finite and >= 0", spec.eps));
    }
    if let Some((lo, hi)) = spec.clip {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return bad(format!("clip ({lo}, {hi}) must be finite with lo <= hi"));
        }
    }
    let whiten = matches!(spec.advantage, Advantage::Ppo { whiten: true });
    if (spec.batch_normalize || whiten) && s < 2 {
        return bad(format!(
            "S = {s}: a z-score over the batch needs at least 2 samples"
        ));
    }
    if let Advantage::Grpo { group, .. } = spec.advantage {
        if group == 0 || !s.is_multiple_of(group) {
            return bad(format!(
                "group size G = {group} must be > 0 and divide S = {s}"
            ));
        }
    }
    Ok(())
}
