//! [`CudaDevice`]: the [`Device`](super::Device) trait on an NVIDIA GPU through cudarc.
//!
//! - The driver, cuBLASLt and NVRTC are loaded at run time (cudarc's dynamic loading): the same
//!   binary runs where there is no GPU, and [`probe`] says why the GPU cannot be used before
//!   anything touches cudarc (whose calls panic when libcuda is absent).
//! - One context (the device's primary context) and one stream; every op is issued on that
//!   stream in program order, so no event tracking is needed (it is switched off).
//! - The kernels are those build.rs embedded ([`super::kernels`]): the sm_90a cubin on a
//!   compute capability 9.0 GPU, else the compute_80 PTX, JIT-compiled by the driver.
//! - Ops go through the same launchers as the emulated device ([`super::gpu`]), given device
//!   addresses ([`super::gpu::DevPtr`]); [`launch::CudaLaunch`] hands the packed arguments to
//!   `cuLaunchKernel`. Matmul is cuBLASLt ([`matmul`]).
//! - Buffers hold f32 or bf16 ([`CudaBuf::dtype`]); the working dtype is bf16 by default (f32
//!   is the parity path of the design: the CPU twins' precision). Ids are u32 with the bound
//!   every id is below, recorded on the host when they were written, which the launchers check
//!   instead of reading device memory.

mod launch;
mod matmul;
mod ops;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use half::bf16;

use super::gpu::scratch::ScratchCache;
use super::gpu::DevPtr;
use super::{DeviceBuf, Dtype, Storage, View, ViewMut};
use crate::{Error, Result};

pub use launch::CudaLaunch;

/// Device memory of f32 or bf16 elements: an allocation of its own, or a part of one that
/// other buffers share ([`super::Device::alloc_shared`]).
#[derive(Debug)]
pub struct CudaBuf {
    /// the allocation, held (freed with the last buffer into it)
    _mem: Arc<CudaSlice<u8>>,
    /// device address of element 0
    addr: u64,
    len: usize,
    dtype: Dtype,
}

impl DeviceBuf for CudaBuf {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// Device memory of u32 token ids, every one below `bound`.
#[derive(Debug)]
pub struct CudaIds {
    mem: CudaSlice<u32>,
    addr: u64,
    len: usize,
    bound: usize,
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The oldest driver API the embedded PTX and cubins load on (nvcc 13.0 emits PTX ISA 9.0).
const MIN_DRIVER: i32 = 13000;

/// The cuBLASLt major version the bindings are built for (cudarc's `cuda-13000`): its structs
/// and enums are what a matmul passes to the library.
const CUBLASLT_MAJOR: usize = 13;

/// Whether the cuBLASLt that was loaded (`version` from cublasLtGetVersion: major * 10000 +
/// minor * 100 + patch) is the major version the bindings expect. cudarc also tries the names of
/// older libraries (libcublasLt.so.12, ...), whose API differs.
fn cublaslt_version_ok(version: usize) -> std::result::Result<(), String> {
    let (major, minor, patch) = cublaslt_parts(version);
    if major == CUBLASLT_MAJOR {
        return Ok(());
    }
    Err(format!(
        "the cuBLASLt library loaded is version {major}.{minor}.{patch}; the CUDA device needs          cuBLASLt {CUBLASLT_MAJOR} (libcublasLt.so.{CUBLASLT_MAJOR}, from the CUDA {CUBLASLT_MAJOR}          toolkit or the nvidia-cublas wheel): put the folder holding it first on LD_LIBRARY_PATH"
    ))
}

/// (major, minor, patch) of a cublasLtGetVersion number.
fn cublaslt_parts(version: usize) -> (usize, usize, usize) {
    (version / 10000, version / 100 % 100, version % 100)
}

/// The version of the cuBLASLt loaded, as "major.minor.patch"; call after [`probe`] succeeded.
pub fn cublaslt_version() -> String {
    // SAFETY: as in `probe`, which found the library loadable.
    let (major, minor, patch) =
        cublaslt_parts(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() });
    format!("{major}.{minor}.{patch}")
}

/// Why the GPU cannot be used here, or the number of CUDA devices.
pub fn probe() -> std::result::Result<usize, String> {
    if !super::kernels::available() {
        return Err(super::kernels::how_to_get().to_string());
    }
    // SAFETY: `is_culib_present` only tries to load libcuda (dlopen); it never calls into it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver on this machine (libcuda.so could not be loaded)".into());
    }
    let mut version = 0;
    // SAFETY: libcuda is loaded (checked above); cuDriverGetVersion writes one int, needs no
    // cuInit and no context.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    r.result()
        .map_err(|e| format!("the CUDA driver does not say its version: {e}"))?;
    if version < MIN_DRIVER {
        return Err(format!(
            "the CUDA driver supports CUDA {}.{}; the kernels were compiled by nvcc 13.0 and \
             need a CUDA 13.0 driver (R580) or newer",
            version / 1000,
            version % 1000 / 10
        ));
    }
    // SAFETY: `is_culib_present` only tries to load libcublasLt (dlopen); it never calls into it.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(
            "cuBLASLt (libcublasLt.so.13), which the CUDA device's matmuls need, could not \
                    be loaded: install the CUDA toolkit's libraries or the nvidia-cublas wheel \
                    and put the folder holding it on LD_LIBRARY_PATH"
                .into(),
        );
    }
    // SAFETY: cuBLASLt is loadable (checked above); cublasLtGetVersion takes no argument, needs
    // no handle or context, and returns a number.
    cublaslt_version_ok(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() })?;
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the CUDA driver sees no GPU".into()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
    }
}

