//! The decoder's forward pass: a straight-line loop over blocks calling device ops.

use super::block::{block_fwd, BlockBufs};
use super::{Activations, DeviceBatch, LayerActs, LayerParams, Model};
use crate::device::{AttnDims, Device, InjectMode, View, ViewMut};
use crate::{Error, Result};

/// Vectors written into the residual stream at marker sites: the actor's input.
pub struct Injection<D: Device> {
    /// where: 0 = the embedding output, i > 0 = the residual stream after block i-1 (i <= L)
    pub layers: Vec<usize>,
    pub mode: InjectMode,
    /// [S] row indices b*T + t of the marker tokens, row-major (the k-th marker gets vector k)
    pub sites: D::Ids,
    /// [S,C] what is written (already projected and rescaled)
    pub vecs: D::Buf,
    /// S
    pub s: usize,
    /// [S,C] d loss / d vecs, summed over the layers (`=` by backward)
    pub dvecs: D::Buf,
    /// [S,C] scratch of backward
    pub dscratch: D::Buf,
}

impl<D: Device> Injection<D> {
    /// `vecs` [S,C] (host) at `sites` [S] in `layers`.
    pub fn new(
        dev: &D,
        layers: Vec<usize>,
        mode: InjectMode,
        sites: &[u32],
        vecs: &[f32],
        c: usize,
    ) -> Result<Self> {
        let s = sites.len();
        if vecs.len() != s * c {
            return Err(Error::invalid(
                "injection",
                format!(
                    "{s} sites need {} vector elements (C = {c}), got {}",
                    s * c,
                    vecs.len()
                ),
            ));
        }
        Ok(Injection {
            layers,
            mode,
            sites: dev.upload_ids(sites)?,
            vecs: dev.upload_as(vecs, dev.work_dtype())?,
            s,
            dvecs: dev.alloc_work(s * c)?,
            dscratch: dev.alloc_work(s * c)?,
        })
    }

    pub(crate) fn check_layers(&self, num_layers: usize) -> Result<()> {
        match self.layers.iter().find(|&&l| l > num_layers) {
            Some(l) => Err(Error::invalid(
                "injection",
                format!("layer index {l} is past the last block's output (the model has {num_layers} blocks)"),
            )),
            None => Ok(()),
        }
    }
}

fn inject<D: Device>(
    dev: &D,
    h: &mut D::Buf,
    inj: Option<&Injection<D>>,
    layer: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    match inj {
        Some(i) if i.layers.contains(&layer) => {
            dev.inject_fwd(ViewMut::all(h), &i.sites, View::all(&i.vecs), n, c, i.mode)
        }
        _ => Ok(()),
    }
}

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

/// The batch is the shape the activations were made for, and they hold the LM head's buffers.
pub(crate) fn check_shape<D: Device>(acts: &Activations<D>, batch: &DeviceBatch<D>) -> Result<()> {
    if acts.logits_chunk == 0 {
        return Err(Error::invalid(
            "forward",
            "the activations were made for the blocks only (no LM head)",
        ));
    }
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
    forward_with(dev, model, acts, batch, None)
}

