//! The YAML run config: typed sections, loading with `--set` overrides, validation.
//!
//! A run config is one YAML file with the sections `model`, `data`, `optim`, `trainer`,
//! `grpo`, `ppo` and `generation`. Where the verl NLA add-on has a key, the key has verl's name
//! and nesting, so that its `nla_sft_config.yaml` loads unchanged; the keys of its GRPO layout
//! (`actor_rollout_ref.*`, `critic.*`, `algorithm.*`, `nla.*`, ...) are read into ours, and the
//! keys that configure machinery nla-engine does not have (FSDP, Ray, SGLang, wandb) are
//! accepted and ignored. [`seed_keys`] holds both tables, with the reason for every key.
//! Everything else that is not a key of ours is an error.
//!
//! # Loading
//!
//! [`RunConfig::from_file`] (or [`RunConfig::from_yaml`] for text in memory):
//! 1. parses the YAML into a value tree (a syntax error names the file, line and column; `<<`
//!    merge keys and anchors work);
//! 2. walks the tree: verl keys move to ours, ignored keys are dropped and listed in
//!    [`RunConfig::ignored`], an unknown key is an error that names its dotted path and the
//!    closest known key (`unknown key; did you mean `optim.lr`?`), a key written as a section
//!    that is not one is an error, an empty section (`optim:` with nothing under it) counts as
//!    absent, and a Hydra interpolation (`${...}`) is an error (there is no Hydra here);
//! 3. applies each override `a.b.c=value` in order: the value is parsed as YAML (a scalar, a
//!    flow list `[0, 2]` or a flow map), a path into a missing section creates it, the path goes
//!    through the same walk (so verl names work and unknown ones are errors), and the override
//!    wins over the file;
//! 4. fills the keys of `data.val_dataset` that are not given from `data.train_dataset`
//!    (all but `parquet_files` and `shuffle`);
//! 5. checks the required keys: `model.model_name`, `data.train_dataset.parquet_files` (and
//!    `data.val_dataset.parquet_files` when there is a validation set),
//!    `trainer.total_training_steps`;
//! 6. deserialises into [`RunConfig`] (a wrong type names the key and the expected type) and
//!    runs [`RunConfig::validate`].
//!
//! Paths (model folders, parquet files, `save_dir`) are used as written: relative paths are
//! relative to the working directory, as in verl. Whether files exist is checked by their
//! loaders (the model loader and the data loader), not here, so that a config can be loaded,
//! printed and planned (`nla-engine plan`) on a machine that does not hold the data.
//! [`RunConfig::check_model_dims`] does the checks that need the models' sizes.
//!
//! # Defaults
//!
//! Every key but the required ones has a default. Where the two reference systems differ the
//! default follows the official NLA code (\[O\]); otherwise it is verl's (\[V\]) seed value. See
//! `shared/reference/NLA_SEMANTICS.md`.
//!
//! | key | default | source |
//! |---|---|---|
//! | `model.activation_dim` | null = the actor's hidden size | \[V\] `nla.activation_dim` |
//! | `model.injection.mode` | `replace` | \[O\], \[V\] |
//! | `model.injection.layer_indices` | `[0]` (embedding output) | \[O\], \[V\] |
//! | `model.injection.injection_token` | `"<INJECT>"` (marker text in the prompts) | \[O\], \[V\] |
//! | `model.injection.scale` | null = raw vectors | \[O\] (`injection_scale`) |
//! | `model.critic.model_name` | null = the actor's model | |
//! | `model.critic.truncate_at_layer` | null = every block | \[O\] K |
//! | `model.critic.pooling` | `last` | \[O\], \[V\] |
//! | `model.critic.critic_prompt` | `Summary of the following text: <text>{explanation}</text> <summary>` | \[O\] |
//! | `model.critic.explanation_tag` | `explanation` | \[O\] |
//! | `model.critic.mse_scale` | `sqrt_d_model` | \[O\] |
//! | `model.critic.head_init` | `identity` | \[O\] |
//! | `data.*.prompt_key` / `response_key` / `activation_vector_key` | `prompt` / `response` / `activation_vector` | \[V\] |
//! | `data.*.max_length` | 2048 | \[V\] |
//! | `data.*.truncation` | `error` | \[V\] RL (an over-long row is an error, never silently cut) |
//! | `data.*.mode` | `actor` | \[V\] |
//! | `data.train_batch_size` / `val_batch_size` / `micro_batch_size_per_gpu` | 32 / 32 / 4 | \[V\] |
//! | `optim.lr` / `critic_lr` | 1e-5 / 5e-5 | \[V\]; \[O\] notes' best RL values |
//! | `optim.weight_decay`, `beta1`, `beta2`, `eps`, `max_norm` | 0.01, 0.9, 0.999, 1e-8, 1.0 | \[V\], \[O\] |
//! | `optim.warmup_steps` | 50 | \[O\] SFT notes, \[V\] GRPO |
//! | `optim.lr_scheduler_type` | `cosine` | \[O\] SFT, \[V\] SFT |
//! | `optim.min_lr_ratio` | 0.1 | \[O\] (2e-5 -> 2e-6) |
//! | `trainer.train_mode` / `algo` | `actor` / `sft` | \[V\] |
//! | `trainer.save_steps` / `val_steps` / `logging_steps` | 1000 / 500 / 10 (0 = never) | \[V\] |
//! | `trainer.save_dir` / `save_total_limit` | `checkpoints` / 5 | \[V\] |
//! | `trainer.seed` / `device` / `critic_epochs` | 42 / `auto` / 1 | \[V\] |
//! | `trainer.logits_chunk` / `recompute` | null (whole logits) / `none` | |
//! | `trainer.precision` | `auto` (bf16 on a GPU, f32 on the CPU) | |
//! | `grpo.n` | 4 | \[O\] `rl.sh`, \[V\] |
//! | `grpo.clip_ratio_low` / `clip_ratio_high` | 0.2 / 0.2 | \[O\], \[V\] |
//! | `grpo.dual_clip_c` | 3.0 (null = off) | \[V\] (verl's default) |
//! | `grpo.use_kl_loss` / `kl_coef` / `kl_type` | true / 0.01 / `k1` | \[O\] (\[V\]: off) |
//! | `grpo.loss_agg_mode` | `seq-mean-token-mean` | \[O\] (\[V\]: `token-mean`) |
//! | `grpo.norm_adv_by_std` | true | \[O\], \[V\] |
//! | `grpo.ppo_epochs` / `ppo_mini_batch_size` | 1 / null (the whole batch: one step per rollout) | \[O\] |
//! | `grpo.failure_reward` | -2.0 | \[O\] |
//! | `grpo.reward_transform` / `reward_scale` / `reward_normalize` / `reward_clip` | `negative` / 1.0 / false / null | \[O\] |
//! | `ppo.epochs` / `clip` / `whiten_advantages` / `mini_batch_size` / `critic_train_epochs` | 4 / 0.2 / true / null / 1 | \[V\] legacy PPO |
//! | `generation.temperature` / `top_p` / `top_k` | 1.0 / 1.0 / -1 (off) | \[O\] (Miles) |
//! | `generation.max_new_tokens` | 150 | \[O\] |
//! | `generation.stop` | `[]` (the EOS token always stops) | |

