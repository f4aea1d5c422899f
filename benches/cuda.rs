//! Kernel benches on the GPU (criterion; `cargo bench --bench cuda`): each op of the CUDA
//! device at training sizes, timed with CUDA events around a batch of launches after warm-up,
//! over rotating inputs (several input sets, cycled, so that no launch finds its inputs in L2
//! from the one before). Criterion reports the time and the throughput (bytes or FLOP per
//! second); after each group a line gives the fraction of the device's limit: the measured
//! copy bandwidth (device-to-device copy, bytes read + written) for memory-bound kernels, the
//! dense f32 rate for the f32 GEMM and attention, and the dense bf16 tensor-core rate for the
//! bf16 GEMM and attention.
//!
//! The memory-bound ops, the matmul and attention run in both storage types: f32 (ids as
//! before, e.g.
//! `rmsnorm/fwd_16384x4096`) and bf16 (the dtype in the id: `rmsnorm/fwd_bf16_16384x4096`).
//! In bf16 the arguments that are T in the kernel's header (kernels/<op>.cu, "Dtypes") are bf16
//! buffers and the always-f32 ones (rstd, dw, mask, losses, the cross-entropy state, AdamW's
//! p, g, m, v) stay f32; bytes count 2 per bf16 and 4 per f32 element. One device serves both:
//! every op dispatches on its buffers' dtypes, whatever the device's working dtype.
//!
//! The ops run once or a few times per step (the elementwise backwards, the embedding, softmax,
//! the NLA ops, sampling) are cases of benches/common/op_cases.rs, generic over the device, so
//! that tests/bench_cases.rs runs each case's launches on the emulator in CI; they are timed
//! for half a second each.
//!
//! Without a GPU (or without kernels in the build) it prints why and measures nothing.

#[path = "common/op_cases.rs"]
#[allow(dead_code)] // TINY: the sizes of tests/bench_cases.rs
mod op_cases;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use nla_engine::device::cuda::{self, CudaBuf, CudaDevice};
use nla_engine::device::{AdamwStep, AttnDims, CacheDims, Device, Dtype, View, ViewMut};
use op_cases::id;

/// Dense f32 FMA rate of an H100 SXM (132 SMs x 128 lanes x 2 x 1.98 GHz), FLOP/s.
const F32_PEAK: f64 = 67e12;
/// Dense bf16 tensor-core rate of an H100 SXM (without sparsity), FLOP/s.
const BF16_PEAK: f64 = 989e12;
/// Input sets cycled through (rotating inputs).
const ROT: usize = 3;
/// The storage types the memory-bound ops and the matmul run in.
const DTYPES: [Dtype; 2] = [Dtype::F32, Dtype::Bf16];

/// `n` pseudo-random values in [-scale, scale), stored as `dt` (rounded to it).
fn random(dev: &CudaDevice, n: usize, seed: u64, scale: f32, dt: Dtype) -> CudaBuf {
    op_cases::random(dev, n, seed, scale, dt).expect("upload")
}

fn v(x: &CudaBuf) -> View<'_, CudaBuf> {
    View::all(x)
}
fn m(x: &mut CudaBuf) -> ViewMut<'_, CudaBuf> {
    ViewMut::all(x)
}

/// The bf16 attention forward with `rows` query rows per block (the kernel by name, where
/// `Device::attention_fwd` lets the launcher pick).
fn attention_fwd_rows(
    dev: &CudaDevice,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    [q, k, vv]: [&CudaBuf; 3],
    d: AttnDims,
    rows: usize,
) -> nla_engine::Result<()> {
    use nla_engine::device::gpu::{attention, kernel_device::KernelDevice};
    const OP: &str = "attention_fwd";
    attention::fwd_with_rows::<bf16, _>(
        dev.launcher(),
        CudaDevice::output(OP, "out", m(out))?,
        CudaDevice::output(OP, "lse", m(lse))?,
        CudaDevice::input(OP, "q", v(q))?,
        CudaDevice::input(OP, "k", v(k))?,
        CudaDevice::input(OP, "v", v(vv))?,
        d,
        rows,
    )
}

