//! Inference on a KV cache: batched prefill and one-token decode steps, for generation.
//!
//! Rows are left-padded: row b's tokens start at cache position `starts[b]`. Each layer keeps
//! keys and values [B,TMAX,NKV,HS]; a step runs TQ new positions of every row through the
//! blocks (TQ = prompt length at prefill, 1 when decoding) and writes the logits of each row's
//! last new position. A step may write vectors into the residual stream of its rows
//! ([`KvCache::step_with`]), as [`super::forward_blocks`] does in training.

use super::block::{block_fwd, BlockBufs};
use super::forward::Injection;
use super::linear::linear_fwd;
use super::{Model, ModelConfig};
use crate::device::{CacheDims, Device, DeviceBuf, View, ViewMut};
use crate::{Error, Result};

pub struct KvCache<D: Device> {
    pub b: usize,
    pub tmax: usize,
    /// per layer [B,TMAX,NKV,HS]
    pub k: Vec<D::Buf>,
    pub v: Vec<D::Buf>,
    /// [B] first real position of each row
    pub starts: D::Ids,
    /// [1] the position of a step's first new row, written before each step: the step's ops
    /// read it on the device, so a decode step launches the same kernels with the same
    /// arguments at every position
    pos: D::Ids,
    /// positions written so far (the same for every row)
    pub len: usize,
    /// the step's buffers, sized for B rows of up to TQMAX positions
    ws: Workspace<D>,
    /// the decode step, kept for replay ([`Device::replay`])
    graph: D::Graph,
    tq_max: usize,
}

/// Scratch of one step; only the first B*TQ rows are used.
struct Workspace<D: Device> {
    /// [B*TQ,C] the residual stream: a block's input, its output, and after attention
    x: D::Buf,
    x_out: D::Buf,
    x2: D::Buf,
    /// [B*TQ,C] normed inputs of attention and MLP
    xn: D::Buf,
    xn2: D::Buf,
    /// [B*TQ]
    rstd: D::Buf,
    rstd2: D::Buf,
    /// [B*TQ,(NH+2NKV)*HS] the fused q/k/v projection, before RoPE
    qkv: D::Buf,
    /// [B*TQ,NH*HS] (keys and values go straight into the cache)
    q: D::Buf,
    /// [B*TQ,NH*HS]
    att: D::Buf,
    /// [2F,B*TQ] gate^T then up^T; [F,B*TQ] h (feature-major, as in training)
    gu: D::Buf,
    h: D::Buf,
    /// [B,C] the last new position of each row, and its norm
    last: D::Buf,
    last_n: D::Buf,
    /// [B]
    last_rstd: D::Buf,
    /// [B,V]
    logits: D::Buf,
}

