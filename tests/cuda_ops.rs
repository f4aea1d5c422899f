//! Per-op parity of the CUDA device with the CPU device (the twins) at realistic sizes, too
//! large for the emulator in CI: attention forward and backward (T 512, HS 64 and 128; in bf16
//! on the tensor cores at T 2048 and 512), rmsnorm (N 4096, C 2048), cross-entropy (V 32000),
//! matmul and matmul_add (M 1024, N 2048, K 512, every transpose), swiglu, rope, qkv_rope,
//! embedding (V 32000), adamw (1M elements), sum_squares (10M), decode attention (TMAX 1024, TQ
//! 1 and 64) and kv_append at its shapes, sampling, softmax and residual.
//!
//! Every op check is one generic function `op(dev, label, sizes)`: it draws seeded random
//! inputs, runs the op on `dev` and on the CPU device, and compares each output.
//!
//! - `cuda_<op>` runs it on [`CudaDevice`] at the GPU sizes ([`GPU`]). Without a usable GPU
//!   ([`probe`] fails) it prints why and passes as skipped, unless `NLA_REQUIRE_GPU=1`
//!   (scripts/gpu-check.sh), which makes that a failure.
//! - `cuda_ops_run_on_emu_small` runs every check on [`EmuDevice`] (the same kernels on the
//!   CPU emulator; matmul on the CPU) at tiny sizes ([`SMALL`]), in both schedules, so that the
//!   comparison code itself runs in CI.
//! - `cuda_ops_run_on_emu_gpu_sizes` (ignored: ~40 s on 2 cores) runs every check on the
//!   emulator at the GPU sizes, by hand, to measure the kernels' own differences from the twins
//!   at those sizes; the tolerances below cite them. (On the emulator matmul is the CPU GEMM:
//!   cuBLASLt is checked on the GPU only.)
//!
//! Comparison: the largest |got - want| over the largest |want| of each output, against a
//! tolerance written at each op with its reason; a NaN or infinity in either fails (outputs
//! documented `=` start as NaN, so an element the op leaves unwritten fails too; `+=` outputs
//! start at the same random values on both devices). The results differ by f32 rounding only
//! (except in the bf16 attention check, `cuda_attention_bf16` and `attention_bf16_runs_on_emu`,
//! whose tensor-core products round to bf16): the kernels and cuBLASLt (f32 compute, not TF32)
//! sum in other orders than the twins, and the GPU's expf/exp2f/logf (2 ulp, no fast math) and
//! FMA contraction move results by ulps. That difference grows with the length of a reduction;
//! a wrong op (an index, a mask, a missing term) is off by > 1e-3 of the output's scale.

mod common;

use std::time::{Duration, Instant};

use common::kernels::{nonzero, rng, uniform};
use common::parity::gpu;
use common::rel_l2;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::cuda::CudaDevice;
use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::EmuDevice;
use nla_engine::device::{
    AdamwStep, AttnDims, CacheDims, Device, DeviceBuf, Dtype, SampleSpec, View, ViewMut,
};
use rand::Rng;

// ---- sizes

/// The problem sizes of every op check.
struct Sizes {
    attention: &'static [AttnDims],
    /// [N, C]
    rmsnorm: [usize; 2],
    /// [N, V]
    cross_entropy: [usize; 2],
    /// [M, N, K]
    matmul: [usize; 3],
    /// elements
    swiglu: usize,
    /// [B, T, H, HS]
    rope: [usize; 4],
    /// (pos0, theta) of each rope run
    rope_at: &'static [(usize, f32)],
    /// [V, C, N]
    embedding: [usize; 3],
    adamw: usize,
    sum_squares: usize,
    /// dims of each run; starts are spread over the rows ([`starts`])
    decode_attention: &'static [CacheDims],
    /// [N, V]
    sample: [usize; 2],
    /// [N, V]
    softmax: [usize; 2],
    /// elements
    residual: usize,
}

/// Realistic sizes (a 1B-class model's layers and vocabulary), for the GPU.
const GPU: Sizes = Sizes {
    attention: &[
        AttnDims {
            b: 2,
            t: 512,
            nh: 16,
            nkv: 4,
            hs: 64,
        },
        AttnDims {
            b: 2,
            t: 512,
            nh: 16,
            nkv: 4,
            hs: 128,
        },
    ],
    rmsnorm: [4096, 2048],
    cross_entropy: [512, 32000],
    matmul: [1024, 2048, 512],
    swiglu: 4096 * 1024,
    rope: [2, 512, 16, 128],
    rope_at: &[(0, 10000.0), (7000, 500000.0)],
    embedding: [32000, 1024, 4096],
    adamw: 1 << 20,
    sum_squares: 10_000_000,
    decode_attention: &[
        // decode: 32 blocks of work split over the cache (split-K and the combine kernel)
        CacheDims {
            b: 8,
            tq: 1,
            tmax: 1024,
            nh: 16,
            nkv: 4,
            hs: 128,
            pos0: 1000,
        },
        // prefill of 64 queries: enough blocks, no split
        CacheDims {
            b: 8,
            tq: 64,
            tmax: 1024,
            nh: 16,
            nkv: 4,
            hs: 128,
            pos0: 900,
        },
    ],
    sample: [64, 32000],
    softmax: [256, 32000],
    residual: 4096 * 1024,
};

/// Tiny sizes for the emulator (~ms a launch), with the GPU sizes' kernel variants (head
/// sizes 64 and 128, several attention tiles, split and unsplit decode attention) and ragged
/// lengths (tails after the 16-byte packs).
const SMALL: Sizes = Sizes {
    attention: &[
        AttnDims {
            b: 2,
            t: 70,
            nh: 4,
            nkv: 2,
            hs: 64,
        },
        AttnDims {
            b: 1,
            t: 40,
            nh: 4,
            nkv: 1,
            hs: 128,
        },
    ],
    rmsnorm: [8, 96],
    cross_entropy: [8, 97],
    matmul: [24, 40, 36],
    swiglu: 1003,
    rope: [2, 16, 4, 64],
    rope_at: &[(0, 10000.0), (7000, 500000.0)],
    embedding: [97, 32, 16],
    adamw: 4099,
    sum_squares: 10_007,
    decode_attention: &[
        CacheDims {
            b: 3,
            tq: 1,
            tmax: 40,
            nh: 4,
            nkv: 2,
            hs: 128,
            pos0: 35,
        },
        CacheDims {
            b: 3,
            tq: 5,
            tmax: 40,
            nh: 4,
            nkv: 2,
            hs: 64,
            pos0: 30,
        },
    ],
    sample: [4, 97],
    softmax: [8, 97],
    residual: 1003,
};

// ---- devices

// ---- comparison

