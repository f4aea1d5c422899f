//! [`EmuDevice`]: the CUDA device's code path on the CPU. Every op but matmul runs the real
//! kernel of `kernels/*.cu` through its launcher ([`super::gpu`]) on the emulator of the CUDA
//! execution model ([`super::emu`]), so that the model's forward and backward, training steps
//! and generation can run "on the GPU code path" where there is no GPU (CI).
//!
//! Memory is host memory: [`EmuBuf`] (f32 or bf16 elements, as the CUDA device's buffers) and
//! [`Vec<u32>`] ids. What is not a kernel on the GPU runs on the host:
//! - `alloc`, `upload`, `write`, `download`, `upload_ids`, `download_ids`, `fill` and `copy`
//!   between buffers of one dtype are memory operations (cuMemAlloc, cuMemcpy, cuMemset) on
//!   the GPU, not kernels of ours (`copy` between dtypes launches the `convert` kernel, here as
//!   there);
//! - `matmul` is cuBLASLt on the GPU, a library whose kernels cannot be emulated: the CPU GEMM
//!   on the operands widened to f32, the result rounded once to c's dtype.
//!
//! Every other op launches its kernel(s) of the buffers' dtype (`_f32` or `_bf16`), mapped onto
//! the launchers once for this device and the CUDA device ([`KernelDevice`]), here with host
//! slices as the pointers. The working dtype ([`Device::work_dtype`]) is f32 unless
//! [`EmuDevice::with_work_dtype`] says bf16. Launches are serialised inside the emulator, so
//! this device is slow (milliseconds per launch): tiny models only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use half::bf16;

use super::cpu::{check_same, check_write, CpuDevice};
use super::emu::{EmuMode, SharedMem};
use super::gpu::graph::Call;
use super::gpu::kernel_device::{check_addend, KernelDevice};
use super::gpu::ptr::SharedPtr;
use super::gpu::scratch::ScratchCache;
use super::gpu::{EmuLaunch, Ids, In, Out};
use super::{bytes_meet, Device, DeviceBuf, Dtype, Part, Storage, View, ViewMut};
use crate::{Error, Result};

/// Host memory of one storage type: the emulated device's buffer.
#[derive(Debug)]
pub enum EmuBuf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// elements in memory other buffers may share ([`Device::alloc_shared`])
    Shared(SharedPart),
}

/// `len` elements of `dtype` at byte `offset` of a shared memory: made only by
/// [`Device::alloc_shared`], which checks that the part lies in the memory, aligned.
#[derive(Debug)]
pub struct SharedPart {
    mem: Arc<SharedMem>,
    offset: usize,
    len: usize,
    dtype: Dtype,
}

impl DeviceBuf for EmuBuf {
    fn len(&self) -> usize {
        match self {
            EmuBuf::F32(v) => v.len(),
            EmuBuf::Bf16(v) => v.len(),
            EmuBuf::Shared(p) => p.len,
        }
    }
    fn dtype(&self) -> Dtype {
        match self {
            EmuBuf::F32(_) => Dtype::F32,
            EmuBuf::Bf16(_) => Dtype::Bf16,
            EmuBuf::Shared(p) => p.dtype,
        }
    }
}

/// Where a view of a shared buffer lies: its memory and the byte offset of its first element.
fn shared_at<'a>(
    op: &'static str,
    what: &str,
    v: View<'a, EmuBuf>,
) -> Result<Option<(&'a SharedMem, usize)>> {
    let EmuBuf::Shared(p) = v.buf() else {
        return Ok(None);
    };
    let r = range(op, what, v.offset(), v.len(), p.len)?;
    Ok(Some((&p.mem, p.offset + r.start * v.dtype().size())))
}

/// A view's range, checked against its buffer.
fn range(
    op: &'static str,
    what: &str,
    off: usize,
    len: usize,
    total: usize,
) -> Result<std::ops::Range<usize>> {
    match off.checked_add(len) {
        Some(end) if end <= total => Ok(off..end),
        _ => Err(Error::invalid(
            op,
            format!("{what}: view {off}+{len} outside buffer of {total}"),
        )),
    }
}

