//! `kernels/pool.cu`: pool_fwd_<f32|bf16> (grid B, block 256, T * 4 bytes of dynamic shared
//! memory for `weighted`) and pool_bwd_<f32|bf16> (grid B, block 256, 3 * T * 4 bytes for
//! `weighted`; the shared values are f32 in both dtypes). `w` and `dw` are null pointers for the
//! other modes. h, dh, out, dout, w are the storage type; mask and dw f32 in both dtypes.

use super::{
    check_len, check_pos, check_same, dim1, grid_dim, int, EmuArgs, In, Launch, Out, SMEM_MAX,
};
use crate::device::cpu::pool::{check_padding_mask, check_weights};
use crate::device::storage::{sym, Storage};
use crate::device::PoolMode;
use crate::{Error, Result};

fn code(mode: PoolMode) -> i32 {
    match mode {
        PoolMode::Last => 0,
        PoolMode::Mean => 1,
        PoolMode::Max => 2,
        PoolMode::Weighted => 3,
    }
}

fn smem(op: &'static str, mode: PoolMode, per_t: usize, t: usize) -> Result<usize> {
    let s = if mode == PoolMode::Weighted {
        per_t * t * 4
    } else {
        0
    };
    if s > SMEM_MAX {
        return Err(Error::invalid(
            op,
            format!("T = {t} needs {s} bytes of shared memory"),
        ));
    }
    Ok(s)
}

/// The padding mask's values (0/1, right padding, a real token in every row): read on the
/// host for host memory only; a device mask is not value-checked (the caller's contract).
fn check_mask(op: &'static str, mask: &In<'_, f32>, t: usize) -> Result<()> {
    match mask.host() {
        Some(m) => check_padding_mask(op, m, t),
        None => Ok(()),
    }
}

/// out[B,C] from h[B,T,C] and mask[B,T] (and w[Tmax] for `weighted`). out, h, w: the storage
/// type (`T: Storage`, not the length T); mask: f32. A device `mask` is not value-checked.
#[allow(clippy::too_many_arguments)]
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    h: impl Into<In<'a, T>>,
    mask: impl Into<In<'a, f32>>,
    w: Option<In<'a, T>>,
    dims: [usize; 3],
    mode: PoolMode,
) -> Result<()> {
    const OP: &str = "pool_fwd";
    let (out, h, mask) = (out.into(), h.into(), mask.into());
    let [b, t, c] = dims;
    check_pos(OP, "T", t)?;
    check_pos(OP, "C", c)?;
    check_len(OP, "out [B,C]", out.len(), &[b, c])?;
    check_len(OP, "h [B,T,C]", h.len(), &[b, t, c])?;
    check_len(OP, "mask [B,T]", mask.len(), &[b, t])?;
    check_weights(OP, "w", w.map(|w| w.len()), t, mode)?;
    check_mask(OP, &mask, t)?;
    let smem = smem(OP, mode, 1, t)?;
    if b == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", b, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(out).input(h).input(mask).input_opt(w);
    a.scalar(int(OP, "B", b)?)
        .scalar(int(OP, "T", t)?)
        .scalar(int(OP, "C", c)?)
        .scalar(code(mode));
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), smem, &mut a)
}

/// dh[B,T,C] = and, for `weighted`, dw[Tmax] +=. dh, dout, h, w: the storage type; mask, dw:
/// f32. A device `mask` is not value-checked.
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dh: impl Into<Out<'a, T>>,
    dw: Option<Out<'a, f32>>,
    dout: impl Into<In<'a, T>>,
    h: impl Into<In<'a, T>>,
    mask: impl Into<In<'a, f32>>,
    w: Option<In<'a, T>>,
    dims: [usize; 3],
    mode: PoolMode,
) -> Result<()> {
    const OP: &str = "pool_bwd";
    let (dh, dout, h, mask) = (dh.into(), dout.into(), h.into(), mask.into());
    let [b, t, c] = dims;
    check_pos(OP, "T", t)?;
    check_pos(OP, "C", c)?;
    check_len(OP, "dh [B,T,C]", dh.len(), &[b, t, c])?;
    check_len(OP, "dout [B,C]", dout.len(), &[b, c])?;
    check_len(OP, "h [B,T,C]", h.len(), &[b, t, c])?;
    check_len(OP, "mask [B,T]", mask.len(), &[b, t])?;
    check_weights(OP, "w", w.map(|w| w.len()), t, mode)?;
    check_weights(OP, "dw", dw.as_ref().map(Out::len), t, mode)?;
    if let (Some(w), Some(dw)) = (&w, &dw) {
        check_same(OP, "dw [Tmax]", dw.len(), w.len())?;
    }
    check_mask(OP, &mask, t)?;
    let smem = smem(OP, mode, 3, t)?;
    if b == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", b, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(dh).output_opt(dw);
    a.input(dout).input(h).input(mask).input_opt(w);
    a.scalar(int(OP, "B", b)?)
        .scalar(int(OP, "T", t)?)
        .scalar(int(OP, "C", c)?)
        .scalar(code(mode));
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), smem, &mut a)
}
