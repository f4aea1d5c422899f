//! The decoder's backward pass: the forward's blocks in reverse, each op's backward.

use super::forward::{block_train_fwd, check_shape, Injection};
use super::linear::{linear_bwd_dw, linear_bwd_dx};
use super::{Activations, DeviceBatch, Model, Recompute};
use crate::device::{AttnDims, Device, View, ViewMut};
use crate::Result;

/// At the residual stream of `layer`: the injection's share of the gradient goes to `dvecs`
/// (summed over layers; the first overwrites) and, for `replace`, stops flowing at the sites.
fn uninject<D: Device>(
    dev: &D,
    dh: &mut D::Buf,
    inj: &mut Option<&mut Injection<D>>,
    layer: usize,
    (n, c): (usize, usize),
    first: &mut bool,
) -> Result<()> {
    let Some(i) = inj.as_deref_mut() else {
        return Ok(());
    };
    if !i.layers.contains(&layer) {
        return Ok(());
    }
    let out = if *first {
        &mut i.dvecs
    } else {
        &mut i.dscratch
    };
    dev.inject_bwd(ViewMut::all(out), ViewMut::all(dh), &i.sites, n, c, i.mode)?;
    if !*first {
        dev.residual_bwd(ViewMut::all(&mut i.dvecs), View::all(&i.dscratch))?;
    }
    *first = false;
    Ok(())
}

fn check_trainable<D: Device>(model: &Model<D>) -> Result<()> {
    if model.is_frozen() {
        return Err(crate::Error::invalid(
            "backward",
            "the model is frozen (its gradients were freed)",
        ));
    }
    Ok(())
}

/// The LM head's backward for logits[N,W] = s * xn_f @ w^T (w [W,C], a window of lm_head),
/// from d loss / d logits written over the logits, `a.logits[..N*W]`:
/// dxn[N,C] = s * dlogits @ w + beta * dxn, dw[W,C] += s * dlogits^T xn_f.
fn lm_head_bwd<D: Device>(
    dev: &D,
    a: &mut Activations<D>,
    w: View<'_, D::Buf>,
    dw: ViewMut<'_, D::Buf>,
    (n, nw, c): (usize, usize, usize),
    beta: f32,
) -> Result<()> {
    let dlogits = View::range(&a.logits, 0, n * nw);
    let s = a.logit_scale;
    dev.matmul(
        ViewMut::all(&mut a.dxn),
        dlogits,
        w,
        n,
        c,
        nw,
        false,
        false,
        s,
        beta,
    )?;
    dev.matmul(
        dw,
        dlogits,
        View::all(&a.xn_f),
        nw,
        c,
        n,
        true,
        false,
        s,
        1.0,
    )
}

/// Accumulates d(scale * sum of masked losses)/d params into `model.grads`, from the
/// activations `forward` left in `acts` for the same batch. `scale` = 1/count gives the
/// gradient of the mean loss; with gradient accumulation, 1/(count over all micro-batches).
pub fn backward<D: Device>(
    dev: &D,
    model: &mut Model<D>,
    acts: &mut Activations<D>,
    batch: &DeviceBatch<D>,
    scale: f32,
) -> Result<()> {
    backward_with(dev, model, acts, batch, scale, None)
}

