//! The measuring core of `nla-engine bench`: a training step (forward + backward + AdamW) and a
//! rollout (batched generation with the KV cache) timed on any [`Device`], with the work each
//! one must do (FLOPs of the step, bytes the decode must read), so a caller can put the
//! measured rates against a device's peak: [`StepReport::mfu`] and
//! [`RolloutReport::bandwidth_fraction`] (against a datasheet peak, or against the copy
//! bandwidth [`measure_copy_bandwidth`] measures on the same device).
//!
//! Every function takes a `sync` callback that is called before each reading of the clock:
//! a device that queues work asynchronously (CUDA) passes its stream synchronize, so a timing
//! covers the work and not just its launch; the CPU device passes a no-op.

use std::fmt;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::device::{Device, GraphStats, SampleSpec, View, ViewMut};
use crate::generate::{generate, GenSpec};
use crate::model::{Batch, KvCache, MemoryOptions, Model, ModelConfig};
use crate::train::{AdamwConfig, LmTrainer, LrSchedule};
use crate::{Error, Result};

/// Bytes of an f32 element (the buffers of the copy-bandwidth measure).
pub const BYTES_PER_ELEMENT: usize = 4;

/// What to measure: the model's dims (random weights) and the shapes of the step and rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOpts {
    /// the model's dims; the weights are random (`Model::init_random`, std 0.02)
    pub config: ModelConfig,
    /// training step: rows per step
    pub batch: usize,
    /// training step: tokens per row
    pub seq: usize,
    /// untimed runs before the timed ones
    pub warmup: usize,
    /// timed runs
    pub iters: usize,
    /// rollout: distinct prompts
    pub rollout_prompts: usize,
    /// rollout: samples per prompt (the GRPO group size); the batch is prompts x samples rows
    pub rollout_samples: usize,
    /// rollout: tokens per prompt
    pub prompt_len: usize,
    /// rollout: tokens sampled per row (no EOS stop, so every row produces all of them)
    pub new_tokens: usize,
    /// seeds the weights, the token rows and the sampling
    pub seed: u64,
    /// training step: vocabulary chunks, block recompute (default: neither)
    pub memory: MemoryOptions,
}

impl BenchOpts {
    /// The model of `benches/small_config.json` (Llama, 4 layers, d 256, 8 heads / 4 KV heads,
    /// FFN 768, vocab 4096, untied; 5.25 M parameters), batch 4 x 128, rollout 8 prompts x 4
    /// samples, 32-token prompts, 64 new tokens: the shapes of `cargo bench --bench step`.
    pub fn small() -> Self {
        BenchOpts {
            config: ModelConfig {
                model_type: "llama".into(),
                vocab_size: 4096,
                hidden_size: 256,
                intermediate_size: 768,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                head_dim: 32,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 512,
                tie_word_embeddings: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            },
            batch: 4,
            seq: 128,
            warmup: 2,
            iters: 10,
            rollout_prompts: 8,
            rollout_samples: 4,
            prompt_len: 32,
            new_tokens: 64,
            seed: 0,
            memory: MemoryOptions::default(),
        }
    }

    /// A 1.1 B-parameter Llama of TinyLlama-1.1B's shape (d 2048, 22 layers, 32 heads / 4 KV
    /// heads, head size 64, FFN 5632, vocab 32000, untied, RoPE theta 1e4), one row of 2048
    /// tokens per step; rollout 8 prompts x 4 samples, 128-token prompts, 128 new tokens. For
    /// GPUs: in f32 the parameters, gradients and AdamW moments alone take 17.6 GB.
    pub fn llama_1b() -> Self {
        BenchOpts {
            config: ModelConfig {
                model_type: "llama".into(),
                vocab_size: 32000,
                hidden_size: 2048,
                intermediate_size: 5632,
                num_hidden_layers: 22,
                num_attention_heads: 32,
                num_key_value_heads: 4,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                max_position_embeddings: 2048,
                tie_word_embeddings: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            },
            batch: 1,
            seq: 2048,
            warmup: 2,
            iters: 5,
            rollout_prompts: 8,
            rollout_samples: 4,
            prompt_len: 128,
            new_tokens: 128,
            seed: 0,
            memory: MemoryOptions::default(),
        }
    }

