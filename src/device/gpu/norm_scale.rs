//! `kernels/norm_scale.cu`: norm_scale_fwd_f32 / norm_scale_bwd_f32, grid N, block 256.

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, In, Launch, Out};
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
pub fn fwd<'a, L: Launch + ?Sized>(
    l: &L,
    y: impl Into<Out<'a, f32>>,
    x: impl Into<In<'a, f32>>,
    n: usize,
    d: usize,
    s: f32,
) -> Result<()> {
    const OP: &str = "norm_scale_fwd";
    let (y, x) = (y.into(), x.into());
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
    a.output(y)
        .input(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "D", d)?)
        .scalar(s);
    l.launch("norm_scale_fwd_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// dx[N,D] from dy and the forward's input x.
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, L: Launch + ?Sized>(
    l: &L,
    dx: impl Into<Out<'a, f32>>,
    dy: impl Into<In<'a, f32>>,
    x: impl Into<In<'a, f32>>,
    n: usize,
    d: usize,
    s: f32,
) -> Result<()> {
    const OP: &str = "norm_scale_bwd";
    let (dx, dy, x) = (dx.into(), dy.into(), x.into());
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
    a.output(dx)
        .input(dy)
        .input(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "D", d)?)
        .scalar(s);
    l.launch("norm_scale_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
