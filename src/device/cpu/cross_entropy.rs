//! Masked softmax cross-entropy over the vocabulary, in chunks of columns (one chunk of all V
//! for whole logits): the loss from the chunks' running (max, sum), and the gradient written
//! over each chunk's logits.

use rayon::prelude::*;

use super::{max, real, sum_f64, Real};

// The LM head makes logits [N, VC] for columns [v0, v0 + VC) of a V-wide vocabulary, one chunk
// after another, so that [N, V] logits need never exist whole.

/// Slots per row of the chunked cross-entropy's state [N, 3].
pub const CE_STATE: usize = 3;

/// The length checks both directions of the chunked cross-entropy share, on every device: a
/// chunk `[v0, v0+VC)` inside the vocabulary, state [N,3], targets [N], mask [N]. (The
/// targets' values, below V, are each device's to check where they are.)
pub(crate) fn check_chunk(
    op: &'static str,
    (vc, v, v0): (usize, usize, usize),
    state: usize,
    targets: usize,
    mask: usize,
    n: usize,
) -> crate::Result<()> {
    super::check_pos(op, "VC", vc)?;
    if v0.checked_add(vc).is_none_or(|end| end > v) {
        return Err(crate::Error::invalid(
            op,
            format!("chunk [{v0}, {v0}+{vc}) outside the vocabulary of {v}"),
        ));
    }
    super::check_len(op, "state [N,3]", state, &[n, CE_STATE])?;
    super::check_len(op, "targets [N]", targets, &[n])?;
    super::check_len(op, "mask [N]", mask, &[n])
}

/// `(m, s)` with `m` the max of `x` (NaN skipped) and `s = sum exp(x - m)` (f64 sum); a chunk
/// of -inf only is `(-inf, 0)`.
fn chunk_max_sum<T: Real>(x: &[T], e: &mut Vec<T>) -> (T, T) {
    let m = max(x);
    if m == T::neg_infinity() {
        return (m, T::zero());
    }
    e.clear();
    e.extend(x.iter().map(|&v| (v - m).vexp()));
    (m, real::<T>(sum_f64(e)))
}

/// `s * exp(m - mn)` for `mn >= m`; exactly `s` when `m == mn` (also for -inf).
fn rescale<T: Real>(s: T, m: T, mn: T) -> T {
    if m == mn {
        s
    } else {
        s * (m - mn).vexp()
    }
}

/// One vocabulary chunk of the cross-entropy's forward, chunks issued in order of `v0`
/// (0, VC, 2 VC, ...): logits [N,VC] are columns `[v0, v0+VC)` of a V-wide row.
///
/// `state[N,3]` per row = (M, S, x_y): the running max, `sum exp(x - M)` and the target's
/// logit (0 until its chunk). `v0 == 0` starts it (`=`), later chunks merge into it (`+=`);
/// the chunk that ends at V writes `losses[n] = mask[n] * ((M - x_y) + ln S)` (`=`). A row
/// with mask 0 is skipped without reading its logits (padding may hold anything; its state
/// is left as it is; its loss is 0). Computed as `(M - x_y) + ln S`: stable for any logit
/// size. Parallel over rows.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_chunk_fwd<T: Real>(
    losses: &mut [T],
    state: &mut [T],
    logits: &[T],
    targets: &[u32],
    mask: &[T],
    vc: usize,
    v: usize,
    v0: usize,
) {
    if vc == 0 {
        return;
    }
    let last = v0 + vc == v;
    losses
        .par_iter_mut()
        .zip(state.par_chunks_mut(CE_STATE))
        .zip(logits.par_chunks(vc))
        .zip(targets.par_iter())
        .zip(mask.par_iter())
        .for_each_init(Vec::new, |e, ((((loss, st), x), &y), &mk)| {
            if mk == T::zero() {
                if last {
                    *loss = T::zero();
                }
                return;
            }
            let (mc, sc) = chunk_max_sum(x, e);
            let y = y as usize;
            let in_chunk = (v0..v0 + vc).contains(&y);
            if v0 == 0 {
                st[0] = mc;
                st[1] = sc;
                st[2] = if in_chunk { x[y - v0] } else { T::zero() };
            } else {
                let mn = st[0].max(mc);
                st[1] = rescale(st[1], st[0], mn) + rescale(sc, mc, mn);
                st[0] = mn;
                if in_chunk {
                    st[2] = x[y - v0];
                }
            }
            if last {
                *loss = mk * ((st[0] - st[2]) + st[1].ln());
            }
        });
}

/// In place on the chunk's logits [N,VC] (made again):
/// `x <- mask[n] * scale * (exp(x - M) / S - onehot(targets[n] - v0))`
///
/// The backward of one chunk (columns `[v0, v0+VC)`), from the state the forward's chunks
/// left (`(M, S, _)` per row, see [`cross_entropy_chunk_fwd`]). Rows with weight 0 become
/// zero without reading the state.
pub fn cross_entropy_chunk_bwd<T: Real>(
    logits: &mut [T],
    state: &[T],
    targets: &[u32],
    mask: &[T],
    vc: usize,
    v0: usize,
    scale: f32,
) {
    if vc == 0 {
        return;
    }
    let scale = <T as Real>::from_f32(scale);
    logits
        .par_chunks_mut(vc)
        .zip(state.par_chunks(CE_STATE))
        .zip(targets.par_iter())
        .zip(mask.par_iter())
        .for_each(|(((d, st), &y), &mk)| {
            let w = mk * scale;
            if w == T::zero() {
                d.fill(T::zero());
                return;
            }
            let (m, ws) = (st[0], w * (T::one() / st[1]));
            for d in d.iter_mut() {
                *d = (*d - m).vexp() * ws;
            }
            if let Some(j) = (y as usize).checked_sub(v0).filter(|&j| j < vc) {
                d[j] -= w;
            }
        });
}
