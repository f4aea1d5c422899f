//! `kernels/norm_scale.cu`: norm_scale_fwd_f32 / norm_scale_bwd_f32, grid N, block 256.

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, Launch};
use crate::{Error, Result};

fn check(op: &'static str, n: usize, d: usize, s: f32, lens: [(&str, usize); 3]) -> Result<()> {
    check_pos(op, "D", d)?;
    for (what, len) in lens {
        if !what.is_empty() {
            check_len(op, what, len, &[n, d])?;
        }
    }
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::invalid(
            op,
            format!("s = {s} must be finite and > 0"),
        ));
    }
    Ok(())
}

/// y[N,D] = x * s / max(||x_n||, 1e-12)
pub fn fwd<L: Launch + ?Sized>(
    l: &L,
    y: &mut [f32],
    x: &[f32],
    n: usize,
    d: usize,
    s: f32,
) -> Result<()> {
    const OP: &str = "norm_scale_fwd";
    check(
        OP,
        n,
        d,
        s,
        [("y [N,D]", y.len()), ("x [N,D]", x.len()), ("", 0)],
    )?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(y)
        .ptr(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "D", d)?)
        .scalar(s);
    l.launch("norm_scale_fwd_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// dx[N,D] from dy and the forward's input x.
#[allow(clippy::too_many_arguments)]
pub fn bwd<L: Launch + ?Sized>(
    l: &L,
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    n: usize,
    d: usize,
    s: f32,
) -> Result<()> {
    const OP: &str = "norm_scale_bwd";
    check(
        OP,
        n,
        d,
        s,
        [
            ("dx [N,D]", dx.len()),
            ("dy [N,D]", dy.len()),
            ("x [N,D]", x.len()),
        ],
    )?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(dx)
        .ptr(dy)
        .ptr(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "D", d)?)
        .scalar(s);
    l.launch("norm_scale_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
