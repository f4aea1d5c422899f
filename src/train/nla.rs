//! The NLA training steps: actor SFT (cross-entropy on the explanation), critic SFT (MSE to the
//! vector), and the RL step (rollout, critic rewards, group advantages, clipped policy loss),
//! each one optimizer step over micro-batches.
//!
//! Loss conventions (NLA_SEMANTICS.md sections 3-5, [O] defaults):
//! - actor SFT: per-sample token mean of the cross-entropy over the response tokens and the end
//!   token, then the mean over samples ([O] `qwen` mask). Each target's weight is
//!   1 / (its sample's target count x samples in the step), so micro-batches add up exactly.
//! - critic: the sum over valid samples of mse(n_s(pred), n_s(target)), divided by the number of
//!   samples of the step ([O]).
//! - RL: the policy loss of `grpo.loss_agg_mode` over each micro-batch, times its share of the
//!   mini-batch's samples (verl's gradient-accumulation convention).

use crate::device::{Device, PolicyLossSpec, PolicyStat, RewardSpec, View, ViewMut};
use crate::model::{
    backward_with, forward_with, ActivationSet, Activations, Batch, DeviceBatch, MemoryOptions,
    Model, Recompute,
};
use crate::nla::{
    collate_actor, collate_critic, Actor, ActorExample, Critic, CriticActs, CriticExample,
};
use crate::train::optimizer::{clip_factor, AdamW};
use crate::train::schedule::LrSchedule;
use crate::{Error, Result};

/// A model part being trained: its optimizer, schedule and clip.
pub struct Opt<D: Device> {
    pub adamw: AdamW<D>,
    pub schedule: LrSchedule,
    /// global gradient-norm clip; <= 0 disables
    pub max_norm: f32,
}

/// What one optimizer step of a part did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
    /// tokens run through the model (B*T summed over micro-batches)
    pub tokens: usize,
}

impl<D: Device> Opt<D> {
    /// Clips `grads`, then one AdamW update of `params`; returns (grad norm, lr).
    fn apply(
        &mut self,
        dev: &D,
        params: &mut D::Buf,
        work: Option<&mut D::Buf>,
        grads: &D::Buf,
        what: &str,
    ) -> Result<(f64, f32)> {
        let (norm, factor) = clip_factor(dev, grads, self.max_norm)?;
        if !norm.is_finite() {
            return Err(Error::invalid(
                "train step",
                format!(
                    "the {what}'s gradient norm is {norm} at step {}: lower the learning rate",
                    self.adamw.step + 1
                ),
            ));
        }
        let lr = self.schedule.lr_at(self.adamw.step + 1);
        self.adamw.update(dev, params, work, grads, lr, factor)?;
        Ok((norm, lr))
    }
}

/// Reuses `slot`'s activations when they fit (B, T) and `opts`, else makes new ones.
fn acts_for<'a, D: Device>(
    dev: &D,
    slot: &'a mut Option<Activations<D>>,
    model: &Model<D>,
    (b, t): (usize, usize),
    opts: MemoryOptions,
) -> Result<&'a mut Activations<D>> {
    let acts = match slot.take() {
        Some(a) if a.fits(&model.cfg, b, t, opts) => a,
        stale => {
            drop(stale); // before allocating the new set, not after
            ActivationSet::with_options(dev, &model.cfg, b, t, opts)?
        }
    };
    Ok(slot.insert(acts))
}

/// The actor and what its steps reuse.
pub struct ActorTrainer<D: Device> {
    pub actor: Actor<D>,
    pub opt: Opt<D>,
    /// RL log-probs are taken under softmax(logits / temperature), the rollout's distribution
    /// (verl does the same); 1 by default
    pub temperature: f32,
    /// vocabulary chunks, block recompute (default: neither)
    pub memory: MemoryOptions,
    /// Hand the activation buffers back at the end of each pass, so that the phases of a step
    /// (rollout, critic, actor) share memory as the step's plan assumes (`train` sets it on a
    /// device with fixed memory); false keeps them for the next step of the same shape.
    pub release_acts: bool,
    /// Recompute the old log-probs of the first mini-batch in a forward of their own, as for
    /// every later one, instead of taking them from the update's first forward (the same
    /// numbers: the parameters have not moved yet). For checking that they are the same.
    pub recompute_old: bool,
    acts: Option<Activations<D>>,
}

