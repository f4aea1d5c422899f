//! The CUDA device's code path against the CPU device (the twins) on a whole model: forward
//! and backward, an LM training step, an NLA actor SFT step (injection by projection:
//! norm_scale, inject, matmul), greedy generation (KV cache: decode_attention, sample) and the
//! ops the model does not use. Each comparison is one generic `check_*` function run on:
//!
//! - [`EmuDevice`] (always, CI included): every op but matmul as the real kernel of
//!   kernels/*.cu through its launcher (device/gpu/) on the emulator of the CUDA execution
//!   model, in both fiber schedules (EmuMode::Forward, and Reversed: threads in reverse order,
//!   blocks shuffled); the `#[test]`s without a prefix. They also count the kernel launches.
//! - `CudaDevice` (`cuda_*` tests): the same kernels on a GPU and matmul through cuBLASLt.
//!   Without a usable GPU (`cuda::probe` fails) they print why and pass as skipped, unless
//!   `NLA_REQUIRE_GPU=1` (scripts/gpu-check.sh), which makes that a failure.
//!
//! The model is the `gqa_untied` fixture (C 48, 6 query heads over 2 KV heads of size 8, FFN
//! 112, vocab 96, 2 layers; B 2, T 12): shapes small enough for the emulator (~ms a launch).
//!
//! Tolerances. The kernels sum in other orders than the twins (block trees, warp shuffles,
//! online softmax over key tiles, atomics of the backward's parameter gradients in scheduling
//! order), so results differ by f32 rounding only. tests/model.rs measures each path against
//! transformers in f64 at 6e-7 of the largest logit and < 1e-6 relative L2 on gradients; two
//! f32 paths then differ by at most the sum of their errors. The bounds below are ~10x that
//! (1e-5), far below what a wrong op does (> 1e-3). The GPU gets the same bounds: it runs the
//! same kernels (compiled without fast math; its expf/exp2f/logf are within 2 ulp, and nvcc's
//! FMA contraction moves a result by an ulp, both far below the bounds), and cuBLASLt computes
//! in f32 (CUBLAS_COMPUTE_32F, not TF32), so its GEMMs differ from the CPU's only in summation
//! order, as the kernels' reductions do.

mod common;

use std::time::Instant;

use common::parity::{
    actor_examples, check_grads, forward_backward, gpu, max_rel_err, model, rows,
};
use common::rel_l2;
use nla_engine::config::InjectionMode;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::EmuDevice;
use nla_engine::device::{Device, Dtype, SampleSpec, View, ViewMut};
use nla_engine::generate::{generate, GenSpec};
use nla_engine::model::Batch;
use nla_engine::nla::{Actor, ActorSpec};
use nla_engine::train::nla::ActorTrainer;
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule};

const MODES: [(EmuMode, u64); 2] = [(EmuMode::Forward, 0), (EmuMode::Reversed, 0x5eed)];

/// The emulated device of each schedule, with its label.
fn emu_devices() -> impl Iterator<Item = (EmuDevice, String)> {
    MODES
        .into_iter()
        .map(|(mode, seed)| (EmuDevice::new(mode, seed), format!("emu {mode:?}")))
}

// ---- forward and backward

// logits within 1e-5 of the largest logit, the loss within 1e-6 relative (a mean of 24
// cross-entropies: the per-row errors average out), every gradient within 1e-5 relative L2
// (see the module docs); bounds 10x the measured differences.
const LOGIT_MAX_REL: f64 = 1e-5;
const LOSS_REL: f64 = 1e-6;
const GRAD_REL_L2: f64 = 1e-5;

