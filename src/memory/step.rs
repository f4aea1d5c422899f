//! The buffers of a training step, with the lifetimes the forward/backward order implies.
//!
//! A step is a list of [`Phase`]s over a few models ([`ModelSpec`]: the actor, the critic, the
//! frozen reference). [`plan_step`] walks the phases op by op, in the order of
//! `model/forward.rs`, `model/backward.rs`, `model/kv_cache.rs`, `nla/critic.rs` and
//! `train/optimizer.rs`, recording which buffers each op touches; a buffer's lifetime is
//! `[first op that touches it, last op that touches it]`. The buffers are then handed to the
//! [`Planner`]. Names follow `model/activations.rs` (`actor.res.3`, `actor.layers.3.xn1`,
//! `actor.logits`, ...); a backward's gradient scratch is named per layer
//! (`actor.bwd.layers.3.dh`) so the planner, not the code, decides what shares memory.
//!
//! What lives where:
//! - `params`: each model's flat weights in the compute dtype; ZeRO-3 keeps 1/G of them.
//! - `grads`: each trained model's flat gradients (accumulated over micro-batches); ZeRO-2 and
//!   up keep 1/G.
//! - `optimizer`: AdamW m and v and, with bf16 weights, the f32 master weights; ZeRO-1 and up
//!   keep 1/G.
//! - `activations`: everything a pass makes and drops: batch inputs, the residual stream and
//!   what each block keeps for backward, logits, activation gradients, the rollout's
//!   workspace. One arena for every phase: the critic's pass reuses the memory of the
//!   rollout's, the actor's that of the critic's.
//! - `kv_cache`: per layer keys and values [R, TMAX, NKV*HS] of the rollout. Its own arena,
//!   as DESIGN.md lists it; since the cache is dead once the rollout ends, declaring it in
//!   `activations` instead would let the training passes reuse its memory (the peak would
//!   drop by min(cache, training activations)).
//! - `scratch`: ZeRO-3 weight gathers (one layer's weights, the next one prefetched), ZeRO-2/3
//!   gradient buckets (one layer's full gradient until its reduce-scatter, which overlaps the
//!   next layer's backward), the gradient-norm partial sums.
//!
//! # Dtype policy
//!
//! [`DtypePolicy::cpu`]: f32 everywhere. [`DtypePolicy::cuda`]: weights, activations, their
//! gradients, logits and the KV cache in bf16 (the engine's working dtype on a GPU: the LM
//! head's matmul writes bf16 logits, and the cross-entropy kernels compute in f32 from them);
//! f32 master weights, AdamW moments and per-row statistics (1/rms, logsumexp, losses).
//!
//! Parameter gradients are **f32** under both policies: they accumulate over the
//! micro-batches of a step and over the GPUs' reduce-scatter, and a bf16 accumulator (8 bits
//! of mantissa) drops contributions smaller than 1/256 of the running sum; AdamW reads them
//! next to its f32 state. This costs 2 bytes per parameter more than bf16 gradients, 1/G of
//! that with ZeRO-2 or -3. (`DtypePolicy { grads: Dtype::Bf16, .. }` plans the other choice.)
//!
//! # Options
//!
//! - [`Recompute::Block`]: the forward keeps only each block's input (`res[l]`); a block's
//!   internals are made and dropped within the block, and made again from `res[l]` just
//!   before the block's backward.
//! - ZeRO over G GPUs ([`StepOptions::gpus`], [`StepOptions::zero_stage`]): data parallel;
//!   parameters, gradients and optimizer state sharded as above; activations and the micro
//!   batch are per GPU; the rollout's rows are split over the GPUs.
//! - [`StepOptions::logits_chunk`]: the LM head and the cross-entropy run over the vocabulary
//!   in chunks of this many entries (an online logsumexp in forward, the chunk's logits made
//!   again in backward), so [N, V] logits are never whole; `None` = whole (what the engine does
//!   now).

use super::planner::{ArenaKind, Dtype, MemoryPlan, PlanOptions, Planner};
use crate::model::{ModelConfig, ParamTable};
use crate::{Error, Result};

/// Element types of a step's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtypePolicy {
    /// Weights as the ops read them (and ZeRO-3 gathers them).
    pub weights: Dtype,
    /// f32 master copy of trained weights (None: the weights are updated in place).
    pub master: Option<Dtype>,
    pub grads: Dtype,
    /// AdamW m and v.
    pub optimizer: Dtype,
    /// Activations, activation gradients and the KV cache.
    pub activations: Dtype,
    /// Logits and their gradient.
    pub logits: Dtype,
    /// Per-row statistics: 1/rms, logsumexp, losses, masks, log-probs.
    pub stats: Dtype,
}

impl DtypePolicy {
    /// f32 everywhere (the CPU engine).
    pub fn cpu() -> Self {
        DtypePolicy {
            weights: Dtype::F32,
            master: None,
            grads: Dtype::F32,
            optimizer: Dtype::F32,
            activations: Dtype::F32,
            logits: Dtype::F32,
            stats: Dtype::F32,
        }
    }

    /// bf16 weights, activations and logits; f32 master weights, gradients and AdamW state.
    pub fn cuda() -> Self {
        DtypePolicy {
            weights: Dtype::Bf16,
            master: Some(Dtype::F32),
            grads: Dtype::F32,
            optimizer: Dtype::F32,
            activations: Dtype::Bf16,
            logits: Dtype::Bf16,
            stats: Dtype::F32,
        }
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        if *self == Self::cpu() {
            return "f32 everywhere".into();
        }
        format!(
            "weights {}, activations {}, master {}, grads {}, AdamW {}, logits {}",
            self.weights,
            self.activations,
            self.master.map_or("none", Dtype::name),
            self.grads,
            self.optimizer,
            self.logits
        )
    }
}

/// What the forward keeps for backward (`trainer.recompute` in a run config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Every activation of every block.
    #[default]
    None,
    /// Only each block's input; the block is run again before its backward.
    Block,
}

impl Recompute {
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Block => "block",
        }
    }
}

/// How a step is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOptions {
    pub policy: DtypePolicy,
    pub recompute: Recompute,
    /// G, data-parallel GPUs.
    pub gpus: usize,
    /// 0: nothing sharded; 1: optimizer state and master weights; 2: + gradients; 3: +
    /// weights. (Only with G > 1.)
    pub zero_stage: u8,
    /// Vocabulary entries per chunk of the LM head and cross-entropy; None = all at once.
    pub logits_chunk: Option<usize>,
}

impl StepOptions {
    /// The CPU engine: f32, one device, no recompute, whole logits.
    pub fn cpu() -> Self {
        StepOptions {
            policy: DtypePolicy::cpu(),
            recompute: Recompute::None,
            gpus: 1,
            zero_stage: 0,
            logits_chunk: None,
        }
    }

