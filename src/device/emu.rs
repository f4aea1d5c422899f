//! The bridge to the CPU emulator of the CUDA execution model (`emu/`, built by
//! `build/emu.rs`): every `kernels/*.cu` compiled as C++ and linked into this library, launched
//! by name with the same argument packing as `cuLaunchKernel`.
//!
//! [`EmuArgs`] packs kernel arguments the way the driver takes them (one pointer per parameter,
//! pointing at the parameter's value); [`EmuArgs::kernel_params`] hands that array to either
//! [`launch`] (the emulator) or, in the CUDA device, `cuLaunchKernel`. Here device pointers are
//! host pointers into slices borrowed for the life of the `EmuArgs`; [`EmuArgs::device_ptr`]
//! packs a real device address for the CUDA path (the emulator refuses it).
//!
//! Before launching, [`launch`] checks the packed arguments against the kernel's signature as
//! its registration recorded it: the count, each size, scalar vs pointer, const vs mutable
//! pointee (a kernel that writes through a parameter must get a slice borrowed mutably), and the
//! pointee size. What the kernel does with the pointers (staying in bounds) is its launcher's
//! contract, checked on lengths and dims before launching, as for the GPU.
//!
//! Launches are serialised inside the emulator (one at a time in the process).

// Without a C++ compiler at build time only the error path of `launch` is compiled.
#![cfg_attr(not(nla_emu), allow(dead_code, unused_imports))]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;

use crate::{Error, Result};

/// How the emulator schedules the CUDA threads of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmuMode {
    /// Each CUDA thread a fiber, a warp at a time: between two block barriers a warp runs its
    /// whole stretch (its lanes in order, meeting at warp collectives) before the next warp;
    /// warps in index order, blocks in grid order.
    Forward = 0,
    /// Fibers, a warp at a time; warps and lanes in reverse index order, blocks in a random
    /// order drawn from the seed.
    Reversed = 1,
    /// One OS thread per CUDA thread (for ThreadSanitizer); much slower, use small grids.
    Threads = 2,
}

/// What a packed argument is; the values match `nla_emu::ParamKind` of `emu/cuda_emu.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Other = 0,
    PtrConst = 1,
    Float = 2,
    Int = 3,
    PtrMut = 4,
    /// A device address for the CUDA path: never valid in the emulator.
    Device = 5,
}

impl Kind {
    fn from_c(k: c_int) -> Kind {
        match k {
            1 => Kind::PtrConst,
            2 => Kind::Float,
            3 => Kind::Int,
            4 => Kind::PtrMut,
            _ => Kind::Other,
        }
    }
}

/// A scalar kernel parameter type (passed by value).
pub trait Scalar: bytemuck::Pod + private::Sealed {
    #[doc(hidden)]
    const FLOAT: bool;
}
mod private {
    pub trait Sealed {}
}
macro_rules! scalars {
    ($float:expr => $($t:ty),*) => {$(
        impl private::Sealed for $t {}
        impl Scalar for $t {
            const FLOAT: bool = $float;
        }
    )*};
}
scalars!(false => i8, u8, i16, u16, i32, u32, i64, u64, isize, usize);
scalars!(true => f32, f64);

/// Kernel arguments packed like `cuLaunchKernel`'s `kernelParams`: each value in its own 8-byte
/// slot, and one pointer per slot. `'a` is the borrow of the slices passed as pointers.
#[derive(Default)]
pub struct EmuArgs<'a> {
    slots: Vec<u64>,
    ptrs: Vec<*mut c_void>,
    sig: Vec<(usize, Kind, usize)>, // (size, kind, pointee size)
    /// Bytes of each pointer argument's slice (0 for the rest): the memory check's bounds.
    extents: Vec<u64>,
    /// Bit i: parameter i is a pointer the kernel may write through ([`EmuArgs::overlap`]).
    written: u64,
    _borrows: PhantomData<&'a mut [u8]>,
}

