//! From a run config to loaded models: the actor (LM + injection), the critic (truncated
//! backbone + pooling + head), their tokenizers, chat template and marker, and the encoders
//! that turn dataset rows into examples. Shared by `train`, `generate`, `reconstruct` and `eval`.

use std::path::{Path, PathBuf};

use crate::config::{Pooling, RunConfig};
use crate::data::{DatasetSpec, Mode};
use crate::device::{Device, PoolMode};
use crate::model::{load_model, Model, Tokenizer};
use crate::nla::critic::HEAD_FILE;
use crate::nla::{
    Actor, ActorEncoder, ActorOptions, ActorSpec, ChatTemplate, Critic, CriticEncoder,
    CriticOptions, CriticSpec, LengthLimit, Marker,
};
use crate::{Error, Result};

/// What reads and writes the actor's text.
pub struct ActorSide {
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    pub marker: Marker,
    pub pad_id: u32,
    /// where it was loaded from
    pub path: PathBuf,
}

/// The critic's tokenizer and loss settings.
pub struct CriticSide {
    pub tok: Tokenizer,
    pub pad_id: u32,
    /// n_s of the loss and the reward (None = raw vectors)
    pub mse_scale: Option<f32>,
    /// appended to every input for `cls` pooling
    pub cls_id: Option<u32>,
    pub path: PathBuf,
}

fn config_err(cfg: &RunConfig, field: &str, msg: String) -> Error {
    Error::Config {
        path: cfg.source.clone(),
        field: field.into(),
        msg,
    }
}

/// A model path of the config (relative paths are taken from the working folder).
pub fn model_path(cfg: &RunConfig, field: &str, name: &str) -> Result<PathBuf> {
    let path = PathBuf::from(name);
    if name.starts_with("builtin:") {
        return Err(config_err(
            cfg,
            field,
            format!("`{name}` is made by `nla-engine demo`; give a model folder or .gguf file"),
        ));
    }
    if !path.exists() {
        return Err(config_err(
            cfg,
            field,
            format!("{name}: no such model folder or .gguf file"),
        ));
    }
    Ok(path)
}

fn tokenizer_of(tok: Option<Tokenizer>, path: &Path) -> Result<Tokenizer> {
    tok.ok_or_else(|| Error::Tokenizer {
        path: path.join("tokenizer.json"),
        msg: "the model folder has no tokenizer.json".into(),
    })
}

/// The vector dimension A: `model.activation_dim`, else `hidden`.
pub fn activation_dim(cfg: &RunConfig, hidden: usize) -> usize {
    cfg.model.activation_dim.unwrap_or(hidden)
}

/// Loads the actor from `path` (an HF folder, a checkpoint's `actor/`, or a .gguf file).
pub fn load_actor<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    path: &Path,
) -> Result<(ActorSide, Actor<D>)> {
    let (model, tok) = load_model(dev, path)?;
    let tok = tokenizer_of(tok, path)?;
    let template = ChatTemplate::load(path, &tok)?;
    let marker = Marker::from_config(&tok, &cfg.model.injection)?;
    let pad_id = template.pad_id(&tok)?;
    let inj = &cfg.model.injection;
    let c = model.cfg.hidden_size;
    let spec = ActorSpec {
        layers: inj.layer_indices.clone(),
        mode: inj.mode,
        scale: inj.scale.norm(c).map(|s| s as f32),
        a: activation_dim(cfg, c),
    };
    let saved = path.is_dir().then_some(path);
    let actor = Actor::new(dev, model, spec, saved, cfg.trainer.seed)?;
    let side = ActorSide {
        tok,
        template,
        marker,
        pad_id,
        path: path.to_path_buf(),
    };
    Ok((side, actor))
}

