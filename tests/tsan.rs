//! ThreadSanitizer over the kernels: every production kernel family (kernels/*.cu, the f32
//! kernels the CUDA device launches, and the bf16 attention's tensor-core kernels) runs through
//! its launcher (device/gpu/, by way of
//! [`EmuDevice`]) in [`EmuMode::Threads`], one OS thread per CUDA thread, with the emulator and
//! the kernels compiled with `-fsanitize=thread`; TSan must report no data race. A missing
//! `__syncthreads` between CUDA threads of a block is then a race between OS threads. The
//! emulator shows TSan only the ordering CUDA defines (emu/runtime.cpp, `TsanQuiet`): barriers
//! and `__syncwarp` order threads, its own bookkeeping mutex does not, so a race is reported on
//! every run.
//!
//! The proof that the check can fail: tests/emu_kernels/emu_tsan.cu's reduction with a barrier
//! missing (`emu_tsan_racy_block_sum`) and emu_async.cu's cp.async pipeline with a buffer
//! refilled before its readers' barrier must each make TSan report a data race in that kernel,
//! and their fixed twins must not.
//!
//! Run by scripts/tsan-check.sh, which builds this test with `NLA_EMU_CXXFLAGS=-fsanitize=thread`
//! and links the TSan runtime, then sets `NLA_TSAN=1`. Without `NLA_TSAN=1` (a plain
//! `cargo test`) every test here prints why and passes as skipped.
//!
//! Each check runs in a child process: this binary re-executed with `--exact --ignored` on one
//! of the `child::*` tests (ignored, and inert unless `NLA_TSAN_CHILD=1`), and the parent test
//! judges the reports TSan writes to the child's stderr. Per child, a report names the family
//! that raced, and one family's report cannot fail another's test.
//!
//! Which reports count: those with a frame of our C++ (kernels/, emu/, tests/emu_kernels/) in
//! one of the two racing accesses' stacks. Rust's standard library is not instrumented: TSan sees
//! its calls to malloc, memcpy and write (intercepted) but not the atomics that order them, so
//! it can report races inside std (libtest's result channel between a test's thread and the main
//! thread, for one). Those are printed as ignored, and the known ones are suppressed
//! ([`__tsan_default_suppressions`], narrow patterns: a pattern also matches allocation and
//! thread-creation stacks, and every kernel thread is created below Rust frames). The exit
//! status carries no verdict ([`__tsan_default_options`]: `exitcode=0`, also forced for the
//! children), so a std false positive in this (parent) process cannot fail `cargo test`.

use std::ffi::c_char;
use std::process::{Command, Output};

use half::bf16;

use nla_engine::device::emu::{launch, EmuArgs, EmuMode};
use nla_engine::device::emu_device::{EmuBuf, EmuDevice};
use nla_engine::device::{
    AdamwStep, Advantage, AttnDims, CacheDims, Device, DeviceBuf, InjectMode, KlType, LossAgg,
    PolicyLossSpec, PolicyStat, PoolMode, RewardSpec, RewardTransform, SampleSpec, View, ViewMut,
};

const ENABLE: &str = "NLA_TSAN";
const CHILD: &str = "NLA_TSAN_CHILD";
/// What a child prints (stderr) once its launches are done.
const MARKER: &str = "nla-tsan-child done:";
const RACE: &str = "WARNING: ThreadSanitizer: data race";

/// TSan's default options (TSAN_OPTIONS adds to them): every report (no halt), and an exit
/// status that does not depend on reports: the tests judge the reports themselves.
#[no_mangle]
pub extern "C" fn __tsan_default_options() -> *const c_char {
    c"halt_on_error=0 exitcode=0".as_ptr()
}