/// One forward and backward on `dev`, the logits in vocabulary chunks of `chunk` (None =
/// whole), against the CPU device's with whole logits.
fn check_forward_backward<D: Device>(dev: &D, label: &str, chunk: Option<usize>) {
    let (want_logits, want_loss, want_grads) = forward_backward(&CpuDevice::new(), None);
    let table = model(&CpuDevice::new()).table;
    let t0 = Instant::now();
    let (logits, loss, grads) = forward_backward(dev, chunk);
    // chunked: the last chunk's logits against the same columns of the whole ones
    let v = model(&CpuDevice::new()).cfg.vocab_size;
    let want_logits: Vec<f32> = match chunk {
        None => want_logits,
        Some(c) => {
            let last = v - (v - 1) / c * c;
            want_logits
                .chunks(v)
                .flat_map(|r| r[v - last..].to_vec())
                .collect()
        }
    };
    let label = &format!(
        "{label}{}",
        chunk.map_or(String::new(), |c| format!(" chunk {c}"))
    );
    let e = max_rel_err(&logits[..want_logits.len()], &want_logits);
    let le = (loss - want_loss).abs() / want_loss;
    eprintln!(
        "{label}: logits max rel err {e:.2e}, loss rel err {le:.2e} ({:.2?})",
        t0.elapsed()
    );
    assert!(e < LOGIT_MAX_REL, "{label}: logits max rel err {e:.2e}");
    assert!(le < LOSS_REL, "{label}: loss {loss} vs {want_loss}");
    for entry in &table.entries {
        let w = &want_grads[entry.offset..entry.offset + entry.len];
        assert!(w.iter().any(|&x| x != 0.0), "{}: zero gradient", entry.name);
    }
    check_grads(label, &table, &grads, &want_grads, GRAD_REL_L2);
}

#[test]
fn forward_and_backward_match_cpu() {
    for (dev, label) in emu_devices() {
        check_forward_backward(&dev, &label, None);
        // the ops ran as kernels: the embedding; per block 2 rmsnorm, the q/k/v split with
        // RoPE, attention and swiglu; the final norm and the cross-entropy; then their
        // backwards (attention's in 3 launches: dot, dq, dkdv). The residual adds are none: matmul epilogues in forward,
        // the norms' backward adding into the residual gradient in backward.
        let launches = dev.launcher().launches();
        eprintln!("{label}: {launches} kernel launches");
        let blocks = model(&CpuDevice::new()).cfg.num_hidden_layers as u64;
        assert_eq!(
            launches,
            2 * (1 + 5 * blocks + 2) + 2 * blocks,
            "{label}: launches"
        );
        // vocabulary 96 in chunks of 20 (four chunks and a last one of 16: each chunk one
        // cross_entropy_chunk_fwd and one _bwd launch, for the whole rows' one each) and
        // block recompute (each of the 2 blocks' 5 forward kernels again: rmsnorm, qkv_rope,
        // attention, rmsnorm, swiglu)
        check_forward_backward(&dev, &label, Some(20));
        let more = dev.launcher().launches() - 2 * launches;
        assert_eq!(more, (2 * 5 - 2) + 2 * 5, "{label}: chunked launches");
    }
}

/// Block recompute runs each block's forward again up to what its backward reads: 5 kernels
/// (rmsnorm, the q/k/v split with RoPE, attention, rmsnorm, swiglu) and 3 matmuls (q, k and v
/// as one, o, gate and up as one; not the down projection, whose output the residual stream
/// holds) per block, and nothing else.
#[test]
fn recompute_runs_each_block_up_to_swiglu() {
    use nla_engine::model::{MemoryOptions, Recompute};
    let calls = |recompute| {
        let dev = EmuDevice::new(EmuMode::Forward, 0);
        let opts = MemoryOptions {
            logits_chunk: Some(20),
            recompute,
        };
        common::parity::forward_backward_with(&dev, opts);
        (dev.launcher().launches(), dev.device_calls())
    };
    let ((l0, c0), (l1, c1)) = (calls(Recompute::None), calls(Recompute::Block));
    let blocks = model(&CpuDevice::new()).cfg.num_hidden_layers as u64;
    assert_eq!(l1 - l0, 5 * blocks, "kernels");
    assert_eq!(
        (c1 - l1) - (c0 - l0),
        3 * blocks,
        "matmuls and memory operations"
    );
}

/// A block's backward makes 8 matmuls, a dx and a dW for each of: the down projection, gate
/// and up as one (K = 2F, [2F,C]), the output projection, q, k and v as one (K = QKV,
/// [QKV,C]). The LM head adds its dx and dW.
#[test]
fn the_backward_makes_8_matmuls_per_block() {
    use nla_engine::model::{backward, forward, ActivationSet, MemoryOptions};
    let dev = EmuDevice::new(EmuMode::Forward, 0);
    let mut model = model(&dev);
    let batch = Batch::causal_lm(&rows()).unwrap();
    let mut acts =
        ActivationSet::with_options(&dev, &model.cfg, batch.b, batch.t, MemoryOptions::default())
            .unwrap();
    let db = batch.upload(&dev).unwrap();
    let loss = forward(&dev, &model, &mut acts, &db).unwrap();
    model.zero_grads(&dev).unwrap();
    let before = dev.matmuls();
    backward(&dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32).unwrap();
    let blocks = model.cfg.num_hidden_layers as u64;
    assert_eq!(dev.matmuls() - before, 8 * blocks + 2);
}

