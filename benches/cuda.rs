//! Kernel benches on the GPU (criterion; `cargo bench --bench cuda`): each op of the CUDA
//! device at training sizes, timed with CUDA events around a batch of launches after warm-up,
//! over rotating inputs (several input sets, cycled, so that no launch finds its inputs in L2
//! from the one before). Criterion reports the time and the throughput (bytes or FLOP per
//! second); after each group a line gives the fraction of the device's limit: the measured
//! copy bandwidth (device-to-device copy, bytes read + written) for memory-bound kernels, and
//! the dense f32 rate for the f32 GEMM and attention (the bf16 path is not built yet).
//!
//! Without a GPU (or without kernels in the build) it prints why and measures nothing.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nla_engine::device::cuda::{self, CudaBuf, CudaDevice};
use nla_engine::device::{AdamwStep, AttnDims, CacheDims, Device, Dtype, View, ViewMut};

/// Dense f32 FMA rate of an H100 SXM (132 SMs x 128 lanes x 2 x 1.98 GHz), FLOP/s.
const F32_PEAK: f64 = 67e12;
/// Input sets cycled through (rotating inputs).
const ROT: usize = 3;

fn random(dev: &CudaDevice, n: usize, seed: u64, scale: f32) -> CudaBuf {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let host: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            scale * ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    dev.upload(&host).expect("upload")
}

fn v(x: &CudaBuf) -> View<'_, CudaBuf> {
    View::all(x)
}
fn m(x: &mut CudaBuf) -> ViewMut<'_, CudaBuf> {
    ViewMut::all(x)
}

