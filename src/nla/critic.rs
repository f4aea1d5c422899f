//! The NLA critic: reads an explanation and reconstructs the activation vector.
//!
//! Model: the first K+1 blocks of a Llama (K is a block index: the prediction is read after
//! block K, HF `hidden_states[K+1]`), no final norm and no LM head, then pooling over the
//! sequence and a value head `Linear(C -> A)` without bias. Loss: per-sample
//! `mse_b = mean_a (n_s(pred_b) - n_s(target_b))^2`, summed over valid samples and divided by
//! the global batch size.
//!
//! What follows which system (reference/NLA_SEMANTICS.md, sections 2 and 3):
//! - [O]: blocks 0..K kept, final norm and LM head unused; `value_head.weight` [A,C]
//!   initialised to the identity when A = C and saved as `value_head.safetensors`; `last`
//!   pooling (the default); `mse_scale` rescaling of prediction and target (`Some(sqrt(A))` is
//!   [O]'s default, None = raw vectors as [V]); loss = sum of mse / global batch size, failed
//!   samples excluded (`valid`).
//! - [V]: `mean` and `max` pooling; `weighted` pooling with a learned `pool.weight` [Tmax],
//!   initialised `0.01 N(0,1)` ([V] legacy). `cls` pooling is `last` over a cls token the data
//!   layer appends (the model's cls token, or the padding id when it names none:
//!   `ChatTemplate::cls_id`). A head with A != C gets PyTorch's Linear default init
//!   `U(-1/sqrt(C), 1/sqrt(C))` (no reference system has one; [V]'s legacy projection head).
//!
//! Parameters: one flat buffer with a [`ParamTable`]: the backbone's entries under their HF
//! names (`model.embed_tokens.weight`, `model.layers.{0..K}.*`, and `model.norm.weight`), then
//! `value_head.weight`, then `pool.weight` (weighted pooling only). The backbone table is
//! `ParamTable::for_config` of the truncated config with tied embeddings, so there is no
//! `lm_head` entry; `model.norm.weight` stays in the table (so the backbone saves as a folder
//! transformers loads without a missing-weight warning) but no op reads it: its gradient is
//! always zero and AdamW leaves it unchanged (it has no weight decay). `table.get` finds the
//! backbone names only; the head and pool weights are at [`Critic::head`] and
//! [`Critic::pool_w`]. AdamW and gradient clipping take `critic.table`,
//! `critic.model.params` and `critic.model.grads` like any model's.
//!
//! Checkpoint folder ([`Critic::save`]): `config.json` (num_hidden_layers = K+1,
//! tie_word_embeddings = true) + `model.safetensors` (the backbone), which transformers loads as
//! a Llama, and `value_head.safetensors` with `value_head.weight` [A,C] (and `pool.weight`
//! [Tmax]). (transformers' last `hidden_states` entry of that folder is after its final norm;
//! the critic reads the residual before it.) [`Critic::load`] reads that folder, or any HF
//! Llama folder with at least K+1 layers (the head is then initialised).
//!
//! The step's MSE and its gradient w.r.t. the rescaled prediction are formed on the host: they
//! are [B,A] values, and the per-sample mse goes to the host for metrics and rewards anyway.

use std::path::Path;

use rand::{Rng, SeedableRng};

use crate::device::{Device, PoolMode, View, ViewMut};
use crate::model::linear::linear_fwd;
use crate::model::linear::{linear_bwd_dw, linear_bwd_dx};
use crate::model::safetensors_io::{self, load_params_subset, SaveDtype};
use crate::model::{backward_blocks, forward_blocks, Activations, Model, ModelConfig, Recompute};
use crate::model::{working_copy, ParamEntry, ParamTable};
use crate::{Error, Result};