/// Fails unless `got` is within `tol` of `want`: max |got - want| <= tol * max |want| (tol 0:
/// identical values), every value finite. Returns the error relative to max |want|.
#[track_caller]
fn check(label: &str, what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{label} {what}: lengths differ");
    if let Some(i) = want.iter().position(|x| !x.is_finite()) {
        panic!(
            "{label} {what}: the CPU's [{i}] = {} is not finite",
            want[i]
        );
    }
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{label} {what}: [{i}] = {} is not finite", got[i]);
    }
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .enumerate()
        .fold((0, 0f64), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    let rel = if err == 0.0 { 0.0 } else { err / scale };
    eprintln!("{label} {what}: max rel err {rel:.2e} (tol {tol:.1e})");
    assert!(
        rel <= tol,
        "{label} {what}: max |diff| {err:.3e} = {rel:.2e} of max |want| {scale:.3e} > tol \
         {tol:.1e}; worst at [{worst}]: got {} want {}",
        got[worst],
        want[worst]
    );
    rel
}

/// `f()` and how long it took.
fn timed<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let t0 = Instant::now();
    let r = f();
    (r, t0.elapsed())
}

fn report(label: &str, what: &str, cpu: Duration, dev: Duration) {
    eprintln!("{label} {what}: CPU {cpu:.2?}, device {dev:.2?} (with transfers)");
}

/// A buffer of `n` NaNs: an `=` output, so that an element the op does not write shows.
fn nans<E: Device>(e: &E, n: usize) -> E::Buf {
    e.upload(&vec![f32::NAN; n]).unwrap()
}

fn up<E: Device>(e: &E, x: &[f32]) -> E::Buf {
    e.upload(x).unwrap()
}

fn down<E: Device>(e: &E, x: &E::Buf) -> Vec<f32> {
    e.download(View::all(x)).unwrap()
}

// ---- attention

/// Causal GQA attention on `e`, forward then backward: out, lse, dq, dk, dv. q, k, v, dout and
/// the outputs in the device's working dtype (the inputs rounded to it), lse f32.
fn attention_run<E: Device>(e: &E, d: AttnDims, ins: [&[f32]; 4]) -> Vec<Vec<f32>> {
    let dt = e.work_dtype();
    let [q, k, v, dout] = ins.map(|x| e.upload_as(x, dt).unwrap());
    let nans_w = |n: usize| e.upload_as(&vec![f32::NAN; n], dt).unwrap();
    let (mut out, mut lse) = (nans_w(q.len()), nans(e, d.b * d.nh * d.t));
    e.attention_fwd(
        ViewMut::all(&mut out),
        ViewMut::all(&mut lse),
        View::all(&q),
        View::all(&k),
        View::all(&v),
        d,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (nans_w(q.len()), nans_w(k.len()), nans_w(v.len()));
    e.attention_bwd(
        ViewMut::all(&mut dq),
        ViewMut::all(&mut dk),
        ViewMut::all(&mut dv),
        View::all(&dout),
        View::all(&q),
        View::all(&k),
        View::all(&v),
        View::all(&out),
        View::all(&lse),
        d,
    )
    .unwrap();
    [&out, &lse, &dq, &dk, &dv].map(|x| down(e, x)).to_vec()
}

/// Seeded attention inputs q, k, v, dout for `d`: q, k in (-2, 2) (scores q.k / sqrt(HS) of
/// std ~1.3, so rows are neither uniform nor one-hot), v and dout in (-1, 1).
fn attention_inputs(d: &AttnDims) -> [Vec<f32>; 4] {
    let AttnDims { b, t, nh, nkv, hs } = *d;
    let mut r = rng(0xa77 + hs as u64);
    let q = uniform(&mut r, b * t * nh * hs, -2.0, 2.0);
    let k = uniform(&mut r, b * t * nkv * hs, -2.0, 2.0);
    let v = uniform(&mut r, b * t * nkv * hs, -1.0, 1.0);
    let dout = uniform(&mut r, b * t * nh * hs, -1.0, 1.0);
    [q, k, v, dout]
}

/// Attention on `dev` and on the CPU twin from the same inputs `ins` (q, k, v, dout), each
/// output (out, lse, dq, dk, dv) compared against its tolerance in `tols`.
fn attention_compare<D: Device>(
    dev: &D,
    label: &str,
    kind: &str,
    d: AttnDims,
    ins: [&[f32]; 4],
    tols: [f64; 5],
) {
    let AttnDims { b, t, nh, nkv, hs } = d;
    let (want, tc) = timed(|| attention_run(&CpuDevice::new(), d, ins));
    let (got, td) = timed(|| attention_run(dev, d, ins));
    let what = format!("{kind} (B {b}, T {t}, NH {nh}, NKV {nkv}, HS {hs})");
    report(label, &what, tc, td);
    let names = ["out", "lse", "dq", "dk", "dv"];
    for ((g, w), (name, tol)) in got.iter().zip(&want).zip(names.iter().zip(tols)) {
        check(label, &format!("{what} {name}"), g, w, tol);
    }
}

/// The bf16 attention (the tensor-core kernels, the forward with the 64 or 128 query rows per
/// block that the launcher picks for the device's SMs) on `dev`, whose working dtype is bf16,
/// against the f32 CPU twin on the same inputs rounded to bf16.
fn attention_bf16<D: Device>(dev: &D, label: &str, dims: &[AttnDims]) {
    assert_eq!(dev.work_dtype(), Dtype::Bf16, "{label}");
    for &d in dims {
        let ins = attention_inputs(&d).map(|x| {
            x.into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect::<Vec<_>>()
        });
        // Against the f32 twin on the same (bf16) inputs the tensor-core kernels differ by
        // bf16 roundings, not f32 ones: P (fwd: P V; bwd: dv) and dS (dq, dk) are rounded to
        // bf16 as mma inputs (2^-9 relative per term), and every output once more when stored
        // (2^-9 of itself). out is a convex combination of v: <= 2^-9 + 2^-9 of max|v| = 1, so
        // 1e-2 of max |want|. lse is summed from the unrounded f32 p: f32 rounding only, 1e-5
        // as in f32. The gradients are sums over up to T keys (dq) or T NH/NKV rows (dk, dv)
        // of terms rounded by 2^-9 whose signs vary, with dS = P (dP - D) cancelling: 1.5e-2.
        // Measured with these kernels on the emulator (both rows per block, HS 64 and 128)
        // at T 150 and at B 1, T 1000, NH 4, NKV 2 (128 rows): out <= 2.7e-3, lse <= 2.4e-7,
        // dq, dk, dv <= 4.4e-3, no growth with T. A wrong index or mask is off by O(1e-1).
        let ins = [&ins[0][..], &ins[1], &ins[2], &ins[3]];
        let tols = [1e-2, 1e-5, 1.5e-2, 1.5e-2, 1.5e-2];
        attention_compare(dev, label, "attention bf16", d, ins, tols);
    }
}

/// Causal GQA attention, forward then backward: out, lse, dq, dk, dv.
fn attention<D: Device>(dev: &D, label: &str, s: &Sizes) {
    for &d in s.attention {
        let [q, k, v, dout] = attention_inputs(&d);
        // Each score is a dot of HS terms, each output a softmax-weighted sum over up to T keys
        // (online softmax over key tiles, exp2f within 2 ulp); the backward sums over up to T
        // keys (dq) and T * NH/NKV query rows (dk, dv), with ds = p (dp - D) cancelling. f32
        // sums of n terms in another order differ by ~2^-24 sqrt(n) relative to their scale
        // (1.4e-6 for n = 2048); 1e-4 leaves ~50x for the exponentials and tile rescales.
        // lse = m + ln(l): a few ulp of a value ~ln(T): 1e-5. Measured with these kernels on
        // the emulator at the GPU sizes: <= 1.4e-6 (out), 2.5e-7 (lse), 2.5e-6 (dk, HS 128).
        let tols = [1e-4, 1e-5, 1e-4, 1e-4, 1e-4];
        attention_compare(dev, label, "attention", d, [&q[..], &k, &v, &dout], tols);
    }
}

// ---- rmsnorm

/// rmsnorm forward (out, rstd) and backward (dx, and dw accumulated onto a random start).
fn rmsnorm<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, [n, c]: [usize; 2], ins: [&[f32]; 5]) -> Vec<Vec<f32>> {
        let [x, w, dout, dw0, dx0] = ins.map(|x| up(e, x));
        let (mut out, mut rstd) = (nans(e, n * c), nans(e, n));
        let eps = 1e-5;
        let (xv, wv) = (View::all(&x), View::all(&w));
        e.rmsnorm_fwd(
            ViewMut::all(&mut out),
            ViewMut::all(&mut rstd),
            xv,
            wv,
            n,
            c,
            eps,
        )
        .unwrap();
        let (mut dx, mut dw) = (nans(e, n * c), dw0);
        e.rmsnorm_bwd(
            ViewMut::all(&mut dx),
            ViewMut::all(&mut dw),
            View::all(&dout),
            xv,
            wv,
            View::all(&rstd),
            n,
            c,
            false,
        )
        .unwrap();
        // again, adding into dx0 (the residual stream's gradient); its dw is not kept
        let (mut dx_acc, mut dw_acc) = (dx0, up(e, ins[3]));
        e.rmsnorm_bwd(
            ViewMut::all(&mut dx_acc),
            ViewMut::all(&mut dw_acc),
            View::all(&dout),
            xv,
            wv,
            View::all(&rstd),
            n,
            c,
            true,
        )
        .unwrap();
        [&out, &rstd, &dx, &dw, &dx_acc]
            .map(|x| down(e, x))
            .to_vec()
    }
    let [n, c] = s.rmsnorm;
    let mut r = rng(0x4e5);
    // rows of different scales (rstd from ~0.1 to ~10)
    let mut x = uniform(&mut r, n * c, -2.0, 2.0);
    for row in x.chunks_mut(c) {
        let f = 10f32.powf(r.random_range(-1.0..1.0));
        row.iter_mut().for_each(|v| *v *= f);
    }
    let w = uniform(&mut r, c, 0.5, 1.5);
    let dout = uniform(&mut r, n * c, -1.0, 1.0);
    let dw0 = uniform(&mut r, c, -1.0, 1.0);
    let dx0 = uniform(&mut r, n * c, -1.0, 1.0);
    let ins = [&x[..], &w, &dout, &dw0, &dx0];
    let (want, tc) = timed(|| run(&CpuDevice::new(), s.rmsnorm, ins));
    let (got, td) = timed(|| run(dev, s.rmsnorm, ins));
    let what = format!("rmsnorm (N {n}, C {c})");
    report(label, &what, tc, td);
    // out, rstd: a sum of C squares (positive terms: relative error <= log2(C) 2^-24 ~ 7e-7 for
    // a tree), then rsqrt and two products: 1e-5. dx: rstd w dout minus x rstd^3 mean(w dout x),
    // the mean of C terms of random sign (absolute error ~2^-24 of the terms' scale): 1e-5. dw:
    // a sum over N = 4096 rows in another order (~2^-24 sqrt(N) = 4e-6 relative): 2e-5.
    // Measured on the emulator at the GPU sizes: <= 2.7e-7 (out, rstd, dx), 1.8e-6 (dw).
    // dx (+=): dx0 added once in f32 to the same dx: as dx.
    let names = ["out", "rstd", "dx", "dw", "dx (+=)"];
    let tols = [1e-5, 1e-5, 1e-5, 2e-5, 1e-5];
    for ((g, w), (name, tol)) in got.iter().zip(&want).zip(names.iter().zip(tols)) {
        check(label, &format!("{what} {name}"), g, w, tol);
    }
}

