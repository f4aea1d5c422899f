//! matmul on the GPU: cuBLASLt with f32 inputs and the exact f32 compute type
//! (`CUBLAS_COMPUTE_32F`, no TF32), so that the f32 device matches the CPU twin to f32
//! rounding. The bf16 path (bf16 in, f32 accumulate) goes through the same call with bf16
//! layouts.
//!
//! Row-major to cuBLAS's column-major: a row-major `c[M,N]` is a column-major `c^T [N,M]`, and
//! `c^T = op(b)^T op(a)^T`, so cuBLASLt is called with (m, n) = (N, M), A = b, B = a: b stored
//! `[K,N]` is column-major `[N,K]` (no transpose, ld N), or stored `[N,K]` when `tb` (transpose,
//! ld K); a stored `[M,K]` is column-major `[K,M]` (no transpose, ld K), or `[K,M]` when `ta`
//! (transpose, ld M).

use std::sync::Arc;

use cudarc::cublaslt::{sys, CudaBlasLT, Matmul, MatmulConfig, MatmulShared, Workspace};
use cudarc::driver::CudaStream;

use super::CudaBuf;
use crate::device::{View, ViewMut};
use crate::{Error, Result};

/// A cuBLASLt handle whose f32 matmul computes in f32.
pub(super) struct Blas(CudaBlasLT);

impl MatmulShared for Blas {
    fn handle(&self) -> &sys::cublasLtHandle_t {
        self.0.handle()
    }
    fn workspace(&self) -> &Workspace {
        self.0.workspace()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.0.stream()
    }
}

impl Matmul<f32> for Blas {
    fn matrix_type() -> sys::cudaDataType {
        sys::cudaDataType_t::CUDA_R_32F
    }
    fn compute_type() -> sys::cublasComputeType_t {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    }
}

impl Blas {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        CudaBlasLT::new(stream.clone())
            .map(Blas)
            .map_err(|e| Error::cuda("cublasLtCreate", format!("{e:?}")))
    }

    /// `c[M,N] = alpha * op(a) op(b) + beta * c` (row-major; see `Device::matmul`). Lengths
    /// were checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        &self,
        c: ViewMut<'_, CudaBuf>,
        a: View<'_, CudaBuf>,
        b: View<'_, CudaBuf>,
        [m, n, k]: [usize; 3],
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let cfg = MatmulConfig {
            transa: tb,
            transb: ta,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha,
            lda: if tb { k } else { n } as i64,
            ldb: if ta { m } else { k } as i64,
            beta,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let (aoff, alen) = (a.offset(), a.len());
        let (boff, blen) = (b.offset(), b.len());
        let av = a.buf().mem.slice(aoff..aoff + alen);
        let bv = b.buf().mem.slice(boff..boff + blen);
        let (cbuf, coff, clen) = c.into_parts();
        let mut cv = cbuf.mem.slice_mut(coff..coff + clen);
        // SAFETY: the caller checked a [M,K] (or [K,M]), b [K,N] (or [N,K]) and c [M,N] hold
        // exactly the elements the layouts above describe, and that the views lie in their
        // buffers; c is borrowed mutably so it aliases neither input. cuBLASLt runs on our one
        // stream, ordered with every other use of these buffers.
        unsafe { Matmul::<f32>::matmul(self, cfg, &bv, &av, &mut cv, None, None) }
            .map_err(|e| Error::cuda("cublasLtMatmul", format!("{e:?} (M {m}, N {n}, K {k})")))
    }
}