/// Races inside Rust's standard library (not instrumented; see the module docs): libtest's
/// channel of test results (its element type `test::event::CompletedTest`, v0-mangled), core's
/// memcpy wrappers (`core::profiling::compiler_{copy,move}`, leaves: never in a thread-creation
/// stack), and std's stderr and backtrace printing (a panicking test). Symbols are matched
/// mangled: gcc's TSan symbolizer does not demangle Rust's v0 names. Not `test::run_test`: every
/// kernel thread is created below it.
#[no_mangle]
pub extern "C" fn __tsan_default_suppressions() -> *const c_char {
    c"race:4test5event13CompletedTest
race:9profiling13compiler_copy
race:9profiling13compiler_move
race:5stdio4unix6Stderr
race:5gimli
"
    .as_ptr()
}

fn enabled() -> bool {
    std::env::var(ENABLE).is_ok_and(|v| v == "1")
}

/// True (after saying why) when the parent tests must pass as skipped.
fn skipped() -> bool {
    if enabled() {
        return false;
    }
    eprintln!(
        "skipped: the ThreadSanitizer check runs with {ENABLE}=1 in a TSan build \
         (scripts/tsan-check.sh)"
    );
    true
}

/// Whether the TSan runtime is mapped into this process.
fn tsan_linked() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains("libtsan"))
}

