//! Critic pooling: one vector per sequence from the hidden states of its real tokens.

use rayon::prelude::*;

use super::{dot, real, softmax, Real};
use crate::device::PoolMode;

/// Added to the renormalising sum of the weighted pooling (as the reference critic does).
pub const WEIGHTED_EPS: f64 = 1e-8;

/// `softmax(w[:T])` (the position weights before masking), or nothing for other modes.
fn position_weights<T: Real>(w: &[T], t: usize, mode: PoolMode) -> Vec<T> {
    if mode != PoolMode::Weighted || t == 0 {
        return Vec::new();
    }
    let mut p = vec![T::zero(); t];
    softmax::softmax_fwd(&mut p, &w[..t], t);
    p
}

/// Number of real tokens of a row: `sum(mask)`, rounded.
fn real_tokens<T: Real>(mask: &[T]) -> usize {
    mask.iter().map(|&m| m.to_f64()).sum::<f64>().round() as usize
}

/// For each channel, the first real position holding its largest value (NaN propagates).
fn argmax<T: Real>(idx: &mut [usize], h: &[T], mask: &[T], c: usize) {
    let mut best: Vec<T> = Vec::new();
    for (ti, (row, &m)) in h.chunks_exact(c).zip(mask).enumerate() {
        if m == T::zero() {
            continue;
        }
        if best.is_empty() {
            best.extend_from_slice(row);
            idx.fill(ti);
            continue;
        }
        for ((b, i), &v) in best.iter_mut().zip(idx.iter_mut()).zip(row) {
            if v > *b || (v.is_nan() && !b.is_nan()) {
                *b = v;
                *i = ti;
            }
        }
    }
}

/// `alpha_t = p_t m_t / (sum_u p_u m_u + 1e-8)` for one row, and the denominator.
fn alphas<T: Real>(p: &[T], mask: &[T]) -> (Vec<T>, T) {
    let den = p.iter().zip(mask).map(|(&p, &m)| p * m).sum::<T>() + real::<T>(WEIGHTED_EPS);
    (
        p.iter().zip(mask).map(|(&p, &m)| p * m / den).collect(),
        den,
    )
}

/// `out[B,C]` `=` one pooled vector per row of h [B,T,C], over the real tokens given by
/// mask [B,T] (1 = real, 0 = padding; right padding; each row has a real token):
/// - last: `h[b, sum(m_b) - 1, :]`
/// - mean: `sum_t m_t h_t / sum_t m_t`
/// - max: per channel, the largest value over real tokens
/// - weighted: `sum_t alpha_t h_t`, `alpha = softmax(w[:T]) * m / (sum(softmax(w[:T]) * m) + 1e-8)`,
///   w [Tmax >= T] (unused by other modes: pass an empty slice)
///
/// Parallel over rows.
pub fn pool_fwd<T: Real>(
    out: &mut [T],
    h: &[T],
    mask: &[T],
    w: &[T],
    t: usize,
    c: usize,
    mode: PoolMode,
) {
    if t == 0 || c == 0 {
        return;
    }
    let p = position_weights(w, t, mode);
    out.par_chunks_mut(c)
        .zip(h.par_chunks(t * c))
        .zip(mask.par_chunks(t))
        .for_each(|((out, h), mask)| match mode {
            PoolMode::Last => {
                let last = real_tokens(mask).clamp(1, t) - 1;
                out.copy_from_slice(&h[last * c..][..c]);
            }
            PoolMode::Mean => {
                out.fill(T::zero());
                let mut count = T::zero();
                for (row, &m) in h.chunks_exact(c).zip(mask) {
                    if m != T::zero() {
                        count += m;
                        for (o, &x) in out.iter_mut().zip(row) {
                            *o += m * x;
                        }
                    }
                }
                let inv = T::one() / count;
                for o in out.iter_mut() {
                    *o *= inv;
                }
            }
            PoolMode::Max => {
                let mut idx = vec![0usize; c];
                argmax(&mut idx, h, mask, c);
                for (j, (o, &i)) in out.iter_mut().zip(&idx).enumerate() {
                    *o = h[i * c + j];
                }
            }
            PoolMode::Weighted => {
                let (alpha, _) = alphas(&p, mask);
                out.fill(T::zero());
                for (row, &a) in h.chunks_exact(c).zip(&alpha) {
                    if a != T::zero() {
                        for (o, &x) in out.iter_mut().zip(row) {
                            *o += a * x;
                        }
                    }
                }
            }
        });
}

