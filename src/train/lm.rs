//! A causal-LM training step: forward + backward over micro-batches (gradient accumulation),
//! global gradient clipping, AdamW with a learning-rate schedule.

use super::optimizer::{clip_factor, AdamW, AdamwConfig};
use super::schedule::LrSchedule;
use crate::device::Device;
use crate::model::{backward, forward, ActivationSet, Activations, Batch, MemoryOptions, Model};
use crate::{Error, Result};

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// mean loss over every position in the loss, over all micro-batches
    pub loss: f64,
    /// global gradient norm before clipping
    pub grad_norm: f64,
    pub lr: f32,
    /// tokens processed (B*T summed over micro-batches)
    pub tokens: usize,
}

pub struct LmTrainer<D: Device> {
    pub model: Model<D>,
    pub opt: AdamW<D>,
    pub schedule: LrSchedule,
    /// global gradient-norm clip; <= 0 disables
    pub max_norm: f32,
    /// vocabulary chunks, block recompute (default: neither)
    pub memory: MemoryOptions,
    acts: Option<Activations<D>>,
}

impl<D: Device> LmTrainer<D> {
    pub fn new(
        dev: &D,
        model: Model<D>,
        adamw: AdamwConfig,
        schedule: LrSchedule,
        max_norm: f32,
    ) -> Result<Self> {
        let opt = AdamW::new(dev, &model.table, adamw)?;
        Ok(LmTrainer {
            model,
            opt,
            schedule,
            max_norm,
            memory: MemoryOptions::default(),
            acts: None,
        })
    }

    /// One optimizer step over `micro_batches`; the loss is the token mean over all of them.
    pub fn step(&mut self, dev: &D, micro_batches: &[Batch]) -> Result<StepStats> {
        let total: f64 = micro_batches.iter().map(Batch::count).sum();
        if total <= 0.0 {
            return Err(Error::invalid(
                "train step",
                "no position of the batch is in the loss",
            ));
        }
        self.model.zero_grads(dev)?;
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for mb in micro_batches {
            mb.check_vocab(self.model.cfg.vocab_size)?;
            let acts = match self.acts.take() {
                Some(a) if a.fits(&self.model.cfg, mb.b, mb.t, self.memory) => a,
                stale => {
                    drop(stale); // before allocating the new set, not after
                    ActivationSet::with_options(dev, &self.model.cfg, mb.b, mb.t, self.memory)?
                }
            };
            let acts = self.acts.insert(acts);
            let db = mb.upload(dev)?;
            loss_sum += forward(dev, &self.model, acts, &db)?.sum;
            backward(dev, &mut self.model, acts, &db, (1.0 / total) as f32)?;
            tokens += mb.b * mb.t;
        }
        let (grad_norm, factor) = clip_factor(dev, &self.model.grads, self.max_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::invalid(
                "train step",
                format!(
                    "gradient norm is {grad_norm} at step {}: lower the learning rate",
                    self.opt.step + 1
                ),
            ));
        }
        let lr = self.schedule.lr_at(self.opt.step + 1);
        self.opt.update(
            dev,
            &mut self.model.params,
            self.model.work.as_mut(),
            &self.model.grads,
            lr,
            factor,
        )?;
        Ok(StepStats {
            step: self.opt.step,
            loss: loss_sum / total,
            grad_norm,
            lr,
            tokens,
        })
    }
}
