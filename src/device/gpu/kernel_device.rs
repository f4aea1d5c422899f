//! [`KernelDevice`]: the [`Device`] trait for the devices that run the kernels of
//! `kernels/*.cu` through the launchers of [`super`] ([`crate::device::emu_device::EmuDevice`] on
//! the CPU emulator, [`crate::device::cuda::CudaDevice`] on a GPU). Each op's mapping onto its
//! launcher (argument names in errors, the checks made before launching, scratch and
//! accumulators) is written once here, generic over what differs between those devices:
//! - how a window of a buffer becomes a launcher argument ([`In`], [`Out`], [`Ids`]): a host
//!   slice or a device address;
//! - the operations that are not kernels of ours (memory: alloc, upload, download, fill, copy;
//!   matmul: cuBLASLt on the GPU) and the f64 accumulator of `sum_squares`.
//!
//! `impl<T: KernelDevice> Device for T` gives every such device the whole [`Device`] trait.

use crate::device::cpu::policy_loss::{check_mask, check_shapes};
use crate::device::gpu::graph::{Call, CallRef, Count, Graph, MatmulCall};
use crate::device::gpu::scratch::{ScratchCache, ATTENTION_D, DECODE_ML, DECODE_O};
use crate::device::gpu::{self, Ids, In, Launch, Out};
use crate::device::{
    AdamwStep, AttnDims, CacheDims, Device, DeviceBuf, InjectMode, Part, PolicyLossSpec, PoolMode,
    RewardSpec, SampleSpec, View, ViewMut,
};
use crate::device::{Dtype, Storage};
use crate::{Error, Result};
use half::bf16;

type V<'a, D> = View<'a, <D as KernelDevice>::Buf>;
type M<'a, D> = ViewMut<'a, <D as KernelDevice>::Buf>;

/// A device whose kernel ops go through the launchers. The methods named as [`Device`]'s are
/// that trait's non-kernel ops, with the same contracts.
pub trait KernelDevice: Send + Sync + Sized {
    /// Device memory of f32 or bf16.
    type Buf: DeviceBuf;
    /// Device memory of u32 token ids.
    type Ids: Send + Sync;
    /// The backend the launchers launch through.
    type Launcher: Launch;

    fn launcher(&self) -> &Self::Launcher;

    // ---- graphs ([`Device::replay`])

    /// A captured step: a CUDA graph; `()` on the emulator.
    type Exec;
    /// Captures `step`'s launches into a graph without running them; `calls` are what the
    /// step was just recorded making.
    fn capture(&self, calls: &[Call], step: &mut dyn FnMut() -> Result<()>) -> Result<Self::Exec>;
    /// Runs a captured graph: one launch on a GPU; on the emulator `step` itself (the record
    /// showed that it makes the captured calls and nothing else).
    fn run_graph(&self, exec: &Self::Exec, step: &mut dyn FnMut() -> Result<()>) -> Result<()>;

    // ---- buffers as launcher arguments

