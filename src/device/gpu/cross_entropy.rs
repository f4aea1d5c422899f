//! `kernels/cross_entropy.cu`: cross_entropy_chunk_fwd_<f32|bf16> /
//! cross_entropy_chunk_bwd_<f32|bf16> over vocabulary chunks (one chunk of all V for whole
//! logits), one block of 256 per row, grid min(N, 65535) (grid-stride over the rest). logits
//! are T; mask, losses and state f32 in both dtypes.

use super::{check_len, dim1, int, EmuArgs, Ids, In, Launch, Out};
use crate::device::cpu::cross_entropy::check_chunk;
use crate::device::storage::{sym, Storage};
use crate::Result;

/// Threads per block of the row kernels (cross_entropy, softmax, sample).
pub const ROW_NT: u32 = 256;

/// Grid of the row kernels: one block per row, at most 65535 (grid-stride beyond).
pub(crate) fn row_grid(n: usize) -> u32 {
    n.clamp(1, 65535) as u32
}

/// Checks of a vocabulary chunk's launch: the shared lengths ([`check_chunk`]), `out`, the
/// targets' values where they are known, and ints.
fn check_chunk_launch(
    op: &'static str,
    out: (&str, usize, &[usize]),
    state: usize,
    targets: &Ids<'_>,
    mask: usize,
    n: usize,
    (vc, v, v0): (usize, usize, usize),
) -> Result<()> {
    check_chunk(op, (vc, v, v0), state, targets.len(), mask, n)?;
    check_len(op, out.0, out.1, out.2)?;
    targets.check(op, "targets", v)?;
    int(op, "N", n)?;
    int(op, "V", v)?;
    Ok(())
}

/// One vocabulary chunk of the forward (columns [v0, v0+VC)): state[N,3] (= at v0 0, += after);
/// the chunk ending at V writes losses[N] (=). See `kernels/cross_entropy.cu`. logits: T;
/// losses, state, mask: f32.
#[allow(clippy::too_many_arguments)]
pub fn chunk_fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    losses: impl Into<Out<'a, f32>>,
    state: impl Into<Out<'a, f32>>,
    logits: impl Into<In<'a, T>>,
    targets: impl Into<Ids<'a>>,
    mask: impl Into<In<'a, f32>>,
    n: usize,
    (vc, v, v0): (usize, usize, usize),
) -> Result<()> {
    const OP: &str = "cross_entropy_chunk_fwd";
    let (losses, state, logits) = (losses.into(), state.into(), logits.into());
    let (targets, mask) = (targets.into(), mask.into());
    check_chunk_launch(
        OP,
        ("losses [N]", losses.len(), &[n]),
        state.len(),
        &targets,
        mask.len(),
        n,
        (vc, v, v0),
    )?;
    check_len(OP, "logits [N,VC]", logits.len(), &[n, vc])?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.output(losses)
        .output(state)
        .input(logits)
        .ids(targets)
        .input(mask);
    a.scalar(n as i32)
        .scalar(vc as i32)
        .scalar(v as i32)
        .scalar(v0 as i32);
    l.launch(&sym::<T>(OP), dim1(row_grid(n)), dim1(ROW_NT), 0, &mut a)
}

/// In place on logits[N,VC]: mask * scale * (softmax - onehot(target)) over columns
/// [v0, v0+VC), from the forward's state[N,3]. logits: T; state, mask: f32.
#[allow(clippy::too_many_arguments)]
pub fn chunk_bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    logits: impl Into<Out<'a, T>>,
    state: impl Into<In<'a, f32>>,
    targets: impl Into<Ids<'a>>,
    mask: impl Into<In<'a, f32>>,
    n: usize,
    (vc, v, v0): (usize, usize, usize),
    scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy_chunk_bwd";
    let (logits, state) = (logits.into(), state.into());
    let (targets, mask) = (targets.into(), mask.into());
    check_chunk_launch(
        OP,
        ("logits [N,VC]", logits.len(), &[n, vc]),
        state.len(),
        &targets,
        mask.len(),
        n,
        (vc, v, v0),
    )?;
    if n == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.output(logits).input(state).ids(targets).input(mask);
    a.scalar(n as i32)
        .scalar(vc as i32)
        .scalar(v0 as i32)
        .scalar(scale);
    l.launch(&sym::<T>(OP), dim1(row_grid(n)), dim1(ROW_NT), 0, &mut a)
}
