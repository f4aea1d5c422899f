//! The step of a run config, as `nla-engine plan` shows it.
//!
//! [`RunShape`] reads from a [`RunConfig`] and the models' architectures what sizes the step:
//! which models (actor, critic, frozen reference), batch shapes and lengths. Its phases follow
//! `train/run.rs`:
//! - SFT: the actor's micro-batch forward + backward and AdamW (train_mode actor or both),
//!   then the critic's (critic or both). Rows of up to `data.train_dataset.max_length` tokens
//!   (+1 for `cls` pooling on the critic side).
//! - GRPO / PPO: the rollout (the actor generates `train_batch_size * n` sequences, split over
//!   the GPUs, prompts of up to `max_length` tokens + `generation.max_new_tokens`; PPO samples
//!   once per prompt as the trainer does), the critic's forward for the rewards, the critic's
//!   update (train_mode both), the actor's old log-probs, the reference's log-probs (GRPO with
//!   `use_kl_loss` and `kl_coef` != 0: the only case the trainer loads it), the actor's policy
//!   update. Actor sequences are prompt + response; a critic input is the critic prompt around
//!   the explanation, at most `max_length` tokens: its length is bounded by the prompt's bytes
//!   (a token is at least one byte; +2 for special tokens) plus `max_new_tokens`.
//!
//! Micro-batches are `micro_batch_size_per_gpu` rows, or fewer when a GPU's share of the
//! step's rows is smaller.

use super::planner::ArenaKind;
use super::step::{
    plan_step, plan_step_with, ModelKind, ModelSpec, Phase, Recompute, StepOptions, StepPlan,
};
use super::{gib, PlanOptions};
use crate::config::{Algo, InjectionMode, Part, Pooling, RunConfig};
use crate::model::{ActivationSet, MemoryOptions, ModelConfig};
use crate::{Error, Result};

/// What sizes a run's step.
#[derive(Clone, Debug, PartialEq)]
pub struct RunShape {
    pub algo: Algo,
    pub train_mode: Part,
    pub actor: ModelConfig,
    /// The critic's backbone (all its blocks; the critic keeps 0..=critic_k).
    pub critic: ModelConfig,
    pub critic_k: usize,
    /// A, the vector dimension.
    pub a: usize,
    pub inject_layers: Vec<usize>,
    pub project: bool,
    /// Weighted pooling (`pool.weight` [max_length + 1]).
    pub weighted_pool: bool,
    /// `cls` pooling appends a token to every critic input.
    pub cls: bool,
    pub micro: usize,
    /// SFT: the longest row; RL: the longest prompt.
    pub max_length: usize,
    pub max_new_tokens: usize,
    /// SFT: rows per step; RL: prompts per step (all GPUs).
    pub train_batch_size: usize,
    /// Samples per prompt in RL (GRPO: `grpo.n`; PPO: 1).
    pub n: usize,
    /// The frozen reference actor is in memory.
    pub reference: bool,
    /// Upper bound of the critic prompt's tokens around the explanation.
    pub critic_prompt_tokens: usize,
}

impl RunShape {
    /// From a run config and the architectures of the actor and of the critic's backbone.
    pub fn from_config(cfg: &RunConfig, actor: ModelConfig, critic: ModelConfig) -> Result<Self> {
        cfg.check_model_dims(
            actor.hidden_size,
            actor.num_hidden_layers,
            critic.num_hidden_layers,
        )?;
        let c = &cfg.model.critic;
        let critic_k = c
            .last_block()
            .unwrap_or(critic.num_hidden_layers.saturating_sub(1));
        let algo = cfg.trainer.algo;
        let g = &cfg.grpo;
        let critic_prompt_tokens = 2 + c
            .critic_prompt
            .as_deref()
            .map_or(0, |p| p.replace("{explanation}", "").len());
        Ok(RunShape {
            algo,
            train_mode: cfg.trainer.train_mode,
            a: cfg.model.activation_dim.unwrap_or(actor.hidden_size),
            actor,
            critic,
            critic_k,
            inject_layers: cfg.model.injection.layer_indices.clone(),
            project: cfg.model.injection.mode == InjectionMode::Project,
            weighted_pool: c.pooling == Pooling::Weighted,
            cls: c.pooling == Pooling::Cls,
            micro: cfg.data.micro_batch_size_per_gpu,
            max_length: cfg.data.train_dataset.max_length,
            max_new_tokens: cfg.generation.max_new_tokens,
            train_batch_size: cfg.data.train_batch_size,
            n: match algo {
                Algo::Grpo => g.n,
                _ => 1,
            },
            reference: algo == Algo::Grpo
                && g.use_kl_loss
                && g.kl_coef != 0.0
                && cfg.trainer.train_mode.has_actor(),
            critic_prompt_tokens,
        })
    }

