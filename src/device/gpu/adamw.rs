//! `kernels/adamw.cu`: adamw_f32 (block 256, grid ceil(n / 1024); bias corrections computed
//! on the host in f64, as the twin) and sum_squares_f32 (block 256, grid min(ceil(n / 2048),
//! 2 * SMs), adding into one f64).

use super::{check_same, dim1, EmuArgs, Launch};
use crate::device::AdamwStep;
use crate::{Error, Result};

/// (1 / (1 - beta1^t), 1 / (1 - beta2^t)) in f64, rounded to f32.
fn bias_corrections(hp: &AdamwStep) -> (f32, f32) {
    let step = i32::try_from(hp.step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
    ((1.0 / bc1) as f32, (1.0 / bc2) as f32)
}

/// One AdamW step in place on p, m, v.
pub fn adamw<L: Launch + ?Sized>(
    l: &L,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamwStep,
) -> Result<()> {
    const OP: &str = "adamw";
    let n = p.len();
    check_same(OP, "g", g.len(), n)?;
    check_same(OP, "m", m.len(), n)?;
    check_same(OP, "v", v.len(), n)?;
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
    a.ptr_mut(p).ptr(g).ptr_mut(m).ptr_mut(v).scalar(n as i64);
    a.scalar(hp.lr)
        .scalar(hp.beta1)
        .scalar(hp.beta2)
        .scalar(hp.eps);
    a.scalar(hp.weight_decay)
        .scalar(inv_bc1)
        .scalar(inv_bc2)
        .scalar(hp.grad_scale);
    let grid = n.div_ceil(1024).max(1) as u32;
    l.launch("adamw_f32", dim1(grid), dim1(256), 0, &mut a)
}

/// sum of x^2 in f64 (block partials combined by f64 atomics: the order of the last additions
/// depends on scheduling).
pub fn sum_squares<L: Launch + ?Sized>(l: &L, x: &[f32]) -> Result<f64> {
    let n = x.len();
    if n == 0 {
        return Ok(0.0);
    }
    let mut out = [0f64; 1];
    let grid = n.div_ceil(2048).min(2 * l.sms()).max(1) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(&mut out[..]).ptr(x).scalar(n as i64);
    l.launch("sum_squares_f32", dim1(grid), dim1(256), 0, &mut a)?;
    drop(a);
    Ok(out[0])
}