impl<'a> EmuArgs<'a> {
    pub fn new() -> Self {
        // room for every kernel's parameters: one allocation per vector, not one per doubling
        // (a decode step packs ~10 calls per layer)
        const ROOM: usize = 24;
        EmuArgs {
            slots: Vec::with_capacity(ROOM),
            ptrs: Vec::new(),
            sig: Vec::with_capacity(ROOM),
            extents: Vec::with_capacity(ROOM),
            written: 0,
            _borrows: PhantomData,
        }
    }

    /// One parameter: its value, kind, pointee size and (for a slice) its length in bytes.
    fn push_bytes(&mut self, bytes: &[u8], kind: Kind, elem: usize, extent: usize) -> &mut Self {
        if kind == Kind::PtrMut {
            self.mark_written();
        }
        let mut slot = 0u64;
        bytemuck::bytes_of_mut(&mut slot)[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(slot);
        self.sig.push((bytes.len(), kind, elem));
        self.extents.push(extent as u64);
        self
    }

    /// A scalar parameter (`int n`, `float eps`, ...), by value.
    pub fn scalar<S: Scalar>(&mut self, v: S) -> &mut Self {
        let kind = if S::FLOAT { Kind::Float } else { Kind::Int };
        self.push_bytes(bytemuck::bytes_of(&v), kind, 0, 0)
    }

    /// A `const T*` parameter: the kernel only reads `s`.
    pub fn ptr<T: bytemuck::Pod>(&mut self, s: &'a [T]) -> &mut Self {
        let addr = s.as_ptr() as usize;
        self.push_bytes(
            bytemuck::bytes_of(&addr),
            Kind::PtrConst,
            size_of::<T>(),
            size_of_val(s),
        )
    }

    /// A `T*` parameter: the kernel may read and write `s`.
    pub fn ptr_mut<T: bytemuck::Pod>(&mut self, s: &'a mut [T]) -> &mut Self {
        let addr = s.as_mut_ptr() as usize;
        let bytes = size_of_val(s);
        self.push_bytes(
            bytemuck::bytes_of(&addr),
            Kind::PtrMut,
            size_of::<T>(),
            bytes,
        )
    }

    /// A null `const T*` parameter: an optional input that is absent (the kernel tests for
    /// null; an empty slice's pointer is not null).
    pub fn null<T: bytemuck::Pod>(&mut self) -> &mut Self {
        self.push_bytes(
            bytemuck::bytes_of(&0usize),
            Kind::PtrConst,
            size_of::<T>(),
            0,
        )
    }

    /// A null `T*` parameter: an optional output that is absent.
    pub fn null_mut<T: bytemuck::Pod>(&mut self) -> &mut Self {
        self.push_bytes(bytemuck::bytes_of(&0usize), Kind::PtrMut, size_of::<T>(), 0)
    }

    /// The parameter about to be pushed is written by the kernel (bit 63 stands for every
    /// parameter from the 64th on; no kernel has that many).
    fn mark_written(&mut self) {
        self.written |= 1 << self.slots.len().min(63);
    }

    /// A pointer into a [`SharedMem`] of `len` elements of `T` (`const T*`, or `T*` when
    /// `mutable`): packed as a host pointer, with no Rust reference made to the memory. Only
    /// the emulated device packs these, from its shared buffers (checked to lie in their
    /// memory).
    pub(crate) fn shared_ptr<T: bytemuck::Pod>(
        &mut self,
        addr: u64,
        len: usize,
        mutable: bool,
    ) -> &mut Self {
        let kind = if mutable {
            Kind::PtrMut
        } else {
            Kind::PtrConst
        };
        let bytes = len * size_of::<T>();
        self.push_bytes(&addr.to_ne_bytes(), kind, size_of::<T>(), bytes)
    }

    /// A device address (`CUdeviceptr`), for the CUDA launchers; [`launch`] refuses it.
    pub fn device_ptr(&mut self, addr: u64) -> &mut Self {
        self.push_bytes(&addr.to_ne_bytes(), Kind::Device, 0, 0)
    }

    /// The device address of `len` elements of T, written by the kernel when `mutable`: as
    /// [`device_ptr`](Self::device_ptr), with the extent [`overlap`](Self::overlap) checks.
    pub(crate) fn device_range<T>(&mut self, addr: u64, len: usize, mutable: bool) -> &mut Self {
        if mutable {
            self.mark_written();
        }
        self.push_bytes(&addr.to_ne_bytes(), Kind::Device, 0, len * size_of::<T>())
    }

    /// The first pair of pointer parameters (i, j) whose memory overlaps where the kernel
    /// writes i, if any. Slices borrowed from separate buffers never do; parts of one shared
    /// allocation ([`crate::device::Device::alloc_shared`]) can, which a kernel (whose
    /// pointers are `__restrict__`) must not get: both devices refuse such a launch.
    pub(crate) fn overlap(&self) -> Option<(usize, usize)> {
        let range = |i: usize| {
            let (_, kind, _) = self.sig[i];
            let (at, bytes) = (self.slots[i], self.extents[i]);
            let pointer = matches!(kind, Kind::PtrConst | Kind::PtrMut | Kind::Device);
            (pointer && at != 0).then_some((at, bytes))
        };
        let written = |i: usize| self.written & (1 << i.min(63)) != 0;
        (0..self.slots.len())
            .filter(|&i| written(i))
            .filter_map(|i| range(i).map(|r| (i, r)))
            .find_map(|(i, a)| {
                (0..self.slots.len())
                    .filter(|&j| j != i)
                    .find(|&j| range(j).is_some_and(|b| crate::device::bytes_meet(a, b)))
                    .map(|j| (i, j))
            })
    }

    /// [`overlap`](Self::overlap) as the error of a launch of kernel `name`.
    pub(crate) fn check_overlap(&self, name: &str) -> Result<()> {
        match self.overlap() {
            None => Ok(()),
            Some((i, j)) => Err(Error::invalid(
                "launch",
                format!(
                    "kernel `{name}`: parameter {i}, which it writes, overlaps parameter {j} in \
                     memory (buffers that share memory passed to one launch)"
                ),
            )),
        }
    }

    /// The index of the first packed argument that is a non-null host pointer (packed with
    /// [`ptr`](Self::ptr) / [`ptr_mut`](Self::ptr_mut), or [`input`](Self::input) /
    /// [`output`](Self::output) of a host slice), if any: the CUDA backend refuses such a launch
    /// (host memory means nothing to the GPU). Null pointers (absent optional arguments),
    /// device addresses and scalars are not host pointers.
    #[allow(dead_code)] // for the CUDA backend
    pub(crate) fn host_pointer(&self) -> Option<usize> {
        self.sig
            .iter()
            .zip(&self.slots)
            .position(|(&(_, kind, _), &v)| matches!(kind, Kind::PtrConst | Kind::PtrMut) && v != 0)
    }

    /// Every parameter's 8-byte slot (scalars, host or device addresses), in order.
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// `kernelParams` for `cuLaunchKernel` (or cudarc's `launch_kernel`): pointer i points at
    /// the value of parameter i. Valid while `self` is neither moved nor changed.
    pub fn kernel_params(&mut self) -> &mut [*mut c_void] {
        self.ptrs = self
            .slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        &mut self.ptrs
    }
}

/// Host memory that several buffers of the emulated device share
/// ([`crate::device::Device::alloc_shared`]): what the buffers of one GPU allocation are.
///
/// Buffers over it may overlap, so no Rust reference to it is ever kept: kernels get its
/// addresses as pointers (as a GPU's kernels do), and the host copies in and out of it with
/// [`SharedMem::read`], [`SharedMem::write`] and [`SharedMem::fill`]. Every access, those and
/// every kernel launch, holds the emulator's memory lock ([`memory_lock`]), so none of them
/// runs while another does (no data race, whichever threads hold the buffers).
pub struct SharedMem {
    /// 16-byte aligned (the kernels' vector accesses)
    cells: Box<[std::cell::UnsafeCell<u128>]>,
    bytes: usize,
}

// SAFETY: the cells are only accessed through raw pointers while the memory lock is held (see
// the type's docs), never through references, so sharing and sending the memory between
// threads cannot race.
unsafe impl Sync for SharedMem {}
// SAFETY: as for Sync: no thread-bound state, and every access holds the memory lock.
unsafe impl Send for SharedMem {}

impl std::fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedMem({} bytes at {:#x})", self.bytes, self.addr())
    }
}

/// The lock every access to a [`SharedMem`] holds, kernel launches included.
static MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the emulator's memory lock (a panic while it was held leaves nothing half-done that
/// matters here: the memory holds whatever was written).
pub(crate) fn memory_lock() -> std::sync::MutexGuard<'static, ()> {
    MEMORY.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedMem {
    /// `bytes` bytes, each `fill` (0xFF: every f32 and bf16 element a NaN).
    pub fn new(bytes: usize, fill: u8) -> Self {
        let v = u128::from_ne_bytes([fill; 16]);
        let cells = (0..bytes.div_ceil(16).max(1))
            .map(|_| std::cell::UnsafeCell::new(v))
            .collect();
        SharedMem { cells, bytes }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The address of byte 0.
    pub fn addr(&self) -> u64 {
        self.base() as u64
    }

    fn base(&self) -> *mut u8 {
        std::cell::UnsafeCell::raw_get(self.cells.as_ptr()).cast::<u8>()
    }

    /// `[off, off + n * size_of::<T>())` lies in the memory, at an offset aligned for T.
    fn check<T>(&self, off: usize, n: usize) -> Result<()> {
        let end = n
            .checked_mul(size_of::<T>())
            .and_then(|b| b.checked_add(off));
        if end.is_some_and(|e| e <= self.bytes) && off.is_multiple_of(align_of::<T>()) {
            Ok(())
        } else {
            Err(Error::invalid(
                "shared memory",
                format!("{n} elements at byte {off} outside {} bytes", self.bytes),
            ))
        }
    }

    /// The `n` elements of T at byte `off`, copied out.
    pub fn read<T: bytemuck::Pod>(&self, off: usize, n: usize) -> Result<Vec<T>> {
        self.check::<T>(off, n)?;
        let mut out = vec![T::zeroed(); n];
        let _lock = memory_lock();
        // SAFETY: the range lies in the allocation and is aligned for T (checked above); the
        // lock is held, so nothing writes it meanwhile; `out` is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base().add(off).cast::<T>(), out.as_mut_ptr(), n)
        };
        Ok(out)
    }

    /// Writes `src` at byte `off`.
    pub fn write<T: bytemuck::Pod>(&self, off: usize, src: &[T]) -> Result<()> {
        self.check::<T>(off, src.len())?;
        let _lock = memory_lock();
        // SAFETY: as in `read`: in bounds and aligned, under the lock, and `src` is not this
        // memory (no reference to it is ever made).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base().add(off).cast::<T>(), src.len())
        };
        Ok(())
    }