impl<D: Device> ActorTrainer<D> {
    pub fn new(
        dev: &D,
        actor: Actor<D>,
        adamw: crate::train::AdamwConfig,
        schedule: LrSchedule,
        max_norm: f32,
    ) -> Result<Self> {
        let adamw = AdamW::new(dev, &actor.table, adamw)?;
        Ok(ActorTrainer {
            actor,
            opt: Opt {
                adamw,
                schedule,
                max_norm,
            },
            temperature: 1.0,
            memory: MemoryOptions::default(),
            release_acts: false,
            recompute_old: false,
            acts: None,
        })
    }

    /// Per-sample token-mean weights on the loss mask of a collated batch (see module docs);
    /// `n` = samples in the whole step.
    fn weigh(batch: &mut Batch, n: usize) {
        for row in batch.mask.chunks_mut(batch.t) {
            let count: f32 = row.iter().sum();
            if count > 0.0 {
                row.iter_mut().for_each(|m| *m /= count * n as f32);
            }
        }
    }

    /// Mean over `examples` of each one's token-mean cross-entropy, and the gradient of it
    /// accumulated (`backward` true) into the actor's grads. Returns (loss, tokens).
    fn sft_pass(
        &mut self,
        dev: &D,
        examples: &[ActorExample],
        micro: usize,
        pad_id: u32,
        backward: bool,
    ) -> Result<(f64, usize)> {
        let n = examples.len();
        let (mut loss, mut tokens) = (0.0, 0);
        for chunk in examples.chunks(micro.max(1)) {
            let mut ab = collate_actor(chunk, pad_id, None)?;
            ab.batch.check_vocab(self.actor.model.cfg.vocab_size)?;
            Self::weigh(&mut ab.batch, n);
            let db = ab.batch.upload(dev)?;
            let mut ai = self.actor.injection(dev, &ab.sites, &ab.vecs)?;
            let acts = acts_for(
                dev,
                &mut self.acts,
                &self.actor.model,
                (db.b, db.t),
                self.memory,
            )?;
            acts.logit_scale = 1.0;
            loss += forward_with(dev, &self.actor.model, acts, &db, Some(&ai.inj))?.sum;
            if backward {
                backward_with(
                    dev,
                    &mut self.actor.model,
                    acts,
                    &db,
                    1.0,
                    Some(&mut ai.inj),
                )?;
                self.actor.injection_bwd(dev, &ai)?;
            }
            tokens += db.b * db.t;
        }
        self.end_pass();
        Ok((loss, tokens))
    }

    fn end_pass(&mut self) {
        if self.release_acts {
            self.acts = None;
        }
    }

    /// Whether activation buffers are kept from the last pass.
    pub fn holds_activations(&self) -> bool {
        self.acts.is_some()
    }

    /// One SFT step over `examples` (the whole step's samples, run `micro` at a time).
    pub fn sft_step(
        &mut self,
        dev: &D,
        examples: &[ActorExample],
        micro: usize,
        pad_id: u32,
    ) -> Result<StepStats> {
        if examples.is_empty() {
            return Err(Error::invalid("actor step", "no examples"));
        }
        self.actor.zero_grads(dev)?;
        let (loss, tokens) = self.sft_pass(dev, examples, micro, pad_id, true)?;
        let m = &mut self.actor.model;
        let (grad_norm, lr) =
            self.opt
                .apply(dev, &mut m.params, m.work.as_mut(), &m.grads, "actor")?;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            tokens,
        })
    }

    /// The SFT loss of `examples` without a step (validation).
    pub fn sft_loss(
        &mut self,
        dev: &D,
        examples: &[ActorExample],
        micro: usize,
        pad_id: u32,
    ) -> Result<f64> {
        if examples.is_empty() {
            return Ok(f64::NAN);
        }
        Ok(self.sft_pass(dev, examples, micro, pad_id, false)?.0)
    }
}

/// The critic and what its steps reuse.
pub struct CriticTrainer<D: Device> {
    pub critic: Critic<D>,
    pub opt: Opt<D>,
    /// n_s of loss and reward (None = raw vectors)
    pub mse_scale: Option<f32>,
    /// block recompute in the critic's passes (default: none)
    pub recompute: Recompute,
    /// as [`ActorTrainer::release_acts`]
    pub release_acts: bool,
    ws: Option<CriticActs<D>>,
}