/// This binary re-executed on the ignored test `child::<name>` alone.
fn run_child(name: &str) -> Output {
    assert!(
        tsan_linked(),
        "{ENABLE}=1 but this test binary is not linked with the TSan runtime: build it as \
         scripts/tsan-check.sh does"
    );
    let exe = std::env::current_exe().expect("current_exe");
    let test = format!("child::{name}");
    let opts = std::env::var("TSAN_OPTIONS").unwrap_or_default();
    Command::new(exe)
        .args([
            &test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("TSAN_OPTIONS", format!("{opts} halt_on_error=0 exitcode=0"))
        .output()
        .unwrap_or_else(|e| panic!("running the child {test}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The TSan reports in `stderr`, each from its WARNING line to its SUMMARY line.
fn reports(stderr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in stderr.lines() {
        if line.starts_with("WARNING: ThreadSanitizer:") {
            cur = Some(vec![line]);
        } else if let Some(r) = cur.as_mut() {
            r.push(line);
            if line.starts_with("SUMMARY: ThreadSanitizer:") {
                out.push(cur.take().unwrap().join("\n"));
            }
        }
    }
    out.extend(cur.map(|r| r.join("\n"))); // cut short
    out
}

/// Whether a report is about our C++: a frame of kernels/, emu/ or tests/emu_kernels/ in the
/// stacks of the accesses (the part before the location, mutex and thread sections).
fn ours(report: &str) -> bool {
    let root = env!("CARGO_MANIFEST_DIR");
    let dirs = ["kernels/", "emu/", "tests/emu_kernels/"].map(|d| format!("{root}/{d}"));
    report
        .lines()
        .take_while(|l| {
            !(l.starts_with("  Location is")
                || l.starts_with("  Mutex ")
                || l.starts_with("  Thread T")
                || l.starts_with("  Main thread")
                || l.starts_with("SUMMARY:"))
        })
        .any(|l| dirs.iter().any(|d| l.contains(d.as_str())))
}

/// A child's output, and its reports split into ours and the ignored ones (std).
struct Child {
    out: Output,
    stderr: String,
    ours: Vec<String>,
    ignored: Vec<String>,
}

impl Child {
    fn run(name: &str) -> Child {
        let out = run_child(name);
        let stderr = text(&out.stderr);
        let (ours, ignored) = reports(&stderr).into_iter().partition(|r| ours(r));
        Child {
            out,
            stderr,
            ours,
            ignored,
        }
    }
    /// Everything, for a failure message.
    fn dump(&self, name: &str) -> String {
        format!(
            "child::{name} ({})\n--- stderr\n{}\n--- stdout\n{}",
            self.out.status,
            self.stderr,
            text(&self.out.stdout)
        )
    }
    fn note_ignored(&self, name: &str) {
        for r in &self.ignored {
            let summary = r.lines().last().unwrap_or("");
            eprintln!("tsan: child::{name}: ignored a report outside our C++ ({summary})");
        }
    }
}

/// Runs `child::<name>`: it must run its launches and pass, with no report about our C++.
fn assert_clean(name: &str) {
    if skipped() {
        return;
    }
    let c = Child::run(name);
    assert!(
        c.ours.is_empty(),
        "ThreadSanitizer reported {} race(s) in our C++:\n\n{}\n\n{}",
        c.ours.len(),
        c.ours.join("\n\n"),
        c.dump(name)
    );
    assert!(c.out.status.success(), "failed: {}", c.dump(name));
    assert!(
        c.stderr.contains(MARKER),
        "the child did not run its launches: {}",
        c.dump(name)
    );
    c.note_ignored(name);
    for line in c.stderr.lines().filter(|l| l.contains(MARKER)) {
        eprintln!("tsan: {line}, no report");
    }
}

// ------------------------------------------------------------------------------------------
// The racy kernel (its fixed twin is `child::fixed_block_sum`, with the families below)
// ------------------------------------------------------------------------------------------

#[test]
fn tsan_reports_a_reduction_missing_a_syncthreads() {
    assert_racy("racy_block_sum", "emu_tsan_racy_block_sum", "emu_tsan.cu");
}

/// A cp.async pipeline whose buffer is refilled without a barrier after its reads
/// (tests/emu_kernels/emu_async.cu, bug 2): in the OS-thread mode a copy lands at issue, a write
/// that races with another warp's read. Its fixed twin is `child::async_pipeline_no_race`.
#[test]
fn tsan_reports_a_cp_async_refill_missing_a_syncthreads() {
    assert_racy("racy_async_refill", "emu_async_pipeline", "emu_async.cu");
}

/// Runs `child::<name>`: TSan must report a data race in `kernel` of `file`.
fn assert_racy(name: &str, kernel: &str, file: &str) {
    if skipped() {
        return;
    }
    let c = Child::run(name);
    assert!(c.out.status.success(), "failed: {}", c.dump(name));
    assert!(
        c.stderr.contains(MARKER),
        "the child did not run its launch: {}",
        c.dump(name)
    );
    let Some(report) = c
        .ours
        .iter()
        .find(|r| r.starts_with(RACE) && r.contains(kernel) && r.contains(file))
    else {
        panic!(
            "no data race reported in {kernel} ({file}): {}",
            c.dump(name)
        );
    };
    c.note_ignored(name);
    let head: Vec<&str> = report.lines().take(6).collect();
    eprintln!(
        "tsan: child::{name}: {} report(s) in our C++, as there must be; the first:\n{}",
        c.ours.len(),
        head.join("\n")
    );
}

/// emu_async_pipeline with `bug` (0: none, 2: no barrier before a refill), one block of 128.
fn async_pipeline(bug: i32) -> usize {
    let ntiles = 5;
    let x = host(ntiles * 512, 3, 1.0);
    let mut y = vec![0f32; ntiles * 128];
    let mut a = EmuArgs::new();
    a.ptr(&x).ptr_mut(&mut y).scalar(ntiles as i32).scalar(bug);
    launch(
        "emu_async_pipeline",
        [1, 1, 1],
        [128, 1, 1],
        0,
        &mut a,
        EmuMode::Threads,
        1,
    )
    .unwrap_or_else(|e| panic!("emu_async_pipeline (bug {bug}): {e}"));
    1
}

/// One block of 64 threads.
fn block_sum(kernel: &str) -> usize {
    let x: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; 1];
    let mut a = EmuArgs::new();
    a.ptr(&x).ptr_mut(&mut y).scalar(x.len() as i32);
    launch(
        kernel,
        [1, 1, 1],
        [64, 1, 1],
        0,
        &mut a,
        EmuMode::Threads,
        1,
    )
    .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    1
}

// ------------------------------------------------------------------------------------------
// The production kernels, one family (kernels/<family>.cu) per child
// ------------------------------------------------------------------------------------------

/// `n` deterministic values in (-scale, scale), on the host.
fn host(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * ((i as f32 * 0.7311 + seed as f32 * 1.37).sin()))
        .collect()
}

/// [`host`] in an f32 buffer of the emulated device.
fn vals(n: usize, seed: u32, scale: f32) -> EmuBuf {
    EmuBuf::F32(host(n, seed, scale))
}

fn v(x: &EmuBuf) -> View<'_, EmuBuf> {
    View::all(x)
}
fn m(x: &mut EmuBuf) -> ViewMut<'_, EmuBuf> {
    ViewMut::all(x)
}
fn zeros(n: usize) -> EmuBuf {
    EmuBuf::F32(vec![0.0; n])
}

fn embedding(d: &EmuDevice) {
    let (n, c, vocab) = (8, 64, 33);
    let ids: Vec<u32> = vec![0, 5, 32, 5, 7, 0, 5, 1]; // repeats: the backward accumulates
    let wte = vals(vocab * c, 1, 1.0);
    let mut out = zeros(n * c);
    d.embedding_fwd(m(&mut out), &ids, v(&wte), n, c).unwrap();
    let mut dwte = zeros(vocab * c);
    d.embedding_bwd(m(&mut dwte), &ids, v(&out), n, c).unwrap();
}

fn rmsnorm(d: &EmuDevice) {
    // C 64: the vector path; C 77: the scalar path with a partial warp
    for (n, c) in [(4, 64), (3, 77)] {
        let x = vals(n * c, 2, 2.0);
        let w = vals(c, 3, 1.0);
        let (mut out, mut rstd) = (zeros(n * c), zeros(n));
        d.rmsnorm_fwd(m(&mut out), m(&mut rstd), v(&x), v(&w), n, c, 1e-5)
            .unwrap();
        let dout = vals(n * c, 4, 1.0);
        let (mut dx, mut dw) = (zeros(n * c), zeros(c));
        d.rmsnorm_bwd(
            m(&mut dx),
            m(&mut dw),
            v(&dout),
            v(&x),
            v(&w),
            v(&rstd),
            n,
            c,
            false,
        )
        .unwrap();
    }
}

fn rope(d: &EmuDevice) {
    let (b, t, h, hs) = (2, 4, 2, 16);
    let mut x = vals(b * t * h * hs, 5, 1.0);
    d.rope_fwd(m(&mut x), b, t, h, hs, 3, None, 10000.0)
        .unwrap();
    d.rope_bwd(m(&mut x), b, t, h, hs, 3, 10000.0).unwrap();
    // the fused projection's split (kernels/rope.cu too)
    // k and v into positions 3.. of 2 more: a cache
    let dims = CacheDims {
        b,
        tq: t,
        tmax: t + 5,
        nh: 2 * h,
        nkv: h,
        hs,
        pos0: 3,
    };
    let (qd, kvd) = (2 * h * hs, h * hs);
    let qkv = vals(b * t * (qd + 2 * kvd), 6, 1.0);
    let mut q = zeros(b * t * qd);
    let [mut k, mut v2] = [kvd, kvd].map(|w| zeros(b * dims.tmax * w));
    d.qkv_rope_fwd(
        m(&mut q),
        m(&mut k),
        m(&mut v2),
        v(&qkv),
        None,
        dims,
        10000.0,
    )
    .unwrap();
    let mut dqkv = zeros(qkv.len());
    d.qkv_rope_bwd(m(&mut dqkv), v(&q), v(&k), v(&v2), dims, 10000.0)
        .unwrap();
}

fn attention(d: &EmuDevice) {
    // HS 16 (the 64-key tiles), and HS 128 (32-key tiles) over two query tiles (T 70)
    for (b, t, nh, nkv, hs) in [(2, 8, 4, 2, 16), (1, 70, 2, 1, 128)] {
        attention_case(d, AttnDims { b, t, nh, nkv, hs }, vals);
    }
}

/// `n` values of [`host`], as bf16.
fn vals_bf16(n: usize, seed: u32, scale: f32) -> EmuBuf {
    EmuBuf::Bf16(
        host(n, seed, scale)
            .into_iter()
            .map(bf16::from_f32)
            .collect(),
    )
}

/// The bf16 attention kernels: tensor-core fragments exchanged through `__syncwarp` (the
/// emulated mma and ldmatrix), tiles copied in with cp.async into two buffers. HS 32 over T 150
/// (hs a whole bucket, so the copies are cp.async: three key tiles for the last query tile, and
/// dkdv's two heads x up to three query tiles, so each buffer is refilled), HS 128 over T 70 (the
/// backward's 32-row tiles), and hs 8 (the synchronous loads of a partial bucket).
fn attention_bf16(d: &EmuDevice) {
    for (t, hs) in [(150, 32), (70, 128), (70, 8)] {
        let dims = AttnDims {
            b: 1,
            t,
            nh: 2,
            nkv: 1,
            hs,
        };
        attention_case(d, dims, vals_bf16);
    }
}

/// The bf16 forward with 128 query rows per block (`attention_fwd_bf16_hs<B>_bo128`, asked for
/// by name: the launcher picks it for grids larger than a test's): HS 64 (Q's fragments in
/// registers) and HS 128 (Q in shared memory, copied in with key tile 0; 32-key tiles), over T
/// 150, so the second block's key tiles refill both buffers.
fn attention_bf16_bo128(d: &EmuDevice) {
    for hs in [64, 128] {
        let dims = AttnDims {
            b: 1,
            t: 150,
            nh: 2,
            nkv: 1,
            hs,
        };
        let (nq, nk) = (150 * 2 * hs, 150 * hs);
        let make = |n: usize, seed: u32| -> Vec<bf16> {
            host(n, seed, 1.0).into_iter().map(bf16::from_f32).collect()
        };
        let (q, k, vv) = (make(nq, 6), make(nk, 7), make(nk, 8));
        let (mut out, mut lse) = (vec![bf16::ZERO; nq], vec![0f32; 2 * 150]);
        nla_engine::device::gpu::attention::fwd_with_rows(
            d.launcher(),
            &mut out,
            &mut lse,
            &q,
            &k,
            &vv,
            dims,
            128,
        )
        .unwrap();
    }
}

/// The forward and the backward once, with q, k, v, dout and the outputs from `make` (f32 or
/// bf16 buffers; lse stays f32).
fn attention_case(d: &EmuDevice, dims: AttnDims, make: fn(usize, u32, f32) -> EmuBuf) {
    let AttnDims { b, t, nh, nkv, hs } = dims;
    let (nq, nk) = (b * t * nh * hs, b * t * nkv * hs);
    let (q, k, vv) = (make(nq, 6, 1.0), make(nk, 7, 1.0), make(nk, 8, 1.0));
    let (mut out, mut lse) = (make(nq, 1, 0.0), zeros(b * nh * t));
    d.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), dims)
        .unwrap();
    let dout = make(nq, 9, 1.0);
    let (mut dq, mut dk, mut dv) = (make(nq, 1, 0.0), make(nk, 1, 0.0), make(nk, 1, 0.0));
    d.attention_bwd(
        m(&mut dq),
        m(&mut dk),
        m(&mut dv),
        v(&dout),
        v(&q),
        v(&k),
        v(&vv),
        v(&out),
        v(&lse),
        dims,
    )
    .unwrap();
}

