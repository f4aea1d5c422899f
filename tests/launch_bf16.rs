//! The launchers of `nla_engine::device::gpu` instantiated over bf16, on the CPU emulator: for
//! every kernel family with a bf16 symbol, the bf16 launch against the f32 launch of the same
//! launcher on the same inputs (random, seeded, rounded to bf16 so that both dtypes hold the
//! same values), in both emulator schedules (`EmuMode::Forward`; `EmuMode::Reversed`, threads
//! reversed and blocks shuffled). This checks what the bf16 instantiation adds to a launcher:
//! the `_bf16` symbol, the argument dtypes of the kernel's header (T vs always f32) and the
//! geometry computed from `T::PACK`; the kernels themselves are checked against their CPU twins
//! in tests/kernels_emu_*.rs.
//!
//! Row and elementwise kernels with a 16-byte path run at a size where the bf16 launch takes it
//! (C or n a multiple of 8, buffers 16-byte aligned), where only f32 takes it (C = 12, a
//! multiple of 4 but not of 8) and where neither does (buffers one element off alignment).
//!
//! Tolerances (`check`: |bf16 - f32| <= rel |f32| + abs * max|f32|; a NaN or inf on either side
//! fails, and outputs start as NaN where the kernel overwrites them, so an unwritten element
//! fails too):
//! - [`ROUND`]: a bf16 output is the kernel's f32 result rounded once to nearest even, which
//!   moves it by at most half a bf16 ulp, 2^-8 of the value (8 significand bits). Where the two
//!   instantiations do the same f32 arithmetic in the same order (elementwise ops, gathers,
//!   rotations) this is the whole tolerance (and copies are exact);
//! - [`F32R`]: where an f32 sum runs in a different order in the two instantiations (each thread
//!   takes 8 bf16 instead of 4 f32 per 16-byte access, so the partial sums and the block tree
//!   differ; atomics add in scheduling order), the f32 results differ by a few f32 roundings of
//!   the sum: at most ~n 2^-24 relative for the n <= ~100 terms here, below 1e-5;
//! - [`ACC`]: the same as an absolute slack, relative to the output's largest magnitude, for
//!   outputs formed by cancellation (gradients such as a - b, softmax - onehot), whose f32 error
//!   is relative to the terms, not to the result.
//!
//! f32 outputs of bf16 kernels (rstd, lse, D, losses, logp, dw, dwte, the reward path) are
//! computed in f32 (or f64) from the same inputs, so they get the f32 terms only.
//! Run with `-- --nocapture` to see each check's worst error against its tolerance.

use std::marker::PhantomData;

use half::bf16;
use nla_engine::device::gpu::{self, EmuLaunch, EmuMode, In};
use nla_engine::device::{
    AdamwStep, Advantage, AttnDims, CacheDims, InjectMode, PoolMode, RewardSpec, RewardTransform,
    SampleSpec,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One bf16 rounding, relative to the value.
const ROUND: f32 = 1.0 / 256.0;
/// f32 accumulation-order slack, relative to the value.
const F32R: f32 = 1e-5;
/// f32 accumulation-order slack of cancelling outputs, relative to the output's largest value.
const ACC: f32 = 1e-5;

/// Row and elementwise cases: (C, element offset of every buffer). C = 40: the 16-byte path in
/// both dtypes; C = 12: f32 only; offset 1: neither (misaligned).
const CASES: [(usize, usize); 3] = [(40, 0), (12, 0), (40, 1)];

/// Runs `f` with an emulator launcher in each schedule, on a fresh generator of `seed`.
fn each_mode(seed: u64, mut f: impl FnMut(&EmuLaunch, &mut StdRng)) {
    for mode in [EmuMode::Forward, EmuMode::Reversed] {
        let l = EmuLaunch::new(mode, seed);
        f(&l, &mut StdRng::seed_from_u64(seed));
    }
}

fn bf(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// The largest magnitude of `x`.
fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| m.max(v.abs()))
}

/// `n` uniform values in [lo, hi), rounded to bf16; never all zero.
fn vals(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| bf(rng.random_range(lo..hi))).collect();
    assert!(n == 0 || v.iter().any(|&x| x != 0.0));
    v
}

/// `len` elements of T at element offset `off` of a 16-byte aligned allocation.
struct Buf<T> {
    raw: Vec<u128>,
    off: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> Buf<T> {
    fn new(vals: &[T], off: usize) -> Self {
        let bytes = (vals.len() + off) * size_of::<T>();
        let raw = vec![0u128; bytes.div_ceil(16).max(1)];
        let mut b = Buf {
            raw,
            off,
            len: vals.len(),
            _t: PhantomData,
        };
        b.m().copy_from_slice(vals);
        b
    }
    fn s(&self) -> &[T] {
        &bytemuck::cast_slice(&self.raw)[self.off..self.off + self.len]
    }
    fn m(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.raw)[self.off..self.off + self.len]
    }
}

/// The same bf16-representable values as a bf16 buffer (`b`, the bf16 launch's) and an f32 one
/// (`f`, the f32 launch's).
struct Pair {
    b: Buf<bf16>,
    f: Buf<f32>,
}

impl Pair {
    fn new(v: &[f32], off: usize) -> Pair {
        assert!(v.iter().all(|&x| x.is_nan() || bf(x) == x));
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        Pair {
            b: Buf::new(&b, off),
            f: Buf::new(v, off),
        }
    }
    /// An output the kernels overwrite: NaN until written.
    fn nan(n: usize, off: usize) -> Pair {
        Pair::new(&vec![f32::NAN; n], off)
    }
    /// The bf16 launch's values, widened.
    fn got(&self) -> Vec<f32> {
        self.b.s().iter().map(|x| x.to_f32()).collect()
    }
    fn want(&self) -> &[f32] {
        self.f.s()
    }
}

