//! `kernels/embedding.cu`: embedding_fwd_f32 (grid N, block 32 * ceil(C / pack / 32) capped at
//! 256) and embedding_bwd_f32 (grid N, block 256, atomics into dwte).

use super::{check_ids, check_len, check_pos, dim1, grid_dim, int, pack_block, EmuArgs, Launch};
use crate::Result;

/// out[N,C] = wte[ids[n], :]
pub fn fwd<L: Launch + ?Sized>(
    l: &L,
    out: &mut [f32],
    ids: &[u32],
    wte: &[f32],
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    check_pos(OP, "C", c)?;
    check_len(OP, "ids [N]", ids.len(), &[n])?;
    check_len(OP, "out [N,C]", out.len(), &[n, c])?;
    let vocab = super::rows_of(OP, "wte [V,C]", wte.len(), c)?;
    check_ids(OP, "ids", ids, vocab)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(ids).ptr(wte);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(int(OP, "V", vocab)?);
    l.launch(
        "embedding_fwd_f32",
        dim1(grid),
        dim1(pack_block(c, 256)),
        0,
        &mut a,
    )
}

/// dwte[ids[n], :] += dout[n, :]
pub fn bwd<L: Launch + ?Sized>(
    l: &L,
    dwte: &mut [f32],
    ids: &[u32],
    dout: &[f32],
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    check_pos(OP, "C", c)?;
    check_len(OP, "ids [N]", ids.len(), &[n])?;
    check_len(OP, "dout [N,C]", dout.len(), &[n, c])?;
    let vocab = super::rows_of(OP, "dwte [V,C]", dwte.len(), c)?;
    check_ids(OP, "ids", ids, vocab)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(dwte).ptr(ids).ptr(dout);
    a.scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar(int(OP, "V", vocab)?);
    l.launch("embedding_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