#[test]
fn cuda_forward_and_backward_match_cpu() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_forward_backward(&dev, "cuda", None);
        check_forward_backward(&dev, "cuda", Some(20));
    }
}

// ---- LM training steps

/// Three LM training steps (AdamW, clipping): the losses and the parameters after them.
fn lm_steps<D: Device>(dev: &D) -> (Vec<f64>, Vec<f32>) {
    let schedule = LrSchedule::constant(1e-3);
    let mut trainer =
        LmTrainer::new(dev, model(dev), AdamwConfig::default(), schedule, 1.0).unwrap();
    let batch = Batch::causal_lm(&rows()).unwrap();
    let losses = (0..3)
        .map(|_| {
            trainer
                .step(dev, std::slice::from_ref(&batch))
                .unwrap()
                .loss
        })
        .collect();
    (losses, trainer.model.params_to_host(dev).unwrap())
}

/// rel L2 of the update `got - init` against `want - init`.
fn update_rel_l2(got: &[f32], want: &[f32], init: &[f32]) -> f64 {
    let du = |x: &[f32]| -> Vec<f32> { x.iter().zip(init).map(|(&a, &b)| a - b).collect() };
    rel_l2(&du(got), &du(want))
}

/// Largest |a - b|; NaN or infinity in `a` fails.
fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite parameter");
    a.iter()
        .zip(b)
        .fold(0f32, |m, (&x, &y)| m.max((x - y).abs()))
}

// AdamW's first steps move every weight by about lr (m / sqrt(v) ~ sign(g)) whatever the
// gradient's size, so gradients differing by f32 rounding give the same update except where |g|
// is itself near rounding noise and near eps (1e-8), where the sign-like update can differ by
// up to ~lr. So: the update (params after - before) as a whole within 1e-4 relative L2
// (measured 3e-6 LM, 1.2e-5 actor), and no weight further than 5e-5 = lr / 20 from the CPU's
// (measured 1e-6 LM, 4.5e-6 actor); a wrong gradient (a sign, a missing term) moves many
// weights by ~2 lr = 2e-3 and the update by O(1) relative. Losses: as the forward's.
const STEP_LOSS_REL: f64 = 1e-6;
const STEP_PARAM_ABS: f32 = 5e-5;
const UPDATE_REL_L2: f64 = 1e-4;

/// Three LM training steps on `dev` against the CPU device.
fn check_lm_steps<D: Device>(dev: &D, label: &str) {
    let (want_losses, want_params) = lm_steps(&CpuDevice::new());
    let init = model(&CpuDevice::new())
        .params_to_host(&CpuDevice::new())
        .unwrap();
    let t0 = Instant::now();
    let (losses, params) = lm_steps(dev);
    let d = max_abs(&params, &want_params);
    let u = update_rel_l2(&params, &want_params, &init);
    eprintln!(
        "{label}: losses {losses:?} vs {want_losses:?}, params max |diff| {d:.2e}, \
         update rel L2 err {u:.2e} ({:.2?})",
        t0.elapsed()
    );
    assert!(u < UPDATE_REL_L2, "{label}: update rel L2 {u:.2e}");
    for (l, w) in losses.iter().zip(&want_losses) {
        assert!(
            (l - w).abs() / w < STEP_LOSS_REL,
            "{label}: loss {l} vs {w}"
        );
    }
    assert!(want_losses[2] < want_losses[0], "training lowers the loss");
    assert!(d < STEP_PARAM_ABS, "{label}: params max |diff| {d:.2e}");
}

#[test]
fn lm_training_steps_match_cpu() {
    for (dev, label) in emu_devices() {
        check_lm_steps(&dev, &label);
    }
}

#[test]
fn cuda_lm_training_steps_match_cpu() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_lm_steps(&dev, "cuda");
    }
}

// ---- NLA actor SFT steps

