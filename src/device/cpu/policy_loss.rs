//! The clipped policy-gradient token loss of GRPO / PPO, with an optional KL loss.

use rayon::prelude::*;

use super::{real, Real};
use crate::device::{KlType, LossAgg, PolicyLossSpec, PolicyStat};

/// The log ratio `logp - old_logp` is clamped to this range before `exp` (verl).
pub const LOG_RATIO_CLAMP: f64 = 20.0;
/// k3's `ref - logp` is clamped to +-20 before `exp`, and k3 itself to +-10 (verl).
pub const K3_CLAMP: f64 = 10.0;

/// One token's loss terms and their derivatives with respect to logp.
#[derive(Clone, Copy, Default)]
struct Token {
    pg: f64,
    dpg: f64,
    kl: f64,
    dkl: f64,
    ratio: f64,
    log_ratio: f64,
    clipped: bool,
    dual_clipped: bool,
}

/// The terms of one token. On an exact tie between two branches (a measure-zero set) the
/// gradient is the unclipped branch's; torch would average the two.
fn token(logp: f64, old: f64, adv: f64, reference: Option<f64>, spec: &PolicyLossSpec) -> Token {
    let lr = logp - old;
    let lrc = lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    let ratio = lrc.exp();
    let dratio = if lr == lrc { ratio } else { 0.0 };
    let (lo, hi) = (1.0 - spec.clip_low as f64, 1.0 + spec.clip_high as f64);
    let pg1 = -adv * ratio;
    let pg2 = -adv * ratio.clamp(lo, hi);
    // where the clipped term is strictly larger, ratio lies outside [lo, hi]: no gradient
    let clipped = pg2 > pg1;
    let (mut pg, mut dpg) = if clipped {
        (pg2, 0.0)
    } else {
        (pg1, -adv * dratio)
    };
    let mut dual_clipped = false;
    if let Some(c) = spec.dual_clip {
        let pg3 = -adv * c as f64;
        if adv < 0.0 && pg > pg3 {
            dual_clipped = true;
            (pg, dpg) = (pg3, 0.0);
        }
    }
    let (kl, dkl) = match reference {
        None => (0.0, 0.0),
        Some(r) => match spec.kl_type {
            KlType::K1 => (logp - r, 1.0),
            KlType::K2 => (0.5 * (logp - r) * (logp - r), logp - r),
            KlType::K3 => {
                let x = r - logp;
                let xc = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
                let k = xc.exp() - xc - 1.0;
                let kc = k.clamp(-K3_CLAMP, K3_CLAMP);
                let live = x == xc && k == kc;
                (kc, if live { 1.0 - xc.exp() } else { 0.0 })
            }
        },
    };
    Token {
        pg,
        dpg,
        kl,
        dkl,
        ratio,
        log_ratio: lrc,
        clipped,
        dual_clipped,
    }
}

/// The aggregation weight of every token of each sequence: the loss is `sum_n weight_s(n) *
/// mask_n * l_n`. Also returns the number of masked tokens.
fn seq_weights<T: Real>(mask: &[T], t: usize, agg: LossAgg) -> (Vec<f64>, f64) {
    let counts: Vec<f64> = mask
        .chunks(t)
        .map(|m| m.iter().map(|&x| x.to_f64()).sum())
        .collect();
    let total: f64 = counts.iter().sum();
    let s = counts.len() as f64;
    let weights = match agg {
        LossAgg::TokenMean => vec![1.0 / total; counts.len()],
        LossAgg::SeqMeanTokenMean => {
            let live = counts.iter().filter(|&&c| c > 0.0).count() as f64;
            counts
                .iter()
                .map(|&c| if c > 0.0 { 1.0 / (c * live) } else { 0.0 })
                .collect()
        }
        LossAgg::SeqMeanTokenSumNorm => vec![1.0 / (s * t as f64); counts.len()],
    };
    (weights, total)
}

type Inputs<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [T], Option<&'a [T]>);

/// The terms of every token of one sequence (zeroed where mask = 0, whose inputs are not read).
fn seq_tokens<T: Real>(inp: Inputs<'_, T>, spec: &PolicyLossSpec) -> Vec<Token> {
    let (logp, old, adv, mask, reference) = inp;
    (0..logp.len())
        .map(|i| {
            if mask[i] == T::zero() {
                return Token::default();
            }
            let r = reference.map(|r| r[i].to_f64());
            token(logp[i].to_f64(), old[i].to_f64(), adv[i].to_f64(), r, spec)
        })
        .collect()
}