/// Name of the value head's weight [A,C] (as [O] names it).
pub const HEAD_NAME: &str = "value_head.weight";
/// Name of the weighted pooling's position weights [Tmax].
pub const POOL_NAME: &str = "pool.weight";
/// The file of a critic checkpoint holding the head (and the pool weights).
pub const HEAD_FILE: &str = "value_head.safetensors";

/// The critic's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CriticSpec {
    /// Block index read out: blocks 0..=k are kept (HF `hidden_states[k+1]`).
    pub k: usize,
    /// Dimension of the reconstructed vector.
    pub a: usize,
    pub pooling: PoolMode,
    /// Tmax, the length of `pool.weight` (`weighted` only; sequences are at most this long).
    pub max_len: usize,
}

/// The critic: a truncated backbone, pooling and a value head, in one flat buffer.
pub struct Critic<D: Device> {
    pub spec: CriticSpec,
    /// The backbone (K+1 blocks). Its `params` and `grads` buffers are the critic's whole flat
    /// buffers [P] (P = `table.total`); its own table covers the backbone prefix only.
    pub model: Model<D>,
    /// Every parameter: backbone, `value_head.weight`, `pool.weight`.
    pub table: ParamTable,
    /// Offset of `value_head.weight` [A,C].
    pub head: usize,
    /// Offset of `pool.weight` [Tmax] (`weighted` pooling only).
    pub pool_w: Option<usize>,
}

/// One critic batch on the device: B sequences of T tokens, right padded.
pub struct CriticInput<D: Device> {
    pub b: usize,
    pub t: usize,
    /// [B*T]
    pub ids: D::Ids,
    /// [B,T] 1 = real token, 0 = padding
    pub mask: D::Buf,
    /// [B,A] the vectors to reconstruct
    pub target: D::Buf,
    /// [B] false = a failed sample: predicted but left out of the loss ([O])
    pub valid: Vec<bool>,
}

/// Buffers of one critic step for a batch shape (B, T), allocated once.
pub struct CriticActs<D: Device> {
    pub acts: Activations<D>,
    /// [B,C]
    pub pooled: D::Buf,
    /// [B,A] head output: f32 on every device (the head's matmul rounds its f32 sums once, to
    /// f32), like the loss after it
    pub pred: D::Buf,
    /// [B,A] n_s(pred) (or pred when `mse_scale` is None), f32
    pub npred: D::Buf,
    /// [B,A] n_s(target), f32
    pub ntarget: D::Buf,
    /// [B,A] d loss / d pred, f32
    pub dpred: D::Buf,
    /// [B,A] `dpred` in the working dtype: the operand of the head's backward matmuls
    pub dpred_work: D::Buf,
    /// [B,C] d loss / d pooled
    pub dpooled: D::Buf,
    /// what the last forward left for backward: (mse_scale, host n(pred) - n(target) [B,A])
    last: Option<(Option<f32>, Vec<f64>)>,
}

/// What a forward pass gives back (host).
#[derive(Clone, Debug, PartialEq)]
pub struct CriticOut {
    /// [B,A] predictions before rescaling
    pub pred: Vec<f32>,
    /// [B] per-sample mse (also for invalid samples)
    pub mse: Vec<f32>,
    /// sum of mse over valid samples
    pub loss_sum: f64,
}

impl CriticOut {
    /// The loss: `loss_sum / divisor`, divisor = the global batch size ([O]).
    pub fn loss(&self, divisor: f32) -> f64 {
        self.loss_sum / divisor as f64
    }
}

fn invalid(msg: String) -> Error {
    Error::invalid("critic", msg)
}

/// The backbone config: K+1 blocks, tied embeddings (no LM head parameter).
fn backbone_config(cfg: &ModelConfig, k: usize, source: &str) -> Result<ModelConfig> {
    if k >= cfg.num_hidden_layers {
        return Err(invalid(format!(
            "critic layer K = {k} needs blocks 0..={k}, but {source} has {} layers",
            cfg.num_hidden_layers
        )));
    }
    let mut c = cfg.clone();
    c.num_hidden_layers = k + 1;
    c.tie_word_embeddings = true;
    Ok(c)
}

