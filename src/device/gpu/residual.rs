//! `kernels/residual.cu`: residual_fwd_f32 / residual_bwd_f32, elementwise (block 256, grid
//! ceil(n / (256 * pack)), n as a 64-bit count).

use super::{check_same, dim1, elementwise_grid, EmuArgs, In, Launch, Out};
use crate::Result;

/// out = a + b
pub fn fwd<'a, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, f32>>,
    a: impl Into<In<'a, f32>>,
    b: impl Into<In<'a, f32>>,
) -> Result<()> {
    const OP: &str = "residual_fwd";
    let (out, a, b) = (out.into(), a.into(), b.into());
    let n = out.len();
    check_same(OP, "a", a.len(), n)?;
    check_same(OP, "b", b.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut args = EmuArgs::new();
    args.output(out).input(a).input(b).scalar(n as i64);
    l.launch("residual_fwd_f32", dim1(grid), dim1(256), 0, &mut args)
}

/// da += dout
pub fn bwd<'a, L: Launch + ?Sized>(
    l: &L,
    da: impl Into<Out<'a, f32>>,
    dout: impl Into<In<'a, f32>>,
) -> Result<()> {
    const OP: &str = "residual_bwd";
    let (da, dout) = (da.into(), dout.into());
    let n = da.len();
    check_same(OP, "dout", dout.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut args = EmuArgs::new();
    args.output(da).input(dout).scalar(n as i64);
    l.launch("residual_bwd_f32", dim1(grid), dim1(256), 0, &mut args)
}
