//! `kernels/rope.cu`: rope_fwd_<f32|bf16> / rope_bwd_<f32|bf16> in place on x[B,T,H,HS] (T;
//! rotation in f32): grid B*T, block 32 * ceil(H * HS / 2 / 32) capped at 256 (no pack).

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::{Error, Result};

/// `bwd`: the transpose rotation (rope_bwd); else rope_fwd. x: T, in place.
#[allow(clippy::too_many_arguments)]
pub fn rope<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    x: impl Into<Out<'a, T>>,
    dims: [usize; 4],
    pos0: usize,
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
    int(op, "pos0 + T", pos0 + t)?;
    let grid = grid_dim(op, "x", b * t, i32::MAX as usize)?;
    let block = (32 * (h * hs / 2).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    a.output(x);
    a.scalar(int(op, "B", b)?)
        .scalar(int(op, "T", t)?)
        .scalar(int(op, "H", h)?)
        .scalar(int(op, "HS", hs)?);
    a.scalar(pos0 as i32).scalar(theta);
    l.launch(&sym::<T>(op), dim1(grid), dim1(block), 0, &mut a)
}
