//! `kernels/swiglu.cu`: swiglu_fwd_<f32|bf16> / swiglu_bwd_<f32|bf16>, elementwise (block 256,
//! grid ceil(n / (256 * pack)), pack = `T::PACK` (4 f32 / 8 bf16), n = out's length as a 64-bit
//! count; gu = [gate; up] and dgu = [dgate; dup] are 2n). Every argument is T (math in f32).

use super::{check_same, dim1, elementwise_grid, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::Result;

/// out = silu(gate) * up, gu = [gate; up] (all T; gu twice out's length)
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    gu: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    let (out, gu) = (out.into(), gu.into());
    let n = out.len();
    check_same(OP, "gu", gu.len(), 2 * n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut a = EmuArgs::new();
    a.output(out).input(gu).scalar(n as i64);
    l.launch(&sym::<T>("swiglu_fwd"), dim1(grid), dim1(256), 0, &mut a)
}

/// dgu = [dgate; dup]: dgate = dout * up * silu'(gate), dup = dout * silu(gate), gu = [gate; up]
/// (all T; gu and dgu twice dout's length)
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dgu: impl Into<Out<'a, T>>,
    dout: impl Into<In<'a, T>>,
    gu: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    let (dgu, dout, gu) = (dgu.into(), dout.into(), gu.into());
    let n = dout.len();
    check_same(OP, "dgu", dgu.len(), 2 * n)?;
    check_same(OP, "gu", gu.len(), 2 * n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = elementwise_grid(OP, n, T::PACK)?;
    let mut a = EmuArgs::new();
    a.output(dgu).input(dout).input(gu).scalar(n as i64);
    l.launch(&sym::<T>("swiglu_bwd"), dim1(grid), dim1(256), 0, &mut a)
}
