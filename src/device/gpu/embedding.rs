//! `kernels/embedding.cu`: embedding_fwd_<f32|bf16> (grid N, block 32 * ceil(C / pack / 32)
//! capped at 256, pack = `T::PACK` (4 f32 / 8 bf16) when C is a multiple of it, else 1) and
//! embedding_bwd_<f32|bf16> (grid N, block 256, f32 atomics into dwte). out, wte, dout are T;
//! dwte is f32 in both dtypes.

use super::{check_len, check_pos, dim1, grid_dim, int, pack_block, EmuArgs, Ids, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::Result;

/// out[N,C] = wte[ids[n], :]. out, wte: T.
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    ids: impl Into<Ids<'a>>,
    wte: impl Into<In<'a, T>>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    let (out, ids, wte) = (out.into(), ids.into(), wte.into());
    check_pos(OP, "C", c)?;
    check_len(OP, "ids [N]", ids.len(), &[n])?;
    check_len(OP, "out [N,C]", out.len(), &[n, c])?;
    let vocab = super::rows_of(OP, "wte [V,C]", wte.len(), c)?;
    ids.check(OP, "ids", vocab)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(out).ids(ids).input(wte);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(int(OP, "V", vocab)?);
    l.launch(
        &sym::<T>("embedding_fwd"),
        dim1(grid),
        dim1(pack_block(c, T::PACK, 256)),
        0,
        &mut a,
    )
}

/// dwte[ids[n], :] += dout[n, :]. dout: T; dwte: f32.
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dwte: impl Into<Out<'a, f32>>,
    ids: impl Into<Ids<'a>>,
    dout: impl Into<In<'a, T>>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    let (dwte, ids, dout) = (dwte.into(), ids.into(), dout.into());
    check_pos(OP, "C", c)?;
    check_len(OP, "ids [N]", ids.len(), &[n])?;
    check_len(OP, "dout [N,C]", dout.len(), &[n, c])?;
    let vocab = super::rows_of(OP, "dwte [V,C]", dwte.len(), c)?;
    ids.check(OP, "ids", vocab)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(dwte).ids(ids).input(dout);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(int(OP, "V", vocab)?);
    l.launch(&sym::<T>("embedding_bwd"), dim1(grid), dim1(256), 0, &mut a)
}