/// What a critic pass gives back (host).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CriticPass {
    /// [S,A] predictions before rescaling, in example order
    pub pred: Vec<f32>,
    /// [S] per-sample mse
    pub mse: Vec<f32>,
    /// sum of mse over valid samples / samples
    pub loss: f64,
    pub tokens: usize,
}

impl<D: Device> CriticTrainer<D> {
    pub fn new(
        dev: &D,
        critic: Critic<D>,
        adamw: crate::train::AdamwConfig,
        schedule: LrSchedule,
        max_norm: f32,
        mse_scale: Option<f32>,
    ) -> Result<Self> {
        let adamw = AdamW::new(dev, &critic.table, adamw)?;
        Ok(CriticTrainer {
            critic,
            opt: Opt {
                adamw,
                schedule,
                max_norm,
            },
            mse_scale,
            recompute: Recompute::None,
            release_acts: false,
            ws: None,
        })
    }

    /// Forward (and with `backward` the gradient) over `examples`, `micro` at a time; `valid`
    /// [S] leaves samples out of the loss (None = all in). The loss divides by `divisor`.
    #[allow(clippy::too_many_arguments)]
    pub fn pass(
        &mut self,
        dev: &D,
        examples: &[CriticExample],
        valid: Option<&[bool]>,
        micro: usize,
        pad_id: u32,
        backward: bool,
        divisor: usize,
    ) -> Result<CriticPass> {
        let mut out = CriticPass::default();
        let micro = micro.max(1);
        for (i, chunk) in examples.chunks(micro).enumerate() {
            let cb = collate_critic(chunk, pad_id, None)?;
            let v = valid.map(|v| &v[i * micro..i * micro + chunk.len()]);
            let input = self
                .critic
                .batch(dev, cb.b, cb.t, &cb.ids, &cb.mask, &cb.targets, v)?;
            let ws = match self.ws.take() {
                Some(w)
                    if w.acts.b == cb.b
                        && w.acts.t == cb.t
                        && w.acts.recompute == self.recompute =>
                {
                    w
                }
                stale => {
                    drop(stale); // before allocating the new buffers, not after
                    self.critic.acts_with(dev, cb.b, cb.t, self.recompute)?
                }
            };
            let ws = self.ws.insert(ws);
            let o = self.critic.forward(dev, ws, &input, self.mse_scale)?;
            if backward {
                self.critic
                    .backward(dev, ws, &input, divisor.max(1) as f32)?;
            }
            out.loss += o.loss(divisor.max(1) as f32);
            out.pred.extend(o.pred);
            out.mse.extend(o.mse);
            out.tokens += cb.b * cb.t;
        }
        if self.release_acts {
            self.ws = None;
        }
        Ok(out)
    }

    /// One step on `examples` (`valid` as in [`CriticTrainer::pass`]); the loss divides by the
    /// number of valid samples.
    pub fn step(
        &mut self,
        dev: &D,
        examples: &[CriticExample],
        valid: Option<&[bool]>,
        micro: usize,
        pad_id: u32,
    ) -> Result<(StepStats, CriticPass)> {
        let n = valid.map_or(examples.len(), |v| v.iter().filter(|&&x| x).count());
        if n == 0 {
            return Err(Error::invalid("critic step", "no valid example"));
        }
        self.critic.zero_grads(dev)?;
        let pass = self.pass(dev, examples, valid, micro, pad_id, true, n)?;
        let m = &mut self.critic.model;
        let (grad_norm, lr) =
            self.opt
                .apply(dev, &mut m.params, m.work.as_mut(), &m.grads, "critic")?;
        Ok((
            StepStats {
                loss: pass.loss,
                grad_norm,
                lr,
                tokens: pass.tokens,
            },
            pass,
        ))
    }
}

/// One RL sequence: the prompt (with its injection sites and vectors), the sampled response
/// and its advantage.
#[derive(Clone, Debug, PartialEq)]
pub struct RlSequence {
    /// prompt ++ response tokens
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    pub sites: Vec<usize>,
    pub vectors: Vec<Vec<f32>>,
    pub advantage: f32,
    /// the log-probs the rollout sampled the response with (may be empty)
    pub rollout_logps: Vec<f32>,
}

