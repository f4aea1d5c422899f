//! The [`Device`] trait on [`CudaDevice`]: memory operations through the driver, matmul through
//! cuBLASLt, and every other op through its launcher ([`gpu`]) with device addresses. The op
//! list and argument order mirror `emu_device.rs`, which runs the same launchers on the CPU
//! emulator.

use cudarc::driver::DevicePtr;

use super::{dev_in, dev_out, CudaBuf, CudaDevice, CudaIds};
use crate::device::cpu::check_matmul;
use crate::device::cpu::policy_loss::check_shapes;
use crate::device::gpu::{self, DevPtr, Ids, In, Out};
use crate::device::{
    AdamwStep, AttnDims, CacheDims, Device, InjectMode, PolicyLossSpec, PoolMode, RewardSpec,
    SampleSpec, View, ViewMut,
};
use crate::{Error, Result};

type Buf = CudaBuf;

impl CudaIds {
    /// These ids as a kernel argument.
    fn arg(&self) -> Ids<'_> {
        Ids::Device {
            ptr: DevPtr::new(self.addr, self.len),
            bound: self.bound,
        }
    }
}

impl CudaDevice {
    /// Both directions of the policy loss: `out` is stats (forward) or dlogp (`bwd`); inputs
    /// logp, old_logp, adv, mask. Shapes and the spec are checked as on the CPU; the mask's
    /// values stay on the device (a mask with no token gives a 0/0 loss there, NaN).
    #[allow(clippy::too_many_arguments)]
    fn policy_loss(
        &self,
        bwd: bool,
        out: ViewMut<'_, Buf>,
        inputs: [View<'_, Buf>; 4],
        ref_logp: Option<View<'_, Buf>>,
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
        let ref_logp = ref_logp.map(|r| dev_in(op, "ref_logp", r)).transpose()?;
        let [logp, old_logp, adv, mask] = inputs;
        gpu::policy_loss::policy_loss(
            &self.launcher,
            bwd,
            dev_out(op, if bwd { "dlogp" } else { "stats" }, out)?,
            [
                dev_in(op, "logp", logp)?,
                dev_in(op, "old_logp", old_logp)?,
                dev_in(op, "adv", adv)?,
                dev_in(op, "mask", mask)?,
            ],
            ref_logp.map(In::Device),
            s,
            t,
            spec,
        )
    }
}

impl Device for CudaDevice {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }

    fn memory_budget(&self) -> Result<Option<usize>> {
        self.memory().map(|(free, _)| Some(free))
    }

    fn alloc(&self, n: usize) -> Result<Buf> {
        self.alloc_f32(n)
    }
    fn upload(&self, host: &[f32]) -> Result<Buf> {
        self.upload_f32(host)
    }
    fn download(&self, x: View<'_, Buf>) -> Result<Vec<f32>> {
        self.download_f32(x)
    }
    fn upload_ids(&self, host: &[u32]) -> Result<CudaIds> {
        self.upload_ids_u32(host)
    }
    fn download_ids(&self, ids: &CudaIds) -> Result<Vec<u32>> {
        self.download_ids_u32(ids)
    }
    fn fill(&self, x: ViewMut<'_, Buf>, value: f32) -> Result<()> {
        self.fill_f32(x, value)
    }
    fn copy(&self, dst: ViewMut<'_, Buf>, src: View<'_, Buf>) -> Result<()> {
        self.copy_f32(dst, src)
    }

