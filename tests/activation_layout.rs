//! A pass's activation set in one allocation (model/activations.rs): its buffers share memory
//! where their lifetimes, in phases of the pass, do not meet. These tests check that the
//! lifetimes are the pass's own: a set whose buffers share memory computes exactly what a set
//! of separate buffers computes, on the emulated GPU device (whose shared buffers are one host
//! allocation, as on a GPU), and a lifetime that misses a use is caught that way.
//!
//! Model: the `gqa_untied` fixture (2 layers, C 48, FFN 112, vocab 96; B 2, T 12), under each
//! memory option (whole logits or chunks of 20 or 90, block recompute or not).

mod common;

use common::parity::{model, rows};
use common::rel_l2;
use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::EmuDevice;
use nla_engine::device::{Device, Dtype, View};
use nla_engine::model::{
    backward, forward, phase, ActivationSet, Batch, Life, MemoryOptions, Recompute,
};

/// Every combination of the memory options (two chunk sizes: the planner places buffers by
/// size, so the logits land on other buffers).
fn options() -> Vec<MemoryOptions> {
    let mut v = vec![];
    for logits_chunk in [None, Some(20), Some(90)] {
        for recompute in [Recompute::None, Recompute::Block] {
            v.push(MemoryOptions {
                logits_chunk,
                recompute,
            });
        }
    }
    v
}

/// Logits after forward, loss, and every gradient after backward, with the set made with
/// lifetimes `life(name, planned)`.
fn pass(dev: &EmuDevice, opts: MemoryOptions, life: &dyn Fn(&str, Life) -> Life) -> Run {
    let mut model = model(dev);
    let batch = Batch::causal_lm(&rows()).unwrap();
    let mut acts =
        ActivationSet::with_lifetimes(dev, &model.cfg, batch.b, batch.t, opts, life).unwrap();
    let db = batch.upload(dev).unwrap();
    let loss = forward(dev, &model, &mut acts, &db).unwrap();
    let logits = dev.download(View::all(&acts.logits)).unwrap();
    model.zero_grads(dev).unwrap();
    backward(dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32).unwrap();
    Run {
        logits,
        loss: loss.mean(),
        grads: model.grads_to_host(dev).unwrap(),
    }
}

#[derive(Debug, PartialEq)]
struct Run {
    logits: Vec<f32>,
    loss: f64,
    grads: Vec<f32>,
}

/// No sharing: every buffer lives through the whole pass.
fn whole(_: &str, _: Life) -> Life {
    phase::ALL
}

/// The planned lifetimes.
fn planned(_: &str, life: Life) -> Life {
    life
}

/// The names of the buffers of the set for `opts` that share memory with `name`.
fn sharing(opts: MemoryOptions, life: &dyn Fn(&str, Life) -> Life, name: &str) -> Vec<String> {
    let cfg = model(&EmuDevice::new(EmuMode::Forward, 0)).cfg;
    let mut set = ActivationSet::plan_with(&cfg, 2, 12, opts);
    for d in &mut set.layout.decls {
        d.life = life(&d.name, d.life);
    }
    let (_, parts) = set.layout.plan(Dtype::F32).unwrap();
    let decls = &set.layout.decls;
    let i = decls.iter().position(|d| d.name == name).unwrap();
    decls
        .iter()
        .zip(&parts)
        .filter(|(d, p)| d.name != name && p.overlaps(&parts[i]))
        .map(|(d, _)| d.name.clone())
        .collect()
}

#[test]
fn a_shared_set_computes_what_separate_buffers_do() {
    for (mode, seed) in [(EmuMode::Forward, 0), (EmuMode::Reversed, 7)] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let dev = EmuDevice::new(mode, seed).with_work_dtype(dtype).unwrap();
            for opts in options() {
                // the logits share memory with the blocks' gradient scratch (and, with
                // recompute, with the block's activations), or nothing is checked here
                let shared = sharing(opts, &planned, "logits");
                let ok = |n: &String| match opts.recompute {
                    Recompute::None => n.starts_with('d'),
                    Recompute::Block => n.starts_with("layers.0.") || n.starts_with('d'),
                };
                assert!(shared.iter().any(ok), "{opts:?}: {shared:?}");
                let a = pass(&dev, opts, &planned);
                let b = pass(&dev, opts, &whole);
                assert!(a.grads.iter().all(|g| g.is_finite()), "{opts:?}");
                if mode == EmuMode::Forward {
                    // the same launches in the same order: the same bits
                    assert_eq!(a, b, "{mode:?} {dtype} {opts:?}");
                } else {
                    // blocks in another order each run: atomics sum in another order
                    let e = rel_l2(&a.grads, &b.grads);
                    assert!(e < 1e-5, "{mode:?} {dtype} {opts:?}: grads rel L2 {e:.2e}");
                    assert!((a.loss - b.loss).abs() < 1e-6 * b.loss, "{opts:?}");
                }
            }
        }
    }
}

#[test]
fn a_lifetime_that_misses_a_use_is_caught() {
    // with recompute the block's activations are read again in the blocks' backward: declared
    // to end with the forward, they share memory with the backward's gradient scratch, which
    // overwrites them before they are read
    let opts = MemoryOptions {
        logits_chunk: Some(20),
        recompute: Recompute::Block,
    };
    let wrong = |name: &str, life: Life| {
        if name.starts_with("layers.") {
            (phase::FWD, phase::FWD)
        } else {
            life
        }
    };
    let over = sharing(opts, &wrong, "layers.0.gate");
    assert!(over.contains(&"dh".to_string()), "{over:?}");
    let dev = EmuDevice::new(EmuMode::Forward, 0);
    let good = pass(&dev, opts, &planned);
    let bad = pass(&dev, opts, &wrong);
    // the forward is right (nothing shared is live in it); the gradients are not
    assert_eq!(good.loss, bad.loss);
    let e = rel_l2(&bad.grads, &good.grads);
    eprintln!("gradients with the missed use: rel L2 {e:.2e} (NaN: not finite)");
    assert!(
        e.is_nan() || e > 1e-2,
        "gradients rel L2 {e:.2e}: the missed use went unseen"
    );
}

#[test]
fn sharing_makes_the_set_smaller() {
    // bytes of the shared allocation against separate buffers, in f32: the logits take the
    // place of the gradient scratch (and of the block's activations with recompute)
    let cfg = model(&EmuDevice::new(EmuMode::Forward, 0)).cfg;
    for opts in options() {
        let set = ActivationSet::plan_with(&cfg, 2, 12, opts);
        let (shared, unshared) = (
            set.bytes(Dtype::F32).unwrap(),
            set.bytes_unshared(Dtype::F32),
        );
        eprintln!("{opts:?}: {shared} bytes shared, {unshared} separate");
        assert!(shared < unshared, "{opts:?}");
        // never below the largest number of bytes live in one phase
        let live = (phase::ALL.0..=phase::ALL.1)
            .map(|p| {
                set.layout
                    .decls
                    .iter()
                    .filter(|d| d.life.0 <= p && p <= d.life.1)
                    .map(|d| d.len * 4)
                    .sum::<usize>()
            })
            .max()
            .unwrap();
        assert!(shared >= live, "{opts:?}: {shared} < {live} live");
    }
}
