//! Causal grouped-query attention, one query row (or one key row) at a time.
//!
//! Query head h reads KV head h / (NH/NKV); scores are `q.k * scale` with scale = 1/sqrt(HS),
//! and query position i sees key positions j <= i. No T x T matrix is ever formed: the forward
//! keeps one row of scores per task, the backward recomputes probabilities from the forward's
//! log-sum-exp (flash-attention style).

use rayon::prelude::*;

use super::{axpy, dot, max, real, scale, Real};
use crate::device::AttnDims;

/// Row index into q/out/dq [B,T,NH,HS] (in rows of HS) -> (b, t, h).
fn split_q(row: usize, d: &AttnDims) -> (usize, usize, usize) {
    (row / (d.t * d.nh), row / d.nh % d.t, row % d.nh)
}

fn inv_sqrt_hs<T: Real>(hs: usize) -> T {
    T::one() / real::<T>(hs as f64).sqrt()
}

/// `out[B,T,NH,HS] = softmax(q k^T * scale, causal) v`   (`=`);
/// `lse[B,NH,T] = logsumexp_j(q_i . k_j * scale)` over j <= i   (`=`)
///
/// q [B,T,NH,HS], k and v [B,T,NKV,HS]. Parallel over query rows (b, t, h): each computes its
/// t+1 scores, their max-subtracted exponentials, and the weighted sum of value rows.
pub fn attention_fwd<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    d: AttnDims,
) {
    let AttnDims { b, t, nh, nkv, hs } = d;
    if [b, t, nh, nkv, hs].contains(&0) {
        return;
    }
    let group = nh / nkv;
    let sc = inv_sqrt_hs::<T>(hs);
    // kv row of (b, j, g), in rows of HS
    let kv = |bi: usize, j: usize, g: usize| ((bi * t + j) * nkv + g) * hs;
    // lse in the row order of q, [B,T,NH]; transposed into [B,NH,T] below.
    let mut lse_q = vec![T::zero(); b * t * nh];
    out.par_chunks_mut(hs)
        .zip(lse_q.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, (o, l))| {
            let (bi, i, h) = split_q(row, &d);
            let g = h / group;
            let qr = &q[row * hs..(row + 1) * hs];
            scores.clear();
            scores.extend((0..=i).map(|j| dot(qr, &k[kv(bi, j, g)..kv(bi, j, g) + hs]) * sc));
            let m = max(scores);
            o.fill(T::zero());
            let mut sum = T::zero();
            for (j, &s) in scores.iter().enumerate() {
                let p = (s - m).exp();
                sum += p;
                axpy(o, p, &v[kv(bi, j, g)..kv(bi, j, g) + hs]);
            }
            scale(o, T::one() / sum);
            *l = m + sum.ln();
        });
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, row)| {
        let (bi, h) = (bh / nh, bh % nh);
        for (i, l) in row.iter_mut().enumerate() {
            *l = lse_q[(bi * t + i) * nh + h];
        }
    });
}

/// Gradients of the forward   (all `=`):
/// with `P_ij = exp(q_i.k_j * scale - lse_i)` (j <= i), `D_i = dout_i . out_i`,
/// `dS_ij = P_ij (dout_i . v_j - D_i)`:
/// `dq_i = scale * sum_j dS_ij k_j`; `dk_j = scale * sum_{h in group, i >= j} dS_ij q_i`;
/// `dv_j = sum_{h in group, i >= j} P_ij dout_i`.
///
/// dq [B,T,NH,HS]; dk, dv [B,T,NKV,HS]; dout, q, out [B,T,NH,HS]; k, v [B,T,NKV,HS];
/// lse [B,NH,T]. Two passes, each parallel over the rows it writes: query rows (b, i, h) for dq,
/// then key rows (b, j, g) for dk and dv; each pass recomputes the P and dS it needs, so there
/// are no atomics and no per-thread partial sums.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    d: AttnDims,
) {
    let AttnDims { b, t, nh, nkv, hs } = d;
    if [b, t, nh, nkv, hs].contains(&0) {
        return;
    }
    let group = nh / nkv;
    let sc = inv_sqrt_hs::<T>(hs);
    let kv = |bi: usize, j: usize, g: usize| ((bi * t + j) * nkv + g) * hs;
    let qrow = |bi: usize, i: usize, h: usize| ((bi * t + i) * nh + h) * hs;
    // D [B,T,NH], in the row order of q.
    let dd: Vec<T> = dout
        .par_chunks(hs)
        .zip(out.par_chunks(hs))
        .map(|(g, o)| dot(g, o))
        .collect();

    dq.par_chunks_mut(hs).enumerate().for_each(|(row, dq)| {
        let (bi, i, h) = split_q(row, &d);
        let g = h / group;
        let (qr, gr) = (
            &q[row * hs..(row + 1) * hs],
            &dout[row * hs..(row + 1) * hs],
        );
        let l = lse[(bi * nh + h) * t + i];
        dq.fill(T::zero());
        for j in 0..=i {
            let (kr, vr) = (
                &k[kv(bi, j, g)..kv(bi, j, g) + hs],
                &v[kv(bi, j, g)..kv(bi, j, g) + hs],
            );
            let p = (dot(qr, kr) * sc - l).exp();
            axpy(dq, p * (dot(gr, vr) - dd[row]), kr);
        }
        scale(dq, sc);
    });

    dk.par_chunks_mut(hs)
        .zip(dv.par_chunks_mut(hs))
        .enumerate()
        .for_each(|(row, (dk, dv))| {
            let (bi, j, g) = (row / (t * nkv), row / nkv % t, row % nkv);
            let (kr, vr) = (&k[row * hs..(row + 1) * hs], &v[row * hs..(row + 1) * hs]);
            dk.fill(T::zero());
            dv.fill(T::zero());
            for i in j..t {
                for h in g * group..(g + 1) * group {
                    let r = qrow(bi, i, h);
                    let (qr, gr) = (&q[r..r + hs], &dout[r..r + hs]);
                    let p = (dot(qr, kr) * sc - lse[(bi * nh + h) * t + i]).exp();
                    axpy(dk, p * (dot(gr, vr) - dd[r / hs]), qr);
                    axpy(dv, p, gr);
                }
            }
            scale(dk, sc);
        });
}