    /// Writes `value` into the `n` elements of T at byte `off`.
    pub fn fill<T: bytemuck::Pod>(&self, off: usize, n: usize, value: T) -> Result<()> {
        self.check::<T>(off, n)?;
        let _lock = memory_lock();
        let p = self.base().wrapping_add(off).cast::<T>();
        for i in 0..n {
            // SAFETY: element i < n lies in the checked, aligned range; under the lock.
            unsafe { p.add(i).write(value) };
        }
        Ok(())
    }
}

/// Whether the emulator was built (a C++ compiler was found at build time).
pub fn available() -> bool {
    cfg!(nla_emu)
}

/// Whether the emulator checks every access of every launch in the fiber modes (the `memcheck`
/// feature, emu/memcheck.h, scripts/memcheck.sh): an access outside every buffer passed to the
/// kernel, or a typed access not aligned to its size, fails the launch (code 11); a byte written
/// by one block and read, written or updated atomically by another in the same launch fails it
/// too (code 10). The message names the block, the thread and the kernel parameter. Off by
/// default: instrumented kernels run about 3 times slower.
pub fn memcheck() -> bool {
    #[cfg(nla_emu)]
    {
        // SAFETY: takes no arguments and only returns a constant.
        unsafe { ffi::nla_emu_memcheck() != 0 }
    }
    #[cfg(not(nla_emu))]
    false
}