/// `got` (bf16 launch) against `want` (f32 launch): |got - want| <= rel |want| + abs * scale,
/// scale = max |want|; both finite; `want` not all zero. Prints the worst error / tolerance.
fn check(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    assert!(
        want.iter().any(|&x| x != 0.0),
        "{what}: the f32 result is all zeros"
    );
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (mut worst, mut max_err) = (0f32, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && w.is_finite(),
            "{what}[{i}]: bf16 {g} vs f32 {w}"
        );
        let (err, tol) = ((g - w).abs(), rel * w.abs() + abs * scale);
        assert!(
            err <= tol,
            "{what}[{i}]: bf16 {g} vs f32 {w}: error {err:e} > tolerance {tol:e}"
        );
        max_err = max_err.max(err);
        if tol > 0.0 {
            worst = worst.max(err / tol);
        }
    }
    if rel == 0.0 && abs == 0.0 {
        eprintln!("{what}: exact");
    } else {
        eprintln!("{what}: max error {max_err:.3e}, worst {worst:.3} of the tolerance");
    }
}

// ------------------------------------------------------------------------------------------

#[test]
fn residual_and_swiglu() {
    each_mode(1, |l, rng| {
        // 1037 = 129 packs of 8 + a tail of 5 (aligned: vector path and tail); 1000 at offset 1.
        // swiglu's up and dup start n in: its vector path runs at n = 64 only.
        for (n, off) in [(1037, 0), (64, 0), (1000, 1)] {
            let tag = format!("n={n} off={off}");
            let (a, b) = (
                Pair::new(&vals(rng, n, -4.0, 4.0), off),
                Pair::new(&vals(rng, n, -4.0, 4.0), off),
            );
            // out = a + b in f32, rounded once
            let mut out = Pair::nan(n, off);
            gpu::residual::fwd(l, out.b.m(), a.b.s(), b.b.s()).unwrap();
            gpu::residual::fwd(l, out.f.m(), a.f.s(), b.f.s()).unwrap();
            check(
                &format!("residual_fwd {tag}"),
                &out.got(),
                out.want(),
                ROUND,
                0.0,
            );
            // da += dout: the bf16 launch adds into bf16 da (the same values as the f32 da)
            let mut da = Pair::new(&vals(rng, n, -2.0, 2.0), off);
            gpu::residual::bwd(l, da.b.m(), a.b.s()).unwrap();
            gpu::residual::bwd(l, da.f.m(), a.f.s()).unwrap();
            check(
                &format!("residual_bwd {tag}"),
                &da.got(),
                da.want(),
                ROUND,
                0.0,
            );
            // swiglu: the same f32 math per element in both, rounded once; gu = [a; b]
            let gu = Pair::new(&[a.f.s(), b.f.s()].concat(), off);
            gpu::swiglu::fwd(l, out.b.m(), gu.b.s()).unwrap();
            gpu::swiglu::fwd(l, out.f.m(), gu.f.s()).unwrap();
            check(
                &format!("swiglu_fwd {tag}"),
                &out.got(),
                out.want(),
                ROUND,
                0.0,
            );
            let dout = Pair::new(&vals(rng, n, -1.0, 1.0), off);
            let mut dgu = Pair::nan(2 * n, off);
            gpu::swiglu::bwd(l, dgu.b.m(), dout.b.s(), gu.b.s()).unwrap();
            gpu::swiglu::bwd(l, dgu.f.m(), dout.f.s(), gu.f.s()).unwrap();
            let (got, want) = (dgu.got(), dgu.want());
            for (name, r) in [("dgate", 0..n), ("dup", n..2 * n)] {
                check(
                    &format!("swiglu_bwd {name} {tag}"),
                    &got[r.clone()],
                    &want[r],
                    ROUND,
                    0.0,
                );
            }
        }
    });
}

#[test]
fn rmsnorm() {
    each_mode(2, |l, rng| {
        for (c, off) in CASES {
            let (n, tag) = (3, format!("C={c} off={off}"));
            let x = Pair::new(&vals(rng, n * c, -2.0, 2.0), off);
            let w = Pair::new(&vals(rng, c, 0.5, 1.5), off);
            let mut out = Pair::nan(n * c, off);
            let (mut rstd_b, mut rstd_f) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            gpu::rmsnorm::fwd(l, out.b.m(), &mut rstd_b, x.b.s(), w.b.s(), n, c, 1e-5).unwrap();
            gpu::rmsnorm::fwd(l, out.f.m(), &mut rstd_f, x.f.s(), w.f.s(), n, c, 1e-5).unwrap();
            // rstd: an f32 sum of squares in another order; out = x rstd w: a product
            check(
                &format!("rmsnorm_fwd rstd {tag}"),
                &rstd_b,
                &rstd_f,
                F32R,
                0.0,
            );
            check(
                &format!("rmsnorm_fwd out {tag}"),
                &out.got(),
                out.want(),
                ROUND + F32R,
                0.0,
            );
            // backward on the same inputs, with the f32 forward's rstd
            let dout = Pair::new(&vals(rng, n * c, -1.0, 1.0), off);
            let mut dx = Pair::nan(n * c, off);
            let dw0 = vals(rng, c, -1.0, 1.0);
            let (mut dw_b, mut dw_f) = (dw0.clone(), dw0);
            let r = &rstd_f[..];
            gpu::rmsnorm::bwd(
                l,
                dx.b.m(),
                &mut dw_b,
                dout.b.s(),
                x.b.s(),
                w.b.s(),
                r,
                n,
                c,
                false,
            )
            .unwrap();
            gpu::rmsnorm::bwd(
                l,
                dx.f.m(),
                &mut dw_f,
                dout.f.s(),
                x.f.s(),
                w.f.s(),
                r,
                n,
                c,
                false,
            )
            .unwrap();
            // dx = rstd w dout - x rstd^3 mean(w dout x): a difference of f32 sums
            check(
                &format!("rmsnorm_bwd dx {tag}"),
                &dx.got(),
                dx.want(),
                ROUND,
                ACC,
            );
            // dw += sum_n dout x rstd: f32 atomics in scheduling order
            check(&format!("rmsnorm_bwd dw {tag}"), &dw_b, &dw_f, F32R, ACC);
        }
    });
}