/// Two actor SFT steps with `project` injection (norm_scale, matmul, inject) at layer 1: the
/// losses, the gradient norms and the parameters (W included) after them.
fn actor_steps<D: Device>(dev: &D) -> (Vec<(f64, f64)>, Vec<f32>, Vec<f32>) {
    let a = 16;
    let spec = ActorSpec {
        layers: vec![1],
        mode: InjectionMode::Project,
        scale: Some((a as f32).sqrt()),
        a,
    };
    let actor = Actor::new(dev, model(dev), spec, None, 3).unwrap();
    let schedule = LrSchedule::constant(1e-3);
    let init = dev.download(View::all(&actor.model.params)).unwrap();
    let mut t = ActorTrainer::new(dev, actor, AdamwConfig::default(), schedule, 1.0).unwrap();
    let ex = actor_examples(a);
    let stats = (0..2)
        .map(|_| {
            let s = t.sft_step(dev, &ex, 1, 0).unwrap();
            (s.loss, s.grad_norm)
        })
        .collect();
    let p = dev.download(View::all(&t.actor.model.params)).unwrap();
    (stats, p, init)
}

/// Two actor SFT steps on `dev` against the CPU device.
fn check_actor_steps<D: Device>(dev: &D, label: &str) {
    let (want_stats, want_params, init) = actor_steps(&CpuDevice::new());
    let t0 = Instant::now();
    let (stats, params, _) = actor_steps(dev);
    let d = max_abs(&params, &want_params);
    let u = update_rel_l2(&params, &want_params, &init);
    eprintln!(
        "{label}: (loss, grad norm) {stats:?} vs {want_stats:?}, params max |diff| {d:.2e}, \
         update rel L2 err {u:.2e} ({:.2?})",
        t0.elapsed()
    );
    assert!(u < UPDATE_REL_L2, "{label}: update rel L2 {u:.2e}");
    for (&(l, g), &(wl, wg)) in stats.iter().zip(&want_stats) {
        assert!(
            (l - wl).abs() / wl < STEP_LOSS_REL,
            "{label}: loss {l} vs {wl}"
        );
        // the global norm: a sum of squares over every gradient, as GRAD_REL_L2
        assert!(
            (g - wg).abs() / wg < GRAD_REL_L2,
            "{label}: grad norm {g} vs {wg}"
        );
    }
    assert!(d < STEP_PARAM_ABS, "{label}: params max |diff| {d:.2e}");
}

#[test]
fn actor_sft_steps_match_cpu() {
    for (dev, label) in emu_devices() {
        check_actor_steps(&dev, &label);
    }
}

#[test]
fn cuda_actor_sft_steps_match_cpu() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_actor_steps(&dev, "cuda");
    }
}

// ---- greedy generation

fn greedy() -> GenSpec {
    GenSpec {
        n: 2,
        // 5 + 30 positions > 32: decode attention splits the cache over blocks (nsplit 2) and
        // runs its combine kernel
        max_new_tokens: 30,
        sample: SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        eos_ids: vec![],
        seed: 11,
    }
}

/// The CPU's logits after `prefix` (one row, no padding): |logit[a] - logit[b]| and the
/// largest |logit|.
fn cpu_logit_gap(cpu: &CpuDevice, prefix: &[u32], a: u32, b: u32) -> (f32, f32) {
    use nla_engine::model::kv_cache::KvCache;
    let m = model(cpu);
    let t = prefix.len();
    let mut kv = KvCache::new(cpu, &m.cfg, &[0], t, t).unwrap();
    kv.step(cpu, &m, &cpu.upload_ids(prefix).unwrap(), t)
        .unwrap();
    let l = cpu.download(kv.logits()).unwrap();
    let top = l.iter().fold(0f32, |x, y| x.max(y.abs()));
    ((l[a as usize] - l[b as usize]).abs(), top)
}

/// Greedy generation on `dev` against the CPU device: the same tokens, except that from a
/// step where the CPU's two candidates are tied within 1e-5 of the largest logit the sequences
/// may part (a GPU's GEMMs sum in another order: its logits differ from the CPU's by ~1e-6 of
/// that, enough to flip a near-tie, and every later token then follows another prefix).
fn check_greedy_generation<D: Device>(dev: &D, label: &str) {
    // different lengths: the shorter prompt is left-padded
    let prompts = vec![vec![5u32, 17, 3, 44, 9], vec![60u32, 2]];
    let never = |_: &[u32]| false;
    let cpu = CpuDevice::new();
    let want = generate(&cpu, &model(&cpu), &prompts, &greedy(), &never).unwrap();
    let t0 = Instant::now();
    let got = generate(dev, &model(dev), &prompts, &greedy(), &never).unwrap();
    eprintln!("{label}: generation ({:.2?})", t0.elapsed());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.prompt, w.prompt);
        assert_eq!(
            g.tokens.len(),
            w.tokens.len(),
            "{label}: prompt {}",
            w.prompt
        );
        let same = g
            .tokens
            .iter()
            .zip(&w.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        if same < w.tokens.len() {
            let prefix = [&prompts[w.prompt][..], &w.tokens[..same]].concat();
            let (gap, top) = cpu_logit_gap(&cpu, &prefix, w.tokens[same], g.tokens[same]);
            assert!(
                gap <= 1e-5 * top,
                "{label}: prompt {}: token {same} is {} where the CPU chose {} by a logit gap of \
                 {gap:e} (largest logit {top}): not a near-tie\n got  {:?}\n want {:?}",
                w.prompt,
                g.tokens[same],
                w.tokens[same],
                g.tokens,
                w.tokens
            );
            eprintln!(
                "{label}: prompt {}: tokens part at {same} on a near-tie (gap {gap:e}, largest \
                 logit {top})",
                w.prompt
            );
        }
        assert_eq!(g.stop, w.stop);
        // log-probabilities of the same tokens from logits that differ by f32 rounding
        for (a, b) in g.logps.iter().zip(&w.logps).take(same) {
            assert!((a - b).abs() < 1e-4, "{label}: logp {a} vs {b}");
        }
    }
}

