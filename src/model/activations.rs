//! The buffers one forward + backward pass of a batch shape (B, T) needs: the activations kept
//! for backward, per layer, and the gradient scratch. Allocated once per shape, reused by
//! every step (nothing allocates inside a step).
//!
//! The set is generic over what stands for a buffer: device buffers for a real pass
//! ([`Activations`]), or element counts (`ActivationSet<usize>`) to plan memory without
//! allocating.
//!
//! The buffers of a set share one allocation where the device can ([`Device::alloc_shared`]),
//! laid out by the memory planner from the phases of the pass each buffer lives in
//! ([`phase`]): a buffer whose phases do not meet another's may share its memory (the logits
//! and the blocks' gradient scratch, for one).
//!
//! [`MemoryOptions`] trade compute for memory: the LM head and loss over vocabulary chunks
//! (`logits` [N,VC] instead of [N,V], each chunk made again in backward), and block recompute (one [`LayerSet`]
//! shared by every block instead of one per block; each block runs again from its input just
//! before its backward).

use super::ModelConfig;
use crate::device::{Device, DeviceBuf, Dtype, Part};
pub use crate::memory::Recompute;
use crate::memory::{ArenaKind, Planner};
use crate::Result;

/// The phases of a pass, in the numbering the memory planner gets: a buffer's lifetime is the
/// range of phases `[first, last]` it holds values in (written, or kept to be read later), and
/// two buffers may share memory when their ranges do not meet.
///
/// A pass runs FWD, HEAD_FWD, HEAD_BWD, then for each block from the last: RECOMPUTE (with
/// block recompute), MLP_BWD, ATTN_BWD (a forward-only pass stops after HEAD_FWD). The
/// phases are numbered out of that order so that the phases of every buffer make a range: a
/// block's activations with recompute live in FWD and the blocks' backward but not in between;
/// the MLP's gradient scratch only in MLP_BWD and the attention's only in ATTN_BWD (so they
/// share memory); losses and the residual gradients from the head to the end of the pass.
pub mod phase {
    /// The embedding, the injections and the blocks' forward.
    pub const FWD: usize = 0;
    /// A block's forward again before its backward (block recompute), and the injections'
    /// backward at its output.
    pub const RECOMPUTE: usize = 1;
    /// A block's MLP backward, down to d loss / d x_mid.
    pub const MLP_BWD: usize = 2;
    /// A block's attention backward, down to d loss / d x (and, after the first block, the
    /// embedding's backward).
    pub const ATTN_BWD: usize = 3;
    /// The LM head's backward and the final norm's, down to d loss / d res[L] in `dres` (the
    /// critic: its pooling's backward, outside the set).
    pub const HEAD_BWD: usize = 4;
    /// The final norm, the LM head and the cross-entropy (the critic: its pooling, outside
    /// the set, reading the residual stream).
    pub const HEAD_FWD: usize = 5;
    /// Every phase: what lives through the pass.
    pub const ALL: super::Life = (FWD, HEAD_FWD);
}

/// A buffer's lifetime: the phases `[first, last]` of a pass it lives in ([`phase`]).
pub type Life = (usize, usize);

/// One buffer of a set: its name (as in the step's plan: `res.3`, `layers.0.xn1`, `logits`),
/// element count, whether it is a statistic (f32 on every device) and the phases it lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decl {
    pub name: String,
    pub len: usize,
    pub stat: bool,
    pub life: Life,
}

/// The buffers of a set, in the order they are made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub decls: Vec<Decl>,
}