fn wrong_dtype(op: &'static str, what: &str, got: Dtype, want: Dtype) -> Error {
    Error::invalid(op, format!("{what} is {got}, expected {want}"))
}

/// The elements a view covers, as S (an error if the buffer holds another type).
fn slice<'a, S: Storage>(op: &'static str, what: &str, v: View<'a, EmuBuf>) -> Result<&'a [S]> {
    let r = range(op, what, v.offset(), v.len(), v.buf().len())?;
    let got = v.dtype();
    let s: Option<&[S]> = match v.buf() {
        EmuBuf::F32(x) => bytemuck::try_cast_slice(&x[r]).ok(),
        EmuBuf::Bf16(x) => bytemuck::try_cast_slice(&x[r]).ok(),
        EmuBuf::Shared(_) => return Err(shared_slice(op, what)),
    };
    s.filter(|_| got == S::DTYPE)
        .ok_or_else(|| wrong_dtype(op, what, got, S::DTYPE))
}

fn slice_mut<'a, S: Storage>(
    op: &'static str,
    what: &str,
    v: ViewMut<'a, EmuBuf>,
) -> Result<&'a mut [S]> {
    let got = v.dtype();
    let (buf, off, len) = v.into_parts();
    let r = range(op, what, off, len, buf.len())?;
    if got != S::DTYPE {
        return Err(wrong_dtype(op, what, got, S::DTYPE));
    }
    let s: Option<&mut [S]> = match buf {
        EmuBuf::F32(x) => bytemuck::try_cast_slice_mut(&mut x[r]).ok(),
        EmuBuf::Bf16(x) => bytemuck::try_cast_slice_mut(&mut x[r]).ok(),
        EmuBuf::Shared(_) => return Err(shared_slice(op, what)),
    };
    s.ok_or_else(|| wrong_dtype(op, what, got, S::DTYPE))
}

/// Whether two views share memory (parts of one shared allocation that overlap).
fn meet(x: View<'_, EmuBuf>, y: View<'_, EmuBuf>) -> bool {
    let at = |v: View<'_, EmuBuf>| match v.buf() {
        EmuBuf::Shared(p) => {
            let size = p.dtype.size();
            let range = (
                (p.offset + v.offset() * size) as u64,
                (v.len() * size) as u64,
            );
            Some((Arc::as_ptr(&p.mem), range))
        }
        _ => None,
    };
    match (at(x), at(y)) {
        (Some((mx, xr)), Some((my, yr))) => std::ptr::eq(mx, my) && bytes_meet(xr, yr),
        _ => false,
    }
}

/// Shared memory is never borrowed as a slice (another buffer may overlap it).
fn shared_slice(op: &'static str, what: &str) -> Error {
    Error::invalid(op, format!("{what}: shared memory is not lent as a slice"))
}

/// A view of a shared buffer as a kernel argument (its address; no reference is made).
fn shared_ptr<'a, S: Storage>(
    op: &'static str,
    what: &str,
    v: View<'a, EmuBuf>,
) -> Result<Option<SharedPtr<'a, S>>> {
    let got = v.dtype();
    if got != S::DTYPE {
        return Err(wrong_dtype(op, what, got, S::DTYPE));
    }
    // the view lies in its part (checked by `shared_at`), the part in its memory (checked when
    // it was made)
    Ok(shared_at(op, what, v)?.map(|(mem, at)| SharedPtr::new(mem.addr() + at as u64, v.len())))
}

/// A view's elements as f32.
fn to_f32(op: &'static str, what: &str, v: View<'_, EmuBuf>) -> Result<Vec<f32>> {
    if let Some((mem, at)) = shared_at(op, what, v)? {
        return Ok(match v.dtype() {
            Dtype::Bf16 => mem
                .read::<bf16>(at, v.len())?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            _ => mem.read::<f32>(at, v.len())?,
        });
    }
    Ok(match v.dtype() {
        Dtype::Bf16 => slice::<bf16>(op, what, v)?
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        _ => slice::<f32>(op, what, v)?.to_vec(),
    })
}

