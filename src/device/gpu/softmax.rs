//! `kernels/softmax.cu`: softmax_fwd_<f32|bf16> / softmax_bwd_<f32|bf16>, one block of 256 per
//! row, grid min(N, 65535). Every argument is T (arithmetic in f32).

use super::cross_entropy::{row_grid, ROW_NT};
use super::{check_len, check_pos, dim1, int, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::Result;

/// out[N,V] = softmax(x) (both T)
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    x: impl Into<In<'a, T>>,
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "softmax_fwd";
    let (out, x) = (out.into(), x.into());
    check_pos(OP, "V", v)?;
    check_len(OP, "out [N,V]", out.len(), &[n, v])?;
    check_len(OP, "x [N,V]", x.len(), &[n, v])?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.output(out)
        .input(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "V", v)?);
    l.launch(&sym::<T>(OP), dim1(row_grid(n)), dim1(ROW_NT), 0, &mut a)
}

/// dx[N,V] = out * (dout - sum(dout * out)) (all T)
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dx: impl Into<Out<'a, T>>,
    dout: impl Into<In<'a, T>>,
    out: impl Into<In<'a, T>>,
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "softmax_bwd";
    let (dx, dout, out) = (dx.into(), dout.into(), out.into());
    check_pos(OP, "V", v)?;
    check_len(OP, "dx [N,V]", dx.len(), &[n, v])?;
    check_len(OP, "dout [N,V]", dout.len(), &[n, v])?;
    check_len(OP, "out [N,V]", out.len(), &[n, v])?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.output(dx)
        .input(dout)
        .input(out)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "V", v)?);
    l.launch(&sym::<T>(OP), dim1(row_grid(n)), dim1(ROW_NT), 0, &mut a)
}