    fn embedding_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        ids: &CudaIds,
        wte: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_fwd";
        gpu::embedding::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            ids.arg(),
            dev_in(OP, "wte", wte)?,
            n,
            c,
        )
    }

    fn embedding_bwd(
        &self,
        dwte: ViewMut<'_, Buf>,
        ids: &CudaIds,
        dout: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_bwd";
        gpu::embedding::bwd(
            &self.launcher,
            dev_out(OP, "dwte", dwte)?,
            ids.arg(),
            dev_in(OP, "dout", dout)?,
            n,
            c,
        )
    }

    fn rmsnorm_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        rstd: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        w: View<'_, Buf>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_fwd";
        gpu::rmsnorm::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_out(OP, "rstd", rstd)?,
            dev_in(OP, "x", x)?,
            dev_in(OP, "w", w)?,
            n,
            c,
            eps,
        )
    }

    fn rmsnorm_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dw: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        x: View<'_, Buf>,
        w: View<'_, Buf>,
        rstd: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_bwd";
        gpu::rmsnorm::bwd(
            &self.launcher,
            dev_out(OP, "dx", dx)?,
            dev_out(OP, "dw", dw)?,
            dev_in(OP, "dout", dout)?,
            dev_in(OP, "x", x)?,
            dev_in(OP, "w", w)?,
            dev_in(OP, "rstd", rstd)?,
            n,
            c,
        )
    }

    fn rope_fwd(
        &self,
        x: ViewMut<'_, Buf>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        let x = dev_out("rope_fwd", "x", x)?;
        gpu::rope::rope(&self.launcher, x, [b, t, h, hs], pos0, theta, false)
    }

    fn rope_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        let dx = dev_out("rope_bwd", "dx", dx)?;
        gpu::rope::rope(&self.launcher, dx, [b, t, h, hs], pos0, theta, true)
    }

    fn attention_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        lse: ViewMut<'_, Buf>,
        q: View<'_, Buf>,
        k: View<'_, Buf>,
        v: View<'_, Buf>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_fwd";
        gpu::attention::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_out(OP, "lse", lse)?,
            dev_in(OP, "q", q)?,
            dev_in(OP, "k", k)?,
            dev_in(OP, "v", v)?,
            d,
        )
    }

    fn attention_bwd(
        &self,
        dq: ViewMut<'_, Buf>,
        dk: ViewMut<'_, Buf>,
        dv: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        q: View<'_, Buf>,
        k: View<'_, Buf>,
        v: View<'_, Buf>,
        out_: View<'_, Buf>,
        lse: View<'_, Buf>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        // scratch D [B,NH,T], overwritten by the kernels; lse's shape, so empty (and the
        // launcher reports lse) where lse does not match the dims
        let len = gpu::attention::bwd_scratch_len(&d);
        let mut scratch = self.alloc_f32(if lse.len() == len { len } else { 0 })?;
        let dscratch = dev_out(OP, "dscratch", ViewMut::all(&mut scratch))?;
        gpu::attention::bwd(
            &self.launcher,
            dev_out(OP, "dq", dq)?,
            dev_out(OP, "dk", dk)?,
            dev_out(OP, "dv", dv)?,
            dscratch,
            dev_in(OP, "dout", dout)?,
            dev_in(OP, "q", q)?,
            dev_in(OP, "k", k)?,
            dev_in(OP, "v", v)?,
            dev_in(OP, "out", out_)?,
            dev_in(OP, "lse", lse)?,
            d,
        )
    }

    fn swiglu_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        gate: View<'_, Buf>,
        up: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "swiglu_fwd";
        gpu::swiglu::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_in(OP, "gate", gate)?,
            dev_in(OP, "up", up)?,
        )
    }

    fn swiglu_bwd(
        &self,
        dgate: ViewMut<'_, Buf>,
        dup: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        gate: View<'_, Buf>,
        up: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "swiglu_bwd";
        gpu::swiglu::bwd(
            &self.launcher,
            dev_out(OP, "dgate", dgate)?,
            dev_out(OP, "dup", dup)?,
            dev_in(OP, "dout", dout)?,
            dev_in(OP, "gate", gate)?,
            dev_in(OP, "up", up)?,
        )
    }

    /// cuBLASLt (f32 in, f32 compute).
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
        const OP: &str = "matmul";
        check_matmul([a.len(), b.len(), c.len()], [m, n, k], ta, tb)?;
        dev_in(OP, "a", a)?;
        dev_in(OP, "b", b)?;
        dev_in(OP, "c", c.as_view())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            // c = beta * c: cuBLASLt may refuse K = 0
            return match beta {
                0.0 => self.fill_f32(c, 0.0),
                1.0 => Ok(()),
                _ => Err(Error::invalid(OP, "K = 0 with beta other than 0 or 1")),
            };
        }
        self.blas.matmul(c, a, b, [m, n, k], ta, tb, alpha, beta)
    }

    fn residual_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "residual_fwd";
        gpu::residual::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_in(OP, "a", a)?,
            dev_in(OP, "b", b)?,
        )
    }

    fn residual_bwd(&self, da: ViewMut<'_, Buf>, dout: View<'_, Buf>) -> Result<()> {
        const OP: &str = "residual_bwd";
        gpu::residual::bwd(
            &self.launcher,
            dev_out(OP, "da", da)?,
            dev_in(OP, "dout", dout)?,
        )
    }

    fn cross_entropy_fwd(
        &self,
        losses: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        targets: &CudaIds,
        mask: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_fwd";
        gpu::cross_entropy::fwd(
            &self.launcher,
            dev_out(OP, "losses", losses)?,
            dev_in(OP, "logits", logits)?,
            targets.arg(),
            dev_in(OP, "mask", mask)?,
            n,
            v,
        )
    }

    fn cross_entropy_bwd(
        &self,
        dlogits: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        targets: &CudaIds,
        mask: View<'_, Buf>,
        n: usize,
        v: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_bwd";
        gpu::cross_entropy::bwd(
            &self.launcher,
            dev_out(OP, "dlogits", dlogits)?,
            dev_in(OP, "logits", logits)?,
            targets.arg(),
            dev_in(OP, "mask", mask)?,
            n,
            v,
            scale,
        )
    }

    fn softmax_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_fwd";
        gpu::softmax::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_in(OP, "x", x)?,
            n,
            v,
        )
    }

    fn softmax_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        out: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_bwd";
        gpu::softmax::bwd(
            &self.launcher,
            dev_out(OP, "dx", dx)?,
            dev_in(OP, "dout", dout)?,
            dev_in(OP, "out", out)?,
            n,
            v,
        )
    }

    fn inject_fwd(
        &self,
        h: ViewMut<'_, Buf>,
        sites: &CudaIds,
        vecs: View<'_, Buf>,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_fwd";
        gpu::inject::fwd(
            &self.launcher,
            dev_out(OP, "h", h)?,
            sites.arg(),
            dev_in(OP, "vecs", vecs)?,
            n,
            c,
            mode,
        )
    }

    fn inject_bwd(
        &self,
        dvecs: ViewMut<'_, Buf>,
        dh: ViewMut<'_, Buf>,
        sites: &CudaIds,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_bwd";
        gpu::inject::bwd(
            &self.launcher,
            dev_out(OP, "dvecs", dvecs)?,
            dev_out(OP, "dh", dh)?,
            sites.arg(),
            n,
            c,
            mode,
        )
    }

    fn norm_scale_fwd(
        &self,
        y: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()> {
        const OP: &str = "norm_scale_fwd";
        gpu::norm_scale::fwd(
            &self.launcher,
            dev_out(OP, "y", y)?,
            dev_in(OP, "x", x)?,
            n,
            d,
            s,
        )
    }

    fn norm_scale_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dy: View<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()> {
        const OP: &str = "norm_scale_bwd";
        gpu::norm_scale::bwd(
            &self.launcher,
            dev_out(OP, "dx", dx)?,
            dev_in(OP, "dy", dy)?,
            dev_in(OP, "x", x)?,
            n,
            d,
            s,
        )
    }

    fn pool_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        h: View<'_, Buf>,
        mask: View<'_, Buf>,
        w: Option<View<'_, Buf>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_fwd";
        let w = w.map(|w| dev_in(OP, "w", w)).transpose()?.map(In::Device);
        gpu::pool::fwd(
            &self.launcher,
            dev_out(OP, "out", out)?,
            dev_in(OP, "h", h)?,
            dev_in(OP, "mask", mask)?,
            w,
            [b, t, c],
            mode,
        )
    }

    fn pool_bwd(
        &self,
        dh: ViewMut<'_, Buf>,
        dw: Option<ViewMut<'_, Buf>>,
        dout: View<'_, Buf>,
        h: View<'_, Buf>,
        mask: View<'_, Buf>,
        w: Option<View<'_, Buf>>,
        b: usize,
        t: usize,
        c: usize,
        mode: PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_bwd";
        let w = w.map(|w| dev_in(OP, "w", w)).transpose()?.map(In::Device);
        let dw = dw
            .map(|d| dev_out(OP, "dw", d))
            .transpose()?
            .map(Out::Device);
        gpu::pool::bwd(
            &self.launcher,
            dev_out(OP, "dh", dh)?,
            dw,
            dev_in(OP, "dout", dout)?,
            dev_in(OP, "h", h)?,
            dev_in(OP, "mask", mask)?,
            w,
            [b, t, c],
            mode,
        )
    }

    fn reward_advantage(
        &self,
        mse: ViewMut<'_, Buf>,
        reward: ViewMut<'_, Buf>,
        advantage: ViewMut<'_, Buf>,
        pred: View<'_, Buf>,
        target: View<'_, Buf>,
        valid: View<'_, Buf>,
        s: usize,
        a: usize,
        spec: &RewardSpec,
    ) -> Result<()> {
        const OP: &str = "reward_advantage";
        gpu::reward_advantage::reward_advantage(
            &self.launcher,
            dev_out(OP, "mse", mse)?,
            dev_out(OP, "reward", reward)?,
            dev_out(OP, "advantage", advantage)?,
            dev_in(OP, "pred", pred)?,
            dev_in(OP, "target", target)?,
            dev_in(OP, "valid", valid)?,
            s,
            a,
            spec,
        )
    }

    fn policy_loss_fwd(
        &self,
        stats: ViewMut<'_, Buf>,
        logp: View<'_, Buf>,
        old_logp: View<'_, Buf>,
        adv: View<'_, Buf>,
        mask: View<'_, Buf>,
        ref_logp: Option<View<'_, Buf>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()> {
        let inputs = [logp, old_logp, adv, mask];
        self.policy_loss(false, stats, inputs, ref_logp, s, t, spec)
    }

    fn policy_loss_bwd(
        &self,
        dlogp: ViewMut<'_, Buf>,
        logp: View<'_, Buf>,
        old_logp: View<'_, Buf>,
        adv: View<'_, Buf>,
        mask: View<'_, Buf>,
        ref_logp: Option<View<'_, Buf>>,
        s: usize,
        t: usize,
        spec: &PolicyLossSpec,
    ) -> Result<()> {
        let inputs = [logp, old_logp, adv, mask];
        self.policy_loss(true, dlogp, inputs, ref_logp, s, t, spec)
    }

    fn adamw(
        &self,
        p: ViewMut<'_, Buf>,
        g: View<'_, Buf>,
        m: ViewMut<'_, Buf>,
        v: ViewMut<'_, Buf>,
        hp: &AdamwStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        gpu::adamw::adamw(
            &self.launcher,
            dev_out(OP, "p", p)?,
            dev_in(OP, "g", g)?,
            dev_out(OP, "m", m)?,
            dev_out(OP, "v", v)?,
            hp,
        )
    }

    fn sum_squares(&self, x: View<'_, Buf>) -> Result<f64> {
        let x = dev_in("sum_squares", "x", x)?;
        // the kernel adds into out[0] with atomics: zeroed first (alloc_zeros)
        let acc = self
            .stream
            .alloc_zeros::<f64>(1)
            .map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let addr = acc.device_ptr(&self.stream).0;
        gpu::adamw::sum_squares(&self.launcher, DevPtr::<f64>::new(addr, 1), x)?;
        let mut host = [0f64; 1];
        self.stream
            .memcpy_dtoh(&acc, &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        self.synchronize()?;
        Ok(host[0])
    }

    fn decode_attention_fwd(
        &self,
        out_: ViewMut<'_, Buf>,
        q: View<'_, Buf>,
        kcache: View<'_, Buf>,
        vcache: View<'_, Buf>,
        starts: &CudaIds,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "decode_attention_fwd";
        // split-K partials, written before being read; empty (and the launcher reports out)
        // where out does not match the dims
        let out_len = [d.b, d.tq, d.nh, d.hs]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        let (lo, lml) = if out_len == Some(out_.len()) {
            gpu::decode_attention::scratch_lens(&self.launcher, &d, starts.arg())
        } else {
            (0, 0)
        };
        let (mut part_o, mut part_ml) = (self.alloc_f32(lo)?, self.alloc_f32(lml)?);
        gpu::decode_attention::fwd(
            &self.launcher,
            dev_out(OP, "out", out_)?,
            dev_out(OP, "part_o", ViewMut::all(&mut part_o))?,
            dev_out(OP, "part_ml", ViewMut::all(&mut part_ml))?,
            dev_in(OP, "q", q)?,
            dev_in(OP, "kcache", kcache)?,
            dev_in(OP, "vcache", vcache)?,
            starts.arg(),
            d,
        )
    }

    fn sample_fwd(
        &self,
        ids: &mut CudaIds,
        logp: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        u: View<'_, Buf>,
        n: usize,
        v: usize,
        spec: &SampleSpec,
    ) -> Result<()> {
        const OP: &str = "sample_fwd";
        gpu::sample::fwd(
            &self.launcher,
            DevPtr::<u32>::new(ids.addr, ids.len),
            dev_out(OP, "logp", logp)?,
            dev_in(OP, "logits", logits)?,
            dev_in(OP, "u", u)?,
            n,
            v,
            spec,
        )?;
        // every sampled id is a row index of the logits
        ids.bound = v;
        Ok(())
    }
}