/// Per-sequence slices of the inputs, S of them.
fn split<'a, T: Real>(
    logp: &'a [T],
    old: &'a [T],
    adv: &'a [T],
    mask: &'a [T],
    reference: Option<&'a [T]>,
    t: usize,
) -> Vec<Inputs<'a, T>> {
    let s = logp.len() / t;
    (0..s)
        .map(|i| {
            let r = i * t..(i + 1) * t;
            (
                &logp[r.clone()],
                &old[r.clone()],
                &adv[r.clone()],
                &mask[r.clone()],
                reference.map(|x| &x[r]),
            )
        })
        .collect()
}

/// `stats[PolicyStat::COUNT]` `=`, over N = S*T tokens (S sequences of T, row-major):
/// per token, `ratio = exp(clamp(logp - old_logp, -20, 20))`,
/// `pg = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))`, and for A < 0 with dual
/// clip c: `pg = min(pg, -A c)`; `kl` = k1 `logp - ref`, k2 `(logp - ref)^2 / 2` or k3
/// `exp(ref - logp) - (ref - logp) - 1` (ref - logp clamped to +-20, k3 to +-10); token loss
/// `l = pg + kl_coef kl`, aggregated by `agg` over mask (loss = sum_n w_n m_n l_n).
///
/// Stats: LOSS, PG_LOSS and KL_LOSS (kl aggregated as the loss, before kl_coef) use `agg`;
/// CLIP_FRAC (tokens where the clipped term is strictly larger), CLIP_FRAC_LOWER (dual clip
/// taken), APPROX_KL (mean of old_logp - logp, clamped) and RATIO_MEAN are token means over
/// mask. Sums run in f64, in sequence order (deterministic). Parallel over sequences.
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_fwd<T: Real>(
    stats: &mut [T],
    logp: &[T],
    old_logp: &[T],
    adv: &[T],
    mask: &[T],
    ref_logp: Option<&[T]>,
    t: usize,
    spec: &PolicyLossSpec,
) {
    if t == 0 {
        return;
    }
    let (weights, total) = seq_weights(mask, t, spec.agg);
    let seqs = split(logp, old_logp, adv, mask, ref_logp, t);
    // per sequence: [pg, kl, clipped, dual, approx_kl, ratio] sums (weighted for pg and kl)
    let parts: Vec<[f64; 6]> = seqs
        .into_par_iter()
        .zip(weights.par_iter())
        .map(|(inp, &w)| {
            let mask = inp.3;
            let mut acc = [0.0f64; 6];
            for (tok, &m) in seq_tokens(inp, spec).iter().zip(mask) {
                let m = m.to_f64();
                acc[0] += w * m * tok.pg;
                acc[1] += w * m * tok.kl;
                acc[2] += m * f64::from(u8::from(tok.clipped));
                acc[3] += m * f64::from(u8::from(tok.dual_clipped));
                acc[4] -= m * tok.log_ratio;
                acc[5] += m * tok.ratio;
            }
            acc
        })
        .collect();
    let mut sum = [0.0f64; 6];
    for p in &parts {
        for (s, &x) in sum.iter_mut().zip(p) {
            *s += x;
        }
    }
    let [pg, kl, clipped, dual, approx_kl, ratio] = sum;
    let mut out = [0.0f64; PolicyStat::COUNT];
    out[PolicyStat::LOSS] = pg + spec.kl_coef as f64 * kl;
    out[PolicyStat::PG_LOSS] = pg;
    out[PolicyStat::KL_LOSS] = kl;
    out[PolicyStat::CLIP_FRAC] = clipped / total;
    out[PolicyStat::CLIP_FRAC_LOWER] = dual / total;
    out[PolicyStat::APPROX_KL] = approx_kl / total;
    out[PolicyStat::RATIO_MEAN] = ratio / total;
    for (o, &x) in stats.iter_mut().zip(&out) {
        *o = real(x);
    }
}

