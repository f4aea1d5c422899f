//! `kernels/swiglu.cu`: swiglu_fwd_f32 / swiglu_bwd_f32, elementwise (block 256, grid
//! ceil(n / (256 * pack)), n as a 64-bit count).

use super::{check_same, dim1, elementwise_grid, EmuArgs, Launch};
use crate::Result;

/// out = silu(gate) * up
pub fn fwd<L: Launch + ?Sized>(l: &L, out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    let n = out.len();
    check_same(OP, "gate", gate.len(), n)?;
    check_same(OP, "up", up.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(gate).ptr(up).scalar(n as i64);
    l.launch("swiglu_fwd_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// dgate = dout * up * silu'(gate); dup = dout * silu(gate)
pub fn bwd<L: Launch + ?Sized>(
    l: &L,
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    let n = dout.len();
    check_same(OP, "dgate", dgate.len(), n)?;
    check_same(OP, "dup", dup.len(), n)?;
    check_same(OP, "gate", gate.len(), n)?;
    check_same(OP, "up", up.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(dgate)
        .ptr_mut(dup)
        .ptr(dout)
        .ptr(gate)
        .ptr(up)
        .scalar(n as i64);
    l.launch("swiglu_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
