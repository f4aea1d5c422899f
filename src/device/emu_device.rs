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
//! decode_attention, sample) launches its f32 kernel(s). Launches are serialised inside the
//! emulator, so this device is slow (milliseconds per launch): tiny models only.

use super::cpu::{get, get_mut, CpuDevice};
use super::emu::EmuMode;
use super::gpu::{self, EmuLaunch, In, Out};
use super::{
    AdamwStep, AttnDims, CacheDims, Device, InjectMode, PolicyLossSpec, PoolMode, RewardSpec,
    SampleSpec, View, ViewMut,
};
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

impl Device for EmuDevice {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;

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

    fn embedding_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        ids: &Vec<u32>,
        wte: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_fwd";
        gpu::embedding::fwd(
            &self.launcher,
            get_mut(OP, "out", out)?,
            ids,
            get(OP, "wte", wte)?,
            n,
            c,
        )
    }

    fn embedding_bwd(
        &self,
        dwte: ViewMut<'_, Buf>,
        ids: &Vec<u32>,
        dout: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_bwd";
        gpu::embedding::bwd(
            &self.launcher,
            get_mut(OP, "dwte", dwte)?,
            ids,
            get(OP, "dout", dout)?,
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
            get_mut(OP, "out", out)?,
            get_mut(OP, "rstd", rstd)?,
            get(OP, "x", x)?,
            get(OP, "w", w)?,
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
            get_mut(OP, "dx", dx)?,
            get_mut(OP, "dw", dw)?,
            get(OP, "dout", dout)?,
            get(OP, "x", x)?,
            get(OP, "w", w)?,
            get(OP, "rstd", rstd)?,
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
        let x = get_mut("rope_fwd", "x", x)?;
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
        let dx = get_mut("rope_bwd", "dx", dx)?;
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
            get_mut(OP, "out", out)?,
            get_mut(OP, "lse", lse)?,
            get(OP, "q", q)?,
            get(OP, "k", k)?,
            get(OP, "v", v)?,
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
        out: View<'_, Buf>,
        lse: View<'_, Buf>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        // scratch D [B,NH,T] (on the GPU: from the device's memory), overwritten by the kernels;
        // lse's shape, so empty (and the launcher reports lse) where lse does not match the dims
        let len = gpu::attention::bwd_scratch_len(&d);
        let mut dscratch = vec![0f32; if lse.len() == len { len } else { 0 }];
        gpu::attention::bwd(
            &self.launcher,
            get_mut(OP, "dq", dq)?,
            get_mut(OP, "dk", dk)?,
            get_mut(OP, "dv", dv)?,
            &mut dscratch,
            get(OP, "dout", dout)?,
            get(OP, "q", q)?,
            get(OP, "k", k)?,
            get(OP, "v", v)?,
            get(OP, "out", out)?,
            get(OP, "lse", lse)?,
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
            get_mut(OP, "out", out)?,
            get(OP, "gate", gate)?,
            get(OP, "up", up)?,
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
            get_mut(OP, "dgate", dgate)?,
            get_mut(OP, "dup", dup)?,
            get(OP, "dout", dout)?,
            get(OP, "gate", gate)?,
            get(OP, "up", up)?,
        )
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

    fn residual_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "residual_fwd";
        gpu::residual::fwd(
            &self.launcher,
            get_mut(OP, "out", out)?,
            get(OP, "a", a)?,
            get(OP, "b", b)?,
        )
    }

    fn residual_bwd(&self, da: ViewMut<'_, Buf>, dout: View<'_, Buf>) -> Result<()> {
        const OP: &str = "residual_bwd";
        gpu::residual::bwd(
            &self.launcher,
            get_mut(OP, "da", da)?,
            get(OP, "dout", dout)?,
        )
    }

    fn cross_entropy_fwd(
        &self,
        losses: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        targets: &Vec<u32>,
        mask: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_fwd";
        gpu::cross_entropy::fwd(
            &self.launcher,
            get_mut(OP, "losses", losses)?,
            get(OP, "logits", logits)?,
            targets,
            get(OP, "mask", mask)?,
            n,
            v,
        )
    }

    fn cross_entropy_bwd(
        &self,
        dlogits: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        targets: &Vec<u32>,
        mask: View<'_, Buf>,
        n: usize,
        v: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_bwd";
        gpu::cross_entropy::bwd(
            &self.launcher,
            get_mut(OP, "dlogits", dlogits)?,
            get(OP, "logits", logits)?,
            targets,
            get(OP, "mask", mask)?,
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
            get_mut(OP, "out", out)?,
            get(OP, "x", x)?,
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
            get_mut(OP, "dx", dx)?,
            get(OP, "dout", dout)?,
            get(OP, "out", out)?,
            n,
            v,
        )
    }

    fn inject_fwd(
        &self,
        h: ViewMut<'_, Buf>,
        sites: &Vec<u32>,
        vecs: View<'_, Buf>,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_fwd";
        gpu::inject::fwd(
            &self.launcher,
            get_mut(OP, "h", h)?,
            sites,
            get(OP, "vecs", vecs)?,
            n,
            c,
            mode,
        )
    }

    fn inject_bwd(
        &self,
        dvecs: ViewMut<'_, Buf>,
        dh: ViewMut<'_, Buf>,
        sites: &Vec<u32>,
        n: usize,
        c: usize,
        mode: InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_bwd";
        gpu::inject::bwd(
            &self.launcher,
            get_mut(OP, "dvecs", dvecs)?,
            get_mut(OP, "dh", dh)?,
            sites,
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
            get_mut(OP, "y", y)?,
            get(OP, "x", x)?,
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
            get_mut(OP, "dx", dx)?,
            get(OP, "dy", dy)?,
            get(OP, "x", x)?,
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
        let w = w.map(|w| get(OP, "w", w)).transpose()?.map(In::from);
        gpu::pool::fwd(
            &self.launcher,
            get_mut(OP, "out", out)?,
            get(OP, "h", h)?,
            get(OP, "mask", mask)?,
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
        let w = w.map(|w| get(OP, "w", w)).transpose()?.map(In::from);
        let dw = dw.map(|d| get_mut(OP, "dw", d)).transpose()?.map(Out::from);
        gpu::pool::bwd(
            &self.launcher,
            get_mut(OP, "dh", dh)?,
            dw,
            get(OP, "dout", dout)?,
            get(OP, "h", h)?,
            get(OP, "mask", mask)?,
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
            get_mut(OP, "mse", mse)?,
            get_mut(OP, "reward", reward)?,
            get_mut(OP, "advantage", advantage)?,
            get(OP, "pred", pred)?,
            get(OP, "target", target)?,
            get(OP, "valid", valid)?,
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
        const OP: &str = "policy_loss_fwd";
        let (logp, old_logp, adv, mask, ref_logp) = super::cpu::policy_loss::device_inputs(
            OP,
            [logp, old_logp, adv, mask],
            ref_logp,
            s,
            t,
            spec,
        )?;
        gpu::policy_loss::policy_loss(
            &self.launcher,
            false,
            get_mut(OP, "stats", stats)?,
            [logp, old_logp, adv, mask],
            ref_logp.map(In::from),
            s,
            t,
            spec,
        )
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
        const OP: &str = "policy_loss_bwd";
        let (logp, old_logp, adv, mask, ref_logp) = super::cpu::policy_loss::device_inputs(
            OP,
            [logp, old_logp, adv, mask],
            ref_logp,
            s,
            t,
            spec,
        )?;
        gpu::policy_loss::policy_loss(
            &self.launcher,
            true,
            get_mut(OP, "dlogp", dlogp)?,
            [logp, old_logp, adv, mask],
            ref_logp.map(In::from),
            s,
            t,
            spec,
        )
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
            get_mut(OP, "p", p)?,
            get(OP, "g", g)?,
            get_mut(OP, "m", m)?,
            get_mut(OP, "v", v)?,
            hp,
        )
    }

    fn sum_squares(&self, x: View<'_, Buf>) -> Result<f64> {
        // the kernel adds into out[0] with atomics: zeroed first
        let mut out = [0f64; 1];
        gpu::adamw::sum_squares(&self.launcher, &mut out[..], get("sum_squares", "x", x)?)?;
        Ok(out[0])
    }

    fn decode_attention_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        q: View<'_, Buf>,
        kcache: View<'_, Buf>,
        vcache: View<'_, Buf>,
        starts: &Vec<u32>,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "decode_attention_fwd";
        // split-K partials (on the GPU: from the device's memory), written before being read;
        // empty (and the launcher reports out) where out does not match the dims
        let out_len = [d.b, d.tq, d.nh, d.hs]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        let (lo, lml) = if out_len == Some(out.len()) {
            gpu::decode_attention::scratch_lens(&self.launcher, &d, starts)
        } else {
            (0, 0)
        };
        let (mut part_o, mut part_ml) = (vec![0f32; lo], vec![0f32; lml]);
        gpu::decode_attention::fwd(
            &self.launcher,
            get_mut(OP, "out", out)?,
            &mut part_o,
            &mut part_ml,
            get(OP, "q", q)?,
            get(OP, "kcache", kcache)?,
            get(OP, "vcache", vcache)?,
            starts,
            d,
        )
    }

    fn sample_fwd(
        &self,
        ids: &mut Vec<u32>,
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
            ids,
            get_mut(OP, "logp", logp)?,
            get(OP, "logits", logits)?,
            get(OP, "u", u)?,
            n,
            v,
            spec,
        )
    }
}