/// [`backward`] of [`super::forward_with`]: also writes d loss / d vecs into `inj.dvecs`
/// (zero when no injected layer is reached).
pub fn backward_with<D: Device>(
    dev: &D,
    model: &mut Model<D>,
    acts: &mut Activations<D>,
    batch: &DeviceBatch<D>,
    scale: f32,
    inj: Option<&mut Injection<D>>,
) -> Result<()> {
    let _range = crate::profile::range("backward");
    check_shape(acts, batch)?;
    check_trainable(model)?;
    let cfg = &model.cfg;
    let n = batch.b * batch.t;
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let tb = &model.table;
    let params = model.work.as_ref().unwrap_or(&model.params);
    let grads = &mut model.grads;
    let p = |off: usize, len: usize| View::range(params, off, len);
    // accumulating windows of the flat gradient buffer
    macro_rules! g {
        ($off:expr, $len:expr) => {
            ViewMut::range(grads, $off, $len)
        };
    }
    let a = acts;

    // lm_head [V,C]: each chunk [v0, v0+w) (one chunk for whole logits): its logits (kept
    // from forward when whole, else made again), their gradient written over them, its share
    // of dxn (the first chunk overwrites) and of dW[v0..v0+w]
    let vc = a.logits_chunk;
    for v0 in (0..v).step_by(vc) {
        let w = vc.min(v - v0);
        let wc = p(tb.lm_head + v0 * c, w * c);
        if w < v {
            dev.matmul(
                ViewMut::range(&mut a.logits, 0, n * w),
                View::all(&a.xn_f),
                wc,
                n,
                w,
                c,
                false,
                true,
                a.logit_scale,
                0.0,
            )?;
        }
        dev.cross_entropy_chunk_bwd(
            ViewMut::range(&mut a.logits, 0, n * w),
            View::all(&a.ce_state),
            &batch.targets,
            View::all(&batch.mask),
            n,
            w,
            v,
            v0,
            scale,
        )?;
        let beta = if v0 == 0 { 0.0 } else { 1.0 };
        lm_head_bwd(dev, a, wc, g!(tb.lm_head + v0 * c, w * c), (n, w, c), beta)?;
    }
    let last = &a.res[cfg.num_hidden_layers];
    dev.rmsnorm_bwd(
        ViewMut::all(&mut a.dres),
        g!(tb.ln_f, c),
        View::all(&a.dxn),
        View::all(last),
        p(tb.ln_f, c),
        View::all(&a.rstd_f),
        n,
        c,
        false,
    )?;

    backward_blocks(dev, model, a, &batch.ids, inj)
}