    /// One GPU, bf16 policy, ZeRO-3 (effective from two GPUs on).
    pub fn cuda() -> Self {
        StepOptions {
            policy: DtypePolicy::cuda(),
            recompute: Recompute::None,
            gpus: 1,
            zero_stage: 3,
            logits_chunk: None,
        }
    }

    fn sharded(&self, stage: u8) -> bool {
        self.gpus > 1 && self.zero_stage >= stage
    }

    /// Elements of a flat buffer of `total` elements on one GPU when sharded at `stage`.
    fn share(&self, total: usize, stage: u8) -> usize {
        if self.sharded(stage) {
            total.div_ceil(self.gpus)
        } else {
            total
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.gpus == 0 {
            return Err(Error::invalid(
                "memory plan",
                "the GPU count must be at least 1",
            ));
        }
        if self.zero_stage > 3 {
            return Err(Error::invalid(
                "memory plan",
                format!("ZeRO stage {} does not exist (0 to 3)", self.zero_stage),
            ));
        }
        if self.logits_chunk == Some(0) {
            return Err(Error::invalid(
                "memory plan",
                "the logits chunk must be at least 1 vocabulary entry",
            ));
        }
        Ok(())
    }
}

/// What a model is.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelKind {
    /// A causal LM (the actor, the reference): every block, the final norm and the LM head.
    /// One vector per row is written into the residual stream at each of `inject_layers`
    /// (0 = the embedding output); `project`: through a trained W [C, A].
    Lm {
        inject_layers: Vec<usize>,
        a: usize,
        project: bool,
    },
    /// The NLA critic: blocks 0..=k of `cfg`, pooling, the value head [A, C], and for
    /// weighted pooling `pool.weight` [pool_len].
    Critic {
        k: usize,
        a: usize,
        pool_len: Option<usize>,
    },
}

/// A model of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Prefix of its buffers' names.
    pub name: String,
    /// Its architecture (for the critic: the full backbone, of which k+1 blocks are kept).
    pub cfg: ModelConfig,
    pub kind: ModelKind,
    /// Trained (gradients, optimizer state) or frozen (weights only).
    pub trainable: bool,
}

/// One phase of a step, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Forward and backward of one micro-batch of `b` rows of `t` positions (the buffers
    /// serve every micro-batch of the step in turn). `rl`: the loss is the clipped policy
    /// loss on log-probs (with the reference's when `kl`), not the cross-entropy.
    Train {
        model: usize,
        b: usize,
        t: usize,
        rl: bool,
        kl: bool,
    },
    /// Forward only (log-probs of an LM, predictions of the critic), one micro-batch.
    Forward {
        model: usize,
        b: usize,
        t: usize,
        label: String,
    },
    /// Generation with a KV cache: `rows` sequences, prompts of up to `prompt` tokens
    /// prefilled at once, then `new_tokens` decode steps (one planned: they reuse the same
    /// buffers).
    Rollout {
        model: usize,
        rows: usize,
        prompt: usize,
        new_tokens: usize,
    },
    /// Gradient clipping and AdamW over the model's flat buffers (or their shards).
    Update { model: usize },
}

/// A model's size in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    /// Parameters (elements of the flat buffer).
    pub params: usize,
    /// Blocks it runs.
    pub layers: usize,
    pub trainable: bool,
    /// Bytes per GPU it holds in `params`, `grads` and `optimizer`.
    pub persistent_bytes: usize,
}

/// The planned step.
#[derive(Clone, Debug)]
pub struct StepPlan {
    pub plan: MemoryPlan,
    /// Name of each op, by index (the lifetimes' time axis).
    pub ops: Vec<String>,
    pub models: Vec<ModelSummary>,
    /// Bytes the engine holds beyond the planned activation arena: a pass's activation set is
    /// one allocation whose buffers share memory by phases of the pass, where the plan shares
    /// it op by op (set by [`super::RunShape::plan`]; 0 from [`plan_step`]).
    pub engine_extra: usize,
}

impl StepPlan {
    /// What the run needs: the planned peak and the engine's extra.
    pub fn needed(&self) -> usize {
        self.plan.peak + self.engine_extra
    }

    /// The bytes live at the busiest op and that op's name (a lower bound of the peak).
    pub fn busiest_op(&self) -> (usize, &str) {
        let (bytes, op) = self.plan.max_live();
        (bytes, self.ops.get(op).map_or("", String::as_str))
    }

    /// Sum of the (aligned) sizes of the buffers whose name starts with `prefix` in `arena`.
    pub fn bytes_of(&self, prefix: &str, arena: ArenaKind) -> usize {
        self.plan
            .decls
            .iter()
            .zip(&self.plan.placements)
            .filter(|(d, _)| d.arena == arena && d.name.starts_with(prefix))
            .map(|(_, p)| p.size)
            .sum()
    }
}

/// Declares every buffer of the step and plans it with the default planner options.
pub fn plan_step(models: &[ModelSpec], phases: &[Phase], opts: &StepOptions) -> Result<StepPlan> {
    plan_step_with(models, phases, opts, &PlanOptions::default())
}

/// [`plan_step`] with planner options (e.g. reuse off, to compare).
pub fn plan_step_with(
    models: &[ModelSpec],
    phases: &[Phase],
    opts: &StepOptions,
    popts: &PlanOptions,
) -> Result<StepPlan> {
    opts.check()?;
    let mut b = Builder::new(models, opts)?;
    for ph in phases {
        b.phase(ph)?;
    }
    let (planner, ops) = b.tr.finish()?;
    let plan = planner.plan_with(popts)?;
    let mut summaries = vec![];
    for (m, st) in models.iter().zip(&b.models) {
        let persistent: usize = [Some(st.params), st.grads, st.master, st.m, st.v]
            .iter()
            .flatten()
            .map(|&id| plan.placements[b.tr.decl_index[id]].size)
            .sum();
        summaries.push(ModelSummary {
            name: m.name.clone(),
            params: st.layout.total,
            layers: st.cfg.num_hidden_layers,
            trainable: m.trainable,
            persistent_bytes: persistent,
        });
    }
    Ok(StepPlan {
        plan,
        ops,
        models: summaries,
        engine_extra: 0,
    })
}

// ---- the op trace ----

type Buf = usize;

struct TBuf {
    name: String,
    dtype: Dtype,
    elements: usize,
    arena: ArenaKind,
    first: Option<usize>,
    last: usize,
    persistent: bool,
}

/// Records buffers and the ops that touch them.
#[derive(Default)]
struct Trace {
    bufs: Vec<TBuf>,
    ops: Vec<String>,
    /// buffer -> index among the declared ones (filled by `finish`)
    decl_index: Vec<usize>,
}

