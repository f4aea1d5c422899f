//! Per-op benchmarks of the CPU device, forward and backward, at the sizes of a small model's
//! training step (N = B*T = 2048 rows, C = 576, F = 1536, V = 8192, attention B=4 T=512 NH=9
//! NKV=3 HS=64). One criterion group per op, named like the op. Throughput is in elements, except
//! for `matmul` and `attention`, whose ids end in `flops`: there "elem/s" reads as flop/s.
//!
//! `cargo bench --bench ops [-- <group>]`; GEMM threads follow `MATMUL_NUM_THREADS`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{AdamwStep, AttnDims, Device, View, ViewMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const N: usize = 2048;
const C: usize = 576;
const F: usize = 1536;
const V: usize = 8192;

type Buf = Vec<f32>;

fn random(n: usize, seed: u64) -> Buf {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn v(x: &Buf) -> View<'_, Buf> {
    View::all(x)
}

fn m(x: &mut Buf) -> ViewMut<'_, Buf> {
    ViewMut::all(x)
}

fn group<'a>(c: &'a mut Criterion, name: &str, elements: u64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(elements));
    g
}

/// A group whose iterations take milliseconds: every sample runs the same number of them, so
/// ten samples fit the measurement time.
fn slow_group<'a>(c: &'a mut Criterion, name: &str, elements: u64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = group(c, name, elements);
    g.sampling_mode(SamplingMode::Flat);
    g
}

fn embedding(c: &mut Criterion) {
    let dev = CpuDevice;
    let wte = random(V * C, 1);
    let dout = random(N * C, 2);
    let mut r = StdRng::seed_from_u64(3);
    let ids: Vec<u32> = (0..N).map(|_| r.random_range(0..V as u32)).collect();
    let (mut out, mut dwte) = (vec![0.0; N * C], vec![0.0; V * C]);
    let mut g = group(c, "embedding", (N * C) as u64);
    g.bench_function("fwd", |b| {
        b.iter(|| dev.embedding_fwd(m(&mut out), &ids, v(&wte), N, C).unwrap())
    });
    g.bench_function("bwd", |b| {
        b.iter(|| {
            dev.embedding_bwd(m(&mut dwte), &ids, v(&dout), N, C)
                .unwrap()
        })
    });
    g.finish();
}

fn rmsnorm(c: &mut Criterion) {
    let dev = CpuDevice;
    let (x, w, dout) = (random(N * C, 4), random(C, 5), random(N * C, 6));
    let (mut out, mut rstd, mut dx, mut dw) = (
        vec![0.0; N * C],
        vec![0.0; N],
        vec![0.0; N * C],
        vec![0.0; C],
    );
    let mut g = group(c, "rmsnorm", (N * C) as u64);
    g.bench_function("fwd", |b| {
        b.iter(|| {
            dev.rmsnorm_fwd(m(&mut out), m(&mut rstd), v(&x), v(&w), N, C, 1e-5)
                .unwrap()
        })
    });
    g.bench_function("bwd", |b| {
        b.iter(|| {
            dev.rmsnorm_bwd(
                m(&mut dx),
                m(&mut dw),
                v(&dout),
                v(&x),
                v(&w),
                v(&rstd),
                N,
                C,
                false,
            )
            .unwrap()
        })
    });
    g.finish();
}

const ATT: AttnDims = AttnDims {
    b: 4,
    t: 512,
    nh: 9,
    nkv: 3,
    hs: 64,
};

fn rope(c: &mut Criterion) {
    let dev = CpuDevice;
    let AttnDims { b, t, nh, hs, .. } = ATT;
    let mut x = random(b * t * nh * hs, 7);
    let mut g = group(c, "rope", x.len() as u64);
    // Rotations are orthogonal: repeated application keeps the values bounded.
    g.bench_function("fwd", |bch| {
        bch.iter(|| {
            dev.rope_fwd(m(&mut x), b, t, nh, hs, 0, None, 10000.0)
                .unwrap()
        })
    });
    g.bench_function("bwd", |bch| {
        bch.iter(|| dev.rope_bwd(m(&mut x), b, t, nh, hs, 0, 10000.0).unwrap())
    });
    g.finish();
}

