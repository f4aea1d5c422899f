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

/// Rotates every head vector of x [B,T,H,HS] in place by its position's angles; `inverse`
/// rotates by minus the angles (the transpose, used by the backward).
fn rotate<T: Real>(
    x: &mut [T],
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
    x.par_chunks_mut(h * hs).enumerate().for_each(|(bt, row)| {
        let ti = bt % t;
        let (cos, sin) = (
            &cos[ti * half..(ti + 1) * half],
            &sin[ti * half..(ti + 1) * half],
        );
        for head in row.chunks_exact_mut(hs) {
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
    rotate(x, t, h, hs, pos0, theta, false);
}

/// In place on dx [B,T,H,HS]   (`=`): the transpose rotation (angle -> -angle):
/// `(d_i, d_{i+HS/2}) <- (d_i cos + d_{i+HS/2} sin, d_{i+HS/2} cos - d_i sin)`.
pub fn rope_bwd<T: Real>(dx: &mut [T], t: usize, h: usize, hs: usize, pos0: usize, theta: f32) {
    rotate(dx, t, h, hs, pos0, theta, true);
}