impl Trace {
    fn buf(&mut self, name: String, dtype: Dtype, elements: usize, arena: ArenaKind) -> Buf {
        self.bufs.push(TBuf {
            name,
            dtype,
            elements,
            arena,
            first: None,
            last: 0,
            persistent: false,
        });
        self.bufs.len() - 1
    }

    /// A buffer that lives the whole step (weights, gradients, optimizer state).
    fn persistent(&mut self, name: String, dtype: Dtype, elements: usize, arena: ArenaKind) -> Buf {
        let id = self.buf(name, dtype, elements, arena);
        self.bufs[id].persistent = true;
        id
    }

    fn op(&mut self, name: String, bufs: &[Buf]) {
        let t = self.ops.len();
        for &b in bufs {
            let tb = &mut self.bufs[b];
            tb.first.get_or_insert(t);
            tb.last = t;
        }
        self.ops.push(name);
    }

    /// The declarations: persistent buffers over every op, the others over their uses.
    fn finish(&mut self) -> Result<(Planner, Vec<String>)> {
        let end = self.ops.len().saturating_sub(1);
        let mut p = Planner::new();
        self.decl_index = vec![usize::MAX; self.bufs.len()];
        for (i, b) in self.bufs.iter().enumerate() {
            let (first, last) = if b.persistent {
                (0, end)
            } else {
                match b.first {
                    Some(f) => (f, b.last),
                    None => {
                        return Err(Error::invalid(
                            "memory plan",
                            format!("buffer `{}` is declared but no op uses it", b.name),
                        ))
                    }
                }
            };
            let id = p.declare(b.name.clone(), b.dtype, b.elements, b.arena, first, last)?;
            self.decl_index[i] = id.0;
        }
        Ok((p, std::mem::take(&mut self.ops)))
    }
}

// ---- models ----

/// Element counts of a model's weight groups (what ZeRO-3 gathers at once and what a gradient
/// bucket holds).
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// embed_tokens [V, C]
    embed: usize,
    /// one block
    layer: usize,
    /// final norm + LM head [V, C] (tied: the embedding again); 0 for the critic
    head: usize,
    /// injection projection (actor), value head + pool weights (critic)
    extra: usize,
    total: usize,
}

#[derive(Clone, Copy, Debug)]
enum Group {
    Embed,
    Layer(usize),
    Head,
    Extra,
}

struct ModelState {
    name: String,
    /// as run: the critic's has k+1 blocks
    cfg: ModelConfig,
    layout: Layout,
    lm: bool,
    inject_layers: Vec<usize>,
    a: usize,
    project: bool,
    pool: bool,
    params: Buf,
    grads: Option<Buf>,
    master: Option<Buf>,
    m: Option<Buf>,
    v: Option<Buf>,
}

fn layout_of(spec: &ModelSpec) -> Result<(ModelConfig, Layout)> {
    let cfg = &spec.cfg;
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    match &spec.kind {
        ModelKind::Lm { a, project, .. } => {
            let table = ParamTable::for_config(cfg);
            let layer = layer_elements(&table);
            let extra = if *project { c * a } else { 0 };
            Ok((
                cfg.clone(),
                Layout {
                    embed: v * c,
                    layer,
                    head: c + v * c,
                    extra,
                    total: table.total + extra,
                },
            ))
        }
        ModelKind::Critic { k, a, pool_len } => {
            if *k >= cfg.num_hidden_layers {
                return Err(Error::invalid(
                    "memory plan",
                    format!(
                        "critic `{}`: block {k} does not exist ({} blocks)",
                        spec.name, cfg.num_hidden_layers
                    ),
                ));
            }
            let mut bc = cfg.clone();
            bc.num_hidden_layers = k + 1;
            bc.tie_word_embeddings = true;
            let table = ParamTable::for_config(&bc);
            let extra = a * c + pool_len.unwrap_or(0);
            Ok((
                bc,
                Layout {
                    embed: v * c,
                    layer: layer_elements(&table),
                    head: 0,
                    extra,
                    total: table.total + extra,
                },
            ))
        }
    }
}

/// Elements of block 0 (every block has the same shapes).
fn layer_elements(table: &ParamTable) -> usize {
    table
        .entries
        .iter()
        .filter(|e| e.name.starts_with("model.layers.0."))
        .map(|e| e.len)
        .sum()
}

/// Buffer ids of what one block's forward makes.
#[derive(Clone, Copy)]
struct LayerBufs {
    rstd1: Buf,
    xn1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    att: Buf,
    lse: Buf,
    x_mid: Buf,
    rstd2: Buf,
    xn2: Buf,
    /// gate^T then up^T [2F,N], from one matmul
    gu: Buf,
    h: Buf,
}

/// The batch inputs of a pass.
struct Inputs {
    ids: Buf,
    targets: Option<Buf>,
    mask: Buf,
    /// injection sites [S] and vectors [S, C] (LM)
    sites: Option<Buf>,
    vecs: Option<Buf>,
    /// rescaled vectors [S, A] (project)
    nv: Option<Buf>,
}

struct Builder<'a> {
    tr: Trace,
    opts: &'a StepOptions,
    models: Vec<ModelState>,
    specs: &'a [ModelSpec],
}

impl<'a> Builder<'a> {
    fn new(specs: &'a [ModelSpec], opts: &'a StepOptions) -> Result<Self> {
        let mut tr = Trace::default();
        let p = &opts.policy;
        let mut models = vec![];
        for s in specs {
            let (cfg, layout) = layout_of(s)?;
            let n = &s.name;
            let total = layout.total;
            let params = tr.persistent(
                format!("{n}.params"),
                p.weights,
                opts.share(total, 3),
                ArenaKind::Params,
            );
            let (mut grads, mut master, mut m, mut v) = (None, None, None, None);
            if s.trainable {
                grads = Some(tr.persistent(
                    format!("{n}.grads"),
                    p.grads,
                    opts.share(total, 2),
                    ArenaKind::Grads,
                ));
                master = p.master.map(|d| {
                    tr.persistent(
                        format!("{n}.master"),
                        d,
                        opts.share(total, 1),
                        ArenaKind::Optimizer,
                    )
                });
                m = Some(tr.persistent(
                    format!("{n}.adamw.m"),
                    p.optimizer,
                    opts.share(total, 1),
                    ArenaKind::Optimizer,
                ));
                v = Some(tr.persistent(
                    format!("{n}.adamw.v"),
                    p.optimizer,
                    opts.share(total, 1),
                    ArenaKind::Optimizer,
                ));
            }
            let (lm, inject_layers, a, project, pool) = match &s.kind {
                ModelKind::Lm {
                    inject_layers,
                    a,
                    project,
                } => (true, inject_layers.clone(), *a, *project, false),
                ModelKind::Critic { a, pool_len, .. } => {
                    (false, vec![], *a, false, pool_len.is_some())
                }
            };
            if let Some(&l) = inject_layers.iter().find(|&&l| l > cfg.num_hidden_layers) {
                return Err(Error::invalid(
                    "memory plan",
                    format!(
                        "`{n}`: injection layer {l} is past its {} blocks",
                        cfg.num_hidden_layers
                    ),
                ));
            }
            models.push(ModelState {
                name: n.clone(),
                cfg,
                layout,
                lm,
                inject_layers,
                a,
                project,
                pool,
                params,
                grads,
                master,
                m,
                v,
            });
        }
        Ok(Builder {
            tr,
            opts,
            models,
            specs,
        })
    }