    pub fn rl(&self) -> bool {
        self.algo != Algo::Sft
    }

    /// Rows one GPU handles per step: SFT rows, RL sequences (prompts x samples).
    pub fn rows_per_gpu(&self, gpus: usize) -> usize {
        let rows = if self.rl() {
            self.train_batch_size * self.n
        } else {
            self.train_batch_size
        };
        rows.div_ceil(gpus.max(1))
    }

    /// Rows of a micro-batch on one GPU.
    pub fn micro_rows(&self, gpus: usize) -> usize {
        self.micro.min(self.rows_per_gpu(gpus)).max(1)
    }

    /// Positions of an actor row: SFT the row, RL prompt + response.
    pub fn actor_t(&self) -> usize {
        if self.rl() {
            self.max_length + self.max_new_tokens
        } else {
            self.max_length
        }
    }

    /// Positions of a critic row.
    pub fn critic_t(&self) -> usize {
        let body = if self.rl() {
            self.max_length
                .min(self.critic_prompt_tokens + self.max_new_tokens)
        } else {
            self.max_length
        };
        body + usize::from(self.cls)
    }

    /// The models and phases of one step.
    pub fn step(&self, gpus: usize) -> (Vec<ModelSpec>, Vec<Phase>) {
        let actor_kind = ModelKind::Lm {
            inject_layers: self.inject_layers.clone(),
            a: self.a,
            project: self.project,
        };
        let critic_kind = ModelKind::Critic {
            k: self.critic_k,
            a: self.a,
            pool_len: self.weighted_pool.then_some(self.max_length + 1),
        };
        let mb = self.micro_rows(gpus);
        let (mut models, mut phases) = (vec![], vec![]);
        fn add(
            models: &mut Vec<ModelSpec>,
            name: &str,
            cfg: &ModelConfig,
            kind: ModelKind,
            trainable: bool,
        ) -> usize {
            models.push(ModelSpec {
                name: name.into(),
                cfg: cfg.clone(),
                kind,
                trainable,
            });
            models.len() - 1
        }
        if !self.rl() {
            if self.train_mode.has_actor() {
                let m = add(&mut models, "actor", &self.actor, actor_kind.clone(), true);
                phases.push(Phase::Train {
                    model: m,
                    b: mb,
                    t: self.actor_t(),
                    rl: false,
                    kl: false,
                });
                phases.push(Phase::Update { model: m });
            }
            if self.train_mode.has_critic() {
                let m = add(&mut models, "critic", &self.critic, critic_kind, true);
                phases.push(Phase::Train {
                    model: m,
                    b: mb,
                    t: self.critic_t(),
                    rl: false,
                    kl: false,
                });
                phases.push(Phase::Update { model: m });
            }
            return (models, phases);
        }
        let actor = add(&mut models, "actor", &self.actor, actor_kind.clone(), true);
        let train_critic = self.train_mode.has_critic();
        let critic = add(
            &mut models,
            "critic",
            &self.critic,
            critic_kind,
            train_critic,
        );
        let reference = self
            .reference
            .then(|| add(&mut models, "reference", &self.actor, actor_kind, false));
        phases.push(Phase::Rollout {
            model: actor,
            rows: self.rows_per_gpu(gpus),
            prompt: self.max_length,
            new_tokens: self.max_new_tokens,
        });
        let (ta, tc) = (self.actor_t(), self.critic_t());
        phases.push(Phase::Forward {
            model: critic,
            b: mb,
            t: tc,
            label: "reward".into(),
        });
        if train_critic {
            phases.push(Phase::Train {
                model: critic,
                b: mb,
                t: tc,
                rl: false,
                kl: false,
            });
            phases.push(Phase::Update { model: critic });
        }
        phases.push(Phase::Forward {
            model: actor,
            b: mb,
            t: ta,
            label: "old_logp".into(),
        });
        if let Some(r) = reference {
            phases.push(Phase::Forward {
                model: r,
                b: mb,
                t: ta,
                label: "ref_logp".into(),
            });
        }
        phases.push(Phase::Train {
            model: actor,
            b: mb,
            t: ta,
            rl: true,
            kl: reference.is_some(),
        });
        phases.push(Phase::Update { model: actor });
        (models, phases)
    }

