//! `kernels/convert.cu`: convert_f32_bf16 / convert_bf16_f32, elementwise (block 256, grid
//! ceil(n / 1024), n as a 64-bit count).

use super::{check_same, dim1, grid_dim, EmuArgs, In, Launch, Out};
use crate::device::Storage;
use crate::{Error, Result};

/// out[n] = x[n] in out's storage type (f32 -> bf16 rounds to nearest even; bf16 -> f32 exact).
pub fn convert<'a, To: Storage, From: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, To>>,
    x: impl Into<In<'a, From>>,
) -> Result<()> {
    const OP: &str = "convert";
    let (out, x) = (out.into(), x.into());
    if To::DTYPE == From::DTYPE {
        return Err(Error::invalid(
            OP,
            format!("out and x are both {}: nothing to convert", To::DTYPE),
        ));
    }
    let n = out.len();
    check_same(OP, "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_dim(OP, "x", n.div_ceil(1024), i32::MAX as usize)?;
    let mut args = EmuArgs::new();
    args.output(out).input(x).scalar(n as i64);
    let sym = format!("convert_{}_{}", From::SUFFIX, To::SUFFIX);
    l.launch(&sym, dim1(grid), dim1(256), 0, &mut args)
}