    fn act(&mut self, name: String, elements: usize) -> Buf {
        let d = self.opts.policy.activations;
        self.tr.buf(name, d, elements, ArenaKind::Activations)
    }

    fn stat(&mut self, name: String, elements: usize) -> Buf {
        let d = self.opts.policy.stats;
        self.tr.buf(name, d, elements, ArenaKind::Activations)
    }

    fn ids(&mut self, name: String, elements: usize) -> Buf {
        self.tr
            .buf(name, Dtype::U32, elements, ArenaKind::Activations)
    }

    fn op(&mut self, name: String, bufs: &[Buf]) {
        self.tr.op(name, bufs)
    }

    fn group_elements(&self, m: usize, g: Group) -> usize {
        let l = &self.models[m].layout;
        match g {
            Group::Embed => l.embed,
            Group::Layer(_) => l.layer,
            Group::Head => l.head,
            Group::Extra => l.extra,
        }
    }

    fn group_name(g: Group) -> String {
        match g {
            Group::Embed => "embed".into(),
            Group::Layer(l) => format!("layers.{l}"),
            Group::Head => "head".into(),
            Group::Extra => "extra".into(),
        }
    }

    /// The buffer the ops of group `g` read weights from: the flat weights, or (ZeRO-3) a
    /// gather of the group's full weights made by an all-gather op now.
    fn weights(&mut self, m: usize, g: Group, pass: &str) -> Buf {
        let params = self.models[m].params;
        if !self.opts.sharded(3) {
            return params;
        }
        let name = format!(
            "{}.{pass}.gather.{}",
            self.models[m].name,
            Self::group_name(g)
        );
        let el = self.group_elements(m, g);
        let d = self.opts.policy.weights;
        let buf = self.tr.buf(name.clone(), d, el, ArenaKind::Scratch);
        self.op(format!("{name}: all_gather"), &[buf, params]);
        buf
    }

    /// Where the backward of group `g` accumulates its weight gradients: the flat gradients,
    /// or (ZeRO-2/3) a full-size bucket, zeroed now, that [`Self::flush`] reduce-scatters into
    /// them.
    fn grad_sink(&mut self, m: usize, g: Group, pass: &str) -> Buf {
        let grads = self.models[m].grads.unwrap_or(self.models[m].params);
        if !self.opts.sharded(2) {
            return grads;
        }
        let name = format!(
            "{}.{pass}.bucket.{}",
            self.models[m].name,
            Self::group_name(g)
        );
        let el = self.group_elements(m, g);
        let d = self.opts.policy.grads;
        let bucket = self.tr.buf(name.clone(), d, el, ArenaKind::Scratch);
        // weight gradients accumulate (`+=`): a bucket starts zeroed
        self.op(format!("{name}: zero"), &[bucket]);
        bucket
    }

    /// Reduce-scatters a gradient bucket into the model's gradient shard (nothing for the
    /// flat gradients).
    fn flush(&mut self, m: usize, sink: Buf) {
        let grads = self.models[m].grads.unwrap_or(self.models[m].params);
        if sink != grads {
            let name = format!("{}: reduce_scatter", self.tr.bufs[sink].name);
            self.op(name, &[sink, grads]);
        }
    }

    fn phase(&mut self, ph: &Phase) -> Result<()> {
        let check = |m: usize| -> Result<()> {
            if m >= self.models.len() {
                return Err(Error::invalid(
                    "memory plan",
                    format!(
                        "phase {ph:?} names model {m}, there are {}",
                        self.models.len()
                    ),
                ));
            }
            Ok(())
        };
        match ph {
            Phase::Train {
                model,
                b,
                t,
                rl,
                kl,
            } => {
                check(*model)?;
                if !self.specs[*model].trainable {
                    return Err(Error::invalid(
                        "memory plan",
                        format!(
                            "`{}` is frozen and cannot be trained",
                            self.specs[*model].name
                        ),
                    ));
                }
                if self.models[*model].lm {
                    self.lm_pass(*model, *b, *t, true, *rl, *kl, "train")
                } else {
                    self.critic_pass(*model, *b, *t, true, "train")
                }
            }
            Phase::Forward { model, b, t, label } => {
                check(*model)?;
                if self.models[*model].lm {
                    self.lm_pass(*model, *b, *t, false, false, false, label)
                } else {
                    self.critic_pass(*model, *b, *t, false, label)
                }
            }
            Phase::Rollout {
                model,
                rows,
                prompt,
                new_tokens,
            } => {
                check(*model)?;
                if !self.models[*model].lm {
                    return Err(Error::invalid(
                        "memory plan",
                        "only a language model generates (the rollout's model is the critic)",
                    ));
                }
                self.rollout(*model, *rows, *prompt, *new_tokens)
            }
            Phase::Update { model } => {
                check(*model)?;
                self.update(*model)
            }
        }
    }

    fn check_shape(&self, m: usize, b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 {
            return Err(Error::invalid(
                "memory plan",
                format!("`{}`: empty batch {b} x {t}", self.models[m].name),
            ));
        }
        Ok(())
    }

