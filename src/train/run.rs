//! `nla-engine train`: the training loop of SFT, GRPO and PPO over a run config.
//!
//! Each step reads `data.train_batch_size` samples (SFT) or prompts (RL) from the training set,
//! runs one optimizer step per trained part (the critic `trainer.critic_epochs` times in SFT,
//! `ppo.critic_train_epochs` in PPO), writes a line of metrics to `save_dir/metrics.jsonl`, and
//! every `val_steps` (and at the end) a validation line; every `save_steps` (and at the end) a
//! checkpoint `save_dir/step-NNNNNNNN/` with `actor/`, `critic/` (HF folders with tokenizer),
//! both optimizers, `trainer_state.json` and the config. `trainer.resume` continues from a
//! checkpoint: weights, moments, step and data position, so the metrics after a resume equal
//! an uninterrupted run's.
//!
//! Validation reads the first `data.val_batch_size` rows of the validation set: the actor's
//! SFT loss on them, the critic's fidelity on their responses (`critic_*`), and with both
//! models the round trip (`nla_*`): the actor explains each vector greedily, the critic
//! reconstructs it from that explanation (a failed explanation counts as a zero prediction).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{Algo, Part, Resume, RunConfig};
use crate::data::{DatasetReader, Mode, Sample};
use crate::device::{
    Advantage, Device, Dtype, KlType, LossAgg, PolicyLossSpec, RewardSpec, SampleSpec,
};
use crate::generate::{generate_with, GenSpec, PromptInjection, StopReason};
use crate::memory::{check_fits, DtypePolicy, RunShape, StepOptions};
use crate::model::{load_config, MemoryOptions};
use crate::nla::{Actor, ActorExample, CriticExample, Outcome, SkipCounts};
use crate::train::checkpoint::{
    latest_checkpoint, load_adamw, save_adamw, save_checkpoint, TrainerState,
};
use crate::train::metrics::{fidelity, mean_vector, FidelityOpts, MetricsWriter, Record, Split};
use crate::train::nla::{rewards, ActorTrainer, CriticTrainer, RlSequence};
use crate::train::progress::Progress;
use crate::train::setup::{self, ActorSide, CriticSide};
use crate::{Error, Result};

/// Rows read to estimate the FVE baseline (the mean normalised vector), as [O] (50k).
const BASELINE_ROWS: usize = 50_000;

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: u64,
    pub last_train: Option<Record>,
    pub last_val: Option<Record>,
    pub metrics: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
}

/// The models of a run, with their trainers.
pub struct Parts<D: Device> {
    pub actor: Option<(ActorSide, ActorTrainer<D>)>,
    pub critic: Option<(CriticSide, CriticTrainer<D>)>,
}

/// Endless samples of a dataset: a new epoch when one ends; counts its position.
struct Stream {
    reader: DatasetReader,
    in_epoch: u64,
}

impl Stream {
    fn next(&mut self) -> Result<Sample> {
        for _ in 0..2 {
            if let Some(row) = self.reader.next() {
                self.in_epoch += 1;
                return row;
            }
            self.reader.next_epoch();
            self.in_epoch = 0;
        }
        Err(Error::invalid(
            "train",
            format!(
                "the training data gives no usable row ({})",
                self.reader.stats()
            ),
        ))
    }
}

