//! `kernels/residual.cu`: residual_fwd_<f32|bf16> / residual_bwd_<f32|bf16>, elementwise (block
//! 256, grid ceil(n / (256 * pack)), pack = `T::PACK` (4 f32 / 8 bf16), n as a 64-bit count).
//! Every argument is T.

use super::{check_same, dim1, elementwise_grid, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::Result;

/// out = a + b (all T; the sum formed in f32, rounded once)
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    a: impl Into<In<'a, T>>,
    b: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "residual_fwd";
    let (out, a, b) = (out.into(), a.into(), b.into());
    let n = out.len();
    check_same(OP, "a", a.len(), n)?;
    check_same(OP, "b", b.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut args = EmuArgs::new();
    args.output(out).input(a).input(b).scalar(n as i64);
    l.launch(
        &sym::<T>("residual_fwd"),
        dim1(grid),
        dim1(256),
        0,
        &mut args,
    )
}

/// da += dout (both T)
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    da: impl Into<Out<'a, T>>,
    dout: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "residual_bwd";
    let (da, dout) = (da.into(), dout.into());
    let n = da.len();
    check_same(OP, "dout", dout.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut args = EmuArgs::new();
    args.output(da).input(dout).scalar(n as i64);
    l.launch(
        &sym::<T>("residual_bwd"),
        dim1(grid),
        dim1(256),
        0,
        &mut args,
    )
}
