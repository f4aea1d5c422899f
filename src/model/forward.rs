//! The decoder's forward pass: a straight-line loop over blocks calling device ops.

use super::{Activations, DeviceBatch, Model};
use crate::device::{AttnDims, Device, View, ViewMut};
use crate::{Error, Result};

/// Sum of the masked per-position losses and the number of positions in the loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: f64,
}

impl LossSum {
    /// Mean loss over the positions in the loss (0 when there are none).
    pub fn mean(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count
        } else {
            0.0
        }
    }
}

pub(crate) fn check_shape<D: Device>(acts: &Activations<D>, batch: &DeviceBatch<D>) -> Result<()> {
    if acts.b != batch.b || acts.t != batch.t {
        return Err(Error::invalid(
            "forward",
            format!(
                "batch is {}x{} but the activations were planned for {}x{}",
                batch.b, batch.t, acts.b, acts.t
            ),
        ));
    }
    Ok(())
}

/// Runs the model on `batch`: fills `acts` (logits, and what backward needs) and returns the
/// masked cross-entropy sum. Ids must be below the vocabulary size (see `Batch::check_vocab`).
pub fn forward<D: Device>(
    dev: &D,
    model: &Model<D>,
    acts: &mut Activations<D>,
    batch: &DeviceBatch<D>,
) -> Result<LossSum> {
    check_shape(acts, batch)?;
    let cfg = &model.cfg;
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (nh, nkv, hs) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let (eps, theta) = (cfg.rms_norm_eps, cfg.rope_theta);
    let dims = AttnDims { b, t, nh, nkv, hs };
    let p = |off: usize, len: usize| View::range(&model.params, off, len);
    let tb = &model.table;

    dev.embedding_fwd(
        ViewMut::all(&mut acts.res[0]),
        &batch.ids,
        p(tb.wte, v * c),
        n,
        c,
    )?;
    for (l, lp) in tb.layers.iter().enumerate() {
        let (before, after) = acts.res.split_at_mut(l + 1);
        let x = &before[l];
        let x_out = &mut after[0];
        let la = &mut acts.layers[l];

        // attention: x_mid = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))
        dev.rmsnorm_fwd(
            ViewMut::all(&mut la.xn1),
            ViewMut::all(&mut la.rstd1),
            View::all(x),
            p(lp.ln1, c),
            n,
            c,
            eps,
        )?;
        let xn1 = View::all(&la.xn1);
        dev.matmul(
            ViewMut::all(&mut la.q),
            xn1,
            p(lp.wq, qd * c),
            n,
            qd,
            c,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.matmul(
            ViewMut::all(&mut la.k),
            xn1,
            p(lp.wk, kvd * c),
            n,
            kvd,
            c,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.matmul(
            ViewMut::all(&mut la.v),
            xn1,
            p(lp.wv, kvd * c),
            n,
            kvd,
            c,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.rope_fwd(ViewMut::all(&mut la.q), b, t, nh, hs, 0, theta)?;
        dev.rope_fwd(ViewMut::all(&mut la.k), b, t, nkv, hs, 0, theta)?;
        dev.attention_fwd(
            ViewMut::all(&mut la.att),
            ViewMut::all(&mut la.lse),
            View::all(&la.q),
            View::all(&la.k),
            View::all(&la.v),
            dims,
        )?;
        dev.matmul(
            ViewMut::all(&mut acts.proj),
            View::all(&la.att),
            p(lp.wo, c * qd),
            n,
            c,
            qd,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.residual_fwd(
            ViewMut::all(&mut la.x_mid),
            View::all(x),
            View::all(&acts.proj),
        )?;

        // MLP: x_out = x_mid + down_proj(silu(gate_proj(n2)) * up_proj(n2))
        dev.rmsnorm_fwd(
            ViewMut::all(&mut la.xn2),
            ViewMut::all(&mut la.rstd2),
            View::all(&la.x_mid),
            p(lp.ln2, c),
            n,
            c,
            eps,
        )?;
        let xn2 = View::all(&la.xn2);
        dev.matmul(
            ViewMut::all(&mut la.gate),
            xn2,
            p(lp.wgate, f * c),
            n,
            f,
            c,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.matmul(
            ViewMut::all(&mut la.up),
            xn2,
            p(lp.wup, f * c),
            n,
            f,
            c,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.swiglu_fwd(
            ViewMut::all(&mut la.h),
            View::all(&la.gate),
            View::all(&la.up),
        )?;
        dev.matmul(
            ViewMut::all(&mut acts.proj),
            View::all(&la.h),
            p(lp.wdown, c * f),
            n,
            c,
            f,
            false,
            true,
            1.0,
            0.0,
        )?;
        dev.residual_fwd(
            ViewMut::all(x_out),
            View::all(&la.x_mid),
            View::all(&acts.proj),
        )?;
    }
    let last = &acts.res[cfg.num_hidden_layers];
    dev.rmsnorm_fwd(
        ViewMut::all(&mut acts.xn_f),
        ViewMut::all(&mut acts.rstd_f),
        View::all(last),
        p(tb.ln_f, c),
        n,
        c,
        eps,
    )?;
    dev.matmul(
        ViewMut::all(&mut acts.logits),
        View::all(&acts.xn_f),
        p(tb.lm_head, v * c),
        n,
        v,
        c,
        false,
        true,
        1.0,
        0.0,
    )?;
    dev.cross_entropy_fwd(
        ViewMut::all(&mut acts.losses),
        View::all(&acts.logits),
        &batch.targets,
        View::all(&batch.mask),
        n,
        v,
    )?;
    let sum = dev
        .download(View::all(&acts.losses))?
        .iter()
        .map(|&x| x as f64)
        .sum();
    Ok(LossSum {
        sum,
        count: batch.count,
    })
}
