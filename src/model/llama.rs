//! A Llama-family decoder on a device: config, parameter table, flat parameters and gradients.

use std::path::Path;

use rand::{Rng, SeedableRng};

use super::{safetensors_io, ModelConfig, ParamTable};
use crate::device::{Device, DeviceBuf, View, ViewMut};
use crate::Result;

pub struct Model<D: Device> {
    pub cfg: ModelConfig,
    pub table: ParamTable,
    /// every parameter, flat [P]: f32 (the master weights where the device computes in bf16)
    pub params: D::Buf,
    /// [P] the weights in the device's working dtype, where that is not f32 (None: the compute
    /// reads `params`); the optimizer writes it with every update. Use [`Model::weights`].
    pub work: Option<D::Buf>,
    /// d loss / d params, flat [P]; accumulated by `backward`, cleared by `zero_grads`
    pub grads: D::Buf,
}

impl<D: Device> Model<D> {
    /// Loads `config.json` and the safetensors weights of an HF model folder.
    pub fn load(dev: &D, dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let table = ParamTable::for_config(&cfg);
        let flat = safetensors_io::load_params(dir, &table)?;
        Self::from_host(dev, cfg, &flat)
    }

    /// A model whose parameters are `flat` (laid out as `ParamTable::for_config(&cfg)`).
    pub fn from_host(dev: &D, cfg: ModelConfig, flat: &[f32]) -> Result<Self> {
        let table = ParamTable::for_config(&cfg);
        if flat.len() != table.total {
            return Err(crate::Error::invalid(
                "model",
                format!(
                    "{} parameter values given, the config needs {}",
                    flat.len(),
                    table.total
                ),
            ));
        }
        let params = dev.upload(flat)?;
        let work = working_copy(dev, &params)?;
        Ok(Model {
            params,
            work,
            grads: dev.alloc(table.total)?,
            cfg,
            table,
        })
    }

    /// The weights the forward and backward read: the working copy, or the f32 parameters.
    pub fn weights(&self) -> &D::Buf {
        self.work.as_ref().unwrap_or(&self.params)
    }

    /// Fresh weights: matrices ~ N(0, std^2), norm weights 1. Deterministic in `seed`.
    pub fn init_random(dev: &D, cfg: ModelConfig, seed: u64, std: f32) -> Result<Self> {
        let table = ParamTable::for_config(&cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut flat = vec![0f32; table.total];
        for e in &table.entries {
            let w = &mut flat[e.offset..e.offset + e.len];
            if e.shape.len() == 1 {
                w.fill(1.0);
            } else {
                for x in w.iter_mut() {
                    *x = std * normal(&mut rng);
                }
            }
        }
        Self::from_host(dev, cfg, &flat)
    }

    /// The parameters, copied to the host in table layout (a frozen model without its f32
    /// master weights gives its working copy's values).
    pub fn params_to_host(&self, dev: &D) -> Result<Vec<f32>> {
        let src = match &self.work {
            Some(w) if self.params.len() < self.table.total => w,
            _ => &self.params,
        };
        dev.download(View::all(src))
    }

    pub fn grads_to_host(&self, dev: &D) -> Result<Vec<f32>> {
        dev.download(View::all(&self.grads))
    }

    pub fn zero_grads(&mut self, dev: &D) -> Result<()> {
        dev.fill(ViewMut::all(&mut self.grads), 0.0)
    }

    /// Frees the gradients of a model that is only run forward (a frozen reference, an
    /// inference command), and its f32 master weights where the compute reads a working copy:
    /// `backward` on it is then an error.
    pub fn freeze(&mut self, dev: &D) -> Result<()> {
        self.grads = dev.alloc(0)?;
        if self.work.is_some() {
            self.params = dev.alloc(0)?;
        }
        Ok(())
    }

    /// Whether [`Self::freeze`] took the gradients away.
    pub fn is_frozen(&self) -> bool {
        self.grads.len() < self.table.total
    }

    /// Writes an HF folder: config.json and model.safetensors (f32), loadable by transformers.
    pub fn save(&self, dev: &D, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let flat = self.params_to_host(dev)?;
        safetensors_io::save_params(
            &dir.join("model.safetensors"),
            &self.table,
            &flat,
            safetensors_io::SaveDtype::F32,
        )?;
        let cfg = serde_json::to_string_pretty(&self.cfg.to_json())
            .map_err(|e| crate::Error::format(dir.join("config.json"), e.to_string()))?;
        let path = dir.join("config.json");
        std::fs::write(&path, cfg).map_err(|e| crate::Error::io(path, e))
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.table.total
    }
}

/// `params` in the device's working dtype, where that is not f32.
pub fn working_copy<D: Device>(dev: &D, params: &D::Buf) -> Result<Option<D::Buf>> {
    if dev.work_dtype() == crate::device::Dtype::F32 {
        return Ok(None);
    }
    let mut w = dev.alloc_work(params.len())?;
    dev.copy(ViewMut::all(&mut w), View::all(params))?;
    Ok(Some(w))
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Where a model's weights come from.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads an HF folder (config.json + safetensors, and tokenizer.json when present) or a .gguf
/// file (weights and tokenizer).
pub fn load_model<D: Device>(dev: &D, path: &Path) -> Result<(Model<D>, Option<super::Tokenizer>)> {
    if is_gguf(path) {
        let (m, t) = super::gguf::load_gguf(dev, path)?;
        return Ok((m, Some(t)));
    }
    let model = Model::load(dev, path)?;
    let tok = path.join("tokenizer.json");
    let tok = if tok.is_file() {
        Some(super::Tokenizer::from_file(&tok)?)
    } else {
        None
    };
    Ok((model, tok))
}

/// The config of an HF folder or a .gguf file, without loading weights.
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if is_gguf(path) {
        return super::gguf::gguf_config(&super::gguf::read_gguf(path)?);
    }
    ModelConfig::from_file(&path.join("config.json"))
}
