//! The launch layer of the CUDA device: one launcher per kernel family of `kernels/*.cu`, each
//! checking lengths and dims first, then computing grid, block and dynamic shared memory as
//! the kernel's header says, packing the arguments in the kernel's parameter order and
//! launching through a [`Launch`] backend.
//!
//! The launchers take host-side typed slices standing for device pointers (the f32 variants of
//! the kernels; ids are u32). Today the one backend is [`EmuLaunch`], the CPU emulator of the
//! CUDA execution model (`device/emu.rs`), which [`crate::device::emu_device::EmuDevice`] uses
//! to run every op but matmul through the real kernels. A cudarc backend implements [`Launch`]
//! by handing [`EmuArgs::kernel_params`] to `cuLaunchKernel` (device addresses packed with
//! [`EmuArgs::device_ptr`]); the grid/block/smem arithmetic here is shared.
//!
//! Kernels that need more than 48 KiB of dynamic shared memory (attention with HS > 32) need
//! `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` raised first on the GPU: [`SMEM_DEFAULT_MAX`]
//! is where that starts; the emulator takes up to 227 KiB without it.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod decode_attention;
pub mod embedding;
pub mod inject;
pub mod norm_scale;
pub mod policy_loss;
pub mod pool;
pub mod residual;
pub mod reward_advantage;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod softmax;
pub mod swiglu;

pub use super::emu::{EmuArgs, EmuMode};
use crate::{Error, Result};

/// Launches a kernel by symbol. `args` are packed like `cuLaunchKernel`'s `kernelParams`.
pub trait Launch {
    fn launch(
        &self,
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &mut EmuArgs<'_>,
    ) -> Result<()>;

    /// Streaming multiprocessors of the device (grid sizes of grid-stride kernels).
    fn sms(&self) -> usize {
        SMS_DEFAULT
    }
}

/// SM count assumed when the backend does not know better: an H100 SXM.
pub const SMS_DEFAULT: usize = 132;

/// Dynamic shared memory a kernel gets without opting in (CUDA's default cap).
pub const SMEM_DEFAULT_MAX: usize = 48 * 1024;

/// Dynamic shared memory per block at most (Hopper, after opting in).
pub const SMEM_MAX: usize = 227 * 1024;

/// The emulator backend: every launch runs on the CPU emulator in `mode`, with the scheduling
/// seed `seed` mixed with a per-launch counter (so Reversed mode shuffles blocks differently
/// from launch to launch, reproducibly).
#[derive(Debug)]
pub struct EmuLaunch {
    pub mode: EmuMode,
    pub seed: u64,
    count: std::sync::atomic::AtomicU64,
}

impl EmuLaunch {
    pub fn new(mode: EmuMode, seed: u64) -> Self {
        EmuLaunch {
            mode,
            seed,
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl EmuLaunch {
    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Launch for EmuLaunch {
    fn launch(
        &self,
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &mut EmuArgs<'_>,
    ) -> Result<()> {
        if smem > SMEM_MAX {
            return Err(Error::invalid(
                "launch",
                format!("{sym}: {smem} bytes of dynamic shared memory > {SMEM_MAX}"),
            ));
        }
        let k = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = self.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        super::emu::launch(sym, grid, block, smem, args, self.mode, seed)
    }
}

/// A 1-D launch shape.
pub(crate) fn dim1(x: u32) -> [u32; 3] {
    [x, 1, 1]
}

/// `x` as a kernel `int`.
pub(crate) fn int(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::invalid(op, format!("{what} = {x} does not fit an int")))
}

/// A grid dimension (x up to 2^31-1, y and z up to 65535).
pub(crate) fn grid_dim(op: &'static str, what: &str, x: usize, max: usize) -> Result<u32> {
    if x == 0 || x > max {
        return Err(Error::invalid(
            op,
            format!("grid {what} = {x} outside [1, {max}]"),
        ));
    }
    Ok(x as u32)
}

/// `what` must hold exactly the product of `dims` elements.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, dims: &[usize]) -> Result<()> {
    let want = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("{what}: dims {dims:?} overflow usize")))?;
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: expected {want} elements (dims {dims:?}), got {got}"),
        ))
    }
}

/// A dim that must be positive.
pub(crate) fn check_pos(op: &'static str, name: &str, x: usize) -> Result<()> {
    if x > 0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be > 0")))
    }
}

/// Every id must be below `limit` (the kernels index with them unchecked).
pub(crate) fn check_ids(op: &'static str, what: &str, ids: &[u32], limit: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= limit) {
        None => Ok(()),
        Some((i, id)) => Err(Error::invalid(
            op,
            format!("{what}[{i}] = {id} is out of range (must be < {limit})"),
        )),
    }
}

/// f32 elements per 16-byte access.
pub(crate) const PACK: usize = 4;

/// Block of the row kernels that give each row's channels to threads in 16-byte packs:
/// 32 * ceil(C / pack / 32) capped at `cap` (pack = 4 when C is a multiple of 4, else 1).
pub(crate) fn pack_block(c: usize, cap: usize) -> u32 {
    let pack = if c.is_multiple_of(PACK) { PACK } else { 1 };
    (32 * c.div_ceil(pack).div_ceil(32)).min(cap) as u32
}

/// Grid of the elementwise kernels: block 256, ceil(n / (256 * pack)) blocks.
pub(crate) fn elementwise_grid(op: &'static str, n: usize) -> Result<u32> {
    grid_dim(op, "x", n.div_ceil(256 * PACK).max(1), i32::MAX as usize)
}

/// A table `[rows, c]` given as a flat length: the number of rows.
pub(crate) fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if len.is_multiple_of(c) {
        Ok(len / c)
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: {len} elements is not a multiple of C = {c}"),
        ))
    }
}

/// Two lengths that must agree.
pub(crate) fn check_same(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: expected {want} elements, got {got}"),
        ))
    }
}
