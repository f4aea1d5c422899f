//! The CUDA kernels of kernels/*.cu (part A: embedding, rmsnorm, rope, swiglu, residual, adamw
//! and sum_squares, inject, norm_scale, pool, reward_advantage, policy_loss) run through the CPU
//! emulator of the CUDA execution model and compared with their CPU twins (CpuDevice, through
//! the Device trait) on the same random inputs.
//!
//! Every launch runs in both fiber schedules (EmuMode::Forward: threads and blocks in index
//! order; EmuMode::Reversed: threads reversed, blocks shuffled by the seed), with fresh output
//! buffers each time; kernels whose result does not depend on scheduling (everything but the
//! atomics of the backward passes and of sum_squares) must give identical bits in both. Outputs
//! that the op overwrites (`=`) start as NaN (so an element left unwritten fails the finiteness
//! check of `assert_close`); outputs that accumulate (`+=`) start at random non-zero values.
//! Every buffer a kernel writes is surrounded by canaries (`Guarded`) that must survive.
//!
//! Shapes exercise partial warps and blocks (C = 77, 203, N odd), grid-stride loops (more rows
//! than blocks, more channels than threads), the 16-byte vector paths (C a multiple of the pack,
//! buffers 16-byte aligned) and the scalar fallbacks (buffers misaligned by one element).
//!
//! Tolerances, f32 variants: where the kernel does the twin's arithmetic in the twin's order the
//! comparison is exact (copies, elementwise adds, AdamW, mean pooling); where a sum is formed in
//! another order (block trees vs the twin's sequential/strided sums, atomics in scheduling
//! order) the bound is a few f32 rounding errors of the sum (relative to the sum of the absolute
//! terms where terms cancel), each written at its test. bf16 variants: the inputs are rounded to
//! bf16 first and the twin runs in f32 on the rounded values; a bf16 output is the f32 result
//! rounded once (round to nearest even), so it may differ from the twin's f32 value by the
//! rounding, at most 2^-8 relative (bf16 has an 8-bit significand), plus the f32 variant's
//! difference ([`Tol::bf16_out`]). f32 outputs of bf16 kernels (parameter gradients, stats) keep
//! the f32 tolerance.
//!
//! Set NLA_TOL_REPORT=1 to print, for every comparison, the worst |diff| / allowance.

mod common;

use common::assert_close;
use common::kernels::*;
use common::ops::{m, v, Buf};
use half::bf16;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::emu::{EmuArgs, EmuMode};
use nla_engine::device::{
    AdamwStep, Advantage, CacheDims, Device, InjectMode, KlType, LossAgg, PolicyLossSpec,
    PolicyStat, PoolMode, RewardSpec, RewardTransform,
};
use rand::rngs::StdRng;
use rand::Rng;

// ------------------------------------------------------------------------------------------
// Tolerances
// ------------------------------------------------------------------------------------------

/// `|got - want| <= atol + rtol |want|` elementwise, and normalised MSE <= nmse.
#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f32,
    rtol: f32,
    nmse: f64,
}

/// bf16 unit roundoff: round-to-nearest-even to an 8-bit significand is within 2^-8 relative.
const BF16_U: f32 = 1.0 / 256.0;

impl Tol {
    fn new(atol: f32, rtol: f32) -> Tol {
        Tol {
            atol,
            rtol,
            nmse: (rtol as f64).max(1e-7).powi(2),
        }
    }

    /// The tolerance of a bf16 output whose f32 value obeys `self`: one rounding to bf16 on top
    /// (|bf16(k) - w| <= 2^-8 |k| + |k - w|, and |k| <= |w| + |k - w|).
    fn bf16_out(self) -> Tol {
        Tol {
            atol: self.atol * 1.01,
            rtol: BF16_U + self.rtol * 1.01,
            nmse: self.nmse + (BF16_U as f64).powi(2),
        }
    }

    /// For an output stored as T: `self` for f32, [`Tol::bf16_out`] for bf16.
    fn out<T: Storage>(self) -> Tol {
        if T::SUFFIX == "bf16" {
            self.bf16_out()
        } else {
            self
        }
    }

    #[track_caller]
    fn check(&self, what: &str, got: &[f32], want: &[f32]) {
        if std::env::var_os("NLA_TOL_REPORT").is_some() {
            let worst = got
                .iter()
                .zip(want)
                .map(|(&g, &w)| {
                    let d = (g - w).abs();
                    if d == 0.0 {
                        0.0
                    } else {
                        d / (self.atol + self.rtol * w.abs())
                    }
                })
                .fold(0.0f32, f32::max);
            let (num, den) = got
                .iter()
                .zip(want)
                .fold((0.0f64, 0.0f64), |(n, d), (&g, &w)| {
                    let (g, w) = (g as f64, w as f64);
                    (n + (g - w) * (g - w), d + w * w)
                });
            let nmse = if den == 0.0 { num } else { num / den };
            eprintln!(
                "tol {what}: worst {worst:.3} of allowance {self:?}, nmse {:.3} of allowance",
                nmse / self.nmse
            );
        }
        assert_close(what, got, want, self.atol, self.rtol, self.nmse);
    }
}

/// Fails unless `got` (a T output) holds exactly the bits of `want` (the twin's f32 values)
/// stored as T: for kernels doing the twin's f32 arithmetic and rounding once.
#[track_caller]
fn assert_stored_exact<T: Storage>(what: &str, got: &[T], want: &[f32]) {
    assert_finite(what, &T::to_f32s(got));
    assert_same_bits(what, got, &T::from_f32s(want));
}

// ------------------------------------------------------------------------------------------
// Inputs and the CPU twin
// ------------------------------------------------------------------------------------------

fn cpu() -> CpuDevice {
    CpuDevice::new()
}

/// NaN-filled output of `n` elements (an element the kernel does not write fails later).
fn nan_out<T: Storage>(n: usize, misalign: usize) -> Guarded<T> {
    Guarded::from_slice_misaligned(&vec![T::nan(); n], misalign)
}

/// Input `x` stored as T in a guarded buffer.
fn input<T: Storage>(x: &[f32], misalign: usize) -> Guarded<T> {
    Guarded::from_slice_misaligned(&T::from_f32s(x), misalign)
}

/// Read back a T buffer, checking its canaries.
#[track_caller]
fn read<T: Storage>(what: &str, g: &Guarded<T>) -> Vec<f32> {
    g.assert_intact(what);
    T::to_f32s(g.get())
}

/// `n` values with |x| in [0.05, 1) * scale, random signs, rounded to T.
fn rand_t<T: Storage>(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    T::round(&nonzero(r, n, scale))
}

// ------------------------------------------------------------------------------------------
// embedding
// ------------------------------------------------------------------------------------------