impl<D: Device> KvCache<D> {
    /// A cache for `b` rows of up to `tmax` positions, whose steps take up to `tq_max` new
    /// positions at once; `starts[b]` is the first real position of row b.
    pub fn new(
        dev: &D,
        cfg: &ModelConfig,
        starts: &[u32],
        tmax: usize,
        tq_max: usize,
    ) -> Result<Self> {
        let b = starts.len();
        if b == 0 || tq_max == 0 || tq_max > tmax {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "need rows and 0 < tq_max <= tmax (got {b} rows, tq_max {tq_max}, tmax {tmax})"
                ),
            ));
        }
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let n = b * tq_max;
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut vv = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(dev.alloc_work(b * tmax * kvd)?);
            vv.push(dev.alloc_work(b * tmax * kvd)?);
        }
        let ws = Workspace {
            x: dev.alloc_work(n * c)?,
            x_out: dev.alloc_work(n * c)?,
            x2: dev.alloc_work(n * c)?,
            xn: dev.alloc_work(n * c)?,
            xn2: dev.alloc_work(n * c)?,
            rstd: dev.alloc(n)?,
            rstd2: dev.alloc(n)?,
            qkv: dev.alloc_work(n * (qd + 2 * kvd))?,
            q: dev.alloc_work(n * qd)?,
            att: dev.alloc_work(n * qd)?,
            gu: dev.alloc_work(2 * n * f)?,
            h: dev.alloc_work(n * f)?,
            last: dev.alloc_work(b * c)?,
            last_n: dev.alloc_work(b * c)?,
            last_rstd: dev.alloc(b)?,
            logits: dev.alloc_work(b * v)?,
        };
        Ok(KvCache {
            b,
            tmax,
            k,
            v: vv,
            starts: dev.upload_ids(starts)?,
            pos: dev.upload_ids(&[0])?,
            graph: D::Graph::default(),
            len: 0,
            ws,
            tq_max,
        })
    }

    /// The logits [B,V] of the last step.
    pub fn logits(&self) -> View<'_, D::Buf> {
        View::all(&self.ws.logits)
    }

    /// Runs `tq` new positions of every row (`ids` [B*TQ], row-major) at cache positions
    /// `len..len+tq`, appends their keys and values, and leaves the logits of each row's last
    /// new position in [`Self::logits`].
    pub fn step(&mut self, dev: &D, model: &Model<D>, ids: &D::Ids, tq: usize) -> Result<()> {
        self.step_with(dev, model, ids, tq, None)
    }

    /// [`Self::step`] with vectors injected into this step's residual stream: `inj.sites` are
    /// flat row indices b*TQ + t into the step's [B*TQ] rows (sites < B*TQ).
    pub fn step_with(
        &mut self,
        dev: &D,
        model: &Model<D>,
        ids: &D::Ids,
        tq: usize,
        inj: Option<&Injection<D>>,
    ) -> Result<()> {
        let cfg = &model.cfg;
        if tq == 0 || tq > self.tq_max || self.len + tq > self.tmax {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "step of {tq} positions at {} does not fit (at most {} per step, {} in all)",
                    self.len, self.tq_max, self.tmax
                ),
            ));
        }
        let (b, pos0) = (self.b, self.len);
        let n = b * tq;
        dev.write_ids(&mut self.pos, &[pos0 as u32])?;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        if let Some(i) = inj {
            check_injection(dev, i, cfg.num_hidden_layers, n, c)?;
        }
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_norm_eps;
        let tb = &model.table;
        let p = |off: usize, len: usize| View::range(model.weights(), off, len);
        let dims = CacheDims {
            b,
            tq,
            tmax: self.tmax,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hs: cfg.head_dim,
            pos0,
        };
        // the first `len` elements of a scratch buffer
        fn head<B: crate::device::DeviceBuf>(buf: &mut B, len: usize) -> ViewMut<'_, B> {
            ViewMut::range(buf, 0, len)
        }
        fn head_r<B: crate::device::DeviceBuf>(buf: &B, len: usize) -> View<'_, B> {
            View::range(buf, 0, len)
        }

        // writes the injection's vectors of `layer` into the residual stream x [B*TQ,C]
        let inject = |x: &mut D::Buf, layer: usize| match inj {
            Some(i) if i.layers.contains(&layer) => dev.inject_fwd(
                ViewMut::range(x, 0, n * c),
                &i.sites,
                View::all(&i.vecs),
                n,
                c,
                i.mode,
            ),
            _ => Ok(()),
        };

        let KvCache {
            k: kcs,
            v: vcs,
            starts,
            pos,
            ws: w,
            graph,
            ..
        } = self;
        let (starts, pos) = (&*starts, Some(&*pos));
        // the step's launches: the same buffers and arguments at every position when TQ = 1
        // (positions are read from `pos`; x and x_out change roles through references only)
        let mut run = || -> Result<()> {
            let (mut x, mut x_out) = (&mut w.x, &mut w.x_out);
            dev.embedding_fwd(head(x, n * c), ids, p(tb.wte, v * c), n, c)?;
            inject(x, 0)?;
            for (l, lp) in tb.layers.iter().enumerate() {
                let io = BlockBufs {
                    x: head_r(x, n * c),
                    out: Some(head(x_out, n * c)),
                    xn1: head(&mut w.xn, n * c),
                    rstd1: head(&mut w.rstd, n),
                    qkv: head(&mut w.qkv, n * (qd + 2 * kvd)),
                    q: head(&mut w.q, n * qd),
                    // this step's keys and values go straight to their cache positions
                    k: ViewMut::all(&mut kcs[l]),
                    v: ViewMut::all(&mut vcs[l]),
                    att: head(&mut w.att, n * qd),
                    x_mid: head(&mut w.x2, n * c),
                    xn2: head(&mut w.xn2, n * c),
                    rstd2: head(&mut w.rstd2, n),
                    gu: head(&mut w.gu, 2 * n * f),
                    h: head(&mut w.h, n * f),
                };
                block_fwd(dev, model, lp, dims, pos, io, |att, q, kc, vc| {
                    dev.decode_attention_fwd(att, q, kc, vc, starts, pos, dims)
                })?;
                std::mem::swap(&mut x, &mut x_out);
                inject(x, l + 1)?;
            }
            // each row's last new position [B,C]: the step's rows themselves when TQ = 1
            // (decode), else gathered, one copy per row (once per prefill)
            if tq > 1 {
                for r in 0..b {
                    let src = (r * tq + tq - 1) * c;
                    dev.copy(
                        ViewMut::range(&mut w.last, r * c, c),
                        View::range(x, src, c),
                    )?;
                }
            }
            let last = if tq > 1 { &w.last } else { &*x };
            dev.rmsnorm_fwd(
                ViewMut::all(&mut w.last_n),
                ViewMut::all(&mut w.last_rstd),
                View::range(last, 0, b * c),
                p(tb.ln_f, c),
                b,
                c,
                eps,
            )?;
            linear_fwd(
                dev,
                ViewMut::all(&mut w.logits),
                View::all(&w.last_n),
                p(tb.lm_head, v * c),
                b,
                v,
                c,
            )
        };
        if tq == 1 && inj.is_none() {
            // a decode step: replayed as one graph where the device has them
            dev.replay(graph, &mut run)?;
        } else {
            run()?;
        }
        self.len += tq;
        Ok(())
    }
}

/// The injection's layers exist, its vectors are [S,C], and its S sites are rows of the step
/// (< N = B*TQ).
fn check_injection<D: Device>(
    dev: &D,
    inj: &Injection<D>,
    num_layers: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    inj.check_layers(num_layers)?;
    let sites = dev.download_ids(&inj.sites)?;
    if sites.len() != inj.s || inj.vecs.len() != inj.s * c {
        return Err(Error::invalid(
            "kv_cache",
            format!(
                "injection of {} sites with {} vector elements does not match S = {} (C = {c})",
                sites.len(),
                inj.vecs.len(),
                inj.s
            ),
        ));
    }
    if let Some((k, &site)) = sites.iter().enumerate().find(|(_, &s)| s as usize >= n) {
        return Err(Error::invalid(
            "kv_cache",
            format!("injection site {k} is row {site}, not a row of this step (B*TQ = {n})"),
        ));
    }
    Ok(())
}
