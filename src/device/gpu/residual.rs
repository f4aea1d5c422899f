//! `kernels/residual.cu`: residual_fwd_f32 / residual_bwd_f32, elementwise (block 256, grid
//! ceil(n / (256 * pack)), n as a 64-bit count).

use super::{check_same, dim1, elementwise_grid, EmuArgs, Launch};
use crate::Result;

/// out = a + b
pub fn fwd<L: Launch + ?Sized>(l: &L, out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    const OP: &str = "residual_fwd";
    let n = out.len();
    check_same(OP, "a", a.len(), n)?;
    check_same(OP, "b", b.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut args = EmuArgs::new();
    args.ptr_mut(out).ptr(a).ptr(b).scalar(n as i64);
    l.launch("residual_fwd_f32", dim1(grid), dim1(256), 0, &mut args)
}

/// da += dout
pub fn bwd<L: Launch + ?Sized>(l: &L, da: &mut [f32], dout: &[f32]) -> Result<()> {
    const OP: &str = "residual_bwd";
    let n = da.len();
    check_same(OP, "dout", dout.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut args = EmuArgs::new();
    args.ptr_mut(da).ptr(dout).scalar(n as i64);
    l.launch("residual_bwd_f32", dim1(grid), dim1(256), 0, &mut args)
}
