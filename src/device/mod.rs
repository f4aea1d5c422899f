//! The `Device` trait: one method per op, forward and backward.
//!
//! Every op exists as a CPU twin (`device/cpu/<op>.rs`, the reference) and as a CUDA kernel
//! (`kernels/<op>.cu`) with the same name and semantics. Buffers are device memory of
//! f32 or, on the kernel devices, bf16 elements ([`Dtype`]); ops take windows into them
//! ([`View`], [`ViewMut`]) plus explicit dims, so a parameter is a window of the flat parameter
//! buffer and an activation is a whole buffer. The host side of every transfer is f32.
//!
//! Precision: each device has a working dtype ([`Device::work_dtype`]): f32 on the CPU; bf16 or
//! f32 on the kernel devices. Weights' working copy, activations, their gradients, logits and
//! the KV cache are stored in it; master weights, parameter gradients, AdamW state and per-row
//! statistics (1/rms, logsumexp, losses, masks) are always f32. Each op's documentation of its
//! kernel (`kernels/<op>.cu`, "Dtypes") says which of its arguments are which; a buffer of the
//! wrong dtype is an error naming it.
//!
//! Shape letters: B batch, T time, C channels (d_model), NH/NKV heads, HS head size, F ffn,
//! V vocab, N rows (= B*T). Outputs documented `=` are overwritten; `+=` are accumulated.
//! Parameter gradients accumulate; activation gradients overwrite.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod emu_device;
pub mod gpu;
pub mod kernels;
pub mod select;
pub mod storage;

use crate::Result;
pub use storage::{Dtype, Storage};

/// Device memory holding elements of one [`Dtype`].
pub trait DeviceBuf: Send + Sync {
    fn len(&self) -> usize;
    /// The element type (f32 unless the device stores others).
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A read-only window `[off, off+len)` of a device buffer.
pub struct View<'a, B> {
    buf: &'a B,
    off: usize,
    len: usize,
}

impl<B> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for View<'_, B> {}

impl<'a, B: DeviceBuf> View<'a, B> {
    /// The whole buffer.
    pub fn all(buf: &'a B) -> Self {
        View {
            buf,
            off: 0,
            len: buf.len(),
        }
    }

    /// `[off, off+len)`; the range is an internal invariant (tables we built), checked here.
    pub fn range(buf: &'a B, off: usize, len: usize) -> Self {
        assert!(
            off + len <= buf.len(),
            "view {off}+{len} outside buffer of {}",
            buf.len()
        );
        View { buf, off, len }
    }

    /// The element type of the buffer.
    pub fn dtype(&self) -> Dtype {
        self.buf.dtype()
    }
}

impl<'a, B> View<'a, B> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn offset(&self) -> usize {
        self.off
    }
    pub fn buf(&self) -> &'a B {
        self.buf
    }
}

/// A writable window `[off, off+len)` of a device buffer.
pub struct ViewMut<'a, B> {
    buf: &'a mut B,
    off: usize,
    len: usize,
}

impl<'a, B: DeviceBuf> ViewMut<'a, B> {
    pub fn all(buf: &'a mut B) -> Self {
        let len = buf.len();
        ViewMut { buf, off: 0, len }
    }

    pub fn range(buf: &'a mut B, off: usize, len: usize) -> Self {
        assert!(
            off + len <= buf.len(),
            "view {off}+{len} outside buffer of {}",
            buf.len()
        );
        ViewMut { buf, off, len }
    }

    /// The element type of the buffer.
    pub fn dtype(&self) -> Dtype {
        self.buf.dtype()
    }
}

impl<'a, B> ViewMut<'a, B> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn offset(&self) -> usize {
        self.off
    }
    /// A shorter-lived copy of this window, to pass on while keeping `self`.
    pub fn reborrow(&mut self) -> ViewMut<'_, B> {
        ViewMut {
            buf: &mut *self.buf,
            off: self.off,
            len: self.len,
        }
    }
    pub fn as_view(&self) -> View<'_, B> {
        View {
            buf: &*self.buf,
            off: self.off,
            len: self.len,
        }
    }
    pub fn into_parts(self) -> (&'a mut B, usize, usize) {
        (self.buf, self.off, self.len)
    }
}

/// Dims of causal grouped-query attention: q [B,T,NH,HS], k and v [B,T,NKV,HS].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

/// Dims of attention over a KV cache: q [B,TQ,NH,HS], caches [B,TMAX,NKV,HS].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheDims {
    pub b: usize,
    pub tq: usize,
    pub tmax: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
    /// absolute position of query row 0; pos0 + TQ <= TMAX
    pub pos0: usize,
}