/// The CUDA device (see the module docs).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    launcher: CudaLaunch,
    blas: matmul::Blas,
    name: String,
    dtype: Dtype,
    scratch: ScratchCache<CudaBuf>,
}

/// A captured step, replayed with one graph launch on the device's stream.
pub struct CudaExec(cudarc::driver::CudaGraph);

// SAFETY: the graph is only used through the `&mut` of the `Graph` that holds it (one thread
// at a time: cuGraph objects need external serialisation, not a particular thread), and
// launched on the device's stream, whose context cudarc binds before each call.
unsafe impl Send for CudaExec {}

impl CudaDevice {
    /// `step`'s launches and matmuls captured from the stream into an executable graph (not
    /// run). The capture ends in every case (a failed step, a failed end, a panic), so the
    /// stream is left usable.
    fn capture_graph(&self, step: &mut dyn FnMut() -> Result<()>) -> Result<CudaExec> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        /// Ends a capture that is still open when dropped, discarding what it captured.
        struct Open<'a>(&'a CudaDevice, bool);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.abandon_capture();
                }
            }
        }
        // an error cudarc stored from a call that could not return it (a free in a Drop):
        // reported as itself, not as a failure of this capture
        self.stream
            .context()
            .check_err()
            .map_err(driver("an earlier driver call (stored by cudarc)"))?;
        // thread-local: a call of this thread that is not stream work and unsafe during a
        // capture (an allocation, a wait) invalidates it instead of running eagerly
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("cuStreamBeginCapture"))?;
        let mut open = Open(self, true);
        let ran = step();
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(driver("cuStreamEndCapture / cuGraphInstantiate"));
        // cudarc's end_capture may fail before it ends the capture (binding the context);
        // otherwise the capture is over, whatever else failed
        open.1 = graph.is_err();
        drop(open);
        ran?;
        match graph? {
            Some(g) => Ok(CudaExec(g)),
            None => Err(Error::cuda(
                "cuStreamEndCapture",
                "the capture recorded nothing",
            )),
        }
    }

    /// Ends the stream's capture if one is still open, and destroys what it captured.
    fn abandon_capture(&self) {
        let _ = self.bind();
        let s = self.stream.cu_stream();
        // SAFETY: `s` is our stream; ending a capture that is not open returns an error and
        // changes nothing; the graph it returns is ours, destroyed here and never instantiated.
        unsafe {
            if let Ok(g) = cudarc::driver::result::stream::end_capture(s) {
                if !g.is_null() {
                    let _ = cudarc::driver::result::graph::destroy(g);
                }
            }
        }
    }
}

