//! Whole-model checks: our forward and backward against transformers (float64 reference,
//! fixtures from tests/reference/make_fixtures.py), the CLI's `forward --dump`, gradient
//! accumulation, save/load, and a small model overfitting a batch with AdamW.

mod common;

use std::path::Path;
use std::process::Command;

use common::parity::max_rel_err;
use common::{fixtures_dir, load_tensors, rel_l2};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, View};
use nla_engine::model::{
    backward, forward, ActivationSet, Batch, MemoryOptions, Model, ModelConfig, Recompute,
};
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule, ScheduleKind};

const MODELS: &[&str] = &["gqa_untied", "mqa_tied"];

fn model_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("models").join(name)
}

fn read_rows(path: &Path) -> Vec<Vec<u32>> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

// The reference is transformers in float64. Our f32 pass differs from it by f32 rounding
// accumulated over a few layers: measured 6e-7 of the largest logit, 2e-8 relative on the loss
// and at most 9.4e-7 relative L2 on any gradient. The bounds are ~10x those figures: ten times
// tighter than the engine's promise (1e-4), and far below what a real bug does (a wrong op
// moves logits by > 1e-3 relative).
const LOGIT_MAX_REL: f64 = 1e-5;
const LOSS_REL: f64 = 1e-6;
const GRAD_REL_L2: f64 = 1e-5;

#[test]
fn model_matches_transformers_logits_loss_and_grads() {
    let dev = CpuDevice::new();
    for name in MODELS {
        let dir = model_dir(name);
        let want = load_tensors(&dir.join("expected.safetensors"));
        let mut model = Model::load(&dev, &dir).unwrap();
        let rows = read_rows(&dir.join("ids.json"));
        let batch = Batch::causal_lm(&rows).unwrap();
        let mut acts = ActivationSet::new(&dev, &model.cfg, batch.b, batch.t).unwrap();
        let db = batch.upload(&dev).unwrap();
        let loss = forward(&dev, &model, &mut acts, &db).unwrap();
        let logits = dev.download(View::all(&acts.logits)).unwrap();
        let e = max_rel_err(&logits, &want["logits"].data);
        println!("{name}: logits max rel err {e:.2e}");
        assert!(e < LOGIT_MAX_REL, "{name}: logits max rel err {e:.2e}");
        let want_loss = want["loss"].data[0] as f64;
        let le = (loss.mean() - want_loss).abs() / want_loss;
        println!(
            "{name}: loss {} vs {want_loss}, rel err {le:.2e}",
            loss.mean()
        );
        assert!(le < LOSS_REL, "{name}: loss {} vs {want_loss}", loss.mean());

        model.zero_grads(&dev).unwrap();
        backward(&dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32).unwrap();
        let grads = model.grads_to_host(&dev).unwrap();
        let (mut checked, mut worst) = (0, 0f64);
        for entry in &model.table.entries {
            let w = &want[&format!("grad.{}", entry.name)];
            assert_eq!(w.shape, entry.shape, "{name}: {}", entry.name);
            let got = &grads[entry.offset..entry.offset + entry.len];
            let r = rel_l2(got, &w.data);
            assert!(
                r < GRAD_REL_L2,
                "{name}: grad {} rel L2 err {r:.2e}",
                entry.name
            );
            worst = worst.max(r);
            checked += 1;
        }
        println!("{name}: worst gradient rel L2 err {worst:.2e} over {checked} parameters");
        let n_grads = want.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            checked, n_grads,
            "{name}: every fixture gradient is a parameter of ours"
        );
    }
}

/// The memory options (`ActivationSet::with_options`): the LM head and cross-entropy over
/// vocabulary chunks, and block recompute, alone and together: the same loss and gradients
/// against transformers, with the same bounds, for chunks that divide V, leave a short last
/// chunk, or are a single column, tied and untied heads.
#[test]
fn memory_options_match_transformers_loss_and_grads() {
    let dev = CpuDevice::new();
    for name in MODELS {
        let dir = model_dir(name);
        let want = load_tensors(&dir.join("expected.safetensors"));
        let mut model = Model::load(&dev, &dir).unwrap();
        let v = model.cfg.vocab_size;
        let rows = read_rows(&dir.join("ids.json"));
        let batch = Batch::causal_lm(&rows).unwrap();
        let db = batch.upload(&dev).unwrap();
        let block = Recompute::Block;
        let cases = [
            (None, block),
            (Some(v / 4), Recompute::None),
            (Some(7), block),
            (Some(1), Recompute::None),
            (Some(v - 1), block),
        ];
        for (logits_chunk, recompute) in cases {
            let opts = MemoryOptions {
                logits_chunk,
                recompute,
            };
            let mut acts =
                ActivationSet::with_options(&dev, &model.cfg, batch.b, batch.t, opts).unwrap();
            assert_eq!(acts.logits_chunk, logits_chunk.unwrap_or(v));
            let kept = if recompute == block {
                1
            } else {
                model.cfg.num_hidden_layers
            };
            assert_eq!(acts.layers.len(), kept);
            let chunk = format!("{opts:?}");
            let loss = forward(&dev, &model, &mut acts, &db).unwrap();
            let want_loss = want["loss"].data[0] as f64;
            let le = (loss.mean() - want_loss).abs() / want_loss;
            assert!(le < LOSS_REL, "{name} chunk {chunk}: loss rel err {le:.2e}");
            model.zero_grads(&dev).unwrap();
            backward(&dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32).unwrap();
            let grads = model.grads_to_host(&dev).unwrap();
            let mut worst = 0f64;
            for entry in &model.table.entries {
                let w = &want[&format!("grad.{}", entry.name)];
                let r = rel_l2(&grads[entry.offset..entry.offset + entry.len], &w.data);
                assert!(
                    r < GRAD_REL_L2,
                    "{name} chunk {chunk}: grad {} rel L2 err {r:.2e}",
                    entry.name
                );
                worst = worst.max(r);
            }
            println!("{name} chunk {chunk}: loss rel err {le:.2e}, worst grad rel L2 {worst:.2e}");
        }
    }
}

