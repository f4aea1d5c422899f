//! `kernels/rope.cu`: rope_fwd_<f32|bf16> / rope_bwd_<f32|bf16> in place on x[B,T,H,HS] (T;
//! rotation in f32): grid B*T, block 32 * ceil(H * HS / 2 / 32) capped at 256 (no pack). The
//! position of row 0 is `pos0`, or the device word `pos` where given (the kernel reads it and
//! gets 0 for `pos0`, so the launch is the same at every position).
//! qkv_rope_fwd_<f32|bf16> / qkv_rope_bwd_<f32|bf16>: q [B,TQ,NH*HS], and k and v at positions
//! pos0.. of [B,TMAX,NKV*HS] (a KV cache, or TMAX = TQ), from the fused projection's qkv
//! [B,TQ,(NH+2NKV)*HS] with q and k rotated (and back), launched as rope with NH + NKV heads.

use super::{
    check_len, check_pos, check_positions, dim1, grid_dim, int, EmuArgs, Ids, In, Launch, Out,
};
use crate::device::storage::{sym, Storage};
use crate::device::CacheDims;
use crate::{Error, Result};

/// HS even, > 0 and within the kernel's table (512), theta finite and > 0.
fn check_rotation(op: &'static str, hs: usize, theta: f32) -> Result<()> {
    if hs == 0 || !hs.is_multiple_of(2) || hs > 512 {
        return Err(Error::invalid(
            op,
            format!("HS = {hs} must be even, > 0 and <= 512"),
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(
            op,
            format!("theta = {theta} must be finite and > 0"),
        ));
    }
    Ok(())
}

/// Where `pos` is given it holds one id whose positions fit an i32; else pos0 + T does.
fn check_position(op: &'static str, pos: Option<Ids<'_>>, pos0: usize, t: usize) -> Result<()> {
    match pos {
        Some(p) => {
            check_len(op, "pos", p.len(), &[1])?;
            p.check(op, "pos", i32::MAX as usize - t)
        }
        None => int(op, "pos0 + T", pos0 + t).map(|_| ()),
    }
}

/// `bwd`: the transpose rotation (rope_bwd); else rope_fwd. x: T, in place. `pos`: one id, the
/// position of row 0 read on the device instead of `pos0` (below `i32::MAX - T`).
#[allow(clippy::too_many_arguments)]
pub fn rope<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    x: impl Into<Out<'a, T>>,
    dims: [usize; 4],
    pos0: usize,
    pos: Option<Ids<'a>>,
    theta: f32,
    bwd: bool,
) -> Result<()> {
    let x = x.into();
    let op = if bwd { "rope_bwd" } else { "rope_fwd" };
    let [b, t, h, hs] = dims;
    check_pos(op, "H", h)?;
    check_rotation(op, hs, theta)?;
    check_len(op, "x [B,T,H,HS]", x.len(), &dims)?;
    if b * t == 0 {
        return Ok(());
    }
    check_position(op, pos, pos0, t)?;
    let grid = grid_dim(op, "x", b * t, i32::MAX as usize)?;
    let block = (32 * (h * hs / 2).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    a.output(x);
    let dims = [("B", b), ("T", t), ("H", h), ("HS", hs)];
    position_args(&mut a, op, &dims, pos0, pos, theta)?;
    l.launch(&sym::<T>(op), dim1(grid), dim1(block), 0, &mut a)
}

/// pos (or null), then the named dims as i32 scalars, pos0 (0 where `pos` is given) and theta.
fn position_args<'a>(
    a: &mut EmuArgs<'a>,
    op: &'static str,
    dims: &[(&str, usize)],
    pos0: usize,
    pos: Option<Ids<'a>>,
    theta: f32,
) -> Result<()> {
    match pos {
        Some(p) => a.ids(p),
        None => a.null::<u32>(),
    };
    for &(name, x) in dims {
        a.scalar(int(op, name, x)?);
    }
    a.scalar(if pos.is_some() { 0 } else { pos0 as i32 })
        .scalar(theta);
    Ok(())
}