    /// Tokens through the model per training step, `batch * seq`.
    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.seq
    }

    /// Rows of the rollout batch, `rollout_prompts * rollout_samples`.
    pub fn rollout_rows(&self) -> usize {
        self.rollout_prompts * self.rollout_samples
    }

    fn check_common(&self) -> Result<()> {
        if self.iters == 0 {
            return Err(Error::invalid("bench", "need at least one timed iteration"));
        }
        Ok(())
    }
}

/// The model's dims, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelDims {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    /// every parameter (embedding table, norms and LM head included)
    pub params: usize,
}

impl ModelDims {
    pub fn of(cfg: &ModelConfig) -> Self {
        ModelDims {
            layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            ffn: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            tied_embeddings: cfg.tie_word_embeddings,
            params: crate::model::ParamTable::for_config(cfg).total,
        }
    }
}

impl fmt::Display for ModelDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "L{} d{} heads {}/{} hs{} ffn{} V{}{} ({} params)",
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.ffn,
            self.vocab,
            if self.tied_embeddings { " tied" } else { "" },
            si(self.params as f64, "")
        )
    }
}

/// Parameters that are the weight of a matmul in the forward pass: per layer the q, k, v, o,
/// gate, up and down projections, plus the LM head `[V, C]` (counted once more when tied: the
/// matmul happens whether or not its weight is shared with the embedding). The embedding table
/// (a row gather) and the RMSNorm weights (elementwise) are left out.
pub fn matmul_params(cfg: &ModelConfig) -> usize {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let per_layer = qd * c + 2 * kvd * c + c * qd + 3 * f * c;
    cfg.num_hidden_layers * per_layer + v * c
}

/// FLOPs of causal attention (scores and weighted sum) in one training step, forward and
/// backward: `3 * 2 * 2 * B * T^2/2 * NH * HS * L`. Forward: `q k^T` and `p v` are each
/// `2 * T * T * HS` FLOPs per head and row, halved by the causal mask (the `T^2/2`
/// convention, as FlashAttention counts it); the backward is twice the forward (dq, dk from
/// dp; dp, dv), so the step is 3x the forward. NH*HS is the query width (`q_dim`).
pub fn attention_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let (b, t) = (batch as f64, seq as f64);
    let fwd = 2.0 * 2.0 * b * (t * t / 2.0) * cfg.q_dim() as f64 * cfg.num_hidden_layers as f64;
    3.0 * fwd
}

/// FLOPs of one training step over `batch x seq` tokens:
/// `6 * matmul_params * tokens + attention_flops`.
///
/// - `6 * N * tokens`: each matmul weight does 2 FLOPs per token forward (a multiply-add) and
///   4 backward (the input gradient and the weight gradient), as in Kaplan et al. / PaLM's MFU.
///   N is [`matmul_params`]: the projections of every layer and the LM head, whose matmul
///   counts (`6 * C * V * tokens`; tied or not). The embedding table is a gather (0 FLOPs)
///   and RMSNorm, RoPE, SwiGLU, softmax, cross-entropy and AdamW are elementwise work, not
///   counted: the figure is the model FLOPs of MFU, not every instruction the step runs.
/// - attention: [`attention_flops`], `3 * 2 * 2 * B * T^2/2 * NH * HS * L`.
pub fn train_step_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let tokens = (batch * seq) as f64;
    6.0 * matmul_params(cfg) as f64 * tokens + attention_flops(cfg, batch, seq)
}

/// Parameters one decode step must stream from memory: every parameter, except that an untied
/// embedding table is a gather of one row per sequence, not a stream of the table (`V * C`
/// left out; when tied, the table is read in full as the LM head).
pub fn streamed_params(cfg: &ModelConfig) -> usize {
    let total = crate::model::ParamTable::for_config(cfg).total;
    if cfg.tie_word_embeddings {
        total
    } else {
        total - cfg.vocab_size * cfg.hidden_size
    }
}

