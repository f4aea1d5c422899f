//! `kernels/policy_loss.cu`: policy_loss_fwd_f32 (stats [7]) and policy_loss_bwd_f32
//! (dlogp [N]), one block (grid 1, block 512); the spec as the kernel's encodings (dual_clip 0
//! = None; an absent ref_logp is a null pointer).

use super::{check_len, dim1, int, EmuArgs, In, Launch, Out};
use crate::device::{KlType, LossAgg, PolicyLossSpec, PolicyStat};
use crate::Result;

/// `bwd`: dlogp [S*T] into `out`; else the stats [PolicyStat::COUNT]. Inputs: logp, old_logp,
/// adv, mask [S*T]. Only lengths are checked here: the spec and the values of the inputs (the
/// mask) are the caller's to check first (`cpu::policy_loss::check_shapes`, and `check_mask`
/// for host memory; device inputs are not value-checked).
#[allow(clippy::too_many_arguments)]
pub fn policy_loss<'a, L: Launch + ?Sized>(
    l: &L,
    bwd: bool,
    out: impl Into<Out<'a, f32>>,
    inputs: [impl Into<In<'a, f32>>; 4],
    ref_logp: Option<In<'a, f32>>,
    s: usize,
    t: usize,
    spec: &PolicyLossSpec,
) -> Result<()> {
    let (out, inputs) = (out.into(), inputs.map(Into::into));
    let op = if bwd {
        "policy_loss_bwd"
    } else {
        "policy_loss_fwd"
    };
    if bwd {
        check_len(op, "dlogp [N]", out.len(), &[s, t])?;
    } else {
        check_len(op, "stats", out.len(), &[PolicyStat::COUNT])?;
    }
    for (what, x) in ["logp", "old_logp", "adv", "mask"].iter().zip(inputs) {
        check_len(op, what, x.len(), &[s, t])?;
    }
    if let Some(r) = ref_logp {
        check_len(op, "ref_logp", r.len(), &[s, t])?;
    }
    let kl: i32 = match spec.kl_type {
        KlType::K1 => 0,
        KlType::K2 => 1,
        KlType::K3 => 2,
    };
    let agg: i32 = match spec.agg {
        LossAgg::TokenMean => 0,
        LossAgg::SeqMeanTokenMean => 1,
        LossAgg::SeqMeanTokenSumNorm => 2,
    };
    let [logp, old, adv, mask] = inputs;
    let mut a = EmuArgs::new();
    a.output(out).input(logp).input(old).input(adv).input(mask);
    a.input_opt(ref_logp);
    a.scalar(int(op, "S", s)?)
        .scalar(int(op, "T", t)?)
        .scalar(spec.clip_low)
        .scalar(spec.clip_high);
    a.scalar(spec.dual_clip.unwrap_or(0.0)).scalar(spec.kl_coef);
    a.scalar(kl).scalar(agg);
    let sym = if bwd {
        "policy_loss_bwd_f32"
    } else {
        "policy_loss_fwd_f32"
    };
    l.launch(sym, dim1(1), dim1(512), 0, &mut a)
}