fn decode_attention(d: &EmuDevice) {
    // prefill (one split) and one decode step over a long cache (several splits: the combine)
    for dims in [
        CacheDims {
            b: 2,
            tq: 8,
            tmax: 16,
            nh: 4,
            nkv: 2,
            hs: 16,
            pos0: 0,
        },
        CacheDims {
            b: 2,
            tq: 1,
            tmax: 48,
            nh: 4,
            nkv: 2,
            hs: 16,
            pos0: 40,
        },
    ] {
        let CacheDims {
            b,
            tq,
            tmax,
            nh,
            nkv,
            hs,
            ..
        } = dims;
        let q = vals(b * tq * nh * hs, 10, 1.0);
        let kc = vals(b * tmax * nkv * hs, 11, 1.0);
        let vc = vals(b * tmax * nkv * hs, 12, 1.0);
        let starts: Vec<u32> = vec![0, 5];
        let mut out = zeros(q.len());
        d.decode_attention_fwd(m(&mut out), v(&q), v(&kc), v(&vc), &starts, None, dims)
            .unwrap();
    }
}

fn swiglu(d: &EmuDevice) {
    // up starts n elements into gu: n a multiple of the pack keeps it as aligned as gu (the
    // 16-byte path where the allocation is 16-byte aligned), n % 4 = 3 does not (one at a time)
    for n in [4 * 64 + 8, 4 * 64 + 7] {
        let gu = vals(2 * n, 13, 3.0);
        let mut out = zeros(n);
        d.swiglu_fwd(m(&mut out), v(&gu)).unwrap();
        let mut dgu = zeros(2 * n);
        d.swiglu_bwd(m(&mut dgu), v(&out), v(&gu)).unwrap();
    }
}

