//! The CPU emulator of the CUDA execution model: emu/ and kernels/*.cu compiled as C++ (see
//! build.rs).

use std::path::PathBuf;

pub fn build(_kernels: &[PathBuf]) {}
