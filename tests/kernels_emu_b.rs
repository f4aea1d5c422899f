//! CUDA kernels run through the CPU emulator of the CUDA execution model (`emu/`), each compared
//! with its CPU twin (`CpuDevice` through the `Device` trait) on the same fresh random inputs:
//! attention (forward; backward as the launcher composes it: the dot pre-pass, dq, dkdv),
//! decode_attention (+ the split-K combine), kv_append, cross_entropy, softmax and sample.
//!
//! Every launch runs in both fiber schedules (`EmuMode::Forward`, threads and blocks in order;
//! `EmuMode::Reversed`, threads reversed and blocks shuffled, another seed). These kernels have
//! no atomics and fixed reduction orders, so both schedules must give identical bits, which is
//! asserted; the results are then compared with the twin. Outputs and scratch start as a
//! canary NaN inside canary guards (tests/common/kernels.rs): an element a kernel forgets to
//! write fails the finiteness check, a write out of range fails the guard check.
//!
//! Tolerances. Each f32 check states its error model next to it; bf16 variants feed the kernel
//! bf16 inputs and the twin the same values widened to f32, and the kernel widens to f32 too,
//! computes in f32 and rounds each T output once (nearest even). So a bf16 output may differ
//! from the twin by the f32 tolerance plus half a bf16 ulp of the value, at most 2^-8 |x|
//! (8 significand bits): [`Tol::for_ty`], [`bound_for`]. f32 outputs of bf16 kernels (lse, D,
//! losses, logp) keep the f32 tolerance.
//!
//! The launchers below (one per op) do what the CUDA device's launchers will do: check lengths
//! and dims, pick the symbol (dtype, head-size bucket), compute grid, block and dynamic shared
//! memory as each kernel's header says (and note where > 48 KiB needs the opt-in attribute).
//! Run with `cargo test --release --test kernels_emu_b -- --nocapture` to see the error of
//! every check against its bound.

mod common;

use common::kernels::*;
use half::bf16;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::emu::{launch, EmuArgs, EmuMode};
use nla_engine::device::{AttnDims, CacheDims, Device, SampleSpec, View, ViewMut};
use rand::rngs::StdRng;
use rand::Rng;

/// f32 unit roundoff.
const U: f32 = f32::EPSILON / 2.0;

// ------------------------------------------------------------------------------------------
// Element types, checks
// ------------------------------------------------------------------------------------------

/// The T of a kernel: its symbol suffix and conversions (bf16: round to nearest even).
trait Ty: Elem + Copy + Send + Sync + 'static {
    const NAME: &'static str;
    /// Whether outputs are rounded to bf16 (the tolerance adds half a bf16 ulp).
    const BF16: bool;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Ty for f32 {
    const NAME: &'static str = "f32";
    const BF16: bool = false;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Ty for bf16 {
    const NAME: &'static str = "bf16";
    const BF16: bool = true;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

fn conv<T: Ty>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

fn widen<T: Ty>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// `x` as a T kernel sees it, widened back: the inputs the kernel and its twin share.
fn rounded<T: Ty>(x: &[f32]) -> Vec<f32> {
    widen(&conv::<T>(x))
}

/// `|kernel - twin| <= abs + rel * |twin|`, element by element.
#[derive(Clone, Copy, Debug)]
struct Tol {
    abs: f32,
    rel: f32,
}

impl Tol {
    fn new(abs: f32, rel: f32) -> Self {
        Tol { abs, rel }
    }
    /// The tolerance of an output stored as T: a bf16 output is the kernel's f32 result
    /// rounded once, so it may move by half a bf16 ulp, at most 2^-8 of the value.
    fn for_ty<T: Ty>(self) -> Self {
        if T::BF16 {
            const E: f32 = 1.0 / 256.0;
            Tol::new(self.abs * (1.0 + E), self.rel * (1.0 + E) + E)
        } else {
            self
        }
    }
}

/// Fails unless every `got[i]` is finite and within `bound(i)` of `want[i]`; prints the worst
/// error and its share of the bound.
#[track_caller]
fn check_with(what: &str, got: &[f32], want: &[f32], bound: impl Fn(usize) -> f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    assert_finite(what, got);
    assert_finite(&format!("{what} (twin)"), want);
    let (mut worst, mut worst_ratio, mut at) = (0.0f32, 0.0f32, 0);
    for i in 0..got.len() {
        let (e, b) = ((got[i] - want[i]).abs(), bound(i));
        let ratio = if b > 0.0 {
            e / b
        } else if e == 0.0 {
            0.0
        } else {
            f32::INFINITY
        };
        if ratio > worst_ratio {
            (worst_ratio, at) = (ratio, i);
        }
        worst = worst.max(e);
        assert!(
            e <= b,
            "{what}: [{i}] kernel {} vs twin {}: |diff| {e:e} > bound {b:e}",
            got[i],
            want[i]
        );
    }
    eprintln!(
        "{what}: {} values, max |diff| {worst:.3e}, worst {:.1}% of its bound (at [{at}])",
        got.len(),
        100.0 * worst_ratio
    );
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    check_with(what, got, want, |i| tol.abs + tol.rel * want[i].abs());
}

/// Largest |x|.
fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, &v| m.max(v.abs()))
}

fn i32_of(x: usize) -> i32 {
    i32::try_from(x).expect("a dim that fits an int")
}

// ------------------------------------------------------------------------------------------
// Running a launcher in both schedules
// ------------------------------------------------------------------------------------------

/// Outputs that must be bit-identical between the two schedules.
trait SameBits {
    fn same_bits(&self, other: &Self, what: &str);
}

impl<T: Elem> SameBits for Vec<T> {
    fn same_bits(&self, other: &Self, what: &str) {
        assert_same_bits(what, self, other);
    }
}

impl<A: SameBits, B: SameBits> SameBits for (A, B) {
    fn same_bits(&self, o: &Self, what: &str) {
        self.0.same_bits(&o.0, &format!("{what}.0"));
        self.1.same_bits(&o.1, &format!("{what}.1"));
    }
}

impl<A: SameBits, B: SameBits, C: SameBits, D: SameBits> SameBits for (A, B, C, D) {
    fn same_bits(&self, o: &Self, what: &str) {
        self.0.same_bits(&o.0, &format!("{what}.0"));
        self.1.same_bits(&o.1, &format!("{what}.1"));
        self.2.same_bits(&o.2, &format!("{what}.2"));
        self.3.same_bits(&o.3, &format!("{what}.3"));
    }
}

/// Runs `f` (which builds fresh buffers, launches, and returns the outputs) in both schedules,
/// asserts identical bits, returns the Forward schedule's outputs.
#[track_caller]
fn both<R: SameBits>(what: &str, f: impl FnMut(EmuMode, u64) -> R) -> R {
    let [a, b] = both_orders(f);
    a.same_bits(&b, &format!("{what} (Forward vs Reversed)"));
    a
}

/// A poisoned output: canary NaNs inside canary guards.
fn poisoned<T: Elem>(n: usize) -> Guarded<T> {
    Guarded::new(n, T::CANARY)
}

/// The inner values of an output after its guards are checked.
#[track_caller]
fn take<T: Elem>(g: &Guarded<T>, what: &str) -> Vec<T> {
    g.assert_intact(what);
    g.to_vec()
}

#[track_caller]
fn launch3(
    name: &str,
    grid: [u32; 3],
    block: u32,
    dyn_smem: usize,
    args: &mut EmuArgs<'_>,
    mode: EmuMode,
    seed: u64,
) {
    assert!(
        dyn_smem <= 227 * 1024,
        "{name}: {dyn_smem} B of dynamic smem"
    );
    if let Err(e) = launch(name, grid, [block, 1, 1], dyn_smem, args, mode, seed) {
        panic!("{name} ({mode:?}, seed {seed:#x}): {e}");
    }
}

// ------------------------------------------------------------------------------------------
// Launchers (what the CUDA device's launchers do, with slices for device pointers)
// ------------------------------------------------------------------------------------------

/// Dynamic shared memory above which a launch needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
/// raised first (the CUDA launcher's job; the emulator takes up to 227 KiB without it).
const SMEM_DEFAULT_MAX: usize = 48 * 1024;

/// The head-size bucket: the smallest of 16, 32, 64, 128 that holds `hs`.
fn hs_bucket(hs: usize) -> usize {
    assert!(hs > 0, "hs 0");
    *[16, 32, 64, 128]
        .iter()
        .find(|&&b| b >= hs)
        .unwrap_or_else(|| panic!("hs {hs} > 128 is not supported"))
}

const ATTN_NT: u32 = 128;

/// The grid cap of the grid-stride warp-per-row kernels (attention_bwd_dot,
/// decode_attention_combine): "a few blocks per SM", 4 x 132 SMs (H100 SXM). The B2 T200 NH6
/// attention case (2400 rows, 600 blocks wanted) runs the dot kernel's grid-stride loop.
const WARP_GRID_CAP: usize = 4 * 132;

/// The bf16 (tensor-core) forward's dynamic shared memory (bytes) for bucket `hsb` and `rows`
/// query rows per block: K and V tiles in two buffers, 4 x BK rows of HSB + 8 bf16 (BK 64,
/// 32 for 128 rows at HSB 128, which holds Q's 128 rows there too: 256 rows either way).
fn attn_tc_fwd_smem(hsb: usize, rows: usize) -> usize {
    let (bk, q_rows) = if rows == 128 && hsb == 128 {
        (32, 128)
    } else {
        (64, 0)
    };
    2 * (4 * bk + q_rows) * (hsb + 8)
}