    /// The elements a read-only view covers, as a `const S*`; an error names `op` and `what`
    /// (also when the buffer does not hold S).
    fn input<'a, S: Storage>(
        op: &'static str,
        what: &str,
        v: View<'a, Self::Buf>,
    ) -> Result<In<'a, S>>;
    /// The elements a writable view covers, as an `S*`; an error names `op` and `what` (also
    /// when the buffer does not hold S).
    fn output<'a, S: Storage>(
        op: &'static str,
        what: &str,
        v: ViewMut<'a, Self::Buf>,
    ) -> Result<Out<'a, S>>;
    /// Token ids (or positions) as a kernel argument.
    fn ids(ids: &Self::Ids) -> Ids<'_>;
    /// Token ids as a kernel output (`unsigned*`).
    fn ids_out(ids: &mut Self::Ids) -> Out<'_, u32>;
    /// A kernel wrote `ids`, every one below `bound`.
    fn ids_written(ids: &mut Self::Ids, bound: usize);
    /// The scratch buffers kept between launches ([`ScratchCache`]).
    fn scratch(&self) -> &ScratchCache<Self::Buf>;
    /// Runs `launch` on one zeroed f64 (which the kernel adds into) and returns its value after.
    fn accumulate_f64(&self, launch: impl FnOnce(Out<'_, f64>) -> Result<()>) -> Result<f64>;

    // ---- the ops that are not kernels of ours

    fn name(&self) -> String;
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn memory_budget(&self) -> Result<Option<usize>> {
        Ok(None)
    }
    fn work_dtype(&self) -> Dtype;
    /// f32 or bf16 (any other dtype is an error).
    fn alloc_as(&self, n: usize, dtype: Dtype) -> Result<Self::Buf>;
    /// One allocation of `bytes` with every part a buffer into it ([`Device::alloc_shared`]);
    /// an error where a part does not fit it (`gpu::check_kernel_parts`: reachable directly,
    /// so each device checks).
    fn alloc_shared(&self, bytes: usize, parts: &[Part]) -> Result<Vec<Self::Buf>>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn write(&self, dst: M<'_, Self>, host: &[f32]) -> Result<()>;
    fn download(&self, x: V<'_, Self>) -> Result<Vec<f32>>;
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids>;
    fn write_ids(&self, ids: &mut Self::Ids, host: &[u32]) -> Result<()>;
    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<u32>>;
    fn fill(&self, x: M<'_, Self>, value: f32) -> Result<()>;
    /// `dst = src` of the same dtype (a memory copy; conversions launch `convert`).
    fn copy_same(&self, dst: M<'_, Self>, src: V<'_, Self>) -> Result<()>;
    /// [`Device::matmul`] with `x` None; with `Some(x)` the addend is x instead of c's own
    /// contents: `c = alpha op(a) op(b) + beta x` ([`Device::matmul_add`]: alpha = beta = 1).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        c: M<'_, Self>,
        x: Option<V<'_, Self>>,
        a: V<'_, Self>,
        b: V<'_, Self>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;
}

/// Both directions of the policy loss: `out` is stats (forward) or dlogp (`bwd`); inputs logp,
/// old_logp, adv, mask. Shapes and the spec are checked as on the CPU; the mask's values where
/// they are on the host (device values stay unread: there a mask with no token gives a 0/0
/// loss, NaN).
#[allow(clippy::too_many_arguments)]
fn policy_loss<D: KernelDevice>(
    dev: &D,
    bwd: bool,
    out: M<'_, D>,
    inputs: [V<'_, D>; 4],
    ref_logp: Option<V<'_, D>>,
    s: usize,
    t: usize,
    spec: &PolicyLossSpec,
) -> Result<()> {
    let op = if bwd {
        "policy_loss_bwd"
    } else {
        "policy_loss_fwd"
    };
    let ref_len = ref_logp.as_ref().map(|r| r.len());
    check_shapes(op, inputs.map(|v| v.len()), ref_len, s, t, spec)?;
    let [logp, old_logp, adv, mask] = inputs;
    let mask = D::input(op, "mask", mask)?;
    // host values: the CPU device's check
    if let Some(m) = mask.host() {
        check_mask(op, m)?;
    }
    let ref_logp = ref_logp.map(|r| D::input(op, "ref_logp", r)).transpose()?;
    let inputs = [
        D::input(op, "logp", logp)?,
        D::input(op, "old_logp", old_logp)?,
        D::input(op, "adv", adv)?,
        mask,
    ];
    gpu::policy_loss::policy_loss(
        dev.launcher(),
        bwd,
        D::output(op, if bwd { "dlogp" } else { "stats" }, out)?,
        inputs,
        ref_logp,
        s,
        t,
        spec,
    )
}

/// Runs `$body` with the type `$s` bound to the storage type of `$dtype`: bf16, or f32 (a
/// kernel device's buffers hold nothing else).
macro_rules! by_dtype {
    ($dtype:expr, $s:ident => $body:expr) => {
        match $dtype {
            Dtype::Bf16 => {
                type $s = bf16;
                $body
            }
            _ => {
                type $s = f32;
                $body
            }
        }
    };
}

/// [`Device::matmul`] (`x` None) or [`Device::matmul_add`] (`x` the addend): recorded where a
/// graph is being recorded, else made.
#[allow(clippy::too_many_arguments)]
fn matmul_call<T: KernelDevice>(
    dev: &T,
    c: M<'_, T>,
    x: Option<V<'_, T>>,
    a: V<'_, T>,
    b: V<'_, T>,
    [m, n, k]: [usize; 3],
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if let Some(rec) = dev.launcher().recorder().filter(|r| r.on_here()) {
        // the checks the devices' matmul makes, before a call that may not run now
        const OP: &str = "matmul";
        let dtypes = [c.dtype(), a.dtype(), b.dtype()];
        crate::device::cpu::check_matmul([a.len(), b.len(), c.len()], [m, n, k], ta, tb)?;
        crate::device::emu_device::check_matmul_dtypes(dtypes[1], dtypes[2], dtypes[0])?;
        let lens = [c.len(), a.len(), b.len()].map(|x| x as u64);
        let c_addr = by_dtype!(dtypes[0], S => T::input::<S>(OP, "c", c.as_view())?.addr());
        let x_addr = match x {
            Some(x) => {
                check_addend(x.dtype(), x.len(), dtypes[0], c.len())?;
                by_dtype!(dtypes[0], S => T::input::<S>(OP, "x", x)?.addr())
            }
            None => c_addr,
        };
        let addrs = [
            c_addr,
            x_addr,
            by_dtype!(dtypes[1], S => T::input::<S>(OP, "a", a)?.addr()),
            by_dtype!(dtypes[2], S => T::input::<S>(OP, "b", b)?.addr()),
        ];
        let [mm, nn, kk, ta1, tb1] = [m, n, k, ta as usize, tb as usize].map(|x| x as u64);
        let (al, be) = (u64::from(alpha.to_bits()), u64::from(beta.to_bits()));
        let recorded = rec.record(CallRef::Matmul(MatmulCall {
            operands: [
                addrs[0], addrs[1], addrs[2], addrs[3], lens[0], lens[1], lens[2],
            ],
            shape: [mm, nn, kk, ta1, tb1, al, be],
            dtypes,
        }));
        if recorded {
            // recorded, not made; a capture being checked makes it below
            return Ok(());
        }
    }
    KernelDevice::matmul(dev, c, x, a, b, m, n, k, ta, tb, alpha, beta)
}

/// `matmul_add`'s addend x: d's dtype and length.
pub(crate) fn check_addend(x: Dtype, x_len: usize, d: Dtype, d_len: usize) -> Result<()> {
    const OP: &str = "matmul_add";
    if x != d {
        return Err(Error::invalid(
            OP,
            format!("x is {x}, d {d}: x must have d's dtype"),
        ));
    }
    crate::device::cpu::check_same(OP, "x", x_len, d_len)
}

/// A device call a step to replay may not make: an error while recording.
fn refuse<T: KernelDevice>(dev: &T, op: &str) -> Result<()> {
    match dev.launcher().recorder() {
        Some(r) => r.refuse(op),
        None => Ok(()),
    }
}

impl<T: KernelDevice> Device for T {
    type Buf = T::Buf;
    type Ids = T::Ids;
    type Graph = Graph<T::Exec>;

    fn name(&self) -> String {
        KernelDevice::name(self)
    }

    fn replay(&self, g: &mut Self::Graph, step: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let on = !g.broken && gpu::graph::enabled();
        let Some(rec) = self.launcher().recorder().filter(|_| on) else {
            return step();
        };
        let recording = match rec.start(std::mem::take(&mut g.calls)) {
            Ok(r) => r,
            Err(calls) => {
                // another thread records on this device: as it is
                g.calls = calls;
                return step();
            }
        };
        let recorded = step();
        let finished = recording.finish();
        let (calls, same) = match (recorded, finished) {
            (Ok(()), Ok(r)) => r,
            _ => {
                // a step that allocates, copies or waits (or fails): as it is
                g.exec = None;
                return step();
            }
        };
        g.calls = calls;
        if let Some(exec) = g.exec.as_ref().filter(|_| same) {
            match self.run_graph(exec, step) {
                Ok(()) => {
                    rec.count(Count::Replay);
                    return Ok(());
                }
                Err(e) => {
                    // the graph did not launch: no graph for this step from now on
                    g.exec = None;
                    g.broken = true;
                    rec.fail(format!("graph launch: {e}"));
                    return step();
                }
            }
        }
        // new calls: the step runs as it is, which also loads every kernel and matmul
        // algorithm it uses (the warm-up a capture needs: nothing loads while capturing), and
        // is captured, not run, for the calls to come
        g.exec = None;
        step()?;
        match self.capture(&g.calls, step) {
            Ok(exec) => {
                g.exec = Some(exec);
                rec.captured(&g.calls);
            }
            Err(e) => {
                // a device that cannot capture this step: no graph for it from now on
                g.broken = true;
                rec.fail(e.to_string());
            }
        }
        Ok(())
    }

    fn graph_stats(&self) -> Option<crate::device::GraphStats> {
        let rec = self.launcher().recorder()?;
        let [captures, replays, failures] = rec.counts();
        let [graph_kernels, graph_matmuls] = rec.last_graph();
        Some(crate::device::GraphStats {
            captures,
            replays,
            failures,
            first_failure: rec.first_failure().map(str::to_string),
            graph_kernels,
            graph_matmuls,
        })
    }

    fn synchronize(&self) -> Result<()> {
        refuse(self, "a wait")?;
        KernelDevice::synchronize(self)
    }
    fn memory_budget(&self) -> Result<Option<usize>> {
        KernelDevice::memory_budget(self)
    }
    fn work_dtype(&self) -> Dtype {
        KernelDevice::work_dtype(self)
    }
    fn alloc(&self, n: usize) -> Result<T::Buf> {
        refuse(self, "an allocation")?;
        KernelDevice::alloc_as(self, n, Dtype::F32)
    }
    fn alloc_as(&self, n: usize, dtype: Dtype) -> Result<T::Buf> {
        refuse(self, "an allocation")?;
        KernelDevice::alloc_as(self, n, dtype)
    }
    fn alloc_shared(&self, bytes: usize, parts: &[Part]) -> Result<Vec<T::Buf>> {
        refuse(self, "an allocation")?;
        KernelDevice::alloc_shared(self, bytes, parts)
    }
    fn upload(&self, host: &[f32]) -> Result<T::Buf> {
        refuse(self, "an upload")?;
        KernelDevice::upload(self, host)
    }
    fn write(&self, dst: M<'_, T>, host: &[f32]) -> Result<()> {
        refuse(self, "a write from the host")?;
        KernelDevice::write(self, dst, host)
    }
    fn download(&self, x: V<'_, T>) -> Result<Vec<f32>> {
        refuse(self, "a download")?;
        KernelDevice::download(self, x)
    }
    fn upload_ids(&self, host: &[u32]) -> Result<T::Ids> {
        refuse(self, "an upload")?;
        KernelDevice::upload_ids(self, host)
    }
    fn write_ids(&self, ids: &mut T::Ids, host: &[u32]) -> Result<()> {
        refuse(self, "a write from the host")?;
        KernelDevice::write_ids(self, ids, host)
    }
    fn download_ids(&self, ids: &T::Ids) -> Result<Vec<u32>> {
        refuse(self, "a download")?;
        KernelDevice::download_ids(self, ids)
    }
    fn fill(&self, x: M<'_, T>, value: f32) -> Result<()> {
        refuse(self, "a fill")?;
        KernelDevice::fill(self, x, value)
    }
    fn copy(&self, dst: M<'_, T>, src: V<'_, T>) -> Result<()> {
        const OP: &str = "copy";
        let l = self.launcher();
        match (dst.dtype(), src.dtype()) {
            (a, b) if a == b => {
                refuse(self, "a copy")?;
                KernelDevice::copy_same(self, dst, src)
            }
            (Dtype::Bf16, Dtype::F32) => gpu::convert::convert::<bf16, f32, _>(
                l,
                T::output(OP, "dst", dst)?,
                T::input(OP, "src", src)?,
            ),
            (Dtype::F32, Dtype::Bf16) => gpu::convert::convert::<f32, bf16, _>(
                l,
                T::output(OP, "dst", dst)?,
                T::input(OP, "src", src)?,
            ),
            (a, b) => Err(Error::invalid(OP, format!("no conversion from {b} to {a}"))),
        }
    }
    fn matmul(
        &self,
        c: M<'_, T>,
        a: V<'_, T>,
        b: V<'_, T>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        matmul_call(self, c, None, a, b, [m, n, k], ta, tb, alpha, beta)
    }

    fn matmul_add(
        &self,
        d: M<'_, T>,
        x: V<'_, T>,
        a: V<'_, T>,
        b: V<'_, T>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> Result<()> {
        matmul_call(self, d, Some(x), a, b, [m, n, k], ta, tb, 1.0, 1.0)
    }

    fn embedding_fwd(
        &self,
        out: M<'_, T>,
        ids: &T::Ids,
        wte: V<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_fwd";
        by_dtype!(out.dtype(), S => gpu::embedding::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::ids(ids),
            T::input(OP, "wte", wte)?,
            n,
            c,
        ))
    }

    fn embedding_bwd(
        &self,
        dwte: M<'_, T>,
        ids: &T::Ids,
        dout: V<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_bwd";
        by_dtype!(dout.dtype(), S => gpu::embedding::bwd(
            self.launcher(),
            T::output(OP, "dwte", dwte)?,
            T::ids(ids),
            T::input::<S>(OP, "dout", dout)?,
            n,
            c,
        ))
    }

    fn rmsnorm_fwd(
        &self,
        out: M<'_, T>,
        rstd: M<'_, T>,
        x: V<'_, T>,
        w: V<'_, T>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_fwd";
        by_dtype!(out.dtype(), S => gpu::rmsnorm::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::output(OP, "rstd", rstd)?,
            T::input(OP, "x", x)?,
            T::input(OP, "w", w)?,
            n,
            c,
            eps,
        ))
    }

    fn rmsnorm_bwd(
        &self,
        dx: M<'_, T>,
        dw: M<'_, T>,
        dout: V<'_, T>,
        x: V<'_, T>,
        w: V<'_, T>,
        rstd: V<'_, T>,
        n: usize,
        c: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_bwd";
        by_dtype!(dx.dtype(), S => gpu::rmsnorm::bwd(
            self.launcher(),
            T::output::<S>(OP, "dx", dx)?,
            T::output(OP, "dw", dw)?,
            T::input(OP, "dout", dout)?,
            T::input(OP, "x", x)?,
            T::input(OP, "w", w)?,
            T::input(OP, "rstd", rstd)?,
            n,
            c,
            accumulate,
        ))
    }

    fn rope_fwd(
        &self,
        x: M<'_, T>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        pos: Option<&T::Ids>,
        theta: f32,
    ) -> Result<()> {
        let pos = pos.map(T::ids);
        by_dtype!(x.dtype(), S => {
            let x = T::output::<S>("rope_fwd", "x", x)?;
            gpu::rope::rope(self.launcher(), x, [b, t, h, hs], pos0, pos, theta, false)
        })
    }

    fn rope_bwd(
        &self,
        dx: M<'_, T>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        by_dtype!(dx.dtype(), S => {
            let dx = T::output::<S>("rope_bwd", "dx", dx)?;
            gpu::rope::rope(self.launcher(), dx, [b, t, h, hs], pos0, None, theta, true)
        })
    }

    fn qkv_rope_fwd(
        &self,
        q: M<'_, T>,
        k: M<'_, T>,
        v: M<'_, T>,
        qkv: V<'_, T>,
        pos: Option<&T::Ids>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "qkv_rope_fwd";
        let pos = pos.map(T::ids);
        by_dtype!(q.dtype(), S => gpu::rope::qkv_fwd(
            self.launcher(),
            T::output::<S>(OP, "q", q)?,
            T::output(OP, "k", k)?,
            T::output(OP, "v", v)?,
            T::input(OP, "qkv", qkv)?,
            pos,
            d,
            theta,
        ))
    }

    fn qkv_rope_bwd(
        &self,
        dqkv: M<'_, T>,
        dq: V<'_, T>,
        dk: V<'_, T>,
        dv: V<'_, T>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "qkv_rope_bwd";
        by_dtype!(dqkv.dtype(), S => gpu::rope::qkv_bwd(
            self.launcher(),
            T::output::<S>(OP, "dqkv", dqkv)?,
            T::input(OP, "dq", dq)?,
            T::input(OP, "dk", dk)?,
            T::input(OP, "dv", dv)?,
            d,
            theta,
        ))
    }

    fn attention_fwd(
        &self,
        out: M<'_, T>,
        lse: M<'_, T>,
        q: V<'_, T>,
        k: V<'_, T>,
        v: V<'_, T>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_fwd";
        by_dtype!(out.dtype(), S => gpu::attention::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::output(OP, "lse", lse)?,
            T::input(OP, "q", q)?,
            T::input(OP, "k", k)?,
            T::input(OP, "v", v)?,
            d,
        ))
    }

    fn attention_bwd(
        &self,
        dq: M<'_, T>,
        dk: M<'_, T>,
        dv: M<'_, T>,
        dout: V<'_, T>,
        q: V<'_, T>,
        k: V<'_, T>,
        v: V<'_, T>,
        out: V<'_, T>,
        lse: V<'_, T>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        // scratch D [B,NH,T], overwritten by the kernels; lse's shape, so empty (and the
        // launcher reports lse) where lse does not match the dims
        let len = gpu::attention::bwd_scratch_len(&d);
        let len = if lse.len() == len { len } else { 0 };
        let alloc = |n| Device::alloc(self, n);
        self.scratch().with(ATTENTION_D, len, alloc, |scratch| {
            let dscratch = T::output(OP, "dscratch", ViewMut::range(scratch, 0, len))?;
            by_dtype!(dq.dtype(), S => gpu::attention::bwd(
                self.launcher(),
                T::output::<S>(OP, "dq", dq)?,
                T::output(OP, "dk", dk)?,
                T::output(OP, "dv", dv)?,
                dscratch,
                T::input(OP, "dout", dout)?,
                T::input(OP, "q", q)?,
                T::input(OP, "k", k)?,
                T::input(OP, "v", v)?,
                T::input(OP, "out", out)?,
                T::input(OP, "lse", lse)?,
                d,
            ))
        })
    }

    fn swiglu_fwd(&self, out: M<'_, T>, gu: V<'_, T>) -> Result<()> {
        const OP: &str = "swiglu_fwd";
        by_dtype!(out.dtype(), S => gpu::swiglu::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::input(OP, "gu", gu)?,
        ))
    }

    fn swiglu_bwd(&self, dgu: M<'_, T>, dout: V<'_, T>, gu: V<'_, T>) -> Result<()> {
        const OP: &str = "swiglu_bwd";
        by_dtype!(dgu.dtype(), S => gpu::swiglu::bwd(
            self.launcher(),
            T::output::<S>(OP, "dgu", dgu)?,
            T::input(OP, "dout", dout)?,
            T::input(OP, "gu", gu)?,
        ))
    }

    fn residual_fwd(&self, out: M<'_, T>, a: V<'_, T>, b: V<'_, T>) -> Result<()> {
        const OP: &str = "residual_fwd";
        by_dtype!(out.dtype(), S => gpu::residual::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::input(OP, "a", a)?,
            T::input(OP, "b", b)?,
        ))
    }

    fn residual_bwd(&self, da: M<'_, T>, dout: V<'_, T>) -> Result<()> {
        const OP: &str = "residual_bwd";
        by_dtype!(da.dtype(), S => gpu::residual::bwd(
            self.launcher(),
            T::output::<S>(OP, "da", da)?,
            T::input(OP, "dout", dout)?,
        ))
    }

    fn cross_entropy_chunk_fwd(
        &self,
        losses: M<'_, T>,
        state: M<'_, T>,
        logits: V<'_, T>,
        targets: &T::Ids,
        mask: V<'_, T>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_chunk_fwd";
        by_dtype!(logits.dtype(), S => gpu::cross_entropy::chunk_fwd(
            self.launcher(),
            T::output(OP, "losses", losses)?,
            T::output(OP, "state", state)?,
            T::input::<S>(OP, "logits", logits)?,
            T::ids(targets),
            T::input(OP, "mask", mask)?,
            n,
            (vc, v, v0),
        ))
    }

    fn cross_entropy_chunk_bwd(
        &self,
        logits: M<'_, T>,
        state: V<'_, T>,
        targets: &T::Ids,
        mask: V<'_, T>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_chunk_bwd";
        by_dtype!(logits.dtype(), S => gpu::cross_entropy::chunk_bwd(
            self.launcher(),
            T::output::<S>(OP, "logits", logits)?,
            T::input(OP, "state", state)?,
            T::ids(targets),
            T::input(OP, "mask", mask)?,
            n,
            (vc, v, v0),
            scale,
        ))
    }

    fn softmax_fwd(&self, out: M<'_, T>, x: V<'_, T>, n: usize, v: usize) -> Result<()> {
        const OP: &str = "softmax_fwd";
        by_dtype!(out.dtype(), S => gpu::softmax::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::input(OP, "x", x)?,
            n,
            v,
        ))
    }

    fn softmax_bwd(
        &self,
        dx: M<'_, T>,
        dout: V<'_, T>,
        out: V<'_, T>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_bwd";
        by_dtype!(dx.dtype(), S => gpu::softmax::bwd(
            self.launcher(),
            T::output::<S>(OP, "dx", dx)?,
            T::input(OP, "dout", dout)?,
            T::input(OP, "out", out)?,
            n,
            v,
        ))
    }

    fn inject_fwd(
        &self,
        h: M<'_, T>,
        sites: &T::Ids,
        vecs: V<'_, T>,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_fwd";
        by_dtype!(h.dtype(), S => gpu::inject::fwd(
            self.launcher(),
            T::output::<S>(OP, "h", h)?,
            T::ids(sites),
            T::input(OP, "vecs", vecs)?,
            n,
            c,
            mode,
        ))
    }

    fn inject_bwd(
        &self,
        dvecs: M<'_, T>,
        dh: M<'_, T>,
        sites: &T::Ids,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_bwd";
        by_dtype!(dvecs.dtype(), S => gpu::inject::bwd(
            self.launcher(),
            T::output::<S>(OP, "dvecs", dvecs)?,
            T::output(OP, "dh", dh)?,
            T::ids(sites),
            n,
            c,
            mode,
        ))
    }

    fn norm_scale_fwd(&self, y: M<'_, T>, x: V<'_, T>, n: usize, d: usize, s: f32) -> Result<()> {
        const OP: &str = "norm_scale_fwd";
        by_dtype!(y.dtype(), S => gpu::norm_scale::fwd(
            self.launcher(),
            T::output::<S>(OP, "y", y)?,
            T::input(OP, "x", x)?,
            n,
            d,
            s,
        ))
    }

    fn norm_scale_bwd(
        &self,
        dx: M<'_, T>,
        dy: V<'_, T>,
        x: V<'_, T>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()> {
        const OP: &str = "norm_scale_bwd";
        by_dtype!(dx.dtype(), S => gpu::norm_scale::bwd(
            self.launcher(),
            T::output::<S>(OP, "dx", dx)?,
            T::input(OP, "dy", dy)?,
            T::input(OP, "x", x)?,
            n,
            d,
            s,
        ))
    }

    fn pool_fwd(
        &self,
        out: M<'_, T>,
        h: V<'_, T>,
        mask: V<'_, T>,
        w: Option<V<'_, T>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_fwd";
        by_dtype!(out.dtype(), S => gpu::pool::fwd(
            self.launcher(),
            T::output::<S>(OP, "out", out)?,
            T::input(OP, "h", h)?,
            T::input(OP, "mask", mask)?,
            w.map(|w| T::input(OP, "w", w)).transpose()?,
            [b, t, c],
            mode,
        ))
    }

    fn pool_bwd(
        &self,
        dh: M<'_, T>,
        dw: Option<M<'_, T>>,
        dout: V<'_, T>,
        h: V<'_, T>,
        mask: V<'_, T>,
        w: Option<V<'_, T>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_bwd";
        let dw = dw.map(|d| T::output(OP, "dw", d)).transpose()?;
        by_dtype!(dh.dtype(), S => gpu::pool::bwd(
            self.launcher(),
            T::output::<S>(OP, "dh", dh)?,
            dw,
            T::input(OP, "dout", dout)?,
            T::input(OP, "h", h)?,
            T::input(OP, "mask", mask)?,
            w.map(|w| T::input(OP, "w", w)).transpose()?,
            [b, t, c],
            mode,
        ))
    }

    fn reward_advantage(
        &self,
        mse: M<'_, T>,
        reward: M<'_, T>,
        advantage: M<'_, T>,
        pred: V<'_, T>,
        target: V<'_, T>,
        valid: V<'_, T>,
        s: usize,
        a: usize,
        spec: &RewardSpec,
    ) -> Result<()> {
        const OP: &str = "reward_advantage";
        by_dtype!(pred.dtype(), S => gpu::reward_advantage::reward_advantage(
            self.launcher(),
            T::output(OP, "mse", mse)?,
            T::output(OP, "reward", reward)?,
            T::output(OP, "advantage", advantage)?,
            T::input::<S>(OP, "pred", pred)?,
            T::input(OP, "target", target)?,
            T::input(OP, "valid", valid)?,
            s,
            a,
            spec,
        ))
    }

    fn policy_loss_fwd(
        &self,
        stats: M<'_, T>,
        logp: V<'_, T>,
        old_logp: V<'_, T>,
        adv: V<'_, T>,
        mask: V<'_, T>,
        ref_logp: Option<V<'_, T>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()> {
        let inputs = [logp, old_logp, adv, mask];
        policy_loss(self, false, stats, inputs, ref_logp, s, t, spec)
    }

    fn policy_loss_bwd(
        &self,
        dlogp: M<'_, T>,
        logp: V<'_, T>,
        old_logp: V<'_, T>,
        adv: V<'_, T>,
        mask: V<'_, T>,
        ref_logp: Option<V<'_, T>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()> {
        let inputs = [logp, old_logp, adv, mask];
        policy_loss(self, true, dlogp, inputs, ref_logp, s, t, spec)
    }

    fn adamw(
        &self,
        p: M<'_, T>,
        work: Option<M<'_, T>>,
        g: V<'_, T>,
        m: M<'_, T>,
        v: M<'_, T>,
        hp: &AdamwStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let p16 = match work {
            // a bf16 working copy: written by the same pass (adamw_bf16)
            Some(w) if w.dtype() == Dtype::Bf16 => Some(T::output(OP, "work", w)?),
            // an f32 one: a copy of the new p
            Some(w) => {
                let mut p = p;
                Device::adamw(self, p.reborrow(), None, g, m, v, hp)?;
                return Device::copy(self, w, p.as_view());
            }
            None => None,
        };
        gpu::adamw::adamw(
            self.launcher(),
            T::output(OP, "p", p)?,
            p16,
            T::input(OP, "g", g)?,
            T::output(OP, "m", m)?,
            T::output(OP, "v", v)?,
            hp,
        )
    }

    fn sum_squares(&self, x: V<'_, T>) -> Result<f64> {
        refuse(self, "a download")?;
        // the kernel adds into out[0] with atomics: zeroed first
        by_dtype!(x.dtype(), S => {
            let x = T::input::<S>("sum_squares", "x", x)?;
            self.accumulate_f64(|out| gpu::adamw::sum_squares(self.launcher(), out, x))
        })
    }

    fn kv_append_fwd(
        &self,
        kcache: M<'_, T>,
        vcache: M<'_, T>,
        k: V<'_, T>,
        v: V<'_, T>,
        pos: Option<&T::Ids>,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "kv_append_fwd";
        by_dtype!(kcache.dtype(), S => gpu::kv_append::fwd(
            self.launcher(),
            T::output::<S>(OP, "kcache", kcache)?,
            T::output(OP, "vcache", vcache)?,
            T::input(OP, "k", k)?,
            T::input(OP, "v", v)?,
            pos.map(T::ids),
            d,
        ))
    }

    fn decode_attention_fwd(
        &self,
        out: M<'_, T>,
        q: V<'_, T>,
        kcache: V<'_, T>,
        vcache: V<'_, T>,
        starts: &T::Ids,
        pos: Option<&T::Ids>,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "decode_attention_fwd";
        // split-K partials, written before being read; empty (and the launcher reports out)
        // where out does not match the dims. Host starts give the split their values call for;
        // device starts (values unknown) the split as if they were 0.
        let starts = T::ids(starts);
        let out_len = [d.b, d.tq, d.nh, d.hs]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        let (lo, lml) = if out_len == Some(out.len()) {
            gpu::decode_attention::scratch_lens(self.launcher(), &d, starts, pos.is_some())
        } else {
            (0, 0)
        };
        let alloc = |n| Device::alloc(self, n);
        self.scratch().with(DECODE_O, lo, alloc, |part_o| {
            self.scratch().with(DECODE_ML, lml, alloc, |part_ml| {
                by_dtype!(out.dtype(), S => gpu::decode_attention::fwd(
                    self.launcher(),
                    T::output::<S>(OP, "out", out)?,
                    T::output(OP, "part_o", ViewMut::range(part_o, 0, lo))?,
                    T::output(OP, "part_ml", ViewMut::range(part_ml, 0, lml))?,
                    T::input(OP, "q", q)?,
                    T::input(OP, "kcache", kcache)?,
                    T::input(OP, "vcache", vcache)?,
                    starts,
                    pos.map(T::ids),
                    d,
                ))
            })
        })
    }

    fn sample_fwd(
        &self,
        ids: &mut T::Ids,
        logp: M<'_, T>,
        logits: V<'_, T>,
        u: V<'_, T>,
        n: usize,
        v: usize,
        spec: &SampleSpec,
    ) -> Result<()> {
        const OP: &str = "sample_fwd";
        by_dtype!(logits.dtype(), S => gpu::sample::fwd(
            self.launcher(),
            T::ids_out(ids),
            T::output(OP, "logp", logp)?,
            T::input::<S>(OP, "logits", logits)?,
            T::input(OP, "u", u)?,
            n,
            v,
            spec,
        ))?;
        // every sampled id is a row index of the logits
        T::ids_written(ids, v);
        Ok(())
    }
}