#[test]
fn embedding() {
    each_mode(3, |l, rng| {
        for (c, off) in CASES {
            let (n, vocab, tag) = (5, 7, format!("C={c} off={off}"));
            let ids: Vec<u32> = vec![3, 1, 3, 6, 0]; // 3 repeats: two atomics into one row
            let wte = Pair::new(&vals(rng, vocab * c, -1.0, 1.0), off);
            let mut out = Pair::nan(n * c, off);
            gpu::embedding::fwd(l, out.b.m(), &ids, wte.b.s(), n, c).unwrap();
            gpu::embedding::fwd(l, out.f.m(), &ids, wte.f.s(), n, c).unwrap();
            // a gather: exact
            check(
                &format!("embedding_fwd {tag}"),
                &out.got(),
                out.want(),
                0.0,
                0.0,
            );
            let dout = Pair::new(&vals(rng, n * c, -1.0, 1.0), off);
            let d0 = vals(rng, vocab * c, -1.0, 1.0);
            let (mut dwte_b, mut dwte_f) = (d0.clone(), d0);
            gpu::embedding::bwd(l, &mut dwte_b, &ids, dout.b.s(), n, c).unwrap();
            gpu::embedding::bwd(l, &mut dwte_f, &ids, dout.f.s(), n, c).unwrap();
            // f32 atomics, the repeated id's two rows in scheduling order
            check(
                &format!("embedding_bwd dwte {tag}"),
                &dwte_b,
                &dwte_f,
                F32R,
                ACC,
            );
        }
    });
}

#[test]
fn softmax() {
    each_mode(4, |l, rng| {
        for (v, off) in CASES {
            let (n, tag) = (3, format!("V={v} off={off}"));
            let x = Pair::new(&vals(rng, n * v, -6.0, 6.0), off);
            let mut out = Pair::nan(n * v, off);
            gpu::softmax::fwd(l, out.b.m(), x.b.s(), n, v).unwrap();
            gpu::softmax::fwd(l, out.f.m(), x.f.s(), n, v).unwrap();
            // e^(x - M) / S: S an f32 sum in another order
            check(
                &format!("softmax_fwd {tag}"),
                &out.got(),
                out.want(),
                ROUND + F32R,
                0.0,
            );
            // backward from the f32 forward's output rounded to bf16
            let o: Vec<f32> = out.want().iter().map(|&x| bf(x)).collect();
            let o = Pair::new(&o, off);
            let dout = Pair::new(&vals(rng, n * v, -1.0, 1.0), off);
            let mut dx = Pair::nan(n * v, off);
            gpu::softmax::bwd(l, dx.b.m(), dout.b.s(), o.b.s(), n, v).unwrap();
            gpu::softmax::bwd(l, dx.f.m(), dout.f.s(), o.f.s(), n, v).unwrap();
            // out (dout - sum(dout out)): a difference with an f32 sum
            check(
                &format!("softmax_bwd {tag}"),
                &dx.got(),
                dx.want(),
                ROUND,
                ACC,
            );
        }
    });
}

#[test]
fn cross_entropy() {
    each_mode(5, |l, rng| {
        for (v, off) in CASES {
            let (n, tag) = (4, format!("V={v} off={off}"));
            let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let mask = [1.0, 1.0, 0.0, 1.0];
            let x = Pair::new(&vals(rng, n * v, -5.0, 5.0), off);
            let m = &mask[..];
            // whole rows (one chunk of all V), then the same rows in two vocabulary chunks
            // [0, v1), [v1, v)
            let v1 = if v >= 16 { 16 } else { v / 2 };
            for chunks in [vec![(0, v)], vec![(0, v1), (v1, v - v1)]] {
                let tag = format!("{tag} {} chunks", chunks.len());
                let cols = |v0: usize, vc: usize| -> Vec<f32> {
                    let xf = x.want();
                    (0..n)
                        .flat_map(|r| xf[r * v + v0..r * v + v0 + vc].to_vec())
                        .collect()
                };
                // state starts at 0 (a masked row leaves it untouched)
                let (mut st_b, mut st_f) = (vec![0f32; 3 * n], vec![0f32; 3 * n]);
                let (mut loss_b, mut loss_f) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                for &(v0, vc) in &chunks {
                    let xc = Pair::new(&cols(v0, vc), off);
                    let cv = (vc, v, v0);
                    gpu::cross_entropy::chunk_fwd(
                        l,
                        &mut loss_b,
                        &mut st_b,
                        xc.b.s(),
                        &targets,
                        m,
                        n,
                        cv,
                    )
                    .unwrap();
                    gpu::cross_entropy::chunk_fwd(
                        l,
                        &mut loss_f,
                        &mut st_f,
                        xc.f.s(),
                        &targets,
                        m,
                        n,
                        cv,
                    )
                    .unwrap();
                    check(
                        &format!("cross_entropy_chunk_fwd state {tag} v0={v0}"),
                        &st_b,
                        &st_f,
                        F32R,
                        ACC,
                    );
                }
                check(
                    &format!("cross_entropy_chunk_fwd losses {tag}"),
                    &loss_b,
                    &loss_f,
                    F32R,
                    ACC,
                );
                for &(v0, vc) in &chunks {
                    // in place on the chunk's logits, from the f32 forward's state
                    let mut xc = Pair::new(&cols(v0, vc), off);
                    let cv = (vc, v, v0);
                    gpu::cross_entropy::chunk_bwd(l, xc.b.m(), &st_f, &targets, m, n, cv, 0.5)
                        .unwrap();
                    gpu::cross_entropy::chunk_bwd(l, xc.f.m(), &st_f, &targets, m, n, cv, 0.5)
                        .unwrap();
                    let what = format!("cross_entropy_chunk_bwd {tag} v0={v0}");
                    check(&what, &xc.got(), xc.want(), ROUND, ACC);
                }
            }
        }
    });
}