// ---- cross-entropy

/// cross_entropy forward (losses) and backward (dlogits) over whole rows (one chunk of all V,
/// as training runs them) and over chunks of about V/8, every 5th row masked out.
fn cross_entropy<D: Device>(dev: &D, label: &str, s: &Sizes) {
    let [n, v] = s.cross_entropy;
    let mut r = rng(0xce);
    let logits = uniform(&mut r, n * v, -6.0, 6.0);
    let targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
    let mask: Vec<f32> = (0..n).map(|i| f32::from(u8::from(i % 5 != 0))).collect();
    let cpu = CpuDevice::new();
    let (want, tc) = timed(|| cross_entropy_chunked(&cpu, [n, v, v], &logits, &targets, &mask));
    let (got, td) = timed(|| cross_entropy_chunked(dev, [n, v, v], &logits, &targets, &mask));
    let what = format!("cross_entropy (N {n}, V {v})");
    report(label, &what, tc, td);
    // losses: logsumexp of V positive terms summed in another order (relative error of the
    // sum ~2^-24 log2(V), an absolute error of that size on a loss ~ln V + 6 ~ 16): 1e-5.
    // dlogits: softmax (exp within a few ulp, times the sum's reciprocal) minus the one-hot,
    // times the scale: a few ulp of the row's scale: 1e-5. Measured on the emulator at the GPU
    // sizes: 1e-7 (losses), 7e-11 (dlogits).
    check(label, &format!("{what} losses"), &got[0], &want[0], 1e-5);
    check(label, &format!("{what} dlogits"), &got[1], &want[1], 1e-5);

    // the same over vocabulary chunks of about V/8 (a short last one), against the whole
    // rows on the CPU: the chunk merges add a few ulp to the sum, same bounds
    let vc = v.div_ceil(8) + 3;
    let (got, td) = timed(|| cross_entropy_chunked(dev, [n, v, vc], &logits, &targets, &mask));
    let what = format!("cross_entropy_chunk (N {n}, V {v}, VC {vc})");
    report(label, &what, tc, td);
    check(label, &format!("{what} losses"), &got[0], &want[0], 1e-5);
    check(label, &format!("{what} dlogits"), &got[1], &want[1], 1e-5);
}

