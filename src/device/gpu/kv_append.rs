//! `kernels/kv_append.cu`: kv_append_fwd_<f32|bf16>, the new keys and values of a step into the
//! KV cache in one launch: one block per new row (grid B*TQ), block [`pack_block`] over the
//! row's D = NKV*HS elements in packs of `T::PACK` (4 f32 / 8 bf16). Every buffer is T.

use super::{
    check_len, check_pos, check_positions, dim1, grid_dim, int, pack_block, EmuArgs, Ids, In,
    Launch, Out,
};
use crate::device::storage::{sym, Storage};
use crate::device::CacheDims;
use crate::Result;

/// kcache[b, pos0 + t] = k[b, t], vcache[b, pos0 + t] = v[b, t]: k, v [B,TQ,NKV,HS], caches
/// [B,TMAX,NKV,HS] (`d.nh` is not used). `pos`: one id, pos0 read on the device instead of
/// `d.pos0` (the launch is then the same at every position).
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    kcache: impl Into<Out<'a, T>>,
    vcache: impl Into<Out<'a, T>>,
    k: impl Into<In<'a, T>>,
    v: impl Into<In<'a, T>>,
    pos: Option<Ids<'a>>,
    d: CacheDims,
) -> Result<()> {
    const OP: &str = "kv_append_fwd";
    let (kcache, vcache, k, v) = (kcache.into(), vcache.into(), k.into(), v.into());
    let CacheDims {
        b,
        tq,
        tmax,
        nkv,
        hs,
        pos0,
        ..
    } = d;
    check_pos(OP, "NKV", nkv)?;
    check_pos(OP, "HS", hs)?;
    check_positions(OP, pos, pos0, tq, tmax)?;
    let dim = [b, tmax, nkv, hs];
    check_len(OP, "kcache [B,TMAX,NKV,HS]", kcache.len(), &dim)?;
    check_len(OP, "vcache [B,TMAX,NKV,HS]", vcache.len(), &dim)?;
    check_len(OP, "k [B,TQ,NKV,HS]", k.len(), &[b, tq, nkv, hs])?;
    check_len(OP, "v [B,TQ,NKV,HS]", v.len(), &[b, tq, nkv, hs])?;
    let (rows, dim) = (b * tq, nkv * hs);
    if rows == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x (B*TQ)", rows, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(kcache).output(vcache).input(k).input(v);
    match pos {
        Some(p) => a.ids(p),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { pos0 };
    for (what, x) in [
        ("B*TQ", rows),
        ("TQ", tq),
        ("TMAX", tmax),
        ("NKV*HS", dim),
        ("pos0", pos0),
    ] {
        a.scalar(int(OP, what, x)?);
    }
    let block = pack_block(dim, T::PACK, 256);
    l.launch(
        &sym::<T>("kv_append_fwd"),
        dim1(grid),
        dim1(block),
        0,
        &mut a,
    )
}
