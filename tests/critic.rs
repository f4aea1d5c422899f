//! The NLA critic against PyTorch (float64 reference from
//! tests/reference/make_critic_fixtures.py), plus its init, training, save/load and errors.

mod common;

use std::path::PathBuf;

use common::{fixtures_dir, load_tensors, rel_l2, Tensor};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, PoolMode, View};
use nla_engine::model::Recompute;
use nla_engine::nla::{Critic, CriticSpec};
use nla_engine::train::{AdamW, AdamwConfig};

fn llama_dir() -> PathBuf {
    fixtures_dir().join("critic_llama")
}

fn spec(pooling: PoolMode, a: usize) -> CriticSpec {
    CriticSpec {
        k: 1,
        a,
        pooling,
        max_len: 10,
    }
}

/// Overwrites the window of `name` in the critic's flat parameters.
fn set_param(dev: &CpuDevice, critic: &mut Critic<CpuDevice>, name: &str, data: &[f32]) {
    let mut flat = dev.download(View::all(&critic.model.params)).unwrap();
    let e = critic
        .table
        .entries
        .iter()
        .find(|e| e.name == name)
        .unwrap();
    flat[e.offset..e.offset + e.len].copy_from_slice(data);
    critic.model.params = dev.upload(&flat).unwrap();
}

fn window<'a>(critic: &Critic<CpuDevice>, flat: &'a [f32], name: &str) -> &'a [f32] {
    let e = critic
        .table
        .entries
        .iter()
        .find(|e| e.name == name)
        .unwrap();
    &flat[e.offset..e.offset + e.len]
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

struct Case {
    name: &'static str,
    pooling: PoolMode,
    identity: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "last_random_scaled",
        pooling: PoolMode::Last,
        identity: false,
    },
    Case {
        name: "mean_identity_raw",
        pooling: PoolMode::Mean,
        identity: true,
    },
    Case {
        name: "weighted_random_scaled",
        pooling: PoolMode::Weighted,
        identity: false,
    },
];

// The reference is transformers in float64; our pass is f32 through two blocks, pooling, the
// head and the rescale. Measured over the three cases: pred max 2.4e-7 relative, loss 8.9e-8
// relative, gradients at most 6.8e-7 relative L2. The bounds are 7x or more above that and far
// below what a wrong op gives (> 1e-3).
const PRED_REL: f64 = 1e-5;
const LOSS_REL: f64 = 1e-5;
const GRAD_REL_L2: f64 = 5e-6;

#[test]
fn critic_matches_pytorch_pred_loss_and_grads() {
    let dev = CpuDevice::new();
    let fx = load_tensors(&fixtures_dir().join("critic.safetensors"));
    let (b, t) = (fx["mask"].shape[0], fx["mask"].shape[1]);
    let ids = fx["ids"].ids();
    let mut worst = (0f64, 0f64, 0f64);
    // every case with every block's activations kept, and with block recompute
    for (case, recompute) in CASES
        .iter()
        .flat_map(|c| [(c, Recompute::None), (c, Recompute::Block)])
    {
        let get = |k: &str| -> &Tensor { &fx[&format!("{}.{k}", case.name)] };
        let a = if case.identity { 32 } else { 24 };
        // no head file in the folder: a fresh head, the identity when A = C
        let mut critic = Critic::load(&dev, &llama_dir(), spec(case.pooling, a), 7).unwrap();
        if !case.identity {
            set_param(&dev, &mut critic, "value_head.weight", &fx["head"].data);
        }
        if case.pooling == PoolMode::Weighted {
            set_param(&dev, &mut critic, "pool.weight", &fx["pool_w"].data);
        }
        let target = if case.identity {
            &fx["target_c"]
        } else {
            &fx["target"]
        };
        let valid: Vec<bool> = get("valid").data.iter().map(|&v| v == 1.0).collect();
        let s = get("mse_scale").scalar();
        let mse_scale = (s > 0.0).then_some(s);
        let divisor = get("divisor").scalar();
        let batch = critic
            .batch(
                &dev,
                b,
                t,
                &ids,
                &fx["mask"].data,
                &target.data,
                Some(&valid),
            )
            .unwrap();
        let mut ws = critic.acts_with(&dev, b, t, recompute).unwrap();
        critic.zero_grads(&dev).unwrap();
        let out = critic.forward(&dev, &mut ws, &batch, mse_scale).unwrap();
        critic.backward(&dev, &mut ws, &batch, divisor).unwrap();

        let want_pred = &get("pred").data;
        let scale = want_pred.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
        let e_pred = out
            .pred
            .iter()
            .zip(want_pred)
            .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()))
            / scale;
        assert!(
            e_pred < PRED_REL,
            "{}: pred rel err {e_pred:.3e}",
            case.name
        );
        for (g, w) in out.mse.iter().zip(&get("mse").data) {
            assert!(
                rel(*g as f64, *w as f64) < LOSS_REL,
                "{}: mse {g} vs {w}",
                case.name
            );
        }
        let e_loss = rel(out.loss(divisor), get("loss").scalar() as f64);
        assert!(
            e_loss < LOSS_REL,
            "{}: loss rel err {e_loss:.3e}",
            case.name
        );

        let grads = dev.download(View::all(&critic.model.grads)).unwrap();
        let mut checked = 0;
        for e in &critic.table.entries {
            let Some(want) = fx
                .get(&format!("{}.grad.{}", case.name, e.name))
                .or_else(|| (e.name == "pool.weight").then(|| get("grad.pool_w")))
            else {
                // only the unused final norm has no reference: its gradient is zero
                assert_eq!(e.name, "model.norm.weight");
                assert!(window(&critic, &grads, &e.name).iter().all(|&g| g == 0.0));
                continue;
            };
            let r = rel_l2(window(&critic, &grads, &e.name), &want.data);
            assert!(
                r < GRAD_REL_L2,
                "{}: grad {} rel L2 {r:.3e}",
                case.name,
                e.name
            );
            worst.2 = worst.2.max(r);
            checked += 1;
        }
        // embed + 2 blocks of 9 + head (+ pool weights)
        let pool = usize::from(case.pooling == PoolMode::Weighted);
        assert_eq!(checked, 1 + 2 * 9 + 1 + pool, "{}", case.name);
        worst.0 = worst.0.max(e_pred);
        worst.1 = worst.1.max(e_loss);
    }
    println!(
        "worst: pred {:.2e}, loss {:.2e}, grad rel L2 {:.2e}",
        worst.0, worst.1, worst.2
    );
}