/// [losses, dlogits [N,V]] of cross_entropy_chunk_fwd over every chunk of VC columns, then
/// each chunk's cross_entropy_chunk_bwd (as the model runs them), every 5th row masked out.
fn cross_entropy_chunked<E: Device>(
    e: &E,
    [n, v, vc]: [usize; 3],
    logits: &[f32],
    targets: &[u32],
    mask: &[f32],
) -> Vec<Vec<f32>> {
    let chunk = |v0: usize, w: usize| -> Vec<f32> {
        logits
            .chunks(v)
            .flat_map(|r| r[v0..v0 + w].to_vec())
            .collect()
    };
    let (mask_d, targets) = (up(e, mask), e.upload_ids(targets).unwrap());
    let mut losses = nans(e, n);
    let mut state = nans(e, 3 * n);
    for v0 in (0..v).step_by(vc) {
        let w = vc.min(v - v0);
        let x = up(e, &chunk(v0, w));
        e.cross_entropy_chunk_fwd(
            ViewMut::all(&mut losses),
            ViewMut::all(&mut state),
            View::all(&x),
            &targets,
            View::all(&mask_d),
            n,
            w,
            v,
            v0,
        )
        .unwrap();
    }
    let scale = 1.0 / (n - n.div_ceil(5)) as f32;
    let mut dlogits = vec![f32::NAN; n * v];
    for v0 in (0..v).step_by(vc) {
        let w = vc.min(v - v0);
        let mut d = up(e, &chunk(v0, w));
        e.cross_entropy_chunk_bwd(
            ViewMut::all(&mut d),
            View::all(&state),
            &targets,
            View::all(&mask_d),
            n,
            w,
            v,
            v0,
            scale,
        )
        .unwrap();
        for (row, part) in down(e, &d).chunks(w).enumerate() {
            dlogits[row * v + v0..row * v + v0 + w].copy_from_slice(part);
        }
    }
    vec![down(e, &losses), dlogits]
}

// ---- matmul

/// matmul for every (ta, tb) with beta 0 (onto NaN: c's contents must be ignored), and the
/// weight-gradient form (ta) accumulating onto c with alpha 0.5, beta 1.
fn matmul<D: Device>(dev: &D, label: &str, s: &Sizes) {
    #[allow(clippy::too_many_arguments)]
    fn run<E: Device>(
        e: &E,
        [m, n, k]: [usize; 3],
        a: &[f32],
        b: &[f32],
        c0: Option<&[f32]>,
        (ta, tb): (bool, bool),
        alpha: f32,
        beta: f32,
    ) -> Vec<f32> {
        let (a, b) = (up(e, a), up(e, b));
        let mut c = match c0 {
            Some(c0) => up(e, c0),
            None => nans(e, m * n),
        };
        let (av, bv) = (View::all(&a), View::all(&b));
        e.matmul(ViewMut::all(&mut c), av, bv, m, n, k, ta, tb, alpha, beta)
            .unwrap();
        down(e, &c)
    }
    let [m, n, k] = s.matmul;
    let mut r = rng(0x3a7);
    let a = uniform(&mut r, m * k, -1.0, 1.0);
    let b = uniform(&mut r, k * n, -1.0, 1.0);
    let c0 = uniform(&mut r, m * n, -1.0, 1.0);
    let cases = [
        ((false, false), 1.0, 0.0, None),
        ((false, true), 1.0, 0.0, None),
        ((true, false), 1.0, 0.0, None),
        ((true, true), 1.0, 0.0, None),
        ((true, false), 0.5, 1.0, Some(&c0[..])),
    ];
    for (t, alpha, beta, c0) in cases {
        let (want, tc) = timed(|| run(&CpuDevice::new(), s.matmul, &a, &b, c0, t, alpha, beta));
        let (got, td) = timed(|| run(dev, s.matmul, &a, &b, c0, t, alpha, beta));
        let what = format!(
            "matmul (M {m}, N {n}, K {k}, ta {}, tb {}, alpha {alpha}, beta {beta})",
            t.0, t.1
        );
        report(label, &what, tc, td);
        // Dots of K = 512 products of (-1, 1) values (max |c| ~ 4 sqrt(K)/3 ~ 30) summed in
        // other orders (blocked CPU GEMM vs cuBLASLt tiles, maybe split-K): the worst case
        // K 2^-24 sum|a b| ~ 1.5e-4 of max |c|, the typical ~2^-24 sqrt(K) ~ 1e-6. 1e-4; a wrong
        // transpose or leading dimension is off by O(1).
        check(label, &what, &got, &want, 1e-4);
    }
    // matmul_add (cuBLASLt's C apart from D): d starts as NaN (its contents must be ignored),
    // x is the addend and must come through unchanged; x one element past its buffer's start
    // once (C less aligned than D: another cuBLASLt plan)
    let cases = [
        (false, false, 0),
        (false, true, 0),
        (true, false, 0),
        (true, true, 0),
    ];
    for (ta, tb, x_off) in cases.into_iter().chain([(false, true, 1)]) {
        let t = (ta, tb);
        let (want, tc) = timed(|| add(&CpuDevice::new(), s.matmul, &a, &b, &c0, t, x_off));
        let (got, td) = timed(|| add(dev, s.matmul, &a, &b, &c0, t, x_off));
        let what = format!("matmul_add (M {m}, N {n}, K {k}, ta {ta}, tb {tb}, x at +{x_off})");
        report(label, &what, tc, td);
        // as matmul's; the added x (|x| < 1) changes nothing of that bound
        check(label, &what, &got, &want, 1e-4);
    }
}

/// `matmul_add` on `e`: d (NaN) = op(a) op(b) + x, x at element `x_off` of its buffer;
/// returns d, after checking that x is unchanged.
fn add<E: Device>(
    e: &E,
    [m, n, k]: [usize; 3],
    a: &[f32],
    b: &[f32],
    x: &[f32],
    (ta, tb): (bool, bool),
    x_off: usize,
) -> Vec<f32> {
    let padded: Vec<f32> = [vec![7.0; x_off], x.to_vec()].concat();
    let (a, b, xb) = (up(e, a), up(e, b), up(e, &padded));
    let mut d = nans(e, m * n);
    let (av, bv, xv) = (View::all(&a), View::all(&b), View::range(&xb, x_off, m * n));
    e.matmul_add(ViewMut::all(&mut d), xv, av, bv, m, n, k, ta, tb)
        .unwrap();
    assert_eq!(down(e, &xb), padded, "matmul_add wrote its addend");
    down(e, &d)
}

// ---- swiglu