/// The bytes the decode phase of a rollout must read at least (the weight-streaming bound),
/// with `rows` sequences whose prompts are `prompt_len` tokens (no padding), `new_tokens`
/// sampled each:
///
/// - weights: the rollout samples `new_tokens` tokens: one from the prefill's logits, then
///   `new_tokens - 1` decode steps of one position per row, each of which reads every
///   streamed parameter once ([`streamed_params`] * `elem` bytes, the device's working dtype:
///   4 in f32, 2 in bf16): a step's matmuls are
///   `[rows, C] x W^T`, so with rows far below the GEMM's arithmetic intensity break-even the
///   step is bound by reading W;
/// - KV cache: decode step k (k = 1 ..= new_tokens - 1) writes position `prompt_len + k - 1`
///   and attends over `prompt_len + k` positions, reading their keys and values in every
///   layer: `2 * L * rows * (prompt_len + k) * NKV * HS * elem` bytes;
/// - logits: each of the `new_tokens` samplings reads the `[rows, V]` logits once.
///
/// Activations (`rows x C` per layer) and the cache writes are a small fraction and not counted.
pub fn decode_bytes(
    cfg: &ModelConfig,
    rows: usize,
    prompt_len: usize,
    new_tokens: usize,
    elem: usize,
) -> DecodeBytes {
    let e = elem as f64;
    let steps = new_tokens.saturating_sub(1);
    let weights_per_step = streamed_params(cfg) as f64 * e;
    // sum over k = 1..=steps of (prompt_len + k)
    let positions = (steps * prompt_len) as f64 + (steps * (steps + 1)) as f64 / 2.0;
    let kv_per_position = 2.0 * (cfg.num_hidden_layers * rows * cfg.kv_dim()) as f64 * e;
    DecodeBytes {
        decode_steps: steps,
        weights_per_step,
        weights: weights_per_step * steps as f64,
        kv_cache: kv_per_position * positions,
        logits: (new_tokens * rows * cfg.vocab_size) as f64 * e,
    }
}

/// The parts of [`decode_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DecodeBytes {
    /// one-position forward steps (`new_tokens - 1`)
    pub decode_steps: usize,
    /// weight bytes one decode step reads
    pub weights_per_step: f64,
    /// weight bytes over all decode steps
    pub weights: f64,
    /// KV-cache bytes over all decode steps
    pub kv_cache: f64,
    /// logit bytes over all samplings
    pub logits: f64,
}

impl DecodeBytes {
    pub fn total(&self) -> f64 {
        self.weights + self.kv_cache + self.logits
    }
}

/// A timed training step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    pub device: String,
    pub model: ModelDims,
    pub batch: usize,
    pub seq: usize,
    /// `batch * seq`
    pub tokens_per_step: usize,
    pub warmup: usize,
    /// seconds of each timed step, in order
    pub step_s: Vec<f64>,
    pub step_s_median: f64,
    pub step_s_min: f64,
    /// `tokens_per_step / step_s_median`
    pub tokens_per_s: f64,
    /// [`matmul_params`]
    pub matmul_params: usize,
    /// [`train_step_flops`]
    pub flops_per_step: f64,
    /// the attention part of `flops_per_step` ([`attention_flops`])
    pub attention_flops_per_step: f64,
    /// `flops_per_step / step_s_median`
    pub flops_per_s: f64,
    /// the loss of the last step (random weights: about ln V)
    pub last_loss: f64,
}

impl StepReport {
    /// Model FLOPs utilisation: achieved FLOP/s (at the median step) over `peak_flops`.
    pub fn mfu(&self, peak_flops: f64) -> f64 {
        self.flops_per_s / peak_flops
    }
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "training step (forward + backward + AdamW) on {}",
            self.device
        )?;
        writeln!(f, "  model: {}", self.model)?;
        writeln!(
            f,
            "  batch {} x {} = {} tokens; {} timed steps after {} warmup",
            self.batch,
            self.seq,
            self.tokens_per_step,
            self.step_s.len(),
            self.warmup
        )?;
        writeln!(
            f,
            "  step: median {}, min {}; {} tokens/s",
            secs(self.step_s_median),
            secs(self.step_s_min),
            si(self.tokens_per_s, "")
        )?;
        write!(
            f,
            "  {} per step ({} attention); {} achieved; last loss {:.4}",
            si(self.flops_per_step, "FLOP"),
            si(self.attention_flops_per_step, "FLOP"),
            si(self.flops_per_s, "FLOP/s"),
            self.last_loss
        )
    }
}