impl Drop for CudaDevice {
    /// Waits for the queued work before the fields go (modules unloaded, cuBLASLt's handle and
    /// workspace released, buffers freed), so nothing is released under a running kernel.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .finish()
    }
}

fn driver(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(what, e)
}

/// Makes the device's default memory pool (where cudarc's stream-ordered allocations come from)
/// keep the memory freed into it instead of handing it back to the driver at every synchronize
/// (its release threshold is 0 by default): a step that frees and allocates again, every step,
/// then reuses the pool's memory instead of mapping new memory each time. Nothing to do where
/// the device has no memory pools (allocations are then synchronous `cuMemAlloc`).
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(driver("memory pools supported"))?;
    if pools == 0 {
        return Ok(());
    }
    ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` is a valid out-pointer for one handle and `ctx.cu_device()` a device the
    // driver enumerated; the release threshold attribute takes a pointer to a u64 (cuuint64_t),
    // which `threshold` is, alive across the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(driver("cuDeviceGetDefaultMemPool"))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(driver("cuMemPoolSetAttribute(release threshold)"))
    }
}

/// Bytes the device's current memory pool (where cuMemAllocAsync takes memory from: the default
/// pool, [`keep_freed_memory`]) holds without a live allocation in them (reserved minus used);
/// 0 where the device has no memory pools.
fn pool_idle(ctx: &CudaContext) -> Result<usize> {
    use cudarc::driver::sys;
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(driver("memory pools supported"))?;
    if pools == 0 {
        return Ok(0);
    }
    ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let (mut reserved, mut used) = (0u64, 0u64);
    // SAFETY: `pool` is a valid out-pointer for one handle and `ctx.cu_device()` a device the
    // driver enumerated; both attributes write one u64 (cuuint64_t) through the pointer, and
    // `reserved` and `used` are u64s alive across the calls.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(driver("cuDeviceGetMemPool"))?;
        for (attr, out) in [
            (
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut reserved,
            ),
            (
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                &mut used,
            ),
        ] {
            sys::cuMemPoolGetAttribute(pool, attr, out as *mut u64 as *mut std::ffi::c_void)
                .result()
                .map_err(driver("cuMemPoolGetAttribute"))?;
        }
    }
    Ok(usize::try_from(reserved.saturating_sub(used)).unwrap_or(usize::MAX))
}

impl CudaDevice {
    /// Opens GPU `ordinal`: its context, a stream, the kernels and cuBLASLt.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe().map_err(|why| Error::cuda("--device cuda", why))?;
        if ordinal >= count {
            return Err(Error::cuda(
                "--device cuda",
                format!("GPU {ordinal} asked for, the driver sees {count}"),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtx (primary context)"))?;
        // SAFETY: one stream only: every op is ordered on it, and a buffer is freed in stream
        // order (cuMemFreeAsync on the same stream when it drops), after every op that used it.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        // an optimisation only: a driver that refuses it leaves the default, which works
        let _ = keep_freed_memory(&ctx);
        let cc = ctx
            .compute_capability()
            .map_err(driver("compute capability"))?;
        let gpu = ctx.name().map_err(driver("device name"))?;
        let launcher = CudaLaunch::new(&ctx, &stream, cc)?;
        let blas = matmul::Blas::new(&stream)?;
        let name = format!(
            "cuda:{ordinal} ({gpu}, sm_{}{}, {} SMs, {} kernels)",
            cc.0,
            cc.1,
            launcher.sm_count(),
            launcher.code_kind()
        );
        Ok(CudaDevice {
            ctx,
            stream,
            launcher,
            blas,
            name,
            dtype: Dtype::Bf16,
            scratch: ScratchCache::default(),
        })
    }

    /// This device with working dtype `dtype` (bf16 by default; f32 for parity with the CPU).
    pub fn with_work_dtype(mut self, dtype: Dtype) -> Result<Self> {
        match dtype {
            Dtype::F32 | Dtype::Bf16 => {
                self.dtype = dtype;
                Ok(self)
            }
            _ => Err(Error::invalid(
                "precision",
                format!("the kernels store f32 or bf16, not {dtype}"),
            )),
        }
    }

    /// The launch backend the ops use.
    pub fn launcher(&self) -> &CudaLaunch {
        &self.launcher
    }

    /// Makes our context the calling thread's current one, for raw driver calls (cudarc's own
    /// calls do this themselves; the device is `Sync`, so any thread may call).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))
    }

    /// Waits for every op issued so far (and reports a kernel fault, if one happened).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }

    /// Seconds `iters` calls of `f` take on the GPU, timed with CUDA events recorded on the
    /// stream before the first and after the last (launch overhead included, host waits not).
    pub fn time(&self, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(timing)
            .map_err(driver("cuEventRecord"))?;
        for _ in 0..iters {
            f()?;
        }
        let end = self
            .stream
            .record_event(timing)
            .map_err(driver("cuEventRecord"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver("cuEventElapsedTime"))?;
        Ok(f64::from(ms) / 1e3)
    }

    /// (free, total) bytes of device memory. Free counts the memory this device's pool holds
    /// unused (freed buffers it keeps, [`keep_freed_memory`]), which cuMemGetInfo counts as
    /// used although the next allocation takes it first (a driver that cannot say: none).
    pub fn memory(&self) -> Result<(usize, usize)> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver("cuMemGetInfo"))?;
        Ok((free.saturating_add(self.pool_idle().unwrap_or(0)), total))
    }

    /// Bytes the device's memory pool keeps without a live allocation in them (memory freed
    /// into it, kept for the next allocations); 0 where the device has no memory pools.
    pub fn pool_idle(&self) -> Result<usize> {
        pool_idle(&self.ctx)
    }

    fn alloc_typed(&self, n: usize, dtype: Dtype) -> Result<CudaBuf> {
        let size = match dtype {
            Dtype::F32 | Dtype::Bf16 => dtype.size(),
            _ => {
                return Err(Error::invalid(
                    "alloc",
                    format!("the kernels store f32 or bf16, not {dtype}"),
                ))
            }
        };
        let bytes = n
            .checked_mul(size)
            .ok_or_else(|| Error::invalid("alloc", format!("{n} elements overflow")))?;
        // cuMemAlloc refuses 0 bytes: an empty buffer holds one unused element.
        let mem = self
            .stream
            .alloc_zeros::<u8>(bytes.max(size))
            .map_err(driver("cuMemAlloc"))?;
        let addr = mem.device_ptr(&self.stream).0;
        Ok(CudaBuf {
            _mem: Arc::new(mem),
            addr,
            len: n,
            dtype,
        })
    }

    /// One allocation of `bytes` (not zeroed: no memset over a pass's activations each time
    /// they are made), a buffer per part.
    fn alloc_shared_typed(&self, bytes: usize, parts: &[super::Part]) -> Result<Vec<CudaBuf>> {
        // the launchers trust each buffer to lie in its allocation: checked here
        super::gpu::check_kernel_parts(bytes, parts)?;
        // SAFETY: device memory holds no Rust values: its bytes are only ever read by kernels
        // and copies, and the buffers' contents are unspecified until written (the contract of
        // `alloc_shared`, whose callers write before they read; the emulated device, which
        // fills them with NaN, shows a read before a write in the tests).
        let mem = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(driver("cuMemAlloc"))?;
        let base = mem.device_ptr(&self.stream).0;
        let mem = Arc::new(mem);
        Ok(parts
            .iter()
            .map(|p| CudaBuf {
                _mem: Arc::clone(&mem),
                addr: base + p.offset as u64,
                len: p.len,
                dtype: p.dtype,
            })
            .collect())
    }

    fn write_typed(&self, dst: ViewMut<'_, CudaBuf>, host: &[f32]) -> Result<()> {
        crate::device::cpu::check_write(dst.len(), host.len())?;
        let (off, len) = range("write", "dst", &dst.as_view())?;
        if len == 0 {
            return Ok(());
        }
        let (buf, _, _) = dst.into_parts();
        let size = buf.dtype.size();
        let converted: Vec<bf16>;
        let bytes: &[u8] = match buf.dtype {
            Dtype::Bf16 => {
                converted = host.iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&converted)
            }
            _ => bytemuck::cast_slice(host),
        };
        let dst = buf.addr + (off * size) as u64;
        self.bind()?;
        // SAFETY: [dst, dst + len elements) lies in a live buffer of ours (checked by `range`;
        // `buf`, borrowed mutably, keeps its memory), `bytes` holds exactly len elements, and
        // the copy is ordered on our stream like every other use of the memory (from pageable
        // host memory it returns once `bytes` has been read).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyHtoD"))
    }

    fn download_typed(&self, x: View<'_, CudaBuf>) -> Result<Vec<f32>> {
        let (off, len) = range("download", "x", &x)?;
        let (buf, size) = (x.buf(), x.buf().dtype.size());
        let mut bytes = vec![0u8; len * size];
        if len > 0 {
            self.bind()?;
            // SAFETY: [src, src + len elements) lies in a live buffer (checked by `range`;
            // borrowed by `x`), `bytes` holds len elements, and the copy is ordered on our
            // stream; the synchronize below waits for it before `bytes` is read.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut bytes[..],
                    buf.addr + (off * size) as u64,
                    self.stream.cu_stream(),
                )
            }
            .map_err(driver("cuMemcpyDtoH"))?;
        }
        self.synchronize()?;
        Ok(match buf.dtype {
            Dtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        })
    }

    fn upload_ids_u32(&self, host: &[u32]) -> Result<CudaIds> {
        let mut mem = self
            .stream
            .alloc_zeros::<u32>(host.len().max(1))
            .map_err(driver("cuMemAlloc"))?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut mem.slice_mut(..host.len()))
                .map_err(driver("cuMemcpyHtoD"))?;
        }
        let addr = mem.device_ptr(&self.stream).0;
        let bound = host.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        Ok(CudaIds {
            mem,
            addr,
            len: host.len(),
            bound,
        })
    }

    /// `ids = host` in place (the same length); the ids' bound becomes the new values'.
    fn write_ids_u32(&self, ids: &mut CudaIds, host: &[u32]) -> Result<()> {
        crate::device::cpu::check_same("write_ids", "ids", ids.len, host.len())?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut ids.mem.slice_mut(..host.len()))
                .map_err(driver("cuMemcpyHtoD"))?;
        }
        ids.bound = host.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        Ok(())
    }

    fn download_ids_u32(&self, ids: &CudaIds) -> Result<Vec<u32>> {
        let mut host = vec![0u32; ids.len];
        if ids.len > 0 {
            self.stream
                .memcpy_dtoh(&ids.mem.slice(..ids.len), &mut host)
                .map_err(driver("cuMemcpyDtoH"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    fn fill_typed(&self, x: ViewMut<'_, CudaBuf>, value: f32) -> Result<()> {
        let dtype = x.dtype();
        let (off, len) = range("fill", "x", &x.as_view())?;
        if len == 0 {
            return Ok(());
        }
        let addr = x.into_parts().0.addr + (off * dtype.size()) as u64;
        let s = self.stream.cu_stream();
        self.bind()?;
        // SAFETY: [addr, addr + len elements) lies in a live buffer of ours (checked by
        // `range`), and the memset is ordered on our stream like every other use of it.
        let r = unsafe {
            match dtype {
                Dtype::Bf16 => cudarc::driver::sys::cuMemsetD16Async(
                    addr,
                    bf16::from_f32(value).to_bits(),
                    len,
                    s,
                ),
                _ => cudarc::driver::sys::cuMemsetD32Async(addr, value.to_bits(), len, s),
            }
        };
        r.result().map_err(driver("cuMemsetAsync"))
    }

    fn copy_typed(&self, dst: ViewMut<'_, CudaBuf>, src: View<'_, CudaBuf>) -> Result<()> {
        crate::device::cpu::check_same("copy", "dst", dst.len(), src.len())?;
        let size = src.dtype().size();
        if dst.dtype() != src.dtype() {
            return Err(Error::invalid(
                "copy",
                format!("dst is {}, src {}", dst.dtype(), src.dtype()),
            ));
        }
        let (soff, len) = range("copy", "src", &src)?;
        let (doff, _) = range("copy", "dst", &dst.as_view())?;
        if len == 0 {
            return Ok(());
        }
        let s = src.buf().addr + (soff * size) as u64;
        let d = dst.into_parts().0.addr + (doff * size) as u64;
        let bytes = (len * size) as u64;
        if super::bytes_meet((s, bytes), (d, bytes)) {
            // parts of one shared allocation (`alloc_shared`) that overlap
            return Err(Error::invalid("copy", "dst and src share memory"));
        }
        self.bind()?;
        // SAFETY: both ranges lie in live buffers of ours (checked by `range`), hold the same
        // number of elements of one dtype, and do not overlap (checked above); ordered on our
        // stream.
        unsafe {
            cudarc::driver::sys::cuMemcpyDtoDAsync_v2(d, s, len * size, self.stream.cu_stream())
        }
        .result()
        .map_err(driver("cuMemcpyDtoDAsync"))
    }
}

/// `[off, off+len)` of a view, checked against its buffer.
fn range<B: DeviceBuf>(op: &'static str, what: &str, v: &View<'_, B>) -> Result<(usize, usize)> {
    let (off, len, total) = (v.offset(), v.len(), v.buf().len());
    if off.checked_add(len).is_some_and(|end| end <= total) {
        Ok((off, len))
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: view {off}+{len} outside buffer of {total}"),
        ))
    }
}

/// A view's buffer must hold S.
fn check_dtype<S: Storage>(op: &'static str, what: &str, got: Dtype) -> Result<()> {
    if got == S::DTYPE {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what} is {got}, expected {}", S::DTYPE),
        ))
    }
}

/// The device address range a read-only view of S covers.
pub(crate) fn dev_in<'a, S: Storage>(
    op: &'static str,
    what: &str,
    v: View<'a, CudaBuf>,
) -> Result<DevPtr<'a, S>> {
    check_dtype::<S>(op, what, v.dtype())?;
    let (off, len) = range(op, what, &v)?;
    Ok(DevPtr::new(
        v.buf().addr + (off * size_of::<S>()) as u64,
        len,
    ))
}

/// The device address range a writable view of S covers.
pub(crate) fn dev_out<'a, S: Storage>(
    op: &'static str,
    what: &str,
    v: ViewMut<'a, CudaBuf>,
) -> Result<DevPtr<'a, S>> {
    check_dtype::<S>(op, what, v.dtype())?;
    let (off, len) = range(op, what, &v.as_view())?;
    let (buf, _, _) = v.into_parts();
    Ok(DevPtr::new(buf.addr + (off * size_of::<S>()) as u64, len))
}

#[cfg(test)]
mod tests {
    use super::cublaslt_version_ok;

    #[test]
    fn cublaslt_major_version_is_checked() {
        assert!(cublaslt_version_ok(130_000).is_ok());
        assert!(cublaslt_version_ok(130_102).is_ok());
        let e = cublaslt_version_ok(120_405).unwrap_err();
        assert!(
            e.contains("version 12.4.5") && e.contains("libcublasLt.so.13"),
            "{e}"
        );
        assert!(cublaslt_version_ok(140_000).is_err());
    }
}