/// swiglu forward and backward.
fn swiglu<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, [gate, upv, dout]: [&[f32]; 3]) -> Vec<Vec<f32>> {
        let n = gate.len();
        let (gu, dout) = (up(e, &[gate, upv].concat()), up(e, dout));
        let mut out = nans(e, n);
        e.swiglu_fwd(ViewMut::all(&mut out), View::all(&gu))
            .unwrap();
        let mut dgu = nans(e, 2 * n);
        e.swiglu_bwd(ViewMut::all(&mut dgu), View::all(&dout), View::all(&gu))
            .unwrap();
        let dgu = down(e, &dgu);
        vec![down(e, &out), dgu[..n].to_vec(), dgu[n..].to_vec()]
    }
    let n = s.swiglu;
    let mut r = rng(0x5e1);
    // gates into silu's saturated tails (|g| up to 12) as well as its bend
    let gate = uniform(&mut r, n, -12.0, 12.0);
    let upv = uniform(&mut r, n, -2.0, 2.0);
    let dout = uniform(&mut r, n, -1.0, 1.0);
    let ins = [&gate[..], &upv, &dout];
    let (want, tc) = timed(|| run(&CpuDevice::new(), ins));
    let (got, td) = timed(|| run(dev, ins));
    let what = format!("swiglu ({n})");
    report(label, &what, tc, td);
    // elementwise: expf (2 ulp on the GPU, the twin's own exp on the CPU), a fast division (2
    // ulp) and a few products: ~6 ulp of each element, below 1e-6 of the largest: 1e-5
    // (dgate cancels in 1 + g (1 - s) near g = -1.28: measured 6e-7 on the emulator at the GPU
    // size, 8e-8 for out and dup).
    let names = ["out", "dgate", "dup"];
    for ((g, w), name) in got.iter().zip(&want).zip(names) {
        check(label, &format!("{what} {name}"), g, w, 1e-5);
    }
}

// ---- rope

/// rope forward and backward (in place) at the start of a sequence and at long-context
/// positions.
fn rope<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, [b, t, h, hs]: [usize; 4], x: &[f32], at: (usize, f32)) -> Vec<f32> {
        let mut x = up(e, x);
        let (pos0, theta) = at;
        e.rope_fwd(ViewMut::all(&mut x), b, t, h, hs, pos0, None, theta)
            .unwrap();
        let fwd = down(e, &x);
        e.rope_bwd(ViewMut::all(&mut x), b, t, h, hs, pos0, theta)
            .unwrap();
        [fwd, down(e, &x)].concat()
    }
    let [b, t, h, hs] = s.rope;
    let mut r = rng(0x20e);
    let x = uniform(&mut r, b * t * h * hs, -2.0, 2.0);
    for &at in s.rope_at {
        let (want, tc) = timed(|| run(&CpuDevice::new(), s.rope, &x, at));
        let (got, td) = timed(|| run(dev, s.rope, &x, at));
        let what = format!(
            "rope fwd+bwd (B {b}, T {t}, H {h}, HS {hs}, pos0 {}, theta {})",
            at.0, at.1
        );
        report(label, &what, tc, td);
        // Both form the angle p * inv_freq in f32 the same way and take cos/sin in f64 of it;
        // inv_freq = 1 / theta^e (pow in f64 on the GPU, powf on the CPU) can differ by an ulp
        // in rare cases, moving the angle by up to p 2^-24 rad (p = pos0 + T): 2.5e-7 (pos0 + T)
        // absolute on |x| < 2 (tests/kernels_emu_a.rs), i.e. 1.25e-7 (pos0 + T) of max |x|;
        // otherwise the two rotations agree to an ulp or two (FMA): at least 1e-6. (On the
        // emulator at the GPU sizes: identical.)
        let tol = (1.25e-7 * (at.0 + t) as f64).max(1e-6);
        check(label, &what, &got, &want, tol);
    }
    // the backward undoes the forward: x back within rounding
    let (got, _) = timed(|| run(dev, s.rope, &x, s.rope_at[0]));
    let back = &got[x.len()..];
    check(label, "rope bwd(fwd(x)) vs x", back, &x, 1e-6);
}

/// qkv_rope forward (q out of the fused projection's rows, k and v into caches holding earlier
/// values, q and k rotated) and backward (the rows back from dq and the caches' dk, dv), at
/// rope's sizes with NKV = NH / 4, the new rows at positions pos0.. of a cache 3 positions
/// longer.
fn qkv_rope<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(
        e: &E,
        d: CacheDims,
        x: &[f32],
        olds: &[Vec<f32>; 5],
        theta: f32,
    ) -> Vec<f32> {
        let n = d.b * d.tq;
        let qd = d.nh * d.hs;
        let qkv = up(e, x);
        let [kc0, vc0, dq, dk, dv] = olds;
        let (mut q, mut k, mut v) = (nans(e, n * qd), up(e, kc0), up(e, vc0));
        let (qm, km, vm) = (
            ViewMut::all(&mut q),
            ViewMut::all(&mut k),
            ViewMut::all(&mut v),
        );
        e.qkv_rope_fwd(qm, km, vm, View::all(&qkv), None, d, theta)
            .unwrap();
        let [dq, dk, dv] = [dq, dk, dv].map(|g| up(e, g));
        let mut dqkv = nans(e, x.len());
        let (dq, dk, dv) = (View::all(&dq), View::all(&dk), View::all(&dv));
        e.qkv_rope_bwd(ViewMut::all(&mut dqkv), dq, dk, dv, d, theta)
            .unwrap();
        [&q, &k, &v, &dqkv].map(|x| down(e, x)).concat()
    }
    let [b, t, nh, hs] = s.rope;
    let nkv = (nh / 4).max(1);
    let (qd, kvd) = (nh * hs, nkv * hs);
    let len = b * t * (qd + 2 * kvd);
    let mut r = rng(0x9c7);
    let x = uniform(&mut r, len, -2.0, 2.0);
    for &(pos0, theta) in s.rope_at {
        let d = CacheDims {
            b,
            tq: t,
            tmax: pos0 + t + 3,
            nh,
            nkv,
            hs,
            pos0,
        };
        let cache = b * d.tmax * kvd;
        let olds = [cache, cache, b * t * qd, cache, cache].map(|n| uniform(&mut r, n, -1.0, 1.0));
        let (want, tc) = timed(|| run(&CpuDevice::new(), d, &x, &olds, theta));
        let (got, td) = timed(|| run(dev, d, &x, &olds, theta));
        let what = format!(
            "qkv_rope fwd+bwd (B {b}, TQ {t}, TMAX {}, NH {nh}, NKV {nkv}, HS {hs}, pos0 {pos0}, \
             theta {theta})",
            d.tmax
        );
        report(label, &what, tc, td);
        // rope's rotation and tolerance (above); the copies and kept positions exact
        let tol = (1.25e-7 * (pos0 + t) as f64).max(1e-6);
        check(label, &what, &got, &want, tol);
    }
}

// ---- embedding

