//! The NLA actor: a causal LM that reads activation vectors written into its residual stream at
//! marker tokens, and writes their explanations.
//!
//! Vector path (NLA_SEMANTICS.md section 1): the dataset's vector v [A] is rescaled to the fixed
//! norm s (`injection_scale`, [O]; none = raw), then for `project` mapped by the trained
//! `injection_projection.weight` W [C,A] (`u = W n_s(v)`), and written at every marker site of
//! the layers in `layer_indices`: `replace` h <- u, `add` h <- h + u (`project` writes by
//! `replace`). W starts as the identity when A = C, else N(0, 1/C) entries, so that
//! E|W x| = |x| and the injected norm stays near s.
//!
//! Parameters: one flat buffer with a [`ParamTable`]: the LM's entries, then W (`project` only).
//! `model.table` covers the LM prefix; AdamW and clipping take `table`. A checkpoint is an HF
//! folder (config.json, model.safetensors: loadable by transformers) plus
//! `injection_projection.safetensors` holding W.

use std::path::Path;

use rand::SeedableRng;

use crate::config::InjectionMode;
use crate::device::{Device, InjectMode, View, ViewMut};
use crate::model::linear::{linear_bwd_dw, linear_fwd};
use crate::model::safetensors_io::{self, SaveDtype};
use crate::model::{working_copy, Injection, Model, ParamEntry, ParamTable};
use crate::{Error, Result};

/// Name of the projection weight [C,A].
pub const PROJ_NAME: &str = "injection_projection.weight";
/// The file of an actor checkpoint holding the projection.
pub const PROJ_FILE: &str = "injection_projection.safetensors";

/// How vectors enter the actor.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorSpec {
    /// residual-stream indices: 0 = the embedding output, i > 0 = after block i-1
    pub layers: Vec<usize>,
    pub mode: InjectionMode,
    /// Some(s): vectors rescaled to norm s before injection (or projection)
    pub scale: Option<f32>,
    /// A, the vector dimension
    pub a: usize,
}

impl ActorSpec {
    /// How the (projected) vectors are written: `project` writes by `replace`.
    pub fn inject_mode(&self) -> InjectMode {
        match self.mode {
            InjectionMode::Add => InjectMode::Add,
            InjectionMode::Replace | InjectionMode::Project => InjectMode::Replace,
        }
    }
}

/// The actor: LM plus the optional projection, in one flat buffer.
pub struct Actor<D: Device> {
    pub spec: ActorSpec,
    /// The LM. Its `params`/`grads` are the actor's whole flat buffers [P]; its table covers
    /// the LM prefix.
    pub model: Model<D>,
    /// Every parameter: the LM's, then `injection_projection.weight`.
    pub table: ParamTable,
    /// Offset of W [C,A] (`project` only).
    pub proj: Option<usize>,
}

/// The injection of one batch, and what its backward needs.
pub struct ActorInjection<D: Device> {
    pub inj: Injection<D>,
    /// [S,A] the rescaled vectors, input of the projection (`project` only)
    nv: Option<D::Buf>,
}

fn invalid(msg: String) -> Error {
    Error::invalid("actor", msg)
}

impl<D: Device> Actor<D> {
    /// The actor over `model`; W (for `project`) from `saved` (a folder with [`PROJ_FILE`]) or
    /// freshly initialised (deterministic in `seed`).
    pub fn new(
        dev: &D,
        model: Model<D>,
        spec: ActorSpec,
        saved: Option<&Path>,
        seed: u64,
    ) -> Result<Self> {
        let (c, l) = (model.cfg.hidden_size, model.cfg.num_hidden_layers);
        if spec.a == 0 {
            return Err(invalid("the vector dimension A must be positive".into()));
        }
        if spec.mode != InjectionMode::Project && spec.a != c {
            return Err(invalid(format!(
                "vectors of {} values cannot be written into a residual stream of {c} without \
                 `project` injection",
                spec.a
            )));
        }
        if let Some(&bad) = spec.layers.iter().find(|&&x| x > l) {
            return Err(invalid(format!(
                "injection layer {bad}: the actor has {l} blocks (0 ..= {l})"
            )));
        }
        if spec.mode != InjectionMode::Project {
            let table = model.table.clone();
            return Ok(Actor {
                spec,
                model,
                table,
                proj: None,
            });
        }
        let mut table = model.table.clone();
        let off = table.total;
        table.entries.push(ParamEntry {
            name: PROJ_NAME.into(),
            shape: vec![c, spec.a],
            offset: off,
            len: c * spec.a,
            decay: true,
        });
        table.total += c * spec.a;
        let w = match saved.map(|d| d.join(PROJ_FILE)).filter(|p| p.is_file()) {
            Some(path) => {
                let tensors = safetensors_io::read_tensors(&path)?;
                let (_, shape, data) =
                    tensors
                        .into_iter()
                        .find(|t| t.0 == PROJ_NAME)
                        .ok_or_else(|| Error::MissingTensor {
                            path: path.clone(),
                            name: PROJ_NAME.into(),
                        })?;
                if shape != [c, spec.a] {
                    return Err(Error::format(
                        &path,
                        format!(
                            "{PROJ_NAME} has shape {shape:?}, the actor needs [{c}, {}]",
                            spec.a
                        ),
                    ));
                }
                data
            }
            None => init_projection(c, spec.a, seed),
        };
        let mut flat = model.params_to_host(dev)?;
        flat.extend_from_slice(&w);
        let params = dev.upload(&flat)?;
        let model = Model {
            work: working_copy(dev, &params)?,
            params,
            grads: dev.alloc(table.total)?,
            cfg: model.cfg,
            table: model.table,
        };
        Ok(Actor {
            spec,
            model,
            table,
            proj: Some(off),
        })
    }