#[test]
fn sample() {
    each_mode(6, |l, rng| {
        for v in [40, 37] {
            let n = 3;
            let x = Pair::new(&vals(rng, n * v, -3.0, 3.0), 0);
            let u: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
            let specs = [
                (0.0, 0, 1.0), // greedy
                (1.0, 5, 0.9),
                (0.7, 0, 1.0),
            ];
            for (temperature, top_k, top_p) in specs {
                let spec = SampleSpec {
                    temperature,
                    top_k,
                    top_p,
                };
                let tag = format!("V={v} {spec:?}");
                let (mut ids_b, mut ids_f) = (vec![u32::MAX; n], vec![u32::MAX; n]);
                let (mut lp_b, mut lp_f) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                gpu::sample::fwd(l, &mut ids_b, &mut lp_b, x.b.s(), &u, n, v, &spec).unwrap();
                gpu::sample::fwd(l, &mut ids_f, &mut lp_f, x.f.s(), &u, n, v, &spec).unwrap();
                // the same p_v bits from the same values: the same ids, logp f32 (f64 sums)
                assert_eq!(ids_b, ids_f, "sample_fwd ids {tag}");
                if temperature > 0.0 {
                    check(&format!("sample_fwd logp {tag}"), &lp_b, &lp_f, F32R, ACC);
                } else {
                    assert!(lp_b.iter().chain(&lp_f).all(|&x| x == 0.0), "greedy logp");
                }
            }
        }
    });
}

/// (q/out elements, k/v elements, lse elements) of `d`.
fn attn_lens(d: &AttnDims) -> (usize, usize, usize) {
    (
        d.b * d.t * d.nh * d.hs,
        d.b * d.t * d.nkv * d.hs,
        d.b * d.nh * d.t,
    )
}

#[test]
fn attention() {
    let dims = [
        AttnDims {
            b: 2,
            t: 5,
            nh: 4,
            nkv: 2,
            hs: 8,
        },
        // two query / key tiles of 64, head size 20 in the 32 bucket
        AttnDims {
            b: 1,
            t: 70,
            nh: 2,
            nkv: 1,
            hs: 20,
        },
    ];
    each_mode(7, |l, rng| {
        for d in dims {
            let tag = format!("{d:?}");
            let (nq, nkv, nl) = attn_lens(&d);
            let q = Pair::new(&vals(rng, nq, -1.0, 1.0), 0);
            let k = Pair::new(&vals(rng, nkv, -1.0, 1.0), 0);
            let v = Pair::new(&vals(rng, nkv, -1.0, 1.0), 0);
            let mut out = Pair::nan(nq, 0);
            let (mut lse_b, mut lse_f) = (vec![f32::NAN; nl], vec![f32::NAN; nl]);
            gpu::attention::fwd(l, out.b.m(), &mut lse_b, q.b.s(), k.b.s(), v.b.s(), d).unwrap();
            gpu::attention::fwd(l, out.f.m(), &mut lse_f, q.f.s(), k.f.s(), v.f.s(), d).unwrap();
            // lse f32; out = sum_j p_j v_j / l: signed sums. The bf16 forward runs on tensor
            // cores, whose P V product takes P rounded to bf16 (l sums the unrounded p): the
            // weights move by <= 2^-9, out by <= 2^-9 max|v| (kernels/attention.cu): an
            // absolute term of 2^-8 max|v| (`check` takes it relative to out's largest value)
            // on top of one rounding
            check(
                &format!("attention_fwd lse {tag}"),
                &lse_b,
                &lse_f,
                F32R,
                ACC,
            );
            check(
                &format!("attention_fwd out {tag}"),
                &out.got(),
                out.want(),
                ROUND,
                ROUND * amax(v.want()) / amax(out.want()),
            );
            // backward on the f32 forward's out (rounded to bf16) and lse
            let o: Vec<f32> = out.want().iter().map(|&x| bf(x)).collect();
            let o = Pair::new(&o, 0);
            let dout = Pair::new(&vals(rng, nq, -1.0, 1.0), 0);
            let (mut dq, mut dk, mut dv) = (Pair::nan(nq, 0), Pair::nan(nkv, 0), Pair::nan(nkv, 0));
            let n_scratch = gpu::attention::bwd_scratch_len(&d);
            let (mut sc_b, mut sc_f) = (vec![f32::NAN; n_scratch], vec![f32::NAN; n_scratch]);
            let lse = &lse_f[..];
            gpu::attention::bwd(
                l,
                dq.b.m(),
                dk.b.m(),
                dv.b.m(),
                &mut sc_b,
                dout.b.s(),
                q.b.s(),
                k.b.s(),
                v.b.s(),
                o.b.s(),
                lse,
                d,
            )
            .unwrap();
            gpu::attention::bwd(
                l,
                dq.f.m(),
                dk.f.m(),
                dv.f.m(),
                &mut sc_f,
                dout.f.s(),
                q.f.s(),
                k.f.s(),
                v.f.s(),
                o.f.s(),
                lse,
                d,
            )
            .unwrap();
            // D = dout . out (f32); dq, dk, dv: sums of dS = P (dP - D) terms, cancelling. The
            // bf16 kernels run on tensor cores, which take P (dv) and dS (dq, dk) rounded to
            // bf16: each term moves by <= 2^-9 of its magnitude. The bound on the sum of the
            // terms' magnitudes is kernels_emu_b.rs's (term by term against the CPU twin); here,
            // at these sizes and |inputs| < 1, an absolute 2^-8 of the gradient's largest value
            // on top of one rounding (seen: <= 0.53 of the tolerance)
            check(&format!("attention_bwd D {tag}"), &sc_b, &sc_f, F32R, ACC);
            for (name, g) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
                check(
                    &format!("attention_bwd {name} {tag}"),
                    &g.got(),
                    g.want(),
                    ROUND,
                    ROUND,
                );
            }
        }
    });
}