/// embedding forward (a gather) and backward (a scatter-add with repeated ids, onto a random
/// start).
fn embedding<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(
        e: &E,
        [_, c, n]: [usize; 3],
        ids: &[u32],
        wte: &[f32],
        dout: &[f32],
        dwte0: &[f32],
    ) -> Vec<Vec<f32>> {
        let ids = e.upload_ids(ids).unwrap();
        let (wte, dout) = (up(e, wte), up(e, dout));
        let mut out = nans(e, n * c);
        e.embedding_fwd(ViewMut::all(&mut out), &ids, View::all(&wte), n, c)
            .unwrap();
        let mut dwte = up(e, dwte0);
        e.embedding_bwd(ViewMut::all(&mut dwte), &ids, View::all(&dout), n, c)
            .unwrap();
        vec![down(e, &out), down(e, &dwte)]
    }
    let [v, c, n] = s.embedding;
    let mut r = rng(0xe3b);
    // half the ids from 8 hot rows (each hit ~N/16 times: accumulation order matters), the
    // rest anywhere; the first and last rows of the table among them
    let hot: Vec<u32> = (0..8).map(|i| (i * 4001 % v) as u32).collect();
    let mut ids: Vec<u32> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                hot[r.random_range(0..hot.len())]
            } else {
                r.random_range(0..v as u32)
            }
        })
        .collect();
    ids[1] = v as u32 - 1;
    ids[3] = 0;
    let wte = nonzero(&mut r, v * c, 1.0);
    let dout = uniform(&mut r, n * c, -1.0, 1.0);
    let dwte0 = uniform(&mut r, v * c, -1.0, 1.0);
    let (want, tc) = timed(|| run(&CpuDevice::new(), s.embedding, &ids, &wte, &dout, &dwte0));
    let (got, td) = timed(|| run(dev, s.embedding, &ids, &wte, &dout, &dwte0));
    let what = format!("embedding (V {v}, C {c}, N {n})");
    report(label, &what, tc, td);
    // the forward copies rows: identical
    check(label, &format!("{what} fwd"), &got[0], &want[0], 0.0);
    // the backward adds up to ~N/16 rows per hot id in another (atomic) order: ~2^-24
    // sqrt(N/16) relative to the row's scale: 1e-5 (measured 6.7e-7 on the emulator at the
    // GPU size)
    check(label, &format!("{what} bwd dwte"), &got[1], &want[1], 1e-5);
}

// ---- adamw

/// One AdamW step (weight decay, bias correction, a gradient scale) in place on p, m, v.
fn adamw<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, ins: [&[f32]; 4], hp: &AdamwStep) -> Vec<Vec<f32>> {
        let [mut p, g, mut m, mut v] = ins.map(|x| up(e, x));
        e.adamw(
            ViewMut::all(&mut p),
            None,
            View::all(&g),
            ViewMut::all(&mut m),
            ViewMut::all(&mut v),
            hp,
        )
        .unwrap();
        [&p, &m, &v].map(|x| down(e, x)).to_vec()
    }
    let n = s.adamw;
    let mut r = rng(0xada);
    let p0 = uniform(&mut r, n, -1.0, 1.0);
    let g = nonzero(&mut r, n, 1e-2);
    let m0 = uniform(&mut r, n, -1e-3, 1e-3);
    let v0 = uniform(&mut r, n, 1e-8, 1e-5);
    let hp = AdamwStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 7,
        grad_scale: 0.5,
    };
    let ins = [&p0[..], &g, &m0, &v0];
    let (want, tc) = timed(|| run(&CpuDevice::new(), ins, &hp));
    let (got, td) = timed(|| run(dev, ins, &hp));
    let what = format!("adamw ({n})");
    report(label, &what, tc, td);
    // elementwise, a few roundings each (sqrt and division correctly rounded on both; FMA
    // contraction on the GPU moves a result by an ulp): p within ~1 ulp of |p| < 1, m and v
    // within a few ulp: 1e-6 of each output's largest value. The update p - p0 (~lr) as a
    // whole: the rare p rounded the other way (update off by ~1e-10) is ~ulp(p) = 6e-8 off:
    // rel L2 1e-4; a wrong term (decay, bias correction) is off by > 1e-2. (On the emulator at
    // the GPU size: identical.)
    let names = ["p", "m", "v"];
    for ((gv, wv), name) in got.iter().zip(&want).zip(names) {
        check(label, &format!("{what} {name}"), gv, wv, 1e-6);
    }
    let du = |x: &[f32]| -> Vec<f32> { x.iter().zip(&p0).map(|(a, b)| a - b).collect() };
    let u = rel_l2(&du(&got[0]), &du(&want[0]));
    eprintln!("{label} {what} update: rel L2 err {u:.2e} (tol 1e-4)");
    assert!(u <= 1e-4, "{label} {what}: update rel L2 err {u:.2e}");
}

// ---- sum_squares

/// sum_squares of a whole buffer (16-byte aligned) and of a view at an odd offset.
fn sum_squares<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, x: &[f32]) -> [f64; 2] {
        let x = up(e, x);
        let all = e.sum_squares(View::all(&x)).unwrap();
        let off = e.sum_squares(View::range(&x, 3, x.len() - 5)).unwrap();
        [all, off]
    }
    let n = s.sum_squares;
    let mut r = rng(0x55);
    let x = uniform(&mut r, n, -2.0, 2.0);
    let (want, tc) = timed(|| run(&CpuDevice::new(), &x));
    let (got, td) = timed(|| run(dev, &x));
    let what = format!("sum_squares ({n})");
    report(label, &what, tc, td);
    // f64 sums in another order (~1e-15), after each 16-byte pack's 4 squares summed in f32
    // (positive terms: relative error < 8 * 2^-24 < 5e-7): 1e-6 (measured 5e-11 on the
    // emulator at the GPU size)
    for ((g, w), name) in got.iter().zip(want).zip(["aligned", "offset 3"]) {
        assert!(g.is_finite(), "{label} {what} {name}: {g}");
        let e = (g - w).abs() / w;
        eprintln!("{label} {what} {name}: rel err {e:.2e} (tol 1e-6)");
        assert!(e <= 1e-6, "{label} {what} {name}: {g} vs {w}");
    }
}

// ---- decode attention

/// Start positions of the B rows (left padding): 0, spread values, one inside the queries'
/// window (its earlier queries see no key: output 0) and the last query's position (one key).
fn starts(d: &CacheDims) -> Vec<u32> {
    let last = d.pos0 + d.tq - 1;
    (0..d.b)
        .map(|i| {
            (match i {
                0 => 0,
                _ if i == d.b - 1 => last,
                _ if i == d.b - 2 => d.pos0 + d.tq / 2,
                _ => d.pos0 * i / d.b + i % 3,
            }) as u32
        })
        .collect()
}

/// Attention of TQ queries over a KV cache, rows with different starts.
fn decode_attention<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, d: CacheDims, ins: [&[f32]; 3], starts: &[u32]) -> Vec<f32> {
        let [q, k, v] = ins.map(|x| up(e, x));
        let starts = e.upload_ids(starts).unwrap();
        let mut out = nans(e, q.len());
        let (qv, kv, vv) = (View::all(&q), View::all(&k), View::all(&v));
        e.decode_attention_fwd(ViewMut::all(&mut out), qv, kv, vv, &starts, None, d)
            .unwrap();
        down(e, &out)
    }
    for &d in s.decode_attention {
        let CacheDims {
            b,
            tq,
            tmax,
            nh,
            nkv,
            hs,
            pos0,
        } = d;
        let mut r = rng(0xdec + tq as u64);
        let q = uniform(&mut r, b * tq * nh * hs, -2.0, 2.0);
        let k = uniform(&mut r, b * tmax * nkv * hs, -2.0, 2.0);
        let v = uniform(&mut r, b * tmax * nkv * hs, -1.0, 1.0);
        let st = starts(&d);
        let ins = [&q[..], &k, &v];
        let (want, tc) = timed(|| run(&CpuDevice::new(), d, ins, &st));
        let (got, td) = timed(|| run(dev, d, ins, &st));
        let what = format!(
            "decode_attention (B {b}, TQ {tq}, TMAX {tmax}, NH {nh}, NKV {nkv}, HS {hs}, pos0 \
             {pos0}, starts {st:?})"
        );
        report(label, &what, tc, td);
        // as attention's out: softmax-weighted sums over up to pos0 + TQ ~ 1024 keys, in key
        // tiles and (TQ 1) cache splits merged by the combine kernel: 1e-4 (measured <= 7.8e-7
        // on the emulator at the GPU sizes)
        check(label, &what, &got, &want, 1e-4);
    }
}

