//! One decoder block's forward, shared by training (activations kept per layer for backward)
//! and inference (scratch buffers, attention over a KV cache).

use super::linear::{gate_up_fwd, linear_fwd, linear_fwd_add};
use super::{LayerParams, Model};
use crate::device::{CacheDims, Device, View, ViewMut};
use crate::Result;

/// What one block reads and writes, over N = B*TQ rows.
pub(crate) struct BlockBufs<'a, B> {
    /// [N,C] the block's input (residual stream)
    pub x: View<'a, B>,
    /// [N,C] the block's output (residual stream); None stops after SwiGLU (a recomputed
    /// block: its backward needs h, not the output, which the residual stream holds already)
    pub out: Option<ViewMut<'a, B>>,
    /// [N,C], [N]
    pub xn1: ViewMut<'a, B>,
    pub rstd1: ViewMut<'a, B>,
    /// [N,(NH+2NKV)*HS] scratch: q, k and v before RoPE, as the one matmul writes them
    pub qkv: ViewMut<'a, B>,
    /// [N,NH*HS] queries; [B,TMAX,NKV*HS] keys and values, after RoPE, row (b, t) at position
    /// pos0 + t (a KV cache, or TMAX = TQ: the batch's own)
    pub q: ViewMut<'a, B>,
    pub k: ViewMut<'a, B>,
    pub v: ViewMut<'a, B>,
    /// [N,NH*HS] attention output
    pub att: ViewMut<'a, B>,
    /// [N,C] residual stream after attention
    pub x_mid: ViewMut<'a, B>,
    /// [N,C], [N]
    pub xn2: ViewMut<'a, B>,
    pub rstd2: ViewMut<'a, B>,
    /// [2F,N] gate^T then up^T (feature-major: one matmul writes both)
    pub gu: ViewMut<'a, B>,
    /// [F,N] silu(gate) * up, feature-major
    pub h: ViewMut<'a, B>,
}

/// `out = x_mid + down(silu(gate(n2)) * up(n2))`, `x_mid = x + o(attend(rope(q(n1)), rope(k(n1)), v(n1)))`
/// with n1, n2 the RMS-normed inputs (q, k and v one matmul, gate and up another). Rows are
/// (b, t) with N = B*TQ at positions pos0 + t of `d` (pos0 read on the device from `pos` where
/// given), their keys and values written there ([`Device::qkv_rope_fwd`]); `attend(att, q, k,
/// v)` writes the attention output (causal over the batch, or over a cache).
pub(crate) fn block_fwd<D: Device>(
    dev: &D,
    model: &Model<D>,
    lp: &LayerParams,
    d: CacheDims,
    pos: Option<&D::Ids>,
    io: BlockBufs<'_, D::Buf>,
    attend: impl FnOnce(
        ViewMut<'_, D::Buf>,
        View<'_, D::Buf>,
        View<'_, D::Buf>,
        View<'_, D::Buf>,
    ) -> Result<()>,
) -> Result<()> {
    let cfg = &model.cfg;
    let n = d.b * d.tq;
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let (eps, theta) = (cfg.rms_norm_eps, cfg.rope_theta);
    let p = |off: usize, len: usize| View::range(model.weights(), off, len);
    let BlockBufs {
        x,
        out,
        mut xn1,
        rstd1,
        mut qkv,
        mut q,
        mut k,
        mut v,
        mut att,
        mut x_mid,
        mut xn2,
        rstd2,
        mut gu,
        mut h,
    } = io;

    dev.rmsnorm_fwd(xn1.reborrow(), rstd1, x, p(lp.ln1, c), n, c, eps)?;
    // q, k and v in one matmul: their weights are one [QKV,C] matrix (`LayerParams`)
    let qkvd = qd + 2 * kvd;
    linear_fwd(
        dev,
        qkv.reborrow(),
        xn1.as_view(),
        p(lp.wq, qkvd * c),
        n,
        qkvd,
        c,
    )?;
    dev.qkv_rope_fwd(
        q.reborrow(),
        k.reborrow(),
        v.reborrow(),
        qkv.as_view(),
        pos,
        d,
        theta,
    )?;
    attend(att.reborrow(), q.as_view(), k.as_view(), v.as_view())?;
    // x_mid = x + att @ wo^T: the residual add is the matmul's epilogue
    linear_fwd_add(
        dev,
        x_mid.reborrow(),
        x,
        att.as_view(),
        p(lp.wo, c * qd),
        n,
        c,
        qd,
    )?;

    dev.rmsnorm_fwd(
        xn2.reborrow(),
        rstd2,
        x_mid.as_view(),
        p(lp.ln2, c),
        n,
        c,
        eps,
    )?;
    // gate and up in one matmul, feature-major: their weights are one [2F,C] matrix
    // (`LayerParams`)
    gate_up_fwd(
        dev,
        gu.reborrow(),
        xn2.as_view(),
        p(lp.wgate, 2 * f * c),
        n,
        f,
        c,
    )?;
    dev.swiglu_fwd(h.reborrow(), gu.as_view())?;
    let Some(out) = out else {
        return Ok(());
    };
    // out = x_mid + h @ wdown^T, h stored [F,N]
    dev.matmul_add(
        out,
        x_mid.as_view(),
        h.as_view(),
        p(lp.wdown, c * f),
        n,
        c,
        f,
        true,
        true,
    )
}
