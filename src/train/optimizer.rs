//! AdamW over the flat parameter buffer, with global gradient-norm clipping.

use crate::device::{AdamwStep, Device, View, ViewMut};
use crate::model::ParamTable;
use crate::{Error, Result};

/// AdamW hyper-parameters (PyTorch's defaults, except the weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to matrices only (not to norm weights).
    pub weight_decay: f32,
}

impl Default for AdamwConfig {
    fn default() -> Self {
        AdamwConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Optimizer state in the flat layout of the parameters: first and second moments.
pub struct AdamW<D: Device> {
    pub cfg: AdamwConfig,
    /// [P]
    pub m: D::Buf,
    /// [P]
    pub v: D::Buf,
    /// Number of updates done.
    pub step: u64,
    /// Windows [offset, len) of the flat buffer, with weight decay on or off; adjacent table
    /// entries with the same setting are merged so an update is a few passes.
    runs: Vec<(usize, usize, bool)>,
}

impl<D: Device> AdamW<D> {
    pub fn new(dev: &D, table: &ParamTable, cfg: AdamwConfig) -> Result<Self> {
        let mut runs: Vec<(usize, usize, bool)> = vec![];
        for e in &table.entries {
            match runs.last_mut() {
                Some((off, len, decay)) if *decay == e.decay && *off + *len == e.offset => {
                    *len += e.len
                }
                _ => runs.push((e.offset, e.len, e.decay)),
            }
        }
        Ok(AdamW {
            cfg,
            m: dev.alloc(table.total)?,
            v: dev.alloc(table.total)?,
            step: 0,
            runs,
        })
    }

    /// One update of `params` (f32 master weights) from `grads` (times `grad_scale`) at learning
    /// rate `lr`; `work`, the weights' working copy where the device keeps one, receives the
    /// new weights in its dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        dev: &D,
        params: &mut D::Buf,
        mut work: Option<&mut D::Buf>,
        grads: &D::Buf,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        let _range = crate::profile::range("optimizer");
        if !lr.is_finite() || !grad_scale.is_finite() {
            return Err(Error::invalid(
                "adamw",
                format!("learning rate {lr} or gradient scale {grad_scale} is not finite"),
            ));
        }
        self.step += 1;
        for &(off, len, decay) in &self.runs {
            let hp = AdamwStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            dev.adamw(
                ViewMut::range(params, off, len),
                work.as_deref_mut().map(|w| ViewMut::range(w, off, len)),
                View::range(grads, off, len),
                ViewMut::range(&mut self.m, off, len),
                ViewMut::range(&mut self.v, off, len),
                &hp,
            )?;
        }
        Ok(())
    }
}

/// The global L2 norm of the gradients and the factor that clips it to `max_norm`
/// (PyTorch's `clip_grad_norm_`: min(1, max_norm / (norm + 1e-6))); `max_norm <= 0` disables.
pub fn clip_factor<D: Device>(dev: &D, grads: &D::Buf, max_norm: f32) -> Result<(f64, f32)> {
    let norm = dev.sum_squares(View::all(grads))?.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm as f64 / (norm + 1e-6)).min(1.0) as f32
    } else {
        1.0
    };
    Ok((norm, factor))
}