fn check_spec(spec: &CriticSpec) -> Result<()> {
    if spec.a == 0 {
        return Err(invalid("the vector dimension A must be positive".into()));
    }
    if spec.pooling == PoolMode::Weighted && spec.max_len == 0 {
        return Err(invalid("weighted pooling needs max_len (Tmax) > 0".into()));
    }
    Ok(())
}

/// A standard normal draw (Box-Muller, one of the pair).
fn std_normal(rng: &mut impl Rng) -> f32 {
    let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let v: f64 = rng.random();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

impl<D: Device> Critic<D> {
    /// The critic over the first K+1 blocks of `model`, with a fresh head and pool weights
    /// (identity head when A = C; deterministic in `seed`).
    pub fn from_model(dev: &D, model: &Model<D>, spec: CriticSpec, seed: u64) -> Result<Self> {
        check_spec(&spec)?;
        let cfg = backbone_config(&model.cfg, spec.k, "the model")?;
        let full = model.params_to_host(dev)?;
        let bt = ParamTable::for_config(&cfg);
        let mut flat = vec![0f32; bt.total];
        for e in &bt.entries {
            let src = model
                .table
                .get(&e.name)
                .ok_or_else(|| invalid(format!("the model has no parameter `{}`", e.name)))?;
            flat[e.offset..e.offset + e.len]
                .copy_from_slice(&full[src.offset..src.offset + src.len]);
        }
        Self::assemble(dev, cfg, spec, flat, None, seed)
    }

    /// Loads a critic from an HF Llama folder with at least K+1 layers (fresh head) or from a
    /// folder [`Critic::save`] wrote (head and pool weights from `value_head.safetensors`).
    pub fn load(dev: &D, dir: &Path, spec: CriticSpec, seed: u64) -> Result<Self> {
        check_spec(&spec)?;
        let full = ModelConfig::from_file(&dir.join("config.json"))?;
        let cfg = backbone_config(&full, spec.k, &dir.display().to_string())?;
        let flat = load_params_subset(dir, &ParamTable::for_config(&cfg))?;
        let head_path = dir.join(HEAD_FILE);
        let head = if head_path.is_file() {
            Some(safetensors_io::read_tensors(&head_path)?)
        } else {
            None
        };
        let critic = Self::assemble(dev, cfg, spec, flat, head.as_deref(), seed)?;
        Ok(critic)
    }

    /// Builds the flat buffer: backbone `flat`, then the head and pool weights, from `saved`
    /// (tensors of a head file) or freshly initialised.
    fn assemble(
        dev: &D,
        cfg: ModelConfig,
        spec: CriticSpec,
        mut flat: Vec<f32>,
        saved: Option<&[safetensors_io::NamedTensor]>,
        seed: u64,
    ) -> Result<Self> {
        let backbone = ParamTable::for_config(&cfg);
        let c = cfg.hidden_size;
        let mut table = backbone.clone();
        let mut push = |name: &str, shape: Vec<usize>, decay: bool| {
            let len = shape.iter().product();
            let offset = table.total;
            table.entries.push(ParamEntry {
                name: name.to_string(),
                shape,
                offset,
                len,
                decay,
            });
            table.total += len;
            offset
        };
        let head = push(HEAD_NAME, vec![spec.a, c], true);
        let pool_w = (spec.pooling == PoolMode::Weighted)
            .then(|| push(POOL_NAME, vec![spec.max_len], false));
        flat.resize(table.total, 0.0);

        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (name, off) in [(HEAD_NAME, Some(head)), (POOL_NAME, pool_w)] {
            let Some(off) = off else { continue };
            let Some(e) = table.entries.iter().find(|e| e.name == name) else {
                continue;
            };
            let dst = &mut flat[off..off + e.len];
            if let Some(tensors) = saved {
                let (_, shape, data) = tensors
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .ok_or_else(|| invalid(format!("{HEAD_FILE} has no tensor `{name}`")))?;
                if *shape != e.shape {
                    return Err(invalid(format!(
                        "`{name}` in {HEAD_FILE} has shape {shape:?}, the critic needs {:?}",
                        e.shape
                    )));
                }
                dst.copy_from_slice(data);
            } else if name == POOL_NAME {
                // [V] legacy: 0.01 N(0,1)
                dst.iter_mut()
                    .for_each(|x| *x = 0.01 * std_normal(&mut rng));
            } else if spec.a == c {
                // [O]: identity
                dst.fill(0.0);
                (0..c).for_each(|i| dst[i * c + i] = 1.0);
            } else {
                // PyTorch Linear default: U(-1/sqrt(C), 1/sqrt(C))
                let bound = 1.0 / (c as f32).sqrt();
                dst.iter_mut()
                    .for_each(|x| *x = bound * (2.0 * rng.random::<f32>() - 1.0));
            }
        }
        let params = dev.upload(&flat)?;
        let model = Model {
            work: working_copy(dev, &params)?,
            params,
            grads: dev.alloc(table.total)?,
            table: backbone,
            cfg,
        };
        Ok(Critic {
            spec,
            model,
            table,
            head,
            pool_w,
        })
    }

    /// Writes the checkpoint folder (see the module docs): config.json + model.safetensors
    /// (the backbone, f32) + value_head.safetensors.
    pub fn save(&self, dev: &D, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let flat = self.model.params_to_host(dev)?;
        let bt = &self.model.table;
        safetensors_io::save_params(
            &dir.join("model.safetensors"),
            bt,
            &flat[..bt.total],
            SaveDtype::F32,
        )?;
        let extra: Vec<(String, Vec<usize>, &[f32])> = self.table.entries[bt.entries.len()..]
            .iter()
            .map(|e| {
                let data = &flat[e.offset..e.offset + e.len];
                (e.name.clone(), e.shape.clone(), data)
            })
            .collect();
        safetensors_io::write_tensors(&dir.join(HEAD_FILE), &extra)?;
        let path = dir.join("config.json");
        let cfg = serde_json::to_string_pretty(&self.model.cfg.to_json())
            .map_err(|e| Error::format(&path, e.to_string()))?;
        std::fs::write(&path, cfg).map_err(|e| Error::io(path, e))
    }

    pub fn zero_grads(&mut self, dev: &D) -> Result<()> {
        self.model.zero_grads(dev)
    }

    /// Uploads a batch after checking it: ids [B*T] below the vocabulary, mask [B,T] of 0/1,
    /// right padded with a real token in every row, target [B,A], valid [B] (None = all).
    #[allow(clippy::too_many_arguments)]
    pub fn batch(
        &self,
        dev: &D,
        b: usize,
        t: usize,
        ids: &[u32],
        mask: &[f32],
        target: &[f32],
        valid: Option<&[bool]>,
    ) -> Result<CriticInput<D>> {
        let a = self.spec.a;
        let vocab = self.model.cfg.vocab_size;
        if b == 0 || t == 0 || ids.len() != b * t || mask.len() != b * t || target.len() != b * a {
            return Err(invalid(format!(
                "batch {b}x{t} (A = {a}) needs {} ids and mask values and {} target values, \
                 got {}, {} and {}",
                b * t,
                b * a,
                ids.len(),
                mask.len(),
                target.len()
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(invalid(format!(
                "token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        if self.spec.pooling == PoolMode::Weighted && t > self.spec.max_len {
            return Err(invalid(format!(
                "sequences of {t} tokens are longer than the pool weights (Tmax = {})",
                self.spec.max_len
            )));
        }
        for (r, row) in mask.chunks(t).enumerate() {
            let len = row.iter().take_while(|&&m| m == 1.0).count();
            if len == 0 || row[len..].iter().any(|&m| m != 0.0) {
                return Err(invalid(format!(
                    "mask row {r} must be 1s then 0s (right padding) with at least one 1"
                )));
            }
        }
        let valid = match valid {
            Some(v) if v.len() != b => {
                return Err(invalid(format!("{} valid flags for {b} samples", v.len())))
            }
            Some(v) => v.to_vec(),
            None => vec![true; b],
        };
        Ok(CriticInput {
            b,
            t,
            ids: dev.upload_ids(ids)?,
            mask: dev.upload(mask)?,
            target: dev.upload(target)?,
            valid,
        })
    }

    /// Step buffers for batch shape (B, T), every activation kept.
    pub fn acts(&self, dev: &D, b: usize, t: usize) -> Result<CriticActs<D>> {
        self.acts_with(dev, b, t, Recompute::None)
    }

    /// [`Self::acts`] with block recompute (`Recompute::Block`: one block's activations,
    /// each block run again before its backward).
    pub fn acts_with(
        &self,
        dev: &D,
        b: usize,
        t: usize,
        recompute: Recompute,
    ) -> Result<CriticActs<D>> {
        let (c, a) = (self.model.cfg.hidden_size, self.spec.a);
        Ok(CriticActs {
            acts: Activations::<D>::blocks(dev, &self.model.cfg, b, t, recompute)?,
            pooled: dev.alloc_work(b * c)?,
            pred: dev.alloc(b * a)?,
            npred: dev.alloc(b * a)?,
            ntarget: dev.alloc(b * a)?,
            dpred: dev.alloc(b * a)?,
            dpred_work: dev.alloc_work(b * a)?,
            dpooled: dev.alloc_work(b * c)?,
            last: None,
        })
    }

    fn check_shape(ws: &CriticActs<D>, batch: &CriticInput<D>) -> Result<()> {
        if ws.acts.b != batch.b || ws.acts.t != batch.t {
            return Err(invalid(format!(
                "batch is {}x{} but the buffers were made for {}x{}",
                batch.b, batch.t, ws.acts.b, ws.acts.t
            )));
        }
        Ok(())
    }

    /// Backbone -> pooling -> head -> (rescale) -> per-sample mse. `mse_scale`: Some(s)
    /// rescales prediction and target to norm s first ([O], default sqrt(A)); None = raw.
    pub fn forward(
        &self,
        dev: &D,
        ws: &mut CriticActs<D>,
        batch: &CriticInput<D>,
        mse_scale: Option<f32>,
    ) -> Result<CriticOut> {
        let _range = crate::profile::range("critic forward");
        Self::check_shape(ws, batch)?;
        if let Some(s) = mse_scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(invalid(format!("mse_scale {s} must be finite and > 0")));
            }
        }
        let (b, t, a) = (batch.b, batch.t, self.spec.a);
        let c = self.model.cfg.hidden_size;
        let params = self.model.weights();
        forward_blocks(dev, &self.model, &mut ws.acts, &batch.ids, None)?;
        let h = &ws.acts.res[self.spec.k + 1];
        let w = self
            .pool_w
            .map(|o| View::range(params, o, self.spec.max_len));
        dev.pool_fwd(
            ViewMut::all(&mut ws.pooled),
            View::all(h),
            View::all(&batch.mask),
            w,
            b,
            t,
            c,
            self.spec.pooling,
        )?;
        linear_fwd(
            dev,
            ViewMut::all(&mut ws.pred),
            View::all(&ws.pooled),
            View::range(params, self.head, a * c),
            b,
            a,
            c,
        )?;
        let pred = dev.download(View::all(&ws.pred))?;
        let (np, nt) = match mse_scale {
            Some(s) => {
                dev.norm_scale_fwd(ViewMut::all(&mut ws.npred), View::all(&ws.pred), b, a, s)?;
                dev.norm_scale_fwd(
                    ViewMut::all(&mut ws.ntarget),
                    View::all(&batch.target),
                    b,
                    a,
                    s,
                )?;
                (
                    dev.download(View::all(&ws.npred))?,
                    dev.download(View::all(&ws.ntarget))?,
                )
            }
            None => (pred.clone(), dev.download(View::all(&batch.target))?),
        };
        let diff: Vec<f64> = np
            .iter()
            .zip(&nt)
            .map(|(&p, &g)| p as f64 - g as f64)
            .collect();
        let mse: Vec<f64> = diff
            .chunks(a)
            .map(|r| r.iter().map(|d| d * d).sum::<f64>() / a as f64)
            .collect();
        let loss_sum = mse
            .iter()
            .zip(&batch.valid)
            .filter(|(_, &v)| v)
            .map(|(m, _)| m)
            .sum();
        ws.last = Some((mse_scale, diff));
        Ok(CriticOut {
            pred,
            mse: mse.iter().map(|&m| m as f32).collect(),
            loss_sum,
        })
    }

    /// Accumulates d(loss)/d params into `model.grads`, loss = sum of the valid samples' mse /
    /// `divisor` (the global batch size, so micro-batches of an accumulated step add up).
    /// Needs the [`Critic::forward`] of this batch on `ws` just before.
    pub fn backward(
        &mut self,
        dev: &D,
        ws: &mut CriticActs<D>,
        batch: &CriticInput<D>,
        divisor: f32,
    ) -> Result<()> {
        Self::check_shape(ws, batch)?;
        let _range = crate::profile::range("critic backward");
        if !(divisor.is_finite() && divisor > 0.0) {
            return Err(invalid(format!("loss divisor {divisor} must be > 0")));
        }
        let Some((mse_scale, diff)) = ws.last.take() else {
            return Err(invalid(
                "backward needs the forward of this batch first".into(),
            ));
        };
        let (b, t, a) = (batch.b, batch.t, self.spec.a);
        let c = self.model.cfg.hidden_size;
        // d loss / d n(pred) = 2 (n(pred) - n(target)) / (A divisor) on valid rows
        let k = 2.0 / (a as f64 * divisor as f64);
        let dn: Vec<f32> = diff
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if batch.valid[i / a] {
                    (k * d) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let dn = dev.upload(&dn)?;
        match mse_scale {
            Some(s) => dev.norm_scale_bwd(
                ViewMut::all(&mut ws.dpred),
                View::all(&dn),
                View::all(&ws.pred),
                b,
                a,
                s,
            )?,
            None => dev.copy(ViewMut::all(&mut ws.dpred), View::all(&dn))?,
        }
        let model = &mut self.model;
        let weights = model.work.as_ref().unwrap_or(&model.params);
        dev.copy(ViewMut::all(&mut ws.dpred_work), View::all(&ws.dpred))?;
        // head: dW[A,C] += dpred^T pooled; dpooled[B,C] = dpred W
        linear_bwd_dw(
            dev,
            ViewMut::range(&mut model.grads, self.head, a * c),
            View::all(&ws.dpred_work),
            View::all(&ws.pooled),
            b,
            a,
            c,
        )?;
        linear_bwd_dx(
            dev,
            ViewMut::all(&mut ws.dpooled),
            View::all(&ws.dpred_work),
            View::range(weights, self.head, a * c),
            b,
            a,
            c,
            false,
        )?;
        let tmax = self.spec.max_len;
        dev.pool_bwd(
            ViewMut::all(&mut ws.acts.dres),
            self.pool_w
                .map(|o| ViewMut::range(&mut model.grads, o, tmax)),
            View::all(&ws.dpooled),
            View::all(&ws.acts.res[self.spec.k + 1]),
            View::all(&batch.mask),
            self.pool_w.map(|o| View::range(weights, o, tmax)),
            b,
            t,
            c,
            self.spec.pooling,
        )?;
        backward_blocks(dev, model, &mut ws.acts, &batch.ids, None)
    }
}