mod load;
pub mod seed_keys;

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::memory::Recompute;
use crate::train::{AdamwConfig, LrSchedule, ScheduleKind};
use crate::{Error, Result};

/// The \[O\] critic prompt: the explanation is put inside `<text>` tags.
pub const DEFAULT_CRITIC_PROMPT: &str =
    "Summary of the following text: <text>{explanation}</text> <summary>";

/// A run: models, data, optimizer, trainer and the RL sections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub trainer: TrainerConfig,
    #[serde(default)]
    pub grpo: GrpoConfig,
    #[serde(default)]
    pub ppo: PpoConfig,
    /// Sampling for the RL rollout and for validation samples.
    #[serde(default)]
    pub generation: GenerationConfig,
    /// The file this config came from (used in error messages).
    #[serde(skip)]
    pub source: PathBuf,
    /// Keys that were accepted and ignored, with the reason, in file order.
    #[serde(skip)]
    pub ignored: Vec<IgnoredKey>,
    /// verl keys read under our name: (verl path, our path).
    #[serde(skip)]
    pub renamed: Vec<(String, String)>,
}

/// A key that the config accepted and does nothing with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredKey {
    /// Dotted path as written (`trainer.fsdp`).
    pub path: String,
    pub reason: &'static str,
}

/// `model`: the actor, the injection and the critic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// The actor: a local Hugging Face model folder or a `.gguf` file; `builtin:demo` is the
    /// small randomly initialised byte-level Llama of `nla-engine demo`. Required.
    pub model_name: String,
    /// Length of the activation vectors; null = the actor's hidden size.
    pub activation_dim: Option<usize>,
    pub injection: InjectionConfig,
    pub critic: CriticConfig,
}

/// `model.injection`: how a vector enters the actor at its marker token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectionConfig {
    pub mode: InjectionMode,
    /// 0 = the embedding output; i > 0 = the residual stream after block i-1.
    pub layer_indices: Vec<usize>,
    /// The marker text in the prompts; each occurrence takes the next vector of the row.
    pub injection_token: String,
    /// The token id that stands for the marker; null = chosen by the tokenizer loader.
    pub injection_token_id: Option<u32>,
    /// Output size of the `project` mode's Linear; null or the actor's hidden size.
    pub projection_dim: Option<usize>,
    /// Fixed-norm rescale of each vector before injection: a number, `sqrt_d_model`, or null
    /// (raw vectors).
    pub scale: Scale,
}

