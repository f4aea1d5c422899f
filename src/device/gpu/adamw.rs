//! `kernels/adamw.cu`: adamw_f32, and adamw_bf16 which also writes the bf16 working copy p16 of
//! the new p (block 256, grid ceil(n / 1024) for both; p, g, m, v f32 in both; bias
//! corrections computed on the host in f64, as the twin), and sum_squares_<f32|bf16> (x of the
//! storage type T, block 256, grid min(ceil(n / 2048), 2 * SMs) for both, adding into one f64
//! the caller zeroes).

use half::bf16;

use super::{check_len, check_same, dim1, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::device::AdamwStep;
use crate::{Error, Result};

/// (1 / (1 - beta1^t), 1 / (1 - beta2^t)) in f64, rounded to f32.
fn bias_corrections(hp: &AdamwStep) -> (f32, f32) {
    let step = i32::try_from(hp.step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
    ((1.0 / bc1) as f32, (1.0 / bc2) as f32)
}

/// One AdamW step in place on p, m, v (f32 master weights, gradient and moments). With `p16`
/// (adamw_bf16) the step also writes the bf16 working copy p16[i] = bf16(p[i]) of the new p;
/// without it, adamw_f32.
pub fn adamw<'a, L: Launch + ?Sized>(
    l: &L,
    p: impl Into<Out<'a, f32>>,
    p16: Option<Out<'a, bf16>>,
    g: impl Into<In<'a, f32>>,
    m: impl Into<Out<'a, f32>>,
    v: impl Into<Out<'a, f32>>,
    hp: &AdamwStep,
) -> Result<()> {
    const OP: &str = "adamw";
    let (p, g, m, v) = (p.into(), g.into(), m.into(), v.into());
    let n = p.len();
    check_same(OP, "g", g.len(), n)?;
    check_same(OP, "m", m.len(), n)?;
    check_same(OP, "v", v.len(), n)?;
    if let Some(p16) = &p16 {
        check_same(OP, "p16", p16.len(), n)?;
    }
    if hp.step == 0 {
        return Err(Error::invalid(OP, "step is 1-based, got 0"));
    }
    if !((0.0..1.0).contains(&hp.beta1) && (0.0..1.0).contains(&hp.beta2)) {
        return Err(Error::invalid(
            OP,
            format!(
                "beta1 = {} and beta2 = {} must lie in [0, 1)",
                hp.beta1, hp.beta2
            ),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let (inv_bc1, inv_bc2) = bias_corrections(hp);
    let mut a = EmuArgs::new();
    let bf = p16.is_some();
    a.output(p);
    if let Some(p16) = p16 {
        a.output(p16);
    }
    a.input(g).output(m).output(v).scalar(n as i64);
    a.scalar(hp.lr)
        .scalar(hp.beta1)
        .scalar(hp.beta2)
        .scalar(hp.eps);
    a.scalar(hp.weight_decay)
        .scalar(inv_bc1)
        .scalar(inv_bc2)
        .scalar(hp.grad_scale);
    let grid = n.div_ceil(1024).max(1) as u32;
    let name = if bf { "adamw_bf16" } else { "adamw_f32" };
    l.launch(name, dim1(grid), dim1(256), 0, &mut a)
}

/// out[0] += sum of x^2 in f64 (x: T, squared and summed in f32 over each 16-byte pack of
/// `T::PACK` elements, then in f64). `out` holds exactly one element, which the caller zeroes
/// before (or holds a running sum to add to) and reads after: the kernel accumulates into it
/// with f64 atomics, one per block, so the order of the last additions depends on scheduling.
/// Nothing is launched for an empty `x` (out is left as it is).
pub fn sum_squares<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, f64>>,
    x: impl Into<In<'a, T>>,
) -> Result<()> {
    const OP: &str = "sum_squares";
    let (out, x) = (out.into(), x.into());
    check_len(OP, "out [1]", out.len(), &[1])?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let grid = n.div_ceil(2048).min(2 * l.sms()).max(1) as u32;
    let mut a = EmuArgs::new();
    a.output(out).input(x).scalar(n as i64);
    l.launch(&sym::<T>(OP), dim1(grid), dim1(256), 0, &mut a)
}
