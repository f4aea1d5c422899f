//! The `Device` trait: one method per op, forward and backward.
//!
//! Every op exists as a CPU twin (`device/cpu/<op>.rs`, the reference) and, later, as a CUDA
//! kernel (`kernels/<op>.cu`) with the same name and semantics. Buffers are device memory of
//! f32 elements; ops take windows into them ([`View`], [`ViewMut`]) plus explicit dims, so a
//! parameter is a window of the flat parameter buffer and an activation is a whole buffer.
//!
//! Shape letters: B batch, T time, C channels (d_model), NH/NKV heads, HS head size, F ffn,
//! V vocab, N rows (= B*T). Outputs documented `=` are overwritten; `+=` are accumulated.
//! Parameter gradients accumulate; activation gradients overwrite.

pub mod cpu;

use crate::Result;

/// Device memory holding f32 elements.
pub trait DeviceBuf: Send + Sync {
    fn len(&self) -> usize;
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

type V<'a, D> = View<'a, <D as Device>::Buf>;
type M<'a, D> = ViewMut<'a, <D as Device>::Buf>;

/// A compute device. Methods check lengths and dims against each other and return
/// [`crate::Error::Invalid`] naming the op and argument on a mismatch.
pub trait Device: Send + Sync + Sized {
    /// Device memory of f32.
    type Buf: DeviceBuf;
    /// Device memory of u32 token ids.
    type Ids: Send + Sync;

    fn name(&self) -> String;

    /// A zeroed buffer of `n` elements.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, x: V<'_, Self>) -> Result<Vec<f32>>;
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids>;
    /// `x = value`
    fn fill(&self, x: M<'_, Self>, value: f32) -> Result<()>;
    /// `dst = src`
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
    /// dx[N,C] = (rstd * (w*dout) - x * rstd^3 * mean_c(w*dout*x)); dw[C] += sum_n dout * x * rstd
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
    ) -> Result<()>;

    /// In place on x[B,T,H,HS]: HF "rotate half" RoPE. For i < HS/2, position p = pos0 + t,
    /// angle = p * theta^(-2i/HS): (x_i, x_{i+HS/2}) <- (x_i cos - x_{i+HS/2} sin, x_{i+HS/2} cos + x_i sin)
    #[allow(clippy::too_many_arguments)]
    fn rope_fwd(
        &self,
        x: M<'_, Self>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
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

    /// out[N*F] = silu(gate) * up
    fn swiglu_fwd(&self, out: M<'_, Self>, gate: V<'_, Self>, up: V<'_, Self>) -> Result<()>;
    /// dgate = dout * up * silu'(gate); dup = dout * silu(gate)   (both =)
    fn swiglu_bwd(
        &self,
        dgate: M<'_, Self>,
        dup: M<'_, Self>,
        dout: V<'_, Self>,
        gate: V<'_, Self>,
        up: V<'_, Self>,
    ) -> Result<()>;

    /// c[M,N] = alpha * op(a) op(b) + beta * c, row-major; op(a) [M,K] is a or a^T (a stored [K,M]
    /// when ta), op(b) [K,N] is b or b^T (b stored [N,K] when tb). beta = 0 ignores c's contents.
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

    /// out = a + b (elementwise)
    fn residual_fwd(&self, out: M<'_, Self>, a: V<'_, Self>, b: V<'_, Self>) -> Result<()>;
    /// da += dout (the gradient reaching each input of an add)
    fn residual_bwd(&self, da: M<'_, Self>, dout: V<'_, Self>) -> Result<()>;

    /// losses[N] = mask[n] * (logsumexp(logits[n,:]) - logits[n, targets[n]])   (targets < V)
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_fwd(
        &self,
        losses: M<'_, Self>,
        logits: V<'_, Self>,
        targets: &Self::Ids,
        mask: V<'_, Self>,
        n: usize,
        v: usize,
    ) -> Result<()>;
    /// dlogits[N,V] = mask[n] * scale * (softmax(logits[n,:]) - onehot(targets[n]))
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_bwd(
        &self,
        dlogits: M<'_, Self>,
        logits: V<'_, Self>,
        targets: &Self::Ids,
        mask: V<'_, Self>,
        n: usize,
        v: usize,
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

    /// One AdamW step over a window of the flat buffers (p, g, m, v have equal lengths):
    /// g' = g * grad_scale; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    /// p -= lr * (wd * p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps))
    fn adamw(
        &self,
        p: M<'_, Self>,
        g: V<'_, Self>,
        m: M<'_, Self>,
        v: M<'_, Self>,
        hp: &AdamwStep,
    ) -> Result<()>;
    /// sum of x^2, accumulated in f64 (for the global gradient norm)
    fn sum_squares(&self, x: V<'_, Self>) -> Result<f64>;
}