/// `dh[B,T,C]` `=` (zero at positions the output does not depend on); weighted also
/// `dw[t] += sum_b d out_b / d w_t` for t < T (`+=`; dw [Tmax], empty for other modes):
/// - last: `dh[b, sum(m_b) - 1] = dout[b]`
/// - mean: `dh[b, t] = m_t dout[b] / sum(m_b)`
/// - max: `dh[b, t, c] = dout[b, c]` at the channel's argmax (the first one on ties)
/// - weighted: `dh[b, t] = alpha_t dout[b]`; with `g_t = dout . h_t`, `D = sum p m + 1e-8`:
///   `dp_t = m_t (g_t - sum_u alpha_u g_u) / D`, `dw_t = p_t (dp_t - sum_u p_u dp_u)`
///
/// dout [B,C], h and mask as in the forward. dh is parallel over rows; dw sums the rows'
/// contributions in row order (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn pool_bwd<T: Real>(
    dh: &mut [T],
    dw: &mut [T],
    dout: &[T],
    h: &[T],
    mask: &[T],
    w: &[T],
    t: usize,
    c: usize,
    mode: PoolMode,
) {
    if t == 0 || c == 0 {
        return;
    }
    let p = position_weights(w, t, mode);
    let rows = dout.len() / c;
    let dw_len = if mode == PoolMode::Weighted {
        rows * t
    } else {
        0
    };
    let mut dw_rows = vec![T::zero(); dw_len];
    let mut dw_chunks: Vec<&mut [T]> = dw_rows.chunks_mut(t).collect();
    dw_chunks.resize_with(rows, || &mut []);
    dh.par_chunks_mut(t * c)
        .zip(dw_chunks.into_par_iter())
        .zip(dout.par_chunks(c))
        .zip(h.par_chunks(t * c))
        .zip(mask.par_chunks(t))
        .for_each(|((((dh, dw_row), dout), h), mask)| {
            dh.fill(T::zero());
            match mode {
                PoolMode::Last => {
                    let last = real_tokens(mask).clamp(1, t) - 1;
                    dh[last * c..][..c].copy_from_slice(dout);
                }
                PoolMode::Mean => {
                    let count: T = mask.iter().copied().sum();
                    for (d, &m) in dh.chunks_exact_mut(c).zip(mask) {
                        if m != T::zero() {
                            let k = m / count;
                            for (d, &g) in d.iter_mut().zip(dout) {
                                *d = k * g;
                            }
                        }
                    }
                }
                PoolMode::Max => {
                    let mut idx = vec![0usize; c];
                    argmax(&mut idx, h, mask, c);
                    for (j, (&i, &g)) in idx.iter().zip(dout).enumerate() {
                        dh[i * c + j] = g;
                    }
                }
                PoolMode::Weighted => {
                    let (alpha, den) = alphas(&p, mask);
                    let g: Vec<T> = h.chunks_exact(c).map(|row| dot(dout, row)).collect();
                    let gbar: T = alpha.iter().zip(&g).map(|(&a, &g)| a * g).sum();
                    for (d, &a) in dh.chunks_exact_mut(c).zip(&alpha) {
                        for (d, &g) in d.iter_mut().zip(dout) {
                            *d = a * g;
                        }
                    }
                    let dp: Vec<T> = g
                        .iter()
                        .zip(mask)
                        .map(|(&g, &m)| m * (g - gbar) / den)
                        .collect();
                    let pdp: T = p.iter().zip(&dp).map(|(&p, &d)| p * d).sum();
                    for ((o, &p), &d) in dw_row.iter_mut().zip(&p).zip(&dp) {
                        *o = p * (d - pdp);
                    }
                }
            }
        });
    if mode == PoolMode::Weighted {
        for row in dw_rows.chunks_exact(t) {
            for (d, &x) in dw.iter_mut().zip(row) {
                *d += x;
            }
        }
    }
}

/// Every element of `x` must be 0 or 1 (the device's check on masks).
pub(crate) fn check_binary(op: &'static str, what: &str, x: &[f32]) -> crate::Result<()> {
    match x.iter().position(|&v| v != 0.0 && v != 1.0) {
        None => Ok(()),
        Some(i) => Err(crate::Error::invalid(
            op,
            format!("{what}[{i}] = {} must be 0 or 1", x[i]),
        )),
    }
}

/// A padding mask [B,T]: 0/1, right padding (no real token after a padding one), and at least
/// one real token in every row (the device's check).
pub(crate) fn check_padding_mask(op: &'static str, mask: &[f32], t: usize) -> crate::Result<()> {
    check_binary(op, "mask", mask)?;
    for (b, row) in mask.chunks_exact(t).enumerate() {
        let len = row.iter().take_while(|&&m| m == 1.0).count();
        if len == 0 {
            return Err(crate::Error::invalid(
                op,
                format!("mask row {b} has no real token: nothing to pool"),
            ));
        }
        if row[len..].contains(&1.0) {
            return Err(crate::Error::invalid(
                op,
                format!("mask row {b} is not right-padded (a real token follows padding)"),
            ));
        }
    }
    Ok(())
}

/// `w` (or `dw`) of length `len`: given with at least T entries for weighted pooling, absent
/// otherwise (the device's check).
pub(crate) fn check_weights(
    op: &'static str,
    what: &str,
    len: Option<usize>,
    t: usize,
    mode: PoolMode,
) -> crate::Result<()> {
    match (mode, len) {
        (PoolMode::Weighted, Some(l)) if l >= t => Ok(()),
        (PoolMode::Weighted, Some(l)) => Err(crate::Error::invalid(
            op,
            format!("{what} [Tmax] has {l} elements, fewer than T = {t}"),
        )),
        (PoolMode::Weighted, None) => Err(crate::Error::invalid(
            op,
            format!("weighted pooling needs {what} [Tmax]"),
        )),
        (_, Some(_)) => Err(crate::Error::invalid(
            op,
            format!("{what} is used by weighted pooling only (mode {mode:?})"),
        )),
        (_, None) => Ok(()),
    }
}
