//! `kernels/sample.cu`: sample_fwd_<f32|bf16>, block exactly 256 (the kernel's SMP_NT), one block
//! per row, grid min(N, 65535); top_k passed as min(top_k, V). logits are T; u and logp f32 in
//! both dtypes, ids u32.

use super::cross_entropy::row_grid;
use super::{check_len, check_pos, dim1, int, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::device::SampleSpec;
use crate::{Error, Result};

/// ids[N] (u32), logp[N] (f32) (`=`) drawn from logits [N,V] (T) with uniforms u [N] (f32).
/// Every u must lie in [0, 1): checked for host memory; device uniforms are not value-checked
/// (the caller's contract).
#[allow(clippy::too_many_arguments)]
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    ids: impl Into<Out<'a, u32>>,
    logp: impl Into<Out<'a, f32>>,
    logits: impl Into<In<'a, T>>,
    u: impl Into<In<'a, f32>>,
    n: usize,
    v: usize,
    spec: &SampleSpec,
) -> Result<()> {
    const OP: &str = "sample_fwd";
    let (ids, logp, logits, u) = (ids.into(), logp.into(), logits.into(), u.into());
    check_pos(OP, "V", v)?;
    check_len(OP, "ids [N]", ids.len(), &[n])?;
    check_len(OP, "logp [N]", logp.len(), &[n])?;
    check_len(OP, "logits [N,V]", logits.len(), &[n, v])?;
    check_len(OP, "u [N]", u.len(), &[n])?;
    if !(spec.temperature >= 0.0 && spec.temperature.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("temperature {} must be >= 0", spec.temperature),
        ));
    }
    if !(spec.top_p > 0.0 && spec.top_p <= 1.0) {
        return Err(Error::invalid(
            OP,
            format!("top_p {} must be in (0, 1]", spec.top_p),
        ));
    }
    if let Some(u) = u.host() {
        if let Some(i) = u.iter().position(|x| !(0.0..1.0).contains(x)) {
            return Err(Error::invalid(
                OP,
                format!("u[{i}] = {} is not in [0, 1)", u[i]),
            ));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let top_k = spec.top_k.min(v);
    let mut a = EmuArgs::new();
    a.output(ids).output(logp).input(logits).input(u);
    a.scalar(int(OP, "N", n)?).scalar(int(OP, "V", v)?);
    a.scalar(spec.temperature)
        .scalar(top_k as i32)
        .scalar(spec.top_p);
    l.launch(&sym::<T>(OP), dim1(row_grid(n)), dim1(256), 0, &mut a)
}