/// A frozen model (a reference, an inference command) keeps no gradients: its forward gives
/// the same loss, and backward is an error instead of a write past the freed buffer.
#[test]
fn a_frozen_model_runs_forward_only() {
    let dev = CpuDevice::new();
    let dir = model_dir(MODELS[0]);
    let mut model = Model::load(&dev, &dir).unwrap();
    let batch = Batch::causal_lm(&read_rows(&dir.join("ids.json"))).unwrap();
    let db = batch.upload(&dev).unwrap();
    let mut acts = ActivationSet::new(&dev, &model.cfg, batch.b, batch.t).unwrap();
    let before = forward(&dev, &model, &mut acts, &db).unwrap().mean();
    model.freeze(&dev).unwrap();
    assert!(model.is_frozen());
    assert_eq!(model.grads.len(), 0);
    let after = forward(&dev, &model, &mut acts, &db).unwrap().mean();
    assert_eq!(before, after);
    let e = backward(&dev, &mut model, &mut acts, &db, 1.0).unwrap_err();
    assert!(e.to_string().contains("frozen"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_the_same_weights() {
    let dev = CpuDevice::new();
    let a = Model::load(&dev, &model_dir("gqa_untied")).unwrap();
    let b = Model::load(&dev, &model_dir("gqa_untied_sharded")).unwrap();
    assert_eq!(
        a.params_to_host(&dev).unwrap(),
        b.params_to_host(&dev).unwrap()
    );
}

#[test]
fn cli_forward_dump_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let dir = model_dir(name);
        let dump = tmp.path().join(format!("{name}.safetensors"));
        let out = Command::new(env!("CARGO_BIN_EXE_nla-engine"))
            .args(["forward", "--model"])
            .arg(&dir)
            .arg("--ids")
            .arg(dir.join("ids.json"))
            .arg("--dump")
            .arg(&dump)
            .arg("--grads")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = load_tensors(&dump);
        let want = load_tensors(&dir.join("expected.safetensors"));
        assert_eq!(got["logits"].shape, want["logits"].shape);
        assert!(got["loss"].shape.is_empty());
        assert!(max_rel_err(&got["logits"].data, &want["logits"].data) < LOGIT_MAX_REL);
        let (gl, wl) = (got["loss"].data[0], want["loss"].data[0]);
        assert!(
            ((gl - wl) / wl).abs() < LOSS_REL as f32,
            "{name}: loss {gl} vs {wl}"
        );
        let mut n = 0;
        for (k, w) in want.iter().filter(|(k, _)| k.starts_with("grad.")) {
            let g = &got[k];
            assert_eq!(g.shape, w.shape, "{k}");
            assert!(rel_l2(&g.data, &w.data) < GRAD_REL_L2, "{name}: {k}");
            n += 1;
        }
        assert_eq!(n, got.keys().filter(|k| k.starts_with("grad.")).count());
    }
}

/// Runs the CLI expecting failure; returns stderr, checked to be one clear line, no panic.
fn cli_error(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nla-engine"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn cli_reports_bad_model_files_in_one_line() {
    let src = model_dir("gqa_untied");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let ids = src.join("ids.json");
    let dump = tmp.path().join("out.safetensors");
    let args = |d: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "forward".into(),
            "--model".into(),
            d.into(),
            "--ids".into(),
            ids.clone().into(),
            "--dump".into(),
            dump.clone().into(),
        ]
    };
    let run = |d: &Path| {
        let a = args(d);
        cli_error(&a.iter().map(|s| s.as_os_str()).collect::<Vec<_>>())
    };

    // missing weights
    let e = run(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    // truncated weights
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = run(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    // wrong shape: a config whose hidden size disagrees with the weights
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = run(&dir);
    assert!(
        e.contains(".mlp.") && e.contains("shape") && e.contains("112"),
        "{e}"
    );

    // missing tensor: one more layer than the file has
    cfg["intermediate_size"] = 112.into();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = run(&dir);
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );

    // unknown architecture
    cfg["num_hidden_layers"] = 2.into();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = run(&dir);
    assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");

    // ids outside the vocabulary
    cfg["model_type"] = "llama".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bad_ids = tmp.path().join("ids.json");
    std::fs::write(&bad_ids, "[[1, 2, 500]]").unwrap();
    let a: Vec<std::ffi::OsString> = vec![
        "forward".into(),
        "--model".into(),
        dir.clone().into(),
        "--ids".into(),
        bad_ids.clone().into(),
        "--dump".into(),
        dump.clone().into(),
    ];
    let e = cli_error(&a.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    assert!(e.contains("500") && e.contains("vocabulary"), "{e}");
    assert!(!dump.exists(), "nothing written on error");
}

fn tiny_config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    ModelConfig::from_json(&json, Path::new("tiny")).unwrap()
}