    /// One block's forward over `b` x `t` rows from `x`; writes `out` when given (without it,
    /// the down projection and the last residual are skipped: what recompute needs).
    #[allow(clippy::too_many_arguments)]
    fn block_fwd(
        &mut self,
        m: usize,
        pre: &str,
        x: Buf,
        out: Option<Buf>,
        w: Buf,
        b: usize,
        t: usize,
    ) -> LayerBufs {
        let cfg = &self.models[m].cfg;
        let n = b * t;
        let (c, f, nh) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let rstd1 = self.stat(format!("{pre}.rstd1"), n);
        let xn1 = self.act(format!("{pre}.xn1"), n * c);
        self.op(format!("{pre}: rmsnorm_fwd"), &[xn1, rstd1, x, w]);
        // q, k and v: one matmul into scratch, then split and rotated
        let qkv = self.act(format!("{pre}.qkv"), n * (qd + 2 * kvd));
        self.op(format!("{pre}: qkv_proj"), &[qkv, xn1, w]);
        let q = self.act(format!("{pre}.q"), n * qd);
        let k = self.act(format!("{pre}.k"), n * kvd);
        let v = self.act(format!("{pre}.v"), n * kvd);
        self.op(format!("{pre}: qkv_rope_fwd"), &[q, k, v, qkv]);
        let att = self.act(format!("{pre}.att"), n * qd);
        let lse = self.stat(format!("{pre}.lse"), b * nh * t);
        self.op(format!("{pre}: attention_fwd"), &[att, lse, q, k, v]);
        let x_mid = self.act(format!("{pre}.x_mid"), n * c);
        // x_mid = x + att @ wo^T: the residual add is the matmul's epilogue (matmul_add)
        self.op(format!("{pre}: o_proj + residual"), &[x_mid, x, att, w]);
        let rstd2 = self.stat(format!("{pre}.rstd2"), n);
        let xn2 = self.act(format!("{pre}.xn2"), n * c);
        self.op(format!("{pre}: rmsnorm_fwd 2"), &[xn2, rstd2, x_mid, w]);
        let gu = self.act(format!("{pre}.gu"), 2 * n * f);
        self.op(format!("{pre}: gate_up_proj"), &[gu, xn2, w]);
        let h = self.act(format!("{pre}.h"), n * f);
        self.op(format!("{pre}: swiglu_fwd"), &[h, gu]);
        if let Some(out) = out {
            self.op(format!("{pre}: down_proj + residual"), &[out, x_mid, h, w]);
        }
        LayerBufs {
            rstd1,
            xn1,
            q,
            k,
            v,
            att,
            lse,
            x_mid,
            rstd2,
            xn2,
            gu,
            h,
        }
    }

    /// One block's backward (`model/backward.rs`): from `dout` = d loss / d out to d loss / d x,
    /// in place in `dout` (returned); weight gradients into `g`.
    #[allow(clippy::too_many_arguments)]
    fn block_bwd(
        &mut self,
        m: usize,
        pre: &str,
        la: &LayerBufs,
        x: Buf,
        dout: Buf,
        w: Buf,
        g: Buf,
        b: usize,
        t: usize,
    ) -> Buf {
        let cfg = &self.models[m].cfg;
        let n = b * t;
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let dh = self.act(format!("{pre}.dh"), n * f);
        self.op(format!("{pre}: down_proj bwd_dx"), &[dh, dout, w]);
        self.op(format!("{pre}: down_proj bwd_dw"), &[g, dout, la.h]);
        let dgu = self.act(format!("{pre}.dgu"), 2 * n * f);
        self.op(format!("{pre}: swiglu_bwd"), &[dgu, dh, la.gu]);
        let dxn = self.act(format!("{pre}.dxn_mlp"), n * c);
        self.op(format!("{pre}: gate_up_proj bwd_dx"), &[dxn, dgu, w]);
        self.op(format!("{pre}: gate_up_proj bwd_dw"), &[g, dgu, la.xn2]);
        // dout += the norm's share, in place: d x_mid from here
        self.op(
            format!("{pre}: rmsnorm_bwd 2 (+=)"),
            &[dout, g, dxn, la.x_mid, w, la.rstd2],
        );
        let datt = self.act(format!("{pre}.datt"), n * qd);
        self.op(format!("{pre}: o_proj bwd_dx"), &[datt, dout, w]);
        self.op(format!("{pre}: o_proj bwd_dw"), &[g, dout, la.att]);
        let dq = self.act(format!("{pre}.dq"), n * qd);
        let dk = self.act(format!("{pre}.dk"), n * kvd);
        let dv = self.act(format!("{pre}.dv"), n * kvd);
        self.op(
            format!("{pre}: attention_bwd"),
            &[dq, dk, dv, datt, la.q, la.k, la.v, la.att, la.lse],
        );
        let dqkv = self.act(format!("{pre}.dqkv"), n * (qd + 2 * kvd));
        self.op(format!("{pre}: qkv_rope_bwd"), &[dqkv, dq, dk, dv]);
        let dxn1 = self.act(format!("{pre}.dxn_attn"), n * c);
        self.op(format!("{pre}: qkv_proj bwd_dx"), &[dxn1, dqkv, w]);
        self.op(format!("{pre}: qkv_proj bwd_dw"), &[g, dqkv, la.xn1]);
        // and again: d x
        self.op(
            format!("{pre}: rmsnorm_bwd (+=)"),
            &[dout, g, dxn1, x, w, la.rstd1],
        );
        dout
    }

    /// The batch inputs of a pass (ids [N], targets [N] for an LM, mask [N], injection).
    fn inputs(&mut self, m: usize, pre: &str, b: usize, t: usize) -> Inputs {
        let n = b * t;
        let (lm, c, a, project) = {
            let s = &self.models[m];
            (s.lm, s.cfg.hidden_size, s.a, s.project)
        };
        let ids = self.ids(format!("{pre}.ids"), n);
        let targets = lm.then(|| self.ids(format!("{pre}.targets"), n));
        let mask = self.stat(format!("{pre}.mask"), n);
        let inject = lm && !self.models[m].inject_layers.is_empty();
        // one vector per row
        let sites = inject.then(|| self.ids(format!("{pre}.inject.sites"), b));
        let vecs = inject.then(|| self.act(format!("{pre}.inject.vecs"), b * c));
        let nv = (inject && project).then(|| self.act(format!("{pre}.inject.nv"), b * a));
        Inputs {
            ids,
            targets,
            mask,
            sites,
            vecs,
            nv,
        }
    }

    /// Embedding, injection at layer 0, the projection of the vectors (`project`).
    fn embed_fwd(&mut self, m: usize, pre: &str, inp: &Inputs, res0: Buf, pass: &str) {
        let w = self.weights(m, Group::Embed, pass);
        self.op(format!("{pre}: embedding_fwd"), &[res0, inp.ids, w]);
        if let (Some(nv), Some(vecs)) = (inp.nv, inp.vecs) {
            let wx = self.weights(m, Group::Extra, pass);
            self.op(format!("{pre}: injection projection"), &[vecs, nv, wx]);
        }
        self.inject(m, pre, inp, res0, 0);
    }

    fn inject(&mut self, m: usize, pre: &str, inp: &Inputs, x: Buf, layer: usize) {
        if let (Some(s), Some(v)) = (inp.sites, inp.vecs) {
            if self.models[m].inject_layers.contains(&layer) {
                self.op(format!("{pre}: inject_fwd at {layer}"), &[x, s, v]);
            }
        }
    }