impl From<AttnDims> for CacheDims {
    /// The batch as its own cache: TQ = TMAX = T, pos0 = 0.
    fn from(d: AttnDims) -> Self {
        let AttnDims { b, t, nh, nkv, hs } = d;
        CacheDims {
            b,
            tq: t,
            tmax: t,
            nh,
            nkv,
            hs,
            pos0: 0,
        }
    }
}

/// How to draw the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSpec {
    /// 0 = greedy (argmax, lowest id on ties)
    pub temperature: f32,
    /// keep the k most probable tokens; 0 = off
    pub top_k: usize,
    /// keep the smallest set of most probable tokens whose probability reaches top_p; 1 = off
    pub top_p: f32,
}

/// One AdamW update's hyper-parameters (decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplies every gradient before use (gradient clipping folds in here).
    pub grad_scale: f32,
}

// ---- NLA ops: parameters (see reference/NLA_SEMANTICS.md; [V] verl add-on, [O] official code)

/// How [`Device::inject_fwd`] writes a vector into its row. `project` mode is not an op of
/// its own: a matmul `vecs[S,A] @ W^T` (W [C,A], no bias) followed by `Replace`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectMode {
    /// `h[site] = v` ([O], [V] default)
    Replace,
    /// `h[site] += v` ([V])
    Add,
}

/// How [`Device::pool_fwd`] makes one vector of a sequence. `cls` pooling is `Last` over a
/// sequence with a cls token appended (mask 1) by the data layer: no separate mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// the last real token, index `sum(mask) - 1` ([O], [V])
    Last,
    /// `sum m h / sum m` ([V])
    Mean,
    /// per channel, the largest value over real tokens ([V])
    Max,
    /// `alpha = softmax(w[:T]) * m / (sum + 1e-8)`, out = `sum alpha_t h_t`, learned w ([V] legacy)
    Weighted,
}

/// MSE -> reward, before `scale` ([V] legacy `reward_transform`; `Log` is [O]'s log-MSE reward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RewardTransform {
    /// `-mse`
    Negative,
    /// `exp(-mse * temperature)`
    Exp { temperature: f32 },
    /// `1 / (1 + mse)`
    Bounded,
    /// `-ln(max(mse, 1e-8))`
    Log,
}

/// Advantage estimator of [`Device::reward_advantage`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Advantage {
    /// Groups of `group` consecutive samples (S = P * G): `A = (r - mean_g) / (std_g + eps)`
    /// with the unbiased std, or `A = r - mean_g` without `norm_by_std` (Dr.GRPO). A group of
    /// one has mean 0 and std 1 (verl's `compute_grpo_outcome_advantage`; [O] agrees for G > 1).
    Grpo { group: usize, norm_by_std: bool },
    /// [V]'s legacy PPO trainer: `A = r - mean(r)` over the batch, then with `whiten`
    /// `(A - mean A) / (std A + 1e-8)`, unbiased std.
    Ppo { whiten: bool },
}

/// The reward path of an RL step ([`Device::reward_advantage`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardSpec {
    /// `Some(s)`: pred and target both rescaled to norm s before the MSE ([O] `mse_scale`,
    /// default sqrt(d)); None: raw vectors ([V]).
    pub mse_scale: Option<f32>,
    /// Reward of a failed or truncated sample ([O]: -2.0; -ln 2 with the log transform).
    pub failure_value: f32,
    pub transform: RewardTransform,
    /// Multiplies the transformed reward ([V] `reward_scale`; not applied to failures).
    pub scale: f32,
    /// z-score the rewards over the batch, unbiased std + 1e-8 ([V] legacy `normalize_rewards`).
    pub batch_normalize: bool,
    /// Clamp the (normalised) rewards to `[lo, hi]` ([V] legacy `clip_rewards`).
    pub clip: Option<(f32, f32)>,
    pub advantage: Advantage,
    /// Added to the group std of GRPO (1e-6 in [V] and [O]).
    pub eps: f32,
}

impl RewardSpec {
    /// [O]'s reward: `-mse` after rescaling to `mse_scale`, -2.0 for failures, GRPO over groups
    /// of `group` with std normalisation, nothing else.
    pub fn grpo(group: usize, mse_scale: Option<f32>) -> Self {
        RewardSpec {
            mse_scale,
            failure_value: -2.0,
            transform: RewardTransform::Negative,
            scale: 1.0,
            batch_normalize: false,
            clip: None,
            advantage: Advantage::Grpo {
                group,
                norm_by_std: true,
            },
            eps: 1e-6,
        }
    }
}

/// The KL estimator of the KL loss to the reference policy (verl `kl_penalty` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlType {
    /// `logp - ref` (Miles' default, [O])
    K1,
    /// `(logp - ref)^2 / 2`
    K2,
    /// `exp(ref - logp) - (ref - logp) - 1`, `ref - logp` clamped to +-20 and the value to
    /// +-10 (verl `low_var_kl`)
    K3,
}