    /// The injection of `vecs` [S,A] (host) at `sites` [S] (flat row indices of the batch).
    pub fn injection(&self, dev: &D, sites: &[u32], vecs: &[f32]) -> Result<ActorInjection<D>> {
        let (a, c) = (self.spec.a, self.model.cfg.hidden_size);
        let s = sites.len();
        if vecs.len() != s * a {
            return Err(invalid(format!(
                "{s} sites need {} vector values (A = {a}), got {}",
                s * a,
                vecs.len()
            )));
        }
        // in the working dtype, as the activations they become
        let raw = dev.upload_as(vecs, dev.work_dtype())?;
        let nv = match self.spec.scale {
            Some(sc) if s > 0 => {
                let mut nv = dev.alloc_work(s * a)?;
                dev.norm_scale_fwd(ViewMut::all(&mut nv), View::all(&raw), s, a, sc)?;
                nv
            }
            _ => raw,
        };
        let (vecs, nv) = match self.proj {
            Some(off) if s > 0 => {
                let mut u = dev.alloc_work(s * c)?;
                linear_fwd(
                    dev,
                    ViewMut::all(&mut u),
                    View::all(&nv),
                    View::range(self.model.weights(), off, c * a),
                    s,
                    c,
                    a,
                )?;
                (u, Some(nv))
            }
            _ => (nv, None),
        };
        let inj = Injection {
            layers: self.spec.layers.clone(),
            mode: self.spec.inject_mode(),
            sites: dev.upload_ids(sites)?,
            vecs,
            s,
            dvecs: dev.alloc_work(s * c)?,
            dscratch: dev.alloc_work(s * c)?,
        };
        Ok(ActorInjection { inj, nv })
    }

    /// After the model's backward of a batch injected with `ai`: accumulates dW += dvecs^T nv
    /// (`project`; nothing otherwise).
    pub fn injection_bwd(&mut self, dev: &D, ai: &ActorInjection<D>) -> Result<()> {
        let (a, c, s) = (self.spec.a, self.model.cfg.hidden_size, ai.inj.s);
        if let (Some(off), Some(nv)) = (self.proj, &ai.nv) {
            linear_bwd_dw(
                dev,
                ViewMut::range(&mut self.model.grads, off, c * a),
                View::all(&ai.inj.dvecs),
                View::all(nv),
                s,
                c,
                a,
            )?;
        }
        Ok(())
    }

    /// The host copy of what [`Actor::injection`] writes, [S,C] (for generation).
    pub fn injected_vectors(&self, dev: &D, vecs: &[f32], s: usize) -> Result<Vec<f32>> {
        let sites = vec![0u32; s];
        let ai = self.injection(dev, &sites, vecs)?;
        dev.download(View::all(&ai.inj.vecs))
    }

    pub fn zero_grads(&mut self, dev: &D) -> Result<()> {
        self.model.zero_grads(dev)
    }

    /// Writes the HF folder (config.json, model.safetensors) and [`PROJ_FILE`] (`project`).
    pub fn save(&self, dev: &D, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let flat = self.model.params_to_host(dev)?;
        let lm = &self.model.table;
        safetensors_io::save_params(
            &dir.join("model.safetensors"),
            lm,
            &flat[..lm.total],
            SaveDtype::F32,
        )?;
        if let Some(off) = self.proj {
            let (c, a) = (self.model.cfg.hidden_size, self.spec.a);
            safetensors_io::write_tensors(
                &dir.join(PROJ_FILE),
                &[(PROJ_NAME.into(), vec![c, a], &flat[off..off + c * a])],
            )?;
        }
        let path = dir.join("config.json");
        let cfg = serde_json::to_string_pretty(&self.model.cfg.to_json())
            .map_err(|e| Error::format(&path, e.to_string()))?;
        std::fs::write(&path, cfg).map_err(|e| Error::io(path, e))
    }
}

/// W [C,A]: the identity when A = C, else N(0, 1/C) entries.
fn init_projection(c: usize, a: usize, seed: u64) -> Vec<f32> {
    let mut w = vec![0f32; c * a];
    if a == c {
        (0..c).for_each(|i| w[i * a + i] = 1.0);
        return w;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5052_4f4a);
    let std = 1.0 / (c as f64).sqrt();
    for x in &mut w {
        let u: f64 = 1.0 - rand::Rng::random::<f64>(&mut rng);
        let v: f64 = rand::Rng::random(&mut rng);
        *x = (std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32;
    }
    w
}
