//! matmul on the GPU: cuBLASLt with the f32 compute type (`CUBLAS_COMPUTE_32F`, no TF32) over
//! f32 or bf16 operands: a and b share a dtype, c (cuBLASLt's D) has theirs or is f32 (the
//! parameter gradient of bf16 operands). cuBLASLt's C, the addend, is c itself, or for
//! `matmul_add` another buffer of c's dtype and layout (the residual epilogue). With f32 operands the device matches the CPU twin to f32
//! rounding; with bf16 operands the products accumulate in f32 and c is rounded once.
//!
//! Row-major to cuBLAS's column-major: a row-major `c[M,N]` is a column-major `c^T [N,M]`, and
//! `c^T = op(b)^T op(a)^T`, so cuBLASLt is called with (m, n) = (N, M), A = b, B = a: b stored
//! `[K,N]` is column-major `[N,K]` (no transpose, ld N), or stored `[N,K]` when `tb` (transpose,
//! ld K); a stored `[M,K]` is column-major `[K,M]` (no transpose, ld K), or `[K,M]` when `ta`
//! (transpose, ld M).
//!
//! A plan (descriptor, layouts and the heuristic's algorithm) is made once per shape, dtypes and
//! pointer alignment, and reused: the calls of a training step repeat a few shapes, and the
//! heuristic query costs more than a small GEMM.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::device::Dtype;
use crate::{Error, Result};

/// cuBLASLt workspace: what NVIDIA recommends for Hopper.
const WORKSPACE: usize = 32 << 20;

/// Everything a plan depends on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// (M, N, K) of the row-major call
    mnk: [u64; 3],
    ta: bool,
    tb: bool,
    /// dtype of a and b, and of c
    ab: Dtype,
    c: Dtype,
    /// alignment in bytes (a power of two up to 256) of a, b, the addend (cuBLASLt's C) and c
    /// (its D)
    align: [u32; 4],
}

/// A cuBLASLt matmul descriptor, its A, B, C layouts and the algorithm chosen for them.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the plan owns these descriptors (made in `Plan::new`, never copied out) and
        // destroys them once; a failure to destroy leaks a descriptor, nothing worse.
        unsafe {
            for l in self.layouts {
                let _ = result::destroy_matrix_layout(l);
            }
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

fn blas_err(what: &'static str, key: Key) -> impl FnOnce(result::CublasError) -> Error {
    move |e| {
        let [m, n, k] = key.mnk;
        Error::cuda(
            what,
            format!(
                "{e:?} (M {m}, N {n}, K {k}, ta {}, tb {}, a/b {}, c {})",
                key.ta, key.tb, key.ab, key.c
            ),
        )
    }
}

fn cuda_type(d: Dtype) -> sys::cudaDataType {
    match d {
        Dtype::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        _ => sys::cudaDataType_t::CUDA_R_32F,
    }
}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, key: &Key) -> Result<Plan> {
        let [m, n, k] = key.mnk;
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_err("cublasLtMatmulDescCreate", *key))?;
        // cuBLAS A = our b [K,N] (or [N,K] when tb), B = our a [M,K] (or [K,M] when ta)
        let (ab, c) = (cuda_type(key.ab), cuda_type(key.c));
        let shapes = [
            if key.tb { (k, n, k) } else { (n, k, n) },
            if key.ta { (m, k, m) } else { (k, m, k) },
            (n, m, n),
        ];
        let mut layouts = [std::ptr::null_mut(); 3];
        let mut plan = Plan {
            desc,
            layouts,
            // SAFETY: a plain C struct of integers; zero is a valid (unused) value, replaced by
            // the heuristic's choice below before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        for (i, &(rows, cols, ld)) in shapes.iter().enumerate() {
            let t = if i == 2 { c } else { ab };
            layouts[i] = result::create_matrix_layout(t, rows, cols, ld as i64)
                .map_err(blas_err("cublasLtMatrixLayoutCreate", *key))?;
            plan.layouts[i] = layouts[i];
        }
        let set_desc = |attr, v: i32| {
            // SAFETY: `desc` is live; the attribute takes an int32 (cublasOperation_t).
            unsafe {
                result::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&v) as *const i32 as *const c_void,
                    size_of::<i32>(),
                )
            }
            .map_err(blas_err("cublasLtMatmulDescSetAttribute", *key))
        };
        use sys::cublasLtMatmulDescAttributes_t as D;
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, key.tb as i32)?;
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, key.ta as i32)?;

        let pref =
            result::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreference", *key))?;
        let set_pref = |attr, bytes: &[u8]| {
            // SAFETY: `pref` is live; `bytes` is the attribute's value in its C type.
            unsafe {
                result::set_matmul_pref_attribute(
                    pref,
                    attr,
                    bytes.as_ptr() as *const c_void,
                    bytes.len(),
                )
            }
            .map_err(blas_err("cublasLtMatmulPreferenceSetAttribute", *key))
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // cuBLAS A = our b, B = our a, C = the addend (our c itself unless matmul_add), D = our c
        let [align_a, align_b, align_x, align_c] = key.align;
        let found = set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &(WORKSPACE as u64).to_ne_bytes(),
        )
        .and_then(|_| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &align_b.to_ne_bytes(),
            )
        })
        .and_then(|_| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &align_a.to_ne_bytes(),
            )
        })
        .and_then(|_| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &align_x.to_ne_bytes(),
            )
        })
        .and_then(|_| {
            set_pref(
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &align_c.to_ne_bytes(),
            )
        })
        .and_then(|_| {
            // SAFETY: handle, descriptor, layouts and preference are live and describe this
            // call (C and D share a layout).
            unsafe {
                result::get_matmul_algo_heuristic(
                    handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref,
                )
            }
            .map_err(blas_err("cublasLtMatmulAlgoGetHeuristic", *key))
        });
        // SAFETY: made above, used only within this function.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        plan.algo = found?.algo;
        Ok(plan)
    }
}