    /// Embedding and every block (the critic: blocks 0..=k). `keep`: what the backward needs
    /// is kept (all of it, or with recompute only the block inputs). Returns the residual
    /// stream res[0..=L], each block's buffers (None when not kept for backward) and the
    /// weights of `tail`, prefetched during the last block.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn blocks_fwd(
        &mut self,
        m: usize,
        pre: &str,
        inp: &Inputs,
        b: usize,
        t: usize,
        keep: bool,
        pass: &str,
        tail: Option<Group>,
    ) -> (Vec<Buf>, Vec<Option<LayerBufs>>, Option<Buf>) {
        let n = b * t;
        let (c, nl) = {
            let cfg = &self.models[m].cfg;
            (cfg.hidden_size, cfg.num_hidden_layers)
        };
        let recompute = keep && self.opts.recompute == Recompute::Block;
        let mut res = Vec::with_capacity(nl + 1);
        res.push(self.act(format!("{pre}.res.0"), n * c));
        self.embed_fwd(m, pre, inp, res[0], pass);
        let mut layers = Vec::with_capacity(nl);
        let mut w_next = self.weights(m, Group::Layer(0), pass);
        let mut tail_w = None;
        for l in 0..nl {
            let w = w_next;
            // prefetch: the next group's weights are gathered while this block runs
            if l + 1 < nl {
                w_next = self.weights(m, Group::Layer(l + 1), pass);
            } else if let Some(g) = tail {
                tail_w = Some(self.weights(m, g, pass));
            }
            let out = self.act(format!("{pre}.res.{}", l + 1), n * c);
            let lp = if keep && !recompute {
                format!("{pre}.layers.{l}")
            } else {
                format!("{pre}.fwd.layers.{l}")
            };
            let la = self.block_fwd(m, &lp, res[l], Some(out), w, b, t);
            self.inject(m, pre, inp, out, l + 1);
            layers.push((keep && !recompute).then_some(la));
            res.push(out);
        }
        (res, layers, tail_w)
    }

    /// The blocks' backward from `dres` = d loss / d res[L], the embedding's at the end.
    #[allow(clippy::too_many_arguments)]
    fn blocks_bwd(
        &mut self,
        m: usize,
        pre: &str,
        inp: &Inputs,
        res: &[Buf],
        layers: &[Option<LayerBufs>],
        mut dres: Buf,
        b: usize,
        t: usize,
    ) {
        let (c, nl) = {
            let cfg = &self.models[m].cfg;
            (cfg.hidden_size, cfg.num_hidden_layers)
        };
        let inject_layers = self.models[m].inject_layers.clone();
        let mut dvecs: Option<Buf> = None;
        let mut uninject = |bld: &mut Self, dres: Buf, layer: usize| {
            if let (Some(s), Some(_)) = (inp.sites, inp.vecs) {
                if inject_layers.contains(&layer) {
                    match dvecs {
                        None => {
                            let d = bld.act(format!("{pre}.inject.dvecs"), b * c);
                            bld.op(format!("{pre}: inject_bwd at {layer}"), &[d, dres, s]);
                            dvecs = Some(d);
                        }
                        Some(d) => {
                            let sc = bld.act(format!("{pre}.inject.dscratch.{layer}"), b * c);
                            bld.op(format!("{pre}: inject_bwd at {layer}"), &[sc, dres, s]);
                            bld.op(format!("{pre}: dvecs += at {layer}"), &[d, sc]);
                        }
                    }
                }
            }
        };
        let mut w_next = self.weights(m, Group::Layer(nl - 1), "bwd");
        let mut pending: Option<Buf> = None;
        for l in (0..nl).rev() {
            let w = w_next;
            // prefetch the next block's weights (the embedding's backward reads none)
            if l > 0 {
                w_next = self.weights(m, Group::Layer(l - 1), "bwd");
            }
            uninject(self, dres, l + 1);
            let g = self.grad_sink(m, Group::Layer(l), "bwd");
            let la = match layers[l] {
                Some(la) => la,
                None => {
                    // recompute: the block again from its input
                    let lp = format!("{pre}.recompute.layers.{l}");
                    self.block_fwd(m, &lp, res[l], None, w, b, t)
                }
            };
            // the previous block's gradient bucket is reduce-scattered during this block
            if let Some(p) = pending.take() {
                self.flush(m, p);
            }
            let lp = format!("{pre}.bwd.layers.{l}");
            dres = self.block_bwd(m, &lp, &la, res[l], dres, w, g, b, t);
            pending = Some(g);
        }
        uninject(self, dres, 0);
        let g = self.grad_sink(m, Group::Embed, "bwd");
        self.op(format!("{pre}: embedding_bwd"), &[g, inp.ids, dres]);
        if let Some(p) = pending.take() {
            self.flush(m, p);
        }
        self.flush(m, g);
        if let (Some(nv), Some(d)) = (inp.nv, dvecs) {
            let gx = self.grad_sink(m, Group::Extra, "bwd");
            self.op(format!("{pre}: injection projection bwd_dw"), &[gx, d, nv]);
            self.flush(m, gx);
        }
    }

    /// An LM's pass: forward (log-probs / cross-entropy), and for training the backward.
    #[allow(clippy::too_many_arguments)]
    fn lm_pass(
        &mut self,
        m: usize,
        b: usize,
        t: usize,
        train: bool,
        rl: bool,
        kl: bool,
        label: &str,
    ) -> Result<()> {
        self.check_shape(m, b, t)?;
        let name = self.models[m].name.clone();
        let pre = if train {
            name.clone()
        } else {
            format!("{name}.{label}")
        };
        let pass = if train { "fwd" } else { label };
        let n = b * t;
        let (c, v) = {
            let cfg = &self.models[m].cfg;
            (cfg.hidden_size, cfg.vocab_size)
        };
        let inp = self.inputs(m, &pre, b, t);
        let (res, layers, w_head) =
            self.blocks_fwd(m, &pre, &inp, b, t, train, pass, Some(Group::Head));
        let w_head = w_head.unwrap_or(self.models[m].params);
        let last = res[res.len() - 1];
        let targets = inp.targets.unwrap_or(inp.ids);
        let xn_f = self.act(format!("{pre}.xn_f"), n * c);
        let rstd_f = self.stat(format!("{pre}.rstd_f"), n);
        self.op(
            format!("{pre}: rmsnorm_fwd final"),
            &[xn_f, rstd_f, last, w_head],
        );
        let ld = self.opts.policy.logits;
        let chunks = self.chunks(v);
        let losses = self.stat(format!("{pre}.losses"), n);
        // the logits chunk by chunk (one chunk, [N, V], when whole), merged into the online
        // logsumexp state [3N]: running max, sum and the target's logit
        let whole = chunks.len() == 1;
        let ce = self.stat(format!("{pre}.ce_state"), 3 * n);
        let mut lg_whole = None;
        for (j, &vc) in chunks.iter().enumerate() {
            let name = if whole {
                format!("{pre}.logits")
            } else {
                format!("{pre}.logits.chunk{j}")
            };
            let lg = self.tr.buf(name, ld, n * vc, ArenaKind::Activations);
            self.op(format!("{pre}: lm_head chunk {j}"), &[lg, xn_f, w_head]);
            self.op(
                format!("{pre}: cross_entropy_fwd chunk {j}"),
                &[ce, lg, targets],
            );
            lg_whole = Some(lg);
        }
        self.op(
            format!("{pre}: cross_entropy_fwd finish"),
            &[losses, ce, targets, inp.mask],
        );
        if !train {
            // the log-probs go to the host
            self.op(format!("{pre}: download log-probs"), &[losses]);
            return Ok(());
        }
        // the loss and its gradient w.r.t. the per-position losses
        let weights = if rl {
            let old = self.stat(format!("{pre}.rl.old_logp"), n);
            let adv = self.stat(format!("{pre}.rl.advantages"), b);
            let stats = self.stat(format!("{pre}.rl.stats"), 16);
            let mut ins = vec![stats, losses, old, adv, inp.mask];
            if kl {
                ins.push(self.stat(format!("{pre}.rl.ref_logp"), n));
            }
            self.op(format!("{pre}: policy_loss_fwd"), &ins);
            let dlogp = self.stat(format!("{pre}.rl.dlogp"), n);
            ins[0] = dlogp;
            self.op(format!("{pre}: policy_loss_bwd"), &ins);
            dlogp
        } else {
            inp.mask
        };
        let g_head = self.grad_sink(m, Group::Head, "bwd");
        let dxn_f = self.act(format!("{pre}.dxn_f"), n * c);
        for (j, &vc) in chunks.iter().enumerate() {
            // whole: the logits kept from forward; chunked: each chunk made again
            let lg = match lg_whole.filter(|_| whole) {
                Some(lg) => lg,
                None => {
                    let lg = self.tr.buf(
                        format!("{pre}.bwd.logits.chunk{j}"),
                        ld,
                        n * vc,
                        ArenaKind::Activations,
                    );
                    self.op(
                        format!("{pre}: lm_head chunk {j} again"),
                        &[lg, xn_f, w_head],
                    );
                    lg
                }
            };
            // in place: the chunk's logits become their gradient
            self.op(
                format!("{pre}: cross_entropy_bwd chunk {j}"),
                &[lg, ce, targets, weights],
            );
            self.op(
                format!("{pre}: lm_head chunk {j} bwd_dx"),
                &[dxn_f, lg, w_head],
            );
            self.op(
                format!("{pre}: lm_head chunk {j} bwd_dw"),
                &[g_head, lg, xn_f],
            );
        }
        let dres = self.act(format!("{pre}.bwd.dres_f"), n * c);
        self.op(
            format!("{pre}: rmsnorm_bwd final"),
            &[dres, g_head, dxn_f, last, w_head, rstd_f],
        );
        self.flush(m, g_head);
        self.blocks_bwd(m, &pre, &inp, &res, &layers, dres, b, t);
        Ok(())
    }

    /// Chunk sizes over the vocabulary (one chunk = whole logits).
    fn chunks(&self, v: usize) -> Vec<usize> {
        match self.opts.logits_chunk {
            Some(ch) if ch < v => {
                let mut out = vec![ch; v / ch];
                if !v.is_multiple_of(ch) {
                    out.push(v % ch);
                }
                out
            }
            _ => vec![v],
        }
    }

    /// The critic's pass (`nla/critic.rs`): blocks 0..=k, pooling, the value head, the
    /// rescaled MSE; for training the backward.
    fn critic_pass(
        &mut self,
        m: usize,
        b: usize,
        t: usize,
        train: bool,
        label: &str,
    ) -> Result<()> {
        self.check_shape(m, b, t)?;
        let name = self.models[m].name.clone();
        let pre = if train {
            name.clone()
        } else {
            format!("{name}.{label}")
        };
        let pass = if train { "fwd" } else { label };
        let (c, a, pool) = {
            let s = &self.models[m];
            (s.cfg.hidden_size, s.a, s.pool)
        };
        let inp = self.inputs(m, &pre, b, t);
        let target = self.stat(format!("{pre}.target"), b * a);
        let (res, layers, wx) =
            self.blocks_fwd(m, &pre, &inp, b, t, train, pass, Some(Group::Extra));
        let wx = wx.unwrap_or(self.models[m].params);
        let h = res[res.len() - 1];
        let pooled = self.act(format!("{pre}.pooled"), b * c);
        self.op(format!("{pre}: pool_fwd"), &[pooled, h, inp.mask, wx]);
        let pred = self.stat(format!("{pre}.pred"), b * a);
        self.op(format!("{pre}: value_head"), &[pred, pooled, wx]);
        let npred = self.stat(format!("{pre}.npred"), b * a);
        let ntarget = self.stat(format!("{pre}.ntarget"), b * a);
        self.op(format!("{pre}: norm_scale_fwd pred"), &[npred, pred]);
        self.op(format!("{pre}: norm_scale_fwd target"), &[ntarget, target]);
        self.op(format!("{pre}: download mse"), &[npred, ntarget]);
        if !train {
            return Ok(());
        }
        let dn = self.stat(format!("{pre}.dnpred"), b * a);
        let dpred = self.stat(format!("{pre}.dpred"), b * a);
        self.op(format!("{pre}: norm_scale_bwd"), &[dpred, dn, pred]);
        let gx = self.grad_sink(m, Group::Extra, "bwd");
        self.op(format!("{pre}: value_head bwd_dw"), &[gx, dpred, pooled]);
        let dpooled = self.act(format!("{pre}.dpooled"), b * c);
        self.op(format!("{pre}: value_head bwd_dx"), &[dpooled, dpred, wx]);
        let dres = self.act(format!("{pre}.bwd.dres_pool"), b * t * c);
        let mut ins = vec![dres, dpooled, h, inp.mask, wx];
        if pool {
            ins.push(gx);
        }
        self.op(format!("{pre}: pool_bwd"), &ins);
        self.flush(m, gx);
        self.blocks_bwd(m, &pre, &inp, &res, &layers, dres, b, t);
        Ok(())
    }

    /// Generation (`model/kv_cache.rs`, `generate.rs`): the cache [R, TMAX, NKV*HS] per layer
    /// in `kv_cache`; the step workspace sized for the prefill (R*TP rows) and reused by every
    /// decode step; a prefill pass (with the injection) and one decode pass.
    fn rollout(&mut self, m: usize, rows: usize, prompt: usize, new_tokens: usize) -> Result<()> {
        self.check_shape(m, rows, prompt)?;
        let name = self.models[m].name.clone();
        let pre = format!("{name}.rollout");
        let (c, f, v, nl, qd, kvd) = {
            let cfg = &self.models[m].cfg;
            (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.vocab_size,
                cfg.num_hidden_layers,
                cfg.q_dim(),
                cfg.kv_dim(),
            )
        };
        let r = rows;
        let tmax = prompt + new_tokens;
        let n = r * prompt;
        let ad = self.opts.policy.activations;
        let kv: Vec<(Buf, Buf)> = (0..nl)
            .map(|l| {
                let k = self.tr.buf(
                    format!("{pre}.cache.layers.{l}.k"),
                    ad,
                    r * tmax * kvd,
                    ArenaKind::KvCache,
                );
                let vv = self.tr.buf(
                    format!("{pre}.cache.layers.{l}.v"),
                    ad,
                    r * tmax * kvd,
                    ArenaKind::KvCache,
                );
                (k, vv)
            })
            .collect();
        let starts = self.ids(format!("{pre}.starts"), r);
        // the step's first position, read on the device (a decode step is replayed as a graph)
        let pos = self.ids(format!("{pre}.pos"), 1);
        let ws = |s: &mut Self, nm: &str, el: usize| s.act(format!("{pre}.ws.{nm}"), el);
        let x = ws(self, "x", n * c);
        let x_out = ws(self, "x_out", n * c);
        let x2 = ws(self, "x2", n * c);
        let xn = ws(self, "xn", n * c);
        let xn2 = ws(self, "xn2", n * c);
        let rstd = self.stat(format!("{pre}.ws.rstd"), n);
        let rstd2 = self.stat(format!("{pre}.ws.rstd2"), n);
        let qkv = ws(self, "qkv", n * (qd + 2 * kvd));
        let q = ws(self, "q", n * qd);
        let att = ws(self, "att", n * qd);
        let gu = ws(self, "gu", 2 * n * f);
        let h = ws(self, "h", n * f);
        let last = ws(self, "last", r * c);
        let last_n = ws(self, "last_n", r * c);
        let last_rstd = self.stat(format!("{pre}.ws.last_rstd"), r);
        let logits = self.tr.buf(
            format!("{pre}.ws.logits"),
            self.opts.policy.logits,
            r * v,
            ArenaKind::Activations,
        );
        let ids = self.ids(format!("{pre}.prompt_ids"), n);
        let inject = !self.models[m].inject_layers.is_empty();
        let sites = inject.then(|| self.ids(format!("{pre}.inject.sites"), r));
        let vecs = inject.then(|| self.act(format!("{pre}.inject.vecs"), r * c));
        let next = self.ids(format!("{pre}.next"), r);
        // every step's draws and log-probs [NEW,R] (uploaded and downloaded once)
        let logp = self.stat(format!("{pre}.logp"), r * new_tokens);
        let u = self.stat(format!("{pre}.uniform"), r * new_tokens);
        let inject_layers = self.models[m].inject_layers.clone();
        for (step, prefill) in [("prefill", true), ("decode", false)] {
            let sp = format!("{pre}.{step}");
            let tok = if prefill { ids } else { next };
            let we = self.weights(m, Group::Embed, &format!("rollout.{step}"));
            self.op(format!("{sp}: embedding_fwd"), &[x, tok, we]);
            let do_inject = |s: &mut Self, layer: usize, buf: Buf| {
                if let (true, Some(si), Some(ve)) = (prefill, sites, vecs) {
                    if inject_layers.contains(&layer) {
                        s.op(format!("{sp}: inject_fwd at {layer}"), &[buf, si, ve]);
                    }
                }
            };
            do_inject(self, 0, x);
            let mut w_next = self.weights(m, Group::Layer(0), &format!("rollout.{step}"));
            let mut w_head = self.models[m].params;
            for (l, &(kc, vc)) in kv.iter().enumerate() {
                let w = w_next;
                if l + 1 < nl {
                    w_next = self.weights(m, Group::Layer(l + 1), &format!("rollout.{step}"));
                } else {
                    w_head = self.weights(m, Group::Head, &format!("rollout.{step}"));
                }
                let lp = format!("{sp}.layers.{l}");
                // x and x_out swap roles every block: both are touched
                self.op(format!("{lp}: rmsnorm_fwd"), &[xn, rstd, x, x_out, w]);
                self.op(format!("{lp}: qkv_proj"), &[qkv, xn, w]);
                // keys and values straight into the cache
                self.op(format!("{lp}: qkv_rope_fwd"), &[q, kc, vc, qkv, pos]);
                self.op(
                    format!("{lp}: decode_attention_fwd"),
                    &[att, q, kc, vc, starts, pos],
                );
                self.op(format!("{lp}: o_proj + residual"), &[x2, x, x_out, att, w]);
                self.op(format!("{lp}: rmsnorm_fwd 2"), &[xn2, rstd2, x2, w]);
                self.op(format!("{lp}: gate_up_proj"), &[gu, xn2, w]);
                self.op(format!("{lp}: swiglu_fwd"), &[h, gu]);
                self.op(format!("{lp}: down_proj + residual"), &[x_out, x, x2, h, w]);
                do_inject(self, l + 1, x_out);
            }
            self.op(format!("{sp}: last positions"), &[last, x, x_out]);
            self.op(
                format!("{sp}: rmsnorm_fwd final"),
                &[last_n, last_rstd, last, w_head],
            );
            self.op(format!("{sp}: lm_head"), &[logits, last_n, w_head]);
            self.op(format!("{sp}: sample"), &[next, logp, logits, u]);
        }
        Ok(())
    }

    /// `train/optimizer.rs`: the gradient norm (partial sums, all-reduced over the GPUs),
    /// AdamW over the flat buffers (or shards), the weights all-gathered back (ZeRO-1/2),
    /// the gradients zeroed.
    fn update(&mut self, m: usize) -> Result<()> {
        let s = &self.models[m];
        let (Some(g), Some(mm), Some(vv)) = (s.grads, s.m, s.v) else {
            return Err(Error::invalid(
                "memory plan",
                format!("`{}` is frozen and has no optimizer step", s.name),
            ));
        };
        let (name, params, master) = (s.name.clone(), s.params, s.master);
        let norm = self.tr.buf(
            format!("{name}.update.norm_partials"),
            Dtype::F32,
            1024,
            ArenaKind::Scratch,
        );
        self.op(format!("{name}.update: sum_squares"), &[norm, g]);
        let mut bufs = vec![params, g, mm, vv];
        bufs.extend(master);
        self.op(format!("{name}.update: adamw"), &bufs);
        if self.opts.sharded(1) && !self.opts.sharded(3) {
            self.op(format!("{name}.update: all_gather weights"), &[params]);
        }
        self.op(format!("{name}.update: zero grads"), &[g]);
        Ok(())
    }
}