/// Loads the critic from `path`: a critic checkpoint (with `value_head.safetensors`), or any
/// model (HF folder or .gguf) whose first K+1 blocks become the backbone. `a` = the vector
/// dimension (None = the backbone's hidden size).
pub fn load_critic<D: Device>(
    dev: &D,
    cfg: &RunConfig,
    path: &Path,
    a: Option<usize>,
) -> Result<(CriticSide, Critic<D>)> {
    let c = &cfg.model.critic;
    let (model, tok): (Model<D>, _) = load_model(dev, path)?;
    let tok = tokenizer_of(tok, path)?;
    let k = c
        .last_block()
        .unwrap_or(model.cfg.num_hidden_layers.saturating_sub(1));
    let a = a.unwrap_or_else(|| activation_dim(cfg, model.cfg.hidden_size));
    let spec = CriticSpec {
        k,
        a,
        pooling: match c.pooling {
            Pooling::Last | Pooling::Cls => PoolMode::Last,
            Pooling::Mean => PoolMode::Mean,
            Pooling::Max => PoolMode::Max,
            Pooling::Weighted => PoolMode::Weighted,
        },
        max_len: cfg.data.train_dataset.max_length + 1,
    };
    let seed = cfg.trainer.seed ^ 0xC417;
    let is_ckpt = path.is_dir() && path.join(HEAD_FILE).is_file();
    if !is_ckpt && c.head_init == crate::config::HeadInit::Random && a == model.cfg.hidden_size {
        return Err(config_err(
            cfg,
            "model.critic.head_init",
            "random: a square head (A = d) starts as the identity ([O]); use identity".into(),
        ));
    }
    let critic = if is_ckpt {
        Critic::load(dev, path, spec, seed)?
    } else {
        Critic::from_model(dev, &model, spec, seed)?
    };
    let template = ChatTemplate::load(path, &tok)?;
    let pad_id = template.pad_id(&tok)?;
    let cls_id = match c.pooling {
        Pooling::Cls => Some(template.cls_id(&tok)?),
        _ => None,
    };
    let side = CriticSide {
        tok,
        pad_id,
        mse_scale: c.mse_scale.norm(a).map(|s| s as f32),
        cls_id,
        path: path.to_path_buf(),
    };
    Ok((side, critic))
}

/// The length rule of a dataset section.
pub fn limit(cfg: &RunConfig) -> LengthLimit {
    LengthLimit {
        max_length: cfg.data.train_dataset.max_length,
        truncation: cfg.data.train_dataset.truncation,
    }
}

/// The actor's encoder for this config.
pub fn actor_encoder<'a>(cfg: &RunConfig, side: &'a ActorSide) -> Result<ActorEncoder<'a>> {
    let mut opts = ActorOptions::new(limit(cfg));
    opts.explanation_tag = cfg.model.critic.explanation_tag.clone();
    ActorEncoder::new(&side.tok, &side.template, &side.marker, opts)
}

/// The critic's encoder for this config.
pub fn critic_encoder<'a>(cfg: &RunConfig, side: &'a CriticSide) -> CriticEncoder<'a> {
    CriticEncoder::new(
        &side.tok,
        CriticOptions::from_config(&cfg.model.critic, limit(cfg)),
    )
}

/// The reader spec of a dataset section: `which` = "train_dataset" or "val_dataset".
pub fn dataset_spec(
    cfg: &RunConfig,
    which: &str,
    mode: Mode,
    a: usize,
    require_response: bool,
) -> Result<DatasetSpec> {
    let ds = match which {
        "val_dataset" => cfg.data.val_dataset.as_ref().ok_or_else(|| {
            config_err(
                cfg,
                "data.val_dataset",
                "no validation dataset is set".into(),
            )
        })?,
        _ => &cfg.data.train_dataset,
    };
    let mut spec = DatasetSpec::new(ds.parquet_files.clone(), a);
    spec.prompt_key = ds.prompt_key.clone();
    spec.response_key = ds.response_key.clone();
    spec.activation_vector_key = ds.activation_vector_key.clone();
    spec.mode = mode;
    spec.require_response = require_response;
    spec.injection_token = cfg.model.injection.injection_token.clone();
    spec.shuffle = ds.shuffle;
    spec.seed = ds.seed.unwrap_or(cfg.trainer.seed);
    Ok(spec)
}