/// How token losses become one loss (verl `loss_agg_mode`), over S sequences of T tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossAgg {
    /// `sum(m l) / sum(m)` ([V] default)
    TokenMean,
    /// mean over sequences with a masked token of `sum_t m l / sum_t m` ([O]; sequences with
    /// no masked token are left out, as current verl does)
    SeqMeanTokenMean,
    /// `sum(m l) / (S * T)`: Dr.GRPO's mean over sequences of the token sum over a constant
    /// length T. verl divides by T only (a sum over sequences, so its scale grows with the
    /// micro-batch); divide `scale` by S downstream to reproduce that.
    SeqMeanTokenSumNorm,
}

/// The clipped policy-gradient loss ([`Device::policy_loss_fwd`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLossSpec {
    /// ratio clipped below at `1 - clip_low` (0.2 in [V] and [O])
    pub clip_low: f32,
    /// ratio clipped above at `1 + clip_high`
    pub clip_high: f32,
    /// dual clip c > 1 for negative advantages ([V]: 3.0; None = off)
    pub dual_clip: Option<f32>,
    /// weight of the KL loss (needs ref_logp when non-zero; [O]: 0.01)
    pub kl_coef: f32,
    pub kl_type: KlType,
    pub agg: LossAgg,
}

/// Slots of the stats buffer [`Device::policy_loss_fwd`] writes.
pub struct PolicyStat;

impl PolicyStat {
    /// the aggregated loss `pg + kl_coef * kl`
    pub const LOSS: usize = 0;
    /// the aggregated policy-gradient term
    pub const PG_LOSS: usize = 1;
    /// the aggregated KL term (before `kl_coef`; 0 without ref_logp)
    pub const KL_LOSS: usize = 2;
    /// fraction of masked tokens where the clipped term is strictly larger (verl `pg_clipfrac`)
    pub const CLIP_FRAC: usize = 3;
    /// fraction of masked tokens where the dual clip is taken (verl `pg_clipfrac_lower`)
    pub const CLIP_FRAC_LOWER: usize = 4;
    /// token mean of `old_logp - logp` (verl `ppo_kl`)
    pub const APPROX_KL: usize = 5;
    /// token mean of the ratio
    pub const RATIO_MEAN: usize = 6;
    /// length of the stats buffer
    pub const COUNT: usize = 7;
}

type V<'a, D> = View<'a, <D as Device>::Buf>;
type M<'a, D> = ViewMut<'a, <D as Device>::Buf>;

/// One buffer of a shared allocation ([`Device::alloc_shared`]): `len` elements of `dtype`
/// starting `offset` bytes into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub offset: usize,
    pub len: usize,
    pub dtype: Dtype,
}

impl Part {
    /// Bytes of its elements.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// Whether the two share a byte (an empty part shares none).
    pub fn overlaps(&self, other: &Part) -> bool {
        let at = |p: &Part| (p.offset as u64, p.bytes() as u64);
        bytes_meet(at(self), at(other))
    }
}

/// Whether two byte ranges `(start, bytes)` share a byte (an empty range shares none): the
/// overlap test of every check on buffers that share memory.
pub(crate) fn bytes_meet((x, xb): (u64, u64), (y, yb): (u64, u64)) -> bool {
    xb > 0 && yb > 0 && x < y.saturating_add(yb) && y < x.saturating_add(xb)
}

/// `parts` fit in an allocation of `bytes`, each at an offset aligned to its element size.
pub(crate) fn check_parts(bytes: usize, parts: &[Part]) -> Result<()> {
    for (i, p) in parts.iter().enumerate() {
        let end = p
            .len
            .checked_mul(p.dtype.size())
            .and_then(|b| b.checked_add(p.offset));
        if end.is_none_or(|e| e > bytes) || !p.offset.is_multiple_of(p.dtype.size()) {
            return Err(crate::Error::invalid(
                "alloc_shared",
                format!(
                    "part {i} ({} {} at byte {}) does not fit an aligned place in {bytes} bytes",
                    p.len, p.dtype, p.offset
                ),
            ));
        }
    }
    Ok(())
}

/// Steps [`Device::replay`] captured as graphs, replayed without capturing, and captures that
/// failed (those steps run as they are from then on), with why the first failure did; and the
/// size of the last graph captured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GraphStats {
    pub captures: u64,
    pub replays: u64,
    pub failures: u64,
    pub first_failure: Option<String>,
    /// kernel launches and matmuls of the last graph captured (0 before the first)
    pub graph_kernels: u64,
    pub graph_matmuls: u64,
}