impl Layout {
    /// One allocation for all buffers on a device of working dtype `work`: its bytes and each
    /// buffer's place in it, from the memory planner (buffers whose lifetimes do not meet may
    /// share memory).
    pub fn plan(&self, work: Dtype) -> Result<(usize, Vec<Part>)> {
        let mut p = Planner::new();
        let mut ids = Vec::with_capacity(self.decls.len());
        for d in &self.decls {
            let dtype = if d.stat { Dtype::F32 } else { work };
            let (first, last) = d.life;
            ids.push((
                p.declare(&d.name, dtype, d.len, ArenaKind::Activations, first, last)?,
                dtype,
            ));
        }
        let plan = p.plan()?;
        let parts = ids
            .iter()
            .zip(&self.decls)
            .map(|(&(id, dtype), d)| Part {
                offset: plan.placement(id).offset,
                len: d.len,
                dtype,
            })
            .collect();
        Ok((plan.arena_size(ArenaKind::Activations), parts))
    }
}

/// How a pass trades compute for memory; the default keeps everything (no extra compute).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// LM head and cross-entropy over vocabulary chunks of this many entries; None = whole
    pub logits_chunk: Option<usize>,
    pub recompute: Recompute,
}

/// The activation set of a device.
pub type Activations<D> = ActivationSet<<D as Device>::Buf>;
/// What one block keeps, on a device.
pub type LayerActs<D> = LayerSet<<D as Device>::Buf>;

/// What block l keeps from forward for backward. N = B*T rows.
pub struct LayerSet<B> {
    /// [N] 1/rms of the block input (the input itself is `Activations::res[l]`)
    pub rstd1: B,
    /// [N,C] normed input of attention
    pub xn1: B,
    /// [N,NH*HS] queries after RoPE
    pub q: B,
    /// [N,NKV*HS] keys after RoPE
    pub k: B,
    /// [N,NKV*HS]
    pub v: B,
    /// [N,NH*HS] attention output (before o_proj)
    pub att: B,
    /// [B,NH,T] logsumexp of attention scores
    pub lse: B,
    /// [N,C] residual stream after attention
    pub x_mid: B,
    /// [N]
    pub rstd2: B,
    /// [N,C] normed input of the MLP
    pub xn2: B,
    /// [2F,N] the MLP's gate^T then up^T, feature-major (one matmul writes both)
    pub gu: B,
    /// [F,N] silu(gate) * up, feature-major
    pub h: B,
}

pub struct ActivationSet<B> {
    pub b: usize,
    pub t: usize,
    /// L+1 buffers [N,C]: res[0] = embeddings, res[l+1] = output of block l
    pub res: Vec<B>,
    /// what each block keeps for its backward: one set per block, or with
    /// [`Recompute::Block`] one set every block writes (made again before each backward)
    pub layers: Vec<LayerSet<B>>,
    pub recompute: Recompute,
    /// [N] 1/rms before the final norm
    pub rstd_f: B,
    /// [N,C] final normed hidden state
    pub xn_f: B,
    /// [N,VC] = logit_scale * xn_f @ lm_head[v0..v0+VC]^T: the whole logits when VC = V,
    /// else the vocabulary chunk made last (see `logits_chunk`), until the LM head's backward
    /// writes each chunk's gradient over them; after backward their memory holds the blocks'
    /// backward's buffers (it is shared with them): read the logits after forward only
    pub logits: B,
    /// VC: the LM head and the cross-entropy run over the vocabulary in chunks of this many
    /// entries (`cross_entropy_chunk_fwd` / `_bwd`; the backward makes each chunk's logits
    /// again, then overwrites them with their gradient); V = whole logits, one chunk, kept
    /// from forward for backward; 0 = no LM head (a set for the blocks only:
    /// [`ActivationSet::blocks`]).
    pub logits_chunk: usize,
    /// [N,3] the cross-entropy's per-row state over the vocabulary (chunks) so far: max, sum,
    /// target logit; what the backward's softmax needs
    pub ce_state: B,
    /// Multiplies the logits inside the LM-head matmul (and its backward): 1 / temperature for
    /// log-probs under a sampling temperature; 1 otherwise. Set by whoever runs the forward.
    pub logit_scale: f32,
    /// [N] masked per-position cross-entropy
    pub losses: B,
    // gradient scratch (the logits' gradient overwrites the logits, chunk by chunk: no buffer)
    /// [N,C] gradient w.r.t. the residual stream (d x_out, then d x_mid, then d x in a
    /// block's backward)
    pub dres: B,
    /// [N,C] gradient w.r.t. a normed input
    pub dxn: B,
    /// [F,N] the gradient of h (feature-major)
    pub dh: B,
    /// [2F,N] the gradients of gate and up, [dgate; dup] (feature-major, as `gu`)
    pub dgu: B,
    /// [N,(NH+2NKV)*HS] the fused q/k/v projection's output in a block's forward (scratch:
    /// `qkv_rope_fwd` splits it into the kept q, k, v)
    pub qkv: B,
    /// [N,(NH+2NKV)*HS] its gradient in a block's backward (`qkv_rope_bwd` joins dq, dk, dv)
    pub dqkv: B,
    /// [N,NH*HS]
    pub datt: B,
    pub dq: B,
    /// [N,NKV*HS]
    pub dk: B,
    pub dv: B,
    /// elements in all buffers
    pub elements: usize,
    /// elements of the statistics among them (f32 on every device)
    pub stat_elements: usize,
    /// every buffer with its lifetime, in the order made
    pub layout: Layout,
}

