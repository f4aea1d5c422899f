//! nvcc: kernels/*.cu -> PTX + cubin, embedded (see build.rs).

use std::env;
use std::path::{Path, PathBuf};

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

pub fn build(_kernels: &[PathBuf]) {
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
    let _ = Path::new("kernels");
}