/// [`forward`] with vectors injected into the residual stream.
pub fn forward_with<D: Device>(
    dev: &D,
    model: &Model<D>,
    acts: &mut Activations<D>,
    batch: &DeviceBatch<D>,
    inj: Option<&Injection<D>>,
) -> Result<LossSum> {
    let _range = crate::profile::range("forward");
    check_shape(acts, batch)?;
    forward_blocks(dev, model, acts, &batch.ids, inj)?;
    let cfg = &model.cfg;
    let n = batch.b * batch.t;
    let (c, v, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps);
    let p = |off: usize, len: usize| View::range(model.weights(), off, len);
    let tb = &model.table;
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
    // the logits are scaled by logit_scale (riding on the GEMM's alpha)
    let scale = acts.logit_scale;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(crate::Error::invalid(
            "forward",
            format!("logit_scale {scale} must be finite and > 0"),
        ));
    }
    // chunk [v0, v0+w) of the vocabulary (one chunk, w = V, for whole logits):
    // logits[N,w] = scale * xn_f @ lm_head[v0..v0+w]^T, merged into the per-row (max, sum,
    // target logit); the last chunk writes the losses
    let vc = acts.logits_chunk;
    for v0 in (0..v).step_by(vc) {
        let w = vc.min(v - v0);
        dev.matmul(
            ViewMut::range(&mut acts.logits, 0, n * w),
            View::all(&acts.xn_f),
            p(tb.lm_head + v0 * c, w * c),
            n,
            w,
            c,
            false,
            true,
            scale,
            0.0,
        )?;
        dev.cross_entropy_chunk_fwd(
            ViewMut::all(&mut acts.losses),
            ViewMut::all(&mut acts.ce_state),
            View::range(&acts.logits, 0, n * w),
            &batch.targets,
            View::all(&batch.mask),
            n,
            w,
            v,
            v0,
        )?;
    }
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

/// Block `lp` of a training pass: `out` from `x`, keeping in `la` what its backward needs
/// (`out` None: only that, for a recomputed block); `qkv` is the set's projection scratch.
pub(crate) fn block_train_fwd<D: Device>(
    dev: &D,
    model: &Model<D>,
    lp: &LayerParams,
    dims: AttnDims,
    (x, out): (View<'_, D::Buf>, Option<ViewMut<'_, D::Buf>>),
    (la, qkv): (&mut LayerActs<D>, &mut D::Buf),
) -> Result<()> {
    let io = BlockBufs {
        x,
        out,
        xn1: ViewMut::all(&mut la.xn1),
        rstd1: ViewMut::all(&mut la.rstd1),
        qkv: ViewMut::all(qkv),
        q: ViewMut::all(&mut la.q),
        k: ViewMut::all(&mut la.k),
        v: ViewMut::all(&mut la.v),
        att: ViewMut::all(&mut la.att),
        x_mid: ViewMut::all(&mut la.x_mid),
        xn2: ViewMut::all(&mut la.xn2),
        rstd2: ViewMut::all(&mut la.rstd2),
        gu: ViewMut::all(&mut la.gu),
        h: ViewMut::all(&mut la.h),
    };
    let lse = ViewMut::all(&mut la.lse);
    block_fwd(dev, model, lp, dims.into(), None, io, |att, q, k, v| {
        dev.attention_fwd(att, lse, q, k, v, dims)
    })
}

/// The embedding and every block, with injections: fills `acts.res` (res[L] is the output of
/// the last block, before the final norm) and what the blocks' backward needs. `ids` [B*T]
/// with B, T as `acts` was planned for.
pub fn forward_blocks<D: Device>(
    dev: &D,
    model: &Model<D>,
    acts: &mut Activations<D>,
    ids: &D::Ids,
    inj: Option<&Injection<D>>,
) -> Result<()> {
    if let Some(i) = inj {
        i.check_layers(model.cfg.num_hidden_layers)?;
    }
    let cfg = &model.cfg;
    let (b, t) = (acts.b, acts.t);
    let n = b * t;
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let (nh, nkv, hs) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let dims = AttnDims { b, t, nh, nkv, hs };
    let p = |off: usize, len: usize| View::range(model.weights(), off, len);
    let tb = &model.table;

    dev.embedding_fwd(ViewMut::all(&mut acts.res[0]), ids, p(tb.wte, v * c), n, c)?;
    inject(dev, &mut acts.res[0], inj, 0, n, c)?;
    for (l, lp) in tb.layers.iter().enumerate() {
        let li = acts.layer_index(l);
        let (before, after) = acts.res.split_at_mut(l + 1);
        let x_out = &mut after[0];
        let (x, out) = (View::all(&before[l]), Some(ViewMut::all(&mut *x_out)));
        let la = (&mut acts.layers[li], &mut acts.qkv);
        block_train_fwd(dev, model, lp, dims, (x, out), la)?;
        inject(dev, x_out, inj, l + 1, n, c)?;
    }
    Ok(())
}
