//! A step's new keys and values into the KV cache.

use crate::device::CacheDims;

/// `kcache[b, pos0 + t, :] = k[b, t, :]`, `vcache[b, pos0 + t, :] = v[b, t, :]`   (`=`)
///
/// k, v [B,TQ,NKV,HS]; kcache, vcache [B,TMAX,NKV,HS]; the other cache positions keep their
/// values. One row copy per (b, t).
pub fn kv_append_fwd<T: Copy>(kcache: &mut [T], vcache: &mut [T], k: &[T], v: &[T], d: CacheDims) {
    let CacheDims {
        tq,
        tmax,
        nkv,
        hs,
        pos0,
        ..
    } = d;
    let dim = nkv * hs;
    if dim == 0 {
        return;
    }
    for (r, (kr, vr)) in k.chunks_exact(dim).zip(v.chunks_exact(dim)).enumerate() {
        let (b, t) = (r / tq, r % tq);
        let dst = (b * tmax + pos0 + t) * dim;
        kcache[dst..dst + dim].copy_from_slice(kr);
        vcache[dst..dst + dim].copy_from_slice(vr);
    }
}