/// A timed rollout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolloutReport {
    pub device: String,
    pub model: ModelDims,
    pub prompts: usize,
    pub samples_per_prompt: usize,
    /// `prompts * samples_per_prompt`: the batch of every step
    pub rows: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub warmup: usize,
    /// tokens the last timed rollout generated (`rows * new_tokens`, no EOS stop)
    pub generated_tokens: usize,
    /// seconds of each timed rollout (`generate`: prefill, samplings and decode steps)
    pub rollout_s: Vec<f64>,
    pub rollout_s_median: f64,
    pub rollout_s_min: f64,
    /// seconds of each timed prefill alone (cache allocation + one step over the prompts, as
    /// `generate` starts), timed just before the rollout of the same iteration
    pub prefill_s: Vec<f64>,
    pub prefill_s_median: f64,
    /// the median over iterations of `rollout_s - prefill_s`: the samplings and decode steps
    pub decode_s_median: f64,
    /// `generated_tokens / rollout_s_median`
    pub tokens_per_s: f64,
    /// what the decode phase must read ([`decode_bytes`])
    pub decode_bytes: DecodeBytes,
    /// `decode_bytes.total() / decode_s_median`
    pub decode_bytes_per_s: f64,
    /// what the decode steps' graphs did over all rollouts, warm-up included (None: the
    /// device has no graphs)
    pub graphs: Option<GraphStats>,
}

impl RolloutReport {
    /// The decode phase's achieved read bandwidth under the weight-streaming bound
    /// ([`decode_bytes`] over the measured decode time) as a fraction of `bytes_per_s_peak`
    /// (a datasheet figure or [`measure_copy_bandwidth`]).
    pub fn bandwidth_fraction(&self, bytes_per_s_peak: f64) -> f64 {
        self.decode_bytes_per_s / bytes_per_s_peak
    }
}

impl fmt::Display for RolloutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rollout (batched generation, KV cache) on {}",
            self.device
        )?;
        writeln!(f, "  model: {}", self.model)?;
        writeln!(
            f,
            "  {} prompts x {} samples = {} rows, {}-token prompts, {} new tokens each; {} timed after {} warmup",
            self.prompts,
            self.samples_per_prompt,
            self.rows,
            self.prompt_len,
            self.new_tokens,
            self.rollout_s.len(),
            self.warmup
        )?;
        writeln!(
            f,
            "  rollout: median {}, min {}; {} generated tokens, {} tokens/s",
            secs(self.rollout_s_median),
            secs(self.rollout_s_min),
            self.generated_tokens,
            si(self.tokens_per_s, "")
        )?;
        writeln!(
            f,
            "  prefill: median {}; decode ({} steps + {} samplings): median {}",
            secs(self.prefill_s_median),
            self.decode_bytes.decode_steps,
            self.new_tokens,
            secs(self.decode_s_median)
        )?;
        let b = &self.decode_bytes;
        write!(
            f,
            "  decode must read {} (weights {}/step, KV cache {}, logits {}): {} achieved",
            si(b.total(), "B"),
            si(b.weights_per_step, "B"),
            si(b.kv_cache, "B"),
            si(b.logits, "B"),
            si(self.decode_bytes_per_s, "B/s")
        )?;
        if let Some(g) = &self.graphs {
            write!(
                f,
                "\n  decode steps as graphs: {} captured, {} replayed, {} failed captures",
                g.captures, g.replays, g.failures
            )?;
            if let Some(why) = &g.first_failure {
                write!(f, " (first: {why})")?;
            }
            if g.captures > 0 {
                write!(
                    f,
                    "; a graph: {} kernel launches + {} matmuls",
                    g.graph_kernels, g.graph_matmuls
                )?;
            }
        }
        Ok(())
    }
}

/// `batch` rows of `seq` random token ids below `vocab`.
fn random_rows(rng: &mut impl Rng, batch: usize, seq: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; `sync()` before every clock read.
fn time_runs<T>(
    warmup: usize,
    iters: usize,
    sync: &dyn Fn() -> Result<()>,
    mut f: impl FnMut() -> Result<T>,
) -> Result<(Vec<f64>, T)> {
    let mut last = None;
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        sync()?;
        let t0 = Instant::now();
        let out = f()?;
        sync()?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            times.push(dt);
        }
        last = Some(out);
    }
    let last = last.ok_or_else(|| Error::invalid("bench", "need at least one timed iteration"))?;
    Ok((times, last))
}

