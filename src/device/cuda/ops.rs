//! [`KernelDevice`] on [`CudaDevice`], which gives it the [`Device`](crate::device::Device) trait:
//! memory operations through the driver, matmul through cuBLASLt, and every other op through its
//! launcher ([`crate::device::gpu`]) with device addresses, mapped once for this device and the
//! emulated one (`emu_device.rs`) in [`crate::device::gpu::kernel_device`].

use cudarc::driver::DevicePtr;

use half::bf16;

use super::matmul::Operand;
use super::{dev_in, dev_out, CudaBuf, CudaDevice, CudaExec, CudaIds, CudaLaunch};
use crate::device::cpu::check_matmul;
use crate::device::emu_device::check_matmul_dtypes;
use crate::device::gpu::graph::Call;
use crate::device::gpu::kernel_device::{check_addend, KernelDevice};
use crate::device::gpu::scratch::ScratchCache;
use crate::device::gpu::{self, DevPtr, Ids, In, Out};
use crate::device::{bytes_meet, Dtype, Storage, View, ViewMut};
use crate::{Error, Result};

type Buf = CudaBuf;

/// The device address of a matmul operand (f32 or bf16).
fn operand(op: &'static str, what: &str, v: View<'_, Buf>) -> Result<u64> {
    Ok(match v.dtype() {
        Dtype::Bf16 => dev_in::<bf16>(op, what, v)?.addr(),
        _ => dev_in::<f32>(op, what, v)?.addr(),
    })
}

impl KernelDevice for CudaDevice {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Launcher = CudaLaunch;

    fn launcher(&self) -> &CudaLaunch {
        &self.launcher
    }

    type Exec = CudaExec;
    /// The capture is checked against the record: its launches and matmuls are compared with
    /// `calls` as they are captured, and a capture that made other calls is refused.
    fn capture(&self, calls: &[Call], step: &mut dyn FnMut() -> Result<()>) -> Result<CudaExec> {
        use crate::device::gpu::Launch;
        let refused = || Error::cuda("graph capture", "another thread records on this device");
        let rec = self.launcher.recorder().ok_or_else(refused)?;
        let check = rec.verify(calls.to_vec()).map_err(|_| refused())?;
        let exec = self.capture_graph(step);
        let (_, same) = check.finish()?;
        let exec = exec?;
        if !same {
            return Err(Error::cuda(
                "graph capture",
                "the captured calls differ from the step's recorded ones",
            ));
        }
        Ok(exec)
    }
    fn run_graph(&self, exec: &CudaExec, _step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        exec.0.launch().map_err(|e| Error::cuda("cuGraphLaunch", e))
    }

