//! `kernels/softmax.cu`: softmax_fwd_f32 / softmax_bwd_f32, one block of 256 per row, grid
//! min(N, 65535).

use super::cross_entropy::{row_grid, ROW_NT};
use super::{check_len, check_pos, dim1, int, EmuArgs, Launch};
use crate::Result;

/// out[N,V] = softmax(x)
pub fn fwd<L: Launch + ?Sized>(
    l: &L,
    out: &mut [f32],
    x: &[f32],
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "softmax_fwd";
    check_pos(OP, "V", v)?;
    check_len(OP, "out [N,V]", out.len(), &[n, v])?;
    check_len(OP, "x [N,V]", x.len(), &[n, v])?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.ptr_mut(out)
        .ptr(x)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "V", v)?);
    l.launch(
        "softmax_fwd_f32",
        dim1(row_grid(n)),
        dim1(ROW_NT),
        0,
        &mut a,
    )
}

/// dx[N,V] = out * (dout - sum(dout * out))
pub fn bwd<L: Launch + ?Sized>(
    l: &L,
    dx: &mut [f32],
    dout: &[f32],
    out: &[f32],
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "softmax_bwd";
    check_pos(OP, "V", v)?;
    check_len(OP, "dx [N,V]", dx.len(), &[n, v])?;
    check_len(OP, "dout [N,V]", dout.len(), &[n, v])?;
    check_len(OP, "out [N,V]", out.len(), &[n, v])?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.ptr_mut(dx)
        .ptr(dout)
        .ptr(out)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "V", v)?);
    l.launch(
        "softmax_bwd_f32",
        dim1(row_grid(n)),
        dim1(ROW_NT),
        0,
        &mut a,
    )
}
