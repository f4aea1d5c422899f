//! The CUDA kernels of `kernels/*.cu`, as build.rs compiled them (build/nvcc.rs): for every
//! file, PTX for compute_80 (JIT-compiled by the driver on any sm_80+ GPU) and a cubin for
//! sm_90a (Hopper). Empty when the crate was built without nvcc: the binary then runs on the
//! CPU device only, and [`how_to_get`] says how to build it with GPU kernels.

#[cfg(nla_nvcc)]
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// (file stem, PTX, cubin) of every kernel file; empty without nvcc at build time.
#[cfg(not(nla_nvcc))]
pub const KERNELS: &[(&str, &[u8], &[u8])] = &[];

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
