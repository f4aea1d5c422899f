//! The buffers one forward + backward pass of a batch shape (B, T) needs: the activations kept
//! for backward, per layer, and the gradient scratch. Allocated once per shape, reused by
//! every step (nothing allocates inside a step).
//!
//! The set is generic over what stands for a buffer: device buffers for a real pass
//! ([`Activations`]), or element counts (`ActivationSet<usize>`) to plan memory without
//! allocating.
//!
//! [`MemoryOptions`] trade compute for memory: the LM head and loss over vocabulary chunks
//! (`logits` [N,VC] instead of [N,V], each chunk made again in backward), and block recompute (one [`LayerSet`]
//! shared by every block instead of one per block; each block runs again from its input just
//! before its backward).

use super::ModelConfig;
use crate::device::{Device, Dtype};
pub use crate::memory::Recompute;
use crate::Result;

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
    /// [N,F]
    pub gate: B,
    /// [N,F]
    pub up: B,
    /// [N,F] silu(gate) * up
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
    /// else the vocabulary chunk made last (see `logits_chunk`); after backward, their
    /// gradient (written in place)
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
    /// [N,C] scratch: projection outputs in forward
    pub proj: B,
    // gradient scratch (the logits' gradient overwrites the logits, chunk by chunk: no buffer)
    /// [N,C] gradient w.r.t. the residual stream, and its next value
    pub dres: B,
    pub dres_next: B,
    /// [N,C]
    pub dx_mid: B,
    /// [N,C] gradient w.r.t. a normed input
    pub dxn: B,
    /// [N,F]
    pub dh: B,
    pub dgate: B,
    pub dup: B,
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
}

/// A buffer of the set: f32 for a statistic, else the working dtype.
fn alloc<D: Device>(dev: &D, len: usize, stat: bool) -> Result<D::Buf> {
    if stat {
        dev.alloc(len)
    } else {
        dev.alloc_work(len)
    }
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
    /// each buffer with `make(elements, stat)`: `stat` buffers (1/rms, logsumexp, the
    /// cross-entropy state and losses) are f32 on every device, the others are in the device's
    /// working dtype.
    fn build<E>(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        (vc, recompute): (usize, Recompute),
        mut make: impl FnMut(usize, bool) -> Result<B, E>,
    ) -> Result<Self, E> {
        let n = b * t;
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd, nh) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads);
        let (mut elements, mut stat_elements) = (0usize, 0usize);
        let mut a = |len: usize, stat: bool| {
            elements += len;
            stat_elements += if stat { len } else { 0 };
            make(len, stat)
        };
        let mut res = Vec::with_capacity(cfg.num_hidden_layers + 1);
        for _ in 0..=cfg.num_hidden_layers {
            res.push(a(n * c, false)?);
        }
        let kept = match recompute {
            Recompute::None => cfg.num_hidden_layers,
            Recompute::Block => cfg.num_hidden_layers.min(1),
        };
        let mut layers = Vec::with_capacity(kept);
        for _ in 0..kept {
            layers.push(LayerSet {
                rstd1: a(n, true)?,
                xn1: a(n * c, false)?,
                q: a(n * qd, false)?,
                k: a(n * kvd, false)?,
                v: a(n * kvd, false)?,
                att: a(n * qd, false)?,
                lse: a(b * nh * t, true)?,
                x_mid: a(n * c, false)?,
                rstd2: a(n, true)?,
                xn2: a(n * c, false)?,
                gate: a(n * f, false)?,
                up: a(n * f, false)?,
                h: a(n * f, false)?,
            });
        }
        let mut set = ActivationSet {
            b,
            t,
            res,
            layers,
            recompute,
            rstd_f: a(n, true)?,
            xn_f: a(n * c, false)?,
            logits: a(n * vc, false)?,
            logits_chunk: vc,
            ce_state: a(if vc > 0 { 3 * n } else { 0 }, true)?,
            logit_scale: 1.0,
            losses: a(n, true)?,
            proj: a(n * c, false)?,
            dres: a(n * c, false)?,
            dres_next: a(n * c, false)?,
            dx_mid: a(n * c, false)?,
            dxn: a(n * c, false)?,
            dh: a(n * f, false)?,
            dgate: a(n * f, false)?,
            dup: a(n * f, false)?,
            datt: a(n * qd, false)?,
            dq: a(n * qd, false)?,
            dk: a(n * kvd, false)?,
            dv: a(n * kvd, false)?,
            elements: 0,
            stat_elements: 0,
        };
        set.elements = elements;
        set.stat_elements = stat_elements;
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
        let vc = vocab_chunk(cfg.vocab_size, opts.logits_chunk);
        Self::build(cfg, b, t, (vc, opts.recompute), |len, stat| {
            alloc(dev, len, stat)
        })
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
        Self::build(cfg, b, t, (0, recompute), |len, stat| alloc(dev, len, stat))
    }

    /// Bytes of all activation and gradient-scratch buffers on a device of working dtype
    /// `work` (the statistics are f32).
    pub fn bytes(&self, work: Dtype) -> usize {
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
        let counts = |len, _stat| Ok::<usize, std::convert::Infallible>(len);
        match Self::build(cfg, b, t, (0, recompute), counts) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }

    /// [`Self::plan`] with `opts`' memory-saving options.
    pub fn plan_with(cfg: &ModelConfig, b: usize, t: usize, opts: MemoryOptions) -> Self {
        let vc = vocab_chunk(cfg.vocab_size, opts.logits_chunk);
        let counts = |len, _stat| Ok::<usize, std::convert::Infallible>(len);
        match Self::build(cfg, b, t, (vc, opts.recompute), counts) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }
}
