//! `kernels/inject.cu`: inject_fwd_f32 / inject_bwd_f32, grid S (one block per site), block 256.

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, Launch};
use crate::device::InjectMode;
use crate::Result;

/// h[sites[k], :] = (or +=) vecs[k, :]
pub fn fwd<L: Launch + ?Sized>(
    l: &L,
    h: &mut [f32],
    sites: &[u32],
    vecs: &[f32],
    n: usize,
    c: usize,
    mode: InjectMode,
) -> Result<()> {
    const OP: &str = "inject_fwd";
    check_pos(OP, "C", c)?;
    check_len(OP, "h [N,C]", h.len(), &[n, c])?;
    let s = sites.len();
    check_len(OP, "vecs [S,C]", vecs.len(), &[s, c])?;
    crate::device::cpu::inject::check_sites(OP, sites, n)?;
    if s == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", s, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(h).ptr(sites).ptr(vecs);
    a.scalar(int(OP, "S", s)?)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar((mode == InjectMode::Add) as i32);
    l.launch("inject_fwd_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// dvecs[k, :] = dh[sites[k], :]; `Replace` also zeroes those rows of dh.
pub fn bwd<L: Launch + ?Sized>(
    l: &L,
    dvecs: &mut [f32],
    dh: &mut [f32],
    sites: &[u32],
    n: usize,
    c: usize,
    mode: InjectMode,
) -> Result<()> {
    const OP: &str = "inject_bwd";
    check_pos(OP, "C", c)?;
    let s = sites.len();
    check_len(OP, "dvecs [S,C]", dvecs.len(), &[s, c])?;
    check_len(OP, "dh [N,C]", dh.len(), &[n, c])?;
    crate::device::cpu::inject::check_sites(OP, sites, n)?;
    if s == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", s, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.ptr_mut(dvecs).ptr_mut(dh).ptr(sites);
    a.scalar(int(OP, "S", s)?)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar((mode == InjectMode::Add) as i32);
    l.launch("inject_bwd_f32", dim1(grid), dim1(256), 0, &mut a)
}
