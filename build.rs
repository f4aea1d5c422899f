//! Finds nvcc for the CUDA kernels in kernels/. Without nvcc the build still succeeds: the
//! binary then runs on the CPU device only.

use std::env;
use std::path::PathBuf;

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn main() {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rustc-check-cfg=cfg(nla_nvcc)");
    match find_nvcc() {
        Some(nvcc) => {
            println!("cargo::rustc-cfg=nla_nvcc");
            println!("cargo::rustc-env=NLA_NVCC={}", nvcc.display());
        }
        None => println!("cargo::rustc-env=NLA_NVCC="),
    }
}