fn cfg_err(cfg: &RunConfig, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: cfg.source.clone(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// Loads actor and critic as the config's algorithm and `train_mode` need them; `ckpt` = the
/// checkpoint to resume from.
fn load_parts<D: Device>(dev: &D, cfg: &RunConfig, ckpt: Option<&Path>) -> Result<Parts<D>> {
    let algo = cfg.trainer.algo;
    let mode = cfg.trainer.train_mode;
    let rl = algo != Algo::Sft;
    if rl && mode == Part::Critic {
        return Err(cfg_err(
            cfg,
            "trainer.train_mode",
            "critic: RL trains the actor (train_mode actor or both)",
        ));
    }
    let want_actor = mode.has_actor();
    let want_critic = mode.has_critic() || rl;
    // a device with fixed memory (a GPU): the phases of a step share the activation memory,
    // as the step's plan assumes, so each trainer hands its buffers back after its pass
    let fixed_memory = dev.memory_budget()?.is_some();
    let max_norm = cfg.optim.max_norm as f32;
    let actor = if want_actor {
        let path = match ckpt {
            Some(c) => c.join("actor"),
            None => setup::model_path(cfg, "model.model_name", &cfg.model.model_name)?,
        };
        let (side, actor) = setup::load_actor(dev, cfg, &path)?;
        let mut t = ActorTrainer::new(
            dev,
            actor,
            cfg.optim.adamw(),
            cfg.actor_schedule(),
            max_norm,
        )?;
        t.memory = MemoryOptions {
            logits_chunk: cfg.trainer.logits_chunk,
            recompute: cfg.trainer.recompute,
        };
        t.release_acts = fixed_memory;
        Some((side, t))
    } else {
        None
    };
    let critic = if want_critic {
        let path = match ckpt {
            Some(c) if c.join("critic").is_dir() => c.join("critic"),
            _ => setup::model_path(cfg, "model.critic.model_name", cfg.critic_model_name())?,
        };
        let a = actor.as_ref().map(|(_, t)| t.actor.spec.a);
        let (side, critic) = setup::load_critic(dev, cfg, &path, a)?;
        let mut t = CriticTrainer::new(
            dev,
            critic,
            cfg.optim.adamw(),
            cfg.critic_schedule(),
            max_norm,
            side.mse_scale,
        )?;
        t.recompute = cfg.trainer.recompute;
        t.release_acts = fixed_memory;
        Some((side, t))
    } else {
        None
    };
    Ok(Parts { actor, critic })
}

/// Fails before anything is loaded when the memory plan of this run's step (weights,
/// gradients, AdamW state and activations of actor and critic in the device's working dtype
/// `work`: `nla-engine plan --precision f32|bf16`) does not fit the `budget` bytes the device
/// has free; the error lists the changes that would make it fit.
fn check_memory(cfg: &RunConfig, budget: usize, work: Dtype) -> Result<()> {
    let actor = setup::model_path(cfg, "model.model_name", &cfg.model.model_name)?;
    let critic = setup::model_path(cfg, "model.critic.model_name", cfg.critic_model_name())?;
    let shape = RunShape::from_config(cfg, load_config(&actor)?, load_config(&critic)?)?;
    let opts = StepOptions {
        policy: match work {
            Dtype::F32 => DtypePolicy::cpu(),
            _ => DtypePolicy::cuda(),
        },
        recompute: cfg.trainer.recompute,
        gpus: 1,
        zero_stage: 0,
        logits_chunk: cfg.trainer.logits_chunk,
    };
    let plan = shape.plan(&opts)?;
    check_fits(&shape, &opts, &plan, budget).map_err(|e| {
        Error::invalid(
            "train",
            format!("this run does not fit the device's free memory: {e}"),
        )
    })?;
    Ok(())
}

/// Trains as `cfg` says on `dev`; `bar` forces the progress bar on or off (None = a bar on a
/// terminal).
pub fn train<D: Device>(dev: &D, cfg: &RunConfig, bar: Option<bool>) -> Result<RunSummary> {
    let tc = &cfg.trainer;
    let ckpt = match &tc.resume {
        Resume::No => None,
        Resume::Latest => latest_checkpoint(&tc.save_dir)?.map(|(_, p)| p),
        Resume::From(p) => Some(p.clone()),
    };
    let state = match &ckpt {
        Some(p) => Some(TrainerState::load(&p.join("trainer_state.json"))?),
        None => None,
    };
    let kind = format!("{:?}/{:?}", tc.algo, tc.train_mode).to_lowercase();
    if let Some(s) = &state {
        if s.kind != kind {
            return Err(cfg_err(
                cfg,
                "trainer.resume",
                format!(
                    "the checkpoint is of a {} run, this config runs {kind}; start the new stage \
                     from its weights (model.model_name = .../actor) with resume: false",
                    s.kind
                ),
            ));
        }
    }
    if let Some(budget) = dev.memory_budget()? {
        check_memory(cfg, budget, dev.work_dtype())?;
    }
    let mut parts = load_parts(dev, cfg, ckpt.as_deref())?;
    let a = parts
        .actor
        .as_ref()
        .map(|(_, t)| t.actor.spec.a)
        .or(parts.critic.as_ref().map(|(_, t)| t.critic.spec.a))
        .unwrap_or(0);
    if let Some(p) = &ckpt {
        if let Some((_, t)) = parts.actor.as_mut() {
            load_adamw(dev, &mut t.opt.adamw, &p.join("actor_optim.safetensors"))?;
        }
        if let Some((_, t)) = parts.critic.as_mut() {
            let f = p.join("critic_optim.safetensors");
            if f.is_file() {
                load_adamw(dev, &mut t.opt.adamw, &f)?;
            }
        }
    }
    let rl = tc.algo != Algo::Sft;
    let data_mode = if rl {
        Mode::Actor
    } else {
        match tc.train_mode {
            Part::Actor => Mode::Actor,
            Part::Critic => Mode::Critic,
            Part::Both => Mode::Both,
        }
    };
    let spec = setup::dataset_spec(cfg, "train_dataset", data_mode, a, !rl)?;
    let mut stream = Stream {
        reader: DatasetReader::open(spec.clone())?,
        in_epoch: 0,
    };
    let start = state.as_ref().map_or(0, |s| s.step);
    if let Some(s) = &state {
        stream.reader.set_epoch(s.epoch);
        for _ in 0..s.samples_in_epoch {
            stream.next()?;
        }
    }
    let mse_scale = parts.critic.as_ref().and_then(|(s, _)| s.mse_scale);
    let baseline = baseline_mean(&spec, a, mse_scale)?;
    let reference = match (&parts.actor, tc.algo) {
        (Some(_), Algo::Grpo) if cfg.grpo.use_kl_loss && cfg.grpo.kl_coef != 0.0 => {
            // the policy the run starts from: the initial weights and injection projection
            let path = setup::model_path(cfg, "model.model_name", &cfg.model.model_name)?;
            let mut r = setup::load_actor(dev, cfg, &path)?.1;
            r.model.freeze(dev)?; // forward only: no gradients
            Some(r)
        }
        _ => None,
    };

    std::fs::create_dir_all(&tc.save_dir).map_err(|e| Error::io(&tc.save_dir, e))?;
    let metrics_path = tc.save_dir.join("metrics.jsonl");
    let mut metrics = if start > 0 {
        MetricsWriter::open_for_resume(&metrics_path, start)?
    } else {
        MetricsWriter::create(&metrics_path)?
    };
    let total = tc.total_training_steps;
    let mut progress = match bar {
        Some(b) => Progress::with_bar(start, total, tc.logging_steps, b),
        None => Progress::new(start, total, tc.logging_steps),
    };
    let mut summary = RunSummary {
        steps: start,
        last_train: None,
        last_val: None,
        metrics: metrics_path.clone(),
        last_checkpoint: ckpt.clone(),
    };
    if start == 0 && tc.val_steps > 0 && cfg.data.val_dataset.is_some() {
        let rec = validate(dev, cfg, &mut parts, a, &baseline)?;
        metrics.write(0, Split::Val, &rec)?;
        summary.last_val = Some(rec);
    }
    let mut skips = SkipCounts::default();
    for step in start + 1..=total {
        let t0 = Instant::now();
        let mut rec = if rl {
            rl_step(
                dev,
                cfg,
                &mut parts,
                &mut stream,
                &mut skips,
                reference.as_ref(),
                step,
                &baseline,
            )?
        } else {
            sft_step(dev, cfg, &mut parts, &mut stream, &mut skips, &baseline)?
        };
        let secs = t0.elapsed().as_secs_f64();
        let tokens = rec.get("tokens").unwrap_or(0.0);
        rec.set("tokens_per_s", tokens / secs);
        rec.set("samples_per_s", cfg.data.train_batch_size as f64 / secs);
        rec.set("step_s", secs);
        rec.set("skipped", skips.total() as f64);
        rec.set("epoch", stream.reader.epoch() as f64);
        metrics.write(step, Split::Train, &rec)?;
        progress.update(
            step,
            &rec,
            &["actor_loss", "critic_loss", "reward_mean", "critic_fve"],
        );
        summary.last_train = Some(rec);
        summary.steps = step;
        let last = step == total;
        if cfg.data.val_dataset.is_some() && tc.val_steps > 0 && (step % tc.val_steps == 0 || last)
        {
            let rec = validate(dev, cfg, &mut parts, a, &baseline)?;
            progress.println(&format!(
                "step {step} val: {}",
                crate::train::progress::summary(
                    &rec,
                    &["actor_loss", "critic_fve", "nla_fve", "nla_failed"]
                )
            ));
            metrics.write(step, Split::Val, &rec)?;
            summary.last_val = Some(rec);
        }
        if (tc.save_steps > 0 && step % tc.save_steps == 0) || last {
            let st = TrainerState {
                step,
                seed: tc.seed,
                epoch: stream.reader.epoch(),
                samples_in_epoch: stream.in_epoch,
                kind: kind.clone(),
            };
            let path = save(dev, cfg, &parts, &st)?;
            summary.last_checkpoint = Some(path);
        }
    }
    progress.finish();
    Ok(summary)
}

/// Writes a checkpoint of the run.
fn save<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    parts: &Parts<D>,
    st: &TrainerState,
) -> Result<PathBuf> {
    let keep = cfg.trainer.save_total_limit.unwrap_or(0);
    save_checkpoint(&cfg.trainer.save_dir, st.step, keep, |dir| {
        if let Some((side, t)) = &parts.actor {
            let d = dir.join("actor");
            t.actor.save(dev, &d)?;
            side.tok.save(&d.join("tokenizer.json"))?;
            side.template.save_hf(&d)?;
            save_adamw(dev, &t.opt.adamw, &dir.join("actor_optim.safetensors"))?;
        }
        if let Some((side, t)) = &parts.critic {
            let d = dir.join("critic");
            t.critic.save(dev, &d)?;
            side.tok.save(&d.join("tokenizer.json"))?;
            save_adamw(dev, &t.opt.adamw, &dir.join("critic_optim.safetensors"))?;
        }
        st.save(&dir.join("trainer_state.json"))?;
        let yaml = cfg.to_yaml()?;
        let p = dir.join("config.yaml");
        std::fs::write(&p, yaml).map_err(|e| Error::io(&p, e))
    })
}

/// The FVE baseline: the mean of the first rows' normalised vectors.
fn baseline_mean(
    spec: &crate::data::DatasetSpec,
    a: usize,
    scale: Option<f32>,
) -> Result<Vec<f32>> {
    let mut s = spec.clone();
    s.shuffle = false;
    s.mode = Mode::Critic;
    s.require_response = false;
    let mut flat = vec![];
    for row in DatasetReader::open(s)?.take(BASELINE_ROWS) {
        flat.extend(row?.vectors.into_iter().flatten());
    }
    mean_vector(&flat, a, scale)
}

/// The next `n` samples and their actor / critic examples (skips counted).
#[allow(clippy::type_complexity)]
fn next_examples<D: Device>(
    cfg: &RunConfig,
    parts: &Parts<D>,
    stream: &mut Stream,
    skips: &mut SkipCounts,
    n: usize,
    response: bool,
) -> Result<(Vec<ActorExample>, Vec<CriticExample>)> {
    let aenc = parts
        .actor
        .as_ref()
        .map(|(s, _)| setup::actor_encoder(cfg, s))
        .transpose()?;
    let cenc = parts
        .critic
        .as_ref()
        .filter(|_| response)
        .map(|(s, _)| (setup::critic_encoder(cfg, s), s.cls_id));
    let (mut ax, mut cx) = (vec![], vec![]);
    let mut tries = 0usize;
    while ax.len().max(cx.len()) < n {
        tries += 1;
        if tries > 100 * n + 1000 {
            return Err(Error::invalid(
                "train",
                format!(
                    "{} of the last rows were skipped (too long or unparseable): check max_length",
                    skips.total()
                ),
            ));
        }
        let sample = stream.next()?;
        if let Some(enc) = &aenc {
            let ex = if response {
                enc.example(&sample)?
            } else {
                enc.prompt(&sample)?
            };
            if let Some(ex) = skips.take(ex) {
                ax.push(ex);
            }
        }
        if let Some((enc, cls)) = &cenc {
            if let Some(mut ex) = skips.take(enc.example(&sample)?) {
                ex.ids.extend(cls.iter());
                cx.push(ex);
            }
        }
    }
    Ok((ax, cx))
}

fn sft_step<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    parts: &mut Parts<D>,
    stream: &mut Stream,
    skips: &mut SkipCounts,
    baseline: &[f32],
) -> Result<Record> {
    let n = cfg.data.train_batch_size;
    let micro = cfg.data.micro_batch_size_per_gpu;
    let (ax, cx) = next_examples(cfg, parts, stream, skips, n, true)?;
    let mut rec = Record::new();
    let mut tokens = 0;
    if let Some((side, t)) = parts.actor.as_mut() {
        let s = t.sft_step(dev, &ax, micro, side.pad_id)?;
        rec.set("actor_loss", s.loss);
        rec.set("actor_grad_norm", s.grad_norm);
        rec.set("actor_lr", s.lr as f64);
        tokens += s.tokens;
    }
    if let Some((side, t)) = parts.critic.as_mut() {
        for _ in 0..cfg.trainer.critic_epochs.max(1) {
            let (s, pass) = t.step(dev, &cx, None, micro, side.pad_id)?;
            rec.set("critic_loss", s.loss);
            rec.set("critic_grad_norm", s.grad_norm);
            rec.set("critic_lr", s.lr as f64);
            tokens += s.tokens;
            let target: Vec<f32> = cx.iter().flat_map(|e| e.target.iter().copied()).collect();
            let f = fidelity(
                &pass.pred,
                &target,
                t.critic.spec.a,
                fopts(t.mse_scale, baseline),
            )?;
            rec = rec.with_fidelity("critic_", &f);
        }
    }
    rec.set("tokens", tokens as f64);
    Ok(rec)
}