    /// The planned step on one of `opts.gpus` GPUs.
    pub fn plan(&self, opts: &StepOptions) -> Result<StepPlan> {
        let (models, phases) = self.step(opts.gpus);
        let mut sp = plan_step(&models, &phases, opts)?;
        sp.engine_extra = self.engine_extra(opts, &sp)?;
        Ok(sp)
    }

    /// What the engine holds beyond the planned activation arena: its largest training pass's
    /// activation set ([`ActivationSet::plan_with`], one allocation for the pass whose buffers
    /// share memory as their lifetimes in the pass allow) minus the arena, with the activations
    /// in the policy's dtype.
    fn engine_extra(&self, opts: &StepOptions, sp: &StepPlan) -> Result<usize> {
        let work = opts.policy.activations;
        let memory = MemoryOptions {
            logits_chunk: opts.logits_chunk,
            recompute: opts.recompute,
        };
        let mb = self.micro_rows(opts.gpus);
        let mut largest = 0;
        if self.rl() || self.train_mode.has_actor() {
            let set = ActivationSet::plan_with(&self.actor, mb, self.actor_t(), memory);
            largest = set.bytes(work)?;
        }
        if self.rl() || self.train_mode.has_critic() {
            let mut cfg = self.critic.clone();
            cfg.num_hidden_layers = self.critic_k + 1;
            let set = ActivationSet::plan_blocks(&cfg, mb, self.critic_t(), opts.recompute);
            largest = largest.max(set.bytes(work)?);
        }
        Ok(largest.saturating_sub(sp.plan.arena_size(ArenaKind::Activations)))
    }

    /// The same step planned without reuse (each buffer its own memory), to compare.
    pub fn plan_without_reuse(&self, opts: &StepOptions) -> Result<StepPlan> {
        let (models, phases) = self.step(opts.gpus);
        let popts = PlanOptions {
            reuse: false,
            ..PlanOptions::default()
        };
        plan_step_with(&models, &phases, opts, &popts)
    }
}

/// A change to the run and the peak it gives.
#[derive(Clone, Debug, PartialEq)]
pub struct Remedy {
    /// How to ask for it (`--set data.micro_batch_size_per_gpu=4`, `--recompute block`).
    pub change: String,
    /// Bytes per GPU with the change.
    pub peak: usize,
    pub fits: bool,
}

fn peak(shape: &RunShape, opts: &StepOptions) -> Result<usize> {
    Ok(shape.plan(opts)?.needed())
}

/// The largest value in 1..cur whose plan fits `budget` (binary search; the peak grows with
/// the value), or 1 with its peak when even that does not fit. None when cur <= 1.
fn largest_fitting(
    cur: usize,
    budget: usize,
    f: impl Fn(usize) -> Result<usize>,
) -> Result<Option<(usize, usize, bool)>> {
    if cur <= 1 {
        return Ok(None);
    }
    let p1 = f(1)?;
    if p1 > budget {
        return Ok(Some((1, p1, false)));
    }
    let (mut lo, mut lo_peak, mut hi) = (1usize, p1, cur);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let p = f(mid)?;
        if p <= budget {
            (lo, lo_peak) = (mid, p);
        } else {
            hi = mid;
        }
    }
    Ok(Some((lo, lo_peak, true)))
}

/// GPU counts tried for "more GPUs" (powers of two).
const MAX_GPUS: usize = 1024;

/// The smallest power-of-two GPU count above the current one whose plan fits (or the largest
/// tried, not fitting), with ZeRO-3 when no ZeRO stage was set.
fn fewest_gpus(
    shape: &RunShape,
    opts: &StepOptions,
    budget: usize,
) -> Result<Option<(StepOptions, usize, bool)>> {
    let mut g = opts.gpus.max(1).next_power_of_two();
    if g == opts.gpus {
        g *= 2;
    }
    let mut last = None;
    while g <= MAX_GPUS {
        let o = StepOptions {
            gpus: g,
            // sharding is what more GPUs buy: ZeRO-3 when none was asked for
            zero_stage: if opts.zero_stage == 0 {
                3
            } else {
                opts.zero_stage
            },
            ..*opts
        };
        let p = peak(shape, &o)?;
        if p <= budget {
            return Ok(Some((o, p, true)));
        }
        last = Some((o, p, false));
        g *= 2;
    }
    Ok(last)
}

fn gpus_flag(o: &StepOptions, before: &StepOptions) -> String {
    let mut s = format!("--gpus {}", o.gpus);
    if o.zero_stage != before.zero_stage {
        s += &format!(" --zero-stage {}", o.zero_stage);
    }
    s
}

