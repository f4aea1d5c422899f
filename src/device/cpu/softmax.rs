//! Row softmax and its backward.

use rayon::prelude::*;

use super::{dot, max, real, sum_f64, Real};

/// `out[N,V] = softmax(x[n,:])`   (`=`)
///
/// Max-subtracted; the sum of exponentials is accumulated in f64. Parallel over rows.
pub fn softmax_fwd<T: Real>(out: &mut [T], x: &[T], v: usize) {
    if v == 0 {
        return;
    }
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .for_each(|(out, x)| {
            let m = max(x);
            for (o, &x) in out.iter_mut().zip(x) {
                *o = (x - m).vexp();
            }
            let inv = real::<T>(1.0 / sum_f64(out));
            for o in out.iter_mut() {
                *o *= inv;
            }
        });
}

/// `dx[N,V] = out * (dout - sum_v(dout * out))`   (`=`)
///
/// dout, out [N,V] (out from the forward). Parallel over rows.
pub fn softmax_bwd<T: Real>(dx: &mut [T], dout: &[T], out: &[T], v: usize) {
    if v == 0 {
        return;
    }
    dx.par_chunks_mut(v)
        .zip(dout.par_chunks(v))
        .zip(out.par_chunks(v))
        .for_each(|((dx, dout), out)| {
            let s = dot(dout, out);
            for ((d, &g), &o) in dx.iter_mut().zip(dout).zip(out) {
                *d = o * (g - s);
            }
        });
}
