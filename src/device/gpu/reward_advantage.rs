//! `kernels/reward_advantage.cu`: reward_advantage_<f32|bf16>, one block (grid 1, block 1024,
//! S * 8 bytes of dynamic shared memory), the spec passed as the kernel's integer encodings.
//! pred and target are T; valid, mse, reward, advantage f32 in both dtypes.

use super::{check_len, check_pos, dim1, int, EmuArgs, In, Launch, Out, SMEM_MAX};
use crate::device::cpu::pool::check_binary;
use crate::device::cpu::reward::check_spec;
use crate::device::storage::{sym, Storage};
use crate::device::{Advantage, RewardSpec, RewardTransform};
use crate::{Error, Result};

/// mse[S], reward[S], advantage[S] (`=`, f32) from pred, target [S,A] (T) and valid [S] (f32).
/// `valid` must be 0/1: checked for host memory; a device `valid` is not value-checked (the
/// caller's contract).
#[allow(clippy::too_many_arguments)]
pub fn reward_advantage<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    mse: impl Into<Out<'a, f32>>,
    reward: impl Into<Out<'a, f32>>,
    adv: impl Into<Out<'a, f32>>,
    pred: impl Into<In<'a, T>>,
    target: impl Into<In<'a, T>>,
    valid: impl Into<In<'a, f32>>,
    s: usize,
    a: usize,
    spec: &RewardSpec,
) -> Result<()> {
    const OP: &str = "reward_advantage";
    let (mse, reward, adv) = (mse.into(), reward.into(), adv.into());
    let (pred, target, valid) = (pred.into(), target.into(), valid.into());
    check_pos(OP, "S", s)?;
    check_pos(OP, "A", a)?;
    check_len(OP, "mse [S]", mse.len(), &[s])?;
    check_len(OP, "reward [S]", reward.len(), &[s])?;
    check_len(OP, "advantage [S]", adv.len(), &[s])?;
    check_len(OP, "pred [S,A]", pred.len(), &[s, a])?;
    check_len(OP, "target [S,A]", target.len(), &[s, a])?;
    check_len(OP, "valid [S]", valid.len(), &[s])?;
    check_spec(OP, spec, s)?;
    if let Some(valid) = valid.host() {
        check_binary(OP, "valid", valid)?;
    }
    let smem = s * 8;
    if smem > SMEM_MAX {
        return Err(Error::invalid(
            OP,
            format!("S = {s} needs {smem} bytes of shared memory"),
        ));
    }
    let (transform, temperature): (i32, f32) = match spec.transform {
        RewardTransform::Negative => (0, 0.0),
        RewardTransform::Exp { temperature } => (1, temperature),
        RewardTransform::Bounded => (2, 0.0),
        RewardTransform::Log => (3, 0.0),
    };
    let (clip, lo, hi): (i32, f32, f32) = match spec.clip {
        Some((lo, hi)) => (1, lo, hi),
        None => (0, 0.0, 0.0),
    };
    let (kind, group, norm_by_std, whiten): (i32, i32, i32, i32) = match spec.advantage {
        Advantage::Grpo { group, norm_by_std } => {
            (0, int(OP, "group", group)?, norm_by_std as i32, 0)
        }
        Advantage::Ppo { whiten } => (1, 0, 0, whiten as i32),
    };
    let mut g = EmuArgs::new();
    g.output(mse)
        .output(reward)
        .output(adv)
        .input(pred)
        .input(target)
        .input(valid);
    g.scalar(int(OP, "S", s)?)
        .scalar(int(OP, "A", a)?)
        .scalar(spec.mse_scale.unwrap_or(0.0));
    g.scalar(spec.failure_value)
        .scalar(transform)
        .scalar(temperature);
    g.scalar(spec.scale).scalar(spec.batch_normalize as i32);
    g.scalar(clip).scalar(lo).scalar(hi);
    g.scalar(kind)
        .scalar(group)
        .scalar(norm_by_std)
        .scalar(whiten)
        .scalar(spec.eps);
    l.launch(&sym::<T>(OP), dim1(1), dim1(1024), smem, &mut g)
}