/// Policy-loss statistics of an RL actor update, averaged over its micro-batches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PolicyStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub kl: f64,
    pub clip_frac: f64,
    pub clip_frac_lower: f64,
    pub approx_kl: f64,
    pub ratio_mean: f64,
    /// mean |old log-prob - rollout log-prob| over the response tokens (NaN without rollout
    /// log-probs): 0 up to rounding when rollout and training agree
    pub rollout_logp_diff: f64,
    pub grad_norm: f64,
    pub lr: f32,
    pub tokens: usize,
}

/// One micro-batch of an RL update, collated once for every epoch.
struct RlMicro {
    /// its mini-batch (one optimizer step)
    mini: usize,
    /// its sequences' indices in the update's `seqs`
    seqs: std::ops::Range<usize>,
    /// sequences in its mini-batch
    mini_rows: usize,
    ab: crate::nla::ActorBatch,
    /// advantages [B*T]
    adv: Vec<f32>,
    /// old log-probs [B*T]; None until the update's first forward gives them
    old: Option<Vec<f32>>,
    /// the reference's log-probs [B*T], for the KL loss
    rf: Option<Vec<f32>>,
}

/// Adds |old log-prob - rollout log-prob| over the response tokens of the collated `chunk`
/// (its rows `t` long, `old` [B*T]) to `sum.0`, and their count to `sum.1`.
fn rollout_mismatch(sum: &mut (f64, f64), chunk: &[RlSequence], t: usize, old: &[f32]) {
    for (row, s) in chunk.iter().enumerate() {
        // the log-prob of the token at p is at p - 1 (the position that predicts it)
        let base = row * t + s.prompt_len - 1;
        for (k, &lp) in s.rollout_logps.iter().enumerate() {
            sum.0 += (old[base + k] as f64 - lp as f64).abs();
            sum.1 += 1.0;
        }
    }
}