/// The median (the mean of the two middle values for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Times the training step of [`LmTrainer`] (forward, causal-LM loss, backward, gradient
/// clipping, AdamW at a constant lr 1e-4) on a randomly initialised model over `o.batch` random
/// rows of `o.seq` tokens: `o.warmup` untimed steps, then `o.iters` timed ones.
pub fn sft_step<D: Device>(
    dev: &D,
    o: &BenchOpts,
    sync: &dyn Fn() -> Result<()>,
) -> Result<StepReport> {
    o.check_common()?;
    if o.batch == 0 || o.seq < 2 {
        return Err(Error::invalid(
            "bench",
            format!(
                "the step needs rows of at least 2 tokens (batch {} x seq {})",
                o.batch, o.seq
            ),
        ));
    }
    let cfg = &o.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let batch = Batch::causal_lm(&random_rows(&mut rng, o.batch, o.seq, cfg.vocab_size))?;
    let model = Model::init_random(dev, cfg.clone(), o.seed, 0.02)?;
    let mut trainer = LmTrainer::new(
        dev,
        model,
        AdamwConfig::default(),
        LrSchedule::constant(1e-4),
        1.0,
    )?;
    trainer.memory = o.memory;
    let (step_s, stats) = time_runs(o.warmup, o.iters, sync, || {
        trainer.step(dev, std::slice::from_ref(&batch))
    })?;
    let step_s_median = median(&step_s);
    let tokens_per_step = o.tokens_per_step();
    let flops_per_step = train_step_flops(cfg, o.batch, o.seq);
    Ok(StepReport {
        device: dev.name(),
        model: ModelDims::of(cfg),
        batch: o.batch,
        seq: o.seq,
        tokens_per_step,
        warmup: o.warmup,
        step_s_min: min(&step_s),
        step_s_median,
        step_s,
        tokens_per_s: tokens_per_step as f64 / step_s_median,
        matmul_params: matmul_params(cfg),
        flops_per_step,
        attention_flops_per_step: attention_flops(cfg, o.batch, o.seq),
        flops_per_s: flops_per_step / step_s_median,
        last_loss: stats.loss,
    })
}

