//! Builds the CUDA kernels of kernels/ twice:
//! - with nvcc (when found: NVCC, CUDA_HOME/bin, PATH) to PTX (compute_80) and a cubin (sm_90a),
//!   embedded in the binary (build/nvcc.rs). Without nvcc the build still succeeds and the binary
//!   runs on the CPU device only.
//! - as plain C++ against the CPU emulator of the CUDA execution model (emu/), linked into the
//!   library so that every kernel runs in the tests on any machine (build/emu.rs).

#[path = "build/emu.rs"]
mod emu;
#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/ptxas.rs"]
mod ptxas;

use std::path::PathBuf;

/// kernels/*.cu, sorted.
fn kernel_sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-changed=emu");
    println!("cargo::rerun-if-changed=build");
    let kernels = kernel_sources();
    for k in &kernels {
        println!("cargo::rerun-if-changed={}", k.display());
    }
    nvcc::build(&kernels);
    emu::build(&kernels);
}