/// The new keys and values of a step into the KV cache (the decode attention cases' shapes),
/// caches of random values: a copy, exact.
fn kv_append<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, d: CacheDims, ins: [&[f32]; 4]) -> Vec<f32> {
        let [kc, vc, k, v] = ins.map(|x| up(e, x));
        let (mut kc, mut vc) = (kc, vc);
        e.kv_append_fwd(
            ViewMut::all(&mut kc),
            ViewMut::all(&mut vc),
            View::all(&k),
            View::all(&v),
            None,
            d,
        )
        .unwrap();
        let mut out = down(e, &kc);
        out.extend(down(e, &vc));
        out
    }
    for &d in s.decode_attention {
        let CacheDims {
            b,
            tq,
            tmax,
            nkv,
            hs,
            pos0,
            ..
        } = d;
        let mut r = rng(0x4a + tq as u64);
        let kc = uniform(&mut r, b * tmax * nkv * hs, -2.0, 2.0);
        let vc = uniform(&mut r, b * tmax * nkv * hs, -2.0, 2.0);
        let k = uniform(&mut r, b * tq * nkv * hs, -2.0, 2.0);
        let v = uniform(&mut r, b * tq * nkv * hs, -2.0, 2.0);
        let ins = [&kc[..], &vc, &k, &v];
        let (want, tc) = timed(|| run(&CpuDevice::new(), d, ins));
        let (got, td) = timed(|| run(dev, d, ins));
        let what = format!(
            "kv_append (B {b}, TQ {tq}, TMAX {tmax}, NKV {nkv}, HS {hs}, pos0 {pos0}): kcache, \
             vcache"
        );
        report(label, &what, tc, td);
        // a copy of f32 values: exact
        check(label, &what, &got, &want, 0.0);
    }
}

// ---- sample

/// Sampling: greedy (ties planted: the lowest id wins), and temperature with top-k / top-p.
fn sample<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(
        e: &E,
        [n, v]: [usize; 2],
        logits: &[f32],
        u: &[f32],
        spec: &SampleSpec,
    ) -> (Vec<u32>, Vec<f32>) {
        let (logits, u) = (up(e, logits), up(e, u));
        let mut ids = e.upload_ids(&vec![u32::MAX; n]).unwrap();
        let mut logp = nans(e, n);
        let (lv, uv) = (View::all(&logits), View::all(&u));
        e.sample_fwd(&mut ids, ViewMut::all(&mut logp), lv, uv, n, v, spec)
            .unwrap();
        (e.download_ids(&ids).unwrap(), down(e, &logp))
    }
    let [n, v] = s.sample;
    let mut r = rng(0x5a3);
    let mut logits = uniform(&mut r, n * v, -4.0, 4.0);
    // row 0: the largest logit at two ids (the lower one wins); row 1: all equal (id 0)
    let (hi, lo) = (v - 3, v / 3);
    logits[hi] = 5.0;
    logits[lo] = 5.0;
    logits[v..2 * v].fill(0.25);
    let u = uniform(&mut r, n, 0.0, 1.0);
    let specs = [
        (0.0, 0, 1.0),
        (1.0, 0, 1.0),
        (0.8, 50, 0.9),
        (1.2, 0, 0.5),
        (0.7, 7, 1.0),
    ];
    for (temperature, top_k, top_p) in specs {
        let spec = SampleSpec {
            temperature,
            top_k,
            top_p,
        };
        let ((want_ids, want_logp), tc) =
            timed(|| run(&CpuDevice::new(), s.sample, &logits, &u, &spec));
        let ((ids, logp), td) = timed(|| run(dev, s.sample, &logits, &u, &spec));
        let what = format!(
            "sample (N {n}, V {v}, temperature {temperature}, top_k {top_k}, top_p {top_p})"
        );
        report(label, &what, tc, td);
        // The kernel forms every probability bit for bit as the twin (its vexp, no fused
        // operations) and keeps the same set; only the f64 sums run in another order, which
        // flips a threshold only within ~1e-16 of it: the same ids, exactly (greedy: the
        // argmax, lowest id on ties). logp: ln p - ln(total) in f64, rounded to f32: equal but
        // for an ulp where the f64 values straddle a rounding point: 1e-6 of the largest.
        assert_eq!(ids, want_ids, "{label} {what}: ids");
        if temperature == 0.0 {
            assert_eq!(ids[0], lo as u32, "{label} {what}: the lowest id of a tie");
            assert_eq!(ids[1], 0, "{label} {what}: a row of equal logits");
            assert!(
                logp.iter().all(|&x| x == 0.0),
                "{label} {what}: greedy logp 0"
            );
        } else {
            check(label, &format!("{what} logp"), &logp, &want_logp, 1e-6);
        }
        eprintln!("{label} {what}: every id equal");
    }
}

// ---- softmax

/// softmax forward and backward over vocabulary-sized rows.
fn softmax<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, [n, v]: [usize; 2], x: &[f32], dout: &[f32]) -> Vec<Vec<f32>> {
        let (x, dout) = (up(e, x), up(e, dout));
        let mut out = nans(e, n * v);
        e.softmax_fwd(ViewMut::all(&mut out), View::all(&x), n, v)
            .unwrap();
        let mut dx = nans(e, n * v);
        e.softmax_bwd(
            ViewMut::all(&mut dx),
            View::all(&dout),
            View::all(&out),
            n,
            v,
        )
        .unwrap();
        vec![down(e, &out), down(e, &dx)]
    }
    let [n, v] = s.softmax;
    let mut r = rng(0x50f);
    let x = uniform(&mut r, n * v, -10.0, 10.0);
    let dout = uniform(&mut r, n * v, -1.0, 1.0);
    let (want, tc) = timed(|| run(&CpuDevice::new(), s.softmax, &x, &dout));
    let (got, td) = timed(|| run(dev, s.softmax, &x, &dout));
    let what = format!("softmax (N {n}, V {v})");
    report(label, &what, tc, td);
    // out: the twin's exp bit for bit, over a sum of V positive terms in another order
    // (~2^-24 log2(V) relative): 1e-5. dx: out (dout - sum(dout out)), the sum of V terms of
    // random sign, its error ~2^-24 of the terms' scale, tiny next to dout ~1: 1e-5 (measured
    // <= 3.6e-7 on the emulator at the GPU size).
    check(label, &format!("{what} out"), &got[0], &want[0], 1e-5);
    check(label, &format!("{what} dx"), &got[1], &want[1], 1e-5);
}