/// The blocks and the embedding in reverse, from `acts.dres` = d loss / d res[L] (the output
/// of the last block) as the caller left it: accumulates parameter gradients, and d loss / d
/// vecs into `inj.dvecs`.
pub fn backward_blocks<D: Device>(
    dev: &D,
    model: &mut Model<D>,
    acts: &mut Activations<D>,
    ids: &D::Ids,
    mut inj: Option<&mut Injection<D>>,
) -> Result<()> {
    check_trainable(model)?;
    if let Some(i) = inj.as_deref_mut() {
        i.check_layers(model.cfg.num_hidden_layers)?;
        dev.fill(ViewMut::all(&mut i.dvecs), 0.0)?;
    }
    let mut first = true;
    let cfg = &model.cfg;
    let (b, t) = (acts.b, acts.t);
    let n = b * t;
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (nh, nkv, hs) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let theta = cfg.rope_theta;
    let dims = AttnDims { b, t, nh, nkv, hs };
    let tb = &model.table;
    let params = model.work.as_ref().unwrap_or(&model.params);
    let p = |off: usize, len: usize| View::range(params, off, len);
    // accumulating windows of the flat gradient buffer (borrowed per call: a recomputed
    // block reads the model)
    macro_rules! g {
        ($off:expr, $len:expr) => {
            ViewMut::range(&mut model.grads, $off, $len)
        };
    }
    let a = acts;
    for (l, lp) in tb.layers.iter().enumerate().rev() {
        uninject(dev, &mut a.dres, &mut inj, l + 1, (n, c), &mut first)?;
        let li = a.layer_index(l);
        if a.recompute == Recompute::Block {
            // the block again from its input, into the shared set, up to what its backward
            // reads (h: not the down projection, whose output res[l+1] holds)
            let x = View::all(&a.res[l]);
            let la = (&mut a.layers[li], &mut a.qkv);
            block_train_fwd(dev, model, lp, dims, (x, None), la)?;
        }
        let la = &a.layers[li];
        let x = &a.res[l];
        // a.dres holds d x_out. MLP: x_out = x_mid + h @ wdown^T, with h [F,N], gu = [gate; up]
        // [2F,N] and their gradients feature-major (gate and up come from one matmul,
        // `gate_up_fwd`, and their gradients go back through one)
        let dres = View::all(&a.dres);
        // dh^T [F,N] = wdown^T [F,C] @ dres^T (wdown stored [C,F], dres [N,C])
        let wdown = p(lp.wdown, c * f);
        dev.matmul(
            ViewMut::all(&mut a.dh),
            wdown,
            dres,
            f,
            n,
            c,
            true,
            true,
            1.0,
            0.0,
        )?;
        // dwdown [C,F] += dres^T [C,N] @ h [N,F] (h stored [F,N])
        let h = View::all(&la.h);
        dev.matmul(g!(lp.wdown, c * f), dres, h, c, f, n, true, true, 1.0, 1.0)?;
        dev.swiglu_bwd(
            ViewMut::all(&mut a.dgu),
            View::all(&a.dh),
            View::all(&la.gu),
        )?;
        // gate and up as one [2F,C] weight W_gu (adjacent in the table, and so in the grads)
        let (dgu, xn2, wgu) = (
            View::all(&a.dgu),
            View::all(&la.xn2),
            p(lp.wgate, 2 * f * c),
        );
        // dxn [N,C] = dgu^T [N,2F] @ W_gu [2F,C] (dgu stored [2F,N])
        dev.matmul(
            ViewMut::all(&mut a.dxn),
            dgu,
            wgu,
            n,
            c,
            2 * f,
            true,
            false,
            1.0,
            0.0,
        )?;
        // dW_gu [2F,C] += dgu [2F,N] @ xn2 [N,C]
        dev.matmul(
            g!(lp.wgate, 2 * f * c),
            dgu,
            xn2,
            2 * f,
            c,
            n,
            false,
            false,
            1.0,
            1.0,
        )?;
        // a.dres += the norm's share
        dev.rmsnorm_bwd(
            ViewMut::all(&mut a.dres),
            g!(lp.ln2, c),
            View::all(&a.dxn),
            View::all(&la.x_mid),
            p(lp.ln2, c),
            View::all(&la.rstd2),
            n,
            c,
            true,
        )?;

        // a.dres now holds d x_mid (the skip's share plus the norm's). attention:
        // x_mid = x + att @ wo^T
        let dx_mid = View::all(&a.dres);
        linear_bwd_dx(
            dev,
            ViewMut::all(&mut a.datt),
            dx_mid,
            p(lp.wo, c * qd),
            n,
            c,
            qd,
            false,
        )?;
        linear_bwd_dw(dev, g!(lp.wo, c * qd), dx_mid, View::all(&la.att), n, c, qd)?;
        dev.attention_bwd(
            ViewMut::all(&mut a.dq),
            ViewMut::all(&mut a.dk),
            ViewMut::all(&mut a.dv),
            View::all(&a.datt),
            View::all(&la.q),
            View::all(&la.k),
            View::all(&la.v),
            View::all(&la.att),
            View::all(&la.lse),
            dims,
        )?;
        // dq, dk, dv rotated back into one [N,QKV] gradient of the fused projection
        dev.qkv_rope_bwd(
            ViewMut::all(&mut a.dqkv),
            View::all(&a.dq),
            View::all(&a.dk),
            View::all(&a.dv),
            dims.into(),
            theta,
        )?;
        // q, k and v as one [QKV,C] weight W_qkv (adjacent in the table, and so in the grads)
        let qkvd = qd + 2 * kvd;
        let (dqkv, xn1) = (View::all(&a.dqkv), View::all(&la.xn1));
        let wqkv = p(lp.wq, qkvd * c);
        linear_bwd_dx(dev, ViewMut::all(&mut a.dxn), dqkv, wqkv, n, qkvd, c, false)?;
        linear_bwd_dw(dev, g!(lp.wq, qkvd * c), dqkv, xn1, n, qkvd, c)?;
        // a.dres += the norm's share: d x, the previous block's d x_out
        dev.rmsnorm_bwd(
            ViewMut::all(&mut a.dres),
            g!(lp.ln1, c),
            View::all(&a.dxn),
            View::all(x),
            p(lp.ln1, c),
            View::all(&la.rstd1),
            n,
            c,
            true,
        )?;
    }
    uninject(dev, &mut a.dres, &mut inj, 0, (n, c), &mut first)?;
    dev.embedding_bwd(g!(tb.wte, v * c), ids, View::all(&a.dres), n, c)
}
