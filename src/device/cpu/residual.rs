//! The residual add and its gradient.

use rayon::prelude::*;

use super::{Real, CHUNK};

/// `out = a + b`   (`=`), elementwise over equal lengths (e.g. [N,C]). Parallel over chunks.
pub fn residual_fwd<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((out, a), b)| {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// `da += dout`   (`+=`): the gradient reaching each input of an add. Parallel over chunks.
pub fn residual_bwd<T: Real>(da: &mut [T], dout: &[T]) {
    da.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK))
        .for_each(|(da, dout)| {
            for (d, &g) in da.iter_mut().zip(dout) {
                *d += g;
            }
        });
}
