//! `kernels/rope.cu`: rope_fwd_<f32|bf16> / rope_bwd_<f32|bf16> in place on x[B,T,H,HS] (T;
//! rotation in f32): grid B*T, block 32 * ceil(H * HS / 2 / 32) capped at 256 (no pack). The
//! position of row 0 is `pos0`, or the device word `pos` where given (the kernel reads it and
//! gets 0 for `pos0`, so the launch is the same at every position).

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, Ids, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::{Error, Result};

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
    if hs == 0 || hs % 2 != 0 {
        return Err(Error::invalid(
            op,
            format!("HS = {hs} must be even and > 0"),
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(
            op,
            format!("theta = {theta} must be finite and > 0"),
        ));
    }
    check_len(op, "x [B,T,H,HS]", x.len(), &dims)?;
    if b * t == 0 {
        return Ok(());
    }
    if let Some(p) = pos {
        check_len(op, "pos", p.len(), &[1])?;
        p.check(op, "pos", i32::MAX as usize - t)?;
    } else {
        int(op, "pos0 + T", pos0 + t)?;
    }
    let grid = grid_dim(op, "x", b * t, i32::MAX as usize)?;
    let block = (32 * (h * hs / 2).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    a.output(x);
    match pos {
        Some(p) => a.ids(p),
        None => a.null::<u32>(),
    };
    a.scalar(int(op, "B", b)?)
        .scalar(int(op, "T", t)?)
        .scalar(int(op, "H", h)?)
        .scalar(int(op, "HS", hs)?);
    a.scalar(if pos.is_some() { 0 } else { pos0 as i32 })
        .scalar(theta);
    l.launch(&sym::<T>(op), dim1(grid), dim1(block), 0, &mut a)
}