#[test]
fn decode_attention() {
    let cases = [
        // decode: one query at position 70, 71 and 66 keys: split-K (3 splits) and the combine
        (
            CacheDims {
                b: 2,
                tq: 1,
                tmax: 80,
                nh: 4,
                nkv: 2,
                hs: 8,
                pos0: 70,
            },
            vec![0u32, 5],
        ),
        // prefill of 4 queries, <= 4 keys each: no split (null scratch), one launch
        (
            CacheDims {
                b: 2,
                tq: 4,
                tmax: 8,
                nh: 2,
                nkv: 1,
                hs: 16,
                pos0: 0,
            },
            vec![0u32, 2],
        ),
    ];
    each_mode(8, |l, rng| {
        for (d, starts) in &cases {
            let d = *d;
            let tag = format!("{d:?}");
            let nq = d.b * d.tq * d.nh * d.hs;
            let nc = d.b * d.tmax * d.nkv * d.hs;
            let q = Pair::new(&vals(rng, nq, -1.0, 1.0), 0);
            let kc = Pair::new(&vals(rng, nc, -1.0, 1.0), 0);
            let vc = Pair::new(&vals(rng, nc, -1.0, 1.0), 0);
            let (lo, lml) = gpu::decode_attention::scratch_lens(l, &d, starts, false);
            assert_eq!(lo > 0, d.tq == 1, "split-K in the decode case only");
            let mut out = Pair::nan(nq, 0);
            let (mut po, mut pml) = (vec![f32::NAN; lo], vec![f32::NAN; lml]);
            gpu::decode_attention::fwd(
                l,
                out.b.m(),
                &mut po,
                &mut pml,
                q.b.s(),
                kc.b.s(),
                vc.b.s(),
                starts,
                None,
                d,
            )
            .unwrap();
            gpu::decode_attention::fwd(
                l,
                out.f.m(),
                &mut po,
                &mut pml,
                q.f.s(),
                kc.f.s(),
                vc.f.s(),
                starts,
                None,
                d,
            )
            .unwrap();
            // weighted sums of v with signs (f32 partials merged in f32)
            check(
                &format!("decode_attention_fwd {tag}"),
                &out.got(),
                out.want(),
                ROUND,
                ACC,
            );
        }
    });
}

#[test]
fn kv_append() {
    // D = NKV*HS = 40: the 16-byte path in both dtypes; 12: f32 only; offset 1: neither
    for (nkv, hs, off) in [(5, 8, 0), (3, 4, 0), (5, 8, 1)] {
        let d = CacheDims {
            b: 3,
            tq: 2,
            tmax: 9,
            nh: nkv,
            nkv,
            hs,
            pos0: 6,
        };
        each_mode(9, |l, rng| {
            let tag = format!("kv_append_fwd {d:?} off {off}");
            let (nn, nc) = (d.b * d.tq * nkv * hs, d.b * d.tmax * nkv * hs);
            let (k, v) = (
                Pair::new(&vals(rng, nn, -1.0, 1.0), off),
                Pair::new(&vals(rng, nn, -1.0, 1.0), off),
            );
            let mut kc = Pair::new(&vals(rng, nc, -1.0, 1.0), off);
            let mut vc = Pair::new(&vals(rng, nc, -1.0, 1.0), off);
            gpu::kv_append::fwd(l, kc.b.m(), vc.b.m(), k.b.s(), v.b.s(), None, d).unwrap();
            gpu::kv_append::fwd(l, kc.f.m(), vc.f.m(), k.f.s(), v.f.s(), None, d).unwrap();
            // a copy of values both dtypes hold: exact
            check(&format!("{tag} kcache"), &kc.got(), kc.want(), 0.0, 0.0);
            check(&format!("{tag} vcache"), &vc.got(), vc.want(), 0.0, 0.0);
        });
    }
}