fn small_batch(a: usize) -> (usize, usize, Vec<u32>, Vec<f32>, Vec<f32>) {
    let (b, t) = (4, 6);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 48) as u32).collect();
    let lens = [6, 4, 2, 5];
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t < lens[i / t] { 1.0 } else { 0.0 })
        .collect();
    let target: Vec<f32> = (0..b * a)
        .map(|i| ((i as f32 * 0.37).sin() + 0.2 * (i % 3) as f32) * 2.0)
        .collect();
    (b, t, ids, mask, target)
}

#[test]
fn fresh_critic_with_a_equal_c_predicts_the_pooled_hidden_state() {
    let dev = CpuDevice::new();
    let critic = Critic::load(&dev, &llama_dir(), spec(PoolMode::Last, 32), 1).unwrap();
    let flat = dev.download(View::all(&critic.model.params)).unwrap();
    let w = window(&critic, &flat, "value_head.weight");
    for i in 0..32 {
        for j in 0..32 {
            assert_eq!(w[i * 32 + j], if i == j { 1.0 } else { 0.0 });
        }
    }
    let (b, t, ids, mask, target) = small_batch(32);
    let batch = critic
        .batch(&dev, b, t, &ids, &mask, &target, None)
        .unwrap();
    let mut ws = critic.acts(&dev, b, t).unwrap();
    let out = critic.forward(&dev, &mut ws, &batch, None).unwrap();
    let pooled = dev.download(View::all(&ws.pooled)).unwrap();
    assert_eq!(out.pred, pooled);
    assert!(pooled.iter().any(|&x| x.abs() > 1e-3));

    // A != C: PyTorch's Linear default U(-1/sqrt(C), 1/sqrt(C)), not all equal
    let c24 = Critic::load(&dev, &llama_dir(), spec(PoolMode::Weighted, 24), 1).unwrap();
    let flat = dev.download(View::all(&c24.model.params)).unwrap();
    let w = window(&c24, &flat, "value_head.weight");
    let bound = 1.0 / 32f32.sqrt();
    assert!(w.iter().all(|x| x.abs() <= bound));
    assert!(w.iter().fold(0f32, |m, x| m.max(x.abs())) > 0.8 * bound);
    let pw = window(&c24, &flat, "pool.weight");
    let std = (pw.iter().map(|x| x * x).sum::<f32>() / pw.len() as f32).sqrt();
    assert!(std > 0.002 && std < 0.03, "pool weights std {std}");
}