/// The bf16 (tensor-core) dq and dkdv kernels' dynamic shared memory (bytes) for bucket `hsb`:
/// dq: Q, dO [64] and two buffers of K, V [BK]; dkdv: K, V [64] and two buffers of Q, dO [BQ]
/// and of lse, D [BQ] in f32 (BK = BQ = 64, 32 for HSB 128; rows of HSB + 8 bf16).
fn attn_tc_bwd_smem(hsb: usize) -> [usize; 2] {
    let (ld, bk) = (hsb + 8, if hsb >= 128 { 32 } else { 64 });
    [
        2 * (2 * 64 + 4 * bk) * ld,
        2 * (2 * 64 + 4 * bk) * ld + 16 * bk,
    ]
}

/// attention.cu's dynamic shared memory (bytes) of fwd, dq, dkdv for bucket `hsb`.
fn attn_smem(hsb: usize) -> [usize; 3] {
    let bi = if hsb >= 128 { 32 } else { 64 };
    let (ld, lp) = (hsb + 1, bi + 2);
    [
        4 * (64 * ld + 2 * bi * ld + 64 * lp),
        4 * (2 * 64 * ld + 2 * bi * ld + 64 * lp),
        4 * (2 * 64 * ld + 2 * bi * ld + 2 * 64 * lp + 2 * bi),
    ]
}

fn check_attn_dims(d: &AttnDims) {
    assert!(
        d.b > 0 && d.t > 0 && d.nh > 0 && d.nkv > 0 && d.hs > 0,
        "{d:?}"
    );
    assert!(
        d.nh.is_multiple_of(d.nkv),
        "NH {} not a multiple of NKV {}",
        d.nh,
        d.nkv
    );
    assert!(d.hs <= 128, "hs {} > 128", d.hs);
    assert!(d.nh <= 65535 && d.b <= 65535, "grid y/z");
}

/// attention_fwd_<T>_hs<B>: grid (ceil(T/64), NH, B), block 128; with `rows` 128,
/// attention_fwd_bf16_hs<B>_bo128: grid (ceil(T/128), NH, B).
#[allow(clippy::too_many_arguments)]
fn attention_fwd_launch<T: Ty>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    d: AttnDims,
    rows: usize,
    mode: EmuMode,
    seed: u64,
) {
    check_attn_dims(&d);
    let AttnDims { b, t, nh, nkv, hs } = d;
    assert_eq!(q.len(), b * t * nh * hs);
    assert_eq!(out.len(), b * t * nh * hs);
    assert_eq!(k.len(), b * t * nkv * hs);
    assert_eq!(v.len(), b * t * nkv * hs);
    assert_eq!(lse.len(), b * nh * t);
    let hsb = hs_bucket(hs);
    assert!(
        rows == 64 || (rows == 128 && T::BF16 && hsb >= 64),
        "{rows} rows"
    );
    let smem = if T::BF16 {
        attn_tc_fwd_smem(hsb, rows)
    } else {
        attn_smem(hsb)[0]
    };
    let _needs_opt_in = smem > SMEM_DEFAULT_MAX;
    let bo = if rows == 128 { "_bo128" } else { "" };
    let name = format!("attention_fwd_{}_hs{hsb}{bo}", T::NAME);
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr_mut(lse).ptr(q).ptr(k).ptr(v);
    for x in [b, t, nh, nkv, hs] {
        a.scalar(i32_of(x));
    }
    let grid = [t.div_ceil(rows) as u32, nh as u32, b as u32];
    launch3(&name, grid, ATTN_NT, smem, &mut a, mode, seed);
}

/// The backward as the launcher composes it: D = rowsum(dout * out) into f32 scratch
/// (attention_bwd_dot_<T>, one warp per row: ceil(rows / 4) blocks of 128, capped), then
/// attention_bwd_dq (grid as fwd) and attention_bwd_dkdv (grid (ceil(T/64), NKV, B)).
#[allow(clippy::too_many_arguments)]
fn attention_bwd_launch<T: Ty>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dscratch: &mut [f32],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    d: AttnDims,
    mode: EmuMode,
    seed: u64,
) {
    check_attn_dims(&d);
    let AttnDims { b, t, nh, nkv, hs } = d;
    for (x, n) in [
        (dq.len(), nh),
        (dout.len(), nh),
        (q.len(), nh),
        (out.len(), nh),
    ] {
        assert_eq!(x, b * t * n * hs);
    }
    for (x, n) in [
        (dk.len(), nkv),
        (dv.len(), nkv),
        (k.len(), nkv),
        (v.len(), nkv),
    ] {
        assert_eq!(x, b * t * n * hs);
    }
    assert_eq!(lse.len(), b * nh * t);
    assert_eq!(dscratch.len(), b * nh * t);
    let hsb = hs_bucket(hs);
    let [smem_dq, smem_dkdv] = if T::BF16 {
        attn_tc_bwd_smem(hsb)
    } else {
        let [_, dq, dkdv] = attn_smem(hsb);
        [dq, dkdv]
    };
    let dims = |a: &mut EmuArgs<'_>, with_kv: bool| {
        a.scalar(i32_of(b)).scalar(i32_of(t)).scalar(i32_of(nh));
        if with_kv {
            a.scalar(i32_of(nkv));
        }
        a.scalar(i32_of(hs));
    };
    // 1. D (the dq and dkdv kernels read it)
    let rows = b * t * nh;
    let dot_grid = rows.div_ceil(4).min(WARP_GRID_CAP) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(&mut *dscratch).ptr(dout).ptr(out);
    dims(&mut a, false);
    let name = format!("attention_bwd_dot_{}", T::NAME);
    launch3(&name, [dot_grid, 1, 1], ATTN_NT, 0, &mut a, mode, seed);
    // 2. dq
    let mut a = EmuArgs::new();
    a.ptr_mut(dq)
        .ptr(dout)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(lse)
        .ptr(&*dscratch);
    dims(&mut a, true);
    let name = format!("attention_bwd_dq_{}_hs{hsb}", T::NAME);
    let grid = [t.div_ceil(64) as u32, nh as u32, b as u32];
    launch3(&name, grid, ATTN_NT, smem_dq, &mut a, mode, seed ^ 1);
    // 3. dk, dv
    let mut a = EmuArgs::new();
    a.ptr_mut(dk)
        .ptr_mut(dv)
        .ptr(dout)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(lse)
        .ptr(&*dscratch);
    dims(&mut a, true);
    let name = format!("attention_bwd_dkdv_{}_hs{hsb}", T::NAME);
    let grid = [t.div_ceil(64) as u32, nkv as u32, b as u32];
    launch3(&name, grid, ATTN_NT, smem_dkdv, &mut a, mode, seed ^ 2);
}

const DEC_NT: u32 = 128;

/// decode_attention.cu's dynamic shared memory for bucket `hsb`.
fn dec_smem(hsb: usize) -> usize {
    4 * (8 * hsb + 32 * (hsb + 1) + 8 * 32 + 3 * 8 + 8 * 128)
}

/// The split count the launcher picks: 1 when B*TQ*NKV*nhc blocks already fill `sms` SMs
/// twice, else about 2*SMs over that, capped at ceil(Lmax/32) and 64.
fn dec_nsplit(d: &CacheDims, starts: &[u32], sms: usize) -> usize {
    let nhc = (d.nh / d.nkv).div_ceil(8);
    let blocks = d.b * d.tq * d.nkv * nhc;
    if blocks >= 2 * sms {
        return 1;
    }
    let smin = *starts.iter().min().expect("B > 0") as usize;
    let lmax = (d.pos0 + d.tq).saturating_sub(smin).max(1);
    (2 * sms)
        .div_ceil(blocks)
        .clamp(1, lmax.div_ceil(32).min(64))
}

/// decode_attention_fwd_<T>_hs<B>: grid (nsplit, TQ*NKV*ceil(G/8), B), block 128; then, when
/// nsplit > 1, decode_attention_combine_<T> over R = B*TQ*NH rows (ceil(R/4) blocks of 128).
/// `part_o` [nsplit][R][HS], `part_ml` [nsplit][R][2]: empty when nsplit = 1. `d.pos0` is
/// passed as the argument, or `pos` as a one-id buffer (the argument then 0).
#[allow(clippy::too_many_arguments)]
fn decode_attention_launch<T: Ty>(
    out: &mut [T],
    part_o: &mut [f32],
    part_ml: &mut [f32],
    q: &[T],
    kcache: &[T],
    vcache: &[T],
    starts: &[u32],
    d: CacheDims,
    nsplit: usize,
    pos: Option<u32>,
    mode: EmuMode,
    seed: u64,
) {
    let CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
    } = d;
    assert!(b > 0 && tq > 0 && nh > 0 && nkv > 0 && nh.is_multiple_of(nkv) && hs <= 128);
    assert!(pos0 + tq <= tmax, "pos0 + TQ > TMAX");
    assert!((1..=64).contains(&nsplit));
    let rows = b * tq * nh;
    assert_eq!(q.len(), rows * hs);
    assert_eq!(out.len(), rows * hs);
    assert_eq!(kcache.len(), b * tmax * nkv * hs);
    assert_eq!(vcache.len(), b * tmax * nkv * hs);
    assert_eq!(starts.len(), b);
    assert!(starts.iter().all(|&s| (s as usize) < tmax), "starts < TMAX");
    let scratch = if nsplit > 1 { nsplit * rows } else { 0 };
    assert_eq!(part_o.len(), scratch * hs);
    assert_eq!(part_ml.len(), scratch * 2);
    let hsb = hs_bucket(hs);
    let nhc = (nh / nkv).div_ceil(8);
    let y = tq * nkv * nhc;
    assert!(y <= 65535 && b <= 65535, "grid y/z");
    let mut a = EmuArgs::new();
    a.ptr_mut(&mut *out)
        .ptr_mut(&mut *part_o)
        .ptr_mut(&mut *part_ml);
    a.ptr(q).ptr(kcache).ptr(vcache).ptr(starts);
    let pos_word = pos.map(|p| [p]);
    match &pos_word {
        Some(p) => a.ptr(&p[..]),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { pos0 };
    for x in [b, tq, tmax, nh, nkv, hs, pos0, nsplit] {
        a.scalar(i32_of(x));
    }
    let name = format!("decode_attention_fwd_{}_hs{hsb}", T::NAME);
    let grid = [nsplit as u32, y as u32, b as u32];
    launch3(&name, grid, DEC_NT, dec_smem(hsb), &mut a, mode, seed);
    if nsplit > 1 {
        let mut a = EmuArgs::new();
        a.ptr_mut(out).ptr(&*part_o).ptr(&*part_ml);
        a.scalar(i32_of(rows))
            .scalar(i32_of(hs))
            .scalar(i32_of(nsplit));
        let name = format!("decode_attention_combine_{}", T::NAME);
        let grid = rows.div_ceil(4).min(WARP_GRID_CAP) as u32;
        launch3(&name, [grid, 1, 1], 128, 0, &mut a, mode, seed ^ 1);
    }
}