/// `dst = host`, rounded to dst's type.
fn from_f32(op: &'static str, what: &str, dst: ViewMut<'_, EmuBuf>, host: &[f32]) -> Result<()> {
    if let Some((mem, at)) = shared_at(op, what, dst.as_view())? {
        check_same(op, what, dst.len(), host.len())?;
        return match dst.dtype() {
            Dtype::Bf16 => {
                let h: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
                mem.write(at, &h)
            }
            _ => mem.write(at, host),
        };
    }
    match dst.dtype() {
        Dtype::Bf16 => {
            let d = slice_mut::<bf16>(op, what, dst)?;
            check_same(op, what, d.len(), host.len())?;
            d.iter_mut()
                .zip(host)
                .for_each(|(d, &h)| *d = bf16::from_f32(h));
        }
        _ => {
            let d = slice_mut::<f32>(op, what, dst)?;
            check_same(op, what, d.len(), host.len())?;
            d.copy_from_slice(host);
        }
    }
    Ok(())
}

/// A view's elements as S, copied out (shared memory or a host vector).
fn shared_or_slice<S: Storage>(
    op: &'static str,
    what: &str,
    v: View<'_, EmuBuf>,
) -> Result<Vec<S>> {
    match shared_at(op, what, v)? {
        Some((mem, at)) => mem.read::<S>(at, v.len()),
        None => Ok(slice::<S>(op, what, v)?.to_vec()),
    }
}

/// `dst = src` of dst's type S (shared memory or a host vector).
fn write_as<S: Storage>(
    op: &'static str,
    what: &str,
    dst: ViewMut<'_, EmuBuf>,
    src: &[S],
) -> Result<()> {
    check_same(op, what, dst.len(), src.len())?;
    match shared_at(op, what, dst.as_view())? {
        Some((mem, at)) => mem.write(at, src),
        None => {
            slice_mut::<S>(op, what, dst)?.copy_from_slice(src);
            Ok(())
        }
    }
}

/// The emulated CUDA device (see the module docs).
#[derive(Debug)]
pub struct EmuDevice {
    launcher: EmuLaunch,
    budget: Option<usize>,
    dtype: Dtype,
    scratch: ScratchCache<EmuBuf>,
    /// memory operations and matmuls so far (see [`EmuDevice::device_calls`])
    host_calls: AtomicU64,
    /// calls made inside replayed graphs, which a GPU makes as one graph launch
    replayed: AtomicU64,
    /// matmul calls so far (see [`EmuDevice::matmuls`])
    matmuls: AtomicU64,
}

impl EmuDevice {
    /// Launches run in `mode`; `seed` drives Reversed mode's block order (varied per launch).
    /// Working dtype f32 (the CPU twins' precision).
    pub fn new(mode: EmuMode, seed: u64) -> Self {
        EmuDevice {
            launcher: EmuLaunch::new(mode, seed),
            budget: None,
            dtype: Dtype::F32,
            scratch: ScratchCache::default(),
            host_calls: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            matmuls: AtomicU64::new(0),
        }
    }

    /// This device with working dtype `dtype` (f32 or bf16: [`Device::work_dtype`]).
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