impl<D: Device> ActorTrainer<D> {
    /// The collated micro-batch of RL sequences: response targets in the mask (weight 1).
    fn rl_batch(seqs: &[&RlSequence], pad_id: u32) -> Result<(crate::nla::ActorBatch, Vec<f32>)> {
        let examples: Vec<ActorExample> = seqs
            .iter()
            .map(|s| ActorExample {
                ids: s.ids.clone(),
                loss_mask: (0..s.ids.len())
                    .map(|p| u8::from(p >= s.prompt_len))
                    .collect(),
                prompt_len: s.prompt_len,
                sites: s.sites.clone(),
                vectors: s.vectors.clone(),
            })
            .collect();
        let ab = collate_actor(&examples, pad_id, None)?;
        let t = ab.batch.t;
        let adv = seqs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.advantage, t))
            .collect();
        Ok((ab, adv))
    }

    /// Per-token log-probs [B*T] of a collated RL batch under `model` (0 off the mask).
    fn logps(
        dev: &D,
        model: &Model<D>,
        actor: &Actor<D>,
        acts: &mut Option<Activations<D>>,
        ab: &crate::nla::ActorBatch,
        (temperature, memory): (f32, MemoryOptions),
    ) -> Result<Vec<f32>> {
        let db = ab.batch.upload(dev)?;
        let ai = actor.injection(dev, &ab.sites, &ab.vecs)?;
        let acts = acts_for(dev, acts, model, (db.b, db.t), memory)?;
        policy_logps(dev, model, acts, &db, &ai.inj, temperature)
    }

    /// The clipped policy update on `seqs`: old log-probs (and the reference's, for the KL
    /// loss) once, then `epochs` passes over mini-batches of `mini` sequences, each one
    /// optimizer step accumulated over micro-batches of `micro`. The reference is a whole
    /// actor: its log-probs take its own injection (its projection, in `project` mode).
    ///
    /// The first mini-batch's old log-probs are those of its first update pass, taken before
    /// any optimizer step (the same parameters, the same forward, so the same numbers): with
    /// one epoch and one mini-batch (the default) that saves one of the three forwards per
    /// micro-batch ([`ActorTrainer::recompute_old`] computes them apart).
    #[allow(clippy::too_many_arguments)]
    pub fn rl_update(
        &mut self,
        dev: &D,
        seqs: &[RlSequence],
        reference: Option<&Actor<D>>,
        spec: &PolicyLossSpec,
        epochs: usize,
        mini: usize,
        micro: usize,
        pad_id: u32,
    ) -> Result<PolicyStats> {
        if seqs.is_empty() {
            return Err(Error::invalid("rl step", "no sequences"));
        }
        let (mini, micro) = (mini.max(1), micro.max(1).min(mini.max(1)));
        let temp = (self.temperature, self.memory);
        let mut micros = vec![];
        let mut mismatch = (0.0, 0.0);
        for (m, mb) in seqs.chunks(mini).enumerate() {
            for (u, chunk) in mb.chunks(micro).enumerate() {
                let refs: Vec<&RlSequence> = chunk.iter().collect();
                let (ab, adv) = Self::rl_batch(&refs, pad_id)?;
                ab.batch.check_vocab(self.actor.model.cfg.vocab_size)?;
                let first = m * mini + u * micro;
                let old = if m > 0 || self.recompute_old {
                    let old = Self::logps(
                        dev,
                        &self.actor.model,
                        &self.actor,
                        &mut self.acts,
                        &ab,
                        temp,
                    )?;
                    rollout_mismatch(&mut mismatch, chunk, ab.batch.t, &old);
                    Some(old)
                } else {
                    None
                };
                let rf = match reference {
                    Some(r) if spec.kl_coef != 0.0 => {
                        Some(Self::logps(dev, &r.model, r, &mut self.acts, &ab, temp)?)
                    }
                    _ => None,
                };
                micros.push(RlMicro {
                    mini: m,
                    seqs: first..first + chunk.len(),
                    mini_rows: mb.len(),
                    ab,
                    adv,
                    old,
                    rf,
                });
            }
        }
        let mut st = PolicyStats::default();
        let mut count = 0.0;
        let mut stats = dev.alloc(PolicyStat::COUNT)?;
        for _ in 0..epochs.max(1) {
            let mut i = 0;
            while i < micros.len() {
                let m = micros[i].mini;
                self.actor.zero_grads(dev)?;
                while i < micros.len() && micros[i].mini == m {
                    let db = micros[i].ab.batch.upload(dev)?;
                    let n = db.b * db.t;
                    let mut ai =
                        self.actor
                            .injection(dev, &micros[i].ab.sites, &micros[i].ab.vecs)?;
                    let acts = acts_for(
                        dev,
                        &mut self.acts,
                        &self.actor.model,
                        (db.b, db.t),
                        self.memory,
                    )?;
                    let temp = self.temperature;
                    let logp = policy_logps(dev, &self.actor.model, acts, &db, &ai.inj, temp)?;
                    let mc = &mut micros[i];
                    if mc.old.is_none() {
                        // the first mini-batch before its optimizer step: these are the old
                        // log-probs (kept for the later epochs)
                        rollout_mismatch(&mut mismatch, &seqs[mc.seqs.clone()], db.t, &logp);
                    }
                    let old = mc.old.get_or_insert_with(|| logp.clone());
                    let (logp, old_d, adv_d) =
                        (dev.upload(&logp)?, dev.upload(old)?, dev.upload(&mc.adv)?);
                    let ref_d = mc.rf.as_ref().map(|r| dev.upload(r)).transpose()?;
                    dev.policy_loss_fwd(
                        ViewMut::all(&mut stats),
                        View::all(&logp),
                        View::all(&old_d),
                        View::all(&adv_d),
                        View::all(&db.mask),
                        ref_d.as_ref().map(View::all),
                        db.b,
                        db.t,
                        spec,
                    )?;
                    let mut dlogp = dev.alloc(n)?;
                    dev.policy_loss_bwd(
                        ViewMut::all(&mut dlogp),
                        View::all(&logp),
                        View::all(&old_d),
                        View::all(&adv_d),
                        View::all(&db.mask),
                        ref_d.as_ref().map(View::all),
                        db.b,
                        db.t,
                        spec,
                    )?;
                    // d loss / d (logits / T) = -dlogp (softmax - onehot): cross-entropy's
                    // backward with -dlogp * share as the per-position weights (the 1 / T to the
                    // raw logits is the LM-head backward's, acts.logit_scale)
                    let share = mc.seqs.len() as f32 / mc.mini_rows as f32;
                    let w: Vec<f32> = dev
                        .download(View::all(&dlogp))?
                        .iter()
                        .map(|&g| -g * share)
                        .collect();
                    // the batch already on the device, the weights in place of its mask
                    let wdb = DeviceBatch {
                        mask: dev.upload(&w)?,
                        ..db
                    };
                    backward_with(
                        dev,
                        &mut self.actor.model,
                        acts,
                        &wdb,
                        1.0,
                        Some(&mut ai.inj),
                    )?;
                    self.actor.injection_bwd(dev, &ai)?;
                    let s = dev.download(View::all(&stats))?;
                    st.loss += s[PolicyStat::LOSS] as f64;
                    st.pg_loss += s[PolicyStat::PG_LOSS] as f64;
                    st.kl += s[PolicyStat::KL_LOSS] as f64;
                    st.clip_frac += s[PolicyStat::CLIP_FRAC] as f64;
                    st.clip_frac_lower += s[PolicyStat::CLIP_FRAC_LOWER] as f64;
                    st.approx_kl += s[PolicyStat::APPROX_KL] as f64;
                    st.ratio_mean += s[PolicyStat::RATIO_MEAN] as f64;
                    st.tokens += n;
                    count += 1.0;
                    i += 1;
                }
                let md = &mut self.actor.model;
                let (gn, lr) =
                    self.opt
                        .apply(dev, &mut md.params, md.work.as_mut(), &md.grads, "actor")?;
                st.grad_norm = gn;
                st.lr = lr;
            }
        }
        self.end_pass();
        st.rollout_logp_diff = if mismatch.1 > 0.0 {
            mismatch.0 / mismatch.1
        } else {
            f64::NAN
        };
        for x in [
            &mut st.loss,
            &mut st.pg_loss,
            &mut st.kl,
            &mut st.clip_frac,
            &mut st.clip_frac_lower,
            &mut st.approx_kl,
            &mut st.ratio_mean,
        ] {
            *x /= count;
        }
        Ok(st)
    }
}