/// The largest power of two up to 256 dividing `addr` (cuBLASLt's alignment preference).
fn alignment(addr: u64) -> u32 {
    1 << (addr | 256).trailing_zeros()
}

/// A cuBLASLt handle, its workspace and the plans made so far.
pub(super) struct Blas {
    handle: sys::cublasLtHandle_t,
    _workspace: CudaSlice<u8>,
    workspace: u64,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and the plans' descriptors are only used while holding `plans`' lock (one
// host thread at a time), and every call is issued on the one stream of the device.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if let Ok(plans) = self.plans.get_mut() {
            plans.clear();
        }
        // SAFETY: the handle is ours, made in `new`, and its plans are gone.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// One operand of [`Blas::matmul`]: the device address of its first element, and its dtype.
pub(super) struct Operand {
    pub addr: u64,
    pub dtype: Dtype,
}

impl Blas {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle =
            result::create_handle().map_err(|e| Error::cuda("cublasLtCreate", format!("{e:?}")))?;
        let ws = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| Error::cuda("cuMemAlloc (cuBLASLt workspace)", e))?;
        let workspace = ws.device_ptr(stream).0;
        Ok(Blas {
            handle,
            _workspace: ws,
            workspace,
            stream: stream.clone(),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `c[M,N] = alpha * op(a) op(b) + beta * x` (row-major; see `Device::matmul`), x at address
    /// `x`: c's own (`matmul`) or another [M,N] of c's dtype (`matmul_add`). The caller checked
    /// that the operands hold exactly the elements of their shapes, that the dtypes are a
    /// combination of the module docs, and that c overlaps none of a, b and (unless it is c) x.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        &self,
        c: Operand,
        x: u64,
        a: Operand,
        b: Operand,
        [m, n, k]: [usize; 3],
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let key = Key {
            mnk: [m as u64, n as u64, k as u64],
            ta,
            tb,
            ab: a.dtype,
            c: c.dtype,
            align: [
                alignment(a.addr),
                alignment(b.addr),
                alignment(x),
                alignment(c.addr),
            ],
        };
        // cuBLASLt runs in the calling thread's current context, its heuristic query included:
        // ours, whichever thread calls
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))?;
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| Error::cuda("cublasLtMatmul", "a matmul panicked earlier"))?;
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(self.handle, &key)?),
        };
        let [la, lb, lc] = plan.layouts;
        // SAFETY: the caller checked that a, b, x and c hold the elements the layouts describe at
        // these addresses (live buffers of ours, c aliasing none of a, b and, unless it is c, x),
        // in the dtypes of the plan's key (x has c's), aligned as the key says; the workspace is
        // ours and WORKSPACE bytes long; alpha and beta are f32 (the scale type); the call is
        // ordered on our one stream.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                b.addr as *const c_void,
                la,
                a.addr as *const c_void,
                lb,
                x as *const c_void,
                lc,
                c.addr as *mut c_void,
                lc,
                &plan.algo,
                self.workspace as *mut c_void,
                WORKSPACE,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("cublasLtMatmul", key))
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
    }
}