/// A compute device. Methods check lengths and dims against each other and return
/// [`crate::Error::Invalid`] naming the op and argument on a mismatch.
pub trait Device: Send + Sync + Sized {
    /// Device memory of f32.
    type Buf: DeviceBuf;
    /// Device memory of u32 token ids.
    type Ids: Send + Sync;
    /// A step kept for replay ([`Device::replay`]); nothing where the device has no graphs.
    type Graph: Default;

    fn name(&self) -> String;

    /// Runs `step`, which may only launch kernels and matmuls (no allocation, copy or wait),
    /// through `graph` where the device can replay steps: the first time `step` runs as it is
    /// and is captured into a graph; later, when `step` would make the same launches with the
    /// same arguments (buffers, shapes, scalars), the graph is replayed instead (one launch on
    /// a GPU), else run and captured again. `step` runs more than once per call (recorded, run,
    /// captured; on a GPU three times when it is captured, on the emulator twice), so it must not
    /// change host state: a counter or a swap kept across calls would go wrong on a GPU only.
    /// A step that does anything else runs as it is. The CPU runs `step` once. While a step is
    /// recorded the device records every launch, so no other thread may use the device during
    /// `replay`.
    fn replay(&self, graph: &mut Self::Graph, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _ = graph;
        step()
    }

    /// What [`Device::replay`] did on this device so far; None where it has no graphs.
    fn graph_stats(&self) -> Option<GraphStats> {
        None
    }

    /// Waits until every op issued so far has finished (a GPU runs ops asynchronously; the
    /// CPU devices finish each op before returning). For timing.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes a run may plan to use on this device, when it has a fixed memory (a GPU's free
    /// memory); None where memory is the host's (the CPU devices).
    fn memory_budget(&self) -> Result<Option<usize>> {
        Ok(None)
    }

    /// The dtype of weights' working copy, activations, their gradients, logits and the KV
    /// cache on this device (see the module docs).
    fn work_dtype(&self) -> Dtype {
        Dtype::F32
    }

