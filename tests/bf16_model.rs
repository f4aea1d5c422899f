//! The bf16 working precision (the CUDA device's default) against the f32 CPU twins, on a whole
//! model: forward and backward, LM training steps, an NLA actor SFT step (projection
//! injection), the critic's forward and backward, and greedy generation. Weights' working copy,
//! activations, their gradients, logits and the KV cache are bf16; master weights, parameter
//! gradients, AdamW state and statistics f32 (device/mod.rs). Each check runs on:
//!
//! - [`EmuDevice`] in bf16 (always, CI included): the bf16 kernels through their launchers on
//!   the emulator, matmuls as the CPU GEMM on the bf16 operands rounded once to c's dtype (as
//!   cuBLASLt with f32 compute), in both fiber schedules;
//! - `CudaDevice` in bf16 (`cuda_*` tests, skipped without a GPU as in device_parity.rs).
//!
//! The model is device_parity.rs's `gqa_untied` fixture (C 48, 2 layers, vocab 96; B 2, T 12).
//!
//! Tolerances. Every stored activation is rounded to bf16 (8-bit significand: relative error
//! up to 2^-9 = 2e-3 per rounding), about 15 roundings per block on the way to the logits, so
//! results move by ~1e-2 relative from the f32 path, not by f32 rounding. The bounds are ~3x
//! what was measured on the emulator (written next to each), and far below what a wrong kernel,
//! a missing conversion or a stale working copy does (O(1), or the update not applied).

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
use nla_engine::device::{Device, DeviceBuf, Dtype, PoolMode, SampleSpec, View};
use nla_engine::generate::{generate, GenSpec};
use nla_engine::model::{Batch, Model, ParamTable};
use nla_engine::nla::{Actor, ActorSpec, Critic, CriticSpec};
use nla_engine::train::nla::ActorTrainer;
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule};

const MODES: [(EmuMode, u64); 2] = [(EmuMode::Forward, 0), (EmuMode::Reversed, 0xbf16)];

/// The emulated device in bf16, in each schedule, with its label.
fn emu_devices() -> impl Iterator<Item = (EmuDevice, String)> {
    MODES.into_iter().map(|(mode, seed)| {
        let dev = EmuDevice::new(mode, seed)
            .with_work_dtype(Dtype::Bf16)
            .unwrap();
        (dev, format!("emu bf16 {mode:?}"))
    })
}

// ---- forward and backward

// measured on the emulator: logits 1.24e-2, loss 3.3e-5, worst gradient 2.1e-2 (layer 1's
// k_proj), actor loss 2.3e-4 and grad norm 3.7e-3
const LOGIT_MAX_REL: f64 = 3e-2;
const LOSS_REL: f64 = 1e-3;
const GRAD_REL_L2: f64 = 6e-2;

fn check_forward_backward<D: Device>(dev: &D, label: &str) {
    assert_eq!(dev.work_dtype(), Dtype::Bf16);
    let (want_logits, want_loss, want_grads) = forward_backward(&CpuDevice::new(), None);
    let table = model(&CpuDevice::new()).table;
    let t0 = Instant::now();
    let (logits, loss, grads) = forward_backward(dev, None);
    let e = max_rel_err(&logits, &want_logits);
    let le = (loss - want_loss).abs() / want_loss;
    eprintln!(
        "{label}: logits max rel err {e:.2e}, loss rel err {le:.2e} ({:.2?})",
        t0.elapsed()
    );
    // the logits are bf16: at least one must differ from the f32 ones (else this ran in f32)
    assert!(e > 0.0, "{label}: logits equal the f32 ones");
    assert!(e < LOGIT_MAX_REL, "{label}: logits max rel err {e:.2e}");
    assert!(le < LOSS_REL, "{label}: loss {loss} vs {want_loss}");
    check_grads(label, &table, &grads, &want_grads, GRAD_REL_L2);
}

#[test]
fn bf16_forward_and_backward_match_cpu() {
    for (dev, label) in emu_devices() {
        check_forward_backward(&dev, &label);
    }
}

#[test]
fn cuda_bf16_forward_and_backward_match_cpu() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        check_forward_backward(&dev, "cuda bf16");
    }
}

// ---- LM training steps

/// Three LM steps: the losses, the f32 master weights and the working copy after them.
fn lm_steps<D: Device>(dev: &D) -> (Vec<f64>, Vec<f32>, Option<Vec<f32>>) {
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
    let m = &trainer.model;
    let work = m.work.as_ref().map(|w| dev.download(View::all(w)).unwrap());
    (losses, m.params_to_host(dev).unwrap(), work)
}