fn attention(c: &mut Criterion) {
    let dev = CpuDevice;
    let AttnDims { b, t, nh, nkv, hs } = ATT;
    let (nq, nk) = (b * t * nh * hs, b * t * nkv * hs);
    let (q, k, vv, dout) = (random(nq, 8), random(nk, 9), random(nk, 10), random(nq, 11));
    let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; b * nh * t]);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    // Causal pairs; forward = 2 GEMM-like products (QK^T, PV), backward = 5 (S, dP, dQ, dK, dV).
    let pairs = (b * nh * t * (t + 1) / 2) as u64;
    let mut g = slow_group(c, "attention", 4 * hs as u64 * pairs);
    g.bench_function("fwd flops", |bch| {
        bch.iter(|| {
            dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), ATT)
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements(10 * hs as u64 * pairs));
    g.bench_function("bwd flops", |bch| {
        bch.iter(|| {
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
                ATT,
            )
            .unwrap()
        })
    });
    g.finish();
}

fn swiglu(c: &mut Criterion) {
    let dev = CpuDevice;
    let (gu, dout) = (random(2 * N * F, 12), random(N * F, 14));
    let (mut out, mut dgu) = (vec![0.0; N * F], vec![0.0; 2 * N * F]);
    let mut g = slow_group(c, "swiglu", (N * F) as u64);
    g.bench_function("fwd", |b| {
        b.iter(|| dev.swiglu_fwd(m(&mut out), v(&gu)).unwrap())
    });
    g.bench_function("bwd", |b| {
        b.iter(|| dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu)).unwrap())
    });
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let dev = CpuDevice;
    let mut g = slow_group(c, "matmul", 1);
    // (id, M, N, K, ta, tb): the MLP up-projection of a step (x [N,C] @ W^T, W [F,C]) with its two
    // backward products, and square sizes.
    let cases = [
        ("fwd x@W^T 2048x1536x576 flops", N, F, C, false, true),
        ("bwd dx=dy@W 2048x576x1536 flops", N, C, F, false, false),
        ("bwd dW=dy^T@x 1536x576x2048 flops", F, C, N, true, false),
        ("square 1024 flops", 1024, 1024, 1024, false, false),
        ("square 2048 flops", 2048, 2048, 2048, false, false),
    ];
    for (id, mm, n, k, ta, tb) in cases {
        let (a, b) = (random(mm * k, 15), random(k * n, 16));
        let mut out = vec![0.0; mm * n];
        g.throughput(Throughput::Elements(2 * (mm * n * k) as u64));
        g.bench_function(id, |bch| {
            bch.iter(|| {
                dev.matmul(m(&mut out), v(&a), v(&b), mm, n, k, ta, tb, 1.0, 0.0)
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// The residual add as the matmul's epilogue, at a block's down projection (h [N,F] @ Wdown^T,
/// Wdown [C,F], plus x [N,C]): `matmul_add` against `matmul` then `residual_fwd`.
fn matmul_add(c: &mut Criterion) {
    let dev = CpuDevice;
    let mut g = slow_group(c, "matmul_add", 2 * (N * C * F) as u64);
    let (h, w, x) = (random(N * F, 19), random(C * F, 20), random(N * C, 21));
    let (mut out, mut p) = (vec![0.0; N * C], vec![0.0; N * C]);
    g.bench_function("down 2048x576x1536 fused flops", |bch| {
        bch.iter(|| {
            dev.matmul_add(m(&mut out), v(&x), v(&h), v(&w), N, C, F, false, true)
                .unwrap()
        })
    });
    g.bench_function("down 2048x576x1536 matmul then residual flops", |bch| {
        bch.iter(|| {
            dev.matmul(m(&mut p), v(&h), v(&w), N, C, F, false, true, 1.0, 0.0)
                .unwrap();
            dev.residual_fwd(m(&mut out), v(&x), v(&p)).unwrap()
        })
    });
    g.finish();
}

fn residual(c: &mut Criterion) {
    let dev = CpuDevice;
    let (a, b2) = (random(N * C, 17), random(N * C, 18));
    let (mut out, mut da) = (vec![0.0; N * C], vec![0.0; N * C]);
    let mut g = group(c, "residual", (N * C) as u64);
    g.bench_function("fwd", |b| {
        b.iter(|| dev.residual_fwd(m(&mut out), v(&a), v(&b2)).unwrap())
    });
    g.bench_function("bwd", |b| {
        b.iter(|| dev.residual_bwd(m(&mut da), v(&a)).unwrap())
    });
    g.finish();
}

/// Over whole rows: one chunk of all V columns (as training runs it); the backward writes the
/// gradient over a copy of the logits, made again before each run (outside the timing).
fn cross_entropy(c: &mut Criterion) {
    let dev = CpuDevice;
    let logits: Buf = random(N * V, 19).iter().map(|x| 4.0 * x).collect();
    let mut r = StdRng::seed_from_u64(20);
    let targets: Vec<u32> = (0..N).map(|_| r.random_range(0..V as u32)).collect();
    let mask = vec![1.0; N];
    let (mut losses, mut state) = (vec![0.0; N], vec![0.0; 3 * N]);
    let mut g = slow_group(c, "cross_entropy", (N * V) as u64);
    g.bench_function("chunk_fwd", |b| {
        b.iter(|| {
            dev.cross_entropy_chunk_fwd(
                m(&mut losses),
                m(&mut state),
                v(&logits),
                &targets,
                v(&mask),
                N,
                V,
                V,
                0,
            )
            .unwrap()
        })
    });
    g.bench_function("chunk_bwd", |b| {
        b.iter_batched_ref(
            || logits.clone(),
            |dl| {
                let st = v(&state);
                dev.cross_entropy_chunk_bwd(m(dl), st, &targets, v(&mask), N, V, V, 0, 0.5)
                    .unwrap()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn softmax(c: &mut Criterion) {
    let dev = CpuDevice;
    let x: Buf = random(N * V, 21).iter().map(|x| 4.0 * x).collect();
    let dout = random(N * V, 22);
    let (mut out, mut dx) = (vec![0.0; N * V], vec![0.0; N * V]);
    let mut g = slow_group(c, "softmax", (N * V) as u64);
    g.bench_function("fwd", |b| {
        b.iter(|| dev.softmax_fwd(m(&mut out), v(&x), N, V).unwrap())
    });
    g.bench_function("bwd", |b| {
        b.iter(|| {
            dev.softmax_bwd(m(&mut dx), v(&dout), v(&out), N, V)
                .unwrap()
        })
    });
    g.finish();
}

fn adamw(c: &mut Criterion) {
    let dev = CpuDevice;
    let n = 1 << 24; // 16.8M parameters
    let (mut p, grad) = (random(n, 23), random(n, 24));
    let (mut mm, mut vv) = (vec![0.0; n], vec![0.0; n]);
    let hp = AdamwStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 10,
        grad_scale: 0.5,
    };
    let mut g = slow_group(c, "adamw", n as u64);
    g.bench_function("step", |b| {
        b.iter(|| {
            dev.adamw(m(&mut p), None, v(&grad), m(&mut mm), m(&mut vv), &hp)
                .unwrap()
        })
    });
    g.bench_function("sum_squares", |b| {
        b.iter(|| black_box(dev.sum_squares(v(&grad)).unwrap()))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = embedding, rmsnorm, rope, attention, swiglu, matmul, matmul_add, residual, cross_entropy, softmax, adamw
}
criterion_main!(benches);