#[test]
fn adamw_drives_the_critic_loss_down() {
    let dev = CpuDevice::new();
    let mut critic = Critic::load(&dev, &llama_dir(), spec(PoolMode::Mean, 24), 3).unwrap();
    let (b, t, ids, mask, target) = small_batch(24);
    let batch = critic
        .batch(&dev, b, t, &ids, &mask, &target, None)
        .unwrap();
    let mut ws = critic.acts(&dev, b, t).unwrap();
    let cfg = AdamwConfig {
        weight_decay: 0.0,
        ..AdamwConfig::default()
    };
    let mut opt = AdamW::new(&dev, &critic.table, cfg).unwrap();
    let norm_before = {
        let flat = dev.download(View::all(&critic.model.params)).unwrap();
        window(&critic, &flat, "model.norm.weight").to_vec()
    };
    let scale = Some((24f32).sqrt());
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 0..100 {
        critic.zero_grads(&dev).unwrap();
        let out = critic.forward(&dev, &mut ws, &batch, scale).unwrap();
        critic.backward(&dev, &mut ws, &batch, b as f32).unwrap();
        let loss = out.loss(b as f32);
        if step == 0 {
            first = loss;
        }
        last = loss;
        let m = &mut critic.model;
        opt.update(&dev, &mut m.params, None, &m.grads, 3e-3, 1.0)
            .unwrap();
    }
    println!("critic loss {first:.4} -> {last:.6}");
    assert!(first > 0.5, "initial loss {first}");
    // measured: 2.04 -> 1.6e-5
    assert!(last < first / 1000.0, "loss {first} -> {last}");
    let flat = dev.download(View::all(&critic.model.params)).unwrap();
    assert_eq!(
        window(&critic, &flat, "model.norm.weight"),
        &norm_before[..]
    );
}

#[test]
fn save_then_load_gives_the_same_critic() {
    let dev = CpuDevice::new();
    let critic = Critic::load(&dev, &llama_dir(), spec(PoolMode::Weighted, 24), 5).unwrap();
    let dir = std::env::temp_dir().join(format!("nla_critic_save_{}", std::process::id()));
    critic.save(&dev, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 2);
    // a different seed: everything must come from the files
    let back = Critic::load(&dev, &dir, spec(PoolMode::Weighted, 24), 99).unwrap();
    let p0 = dev.download(View::all(&critic.model.params)).unwrap();
    let p1 = dev.download(View::all(&back.model.params)).unwrap();
    assert_eq!(p0, p1);
    assert_eq!(critic.table.entries, back.table.entries);
    // the head's shape is checked against the spec
    let err = Critic::<CpuDevice>::load(&dev, &dir, spec(PoolMode::Weighted, 16), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("value_head.weight"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_layer_past_the_model_is_an_error() {
    let dev = CpuDevice::new();
    let mut s = spec(PoolMode::Last, 32);
    s.k = 3;
    let err = Critic::<CpuDevice>::load(&dev, &llama_dir(), s, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("K = 3") && err.contains("3 layers"), "{err}");
    s.k = 2; // the last block: fine
    assert!(Critic::<CpuDevice>::load(&dev, &llama_dir(), s, 0).is_ok());
}

#[test]
fn finite_differences_on_a_head_and_a_backbone_coordinate() {
    let dev = CpuDevice::new();
    let mut critic = Critic::load(&dev, &llama_dir(), spec(PoolMode::Last, 24), 11).unwrap();
    let (b, t, ids, mask, target) = small_batch(24);
    let batch = critic
        .batch(&dev, b, t, &ids, &mask, &target, None)
        .unwrap();
    let mut ws = critic.acts(&dev, b, t).unwrap();
    let scale = Some((24f32).sqrt());
    critic.zero_grads(&dev).unwrap();
    critic.forward(&dev, &mut ws, &batch, scale).unwrap();
    critic.backward(&dev, &mut ws, &batch, b as f32).unwrap();
    let grads = dev.download(View::all(&critic.model.grads)).unwrap();
    let base = dev.download(View::all(&critic.model.params)).unwrap();
    let head = critic
        .table
        .entries
        .iter()
        .find(|e| e.name == "value_head.weight")
        .unwrap();
    let wq = critic
        .table
        .entries
        .iter()
        .find(|e| e.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    // the coordinate with the largest gradient of each window (a clear signal in f32)
    let argmax = |off: usize, len: usize| {
        (off..off + len)
            .max_by(|&i, &j| grads[i].abs().total_cmp(&grads[j].abs()))
            .unwrap()
    };
    for idx in [argmax(head.offset, head.len), argmax(wq.offset, wq.len)] {
        let eps = 1e-2f32;
        let mut loss_at = |delta: f32| {
            let mut p = base.clone();
            p[idx] += delta;
            critic.model.params = dev.upload(&p).unwrap();
            let out = critic.forward(&dev, &mut ws, &batch, scale).unwrap();
            out.loss(b as f32)
        };
        let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        let g = grads[idx] as f64;
        // f32 forward: rounding of the loss (~1e-7) over 2 eps, plus O(eps^2) curvature
        assert!(
            (fd - g).abs() <= 1e-3 + 2e-2 * g.abs(),
            "coordinate {idx}: finite difference {fd} vs gradient {g}"
        );
        assert!(
            g.abs() > 1e-4,
            "coordinate {idx}: gradient {g} too small to check"
        );
    }
}