fn random_rows(b: usize, t: usize, v: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed;
    (0..b)
        .map(|_| {
            (0..t)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % v as u64) as u32
                })
                .collect()
        })
        .collect()
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let dev = CpuDevice::new();
    let rows = random_rows(4, 9, 64, 7);
    let grads_of = |parts: Vec<Vec<Vec<u32>>>| {
        let mut model = Model::init_random(&dev, tiny_config(), 3, 0.1).unwrap();
        let batches: Vec<Batch> = parts.iter().map(|p| Batch::causal_lm(p).unwrap()).collect();
        let total: f64 = batches.iter().map(Batch::count).sum();
        let mut loss = 0.0;
        for b in &batches {
            let mut acts = ActivationSet::new(&dev, &model.cfg, b.b, b.t).unwrap();
            let db = b.upload(&dev).unwrap();
            loss += forward(&dev, &model, &mut acts, &db).unwrap().sum;
            backward(&dev, &mut model, &mut acts, &db, (1.0 / total) as f32).unwrap();
        }
        (loss / total, model.grads_to_host(&dev).unwrap())
    };
    let (l1, g1) = grads_of(vec![rows.clone()]);
    let (l2, g2) = grads_of(vec![rows[..1].to_vec(), rows[1..].to_vec()]);
    // same sums in a different order: f32 rounding only
    assert!((l1 - l2).abs() < 1e-6 * l1.abs(), "{l1} vs {l2}");
    let r = rel_l2(&g2, &g1);
    assert!(r < 1e-5, "rel L2 {r:.2e}");
    assert!(g1.iter().any(|&x| x != 0.0));
}

#[test]
fn save_then_load_round_trips() {
    let dev = CpuDevice::new();
    let model = Model::init_random(&dev, tiny_config(), 11, 0.05).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save(&dev, tmp.path()).unwrap();
    let back = Model::load(&dev, tmp.path()).unwrap();
    assert_eq!(back.cfg, model.cfg);
    assert_eq!(
        back.params_to_host(&dev).unwrap(),
        model.params_to_host(&dev).unwrap()
    );
}

#[test]
fn adamw_overfits_a_small_batch() {
    let dev = CpuDevice::new();
    let model = Model::init_random(&dev, tiny_config(), 5, 0.05).unwrap();
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 10,
        total_steps: 200,
    };
    let mut trainer = LmTrainer::new(&dev, model, AdamwConfig::default(), schedule, 1.0).unwrap();
    let batch = Batch::causal_lm(&random_rows(4, 16, 64, 1)).unwrap();
    let first = trainer.step(&dev, std::slice::from_ref(&batch)).unwrap();
    // a fresh model with small weights predicts near-uniformly: loss ~ ln 64
    assert!(
        (first.loss - (64f64).ln()).abs() < 0.1,
        "first loss {}",
        first.loss
    );
    let mut last = first;
    for _ in 1..200 {
        last = trainer.step(&dev, std::slice::from_ref(&batch)).unwrap();
    }
    assert_eq!(last.step, 200);
    // 60 random tokens are memorised: the loss falls from 4.16 to near zero
    assert!(last.loss < 0.05, "loss after 200 steps {}", last.loss);
}