/// Times `f(i)` (i = launch index) with events: criterion picks the iteration counts.
fn bench_op(
    c: &mut Criterion,
    dev: &CudaDevice,
    group: &str,
    name: &str,
    thrpt: Throughput,
    limit: (f64, &str),
    f: impl FnMut(usize) -> nla_engine::Result<()>,
) {
    bench_for(
        c,
        dev,
        (group, name),
        thrpt,
        limit,
        Duration::from_secs(2),
        f,
    )
}

/// [`bench_op`] measured for `measure` (warm-up a sixth of it, 10 samples under a second).
fn bench_for(
    c: &mut Criterion,
    dev: &CudaDevice,
    (group, name): (&str, &str),
    thrpt: Throughput,
    limit: (f64, &str),
    measure: Duration,
    mut f: impl FnMut(usize) -> nla_engine::Result<()>,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(thrpt.clone());
    g.warm_up_time(measure / 6);
    g.measurement_time(measure);
    g.sample_size(if measure < Duration::from_secs(1) {
        10
    } else {
        20
    });
    let mut k = 0usize;
    // criterion runs the closure only where its filter takes the id
    let mut wanted = false;
    g.bench_function(name, |b| {
        wanted = true;
        b.iter_custom(|iters| {
            let s = dev
                .time(iters as usize, || {
                    k += 1;
                    f(k)
                })
                .expect("timed launches");
            Duration::from_secs_f64(s)
        })
    });
    g.finish();
    if !wanted {
        return;
    }
    // the fraction of the limit from a plain timed run of 50 launches
    let s = dev
        .time(50, || {
            k += 1;
            f(k)
        })
        .expect("timed launches")
        / 50.0;
    let (amount, unit) = match thrpt {
        Throughput::Bytes(b) => (b as f64, "B/s"),
        Throughput::Elements(e) => (e as f64, "FLOP/s"),
        _ => (0.0, ""),
    };
    println!(
        "{group}/{name}: {:.3} ms, {:.1} G{unit}, fraction of {}: {:.1} %",
        s * 1e3,
        amount / s / 1e9,
        limit.1,
        100.0 * amount / s / limit.0
    );
}

