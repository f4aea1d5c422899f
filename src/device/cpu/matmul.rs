//! General matrix multiply on row-major slices, through ndarray (matrixmultiply for f32/f64).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeError};

use super::Real;
use crate::{Error, Result};

fn shape_err(e: ShapeError) -> Error {
    Error::invalid("matmul", e.to_string())
}

/// A row-major [rows, cols] matrix, or the transpose of a stored [cols, rows] one.
fn view<T>(x: &[T], rows: usize, cols: usize, transposed: bool) -> Result<ArrayView2<'_, T>> {
    if transposed {
        Ok(ArrayView2::from_shape((cols, rows), x)
            .map_err(shape_err)?
            .reversed_axes())
    } else {
        ArrayView2::from_shape((rows, cols), x).map_err(shape_err)
    }
}

/// `c[M,N] = alpha * op(a) op(b) + beta * c`   (`=` when beta = 0, which ignores c's contents;
/// accumulating otherwise)
///
/// `[m, n, k]` = [M, N, K]. op(a) [M,K] is a (stored [M,K]) or, when `ta`, a^T (a stored [K,M]);
/// op(b) [K,N] is b (stored [K,N]) or, when `tb`, b^T (b stored [N,K]). The transposes are
/// strided views, never copies; matrixmultiply packs panels and runs on its own threads.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    [m, n, k]: [usize; 3],
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let a = view(a, m, k, ta)?;
    let b = view(b, k, n, tb)?;
    let mut c = ArrayViewMut2::from_shape((m, n), c).map_err(shape_err)?;
    general_mat_mul(
        <T as Real>::from_f32(alpha),
        &a,
        &b,
        <T as Real>::from_f32(beta),
        &mut c,
    );
    Ok(())
}