fn fopts(scale: Option<f32>, baseline: &[f32]) -> FidelityOpts<'_> {
    FidelityOpts {
        scale,
        baseline_mean: Some(baseline),
    }
}

/// The sampling of the config's `generation` section (`greedy` forces temperature 0).
pub fn sample_spec(cfg: &RunConfig, greedy: bool) -> SampleSpec {
    let g = &cfg.generation;
    SampleSpec {
        temperature: if greedy { 0.0 } else { g.temperature as f32 },
        top_k: if g.top_k > 0 { g.top_k as usize } else { 0 },
        top_p: g.top_p as f32,
    }
}

/// One generated explanation per (prompt, sample), with the critic's input when it parses.
pub struct Explanation {
    pub prompt: usize,
    pub tokens: Vec<u32>,
    /// log-prob of each token under the sampling distribution
    pub logps: Vec<f32>,
    pub text: String,
    pub stop: StopReason,
    /// the critic's input ids; None = a failure (truncated, untagged or too long)
    pub critic_ids: Option<Vec<u32>>,
}

/// Samples `n` explanations of each prompt example (its vectors injected at prefill).
#[allow(clippy::too_many_arguments)]
pub fn explain<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    actor: &ActorSide,
    actor_model: &crate::nla::Actor<D>,
    critic: Option<&CriticSide>,
    prompts: &[ActorExample],
    n: usize,
    sample: SampleSpec,
    seed: u64,
) -> Result<Vec<Explanation>> {
    let a = actor_model.spec.a;
    let mut vecs = vec![];
    for p in prompts {
        let flat: Vec<f32> = p.vectors.iter().flatten().copied().collect();
        vecs.push(actor_model.injected_vectors(dev, &flat, flat.len() / a.max(1))?);
    }
    let inj = PromptInjection {
        layers: actor_model.spec.layers.clone(),
        mode: actor_model.spec.inject_mode(),
        sites: prompts.iter().map(|p| p.sites.clone()).collect(),
        vecs,
    };
    let enc = setup::actor_encoder(cfg, actor)?;
    let mut eos = vec![enc.end_id()];
    if let Some(e) = actor
        .template
        .eos_token()
        .and_then(|t| actor.tok.token_to_id(t))
    {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let spec = GenSpec {
        n,
        max_new_tokens: cfg.generation.max_new_tokens,
        sample,
        eos_ids: eos.clone(),
        seed,
    };
    let stops = &cfg.generation.stop;
    let tok = &actor.tok;
    let stop = |t: &[u32]| -> bool {
        !stops.is_empty()
            && tok
                .decode(t, true)
                .is_ok_and(|s| stops.iter().any(|x| s.contains(x.as_str())))
    };
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let out = generate_with(dev, &actor_model.model, &ids, &spec, Some(&inj), &stop)?;
    let cenc = critic.map(|c| (setup::critic_encoder(cfg, c), c.cls_id));
    let mut res = Vec::with_capacity(out.len());
    for s in out {
        let body: &[u32] = match s.tokens.last() {
            Some(t) if eos.contains(t) => &s.tokens[..s.tokens.len() - 1],
            _ => &s.tokens,
        };
        let text = tok.decode(body, true)?;
        let critic_ids = match (&cenc, s.stop) {
            (Some((enc, cls)), StopReason::Eos | StopReason::Stop) => match enc.ids(&text, None) {
                Ok(Outcome::Example(mut ids)) if !ids.is_empty() => {
                    ids.extend(cls.iter());
                    Some(ids)
                }
                _ => None,
            },
            _ => None,
        };
        res.push(Explanation {
            prompt: s.prompt,
            logps: s.logps,
            tokens: s.tokens,
            text,
            stop: s.stop,
            critic_ids,
        });
    }
    Ok(res)
}

/// Critic predictions [S,A] for explanations (zeros for failures), and the valid flags.
fn reconstruct_all<D: Device>(
    dev: &D,
    side: &CriticSide,
    t: &mut CriticTrainer<D>,
    expl: &[Explanation],
    targets: &[Vec<f32>],
    micro: usize,
) -> Result<(Vec<f32>, Vec<bool>, Vec<CriticExample>)> {
    let a = t.critic.spec.a;
    let valid: Vec<bool> = expl.iter().map(|e| e.critic_ids.is_some()).collect();
    let examples: Vec<CriticExample> = expl
        .iter()
        .zip(targets)
        .filter_map(|(e, g)| {
            e.critic_ids.as_ref().map(|ids| CriticExample {
                ids: ids.clone(),
                target: g.clone(),
            })
        })
        .collect();
    let mut pred = vec![0f32; expl.len() * a];
    if !examples.is_empty() {
        let pass = t.pass(dev, &examples, None, micro, side.pad_id, false, 1)?;
        let mut k = 0;
        for (i, v) in valid.iter().enumerate() {
            if *v {
                pred[i * a..(i + 1) * a].copy_from_slice(&pass.pred[k * a..(k + 1) * a]);
                k += 1;
            }
        }
    }
    Ok((pred, valid, examples))
}

#[allow(clippy::too_many_arguments)]
fn rl_step<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    parts: &mut Parts<D>,
    stream: &mut Stream,
    skips: &mut SkipCounts,
    reference: Option<&Actor<D>>,
    step: u64,
    baseline: &[f32],
) -> Result<Record> {
    let ppo = cfg.trainer.algo == Algo::Ppo;
    let g = &cfg.grpo;
    let n = if ppo { 1 } else { g.n.max(1) };
    let micro = cfg.data.micro_batch_size_per_gpu;
    let (prompts, _) = next_examples(cfg, parts, stream, skips, cfg.data.train_batch_size, false)?;
    let train_critic = cfg.trainer.train_mode.has_critic();
    let (Some((aside, at)), Some((cside, ct))) = (parts.actor.as_mut(), parts.critic.as_mut())
    else {
        return Err(Error::invalid("rl step", "RL needs an actor and a critic"));
    };
    let mut rec = Record::new();
    // 1. rollout
    let t0 = Instant::now();
    let seed = cfg.generation.seed.unwrap_or(cfg.trainer.seed) ^ step.wrapping_mul(0x9E37_79B9);
    let expl = explain(
        dev,
        cfg,
        aside,
        &at.actor,
        Some(cside),
        &prompts,
        n,
        sample_spec(cfg, false),
        seed,
    )?;
    let gen_s = t0.elapsed().as_secs_f64();
    let gen_tokens: usize = expl.iter().map(|e| e.tokens.len()).sum();
    // 2. rewards from the live critic
    let t1 = Instant::now();
    let targets: Vec<Vec<f32>> = expl
        .iter()
        .map(|e| {
            prompts[e.prompt]
                .vectors
                .first()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let a = ct.critic.spec.a;
    if let Some(t) = targets.iter().find(|t| t.len() != a) {
        return Err(Error::invalid(
            "rl step",
            format!(
                "RL needs one vector of {a} values per prompt, got {}",
                t.len()
            ),
        ));
    }
    let (pred, valid, cex) = reconstruct_all(dev, cside, ct, &expl, &targets, micro)?;
    let flat_t: Vec<f32> = targets.iter().flatten().copied().collect();
    let spec = reward_spec(cfg, ct.mse_scale, n, ppo);
    let r = rewards(dev, &pred, &flat_t, &valid, a, &spec)?;
    let reward_s = t1.elapsed().as_secs_f64();
    let (rm, rs) = mean_std(&r.reward);
    let (am, asd) = mean_std(&r.advantage);
    rec.set("reward_mean", rm);
    rec.set("reward_std", rs);
    rec.set("advantage_mean", am);
    rec.set("advantage_std", asd);
    rec.set(
        "failed_frac",
        valid.iter().filter(|v| !**v).count() as f64 / valid.len() as f64,
    );
    rec.set(
        "truncated_frac",
        expl.iter().filter(|e| e.stop == StopReason::Length).count() as f64 / expl.len() as f64,
    );
    rec.set("response_len", gen_tokens as f64 / expl.len() as f64);
    let vp: Vec<f32> = (0..valid.len())
        .filter(|&i| valid[i])
        .flat_map(|i| pred[i * a..(i + 1) * a].to_vec())
        .collect();
    let vt: Vec<f32> = (0..valid.len())
        .filter(|&i| valid[i])
        .flat_map(|i| targets[i].clone())
        .collect();
    if !vp.is_empty() {
        let f = fidelity(&vp, &vt, a, fopts(ct.mse_scale, baseline))?;
        rec = rec.with_fidelity("rollout_", &f);
    }
    // 3. the critic on the same rollout (valid samples only)
    let t2 = Instant::now();
    let mut tokens = 0;
    if train_critic && !cex.is_empty() {
        let epochs = if ppo {
            cfg.ppo.critic_train_epochs.max(1)
        } else {
            1
        };
        for _ in 0..epochs {
            let (s, _) = ct.step(dev, &cex, None, micro, cside.pad_id)?;
            rec.set("critic_loss", s.loss);
            rec.set("critic_grad_norm", s.grad_norm);
            rec.set("critic_lr", s.lr as f64);
            tokens += s.tokens;
        }
    }
    let critic_s = t2.elapsed().as_secs_f64();
    // 4. the actor's clipped policy update
    let t3 = Instant::now();
    let seqs: Vec<RlSequence> = expl
        .iter()
        .zip(&r.advantage)
        .map(|(e, &adv)| {
            let p = &prompts[e.prompt];
            let mut ids = p.ids.clone();
            ids.extend_from_slice(&e.tokens);
            RlSequence {
                ids,
                prompt_len: p.ids.len(),
                sites: p.sites.clone(),
                vectors: p.vectors.clone(),
                advantage: adv,
                rollout_logps: e.logps.clone(),
            }
        })
        .collect();
    let (pspec, epochs, mini) = if ppo {
        let c = cfg.ppo.clip as f32;
        (
            PolicyLossSpec {
                clip_low: c,
                clip_high: c,
                dual_clip: None,
                kl_coef: 0.0,
                kl_type: KlType::K1,
                agg: LossAgg::TokenMean,
            },
            cfg.ppo.epochs,
            cfg.ppo.mini_batch_size.unwrap_or(seqs.len()),
        )
    } else {
        (
            PolicyLossSpec {
                clip_low: g.clip_ratio_low as f32,
                clip_high: g.clip_ratio_high as f32,
                dual_clip: g.dual_clip_c.map(|c| c as f32),
                kl_coef: if g.use_kl_loss { g.kl_coef as f32 } else { 0.0 },
                kl_type: g.kl_type.into(),
                agg: g.loss_agg_mode.into(),
            },
            g.ppo_epochs,
            g.ppo_mini_batch_size.map_or(seqs.len(), |m| m * n),
        )
    };
    // log-probs under the rollout's temperature (greedy rollouts: 1)
    let t = cfg.generation.temperature as f32;
    at.temperature = if t > 0.0 { t } else { 1.0 };
    let ps = at.rl_update(
        dev,
        &seqs,
        reference,
        &pspec,
        epochs,
        mini,
        micro,
        aside.pad_id,
    )?;
    let actor_s = t3.elapsed().as_secs_f64();
    rec.set("actor_loss", ps.loss);
    rec.set("actor_pg_loss", ps.pg_loss);
    rec.set("actor_kl", ps.kl);
    rec.set("actor_clip_frac", ps.clip_frac);
    rec.set("actor_clip_frac_lower", ps.clip_frac_lower);
    rec.set("actor_approx_kl", ps.approx_kl);
    rec.set("actor_ratio_mean", ps.ratio_mean);
    rec.set("rollout_logp_diff", ps.rollout_logp_diff);
    rec.set("actor_grad_norm", ps.grad_norm);
    rec.set("actor_lr", ps.lr as f64);
    rec.set("gen_tokens_per_s", gen_tokens as f64 / gen_s);
    rec.set("time_gen_s", gen_s);
    rec.set("time_reward_s", reward_s);
    rec.set("time_critic_s", critic_s);
    rec.set("time_actor_s", actor_s);
    rec.set("tokens", (tokens + ps.tokens + gen_tokens) as f64);
    Ok(rec)
}

/// The reward path of the config.
fn reward_spec(cfg: &RunConfig, mse_scale: Option<f32>, n: usize, ppo: bool) -> RewardSpec {
    let g = &cfg.grpo;
    RewardSpec {
        mse_scale,
        failure_value: g.failure_reward as f32,
        transform: g.reward_transform.into(),
        scale: g.reward_scale as f32,
        batch_normalize: g.reward_normalize,
        clip: g.reward_clip.map(|[lo, hi]| (lo as f32, hi as f32)),
        advantage: if ppo {
            Advantage::Ppo {
                whiten: cfg.ppo.whiten_advantages,
            }
        } else {
            Advantage::Grpo {
                group: n,
                norm_by_std: g.norm_adv_by_std,
            }
        },
        eps: 1e-6,
    }
}

fn mean_std(x: &[f32]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let v = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
    (m, v.sqrt())
}

/// The validation record (see the module docs).
pub fn validate<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    parts: &mut Parts<D>,
    a: usize,
    baseline: &[f32],
) -> Result<Record> {
    let mut spec = setup::dataset_spec(cfg, "val_dataset", Mode::Both, a, true)?;
    if parts.actor.is_none() {
        spec.mode = Mode::Critic;
    }
    let samples: Vec<Sample> = DatasetReader::open(spec)?
        .take(cfg.data.val_batch_size.max(1))
        .collect::<Result<_>>()?;
    let micro = cfg.data.micro_batch_size_per_gpu;
    let mut rec = Record::new();
    let mut skips = SkipCounts::default();
    let mut prompts = vec![];
    if let Some((side, t)) = parts.actor.as_mut() {
        let enc = setup::actor_encoder(cfg, side)?;
        let mut ex = vec![];
        for s in &samples {
            if let Some(e) = skips.take(enc.example(s)?) {
                ex.push(e);
            }
            if let Some(p) = skips.take(enc.prompt(s)?) {
                prompts.push(p);
            }
        }
        rec.set("actor_loss", t.sft_loss(dev, &ex, micro, side.pad_id)?);
    }
    if let Some((side, t)) = parts.critic.as_mut() {
        let enc = setup::critic_encoder(cfg, side);
        let mut ex = vec![];
        for s in &samples {
            if let Some(mut e) = skips.take(enc.example(s)?) {
                e.ids.extend(side.cls_id.iter());
                ex.push(e);
            }
        }
        if !ex.is_empty() {
            let pass = t.pass(dev, &ex, None, micro, side.pad_id, false, ex.len())?;
            let target: Vec<f32> = ex.iter().flat_map(|e| e.target.iter().copied()).collect();
            rec.set("critic_loss", pass.loss);
            let f = fidelity(
                &pass.pred,
                &target,
                t.critic.spec.a,
                fopts(t.mse_scale, baseline),
            )?;
            rec = rec.with_fidelity("critic_", &f);
        }
    }
    if let (Some((aside, at)), Some((cside, ct))) = (parts.actor.as_ref(), parts.critic.as_mut()) {
        if !prompts.is_empty() && prompts.iter().all(|p| p.vectors.len() == 1) {
            let expl = explain(
                dev,
                cfg,
                aside,
                &at.actor,
                Some(cside),
                &prompts,
                1,
                sample_spec(cfg, true),
                0,
            )?;
            let targets: Vec<Vec<f32>> = prompts.iter().map(|p| p.vectors[0].clone()).collect();
            let (pred, valid, _) = reconstruct_all(dev, cside, ct, &expl, &targets, micro)?;
            let flat: Vec<f32> = targets.iter().flatten().copied().collect();
            let f = fidelity(
                &pred,
                &flat,
                ct.critic.spec.a,
                fopts(ct.mse_scale, baseline),
            )?;
            rec = rec.with_fidelity("nla_", &f);
            rec.set(
                "nla_failed",
                valid.iter().filter(|v| !**v).count() as f64 / valid.len() as f64,
            );
        }
    }
    rec.set("samples", samples.len() as f64);
    Ok(rec)
}
