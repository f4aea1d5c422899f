//! Causal grouped-query attention, one (batch, head) or (batch, KV head) per task.
//!
//! Query head h reads KV head h / (NH/NKV); scores are `q.k * scale` with scale = 1/sqrt(HS),
//! and query position i sees key positions j <= i. No T x T matrix is formed: each task keeps
//! one row of scores at a time; the backward recomputes probabilities from the forward's
//! log-sum-exp (flash-attention style). Keys and values are first copied transposed, [HS, T],
//! so that the score row of a query is a sum of HS contiguous axpys over key positions (which
//! vectorises) instead of T short dot products.

use rayon::prelude::*;

use super::{axpy, dot, max, real, scale, Real};
use crate::device::AttnDims;

fn inv_sqrt_hs<T: Real>(hs: usize) -> T {
    T::one() / real::<T>(hs as f64).sqrt()
}

/// dst [HS, T] = rows (bi, 0..T, g) of x [B,T,NKV,HS], transposed.
fn gather_t<T: Real>(dst: &mut Vec<T>, x: &[T], bi: usize, g: usize, d: &AttnDims) {
    let (t, hs) = (d.t, d.hs);
    dst.clear();
    dst.resize(hs * t, T::zero());
    for j in 0..t {
        let r = ((bi * t + j) * d.nkv + g) * hs;
        for (c, &x) in x[r..r + hs].iter().enumerate() {
            dst[c * t + j] = x;
        }
    }
}

/// s[0..n] = sum_c a[c] * xt[c, 0..n]   (xt [HS, T] transposed rows)
fn scores<T: Real>(s: &mut [T], a: &[T], xt: &[T], t: usize) {
    s.fill(T::zero());
    for (c, &ac) in a.iter().enumerate() {
        axpy(s, ac, &xt[c * t..c * t + s.len()]);
    }
}

/// Copies a per-task [B,H,T,HS] buffer into the row layout [B,T,H,HS].
fn scatter_rows<T: Real>(dst: &mut [T], src: &[T], t: usize, h: usize, hs: usize) {
    dst.par_chunks_mut(hs).enumerate().for_each(|(row, o)| {
        let (bi, i, hh) = (row / (t * h), row / h % t, row % h);
        let s = ((bi * h + hh) * t + i) * hs;
        o.copy_from_slice(&src[s..s + hs]);
    });
}

/// `out[B,T,NH,HS] = softmax(q k^T * scale, causal) v`   (`=`);
/// `lse[B,NH,T] = logsumexp_j(q_i . k_j * scale)` over j <= i   (`=`)
///
/// q [B,T,NH,HS], k and v [B,T,NKV,HS]. Parallel over (b, h): a task computes each query row's
/// scores, their max-subtracted exponentials, and the weighted sum of value rows.
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
    let mut o_bh = vec![T::zero(); b * nh * t * hs];
    o_bh.par_chunks_mut(t * hs)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(kt, s, qs), (bh, (o, l))| {
                let (bi, h) = (bh / nh, bh % nh);
                let g = h / group;
                gather_t(kt, k, bi, g, &d);
                for i in 0..t {
                    let r = ((bi * t + i) * nh + h) * hs;
                    qs.clear();
                    qs.extend(q[r..r + hs].iter().map(|&x| x * sc));
                    s.resize(i + 1, T::zero());
                    scores(s, qs, kt, t);
                    let m = max(s);
                    let oi = &mut o[i * hs..(i + 1) * hs];
                    oi.fill(T::zero());
                    for sj in s.iter_mut() {
                        *sj = (*sj - m).vexp();
                    }
                    let mut sum = T::zero();
                    for (j, &p) in s.iter().enumerate() {
                        sum += p;
                        let vr = ((bi * t + j) * nkv + g) * hs;
                        axpy(oi, p, &v[vr..vr + hs]);
                    }
                    scale(oi, T::one() / sum);
                    l[i] = m + sum.ln();
                }
            },
        );
    scatter_rows(out, &o_bh, t, nh, hs);
}

/// Gradients of the forward   (all `=`):
/// with `P_ij = exp(q_i.k_j * scale - lse_i)` (j <= i), `D_i = dout_i . out_i`,
/// `dS_ij = P_ij (dout_i . v_j - D_i)`:
/// `dq_i = scale * sum_j dS_ij k_j`; `dk_j = scale * sum_{h in group, i >= j} dS_ij q_i`;
/// `dv_j = sum_{h in group, i >= j} P_ij dout_i`.
///
/// dq [B,T,NH,HS]; dk, dv [B,T,NKV,HS]; dout, q, out [B,T,NH,HS]; k, v [B,T,NKV,HS];
/// lse [B,NH,T]. Parallel over (b, KV head g): a task owns dk and dv of its KV head and dq of
/// the query heads that read it, so nothing is shared between tasks; one pass over (h, i)
/// recomputes each row of P and dS once.
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
    // per-task layouts: dq [B,NH,T,HS] (a task's heads are contiguous), dk and dv [B,NKV,T,HS]
    let mut dq_t = vec![T::zero(); b * nh * t * hs];
    let mut dk_t = vec![T::zero(); b * nkv * t * hs];
    let mut dv_t = vec![T::zero(); b * nkv * t * hs];
    dq_t.par_chunks_mut(group * t * hs)
        .zip(dk_t.par_chunks_mut(t * hs))
        .zip(dv_t.par_chunks_mut(t * hs))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(kt, vt, s, dp, qs), (bg, ((dqg, dkg), dvg))| {
                let (bi, g) = (bg / nkv, bg % nkv);
                gather_t(kt, k, bi, g, &d);
                gather_t(vt, v, bi, g, &d);
                for (hi, dqh) in dqg.chunks_mut(t * hs).enumerate() {
                    let h = g * group + hi;
                    for i in 0..t {
                        let r = ((bi * t + i) * nh + h) * hs;
                        let (qi, gi) = (&q[r..r + hs], &dout[r..r + hs]);
                        let di = dot(gi, &out[r..r + hs]);
                        let l = lse[(bi * nh + h) * t + i];
                        qs.clear();
                        qs.extend(qi.iter().map(|&x| x * sc));
                        s.resize(i + 1, T::zero());
                        dp.resize(i + 1, T::zero());
                        scores(s, qs, kt, t);
                        scores(dp, gi, vt, t);
                        let dqi = &mut dqh[i * hs..(i + 1) * hs];
                        for sj in s.iter_mut() {
                            *sj = (*sj - l).vexp();
                        }
                        for (j, (&p, &dpj)) in s.iter().zip(dp.iter()).enumerate() {
                            let ds = p * (dpj - di) * sc;
                            let kr = ((bi * t + j) * nkv + g) * hs;
                            axpy(dqi, ds, &k[kr..kr + hs]);
                            axpy(&mut dkg[j * hs..(j + 1) * hs], ds, qi);
                            axpy(&mut dvg[j * hs..(j + 1) * hs], p, gi);
                        }
                    }
                }
            },
        );
    scatter_rows(dq, &dq_t, t, nh, hs);
    scatter_rows(dk, &dk_t, t, nkv, hs);
    scatter_rows(dv, &dv_t, t, nkv, hs);
}
