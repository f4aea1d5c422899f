//! Rotary position embedding, HF "rotate_half" convention, in place.

use rayon::prelude::*;

use super::{real, Real};
use crate::device::CacheDims;

/// cos and sin tables [T, HS/2] for positions `pos0..pos0+t`, angles formed in f32 exactly as HF
/// transformers does: `inv_freq_i = 1 / theta^((2i) / HS)` and `angle = f32(p) * inv_freq_i`,
/// both in f32; cos and sin are then evaluated in f64 of that f32 angle and rounded to `T`
/// (in parallel: at T=512, HS=64 the table costs as much as the rotation).
fn tables<T: Real>(t: usize, hs: usize, pos0: usize, theta: f32) -> (Vec<T>, Vec<T>) {
    let half = hs / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / hs as f32))
        .collect();
    (0..t * half)
        .into_par_iter()
        .map(|k| {
            let angle = (((pos0 + k / half) as f32) * inv_freq[k % half]) as f64;
            (real::<T>(angle.cos()), real::<T>(angle.sin()))
        })
        .unzip()
}

/// Rotates the first H head vectors of every row of x [B,T,LD] (LD >= H*HS) in place by the
/// row's position's angles, `tables` [T,HS/2] as [`tables`] makes them; `inverse` rotates by
/// minus the angles (the transpose, used by the backward).
fn rotate<T: Real>(
    x: &mut [T],
    ld: usize,
    (h, hs): (usize, usize),
    (cos, sin): (&[T], &[T]),
    inverse: bool,
) {
    let half = hs / 2;
    let t = cos.len() / half.max(1);
    if x.is_empty() || t == 0 || h == 0 || half == 0 {
        return;
    }
    x.par_chunks_mut(ld).enumerate().for_each(|(bt, row)| {
        let ti = bt % t;
        let (cos, sin) = (
            &cos[ti * half..(ti + 1) * half],
            &sin[ti * half..(ti + 1) * half],
        );
        for head in row[..h * hs].chunks_exact_mut(hs) {
            let (lo, hi) = head.split_at_mut(half);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                if inverse {
                    *a = x1 * c + x2 * s;
                    *b = x2 * c - x1 * s;
                } else {
                    *a = x1 * c - x2 * s;
                    *b = x2 * c + x1 * s;
                }
            }
        }
    });
}

/// In place on x [B,T,H,HS]   (`=`): for i < HS/2, p = pos0 + t, angle = p * theta^(-2i/HS):
/// `(x_i, x_{i+HS/2}) <- (x_i cos - x_{i+HS/2} sin, x_{i+HS/2} cos + x_i sin)`.
/// Parallel over (b, t) rows; the angle table is built once per call.
pub fn rope_fwd<T: Real>(x: &mut [T], t: usize, h: usize, hs: usize, pos0: usize, theta: f32) {
    if x.is_empty() {
        return;
    }
    let (cos, sin) = tables::<T>(t, hs, pos0, theta);
    rotate(x, h * hs, (h, hs), (&cos, &sin), false);
}

/// In place on dx [B,T,H,HS]   (`=`): the transpose rotation (angle -> -angle):
/// `(d_i, d_{i+HS/2}) <- (d_i cos + d_{i+HS/2} sin, d_{i+HS/2} cos - d_i sin)`.
pub fn rope_bwd<T: Real>(dx: &mut [T], t: usize, h: usize, hs: usize, pos0: usize, theta: f32) {
    if dx.is_empty() {
        return;
    }
    let (cos, sin) = tables::<T>(t, hs, pos0, theta);
    rotate(dx, h * hs, (h, hs), (&cos, &sin), true);
}