#[cfg(nla_emu)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn nla_emu_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            dyn_smem: usize,
            args: *mut *mut c_void,
            extents: *const u64,
            mode: c_int,
            seed: u64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn nla_emu_kernel_params(
            name: *const c_char,
            sizes: *mut usize,
            kinds: *mut c_int,
            elems: *mut usize,
            cap: usize,
        ) -> c_int;
        pub fn nla_emu_memcheck() -> c_int;
    }
}

/// The kernel's parameters as its registration recorded them: (size, kind, pointee size); an
/// error for an unknown kernel or one registered twice.
#[cfg(nla_emu)]
fn signature(name: &CStr) -> Result<Vec<(usize, Kind, usize)>> {
    // SAFETY: `name` is NUL-terminated; null arrays with cap 0 ask only for the count.
    let n = unsafe {
        ffi::nla_emu_kernel_params(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    let kernel = name.to_string_lossy();
    let n = match n {
        -2 => {
            return Err(Error::invalid(
                "emu",
                format!("kernel `{kernel}` is registered twice (NLA_EMU_KERNEL in two places)"),
            ))
        }
        n => usize::try_from(n).map_err(|_| {
            Error::invalid(
                "emu",
                format!(
                    "no emulated kernel `{kernel}` (each extern \"C\" kernel needs \
                     `NLA_EMU_KERNEL({kernel});` at the end of its .cu file)"
                ),
            )
        })?,
    };
    let (mut sizes, mut kinds, mut elems) = (vec![0usize; n], vec![0 as c_int; n], vec![0usize; n]);
    // SAFETY: each array holds `n` elements and cap = n, so the emulator writes in bounds.
    unsafe {
        ffi::nla_emu_kernel_params(
            name.as_ptr(),
            sizes.as_mut_ptr(),
            kinds.as_mut_ptr(),
            elems.as_mut_ptr(),
            n,
        )
    };
    Ok((0..n)
        .map(|i| (sizes[i], Kind::from_c(kinds[i]), elems[i]))
        .collect())
}

/// Why packed argument `got` cannot be passed for kernel parameter `want`, if it cannot.
fn mismatch(want: (usize, Kind, usize), got: (usize, Kind, usize)) -> Option<String> {
    let (ws, wk, we) = want;
    let (gs, gk, ge) = got;
    if gk == Kind::Device {
        return Some("a device address (device_ptr) means nothing to the emulator".into());
    }
    let kind_ok = match wk {
        Kind::PtrConst => matches!(gk, Kind::PtrConst | Kind::PtrMut),
        Kind::PtrMut => gk == Kind::PtrMut,
        Kind::Float | Kind::Int => gk == wk,
        Kind::Other | Kind::Device => !matches!(gk, Kind::PtrConst | Kind::PtrMut),
    };
    if !kind_ok {
        return Some(match (wk, gk) {
            (Kind::PtrMut, Kind::PtrConst) => {
                "the kernel writes through this pointer: pass it with ptr_mut".into()
            }
            _ => format!("the kernel takes {wk:?} ({ws} bytes), got {gk:?} ({gs} bytes)"),
        });
    }
    if ws != gs {
        return Some(format!(
            "the kernel takes {ws} bytes, got {gs} bytes ({gk:?})"
        ));
    }
    if matches!(wk, Kind::PtrConst | Kind::PtrMut) && we != 0 && we != ge {
        return Some(format!(
            "the kernel's pointer is to {we}-byte elements, the slice has {ge}-byte elements"
        ));
    }
    None
}

/// Why packed argument `got` cannot be passed for kernel parameter `want` on the GPU, if it
/// cannot: as [`mismatch`], except that a device address goes to any pointer parameter (it
/// does not record its pointee or constness).
#[cfg(nla_emu)]
fn device_mismatch(want: Param, got: Param) -> Option<String> {
    let (ws, wk, _) = want;
    let (gs, gk, _) = got;
    if gk != Kind::Device {
        return mismatch(want, got);
    }
    if matches!(wk, Kind::Float | Kind::Int) {
        return Some(format!(
            "the kernel takes {wk:?} ({ws} bytes), got a device address"
        ));
    }
    (ws != gs).then(|| format!("the kernel takes {ws} bytes, got a {gs}-byte device address"))
}

/// A kernel parameter or packed argument: (size, kind, pointee size).
#[cfg(nla_emu)]
type Param = (usize, Kind, usize);

/// The packed arguments against the kernel's signature as its registration recorded it: the
/// count, then each argument by `why` (the reason it cannot be passed, if it cannot).
#[cfg(nla_emu)]
fn check_signature(
    cname: &CStr,
    args: &EmuArgs<'_>,
    why: fn(Param, Param) -> Option<String>,
) -> Result<()> {
    let name = cname.to_string_lossy();
    let sig = signature(cname)?;
    if sig.len() != args.len() {
        return Err(Error::invalid(
            "emu",
            format!(
                "kernel `{name}` takes {} parameters, {} were packed",
                sig.len(),
                args.len()
            ),
        ));
    }
    for (i, (&want, &got)) in sig.iter().zip(&args.sig).enumerate() {
        if let Some(why) = why(want, got) {
            return Err(Error::invalid(
                "emu",
                format!("kernel `{name}`, parameter {i}: {why}"),
            ));
        }
    }
    Ok(())
}

/// For the CUDA backend: checks arguments packed for the GPU (device addresses for buffers,
/// nulls for absent optional ones, scalars) against the kernel's C++ signature as the
/// emulator's registration recorded it: the count, each size, scalar vs pointer (a device
/// address passes for any pointer parameter). Without the emulator (no C++ compiler at build
/// time) there is no signature to check against: Ok.
#[allow(dead_code)] // for the CUDA backend
pub(crate) fn check_device_signature(name: &str, args: &EmuArgs<'_>) -> Result<()> {
    #[cfg(nla_emu)]
    {
        let cname = CString::new(name)
            .map_err(|_| Error::invalid("emu", format!("kernel name {name:?} contains NUL")))?;
        check_signature(&cname, args, device_mismatch)
    }
    #[cfg(not(nla_emu))]
    {
        let _ = (name, args);
        Ok(())
    }
}

/// Launches the emulated kernel `name` (its `extern "C"` symbol) over `grid` x `block` with
/// `dyn_smem` bytes of dynamic shared memory, and returns when every block has run. Errors (as
/// `Error::Invalid { op: "emu" }`): an unknown kernel, arguments that do not match its signature,
/// a launch configuration out of range, and what the emulator catches while running it: barrier
/// divergence (naming both call sites), a thread exiting while others wait, a warp collective
/// with a bad mask or width, a deadlock, a fiber stack overflow, a write past the dynamic shared
/// memory, `__trap()`, and, in a build with the memory check ([`memcheck`]), an out-of-bounds or
/// misaligned access or a race between two blocks.
pub fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: usize,
    args: &mut EmuArgs<'_>,
    mode: EmuMode,
    seed: u64,
) -> Result<()> {
    let cname = CString::new(name)
        .map_err(|_| Error::invalid("emu", format!("kernel name {name:?} contains NUL")))?;
    // a kernel may read and write shared memory ([`SharedMem`])
    let _lock = memory_lock();
    launch_impl(&cname, grid, block, dyn_smem, args, mode, seed)
}

#[cfg(not(nla_emu))]
fn launch_impl(
    cname: &CStr,
    _grid: [u32; 3],
    _block: [u32; 3],
    _dyn_smem: usize,
    _args: &mut EmuArgs<'_>,
    _mode: EmuMode,
    _seed: u64,
) -> Result<()> {
    Err(Error::invalid(
        "emu",
        format!(
            "cannot run kernel `{}`: the CPU emulator was not built (no C++ compiler at build time)",
            cname.to_string_lossy()
        ),
    ))
}

#[cfg(nla_emu)]
fn launch_impl(
    cname: &CStr,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: usize,
    args: &mut EmuArgs<'_>,
    mode: EmuMode,
    seed: u64,
) -> Result<()> {
    check_signature(cname, args, mismatch)?;
    args.check_overlap(&cname.to_string_lossy())?;
    let mut err = vec![0u8; 4096];
    let extents = args.extents.clone();
    let params = args.kernel_params();
    // SAFETY: `cname` is NUL-terminated; `grid` and `block` hold 3 u32 each; `params` has one
    // pointer per kernel parameter (count checked above), each to an 8-byte slot owned by `args`
    // holding a value of the size and kind the parameter has (checked above), so the emulator's
    // trampoline reads in bounds. Pointer values come from slices borrowed for `args`' lifetime
    // (alive across this call), mutable only where the kernel may write, with the element size
    // the kernel expects; staying within their lengths is the kernel's contract, checked by its
    // launcher on lengths and dims. `extents` has one u64 per parameter (one per packed slot),
    // alive across the call. `err` has `err.len()` bytes. The emulator catches every C++
    // exception and never aborts or unwinds into Rust.
    let rc = unsafe {
        ffi::nla_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dyn_smem,
            params.as_mut_ptr(),
            extents.as_ptr(),
            mode as c_int,
            seed,
            err.as_mut_ptr().cast::<c_char>(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(Error::invalid("emu", format!("{msg} (code {rc})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pointer_finds_the_first_non_null_host_pointer() {
        let x = [1.0f32, 2.0];
        let mut y = [0u32; 3];

        // scalars (zero or not), null pointers and device addresses are not host pointers
        let mut a = EmuArgs::new();
        a.scalar(0i32)
            .scalar(7i64)
            .scalar(1.5f32)
            .null::<f32>()
            .null_mut::<u32>()
            .device_ptr(0x7f00_0000_1000)
            .device_ptr(0);
        assert_eq!(a.host_pointer(), None);
        assert_eq!(EmuArgs::new().host_pointer(), None);

        // a host slice after them is found at its index
        a.ptr(&x[..]);
        assert_eq!(a.host_pointer(), Some(7));
        a.ptr_mut(&mut y[..]);
        assert_eq!(a.host_pointer(), Some(7));

        // a mutable host slice, packed through the launchers' In/Out types
        let mut z = [0f32; 2];
        let mut b = EmuArgs::new();
        b.device_ptr(0x1000)
            .scalar(3i32)
            .output_opt::<f32>(None)
            .output(crate::device::gpu::Out::from(&mut z[..]))
            .input(crate::device::gpu::In::from(&x[..]));
        assert_eq!(b.host_pointer(), Some(3));

        // device In/Out are not host pointers
        let dev = crate::device::gpu::DevPtr::<f32>::new(0x2000, 4);
        let mut c = EmuArgs::new();
        c.input(dev.into())
            .output(dev.into())
            .input_opt::<f32>(None);
        assert_eq!(c.host_pointer(), None);
    }

    #[cfg(nla_emu)]
    #[test]
    fn check_device_signature_takes_device_addresses_for_pointers() {
        // residual_bwd_f32(float* da, const float* dout, i64 n)
        let sym = "residual_bwd_f32";
        let mut a = EmuArgs::new();
        a.device_ptr(0x1000).device_ptr(0x2000).scalar(4i64);
        check_device_signature(sym, &a).unwrap();
        // the emulator still refuses it
        let err = launch(sym, [1; 3], [1; 3], 0, &mut a, EmuMode::Forward, 0).unwrap_err();
        assert!(err.to_string().contains("device address"), "{err}");
        // a null output passes; a wrong scalar size, a scalar for a pointer, a device address
        // for a scalar, a wrong count and an unknown kernel do not
        let mut a = EmuArgs::new();
        a.null_mut::<f32>().device_ptr(0x2000).scalar(4i64);
        check_device_signature(sym, &a).unwrap();
        let mut a = EmuArgs::new();
        a.device_ptr(0x1000).device_ptr(0x2000).scalar(4i32);
        assert!(check_device_signature(sym, &a).is_err());
        let mut a = EmuArgs::new();
        a.scalar(0u64).device_ptr(0x2000).scalar(4i64);
        assert!(check_device_signature(sym, &a).is_err());
        let mut a = EmuArgs::new();
        a.device_ptr(0x1000).device_ptr(0x2000).device_ptr(0x3000);
        assert!(check_device_signature(sym, &a).is_err());
        let mut a = EmuArgs::new();
        a.device_ptr(0x1000).device_ptr(0x2000);
        assert!(check_device_signature(sym, &a).is_err());
        assert!(check_device_signature("no_such_kernel_f32", &a).is_err());
    }
}