/// Each change alone (everything else as configured) that lowers the peak, with the figure
/// it gives: the largest micro-batch / length / batch that fits (or the smallest tried),
/// activation recompute, chunked logits, the fewest GPUs that fit, and recompute with GPUs.
pub fn remedies(shape: &RunShape, opts: &StepOptions, budget: usize) -> Result<Vec<Remedy>> {
    let mut out = vec![];
    let mut knob = |key: &str, cur: usize, set: &dyn Fn(&mut RunShape, usize)| -> Result<()> {
        let f = |v: usize| {
            let mut s = shape.clone();
            set(&mut s, v);
            peak(&s, opts)
        };
        if let Some((v, p, fits)) = largest_fitting(cur, budget, f)? {
            out.push(Remedy {
                change: format!("--set {key}={v}"),
                peak: p,
                fits,
            });
        }
        Ok(())
    };
    // a micro-batch larger than a GPU's rows is not used: start from what is
    knob(
        "data.micro_batch_size_per_gpu",
        shape.micro_rows(opts.gpus),
        &|s: &mut RunShape, v: usize| s.micro = v,
    )?;
    knob(
        "data.train_dataset.max_length",
        shape.max_length,
        &|s: &mut RunShape, v: usize| s.max_length = v,
    )?;
    if shape.rl() {
        knob(
            "generation.max_new_tokens",
            shape.max_new_tokens,
            &|s: &mut RunShape, v: usize| s.max_new_tokens = v,
        )?;
        knob(
            "data.train_batch_size",
            shape.train_batch_size,
            &|s: &mut RunShape, v: usize| s.train_batch_size = v,
        )?;
    }
    let recompute = StepOptions {
        recompute: Recompute::Block,
        ..*opts
    };
    if opts.recompute == Recompute::None {
        let p = peak(shape, &recompute)?;
        out.push(Remedy {
            change: "--recompute block (trainer.recompute: block)".into(),
            peak: p,
            fits: p <= budget,
        });
    }
    if opts.logits_chunk.is_none() {
        let chunk = 4096;
        if shape.actor.vocab_size > chunk && shape.train_mode.has_actor() {
            let o = StepOptions {
                logits_chunk: Some(chunk),
                ..*opts
            };
            let p = peak(shape, &o)?;
            out.push(Remedy {
                change: format!("--logits-chunk {chunk} (trainer.logits_chunk: {chunk})"),
                peak: p,
                fits: p <= budget,
            });
        }
    }
    if let Some((o, p, fits)) = fewest_gpus(shape, opts, budget)? {
        out.push(Remedy {
            change: gpus_flag(&o, opts),
            peak: p,
            fits,
        });
    }
    if opts.recompute == Recompute::None {
        if let Some((o, p, fits)) = fewest_gpus(shape, &recompute, budget)? {
            out.push(Remedy {
                change: format!("--recompute block {}", gpus_flag(&o, opts)),
                peak: p,
                fits,
            });
        }
    }
    Ok(out)
}

/// Ok with a line saying it fits, or the error that says by how much it does not and what
/// to change (from [`remedies`]).
pub fn check_fits(
    shape: &RunShape,
    opts: &StepOptions,
    plan: &StepPlan,
    budget: usize,
) -> Result<String> {
    let peak = plan.needed();
    let per = per_what(opts);
    if peak <= budget {
        return Ok(format!(
            "fits: {} per {per} of {} ({} left)",
            gib(peak),
            gib(budget),
            gib(budget - peak)
        ));
    }
    let mut msg = format!(
        "the step needs {} per {per}, more than the {} given (--gpu-memory). Each change \
         alone, the rest as configured:",
        gib(peak),
        gib(budget)
    );
    let rem = remedies(shape, opts, budget)?;
    let width = rem.iter().map(|r| r.change.len()).max().unwrap_or(0);
    for r in &rem {
        msg += &format!(
            "\n  {:width$}  -> {} per {per}{}",
            r.change,
            gib(r.peak),
            if r.fits {
                ", fits"
            } else {
                ", still too large"
            }
        );
    }
    if !rem.iter().any(|r| r.fits) {
        msg += "\n  no single change is enough: combine them";
    }
    Err(Error::invalid("plan", msg))
}

fn per_what(opts: &StepOptions) -> &'static str {
    if opts.policy == super::DtypePolicy::cpu() {
        "device"
    } else {
        "GPU"
    }
}

fn algo_name(a: Algo) -> &'static str {
    match a {
        Algo::Sft => "sft",
        Algo::Grpo => "grpo",
        Algo::Ppo => "ppo",
    }
}

