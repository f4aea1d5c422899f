//! A batch of token rows on the device: inputs, next-token targets and the loss mask.

use crate::device::Device;
use crate::{Error, Result};

/// Host side of a batch: B rows of T tokens, right-padded. `targets[n]` is the token that
/// position n predicts; `mask[n]` is 1 where that prediction is in the loss, else 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    /// [B*T]
    pub ids: Vec<u32>,
    /// [B*T]
    pub targets: Vec<u32>,
    /// [B*T]
    pub mask: Vec<f32>,
}

impl Batch {
    /// Causal-LM batch as HF computes its loss with labels = input ids: position t predicts
    /// token t+1 of the same row; the last position of each row is not in the loss.
    pub fn causal_lm(rows: &[Vec<u32>]) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, Vec::len);
        if b == 0 || t < 2 {
            return Err(Error::invalid(
                "batch",
                "need at least one row of at least 2 tokens",
            ));
        }
        if let Some(i) = rows.iter().position(|r| r.len() != t) {
            return Err(Error::invalid(
                "batch",
                format!(
                    "row {i} has {} tokens, row 0 has {t}: rows must have equal length",
                    rows[i].len()
                ),
            ));
        }
        let ids: Vec<u32> = rows.concat();
        let mut targets = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for r in 0..b {
            for p in 0..t - 1 {
                targets[r * t + p] = ids[r * t + p + 1];
                mask[r * t + p] = 1.0;
            }
        }
        Ok(Batch {
            b,
            t,
            ids,
            targets,
            mask,
        })
    }

    /// Number of predictions in the loss.
    pub fn count(&self) -> f64 {
        self.mask.iter().map(|&m| m as f64).sum()
    }

    /// Checks every id and target against the vocabulary size.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        for (what, xs) in [("input", &self.ids), ("target", &self.targets)] {
            if let Some(i) = xs.iter().position(|&x| x as usize >= vocab) {
                return Err(Error::invalid(
                    "batch",
                    format!(
                        "{what} token id {} at row {}, position {} is not below the vocabulary size {vocab}",
                        xs[i],
                        i / self.t,
                        i % self.t
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn upload<D: Device>(&self, dev: &D) -> Result<DeviceBatch<D>> {
        Ok(DeviceBatch {
            b: self.b,
            t: self.t,
            ids: dev.upload_ids(&self.ids)?,
            targets: dev.upload_ids(&self.targets)?,
            mask: dev.upload(&self.mask)?,
            count: self.count(),
        })
    }
}

/// A [`Batch`] in device memory.
pub struct DeviceBatch<D: Device> {
    pub b: usize,
    pub t: usize,
    /// [B*T]
    pub ids: D::Ids,
    /// [B*T]
    pub targets: D::Ids,
    /// [B*T]
    pub mask: D::Buf,
    /// number of predictions in the loss (sum of mask)
    pub count: f64,
}