// ---- residual

/// residual forward (out = a + b) and backward (da += dout).
fn residual<D: Device>(dev: &D, label: &str, s: &Sizes) {
    fn run<E: Device>(e: &E, ins: [&[f32]; 4]) -> Vec<Vec<f32>> {
        let [a, b, dout, mut da] = ins.map(|x| up(e, x));
        let mut out = nans(e, a.len());
        e.residual_fwd(ViewMut::all(&mut out), View::all(&a), View::all(&b))
            .unwrap();
        e.residual_bwd(ViewMut::all(&mut da), View::all(&dout))
            .unwrap();
        vec![down(e, &out), down(e, &da)]
    }
    let n = s.residual;
    let mut r = rng(0x2e5);
    let a = uniform(&mut r, n, -4.0, 4.0);
    let b = uniform(&mut r, n, -4.0, 4.0);
    let dout = uniform(&mut r, n, -1.0, 1.0);
    let da0 = uniform(&mut r, n, -1.0, 1.0);
    let ins = [&a[..], &b, &dout, &da0];
    let (want, tc) = timed(|| run(&CpuDevice::new(), ins));
    let (got, td) = timed(|| run(dev, ins));
    let what = format!("residual ({n})");
    report(label, &what, tc, td);
    // one IEEE addition per element on both: identical
    check(label, &format!("{what} fwd"), &got[0], &want[0], 0.0);
    check(label, &format!("{what} bwd"), &got[1], &want[1], 0.0);
}

// ---- tests

/// Every op check on `dev` at sizes `s`.
fn all_ops<D: Device>(dev: &D, label: &str, s: &Sizes) {
    attention(dev, label, s);
    rmsnorm(dev, label, s);
    cross_entropy(dev, label, s);
    matmul(dev, label, s);
    swiglu(dev, label, s);
    rope(dev, label, s);
    qkv_rope(dev, label, s);
    embedding(dev, label, s);
    adamw(dev, label, s);
    sum_squares(dev, label, s);
    decode_attention(dev, label, s);
    kv_append(dev, label, s);
    sample(dev, label, s);
    softmax(dev, label, s);
    residual(dev, label, s);
}

#[test]
fn cuda_ops_run_on_emu_small() {
    for (mode, seed) in [(EmuMode::Forward, 0), (EmuMode::Reversed, 0x0c0d)] {
        let t0 = Instant::now();
        let label = format!("emu {mode:?}");
        all_ops(&EmuDevice::new(mode, seed), &label, &SMALL);
        eprintln!("{label}: every op ({:.2?})", t0.elapsed());
    }
}

/// `op` on the GPU at the GPU sizes (skipped without a GPU), then a stream synchronisation
/// (a fault of an asynchronous launch surfaces there).
fn on_gpu(op: fn(&CudaDevice, &str, &Sizes)) {
    if let Some(dev) = gpu(Dtype::F32) {
        op(&dev, "cuda", &GPU);
        dev.synchronize().unwrap();
    }
}

#[test]
fn cuda_attention() {
    on_gpu(attention);
}

/// The bf16 attention's GPU sizes: T 2048 with NH 32 at HS 128 (the forward's 128-row kernel:
/// 16 x 32 blocks fill 132 SMs twice) and HS 64 (64 rows, as the launcher takes at HS 64), and
/// GPU's T 512 case at HS 128 (64 rows: 4 x 16 x 2 blocks would not fill the SMs twice).
const GPU_BF16_ATTENTION: &[AttnDims] = &[
    AttnDims {
        b: 1,
        t: 2048,
        nh: 32,
        nkv: 8,
        hs: 128,
    },
    AttnDims {
        b: 1,
        t: 2048,
        nh: 32,
        nkv: 8,
        hs: 64,
    },
    AttnDims {
        b: 2,
        t: 512,
        nh: 16,
        nkv: 4,
        hs: 128,
    },
];

#[test]
fn cuda_attention_bf16() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        attention_bf16(&dev, "cuda", GPU_BF16_ATTENTION);
        dev.synchronize().unwrap();
    }
}

/// [`attention_bf16`] on the emulator, in both schedules: B 1, T 150, NH 2 at HS 128 and 64,
/// sized for 132 SMs (the forward takes 64 query rows per block) and for 1 SM (at HS 128 the
/// launcher then takes the 128-row kernel).
#[test]
fn attention_bf16_runs_on_emu() {
    let dims = [128, 64].map(|hs| AttnDims {
        b: 1,
        t: 150,
        nh: 2,
        nkv: 1,
        hs,
    });
    for (mode, seed) in [(EmuMode::Forward, 0), (EmuMode::Reversed, 0xbf16)] {
        for sms in [132, 1] {
            let dev = EmuDevice::new(mode, seed)
                .with_work_dtype(Dtype::Bf16)
                .unwrap()
                .with_sms(sms);
            attention_bf16(&dev, &format!("emu {mode:?} {sms} SMs"), &dims);
        }
    }
}

#[test]
fn cuda_rmsnorm() {
    on_gpu(rmsnorm);
}

#[test]
fn cuda_cross_entropy() {
    on_gpu(cross_entropy);
}

#[test]
fn cuda_matmul() {
    on_gpu(matmul);
}

#[test]
fn cuda_swiglu() {
    on_gpu(swiglu);
}

#[test]
fn cuda_rope() {
    on_gpu(rope);
}

#[test]
fn cuda_qkv_rope() {
    on_gpu(qkv_rope);
}

#[test]
fn cuda_embedding() {
    on_gpu(embedding);
}

#[test]
fn cuda_adamw() {
    on_gpu(adamw);
}

#[test]
fn cuda_sum_squares() {
    on_gpu(sum_squares);
}

#[test]
fn cuda_decode_attention() {
    on_gpu(decode_attention);
}

#[test]
fn cuda_kv_append() {
    on_gpu(kv_append);
}

#[test]
fn cuda_sample() {
    on_gpu(sample);
}

#[test]
fn cuda_softmax() {
    on_gpu(softmax);
}

#[test]
fn cuda_residual() {
    on_gpu(residual);
}

/// Every op check on the emulator at the GPU sizes: slow (minutes on 2 cores), run by hand
/// (`cargo test --release --test cuda_ops -- --ignored`) to measure how far the kernels' f32
/// results are from the twins' at those sizes, i.e. what the tolerances must hold on the GPU.
#[test]
#[ignore]
fn cuda_ops_run_on_emu_gpu_sizes() {
    let t0 = Instant::now();
    all_ops(&EmuDevice::new(EmuMode::Reversed, 0x0c0d), "emu", &GPU);
    eprintln!("emu at GPU sizes: every op ({:.2?})", t0.elapsed());
}