fn residual(d: &EmuDevice) {
    let n = 4 * 64 + 3;
    let (a, b) = (vals(n, 15, 1.0), vals(n, 16, 1.0));
    let mut out = zeros(n);
    d.residual_fwd(m(&mut out), v(&a), v(&b)).unwrap();
    let mut da = vals(n, 17, 1.0);
    d.residual_bwd(m(&mut da), v(&out)).unwrap();
}

fn cross_entropy(d: &EmuDevice) {
    let (n, vocab) = (4, 33);
    let logits = vals(n * vocab, 18, 4.0);
    let targets: Vec<u32> = vec![0, 32, 7, 7];
    let mask = EmuBuf::F32(vec![1.0, 1.0, 0.0, 1.0]);
    // whole rows: one chunk of all V, the gradient written over the logits
    let (mut losses, mut state) = (zeros(n), zeros(3 * n));
    let (l, t, mk) = (v(&logits), &targets, v(&mask));
    d.cross_entropy_chunk_fwd(m(&mut losses), m(&mut state), l, t, mk, n, vocab, vocab, 0)
        .unwrap();
    let mut dl = vals(n * vocab, 18, 4.0);
    d.cross_entropy_chunk_bwd(m(&mut dl), v(&state), t, mk, n, vocab, vocab, 0, 0.25)
        .unwrap();
}

