//! `kernels/inject.cu`: inject_fwd_<f32|bf16> / inject_bwd_<f32|bf16>, grid S (one block per
//! site), block 256. h, dh, vecs, dvecs are T (add sums in f32 and rounds once).

use super::{check_len, check_pos, dim1, grid_dim, int, EmuArgs, Ids, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::device::InjectMode;
use crate::Result;

/// The sites: rows of h below N, distinct (the kernels write each site's row unsynchronised).
/// Host sites are checked both ways; device sites only against the bound their owner recorded
/// (distinctness is the caller's contract there: the host cannot read device memory).
fn check_sites(op: &'static str, sites: &Ids<'_>, n: usize) -> Result<()> {
    match sites.host() {
        Some(s) => crate::device::cpu::inject::check_sites(op, s, n),
        None => sites.check(op, "sites", n),
    }
}

/// h[sites[k], :] = (or +=) vecs[k, :] (h, vecs: T)
#[allow(clippy::too_many_arguments)]
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    h: impl Into<Out<'a, T>>,
    sites: impl Into<Ids<'a>>,
    vecs: impl Into<In<'a, T>>,
    n: usize,
    c: usize,
    mode: InjectMode,
) -> Result<()> {
    const OP: &str = "inject_fwd";
    let (h, sites, vecs) = (h.into(), sites.into(), vecs.into());
    check_pos(OP, "C", c)?;
    check_len(OP, "h [N,C]", h.len(), &[n, c])?;
    let s = sites.len();
    check_len(OP, "vecs [S,C]", vecs.len(), &[s, c])?;
    check_sites(OP, &sites, n)?;
    if s == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", s, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(h).ids(sites).input(vecs);
    a.scalar(int(OP, "S", s)?)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar((mode == InjectMode::Add) as i32);
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), 0, &mut a)
}

/// dvecs[k, :] = dh[sites[k], :]; `Replace` also zeroes those rows of dh (dvecs, dh: T).
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dvecs: impl Into<Out<'a, T>>,
    dh: impl Into<Out<'a, T>>,
    sites: impl Into<Ids<'a>>,
    n: usize,
    c: usize,
    mode: InjectMode,
) -> Result<()> {
    const OP: &str = "inject_bwd";
    let (dvecs, dh, sites) = (dvecs.into(), dh.into(), sites.into());
    check_pos(OP, "C", c)?;
    let s = sites.len();
    check_len(OP, "dvecs [S,C]", dvecs.len(), &[s, c])?;
    check_len(OP, "dh [N,C]", dh.len(), &[n, c])?;
    check_sites(OP, &sites, n)?;
    if s == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", s, i32::MAX as usize)?;
    let mut a = EmuArgs::new();
    a.output(dvecs).output(dh).ids(sites);
    a.scalar(int(OP, "S", s)?)
        .scalar(int(OP, "N", n)?)
        .scalar(int(OP, "C", c)?)
        .scalar((mode == InjectMode::Add) as i32);
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), 0, &mut a)
}