/// Times `f(i)` (i = launch index) with events: criterion picks the iteration counts.
fn bench_op(
    c: &mut Criterion,
    dev: &CudaDevice,
    group: &str,
    name: &str,
    thrpt: Throughput,
    limit: (f64, &str),
    mut f: impl FnMut(usize) -> nla_engine::Result<()>,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(thrpt.clone());
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    g.sample_size(20);
    let mut k = 0usize;
    g.bench_function(name, |b| {
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
        eprintln!("benches/cuda.rs: no GPU: {why}");
        return;
    }
    // the f32 kernels: the parity path the CUDA tests check
    let dev = CudaDevice::new(0)
        .and_then(|d| d.with_work_dtype(Dtype::F32))
        .expect("cuda device");
    eprintln!("device: {}", dev.name());

    // copy bandwidth: the limit of the memory-bound kernels
    let n = 256 << 20; // 1 GiB of f32
    let src = random(&dev, n, 1, 1.0);
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

    // residual: out = a + b over 64M elements
    {
        let n = 64 << 20;
        let ins: Vec<_> = (0..ROT)
            .map(|i| {
                (
                    random(&dev, n, 10 + i as u64, 1.0),
                    random(&dev, n, 20 + i as u64, 1.0),
                )
            })
            .collect();
        let mut out = dev.alloc(n).expect("alloc");
        bench_op(
            c,
            &dev,
            "residual",
            "fwd_64M",
            Throughput::Bytes(12 * n as u64),
            bw,
            |i| {
                let (a, b) = &ins[i % ROT];
                dev.residual_fwd(m(&mut out), v(a), v(b))
            },
        );
    }

    // rmsnorm [N = 16384, C = 4096]
    {
        let (n, cc) = (16384, 4096);
        let xs: Vec<_> = (0..ROT)
            .map(|i| random(&dev, n * cc, 30 + i as u64, 2.0))
            .collect();
        let w = random(&dev, cc, 3, 1.0);
        let (mut out, mut rstd) = (dev.alloc(n * cc).expect("a"), dev.alloc(n).expect("a"));
        bench_op(
            c,
            &dev,
            "rmsnorm",
            "fwd_16384x4096",
            Throughput::Bytes(8 * (n * cc) as u64),
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
        let dout = random(&dev, n * cc, 4, 1.0);
        let (mut dx, mut dw) = (dev.alloc(n * cc).expect("a"), dev.alloc(cc).expect("a"));
        bench_op(
            c,
            &dev,
            "rmsnorm",
            "bwd_16384x4096",
            Throughput::Bytes(12 * (n * cc) as u64),
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
                )
            },
        );
    }

    // swiglu [N*F = 16384 x 11008]
    {
        let n = 16384 * 11008 / 4;
        let gs: Vec<_> = (0..ROT)
            .map(|i| {
                (
                    random(&dev, n, 40 + i as u64, 3.0),
                    random(&dev, n, 50 + i as u64, 1.0),
                )
            })
            .collect();
        let mut out = dev.alloc(n).expect("alloc");
        bench_op(
            c,
            &dev,
            "swiglu",
            "fwd_45M",
            Throughput::Bytes(12 * n as u64),
            bw,
            |i| {
                let (g, u) = &gs[i % ROT];
                dev.swiglu_fwd(m(&mut out), v(g), v(u))
            },
        );
    }

    // rope over q [B 8, T 2048, NH 32, HS 128], in place
    {
        let (b, t, h, hs) = (8, 2048, 32, 128);
        let mut x = random(&dev, b * t * h * hs, 5, 1.0);
        bench_op(
            c,
            &dev,
            "rope",
            "fwd_8x2048x32x128",
            Throughput::Bytes(8 * (b * t * h * hs) as u64),
            bw,
            |_| dev.rope_fwd(m(&mut x), b, t, h, hs, 0, 1e4),
        );
    }

    // cross-entropy over logits [N 4096, V 32000]
    {
        let (n, vv) = (4096, 32000);
        let logits = random(&dev, n * vv, 6, 4.0);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vv as u32).collect();
        let targets = dev.upload_ids(&targets).expect("ids");
        let mask = dev.upload(&vec![1.0; n]).expect("mask");
        let mut losses = dev.alloc(n).expect("alloc");
        bench_op(
            c,
            &dev,
            "cross_entropy",
            "fwd_4096x32000",
            Throughput::Bytes(4 * (n * vv) as u64),
            bw,
            |_| dev.cross_entropy_fwd(m(&mut losses), v(&logits), &targets, v(&mask), n, vv),
        );
        let mut dlogits = dev.alloc(n * vv).expect("alloc");
        bench_op(
            c,
            &dev,
            "cross_entropy",
            "bwd_4096x32000",
            Throughput::Bytes(8 * (n * vv) as u64),
            bw,
            |_| {
                dev.cross_entropy_bwd(
                    m(&mut dlogits),
                    v(&logits),
                    &targets,
                    v(&mask),
                    n,
                    vv,
                    1.0 / n as f32,
                )
            },
        );
        // one vocabulary chunk of 4096 of the same rows (the chunked LM head's loss kernels;
        // the state [N,3] is read and written per row, negligible next to the chunk)
        let vc = 4096;
        let chunk = random(&dev, n * vc, 9, 4.0);
        let mut state = dev.alloc(3 * n).expect("alloc");
        bench_op(
            c,
            &dev,
            "cross_entropy",
            "chunk_fwd_4096x4096",
            Throughput::Bytes(4 * (n * vc) as u64),
            bw,
            |_| {
                dev.cross_entropy_chunk_fwd(
                    m(&mut losses),
                    m(&mut state),
                    v(&chunk),
                    &targets,
                    v(&mask),
                    n,
                    vc,
                    vv,
                    vc,
                )
            },
        );
        let mut dchunk = random(&dev, n * vc, 9, 4.0);
        bench_op(
            c,
            &dev,
            "cross_entropy",
            "chunk_bwd_4096x4096",
            Throughput::Bytes(8 * (n * vc) as u64),
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
                    vc,
                    1.0 / n as f32,
                )
            },
        );
    }

    // AdamW over 256M parameters (p, g, m, v read; p, m, v written)
    {
        let n = 256 << 20;
        let g = random(&dev, n, 7, 1e-3);
        let (mut p, mut mm, mut vv) = (
            random(&dev, n, 8, 0.02),
            dev.alloc(n).expect("a"),
            dev.alloc(n).expect("a"),
        );
        let mut step = 0u64;
        bench_op(
            c,
            &dev,
            "adamw",
            "256M",
            Throughput::Bytes(28 * n as u64),
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
                dev.adamw(m(&mut p), None, v(&g), m(&mut mm), m(&mut vv), &hp)
            },
        );
        bench_op(
            c,
            &dev,
            "sum_squares",
            "256M",
            Throughput::Bytes(4 * n as u64),
            bw,
            |_| dev.sum_squares(v(&g)).map(|_| ()),
        );
    }

    // causal attention, B 1, T 4096, NH 32 / NKV 8, HS 128 (the target shape, in f32)
    {
        let d = AttnDims {
            b: 1,
            t: 4096,
            nh: 32,
            nkv: 8,
            hs: 128,
        };
        let (nq, nk) = (d.b * d.t * d.nh * d.hs, d.b * d.t * d.nkv * d.hs);
        let (q, k, vv) = (
            random(&dev, nq, 9, 1.0),
            random(&dev, nk, 10, 1.0),
            random(&dev, nk, 11, 1.0),
        );
        let (mut out, mut lse) = (
            dev.alloc(nq).expect("a"),
            dev.alloc(d.b * d.nh * d.t).expect("a"),
        );
        // causal: half of the T x T score matrix; 2 matmuls of 2 FLOP per multiply-add
        let fwd_flop = 4 * d.b * d.nh * d.t * d.t * d.hs / 2;
        bench_op(
            c,
            &dev,
            "attention",
            "fwd_t4096_hs128",
            Throughput::Elements(fwd_flop as u64),
            f32_peak,
            |_| dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), d),
        );
        let dout = random(&dev, nq, 12, 1.0);
        let (mut dq, mut dk, mut dv) = (
            dev.alloc(nq).expect("a"),
            dev.alloc(nk).expect("a"),
            dev.alloc(nk).expect("a"),
        );
        // backward: 5 matmuls of the forward's size (S, dP, dV, dQ, dK) = 2.5x forward
        bench_op(
            c,
            &dev,
            "attention",
            "bwd_t4096_hs128",
            Throughput::Elements((fwd_flop * 5 / 2) as u64),
            f32_peak,
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

    // decode attention: one new token per sequence over a 2048-token cache, B 32
    {
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
        let (kc, vc) = (random(&dev, nc, 13, 1.0), random(&dev, nc, 14, 1.0));
        let q = random(&dev, d.b * d.nh * d.hs, 15, 1.0);
        let starts = dev.upload_ids(&vec![0u32; d.b]).expect("ids");
        let mut out = dev.alloc(d.b * d.nh * d.hs).expect("alloc");
        bench_op(
            c,
            &dev,
            "decode_attention",
            "b32_t2048",
            Throughput::Bytes(8 * nc as u64),
            bw,
            |_| dev.decode_attention_fwd(m(&mut out), v(&q), v(&kc), v(&vc), &starts, d),
        );
    }

    // matmul through cuBLASLt, f32 compute: x [4096, 2048] @ W^T (W [5632, 2048])
    {
        let (mm, n, k) = (4096, 5632, 2048);
        let a = random(&dev, mm * k, 16, 1.0);
        let b = random(&dev, n * k, 17, 0.02);
        let mut cc = dev.alloc(mm * n).expect("alloc");
        bench_op(
            c,
            &dev,
            "matmul",
            "4096x5632x2048_f32",
            Throughput::Elements((2 * mm * n * k) as u64),
            f32_peak,
            |_| dev.matmul(m(&mut cc), v(&a), v(&b), mm, n, k, false, true, 1.0, 0.0),
        );
    }
}

criterion_group!(cuda_benches, benches);
criterion_main!(cuda_benches);