#[test]
fn rope() {
    each_mode(9, |l, rng| {
        let dims = [2, 3, 4, 8];
        let n: usize = dims.iter().product();
        for bwd in [false, true] {
            let mut x = Pair::new(&vals(rng, n, -2.0, 2.0), 0);
            gpu::rope::rope(l, x.b.m(), dims, 5, None, 10000.0, bwd).unwrap();
            gpu::rope::rope(l, x.f.m(), dims, 5, None, 10000.0, bwd).unwrap();
            // the same rotation in f32 per pair in both, rounded once
            check(&format!("rope bwd={bwd}"), &x.got(), x.want(), ROUND, 0.0);
        }
        // qkv_rope: the same rotation (and copies) between the fused rows and q, and positions
        // 5..8 of 9-position k and v caches (the others kept)
        let d = CacheDims {
            b: 2,
            tq: 3,
            tmax: 9,
            nh: 4,
            nkv: 2,
            hs: 8,
            pos0: 5,
        };
        let (n, qd, kvd) = (6, 32, 16);
        let qkv = Pair::new(&vals(rng, n * (qd + 2 * kvd), -2.0, 2.0), 0);
        let mut q = Pair::nan(n * qd, 0);
        let [mut k, mut v] = [0, 0].map(|_| Pair::new(&vals(rng, 2 * 9 * kvd, -1.0, 1.0), 0));
        gpu::rope::qkv_fwd(l, q.b.m(), k.b.m(), v.b.m(), qkv.b.s(), None, d, 1e4).unwrap();
        gpu::rope::qkv_fwd(l, q.f.m(), k.f.m(), v.f.m(), qkv.f.s(), None, d, 1e4).unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            check(
                &format!("qkv_rope_fwd {name}"),
                &x.got(),
                x.want(),
                ROUND,
                0.0,
            );
        }
        let mut dqkv = Pair::nan(n * (qd + 2 * kvd), 0);
        gpu::rope::qkv_bwd(l, dqkv.b.m(), q.b.s(), k.b.s(), v.b.s(), d, 1e4).unwrap();
        // the f32 launch from the bf16 launch's q, k, v (exact in f32)
        let (qf, kf, vf) = (
            Pair::new(&q.got(), 0),
            Pair::new(&k.got(), 0),
            Pair::new(&v.got(), 0),
        );
        gpu::rope::qkv_bwd(l, dqkv.f.m(), qf.f.s(), kf.f.s(), vf.f.s(), d, 1e4).unwrap();
        check("qkv_rope_bwd", &dqkv.got(), dqkv.want(), ROUND, 0.0);
    });
}

#[test]
fn norm_scale() {
    each_mode(10, |l, rng| {
        for (d, off) in CASES {
            let (n, s, tag) = (3, 2.0, format!("D={d} off={off}"));
            let x = Pair::new(&vals(rng, n * d, -1.0, 1.0), off);
            let mut y = Pair::nan(n * d, off);
            gpu::norm_scale::fwd(l, y.b.m(), x.b.s(), n, d, s).unwrap();
            gpu::norm_scale::fwd(l, y.f.m(), x.f.s(), n, d, s).unwrap();
            // x s / ||x||: a product with an f32 sum of squares
            check(
                &format!("norm_scale_fwd {tag}"),
                &y.got(),
                y.want(),
                ROUND + F32R,
                0.0,
            );
            let dy = Pair::new(&vals(rng, n * d, -1.0, 1.0), off);
            let mut dx = Pair::nan(n * d, off);
            gpu::norm_scale::bwd(l, dx.b.m(), dy.b.s(), x.b.s(), n, d, s).unwrap();
            gpu::norm_scale::bwd(l, dx.f.m(), dy.f.s(), x.f.s(), n, d, s).unwrap();
            // (s / ||x||) (dy - x (x . dy) / ||x||^2): a difference
            check(
                &format!("norm_scale_bwd {tag}"),
                &dx.got(),
                dx.want(),
                ROUND,
                ACC,
            );
        }
    });
}

#[test]
fn inject() {
    each_mode(11, |l, rng| {
        for (c, off) in CASES {
            let n = 6;
            let sites = vec![4u32, 1];
            let s = sites.len();
            for mode in [InjectMode::Replace, InjectMode::Add] {
                let tag = format!("{mode:?} C={c} off={off}");
                let vecs = Pair::new(&vals(rng, s * c, -1.0, 1.0), off);
                let mut h = Pair::new(&vals(rng, n * c, -1.0, 1.0), off);
                gpu::inject::fwd(l, h.b.m(), &sites, vecs.b.s(), n, c, mode).unwrap();
                gpu::inject::fwd(l, h.f.m(), &sites, vecs.f.s(), n, c, mode).unwrap();
                // replace: a copy; add: one f32 sum rounded once
                let rel = if mode == InjectMode::Add { ROUND } else { 0.0 };
                check(&format!("inject_fwd {tag}"), &h.got(), h.want(), rel, 0.0);
                let mut dh = Pair::new(&vals(rng, n * c, -1.0, 1.0), off);
                let mut dv = Pair::nan(s * c, off);
                gpu::inject::bwd(l, dv.b.m(), dh.b.m(), &sites, n, c, mode).unwrap();
                gpu::inject::bwd(l, dv.f.m(), dh.f.m(), &sites, n, c, mode).unwrap();
                // copies (and, for replace, zeroed rows): exact
                check(
                    &format!("inject_bwd dvecs {tag}"),
                    &dv.got(),
                    dv.want(),
                    0.0,
                    0.0,
                );
                check(
                    &format!("inject_bwd dh {tag}"),
                    &dh.got(),
                    dh.want(),
                    0.0,
                    0.0,
                );
            }
        }
    });
}

