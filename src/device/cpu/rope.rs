//! Rotary position embedding, HF "rotate_half" convention, in place.

use rayon::prelude::*;

use super::{real, Real};

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
/// row's position's angles; `inverse` rotates by minus the angles (the transpose, used by the
/// backward).
#[allow(clippy::too_many_arguments)]
fn rotate<T: Real>(
    x: &mut [T],
    ld: usize,
    t: usize,
    h: usize,
    hs: usize,
    pos0: usize,
    theta: f32,
    inverse: bool,
) {
    let half = hs / 2;
    if x.is_empty() || t == 0 || h == 0 || half == 0 {
        return;
    }
    let (cos, sin) = tables::<T>(t, hs, pos0, theta);
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
    rotate(x, h * hs, t, h, hs, pos0, theta, false);
}

/// In place on dx [B,T,H,HS]   (`=`): the transpose rotation (angle -> -angle):
/// `(d_i, d_{i+HS/2}) <- (d_i cos + d_{i+HS/2} sin, d_{i+HS/2} cos - d_i sin)`.
pub fn rope_bwd<T: Real>(dx: &mut [T], t: usize, h: usize, hs: usize, pos0: usize, theta: f32) {
    rotate(dx, h * hs, t, h, hs, pos0, theta, true);
}

/// q [B,T,NH*HS], k and v [B,T,NKV*HS] = the parts of each row of qkv [B,T,(NH+2NKV)*HS],
/// q and k then rotated as [`rope_fwd`]   (all `=`)
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_fwd<T: Real>(
    q: &mut [T],
    k: &mut [T],
    v: &mut [T],
    qkv: &[T],
    t: usize,
    (nh, nkv, hs): (usize, usize, usize),
    pos0: usize,
    theta: f32,
) {
    let (qd, kvd) = (nh * hs, nkv * hs);
    debug_assert_eq!(qkv.len() * qd, q.len() * (qd + 2 * kvd), "qkv [B,T,QKV]");
    if qd == 0 || kvd == 0 {
        return;
    }
    q.par_chunks_mut(qd)
        .zip(k.par_chunks_mut(kvd))
        .zip(v.par_chunks_mut(kvd))
        .zip(qkv.par_chunks(qd + 2 * kvd))
        .for_each(|(((q, k), v), row)| {
            let (rq, rest) = row.split_at(qd);
            let (rk, rv) = rest.split_at(kvd);
            q.copy_from_slice(rq);
            k.copy_from_slice(rk);
            v.copy_from_slice(rv);
        });
    rotate(q, qd, t, nh, hs, pos0, theta, false);
    rotate(k, kvd, t, nkv, hs, pos0, theta, false);
}

/// dqkv [B,T,(NH+2NKV)*HS] = each row's dq, dk, dv, dq's and dk's parts rotated back as
/// [`rope_bwd`]   (`=`)
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_bwd<T: Real>(
    dqkv: &mut [T],
    dq: &[T],
    dk: &[T],
    dv: &[T],
    t: usize,
    (nh, nkv, hs): (usize, usize, usize),
    pos0: usize,
    theta: f32,
) {
    let (qd, kvd) = (nh * hs, nkv * hs);
    debug_assert_eq!(dqkv.len() * qd, dq.len() * (qd + 2 * kvd), "dqkv [B,T,QKV]");
    if qd == 0 || kvd == 0 {
        return;
    }
    dqkv.par_chunks_mut(qd + 2 * kvd)
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
    rotate(dqkv, qd + 2 * kvd, t, nh + nkv, hs, pos0, theta, true);
}
