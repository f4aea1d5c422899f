//! SwiGLU gating of the Llama MLP: `silu(gate) * up`, elementwise.

use rayon::prelude::*;

use super::{Real, CHUNK};

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).vexp())
}

/// `out[N*F] = silu(gate) * up`, silu(g) = g * sigmoid(g)   (`=`)
///
/// gate, up, out: any equal lengths (N*F). Parallel over chunks.
pub fn swiglu_fwd<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((out, gate), up)| {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// `dgate = dout * up * silu'(gate)`, silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g);
/// `dup = dout * silu(gate)`   (both `=`)
///
/// All five of equal length (N*F). Parallel over chunks.
pub fn swiglu_bwd<T: Real>(dgate: &mut [T], dup: &mut [T], dout: &[T], gate: &[T], up: &[T]) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((((dgate, dup), dout), gate), up)| {
            let rows = dgate
                .iter_mut()
                .zip(dup.iter_mut())
                .zip(dout)
                .zip(gate)
                .zip(up);
            for ((((dg, du), &d), &g), &u) in rows {
                let s = sigmoid(g);
                *dg = d * u * s * (T::one() + g * (T::one() - s));
                *du = d * g * s;
            }
        });
}