/// Times a rollout: `generate` on a randomly initialised model, `o.rollout_prompts` random
/// prompts of `o.prompt_len` tokens x `o.rollout_samples` samples each, `o.new_tokens` new
/// tokens at temperature 1 (no top-k/top-p) with no EOS, so every row generates all of them.
///
/// `generate` does not expose its phases, so each iteration also times the prefill alone (the
/// same cache allocation and prompt step `generate` starts with) just before the rollout; the
/// decode phase's time is the median over iterations of rollout minus prefill. The decode
/// phase includes the `new_tokens` samplings and the per-token host round trip `generate` does
/// (uploading uniforms, downloading the drawn ids), as a real rollout does.
pub fn rollout<D: Device>(
    dev: &D,
    o: &BenchOpts,
    sync: &dyn Fn() -> Result<()>,
) -> Result<RolloutReport> {
    o.check_common()?;
    if o.rollout_rows() == 0 || o.prompt_len == 0 || o.new_tokens == 0 {
        return Err(Error::invalid(
            "bench",
            "the rollout needs prompts, samples, prompt tokens and new tokens",
        ));
    }
    let cfg = &o.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed ^ 0x5eed_b0a7);
    let prompts = random_rows(&mut rng, o.rollout_prompts, o.prompt_len, cfg.vocab_size);
    let model = Model::init_random(dev, cfg.clone(), o.seed, 0.02)?;
    let spec = GenSpec {
        n: o.rollout_samples,
        max_new_tokens: o.new_tokens,
        sample: SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        eos_ids: vec![],
        seed: o.seed,
    };
    // the prefill batch as `generate` lays it out: every sample of prompt p is a row
    let rows = o.rollout_rows();
    let starts = vec![0u32; rows];
    let prefill_ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, o.rollout_samples))
        .flatten()
        .copied()
        .collect();
    let (tp, tmax) = (o.prompt_len, o.prompt_len + o.new_tokens);

    let mut prefill_s = Vec::with_capacity(o.iters);
    let mut rollout_s = Vec::with_capacity(o.iters);
    let mut generated_tokens = 0;
    let graphs_before = dev.graph_stats();
    for i in 0..o.warmup + o.iters {
        sync()?;
        let t0 = Instant::now();
        {
            let mut cache = KvCache::new(dev, cfg, &starts, tmax, tp)?;
            cache.step(dev, &model, &dev.upload_ids(&prefill_ids)?, tp)?;
        }
        sync()?;
        let t1 = Instant::now();
        let samples = generate(dev, &model, &prompts, &spec, &|_: &[u32]| false)?;
        sync()?;
        let t2 = Instant::now();
        if i >= o.warmup {
            prefill_s.push((t1 - t0).as_secs_f64());
            rollout_s.push((t2 - t1).as_secs_f64());
        }
        generated_tokens = samples.iter().map(|s| s.tokens.len()).sum();
    }
    // what the decode steps' graphs did over the rollouts
    let graphs = dev.graph_stats().map(|after| {
        let before = graphs_before.unwrap_or_default();
        GraphStats {
            captures: after.captures - before.captures,
            replays: after.replays - before.replays,
            failures: after.failures - before.failures,
            first_failure: after.first_failure,
            graph_kernels: after.graph_kernels,
            graph_matmuls: after.graph_matmuls,
        }
    });
    let decode: Vec<f64> = rollout_s
        .iter()
        .zip(&prefill_s)
        .map(|(r, p)| r - p)
        .collect();
    let decode_s_median = median(&decode);
    let rollout_s_median = median(&rollout_s);
    let bytes = decode_bytes(
        cfg,
        rows,
        o.prompt_len,
        o.new_tokens,
        dev.work_dtype().size(),
    );
    Ok(RolloutReport {
        device: dev.name(),
        model: ModelDims::of(cfg),
        prompts: o.rollout_prompts,
        samples_per_prompt: o.rollout_samples,
        rows,
        prompt_len: o.prompt_len,
        new_tokens: o.new_tokens,
        warmup: o.warmup,
        generated_tokens,
        rollout_s_min: min(&rollout_s),
        rollout_s_median,
        rollout_s,
        prefill_s_median: median(&prefill_s),
        prefill_s,
        decode_s_median,
        tokens_per_s: generated_tokens as f64 / rollout_s_median,
        decode_bytes_per_s: bytes.total() / decode_s_median,
        decode_bytes: bytes,
        graphs,
    })
}

/// The device's copy bandwidth in bytes/s: `dev.copy` of a buffer of `bytes` bytes (rounded
/// down to whole f32 elements, at least one) into another, counted as read + write
/// (`2 * bytes` per copy), over the fastest of `iters` timed copies (after one untimed copy),
/// each between two `sync()` calls. The fastest, not the median, so the reference a kernel is
/// put against is the best this device showed. Use a buffer well above the last-level cache.
pub fn measure_copy_bandwidth<D: Device>(
    dev: &D,
    bytes: usize,
    iters: usize,
    sync: &dyn Fn() -> Result<()>,
) -> Result<f64> {
    if iters == 0 {
        return Err(Error::invalid("bench", "need at least one timed copy"));
    }
    let n = (bytes / BYTES_PER_ELEMENT).max(1);
    let mut src = dev.alloc(n)?;
    dev.fill(ViewMut::all(&mut src), 1.0)?;
    let mut dst = dev.alloc(n)?;
    let (times, ()) = time_runs(1, iters, sync, || {
        dev.copy(ViewMut::all(&mut dst), View::all(&src))
    })?;
    Ok(2.0 * (n * BYTES_PER_ELEMENT) as f64 / min(&times))
}

/// `x` with an SI prefix: `si(1.5e9, "FLOP/s")` = "1.50 GFLOP/s".
fn si(x: f64, unit: &str) -> String {
    let (scale, prefix) = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(s, _)| x.abs() >= s)
        .unwrap_or((1.0, ""));
    let v = x / scale;
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    let sep = if unit.is_empty() { "" } else { " " };
    format!("{v:.digits$}{sep}{prefix}{unit}")
}

/// Seconds as ms or s.
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}
