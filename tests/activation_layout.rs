//! A pass's activation set in one allocation (model/activations.rs): its buffers share memory
//! where their lifetimes, in phases of the pass, do not meet. These tests check that the
//! lifetimes are the pass's own: a set whose buffers share memory computes exactly what a set
//! of separate buffers computes, on the emulated GPU device (whose shared buffers are one host
//! allocation, as on a GPU), and a lifetime that misses a use is caught that way. Also: the
//! kernel devices refuse an op whose output overlaps another of its buffers (`cuda_*`: on a
//! GPU; skipped without one).
//!
//! Model: the `gqa_untied` fixture (2 layers, C 48, FFN 112, vocab 96; B 2, T 12), under each
//! memory option (whole logits or chunks of 20 or 90, block recompute or not).

mod common;

use common::parity::{model, rows};
use common::rel_l2;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::EmuDevice;
use nla_engine::device::{Device, Dtype, InjectMode, Part, View, ViewMut};
use nla_engine::model::{
    backward_with, forward_with, phase, ActivationSet, Batch, DeviceBatch, Injection, Life,
    MemoryOptions, Recompute,
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

/// A second batch of the fixture's shape (B 2, T 12), other tokens.
fn rows2() -> Vec<Vec<u32>> {
    rows()
        .into_iter()
        .map(|r| r.into_iter().rev().map(|x| (x * 7 + 3) % 96).collect())
        .collect()
}

/// What a pass leaves: logits and losses after forward, the loss, every gradient and the
/// injection's gradient after backward.
#[derive(Debug, PartialEq)]
struct Run {
    logits: Vec<f32>,
    losses: Vec<f32>,
    loss: f64,
    grads: Vec<f32>,
    dvecs: Vec<f32>,
}

/// Passes over `batches` on one set made with lifetimes `life(name, planned)`, each with
/// vectors added to the residual stream at 3 sites after the embedding and after each block, a
/// logit scale of 0.8 and, when `weighted`, signed per-position weights in place of the mask
/// (as the RL step's backward takes): the last pass's results.
fn passes(
    dev: &EmuDevice,
    opts: MemoryOptions,
    life: &dyn Fn(&str, Life) -> Life,
    batches: &[Vec<Vec<u32>>],
    weighted: bool,
) -> nla_engine::Result<Run> {
    let mut model = model(dev);
    let c = model.cfg.hidden_size;
    let first = Batch::causal_lm(&batches[0])?;
    let mut acts = ActivationSet::with_lifetimes(dev, &model.cfg, first.b, first.t, opts, life)?;
    let mut last = None;
    for rows in batches {
        let batch = Batch::causal_lm(rows)?;
        let db = batch.upload(dev)?;
        let sites = [1u32, 5, 14];
        let vecs: Vec<f32> = (0..sites.len() * c)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut inj = Injection::new(dev, vec![0, 1, 2], InjectMode::Add, &sites, &vecs, c)?;
        acts.logit_scale = 0.8;
        let loss = forward_with(dev, &model, &mut acts, &db, Some(&inj))?;
        let logits = dev.download(View::all(&acts.logits))?;
        let losses = dev.download(View::all(&acts.losses))?;
        let db = if weighted {
            let mask = dev.download(View::all(&db.mask))?;
            let w: Vec<f32> = mask
                .iter()
                .enumerate()
                .map(|(i, m)| m * (i as f32).cos())
                .collect();
            DeviceBatch {
                mask: dev.upload(&w)?,
                ..db
            }
        } else {
            db
        };
        model.zero_grads(dev)?;
        backward_with(
            dev,
            &mut model,
            &mut acts,
            &db,
            (1.0 / loss.count) as f32,
            Some(&mut inj),
        )?;
        // the losses live to the end of the pass
        if dev.download(View::all(&acts.losses))? != losses {
            return Err(nla_engine::Error::invalid(
                "test",
                "backward changed the losses",
            ));
        }
        last = Some(Run {
            logits,
            losses,
            loss: loss.mean(),
            grads: model.grads_to_host(dev)?,
            dvecs: dev.download(View::all(&inj.dvecs))?,
        });
    }
    Ok(last.expect("at least one batch"))
}

/// No sharing: every buffer lives through the whole pass.
fn whole(_: &str, _: Life) -> Life {
    phase::ALL
}

/// The planned lifetimes.
fn planned(_: &str, life: Life) -> Life {
    life
}

/// The names of the buffers of the set for `opts` on a device of working dtype `work` that
/// share memory with `name`.
fn sharing(
    opts: MemoryOptions,
    life: &dyn Fn(&str, Life) -> Life,
    name: &str,
    work: Dtype,
) -> Vec<String> {
    let cfg = model(&EmuDevice::new(EmuMode::Forward, 0)).cfg;
    let mut set = ActivationSet::plan_with(&cfg, 2, 12, opts);
    for d in &mut set.layout.decls {
        d.life = life(&d.name, d.life);
    }
    let (_, parts) = set.layout.plan(work).unwrap();
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
    // three passes on one shared set (other tokens in the second: nothing is read across
    // passes, nothing relies on zeroed memory) against one pass on separate buffers
    let batches = [rows(), rows2(), rows()];
    let runs = [
        (EmuMode::Forward, 0, Dtype::F32, [false, true]),
        (EmuMode::Forward, 0, Dtype::Bf16, [false, true]),
        (EmuMode::Reversed, 7, Dtype::F32, [false, false]),
    ];
    for (mode, seed, dtype, weights) in runs {
        let dev = EmuDevice::new(mode, seed).with_work_dtype(dtype).unwrap();
        for opts in options() {
            // the logits share memory with the blocks' gradient scratch (and, with
            // recompute, with the block's activations), or nothing is checked here
            let shared = sharing(opts, &planned, "logits", dtype);
            let ok = |n: &String| match opts.recompute {
                Recompute::None => n.starts_with('d'),
                Recompute::Block => n.starts_with("layers.0.") || n.starts_with('d'),
            };
            assert!(shared.iter().any(ok), "{opts:?}: {shared:?}");
            for weighted in weights {
                let label = format!("{mode:?} {dtype} {opts:?} weighted {weighted}");
                let a = passes(&dev, opts, &planned, &batches, weighted).unwrap();
                let b = passes(&dev, opts, &whole, &batches[2..], weighted).unwrap();
                assert!(a.grads.iter().all(|g| g.is_finite()), "{label}");
                if mode == EmuMode::Forward {
                    // the same launches in the same order: the same bits
                    assert!(a == b, "{label}");
                } else {
                    // blocks in another order each run: atomics sum in another order
                    let e = rel_l2(&a.grads, &b.grads);
                    assert!(e < 1e-5, "{label}: grads rel L2 {e:.2e}");
                    assert!((a.loss - b.loss).abs() < 1e-6 * b.loss, "{label}");
                }
            }
        }
    }
}

#[test]
fn a_lifetime_that_misses_a_use_is_caught() {
    // with recompute the block's activations are read again in the blocks' backward: declared
    // to end with the forward, they share memory with the backward's gradient scratch, which
    // overwrites them before they are read (or is refused where one op gets both)
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
    let over = sharing(opts, &wrong, "layers.0.gu", Dtype::F32);
    assert!(over.contains(&"dgu".to_string()), "{over:?}");
    let dev = EmuDevice::new(EmuMode::Forward, 0);
    let good = passes(&dev, opts, &planned, &[rows()], false).unwrap();
    match passes(&dev, opts, &wrong, &[rows()], false) {
        Err(e) => {
            let e = e.to_string();
            eprintln!("refused: {e}");
            assert!(
                e.contains("overlaps") || e.contains("changed the losses"),
                "{e}"
            );
        }
        Ok(bad) => {
            let e = rel_l2(&bad.grads, &good.grads);
            eprintln!("gradients with the missed use: rel L2 {e:.2e} (NaN: not finite)");
            assert!(
                e.is_nan() || e > 1e-2,
                "gradients rel L2 {e:.2e}: the missed use went unseen"
            );
        }
    }
}

/// Three parts of one allocation on `dev`: p0 [0, 64), p1 [32, 96) (overlapping p0), p2
/// [128, 192), f32 elements.
fn three_parts<D: Device>(dev: &D) -> Vec<D::Buf> {
    let part = |at: usize| Part {
        offset: at * 4,
        len: 64,
        dtype: Dtype::F32,
    };
    dev.alloc_shared(192 * 4, &[part(0), part(32), part(128)])
        .unwrap()
}

/// Ops whose output overlaps another of their buffers are refused (a kernel launch, a matmul,
/// matmul_add, a copy); parts that do not overlap work, and writing one part changes what an overlapping
/// part reads.
fn check_overlapping_parts<D: Device>(dev: &D) {
    let mut p = three_parts(dev);
    let (x, y): (Vec<f32>, Vec<f32>) = ((0..64).map(|i| i as f32).collect(), vec![0.5; 64]);
    let [p0, p1, p2] = &mut p[..] else {
        unreachable!()
    };
    dev.write(ViewMut::all(p1), &x).unwrap();
    dev.write(ViewMut::all(p2), &y).unwrap();
    // p0's second half is p1's first half
    let got = dev.download(View::all(p0)).unwrap();
    assert_eq!(&got[32..], &x[..32]);
    let e = dev
        .residual_fwd(ViewMut::all(p0), View::all(p1), View::all(p2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlaps"), "{e}");
    let e = dev
        .matmul(
            ViewMut::all(p0),
            View::all(p1),
            View::all(p2),
            8,
            8,
            8,
            false,
            false,
            1.0,
            0.0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("shares memory"), "{e}");
    let e = dev
        .copy(ViewMut::all(p0), View::all(p1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("share memory"), "{e}");
    // p2 = p1 + p2 is fine: p2 does not overlap p1
    let mut out = dev.alloc(64).unwrap();
    dev.residual_fwd(ViewMut::all(&mut out), View::all(p1), View::all(p2))
        .unwrap();
    let want: Vec<f32> = x.iter().map(|v| v + 0.5).collect();
    assert_eq!(dev.download(View::all(&out)).unwrap(), want);
    dev.residual_fwd(ViewMut::all(p0), View::all(p2), View::all(&out))
        .unwrap();
    // p0 [0, 64) written: p1's first half changed with it
    let p1_now = dev.download(View::all(p1)).unwrap();
    let want0: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
    assert_eq!(&p1_now[..32], &want0[32..]);
    // matmul_add: d must not overlap its addend x either; over p2 (apart from p0) it works
    let (a, b) = (dev.upload(&y).unwrap(), dev.upload(&y).unwrap());
    let add = |d: ViewMut<'_, D::Buf>, x: View<'_, D::Buf>| {
        let (a, b) = (View::all(&a), View::all(&b));
        dev.matmul_add(d, x, a, b, 8, 8, 8, false, false)
    };
    let e = add(ViewMut::all(p0), View::all(p1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("shares memory with x"), "{e}");
    add(ViewMut::all(p0), View::all(p2)).unwrap();
    // 8 products of 0.5 * 0.5, plus p2's 0.5
    assert_eq!(dev.download(View::all(p0)).unwrap(), vec![2.5; 64]);
}

#[test]
fn kernel_devices_refuse_ops_on_overlapping_parts() {
    check_overlapping_parts(&EmuDevice::new(EmuMode::Forward, 0));
    // the CPU makes each part its own buffer: nothing overlaps, every op runs
    let cpu = CpuDevice::new();
    let mut p = three_parts(&cpu);
    let [p0, p1, p2] = &mut p[..] else {
        unreachable!()
    };
    cpu.residual_fwd(ViewMut::all(p0), View::all(p1), View::all(p2))
        .unwrap();
}

#[test]
fn parts_outside_their_allocation_are_refused() {
    let f32_at = |offset: usize, len: usize| Part {
        offset,
        len,
        dtype: Dtype::F32,
    };
    let emu = EmuDevice::new(EmuMode::Forward, 0);
    let cpu = CpuDevice::new();
    let cases = [
        (vec![f32_at(0, 64), f32_at(200, 16)], "does not fit"), // 200 + 64 bytes > 256
        (vec![f32_at(2, 8)], "does not fit"),                   // not 4-byte aligned
        (vec![f32_at(usize::MAX - 3, 2)], "does not fit"),      // past the address space
    ];
    for (parts, want) in &cases {
        for e in [
            emu.alloc_shared(256, parts).unwrap_err(),
            cpu.alloc_shared(256, parts).unwrap_err(),
        ] {
            assert!(e.to_string().contains(want), "{parts:?}: {e}");
        }
    }
    // the kernels store f32 or bf16 only
    let u8_part = [Part {
        offset: 0,
        len: 4,
        dtype: Dtype::U8,
    }];
    let e = emu.alloc_shared(256, &u8_part).unwrap_err().to_string();
    assert!(e.contains("f32 or bf16"), "{e}");
    // the emulated device's shared memory reads NaN until written
    let mut p = emu.alloc_shared(256, &[f32_at(0, 64)]).unwrap();
    assert!(emu
        .download(View::all(&p[0]))
        .unwrap()
        .iter()
        .all(|x| x.is_nan()));
    emu.fill(ViewMut::all(&mut p[0]), 2.0).unwrap();
    assert_eq!(emu.download(View::all(&p[0])).unwrap(), vec![2.0; 64]);
}

#[test]
fn cuda_refuses_ops_on_overlapping_parts() {
    if let Some(dev) = common::parity::gpu(Dtype::F32) {
        check_overlapping_parts(&dev);
    }
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
        // buffers that share memory never live in one phase
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let (_, parts) = set.layout.plan(dtype).unwrap();
            let decls = &set.layout.decls;
            for (i, (d, p)) in decls.iter().zip(&parts).enumerate() {
                for (e, q) in decls.iter().zip(&parts).skip(i + 1) {
                    let meet = d.life.0 <= e.life.1 && e.life.0 <= d.life.1;
                    assert!(
                        !(meet && p.overlaps(q)),
                        "{dtype} {opts:?}: {} {}",
                        d.name,
                        e.name
                    );
                }
            }
        }
    }
}
