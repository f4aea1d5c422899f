//! `kernels/swiglu.cu`: swiglu_fwd_<f32|bf16> / swiglu_bwd_<f32|bf16>, elementwise (block 256,
//! grid ceil(n / (256 * pack)), pack = `T::PACK` (4 f32 / 8 bf16), n as a 64-bit count). Every
//! argument is T (math in f32).

use super::{check_same, dim1, elementwise_grid, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::Result;

/// out = silu(gate) * up (all T)
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    gate: impl Into<In<'a, T>>,
    up: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    let (out, gate, up) = (out.into(), gate.into(), up.into());
    let n = out.len();
    check_same(OP, "gate", gate.len(), n)?;
    check_same(OP, "up", up.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut a = EmuArgs::new();
    a.output(out).input(gate).input(up).scalar(n as i64);
    l.launch(&sym::<T>("swiglu_fwd"), dim1(grid), dim1(256), 0, &mut a)
}

/// dgate = dout * up * silu'(gate); dup = dout * silu(gate) (all T)
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dgate: impl Into<Out<'a, T>>,
    dup: impl Into<Out<'a, T>>,
    dout: impl Into<In<'a, T>>,
    gate: impl Into<In<'a, T>>,
    up: impl Into<In<'a, T>>,
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
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut a = EmuArgs::new();
    a.output(dgate)
        .output(dup)
        .input(dout)
        .input(gate)
        .input(up)
        .scalar(n as i64);
    l.launch(&sym::<T>("swiglu_bwd"), dim1(grid), dim1(256), 0, &mut a)
}