    /// This device with a fixed memory of `bytes`, as a GPU has: runs plan against it
    /// ([`Device::memory_budget`]) and fail before their first step when they do not fit.
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.budget = Some(bytes);
        self
    }

    /// This device sizing grids for `sms` SMs (the launchers' choices that depend on the GPU's
    /// size: grid-stride caps, decode attention's split, the attention forward's rows per
    /// block), instead of an H100's 132.
    pub fn with_sms(mut self, sms: usize) -> Self {
        self.launcher.sms = sms.max(1);
        self
    }

    pub fn mode(&self) -> EmuMode {
        self.launcher.mode
    }

    pub fn seed(&self) -> u64 {
        self.launcher.seed
    }

    /// The launch backend the ops use.
    pub fn launcher(&self) -> &EmuLaunch {
        &self.launcher
    }

    /// The calls into the driver or cuBLASLt the CUDA device would have made so far: kernel
    /// launches, memory operations (alloc, upload, write, download, fill, copy) and matmuls.
    /// Each costs the host a few microseconds on a GPU, which is what a batch-1 decode step
    /// waits on when it makes too many.
    pub fn device_calls(&self) -> u64 {
        self.launcher.launches() + self.host_calls.load(Ordering::Relaxed)
            - self.replayed.load(Ordering::Relaxed)
    }

    /// The matmul calls (and matmul_adds) so far, replayed ones and refused ones included: each
    /// is one cuBLASLt call on a GPU, so this counts what fusing two GEMMs into one saves.
    pub fn matmuls(&self) -> u64 {
        self.matmuls.load(Ordering::Relaxed)
    }

    /// Steps captured for replay so far ([`Device::replay`]): a step whose launches change from
    /// call to call is captured every time, which on a GPU costs more than it saves.
    pub fn graph_captures(&self) -> u64 {
        self.launcher.recorder_counts()[0]
    }

    /// One more memory operation or matmul. Made while a step records, it is one the step's
    /// graph would not hold (each is recorded or refused before it gets here): the recording
    /// fails, so the record is complete wherever a replay is accepted.
    fn host_call(&self) {
        self.host_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = super::gpu::Launch::recorder(&self.launcher) {
            r.fail_recording(&|| "a device call made, not recorded, while recording".into());
        }
    }

    /// `n` calls that a GPU would not have made (they were one graph launch).
    fn uncount(&self, n: u64) {
        self.replayed.fetch_add(n, Ordering::Relaxed);
    }
}

impl KernelDevice for EmuDevice {
    type Buf = EmuBuf;
    type Ids = Vec<u32>;
    type Launcher = EmuLaunch;

    fn launcher(&self) -> &EmuLaunch {
        &self.launcher
    }

    /// No graph object: a replay runs the step again (the record showed that it makes the
    /// captured launches and matmuls, and that it makes no other device call: one would have
    /// failed the recording), and counts as one call, the graph launch a GPU makes.
    type Exec = ();
    fn capture(&self, _calls: &[Call], _step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        Ok(())
    }
    fn run_graph(&self, _exec: &(), step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let before = self.device_calls();
        step()?;
        // the step's calls made no driver calls on a GPU: one graph launch did
        let made = self.device_calls() - before;
        self.uncount(made.saturating_sub(1));
        Ok(())
    }

