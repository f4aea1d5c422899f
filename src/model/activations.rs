//! The buffers one forward + backward pass of a batch shape (B, T) needs: the activations kept
//! for backward, per layer, and the gradient scratch. Allocated once per shape, reused by
//! every step (nothing allocates inside a step).
//!
//! The set is generic over what stands for a buffer: device buffers for a real pass
//! ([`Activations`]), or element counts (`ActivationSet<usize>`) to plan memory without
//! allocating.

use super::ModelConfig;
use crate::device::Device;
use crate::Result;

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
    pub layers: Vec<LayerSet<B>>,
    /// [N] 1/rms before the final norm
    pub rstd_f: B,
    /// [N,C] final normed hidden state
    pub xn_f: B,
    /// [N,VC] = logit_scale * xn_f @ lm_head[v0..v0+VC]^T: the whole logits when VC = V,
    /// else the vocabulary chunk made last (see `logits_chunk`)
    pub logits: B,
    /// VC: the LM head and the cross-entropy run over the vocabulary in chunks of this many
    /// entries (`cross_entropy_chunk_fwd` / `_bwd`; the backward makes each chunk's logits
    /// again); V = whole logits, kept from forward for backward.
    pub logits_chunk: usize,
    /// [N,3] the chunked cross-entropy's per-row state (max, sum, target logit)
    pub ce_state: B,
    /// Multiplies the logits inside the LM-head matmul (and its backward): 1 / temperature for
    /// log-probs under a sampling temperature; 1 otherwise. Set by whoever runs the forward.
    pub logit_scale: f32,
    /// [N] masked per-position cross-entropy
    pub losses: B,
    /// [N,C] scratch: projection outputs in forward
    pub proj: B,
    // gradient scratch
    /// [N,VC]
    pub dlogits: B,
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
    /// f32 elements in all buffers
    pub elements: usize,
}

/// VC of a vocabulary of `v` entries in chunks of `chunk` (None, or a chunk >= V: V).
fn vocab_chunk(v: usize, chunk: Option<usize>) -> usize {
    chunk.map_or(v, |ch| ch.clamp(1, v.max(1)))
}

impl<B> ActivationSet<B> {
    /// Whether this set serves batch shape (B, T) with logits in chunks of `chunk`.
    pub fn fits(&self, cfg: &ModelConfig, b: usize, t: usize, chunk: Option<usize>) -> bool {
        self.b == b && self.t == t && self.logits_chunk == vocab_chunk(cfg.vocab_size, chunk)
    }

    /// Builds the set for batch shape (B, T) with logits in chunks of `chunk` vocabulary
    /// entries (None, or a chunk >= V: whole), making each buffer with `make(elements)`.
    fn build<E>(
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        chunk: Option<usize>,
        mut make: impl FnMut(usize) -> Result<B, E>,
    ) -> Result<Self, E> {
        let n = b * t;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let vc = vocab_chunk(v, chunk);
        let (qd, kvd, nh) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads);
        let mut elements = 0usize;
        let mut a = |len: usize| {
            elements += len;
            make(len)
        };
        let mut res = Vec::with_capacity(cfg.num_hidden_layers + 1);
        for _ in 0..=cfg.num_hidden_layers {
            res.push(a(n * c)?);
        }
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(LayerSet {
                rstd1: a(n)?,
                xn1: a(n * c)?,
                q: a(n * qd)?,
                k: a(n * kvd)?,
                v: a(n * kvd)?,
                att: a(n * qd)?,
                lse: a(b * nh * t)?,
                x_mid: a(n * c)?,
                rstd2: a(n)?,
                xn2: a(n * c)?,
                gate: a(n * f)?,
                up: a(n * f)?,
                h: a(n * f)?,
            });
        }
        let mut set = ActivationSet {
            b,
            t,
            res,
            layers,
            rstd_f: a(n)?,
            xn_f: a(n * c)?,
            logits: a(n * vc)?,
            logits_chunk: vc,
            ce_state: a(if vc < v { 3 * n } else { 0 })?,
            logit_scale: 1.0,
            losses: a(n)?,
            proj: a(n * c)?,
            dlogits: a(n * vc)?,
            dres: a(n * c)?,
            dres_next: a(n * c)?,
            dx_mid: a(n * c)?,
            dxn: a(n * c)?,
            dh: a(n * f)?,
            dgate: a(n * f)?,
            dup: a(n * f)?,
            datt: a(n * qd)?,
            dq: a(n * qd)?,
            dk: a(n * kvd)?,
            dv: a(n * kvd)?,
            elements: 0,
        };
        set.elements = elements;
        Ok(set)
    }

    /// Zeroed device buffers for batch shape (B, T), whole logits.
    pub fn new<D: Device<Buf = B>>(dev: &D, cfg: &ModelConfig, b: usize, t: usize) -> Result<Self> {
        Self::build(cfg, b, t, None, |len| dev.alloc(len))
    }

    /// [`Self::new`] with the logits in vocabulary chunks of `chunk` entries (None = whole).
    pub fn with_logits_chunk<D: Device<Buf = B>>(
        dev: &D,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
        chunk: Option<usize>,
    ) -> Result<Self> {
        Self::build(cfg, b, t, chunk, |len| dev.alloc(len))
    }

    /// Bytes of all activation and gradient-scratch buffers (f32).
    pub fn bytes(&self) -> usize {
        self.elements * 4
    }
}

impl ActivationSet<usize> {
    /// The element count of every buffer for batch shape (B, T), allocating nothing.
    pub fn plan(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        match Self::build(cfg, b, t, None, Ok::<usize, std::convert::Infallible>) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }
}