#[test]
fn greedy_generation_matches_cpu() {
    use nla_engine::device::gpu::kernel_device::KernelDevice;
    for (dev, label) in emu_devices() {
        check_greedy_generation(&dev, &label);
        // decode attention ran once per layer and token (2 x 30) and kept its split-K
        // scratch between calls: a few allocations (each slot's first use, and growth as the
        // cache fills and the split widens), not one or two per call
        let allocs = dev.scratch().allocations();
        eprintln!("{label}: {allocs} scratch allocations");
        assert!(allocs <= 6, "{label}: {allocs} scratch allocations");
    }
}

/// The device calls (kernel launches, memory operations, matmuls: what the CUDA device hands
/// the driver) of one decode step: the step's launches are the same at every position, so
/// after its first capture every decode step is one graph replay, plus the position's write,
/// the sampling and the tokens' download: 4 calls, however many rows the batch has. Counted
/// over decode steps 40..60 (by the difference of two generations whose decode attention
/// splits the same way); `n` samples of each of two prompts are 2n rows. And the decode step is
/// captured once per generation, not at every step.
#[test]
fn decode_device_calls_do_not_grow_with_rows() {
    let prompts = vec![vec![5u32, 17, 3, 44, 9], vec![60u32, 2]];
    let never = |_: &[u32]| false;
    let calls = |n: usize, new: usize| {
        let dev = EmuDevice::new(EmuMode::Forward, 1);
        let m = model(&dev);
        let spec = GenSpec {
            n,
            max_new_tokens: new,
            ..greedy()
        };
        let before = dev.device_calls();
        generate(&dev, &m, &prompts, &spec, &never).unwrap();
        assert_eq!(dev.graph_captures(), 1, "decode steps captured");
        dev.device_calls() - before
    };
    let per_step = |n: usize| (calls(n, 60) - calls(n, 40)) as f64 / 20.0;
    let (two, eight) = (per_step(1), per_step(4));
    eprintln!("device calls per decode step: {two} with 2 rows, {eight} with 8 rows");
    assert_eq!(
        two, eight,
        "device calls per decode step grow with the rows"
    );
    assert_eq!(two, 4.0, "a decode step is not one graph replay");
}

#[test]
fn cuda_greedy_generation_matches_cpu() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_greedy_generation(&dev, "cuda");
        // the decode steps ran as a CUDA graph: captured, then replayed, no capture failed
        let g = dev.graph_stats().unwrap_or_default();
        eprintln!("cuda: {g:?}");
        if nla_engine::device::gpu::graph::enabled() {
            assert!(
                g.captures >= 1 && g.replays >= 1 && g.failures == 0,
                "{g:?}"
            );
        }
    }
}

// ---- the ops the model does not use

/// `n` deterministic values in (-scale, scale).
fn vals(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * ((i as f32 * 0.7311 + seed as f32 * 1.37).sin()))
        .collect()
}

