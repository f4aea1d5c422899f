//! [`EmuDevice`]: the CUDA device's code path on the CPU. Every op but matmul runs the real
//! kernel of `kernels/*.cu` through its launcher ([`super::gpu`]) on the emulator of the CUDA
//! execution model ([`super::emu`]), so that the model's forward and backward, training steps
//! and generation can run "on the GPU code path" where there is no GPU (CI).
//!
//! Memory is host memory ([`Vec<f32>`] and [`Vec<u32>`], the CPU device's buffer types), so
//! what is not a kernel on the GPU runs as the CPU device does it:
//! - `alloc`, `upload`, `download`, `upload_ids`, `download_ids`, `fill` and `copy` are memory
//!   operations (cuMemAlloc, cuMemcpy, cuMemsetD32) on the GPU, not kernels of ours;
//! - `matmul` is cuBLASLt on the GPU, a library whose kernels cannot be emulated: it delegates
//!   to the CPU GEMM.
//!
//! Every other op (embedding, rmsnorm, rope, attention, swiglu, residual, cross_entropy,
//! softmax, inject, norm_scale, pool, reward_advantage, policy_loss, adamw, sum_squares,
//! decode_attention, sample) launches its f32 kernel(s), mapped onto the launchers once for this
//! device and the CUDA device ([`KernelDevice`]), here with host slices as the pointers. Launches
//! are serialised inside the emulator, so this device is slow (milliseconds per launch): tiny
//! models only.

use super::cpu::{get, get_mut, CpuDevice};
use super::emu::EmuMode;
use super::gpu::kernel_device::KernelDevice;
use super::gpu::{EmuLaunch, Ids, In, Out};
use super::{Device, View, ViewMut};
use crate::Result;

type Buf = Vec<f32>;

/// The emulated CUDA device (see the module docs).
#[derive(Debug)]
pub struct EmuDevice {
    launcher: EmuLaunch,
    budget: Option<usize>,
}

impl EmuDevice {
    /// Launches run in `mode`; `seed` drives Reversed mode's block order (varied per launch).
    pub fn new(mode: EmuMode, seed: u64) -> Self {
        EmuDevice {
            launcher: EmuLaunch::new(mode, seed),
            budget: None,
        }
    }

    /// This device with a fixed memory of `bytes`, as a GPU has: runs plan against it
    /// ([`Device::memory_budget`]) and fail before their first step when they do not fit.
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.budget = Some(bytes);
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
}

impl KernelDevice for EmuDevice {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Launcher = EmuLaunch;

    fn launcher(&self) -> &EmuLaunch {
        &self.launcher
    }

    fn input<'a>(op: &'static str, what: &str, v: View<'a, Buf>) -> Result<In<'a, f32>> {
        get(op, what, v).map(In::Host)
    }
    fn output<'a>(op: &'static str, what: &str, v: ViewMut<'a, Buf>) -> Result<Out<'a, f32>> {
        get_mut(op, what, v).map(Out::Host)
    }
    fn ids(ids: &Vec<u32>) -> Ids<'_> {
        Ids::Host(ids)
    }
    fn ids_out(ids: &mut Vec<u32>) -> Out<'_, u32> {
        Out::Host(ids)
    }
    /// Host ids carry no bound: the launchers check their values.
    fn ids_written(_ids: &mut Vec<u32>, _bound: usize) {}
    fn accumulate_f64(&self, launch: impl FnOnce(Out<'_, f64>) -> Result<()>) -> Result<f64> {
        let mut acc = [0f64; 1];
        launch(Out::Host(&mut acc[..]))?;
        Ok(acc[0])
    }

    fn name(&self) -> String {
        format!("emulated cuda ({:?})", self.launcher.mode)
    }

    fn memory_budget(&self) -> Result<Option<usize>> {
        Ok(self.budget)
    }

    // ---- memory: host operations, as the CPU device (cuMem* on the GPU)

    fn alloc(&self, n: usize) -> Result<Buf> {
        CpuDevice.alloc(n)
    }
    fn upload(&self, host: &[f32]) -> Result<Buf> {
        CpuDevice.upload(host)
    }
    fn write(&self, dst: ViewMut<'_, Buf>, host: &[f32]) -> Result<()> {
        CpuDevice.write(dst, host)
    }
    fn download(&self, x: View<'_, Buf>) -> Result<Vec<f32>> {
        CpuDevice.download(x)
    }
    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        CpuDevice.upload_ids(host)
    }
    fn download_ids(&self, ids: &Vec<u32>) -> Result<Vec<u32>> {
        CpuDevice.download_ids(ids)
    }
    fn fill(&self, x: ViewMut<'_, Buf>, value: f32) -> Result<()> {
        CpuDevice.fill(x, value)
    }
    fn copy(&self, dst: ViewMut<'_, Buf>, src: View<'_, Buf>) -> Result<()> {
        CpuDevice.copy(dst, src)
    }

    /// cuBLASLt on the GPU, which cannot be emulated: the CPU GEMM.
    fn matmul(
        &self,
        c: ViewMut<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        CpuDevice.matmul(c, a, b, m, n, k, ta, tb, alpha, beta)
    }
}