fn benches(c: &mut Criterion) {
    if let Err(why) = cuda::probe() {
        // scripts/gpu-check.sh sets NLA_REQUIRE_GPU=1: there a missing GPU is a failure
        if std::env::var("NLA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("NLA_REQUIRE_GPU=1 but no usable GPU: {why}");
        }
        eprintln!("benches/cuda.rs: no GPU: {why}");
        return;
    }
    // f32 working dtype (the parity path the CUDA tests check); the bf16 variants allocate
    // their bf16 buffers explicitly (alloc_as / upload_as), the ops dispatch on them
    let dev = CudaDevice::new(0)
        .and_then(|d| d.with_work_dtype(Dtype::F32))
        .expect("cuda device");
    eprintln!("device: {}", dev.name());

    // copy bandwidth: the limit of the memory-bound kernels (in either dtype: bytes are bytes)
    let n = 256 << 20; // 1 GiB of f32
    let src = random(&dev, n, 1, 1.0, Dtype::F32);
    let mut dst = dev.alloc(n).expect("alloc");
    dev.copy(m(&mut dst), v(&src)).expect("copy");
    let s = dev
        .time(20, || dev.copy(m(&mut dst), v(&src)))
        .expect("copy timing")
        / 20.0;
    let copy_bw = 2.0 * 4.0 * n as f64 / s;
    println!(
        "copy: {:.3} ms for 1 GiB, {:.0} GB/s (read + written)",
        s * 1e3,
        copy_bw / 1e9
    );
    drop((src, dst));
    let bw = (copy_bw, "measured copy bandwidth");
    let f32_peak = (F32_PEAK, "dense f32 peak (67 TFLOP/s)");
    let bf16_peak = (BF16_PEAK, "dense bf16 peak (989 TFLOP/s)");

    // Each group below runs once per dtype: `t` is the bytes of one T element (4 or 2).

    // residual: out = a + b over 64M elements (a, b read, out written: 3 T)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let n = 64 << 20;
        let ins: Vec<_> = (0..ROT)
            .map(|i| {
                (
                    random(&dev, n, 10 + i as u64, 1.0, dt),
                    random(&dev, n, 20 + i as u64, 1.0, dt),
                )
            })
            .collect();
        let mut out = dev.alloc_as(n, dt).expect("alloc");
        bench_op(
            c,
            &dev,
            "residual",
            &id(dt, "fwd", "64M"),
            Throughput::Bytes(3 * t * n as u64),
            bw,
            |i| {
                let (a, b) = &ins[i % ROT];
                dev.residual_fwd(m(&mut out), v(a), v(b))
            },
        );
    }

    // rmsnorm [N = 16384, C = 4096]: x, out, w, dout, dx T; rstd, dw f32 (the per-row and
    // per-channel terms, w, rstd, dw, are negligible next to the [N,C] ones and not counted)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let (n, cc) = (16384, 4096);
        let xs: Vec<_> = (0..ROT)
            .map(|i| random(&dev, n * cc, 30 + i as u64, 2.0, dt))
            .collect();
        let w = random(&dev, cc, 3, 1.0, dt);
        let (mut out, mut rstd) = (
            dev.alloc_as(n * cc, dt).expect("a"),
            dev.alloc(n).expect("a"),
        );
        // x read, out written
        bench_op(
            c,
            &dev,
            "rmsnorm",
            &id(dt, "fwd", "16384x4096"),
            Throughput::Bytes(2 * t * (n * cc) as u64),
            bw,
            |i| {
                dev.rmsnorm_fwd(
                    m(&mut out),
                    m(&mut rstd),
                    v(&xs[i % ROT]),
                    v(&w),
                    n,
                    cc,
                    1e-5,
                )
            },
        );
        let dout = random(&dev, n * cc, 4, 1.0, dt);
        let (mut dx, mut dw) = (
            dev.alloc_as(n * cc, dt).expect("a"),
            dev.alloc(cc).expect("a"),
        );
        // dout, x read, dx written
        bench_op(
            c,
            &dev,
            "rmsnorm",
            &id(dt, "bwd", "16384x4096"),
            Throughput::Bytes(3 * t * (n * cc) as u64),
            bw,
            |i| {
                dev.rmsnorm_bwd(
                    m(&mut dx),
                    m(&mut dw),
                    v(&dout),
                    v(&xs[i % ROT]),
                    v(&w),
                    v(&rstd),
                    n,
                    cc,
                    false,
                )
            },
        );
    }

    // swiglu [N*F = 16384 x 11008]: gate, up read, out written (3 T)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let n = 16384 * 11008 / 4;
        // gu = [gate; up], one buffer as the gate/up matmul writes it
        let gs: Vec<_> = (0..ROT)
            .map(|i| random(&dev, 2 * n, 40 + i as u64, 3.0, dt))
            .collect();
        let mut out = dev.alloc_as(n, dt).expect("alloc");
        bench_op(
            c,
            &dev,
            "swiglu",
            &id(dt, "fwd", "45M"),
            Throughput::Bytes(3 * t * n as u64),
            bw,
            |i| dev.swiglu_fwd(m(&mut out), v(&gs[i % ROT])),
        );
    }

    // rope over q [B 8, T 2048, NH 32, HS 128], in place (x read and written: 2 T)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let (b, tt, h, hs) = (8, 2048, 32, 128);
        let mut x = random(&dev, b * tt * h * hs, 5, 1.0, dt);
        bench_op(
            c,
            &dev,
            "rope",
            &id(dt, "fwd", "8x2048x32x128"),
            Throughput::Bytes(2 * t * (b * tt * h * hs) as u64),
            bw,
            |_| dev.rope_fwd(m(&mut x), b, tt, h, hs, 0, None, 1e4),
        );
    }

    // qkv_rope over the fused rows of a 1.1B Llama [B 8, T 2048, NH 32 + 2 x NKV 4, HS 64]:
    // qkv read, q, k, v written (2 T per element); the model's split with RoPE
    for dt in DTYPES {
        let t = dt.size() as u64;
        let d = AttnDims {
            b: 8,
            t: 2048,
            nh: 32,
            nkv: 4,
            hs: 64,
        };
        let (n, qd, kvd) = (d.b * d.t, d.nh * d.hs, d.nkv * d.hs);
        let qkv = random(&dev, n * (qd + 2 * kvd), 7, 1.0, dt);
        let mut q = dev.alloc_as(n * qd, dt).expect("alloc");
        let mut k = dev.alloc_as(n * kvd, dt).expect("alloc");
        let mut vb = dev.alloc_as(n * kvd, dt).expect("alloc");
        bench_op(
            c,
            &dev,
            "qkv_rope",
            &id(dt, "fwd", "8x2048x(32+8)x64"),
            Throughput::Bytes(2 * t * (n * (qd + 2 * kvd)) as u64),
            bw,
            |_| {
                dev.qkv_rope_fwd(
                    m(&mut q),
                    m(&mut k),
                    m(&mut vb),
                    v(&qkv),
                    None,
                    d.into(),
                    1e4,
                )
            },
        );
    }

    // cross-entropy over logits [N 4096, V 32000]: logits, dlogits T; targets u32; mask,
    // losses, state f32 (per row, negligible next to the rows, not counted)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let (n, vv) = (4096, 32000);
        let logits = random(&dev, n * vv, 6, 4.0, dt);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vv as u32).collect();
        let targets = dev.upload_ids(&targets).expect("ids");
        let mask = dev.upload(&vec![1.0; n]).expect("mask");
        let mut losses = dev.alloc(n).expect("alloc");
        // the whole vocabulary as one chunk (what training with whole logits runs: the
        // gradient written over the logits); the state [N,3] is read and written per row,
        // negligible next to the logits
        let vc = vv;
        let mut state = dev.alloc(3 * n).expect("alloc");
        // the logits read
        bench_op(
            c,
            &dev,
            "cross_entropy",
            &id(dt, "chunk_fwd", "4096x32000"),
            Throughput::Bytes(t * (n * vc) as u64),
            bw,
            |_| {
                dev.cross_entropy_chunk_fwd(
                    m(&mut losses),
                    m(&mut state),
                    v(&logits),
                    &targets,
                    v(&mask),
                    n,
                    vc,
                    vv,
                    0,
                )
            },
        );
        let mut dchunk = random(&dev, n * vc, 9, 4.0, dt);
        // the chunk read and written (in place)
        bench_op(
            c,
            &dev,
            "cross_entropy",
            &id(dt, "chunk_bwd", "4096x32000"),
            Throughput::Bytes(2 * t * (n * vc) as u64),
            bw,
            |_| {
                // in place: each launch turns the last one's gradient into the next (timing only)
                dev.cross_entropy_chunk_bwd(
                    m(&mut dchunk),
                    v(&state),
                    &targets,
                    v(&mask),
                    n,
                    vc,
                    vv,
                    0,
                    1.0 / n as f32,
                )
            },
        );
    }

    // AdamW over 256M parameters: p, g, m, v are f32 in both dtypes (p, g, m, v read; p, m, v
    // written: 28 bytes an element); the bf16 variant also writes the bf16 working copy of the
    // new p in the same pass (adamw_bf16: + 2 bytes). sum_squares reads x, a T (f32: the
    // gradients it norms in training; bf16: the kernel's other symbol).
    for dt in DTYPES {
        let n = 256 << 20;
        let g = random(&dev, n, 7, 1e-3, Dtype::F32);
        let (mut p, mut mm, mut vv) = (
            random(&dev, n, 8, 0.02, Dtype::F32),
            dev.alloc(n).expect("a"),
            dev.alloc(n).expect("a"),
        );
        // the working copy: none in f32 (adamw_f32), bf16 in bf16 (adamw_bf16)
        let mut work = (dt != Dtype::F32).then(|| dev.alloc_as(n, dt).expect("a"));
        let bytes = 28 + work.as_ref().map_or(0, |_| dt.size() as u64);
        let mut step = 0u64;
        bench_op(
            c,
            &dev,
            "adamw",
            &match dt {
                Dtype::F32 => "256M".to_string(),
                _ => format!("{dt}_work_256M"),
            },
            Throughput::Bytes(bytes * n as u64),
            bw,
            |_| {
                step += 1;
                let hp = AdamwStep {
                    lr: 1e-4,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    step,
                    grad_scale: 1.0,
                };
                dev.adamw(
                    m(&mut p),
                    work.as_mut().map(m),
                    v(&g),
                    m(&mut mm),
                    m(&mut vv),
                    &hp,
                )
            },
        );
        drop((p, mm, vv, work));
        // g itself in f32; a bf16 copy of it in bf16. The kernel alone, adding into one f64
        // kept on the device (`Device::sum_squares` also allocates it, copies it back and waits)
        let g16 = (dt != Dtype::F32).then(|| random(&dev, n, 7, 1e-3, dt));
        let x = g16.as_ref().unwrap_or(&g);
        let mut acc = dev.alloc_as(2, Dtype::F32).expect("alloc");
        bench_op(
            c,
            &dev,
            "sum_squares",
            &id(dt, "", "256M"),
            Throughput::Bytes(dt.size() as u64 * n as u64),
            bw,
            |_| dev.sum_squares_kernel(&mut acc, v(x)),
        );
    }

    // causal attention, B 1, T 4096, NH 32 / NKV 8, HS 128 (the target shape): f32 on
    // the SIMT cores against the f32 peak, bf16 on tensor cores against the bf16 peak (the
    // 350 TFLOP/s forward target); lse and the backward's D f32 in both
    for dt in DTYPES {
        let d = AttnDims {
            b: 1,
            t: 4096,
            nh: 32,
            nkv: 8,
            hs: 128,
        };
        let (nq, nk) = (d.b * d.t * d.nh * d.hs, d.b * d.t * d.nkv * d.hs);
        let (q, k, vv) = (
            random(&dev, nq, 9, 1.0, dt),
            random(&dev, nk, 10, 1.0, dt),
            random(&dev, nk, 11, 1.0, dt),
        );
        let (mut out, mut lse) = (
            dev.alloc_as(nq, dt).expect("a"),
            dev.alloc(d.b * d.nh * d.t).expect("a"),
        );
        let peak = if dt == Dtype::F32 {
            f32_peak
        } else {
            bf16_peak
        };
        // causal: half of the T x T score matrix; 2 matmuls of 2 FLOP per multiply-add
        let fwd_flop = 4 * d.b * d.nh * d.t * d.t * d.hs / 2;
        bench_op(
            c,
            &dev,
            "attention",
            &id(dt, "fwd", "t4096_hs128"),
            Throughput::Elements(fwd_flop as u64),
            peak,
            |_| dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), d),
        );
        if dt == Dtype::Bf16 {
            // the launcher's pick above is the 128-row kernel (attention_fwd_bf16_hs128_bo128);
            // the 64-row one by name, to compare
            bench_op(
                c,
                &dev,
                "attention",
                &id(dt, "fwd", "t4096_hs128_bo64"),
                Throughput::Elements(fwd_flop as u64),
                peak,
                |_| attention_fwd_rows(&dev, &mut out, &mut lse, [&q, &k, &vv], d, 64),
            );
            // HS 64 (SmolLM2's heads): the launcher takes 64 rows (3 blocks per SM); the
            // 128-row kernel (2 blocks per SM, half the shared-memory reads per product) by
            // name, to decide which it should take
            let d64 = AttnDims { hs: 64, ..d };
            let (nq, nk) = (nq / 2, nk / 2);
            let (q, k, vv) = (
                random(&dev, nq, 13, 1.0, dt),
                random(&dev, nk, 14, 1.0, dt),
                random(&dev, nk, 15, 1.0, dt),
            );
            let mut out = dev.alloc_as(nq, dt).expect("a");
            for (rows, name) in [(64, "t4096_hs64"), (128, "t4096_hs64_bo128")] {
                bench_op(
                    c,
                    &dev,
                    "attention",
                    &id(dt, "fwd", name),
                    Throughput::Elements(fwd_flop as u64 / 2),
                    peak,
                    |_| attention_fwd_rows(&dev, &mut out, &mut lse, [&q, &k, &vv], d64, rows),
                );
            }
        }
        let dout = random(&dev, nq, 12, 1.0, dt);
        let (mut dq, mut dk, mut dv) = (
            dev.alloc_as(nq, dt).expect("a"),
            dev.alloc_as(nk, dt).expect("a"),
            dev.alloc_as(nk, dt).expect("a"),
        );
        // backward: 5 matmuls of the forward's size (S, dP, dV, dQ, dK) = 2.5x forward
        bench_op(
            c,
            &dev,
            "attention",
            &id(dt, "bwd", "t4096_hs128"),
            Throughput::Elements((fwd_flop * 5 / 2) as u64),
            peak,
            |_| {
                dev.attention_bwd(
                    m(&mut dq),
                    m(&mut dk),
                    m(&mut dv),
                    v(&dout),
                    v(&q),
                    v(&k),
                    v(&vv),
                    v(&out),
                    v(&lse),
                    d,
                )
            },
        );
    }

    // decode attention: one new token per sequence over a 2048-token cache, B 32; q, kcache,
    // vcache, out T (the caches read: 2 T per cache element; q and out are negligible)
    for dt in DTYPES {
        let t = dt.size() as u64;
        let d = CacheDims {
            b: 32,
            tq: 1,
            tmax: 2048,
            nh: 32,
            nkv: 8,
            hs: 128,
            pos0: 2047,
        };
        let nc = d.b * d.tmax * d.nkv * d.hs;
        let (kc, vc) = (random(&dev, nc, 13, 1.0, dt), random(&dev, nc, 14, 1.0, dt));
        let q = random(&dev, d.b * d.nh * d.hs, 15, 1.0, dt);
        let starts = dev.upload_ids(&vec![0u32; d.b]).expect("ids");
        let mut out = dev.alloc_as(d.b * d.nh * d.hs, dt).expect("alloc");
        bench_op(
            c,
            &dev,
            "decode_attention",
            &id(dt, "", "b32_t2048"),
            Throughput::Bytes(2 * t * nc as u64),
            bw,
            |_| dev.decode_attention_fwd(m(&mut out), v(&q), v(&kc), v(&vc), &starts, None, d),
        );
    }

    // kv_append: the new keys and values of B 32 rows into a 2048-position cache, NKV 8, HS 128
    // (k, v read, their cache rows written: 4 T per new element). TQ 1 is one decode step's
    // append (a few hundred KiB: launch-bound); TQ 512 a prefill's (bandwidth-bound).
    for dt in DTYPES {
        let t = dt.size() as u64;
        for tq in [1, 512] {
            let d = CacheDims {
                b: 32,
                tq,
                tmax: 2048,
                nh: 32,
                nkv: 8,
                hs: 128,
                pos0: 1024,
            };
            let (nc, nn) = (d.b * d.tmax * d.nkv * d.hs, d.b * d.tq * d.nkv * d.hs);
            let mut kc = dev.alloc_as(nc, dt).expect("alloc");
            let mut vc = dev.alloc_as(nc, dt).expect("alloc");
            let (k, vv) = (random(&dev, nn, 18, 1.0, dt), random(&dev, nn, 19, 1.0, dt));
            bench_op(
                c,
                &dev,
                "kv_append",
                &id(dt, "fwd", &format!("b32_tq{tq}")),
                Throughput::Bytes(4 * t * nn as u64),
                bw,
                |_| dev.kv_append_fwd(m(&mut kc), m(&mut vc), v(&k), v(&vv), None, d),
            );
        }
    }

    // matmul through cuBLASLt, f32 compute: x [4096, 2048] @ W^T (W [5632, 2048]); a, b and c
    // in f32 (SIMT, against the f32 peak) or in bf16 (tensor cores, against the bf16 peak)
    for dt in DTYPES {
        let (mm, n, k) = (4096, 5632, 2048);
        let a = random(&dev, mm * k, 16, 1.0, dt);
        let b = random(&dev, n * k, 17, 0.02, dt);
        let mut cc = dev.alloc_as(mm * n, dt).expect("alloc");
        bench_op(
            c,
            &dev,
            "matmul",
            &format!("4096x5632x2048_{dt}"),
            Throughput::Elements((2 * mm * n * k) as u64),
            if dt == Dtype::F32 {
                f32_peak
            } else {
                bf16_peak
            },
            |_| dev.matmul(m(&mut cc), v(&a), v(&b), mm, n, k, false, true, 1.0, 0.0),
        );
    }

    // the weight gradient of that matmul: dW [5632, 2048] += dY^T [5632, 4096] X [4096, 2048],
    // bf16 operands into the f32 gradient (cuBLASLt's mixed output, beta 1: accumulate)
    {
        let (mm, n, k) = (5632, 2048, 4096);
        let dy = random(&dev, k * mm, 18, 1.0, Dtype::Bf16);
        let x = random(&dev, k * n, 19, 1.0, Dtype::Bf16);
        let mut dw = dev.alloc(mm * n).expect("alloc");
        bench_op(
            c,
            &dev,
            "matmul",
            "dw_5632x2048x4096_bf16_into_f32",
            Throughput::Elements((2 * mm * n * k) as u64),
            bf16_peak,
            |_| dev.matmul(m(&mut dw), v(&dy), v(&x), mm, n, k, true, false, 1.0, 1.0),
        );
    }
    // the residual add as the matmul's epilogue: the down projection of a block (h [4096, 5632]
    // @ Wdown^T, Wdown [2048, 5632]) added to the residual stream x [4096, 2048], in bf16: one
    // matmul_add (reads x, writes the sum) against matmul + residual_fwd (writes the product,
    // then reads it and x and writes the sum: 2 NC more elements moved, one launch more).
    // Counted in FLOPs of the matmul, so the two ids compare as times.
    {
        let (mm, n, k) = (4096, 2048, 5632);
        let dt = Dtype::Bf16;
        let h = random(&dev, mm * k, 20, 1.0, dt);
        let w = random(&dev, n * k, 21, 0.02, dt);
        let x = random(&dev, mm * n, 22, 1.0, dt);
        let (mut out, mut p) = (
            dev.alloc_as(mm * n, dt).expect("alloc"),
            dev.alloc_as(mm * n, dt).expect("alloc"),
        );
        let flops = Throughput::Elements((2 * mm * n * k) as u64);
        bench_op(
            c,
            &dev,
            "matmul_add",
            "down_4096x2048x5632_bf16_fused",
            flops.clone(),
            bf16_peak,
            |_| dev.matmul_add(m(&mut out), v(&x), v(&h), v(&w), mm, n, k, false, true),
        );
        bench_op(
            c,
            &dev,
            "matmul_add",
            "down_4096x2048x5632_bf16_matmul_then_residual",
            flops,
            bf16_peak,
            |_| {
                dev.matmul(m(&mut p), v(&h), v(&w), mm, n, k, false, true, 1.0, 0.0)?;
                dev.residual_fwd(m(&mut out), v(&x), v(&p))
            },
        );
    }

    // the other ops (benches/common/op_cases.rs: the elementwise backwards, the embedding,
    // softmax, the NLA ops, sampling), memory-bound: against the copy bandwidth, measured for
    // half a second each (most run once or a few times per step)
    for dt in DTYPES {
        op_cases::each(
            &dev,
            &op_cases::GPU,
            dt,
            &mut |group, name, bytes, launch| {
                let half = Duration::from_millis(500);
                bench_for(
                    c,
                    &dev,
                    (group, name),
                    Throughput::Bytes(bytes),
                    bw,
                    half,
                    launch,
                );
                Ok(())
            },
        )
        .expect("bench cases");
    }
}

criterion_group!(cuda_benches, benches);
criterion_main!(cuda_benches);