// AdamW moves each weight by about lr (m / sqrt(v) ~ sign(g)) per step whatever |g|, so
// gradients ~3 % off give nearly the same update, except for the weights whose gradient is near
// zero, where the sign can flip. So: the update as a whole within 0.15 relative L2 (measured
// 5.3e-2) where a wrong gradient gives O(1), and the losses as the forward's.
const UPDATE_REL_L2: f64 = 0.15;

fn check_lm_steps<D: Device>(dev: &D, label: &str) {
    let cpu = CpuDevice::new();
    let (want_losses, want_params, _) = lm_steps(&cpu);
    let init = model(&cpu).params_to_host(&cpu).unwrap();
    let (losses, params, work) = lm_steps(dev);
    let du = |x: &[f32]| -> Vec<f32> { x.iter().zip(&init).map(|(&a, &b)| a - b).collect() };
    let u = rel_l2(&du(&params), &du(&want_params));
    eprintln!("{label}: losses {losses:?} vs {want_losses:?}, update rel L2 err {u:.2e}");
    assert!(u < UPDATE_REL_L2, "{label}: update rel L2 {u:.2e}");
    for (l, w) in losses.iter().zip(&want_losses) {
        assert!((l - w).abs() / w < LOSS_REL, "{label}: loss {l} vs {w}");
    }
    assert!(losses[2] < losses[0], "{label}: training lowers the loss");
    // the working copy is the master weights rounded to bf16, after every update
    let work = work.expect("a bf16 device keeps a working copy");
    for (i, (&w, &p)) in work.iter().zip(&params).enumerate() {
        let r = half::bf16::from_f32(p).to_f32();
        assert!(
            w == r,
            "{label}: working copy [{i}] = {w}, bf16(master) = {r}"
        );
    }
}

#[test]
fn bf16_lm_training_steps_match_cpu() {
    for (dev, label) in emu_devices() {
        check_lm_steps(&dev, &label);
    }
}

#[test]
fn cuda_bf16_lm_training_steps_match_cpu() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        check_lm_steps(&dev, "cuda bf16");
    }
}

// ---- NLA actor SFT steps (projection injection)

/// Two actor SFT steps: (loss, grad norm) of each.
fn actor_steps<D: Device>(dev: &D) -> Vec<(f64, f64)> {
    let a = 16;
    let spec = ActorSpec {
        layers: vec![1],
        mode: InjectionMode::Project,
        scale: Some((a as f32).sqrt()),
        a,
    };
    let actor = Actor::new(dev, model(dev), spec, None, 3).unwrap();
    let schedule = LrSchedule::constant(1e-3);
    let mut t = ActorTrainer::new(dev, actor, AdamwConfig::default(), schedule, 1.0).unwrap();
    let ex = actor_examples(a);
    (0..2)
        .map(|_| {
            let s = t.sft_step(dev, &ex, 1, 0).unwrap();
            (s.loss, s.grad_norm)
        })
        .collect()
}

fn check_actor_steps<D: Device>(dev: &D, label: &str) {
    let want = actor_steps(&CpuDevice::new());
    let got = actor_steps(dev);
    eprintln!("{label}: (loss, grad norm) {got:?} vs {want:?}");
    for (&(l, g), &(wl, wg)) in got.iter().zip(&want) {
        assert!((l - wl).abs() / wl < LOSS_REL, "{label}: loss {l} vs {wl}");
        assert!(
            (g - wg).abs() / wg < GRAD_REL_L2,
            "{label}: grad norm {g} vs {wg}"
        );
    }
}

#[test]
fn bf16_actor_sft_steps_match_cpu() {
    for (dev, label) in emu_devices() {
        check_actor_steps(&dev, &label);
    }
}

#[test]
fn cuda_bf16_actor_sft_steps_match_cpu() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        check_actor_steps(&dev, "cuda bf16");
    }
}

// ---- greedy generation

/// The first tokens greedy generation picks, and their log-probabilities.
fn generation<D: Device>(dev: &D) -> Vec<(Vec<u32>, Vec<f32>)> {
    let spec = GenSpec {
        n: 1,
        max_new_tokens: 6,
        sample: SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        },
        eos_ids: vec![],
        seed: 11,
    };
    let prompts = vec![vec![5u32, 17, 3, 44, 9], vec![60u32, 2]];
    let never = |_: &[u32]| false;
    let run = |m: &Model<D>| -> Vec<(Vec<u32>, Vec<f32>)> {
        generate(dev, m, &prompts, &spec, &never)
            .unwrap()
            .into_iter()
            .map(|g| (g.tokens, g.logps))
            .collect()
    };
    let mut m = model(dev);
    let out = run(&m);
    // frozen (no gradients; in bf16 no f32 master weights either): the same tokens, and the
    // weights still readable from the working copy
    let before = m.params_to_host(dev).unwrap();
    m.freeze(dev).unwrap();
    assert_eq!(
        m.params.len() < m.table.total,
        dev.work_dtype() == Dtype::Bf16,
        "the master weights are dropped where a working copy serves the compute"
    );
    assert_eq!(run(&m), out);
    let after = m.params_to_host(dev).unwrap();
    assert!(after
        .iter()
        .zip(&before)
        .all(|(&a, &b)| a == half::bf16::from_f32(b).to_f32() || a == b));
    out
}