    fn input<'a, S: Storage>(op: &'static str, what: &str, v: View<'a, Buf>) -> Result<In<'a, S>> {
        dev_in(op, what, v).map(In::Device)
    }
    fn output<'a, S: Storage>(
        op: &'static str,
        what: &str,
        v: ViewMut<'a, Buf>,
    ) -> Result<Out<'a, S>> {
        dev_out(op, what, v).map(Out::Device)
    }
    fn ids(ids: &CudaIds) -> Ids<'_> {
        Ids::Device {
            ptr: DevPtr::new(ids.addr, ids.len),
            bound: ids.bound,
        }
    }
    fn ids_out(ids: &mut CudaIds) -> Out<'_, u32> {
        Out::Device(DevPtr::new(ids.addr, ids.len))
    }
    fn ids_written(ids: &mut CudaIds, bound: usize) {
        ids.bound = bound;
    }
    fn scratch(&self) -> &ScratchCache<CudaBuf> {
        &self.scratch
    }
    fn accumulate_f64(&self, launch: impl FnOnce(Out<'_, f64>) -> Result<()>) -> Result<f64> {
        // alloc_zeros: the accumulator starts at 0
        let acc = self
            .stream
            .alloc_zeros::<f64>(1)
            .map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let addr = acc.device_ptr(&self.stream).0;
        launch(Out::Device(DevPtr::new(addr, 1)))?;
        let mut host = [0f64; 1];
        self.stream
            .memcpy_dtoh(&acc, &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        CudaDevice::synchronize(self)?;
        Ok(host[0])
    }

    fn name(&self) -> String {
        format!("{}, {}", self.name, self.dtype)
    }

    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }

    fn memory_budget(&self) -> Result<Option<usize>> {
        self.memory().map(|(free, _)| Some(free))
    }

    fn work_dtype(&self) -> Dtype {
        self.dtype
    }
    fn alloc_as(&self, n: usize, dtype: Dtype) -> Result<Buf> {
        self.alloc_typed(n, dtype)
    }
    fn alloc_shared(&self, bytes: usize, parts: &[crate::device::Part]) -> Result<Vec<Buf>> {
        self.alloc_shared_typed(bytes, parts)
    }
    fn upload(&self, host: &[f32]) -> Result<Buf> {
        let mut b = self.alloc_typed(host.len(), Dtype::F32)?;
        self.write_typed(ViewMut::all(&mut b), host)?;
        Ok(b)
    }
    fn write(&self, dst: ViewMut<'_, Buf>, host: &[f32]) -> Result<()> {
        self.write_typed(dst, host)
    }
    fn download(&self, x: View<'_, Buf>) -> Result<Vec<f32>> {
        self.download_typed(x)
    }
    fn upload_ids(&self, host: &[u32]) -> Result<CudaIds> {
        self.upload_ids_u32(host)
    }
    fn write_ids(&self, ids: &mut CudaIds, host: &[u32]) -> Result<()> {
        self.write_ids_u32(ids, host)
    }
    fn download_ids(&self, ids: &CudaIds) -> Result<Vec<u32>> {
        self.download_ids_u32(ids)
    }
    fn fill(&self, x: ViewMut<'_, Buf>, value: f32) -> Result<()> {
        self.fill_typed(x, value)
    }
    fn copy_same(&self, dst: ViewMut<'_, Buf>, src: View<'_, Buf>) -> Result<()> {
        self.copy_typed(dst, src)
    }

    /// cuBLASLt (f32 compute; see `matmul.rs` for the dtypes), with x (if any) as its C.
    fn matmul(
        &self,
        c: ViewMut<'_, Buf>,
        x: Option<View<'_, Buf>>,
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
        const OP: &str = "matmul";
        check_matmul([a.len(), b.len(), c.len()], [m, n, k], ta, tb)?;
        let (ab, cd) = (a.dtype(), c.dtype());
        check_matmul_dtypes(ab, b.dtype(), cd)?;
        let bytes = |len: usize, d: Dtype| (len * d.size()) as u64;
        let (a_bytes, b_bytes, c_bytes) =
            (bytes(a.len(), ab), bytes(b.len(), ab), bytes(c.len(), cd));
        if let Some(x) = &x {
            check_addend(x.dtype(), x.len(), cd, c.len())?;
        }
        let a = operand(OP, "a", a)?;
        let b = operand(OP, "b", b)?;
        let x_addr = match x {
            Some(x) => Some(operand(OP, "x", x)?),
            None => None,
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let c_addr = operand(OP, "c", c.as_view())?;
        let c_range = (c_addr, c_bytes);
        if bytes_meet(c_range, (a, a_bytes)) || bytes_meet(c_range, (b, b_bytes)) {
            // parts of one shared allocation (`alloc_shared`) that overlap
            return Err(Error::invalid(OP, "c shares memory with a or b"));
        }
        if x_addr.is_some_and(|x| bytes_meet(c_range, (x, c_bytes))) {
            return Err(Error::invalid("matmul_add", "d shares memory with x"));
        }
        if k == 0 {
            // c = beta * (x or c): cuBLASLt may refuse K = 0
            return match (beta, x) {
                (0.0, _) => self.fill_typed(c, 0.0),
                (1.0, None) => Ok(()),
                (1.0, Some(x)) => self.copy_typed(c, x),
                _ => Err(Error::invalid(OP, "K = 0 with beta other than 0 or 1")),
            };
        }
        let (a, b) = (
            Operand { addr: a, dtype: ab },
            Operand { addr: b, dtype: ab },
        );
        let addend = x_addr.unwrap_or(c_addr);
        let c = Operand {
            addr: c_addr,
            dtype: cd,
        };
        self.blas
            .matmul(c, addend, a, b, [m, n, k], ta, tb, alpha, beta)
    }
}

impl CudaDevice {
    /// sum_squares' kernel alone (the bench's, timing the kernel without the allocation, copy
    /// and wait of [`crate::device::Device::sum_squares`]): adds sum(x^2) into `acc`, an f32
    /// buffer of 2 elements whose 8 bytes hold one f64.
    pub fn sum_squares_kernel(&self, acc: &mut CudaBuf, x: View<'_, Buf>) -> Result<()> {
        const OP: &str = "sum_squares";
        let acc = dev_out::<f32>(OP, "acc", ViewMut::all(acc))?;
        if acc.len() != 2 {
            return Err(Error::invalid(
                OP,
                format!("acc: expected 2 f32 elements (one f64), got {}", acc.len()),
            ));
        }
        // an f64's atomic add needs 8-byte alignment (a buffer of its own has 256; a part of
        // a shared allocation may not)
        if acc.addr() % 8 != 0 {
            return Err(Error::invalid(
                OP,
                format!("acc at {:#x} is not 8-byte aligned for its f64", acc.addr()),
            ));
        }
        let acc = Out::Device(DevPtr::<f64>::new(acc.addr(), 1));
        match x.dtype() {
            Dtype::Bf16 => gpu::adamw::sum_squares(
                &self.launcher,
                acc,
                In::Device(dev_in::<bf16>(OP, "x", x)?),
            ),
            _ => {
                gpu::adamw::sum_squares(&self.launcher, acc, In::Device(dev_in::<f32>(OP, "x", x)?))
            }
        }
    }
}
