//! Causal grouped-query attention of new query rows against a KV cache (prefill and decode).
//!
//! Row b of the batch is left-padded: its keys start at cache position `starts[b]`. Query t
//! sits at absolute position p = pos0 + t and reads keys j in [starts[b], p]. RoPE is applied
//! with absolute positions, which leaves every score unchanged (scores depend on j - p only).

use rayon::prelude::*;

use super::{axpy, dot, max, real, scale, Real};
use crate::device::CacheDims;

/// `out[B,TQ,NH,HS] = softmax_j(q_t . k_j / sqrt(HS)) v_j` over j in [starts[b], pos0 + t]   (`=`)
///
/// kcache, vcache [B,TMAX,NKV,HS] (positions up to pos0 + TQ - 1 written); starts [B]. A query
/// before its row's start (left padding, at prefill) reads no key and gets 0.
/// Query head h reads KV head h / (NH/NKV). Parallel over query rows (b, t, h); each keeps
/// one row of scores.
pub fn decode_attention_fwd<T: Real>(
    out: &mut [T],
    q: &[T],
    kcache: &[T],
    vcache: &[T],
    starts: &[u32],
    d: CacheDims,
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
    if hs == 0 || nh == 0 || nkv == 0 {
        return;
    }
    let group = nh / nkv;
    let sc = T::one() / real::<T>(hs as f64).sqrt();
    out.par_chunks_mut(hs)
        .enumerate()
        .for_each_init(Vec::new, |s, (row, o)| {
            let (bi, t, h) = (row / (tq * nh), row / nh % tq, row % nh);
            let g = h / group;
            let (start, p) = (starts[bi] as usize, pos0 + t);
            if p < start {
                // a padding position: no key to read
                o.fill(T::zero());
                return;
            }
            let qr = &q[row * hs..(row + 1) * hs];
            let kv = |j: usize| ((bi * tmax + j) * nkv + g) * hs;
            s.clear();
            s.extend((start..=p).map(|j| dot(qr, &kcache[kv(j)..kv(j) + hs]) * sc));
            let m = max(s);
            for x in s.iter_mut() {
                *x = (*x - m).vexp();
            }
            o.fill(T::zero());
            let mut sum = T::zero();
            for (j, &w) in (start..=p).zip(s.iter()) {
                sum += w;
                axpy(o, w, &vcache[kv(j)..kv(j) + hs]);
            }
            scale(o, T::one() / sum);
        });
}