#[test]
fn pool() {
    each_mode(12, |l, rng| {
        for (c, off) in [(40, 0), (12, 1)] {
            let (b, t, tmax) = (3, 5, 6);
            // right padding, lengths 5, 2, 3
            let mask: Vec<f32> = [5, 2, 3]
                .iter()
                .flat_map(|&len| (0..t).map(move |i| if i < len { 1.0 } else { 0.0 }))
                .collect();
            let h = Pair::new(&vals(rng, b * t * c, -2.0, 2.0), off);
            let w = Pair::new(&vals(rng, tmax, -1.0, 1.0), off);
            let dout = Pair::new(&vals(rng, b * c, -1.0, 1.0), off);
            for mode in [
                PoolMode::Last,
                PoolMode::Mean,
                PoolMode::Max,
                PoolMode::Weighted,
            ] {
                let tag = format!("{mode:?} C={c} off={off}");
                let weighted = mode == PoolMode::Weighted;
                let (wb, wf) = if weighted {
                    (Some(In::from(w.b.s())), Some(In::from(w.f.s())))
                } else {
                    (None, None)
                };
                let mut out = Pair::nan(b * c, off);
                gpu::pool::fwd(l, out.b.m(), h.b.s(), &mask, wb, [b, t, c], mode).unwrap();
                gpu::pool::fwd(l, out.f.m(), h.f.s(), &mask, wf, [b, t, c], mode).unwrap();
                // last, max: copies of h; mean, weighted: f32 sums (alpha from an f32 softmax)
                let (rel, rel_dh) = match mode {
                    PoolMode::Last | PoolMode::Max => (0.0, 0.0),
                    _ => (ROUND + F32R, ROUND + F32R),
                };
                check(&format!("pool_fwd {tag}"), &out.got(), out.want(), rel, 0.0);
                let mut dh = Pair::nan(b * t * c, off);
                let dw0 = vals(rng, tmax, -1.0, 1.0);
                let (mut dw_b, mut dw_f) = (dw0.clone(), dw0);
                let (db, df) = if weighted {
                    (Some((&mut dw_b[..]).into()), Some((&mut dw_f[..]).into()))
                } else {
                    (None, None)
                };
                let dims = [b, t, c];
                gpu::pool::bwd(l, dh.b.m(), db, dout.b.s(), h.b.s(), &mask, wb, dims, mode)
                    .unwrap();
                gpu::pool::bwd(l, dh.f.m(), df, dout.f.s(), h.f.s(), &mask, wf, dims, mode)
                    .unwrap();
                // dh: dout copied (last, max) or scaled by m/len or alpha, rounded once
                check(
                    &format!("pool_bwd dh {tag}"),
                    &dh.got(),
                    dh.want(),
                    rel_dh,
                    0.0,
                );
                if weighted {
                    // dw += sum_b p (dp - sum p dp): f32 sums, atomics, cancellation
                    check(&format!("pool_bwd dw {tag}"), &dw_b, &dw_f, F32R, ACC);
                }
            }
        }
    });
}

/// (mse, reward, advantage) of the reward_advantage launcher over T.
fn reward<T: nla_engine::device::Storage>(
    l: &EmuLaunch,
    pred: &[T],
    target: &[T],
    valid: &[f32],
    a: usize,
    spec: &RewardSpec,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = valid.len();
    let (mut mse, mut rew, mut adv) = (vec![f32::NAN; s], vec![f32::NAN; s], vec![f32::NAN; s]);
    gpu::reward_advantage::reward_advantage(
        l, &mut mse, &mut rew, &mut adv, pred, target, valid, s, a, spec,
    )
    .unwrap();
    (mse, rew, adv)
}

#[test]
fn reward_advantage() {
    let ppo = RewardSpec {
        mse_scale: None,
        failure_value: -1.5,
        transform: RewardTransform::Exp { temperature: 0.5 },
        scale: 2.0,
        batch_normalize: true,
        clip: Some((-1.0, 1.0)),
        advantage: Advantage::Ppo { whiten: true },
        eps: 1e-6,
    };
    each_mode(13, |l, rng| {
        for (a, off) in CASES {
            let s = 6;
            let valid = vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0];
            let pred = Pair::new(&vals(rng, s * a, -1.0, 1.0), off);
            let target = Pair::new(&vals(rng, s * a, -1.0, 1.0), off);
            for spec in [RewardSpec::grpo(3, Some(2.0)), ppo] {
                let tag = format!("A={a} off={off} {:?}", spec.advantage);
                let (mse_b, rew_b, adv_b) = reward(l, pred.b.s(), target.b.s(), &valid, a, &spec);
                let (mse_f, rew_f, adv_f) = reward(l, pred.f.s(), target.f.s(), &valid, a, &spec);
                check(
                    &format!("reward_advantage mse {tag}"),
                    &mse_b,
                    &mse_f,
                    F32R,
                    0.0,
                );
                check(
                    &format!("reward_advantage reward {tag}"),
                    &rew_b,
                    &rew_f,
                    F32R,
                    ACC,
                );
                check(
                    &format!("reward_advantage advantage {tag}"),
                    &adv_b,
                    &adv_f,
                    F32R,
                    ACC,
                );
            }
        }
    });
}