/// The outputs of softmax, pool (every mode), reward_advantage, policy_loss (with and without
/// a reference) and sum_squares on `dev`.
fn other_ops<D: Device>(dev: &D) -> (Vec<Vec<f32>>, f64) {
    use nla_engine::device::{
        KlType, LossAgg, PolicyLossSpec, PolicyStat, PoolMode, RewardSpec, ViewMut,
    };
    let up = |x: &[f32]| dev.upload(x).unwrap();
    let down = |b: &D::Buf| dev.download(View::all(b)).unwrap();
    let mut outs = vec![];
    // softmax [5, 37]
    let (n, v) = (5, 37);
    let x = up(&vals(n * v, 1, 4.0));
    let mut y = dev.alloc(n * v).unwrap();
    dev.softmax_fwd(ViewMut::all(&mut y), View::all(&x), n, v)
        .unwrap();
    let dy = up(&vals(n * v, 2, 1.0));
    let mut dx = dev.alloc(n * v).unwrap();
    dev.softmax_bwd(ViewMut::all(&mut dx), View::all(&dy), View::all(&y), n, v)
        .unwrap();
    outs.extend([down(&y), down(&dx)]);
    // pool [B 3, T 5, C 12], lengths 5, 3, 1, every mode
    let (b, t, c) = (3, 5, 12);
    let h = up(&vals(b * t * c, 3, 1.0));
    let mask: Vec<f32> = [5, 3, 1]
        .iter()
        .flat_map(|&len| (0..t).map(move |i| f32::from(u8::from(i < len))))
        .collect();
    let mask = up(&mask);
    let w = up(&vals(t + 2, 4, 1.0));
    let dout = up(&vals(b * c, 5, 1.0));
    for mode in [
        PoolMode::Last,
        PoolMode::Mean,
        PoolMode::Max,
        PoolMode::Weighted,
    ] {
        let weighted = mode == PoolMode::Weighted;
        let mut out = dev.alloc(b * c).unwrap();
        let wv = weighted.then(|| View::all(&w));
        dev.pool_fwd(
            ViewMut::all(&mut out),
            View::all(&h),
            View::all(&mask),
            wv,
            b,
            t,
            c,
            mode,
        )
        .unwrap();
        let mut dh = dev.alloc(b * t * c).unwrap();
        let mut dw = up(&vals(t + 2, 6, 1.0));
        let dwv = weighted.then(|| ViewMut::all(&mut dw));
        dev.pool_bwd(
            ViewMut::all(&mut dh),
            dwv,
            View::all(&dout),
            View::all(&h),
            View::all(&mask),
            wv,
            b,
            t,
            c,
            mode,
        )
        .unwrap();
        outs.extend([down(&out), down(&dh), down(&dw)]);
    }
    // reward_advantage, S 6 in groups of 3, one failure
    let (s, a) = (6, 8);
    let pred = up(&vals(s * a, 7, 1.0));
    let target = up(&vals(s * a, 8, 1.0));
    let valid = up(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    let (mut mse, mut reward, mut adv) = (
        dev.alloc(s).unwrap(),
        dev.alloc(s).unwrap(),
        dev.alloc(s).unwrap(),
    );
    let spec = RewardSpec::grpo(3, Some((a as f32).sqrt()));
    dev.reward_advantage(
        ViewMut::all(&mut mse),
        ViewMut::all(&mut reward),
        ViewMut::all(&mut adv),
        View::all(&pred),
        View::all(&target),
        View::all(&valid),
        s,
        a,
        &spec,
    )
    .unwrap();
    outs.extend([down(&mse), down(&reward), down(&adv)]);
    // policy_loss, S 2 x T 7, dual clip and k3 KL
    let (s, t) = (2, 7);
    let shifted = |seed| {
        vals(s * t, seed, 0.5)
            .iter()
            .map(|x| x - 1.0)
            .collect::<Vec<_>>()
    };
    let logp = up(&shifted(9));
    let old = up(&shifted(10));
    let refl = up(&shifted(11));
    let advs = up(&vals(s * t, 12, 1.0));
    let pmask = up(&(0..s * t)
        .map(|i| f32::from(u8::from(i % 7 < 5)))
        .collect::<Vec<_>>());
    let spec = PolicyLossSpec {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: Some(3.0),
        kl_coef: 0.01,
        kl_type: KlType::K3,
        agg: LossAgg::SeqMeanTokenMean,
    };
    let ins = [&logp, &old, &advs, &pmask].map(View::all);
    let mut stats = dev.alloc(PolicyStat::COUNT).unwrap();
    dev.policy_loss_fwd(
        ViewMut::all(&mut stats),
        ins[0],
        ins[1],
        ins[2],
        ins[3],
        Some(View::all(&refl)),
        s,
        t,
        &spec,
    )
    .unwrap();
    let mut dlogp = dev.alloc(s * t).unwrap();
    dev.policy_loss_bwd(
        ViewMut::all(&mut dlogp),
        ins[0],
        ins[1],
        ins[2],
        ins[3],
        Some(View::all(&refl)),
        s,
        t,
        &spec,
    )
    .unwrap();
    outs.extend([down(&stats), down(&dlogp)]);
    // without a reference model (an RL step with kl_coef 0): no KL term
    let spec = PolicyLossSpec {
        kl_coef: 0.0,
        ..spec
    };
    dev.policy_loss_fwd(
        ViewMut::all(&mut stats),
        ins[0],
        ins[1],
        ins[2],
        ins[3],
        None,
        s,
        t,
        &spec,
    )
    .unwrap();
    dev.policy_loss_bwd(
        ViewMut::all(&mut dlogp),
        ins[0],
        ins[1],
        ins[2],
        ins[3],
        None,
        s,
        t,
        &spec,
    )
    .unwrap();
    outs.extend([down(&stats), down(&dlogp)]);
    // sum_squares (f64 partial sums in another order)
    let big = up(&vals(5000, 13, 2.0));
    let ss = dev.sum_squares(View::all(&big)).unwrap();
    (outs, ss)
}

/// The ops the model does not use (softmax, pool, reward_advantage, policy_loss, sum_squares)
/// on `dev` against the CPU device. Tolerance: a few f32 roundings of a row's sum (1e-5
/// relative to the largest value of each output).
fn check_other_ops<D: Device>(dev: &D, label: &str) {
    let (want, want_ss) = other_ops(&CpuDevice::new());
    let (got, ss) = other_ops(dev);
    let e = (ss - want_ss).abs() / want_ss;
    // the squares of one 16-byte pack are summed in f32 (positive terms: relative error
    // < 8 * 2^-24 < 5e-7), the rest in f64 (as tests/kernels_emu_a.rs)
    assert!(e < 1e-6, "{label}: sum_squares {ss} vs {want_ss}");
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = max_rel_err(g, w);
        assert!(e < 1e-5, "{label}: output {i}: max rel err {e:.2e}");
        worst = worst.max(e);
    }
    eprintln!("{label}: other ops: worst max rel err {worst:.2e}, sum_squares rel err {e:.2e}");
}

