//! Fixed-norm rescale of rows: `n_s(x) = x * s / max(||x||_2, 1e-12)`.

use rayon::prelude::*;

use super::{dot, real, Real};

/// The clamp on the norm (as `F.normalize`): rows shorter than this are scaled by `s / 1e-12`.
pub const NORM_EPS: f64 = 1e-12;

/// `y[N,D] = x * s / max(||x_n||, 1e-12)`   (`=`)
///
/// x [N,D]. The norm is a lane-parallel sum of squares in `T` (f32 in the engine, as the
/// reference systems take it), then a square root. Parallel over rows.
pub fn norm_scale_fwd<T: Real>(y: &mut [T], x: &[T], d: usize, s: f32) {
    if d == 0 {
        return;
    }
    let (s, eps) = (<T as Real>::from_f32(s), real::<T>(NORM_EPS));
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let k = s / dot(x, x).sqrt().max(eps);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * k;
        }
    });
}

/// `dx[N,D] = (s / ||x||) * (dy - x_hat (x_hat . dy))` with `x_hat = x / ||x||` where
/// `||x|| >= 1e-12`; `dx = (s / 1e-12) * dy` where the clamp is active   (`=`)
///
/// dy, x [N,D] (x: the forward's input). Parallel over rows.
pub fn norm_scale_bwd<T: Real>(dx: &mut [T], dy: &[T], x: &[T], d: usize, s: f32) {
    if d == 0 {
        return;
    }
    let (s, eps) = (<T as Real>::from_f32(s), real::<T>(NORM_EPS));
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d))
        .zip(x.par_chunks(d))
        .for_each(|((dx, dy), x)| {
            let norm = dot(x, x).sqrt();
            if norm < eps {
                let k = s / eps;
                for (dx, &g) in dx.iter_mut().zip(dy) {
                    *dx = g * k;
                }
                return;
            }
            let inv = T::one() / norm;
            // x_hat . dy = (x . dy) / ||x||; dx = (s/||x||) (dy - x (x . dy) / ||x||^2)
            let proj = dot(x, dy) * inv * inv;
            let k = s * inv;
            for ((dx, &g), &x) in dx.iter_mut().zip(dy).zip(x) {
                *dx = k * (g - x * proj);
            }
        });
}
