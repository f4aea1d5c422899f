//! Sampling the next token of each row from its logits: temperature, top-k, top-p.

use rayon::prelude::*;

use super::{max, sum_f64, Real};
use crate::device::SampleSpec;

/// For each row n of logits [N,V]: `ids[n]` = a token drawn from softmax(logits / temperature)
/// restricted to the top-k and then the top-p set (renormalised; ranked by descending
/// probability, lower id first on ties), by inverse CDF with the uniform `u[n]` in [0, 1) over
/// the kept tokens in id order; `logp[n]` = log softmax(logits / temperature)[ids[n]] of the unrestricted
/// distribution (what the policy-gradient ratio uses). Greedy rows (temperature 0) take the
/// argmax and logp 0.   (`=`)
pub fn sample_fwd<T: Real>(
    ids: &mut [u32],
    logp: &mut [T],
    logits: &[T],
    u: &[T],
    v: usize,
    spec: SampleSpec,
) {
    if v == 0 {
        return;
    }
    ids.par_iter_mut()
        .zip(logp.par_iter_mut())
        .zip(logits.par_chunks(v))
        .zip(u.par_iter())
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, order), (((id, lp), x), &u)| {
                if spec.temperature <= 0.0 {
                    let mut best = 0;
                    for (i, &xi) in x.iter().enumerate() {
                        if xi > x[best] {
                            best = i;
                        }
                    }
                    *id = best as u32;
                    *lp = T::zero();
                    return;
                }
                let inv_t = T::one() / <T as Real>::from_f32(spec.temperature);
                let m = max(x) * inv_t;
                p.clear();
                p.extend(x.iter().map(|&xi| (xi * inv_t - m).vexp()));
                let total = sum_f64(p);
                let ln_total = total.ln();
                // the kept set: top-k, then top-p, by descending probability (lower id first
                // on ties); nothing to sort when neither filter is on
                order.clear();
                order.extend(0..v as u32);
                let keep_k = if spec.top_k > 0 { spec.top_k.min(v) } else { v };
                if keep_k < v || spec.top_p < 1.0 {
                    let by_prob = |a: &u32, b: &u32| {
                        p[*b as usize]
                            .partial_cmp(&p[*a as usize])
                            .unwrap_or(std::cmp::Ordering::Equal)
                            .then(a.cmp(b))
                    };
                    if keep_k < v {
                        order.select_nth_unstable_by(keep_k - 1, by_prob);
                        order.truncate(keep_k);
                    }
                    order.sort_unstable_by(by_prob);
                    if spec.top_p < 1.0 {
                        let kept: f64 = order.iter().map(|&i| Real::to_f64(p[i as usize])).sum();
                        let target = spec.top_p as f64 * kept;
                        let mut acc = 0.0;
                        for (n, &i) in order.iter().enumerate() {
                            acc += Real::to_f64(p[i as usize]);
                            if acc >= target {
                                order.truncate(n + 1);
                                break;
                            }
                        }
                    }
                    order.sort_unstable();
                }
                // inverse CDF over the kept tokens in id order
                let mass: f64 = order.iter().map(|&i| Real::to_f64(p[i as usize])).sum();
                let goal = Real::to_f64(u) * mass;
                let mut acc = 0.0;
                let mut pick = order[order.len() - 1];
                for &i in order.iter() {
                    acc += Real::to_f64(p[i as usize]);
                    if acc > goal {
                        pick = i;
                        break;
                    }
                }
                *id = pick;
                let chosen = Real::to_f64(p[pick as usize]).ln() - ln_total;
                *lp = T::from_f64(chosen).unwrap_or_else(T::nan);
            },
        );
}