/// Whether `buf` holds `len` elements of `dtype`.
fn fits<D: Device>(buf: &D::Buf, len: usize, dtype: Dtype) -> bool {
    buf.len() == len && buf.dtype() == dtype
}

/// VC of a vocabulary of `v` entries in chunks of `chunk` (None, or a chunk >= V: V).
fn vocab_chunk(v: usize, chunk: Option<usize>) -> usize {
    chunk.map_or(v, |ch| ch.clamp(1, v.max(1)))
}

impl<B> ActivationSet<B> {
    /// Whether this set serves batch shape (B, T) with the LM head and `opts`.
    pub fn fits(&self, cfg: &ModelConfig, b: usize, t: usize, opts: MemoryOptions) -> bool {
        self.b == b
            && self.t == t
            && self.recompute == opts.recompute
            && self.logits_chunk == vocab_chunk(cfg.vocab_size, opts.logits_chunk)
    }

    /// The index in `layers` of the set block `l` writes in forward and reads in backward.
    pub fn layer_index(&self, l: usize) -> usize {
        match self.recompute {
            Recompute::None => l,
            Recompute::Block => 0,
        }
    }

    /// Builds the set for batch shape (B, T) with logits [N,VC] (VC 0: no LM head), making
    /// each buffer with `make(decl)`: `stat` buffers (1/rms, logsumexp, the cross-entropy
    /// state and losses) are f32 on every device, the others are in the device's working
    /// dtype. Every buffer is declared with the phases it lives in ([`phase`]).
    fn build<E>(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        (vc, recompute): (usize, Recompute),
        mut make: impl FnMut(&Decl) -> Result<B, E>,
    ) -> Result<Self, E> {
        use phase::{ALL, ATTN_BWD, FWD, HEAD_BWD, HEAD_FWD, MLP_BWD, RECOMPUTE};
        let n = b * t;
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd, nh) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads);
        let mut layout = Layout::default();
        let mut a = |name: String, len: usize, stat: bool, life: Life| {
            let d = Decl {
                name,
                len,
                stat,
                life,
            };
            let buf = make(&d);
            layout.decls.push(d);
            buf
        };
        // the residual stream: the blocks' inputs, read by their backward (and by callers
        // after the pass: the critic's pooling, extraction)
        let mut res = Vec::with_capacity(cfg.num_hidden_layers + 1);
        for l in 0..=cfg.num_hidden_layers {
            res.push(a(format!("res.{l}"), n * c, false, ALL)?);
        }
        // a block's activations: from its forward to its backward; with recompute the one
        // set is written by each block's forward and made again before each backward, so
        // nothing in it is read outside FWD and the blocks' backward
        let (kept, life) = match recompute {
            Recompute::None => (cfg.num_hidden_layers, ALL),
            Recompute::Block => (cfg.num_hidden_layers.min(1), (FWD, ATTN_BWD)),
        };
        let mut layers = Vec::with_capacity(kept);
        for l in 0..kept {
            let mut la = |name: &str, len: usize, stat: bool| {
                a(format!("layers.{l}.{name}"), len, stat, life)
            };
            layers.push(LayerSet {
                rstd1: la("rstd1", n, true)?,
                xn1: la("xn1", n * c, false)?,
                q: la("q", n * qd, false)?,
                k: la("k", n * kvd, false)?,
                v: la("v", n * kvd, false)?,
                att: la("att", n * qd, false)?,
                lse: la("lse", b * nh * t, true)?,
                x_mid: la("x_mid", n * c, false)?,
                rstd2: la("rstd2", n, true)?,
                xn2: la("xn2", n * c, false)?,
                gu: la("gu", 2 * n * f, false)?,
                h: la("h", n * f, false)?,
            });
        }
        let head = (HEAD_BWD, HEAD_FWD);
        // from the head's forward to the end of the pass (read after it)
        let losses = (RECOMPUTE, HEAD_FWD);
        // the residual stream's gradient: from the head's backward through every block's, each
        // norm's backward adding its share in place
        let dres = (RECOMPUTE, HEAD_BWD);
        // the normed inputs' gradient: written and read in the head's backward and in each
        // half of a block's
        let dxn = (MLP_BWD, HEAD_BWD);
        let mlp = (MLP_BWD, MLP_BWD);
        let attn = (ATTN_BWD, ATTN_BWD);
        let mut set = ActivationSet {
            b,
            t,
            res,
            layers,
            recompute,
            rstd_f: a("rstd_f".into(), n, true, head)?,
            xn_f: a("xn_f".into(), n * c, false, head)?,
            logits: a("logits".into(), n * vc, false, head)?,
            logits_chunk: vc,
            ce_state: a(
                "ce_state".into(),
                if vc > 0 { 3 * n } else { 0 },
                true,
                head,
            )?,
            logit_scale: 1.0,
            losses: a("losses".into(), n, true, losses)?,
            dres: a("dres".into(), n * c, false, dres)?,
            dxn: a("dxn".into(), n * c, false, dxn)?,
            dh: a("dh".into(), n * f, false, mlp)?,
            dgu: a("dgu".into(), 2 * n * f, false, mlp)?,
            qkv: a("qkv".into(), n * (qd + 2 * kvd), false, (FWD, RECOMPUTE))?,
            dqkv: a("dqkv".into(), n * (qd + 2 * kvd), false, attn)?,
            datt: a("datt".into(), n * qd, false, attn)?,
            dq: a("dq".into(), n * qd, false, attn)?,
            dk: a("dk".into(), n * kvd, false, attn)?,
            dv: a("dv".into(), n * kvd, false, attn)?,
            elements: 0,
            stat_elements: 0,
            layout: Layout::default(),
        };
        set.elements = layout.decls.iter().map(|d| d.len).sum();
        set.stat_elements = layout.decls.iter().filter(|d| d.stat).map(|d| d.len).sum();
        set.layout = layout;
        Ok(set)
    }

    /// The set made on `dev` in one shared allocation, each buffer's lifetime as
    /// `life(name, lifetime)` gives it.
    fn on_device<D: Device<Buf = B>>(
        dev: &D,
        cfg: &ModelConfig,
        (b, t): (usize, usize),
        shape: (usize, Recompute),
        life: &dyn Fn(&str, Life) -> Life,
    ) -> Result<Self> {
        let none = |_: &Decl| Ok::<(), std::convert::Infallible>(());
        let mut layout = match ActivationSet::build(cfg, b, t, shape, none) {
            Ok(set) => set.layout,
            Err(never) => match never {},
        };
        for d in &mut layout.decls {
            d.life = life(&d.name, d.life);
        }
        let (bytes, parts) = layout.plan(dev.work_dtype())?;
        let mut bufs = dev.alloc_shared(bytes, &parts)?.into_iter();
        let mut set = Self::build(cfg, b, t, shape, |d| {
            // both builds declare the same buffers in the same order
            let want = if d.stat { Dtype::F32 } else { dev.work_dtype() };
            match bufs.next() {
                Some(buf) if fits::<D>(&buf, d.len, want) => Ok(buf),
                _ => Err(crate::Error::invalid(
                    "activations",
                    format!("buffer `{}` is not the one laid out", d.name),
                )),
            }
        })?;
        set.layout = layout;
        Ok(set)
    }

    /// Zeroed device buffers for batch shape (B, T), whole logits, every activation kept.
    pub fn new<D: Device<Buf = B>>(dev: &D, cfg: &ModelConfig, b: usize, t: usize) -> Result<Self> {
        Self::with_options(dev, cfg, b, t, MemoryOptions::default())
    }

    /// [`Self::new`] with `opts`' memory-saving options.
    pub fn with_options<D: Device<Buf = B>>(
        dev: &D,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        opts: MemoryOptions,
    ) -> Result<Self> {
        Self::with_lifetimes(dev, cfg, b, t, opts, &|_, life| life)
    }

    /// [`Self::with_options`] with each buffer's lifetime (in [`phase`]s) replaced by
    /// `life(name, lifetime)`: to check that the lifetimes are the pass's (a set whose buffers
    /// share memory they still use computes other values), and to make a set without sharing
    /// (every buffer [`phase::ALL`]).
    pub fn with_lifetimes<D: Device<Buf = B>>(
        dev: &D,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        opts: MemoryOptions,
        life: &dyn Fn(&str, Life) -> Life,
    ) -> Result<Self> {
        let vc = vocab_chunk(cfg.vocab_size, opts.logits_chunk);
        Self::on_device(dev, cfg, (b, t), (vc, opts.recompute), life)
    }

    /// A set for the blocks only ([`super::forward_blocks`], [`super::backward_blocks`]): no
    /// logits, for a model whose output is its residual stream (the critic, extraction).
    pub fn blocks<D: Device<Buf = B>>(
        dev: &D,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        recompute: Recompute,
    ) -> Result<Self> {
        Self::on_device(dev, cfg, (b, t), (0, recompute), &|_, life| life)
    }

    /// Bytes of the set's one allocation on a device of working dtype `work` (the statistics
    /// are f32), its buffers sharing memory as their lifetimes allow.
    pub fn bytes(&self, work: Dtype) -> Result<usize> {
        Ok(self.layout.plan(work)?.0)
    }

    /// Bytes of all its buffers, each in memory of its own (what a device that cannot share
    /// memory allocates: the CPU).
    pub fn bytes_unshared(&self, work: Dtype) -> usize {
        self.stat_elements * 4 + (self.elements - self.stat_elements) * work.size()
    }
}

impl ActivationSet<usize> {
    /// The element count of every buffer for batch shape (B, T), allocating nothing.
    pub fn plan(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        Self::plan_with(cfg, b, t, MemoryOptions::default())
    }

    /// The element counts of [`Self::blocks`].
    pub fn plan_blocks(cfg: &ModelConfig, b: usize, t: usize, recompute: Recompute) -> Self {
        let counts = |d: &Decl| Ok::<usize, std::convert::Infallible>(d.len);
        match Self::build(cfg, b, t, (0, recompute), counts) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }

    /// [`Self::plan`] with `opts`' memory-saving options.
    pub fn plan_with(cfg: &ModelConfig, b: usize, t: usize, opts: MemoryOptions) -> Self {
        let vc = vocab_chunk(cfg.vocab_size, opts.logits_chunk);
        let counts = |d: &Decl| Ok::<usize, std::convert::Infallible>(d.len);
        match Self::build(cfg, b, t, (vc, opts.recompute), counts) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }
}
