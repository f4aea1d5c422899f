//! The CPU emulator of the CUDA execution model, tested on its own kernels
//! (tests/emu_kernels/*.cu): barriers and shared memory in every scheduling mode, warp shuffles
//! by the PTX rules, votes, atomics, bf16/f16 rounding, dynamic shared memory, poisoning, and
//! deliberately broken kernels that the emulator (or this harness) must catch, and the
//! out-of-bounds and misaligned accesses and races between blocks that the memory check of a
//! `memcheck` build must catch (scripts/memcheck.sh).

use half::{bf16, f16};
use nla_engine::device::emu::{launch, memcheck, EmuArgs, EmuMode};
use rand::{Rng, SeedableRng};

const FIBERS: [EmuMode; 2] = [EmuMode::Forward, EmuMode::Reversed];
const ALL: [EmuMode; 3] = [EmuMode::Forward, EmuMode::Reversed, EmuMode::Threads];

fn run(name: &str, grid: u32, block: u32, dyn_smem: usize, args: &mut EmuArgs, mode: EmuMode) {
    if let Err(e) = launch(name, [grid, 1, 1], [block, 1, 1], dyn_smem, args, mode, 7) {
        panic!("{name} ({mode:?}): {e}");
    }
}

/// The error of a launch that must fail.
fn run_err(
    name: &str,
    grid: u32,
    block: u32,
    dyn_smem: usize,
    args: &mut EmuArgs,
    mode: EmuMode,
) -> String {
    match launch(name, [grid, 1, 1], [block, 1, 1], dyn_smem, args, mode, 7) {
        Ok(()) => panic!("{name} ({mode:?}): the launch succeeded, expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

/// A buffer with canary regions on both sides, to catch out-of-range writes.
struct Guarded {
    buf: Vec<f32>,
    n: usize,
}

const GUARD: usize = 64;
const CANARY: u32 = 0x7fa5_a5a5; // a NaN no kernel computes

impl Guarded {
    fn new(n: usize, fill: f32) -> Self {
        let mut buf = vec![f32::from_bits(CANARY); n + 2 * GUARD];
        buf[GUARD..GUARD + n].fill(fill);
        Guarded { buf, n }
    }
    fn inner(&mut self) -> &mut [f32] {
        &mut self.buf[GUARD..GUARD + self.n]
    }
    /// The indices (relative to the buffer's start, so -1 is just before it) written outside.
    fn overruns(&self) -> Vec<isize> {
        (0..self.buf.len())
            .filter(|&i| !(GUARD..GUARD + self.n).contains(&i) && self.buf[i].to_bits() != CANARY)
            .map(|i| i as isize - GUARD as isize)
            .collect()
    }
}

// ------------------------------------------------------------------------------------------
// Barriers and shared memory
// ------------------------------------------------------------------------------------------

#[test]
fn emu_block_reduction_equals_host_sum_in_every_mode() {
    // small integers: every partial sum is exact, so the tree's result is the host sum
    let n: usize = 64 * 256 - 100; // the last block is partial
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
    let blocks = n.div_ceil(256);
    for mode in ALL {
        let grid = if mode == EmuMode::Threads {
            4
        } else {
            blocks as u32
        };
        let m = if mode == EmuMode::Threads { 4 * 256 } else { n };
        let mut y = vec![f32::NAN; grid as usize];
        run(
            "emu_block_sum",
            grid,
            256,
            0,
            EmuArgs::new().ptr(&x[..m]).ptr_mut(&mut y).scalar(m as i32),
            mode,
        );
        for (b, &yb) in y.iter().enumerate() {
            let want: f32 = x[b * 256..((b + 1) * 256).min(m)].iter().sum();
            assert_eq!(yb, want, "block {b} ({mode:?})");
        }
    }
}

#[test]
fn emu_common_block_sum_every_thread_gets_the_sum() {
    let x: Vec<f32> = (0..4 * 128).map(|i| (i % 5) as f32).collect();
    for mode in ALL {
        let mut y = vec![f32::NAN; x.len()];
        run(
            "emu_common_block_sum",
            4,
            128,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y),
            mode,
        );
        for b in 0..4 {
            let want: f32 = x[b * 128..(b + 1) * 128].iter().sum();
            assert!(
                y[b * 128..(b + 1) * 128].iter().all(|&v| v == want),
                "block {b} ({mode:?})"
            );
        }
    }
}

#[test]
fn emu_dynamic_shared_memory_reverses_each_block() {
    let (blocks, threads) = (3usize, 96usize);
    let x: Vec<f32> = (0..blocks * threads).map(|i| i as f32).collect();
    for mode in ALL {
        let mut y = vec![f32::NAN; x.len()];
        run(
            "emu_dyn_reverse",
            blocks as u32,
            threads as u32,
            threads * 4,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y),
            mode,
        );
        for b in 0..blocks {
            for t in 0..threads {
                assert_eq!(
                    y[b * threads + t],
                    x[b * threads + threads - 1 - t],
                    "{mode:?}"
                );
            }
        }
    }
}

#[test]
fn emu_shared_memory_is_poisoned_at_every_block_start() {
    let (blocks, threads) = (3usize, 64usize);
    for mode in ALL {
        let mut out = vec![0u32; blocks * threads * 4];
        let mut args = EmuArgs::new();
        args.ptr_mut(&mut out);
        if memcheck() && mode != EmuMode::Threads {
            // the memory check stops the first read of an unwritten slot
            let e = run_err("emu_read_unwritten", 3, 64, 64 * 4, &mut args, mode);
            assert_has(&e, &["uninitialized shared memory: thread ("]);
            continue;
        }
        run(
            "emu_read_unwritten",
            blocks as u32,
            threads as u32,
            threads * 4,
            &mut args,
            mode,
        );
        // 0xFFFFFFFF: NaN as a float, -1 as an int; blocks after the first see it too
        assert!(out.iter().all(|&w| w == u32::MAX), "{mode:?}: {out:x?}");
        assert!(f32::from_bits(out[0]).is_nan());
    }
}

#[test]
fn emu_scheduling_orders() {
    let (blocks, threads) = (8usize, 64usize);
    let total = blocks * threads;
    let order = |mode: EmuMode, seed: u64| {
        let mut order = vec![u32::MAX; total];
        let mut counter = [0u32];
        launch(
            "emu_record_order",
            [blocks as u32, 1, 1],
            [threads as u32, 1, 1],
            0,
            EmuArgs::new().ptr_mut(&mut order).ptr_mut(&mut counter),
            mode,
            seed,
        )
        .unwrap();
        assert_eq!(counter[0] as usize, total);
        order
    };
    let fwd = order(EmuMode::Forward, 1);
    assert_eq!(fwd, (0..total as u32).collect::<Vec<_>>());
    let rev = order(EmuMode::Reversed, 1);
    // each block's threads in reverse order, the blocks in a shuffled order
    let block_seq: Vec<u32> = rev.chunks(threads).map(|c| c[0] / threads as u32).collect();
    for (c, &b) in rev.chunks(threads).zip(&block_seq) {
        let want: Vec<u32> = (0..threads as u32)
            .rev()
            .map(|t| b * threads as u32 + t)
            .collect();
        assert_eq!(c, want.as_slice());
    }
    let mut sorted = block_seq.clone();
    sorted.sort();
    assert_eq!(sorted, (0..blocks as u32).collect::<Vec<_>>());
    assert_ne!(block_seq, sorted, "blocks not shuffled");
    assert_eq!(
        order(EmuMode::Reversed, 1),
        rev,
        "the same seed gives the same order"
    );
    assert_ne!(
        order(EmuMode::Reversed, 2),
        rev,
        "another seed gives another order"
    );
    // OS threads: some permutation
    let mut thr = order(EmuMode::Threads, 1);
    thr.sort();
    assert_eq!(thr, (0..total as u32).collect::<Vec<_>>());
}

/// Warp at a time: between two block barriers a warp runs its whole stretch, warp collectives
/// included, before the next warp starts (lanes in order, warps in order; both reversed in the
/// reversed mode), and every stretch runs the warps in that order.
#[test]
fn emu_scheduling_runs_a_warp_at_a_time() {
    let threads = 96u32; // 3 warps
    for mode in FIBERS {
        let mut order = vec![u32::MAX; 3 * threads as usize];
        let mut counter = [0u32];
        run(
            "emu_record_steps",
            1,
            threads,
            0,
            EmuArgs::new().ptr_mut(&mut order).ptr_mut(&mut counter),
            mode,
        );
        let warps: Vec<u32> = match mode {
            EmuMode::Reversed => vec![2, 1, 0],
            _ => vec![0, 1, 2],
        };
        let (thread, step) = (|e: u32| e / 3, |e: u32| e % 3);
        // steps 0 and 1 (around the __syncwarp): one run per warp, the warps in order
        let (first, last) = order.split_at(2 * threads as usize);
        assert!(first.iter().all(|&e| step(e) < 2), "{mode:?}: {order:?}");
        assert!(last.iter().all(|&e| step(e) == 2), "{mode:?}: {order:?}");
        for (run, &w) in first.chunks(64).zip(&warps) {
            assert!(
                run.iter().all(|&e| thread(e) / 32 == w),
                "{mode:?}: {run:?}"
            );
            // in a warp: every lane's step 0 (lanes in order) before any step 1
            let (s0, s1) = run.split_at(32);
            let lanes: Vec<u32> = s0.iter().map(|&e| thread(e) % 32).collect();
            let mut want: Vec<u32> = (0..32).collect();
            if mode == EmuMode::Reversed {
                want.reverse();
            }
            assert_eq!(lanes, want, "{mode:?}");
            assert!(s0.iter().all(|&e| step(e) == 0) && s1.iter().all(|&e| step(e) == 1));
        }
        // step 2 (after the barrier): the warps in the same order again, lanes in order
        let threads_after: Vec<u32> = last.iter().map(|&e| thread(e)).collect();
        let mut want: Vec<u32> = warps.iter().flat_map(|&w| 32 * w..32 * w + 32).collect();
        if mode == EmuMode::Reversed {
            want = want
                .chunks(32)
                .flat_map(|c| c.iter().rev().copied())
                .collect();
        }
        assert_eq!(threads_after, want, "{mode:?}");
    }
}

#[test]
fn emu_builtin_variables_of_a_3d_launch() {
    let (grid, block) = ([2u32, 3, 2], [4u32, 2, 3]);
    let nb = (grid[0] * grid[1] * grid[2]) as usize;
    let nt = (block[0] * block[1] * block[2]) as usize;
    for mode in ALL {
        let mut out = vec![u32::MAX; nb * nt * 9];
        launch(
            "emu_builtins",
            grid,
            block,
            0,
            EmuArgs::new().ptr_mut(&mut out),
            mode,
            3,
        )
        .unwrap();
        for b in 0..nb {
            let bi = [
                b as u32 % grid[0],
                (b as u32 / grid[0]) % grid[1],
                b as u32 / (grid[0] * grid[1]),
            ];
            for t in 0..nt {
                let ti = [
                    t as u32 % block[0],
                    (t as u32 / block[0]) % block[1],
                    t as u32 / (block[0] * block[1]),
                ];
                let o = &out[(b * nt + t) * 9..(b * nt + t + 1) * 9];
                assert_eq!(
                    o,
                    [ti[0], ti[1], ti[2], bi[0], bi[1], bi[2], block[0], block[1], block[2]]
                );
            }
        }
    }
}

#[test]
fn emu_atomics_from_many_blocks() {
    for mode in ALL {
        let (blocks, threads) = if mode == EmuMode::Threads {
            (4u32, 128u32)
        } else {
            (64, 256)
        };
        let (mut fsum, mut isum, mut umax, mut winner, mut xchg) =
            ([0f32], [0i32], [0u32], [-1i32], [0f32]);
        let mut hsum = [bf16::from_f32(0.0)];
        run(
            "emu_atomics",
            blocks,
            threads,
            0,
            EmuArgs::new()
                .ptr_mut(&mut fsum)
                .ptr_mut(&mut isum)
                .ptr_mut(&mut umax)
                .ptr_mut(&mut winner)
                .ptr_mut(&mut xchg)
                .ptr_mut(&mut hsum),
            mode,
        );
        let total = blocks * threads;
        assert_eq!(fsum[0], total as f32, "{mode:?}");
        assert_eq!(isum[0] as u32, blocks * (threads * (threads - 1) / 2));
        assert_eq!(umax[0], (blocks - 1) * 1000 + threads - 1);
        assert!((0..total as i32).contains(&winner[0]));
        if mode == EmuMode::Forward {
            assert_eq!(winner[0], 0);
        }
        assert_eq!(xchg[0], 2.5);
        assert_eq!(hsum[0].to_f32(), 16.0);
    }
}

// ------------------------------------------------------------------------------------------
// Warp collectives
// ------------------------------------------------------------------------------------------

#[test]
fn emu_shuffles_follow_the_ptx_rules() {
    let threads = 64usize;
    let v: Vec<i32> = (0..threads as i32).map(|i| i * i % 97 + 1).collect();
    for mode in ALL {
        let mut out = vec![i32::MIN; threads * 8];
        run(
            "emu_shuffles",
            1,
            threads as u32,
            0,
            EmuArgs::new().ptr(&v).ptr_mut(&mut out),
            mode,
        );
        for w in 0..threads / 32 {
            let v = &v[w * 32..(w + 1) * 32];
            let o = |row: usize, lane: usize| out[w * 256 + row * 32 + lane];
            let total: i32 = v.iter().sum();
            for l in 0..32 {
                assert_eq!(o(0, l), total, "xor butterfly sum");
                assert_eq!(
                    o(1, l),
                    v[l / 8 * 8..l / 8 * 8 + 8].iter().sum::<i32>(),
                    "xor sum, width 8"
                );
                let down = if l % 16 + 3 < 16 { v[l + 3] } else { v[l] };
                assert_eq!(o(2, l), down, "shfl_down 3, width 16: lane {l}");
                let up = if l >= 5 { v[l - 5] } else { v[l] };
                assert_eq!(o(3, l), up, "shfl_up 5: lane {l}");
                let up8 = if l % 8 >= 2 { v[l - 2] } else { v[l] };
                assert_eq!(o(4, l), up8, "shfl_up 2, width 8: lane {l}");
                assert_eq!(
                    o(5, l),
                    v[l / 16 * 16 + 3],
                    "shfl idx 35, width 16: lane {l}"
                );
                // xor 16 within width 16: a later group is out of reach (own value), an earlier
                // one is not
                let x16 = if l < 16 { v[l] } else { v[l - 16] };
                assert_eq!(o(6, l), x16, "shfl_xor 16, width 16: lane {l}");
                assert_eq!(
                    o(7, l),
                    if l < 16 { v[0] } else { v[31] },
                    "split masks: lane {l}"
                );
            }
        }
    }
}

#[test]
fn emu_shuffles_of_float_and_64_bit_values() {
    let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 3.0).collect();
    let x64: Vec<f64> = (0..32).map(|i| 1e300 / (i as f64 + 1.0)).collect();
    let (mut y, mut y64) = (vec![0f32; 32], vec![0f64; 32]);
    run(
        "emu_shuffle_types",
        1,
        32,
        0,
        EmuArgs::new()
            .ptr(&x)
            .ptr_mut(&mut y)
            .ptr(&x64)
            .ptr_mut(&mut y64),
        EmuMode::Reversed,
    );
    for l in 0..32 {
        assert_eq!(y[l], x[l ^ 1]);
        assert_eq!(y64[l], x64[if l < 31 { l + 1 } else { l }]);
    }
}