/// The row kernels (cross_entropy, softmax, sample): one block per row, grid N or fewer
/// (grid-stride): min(N, max_grid).
const ROW_NT: u32 = 256;

fn row_grid(n: usize, max_grid: usize) -> u32 {
    n.min(max_grid).clamp(1, 65535) as u32
}

/// cross_entropy_chunk_fwd over one chunk of all V columns (whole rows, as training runs it):
/// losses [N] and the state [N,3] the backward reads.
#[allow(clippy::too_many_arguments)]
fn cross_entropy_fwd_launch<T: Ty>(
    losses: &mut [f32],
    state: &mut [f32],
    logits: &[T],
    targets: &[u32],
    mask: &[f32],
    n: usize,
    v: usize,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    assert!(v > 0);
    assert_eq!(losses.len(), n);
    assert_eq!(state.len(), 3 * n);
    assert_eq!(logits.len(), n * v);
    assert_eq!(targets.len(), n);
    assert_eq!(mask.len(), n);
    assert!(targets.iter().all(|&y| (y as usize) < v), "targets < V");
    let mut a = EmuArgs::new();
    a.ptr_mut(losses)
        .ptr_mut(state)
        .ptr(logits)
        .ptr(targets)
        .ptr(mask);
    a.scalar(i32_of(n))
        .scalar(i32_of(v))
        .scalar(i32_of(v))
        .scalar(0i32);
    let name = format!("cross_entropy_chunk_fwd_{}", T::NAME);
    launch3(
        &name,
        [row_grid(n, max_grid), 1, 1],
        ROW_NT,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// cross_entropy_chunk_bwd over one chunk of all V columns: the gradient written over `logits`
/// [N,V], from the forward's state.
#[allow(clippy::too_many_arguments)]
fn cross_entropy_bwd_launch<T: Ty>(
    logits: &mut [T],
    state: &[f32],
    targets: &[u32],
    mask: &[f32],
    n: usize,
    v: usize,
    scale: f32,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    assert!(v > 0);
    assert_eq!(logits.len(), n * v);
    assert_eq!(state.len(), 3 * n);
    assert_eq!(targets.len(), n);
    assert_eq!(mask.len(), n);
    assert!(targets.iter().all(|&y| (y as usize) < v), "targets < V");
    let mut a = EmuArgs::new();
    a.ptr_mut(logits).ptr(state).ptr(targets).ptr(mask);
    a.scalar(i32_of(n))
        .scalar(i32_of(v))
        .scalar(0i32)
        .scalar(scale);
    let name = format!("cross_entropy_chunk_bwd_{}", T::NAME);
    launch3(
        &name,
        [row_grid(n, max_grid), 1, 1],
        ROW_NT,
        0,
        &mut a,
        mode,
        seed,
    );
}

#[allow(clippy::too_many_arguments)]
fn softmax_fwd_launch<T: Ty>(
    out: &mut [T],
    x: &[T],
    n: usize,
    v: usize,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    assert!(v > 0);
    assert_eq!(out.len(), n * v);
    assert_eq!(x.len(), n * v);
    let mut a = EmuArgs::new();
    a.ptr_mut(out).ptr(x).scalar(i32_of(n)).scalar(i32_of(v));
    let name = format!("softmax_fwd_{}", T::NAME);
    launch3(
        &name,
        [row_grid(n, max_grid), 1, 1],
        ROW_NT,
        0,
        &mut a,
        mode,
        seed,
    );
}

#[allow(clippy::too_many_arguments)]
fn softmax_bwd_launch<T: Ty>(
    dx: &mut [T],
    dout: &[T],
    out: &[T],
    n: usize,
    v: usize,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    assert!(v > 0);
    assert_eq!(dx.len(), n * v);
    assert_eq!(dout.len(), n * v);
    assert_eq!(out.len(), n * v);
    let mut a = EmuArgs::new();
    a.ptr_mut(dx)
        .ptr(dout)
        .ptr(out)
        .scalar(i32_of(n))
        .scalar(i32_of(v));
    let name = format!("softmax_bwd_{}", T::NAME);
    launch3(
        &name,
        [row_grid(n, max_grid), 1, 1],
        ROW_NT,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// sample_fwd_<T>: block exactly 256 (the kernel's SMP_NT), grid N or fewer; the launcher
/// checks temperature >= 0, 0 < top_p <= 1, u in [0, 1), and passes min(top_k, V).
#[allow(clippy::too_many_arguments)]
fn sample_launch<T: Ty>(
    ids: &mut [u32],
    logp: &mut [f32],
    logits: &[T],
    u: &[f32],
    n: usize,
    v: usize,
    spec: &SampleSpec,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    assert!(v > 0);
    assert_eq!(ids.len(), n);
    assert_eq!(logp.len(), n);
    assert_eq!(logits.len(), n * v);
    assert_eq!(u.len(), n);
    assert!(spec.temperature >= 0.0 && spec.temperature.is_finite());
    assert!(spec.top_p > 0.0 && spec.top_p <= 1.0);
    assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
    let top_k = spec.top_k.min(v);
    let mut a = EmuArgs::new();
    a.ptr_mut(ids).ptr_mut(logp).ptr(logits).ptr(u);
    a.scalar(i32_of(n)).scalar(i32_of(v));
    a.scalar(spec.temperature)
        .scalar(i32_of(top_k))
        .scalar(spec.top_p);
    let name = format!("sample_fwd_{}", T::NAME);
    launch3(
        &name,
        [row_grid(n, max_grid), 1, 1],
        256,
        0,
        &mut a,
        mode,
        seed,
    );
}

// ------------------------------------------------------------------------------------------
// Twins through the Device trait
// ------------------------------------------------------------------------------------------

fn cpu() -> CpuDevice {
    CpuDevice::new()
}

fn twin_attention_fwd(q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> (Vec<f32>, Vec<f32>) {
    let (q, k, v) = (q.to_vec(), k.to_vec(), v.to_vec());
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; d.b * d.nh * d.t];
    cpu()
        .attention_fwd(
            ViewMut::all(&mut out),
            ViewMut::all(&mut lse),
            View::all(&q),
            View::all(&k),
            View::all(&v),
            d,
        )
        .expect("twin attention_fwd");
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn twin_attention_bwd(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d: AttnDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dout, q, k, v, out, lse) = (
        dout.to_vec(),
        q.to_vec(),
        k.to_vec(),
        v.to_vec(),
        out.to_vec(),
        lse.to_vec(),
    );
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    cpu()
        .attention_bwd(
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
        .expect("twin attention_bwd");
    (dq, dk, dv)
}

// ------------------------------------------------------------------------------------------
// attention
// ------------------------------------------------------------------------------------------

#[test]
fn attention_smem_sizes_are_the_headers() {
    // the table of kernels/attention.cu and decode_attention.cu's Launch sections
    let table = [
        (16, [29952, 34304, 51712]),
        (32, [42240, 50688, 68096]),
        (64, [66816, 83456, 100864]),
        (128, [74752, 107776, 116736]),
    ];
    for (hsb, want) in table {
        assert_eq!(attn_smem(hsb), want, "HSB {hsb}");
    }
    // the bf16 (tensor-core) kernels' tables
    let tc: Vec<usize> = [16, 32, 64, 128].map(|h| attn_tc_fwd_smem(h, 64)).to_vec();
    assert_eq!(tc, [12288, 20480, 36864, 69632]);
    assert_eq!([64, 128].map(|h| attn_tc_fwd_smem(h, 128)), [36864, 69632]);
    let tc: Vec<[usize; 2]> = [16, 32, 64, 128].map(attn_tc_bwd_smem).to_vec();
    assert_eq!(
        tc,
        [
            [18432, 19456],
            [30720, 31744],
            [55296, 56320],
            [69632, 70144]
        ]
    );
    let dec: Vec<usize> = [16, 32, 64, 128].iter().map(|&h| dec_smem(h)).collect();
    assert_eq!(dec, [7904, 10464, 15584, 25824]);
    assert_eq!(
        (1..=128).map(hs_bucket).collect::<Vec<_>>(),
        (1..=128)
            .map(|h| if h <= 16 {
                16
            } else if h <= 32 {
                32
            } else if h <= 64 {
                64
            } else {
                128
            })
            .collect::<Vec<_>>()
    );
}

/// One attention case: the forward kernel against the twin, then the backward chain (dot,
/// dq, dkdv) fed with the kernel forward's out and lse, against the twin's backward fed the
/// same values.
fn attention_case<T: Ty>(b: usize, t: usize, nh: usize, nkv: usize, hs: usize, seed: u64) {
    let d = AttnDims { b, t, nh, nkv, hs };
    let tag = format!("attention {} B{b} T{t} NH{nh} NKV{nkv} HS{hs}", T::NAME);
    let mut r = rng(seed);
    // |q|, |k| < 2: scores q.k/sqrt(hs) of spread ~1.3, softmax rows neither flat nor one-hot
    let q = rounded::<T>(&nonzero(&mut r, b * t * nh * hs, 2.0));
    let k = rounded::<T>(&nonzero(&mut r, b * t * nkv * hs, 2.0));
    let v = rounded::<T>(&nonzero(&mut r, b * t * nkv * hs, 1.0));
    let dout = rounded::<T>(&nonzero(&mut r, b * t * nh * hs, 1.0));
    let (qg, kg, vg) = (
        Guarded::from_slice(&conv::<T>(&q)),
        Guarded::from_slice(&conv::<T>(&k)),
        Guarded::from_slice(&conv::<T>(&v)),
    );

    // ---- forward: 64 query rows per block, and for bf16 at buckets 64 and 128 also the
    // _bo128 kernel's 128 (the backward gets the first's out and lse)
    let (out_t, lse_t) = twin_attention_fwd(&q, &k, &v, d);
    let rows_all: &[usize] = if T::BF16 && hs > 32 {
        &[64, 128]
    } else {
        &[64]
    };
    let mut first = None;
    for &rows in rows_all {
        let (out_k, lse_k) = both(&format!("{tag} fwd rows {rows}"), |mode, seed| {
            let mut out = poisoned::<T>(q.len());
            let mut lse = poisoned::<f32>(b * nh * t);
            attention_fwd_launch(
                out.get_mut(),
                lse.get_mut(),
                qg.get(),
                kg.get(),
                vg.get(),
                d,
                rows,
                mode,
                seed,
            );
            (take(&out, "out"), take(&lse, "lse"))
        });
        // f32 error model: a score q.k scale carries the rounding of a length-hs dot product
        // (typically ~sqrt(hs) u sum|q k| scale, < 1e-6 here; hs u sum|q k| scale at worst),
        // the kernel's base-2 exp2f and the twin's vexp differ by a few ulp, and the sums run
        // in other orders; out is a convex combination of v rows, so a relative error e of the
        // weights moves it by <= e max|v|. Bound: 1e-5 (~84 u) of max|v| (= 1 here), seen
        // <= 12% (at hs 128). lse (~ln T + the max score, |lse| < 10): 1e-5 absolute plus 8 u
        // relative, seen <= 13% (at hs 128). bf16 runs on tensor cores, whose P V product takes
        // P rounded to bf16 while l sums the unrounded p: the weights move by <= 2^-9 relative,
        // out by <= 2^-9 max|v| more; bound 2^-8 max|v| on top (and out's own rounding when
        // stored).
        let p_round = if T::BF16 { amax(&v) / 256.0 } else { 0.0 };
        check(
            &format!("{tag} rows {rows} out"),
            &widen(&out_k),
            &out_t,
            Tol::new(1e-5 * amax(&v) + p_round, 0.0).for_ty::<T>(),
        );
        check(
            &format!("{tag} rows {rows} lse"),
            &lse_k,
            &lse_t,
            Tol::new(1e-5, 8.0 * U),
        );
        first.get_or_insert((out_k, lse_k));
    }
    let (out_k, lse_k) = first.expect("one forward at least");
    let out_kf = widen(&out_k);

    // ---- backward: both sides get the kernel forward's out (as T) and lse
    let (dog, og, lg) = (
        Guarded::from_slice(&conv::<T>(&dout)),
        Guarded::from_slice(&out_k),
        Guarded::from_slice(&lse_k),
    );
    let (dq_k, dk_k, dv_k, dd_k) = both(&format!("{tag} bwd"), |mode, seed| {
        let mut dq = poisoned::<T>(q.len());
        let mut dk = poisoned::<T>(k.len());
        let mut dv = poisoned::<T>(v.len());
        let mut dd = poisoned::<f32>(b * nh * t);
        attention_bwd_launch(
            dq.get_mut(),
            dk.get_mut(),
            dv.get_mut(),
            dd.get_mut(),
            dog.get(),
            qg.get(),
            kg.get(),
            vg.get(),
            og.get(),
            lg.get(),
            d,
            mode,
            seed,
        );
        (
            take(&dq, "dq"),
            take(&dk, "dk"),
            take(&dv, "dv"),
            take(&dd, "D"),
        )
    });
    // D[b,h,i] = dout_i . out_i: checked against an f64 host sum; the kernel's f32 fmaf chain
    // plus a warp tree has error <= (hs/32 + 5 + 1) u sum|dout out| -> bound 8 u sum|.| + tiny.
    let (want_d, bound_d): (Vec<f32>, Vec<f32>) = (0..b * nh * t)
        .map(|row| {
            let (bi, h, i) = (row / (nh * t), row / t % nh, row % t);
            let o = ((bi * t + i) * nh + h) * hs;
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for c in o..o + hs {
                let p = dout[c] as f64 * out_kf[c] as f64;
                s += p;
                a += p.abs();
            }
            (s as f32, (8.0 * U as f64 * a) as f32 + 1e-30)
        })
        .unzip();
    check_with(&format!("{tag} D"), &dd_k, &want_d, |i| bound_d[i]);
    let (dq_t, dk_t, dv_t) = twin_attention_bwd(&dout, &q, &k, &v, &out_kf, &lse_k, d);
    // f32 error model: each gradient element is a sum of P_ij (dP_ij - D_i) terms (times k, q
    // or, for dv, P_ij dout_i); P carries the few-ulp errors of the score and the exponential
    // (base-2 exp2f in the kernel, vexp in the twin), dP and D their dot products' roundings,
    // and the terms cancel (at T = 1, dq is pure rounding noise: dP = D). So the error is
    // relative to the sum of the terms' magnitudes, computed here in f64 (`magnitudes`):
    // bound 1e-5 (~84 u) of it. (The worst-case error of a length-hs dot product is ~hs u
    // times its magnitude; the typical one is ~sqrt(hs) smaller. Seen: <= 15% of the bound,
    // dv at hs 128.)
    let mags = attention_bwd_magnitudes(&dout, &q, &k, &v, &out_kf, &lse_k, d);
    for ((name, got, want), mag) in [
        ("dq", &dq_k, &dq_t),
        ("dk", &dk_k, &dk_t),
        ("dv", &dv_k, &dv_t),
    ]
    .into_iter()
    .zip(&mags)
    {
        // bf16 runs on tensor cores, which take P (dv) and dS (dq, dk) rounded to bf16: each
        // term moves by <= 2^-9 of its magnitude, the gradient by <= 2^-9 mag; bound 2^-8 mag
        let rounding = if T::BF16 { 1.0 / 256.0 } else { 0.0 };
        check_with(&format!("{tag} {name}"), &widen(got), want, |i| {
            bound_for::<T>((1e-5 + rounding) * mag[i] + 1e-30, want[i])
        });
    }
}

/// A bound on an f32 result widened to the tolerance of a T output: a bf16 output is the
/// kernel's f32 value x rounded once, |round(x) - x| <= 2^-8 |x| <= 2^-8 (|twin| + bound).
fn bound_for<T: Ty>(f32_bound: f32, twin: f32) -> f32 {
    if T::BF16 {
        (1.0 + 1.0 / 256.0) * f32_bound + twin.abs() / 256.0
    } else {
        f32_bound
    }
}

/// The sums of the magnitudes of the terms of dq, dk, dv (f64 on the host, from the same
/// inputs), with the dot products dP_ij = dout_i . v_j and D_i = dout_i . out_i taken at the
/// magnitude of their own terms (their rounding error is relative to that, not to the result):
/// P_ij = e^(s_ij - lse_i), |dP|_ij = sum_c |dout_ic v_jc|, |D|_i = sum_c |dout_ic out_ic|;
/// dq_i: scale sum_j P_ij (|dP|_ij + |D|_i) |k_j|; dk_j: scale sum_{h,i} P_ij (|dP|_ij + |D|_i)
/// |q_i|; dv_j: sum_{h,i} P_ij |dout_i| (element by element over the head dims).
#[allow(clippy::too_many_arguments)]
fn attention_bwd_magnitudes(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d: AttnDims,
) -> [Vec<f32>; 3] {
    let AttnDims { b, t, nh, nkv, hs } = d;
    let scale = 1.0 / (hs as f64).sqrt();
    let dotf =
        |a: &[f32], c: &[f32]| -> f64 { a.iter().zip(c).map(|(&x, &y)| x as f64 * y as f64).sum() };
    let dot_abs = |a: &[f32], c: &[f32]| -> f64 {
        a.iter()
            .zip(c)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum()
    };
    let (mut mq, mut mk, mut mv) = (
        vec![0f64; q.len()],
        vec![0f64; k.len()],
        vec![0f64; v.len()],
    );
    for bi in 0..b {
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in 0..t {
                let qo = ((bi * t + i) * nh + h) * hs;
                let (qi, gi) = (&q[qo..qo + hs], &dout[qo..qo + hs]);
                let di = dot_abs(gi, &out[qo..qo + hs]);
                let l = lse[(bi * nh + h) * t + i] as f64;
                for j in 0..=i {
                    let ko = ((bi * t + j) * nkv + g) * hs;
                    let (kj, vj) = (&k[ko..ko + hs], &v[ko..ko + hs]);
                    let p = (dotf(qi, kj) * scale - l).exp();
                    let w = p * (dot_abs(gi, vj) + di) * scale;
                    for c in 0..hs {
                        mq[qo + c] += w * (kj[c] as f64).abs();
                        mk[ko + c] += w * (qi[c] as f64).abs();
                        mv[ko + c] += p * (gi[c] as f64).abs();
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    [f(mq), f(mk), f(mv)]
}

#[test]
fn attention_f32_matches_twin() {
    // (B, T, NH, NKV, HS): GQA groups 1, 2, 3, 4; T = 70 and 130 (partial last tiles), a
    // multiple of 64, small T and T = 1; HS 8 and 16 (_hs16), 32, 40 (_hs64, padded), 64, 128
    // (BI = 32: two inner tiles per outer tile).
    attention_case::<f32>(1, 70, 2, 2, 16, 11);
    attention_case::<f32>(2, 5, 4, 2, 8, 12);
    attention_case::<f32>(1, 70, 3, 1, 32, 13);
    attention_case::<f32>(1, 130, 2, 1, 40, 14);
    attention_case::<f32>(1, 64, 4, 1, 64, 15);
    attention_case::<f32>(2, 1, 2, 1, 16, 16);
    attention_case::<f32>(1, 70, 2, 1, 128, 17);
    // B = 2, four query/key tiles, G = 3
    attention_case::<f32>(2, 200, 6, 2, 64, 18);
}

#[test]
fn attention_bf16_matches_twin() {
    attention_case::<bf16>(1, 70, 2, 1, 16, 21);
    attention_case::<bf16>(2, 7, 3, 1, 8, 22);
    attention_case::<bf16>(1, 70, 3, 3, 32, 23);
    attention_case::<bf16>(1, 100, 4, 2, 64, 24);
    attention_case::<bf16>(1, 40, 2, 1, 100, 25);
    attention_case::<bf16>(2, 150, 4, 2, 32, 26);
    // HS 128 (the tensor-core kernel's largest bucket: 8 k-steps, 16 O tiles), three key tiles
    attention_case::<bf16>(1, 130, 2, 1, 128, 27);
    // five key tiles
    attention_case::<bf16>(1, 300, 2, 1, 64, 28);
    // B 2 with hs 48 (HSB 64, plain loads: Q's fragments in registers from a partial bucket),
    // and T 20 at HS 128 (one partial 32-key tile in the 128-row kernel)
    attention_case::<bf16>(2, 5, 2, 1, 48, 29);
    attention_case::<bf16>(1, 20, 2, 1, 128, 30);
}

// ------------------------------------------------------------------------------------------
// decode_attention
// ------------------------------------------------------------------------------------------

/// One decode_attention case for each split count in `nsplits` (plus the launcher's choice on
/// a 132-SM GPU). Cache positions a query may not read (before its row's start, at or past
/// pos0 + TQ) hold NaN in both the kernel's and the twin's caches: reading one shows.
#[allow(clippy::too_many_arguments)]
fn decode_case<T: Ty>(
    b: usize,
    tq: usize,
    tmax: usize,
    pos0: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    starts: &[u32],
    nsplits: &[usize],
    seed: u64,
) {
    let d = CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
    };
    let mut r = rng(seed);
    let rows = b * tq * nh;
    let q = rounded::<T>(&nonzero(&mut r, rows * hs, 2.0));
    let mut kc = rounded::<T>(&nonzero(&mut r, b * tmax * nkv * hs, 2.0));
    let mut vc = rounded::<T>(&nonzero(&mut r, b * tmax * nkv * hs, 1.0));
    for (bi, &start) in starts.iter().enumerate() {
        for j in 0..tmax {
            if j < start as usize || j >= pos0 + tq {
                let o = (bi * tmax + j) * nkv * hs;
                kc[o..o + nkv * hs].fill(f32::NAN);
                vc[o..o + nkv * hs].fill(f32::NAN);
            }
        }
    }
    let mut out_t = vec![0.0; rows * hs];
    let starts_ids = starts.to_vec();
    cpu()
        .decode_attention_fwd(
            ViewMut::all(&mut out_t),
            View::all(&q),
            View::all(&kc),
            View::all(&vc),
            &starts_ids,
            None,
            d,
        )
        .expect("twin decode_attention_fwd");
    let (qg, kg, vg) = (
        Guarded::from_slice(&conv::<T>(&q)),
        Guarded::from_slice(&conv::<T>(&kc)),
        Guarded::from_slice(&conv::<T>(&vc)),
    );
    let mut splits = nsplits.to_vec();
    splits.push(dec_nsplit(&d, starts, 132));
    splits.sort_unstable();
    splits.dedup();
    for nsplit in splits {
        let tag = format!(
            "decode_attention {} B{b} TQ{tq} TMAX{tmax} pos0 {pos0} NH{nh} NKV{nkv} HS{hs} \
             starts {starts:?} nsplit {nsplit}",
            T::NAME
        );
        // one launch into fresh poisoned buffers (pos: pos0 read from device memory)
        let run = |pos: Option<u32>, mode: EmuMode, seed: u64| {
            let scratch = if nsplit > 1 { nsplit * rows } else { 0 };
            let mut out = poisoned::<T>(rows * hs);
            let mut po = poisoned::<f32>(scratch * hs);
            let mut pml = poisoned::<f32>(scratch * 2);
            decode_attention_launch(
                out.get_mut(),
                po.get_mut(),
                pml.get_mut(),
                qg.get(),
                kg.get(),
                vg.get(),
                starts,
                d,
                nsplit,
                pos,
                mode,
                seed,
            );
            po.assert_intact("part_o");
            pml.assert_intact("part_ml");
            take(&out, "out")
        };
        let out_k = both(&tag, |mode, seed| run(None, mode, seed));
        // pos0 read from device memory instead: the same result, bit for bit; a position whose
        // queries would pass TMAX reads nothing: out = 0
        let past = (tmax - tq + 1) as u32;
        for (p, want) in [
            (pos0 as u32, out_k.clone()),
            (past, conv::<T>(&vec![0.0; rows * hs])),
        ] {
            let out = run(Some(p), EmuMode::Forward, seed);
            assert_same_bits(&format!("{tag}, pos {p} in memory"), &out, &want);
        }
        // error model as attention's forward (a convex combination of v rows, f32 scores and
        // exponentials in another order; split-K adds one 2^(m_s - M) rescale per split):
        // 1e-5 (~84 u) of max|v| = 1; seen <= 4%.
        let got = widen(&out_k);
        check(&tag, &got, &out_t, Tol::new(1e-5, 0.0).for_ty::<T>());
        // queries before their row's start read nothing: exactly 0
        for row in 0..rows {
            let (bi, t) = (row / (tq * nh), row / nh % tq);
            if pos0 + t < starts[bi] as usize {
                assert!(
                    got[row * hs..(row + 1) * hs].iter().all(|&x| x == 0.0),
                    "{tag}: pad row"
                );
            }
        }
    }
}

fn decode_cases<T: Ty>(seed: u64) {
    // prefill from position 0, row 1 left-padded by 3 (its first 3 queries read nothing);
    // G = 2; hs 16; nsplit 1 (the launcher's) and 3 (splits of a few keys, some empty)
    decode_case::<T>(2, 9, 12, 0, 4, 2, 16, &[0, 3], &[1, 3], seed);
    // chunked prefill at pos0 40 (keys span two 32-key tiles), G = 3, hs 32
    decode_case::<T>(2, 5, 50, 40, 3, 1, 32, &[0, 7], &[1], seed + 1);
    // decode: TQ 1, G = 10 (two head chunks: 8 + 2), 100 keys (4 tiles), hs 64
    decode_case::<T>(3, 1, 100, 99, 10, 1, 64, &[0, 17, 60], &[1, 7], seed + 2);
    // decode, hs 8 (_hs16), a row with a single key (start = position): splits past it empty
    decode_case::<T>(2, 1, 40, 33, 2, 2, 8, &[33, 5], &[1, 2], seed + 3);
    // decode, hs 128
    decode_case::<T>(1, 1, 70, 64, 4, 2, 128, &[2], &[1, 3], seed + 4);
}

#[test]
fn decode_attention_f32_matches_twin() {
    decode_cases::<f32>(31);
}

#[test]
fn decode_attention_bf16_matches_twin() {
    decode_cases::<bf16>(41);
}

// ------------------------------------------------------------------------------------------
// kv_append
// ------------------------------------------------------------------------------------------

/// kv_append_fwd_<T>: one block per new row (grid B*TQ, or fewer: grid-stride), block
/// 32 * ceil(D / pack / 32) capped at 256 (pack 16 bytes when D is a multiple of it, else 1).
/// `pos`: pos0 read by the kernel from this one-id buffer (the argument then 0), else `d.pos0`.
#[allow(clippy::too_many_arguments)]
fn kv_append_launch<T: Ty>(
    kc: &mut [T],
    vc: &mut [T],
    k: &[T],
    v: &[T],
    d: CacheDims,
    pos: Option<&[u32]>,
    max_grid: usize,
    mode: EmuMode,
    seed: u64,
) {
    let (rows, dim, pack) = (d.b * d.tq, d.nkv * d.hs, 16 / size_of::<T>());
    let p = if dim.is_multiple_of(pack) { pack } else { 1 };
    let block = (32 * dim.div_ceil(p).div_ceil(32)).min(256) as u32;
    let mut a = EmuArgs::new();
    a.ptr_mut(kc).ptr_mut(vc).ptr(k).ptr(v);
    match pos {
        Some(p) => a.ptr(p),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { d.pos0 };
    for x in [rows, d.tq, d.tmax, dim, pos0] {
        a.scalar(i32_of(x));
    }
    launch3(
        &format!("kv_append_fwd_{}", T::NAME),
        [rows.clamp(1, max_grid) as u32, 1, 1],
        block,
        0,
        &mut a,
        mode,
        seed,
    );
}

/// One append of TQ positions at pos0 into caches of random values, against the twin: a copy,
/// so every element must match exactly (bits), the appended ones and the untouched ones.
/// `misalign` shifts every buffer by that many elements off 16 bytes (the scalar path).
#[allow(clippy::too_many_arguments)]
fn kv_append_case<T: Ty>(
    b: usize,
    tq: usize,
    tmax: usize,
    pos0: usize,
    nkv: usize,
    hs: usize,
    misalign: usize,
    max_grid: usize,
    seed: u64,
) {
    let d = CacheDims {
        b,
        tq,
        tmax,
        nh: nkv,
        nkv,
        hs,
        pos0,
    };
    let mut r = rng(seed);
    let (nc, nn) = (b * tmax * nkv * hs, b * tq * nkv * hs);
    let kc = rounded::<T>(&nonzero(&mut r, nc, 2.0));
    let vc = rounded::<T>(&nonzero(&mut r, nc, 2.0));
    let k = rounded::<T>(&nonzero(&mut r, nn, 2.0));
    let v = rounded::<T>(&nonzero(&mut r, nn, 2.0));
    let (mut kc_t, mut vc_t) = (kc.clone(), vc.clone());
    cpu()
        .kv_append_fwd(
            ViewMut::all(&mut kc_t),
            ViewMut::all(&mut vc_t),
            View::all(&k),
            View::all(&v),
            None,
            d,
        )
        .expect("twin kv_append_fwd");
    let tag = format!(
        "kv_append {} B{b} TQ{tq} TMAX{tmax} pos0 {pos0} NKV{nkv} HS{hs} misalign {misalign} \
         grid <= {max_grid}",
        T::NAME
    );
    let (kg, vg) = (
        Guarded::from_slice_misaligned(&conv::<T>(&k), misalign),
        Guarded::from_slice_misaligned(&conv::<T>(&v), misalign),
    );
    let (kc_k, vc_k) = both(&tag, |mode, seed| {
        let mut kcg = Guarded::from_slice_misaligned(&conv::<T>(&kc), misalign);
        let mut vcg = Guarded::from_slice_misaligned(&conv::<T>(&vc), misalign);
        kv_append_launch(
            kcg.get_mut(),
            vcg.get_mut(),
            kg.get(),
            vg.get(),
            d,
            None,
            max_grid,
            mode,
            seed,
        );
        (take(&kcg, "kcache"), take(&vcg, "vcache"))
    });
    // pos0 read from device memory: the same caches; a position whose TQ rows would pass
    // TMAX: nothing written
    for (p, what) in [(pos0, "pos in memory"), (tmax - tq + 1, "pos past the end")] {
        let mut kcg = Guarded::from_slice_misaligned(&conv::<T>(&kc), misalign);
        let mut vcg = Guarded::from_slice_misaligned(&conv::<T>(&vc), misalign);
        let pos = [p as u32];
        let (kgm, vgm) = (kcg.get_mut(), vcg.get_mut());
        kv_append_launch(
            kgm,
            vgm,
            kg.get(),
            vg.get(),
            d,
            Some(&pos),
            max_grid,
            EmuMode::Forward,
            seed,
        );
        let want = if p == pos0 {
            (&kc_k, &vc_k)
        } else {
            (&conv::<T>(&kc), &conv::<T>(&vc))
        };
        let (kc_p, vc_p) = (take(&kcg, "kcache"), take(&vcg, "vcache"));
        assert_same_bits(&format!("{tag}, {what}: kcache"), &kc_p, want.0);
        assert_same_bits(&format!("{tag}, {what}: vcache"), &vc_p, want.1);
    }
    assert_same_bits(&format!("{tag}: kcache"), &kc_k, &conv::<T>(&kc_t));
    assert_same_bits(&format!("{tag}: vcache"), &vc_k, &conv::<T>(&vc_t));
    // the twin itself: the new rows landed, the others kept their values
    for bi in 0..b {
        for j in 0..tmax {
            let o = (bi * tmax + j) * nkv * hs;
            let want = if (pos0..pos0 + tq).contains(&j) {
                let src = (bi * tq + j - pos0) * nkv * hs;
                &k[src..src + nkv * hs]
            } else {
                &kc[o..o + nkv * hs]
            };
            assert_eq!(
                &kc_t[o..o + nkv * hs],
                want,
                "{tag}: twin row {bi} position {j}"
            );
        }
    }
}

fn kv_append_cases<T: Ty>(seed: u64) {
    // decode: one position per row, D = 64 (16-byte packs)
    kv_append_case::<T>(3, 1, 40, 17, 2, 32, 0, 1024, seed);
    // prefill of 9 positions at 0, then a chunk at pos0 30 ending at TMAX
    kv_append_case::<T>(2, 9, 12, 0, 4, 16, 0, 1024, seed + 1);
    kv_append_case::<T>(2, 6, 36, 30, 1, 128, 0, 1024, seed + 2);
    // D = 3 * 5 (not a multiple of a pack) and misaligned buffers: the one-element path
    kv_append_case::<T>(4, 3, 10, 2, 3, 5, 0, 1024, seed + 3);
    kv_append_case::<T>(2, 2, 7, 4, 2, 16, 1, 1024, seed + 4);
    // more rows than blocks: the grid-stride loop over rows
    kv_append_case::<T>(5, 7, 20, 9, 2, 64, 0, 2, seed + 5);
    // more packs in a row than the 256 threads: D = 4096 (1024 f32 / 512 bf16 packs), and
    // D = 303 one element at a time
    kv_append_case::<T>(3, 2, 8, 5, 8, 512, 0, 1024, seed + 6);
    kv_append_case::<T>(2, 3, 6, 1, 3, 101, 0, 1024, seed + 7);
}

#[test]
fn kv_append_f32_matches_twin() {
    kv_append_cases::<f32>(51);
}

#[test]
fn kv_append_bf16_matches_twin() {
    kv_append_cases::<bf16>(61);
}

// ------------------------------------------------------------------------------------------
// cross_entropy
// ------------------------------------------------------------------------------------------

/// The twin's (losses [N], dlogits [N,V]) of whole rows of logits `x` [N,V]: the device's
/// cross-entropy over one chunk of all V columns, the gradient written over a copy of `x`.
fn twin_cross_entropy(
    x: &[f32],
    targets: &[u32],
    mask: &[f32],
    v: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (dev, n) = (cpu(), mask.len());
    let (mut dl, mv, ids) = (x.to_vec(), mask.to_vec(), targets.to_vec());
    let (mut losses, mut state) = (vec![0.0; n], vec![0.0; 3 * n]);
    dev.cross_entropy_chunk_fwd(
        ViewMut::all(&mut losses),
        ViewMut::all(&mut state),
        View::all(&dl),
        &ids,
        View::all(&mv),
        n,
        v,
        v,
        0,
    )
    .expect("twin cross_entropy_chunk_fwd");
    dev.cross_entropy_chunk_bwd(
        ViewMut::all(&mut dl),
        View::all(&state),
        &ids,
        View::all(&mv),
        n,
        v,
        v,
        0,
        scale,
    )
    .expect("twin cross_entropy_chunk_bwd");
    (losses, dl)
}

/// One cross-entropy case over N = 6 rows: masks 1, 0 (its row all NaN: padding is never
/// read), 0.5, 1, 2, 1; row 3 shifted by +60 (large logits), row 4's target is its argmax.
/// `neg_inf`: about 1 in 8 non-target logits is -inf. `misalign`: the logits (and dlogits)
/// start 1 element after a 16-byte boundary (the scalar path even when V is a multiple of
/// the pack). `max_grid` < N exercises the grid-stride loop.
fn cross_entropy_case<T: Ty>(v: usize, neg_inf: bool, misalign: usize, max_grid: usize, seed: u64) {
    let n = 6;
    let tag = format!(
        "cross_entropy {} V{v}{}{}{}",
        T::NAME,
        if neg_inf { " with -inf" } else { "" },
        if misalign > 0 { " misaligned" } else { "" },
        if max_grid < n { " grid-stride" } else { "" }
    );
    let mut r = rng(seed);
    let mask = vec![1.0f32, 0.0, 0.5, 1.0, 2.0, 1.0];
    let targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
    let mut x = nonzero(&mut r, n * v, 4.0);
    for (row, &y) in targets.iter().enumerate() {
        let xr = &mut x[row * v..(row + 1) * v];
        if row == 3 {
            xr.iter_mut().for_each(|e| *e += 60.0);
        }
        if neg_inf {
            for (j, e) in xr.iter_mut().enumerate() {
                if j != y as usize && r.random_range(0..8) == 0 {
                    *e = f32::NEG_INFINITY;
                }
            }
        }
        if row == 1 {
            xr.fill(f32::NAN);
        }
    }
    let mut targets = targets;
    {
        let xr = &x[4 * v..5 * v];
        let am = (0..v).fold(0, |a, j| if xr[j] > xr[a] { j } else { a });
        targets[4] = am as u32;
    }
    let x = rounded::<T>(&x);
    let xg = Guarded::from_slice_misaligned(&conv::<T>(&x), misalign);
    let scale = 0.37f32;

    let (losses_k, state_k) = both(&format!("{tag} fwd"), |mode, seed| {
        let (mut losses, mut state) = (poisoned::<f32>(n), poisoned::<f32>(3 * n));
        cross_entropy_fwd_launch(
            losses.get_mut(),
            state.get_mut(),
            xg.get(),
            &targets,
            &mask,
            n,
            v,
            max_grid,
            mode,
            seed,
        );
        (take(&losses, "losses"), take(&state, "state"))
    });
    // the backward from the kernel forward's state, in place on a copy of the logits
    let dl_k = both(&format!("{tag} bwd"), |mode, seed| {
        let mut dl = Guarded::from_slice_misaligned(&conv::<T>(&x), misalign);
        cross_entropy_bwd_launch(
            dl.get_mut(),
            &state_k,
            &targets,
            &mask,
            n,
            v,
            scale,
            max_grid,
            mode,
            seed,
        );
        take(&dl, "dlogits")
    });

    let (losses_t, dl_t) = twin_cross_entropy(&x, &targets, &mask, v, scale);

    // loss = mask ((M - x_y) + ln S): M and x_y are exact, each e^(x - M) is the twin's bits
    // (the same vexp), but the kernel sums S in f32 with online rescales (each rescale is one
    // more vexp: 2 ulp) where the twin sums in f64: S's relative error, <= ~(V/256 + 8 + a
    // few rescales) u, becomes ln S's absolute error. Bound: 64 u |mask| absolute + 4 u
    // relative (the final roundings).
    check_with(&format!("{tag} losses"), &losses_k, &losses_t, |i| {
        64.0 * U * mask[i].abs() + 4.0 * U * losses_t[i].abs()
    });
    // dlogits = e^(x - M) (w / S) - w [v = y]: the same S error (<= 64 u relative) times the
    // softmax term, plus the target's subtraction: bound 64 u |w| e^(x-M)/S + 4 u |w| at y.
    let got = widen(&dl_k);
    check_with(&format!("{tag} dlogits"), &got, &dl_t, |i| {
        let (row, j) = (i / v, i % v);
        let w = (mask[row] * scale).abs();
        let at_y = if j == targets[row] as usize {
            4.0 * U * w
        } else {
            0.0
        };
        let soft = (dl_t[i] + if at_y > 0.0 { w } else { 0.0 }).abs();
        bound_for::<T>(64.0 * U * soft + at_y + 1e-30, dl_t[i])
    });
    // the masked row is exactly zero
    assert!(
        got[v..2 * v].iter().all(|&g| g == 0.0),
        "{tag}: masked row not zero"
    );
}

fn cross_entropy_cases<T: Ty>(seed: u64) {
    // V 7 and 4099: scalar path; 1000: a multiple of 4 and 8 (vector path for f32 and bf16);
    // 300: vector for f32, scalar for bf16; 1000 misaligned: scalar path on a multiple.
    cross_entropy_case::<T>(7, false, 0, 65535, seed);
    cross_entropy_case::<T>(1000, false, 0, 65535, seed + 1);
    cross_entropy_case::<T>(1000, true, 0, 2, seed + 2);
    cross_entropy_case::<T>(300, true, 0, 65535, seed + 3);
    cross_entropy_case::<T>(4099, false, 0, 65535, seed + 4);
    cross_entropy_case::<T>(4099, true, 0, 4, seed + 5);
    cross_entropy_case::<T>(1000, false, 1, 65535, seed + 6);
}

#[test]
fn cross_entropy_f32_matches_twin() {
    cross_entropy_cases::<f32>(51);
}

#[test]
fn cross_entropy_bf16_matches_twin() {
    cross_entropy_cases::<bf16>(61);
}

// ------------------------------------------------------------------------------------------
// softmax
// ------------------------------------------------------------------------------------------

/// N = 4 rows; row 2 shifted by -70 (large negative logits), `neg_inf`: 1 in 8 logits -inf
/// (never a whole row). The backward is fed the kernel forward's out, the same for the twin.
fn softmax_case<T: Ty>(v: usize, neg_inf: bool, misalign: usize, max_grid: usize, seed: u64) {
    let n = 4;
    let tag = format!(
        "softmax {} V{v}{}{}{}",
        T::NAME,
        if neg_inf { " with -inf" } else { "" },
        if misalign > 0 { " misaligned" } else { "" },
        if max_grid < n { " grid-stride" } else { "" }
    );
    let mut r = rng(seed);
    let mut x = nonzero(&mut r, n * v, 5.0);
    for row in 0..n {
        let xr = &mut x[row * v..(row + 1) * v];
        if row == 2 {
            xr.iter_mut().for_each(|e| *e -= 70.0);
        }
        if neg_inf {
            for e in xr.iter_mut().skip(1) {
                if r.random_range(0..8) == 0 {
                    *e = f32::NEG_INFINITY;
                }
            }
        }
    }
    let x = rounded::<T>(&x);
    let dout = rounded::<T>(&nonzero(&mut r, n * v, 1.0));
    let xg = Guarded::from_slice_misaligned(&conv::<T>(&x), misalign);
    let out_k = both(&format!("{tag} fwd"), |mode, seed| {
        let mut out = Guarded::from_slice_misaligned(&vec![T::CANARY; n * v], misalign);
        softmax_fwd_launch(out.get_mut(), xg.get(), n, v, max_grid, mode, seed);
        take(&out, "out")
    });
    let og = Guarded::from_slice_misaligned(&out_k, misalign);
    let dg = Guarded::from_slice_misaligned(&conv::<T>(&dout), misalign);
    let dx_k = both(&format!("{tag} bwd"), |mode, seed| {
        let mut dx = Guarded::from_slice_misaligned(&vec![T::CANARY; n * v], misalign);
        softmax_bwd_launch(dx.get_mut(), dg.get(), og.get(), n, v, max_grid, mode, seed);
        take(&dx, "dx")
    });

    let dev = cpu();
    let mut out_t = vec![0.0; n * v];
    dev.softmax_fwd(ViewMut::all(&mut out_t), View::all(&x), n, v)
        .expect("twin softmax_fwd");
    let out_kf = widen(&out_k);
    let mut dx_t = vec![0.0; n * v];
    dev.softmax_bwd(
        ViewMut::all(&mut dx_t),
        View::all(&dout),
        View::all(&out_kf),
        n,
        v,
    )
    .expect("twin softmax_bwd");

    // out = e^(x - M) (1/S): e^(x - M) is the twin's bits, S is an f32 sum with online
    // rescales (kernel) vs an f64 sum (twin): relative error <= ~(V/256 + 8 + rescales) u.
    // Bound: 64 u relative (plus the bf16 rounding).
    check(
        &format!("{tag} out"),
        &out_kf,
        &out_t,
        Tol::new(1e-30, 64.0 * U).for_ty::<T>(),
    );
    // dx = out (dout - s), s = sum dout out: f32 fmaf per thread + block tree (kernel) vs
    // 8-lane f32 dot (twin); |s error| <= ~(V/256 + 16) u sum|dout out| <= 64 u max|dout|
    // (sum out = 1); dx error <= out (4 u |dout - s| + |s error|).
    let got = widen(&dx_k);
    let s_err = 64.0 * U * amax(&dout);
    check_with(&format!("{tag} dx"), &got, &dx_t, |i| {
        let o = out_kf[i].abs();
        bound_for::<T>(
            o * (4.0 * U * (dout[i].abs() + 1.0) + s_err) + 1e-30,
            dx_t[i],
        )
    });
}

fn softmax_cases<T: Ty>(seed: u64) {
    softmax_case::<T>(7, false, 0, 65535, seed);
    softmax_case::<T>(300, true, 0, 65535, seed + 1);
    softmax_case::<T>(4096, false, 0, 65535, seed + 2);
    softmax_case::<T>(4096, true, 0, 3, seed + 3);
    softmax_case::<T>(4099, false, 0, 65535, seed + 4);
    softmax_case::<T>(4096, false, 1, 65535, seed + 5);
}

#[test]
fn softmax_f32_matches_twin() {
    softmax_cases::<f32>(71);
}

#[test]
fn softmax_bf16_matches_twin() {
    softmax_cases::<bf16>(81);
}

// ------------------------------------------------------------------------------------------
// sample
// ------------------------------------------------------------------------------------------

/// Logits of N = 6 rows for the sample tests: row 0 random, row 1 with the max planted at
/// three ids (a tie for greedy), row 2 all equal, row 3 quantized to a few levels (ties at
/// every top-k/top-p boundary), row 4 random with a -inf tail, row 5 a spread of 12 (one
/// token takes most of the mass at temperature 0.7).
fn sample_logits(r: &mut StdRng, v: usize) -> Vec<f32> {
    let n = 6;
    let mut x = nonzero(r, n * v, 3.0);
    let row = |i: usize| i * v..(i + 1) * v;
    for j in [v / 2, v / 5, v - 1] {
        x[row(1).start + j] = 3.5;
    }
    x[row(2)].fill(0.25);
    for e in &mut x[row(3)] {
        *e = (*e * 1.5).round() / 1.5;
    }
    for e in &mut x[row(4)][v / 2 + 1..] {
        *e = f32::NEG_INFINITY;
    }
    for e in &mut x[row(5)] {
        *e *= 4.0;
    }
    x
}

/// Every spec on the same logits, V in {7, 300, 4099}. Tokens must equal the twin's exactly,
/// logp within 1e-5 absolute (both are ln(p_id) - ln(total) in f64 rounded to f32; the
/// totals are f64 sums in different orders: ~1e-16 relative).
fn sample_cases<T: Ty>(seed: u64) {
    let mut r = rng(seed);
    let specs = [
        SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 0.7,
            top_k: 3,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 0.7,
            top_k: 10,
            top_p: 1.0,
        }, // > V = 7: min(top_k, V)
        SampleSpec {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.9,
        },
        SampleSpec {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.8,
        },
        SampleSpec {
            temperature: 1.3,
            top_k: 2,
            top_p: 0.5,
        },
    ];
    let (mut total, mut exact) = (0usize, 0usize);
    for v in [7usize, 300, 4099] {
        let n = 6;
        let x = rounded::<T>(&sample_logits(&mut r, v));
        // greedy also skips NaN logits (not at id 0): plant one in row 0
        let mut x_greedy = x.clone();
        x_greedy[v / 2] = f32::NAN;
        let mut u = uniform(&mut r, n, 0.0, 1.0);
        u[0] = 0.0;
        u[1] = 0.999_999;
        for (si, spec) in specs.iter().enumerate() {
            if spec.top_k > v {
                // only V = 7 needs the clamp case; keep the others' time
                if v != 7 {
                    continue;
                }
            }
            let logits = if spec.temperature == 0.0 {
                &x_greedy
            } else {
                &x
            };
            let tag = format!("sample {} V{v} {spec:?}", T::NAME);
            let lg = Guarded::from_slice(&conv::<T>(logits));
            let max_grid = if si == 2 { 2 } else { 65535 };
            let (ids_k, logp_k) = both(&tag, |mode, seed| {
                let mut ids = poisoned::<u32>(n);
                let mut logp = poisoned::<f32>(n);
                sample_launch(
                    ids.get_mut(),
                    logp.get_mut(),
                    lg.get(),
                    &u,
                    n,
                    v,
                    spec,
                    max_grid,
                    mode,
                    seed,
                );
                (take(&ids, "ids"), take(&logp, "logp"))
            });
            let mut ids_t = vec![0u32; n];
            let mut logp_t = vec![0.0f32; n];
            let uv = u.clone();
            cpu()
                .sample_fwd(
                    &mut ids_t,
                    ViewMut::all(&mut logp_t),
                    View::all(logits),
                    View::all(&uv),
                    n,
                    v,
                    spec,
                )
                .expect("twin sample_fwd");
            assert_eq!(ids_k, ids_t, "{tag}: tokens differ from the twin's");
            assert!(
                ids_k.iter().all(|&i| (i as usize) < v),
                "{tag}: id out of range"
            );
            if spec.temperature == 0.0 {
                // row 1: three tied maxima, the lowest id wins; row 2: all equal, id 0
                assert_eq!(ids_k[1] as usize, v / 5, "{tag}: greedy tie");
                assert_eq!(ids_k[2], 0, "{tag}: greedy all-equal row");
            }
            check(
                &format!("{tag} logp"),
                &logp_k,
                &logp_t,
                Tol::new(1e-5, 0.0),
            );
            total += n;
            exact += (0..n)
                .filter(|&i| logp_k[i].to_bits() == logp_t[i].to_bits())
                .count();
        }
    }
    eprintln!(
        "sample {}: {exact} of {total} logp bit-equal to the twin's",
        T::NAME
    );
}

#[test]
fn sample_f32_matches_twin() {
    sample_cases::<f32>(91);
}

#[test]
fn sample_bf16_matches_twin() {
    sample_cases::<bf16>(101);
}

// ------------------------------------------------------------------------------------------
// cross_entropy over vocabulary chunks
// ------------------------------------------------------------------------------------------

/// Columns `[v0, v0 + vc)` of the rows of `x` [N,V], as [N,VC].
fn columns<T: Copy>(x: &[T], v: usize, v0: usize, vc: usize) -> Vec<T> {
    x.chunks(v).flat_map(|r| r[v0..v0 + vc].to_vec()).collect()
}

/// The chunked forward and backward of cross_entropy over chunks of `vc` columns (the last one
/// shorter when VC does not divide V), in both schedules, against the whole-row twin: N = 6
/// rows as in [`cross_entropy_case`] (masks 1, 0 (NaN row), 0.5, 1, 2, 1; row 3 at +60), with
/// row 5's first chunk all -inf (its target elsewhere) when there are several: a chunk that
/// adds nothing.
fn cross_entropy_chunk_case<T: Ty>(v: usize, vc: usize, max_grid: usize, seed: u64) {
    let n = 6;
    let tag = format!("cross_entropy_chunk {} V{v} VC{vc}", T::NAME);
    let mut r = rng(seed);
    let mask = vec![1.0f32, 0.0, 0.5, 1.0, 2.0, 1.0];
    let mut targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
    let mut x = nonzero(&mut r, n * v, 4.0);
    x[3 * v..4 * v].iter_mut().for_each(|e| *e += 60.0);
    x[v..2 * v].fill(f32::NAN);
    if vc < v {
        targets[5] = r.random_range(vc as u32..v as u32);
        x[5 * v..5 * v + vc].fill(f32::NEG_INFINITY);
    }
    let x = rounded::<T>(&x);
    let xt = conv::<T>(&x);
    let starts: Vec<usize> = (0..v).step_by(vc).collect();
    let scale = 0.37f32;
    let cols = |v0: usize| (v0 + vc).min(v) - v0;

    let (losses_k, dl_k) = both(&tag, |mode, seed| {
        let mut losses = poisoned::<f32>(n);
        let mut state = poisoned::<f32>(3 * n);
        for &v0 in &starts {
            let c = cols(v0);
            let xc = Guarded::from_slice(&columns(&xt, v, v0, c));
            let mut a = EmuArgs::new();
            a.ptr_mut(losses.get_mut())
                .ptr_mut(state.get_mut())
                .ptr(xc.get())
                .ptr(&targets)
                .ptr(&mask);
            a.scalar(i32_of(n))
                .scalar(i32_of(c))
                .scalar(i32_of(v))
                .scalar(i32_of(v0));
            let name = format!("cross_entropy_chunk_fwd_{}", T::NAME);
            launch3(
                &name,
                [row_grid(n, max_grid), 1, 1],
                ROW_NT,
                0,
                &mut a,
                mode,
                seed,
            );
        }
        let mut dl = vec![T::CANARY; n * v];
        for &v0 in &starts {
            let c = cols(v0);
            // in place: the chunk's logits become their gradient
            let mut dc = Guarded::from_slice(&columns(&xt, v, v0, c));
            let mut a = EmuArgs::new();
            a.ptr_mut(dc.get_mut())
                .ptr(state.get())
                .ptr(&targets)
                .ptr(&mask);
            a.scalar(i32_of(n))
                .scalar(i32_of(c))
                .scalar(i32_of(v0))
                .scalar(scale);
            let name = format!("cross_entropy_chunk_bwd_{}", T::NAME);
            launch3(
                &name,
                [row_grid(n, max_grid), 1, 1],
                ROW_NT,
                0,
                &mut a,
                mode,
                seed,
            );
            let dc = take(&dc, "dlogits chunk");
            for (row, part) in dc.chunks(c).enumerate() {
                dl[row * v + v0..row * v + v0 + c].copy_from_slice(part);
            }
        }
        (take(&losses, "losses"), dl)
    });

    let (losses_t, dl_t) = twin_cross_entropy(&x, &targets, &mask, v, scale);

    // As the whole-row case (S in f32 against the twin's f64: <= ~(V/256 + 8) u relative),
    // plus each chunk's merge: two rescales of 2 ulp and a rounded add, <= 6 u more per chunk.
    let k = 64.0 + 6.0 * starts.len() as f32;
    check_with(&format!("{tag} losses"), &losses_k, &losses_t, |i| {
        k * U * mask[i].abs() + 4.0 * U * losses_t[i].abs()
    });
    let got = widen(&dl_k);
    check_with(&format!("{tag} dlogits"), &got, &dl_t, |i| {
        let (row, j) = (i / v, i % v);
        let w = (mask[row] * scale).abs();
        let at_y = j == targets[row] as usize;
        let soft = (dl_t[i] + if at_y { w } else { 0.0 }).abs();
        let sub = if at_y { 4.0 * U * w } else { 0.0 };
        bound_for::<T>(k * U * soft + sub + 1e-30, dl_t[i])
    });
    assert!(
        got[v..2 * v].iter().all(|&g| g == 0.0),
        "{tag}: masked row not zero"
    );
}

fn cross_entropy_chunk_cases<T: Ty>(seed: u64) {
    // 1000 by 256: three vector chunks and a last one of 232 (a multiple of 4 and 8);
    // 4099 by 1024: four vector chunks and a scalar one of 3; 300 by 7: 43 scalar chunks,
    // grid-stride; one chunk of all V.
    cross_entropy_chunk_case::<T>(1000, 256, 65535, seed);
    cross_entropy_chunk_case::<T>(4099, 1024, 65535, seed + 1);
    cross_entropy_chunk_case::<T>(300, 7, 4, seed + 2);
    cross_entropy_chunk_case::<T>(300, 300, 65535, seed + 3);
}

#[test]
fn cross_entropy_chunk_f32_matches_twin() {
    cross_entropy_chunk_cases::<f32>(71);
}

#[test]
fn cross_entropy_chunk_bf16_matches_twin() {
    cross_entropy_chunk_cases::<bf16>(81);
}