#[test]
fn adamw_bf16_writes_the_working_copy() {
    let hp = AdamwStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    each_mode(14, |l, rng| {
        // 1037: packs of 4 and a tail; 30 at offset 1: one element at a time
        for (n, off) in [(1037, 0), (64, 0), (30, 1)] {
            let tag = format!("n={n} off={off}");
            let p = vals(rng, n, -1.0, 1.0);
            let g = Buf::new(&vals(rng, n, -1.0, 1.0), off);
            let m = vals(rng, n, -0.1, 0.1);
            let v = vals(rng, n, 0.0, 0.01);
            let (mut p1, mut m1, mut v1) =
                (Buf::new(&p, off), Buf::new(&m, off), Buf::new(&v, off));
            let (mut p2, mut m2, mut v2) =
                (Buf::new(&p, off), Buf::new(&m, off), Buf::new(&v, off));
            let mut p16 = Buf::new(&vec![bf16::NAN; n], off);
            gpu::adamw::adamw(l, p1.m(), Some(p16.m().into()), g.s(), m1.m(), v1.m(), &hp).unwrap();
            gpu::adamw::adamw(l, p2.m(), None, g.s(), m2.m(), v2.m(), &hp).unwrap();
            // the same f32 step: p, m, v equal the f32 launcher's bit for bit
            check(&format!("adamw_bf16 p {tag}"), p1.s(), p2.s(), 0.0, 0.0);
            check(&format!("adamw_bf16 m {tag}"), m1.s(), m2.s(), 0.0, 0.0);
            check(&format!("adamw_bf16 v {tag}"), v1.s(), v2.s(), 0.0, 0.0);
            assert_ne!(p1.s(), &p[..], "the step moved p");
            // p16 = bf16(p) of the new p
            for (i, (a, b)) in p16.s().iter().zip(p1.s()).enumerate() {
                assert_eq!(a.to_bits(), bf16::from_f32(*b).to_bits(), "p16[{i}] {tag}");
            }
        }
    });
}

#[test]
fn sum_squares() {
    each_mode(15, |l, rng| {
        for (n, off) in [(5000, 0), (1037, 0), (30, 1)] {
            let x = Pair::new(&vals(rng, n, -2.0, 2.0), off);
            let (mut sb, mut sf) = ([0f64], [0f64]);
            gpu::adamw::sum_squares(l, &mut sb[..], x.b.s()).unwrap();
            gpu::adamw::sum_squares(l, &mut sf[..], x.f.s()).unwrap();
            let exact: f64 = x.want().iter().map(|&v| (v as f64) * (v as f64)).sum();
            // each 16-byte pack (8 bf16 / 4 f32) is summed in f32 (relative error < 5e-7 per
            // kernels/adamw.cu, all terms >= 0), the rest in f64
            for (what, got) in [("bf16", sb[0]), ("f32", sf[0])] {
                let err = (got - exact).abs() / exact;
                eprintln!(
                    "sum_squares {what} n={n} off={off}: relative error {err:.3e} (tolerance 5e-7)"
                );
                assert!(
                    got.is_finite() && err < 5e-7,
                    "sum_squares {what}: {got} vs {exact}"
                );
            }
        }
    });
}

/// `convert` (f32 <-> bf16) against `half`'s conversions, bit for bit: round to nearest even,
/// ties, values past bf16's range (to inf), subnormals, signed zeros, infinities and NaN; the
/// 4-element path (aligned) and the scalar one (one element off), and n not a multiple of 4.
#[test]
fn convert() {
    let mut special = vec![
        0.0,
        -0.0,
        1.0 + 1.0 / 256.0, // a tie: to the even significand (1)
        1.0 + 3.0 / 256.0, // a tie: up to 1 + 2^-6
        f32::MAX,          // past bf16's largest finite value: inf
        -3.4e38,
        1e-40, // f32 subnormal
        -2.5e-39,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
    ];
    each_mode(61, |l, rng| {
        special.extend((0..1025).map(|_| rng.random_range(-1e4f32..1e4) * rng.random::<f32>()));
        let want16: Vec<bf16> = special.iter().map(|&x| bf16::from_f32(x)).collect();
        for off in [0, 1] {
            let x = Buf::new(&special, off);
            let mut out = Buf::new(&vec![bf16::from_bits(0x7fa5); special.len()], off);
            gpu::convert::convert::<bf16, f32, _>(l, out.m(), x.s()).unwrap();
            let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // NaN: any quiet NaN (the payload is the hardware's)
            for (i, (g, w)) in out.s().iter().zip(&want16).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "f32 -> bf16 [{i}] of {}: {g} vs {w} (off {off})",
                    special[i]
                );
            }
            assert_eq!(bits(out.s()).len(), special.len());
            // and back: exact
            let mut back = Buf::new(&vec![f32::NAN; special.len()], off);
            gpu::convert::convert::<f32, bf16, _>(l, back.m(), out.s()).unwrap();
            for (i, (g, w)) in back.s().iter().zip(&want16).enumerate() {
                let w = w.to_f32();
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "bf16 -> f32 [{i}]"
                );
            }
        }
        special.truncate(12);
    });
    // same dtype or a length mismatch: refused
    let l = EmuLaunch::new(EmuMode::Forward, 0);
    let (x, mut y) = (vec![1f32; 4], vec![0f32; 4]);
    assert!(gpu::convert::convert::<f32, f32, _>(&l, &mut y[..], &x[..]).is_err());
    let mut z = [bf16::ZERO; 3];
    assert!(gpu::convert::convert::<bf16, f32, _>(&l, &mut z[..], &x[..]).is_err());
}