#[test]
fn emu_votes_and_reductions() {
    // 64 threads: warp 0 votes lane % 3 == 0, warp 1 all true; 48 threads: warp 1 is partial
    for threads in [64usize, 48] {
        let pred: Vec<i32> = (0..threads)
            .map(|t| (t >= 32 || t % 3 == 0) as i32)
            .collect();
        for mode in ALL {
            let mut out = vec![u32::MAX; 2 * 192];
            run(
                "emu_votes",
                1,
                threads as u32,
                0,
                EmuArgs::new().ptr(&pred).ptr_mut(&mut out),
                mode,
            );
            for w in 0..2 {
                let lanes = (threads - 32 * w).min(32);
                let exist: u32 = if lanes == 32 {
                    u32::MAX
                } else {
                    (1 << lanes) - 1
                };
                let ballot = (0..lanes)
                    .filter(|&l| pred[w * 32 + l] != 0)
                    .fold(0u32, |b, l| b | 1 << l);
                let o = |row: usize, lane: usize| out[w * 192 + row * 32 + lane];
                for l in 0..lanes {
                    let ctx = format!("{threads} threads, warp {w}, lane {l}, {mode:?}");
                    assert_eq!(o(0, l), ballot, "ballot: {ctx}");
                    assert_eq!(o(1, l), (ballot != 0) as u32, "any: {ctx}");
                    assert_eq!(o(2, l), (ballot == exist) as u32, "all: {ctx}");
                    let split = if 0x0f0f_0f0fu32 >> l & 1 == 1 {
                        ballot & 0x0f0f_0f0f
                    } else {
                        (ballot & 0xf0f0_f0f0 & exist == 0xf0f0_f0f0 & exist) as u32
                    };
                    assert_eq!(o(3, l), split, "split masks: {ctx}");
                    assert_eq!(o(4, l), (0..lanes as u32).sum::<u32>(), "reduce_add: {ctx}");
                    let next = (l + 1) % 32;
                    if next < lanes {
                        assert_eq!(o(5, l), next as u32 * 3, "syncwarp'd shared memory: {ctx}");
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// bf16 / f16
// ------------------------------------------------------------------------------------------

fn convert(kernel: &str, x: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let (mut bits, mut back) = (vec![0u16; x.len()], vec![0f32; x.len()]);
    run(
        kernel,
        4,
        64,
        0,
        EmuArgs::new()
            .ptr(x)
            .ptr_mut(&mut bits)
            .ptr_mut(&mut back)
            .scalar(x.len() as i64),
        EmuMode::Forward,
    );
    (bits, back)
}

#[test]
fn emu_bf16_rounds_to_nearest_even() {
    let cases: &[(u32, u16)] = &[
        (0x3f80_0000, 0x3f80), // 1.0
        (0x3f80_8000, 0x3f80), // tie, even below: stays
        (0x3f81_8000, 0x3f82), // tie, odd below: rounds up to even
        (0x3f80_8001, 0x3f81), // above the tie
        (0x3f80_7fff, 0x3f80), // below the tie
        (0xbf81_8000, 0xbf82), // negative tie
        (0x7f7f_ffff, 0x7f80), // f32 max overflows to inf
        (0x7f7f_7fff, 0x7f7f), // just below the tie at the top: bf16 max
        (0x7f80_0000, 0x7f80), // inf
        (0xff80_0000, 0xff80), // -inf
        (0x7fc0_0000, 0x7fff), // NaN -> canonical
        (0xffc0_0001, 0x7fff), // negative NaN with payload -> canonical
        (0x7f80_0001, 0x7fff), // signalling NaN -> canonical (not inf)
        (0x8000_0000, 0x8000), // -0
        (0x0000_8000, 0x0000), // subnormal tie to even (0)
        (0x0001_8000, 0x0002), // subnormal tie to even (up)
    ];
    let x: Vec<f32> = cases.iter().map(|&(b, _)| f32::from_bits(b)).collect();
    let (bits, back) = convert("emu_to_bf16", &x);
    for (i, &(b, want)) in cases.iter().enumerate() {
        assert_eq!(
            bits[i], want,
            "bf16({b:#010x}) = {:#06x}, expected {want:#06x}",
            bits[i]
        );
        assert_eq!(back[i].to_bits(), (want as u32) << 16);
    }
    // a sweep of random bit patterns against the half crate (which rounds to nearest even)
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..20000)
        .map(|_| f32::from_bits(rng.random()))
        .filter(|v| !v.is_nan())
        .collect();
    let (bits, _) = convert("emu_to_bf16", &x);
    for (v, b) in x.iter().zip(&bits) {
        assert_eq!(
            *b,
            bf16::from_f32(*v).to_bits(),
            "bf16({:#010x})",
            v.to_bits()
        );
    }
}

#[test]
fn emu_f16_rounds_to_nearest_even() {
    let cases: &[(f32, u16)] = &[
        (1.0, 0x3c00),
        (1.0 + 1.0 / 2048.0, 0x3c00), // tie, even below
        (1.0 + 3.0 / 2048.0, 0x3c02), // tie, odd below
        (65504.0, 0x7bff),            // f16 max
        (65519.0, 0x7bff),            // below the tie
        (65520.0, 0x7c00),            // the tie rounds to even = inf
        (1e10, 0x7c00),               // overflow
        (-1e10, 0xfc00),
        (f32::INFINITY, 0x7c00),
        (f32::NAN, 0x7fff),
        (2f32.powi(-14), 0x0400),       // smallest normal
        (2f32.powi(-24), 0x0001),       // smallest subnormal
        (2f32.powi(-25), 0x0000),       // tie between 0 and the smallest subnormal: 0
        (1.5 * 2f32.powi(-24), 0x0002), // tie between 1 and 2 subnormal steps: 2
        (-2f32.powi(-26), 0x8000),      // underflow keeps the sign
    ];
    let x: Vec<f32> = cases.iter().map(|&(v, _)| v).collect();
    let (bits, back) = convert("emu_to_half", &x);
    for (i, &(v, want)) in cases.iter().enumerate() {
        assert_eq!(
            bits[i], want,
            "f16({v:e}) = {:#06x}, expected {want:#06x}",
            bits[i]
        );
        if !v.is_nan() {
            assert_eq!(back[i], f16::from_bits(want).to_f32());
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let x: Vec<f32> = (0..20000)
        .map(|_| {
            // exponents around f16's range, where the rounding cases are
            let e: i32 = rng.random_range(-30..20);
            let m: f32 = rng.random_range(1.0..2.0);
            (if rng.random() { -m } else { m }) * 2f32.powi(e)
        })
        .collect();
    let (bits, back) = convert("emu_to_half", &x);
    for i in 0..x.len() {
        assert_eq!(bits[i], f16::from_f32(x[i]).to_bits(), "f16({:e})", x[i]);
        assert_eq!(back[i], f16::from_bits(bits[i]).to_f32());
    }
}

// ------------------------------------------------------------------------------------------
// Broken kernels: each must be caught
// ------------------------------------------------------------------------------------------

/// The harness check for shared-memory races: run in both fiber orders; a kernel is suspect if an
/// output is NaN (poisoned shared memory read before it was written) or the orders disagree, or
/// (a `memcheck` build) the memory check reports a read of a slot not yet written.
fn race_detected(kernel: &str, x: &[f32]) -> bool {
    let outs: Vec<Vec<f32>> = FIBERS
        .iter()
        .map(|&mode| {
            let mut y = vec![0f32; x.len()];
            let r = launch(
                kernel,
                [1, 1, 1],
                [x.len() as u32, 1, 1],
                0,
                EmuArgs::new().ptr(x).ptr_mut(&mut y),
                mode,
                7,
            );
            // the memory check sees a read of a slot not yet written
            if let Err(e) = r {
                assert!(memcheck(), "{kernel} ({mode:?}): {e}");
                assert_has(&e.to_string(), &["uninitialized shared memory"]);
                y[0] = f32::NAN;
            }
            y
        })
        .collect();
    outs.iter().flatten().any(|v| v.is_nan()) || outs[0] != outs[1]
}

#[test]
fn emu_catches_a_missing_syncthreads() {
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    assert!(race_detected("emu_broken_no_sync", &x));
    assert!(!race_detected("emu_fixed_sync", &x));
    let mut y = vec![0f32; 256];
    run(
        "emu_fixed_sync",
        1,
        256,
        0,
        EmuArgs::new().ptr(&x).ptr_mut(&mut y),
        EmuMode::Reversed,
    );
    assert!((0..256).all(|t| y[t] == x[(t + 1) % 256]));
}

/// A slot refilled without a barrier while another warp has still to read it, two warp shuffles
/// between the read and the refill: the fiber modes run a warp's whole stretch between two
/// barriers before the next warp's, so the refill lands before the other warp's read (a
/// scheduler that took every warp through each collective in turn would miss it).
#[test]
fn emu_catches_a_missing_syncthreads_before_a_refill() {
    let x: Vec<f32> = (0..256).map(|i| i as f32 + 1.0).collect();
    assert!(race_detected("emu_broken_refill", &x));
    assert!(!race_detected("emu_fixed_refill", &x));
    let mut y = vec![0f32; 256];
    run(
        "emu_fixed_refill",
        1,
        256,
        0,
        EmuArgs::new().ptr(&x).ptr_mut(&mut y),
        EmuMode::Forward,
    );
    assert!((0..256).all(|t| y[t] == x[((t ^ 3) + 32) % 256]));
}

// ------------------------------------------------------------------------------------------
// Asynchronous copies (cp.async): tests/emu_kernels/emu_async.cu
// ------------------------------------------------------------------------------------------

const ASYNC_TILES: usize = 5;

/// emu_async_pipeline's output, computed here.
fn async_pipeline_ref(x: &[f32]) -> Vec<f32> {
    (0..ASYNC_TILES * 128)
        .map(|e| {
            let (i, t) = (e / 128, e % 128);
            let r = ((t ^ 3) + 32) % 128;
            let row = &x[4 * (128 * i + r)..][..4];
            if (i + r) % 7 == 0 {
                0.0
            } else {
                ((row[0] + row[1]) + row[2]) + row[3]
            }
        })
        .collect()
}

/// Runs emu_async_pipeline with `bug` (see the kernel): its output, or the launch's error.
fn async_pipeline(x: &[f32], bug: i32, mode: EmuMode) -> Result<Vec<f32>, String> {
    let mut y = vec![0f32; ASYNC_TILES * 128];
    launch(
        "emu_async_pipeline",
        [1, 1, 1],
        [128, 1, 1],
        0,
        EmuArgs::new()
            .ptr(x)
            .ptr_mut(&mut y)
            .scalar(ASYNC_TILES as i32)
            .scalar(bug),
        mode,
        7,
    )
    .map(|()| y)
    .map_err(|e| e.to_string())
}

fn async_input() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    (0..ASYNC_TILES * 512)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect()
}

#[test]
fn emu_async_copies_through_a_double_buffer() {
    let x = async_input();
    let want = async_pipeline_ref(&x);
    assert!(want.contains(&0.0) && want.iter().any(|&v| v != 0.0));
    for mode in ALL {
        assert_eq!(async_pipeline(&x, 0, mode).unwrap(), want, "{mode:?}");
    }
}

/// A wait that leaves the tile about to be read in flight: the forward order lands a copy at
/// its wait, so the read sees poisoned shared memory (NaN; a `memcheck` build reports the read).
#[test]
fn emu_async_catches_a_read_before_the_wait() {
    let x = async_input();
    match async_pipeline(&x, 1, EmuMode::Forward) {
        Ok(y) => assert!(y.iter().any(|v| v.is_nan()), "{y:?}"),
        Err(e) => {
            assert!(memcheck(), "{e}");
            assert_has(&e, &["uninitialized shared memory", "static shared memory"]);
        }
    }
}

/// No barrier between the reads of a buffer and its refill: the reversed order lands a copy at
/// issue, a warp at a time, so a warp refills a buffer that the warps after it have still to
/// read (after two shuffles: a scheduler that took all warps through each collective in turn
/// would not show it).
#[test]
fn emu_async_catches_a_refill_before_the_readers_barrier() {
    let x = async_input();
    let want = async_pipeline_ref(&x);
    assert_eq!(async_pipeline(&x, 0, EmuMode::Reversed).unwrap(), want);
    let y = async_pipeline(&x, 2, EmuMode::Reversed).unwrap();
    assert_ne!(y, want);
}

#[test]
fn emu_async_catches_misuse() {
    let x = async_input();
    for mode in ALL {
        let e = async_pipeline(&x, 3, mode).unwrap_err();
        assert_has(
            &e,
            &[
                "exited with 1 asynchronous copies (cp.async) it never waited for",
                "emu_async.cu:",
                "(code 12)",
            ],
        );
        let e = async_pipeline(&x, 4, mode).unwrap_err();
        assert_has(
            &e,
            &[
                "not 16 bytes inside shared memory",
                "parameter 1",
                "(code 12)",
            ],
        );
        let e = async_pipeline(&x, 5, mode).unwrap_err();
        assert_has(&e, &["misaligned access", "emu_async.cu:", "(code 11)"]);
    }
}

#[test]
fn emu_catches_a_syncthreads_in_a_divergent_branch() {
    for mode in ALL {
        let mut y = vec![0f32; 64];
        let e = run_err(
            "emu_broken_divergent",
            1,
            64,
            0,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        // both barriers: the one inside the branch (line 24) and the one after it (line 27)
        assert_has(
            &e,
            &[
                "barrier divergence",
                "emu_broken.cu:24:",
                "emu_broken.cu:27:",
                "emu_broken_divergent",
            ],
        );
    }
}

#[test]
fn emu_catches_an_exit_before_a_barrier() {
    let x = vec![1f32; 64];
    for mode in ALL {
        let mut y = vec![0f32; 64];
        let e = run_err(
            "emu_broken_early_exit",
            1,
            64,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(40i32),
            mode,
        );
        assert_has(&e, &["exited", "__syncthreads at emu_broken.cu:"]);
    }
    // with n = blockDim.x nobody exits early: fine
    let mut y = vec![0f32; 64];
    run(
        "emu_broken_early_exit",
        1,
        64,
        0,
        EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(64i32),
        EmuMode::Forward,
    );
}

#[test]
fn emu_harness_catches_an_off_by_one_write() {
    let n = 1000;
    let mut ok = Guarded::new(n, 0.0);
    run(
        "emu_fill",
        4,
        128,
        0,
        EmuArgs::new().ptr_mut(ok.inner()).scalar(n as i32),
        EmuMode::Forward,
    );
    assert!(ok.overruns().is_empty());
    assert!(ok.inner().iter().all(|&v| v == 1.0));
    let mut bad = Guarded::new(n, 0.0);
    let mut args = EmuArgs::new();
    args.ptr_mut(bad.inner()).scalar(n as i32);
    if memcheck() {
        // the memory check stops the thread at the write past the end, before it lands
        let e = run_err(
            "emu_broken_off_by_one",
            4,
            128,
            0,
            &mut args,
            EmuMode::Forward,
        );
        assert_has(
            &e,
            &[
                "block (3,0,0): out-of-bounds access: thread (104,0,0) writes 4 bytes at element \
                 1000 of parameter 0, a buffer of 1000 elements",
                "(code 11)",
            ],
        );
        assert!(bad.overruns().is_empty());
    } else {
        run(
            "emu_broken_off_by_one",
            4,
            128,
            0,
            &mut args,
            EmuMode::Forward,
        );
        assert_eq!(bad.overruns(), vec![n as isize]);
    }
}

#[test]
fn emu_catches_warp_collective_misuse() {
    for mode in ALL {
        let mut y = vec![0f32; 32];
        let e = run_err(
            "emu_broken_shfl_exit",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        assert_has(&e, &["exited", "__shfl_xor_sync"]);
        let mut u = vec![0u32; 32];
        let e = run_err(
            "emu_broken_warp_divergence",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut u),
            mode,
        );
        assert_has(&e, &["warp divergence", "__shfl_xor_sync", "__ballot_sync"]);
        let e = run_err(
            "emu_broken_mask",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        assert_has(&e, &["not in its mask 0x00000001"]);
        let e = run_err(
            "emu_broken_deadlock",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        assert_has(&e, &["deadlock", "__syncthreads", "__shfl_xor_sync"]);
    }
}

#[test]
fn emu_catches_a_fiber_stack_overflow_and_carries_on() {
    for mode in FIBERS {
        let mut y = vec![0i32; 32];
        run(
            "emu_recursion",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut y).scalar(16i32),
            mode,
        );
        let e = run_err(
            "emu_recursion",
            1,
            32,
            0,
            EmuArgs::new().ptr_mut(&mut y).scalar(1000i32),
            mode,
        );
        assert_has(&e, &["overflowed its 256 KiB stack"]);
        // the emulator still works
        let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut s = vec![0f32; 1];
        run(
            "emu_block_sum",
            1,
            256,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut s).scalar(256i32),
            mode,
        );
        assert_eq!(s[0], (0..256).sum::<i32>() as f32);
    }
}

#[test]
fn emu_catches_trap_and_dynamic_shared_memory_overflow() {
    for mode in ALL {
        let mut y = vec![0f32; 64];
        let e = run_err(
            "emu_broken_trap",
            1,
            64,
            0,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        assert_has(&e, &["thread (3,0,0) called __trap()"]);
        let e = run_err(
            "emu_broken_dyn_overflow",
            2,
            64,
            64 * 4,
            EmuArgs::new().ptr_mut(&mut y),
            mode,
        );
        if memcheck() && mode != EmuMode::Threads {
            // the memory check stops the write itself
            assert_has(
                &e,
                &[
                    "out-of-bounds access: thread (63,0,0) writes 4 bytes at byte 256 of dynamic \
                     shared memory",
                    "(code 11)",
                ],
            );
        } else {
            assert_has(&e, &["dynamic shared memory, past the 256 bytes"]);
        }
    }
}

// ------------------------------------------------------------------------------------------
// The memory check (tests/emu_kernels/emu_memcheck.cu)
// ------------------------------------------------------------------------------------------

/// Launches `blocks` blocks of 32 threads. `problem`: the error code the memory check must
/// report (None: the launch is sound). With the check built (the `memcheck` feature,
/// scripts/memcheck.sh) returns its report; without it every launch must pass.
fn checked(
    name: &str,
    blocks: u32,
    args: &mut EmuArgs,
    mode: EmuMode,
    problem: Option<u32>,
) -> Option<String> {
    let r = launch(name, [blocks, 1, 1], [32, 1, 1], 0, args, mode, 7);
    match (r, problem.filter(|_| memcheck())) {
        (Ok(()), None) => None,
        (Ok(()), Some(code)) => panic!("{name} ({mode:?}): passed, expected error code {code}"),
        (Err(e), Some(code)) => {
            let e = e.to_string();
            assert_has(&e, &[&format!("(code {code})"), name, "thread ("]);
            Some(e)
        }
        (Err(e), None) => panic!("{name} ({mode:?}): {e}"),
    }
}

/// A race between blocks: error code 10.
fn race_between_blocks(
    name: &str,
    blocks: u32,
    args: &mut EmuArgs,
    mode: EmuMode,
) -> Option<String> {
    let r = checked(name, blocks, args, mode, Some(10));
    if let Some(e) = &r {
        assert_has(e, &["inter-block data race"]);
    }
    r
}

#[test]
fn emu_memcheck_catches_out_of_bounds_and_misaligned_accesses() {
    assert_eq!(memcheck(), cfg!(feature = "memcheck"));
    let n = 100usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    for mode in FIBERS {
        // one element past the end of x, by the last thread
        let mut y = vec![0f32; n];
        let r = checked(
            "emu_oob_pair_sum",
            4,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(n as i32),
            mode,
            Some(11),
        );
        match r {
            Some(e) => assert_has(
                &e,
                &[
                    "block (3,0,0): out-of-bounds access: thread (3,0,0) reads",
                    "of parameter 0, a buffer of 100 elements",
                ],
            ),
            // without the check the read lands in whatever follows x: the rest is right
            None => assert!((0..n - 1).all(|i| y[i] == x[i] + x[i + 1]), "{mode:?}"),
        }
        let mut y = vec![0f32; n];
        run(
            "emu_pair_sum",
            4,
            32,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(n as i32),
            mode,
        );
        assert!((0..n).all(|i| y[i] == x[i] + x.get(i + 1).copied().unwrap_or(0.0)));

        // float4 loads through nla_load from x + 1: misaligned, caught in every build (x86 would
        // crash on the aligned SSE move); from x + 4 aligned (a Vec<f32> of 100 is 16-byte
        // aligned)
        let n4 = 24usize;
        assert_eq!(x.as_ptr() as usize % 16, 0, "the allocator's alignment");
        let mut y = vec![0f32; 4 * n4];
        let e = run_err(
            "emu_misaligned_copy",
            1,
            32,
            0,
            EmuArgs::new()
                .ptr(&x)
                .ptr_mut(&mut y)
                .scalar(1i32)
                .scalar(n4 as i32),
            mode,
        );
        assert_has(
            &e,
            &[
                "block (0,0,0): misaligned access: thread (",
                "reads 16 bytes at element ",
                "of parameter 0, a buffer of 100 elements",
                "emu_memcheck.cu:",
                "16-byte aligned",
                "(code 11)",
            ],
        );
        run(
            "emu_misaligned_copy",
            1,
            32,
            0,
            EmuArgs::new()
                .ptr(&x)
                .ptr_mut(&mut y)
                .scalar(4i32)
                .scalar(n4 as i32),
            mode,
        );
        assert_eq!(y, x[4..4 + 4 * n4], "{mode:?}");

        // float2 loads from x + 1 by a plain cast: legal on x86, so only the memory check sees it
        let n2 = 40usize;
        for off in [1usize, 2] {
            let mut y = vec![0f32; 2 * n2];
            let r = checked(
                "emu_misaligned_float2",
                2,
                EmuArgs::new()
                    .ptr(&x)
                    .ptr_mut(&mut y)
                    .scalar(off as i32)
                    .scalar(n2 as i32),
                mode,
                (off == 1).then_some(11),
            );
            match r {
                Some(e) => assert_has(
                    &e,
                    &[
                        "misaligned access: thread (",
                        "reads 8 bytes at element ",
                        "8-byte aligned",
                    ],
                ),
                None => assert_eq!(y, x[off..off + 2 * n2], "{mode:?}"),
            }
        }
    }
}

#[test]
fn emu_memcheck_catches_reads_of_unwritten_shared_memory() {
    let x: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32).collect();
    for mode in FIBERS {
        for n in [20usize, 32] {
            let mut y = vec![0f32; 2];
            let r = checked(
                "emu_uninit_max",
                2,
                EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(n as i32),
                mode,
                (n < 32).then_some(11),
            );
            match r {
                Some(e) => assert_has(
                    &e,
                    &[
                        "uninitialized shared memory: thread (0,0,0) reads 4 bytes at address",
                        "in static shared memory",
                        "no thread of this block has written",
                    ],
                ),
                // the poisoned slots vanish in fmaxf: the maximum of the n written is all
                // the output shows
                None => {
                    for (b, &v) in y.iter().enumerate() {
                        let want = x[32 * b..32 * b + n]
                            .iter()
                            .copied()
                            .fold(f32::MIN, f32::max);
                        assert_eq!(v, want, "{mode:?} n {n} row {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn emu_memcheck_catches_races_between_blocks() {
    assert_eq!(memcheck(), cfg!(feature = "memcheck"));
    let blocks = 8u32;
    let x: Vec<f32> = (0..blocks).map(|i| i as f32 + 1.0).collect();
    let sum: f32 = x.iter().sum(); // small integers: exact in any order
    let per = 16usize;
    for mode in FIBERS {
        // a plain += from every block: the right sum in every block order, a race on a GPU
        let mut y = [0f32];
        let r = race_between_blocks(
            "emu_race_plain_sum",
            blocks,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y),
            mode,
        );
        match r {
            Some(e) => assert_has(&e, &["reads 4 bytes at element 0 of parameter 1", "wrote"]),
            None => assert_eq!(y[0], sum, "{mode:?}"),
        }
        // one element past each block's range: every block writes 1, so no order shows it
        let mut y = vec![0f32; blocks as usize * per + 1];
        let r = race_between_blocks(
            "emu_race_overlap",
            blocks,
            EmuArgs::new().ptr_mut(&mut y).scalar(per as i32),
            mode,
        );
        match r {
            Some(e) => {
                assert_has(
                    &e,
                    &["writes 4 bytes at element ", "of parameter 0", "wrote"],
                );
                let at: usize = e
                    .split("element ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(at > 0 && at.is_multiple_of(per), "{e}");
            }
            None => assert!(y.iter().all(|&v| v == 1.0), "{mode:?}"),
        }
        // reading what another block writes: the read or the write comes second
        let (mut y, mut z) = (vec![0f32; blocks as usize], vec![0f32; blocks as usize]);
        let r = race_between_blocks(
            "emu_race_neighbour",
            blocks,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y).ptr_mut(&mut z),
            mode,
        );
        if let Some(e) = r {
            assert_has(&e, &["4 bytes at element ", "of parameter 1"]);
            assert!(
                (e.contains(" reads ") && e.contains(" wrote "))
                    || (e.contains(" writes ") && e.contains(" read ")),
                "{e}"
            );
        } else if mode == EmuMode::Forward {
            assert_eq!(z[1..], x[..blocks as usize - 1], "{mode:?}");
        }

        // race-free twins pass, with the check or without
        let mut y = [0f32];
        run(
            "emu_race_atomic_sum",
            blocks,
            32,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y),
            mode,
        );
        assert_eq!(y[0], sum, "{mode:?}");
        let mut h = vec![bf16::from_f32(-1.0); blocks as usize];
        run(
            "emu_race_free_halves",
            blocks,
            32,
            0,
            EmuArgs::new().ptr(&x).ptr_mut(&mut h),
            mode,
        );
        assert!(
            (0..blocks as usize).all(|b| h[b].to_f32() == x[0] + b as f32),
            "{mode:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Launch errors
// ------------------------------------------------------------------------------------------

#[test]
fn emu_launch_errors() {
    let x = vec![0f32; 256];
    let mut y = vec![0f32; 1];
    let e = launch(
        "no_such_kernel",
        [1; 3],
        [32, 1, 1],
        0,
        &mut EmuArgs::new(),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(
        &e,
        &[
            "no emulated kernel `no_such_kernel`",
            "NLA_EMU_KERNEL(no_such_kernel);",
        ],
    );
    let mut a = EmuArgs::new();
    a.ptr(&x).ptr_mut(&mut y);
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        &mut a,
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["takes 3 parameters, 2 were packed"]);
    let mut y = vec![0f32; 1];
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        EmuArgs::new().ptr(&x).ptr(&y).scalar(256i32),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["parameter 1", "pass it with ptr_mut"]);
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(256u64),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["parameter 2", "4 bytes, got 8 bytes"]);
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(256f32),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["parameter 2", "takes Int", "got Float"]);
    let h = vec![0u16; 256];
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        EmuArgs::new().ptr(&h).ptr_mut(&mut y).scalar(256i32),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(
        &e,
        &["parameter 0", "4-byte elements, the slice has 2-byte"],
    );
    let e = launch(
        "emu_block_sum",
        [1; 3],
        [256, 1, 1],
        0,
        EmuArgs::new()
            .device_ptr(0x1000)
            .ptr_mut(&mut y)
            .scalar(256i32),
        EmuMode::Forward,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_has(&e, &["device address"]);
    for (grid, block, smem, what) in [
        ([1, 1, 1], [2048, 1, 1], 0, "block (2048,1,1)"),
        ([1, 1, 1], [32, 32, 2], 0, "block (32,32,2)"),
        ([0, 1, 1], [32, 1, 1], 0, "grid (0,1,1)"),
        ([1, 70000, 1], [32, 1, 1], 0, "grid (1,70000,1)"),
        (
            [1, 1, 1],
            [32, 1, 1],
            300 * 1024,
            "bytes of dynamic shared memory",
        ),
    ] {
        let e = launch(
            "emu_block_sum",
            grid,
            block,
            smem,
            EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(256i32),
            EmuMode::Forward,
            0,
        )
        .unwrap_err()
        .to_string();
        assert_has(&e, &[what]);
    }
}

/// The launch time of a 64-block x 256-thread reduction (9 barriers a block) in each fiber
/// mode; prints it (`cargo test --release --test emu -- --ignored --nocapture`).
#[test]
#[ignore]
fn emu_launch_time() {
    let n: usize = 64 * 256;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    for mode in FIBERS {
        let mut y = vec![0f32; 64];
        let reps = 50;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            run(
                "emu_block_sum",
                64,
                256,
                0,
                EmuArgs::new().ptr(&x).ptr_mut(&mut y).scalar(n as i32),
                mode,
            );
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
        assert_eq!(y.iter().sum::<f32>(), x.iter().sum::<f32>());
        println!("emu_block_sum 64 x 256, {mode:?}: {ms:.2} ms per launch");
    }
}
