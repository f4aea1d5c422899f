//! `--device cpu|cuda|cuda:N|auto|emu`: opening the device a command runs on, and running code
//! that is generic over [`Device`] on whichever was opened ([`with_device!`]).

use super::cpu::CpuDevice;
use super::cuda::{self, CudaDevice};
use super::emu::EmuMode;
use super::emu_device::EmuDevice;
use super::Dtype;
use crate::{Error, Result};

/// One of the devices, chosen at run time.
#[derive(Debug)]
pub enum AnyDevice {
    Cpu(CpuDevice),
    /// (boxed, as the emulator: they are much larger than the CPU device)
    Cuda(Box<CudaDevice>),
    /// The CUDA kernels on the CPU emulator (slow: tiny models, checks).
    Emu(Box<EmuDevice>),
}

/// What `--device` accepts.
pub const DEVICE_KINDS: &str = "cpu, cuda, cuda:N, auto or emu";

/// Opens the device `kind` names: `cpu`; `cuda` (GPU 0) or `cuda:N`; `auto` (GPU 0 when this
/// build has kernels and the machine a driver and a GPU, else the CPU); `emu` (the CUDA kernels
/// through the CPU emulator). Each in its default working dtype: bf16 on a GPU, f32 on the CPU
/// and the emulator.
pub fn open(kind: &str) -> Result<AnyDevice> {
    open_with(kind, None)
}

/// [`open`] with working dtype `precision` (None: the device's default). The CPU device
/// computes in f32 only: bf16 there is an error.
pub fn open_with(kind: &str, precision: Option<Dtype>) -> Result<AnyDevice> {
    let dev = open_default(kind)?;
    let Some(dtype) = precision else {
        return Ok(dev);
    };
    match dev {
        AnyDevice::Cpu(_) if dtype != Dtype::F32 => Err(Error::invalid(
            "precision",
            format!(
                "{dtype} asked for, but the device is the CPU (--device {kind}), which computes                  in f32 only: use precision f32 (or auto), or a GPU"
            ),
        )),
        AnyDevice::Cpu(d) => Ok(AnyDevice::Cpu(d)),
        AnyDevice::Cuda(d) => Ok(AnyDevice::Cuda(Box::new(d.with_work_dtype(dtype)?))),
        AnyDevice::Emu(d) => Ok(AnyDevice::Emu(Box::new(d.with_work_dtype(dtype)?))),
    }
}

fn open_default(kind: &str) -> Result<AnyDevice> {
    let bad = || Error::invalid("--device", format!("`{kind}`: expected {DEVICE_KINDS}"));
    match kind {
        "cpu" => Ok(AnyDevice::Cpu(CpuDevice::new())),
        "auto" => match cuda::probe() {
            Ok(_) => cuda_device(0),
            Err(_) => Ok(AnyDevice::Cpu(CpuDevice::new())),
        },
        "emu" => {
            if !super::emu::available() {
                return Err(Error::invalid(
                    "--device emu",
                    "this build has no CUDA emulator (no C++ compiler when it was compiled)",
                ));
            }
            Ok(AnyDevice::Emu(Box::new(EmuDevice::new(
                EmuMode::Forward,
                0,
            ))))
        }
        "cuda" => cuda_device(0),
        _ => {
            let n = kind.strip_prefix("cuda:").ok_or_else(bad)?;
            let n = n.parse::<usize>().map_err(|_| bad())?;
            cuda_device(n)
        }
    }
}

fn cuda_device(ordinal: usize) -> Result<AnyDevice> {
    CudaDevice::new(ordinal).map(|d| AnyDevice::Cuda(Box::new(d)))
}

impl AnyDevice {
    pub fn name(&self) -> String {
        use super::Device;
        match self {
            AnyDevice::Cpu(d) => d.name(),
            AnyDevice::Cuda(d) => d.name(),
            AnyDevice::Emu(d) => d.name(),
        }
    }
}

/// Runs `$body` with `$d: &impl Device` bound to the opened device, whichever it is:
/// `with_device!(&dev, d => train(d, &cfg))` (`$dev` a `&AnyDevice`). `$body` is compiled once
/// per device type.
#[macro_export]
macro_rules! with_device {
    ($dev:expr, $d:ident => $body:expr) => {
        match $dev {
            $crate::device::select::AnyDevice::Cpu($d) => $body,
            $crate::device::select::AnyDevice::Cuda(boxed) => {
                let $d: &$crate::device::cuda::CudaDevice = boxed;
                $body
            }
            $crate::device::select::AnyDevice::Emu(boxed) => {
                let $d: &$crate::device::emu_device::EmuDevice = boxed;
                $body
            }
        }
    };
}