/// A length mismatch is an error naming the op.
fn check_mismatch_refused<D: Device>(dev: &D) {
    use nla_engine::device::ViewMut;
    let x = dev.alloc(10).unwrap();
    let mut y = dev.alloc(12).unwrap();
    let err = dev
        .softmax_fwd(ViewMut::all(&mut y), View::all(&x), 2, 5)
        .unwrap_err();
    assert!(err.to_string().contains("softmax_fwd"), "{err}");
}

#[test]
fn other_ops_match_cpu() {
    for (dev, label) in emu_devices() {
        check_other_ops(&dev, &label);
        // a mismatch is refused before any launch
        let before = dev.launcher().launches();
        check_mismatch_refused(&dev);
        assert_eq!(dev.launcher().launches(), before, "{label}");
    }
}

#[test]
fn cuda_other_ops_match_cpu() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_other_ops(&dev, "cuda");
        check_mismatch_refused(&dev);
        // nothing faulted on the stream
        dev.synchronize().unwrap();
    }
}

// ---- memory: write

/// `write` fills exactly its window of an existing buffer and refuses a host slice of another
/// length, leaving the buffer as it was.
fn check_write<D: Device>(dev: &D, label: &str) {
    let mut buf = dev.upload(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    dev.write(ViewMut::range(&mut buf, 1, 3), &[-7.5, 0.25, 9.0])
        .unwrap();
    let got = dev.download(View::all(&buf)).unwrap();
    assert_eq!(got, [1.0, -7.5, 0.25, 9.0, 5.0], "{label}");
    let e = dev
        .write(ViewMut::range(&mut buf, 0, 2), &[1.0, 2.0, 3.0])
        .unwrap_err();
    assert!(e.to_string().contains("write"), "{label}: {e}");
    assert_eq!(dev.download(View::all(&buf)).unwrap(), got, "{label}");
}

#[test]
fn write_fills_its_window() {
    check_write(&CpuDevice::new(), "cpu");
    for (dev, label) in emu_devices() {
        check_write(&dev, &label);
    }
}

#[test]
fn cuda_write_fills_its_window() {
    if let Some(dev) = gpu(Dtype::F32) {
        check_write(&dev, "cuda");
    }
}

// ---- the chunked cross-entropy's checks

/// A chunk past the vocabulary, a target at V and a state of the wrong length are refused
/// with the same message on every device, before anything runs.
fn check_chunk_refusals<D: Device>(dev: &D, label: &str) {
    let (n, vc, v) = (2, 3, 7);
    let mut losses = dev.alloc(n).unwrap();
    let mut state = dev.alloc(3 * n).unwrap();
    let logits = dev.upload(&[0.5; 6]).unwrap();
    let mask = dev.upload(&[1.0, 1.0]).unwrap();
    let mut run = |targets: &[u32], v0: usize, state_len: usize| {
        let t = dev.upload_ids(targets).unwrap();
        dev.cross_entropy_chunk_fwd(
            ViewMut::all(&mut losses),
            ViewMut::range(&mut state, 0, state_len),
            View::all(&logits),
            &t,
            View::all(&mask),
            n,
            vc,
            v,
            v0,
        )
        .unwrap_err()
        .to_string()
    };
    let e = run(&[0, 1], 5, 3 * n);
    assert!(
        e.contains("chunk [5, 5+3) outside the vocabulary of 7"),
        "{label}: {e}"
    );
    let e = run(&[0, 7], 3, 3 * n);
    assert!(e.contains("targets"), "{label}: {e}");
    let e = run(&[0, 1], 3, 3 * n - 1);
    assert!(e.contains("state [N,3]"), "{label}: {e}");
}

// ---- qkv_rope's positions in a cache

/// qkv_rope_fwd refuses, before anything runs and alike on every device: TQ positions past
/// the cache's end from the host's pos0 or from the device word `pos`, a pos0 whose end
/// overflows, a `pos` of two ids, and an empty step whose position is past the end. The
/// cache's last TQ positions are accepted.
fn check_qkv_rope_refusals<D: Device>(dev: &D, label: &str) {
    use nla_engine::device::CacheDims;
    let d = CacheDims {
        b: 2,
        tq: 3,
        tmax: 8,
        nh: 2,
        nkv: 1,
        hs: 4,
        pos0: 5,
    };
    let (rows, qd, kvd) = (6, 8, 4);
    let qkv = dev.upload(&vec![0.5; rows * (qd + 2 * kvd)]).unwrap();
    let mut q = dev.alloc(rows * qd).unwrap();
    let mut k = dev.alloc(2 * 8 * kvd).unwrap();
    let mut v = dev.alloc(2 * 8 * kvd).unwrap();
    let mut run = |pos: &[u32], d: CacheDims| {
        let ids = (!pos.is_empty()).then(|| dev.upload_ids(pos).unwrap());
        let (nq, nx) = (d.b * d.tq * qd, d.b * d.tq * (qd + 2 * kvd));
        dev.qkv_rope_fwd(
            ViewMut::range(&mut q, 0, nq),
            ViewMut::all(&mut k),
            ViewMut::all(&mut v),
            View::range(&qkv, 0, nx),
            ids.as_ref(),
            d,
            1e4,
        )
    };
    run(&[], d).unwrap_or_else(|e| panic!("{label}: the last positions: {e}"));
    run(&[5], d).unwrap_or_else(|e| panic!("{label}: the last positions from pos: {e}"));
    let cases: [(&[u32], CacheDims, &str); 5] = [
        (&[], CacheDims { pos0: 6, ..d }, "past the end"),
        (&[6], d, "pos past the end"),
        (&[5, 5], d, "two ids"),
        (
            &[],
            CacheDims {
                pos0: usize::MAX,
                ..d
            },
            "an overflowing end",
        ),
        (
            &[],
            CacheDims {
                tq: 0,
                pos0: 9,
                ..d
            },
            "an empty step past the end",
        ),
    ];
    for (pos, d, what) in cases {
        let e = run(pos, d).unwrap_err().to_string();
        assert!(e.contains("qkv_rope_fwd"), "{label}: {what}: {e}");
    }
}

#[test]
fn qkv_rope_refuses_positions_past_the_cache() {
    check_qkv_rope_refusals(&CpuDevice::new(), "cpu");
    for (dev, label) in emu_devices() {
        let before = dev.launcher().launches();
        check_qkv_rope_refusals(&dev, &label);
        // the two accepted calls launched; nothing else did
        assert_eq!(dev.launcher().launches(), before + 2, "{label}");
    }
}

#[test]
fn chunked_cross_entropy_refuses_bad_chunks() {
    check_chunk_refusals(&CpuDevice::new(), "cpu");
    for (dev, label) in emu_devices() {
        check_chunk_refusals(&dev, &label);
    }
}