/// Greedy generation in bf16 (KV cache, decode attention, sampling over bf16 logits): the first
/// token of each prompt is the f32 path's (its distribution is the forward's, whose logits are
/// within LOGIT_MAX_REL, and this fixture has no near tie there); later tokens may part ways
/// at a near tie, so they are only checked to be in the vocabulary (all 6 agreed when
/// measured). Greedy log-probabilities are 0 (the temperature-0 distribution is one token).
fn check_generation<D: Device>(dev: &D, label: &str) {
    let want = generation(&CpuDevice::new());
    let got = generation(dev);
    eprintln!("{label}: {got:?} vs {want:?}");
    for ((t, l), (wt, wl)) in got.iter().zip(&want) {
        assert_eq!(t.len(), wt.len());
        assert_eq!(t[0], wt[0], "{label}: first token");
        assert!(t.iter().all(|&x| x < 96));
        assert_eq!(l, wl, "{label}: greedy log-probabilities");
    }
}

#[test]
fn bf16_greedy_generation_matches_cpu() {
    for (dev, label) in emu_devices() {
        check_generation(&dev, &label);
    }
}

#[test]
fn cuda_bf16_greedy_generation_matches_cpu() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        check_generation(&dev, "cuda bf16");
    }
}

// ---- the critic (pooling, head, MSE in f32)

/// The critic's per-sample mse and every gradient, with `pooling` (k 1, A 16, max_len 12).
fn critic_pass<D: Device>(dev: &D, pooling: PoolMode) -> (Vec<f32>, Vec<f32>, ParamTable) {
    let a = 16;
    let spec = CriticSpec {
        k: 1,
        a,
        pooling,
        max_len: 12,
    };
    let mut critic = Critic::from_model(dev, &model(dev), spec, 5).unwrap();
    let (b, t) = (3, 12);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 96) as u32).collect();
    let lens = [12, 7, 3];
    let mask: Vec<f32> = (0..b * t)
        .map(|i| f32::from(u8::from(i % t < lens[i / t])))
        .collect();
    let target: Vec<f32> = (0..b * a).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let batch = critic.batch(dev, b, t, &ids, &mask, &target, None).unwrap();
    let mut ws = critic.acts(dev, b, t).unwrap();
    critic.zero_grads(dev).unwrap();
    let out = critic
        .forward(dev, &mut ws, &batch, Some((a as f32).sqrt()))
        .unwrap();
    critic.backward(dev, &mut ws, &batch, b as f32).unwrap();
    let grads = dev.download(View::all(&critic.model.grads)).unwrap();
    (out.mse, grads, critic.table)
}

/// The critic in bf16 against the CPU: per-sample mse within LOSS_REL x 10 (the pooled state
/// is bf16, the head's output and the MSE f32; measured 1.7e-3) and every gradient
/// within GRAD_REL_L2.
fn check_critic<D: Device>(dev: &D, label: &str) {
    for pooling in [PoolMode::Last, PoolMode::Weighted] {
        let (want_mse, want_grads, table) = critic_pass(&CpuDevice::new(), pooling);
        let (mse, grads, _) = critic_pass(dev, pooling);
        let e = max_rel_err(&mse, &want_mse);
        let mut worst = (0f64, String::new());
        for entry in &table.entries {
            let r = entry.offset..entry.offset + entry.len;
            let (g, w) = (&grads[r.clone()], &want_grads[r]);
            if w.iter().all(|&x| x == 0.0) {
                // blocks past k: no gradient on either device
                assert!(g.iter().all(|&x| x == 0.0), "{label}: {}", entry.name);
                continue;
            }
            let err = rel_l2(g, w);
            assert!(
                err < GRAD_REL_L2,
                "{label} {pooling:?}: grad {} rel L2 err {err:.2e}",
                entry.name
            );
            if err > worst.0 {
                worst = (err, entry.name.clone());
            }
        }
        eprintln!(
            "{label} {pooling:?}: mse max rel err {e:.2e}, worst gradient {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(
            e < 10.0 * LOSS_REL,
            "{label} {pooling:?}: mse {mse:?} vs {want_mse:?}"
        );
    }
}

#[test]
fn bf16_critic_matches_cpu() {
    for (dev, label) in emu_devices() {
        check_critic(&dev, &label);
    }
}

#[test]
fn cuda_bf16_critic_matches_cpu() {
    if let Some(dev) = gpu(Dtype::Bf16) {
        check_critic(&dev, "cuda bf16");
    }
}