    fn input<'a, S: Storage>(
        op: &'static str,
        what: &str,
        v: View<'a, EmuBuf>,
    ) -> Result<In<'a, S>> {
        match shared_ptr(op, what, v)? {
            Some(p) => Ok(In::Shared(p)),
            None => slice(op, what, v).map(In::Host),
        }
    }
    fn output<'a, S: Storage>(
        op: &'static str,
        what: &str,
        v: ViewMut<'a, EmuBuf>,
    ) -> Result<Out<'a, S>> {
        match shared_ptr::<S>(op, what, v.as_view())? {
            // the address outlives the view's borrow of the buffer only as a number: the
            // memory is kept by the buffer, which `v` borrows for 'a
            Some(p) => Ok(Out::Shared(SharedPtr::new(p.addr(), p.len()))),
            None => slice_mut(op, what, v).map(Out::Host),
        }
    }
    fn ids(ids: &Vec<u32>) -> Ids<'_> {
        Ids::Host(ids)
    }
    fn ids_out(ids: &mut Vec<u32>) -> Out<'_, u32> {
        Out::Host(ids)
    }
    /// Host ids carry no bound: the launchers check their values.
    fn ids_written(_ids: &mut Vec<u32>, _bound: usize) {}
    fn scratch(&self) -> &ScratchCache<EmuBuf> {
        &self.scratch
    }
    fn accumulate_f64(&self, launch: impl FnOnce(Out<'_, f64>) -> Result<()>) -> Result<f64> {
        let mut acc = [0f64; 1];
        launch(Out::Host(&mut acc[..]))?;
        Ok(acc[0])
    }

    fn name(&self) -> String {
        format!("emulated cuda ({:?}, {})", self.launcher.mode, self.dtype)
    }

    fn memory_budget(&self) -> Result<Option<usize>> {
        Ok(self.budget)
    }

    fn work_dtype(&self) -> Dtype {
        self.dtype
    }

    // ---- memory: host operations (cuMem* on the GPU)

    fn alloc_as(&self, n: usize, dtype: Dtype) -> Result<EmuBuf> {
        self.host_call();
        match dtype {
            Dtype::F32 => Ok(EmuBuf::F32(vec![0.0; n])),
            Dtype::Bf16 => Ok(EmuBuf::Bf16(vec![bf16::ZERO; n])),
            _ => Err(Error::invalid(
                "alloc",
                format!("the kernels store f32 or bf16, not {dtype}"),
            )),
        }
    }
    fn alloc_shared(&self, bytes: usize, parts: &[Part]) -> Result<Vec<EmuBuf>> {
        self.host_call();
        // the kernel path trusts each part to lie in the memory: checked here
        super::gpu::check_kernel_parts(bytes, parts)?;
        // NaN where nothing was written yet: a read before a write shows in the results
        let mem = Arc::new(SharedMem::new(bytes, 0xFF));
        Ok(parts
            .iter()
            .map(|p| {
                EmuBuf::Shared(SharedPart {
                    mem: Arc::clone(&mem),
                    offset: p.offset,
                    len: p.len,
                    dtype: p.dtype,
                })
            })
            .collect())
    }
    fn upload(&self, host: &[f32]) -> Result<EmuBuf> {
        self.host_call();
        Ok(EmuBuf::F32(host.to_vec()))
    }
    fn write(&self, dst: ViewMut<'_, EmuBuf>, host: &[f32]) -> Result<()> {
        self.host_call();
        check_write(dst.len(), host.len())?;
        from_f32("write", "dst", dst, host)
    }
    fn download(&self, x: View<'_, EmuBuf>) -> Result<Vec<f32>> {
        self.host_call();
        to_f32("download", "x", x)
    }
    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        self.host_call();
        CpuDevice.upload_ids(host)
    }
    fn write_ids(&self, ids: &mut Vec<u32>, host: &[u32]) -> Result<()> {
        self.host_call();
        CpuDevice.write_ids(ids, host)
    }
    fn download_ids(&self, ids: &Vec<u32>) -> Result<Vec<u32>> {
        self.host_call();
        CpuDevice.download_ids(ids)
    }
    fn fill(&self, x: ViewMut<'_, EmuBuf>, value: f32) -> Result<()> {
        self.host_call();
        if let Some((mem, at)) = shared_at("fill", "x", x.as_view())? {
            return match x.dtype() {
                Dtype::Bf16 => mem.fill(at, x.len(), bf16::from_f32(value)),
                _ => mem.fill(at, x.len(), value),
            };
        }
        match x.dtype() {
            Dtype::Bf16 => slice_mut("fill", "x", x)?.fill(bf16::from_f32(value)),
            _ => slice_mut("fill", "x", x)?.fill(value),
        }
        Ok(())
    }
    fn copy_same(&self, dst: ViewMut<'_, EmuBuf>, src: View<'_, EmuBuf>) -> Result<()> {
        self.host_call();
        const OP: &str = "copy";
        check_same(OP, "dst", dst.len(), src.len())?;
        if dst.dtype() != src.dtype() {
            return Err(wrong_dtype(OP, "dst", dst.dtype(), src.dtype()));
        }
        if meet(dst.as_view(), src) {
            return Err(Error::invalid(OP, "dst and src share memory"));
        }
        if matches!(dst.as_view().buf(), EmuBuf::Shared(_))
            || matches!(src.buf(), EmuBuf::Shared(_))
        {
            // through the host, in the dtype (a copy does not round)
            return match src.dtype() {
                Dtype::Bf16 => {
                    let v = shared_or_slice::<bf16>(OP, "src", src)?;
                    write_as(OP, "dst", dst, &v)
                }
                _ => {
                    let v = shared_or_slice::<f32>(OP, "src", src)?;
                    write_as(OP, "dst", dst, &v)
                }
            };
        }
        match src.dtype() {
            Dtype::Bf16 => {
                slice_mut::<bf16>(OP, "dst", dst)?.copy_from_slice(slice(OP, "src", src)?)
            }
            _ => slice_mut::<f32>(OP, "dst", dst)?.copy_from_slice(slice(OP, "src", src)?),
        }
        Ok(())
    }

    /// cuBLASLt on the GPU, which cannot be emulated: the CPU GEMM on the operands as f32, the
    /// result rounded once to c's dtype (as cuBLASLt with f32 compute does).
    fn matmul(
        &self,
        c: ViewMut<'_, EmuBuf>,
        x: Option<View<'_, EmuBuf>>,
        a: View<'_, EmuBuf>,
        b: View<'_, EmuBuf>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "matmul";
        self.host_call();
        self.matmuls.fetch_add(1, Ordering::Relaxed);
        check_matmul_dtypes(a.dtype(), b.dtype(), c.dtype())?;
        if meet(c.as_view(), a) || meet(c.as_view(), b) {
            // as the CUDA device: cuBLASLt must not write what it reads
            return Err(Error::invalid(OP, "c shares memory with a or b"));
        }
        if let Some(x) = x {
            // matmul_add: the addend is x, converted as a and b are
            check_addend(x.dtype(), x.len(), c.dtype(), c.len())?;
            if meet(c.as_view(), x) {
                return Err(Error::invalid("matmul_add", "d shares memory with x"));
            }
            let (a, b, mut cf) = (
                to_f32(OP, "a", a)?,
                to_f32(OP, "b", b)?,
                to_f32(OP, "x", x)?,
            );
            let (av, bv) = (View::all(&a), View::all(&b));
            let cm = ViewMut::all(&mut cf);
            CpuDevice.matmul(cm, av, bv, m, n, k, ta, tb, alpha, beta)?;
            return from_f32(OP, "c", c, &cf);
        }
        // all f32: the CPU GEMM on the buffers themselves, nothing to convert
        // (not shared memory: that goes through copies, below)
        let c_vec = matches!(c.as_view().buf(), EmuBuf::F32(_));
        if let (EmuBuf::F32(av), EmuBuf::F32(bv), true) = (a.buf(), b.buf(), c_vec) {
            let (cb, coff, clen) = c.into_parts();
            let EmuBuf::F32(cv) = cb else {
                return Err(wrong_dtype(OP, "c", Dtype::Bf16, Dtype::F32));
            };
            let (a, b) = (
                View::range(av, a.offset(), a.len()),
                View::range(bv, b.offset(), b.len()),
            );
            let c = ViewMut::range(cv, coff, clen);
            return CpuDevice.matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
        }
        let (a, b) = (to_f32(OP, "a", a)?, to_f32(OP, "b", b)?);
        let mut cf = to_f32(OP, "c", c.as_view())?;
        CpuDevice.matmul(
            ViewMut::all(&mut cf),
            View::all(&a),
            View::all(&b),
            m,
            n,
            k,
            ta,
            tb,
            alpha,
            beta,
        )?;
        from_f32(OP, "c", c, &cf)
    }
}

/// a and b share a dtype; c has theirs or is f32 (what the devices' matmul takes).
pub(crate) fn check_matmul_dtypes(a: Dtype, b: Dtype, c: Dtype) -> Result<()> {
    if a == b && (c == a || c == Dtype::F32) {
        Ok(())
    } else {
        Err(Error::invalid(
            "matmul",
            format!("a {a}, b {b}, c {c}: a and b must share a dtype, c have theirs or be f32"),
        ))
    }
}
