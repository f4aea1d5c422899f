//! `kernels/norm_scale.cu`: norm_scale_fwd_<f32|bf16> / norm_scale_bwd_<f32|bf16>, grid N, block
//! 256. Every array is T (math in f32).

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
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

/// y[N,D] = x * s / max(||x_n||, 1e-12) (y, x: T)
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    y: impl Into<Out<'a, T>>,
    x: impl Into<In<'a, T>>,
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
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), 0, &mut a)
}

/// dx[N,D] from dy and the forward's input x (all T).
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dx: impl Into<Out<'a, T>>,
    dy: impl Into<In<'a, T>>,
    x: impl Into<In<'a, T>>,
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
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), 0, &mut a)
}