/// q [B,TQ,NH*HS] and, at positions pos0 + t of k and v [B,TMAX,NKV*HS], the parts of each
/// row (b, t) of qkv [B,TQ,(NH+2NKV)*HS]; q and k then rotated as [`rope_fwd`] at position
/// pos0 + t   (all `=`; k's and v's other positions keep their values). pos0 + TQ <= TMAX.
pub fn qkv_rope_fwd<T: Real>(
    q: &mut [T],
    k: &mut [T],
    v: &mut [T],
    qkv: &[T],
    d: CacheDims,
    theta: f32,
) {
    let CacheDims {
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
        ..
    } = d;
    let (qd, kvd) = (nh * hs, nkv * hs);
    let ld = qd + 2 * kvd;
    debug_assert_eq!(qkv.len() * qd, q.len() * ld, "qkv [B,TQ,QKV]");
    if q.is_empty() || kvd == 0 || tq == 0 {
        return;
    }
    let (cos, sin) = tables::<T>(tq, hs, pos0, theta);
    let win = pos0 * kvd..(pos0 + tq) * kvd;
    // one batch row at a time: its TQ rows of q and qkv, positions pos0.. of its k and v
    q.par_chunks_mut(tq * qd)
        .zip(k.par_chunks_mut(tmax * kvd))
        .zip(v.par_chunks_mut(tmax * kvd))
        .zip(qkv.par_chunks(tq * ld))
        .for_each(|(((q, k), v), rows)| {
            let (k, v) = (&mut k[win.clone()], &mut v[win.clone()]);
            q.par_chunks_mut(qd)
                .zip(k.par_chunks_mut(kvd))
                .zip(v.par_chunks_mut(kvd))
                .zip(rows.par_chunks(ld))
                .for_each(|(((q, k), v), row)| {
                    let (rq, rest) = row.split_at(qd);
                    let (rk, rv) = rest.split_at(kvd);
                    q.copy_from_slice(rq);
                    k.copy_from_slice(rk);
                    v.copy_from_slice(rv);
                });
            rotate(q, qd, (nh, hs), (&cos, &sin), false);
            rotate(k, kvd, (nkv, hs), (&cos, &sin), false);
        });
}

/// dqkv [B,TQ,(NH+2NKV)*HS] = each row's dq and, at position pos0 + t of dk and dv
/// [B,TMAX,NKV*HS], dk and dv, dq's and dk's parts rotated back as [`rope_bwd`]   (`=`): the
/// adjoint of [`qkv_rope_fwd`].
pub fn qkv_rope_bwd<T: Real>(
    dqkv: &mut [T],
    dq: &[T],
    dk: &[T],
    dv: &[T],
    d: CacheDims,
    theta: f32,
) {
    let CacheDims {
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
        ..
    } = d;
    let (qd, kvd) = (nh * hs, nkv * hs);
    let ld = qd + 2 * kvd;
    debug_assert_eq!(dqkv.len() * qd, dq.len() * ld, "dqkv [B,TQ,QKV]");
    if dq.is_empty() || kvd == 0 || tq == 0 {
        return;
    }
    let (cos, sin) = tables::<T>(tq, hs, pos0, theta);
    let win = pos0 * kvd..(pos0 + tq) * kvd;
    dqkv.par_chunks_mut(tq * ld)
        .zip(dq.par_chunks(tq * qd))
        .zip(dk.par_chunks(tmax * kvd))
        .zip(dv.par_chunks(tmax * kvd))
        .for_each(|(((rows, dq), dk), dv)| {
            let (dk, dv) = (&dk[win.clone()], &dv[win.clone()]);
            rows.par_chunks_mut(ld)
                .zip(dq.par_chunks(qd))
                .zip(dk.par_chunks(kvd))
                .zip(dv.par_chunks(kvd))
                .for_each(|(((row, dq), dk), dv)| {
                    let (rq, rest) = row.split_at_mut(qd);
                    let (rk, rv) = rest.split_at_mut(kvd);
                    rq.copy_from_slice(dq);
                    rk.copy_from_slice(dk);
                    rv.copy_from_slice(dv);
                });
            // q's heads then k's: adjacent in every row
            rotate(rows, ld, (nh + nkv, hs), (&cos, &sin), true);
        });
}
