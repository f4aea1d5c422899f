//! Masked softmax cross-entropy over the vocabulary.

use rayon::prelude::*;

use super::{max, real, sum_f64, Real};

/// The row max `m` and `ln(sum_v exp(x_v - m))` (the sum accumulated in f64), so that
/// `logsumexp(x) = m + ln_sum`. Keeping the two apart avoids rounding the large `m + ln_sum`
/// before subtracting a logit of similar size.
/// `e` is scratch for the row's exponentials.
fn max_and_ln_sum<T: Real>(x: &[T], e: &mut Vec<T>) -> (T, T) {
    let m = max(x);
    e.clear();
    e.extend(x.iter().map(|&v| (v - m).vexp()));
    (m, real::<T>(sum_f64(e).ln()))
}

/// `losses[N] = mask[n] * (logsumexp(logits[n,:]) - logits[n, targets[n]])`   (`=`)
///
/// logits [N,V], targets [N] (each < V), mask [N]. Computed as `(max - x_y) + ln(sum exp(x -
/// max))`: stable for any logit size. A row with mask 0 gets loss 0 without reading its logits
/// (padding may hold anything). Parallel over rows.
pub fn cross_entropy_fwd<T: Real>(
    losses: &mut [T],
    logits: &[T],
    targets: &[u32],
    mask: &[T],
    v: usize,
) {
    if v == 0 {
        return;
    }
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .zip(mask.par_iter())
        .for_each_init(Vec::new, |e, (((loss, x), &y), &m)| {
            *loss = if m == T::zero() {
                T::zero()
            } else {
                let (mx, ln_sum) = max_and_ln_sum(x, e);
                m * ((mx - x[y as usize]) + ln_sum)
            };
        });
}

/// `dlogits[N,V] = mask[n] * scale * (softmax(logits[n,:]) - onehot(targets[n]))`   (`=`)
///
/// The gradient of `scale * sum_n losses[n]`; rows with mask 0 are zero. Each row's exponentials
/// `exp(x - max)` are written once, summed in f64, then scaled. Parallel over rows.
pub fn cross_entropy_bwd<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    mask: &[T],
    v: usize,
    scale: f32,
) {
    if v == 0 {
        return;
    }
    let scale = <T as Real>::from_f32(scale);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .zip(mask.par_iter())
        .for_each(|(((d, x), &y), &m)| {
            let w = m * scale;
            if w == T::zero() {
                d.fill(T::zero());
                return;
            }
            let mx = max(x);
            for (d, &x) in d.iter_mut().zip(x) {
                *d = (x - mx).vexp();
            }
            let ws = w * real::<T>(1.0 / sum_f64(d));
            for d in d.iter_mut() {
                *d *= ws;
            }
            d[y as usize] -= w;
        });
}