impl Default for InjectionConfig {
    fn default() -> Self {
        InjectionConfig {
            mode: InjectionMode::Replace,
            layer_indices: vec![0],
            injection_token: "<INJECT>".into(),
            injection_token_id: None,
            projection_dim: None,
            scale: Scale::Raw,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectionMode {
    /// `h[p] <- v`
    Replace,
    /// `h[p] <- h[p] + v`
    Add,
    /// `h[p] <- W v` with a trained `W` (identity-like init when the sizes match).
    Project,
}

/// `model.critic`: the reconstruction model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// The critic's backbone; null = the actor's `model_name`.
    pub model_name: Option<String>,
    /// K: blocks 0..=K of the backbone are kept (no final norm); null = every block.
    pub truncate_at_layer: Option<usize>,
    /// verl's name for the same cut in Hugging Face's `hidden_states` numbering
    /// (i = the output of block i-1), so K = i - 1. If both are given they must agree.
    pub output_layer_index: Option<usize>,
    pub pooling: Pooling,
    /// The critic's input. With `{explanation}` in it, the explanation is put there; without, it
    /// is a prefix followed by the response tokens (verl); null = the response alone.
    pub critic_prompt: Option<String>,
    /// The explanation is the text inside the first `<tag>...</tag>` of the response, and a
    /// response without the closed tag is a failure; null = the whole response.
    pub explanation_tag: Option<String>,
    /// Norm both prediction and target are scaled to before the MSE (loss and reward): a
    /// number, `sqrt_d_model`, or null (raw MSE).
    pub mse_scale: Scale,
    /// Initialisation of the head Linear(d -> activation_dim).
    pub head_init: HeadInit,
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            model_name: None,
            truncate_at_layer: None,
            output_layer_index: None,
            pooling: Pooling::Last,
            critic_prompt: Some(DEFAULT_CRITIC_PROMPT.into()),
            explanation_tag: Some("explanation".into()),
            mse_scale: Scale::SqrtDModel,
            head_init: HeadInit::Identity,
        }
    }
}

impl CriticConfig {
    /// K, the last block kept, from `truncate_at_layer` or `output_layer_index`.
    pub fn last_block(&self) -> Option<usize> {
        self.truncate_at_layer
            .or(self.output_layer_index.map(|i| i.saturating_sub(1)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Last,
    Mean,
    Max,
    Cls,
    Weighted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    /// I when the sizes match (else a scaled random init).
    Identity,
    Random,
}

/// A fixed norm that vectors are rescaled to: `x * s / max(|x|, 1e-12)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    /// No rescale (YAML null or `raw`).
    Raw,
    /// s = sqrt(d).
    SqrtDModel,
    Fixed(f64),
}

impl Scale {
    /// The norm s for vectors of size `d`; None for raw vectors.
    pub fn norm(&self, d: usize) -> Option<f64> {
        match self {
            Scale::Raw => None,
            Scale::SqrtDModel => Some((d as f64).sqrt()),
            Scale::Fixed(s) => Some(*s),
        }
    }
}

impl Serialize for Scale {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Scale::Raw => s.serialize_none(),
            Scale::SqrtDModel => s.serialize_str("sqrt_d_model"),
            Scale::Fixed(x) => s.serialize_f64(*x),
        }
    }
}