/// The dims of a qkv_rope launch, named.
fn qkv_dims(d: CacheDims) -> [(&'static str, usize); 6] {
    [
        ("B", d.b),
        ("TQ", d.tq),
        ("TMAX", d.tmax),
        ("NH", d.nh),
        ("NKV", d.nkv),
        ("HS", d.hs),
    ]
}

/// Checks of both directions: q [B,TQ,NH*HS], k and v [B,TMAX,NKV*HS], qkv
/// [B,TQ,(NH+2NKV)*HS], the TQ positions from pos0 (or `pos`) within TMAX; returns the
/// launch's grid and block, None when there are no rows.
fn qkv_launch(
    op: &'static str,
    (lens, names): ([usize; 4], [&str; 4]),
    d: CacheDims,
    pos: Option<Ids<'_>>,
    theta: f32,
) -> Result<Option<(u32, u32)>> {
    let CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
    } = d;
    check_pos(op, "NH", nh)?;
    check_pos(op, "NKV", nkv)?;
    check_rotation(op, hs, theta)?;
    let want = [
        [b, tq, nh, hs],
        [b, tmax, nkv, hs],
        [b, tmax, nkv, hs],
        [b, tq, nh + 2 * nkv, hs],
    ];
    for ((len, name), dims) in lens.into_iter().zip(names).zip(&want) {
        check_len(op, name, len, dims)?;
    }
    check_positions(op, pos, pos0, tq, tmax)?;
    if b * tq == 0 {
        return Ok(None);
    }
    let grid = grid_dim(op, "qkv", b * tq, i32::MAX as usize)?;
    let block = (32 * ((nh + nkv) * hs / 2).div_ceil(32)).min(256) as u32;
    Ok(Some((grid, block)))
}

/// q and, at positions pos0.. of k and v, the q, k, v parts of qkv, q and k rotated
/// (qkv_rope_fwd, all T). `pos`: one id, pos0 read on the device instead of `d.pos0` (the
/// launch is then the same at every position).
#[allow(clippy::too_many_arguments)]
pub fn qkv_fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    q: impl Into<Out<'a, T>>,
    k: impl Into<Out<'a, T>>,
    v: impl Into<Out<'a, T>>,
    qkv: impl Into<In<'a, T>>,
    pos: Option<Ids<'a>>,
    d: CacheDims,
    theta: f32,
) -> Result<()> {
    const OP: &str = "qkv_rope_fwd";
    let (q, k, v, qkv) = (q.into(), k.into(), v.into(), qkv.into());
    let lens = [q.len(), k.len(), v.len(), qkv.len()];
    let names = [
        "q [B,TQ,NH,HS]",
        "k [B,TMAX,NKV,HS]",
        "v [B,TMAX,NKV,HS]",
        "qkv",
    ];
    let Some((grid, block)) = qkv_launch(OP, (lens, names), d, pos, theta)? else {
        return Ok(());
    };
    let mut a = EmuArgs::new();
    a.output(q).output(k).output(v).input(qkv);
    position_args(&mut a, OP, &qkv_dims(d), d.pos0, pos, theta)?;
    l.launch(&sym::<T>(OP), dim1(grid), dim1(block), 0, &mut a)
}

/// dqkv = [rope_bwd(dq) | rope_bwd(dk) | dv] row by row, dk and dv read at positions pos0..
/// (qkv_rope_bwd, all T).
pub fn qkv_bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dqkv: impl Into<Out<'a, T>>,
    dq: impl Into<In<'a, T>>,
    dk: impl Into<In<'a, T>>,
    dv: impl Into<In<'a, T>>,
    d: CacheDims,
    theta: f32,
) -> Result<()> {
    const OP: &str = "qkv_rope_bwd";
    let (dqkv, dq, dk, dv) = (dqkv.into(), dq.into(), dk.into(), dv.into());
    let lens = [dq.len(), dk.len(), dv.len(), dqkv.len()];
    let names = [
        "dq [B,TQ,NH,HS]",
        "dk [B,TMAX,NKV,HS]",
        "dv [B,TMAX,NKV,HS]",
        "dqkv",
    ];
    let Some((grid, block)) = qkv_launch(OP, (lens, names), d, None, theta)? else {
        return Ok(());
    };
    let mut a = EmuArgs::new();
    a.output(dqkv).input(dq).input(dk).input(dv);
    position_args(&mut a, OP, &qkv_dims(d), d.pos0, None, theta)?;
    l.launch(&sym::<T>(OP), dim1(grid), dim1(block), 0, &mut a)
}