/// Rewards and advantages of S samples from the critic's predictions (the fused op).
pub struct Rewards {
    pub mse: Vec<f32>,
    pub reward: Vec<f32>,
    pub advantage: Vec<f32>,
}

/// [`Device::reward_advantage`] on host data: pred, target [S,A], valid [S].
pub fn rewards<D: Device>(
    dev: &D,
    pred: &[f32],
    target: &[f32],
    valid: &[bool],
    a: usize,
    spec: &RewardSpec,
) -> Result<Rewards> {
    let _range = crate::profile::range("reward");
    let s = valid.len();
    let (mut mse, mut reward, mut adv) = (dev.alloc(s)?, dev.alloc(s)?, dev.alloc(s)?);
    let vf: Vec<f32> = valid.iter().map(|&v| f32::from(u8::from(v))).collect();
    dev.reward_advantage(
        ViewMut::all(&mut mse),
        ViewMut::all(&mut reward),
        ViewMut::all(&mut adv),
        View::all(&dev.upload(pred)?),
        View::all(&dev.upload(target)?),
        View::all(&dev.upload(&vf)?),
        s,
        a,
        spec,
    )?;
    Ok(Rewards {
        mse: dev.download(View::all(&mse))?,
        reward: dev.download(View::all(&reward))?,
        advantage: dev.download(View::all(&adv))?,
    })
}

/// Runs the actor on `db` with its injection and returns the per-position log-probs [B*T] of
/// the targets under softmax(logits / temperature) (0 off the mask). The 1 / temperature rides
/// on the LM-head matmul (`acts.logit_scale`), so a following backward on `acts` takes the
/// tempered logits' gradient through it.
fn policy_logps<D: Device>(
    dev: &D,
    model: &Model<D>,
    acts: &mut Activations<D>,
    db: &DeviceBatch<D>,
    inj: &crate::model::Injection<D>,
    temperature: f32,
) -> Result<Vec<f32>> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid(
            "rl step",
            format!("temperature {temperature}: log-probs need a temperature > 0"),
        ));
    }
    acts.logit_scale = 1.0 / temperature;
    forward_with(dev, model, acts, db, Some(inj))?;
    Ok(dev
        .download(View::all(&acts.losses))?
        .iter()
        .map(|&l| -l)
        .collect())
}
