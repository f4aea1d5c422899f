//! The benches of the ops the first groups of benches/cuda.rs leave out: the backward of the
//! elementwise ops, the embedding, softmax, the NLA ops (injection, the critic's norm and
//! pooling, rewards and advantages, the policy loss), sampling and the dtype conversion. Each
//! case allocates its inputs and hands its launch to a timer, generic over the device:
//! benches/cuda.rs times them on the GPU at [`GPU`] sizes; tests/bench_cases.rs runs every
//! launch on the emulator at [`TINY`] sizes, so that a case whose buffers or dimensions a
//! launcher refuses fails in CI, not on the GPU.
//!
//! Inputs smaller than the H100's 50 MiB L2 come in several sets, cycled (as in
//! benches/cuda.rs), except where a case is bound by its launch or runs as one block.
//! Bytes count what a launch must move at least: each T element 2 bytes in bf16 and 4 in f32,
//! the always-f32 arguments 4 (kernels/<op>.cu, "Dtypes"); per-row terms (a norm's weights,
//! masks, targets) are left out where they are negligible next to the rows.

use nla_engine::device::{
    AttnDims, Device, DeviceBuf, Dtype, InjectMode, LossAgg, PolicyLossSpec, PolicyStat, PoolMode,
    RewardSpec, SampleSpec, View, ViewMut,
};
use nla_engine::Result;

/// The dimensions of the cases.
pub struct Sizes {
    /// rows of the embedding, softmax and the critic's vectors (tokens or samples)
    pub n: usize,
    /// channels (d_model)
    pub c: usize,
    /// vocabulary
    pub v: usize,
    /// elements of the elementwise backwards (swiglu's n, as its forward bench; residual's)
    pub elems: usize,
    /// rope's [B, T, NH, HS]
    pub rope: [usize; 4],
    /// qkv_rope's [B, T, NH, NKV, HS]
    pub qkv: [usize; 5],
    /// sequences x positions of the critic's pooling and of the policy loss
    pub seqs: usize,
    pub t: usize,
    /// injection sites (one per sequence of a micro-batch)
    pub sites: usize,
    /// samples of an RL step (rewards and advantages)
    pub samples: usize,
    /// rows sampled at once (a rollout's batch)
    pub sample_rows: usize,
}

/// At a 1B-parameter Llama's training sizes, or the 4096-channel ones where the
/// other groups use them.
pub const GPU: Sizes = Sizes {
    n: 16384,
    c: 4096,
    v: 32000,
    elems: 16384 * 11008 / 4,
    rope: [8, 2048, 32, 128],
    qkv: [8, 2048, 32, 4, 64],
    seqs: 64,
    t: 512,
    sites: 32,
    samples: 256,
    sample_rows: 256,
};

/// Small enough for the emulator; odd where the kernels have a tail or a fallback path.
pub const TINY: Sizes = Sizes {
    n: 6,
    c: 40,
    v: 300,
    elems: 1000,
    rope: [2, 5, 2, 8],
    qkv: [2, 5, 4, 2, 8],
    seqs: 3,
    t: 7,
    sites: 4,
    samples: 8,
    sample_rows: 3,
};

/// What a case hands its timer: the group, the id, the bytes a launch moves, and the launch
/// (i = launch index).
pub type Timer<'t> =
    dyn FnMut(&str, &str, u64, &mut dyn FnMut(usize) -> Result<()>) -> Result<()> + 't;

/// `n` pseudo-random values in [-scale, scale), stored as `dt` (rounded to it).
pub fn random<D: Device>(dev: &D, n: usize, seed: u64, scale: f32, dt: Dtype) -> Result<D::Buf> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let host: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            scale * ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    dev.upload_as(&host, dt)
}

/// A bench id: `op_shape` in f32 (the ids the f32 benches always had), `op_bf16_shape` in
/// bf16; an empty op gives `shape` and `bf16_shape`.
pub fn id(dt: Dtype, op: &str, shape: &str) -> String {
    let dt = (dt != Dtype::F32).then(|| dt.name());
    [Some(op).filter(|o| !o.is_empty()), dt, Some(shape)]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("_")
}

/// `k` input sets made by `make(i)`, cycled through by a bench whose inputs would otherwise
/// stay in L2 from one launch to the next.
fn sets<B>(k: u64, make: impl Fn(u64) -> Result<B>) -> Result<Vec<B>> {
    (0..k).map(make).collect()
}

fn v<B: DeviceBuf>(x: &B) -> View<'_, B> {
    View::all(x)
}
fn m<B: DeviceBuf>(x: &mut B) -> ViewMut<'_, B> {
    ViewMut::all(x)
}

