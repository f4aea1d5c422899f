//! A linear layer without bias in HF layout, as one device GEMM.

use crate::device::{Device, View, ViewMut};
use crate::Result;

/// `out[N,O] = x[N,I] @ w[O,I]^T`   (`=`)
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd<D: Device>(
    dev: &D,
    out: ViewMut<'_, D::Buf>,
    x: View<'_, D::Buf>,
    w: View<'_, D::Buf>,
    n: usize,
    o: usize,
    i: usize,
) -> Result<()> {
    dev.matmul(out, x, w, n, o, i, false, true, 1.0, 0.0)
}

/// [`linear_fwd`] added to `x`: `out[N,O] = x[N,O] + input[N,I] @ w[O,I]^T` (`=`), one
/// [`Device::matmul_add`] (the residual stream's update, the projection never written).
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_add<D: Device>(
    dev: &D,
    out: ViewMut<'_, D::Buf>,
    x: View<'_, D::Buf>,
    input: View<'_, D::Buf>,
    w: View<'_, D::Buf>,
    n: usize,
    o: usize,
    i: usize,
) -> Result<()> {
    dev.matmul_add(out, x, input, w, n, o, i, false, true)
}

/// The MLP's gate and up projections as one matmul, feature-major: `gu[2F,N] = w[2F,C] @ x[N,C]^T`
/// (`=`), w = [wgate; wup] (adjacent in the parameter table); gu's first F rows are gate^T,
/// the next F up^T, each a contiguous [F,N] (what the elementwise SwiGLU reads).
pub fn gate_up_fwd<D: Device>(
    dev: &D,
    gu: ViewMut<'_, D::Buf>,
    x: View<'_, D::Buf>,
    w: View<'_, D::Buf>,
    n: usize,
    f: usize,
    c: usize,
) -> Result<()> {
    dev.matmul(gu, w, x, 2 * f, n, c, false, true, 1.0, 0.0)
}

/// The input gradient of [`linear_fwd`]: `dx[N,I] = dy[N,O] @ w[O,I]` (`=`, or `+=` when
/// `accumulate`: the input feeds several linears).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_dx<D: Device>(
    dev: &D,
    dx: ViewMut<'_, D::Buf>,
    dy: View<'_, D::Buf>,
    w: View<'_, D::Buf>,
    n: usize,
    o: usize,
    i: usize,
    accumulate: bool,
) -> Result<()> {
    let beta = if accumulate { 1.0 } else { 0.0 };
    dev.matmul(dx, dy, w, n, i, o, false, false, 1.0, beta)
}

/// The weight gradient of [`linear_fwd`]: `dw[O,I] += dy[N,O]^T @ x[N,I]`
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_dw<D: Device>(
    dev: &D,
    dw: ViewMut<'_, D::Buf>,
    dy: View<'_, D::Buf>,
    x: View<'_, D::Buf>,
    n: usize,
    o: usize,
    i: usize,
) -> Result<()> {
    dev.matmul(dw, dy, x, o, i, n, true, false, 1.0, 1.0)
}