fn softmax(d: &EmuDevice) {
    let (n, vocab) = (4, 33);
    let x = vals(n * vocab, 19, 4.0);
    let mut y = zeros(n * vocab);
    d.softmax_fwd(m(&mut y), v(&x), n, vocab).unwrap();
    let dy = vals(n * vocab, 20, 1.0);
    let mut dx = zeros(n * vocab);
    d.softmax_bwd(m(&mut dx), v(&dy), v(&y), n, vocab).unwrap();
}

fn sample(d: &EmuDevice) {
    let (n, vocab) = (4, 33);
    let logits = vals(n * vocab, 21, 4.0);
    let u = EmuBuf::F32(vec![0.1, 0.5, 0.9, 0.999]);
    for spec in [
        SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
        },
    ] {
        let mut ids = vec![0u32; n];
        let mut logp = zeros(n);
        d.sample_fwd(&mut ids, m(&mut logp), v(&logits), v(&u), n, vocab, &spec)
            .unwrap();
    }
}

fn inject(d: &EmuDevice) {
    let (n, c) = (8, 64);
    let sites: Vec<u32> = vec![1, 5];
    let vecs = vals(sites.len() * c, 22, 1.0);
    for mode in [InjectMode::Replace, InjectMode::Add] {
        let mut h = vals(n * c, 23, 1.0);
        d.inject_fwd(m(&mut h), &sites, v(&vecs), n, c, mode)
            .unwrap();
        let mut dvecs = zeros(vecs.len());
        d.inject_bwd(m(&mut dvecs), m(&mut h), &sites, n, c, mode)
            .unwrap();
    }
}