/// `dlogp[N] = d loss / d logp`   (`=`): `w_n m_n (dpg_n + kl_coef dkl_n)` with the forward's
/// aggregation weights; zero where mask = 0, where a clipped term is taken, and where a clamp
/// is active. Parallel over sequences.
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_bwd<T: Real>(
    dlogp: &mut [T],
    logp: &[T],
    old_logp: &[T],
    adv: &[T],
    mask: &[T],
    ref_logp: Option<&[T]>,
    t: usize,
    spec: &PolicyLossSpec,
) {
    if t == 0 {
        return;
    }
    let (weights, _) = seq_weights(mask, t, spec.agg);
    let seqs = split(logp, old_logp, adv, mask, ref_logp, t);
    let coef = spec.kl_coef as f64;
    dlogp
        .par_chunks_mut(t)
        .zip(seqs.into_par_iter())
        .zip(weights.par_iter())
        .for_each(|((d, inp), &w)| {
            let mask = inp.3;
            for ((d, tok), &m) in d.iter_mut().zip(seq_tokens(inp, spec)).zip(mask) {
                *d = real(w * m.to_f64() * (tok.dpg + coef * tok.dkl));
            }
        });
}

/// The spec's values, and a reference when the KL loss is on (the device's check).
pub(crate) fn check_spec(
    op: &'static str,
    spec: &PolicyLossSpec,
    has_ref: bool,
) -> crate::Result<()> {
    let bad = |msg: String| Err(crate::Error::invalid(op, msg));
    if !(spec.clip_low.is_finite() && (0.0..1.0).contains(&spec.clip_low)) {
        return bad(format!("clip_low = {} must lie in [0, 1)", spec.clip_low));
    }
    if !(spec.clip_high.is_finite() && spec.clip_high >= 0.0) {
        return bad(format!(
            "clip_high = {} must be finite and >= 0",
            spec.clip_high
        ));
    }
    if let Some(c) = spec.dual_clip {
        if !(c.is_finite() && c > 1.0) {
            return bad(format!("dual_clip = {c} must be finite and > 1"));
        }
    }
    if !spec.kl_coef.is_finite() {
        return bad(format!("kl_coef = {} must be finite", spec.kl_coef));
    }
    if spec.kl_coef != 0.0 && !has_ref {
        return bad(format!("kl_coef = {} needs ref_logp", spec.kl_coef));
    }
    Ok(())
}

/// The checks every device makes without reading values: S, T > 0, the lengths of logp,
/// old_logp, adv, mask (and ref_logp) [N = S*T], the spec.
pub(crate) fn check_shapes(
    op: &'static str,
    lens: [usize; 4],
    ref_len: Option<usize>,
    s: usize,
    t: usize,
    spec: &PolicyLossSpec,
) -> crate::Result<()> {
    super::check_pos(op, "S", s)?;
    super::check_pos(op, "T", t)?;
    let names = ["logp [N]", "old_logp [N]", "adv [N]", "mask [N]"];
    for (len, what) in lens.into_iter().zip(names) {
        super::check_len(op, what, len, &[s, t])?;
    }
    if let Some(len) = ref_len {
        super::check_len(op, "ref_logp [N]", len, &[s, t])?;
    }
    check_spec(op, spec, ref_len.is_some())
}

/// The check of a policy loss's mask values where they are on the host: 0/1, with some 1.
pub(crate) fn check_mask(op: &'static str, mask: &[f32]) -> crate::Result<()> {
    super::pool::check_binary(op, "mask", mask)?;
    if !mask.contains(&1.0) {
        return Err(crate::Error::invalid(
            op,
            "mask has no token: the loss would be 0/0",
        ));
    }
    Ok(())
}

/// The device's checks on the inputs of both directions: [`check_shapes`], and
/// [`check_mask`]. Returns the slices.
#[allow(clippy::type_complexity)]
pub(crate) fn device_inputs<'a>(
    op: &'static str,
    inputs: [super::View<'a, Vec<f32>>; 4],
    ref_logp: Option<super::View<'a, Vec<f32>>>,
    s: usize,
    t: usize,
    spec: &PolicyLossSpec,
) -> crate::Result<(
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    Option<&'a [f32]>,
)> {
    check_shapes(
        op,
        inputs.map(|v| v.len()),
        ref_logp.as_ref().map(|r| r.len()),
        s,
        t,
        spec,
    )?;
    let [logp, old, adv, mask] = inputs;
    let mask = super::get(op, "mask", mask)?;
    check_mask(op, mask)?;
    let ref_logp = match ref_logp {
        Some(r) => Some(super::get(op, "ref_logp", r)?),
        None => None,
    };
    Ok((
        super::get(op, "logp", logp)?,
        super::get(op, "old_logp", old)?,
        super::get(op, "adv", adv)?,
        mask,
        ref_logp,
    ))
}
