//! Activation injection: vectors written into the rows of the hidden states at marker sites.

use super::Real;
use crate::device::InjectMode;

/// For k < S: `h[sites[k], :] = vecs[k, :]` (replace) or `+= vecs[k, :]` (add), in place on h;
/// every other row of h is untouched.
///
/// h [N,C], sites [S] (distinct, < N), vecs [S,C].
pub fn inject_fwd<T: Real>(h: &mut [T], sites: &[u32], vecs: &[T], c: usize, mode: InjectMode) {
    if c == 0 {
        return;
    }
    for (&site, v) in sites.iter().zip(vecs.chunks_exact(c)) {
        let row = &mut h[site as usize * c..][..c];
        match mode {
            InjectMode::Replace => row.copy_from_slice(v),
            InjectMode::Add => {
                for (x, &v) in row.iter_mut().zip(v) {
                    *x += v;
                }
            }
        }
    }
}

/// `dvecs[k, :] = dh[sites[k], :]`   (`=`); replace also sets `dh[sites[k], :] = 0` in place
/// (the overwritten rows had no influence on the output), add leaves dh as it is.
///
/// dvecs [S,C], dh [N,C], sites [S] (distinct, < N).
pub fn inject_bwd<T: Real>(
    dvecs: &mut [T],
    dh: &mut [T],
    sites: &[u32],
    c: usize,
    mode: InjectMode,
) {
    if c == 0 {
        return;
    }
    for (&site, dv) in sites.iter().zip(dvecs.chunks_exact_mut(c)) {
        let row = &mut dh[site as usize * c..][..c];
        dv.copy_from_slice(row);
        if mode == InjectMode::Replace {
            row.fill(T::zero());
        }
    }
}

/// Every site must be a row index below `n`, and no row may appear twice (the device's check).
pub(crate) fn check_sites(op: &'static str, sites: &[u32], n: usize) -> crate::Result<()> {
    if let Some((k, &site)) = sites.iter().enumerate().find(|(_, &s)| s as usize >= n) {
        return Err(crate::Error::invalid(
            op,
            format!("sites[{k}] = {site} is not a row (must be < N = {n})"),
        ));
    }
    let mut sorted = sites.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(crate::Error::invalid(
            op,
            format!(
                "row {} appears twice in sites: sites must be distinct",
                w[0]
            ),
        ));
    }
    Ok(())
}