fn norm_scale(d: &EmuDevice) {
    let (n, dd) = (3, 64);
    let mut xh = host(n * dd, 24, 1.0);
    xh[dd..2 * dd].fill(0.0); // a zero row: the clamp
    let x = EmuBuf::F32(xh);
    let mut y = zeros(n * dd);
    d.norm_scale_fwd(m(&mut y), v(&x), n, dd, 2.0).unwrap();
    let dy = vals(n * dd, 25, 1.0);
    let mut dx = zeros(n * dd);
    d.norm_scale_bwd(m(&mut dx), v(&dy), v(&x), n, dd, 2.0)
        .unwrap();
}

fn pool(d: &EmuDevice) {
    // B 3, T 5, C 12, lengths 5, 3, 1; every mode
    let (b, t, c) = (3, 5, 12);
    let h = vals(b * t * c, 26, 1.0);
    let mask = EmuBuf::F32(
        [5, 3, 1]
            .iter()
            .flat_map(|&len| (0..t).map(move |i| f32::from(u8::from(i < len))))
            .collect(),
    );
    let w = vals(t + 2, 27, 1.0);
    let dout = vals(b * c, 28, 1.0);
    for mode in [
        PoolMode::Last,
        PoolMode::Mean,
        PoolMode::Max,
        PoolMode::Weighted,
    ] {
        let weighted = mode == PoolMode::Weighted;
        let mut out = zeros(b * c);
        let wv = weighted.then(|| v(&w));
        d.pool_fwd(m(&mut out), v(&h), v(&mask), wv, b, t, c, mode)
            .unwrap();
        let mut dh = zeros(b * t * c);
        let mut dw = zeros(t + 2);
        let dwv = weighted.then(|| m(&mut dw));
        d.pool_bwd(
            m(&mut dh),
            dwv,
            v(&dout),
            v(&h),
            v(&mask),
            wv,
            b,
            t,
            c,
            mode,
        )
        .unwrap();
    }
}

fn reward_advantage(d: &EmuDevice) {
    let (s, a) = (6, 8);
    let pred = vals(s * a, 29, 1.0);
    let target = vals(s * a, 30, 1.0);
    let valid = EmuBuf::F32(vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    let ppo = RewardSpec {
        mse_scale: None,
        failure_value: -1.0,
        transform: RewardTransform::Exp { temperature: 0.5 },
        scale: 2.0,
        batch_normalize: true,
        clip: Some((-3.0, 3.0)),
        advantage: Advantage::Ppo { whiten: true },
        eps: 1e-6,
    };
    for spec in [RewardSpec::grpo(3, Some((a as f32).sqrt())), ppo] {
        let (mut mse, mut reward, mut adv) = (zeros(s), zeros(s), zeros(s));
        d.reward_advantage(
            m(&mut mse),
            m(&mut reward),
            m(&mut adv),
            v(&pred),
            v(&target),
            v(&valid),
            s,
            a,
            &spec,
        )
        .unwrap();
    }
}

fn policy_loss(d: &EmuDevice) {
    let (s, t) = (2, 7);
    let shifted = |seed| EmuBuf::F32(host(s * t, seed, 0.5).iter().map(|x| x - 1.0).collect());
    let (logp, old, refl) = (shifted(31), shifted(32), shifted(33));
    let adv = vals(s * t, 34, 1.0);
    let mask = EmuBuf::F32((0..s * t).map(|i| f32::from(u8::from(i % 7 < 5))).collect());
    let with_ref = PolicyLossSpec {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: Some(3.0),
        kl_coef: 0.01,
        kl_type: KlType::K3,
        agg: LossAgg::SeqMeanTokenMean,
    };
    let no_ref = PolicyLossSpec {
        kl_coef: 0.0,
        dual_clip: None,
        agg: LossAgg::TokenMean,
        ..with_ref
    };
    for (spec, r) in [(with_ref, Some(v(&refl))), (no_ref, None)] {
        let mut stats = zeros(PolicyStat::COUNT);
        d.policy_loss_fwd(
            m(&mut stats),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            r,
            s,
            t,
            &spec,
        )
        .unwrap();
        let mut dlogp = zeros(s * t);
        d.policy_loss_bwd(
            m(&mut dlogp),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            r,
            s,
            t,
            &spec,
        )
        .unwrap();
    }
}

fn adamw(d: &EmuDevice) {
    let n = 3000; // partial last block
    let mut p = vals(n, 35, 1.0);
    let g = vals(n, 36, 1.0);
    let (mut mm, mut vv) = (zeros(n), zeros(n));
    let hp = AdamwStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 0.5,
    };
    d.adamw(m(&mut p), None, v(&g), m(&mut mm), m(&mut vv), &hp)
        .unwrap();
    // several blocks, each a partial sum
    let big = vals(5000, 37, 2.0);
    d.sum_squares(v(&big)).unwrap();
}