/// Every case in storage type `dt` (the T of the kernels; the f32-only ops in f32), each
/// handed to `time` once, in order.
pub fn each<D: Device>(dev: &D, s: &Sizes, dt: Dtype, time: &mut Timer<'_>) -> Result<()> {
    let t = dt.size() as u64;
    let f = Dtype::F32;
    let fwd_bwd = |shape: &str| (id(dt, "fwd", shape), id(dt, "bwd", shape));

    // the elementwise backwards: swiglu's, rope's and qkv_rope's at their forwards' shapes in
    // benches/cuda.rs, residual's at swiglu's size
    {
        let n = s.elems;
        // dgu = [dgate; dup] written, dout and gu = [gate; up] read: 5 T per element
        let (dout, gu) = (random(dev, n, 1, 1.0, dt)?, random(dev, 2 * n, 2, 3.0, dt)?);
        let mut dgu = dev.alloc_as(2 * n, dt)?;
        let shape = format!("{}M", (n + 500_000) / 1_000_000);
        time(
            "swiglu",
            &id(dt, "bwd", &shape),
            5 * t * n as u64,
            &mut |_| dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu)),
        )?;
        // da += dout: da read and written, dout read (3 T)
        let mut da = random(dev, n, 3, 1.0, dt)?;
        time(
            "residual",
            &id(dt, "bwd", &shape),
            3 * t * n as u64,
            &mut |_| dev.residual_bwd(m(&mut da), v(&dout)),
        )?;
    }
    {
        // in place: dx read and written (2 T)
        let [b, tt, h, hs] = s.rope;
        let mut dx = random(dev, b * tt * h * hs, 4, 1.0, dt)?;
        let shape = format!("{b}x{tt}x{h}x{hs}");
        time(
            "rope",
            &id(dt, "bwd", &shape),
            2 * t * (b * tt * h * hs) as u64,
            &mut |_| dev.rope_bwd(m(&mut dx), b, tt, h, hs, 0, 1e4),
        )?;
    }
    {
        // dq, dk, dv read, dqkv written (2 T per element of the fused rows)
        let [b, tt, nh, nkv, hs] = s.qkv;
        let d = AttnDims {
            b,
            t: tt,
            nh,
            nkv,
            hs,
        };
        let (nq, nk) = (b * tt * nh * hs, b * tt * nkv * hs);
        let (dq, dk, dvv) = (
            random(dev, nq, 5, 1.0, dt)?,
            random(dev, nk, 6, 1.0, dt)?,
            random(dev, nk, 7, 1.0, dt)?,
        );
        let mut dqkv = dev.alloc_as(nq + 2 * nk, dt)?;
        let shape = format!("{b}x{tt}x({nh}+{})x{hs}", 2 * nkv);
        time(
            "qkv_rope",
            &id(dt, "bwd", &shape),
            2 * t * (nq + 2 * nk) as u64,
            &mut |_| dev.qkv_rope_bwd(m(&mut dqkv), v(&dq), v(&dk), v(&dvv), d.into(), 1e4),
        )?;
    }

    // embedding: N rows of wte [V, C] gathered into out (2 T per element); the backward adds
    // dout's rows into the f32 dwte (dout read: T; dwte's rows read and written: 8 bytes)
    {
        let (n, c, vv) = (s.n, s.c, s.v);
        let wte = random(dev, vv * c, 8, 1.0, dt)?;
        let ids: Vec<u32> = (0..n as u64)
            .map(|i| ((i * 7919) % vv as u64) as u32)
            .collect();
        let ids = dev.upload_ids(&ids)?;
        let mut out = dev.alloc_as(n * c, dt)?;
        let g = "embedding";
        let (fwd, bwd) = fwd_bwd(&format!("{n}x{c}_v{vv}"));
        time(g, &fwd, 2 * t * (n * c) as u64, &mut |_| {
            dev.embedding_fwd(m(&mut out), &ids, v(&wte), n, c)
        })?;
        let dout = random(dev, n * c, 9, 1.0, dt)?;
        let mut dwte = dev.alloc_as(vv * c, f)?;
        time(g, &bwd, (t + 8) * (n * c) as u64, &mut |_| {
            dev.embedding_bwd(m(&mut dwte), &ids, v(&dout), n, c)
        })?;
    }

    // softmax over [N, V] rows of logits: x read, out written (2 T); backward: dout and out
    // read, dx written (3 T)
    {
        let (n, vv) = (s.n / 4, s.v);
        let x = random(dev, n * vv, 10, 4.0, dt)?;
        let mut out = dev.alloc_as(n * vv, dt)?;
        let g = "softmax";
        let (fwd, bwd) = fwd_bwd(&format!("{n}x{vv}"));
        time(g, &fwd, 2 * t * (n * vv) as u64, &mut |_| {
            dev.softmax_fwd(m(&mut out), v(&x), n, vv)
        })?;
        let dout = random(dev, n * vv, 11, 1.0, dt)?;
        let mut dx = dev.alloc_as(n * vv, dt)?;
        time(g, &bwd, 3 * t * (n * vv) as u64, &mut |_| {
            dev.softmax_bwd(m(&mut dx), v(&dout), v(&out), n, vv)
        })?;
    }

    // injection at S sites of a [N, C] residual stream (one per sequence of a micro-batch: 256
    // KiB of vectors in bf16, so bound by the launch): vecs read and the sites' rows written (2 T); the
    // backward reads the sites' rows of dh, writes dvecs and (replace) zeroes those rows (3 T)
    {
        let (n, c, k) = (s.n, s.c, s.sites);
        let mut h = random(dev, n * c, 12, 1.0, dt)?;
        let sites: Vec<u32> = (0..k as u32).map(|i| i * (n / k) as u32).collect();
        let sites = dev.upload_ids(&sites)?;
        let vecs = random(dev, k * c, 13, 1.0, dt)?;
        let g = "inject";
        let (fwd, bwd) = fwd_bwd(&format!("s{k}x{c}"));
        time(g, &fwd, 2 * t * (k * c) as u64, &mut |_| {
            dev.inject_fwd(m(&mut h), &sites, v(&vecs), n, c, InjectMode::Replace)
        })?;
        let mut dvecs = dev.alloc_as(k * c, dt)?;
        time(g, &bwd, 3 * t * (k * c) as u64, &mut |_| {
            dev.inject_bwd(m(&mut dvecs), m(&mut h), &sites, n, c, InjectMode::Replace)
        })?;
    }

    // the critic's vectors rescaled to norm sqrt(C): x read, y written (2 T); the backward
    // reads dy and x and writes dx (3 T)
    {
        let (n, c) = (s.n / 4, s.c);
        // 32 MiB in bf16: 4 input sets, cycled, so that a launch does not find x in L2
        let xs = sets(4, |i| random(dev, n * c, 14 + i, 1.0, dt))?;
        let mut y = dev.alloc_as(n * c, dt)?;
        let sc = (c as f32).sqrt();
        let g = "norm_scale";
        let (fwd, bwd) = fwd_bwd(&format!("{n}x{c}"));
        time(g, &fwd, 2 * t * (n * c) as u64, &mut |i| {
            dev.norm_scale_fwd(m(&mut y), v(&xs[i % 4]), n, c, sc)
        })?;
        let dys = sets(4, |i| random(dev, n * c, 18 + i, 1.0, dt))?;
        let mut dx = dev.alloc_as(n * c, dt)?;
        time(g, &bwd, 3 * t * (n * c) as u64, &mut |i| {
            dev.norm_scale_bwd(m(&mut dx), v(&dys[i % 4]), v(&xs[i % 4]), n, c, sc)
        })?;
    }

    // mean pooling of the critic's last hidden states [B, T, C] (every position real): h read
    // (T per element); the backward writes dh (T per element; dout [B, C] is negligible)
    {
        let (b, tt, c) = (s.seqs, s.t, s.c);
        let h = random(dev, b * tt * c, 16, 1.0, dt)?;
        let mask = dev.upload(&vec![1.0; b * tt])?;
        let mut out = dev.alloc_as(b * c, dt)?;
        let g = "pool";
        let (fwd, bwd) = fwd_bwd(&format!("mean_{b}x{tt}x{c}"));
        let bytes = t * (b * tt * c) as u64;
        time(g, &fwd, bytes, &mut |_| {
            dev.pool_fwd(m(&mut out), v(&h), v(&mask), None, b, tt, c, PoolMode::Mean)
        })?;
        let dout = random(dev, b * c, 17, 1.0, dt)?;
        let mut dh = dev.alloc_as(b * tt * c, dt)?;
        time(g, &bwd, bytes, &mut |_| {
            let (dw, w) = (None, None);
            dev.pool_bwd(
                m(&mut dh),
                dw,
                v(&dout),
                v(&h),
                v(&mask),
                w,
                b,
                tt,
                c,
                PoolMode::Mean,
            )
        })?;
    }

    // rewards and GRPO advantages of S reconstructions [S, C] (pred and target read: 2 T per
    // element; one block for the batch, as once per RL step)
    {
        let (k, c) = (s.samples, s.c);
        let (pred, target) = (
            random(dev, k * c, 18, 1.0, dt)?,
            random(dev, k * c, 19, 1.0, dt)?,
        );
        let valid = dev.upload(&vec![1.0; k])?;
        let (mut mse, mut reward, mut adv) = (dev.alloc(k)?, dev.alloc(k)?, dev.alloc(k)?);
        // groups of 4 samples, std-normalised, vectors rescaled to norm sqrt(C)
        let spec = RewardSpec::grpo(4, Some((c as f32).sqrt()));
        time(
            "reward_advantage",
            &id(dt, "", &format!("s{k}x{c}")),
            2 * t * (k * c) as u64,
            &mut |_| {
                dev.reward_advantage(
                    m(&mut mse),
                    m(&mut reward),
                    m(&mut adv),
                    v(&pred),
                    v(&target),
                    v(&valid),
                    k,
                    c,
                    &spec,
                )
            },
        )?;
    }

    // the clipped policy loss over [S, T] tokens, f32 only (logp, old, adv, mask and the
    // reference's logp read: 20 bytes a token; the backward also writes dlogp: 24)
    if dt == f {
        let (k, tt) = (s.seqs, s.t);
        let nt = k * tt;
        let ins: Vec<_> = (0..4)
            .map(|i| random(dev, nt, 20 + i, 0.5, f))
            .collect::<Result<_>>()?;
        let (logp, old, adv, rf) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        let mask = dev.upload(&vec![1.0; nt])?;
        let spec = PolicyLossSpec {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            kl_coef: 0.01,
            kl_type: nla_engine::device::KlType::K3,
            agg: LossAgg::TokenMean,
        };
        let mut stats = dev.alloc(PolicyStat::COUNT)?;
        let g = "policy_loss";
        let (fwd, bwd) = fwd_bwd(&format!("{k}x{tt}"));
        time(g, &fwd, 20 * nt as u64, &mut |_| {
            dev.policy_loss_fwd(
                m(&mut stats),
                v(logp),
                v(old),
                v(adv),
                v(&mask),
                Some(v(rf)),
                k,
                tt,
                &spec,
            )
        })?;
        let mut dlogp = dev.alloc(nt)?;
        time(g, &bwd, 24 * nt as u64, &mut |_| {
            dev.policy_loss_bwd(
                m(&mut dlogp),
                v(logp),
                v(old),
                v(adv),
                v(&mask),
                Some(v(rf)),
                k,
                tt,
                &spec,
            )
        })?;
    }

    // the dtype conversion of `copy` (f32 -> bf16 and back; the convert kernels) over the
    // elementwise size: 4 + 2 bytes an element; once, in f32 (it converts between the two)
    if dt == f {
        let n = s.elems;
        let (a32, a16) = (
            random(dev, n, 25, 1.0, Dtype::F32)?,
            random(dev, n, 26, 1.0, Dtype::Bf16)?,
        );
        let (mut b16, mut b32) = (dev.alloc_as(n, Dtype::Bf16)?, dev.alloc_as(n, Dtype::F32)?);
        let shape = format!("{}M", (n + 500_000) / 1_000_000);
        time(
            "convert",
            &format!("f32_to_bf16_{shape}"),
            6 * n as u64,
            &mut |_| dev.copy(m(&mut b16), v(&a32)),
        )?;
        time(
            "convert",
            &format!("bf16_to_f32_{shape}"),
            6 * n as u64,
            &mut |_| dev.copy(m(&mut b32), v(&a16)),
        )?;
    }

    // one token for each of a rollout's rows over the vocabulary, temperature 1, top-p 0.9
    // (the logits read at least once: T per element; the radix search reads them again)
    {
        let (n, vv) = (s.sample_rows, s.v);
        // 16 MiB in bf16: 4 sets, cycled (L2 is 50 MiB)
        let logits = sets(4, |i| random(dev, n * vv, 24 + i, 6.0, dt))?;
        let u: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
        let u = dev.upload(&u)?;
        let mut ids = dev.upload_ids(&vec![0; n])?;
        let mut logp = dev.alloc(n)?;
        let spec = SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
        };
        time(
            "sample",
            &id(dt, "fwd", &format!("{n}x{vv}_top_p")),
            t * (n * vv) as u64,
            &mut |i| {
                let x = v(&logits[i % 4]);
                dev.sample_fwd(&mut ids, m(&mut logp), x, v(&u), n, vv, &spec)
            },
        )?;
    }
    Ok(())
}
