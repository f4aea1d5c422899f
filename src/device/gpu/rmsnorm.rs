//! `kernels/rmsnorm.cu`: rmsnorm_fwd_<f32|bf16> (grid N, block 32 * ceil(C / pack / 32) capped
//! at 1024, pack = `T::PACK` (4 f32 / 8 bf16) when C is a multiple of it, else 1) and
//! rmsnorm_bwd_<f32|bf16> (grid min(N, 2 * SMs), block 256, C * 4 bytes of dynamic shared memory
//! for the block's f32 dw partial, atomics into dw). x, out, w, dout, dx are T; rstd and dw f32
//! in both dtypes.

use super::{
    check_len, check_pos, dim1, grid_dim, int, pack_block, EmuArgs, In, Launch, Out, SMEM_MAX,
};
use crate::device::storage::{sym, Storage};
use crate::{Error, Result};

/// rstd[N] = 1/sqrt(mean_c(x^2) + eps); out[N,C] = x * rstd * w[C]. out, x, w: T; rstd: f32.
#[allow(clippy::too_many_arguments)]
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    rstd: impl Into<Out<'a, f32>>,
    x: impl Into<In<'a, T>>,
    w: impl Into<In<'a, T>>,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_fwd";
    let (out, rstd, x, w) = (out.into(), rstd.into(), x.into(), w.into());
    check_pos(OP, "C", c)?;
    check_len(OP, "out [N,C]", out.len(), &[n, c])?;
    check_len(OP, "rstd [N]", rstd.len(), &[n])?;
    check_len(OP, "x [N,C]", x.len(), &[n, c])?;
    check_len(OP, "w [C]", w.len(), &[c])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("eps = {eps} must be finite and >= 0"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(out).output(rstd).input(x).input(w);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(eps);
    l.launch(
        &sym::<T>("rmsnorm_fwd"),
        dim1(grid),
        dim1(pack_block(c, T::PACK, 1024)),
        0,
        &mut a,
    )
}

/// dx[N,C] = (or += with `accumulate`), dw[C] += (see `Device::rmsnorm_bwd`). dx, dout, x, w:
/// T; dw, rstd: f32.
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dx: impl Into<Out<'a, T>>,
    dw: impl Into<Out<'a, f32>>,
    dout: impl Into<In<'a, T>>,
    x: impl Into<In<'a, T>>,
    w: impl Into<In<'a, T>>,
    rstd: impl Into<In<'a, f32>>,
    n: usize,
    c: usize,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "rmsnorm_bwd";
    let (dx, dw, dout) = (dx.into(), dw.into(), dout.into());
    let (x, w, rstd) = (x.into(), w.into(), rstd.into());
    check_pos(OP, "C", c)?;
    check_len(OP, "dx [N,C]", dx.len(), &[n, c])?;
    check_len(OP, "dw [C]", dw.len(), &[c])?;
    check_len(OP, "dout [N,C]", dout.len(), &[n, c])?;
    check_len(OP, "x [N,C]", x.len(), &[n, c])?;
    check_len(OP, "w [C]", w.len(), &[c])?;
    check_len(OP, "rstd [N]", rstd.len(), &[n])?;
    let smem = c * 4;
    if smem > SMEM_MAX {
        return Err(Error::invalid(
            OP,
            format!("C = {c} needs {smem} bytes of shared memory"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let grid = n.min(2 * l.sms()) as u32;
    let mut a = EmuArgs::new();
    a.output(dx)
        .output(dw)
        .input(dout)
        .input(x)
        .input(w)
        .input(rstd);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(accumulate as i32);
    l.launch(
        &sym::<T>("rmsnorm_bwd"),
        dim1(grid),
        dim1(256),
        smem,
        &mut a,
    )
}
