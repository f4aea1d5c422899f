//! `kernels/swiglu.cu`: swiglu_fwd_f32 / swiglu_bwd_f32, elementwise (block 256, grid
//! ceil(n / (256 * pack)), n as a 64-bit count).

use super::{check_same, dim1, elementwise_grid, EmuArgs, In, Launch, Out};
use crate::Result;

/// out = silu(gate) * up
pub fn fwd<'a, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, f32>>,
    gate: impl Into<In<'a, f32>>,
    up: impl Into<In<'a, f32>>,
) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    let (out, gate, up) = (out.into(), gate.into(), up.into());
    let n = out.len();
    check_same(OP, "gate", gate.len(), n)?;
    check_same(OP, "up", up.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n)?;
    let mut a = EmuArgs::new();
    a.output(out).input(gate).input(up).scalar(n as i64);
    l.launch("swiglu_fwd_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// dgate = dout * up * silu'(gate); dup = dout * silu(gate)
pub fn bwd<'a, L: Launch + ?Sized>(
    l: &L,
    dgate: impl Into<Out<'a, f32>>,
    dup: impl Into<Out<'a, f32>>,
    dout: impl Into<In<'a, f32>>,
    gate: impl Into<In<'a, f32>>,
    up: impl Into<In<'a, f32>>,
) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    let (dgate, dup, dout) = (dgate.into(), dup.into(), dout.into());
    let (gate, up) = (gate.into(), up.into());
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
    a.output(dgate)
        .output(dup)
        .input(dout)
        .input(gate)
        .input(up)
        .scalar(n as i64);
    l.launch("swiglu_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
