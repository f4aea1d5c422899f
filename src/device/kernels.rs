//! The CUDA kernels of `kernels/*.cu`, as build.rs compiled them (build/nvcc.rs): for every
//! file, PTX for compute_80 (JIT-compiled by the driver on any sm_80+ GPU) and a cubin for
//! sm_90a (Hopper). Empty when the crate was built without nvcc: the binary then runs on the
//! CPU device only, and [`how_to_get`] says how to build it with GPU kernels.
//!
//! [`check_launch`] holds a launch to what an sm_90 block can hold (launch bounds, registers,
//! shared memory), from ptxas's figures: the emulator's launches are checked with it, so a
//! launcher asking for a block the GPU would refuse fails the tests on a machine without one.

use crate::{Error, Result};

#[cfg(nla_nvcc)]
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// (file stem, PTX, cubin) of every kernel file; empty without nvcc at build time.
#[cfg(not(nla_nvcc))]
pub const KERNELS: &[(&str, &[u8], &[u8])] = &[];

/// (symbol, registers per thread on sm_90a, static shared memory bytes, most threads per block)
/// of every kernel, from ptxas's report and the PTX's `.maxntid`; empty without nvcc.
#[cfg(not(nla_nvcc))]
pub const LIMITS: &[(&str, u32, u32, u32)] = &[];

/// The nvcc the kernels were compiled with (empty when none was found).
pub const NVCC: &str = env!("NLA_NVCC");

/// Whether this build embeds GPU kernels.
pub fn available() -> bool {
    !KERNELS.is_empty()
}

/// The PTX and cubin of one kernel file, by stem (`"rmsnorm"` for kernels/rmsnorm.cu).
pub fn get(stem: &str) -> Option<(&'static [u8], &'static [u8])> {
    KERNELS
        .iter()
        .find(|(s, _, _)| *s == stem)
        .map(|&(_, ptx, cubin)| (ptx, cubin))
}

/// What to do to get GPU kernels into a build that has none.
pub fn how_to_get() -> &'static str {
    "this build has no CUDA kernels (nvcc was not found when it was compiled): install the CUDA \
     compiler with `bash scripts/install-nvcc.sh`, then rebuild with \
     `NVCC=<the path it prints> cargo build --release` (or put nvcc on PATH, or set CUDA_HOME)"
}

/// What a launch of one kernel may ask for on an sm_90 GPU (see [`LIMITS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Registers per thread (ptxas, sm_90a).
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub static_smem: u32,
    /// Threads per block at most: its `__launch_bounds__`, else 1024.
    pub max_threads: u32,
}

/// The limits of kernel `sym`, where this build has them.
pub fn limits(sym: &str) -> Option<Limits> {
    LIMITS
        .iter()
        .find(|l| l.0 == sym)
        .map(|&(_, registers, static_smem, max_threads)| Limits {
            registers,
            static_smem,
            max_threads,
        })
}

/// Registers of one block on sm_80 and sm_90 at most.
pub const REGISTERS_PER_BLOCK: u32 = 64 * 1024;

/// Checks a launch of `sym` against `l`, as the driver would refuse it on an sm_90 GPU (with
/// "too many resources requested for launch" and the like): more threads than its launch bounds,
/// more registers than a block has (each warp gets its threads' registers rounded up to a
/// multiple of 8), more static and dynamic shared memory than a block may opt in to.
pub fn check_limits(sym: &str, l: Limits, block: [u32; 3], dyn_smem: usize) -> Result<()> {
    let threads = block.iter().map(|&d| u64::from(d)).product::<u64>();
    let fail = |why: String| Err(Error::invalid("launch", format!("{sym}: {why}")));
    if threads > u64::from(l.max_threads) {
        return fail(format!(
            "a block of {threads} threads, the kernel allows {} (__launch_bounds__ or the \
             hardware's 1024)",
            l.max_threads
        ));
    }
    let per_warp = u64::from(l.registers.div_ceil(8) * 8) * 32;
    let registers = threads.div_ceil(32) * per_warp;
    if registers > u64::from(REGISTERS_PER_BLOCK) {
        return fail(format!(
            "a block of {threads} threads at {} registers each needs {registers} registers, a \
             block has {REGISTERS_PER_BLOCK}: use fewer threads or bound the kernel's registers",
            l.registers
        ));
    }
    let smem = l.static_smem as usize + dyn_smem;
    if smem > crate::device::gpu::SMEM_MAX {
        return fail(format!(
            "{smem} bytes of shared memory per block ({} static + {dyn_smem} dynamic), at most {}",
            l.static_smem,
            crate::device::gpu::SMEM_MAX
        ));
    }
    Ok(())
}

/// [`check_limits`] with the kernel's own limits; nothing to check where this build has none
/// (no nvcc at build time).
pub fn check_launch(sym: &str, block: [u32; 3], dyn_smem: usize) -> Result<()> {
    match limits(sym) {
        Some(l) => check_limits(sym, l, block, dyn_smem),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_limits_refuses_what_an_sm90_block_cannot_hold() {
        let l = Limits {
            registers: 243,
            static_smem: 256,
            max_threads: 128,
        };
        assert!(check_limits("k", l, [128, 1, 1], 1000).is_ok());
        let e = check_limits("k", l, [64, 2, 2], 0).unwrap_err().to_string();
        assert!(e.contains("256 threads, the kernel allows 128"), "{e}");
        // 100 registers round to 104: 8 warps x 32 x 104 = 26624 fit, 32 warps (1024) do not
        let l = Limits {
            registers: 100,
            static_smem: 0,
            max_threads: 1024,
        };
        assert!(check_limits("k", l, [256, 1, 1], 0).is_ok());
        let e = check_limits("k", l, [1024, 1, 1], 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 106496 registers"), "{e}");
        // 64 registers x 1024 threads is exactly a block's 65536
        let l = Limits { registers: 64, ..l };
        assert!(check_limits("k", l, [1024, 1, 1], 0).is_ok());
        let l = Limits { registers: 65, ..l };
        assert!(check_limits("k", l, [1024, 1, 1], 0).is_err());
        // static and dynamic shared memory together
        let l = Limits {
            registers: 32,
            static_smem: 256,
            max_threads: 1024,
        };
        let max = crate::device::gpu::SMEM_MAX;
        assert!(check_limits("k", l, [256, 1, 1], max - 256).is_ok());
        let e = check_limits("k", l, [256, 1, 1], max)
            .unwrap_err()
            .to_string();
        assert!(e.contains("256 static"), "{e}");
    }

    #[test]
    fn the_table_has_every_kernel_with_its_launch_bounds() {
        if LIMITS.is_empty() {
            eprintln!("no nvcc at build time: no kernel limits to check");
            return;
        }
        // attention's kernels are bounded to 128 threads, and the dkdv ones hold the most
        // registers of all
        let dkdv = limits("attention_bwd_dkdv_bf16_hs128").expect("in the table");
        assert_eq!(dkdv.max_threads, 128);
        assert!((150..=255).contains(&dkdv.registers), "{dkdv:?}");
        assert_eq!(
            limits("residual_fwd_f32").map(|l| l.max_threads),
            Some(1024)
        );
        assert!(
            LIMITS.iter().all(|l| (1..=255).contains(&l.1)),
            "{LIMITS:?}"
        );
    }
}
