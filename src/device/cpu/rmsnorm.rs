//! RMSNorm (Llama): `x * rsqrt(mean(x^2) + eps) * w` over the channels of each row.

use rayon::prelude::*;

use super::{dot, real, Real};

/// Columns of dw per rayon task in the backward.
const COLS: usize = 64;

/// `rstd[N] = 1 / sqrt(mean_c(x^2) + eps)`; `out[N,C] = x * rstd * w[C]`   (both `=`)
///
/// x [N,C], w [C]. Parallel over rows.
pub fn rmsnorm_fwd<T: Real>(out: &mut [T], rstd: &mut [T], x: &[T], w: &[T], c: usize, eps: f32) {
    if c == 0 {
        return;
    }
    let (eps, inv_c) = (<T as Real>::from_f32(eps), T::one() / real::<T>(c as f64));
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((out, rstd), x)| {
            let r = T::one() / (dot(x, x) * inv_c + eps).sqrt();
            *rstd = r;
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        });
}

/// `dx[N,C] = rstd * (w*dout) - x * rstd^3 * mean_c(w*dout*x)`   (`=`, or `+=` when
/// `accumulate`: the gradient of a residual stream that also reaches it past the norm);
/// `dw[C] += sum_n dout * x * rstd`   (`+=`)
///
/// dout, x [N,C], w [C], rstd [N] (from the forward). dx is parallel over rows; dw over blocks of
/// columns, each summing its columns over all rows in order and adding the sum to dw once
/// (deterministic, independent of the thread count).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    c: usize,
    accumulate: bool,
) {
    if c == 0 {
        return;
    }
    let inv_c = T::one() / real::<T>(c as f64);
    dx.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(x.par_chunks(c))
        .zip(rstd.par_iter())
        .for_each_init(
            || vec![T::zero(); c],
            |wg, (((dx, dout), x), &r)| {
                // wg = w * dout, one row
                for ((t, &g), &w) in wg.iter_mut().zip(dout).zip(w) {
                    *t = g * w;
                }
                let k = r * r * r * dot(wg, x) * inv_c;
                for ((d, &t), &x) in dx.iter_mut().zip(wg.iter()).zip(x) {
                    let g = r * t - x * k;
                    *d = if accumulate { *d + g } else { g };
                }
            },
        );
    dw.par_chunks_mut(COLS).enumerate().for_each(|(blk, dw)| {
        let j0 = blk * COLS;
        let mut acc = [T::zero(); COLS];
        for ((dout, x), &r) in dout.chunks_exact(c).zip(x.chunks_exact(c)).zip(rstd) {
            for ((a, &g), &x) in acc.iter_mut().zip(&dout[j0..]).zip(&x[j0..]) {
                *a += g * x * r;
            }
        }
        for (d, a) in dw.iter_mut().zip(acc) {
            *d += a;
        }
    });
}