/// Runs one child's launches on a fresh Threads-mode device.
fn child_run(name: &str, body: fn(&EmuDevice) -> usize) {
    if std::env::var(CHILD).is_err() {
        eprintln!("skipped: run by tests/tsan.rs in a child process ({CHILD}=1)");
        return;
    }
    assert!(tsan_linked(), "the TSan runtime is not linked");
    let t0 = std::time::Instant::now();
    let launches = body(&EmuDevice::new(EmuMode::Threads, 7));
    assert!(launches > 0, "{name}: no kernel launched");
    eprintln!(
        "{MARKER} {name}: {launches} launch(es) in EmuMode::Threads, {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The `child::` tests (`$f` runs a child's launches and returns how many) and, for the
/// `clean` ones, the parent `#[test]` asserting that TSan is quiet on them.
macro_rules! children {
    (racy: $($racy:ident => $rf:expr),*; clean: $($name:ident => $f:expr),* $(,)?) => {
        mod child {
            use super::*;
            $(
                #[test]
                #[ignore = "a child process of tests/tsan.rs"]
                fn $racy() {
                    child_run(stringify!($racy), $rf);
                }
            )*
            $(
                #[test]
                #[ignore = "a child process of tests/tsan.rs"]
                fn $name() {
                    child_run(stringify!($name), $f);
                }
            )*
        }
        $(
            #[test]
            fn $name() {
                assert_clean(stringify!($name));
            }
        )*
    };
}

/// `f` on the device, then the number of kernels it launched.
fn counted(d: &EmuDevice, f: fn(&EmuDevice)) -> usize {
    let before = d.launcher().launches();
    f(d);
    (d.launcher().launches() - before) as usize
}

children! {
    racy:
    racy_block_sum => |_| block_sum("emu_tsan_racy_block_sum"),
    racy_async_refill => |_| async_pipeline(2);
    clean:
    fixed_block_sum => |_| block_sum("emu_tsan_block_sum"),
    async_pipeline_no_race => |_| async_pipeline(0),
    adamw_no_race => |d| counted(d, adamw),
    attention_no_race => |d| counted(d, attention),
    attention_bf16_no_race => |d| counted(d, attention_bf16),
    attention_bf16_bo128_no_race => |d| counted(d, attention_bf16_bo128),
    cross_entropy_no_race => |d| counted(d, cross_entropy),
    decode_attention_no_race => |d| counted(d, decode_attention),
    embedding_no_race => |d| counted(d, embedding),
    inject_no_race => |d| counted(d, inject),
    norm_scale_no_race => |d| counted(d, norm_scale),
    policy_loss_no_race => |d| counted(d, policy_loss),
    pool_no_race => |d| counted(d, pool),
    residual_no_race => |d| counted(d, residual),
    reward_advantage_no_race => |d| counted(d, reward_advantage),
    rmsnorm_no_race => |d| counted(d, rmsnorm),
    rope_no_race => |d| counted(d, rope),
    sample_no_race => |d| counted(d, sample),
    softmax_no_race => |d| counted(d, softmax),
    swiglu_no_race => |d| counted(d, swiglu),
}