fn part_name(p: Part) -> &'static str {
    match p {
        Part::Actor => "actor",
        Part::Critic => "critic",
        Part::Both => "both",
    }
}

/// The printed plan: options, models, passes, each arena's size and the peak per GPU.
/// `without_reuse`: the peak of the same step with no reuse, when computed.
pub fn report(
    shape: &RunShape,
    opts: &StepOptions,
    plan: &StepPlan,
    without_reuse: Option<usize>,
) -> String {
    let per = per_what(opts);
    let mut s = String::new();
    let mut line = |l: String| {
        s += &l;
        s.push('\n');
    };
    line(format!(
        "step        {}, train_mode {}",
        algo_name(shape.algo),
        part_name(shape.train_mode)
    ));
    line(format!("precision   {}", opts.policy.describe()));
    let zero = if opts.gpus > 1 {
        format!("ZeRO-{}", opts.zero_stage)
    } else {
        "no sharding".into()
    };
    line(format!(
        "parallel    {} {per}{} ({zero}), recompute {}, logits {}",
        opts.gpus,
        if opts.gpus == 1 { "" } else { "s" },
        opts.recompute.name(),
        opts.logits_chunk
            .map_or("whole".into(), |c| format!("in chunks of {c}"))
    ));
    line("models".into());
    for m in &plan.models {
        let what = if m.name == "critic" {
            format!(
                "blocks 0..={} of {}, d_model {}",
                shape.critic_k, shape.critic.num_hidden_layers, shape.critic.hidden_size
            )
        } else {
            format!("{} blocks, d_model {}", m.layers, shape.actor.hidden_size)
        };
        let count = if m.params >= 1_000_000_000 {
            format!("{:.3} B", m.params as f64 / 1e9)
        } else {
            format!("{:.3} M", m.params as f64 / 1e6)
        };
        line(format!(
            "  {:<10}{what}, {count} parameters, {}; {} {} per {per}",
            m.name,
            if m.trainable { "trained" } else { "frozen" },
            if m.trainable {
                "weights + grads + optimizer"
            } else {
                "weights"
            },
            gib(m.persistent_bytes)
        ));
    }
    line(format!("passes      (per {per})"));
    let mb = shape.micro_rows(opts.gpus);
    if shape.rl() {
        line(format!(
            "  rollout   {} sequences x ({} prompt + {} new) positions, KV cache {}",
            shape.rows_per_gpu(opts.gpus),
            shape.max_length,
            shape.max_new_tokens,
            opts.policy.activations
        ));
        line(format!(
            "  critic    micro-batch {mb} x {} positions (reward{})",
            shape.critic_t(),
            if shape.train_mode.has_critic() {
                ", update"
            } else {
                ""
            }
        ));
        line(format!(
            "  actor     micro-batch {mb} x {} positions (old log-probs{}, update)",
            shape.actor_t(),
            if shape.reference {
                ", reference log-probs"
            } else {
                ""
            }
        ));
    } else {
        if shape.train_mode.has_actor() {
            line(format!(
                "  actor     micro-batch {mb} x {} positions",
                shape.actor_t()
            ));
        }
        if shape.train_mode.has_critic() {
            line(format!(
                "  critic    micro-batch {mb} x {} positions",
                shape.critic_t()
            ));
        }
    }
    line(format!(
        "arenas      (per {per})      size   buffers   without reuse   most live at once"
    ));
    for k in ArenaKind::ALL {
        match plan.plan.arena(k) {
            Some(a) => line(format!(
                "  {:<12}{:>14}{:>10}{:>16}{:>20}",
                k.name(),
                gib(a.size),
                a.buffers,
                gib(a.declared),
                gib(a.max_live)
            )),
            None => line(format!("  {:<12}{:>14}{:>10}", k.name(), gib(0), 0)),
        }
    }
    let (live, op) = plan.busiest_op();
    line(format!(
        "peak        {} per {per} (the sum of the arenas, each allocated once)",
        gib(plan.plan.peak)
    ));
    line(format!(
        "lower bound {} live at the busiest op ({} ops; busiest: `{op}`)",
        gib(live),
        plan.ops.len()
    ));
    if plan.engine_extra > 0 {
        line(format!(
            "engine      {} more: a pass's activation set shares memory by phase, the plan by op; {} needed",
            gib(plan.engine_extra),
            gib(plan.needed())
        ));
    }
    if let Some(w) = without_reuse {
        line(format!(
            "no reuse    {} (every buffer its own memory)",
            gib(w)
        ));
    }
    s
}