impl<'de> Deserialize<'de> for Scale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scale;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive number, \"sqrt_d_model\" or null")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Scale, E> {
                Ok(Scale::Raw)
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Scale, E> {
                Ok(Scale::Raw)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Scale, E> {
                match v {
                    "sqrt_d_model" => Ok(Scale::SqrtDModel),
                    "raw" => Ok(Scale::Raw),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Scale, E> {
                Ok(Scale::Fixed(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Scale, E> {
                Ok(Scale::Fixed(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Scale, E> {
                Ok(Scale::Fixed(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// `data`: the datasets and batch sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Required.
    pub train_dataset: DatasetConfig,
    /// Keys not given here are taken from `train_dataset` (all but `parquet_files`, `shuffle`).
    pub val_dataset: Option<DatasetConfig>,
    /// Rows per optimizer step, over all GPUs (RL: prompts per step; each gets `grpo.n`
    /// samples).
    pub train_batch_size: usize,
    pub val_batch_size: usize,
    /// Rows per forward/backward pass on one GPU (gradient accumulation makes up the rest).
    pub micro_batch_size_per_gpu: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train_dataset: DatasetConfig::default(),
            val_dataset: None,
            train_batch_size: 32,
            val_batch_size: 32,
            micro_batch_size_per_gpu: 4,
        }
    }
}

/// `data.train_dataset` / `data.val_dataset`: parquet files and their columns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// One path or a list. Required.
    #[serde(deserialize_with = "one_or_many")]
    pub parquet_files: Vec<PathBuf>,
    /// Column of the actor prompt: a string, or a message list whose first user content is
    /// used; holds the marker text.
    pub prompt_key: String,
    /// Column of the explanation (SFT).
    pub response_key: String,
    /// Column of the vectors (a list of `activation_dim` numbers, or several for several
    /// markers).
    pub activation_vector_key: String,
    /// Longest tokenized row (RL: longest prompt).
    pub max_length: usize,
    pub truncation: Truncation,
    /// Which model the rows are for (SFT): actor rows, critic rows, or both.
    pub mode: Part,
    pub shuffle: bool,
    /// Shuffle seed; null = `trainer.seed`.
    pub seed: Option<u64>,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            parquet_files: vec![],
            prompt_key: "prompt".into(),
            response_key: "response".into(),
            activation_vector_key: "activation_vector".into(),
            max_length: 2048,
            truncation: Truncation::Error,
            mode: Part::Actor,
            shuffle: true,
            seed: None,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<PathBuf>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<PathBuf>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a path or a list of paths")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
            Ok(vec![PathBuf::from(v)])
        }
        fn visit_seq<A: de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = vec![];
            while let Some(p) = seq.next_element::<PathBuf>()? {
                out.push(p);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// What to do with a row longer than `max_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Stop with an error naming the row.
    Error,
    /// Drop tokens from the start.
    Left,
    /// Drop tokens from the end.
    Right,
    /// Leave the row out (and count it).
    Skip,
}

/// The actor, the critic, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Actor,
    Critic,
    Both,
}

impl Part {
    pub fn has_actor(self) -> bool {
        matches!(self, Part::Actor | Part::Both)
    }
    pub fn has_critic(self) -> bool {
        matches!(self, Part::Critic | Part::Both)
    }
}

/// `optim`: AdamW and the learning-rate schedule, shared by actor and critic (the critic has
/// its own `critic_lr`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub critic_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 = off.
    pub max_norm: f64,
    pub warmup_steps: u64,
    pub lr_scheduler_type: LrSchedulerType,
    /// The schedule decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            critic_lr: 5e-5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_norm: 1.0,
            warmup_steps: 50,
            lr_scheduler_type: LrSchedulerType::Cosine,
            min_lr_ratio: 0.1,
        }
    }
}

impl OptimConfig {
    pub fn adamw(&self) -> AdamwConfig {
        AdamwConfig {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
        }
    }

    /// The schedule from `lr` (the actor's `lr` or the critic's `critic_lr`) over
    /// `total_steps` optimizer steps.
    pub fn schedule(&self, lr: f64, total_steps: u64) -> LrSchedule {
        LrSchedule {
            kind: match self.lr_scheduler_type {
                LrSchedulerType::Constant => ScheduleKind::Constant,
                LrSchedulerType::Linear => ScheduleKind::Linear,
                LrSchedulerType::Cosine => ScheduleKind::Cosine,
            },
            lr: lr as f32,
            min_lr: (lr * self.min_lr_ratio) as f32,
            warmup_steps: self.warmup_steps,
            total_steps,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Constant,
    Linear,
    Cosine,
}

/// `trainer`: what to train, for how long, where to save.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    pub train_mode: Part,
    pub algo: Algo,
    /// Optimizer steps. Required.
    pub total_training_steps: u64,
    /// Every this many steps (0 = never; the last step always saves).
    pub save_steps: u64,
    /// Every this many steps (0 = never).
    pub val_steps: u64,
    /// Every this many steps (0 = never).
    pub logging_steps: u64,
    pub save_dir: PathBuf,
    /// Checkpoints kept in `save_dir`; null = all.
    pub save_total_limit: Option<usize>,
    pub resume: Resume,
    pub seed: u64,
    pub device: DeviceKind,
    /// SFT with `train_mode: both`: critic steps per actor step.
    pub critic_epochs: usize,
    /// The actor's LM head and cross-entropy run over the vocabulary in chunks of this many
    /// entries, so that the [tokens, vocabulary] logits never exist whole (one more LM-head
    /// matmul per step: the chunk's logits are made again in backward); null = whole logits.
    pub logits_chunk: Option<usize>,
    /// `block`: keep only each block's input in forward and run the block again just before
    /// its backward (one more forward of the blocks per step, a fraction of the activations);
    /// `none`: keep everything.
    pub recompute: Recompute,
    /// The working dtype of weights' copy, activations and logits (master weights, gradients
    /// and AdamW state are f32 always): `auto` = the device's (bf16 on a GPU, f32 on the CPU);
    /// `f32` on a GPU gives the CPU's numerics (parity checks).
    pub precision: Precision,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            train_mode: Part::Actor,
            algo: Algo::Sft,
            total_training_steps: 0,
            save_steps: 1000,
            val_steps: 500,
            logging_steps: 10,
            save_dir: PathBuf::from("checkpoints"),
            save_total_limit: Some(5),
            resume: Resume::No,
            seed: 42,
            device: DeviceKind::Auto,
            critic_epochs: 1,
            logits_chunk: None,
            recompute: Recompute::None,
            precision: Precision::Auto,
        }
    }
}

/// `trainer.precision` (and `--precision`): the device's working dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// the device's default: bf16 on a GPU, f32 on the CPU
    #[default]
    Auto,
    Bf16,
    F32,
}

impl Precision {
    /// The dtype asked for; None = the device's default.
    pub fn dtype(self) -> Option<crate::device::Dtype> {
        match self {
            Precision::Auto => None,
            Precision::Bf16 => Some(crate::device::Dtype::Bf16),
            Precision::F32 => Some(crate::device::Dtype::F32),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    Sft,
    Grpo,
    Ppo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// CUDA when a GPU and kernels are there, else the CPU.
    Auto,
}

/// `trainer.resume`: false (start fresh), true (the latest checkpoint in `save_dir`, if any),
/// or a checkpoint path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    No,
    Latest,
    From(PathBuf),
}

impl Serialize for Resume {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Resume::No => s.serialize_bool(false),
            Resume::Latest => s.serialize_bool(true),
            Resume::From(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Resume;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a checkpoint path")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Resume, E> {
                Ok(Resume::No)
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Resume, E> {
                Ok(Resume::No)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Resume, E> {
                Ok(if v { Resume::Latest } else { Resume::No })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Resume, E> {
                Ok(Resume::From(PathBuf::from(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `grpo`: group-relative policy optimisation (the RL default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Samples per prompt (the group).
    pub n: usize,
    pub clip_ratio_low: f64,
    pub clip_ratio_high: f64,
    /// Dual-clip bound c on negative advantages; null = off.
    pub dual_clip_c: Option<f64>,
    /// KL loss to the frozen SFT actor (kept in memory only when on).
    pub use_kl_loss: bool,
    pub kl_coef: f64,
    pub kl_type: KlType,
    pub loss_agg_mode: LossAggMode,
    /// A = (r - mean) / (std + 1e-6); false = r - mean (Dr.GRPO).
    pub norm_adv_by_std: bool,
    /// Passes over each rollout.
    pub ppo_epochs: usize,
    /// Prompts per actor optimizer step; null = the whole batch (one step per rollout).
    pub ppo_mini_batch_size: Option<usize>,
    /// Reward of a truncated or unparseable response (also left out of critic training).
    pub failure_reward: f64,
    pub reward_transform: RewardTransform,
    pub reward_scale: f64,
    /// z-score the rewards over the batch.
    pub reward_normalize: bool,
    /// [min, max]; null = no clipping.
    pub reward_clip: Option<[f64; 2]>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            n: 4,
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.2,
            dual_clip_c: Some(3.0),
            use_kl_loss: true,
            kl_coef: 0.01,
            kl_type: KlType::K1,
            loss_agg_mode: LossAggMode::SeqMeanTokenMean,
            norm_adv_by_std: true,
            ppo_epochs: 1,
            ppo_mini_batch_size: None,
            failure_reward: -2.0,
            reward_transform: RewardTransform::Negative,
            reward_scale: 1.0,
            reward_normalize: false,
            reward_clip: None,
        }
    }
}

/// KL estimator between the policy and the reference, per token (verl's names are accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlType {
    /// log p - log p_ref
    #[serde(alias = "kl")]
    K1,
    /// (log p - log p_ref)^2 / 2
    #[serde(alias = "mse")]
    K2,
    /// exp(log p_ref - log p) - (log p_ref - log p) - 1
    #[serde(alias = "low_var_kl")]
    K3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggMode {
    /// Mean over all response tokens of the batch.
    TokenMean,
    /// Mean over each sample's tokens, then over samples.
    SeqMeanTokenMean,
    /// Sum over each sample's tokens divided by the longest response, then mean over samples.
    SeqMeanTokenSumNorm,
}

/// Reward from the reconstruction error `mse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardTransform {
    /// -mse
    Negative,
    /// exp(-mse)
    Exp,
    /// 1 / (1 + mse)
    Bounded,
    /// -ln(max(mse, 1e-8))
    Log,
}

/// `ppo`: verl's legacy PPO trainer (per-sequence advantage, several epochs of minibatches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    pub epochs: usize,
    pub clip: f64,
    /// z-score A = r - mean(r) over the batch.
    pub whiten_advantages: bool,
    /// Rows per optimizer step; null = the whole batch.
    pub mini_batch_size: Option<usize>,
    pub critic_train_epochs: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            epochs: 4,
            clip: 0.2,
            whiten_advantages: true,
            mini_batch_size: None,
            critic_train_epochs: 1,
        }
    }
}

/// `generation`: sampling of the actor's explanations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Keep the k most likely tokens; -1 (or 0) = off.
    pub top_k: i64,
    pub max_new_tokens: usize,
    /// Texts that end a response (besides the EOS token).
    pub stop: Vec<String>,
    /// Sampling seed; null = `trainer.seed`.
    pub seed: Option<u64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            max_new_tokens: 150,
            stop: vec![],
            seed: None,
        }
    }
}

impl RunConfig {
    /// The actor's learning-rate schedule over `trainer.total_training_steps`.
    pub fn actor_schedule(&self) -> LrSchedule {
        self.optim
            .schedule(self.optim.lr, self.trainer.total_training_steps)
    }

    /// The critic's learning-rate schedule (from `optim.critic_lr`).
    pub fn critic_schedule(&self) -> LrSchedule {
        self.optim
            .schedule(self.optim.critic_lr, self.trainer.total_training_steps)
    }

    /// The critic's backbone: `model.critic.model_name`, else the actor's.
    pub fn critic_model_name(&self) -> &str {
        self.model
            .critic
            .model_name
            .as_deref()
            .unwrap_or(&self.model.model_name)
    }

    /// Printable lines for the ignored and renamed keys.
    pub fn warnings(&self) -> Vec<String> {
        let ignored = self
            .ignored
            .iter()
            .map(|k| format!("config: `{}` is ignored: {}", k.path, k.reason));
        let renamed = self
            .renamed
            .iter()
            .map(|(from, to)| format!("config: `{from}` is read as `{to}`"));
        ignored.chain(renamed).collect()
    }

    /// The config as YAML (every key, defaults included), e.g. to save beside a checkpoint.
    pub fn to_yaml(&self) -> Result<String> {
        serde_norway::to_string(self)
            .map_err(|e| Error::format(&self.source, format!("cannot write the config: {e}")))
    }

    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.source, field, msg)
    }

    /// Cross-field checks that need no files. [`RunConfig::from_file`] runs it; call it again
    /// after changing a config in code.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if m.model_name.trim().is_empty() {
            return Err(self.err("model.model_name", "must name the actor model"));
        }
        if m.activation_dim == Some(0) {
            return Err(self.err("model.activation_dim", "must be at least 1 (or null)"));
        }
        let inj = &m.injection;
        if inj.layer_indices.is_empty() {
            return Err(self.err("model.injection.layer_indices", "needs at least one layer"));
        }
        let mut seen = inj.layer_indices.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != inj.layer_indices.len() {
            return Err(self.err("model.injection.layer_indices", "has a layer twice"));
        }
        if inj.injection_token.is_empty() {
            return Err(self.err("model.injection.injection_token", "must not be empty"));
        }
        if inj.projection_dim.is_some() && inj.mode != InjectionMode::Project {
            return Err(self.err(
                "model.injection.projection_dim",
                "is used only by `mode: project`; set it to null",
            ));
        }
        if inj.projection_dim == Some(0) {
            return Err(self.err("model.injection.projection_dim", "must be at least 1"));
        }
        self.check_scale("model.injection.scale", inj.scale)?;
        let c = &m.critic;
        if c.model_name.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(self.err(
                "model.critic.model_name",
                "is empty; use null for the actor's",
            ));
        }
        if c.output_layer_index == Some(0) {
            return Err(self.err(
                "model.critic.output_layer_index",
                "0 is the embedding output; the critic needs at least one block (1 = after block 0)",
            ));
        }
        if let (Some(k), Some(i)) = (c.truncate_at_layer, c.output_layer_index) {
            if i != k + 1 {
                return Err(self.err(
                    "model.critic.output_layer_index",
                    format!(
                        "{i} disagrees with truncate_at_layer {k} (blocks 0..={k} kept means output_layer_index {}); give one of them",
                        k + 1
                    ),
                ));
            }
        }
        if let Some(p) = &c.critic_prompt {
            if p.matches("{explanation}").count() > 1 {
                return Err(self.err(
                    "model.critic.critic_prompt",
                    "has `{explanation}` more than once",
                ));
            }
        }
        if c.explanation_tag.as_deref().is_some_and(|t| {
            t.is_empty() || t.contains(|ch: char| ch == '<' || ch == '>' || ch.is_whitespace())
        }) {
            return Err(self.err(
                "model.critic.explanation_tag",
                "must be a tag name such as `explanation` (no <, >, spaces), or null",
            ));
        }
        self.check_scale("model.critic.mse_scale", c.mse_scale)?;

        let d = &self.data;
        self.check_dataset("data.train_dataset", &d.train_dataset)?;
        if let Some(v) = &d.val_dataset {
            self.check_dataset("data.val_dataset", v)?;
        }
        for (k, v) in [
            ("data.train_batch_size", d.train_batch_size),
            ("data.val_batch_size", d.val_batch_size),
            ("data.micro_batch_size_per_gpu", d.micro_batch_size_per_gpu),
        ] {
            if v == 0 {
                return Err(self.err(k, "must be at least 1"));
            }
        }

        let o = &self.optim;
        let t = &self.trainer;
        self.positive("optim.lr", o.lr)?;
        self.positive("optim.critic_lr", o.critic_lr)?;
        self.positive("optim.eps", o.eps)?;
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return Err(self.err("optim.weight_decay", "must be >= 0"));
        }
        for (k, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(self.err(k, format!("{b} is not in [0, 1)")));
            }
        }
        if !(o.max_norm >= 0.0 && o.max_norm.is_finite()) {
            return Err(self.err("optim.max_norm", "must be >= 0 (0 = no clipping)"));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return Err(self.err(
                "optim.min_lr_ratio",
                format!("{} is not in [0, 1]", o.min_lr_ratio),
            ));
        }
        if t.total_training_steps == 0 {
            return Err(self.err("trainer.total_training_steps", "must be at least 1"));
        }
        if o.warmup_steps > t.total_training_steps {
            return Err(self.err(
                "optim.warmup_steps",
                format!(
                    "{} is more than trainer.total_training_steps ({})",
                    o.warmup_steps, t.total_training_steps
                ),
            ));
        }

        if t.save_total_limit == Some(0) {
            return Err(self.err("trainer.save_total_limit", "must be at least 1, or null"));
        }
        if t.critic_epochs == 0 {
            return Err(self.err("trainer.critic_epochs", "must be at least 1"));
        }
        if t.logits_chunk == Some(0) {
            return Err(self.err("trainer.logits_chunk", "must be at least 1 (or null)"));
        }
        if t.algo != Algo::Sft && !t.train_mode.has_actor() {
            return Err(self.err(
                "trainer.train_mode",
                "`critic` trains no actor; RL (grpo, ppo) needs `actor` or `both`",
            ));
        }
        if t.algo == Algo::Sft {
            let mode = d.train_dataset.mode;
            if (t.train_mode.has_actor() && !mode.has_actor())
                || (t.train_mode.has_critic() && !mode.has_critic())
            {
                return Err(self.err(
                    "data.train_dataset.mode",
                    format!(
                        "`{}` rows cannot train trainer.train_mode `{}`",
                        part_name(mode),
                        part_name(t.train_mode)
                    ),
                ));
            }
        }

        let g = &self.grpo;
        if g.n == 0 {
            return Err(self.err("grpo.n", "the group size must be at least 1"));
        }
        self.ratio("grpo.clip_ratio_low", g.clip_ratio_low)?;
        self.ratio("grpo.clip_ratio_high", g.clip_ratio_high)?;
        if let Some(c) = g.dual_clip_c {
            if !(c > 1.0 && c.is_finite()) {
                return Err(self.err("grpo.dual_clip_c", "must be > 1 (or null = off)"));
            }
        }
        if !(g.kl_coef >= 0.0 && g.kl_coef.is_finite()) {
            return Err(self.err("grpo.kl_coef", "must be >= 0"));
        }
        if g.ppo_epochs == 0 {
            return Err(self.err("grpo.ppo_epochs", "must be at least 1"));
        }
        if let Some(mb) = g.ppo_mini_batch_size {
            if mb == 0 || !d.train_batch_size.is_multiple_of(mb) {
                return Err(self.err(
                    "grpo.ppo_mini_batch_size",
                    format!(
                        "{mb} must be at least 1 and divide data.train_batch_size ({})",
                        d.train_batch_size
                    ),
                ));
            }
        }
        if !g.failure_reward.is_finite() {
            return Err(self.err("grpo.failure_reward", "must be a finite number"));
        }
        if !(g.reward_scale.is_finite() && g.reward_scale != 0.0) {
            return Err(self.err("grpo.reward_scale", "must be a finite, non-zero number"));
        }
        if let Some([lo, hi]) = g.reward_clip {
            if lo.is_nan() || hi.is_nan() || lo >= hi {
                return Err(self.err(
                    "grpo.reward_clip",
                    format!("[{lo}, {hi}]: min must be < max"),
                ));
            }
        }

        let p = &self.ppo;
        if p.epochs == 0 {
            return Err(self.err("ppo.epochs", "must be at least 1"));
        }
        self.ratio("ppo.clip", p.clip)?;
        if let Some(mb) = p.mini_batch_size {
            if mb == 0 || !d.train_batch_size.is_multiple_of(mb) {
                return Err(self.err(
                    "ppo.mini_batch_size",
                    format!(
                        "{mb} must be at least 1 and divide data.train_batch_size ({})",
                        d.train_batch_size
                    ),
                ));
            }
        }
        if p.critic_train_epochs == 0 {
            return Err(self.err("ppo.critic_train_epochs", "must be at least 1"));
        }

        let s = &self.generation;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(self.err("generation.temperature", "must be >= 0 (0 = greedy)"));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(self.err("generation.top_p", format!("{} is not in (0, 1]", s.top_p)));
        }
        if s.top_k < -1 {
            return Err(self.err("generation.top_k", "must be >= 1, or -1 (off)"));
        }
        if s.max_new_tokens == 0 {
            return Err(self.err("generation.max_new_tokens", "must be at least 1"));
        }
        if s.stop.iter().any(|x| x.is_empty()) {
            return Err(self.err("generation.stop", "holds an empty string"));
        }
        Ok(())
    }

    /// The checks that need the models' sizes: the actor's hidden size and block count, and
    /// the critic backbone's block count.
    pub fn check_model_dims(
        &self,
        actor_hidden: usize,
        actor_layers: usize,
        critic_layers: usize,
    ) -> Result<()> {
        let inj = &self.model.injection;
        let a = self.model.activation_dim.unwrap_or(actor_hidden);
        if a != actor_hidden && inj.mode != InjectionMode::Project {
            return Err(self.err(
                "model.activation_dim",
                format!(
                    "{a} differs from the actor's hidden size {actor_hidden}; `{}` injection needs them equal (use `model.injection.mode: project`)",
                    if inj.mode == InjectionMode::Add { "add" } else { "replace" }
                ),
            ));
        }
        if let Some(p) = inj.projection_dim {
            if p != actor_hidden {
                return Err(self.err(
                    "model.injection.projection_dim",
                    format!("{p} must equal the actor's hidden size {actor_hidden} (or be null)"),
                ));
            }
        }
        if let Some(&l) = inj.layer_indices.iter().find(|&&l| l > actor_layers) {
            return Err(self.err(
                "model.injection.layer_indices",
                format!("layer {l}: the actor has {actor_layers} blocks (0 ..= {actor_layers})"),
            ));
        }
        if let Some(k) = self.model.critic.last_block() {
            if k >= critic_layers {
                return Err(self.err(
                    "model.critic.truncate_at_layer",
                    format!("block {k}: the critic backbone has blocks 0 ..< {critic_layers}"),
                ));
            }
        }
        Ok(())
    }

    fn check_scale(&self, field: &str, s: Scale) -> Result<()> {
        match s {
            Scale::Fixed(x) if !(x > 0.0 && x.is_finite()) => Err(self.err(
                field,
                format!("{x}: must be a positive number, \"sqrt_d_model\" or null"),
            )),
            _ => Ok(()),
        }
    }

    fn check_dataset(&self, at: &str, ds: &DatasetConfig) -> Result<()> {
        if ds.parquet_files.is_empty() {
            return Err(self.err(&format!("{at}.parquet_files"), "names no file"));
        }
        for (k, v) in [
            ("prompt_key", &ds.prompt_key),
            ("response_key", &ds.response_key),
            ("activation_vector_key", &ds.activation_vector_key),
        ] {
            if v.is_empty() {
                return Err(self.err(&format!("{at}.{k}"), "must name a column"));
            }
        }
        if ds.max_length == 0 {
            return Err(self.err(&format!("{at}.max_length"), "must be at least 1"));
        }
        Ok(())
    }

    fn positive(&self, field: &str, x: f64) -> Result<()> {
        if x > 0.0 && x.is_finite() {
            Ok(())
        } else {
            Err(self.err(field, format!("{x}: must be > 0")))
        }
    }

    fn ratio(&self, field: &str, x: f64) -> Result<()> {
        if x > 0.0 && x < 1.0 {
            Ok(())
        } else {
            Err(self.err(field, format!("{x} is not in (0, 1)")))
        }
    }
}

fn part_name(p: Part) -> &'static str {
    match p {
        Part::Actor => "actor",
        Part::Critic => "critic",
        Part::Both => "both",
    }
}

impl From<KlType> for crate::device::KlType {
    fn from(k: KlType) -> Self {
        match k {
            KlType::K1 => Self::K1,
            KlType::K2 => Self::K2,
            KlType::K3 => Self::K3,
        }
    }
}

impl From<LossAggMode> for crate::device::LossAgg {
    fn from(m: LossAggMode) -> Self {
        match m {
            LossAggMode::TokenMean => Self::TokenMean,
            LossAggMode::SeqMeanTokenMean => Self::SeqMeanTokenMean,
            LossAggMode::SeqMeanTokenSumNorm => Self::SeqMeanTokenSumNorm,
        }
    }
}

impl From<RewardTransform> for crate::device::RewardTransform {
    /// `exp` is exp(-mse) ([V]'s temperature 1).
    fn from(t: RewardTransform) -> Self {
        match t {
            RewardTransform::Negative => Self::Negative,
            RewardTransform::Exp => Self::Exp { temperature: 1.0 },
            RewardTransform::Bounded => Self::Bounded,
            RewardTransform::Log => Self::Log,
        }
    }
}
