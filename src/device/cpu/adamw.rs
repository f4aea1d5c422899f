//! The fused AdamW update over a window of the flat buffers, and the sum of squares behind the
//! global gradient norm.

use rayon::prelude::*;

use super::{real, Real, CHUNK};
use crate::device::AdamwStep;

/// One AdamW step, elementwise over p, g, m, v of equal lengths (p, m, v updated in place):
/// `g' = g * grad_scale; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;`
/// `p -= lr * (wd * p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps))`
///
/// The bias corrections are computed in f64. Parallel over chunks.
pub fn adamw<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], hp: &AdamwStep) {
    let step = i32::try_from(hp.step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
    let f = <T as Real>::from_f32;
    let (lr, b1, b2, eps, wd, gs) = (
        f(hp.lr),
        f(hp.beta1),
        f(hp.beta2),
        f(hp.eps),
        f(hp.weight_decay),
        f(hp.grad_scale),
    );
    let (inv_bc1, inv_bc2) = (real::<T>(1.0 / bc1), real::<T>(1.0 / bc2));
    let one = T::one();
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * gs;
                *m = b1 * *m + (one - b1) * g;
                *v = b2 * *v + (one - b2) * g * g;
                let update = (*m * inv_bc1) / ((*v * inv_bc2).sqrt() + eps);
                *p -= lr * (wd * *p + update);
            }
        });
}

/// `sum_i x_i^2`, accumulated in f64. Partial sums per chunk are added in chunk order, so the
/// result does not depend on the number of threads.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|x| {
            let mut acc = [0.0f64; 4];
            let chunks = x.chunks_exact(4);
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&v| v.to_f64() * v.to_f64())
                .sum();
            for c in chunks {
                for (s, &v) in acc.iter_mut().zip(c) {
                    *s += v.to_f64() * v.to_f64();
                }
            }
            acc.iter().sum::<f64>() + tail
        })
        .collect();
    partial.iter().sum()
}