/// Grid N, block 32 * ceil(C / pack / 32) capped at 256 (pack = 16 bytes when C allows it).
#[allow(clippy::too_many_arguments)]
fn embedding_fwd_k<T: Storage>(
    out: &mut [T],
    ids: &[u32],
    wte: &[T],
    n: usize,
    c: usize,
    vocab: usize,
    mode: EmuMode,
    seed: u64,
) {
    let pack = if c.is_multiple_of(T::PACK) {
        T::PACK
    } else {
        1
    };
    let block = (32 * c.div_ceil(pack).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(ids).ptr(wte);
    a.scalar(n as i32).scalar(c as i32).scalar(vocab as i32);
    launch1(
        &sym::<T>("embedding_fwd"),
        n as u32,
        block,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// Grid N, block 256.
#[allow(clippy::too_many_arguments)]
fn embedding_bwd_k<T: Storage>(
    dwte: &mut [f32],
    ids: &[u32],
    dout: &[T],
    n: usize,
    c: usize,
    vocab: usize,
    mode: EmuMode,
    seed: u64,
) {
    let mut a = EmuArgs::new();
    a.ptr_mut(dwte).ptr(ids).ptr(dout);
    a.scalar(n as i32).scalar(c as i32).scalar(vocab as i32);
    launch1(
        &sym::<T>("embedding_bwd"),
        n as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

fn check_embedding<T: Storage>(n: usize, c: usize, vocab: usize, misalign: usize, seed: u64) {
    let tag = format!(
        "embedding {} N={n} C={c} V={vocab} misalign={misalign}",
        T::SUFFIX
    );
    let mut r = rng(seed);
    // n > vocab: ids repeat, so the backward adds several rows into one
    let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
    let wte = rand_t::<T>(&mut r, vocab * c, 1.0);
    let dout = rand_t::<T>(&mut r, n * c, 1.0);
    let dwte0 = nonzero(&mut r, vocab * c, 1.0);
    let dev = cpu();
    let ids_d = dev.upload_ids(&ids).unwrap();

    let mut out_w: Buf = vec![0.0; n * c];
    dev.embedding_fwd(m(&mut out_w), &ids_d, v(&wte), n, c)
        .unwrap();
    let mut dwte_w = dwte0.clone();
    dev.embedding_bwd(m(&mut dwte_w), &ids_d, v(&dout), n, c)
        .unwrap();

    let fwd = both_orders(|mode, seed| {
        let mut out = nan_out::<T>(n * c, misalign);
        let wt = input::<T>(&wte, misalign);
        embedding_fwd_k(out.get_mut(), &ids, wt.get(), n, c, vocab, mode, seed);
        out.assert_intact(&tag);
        out.to_vec()
    });
    assert_same_bits(&format!("{tag} fwd"), &fwd[0], &fwd[1]);
    // a row gather: exact
    assert_stored_exact::<T>(&format!("{tag} fwd out"), &fwd[0], &out_w);

    // dwte: f32 atomics in scheduling order vs the twin's row order; each element sums its
    // init and at most a handful of terms of magnitude < 1, so every ordering is within a few
    // f32 roundings (k terms: <= k * 2^-24 * sum|terms| ~ 1e-6): atol 4e-6.
    for (mode, seed) in ORDERS {
        let mut dw = Guarded::from_slice(&dwte0);
        let g = input::<T>(&dout, misalign);
        embedding_bwd_k(dw.get_mut(), &ids, g.get(), n, c, vocab, mode, seed);
        let got = read(&tag, &dw);
        Tol::new(4e-6, 1e-6).check(&format!("{tag} bwd dwte ({mode:?})"), &got, &dwte_w);
    }
}

#[test]
fn embedding_f32_matches_cpu() {
    check_embedding::<f32>(37, 200, 23, 0, 1); // vector path (C % 4 == 0, aligned)
    check_embedding::<f32>(37, 203, 23, 0, 2); // scalar path (C odd), partial warp
    check_embedding::<f32>(37, 200, 23, 1, 3); // scalar path (misaligned)
}

#[test]
fn embedding_bf16_matches_cpu() {
    check_embedding::<bf16>(37, 200, 23, 0, 4); // vector path (C % 8 == 0)
    check_embedding::<bf16>(29, 203, 17, 0, 5); // scalar path
    check_embedding::<bf16>(29, 300, 17, 0, 6); // C % 8 != 0: scalar path
    check_embedding::<bf16>(64, 576, 1000, 0, 7); // SmolLM2's d_model, 72 packs per row
}

// ------------------------------------------------------------------------------------------
// rmsnorm
// ------------------------------------------------------------------------------------------

/// Grid N, block 32 * ceil(C / pack / 32) capped at 1024.
#[allow(clippy::too_many_arguments)]
fn rmsnorm_fwd_k<T: Storage>(
    out: &mut [T],
    rstd: &mut [f32],
    x: &[T],
    w: &[T],
    n: usize,
    c: usize,
    eps: f32,
    mode: EmuMode,
    seed: u64,
) {
    let pack = if c.is_multiple_of(T::PACK) {
        T::PACK
    } else {
        1
    };
    let block = (32 * c.div_ceil(pack).div_ceil(32)).min(1024) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr_mut(rstd).ptr(x).ptr(w);
    a.scalar(n as i32).scalar(c as i32).scalar(eps);
    launch1(
        &sym::<T>("rmsnorm_fwd"),
        n as u32,
        block,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// Grid G = min(N, 2 * SMs), block 256, dynamic shared memory C * 4 bytes.
#[allow(clippy::too_many_arguments)]
fn rmsnorm_bwd_k<T: Storage>(
    dx: &mut [T],
    dw: &mut [f32],
    dout: &[T],
    x: &[T],
    w: &[T],
    rstd: &[f32],
    (n, c, acc): (usize, usize, bool),
    sms: usize,
    mode: EmuMode,
    seed: u64,
) {
    let grid = n.min(2 * sms) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(dx).ptr_mut(dw).ptr(dout).ptr(x).ptr(w).ptr(rstd);
    a.scalar(n as i32).scalar(c as i32).scalar(acc as i32);
    launch1(
        &sym::<T>("rmsnorm_bwd"),
        grid,
        256,
        c * 4,
        &mut a,
        mode,
        seed,
    );
}

fn check_rmsnorm<T: Storage>(n: usize, c: usize, misalign: usize, sms: usize, seed: u64) {
    let tag = format!(
        "rmsnorm {} N={n} C={c} misalign={misalign} SMs={sms}",
        T::SUFFIX
    );
    let mut r = rng(seed);
    let x = rand_t::<T>(&mut r, n * c, 2.0);
    let w = T::round(&uniform(&mut r, c, 0.5, 1.5));
    let dout = rand_t::<T>(&mut r, n * c, 1.0);
    let dw0 = nonzero(&mut r, c, 1.0);
    // what dx holds before a backward that adds into it (the residual stream's gradient)
    let dx0 = rand_t::<T>(&mut r, n * c, 1.0);
    let eps = 1e-5;
    let dev = cpu();
    let (mut out_w, mut rstd_w) = (vec![0.0; n * c], vec![0.0; n]);
    dev.rmsnorm_fwd(m(&mut out_w), m(&mut rstd_w), v(&x), v(&w), n, c, eps)
        .unwrap();

    // sum_c x^2: positive terms, block tree vs the twin's dot; the relative error of either
    // sum is below (log2 C + C/8) * 2^-24 < 4e-6 for C <= 512, rstd gets half of it, out
    // adds two products (2 roundings): rtol 4e-6.
    let fwd_tol = Tol::new(1e-30, 4e-6);
    let fwd = both_orders(|mode, seed| {
        let mut out = nan_out::<T>(n * c, misalign);
        let mut rstd = nan_out::<f32>(n, 0);
        let (xg, wg) = (input::<T>(&x, misalign), input::<T>(&w, misalign));
        rmsnorm_fwd_k(
            out.get_mut(),
            rstd.get_mut(),
            xg.get(),
            wg.get(),
            n,
            c,
            eps,
            mode,
            seed,
        );
        (read(&tag, &out), read(&tag, &rstd))
    });
    assert_same_bits(&format!("{tag} fwd out"), &fwd[0].0, &fwd[1].0);
    assert_same_bits(&format!("{tag} fwd rstd"), &fwd[0].1, &fwd[1].1);
    fwd_tol
        .out::<T>()
        .check(&format!("{tag} fwd out"), &fwd[0].0, &out_w);
    fwd_tol.check(&format!("{tag} fwd rstd"), &fwd[0].1, &rstd_w);

    // dx = r (w g) - x r^3 dot / C with dot = sum_c w g x: cancelling terms summed by a block
    // tree vs the twin's 8-wide accumulators. A difference of one ulp of sum|w g x| (< 3 C)
    // moves x r^3 dot / C by < 2 * 0.6 * 3 * 2^-23 = 4e-7 (|x| < 2, r^3 ~ 0.6); atol 5e-6
    // allows ~12 such ulp (observed: < 1); rtol 4e-6 for the r (w g) term.
    // dw += sum_n g x r: per-block partials then G atomics in scheduling order; N terms of
    // size < 4: atol 4e-6 * N / 8.
    // With acc, dx0 (|dx0| < 1) is added in f32 before the one rounding: no more than that.
    let dx_tol = Tol::new(5e-6, 4e-6);
    let dw_tol = Tol::new(4e-6 * (n as f32 / 8.0).max(1.0), 4e-6);
    for acc in [false, true] {
        let tag = format!("{tag} acc={acc}");
        let (mut dx_w, mut dw_w) = (dx0.clone(), dw0.clone());
        dev.rmsnorm_bwd(
            m(&mut dx_w),
            m(&mut dw_w),
            v(&dout),
            v(&x),
            v(&w),
            v(&rstd_w),
            n,
            c,
            acc,
        )
        .unwrap();
        let bwd = both_orders(|mode, seed| {
            let mut dx = if acc {
                input::<T>(&dx0, misalign)
            } else {
                nan_out::<T>(n * c, misalign)
            };
            let mut dw = Guarded::from_slice(&dw0);
            let (g, xg, wg) = (
                input::<T>(&dout, misalign),
                input::<T>(&x, misalign),
                input::<T>(&w, misalign),
            );
            let rs = Guarded::from_slice(&rstd_w);
            rmsnorm_bwd_k(
                dx.get_mut(),
                dw.get_mut(),
                g.get(),
                xg.get(),
                wg.get(),
                rs.get(),
                (n, c, acc),
                sms,
                mode,
                seed,
            );
            (read(&tag, &dx), read(&tag, &dw))
        });
        assert_same_bits(&format!("{tag} bwd dx"), &bwd[0].0, &bwd[1].0);
        for (i, (dx, dw)) in bwd.iter().enumerate() {
            dx_tol
                .out::<T>()
                .check(&format!("{tag} bwd dx [{i}]"), dx, &dx_w);
            dw_tol.check(&format!("{tag} bwd dw [{i}]"), dw, &dw_w);
        }
    }
}

#[test]
fn rmsnorm_f32_matches_cpu() {
    // 3 "SMs": the backward runs G = 6 blocks, each taking several rows
    check_rmsnorm::<f32>(19, 300, 0, 3, 10); // vector path, 96 threads
    check_rmsnorm::<f32>(19, 77, 0, 3, 11); // scalar path, partial warp (C = 77)
    check_rmsnorm::<f32>(6, 512, 1, 3, 12); // scalar path by misalignment, 512 threads
    check_rmsnorm::<f32>(3, 1100, 0, 3, 13); // C > 4 * block: several packs per thread
    check_rmsnorm::<f32>(64, 576, 0, 132, 18); // SmolLM2's d_model; one row per block (G = N)
}

#[test]
fn rmsnorm_bf16_matches_cpu() {
    check_rmsnorm::<bf16>(19, 512, 0, 3, 14); // vector path (C % 8 == 0)
    check_rmsnorm::<bf16>(19, 300, 0, 3, 15); // C % 8 != 0: scalar path
    check_rmsnorm::<bf16>(7, 77, 0, 3, 16);
    check_rmsnorm::<bf16>(6, 512, 1, 3, 20); // scalar path by misalignment
    check_rmsnorm::<bf16>(64, 576, 0, 132, 19);
}

/// One tiny launch with one OS thread per CUDA thread (real concurrency; for ThreadSanitizer
/// builds, NLA_EMU_CXXFLAGS=-fsanitize=thread).
#[test]
fn rmsnorm_fwd_in_threads_mode() {
    let (n, c) = (2usize, 77usize);
    let mut r = rng(17);
    let x = nonzero(&mut r, n * c, 2.0);
    let w = uniform(&mut r, c, 0.5, 1.5);
    let (mut out_w, mut rstd_w) = (vec![0.0; n * c], vec![0.0; n]);
    cpu()
        .rmsnorm_fwd(m(&mut out_w), m(&mut rstd_w), v(&x), v(&w), n, c, 1e-5)
        .unwrap();
    let mut out = nan_out::<f32>(n * c, 0);
    let mut rstd = nan_out::<f32>(n, 0);
    rmsnorm_fwd_k::<f32>(
        out.get_mut(),
        rstd.get_mut(),
        &x,
        &w,
        n,
        c,
        1e-5,
        EmuMode::Threads,
        3,
    );
    let tol = Tol::new(1e-30, 4e-6);
    tol.check("rmsnorm threads out", &read("out", &out), &out_w);
    tol.check("rmsnorm threads rstd", &read("rstd", &rstd), &rstd_w);
}

// ------------------------------------------------------------------------------------------
// rope
// ------------------------------------------------------------------------------------------

/// Grid B*T, block 32 * ceil(H * HS / 2 / 32) capped at 256. `pos`: the position read from
/// this one-id buffer by the kernel (the `pos0` argument then 0), else `pos0`.
#[allow(clippy::too_many_arguments)]
fn rope_k<T: Storage>(
    x: &mut [T],
    dims: [usize; 4],
    pos0: usize,
    pos: Option<&[u32]>,
    theta: f32,
    bwd: bool,
    mode: EmuMode,
    seed: u64,
) {
    let [b, t, h, hs] = dims;
    let block = (32 * (h * hs / 2).div_ceil(32)).min(256) as u32;
    let name = sym::<T>(if bwd { "rope_bwd" } else { "rope_fwd" });
    let mut a = EmuArgs::new();
    a.ptr_mut(x);
    match pos {
        Some(p) => a.ptr(p),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { pos0 };
    a.scalar(b as i32)
        .scalar(t as i32)
        .scalar(h as i32)
        .scalar(hs as i32);
    a.scalar(pos0 as i32).scalar(theta);
    launch1(&name, (b * t) as u32, block, 0, &mut a, mode, seed);
}

fn check_rope<T: Storage>(dims: [usize; 4], pos0: usize, theta: f32, seed: u64) {
    let [b, t, h, hs] = dims;
    let tag = format!("rope {} {dims:?} pos0={pos0} theta={theta}", T::SUFFIX);
    let n = b * t * h * hs;
    let mut r = rng(seed);
    let x = rand_t::<T>(&mut r, n, 2.0);
    let dev = cpu();
    for bwd in [false, true] {
        let mut want = x.clone();
        if bwd {
            dev.rope_bwd(m(&mut want), b, t, h, hs, pos0, theta)
                .unwrap();
        } else {
            dev.rope_fwd(m(&mut want), b, t, h, hs, pos0, None, theta)
                .unwrap();
        }
        let got = both_orders(|mode, seed| {
            let mut xg = input::<T>(&x, 0);
            rope_k(xg.get_mut(), dims, pos0, None, theta, bwd, mode, seed);
            read(&tag, &xg)
        });
        let what = format!("{tag} {}", if bwd { "bwd" } else { "fwd" });
        assert_same_bits(&what, &got[0], &got[1]);
        // pos0 read from device memory instead: the same rotation
        let pos = [pos0 as u32];
        let mut xg = input::<T>(&x, 0);
        rope_k(
            xg.get_mut(),
            dims,
            0,
            Some(&pos),
            theta,
            bwd,
            EmuMode::Forward,
            seed,
        );
        assert_same_bits(&format!("{what}, pos in memory"), &read(&tag, &xg), &got[0]);
        // Same f32 angle, cos/sin in f64 rounded to f32, the twin's products and order; only
        // theta^e differs (f64 pow rounded vs glibc powf, both correctly rounded in practice):
        // where they differ by 1 ulp, the angle moves by up to p * 2^-24 rad (6e-5 at p = 1000)
        // and so does the rotated value (|x| < 2): atol 2.5e-7 * (pos0 + T) + 1 ulp.
        let tol = Tol::new(2.5e-7 * (pos0 + t) as f32, 2.4e-7);
        tol.out::<T>().check(&what, &got[0], &want);
    }
}

#[test]
fn rope_f32_matches_cpu() {
    check_rope::<f32>([2, 5, 3, 24], 0, 10000.0, 20); // 36 pairs: one partial warp pair
    check_rope::<f32>([1, 3, 6, 128], 1000, 500000.0, 21); // 384 pairs > 256 threads
    check_rope::<f32>([2, 4, 4, 64], 37, 10000.0, 22); // 128 pairs, T rows wrap per batch
}

#[test]
fn rope_bf16_matches_cpu() {
    check_rope::<bf16>([2, 5, 3, 24], 0, 10000.0, 23);
    check_rope::<bf16>([1, 3, 6, 128], 1000, 500000.0, 24);
}

/// qkv_rope_fwd (q, k, v out of qkv) or qkv_rope_bwd (dqkv out of dq, dk, dv: `parts` then
/// holds the inputs and `fused` the output), block as rope's over NH + NKV heads, grid B*TQ
/// where `grid` is None (the launchers' choice; any grid is correct).
#[allow(clippy::too_many_arguments)]
fn qkv_rope_k<T: Storage>(
    parts: [&mut [T]; 3],
    fused: &mut [T],
    [b, tq, tmax, nh, nkv, hs]: [usize; 6],
    pos0: usize,
    pos: Option<&[u32]>,
    (bwd, grid): (bool, Option<u32>),
    mode: EmuMode,
    seed: u64,
) {
    let block = (32 * ((nh + nkv) * hs / 2).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    let [q, k, v] = parts;
    if bwd {
        a.ptr_mut(fused).ptr(q).ptr(k).ptr(v);
    } else {
        a.ptr_mut(q).ptr_mut(k).ptr_mut(v).ptr(fused);
    }
    match pos {
        Some(p) => a.ptr(p),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { pos0 };
    for x in [b, tq, tmax, nh, nkv, hs, pos0] {
        a.scalar(x as i32);
    }
    a.scalar(10000.0f32);
    let name = sym::<T>(if bwd { "qkv_rope_bwd" } else { "qkv_rope_fwd" });
    let grid = grid.unwrap_or((b * tq) as u32);
    launch1(&name, grid, block, 0, &mut a, mode, seed);
}

/// Positions pos0..pos0+TQ of each batch row of x [B,TMAX,W]: [B,TQ,W].
fn window(x: &[f32], [b, tq, tmax]: [usize; 3], pos0: usize, w: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|bi| x[(bi * tmax + pos0) * w..(bi * tmax + pos0 + tq) * w].to_vec())
        .collect()
}

/// The fused kernels against the CPU twin (both thread orders), and bit for bit against the
/// rope kernel run on the split parts: one rotation code, two layouts. k and v are a cache
/// [B,TMAX,NKV,HS] holding earlier values: the kernel writes positions pos0..pos0+TQ and
/// leaves the others (compared with the twin, which does the same), and a pos0 beyond TMAX -
/// TQ read from memory writes nothing.
fn check_qkv_rope<T: Storage>(dims: [usize; 6], pos0: usize, seed: u64) {
    let [b, tq, tmax, nh, nkv, hs] = dims;
    let tag = format!("qkv_rope {} {dims:?} pos0={pos0}", T::SUFFIX);
    let (rows, qd, kvd) = (b * tq, nh * hs, nkv * hs);
    let ld = qd + 2 * kvd;
    let d = CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
    };
    let theta = 10000.0;
    let mut r = rng(seed);
    let dev = cpu();
    // the parts of each row of a fused [rows, ld] buffer
    let split = |x: &[f32]| -> [Vec<f32>; 3] {
        let part = |lo: usize, w: usize| -> Vec<f32> {
            x.chunks(ld)
                .flat_map(|row| row[lo..lo + w].to_vec())
                .collect()
        };
        [part(0, qd), part(qd, kvd), part(qd + kvd, kvd)]
    };
    let win = |x: &[f32]| window(x, [b, tq, tmax], pos0, kvd);
    let tol = Tol::new(2.5e-7 * (pos0 + tq) as f32, 2.4e-7);

    // forward: q, k, v out of qkv, into caches holding earlier values
    let qkv = rand_t::<T>(&mut r, rows * ld, 2.0);
    let caches = [0, 0].map(|_| rand_t::<T>(&mut r, b * tmax * kvd, 1.0));
    let mut want = [vec![0.0; rows * qd], caches[0].clone(), caches[1].clone()];
    let [wq, wk, wv] = &mut want;
    dev.qkv_rope_fwd(m(wq), m(wk), m(wv), v(&qkv), None, d, theta)
        .unwrap();
    let run_fwd = |mode, seed, pos: Option<&[u32]>, grid, pos0| {
        let (mut q, mut k, mut vv) = (
            nan_out::<T>(rows * qd, 0),
            input::<T>(&caches[0], 0),
            input::<T>(&caches[1], 0),
        );
        let mut f = input::<T>(&qkv, 0);
        qkv_rope_k(
            [q.get_mut(), k.get_mut(), vv.get_mut()],
            f.get_mut(),
            dims,
            pos0,
            pos,
            (false, grid),
            mode,
            seed,
        );
        [q, k, vv].map(|x| read(&tag, &x))
    };
    let got = both_orders(|mode, seed| run_fwd(mode, seed, None, None, pos0));
    let pos = [pos0 as u32];
    let in_memory = run_fwd(EmuMode::Forward, seed, Some(&pos), None, pos0);
    // two blocks taking the rows in turn: the table rewritten per row behind a barrier
    let strided = both_orders(|mode, seed| run_fwd(mode, seed, None, Some(2), pos0));
    // a position whose TQ rows pass the cache's end, read from memory or given: nothing
    // written
    let beyond = tmax - tq + 1;
    let none = run_fwd(EmuMode::Forward, seed, Some(&[beyond as u32]), None, pos0);
    let none_arg = run_fwd(EmuMode::Forward, seed, None, None, beyond);
    let [sq, sk, sv] = split(&qkv);
    for (i, (name, h)) in [("q", nh), ("k", nkv), ("v", 0)].into_iter().enumerate() {
        let what = format!("{tag} fwd {name}");
        assert_same_bits(&what, &got[0][i], &got[1][i]);
        assert_same_bits(&format!("{what}, pos in memory"), &in_memory[i], &got[0][i]);
        for s in &strided {
            assert_same_bits(&format!("{what}, grid 2"), &s[i], &got[0][i]);
        }
        tol.out::<T>().check(&what, &got[0][i], &want[i]);
        if i > 0 {
            // the other positions keep the cache's values, bit for bit
            let (mut kept, mut was) = (got[0][i].clone(), caches[i - 1].clone());
            for x in [&mut kept, &mut was] {
                for bi in 0..b {
                    x[(bi * tmax + pos0) * kvd..(bi * tmax + pos0 + tq) * kvd].fill(0.0);
                }
            }
            assert_same_bits(&format!("{what}, other positions"), &kept, &was);
            for n in [&none, &none_arg] {
                assert_same_bits(&format!("{what}, pos beyond"), &n[i], &caches[i - 1]);
            }
        } else {
            assert!(
                [&none[0], &none_arg[0]]
                    .iter()
                    .all(|q| q.iter().all(|x| x.is_nan())),
                "{what}: a pos beyond the cache wrote q"
            );
        }
        // the rope kernel on the split part (v: the part itself)
        let part = [&sq, &sk, &sv][i];
        let mut x = input::<T>(part, 0);
        if h > 0 {
            let rd = [b, tq, h, hs];
            rope_k(
                x.get_mut(),
                rd,
                pos0,
                None,
                theta,
                false,
                EmuMode::Forward,
                0,
            );
        }
        let new = if i == 0 {
            got[0][0].clone()
        } else {
            win(&got[0][i])
        };
        assert_same_bits(&format!("{what} = split, rope"), &new, &read(&tag, &x));
    }

    // backward: dqkv out of dq and the window of dk, dv
    let dparts = [rows * qd, b * tmax * kvd, b * tmax * kvd].map(|n| rand_t::<T>(&mut r, n, 1.0));
    let [dq, dk, dv] = &dparts;
    let mut want = vec![0.0; rows * ld];
    dev.qkv_rope_bwd(m(&mut want), v(dq), v(dk), v(dv), d, theta)
        .unwrap();
    let run_bwd = |mode, seed, grid, pos0| {
        let mut ins = dparts.clone().map(|x| input::<T>(&x, 0));
        let mut f = nan_out::<T>(rows * ld, 0);
        let [q, k, v] = &mut ins;
        let parts = [q.get_mut(), k.get_mut(), v.get_mut()];
        qkv_rope_k(
            parts,
            f.get_mut(),
            dims,
            pos0,
            None,
            (true, grid),
            mode,
            seed,
        );
        read(&tag, &f)
    };
    let got = both_orders(|mode, seed| run_bwd(mode, seed, None, pos0));
    let what = format!("{tag} bwd");
    assert_same_bits(&what, &got[0], &got[1]);
    for s in both_orders(|mode, seed| run_bwd(mode, seed, Some(2), pos0)) {
        assert_same_bits(&format!("{what}, grid 2"), &s, &got[0]);
    }
    let none = run_bwd(EmuMode::Forward, seed, None, beyond);
    assert!(
        none.iter().all(|x| x.is_nan()),
        "{what}: a pos0 beyond the cache wrote dqkv"
    );
    tol.out::<T>().check(&what, &got[0], &want);
    let split_got = split(&got[0]);
    for (i, (name, h)) in [("dq", nh), ("dk", nkv), ("dv", 0)].into_iter().enumerate() {
        let part = if i == 0 {
            dparts[0].clone()
        } else {
            win(&dparts[i])
        };
        let mut x = input::<T>(&part, 0);
        if h > 0 {
            let rd = [b, tq, h, hs];
            rope_k(
                x.get_mut(),
                rd,
                pos0,
                None,
                theta,
                true,
                EmuMode::Forward,
                0,
            );
        }
        let what = format!("{what} {name} = rope_bwd");
        assert_same_bits(&what, &split_got[i], &read(&tag, &x));
    }
}

// dims [B, TQ, TMAX, NH, NKV, HS]
#[test]
fn qkv_rope_f32_matches_cpu() {
    check_qkv_rope::<f32>([2, 5, 5, 4, 2, 24], 0, 25); // 72 pairs: a partial warp; TMAX = TQ
    check_qkv_rope::<f32>([1, 3, 1003, 6, 2, 128], 1000, 26); // 512 pairs > 256 threads
    check_qkv_rope::<f32>([2, 4, 45, 2, 2, 64], 37, 27); // NKV = NH; positions after
    check_qkv_rope::<f32>([3, 1, 9, 4, 2, 32], 8, 30); // decode: the cache's last position
}

#[test]
fn qkv_rope_bf16_matches_cpu() {
    check_qkv_rope::<bf16>([2, 5, 5, 4, 2, 24], 0, 28);
    check_qkv_rope::<bf16>([1, 3, 1003, 6, 2, 128], 1000, 29);
    check_qkv_rope::<bf16>([3, 2, 12, 4, 2, 32], 6, 31);
}

// ------------------------------------------------------------------------------------------
// swiglu and residual (elementwise)
// ------------------------------------------------------------------------------------------

/// Block 256, grid ceil(n / (256 * pack)).
fn elementwise_grid<T: Storage>(n: usize) -> u32 {
    n.div_ceil(256 * T::PACK).max(1) as u32
}

fn swiglu_fwd_k<T: Storage>(out: &mut [T], gu: &[T], mode: EmuMode, seed: u64) {
    let n = out.len();
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(gu).scalar(n as i64);
    launch1(
        &sym::<T>("swiglu_fwd"),
        elementwise_grid::<T>(n),
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

fn swiglu_bwd_k<T: Storage>(dgu: &mut [T], dout: &[T], gu: &[T], mode: EmuMode, seed: u64) {
    let n = dout.len();
    let mut a = EmuArgs::new();
    a.ptr_mut(dgu).ptr(dout).ptr(gu).scalar(n as i64);
    launch1(
        &sym::<T>("swiglu_bwd"),
        elementwise_grid::<T>(n),
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// gu = [gate; up] and dgu = [dgate; dup] are one buffer each: up and dup start n elements in,
/// so the 16-byte path needs n a multiple of the pack as well as aligned buffers. The inputs
/// (gu, dout) start `misalign` elements past 16-byte alignment, the outputs (out, dgu)
/// `misalign_out`.
fn check_swiglu<T: Storage>(n: usize, misalign: usize, misalign_out: usize, seed: u64) {
    let tag = format!(
        "swiglu {} n={n} misalign={misalign}/{misalign_out}",
        T::SUFFIX
    );
    let mut r = rng(seed);
    let mut gate = uniform(&mut r, n, -8.0, 8.0);
    // saturation: sigmoid 0 (e^-g overflows) and 1, and the point 0
    for (i, g) in [-100.0, -90.0, -87.5, 0.0, 30.0, 100.0]
        .into_iter()
        .enumerate()
    {
        gate[i * 97] = g;
    }
    let gate = T::round(&gate);
    let up = rand_t::<T>(&mut r, n, 2.0);
    let gu = [gate, up].concat();
    let dout = rand_t::<T>(&mut r, n, 1.0);
    let dev = cpu();
    let mut out_w = vec![0.0; n];
    dev.swiglu_fwd(m(&mut out_w), v(&gu)).unwrap();
    let mut dgu_w = vec![0.0; 2 * n];
    dev.swiglu_bwd(m(&mut dgu_w), v(&dout), v(&gu)).unwrap();

    // sigmoid from expf and __fdividef (each within 2 ulp) vs the twin's vexp and IEEE
    // division (vexp within 2 ulp): s within ~6 ulp; silu'(g) = s (1 + g (1 - s)) carries
    // |g| * 6 ulp absolute through 1 - s; products of |g| < 8, |u| < 2, |d| < 1:
    // rtol 1e-6 and atol 2e-5 (|d u s g| * 6 * 2^-24 <= 16 * 3.6e-7).
    // Near g = -87.5 the kernel's sigmoid flushes to 0 where the twin's is ~1e-38: atol covers.
    let tol = Tol::new(2e-5, 1e-6);
    let got = both_orders(|mode, seed| {
        let (gu, d) = (input::<T>(&gu, misalign), input::<T>(&dout, misalign));
        let mut out = nan_out::<T>(n, misalign_out);
        swiglu_fwd_k(out.get_mut(), gu.get(), mode, seed);
        let mut dgu = nan_out::<T>(2 * n, misalign_out);
        swiglu_bwd_k(dgu.get_mut(), d.get(), gu.get(), mode, seed);
        (read(&tag, &out), read(&tag, &dgu))
    });
    assert_same_bits(&format!("{tag} out"), &got[0].0, &got[1].0);
    assert_same_bits(&format!("{tag} dgu"), &got[0].1, &got[1].1);
    tol.out::<T>()
        .check(&format!("{tag} fwd out"), &got[0].0, &out_w);
    tol.out::<T>()
        .check(&format!("{tag} bwd dgate"), &got[0].1[..n], &dgu_w[..n]);
    tol.out::<T>()
        .check(&format!("{tag} bwd dup"), &got[0].1[n..], &dgu_w[n..]);
}

#[test]
fn swiglu_f32_matches_cpu() {
    // the vector path, 7 blocks
    check_swiglu::<f32>(6152, 0, 0, 30);
    // scalar paths: gate aligned, up not (n % 4 = 3); up 8- but not 16-byte aligned; all
    // misaligned; the inputs aligned and the outputs not
    check_swiglu::<f32>(6151, 0, 0, 35);
    check_swiglu::<f32>(6150, 0, 0, 36);
    check_swiglu::<f32>(6151, 1, 1, 31);
    check_swiglu::<f32>(6152, 0, 1, 37);
}

#[test]
fn swiglu_bf16_matches_cpu() {
    // the vector path, 4 blocks; at SmolLM2's MLP width, 48 blocks
    check_swiglu::<bf16>(6152, 0, 0, 32);
    check_swiglu::<bf16>(64 * 1536, 0, 0, 34);
    // scalar paths: up misaligned (n % 8 = 7, then 4); all misaligned (one block); the
    // inputs aligned and the outputs not
    check_swiglu::<bf16>(6151, 0, 0, 38);
    check_swiglu::<bf16>(6148, 0, 0, 39);
    check_swiglu::<bf16>(1003, 1, 1, 33);
    check_swiglu::<bf16>(6152, 0, 1, 40);
}

fn residual_fwd_k<T: Storage>(out: &mut [T], a: &[T], b: &[T], mode: EmuMode, seed: u64) {
    let n = out.len();
    let mut args = EmuArgs::new();
    args.ptr_mut(out).ptr(a).ptr(b).scalar(n as i64);
    launch1(
        &sym::<T>("residual_fwd"),
        elementwise_grid::<T>(n),
        256,
        0,
        &mut args,
        mode,
        seed,
    );
}

fn residual_bwd_k<T: Storage>(da: &mut [T], dout: &[T], mode: EmuMode, seed: u64) {
    let n = da.len();
    let mut args = EmuArgs::new();
    args.ptr_mut(da).ptr(dout).scalar(n as i64);
    launch1(
        &sym::<T>("residual_bwd"),
        elementwise_grid::<T>(n),
        256,
        0,
        &mut args,
        mode,
        seed,
    );
}

fn check_residual<T: Storage>(n: usize, misalign: usize, seed: u64) {
    let tag = format!("residual {} n={n} misalign={misalign}", T::SUFFIX);
    let mut r = rng(seed);
    let a = rand_t::<T>(&mut r, n, 4.0);
    let b = rand_t::<T>(&mut r, n, 1.0);
    let da0 = rand_t::<T>(&mut r, n, 1.0); // += onto a non-zero gradient
    let dev = cpu();
    let mut out_w = vec![0.0; n];
    dev.residual_fwd(m(&mut out_w), v(&a), v(&b)).unwrap();
    let mut da_w = da0.clone();
    dev.residual_bwd(m(&mut da_w), v(&b)).unwrap();
    // one f32 add, rounded once to T: exactly the twin's sum stored as T
    let got = both_orders(|mode, seed| {
        let (ag, bg) = (input::<T>(&a, misalign), input::<T>(&b, misalign));
        let mut out = nan_out::<T>(n, misalign);
        residual_fwd_k(out.get_mut(), ag.get(), bg.get(), mode, seed);
        let mut da = input::<T>(&da0, misalign);
        residual_bwd_k(da.get_mut(), bg.get(), mode, seed);
        out.assert_intact(&tag);
        da.assert_intact(&tag);
        (out.to_vec(), da.to_vec())
    });
    for (out, da) in &got {
        assert_stored_exact::<T>(&format!("{tag} fwd"), out, &out_w);
        assert_stored_exact::<T>(&format!("{tag} bwd"), da, &da_w);
    }
}

#[test]
fn residual_f32_matches_cpu() {
    check_residual::<f32>(6151, 0, 40);
    check_residual::<f32>(6151, 1, 41);
}

#[test]
fn residual_bf16_matches_cpu() {
    check_residual::<bf16>(6151, 0, 42);
    check_residual::<bf16>(1003, 3, 43);
}

// ------------------------------------------------------------------------------------------
// adamw and sum_squares
// ------------------------------------------------------------------------------------------

/// (inv_bc1, inv_bc2) in f64 from the 1-based step, rounded to f32 (as the twin).
fn bias_corrections(hp: &AdamwStep) -> (f32, f32) {
    let step = i32::try_from(hp.step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
    ((1.0 / bc1) as f32, (1.0 / bc2) as f32)
}

/// Block 256, grid ceil(n / 1024). `p16`: Some for adamw_bf16.
#[allow(clippy::too_many_arguments)]
fn adamw_k(
    p: &mut [f32],
    p16: Option<&mut [bf16]>,
    g: &[f32],
    mm: &mut [f32],
    vv: &mut [f32],
    hp: &AdamwStep,
    mode: EmuMode,
    seed: u64,
) {
    let n = p.len();
    let (inv_bc1, inv_bc2) = bias_corrections(hp);
    let name = if p16.is_some() {
        "adamw_bf16"
    } else {
        "adamw_f32"
    };
    let mut a = EmuArgs::new();
    a.ptr_mut(p);
    if let Some(p16) = p16 {
        a.ptr_mut(p16);
    }
    a.ptr(g).ptr_mut(mm).ptr_mut(vv).scalar(n as i64);
    a.scalar(hp.lr)
        .scalar(hp.beta1)
        .scalar(hp.beta2)
        .scalar(hp.eps);
    a.scalar(hp.weight_decay)
        .scalar(inv_bc1)
        .scalar(inv_bc2)
        .scalar(hp.grad_scale);
    launch1(
        name,
        n.div_ceil(1024).max(1) as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// Block 256, grid min(ceil(n / 2048), 2 * SMs); adds into out[0].
fn sum_squares_k<T: Storage>(out: &mut [f64], x: &[T], sms: usize, mode: EmuMode, seed: u64) {
    let n = x.len();
    let grid = n.div_ceil(2048).min(2 * sms).max(1) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(x).scalar(n as i64);
    launch1(&sym::<T>("sum_squares"), grid, 256, 0, &mut a, mode, seed);
}

fn check_adamw(n: usize, misalign: usize, bf16_copy: bool, seed: u64) {
    let tag = format!("adamw n={n} misalign={misalign} bf16={bf16_copy}");
    let mut r = rng(seed);
    let p0 = nonzero(&mut r, n, 1.0);
    let g = nonzero(&mut r, n, 1.0);
    let m0 = nonzero(&mut r, n, 0.1);
    let v0 = uniform(&mut r, n, 1e-4, 1e-2);
    let hp = AdamwStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 7,
        grad_scale: 0.7,
    };
    let (mut p_w, mut m_w, mut v_w) = (p0.clone(), m0.clone(), v0.clone());
    cpu()
        .adamw(m(&mut p_w), None, v(&g), m(&mut m_w), m(&mut v_w), &hp)
        .unwrap();
    // the twin's f32 operations in the twin's order, IEEE sqrt and division: exact
    for (mode, seed) in ORDERS {
        let mut p = Guarded::from_slice_misaligned(&p0, misalign);
        let mut mm = Guarded::from_slice_misaligned(&m0, misalign);
        let mut vv = Guarded::from_slice_misaligned(&v0, misalign);
        let gg = Guarded::from_slice_misaligned(&g, misalign);
        let mut p16 = nan_out::<bf16>(n, misalign);
        let p16_arg = if bf16_copy { Some(p16.get_mut()) } else { None };
        adamw_k(
            p.get_mut(),
            p16_arg,
            gg.get(),
            mm.get_mut(),
            vv.get_mut(),
            &hp,
            mode,
            seed,
        );
        let what = format!("{tag} ({mode:?})");
        assert_stored_exact::<f32>(&format!("{what} p"), &read(&what, &p), &p_w);
        assert_stored_exact::<f32>(&format!("{what} m"), &read(&what, &mm), &m_w);
        assert_stored_exact::<f32>(&format!("{what} v"), &read(&what, &vv), &v_w);
        p16.assert_intact(&what);
        if bf16_copy {
            // the working copy is the new master weight rounded once
            assert_stored_exact::<bf16>(&format!("{what} p16"), p16.get(), &p_w);
        } else {
            assert!(
                p16.get().iter().all(|x| x.is_nan()),
                "{what}: adamw_f32 wrote p16"
            );
        }
    }
}

#[test]
fn adamw_matches_cpu() {
    check_adamw(1203, 0, false, 50); // vector path + 3-element tail, 2 blocks
    check_adamw(1203, 1, false, 51); // scalar path
    check_adamw(1203, 0, true, 52); // with the bf16 working copy
    check_adamw(517, 2, true, 53); // p16 8-byte aligned, f32 buffers not: scalar path
}

fn check_sum_squares<T: Storage>(n: usize, misalign: usize, sms: usize, seed: u64) {
    let tag = format!(
        "sum_squares {} n={n} misalign={misalign} sms={sms}",
        T::SUFFIX
    );
    let mut r = rng(seed);
    let x = rand_t::<T>(&mut r, n, 3.0);
    let want = cpu().sum_squares(v(&x)).unwrap();
    let init = 1.25f64; // += into a slot that already holds something
    for (mode, seed) in ORDERS {
        let mut out = Guarded::from_slice(&[init]);
        let xg = input::<T>(&x, misalign);
        sum_squares_k(out.get_mut(), xg.get(), sms, mode, seed);
        out.assert_intact(&tag);
        let got = out.get()[0] - init;
        // aligned: the squares of one 16-byte pack are summed in f32 (positive terms: relative
        // error < 8 * 2^-24 < 5e-7), everything else in f64; misaligned: all f64 (~1e-15)
        let rtol = if misalign == 0 { 1e-6 } else { 1e-12 };
        if std::env::var_os("NLA_TOL_REPORT").is_some() {
            eprintln!(
                "tol {tag}: rel {:e} (allowed {rtol:e})",
                (got - want).abs() / want
            );
        }
        assert!(
            got.is_finite() && (got - want).abs() <= rtol * want,
            "{tag} ({mode:?}): got {got}, want {want} (rel {:e})",
            (got - want).abs() / want
        );
    }
}

#[test]
fn sum_squares_matches_cpu() {
    check_sum_squares::<f32>(3 * 2048 + 5, 0, 132, 60); // 4 blocks, vector path + tail
    check_sum_squares::<f32>(3 * 2048 + 5, 0, 1, 61); // 2 blocks: grid-stride loop
    check_sum_squares::<f32>(3001, 1, 132, 62); // scalar f64 path
    check_sum_squares::<bf16>(3 * 2048 + 5, 0, 132, 63);
    check_sum_squares::<bf16>(3001, 1, 1, 64);
}

// ------------------------------------------------------------------------------------------
// inject
// ------------------------------------------------------------------------------------------

/// Grid S, block 256.
#[allow(clippy::too_many_arguments)]
fn inject_fwd_k<T: Storage>(
    h: &mut [T],
    sites: &[u32],
    vecs: &[T],
    n: usize,
    c: usize,
    add: bool,
    mode: EmuMode,
    seed: u64,
) {
    let s = sites.len();
    let mut a = EmuArgs::new();
    a.ptr_mut(h).ptr(sites).ptr(vecs);
    a.scalar(s as i32)
        .scalar(n as i32)
        .scalar(c as i32)
        .scalar(add as i32);
    launch1(
        &sym::<T>("inject_fwd"),
        s as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// Grid S, block 256.
#[allow(clippy::too_many_arguments)]
fn inject_bwd_k<T: Storage>(
    dvecs: &mut [T],
    dh: &mut [T],
    sites: &[u32],
    n: usize,
    c: usize,
    add: bool,
    mode: EmuMode,
    seed: u64,
) {
    let s = sites.len();
    let mut a = EmuArgs::new();
    a.ptr_mut(dvecs).ptr_mut(dh).ptr(sites);
    a.scalar(s as i32)
        .scalar(n as i32)
        .scalar(c as i32)
        .scalar(add as i32);
    launch1(
        &sym::<T>("inject_bwd"),
        s as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

fn check_inject<T: Storage>(n: usize, c: usize, s: usize, seed: u64) {
    let mut r = rng(seed);
    // s distinct rows in increasing order
    let mut sites: Vec<u32> = Vec::new();
    while sites.len() < s {
        let k = r.random_range(0..n as u32);
        if !sites.contains(&k) {
            sites.push(k);
        }
    }
    sites.sort_unstable();
    let h0 = rand_t::<T>(&mut r, n * c, 1.0);
    let vecs = rand_t::<T>(&mut r, s * c, 3.0);
    let dh0 = rand_t::<T>(&mut r, n * c, 1.0);
    let dev = cpu();
    let sites_d = dev.upload_ids(&sites).unwrap();
    for (mode_i, add) in [(InjectMode::Replace, false), (InjectMode::Add, true)] {
        let tag = format!("inject {} N={n} C={c} S={s} {mode_i:?}", T::SUFFIX);
        let mut h_w = h0.clone();
        dev.inject_fwd(m(&mut h_w), &sites_d, v(&vecs), n, c, mode_i)
            .unwrap();
        let (mut dv_w, mut dh_w) = (vec![0.0; s * c], dh0.clone());
        dev.inject_bwd(m(&mut dv_w), m(&mut dh_w), &sites_d, n, c, mode_i)
            .unwrap();
        // copies, and for add one f32 sum rounded once: exact
        for (mode, seed) in ORDERS {
            let mut h = input::<T>(&h0, 0);
            let vg = input::<T>(&vecs, 0);
            inject_fwd_k(h.get_mut(), &sites, vg.get(), n, c, add, mode, seed);
            h.assert_intact(&tag);
            assert_stored_exact::<T>(&format!("{tag} fwd h ({mode:?})"), h.get(), &h_w);
            let mut dvecs = nan_out::<T>(s * c, 0);
            let mut dh = input::<T>(&dh0, 0);
            inject_bwd_k(dvecs.get_mut(), dh.get_mut(), &sites, n, c, add, mode, seed);
            dvecs.assert_intact(&tag);
            dh.assert_intact(&tag);
            assert_stored_exact::<T>(&format!("{tag} bwd dvecs ({mode:?})"), dvecs.get(), &dv_w);
            assert_stored_exact::<T>(&format!("{tag} bwd dh ({mode:?})"), dh.get(), &dh_w);
        }
    }
}

#[test]
fn inject_f32_matches_cpu() {
    check_inject::<f32>(18, 300, 5, 70); // C > block: two passes per thread
    check_inject::<f32>(18, 33, 18, 71); // every row a site, C = 33
}

#[test]
fn inject_bf16_matches_cpu() {
    check_inject::<bf16>(18, 300, 5, 72);
    check_inject::<bf16>(11, 33, 4, 73);
}

// ------------------------------------------------------------------------------------------
// norm_scale
// ------------------------------------------------------------------------------------------

/// Grid N, block 256.
fn norm_scale_fwd_k<T: Storage>(
    y: &mut [T],
    x: &[T],
    n: usize,
    d: usize,
    s: f32,
    mode: EmuMode,
    seed: u64,
) {
    let mut a = EmuArgs::new();
    a.ptr_mut(y)
        .ptr(x)
        .scalar(n as i32)
        .scalar(d as i32)
        .scalar(s);
    launch1(
        &sym::<T>("norm_scale_fwd"),
        n as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// Grid N, block 256.
#[allow(clippy::too_many_arguments)]
fn norm_scale_bwd_k<T: Storage>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    n: usize,
    d: usize,
    s: f32,
    mode: EmuMode,
    seed: u64,
) {
    let mut a = EmuArgs::new();
    a.ptr_mut(dx)
        .ptr(dy)
        .ptr(x)
        .scalar(n as i32)
        .scalar(d as i32)
        .scalar(s);
    launch1(
        &sym::<T>("norm_scale_bwd"),
        n as u32,
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

fn check_norm_scale<T: Storage>(n: usize, d: usize, seed: u64) {
    let tag = format!("norm_scale {} N={n} D={d}", T::SUFFIX);
    let s = 3.0f32;
    let mut r = rng(seed);
    let mut x = nonzero(&mut r, n * d, 2.0);
    // row 1: all zero (norm 0 < 1e-12: the clamp); row 3: norm ~1e-13 (the clamp, non-zero)
    x[d..2 * d].fill(0.0);
    for e in &mut x[3 * d..4 * d] {
        *e *= 1e-14;
    }
    let x = T::round(&x);
    let dy = rand_t::<T>(&mut r, n * d, 1.0);
    let dev = cpu();
    let mut y_w = vec![0.0; n * d];
    dev.norm_scale_fwd(m(&mut y_w), v(&x), n, d, s).unwrap();
    let mut dx_w = vec![0.0; n * d];
    dev.norm_scale_bwd(m(&mut dx_w), v(&dy), v(&x), n, d, s)
        .unwrap();
    // ||x||: positive terms summed by a block tree vs the twin's dot: relative error of either
    // below (log2 D + D/8) * 2^-24 < 3e-6 for D <= 300; y = x * (s / norm): rtol 4e-6.
    let y_tol = Tol::new(1e-30, 4e-6);
    // dx = (s/|x|) (dy - x (x.dy)/|x|^2): x.dy cancels, its error ~ D/8 2^-24 sum|x dy|
    // (~4e-6 * 0.5 * D^0.5 |x| relative to the terms) enters as x proj: atol ~ 2e-5 * s/|x|
    // per unit; with |x| >= 1 (rows of D >= 40 values in [0.1, 2)) atol 1e-4 s.
    let dx_tol = Tol::new(1e-4 * s, 4e-6);
    let got = both_orders(|mode, seed| {
        let xg = input::<T>(&x, 0);
        let g = input::<T>(&dy, 0);
        let mut y = nan_out::<T>(n * d, 0);
        norm_scale_fwd_k(y.get_mut(), xg.get(), n, d, s, mode, seed);
        let mut dx = nan_out::<T>(n * d, 0);
        norm_scale_bwd_k(dx.get_mut(), g.get(), xg.get(), n, d, s, mode, seed);
        (read(&tag, &y), read(&tag, &dx))
    });
    assert_same_bits(&format!("{tag} fwd"), &got[0].0, &got[1].0);
    assert_same_bits(&format!("{tag} bwd"), &got[0].1, &got[1].1);
    y_tol
        .out::<T>()
        .check(&format!("{tag} fwd y"), &got[0].0, &y_w);
    // the clamped row 3 has dx = 3e12 dy: compare rows apart so that it does not dominate
    for row in 0..n {
        let sl = row * d..(row + 1) * d;
        let tol = if row == 1 || row == 3 {
            Tol::new(0.0, 2.4e-7)
        } else {
            dx_tol
        };
        tol.out::<T>().check(
            &format!("{tag} bwd dx row {row}"),
            &got[0].1[sl.clone()],
            &dx_w[sl],
        );
    }
}

#[test]
fn norm_scale_f32_matches_cpu() {
    check_norm_scale::<f32>(7, 300, 80); // D > block
    check_norm_scale::<f32>(5, 40, 81); // D < block, partial warp
}

#[test]
fn norm_scale_bf16_matches_cpu() {
    check_norm_scale::<bf16>(7, 300, 82);
    check_norm_scale::<bf16>(5, 40, 83);
}

// ------------------------------------------------------------------------------------------
// pool
// ------------------------------------------------------------------------------------------

fn pool_mode_code(mode: PoolMode) -> i32 {
    match mode {
        PoolMode::Last => 0,
        PoolMode::Mean => 1,
        PoolMode::Max => 2,
        PoolMode::Weighted => 3,
    }
}

/// Grid B, block 256, dynamic shared memory T * 4 bytes for weighted. `w` empty for the other
/// modes (the CUDA launcher passes null; the kernel does not read it).
#[allow(clippy::too_many_arguments)]
fn pool_fwd_k<T: Storage>(
    out: &mut [T],
    h: &[T],
    mask: &[f32],
    w: &[T],
    dims: [usize; 3],
    pm: PoolMode,
    mode: EmuMode,
    seed: u64,
) {
    let [b, t, c] = dims;
    let smem = if pm == PoolMode::Weighted { t * 4 } else { 0 };
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(h).ptr(mask).ptr(w);
    a.scalar(b as i32)
        .scalar(t as i32)
        .scalar(c as i32)
        .scalar(pool_mode_code(pm));
    launch1(
        &sym::<T>("pool_fwd"),
        b as u32,
        256,
        smem,
        &mut a,
        mode,
        seed,
    );
}

/// Grid B, block 256, dynamic shared memory 3 * T * 4 bytes for weighted.
#[allow(clippy::too_many_arguments)]
fn pool_bwd_k<T: Storage>(
    dh: &mut [T],
    dw: &mut [f32],
    dout: &[T],
    h: &[T],
    mask: &[f32],
    w: &[T],
    dims: [usize; 3],
    pm: PoolMode,
    mode: EmuMode,
    seed: u64,
) {
    let [b, t, c] = dims;
    let smem = if pm == PoolMode::Weighted {
        3 * t * 4
    } else {
        0
    };
    let mut a = EmuArgs::new();
    a.ptr_mut(dh).ptr_mut(dw).ptr(dout).ptr(h).ptr(mask).ptr(w);
    a.scalar(b as i32)
        .scalar(t as i32)
        .scalar(c as i32)
        .scalar(pool_mode_code(pm));
    launch1(
        &sym::<T>("pool_bwd"),
        b as u32,
        256,
        smem,
        &mut a,
        mode,
        seed,
    );
}

fn check_pool<T: Storage>(lens: &[usize], t: usize, c: usize, seed: u64) {
    let b = lens.len();
    let dims = [b, t, c];
    let tmax = t + 2;
    let mut r = rng(seed);
    let mut mask = vec![0.0f32; b * t];
    let mut h = vec![0.0f32; b * t * c];
    for (bi, &len) in lens.iter().enumerate() {
        mask[bi * t..bi * t + len].fill(1.0);
        for ti in 0..t {
            for j in 0..c {
                // real tokens: multiples of 1/8 in [-1, 1] (ties for max, exact in bf16, never
                // zero); padding: 50, larger than any real value (must never be pooled)
                h[(bi * t + ti) * c + j] = if ti < len {
                    let k = r.random_range(1..=8) as f32 / 8.0;
                    if r.random_bool(0.5) {
                        k
                    } else {
                        -k
                    }
                } else {
                    50.0
                };
            }
        }
    }
    let w = T::round(&uniform(&mut r, tmax, -2.0, 2.0));
    let dout = rand_t::<T>(&mut r, b * c, 1.0);
    let dw0 = nonzero(&mut r, tmax, 1.0);
    let dev = cpu();
    for pm in [
        PoolMode::Last,
        PoolMode::Mean,
        PoolMode::Max,
        PoolMode::Weighted,
    ] {
        let tag = format!("pool {} lens={lens:?} T={t} C={c} {pm:?}", T::SUFFIX);
        let weighted = pm == PoolMode::Weighted;
        let mut out_w = vec![0.0; b * c];
        let wv = weighted.then(|| v(&w));
        dev.pool_fwd(m(&mut out_w), v(&h), v(&mask), wv, b, t, c, pm)
            .unwrap();
        let mut dh_w = vec![0.0; b * t * c];
        let mut dw_w = dw0.clone();
        let dwv = weighted.then(|| m(&mut dw_w));
        dev.pool_bwd(
            m(&mut dh_w),
            dwv,
            v(&dout),
            v(&h),
            v(&mask),
            wv,
            b,
            t,
            c,
            pm,
        )
        .unwrap();

        let wk: Vec<T> = if weighted {
            T::from_f32s(&w)
        } else {
            Vec::new()
        };
        let got = both_orders(|mode, seed| {
            let (hg, g) = (input::<T>(&h, 0), input::<T>(&dout, 0));
            let mut out = nan_out::<T>(b * c, 0);
            pool_fwd_k(out.get_mut(), hg.get(), &mask, &wk, dims, pm, mode, seed);
            let mut dh = nan_out::<T>(b * t * c, 0);
            let mut dw = Guarded::from_slice(&dw0);
            let dw_arg: &mut [f32] = if weighted { dw.get_mut() } else { &mut [] };
            pool_bwd_k(
                dh.get_mut(),
                dw_arg,
                g.get(),
                hg.get(),
                &mask,
                &wk,
                dims,
                pm,
                mode,
                seed,
            );
            (read(&tag, &out), read(&tag, &dh), read(&tag, &dw))
        });
        assert_same_bits(&format!("{tag} fwd"), &got[0].0, &got[1].0);
        assert_same_bits(&format!("{tag} bwd dh"), &got[0].1, &got[1].1);
        if weighted {
            // softmax of w: max, exp sums and the renormalising sum by block trees vs the
            // twin's sequential sums (T <= 9 terms: a few ulp) and expf vs the twin's exp:
            // alpha within ~1e-6 relative; out and dh sum <= T alpha h terms of size < 1:
            // atol 2e-6, rtol 2e-6.
            let tol = Tol::new(2e-6, 2e-6);
            tol.out::<T>()
                .check(&format!("{tag} fwd"), &got[0].0, &out_w);
            tol.out::<T>()
                .check(&format!("{tag} bwd dh"), &got[0].1, &dh_w);
            // dw += sum_b p (dp - p.dp): g_t = dout . h_t over C by a warp (strided lanes) vs
            // the twin's dot: C * 2^-24 * sum|g h| relative error on terms of size ~|g|, with
            // cancellation in g_t - gbar: atol 1e-6 * C / 8 (sum over B rows, atomics).
            for (i, (_, _, dw)) in got.iter().enumerate() {
                Tol::new(1e-6 * (c as f32 / 8.0).max(1.0), 2e-6).check(
                    &format!("{tag} bwd dw [{i}]"),
                    dw,
                    &dw_w,
                );
            }
        } else {
            // last and max copy an element; mean sums m h in t order and multiplies by
            // 1/len as the twin: exact
            assert_stored_exact::<T>(&format!("{tag} fwd"), &T::from_f32s(&got[0].0), &out_w);
            assert_stored_exact::<T>(&format!("{tag} bwd dh"), &T::from_f32s(&got[0].1), &dh_w);
            assert_same_bits(&format!("{tag} dw untouched"), &got[0].2, &dw0);
        }
    }
}

#[test]
fn pool_f32_matches_cpu() {
    check_pool::<f32>(&[7, 1, 3, 5, 2], 7, 37, 90);
    check_pool::<f32>(&[4, 9, 1], 9, 300, 91); // C > block: two channels per thread
                                               // a critic's shapes: T = 64 positions > 8 warps (g_t loops), SmolLM2's d_model
    check_pool::<f32>(&[64, 17, 1, 40], 64, 576, 94);
}

#[test]
fn pool_bf16_matches_cpu() {
    check_pool::<bf16>(&[7, 1, 3, 5, 2], 7, 37, 92);
    check_pool::<bf16>(&[4, 9, 1], 9, 300, 93);
    check_pool::<bf16>(&[64, 17, 1, 40], 64, 576, 95);
}

// ------------------------------------------------------------------------------------------
// reward_advantage
// ------------------------------------------------------------------------------------------

/// Grid 1, block 1024, dynamic shared memory S * 8 bytes; the spec as the kernel's encodings.
#[allow(clippy::too_many_arguments)]
fn reward_advantage_k<T: Storage>(
    mse: &mut [f32],
    reward: &mut [f32],
    adv: &mut [f32],
    pred: &[T],
    target: &[T],
    valid: &[f32],
    s: usize,
    a: usize,
    spec: &RewardSpec,
    mode: EmuMode,
    seed: u64,
) {
    let (transform, temperature): (i32, f32) = match spec.transform {
        RewardTransform::Negative => (0, 0.0),
        RewardTransform::Exp { temperature } => (1, temperature),
        RewardTransform::Bounded => (2, 0.0),
        RewardTransform::Log => (3, 0.0),
    };
    let (clip, lo, hi): (i32, f32, f32) = match spec.clip {
        Some((lo, hi)) => (1, lo, hi),
        None => (0, 0.0, 0.0),
    };
    let (kind, group, norm_by_std, whiten): (i32, i32, i32, i32) = match spec.advantage {
        Advantage::Grpo { group, norm_by_std } => (0, group as i32, norm_by_std as i32, 0),
        Advantage::Ppo { whiten } => (1, 0, 0, whiten as i32),
    };
    let mut g = EmuArgs::new();
    g.ptr_mut(mse)
        .ptr_mut(reward)
        .ptr_mut(adv)
        .ptr(pred)
        .ptr(target)
        .ptr(valid);
    g.scalar(s as i32)
        .scalar(a as i32)
        .scalar(spec.mse_scale.unwrap_or(0.0));
    g.scalar(spec.failure_value)
        .scalar(transform)
        .scalar(temperature);
    g.scalar(spec.scale).scalar(spec.batch_normalize as i32);
    g.scalar(clip).scalar(lo).scalar(hi);
    g.scalar(kind)
        .scalar(group)
        .scalar(norm_by_std)
        .scalar(whiten)
        .scalar(spec.eps);
    launch1(
        &sym::<T>("reward_advantage"),
        1,
        1024,
        s * 8,
        &mut g,
        mode,
        seed,
    );
}

fn check_reward<T: Storage>(s: usize, a: usize, spec: &RewardSpec, failures: bool, seed: u64) {
    let tag = format!("reward {} S={s} A={a} {spec:?}", T::SUFFIX);
    let mut r = rng(seed);
    let target = rand_t::<T>(&mut r, s * a, 1.0);
    // per-sample noise levels from 0 (sample 0: pred == target, mse 0, the log floor) to 1
    let mut pred = target.clone();
    for i in 1..s {
        let lvl = r.random_range(0.01f32..1.0);
        for j in 0..a {
            pred[i * a + j] += lvl * r.random_range(-1.0f32..1.0);
        }
    }
    let pred = T::round(&pred);
    let valid: Vec<f32> = (0..s)
        .map(|i| {
            if failures && (i % 5 == 2 || i == s - 1) {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let (mut mse_w, mut rew_w, mut adv_w) = (vec![0.0; s], vec![0.0; s], vec![0.0; s]);
    cpu()
        .reward_advantage(
            m(&mut mse_w),
            m(&mut rew_w),
            m(&mut adv_w),
            v(&pred),
            v(&target),
            v(&valid),
            s,
            a,
            spec,
        )
        .unwrap();
    let got = both_orders(|mode, seed| {
        let (mut mse, mut rew, mut adv) = (nan_out(s, 0), nan_out(s, 0), nan_out(s, 0));
        let (p, g) = (input::<T>(&pred, 0), input::<T>(&target, 0));
        reward_advantage_k(
            mse.get_mut(),
            rew.get_mut(),
            adv.get_mut(),
            p.get(),
            g.get(),
            &valid,
            s,
            a,
            spec,
            mode,
            seed,
        );
        (read(&tag, &mse), read(&tag, &rew), read(&tag, &adv))
    });
    assert_same_bits(&format!("{tag} mse"), &got[0].0, &got[1].0);
    assert_same_bits(&format!("{tag} reward"), &got[0].1, &got[1].1);
    assert_same_bits(&format!("{tag} advantage"), &got[0].2, &got[1].2);
    // All in f64 as the twin, rounded to f32 once; the f64 sums differ only in order (~1e-16
    // relative), so an output may differ by one f32 ulp where the f64 value lies near a
    // rounding tie: rtol 2.4e-7 (2 ulp); atol 1e-9 for advantages near 0 (x - mean with
    // ~1e-16 absolute difference).
    let tol = Tol::new(1e-9, 2.4e-7);
    tol.check(&format!("{tag} mse"), &got[0].0, &mse_w);
    tol.check(&format!("{tag} reward"), &got[0].1, &rew_w);
    tol.check(&format!("{tag} advantage"), &got[0].2, &adv_w);
}

fn reward_specs() -> Vec<(RewardSpec, bool)> {
    let base = RewardSpec::grpo(4, Some(37f32.sqrt()));
    vec![
        // [O]: GRPO with std normalisation, rescaled vectors, failures at -2
        (base, true),
        // Dr.GRPO (no std), raw vectors, exp transform, scaled
        (
            RewardSpec {
                mse_scale: None,
                transform: RewardTransform::Exp { temperature: 0.7 },
                scale: 2.0,
                advantage: Advantage::Grpo {
                    group: 4,
                    norm_by_std: false,
                },
                ..base
            },
            true,
        ),
        // PPO with whitening, bounded transform, batch z-score and clip
        (
            RewardSpec {
                transform: RewardTransform::Bounded,
                batch_normalize: true,
                clip: Some((-1.0, 1.2)),
                advantage: Advantage::Ppo { whiten: true },
                ..base
            },
            false,
        ),
        // PPO without whitening, log transform (sample 0 hits the 1e-8 floor), failures
        (
            RewardSpec {
                mse_scale: None,
                failure_value: -std::f32::consts::LN_2,
                transform: RewardTransform::Log,
                clip: Some((-3.0, 15.0)),
                advantage: Advantage::Ppo { whiten: false },
                ..base
            },
            true,
        ),
        // groups of one: mean 0, std 1
        (
            RewardSpec {
                advantage: Advantage::Grpo {
                    group: 1,
                    norm_by_std: true,
                },
                eps: 1e-3,
                ..base
            },
            true,
        ),
        // one group of the whole batch, batch z-score first
        (
            RewardSpec {
                batch_normalize: true,
                advantage: Advantage::Grpo {
                    group: 24,
                    norm_by_std: true,
                },
                ..base
            },
            true,
        ),
    ]
}

#[test]
fn reward_advantage_f32_matches_cpu() {
    for (i, (spec, failures)) in reward_specs().into_iter().enumerate() {
        check_reward::<f32>(24, 37, &spec, failures, 100 + i as u64);
    }
    // more samples than threads (loops over samples, warps over several samples each), A < 32
    let big = RewardSpec {
        mse_scale: Some(2.0),
        batch_normalize: true,
        ..RewardSpec::grpo(5, None)
    };
    check_reward::<f32>(1030, 5, &big, true, 110);
    // [O]'s step: 64 rollouts in groups of 8, vectors of SmolLM2's d_model rescaled to sqrt(d)
    check_reward::<f32>(64, 576, &RewardSpec::grpo(8, Some(24.0)), true, 111);
}

#[test]
fn reward_advantage_bf16_matches_cpu() {
    for (i, (spec, failures)) in reward_specs().into_iter().enumerate().step_by(2) {
        check_reward::<bf16>(24, 37, &spec, failures, 120 + i as u64);
    }
    check_reward::<bf16>(24, 37, &reward_specs()[3].0, true, 127);
}

// ------------------------------------------------------------------------------------------
// policy_loss (f32 only)
// ------------------------------------------------------------------------------------------

/// Grid 1, block 512; `out` is stats [7] (fwd) or dlogp [N] (bwd); the spec as the kernel's
/// encodings (dual_clip 0 = None).
#[allow(clippy::too_many_arguments)]
fn policy_loss_k(
    bwd: bool,
    out: &mut [f32],
    inputs: [&[f32]; 4],
    ref_logp: &[f32],
    s: usize,
    t: usize,
    spec: &PolicyLossSpec,
    mode: EmuMode,
    seed: u64,
) {
    let kl: i32 = match spec.kl_type {
        KlType::K1 => 0,
        KlType::K2 => 1,
        KlType::K3 => 2,
    };
    let agg: i32 = match spec.agg {
        LossAgg::TokenMean => 0,
        LossAgg::SeqMeanTokenMean => 1,
        LossAgg::SeqMeanTokenSumNorm => 2,
    };
    let [logp, old, adv, mask] = inputs;
    let mut a = EmuArgs::new();
    a.ptr_mut(out)
        .ptr(logp)
        .ptr(old)
        .ptr(adv)
        .ptr(mask)
        .ptr(ref_logp);
    a.scalar(s as i32)
        .scalar(t as i32)
        .scalar(spec.clip_low)
        .scalar(spec.clip_high);
    a.scalar(spec.dual_clip.unwrap_or(0.0)).scalar(spec.kl_coef);
    a.scalar(kl).scalar(agg);
    let name = if bwd {
        "policy_loss_bwd_f32"
    } else {
        "policy_loss_fwd_f32"
    };
    launch1(name, 1, 512, 0, &mut a, mode, seed);
}

#[test]
fn policy_loss_f32_matches_cpu() {
    // 37 sequences > 16 warps (warps loop over sequences), T = 45 > 32 (lanes loop, partial)
    let (s, t) = (37usize, 45usize);
    let n = s * t;
    let mut r = rng(130);
    let mut mask: Vec<f32> = (0..n)
        .map(|_| if r.random_bool(0.8) { 1.0 } else { 0.0 })
        .collect();
    // sequences with no masked token (left out of seq-mean-token-mean)
    mask[3 * t..4 * t].fill(0.0);
    mask[20 * t..21 * t].fill(0.0);
    let logp = uniform(&mut r, n, -5.0, -0.1);
    let mut old: Vec<f32> = logp
        .iter()
        .map(|&l| l - r.random_range(-0.5f32..0.5))
        .collect();
    // log ratios beyond the +-20 clamp
    old[5] = logp[5] - 25.0;
    old[t + 7] = logp[t + 7] + 30.0;
    let mut seq_adv: Vec<f32> = (0..s).map(|_| r.random_range(-2.0f32..2.0)).collect();
    // a negative advantage with ratios 4.5 and e^20 (clamped): the dual clip's branch
    seq_adv[1] = -1.3;
    for (i, lr) in [(t + 11, 1.5), (t + 12, 21.0), (t + 13, -0.1)] {
        old[i] = logp[i] - lr;
        mask[i] = 1.0;
    }
    let mut adv: Vec<f32> = (0..n).map(|i| seq_adv[i / t]).collect();
    adv[2 * t..3 * t].fill(0.0); // a zero advantage: neither branch clipped
    let mut refl: Vec<f32> = logp
        .iter()
        .map(|&l| l + r.random_range(-0.3f32..0.3))
        .collect();
    // k3 clamps: ref - logp beyond 20, and exp(x) - x - 1 beyond 10
    refl[9] = logp[9] + 30.0;
    refl[t + 2] = logp[t + 2] + 3.5;
    refl[2 * t + 4] = logp[2 * t + 4] - 25.0;
    let dev = cpu();
    let inputs = [&logp[..], &old[..], &adv[..], &mask[..]];

    let run = |spec: &PolicyLossSpec, ref_k: &[f32], ref_w: Option<&Buf>| {
        let tag = format!("policy_loss {spec:?} ref={}", ref_w.is_some());
        let mut stats_w = vec![0.0; PolicyStat::COUNT];
        let rv = ref_w.map(v);
        dev.policy_loss_fwd(
            m(&mut stats_w),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            rv,
            s,
            t,
            spec,
        )
        .unwrap();
        let mut dl_w = vec![0.0; n];
        dev.policy_loss_bwd(
            m(&mut dl_w),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            rv,
            s,
            t,
            spec,
        )
        .unwrap();
        let got = both_orders(|mode, seed| {
            let mut stats = nan_out::<f32>(PolicyStat::COUNT, 0);
            policy_loss_k(
                false,
                stats.get_mut(),
                inputs,
                ref_k,
                s,
                t,
                spec,
                mode,
                seed,
            );
            let mut dl = nan_out::<f32>(n, 0);
            policy_loss_k(true, dl.get_mut(), inputs, ref_k, s, t, spec, mode, seed);
            (read(&tag, &stats), read(&tag, &dl))
        });
        assert_same_bits(&format!("{tag} stats"), &got[0].0, &got[1].0);
        assert_same_bits(&format!("{tag} dlogp"), &got[0].1, &got[1].1);
        // every token's terms and every sum in f64, rounded to f32 once; sums in another order
        // (~1e-16 relative): at most an ulp apart near rounding ties: rtol 2.4e-7, atol 1e-9
        let tol = Tol::new(1e-9, 2.4e-7);
        tol.check(&format!("{tag} stats"), &got[0].0, &stats_w);
        tol.check(&format!("{tag} dlogp"), &got[0].1, &dl_w);
        // the data reach every branch
        if spec.dual_clip.is_some() {
            assert!(
                stats_w[PolicyStat::CLIP_FRAC_LOWER] > 0.0,
                "{tag}: no dual clip"
            );
        }
        assert!(
            stats_w[PolicyStat::CLIP_FRAC] > 0.0,
            "{tag}: nothing clipped"
        );
    };

    for agg in [
        LossAgg::TokenMean,
        LossAgg::SeqMeanTokenMean,
        LossAgg::SeqMeanTokenSumNorm,
    ] {
        for kl_type in [KlType::K1, KlType::K2, KlType::K3] {
            for dual_clip in [None, Some(3.0)] {
                let spec = PolicyLossSpec {
                    clip_low: 0.2,
                    clip_high: 0.28,
                    dual_clip,
                    kl_coef: 0.05,
                    kl_type,
                    agg,
                };
                run(&spec, &refl, Some(&refl));
            }
        }
        // No reference policy. The emulator's EmuArgs cannot pass a null pointer (the kernel's
        // ref_logp == nullptr branch), so the kernel gets ref_logp = logp with k3, whose kl and
        // gradient are then exactly 0, against the twin without ref_logp (kl_coef 0).
        let spec = PolicyLossSpec {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            kl_coef: 0.0,
            kl_type: KlType::K3,
            agg,
        };
        run(&spec, &logp, None);
    }
}