    /// A zeroed buffer of `n` f32 elements.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// A zeroed buffer of `n` elements of `dtype`; an error where the device does not store it.
    fn alloc_as(&self, n: usize, dtype: Dtype) -> Result<Self::Buf> {
        match dtype {
            Dtype::F32 => self.alloc(n),
            _ => Err(crate::Error::invalid(
                "alloc",
                format!("{} stores f32 buffers only, not {dtype}", self.name()),
            )),
        }
    }
    /// A zeroed buffer of `n` elements of the working dtype.
    fn alloc_work(&self, n: usize) -> Result<Self::Buf> {
        self.alloc_as(n, self.work_dtype())
    }
    /// Buffers laid out in one allocation of `bytes`, part i at `parts[i]`, where the device
    /// can share memory between buffers (the kernel devices); else each part on its own (the
    /// CPU, whose buffers are host vectors, and whose memory is the host's).
    ///
    /// Their contents are unspecified until written: the caller writes before it reads (the
    /// CPU's are zeroed; the emulated device's are NaN, so that a read before a write shows;
    /// the GPU's are what the allocator left, with no memset).
    ///
    /// Parts may overlap: a memory plan lets buffers whose lifetimes do not intersect share
    /// memory. Writing a part then changes every part it overlaps, so a caller keeps values in
    /// a part only while no part overlapping it is written. An op whose output overlaps one of
    /// its other buffers is refused (an error) by the devices that share memory.
    fn alloc_shared(&self, bytes: usize, parts: &[Part]) -> Result<Vec<Self::Buf>> {
        check_parts(bytes, parts)?;
        parts
            .iter()
            .map(|p| self.alloc_as(p.len, p.dtype))
            .collect()
    }
    /// A new f32 buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// A new buffer of `dtype` holding `host` rounded to it.
    fn upload_as(&self, host: &[f32], dtype: Dtype) -> Result<Self::Buf> {
        let mut b = self.alloc_as(host.len(), dtype)?;
        self.write(ViewMut::all(&mut b), host)?;
        Ok(b)
    }
    /// `dst = host` (rounded to dst's dtype) into memory already allocated (a step's inputs
    /// without an allocation).
    fn write(&self, dst: M<'_, Self>, host: &[f32]) -> Result<()>;
    /// The elements as f32.
    fn download(&self, x: V<'_, Self>) -> Result<Vec<f32>>;
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids>;
    /// `ids = host` into ids already allocated (of the same length).
    fn write_ids(&self, ids: &mut Self::Ids, host: &[u32]) -> Result<()>;
    /// `x = value` (rounded to x's dtype)
    fn fill(&self, x: M<'_, Self>, value: f32) -> Result<()>;
    /// `dst = src`, converting (round to nearest even) where their dtypes differ
    fn copy(&self, dst: M<'_, Self>, src: V<'_, Self>) -> Result<()>;

    /// out[N,C] = wte[ids[n], :]   (ids [N] < V)
    fn embedding_fwd(
        &self,
        out: M<'_, Self>,
        ids: &Self::Ids,
        wte: V<'_, Self>,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// dwte[ids[n], :] += dout[n, :]
    fn embedding_bwd(
        &self,
        dwte: M<'_, Self>,
        ids: &Self::Ids,
        dout: V<'_, Self>,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// rstd[N] = 1/sqrt(mean_c(x^2) + eps); out[N,C] = x * rstd * w[C]
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(
        &self,
        out: M<'_, Self>,
        rstd: M<'_, Self>,
        x: V<'_, Self>,
        w: V<'_, Self>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// dx[N,C] = (rstd * (w*dout) - x * rstd^3 * mean_c(w*dout*x)) (`=`, or `+=` when
    /// `accumulate`: the residual stream's gradient, which also reaches it past the norm);
    /// dw[C] += sum_n dout * x * rstd
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dx: M<'_, Self>,
        dw: M<'_, Self>,
        dout: V<'_, Self>,
        x: V<'_, Self>,
        w: V<'_, Self>,
        rstd: V<'_, Self>,
        n: usize,
        c: usize,
        accumulate: bool,
    ) -> Result<()>;

    /// In place on x[B,T,H,HS]: HF "rotate half" RoPE. For i < HS/2, position p = pos0 + t,
    /// angle = p * theta^(-2i/HS): (x_i, x_{i+HS/2}) <- (x_i cos - x_{i+HS/2} sin, x_{i+HS/2} cos + x_i sin)
    /// `pos`: where given, one id holding pos0 in device memory, read there instead of `pos0`
    /// ([`Device::write_ids`] sets it between steps, so a kernel device's launch is the same
    /// at every position, as a replayed graph needs).
    #[allow(clippy::too_many_arguments)]
    fn rope_fwd(
        &self,
        x: M<'_, Self>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        pos: Option<&Self::Ids>,
        theta: f32,
    ) -> Result<()>;
    /// In place on dx[B,T,H,HS]: the transpose rotation (angle -> -angle).
    #[allow(clippy::too_many_arguments)]
    fn rope_bwd(
        &self,
        dx: M<'_, Self>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()>;

    /// q [B,TQ,NH*HS] and, at positions pos0 + t of k and v [B,TMAX,NKV*HS], the parts of
    /// each row (b, t) of qkv [B,TQ,(NH+2NKV)*HS] (one matmul projects all three: q's heads,
    /// then k's, then v's), q and k rotated as [`Device::rope_fwd`] at position pos0 + t (all
    /// `=`; k's and v's other positions keep their values). k and v are a KV cache, or with
    /// TMAX = TQ and pos0 = 0 (`CacheDims::from(AttnDims)`) the batch's own keys and values.
    /// `pos` as rope_fwd's; pos0 + TQ <= TMAX.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_fwd(
        &self,
        q: M<'_, Self>,
        k: M<'_, Self>,
        v: M<'_, Self>,
        qkv: V<'_, Self>,
        pos: Option<&Self::Ids>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()>;
    /// dqkv [B,TQ,(NH+2NKV)*HS] = each row's dq and, from positions pos0 + t of dk and dv
    /// [B,TMAX,NKV*HS], dk and dv; dq and dk rotated back as [`Device::rope_bwd`] (`=`): the
    /// gradient of the one matmul's output, the adjoint of [`Device::qkv_rope_fwd`].
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_bwd(
        &self,
        dqkv: M<'_, Self>,
        dq: V<'_, Self>,
        dk: V<'_, Self>,
        dv: V<'_, Self>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()>;

    /// Causal attention, head h reading KV head h / (NH/NKV), scale 1/sqrt(HS):
    /// out[B,T,NH,HS] = softmax(q k^T * scale, causal) v ; lse[B,NH,T] = logsumexp of the scaled scores.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        out: M<'_, Self>,
        lse: M<'_, Self>,
        q: V<'_, Self>,
        k: V<'_, Self>,
        v: V<'_, Self>,
        d: AttnDims,
    ) -> Result<()>;
    /// dq[B,T,NH,HS] =, dk[B,T,NKV,HS] =, dv[B,T,NKV,HS] =, from dout and the forward's out and lse.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: M<'_, Self>,
        dk: M<'_, Self>,
        dv: M<'_, Self>,
        dout: V<'_, Self>,
        q: V<'_, Self>,
        k: V<'_, Self>,
        v: V<'_, Self>,
        out: V<'_, Self>,
        lse: V<'_, Self>,
        d: AttnDims,
    ) -> Result<()>;

    /// out[N*F] = silu(gate) * up, gu[2*N*F] = [gate; up] (one matmul writes both)
    fn swiglu_fwd(&self, out: M<'_, Self>, gu: V<'_, Self>) -> Result<()>;
    /// dgu[2*N*F] = [dgate; dup]: dgate = dout * up * silu'(gate), dup = dout * silu(gate) (=),
    /// gu = [gate; up]; one buffer, so the gradient flows back through one matmul
    fn swiglu_bwd(&self, dgu: M<'_, Self>, dout: V<'_, Self>, gu: V<'_, Self>) -> Result<()>;

    /// c[M,N] = alpha * op(a) op(b) + beta * c, row-major; op(a) [M,K] is a or a^T (a stored [K,M]
    /// when ta), op(b) [K,N] is b or b^T (b stored [N,K] when tb). beta = 0 ignores c's contents.
    /// a and b share a dtype; c has theirs or is f32 (a parameter gradient of bf16 operands);
    /// the products accumulate in f32, and c is rounded once to its dtype.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        c: M<'_, Self>,
        a: V<'_, Self>,
        b: V<'_, Self>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;

    /// d[M,N] = op(a) op(b) + x: [`Device::matmul`] whose epilogue adds x [M,N] (cuBLASLt's C,
    /// read, apart from its D, written), e.g. a projection added to the residual stream without
    /// the projection ever being written. Shapes and dtypes as `matmul`'s with c = d; x has d's
    /// dtype. The products accumulate in f32 and d is rounded once to its dtype (the CPU twin
    /// adds its GEMM's K-panels into d = x one after another: the same sum to f32 rounding,
    /// not bit for bit matmul then `residual_fwd`). d must not share memory with x, a or b.
    #[allow(clippy::too_many_arguments)]
    fn matmul_add(
        &self,
        d: M<'_, Self>,
        x: V<'_, Self>,
        a: V<'_, Self>,
        b: V<'_, Self>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> Result<()>;

    /// out = a + b (elementwise)
    fn residual_fwd(&self, out: M<'_, Self>, a: V<'_, Self>, b: V<'_, Self>) -> Result<()>;
    /// da += dout (the gradient reaching each input of an add)
    fn residual_bwd(&self, da: M<'_, Self>, dout: V<'_, Self>) -> Result<()>;

    /// One vocabulary chunk of the cross-entropy (one chunk of all V for whole logits), chunks
    /// issued in order of `v0` (0, VC, ...): logits [N,VC] are columns `[v0, v0+VC)` of V-wide
    /// rows (targets < V). state[N,3] = (max, sum of exp(x - max), target logit) of the
    /// columns seen so far: `v0 == 0` starts it (=), later chunks merge into it (+=); the
    /// chunk ending at V writes losses[N] = mask[n] * (logsumexp(logits[n,:]) -
    /// logits[n, targets[n]]) (=). Rows with mask 0 are skipped (loss 0).
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_chunk_fwd(
        &self,
        losses: M<'_, Self>,
        state: M<'_, Self>,
        logits: V<'_, Self>,
        targets: &Self::Ids,
        mask: V<'_, Self>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
    ) -> Result<()>;
    /// In place on the chunk's logits [N,VC] (kept or made again): logits <- mask[n] * scale *
    /// (softmax - onehot(targets[n])) over columns `[v0, v0+VC)`, the softmax from the state
    /// all chunks' forward left. A row the forward skipped (mask 0) must have weight
    /// `mask[n] * scale` 0 here (its state is not made).
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_chunk_bwd(
        &self,
        logits: M<'_, Self>,
        state: V<'_, Self>,
        targets: &Self::Ids,
        mask: V<'_, Self>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
        scale: f32,
    ) -> Result<()>;

    /// out[N,V] = softmax(x[n,:])
    fn softmax_fwd(&self, out: M<'_, Self>, x: V<'_, Self>, n: usize, v: usize) -> Result<()>;
    /// dx[N,V] = out * (dout - sum_v(dout * out))
    fn softmax_bwd(
        &self,
        dx: M<'_, Self>,
        dout: V<'_, Self>,
        out: V<'_, Self>,
        n: usize,
        v: usize,
    ) -> Result<()>;

    // ---- NLA ops (reference/NLA_SEMANTICS.md): injection, rescale, pooling, reward, loss

    /// Injection at marker sites, in place on h[N,C] (N = B*T): for k < S,
    /// `replace`: h[sites[k], :] = vecs[k, :]; `add`: h[sites[k], :] += vecs[k, :]; other rows
    /// untouched. sites [S]: distinct row indices < N in row-major order (the k-th marker of the
    /// batch gets vector k, [O]); vecs [S,C]. h is the embedding output (layer 0) or the
    /// residual stream after block i-1 (layer i). `injection_scale`: norm_scale_fwd on vecs
    /// first. `project`: vecs = matmul(v[S,A], W[C,A]^T) first, then `replace`.
    fn inject_fwd(
        &self,
        h: M<'_, Self>,
        sites: &Self::Ids,
        vecs: V<'_, Self>,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()>;
    /// dvecs[S,C] = dh[sites[k], :] (`=`); `replace` also sets dh[sites[k], :] = 0 in place
    /// (dh [N,C] then holds the gradient that flows on to earlier layers); `add` leaves dh.
    /// `project`: dW[C,A] += dvecs^T v by matmul; `injection_scale`: norm_scale_bwd on dvecs.
    fn inject_bwd(
        &self,
        dvecs: M<'_, Self>,
        dh: M<'_, Self>,
        sites: &Self::Ids,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()>;

    /// Row-wise fixed-norm rescale n_s: y[N,D] = x * s / max(||x_n||_2, 1e-12) (`=`), s > 0.
    /// Rows are injected vectors (x [S,C], s = `injection_scale`) or critic predictions and
    /// targets (x [B,A], s = `mse_scale`).
    fn norm_scale_fwd(
        &self,
        y: M<'_, Self>,
        x: V<'_, Self>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()>;
    /// dx[N,D] = (s/||x||) (dy - x_hat (x_hat . dy)), x_hat = x/||x|| (`=`); where
    /// ||x|| < 1e-12 (the clamp), dx = (s/1e-12) dy. x: the forward's input.
    fn norm_scale_bwd(
        &self,
        dx: M<'_, Self>,
        dy: V<'_, Self>,
        x: V<'_, Self>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()>;

    /// Critic pooling, out[B,C] (`=`) from h[B,T,C] and mask[B,T] (1 = real token, 0 = padding;
    /// right padding; every row has a real token, else an error). `last`: h[b, sum(m_b)-1];
    /// `mean`: sum_t m h / sum_t m; `max`: per channel over real tokens; `weighted`:
    /// alpha = softmax(w[:T]) * m / (sum_t softmax(w[:T]) m + 1e-8), out = sum_t alpha_t h_t,
    /// w [Tmax >= T] (Some for `weighted` only). `cls` = `last` over an appended cls token.
    #[allow(clippy::too_many_arguments)]
    fn pool_fwd(
        &self,
        out: M<'_, Self>,
        h: V<'_, Self>,
        mask: V<'_, Self>,
        w: Option<V<'_, Self>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()>;
    /// dh[B,T,C] (`=`, zero where out does not depend on h): `last` dout at sum(m)-1; `mean`
    /// m_t dout / sum m; `max` dout at each channel's argmax (the first on ties); `weighted`
    /// alpha_t dout, and dw[Tmax] (`+=`, entries t < T): with g_t = dout . h_t,
    /// D = sum p m + 1e-8, dp_t = m_t (g_t - sum_u alpha_u g_u) / D, dw_t += p_t (dp_t - p . dp).
    #[allow(clippy::too_many_arguments)]
    fn pool_bwd(
        &self,
        dh: M<'_, Self>,
        dw: Option<M<'_, Self>>,
        dout: V<'_, Self>,
        h: V<'_, Self>,
        mask: V<'_, Self>,
        w: Option<V<'_, Self>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()>;

    /// The fused reward path (forward only): from pred, target [S,A] and valid [S] (1 = a
    /// completed sample, 0 = failed/truncated), writes (`=`) mse[S] = mean_a (n(pred) -
    /// n(target))^2 (n = norm_scale with `mse_scale`, identity when None), reward[S] and
    /// advantage[S]: transform -> * scale -> `failure_value` where invalid -> batch z-score
    /// (unbiased std + 1e-8) -> clip -> GRPO group advantage (groups of G consecutive samples,
    /// G divides S) or PPO's batch advantage. See [`RewardSpec`] for each step's source.
    #[allow(clippy::too_many_arguments)]
    fn reward_advantage(
        &self,
        mse: M<'_, Self>,
        reward: M<'_, Self>,
        advantage: M<'_, Self>,
        pred: V<'_, Self>,
        target: V<'_, Self>,
        valid: V<'_, Self>,
        s: usize,
        a: usize,
        spec: &RewardSpec,
    ) -> Result<()>;

    /// GRPO/PPO token loss over N = S*T response tokens (S sequences of T, row-major): logp,
    /// old_logp, adv (the sample's advantage on each of its tokens), mask (0/1, some 1) [N],
    /// ref_logp [N] (needed when kl_coef != 0). ratio = exp(clamp(logp - old_logp, +-20));
    /// pg = max(-A ratio, -A clip(ratio, 1-clip_low, 1+clip_high)), and for A < 0 with dual
    /// clip c: min(pg, -A c); token loss l = pg + kl_coef kl (k1/k2/k3, [`KlType`]); the loss
    /// aggregates m l by `agg` ([`LossAgg`]). Writes stats[PolicyStat::COUNT] (`=`, slots in
    /// [`PolicyStat`]). logp comes from the logits as minus the cross-entropy's losses.
    #[allow(clippy::too_many_arguments)]
    fn policy_loss_fwd(
        &self,
        stats: M<'_, Self>,
        logp: V<'_, Self>,
        old_logp: V<'_, Self>,
        adv: V<'_, Self>,
        mask: V<'_, Self>,
        ref_logp: Option<V<'_, Self>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()>;
    /// dlogp[N] = d loss / d logp (`=`; 0 where masked, where a clipped term is taken or a
    /// clamp is active). Since logp = logits[y] - logsumexp(logits), d logits =
    /// -dlogp (softmax - onehot(y)): `cross_entropy_chunk_bwd` with mask := -dlogp and scale 1
    /// (a micro-batch weight goes into that scale).
    #[allow(clippy::too_many_arguments)]
    fn policy_loss_bwd(
        &self,
        dlogp: M<'_, Self>,
        logp: V<'_, Self>,
        old_logp: V<'_, Self>,
        adv: V<'_, Self>,
        mask: V<'_, Self>,
        ref_logp: Option<V<'_, Self>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()>;

    /// One AdamW step over a window of the flat buffers (p, g, m, v have equal lengths):
    /// g' = g * grad_scale; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    /// p -= lr * (wd * p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)).
    /// p, g, m, v are f32; `work`, when given, is the weights' working copy (same length, the
    /// working dtype) and receives the new p rounded to its dtype.
    fn adamw(
        &self,
        p: M<'_, Self>,
        work: Option<M<'_, Self>>,
        g: V<'_, Self>,
        m: M<'_, Self>,
        v: M<'_, Self>,
        hp: &AdamwStep,
    ) -> Result<()>;
    /// sum of x^2, accumulated in f64 (for the global gradient norm)
    fn sum_squares(&self, x: V<'_, Self>) -> Result<f64>;

    /// Copies token ids out of device memory.
    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>>;
    /// `kcache[b, pos0 + t] = k[b, t]`, `vcache[b, pos0 + t] = v[b, t]` for t < TQ   (`=`): a
    /// step's new keys and values into the KV cache, the other positions unchanged;
    /// k, v [B,TQ,NKV,HS], kcache, vcache [B,TMAX,NKV,HS] (`d.nh` is not used). `pos`: where
    /// given, pos0 read from this one id in device memory instead of `d.pos0` (as rope_fwd).
    fn kv_append_fwd(
        &self,
        kcache: M<'_, Self>,
        vcache: M<'_, Self>,
        k: V<'_, Self>,
        v: V<'_, Self>,
        pos: Option<&Self::Ids>,
        d: CacheDims,
    ) -> Result<()>;
    /// `out[B,TQ,NH,HS] = softmax_j(q_t . k_j / sqrt(HS)) v_j` over cache positions
    /// j in [starts[b], pos0 + t] (left-padded rows; 0 for a query before its row's start),
    /// query head h reading KV head h/(NH/NKV);
    /// kcache, vcache [B,TMAX,NKV,HS]; starts [B]. Prefill (TQ = prompt length) and decode (TQ = 1).
    /// `pos`: where given, pos0 read from this one id in device memory instead of `d.pos0` (as
    /// rope_fwd).
    #[allow(clippy::too_many_arguments)]
    fn decode_attention_fwd(
        &self,
        out: M<'_, Self>,
        q: V<'_, Self>,
        kcache: V<'_, Self>,
        vcache: V<'_, Self>,
        starts: &Self::Ids,
        pos: Option<&Self::Ids>,
        d: CacheDims,
    ) -> Result<()>;
    /// ids[N] = a token per row of logits [N,V] drawn with uniforms u [N] as [`SampleSpec`]
    /// says; logp[N] = its log-probability under softmax(logits / temperature)   (`=`)
    #[allow(clippy::too_many_arguments)]
    fn sample_fwd(
        &self,
        ids: &mut Self::Ids,
        logp: M<'_, Self>,
        logits: V<'_, Self>,
        u: V<'_, Self>,
        n: usize,
        v: usize,
        spec: &SampleSpec,
    ) -> Result<()>;
}
