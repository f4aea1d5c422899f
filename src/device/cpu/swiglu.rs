//! SwiGLU gating of the Llama MLP: `silu(gate) * up`, elementwise.

use rayon::prelude::*;

use super::{Real, CHUNK};

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).vexp())
}

/// `out[N*F] = silu(gate) * up`, silu(g) = g * sigmoid(g)   (`=`)
///
/// gu = [gate; up], twice out's length (any length N*F). Parallel over chunks.
pub fn swiglu_fwd<T: Real>(out: &mut [T], gu: &[T]) {
    debug_assert_eq!(gu.len(), 2 * out.len(), "gu = [gate; up]");
    let (gate, up) = gu.split_at(out.len());
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
/// dgu = [dgate; dup] and gu = [gate; up], twice dout's length (N*F). Parallel over chunks.
pub fn swiglu_bwd<T: Real>(dgu: &mut [T], dout: &[T], gu: &[T]) {
    debug_assert_eq!(dgu.len(), 2 * dout.len(), "dgu = [dgate; dup]");
    debug_assert_eq!(gu.len(), 2 * dout.len(), "gu = [gate; up]");
    let (dgate, dup) = dgu.split_at_mut(dout.len());
    let (gate, up) = gu.split_at(dout.len());
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