#[test]
fn injection_at_layer_0_matches_transformers_hook() {
    use nla_engine::device::InjectMode;
    use nla_engine::model::{backward_with, forward_with, Injection};
    let dev = CpuDevice::new();
    let dir = model_dir("inject_llama");
    let want = load_tensors(&dir.join("expected.safetensors"));
    let mut model = Model::load(&dev, &dir).unwrap();
    let (b, t) = (want["ids"].shape[0], want["ids"].shape[1]);
    let ids = want["ids"].ids();
    let rows: Vec<Vec<u32>> = ids.chunks(t).map(<[u32]>::to_vec).collect();
    let batch = Batch::causal_lm(&rows).unwrap();
    let sites = want["sites"].ids();
    let c = model.cfg.hidden_size;
    let mut inj = Injection::new(
        &dev,
        vec![0],
        InjectMode::Replace,
        &sites,
        &want["vecs"].data,
        c,
    )
    .unwrap();
    let mut acts = ActivationSet::new(&dev, &model.cfg, b, t).unwrap();
    let db = batch.upload(&dev).unwrap();
    let loss = forward_with(&dev, &model, &mut acts, &db, Some(&inj)).unwrap();
    let logits = dev.download(View::all(&acts.logits)).unwrap();
    let e = max_rel_err(&logits, &want["logits"].data);
    assert!(e < LOGIT_MAX_REL, "logits max rel err {e:.2e}");
    let wl = want["loss"].data[0] as f64;
    assert!(
        (loss.mean() - wl).abs() / wl < LOSS_REL,
        "loss {} vs {wl}",
        loss.mean()
    );
    backward_with(
        &dev,
        &mut model,
        &mut acts,
        &db,
        (1.0 / loss.count) as f32,
        Some(&mut inj),
    )
    .unwrap();
    let dvecs = dev.download(View::all(&inj.dvecs)).unwrap();
    let r = rel_l2(&dvecs, &want["grad.vecs"].data);
    assert!(r < GRAD_REL_L2, "grad.vecs rel L2 err {r:.2e}");
    let grads = model.grads_to_host(&dev).unwrap();
    let wte = model.table.get("model.embed_tokens.weight").unwrap();
    let r = rel_l2(
        &grads[wte.offset..wte.offset + wte.len],
        &want["grad.model.embed_tokens.weight"].data,
    );
    assert!(r < GRAD_REL_L2, "grad.embed_tokens rel L2 err {r:.2e}");
    // without the injection the logits differ: the test sees the vectors
    let plain = forward(&dev, &model, &mut acts, &db).unwrap();
    assert!((plain.mean() - wl).abs() / wl > 1e-3);
}

#[test]
fn injection_in_deeper_layers_has_consistent_gradients() {
    // d loss / d vecs by backward against central differences of the f32 forward, for
    // injection after block 0 and after both blocks at once (the gradients add), add mode
    use nla_engine::device::InjectMode;
    use nla_engine::model::{backward_with, forward_with, Injection};
    let dev = CpuDevice::new();
    let mut model = Model::init_random(&dev, tiny_config(), 9, 0.2).unwrap();
    let rows = random_rows(2, 6, 64, 3);
    let batch = Batch::causal_lm(&rows).unwrap();
    let db = batch.upload(&dev).unwrap();
    let c = model.cfg.hidden_size;
    let sites = [1u32, 8];
    let vecs: Vec<f32> = (0..2 * c)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
        .collect();
    for (layers, mode) in [
        (vec![1], InjectMode::Replace),
        (vec![1, 2], InjectMode::Add),
    ] {
        let mut acts = ActivationSet::new(&dev, &model.cfg, 2, 6).unwrap();
        let mut inj = Injection::new(&dev, layers.clone(), mode, &sites, &vecs, c).unwrap();
        let base = forward_with(&dev, &model, &mut acts, &db, Some(&inj))
            .unwrap()
            .mean();
        assert!(base.is_finite());
        model.zero_grads(&dev).unwrap();
        backward_with(
            &dev,
            &mut model,
            &mut acts,
            &db,
            (1.0 / batch.count()) as f32,
            Some(&mut inj),
        )
        .unwrap();
        let dvecs = dev.download(View::all(&inj.dvecs)).unwrap();
        let loss_at = |v: &[f32], acts: &mut nla_engine::model::Activations<CpuDevice>| {
            let inj = Injection::new(&dev, layers.clone(), mode, &sites, v, c).unwrap();
            forward_with(&dev, &model, acts, &db, Some(&inj))
                .unwrap()
                .mean()
        };
        // f32 central differences with h = 1e-2: truncation ~h^2, rounding ~1e-7/h
        for i in [0, 5, c + 3, 2 * c - 1] {
            let (mut up, mut dn) = (vecs.clone(), vecs.clone());
            up[i] += 1e-2;
            dn[i] -= 1e-2;
            let fd = (loss_at(&up, &mut acts) - loss_at(&dn, &mut acts)) / 2e-2;
            assert!(
                (fd - dvecs[i] as f64).abs() < 2e-3 + 2e-2 * fd.abs(),
                "{layers:?} [{i}]: fd {fd} vs {}",
                dvecs[i]
            );
        }
    }
}
