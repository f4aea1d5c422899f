//! The NLA training steps and the training loop on the CPU device: the actor's SFT loss
//! convention against a hand computation, the `project` injection's and the RL update's
//! gradients against central finite differences, and `train()` end to end (SFT, resume, GRPO,
//! PPO, config errors) on a tiny byte-level model.
//!
//! Random inputs are drawn from a fresh seed per run (printed; `NLA_TEST_SEED=<n>` repeats a
//! run); the end-to-end tests use fixed seeds so that their training thresholds are stable.

use std::path::{Path, PathBuf};

use nla_engine::config::{Algo, InjectionMode, Part, RunConfig};
use nla_engine::data::{write_nla_parquet, SampleOut};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{
    Advantage, Device, InjectMode, KlType, LossAgg, PolicyLossSpec, RewardSpec, RewardTransform,
    View,
};
use nla_engine::model::builtin::{byte_tokenizer, save_model_folder};
use nla_engine::model::{
    forward_with, ActivationSet, Batch, Injection, Model, ModelConfig, Recompute,
};
use nla_engine::nla::{Actor, ActorExample, ActorSpec};
use nla_engine::train::metrics::{read_metrics, MetricsRow};
use nla_engine::train::nla::{rewards, ActorTrainer, RlSequence};
use nla_engine::train::run::train;
use nla_engine::train::{AdamwConfig, LrSchedule};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Dev = CpuDevice;

const C: usize = 32;
const EOS: u32 = 256;
const MARKER: u32 = 257;
const DEMO_YAML: &str = include_str!("../configs/demo.yaml");

// ---------------------------------------------------------------------------------------------
// helpers

/// A fresh seed per run (or `NLA_TEST_SEED`), printed so that a failure can be repeated.
fn fresh_seed(what: &str) -> u64 {
    let seed = std::env::var("NLA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{what}: seed {seed} (NLA_TEST_SEED={seed} repeats this run)");
    seed
}

/// demo_config's shape, smaller: vocab 258 (bytes, EOS 256, marker 257), d 32, 2 blocks,
/// 2 query heads sharing 1 key-value head, FFN 64, tied embeddings.
fn tiny_config() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 258, "hidden_size": C, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": true, "bos_token_id": null, "eos_token_id": EOS,
    });
    ModelConfig::from_json(&json, Path::new("tiny")).unwrap()
}

fn randn(rng: &mut StdRng) -> f32 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

fn randn_vec(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * randn(rng)).collect()
}

/// "Explain <INJECT>:" in byte tokens; the marker is at position 8.
fn prompt_ids() -> Vec<u32> {
    let mut p: Vec<u32> = b"Explain ".iter().map(|&b| b as u32).collect();
    p.push(MARKER);
    p.push(b':' as u32);
    p
}
const SITE: usize = 8;

/// The prompt, `resp` random printable bytes and EOS; the loss on the response and EOS.
fn example(rng: &mut StdRng, resp: usize, a: usize) -> ActorExample {
    let mut ids = prompt_ids();
    let prompt_len = ids.len();
    ids.extend((0..resp).map(|_| rng.random_range(32u32..127)));
    ids.push(EOS);
    ActorExample {
        loss_mask: (0..ids.len()).map(|p| u8::from(p >= prompt_len)).collect(),
        ids,
        prompt_len,
        sites: vec![SITE],
        vectors: vec![randn_vec(rng, a, 2.0)],
    }
}

fn actor(
    dev: &Dev,
    flat: &[f32],
    layers: Vec<usize>,
    mode: InjectionMode,
    a: usize,
    seed: u64,
) -> Actor<Dev> {
    let model = Model::from_host(dev, tiny_config(), flat).unwrap();
    let spec = ActorSpec {
        layers,
        mode,
        scale: Some((a as f32).sqrt()),
        a,
    };
    Actor::new(dev, model, spec, None, seed).unwrap()
}

fn trainer(dev: &Dev, actor: Actor<Dev>) -> ActorTrainer<Dev> {
    // lr 0: a step leaves the weights as they are and the gradient in the grads buffer
    trainer_lr(dev, actor, 0.0)
}

/// An RL sequence of example `e` with its advantage and rollout log-probs.
fn rl_sequence(e: ActorExample, advantage: f32, rollout_logps: Vec<f32>) -> RlSequence {
    RlSequence {
        ids: e.ids,
        prompt_len: e.prompt_len,
        sites: e.sites,
        vectors: e.vectors,
        advantage,
        rollout_logps,
    }
}

/// The flat weights of a random tiny model (init scale 0.2), on the host.
fn tiny_weights(dev: &Dev, seed: u64) -> Vec<f32> {
    Model::init_random(dev, tiny_config(), seed, 0.2)
        .unwrap()
        .params_to_host(dev)
        .unwrap()
}

/// A trainer of `actor` at a constant learning rate, default AdamW, clip 1.
fn trainer_lr(dev: &Dev, actor: Actor<Dev>, lr: f32) -> ActorTrainer<Dev> {
    ActorTrainer::new(
        dev,
        actor,
        AdamwConfig::default(),
        LrSchedule::constant(lr),
        1.0,
    )
    .unwrap()
}

/// What the actor writes into the residual stream for `v`, computed on the host in f64:
/// n_s(v) = v s / |v|, then u = W n_s(v) with W [C,A] read from `params` (`project`).
fn injected_by_hand(actor: &Actor<Dev>, params: &[f32], v: &[f32]) -> Vec<f32> {
    let a = actor.spec.a;
    let x: Vec<f64> = match actor.spec.scale {
        Some(s) => {
            let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            v.iter()
                .map(|&x| x as f64 * s as f64 / norm.max(1e-12))
                .collect()
        }
        None => v.iter().map(|&x| x as f64).collect(),
    };
    match actor.proj {
        Some(off) => (0..C)
            .map(|i| {
                (0..a)
                    .map(|j| params[off + i * a + j] as f64 * x[j])
                    .sum::<f64>() as f32
            })
            .collect(),
        None => x.iter().map(|&x| x as f32).collect(),
    }
}

/// Per-position masked cross-entropies of `ids` run alone through `model` with the vector `u`
/// [C] written at `site` (a batch and an injection built by hand): position p predicts
/// ids[p+1] with weight `mask[p]`.
#[allow(clippy::too_many_arguments)]
fn position_losses(
    dev: &Dev,
    model: &Model<Dev>,
    layers: &[usize],
    mode: InjectMode,
    ids: &[u32],
    mask: &[f32],
    site: usize,
    u: &[f32],
) -> Vec<f64> {
    let n = ids.len();
    let batch = Batch {
        b: 1,
        t: n,
        ids: ids.to_vec(),
        targets: (0..n)
            .map(|p| if p + 1 < n { ids[p + 1] } else { 0 })
            .collect(),
        mask: mask.to_vec(),
    };
    let db = batch.upload(dev).unwrap();
    let inj = Injection::new(dev, layers.to_vec(), mode, &[site as u32], u, C).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, 1, n).unwrap();
    forward_with(dev, model, &mut acts, &db, Some(&inj)).unwrap();
    dev.download(View::all(&acts.losses))
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn inject_mode(m: InjectionMode) -> InjectMode {
    match m {
        InjectionMode::Add => InjectMode::Add,
        _ => InjectMode::Replace,
    }
}

/// The SFT loss of `examples` by hand: per example the mean cross-entropy over its loss-mask
/// targets (example alone, batch of 1), then the mean over examples. Also returns the pooled
/// token mean (the other convention), for comparison.
fn sft_loss_by_hand(dev: &Dev, actor: &Actor<Dev>, examples: &[ActorExample]) -> (f64, f64) {
    let params = dev.download(View::all(&actor.model.params)).unwrap();
    let (mut per_sample, mut pooled, mut count) = (0.0, 0.0, 0.0);
    for e in examples {
        let n = e.ids.len();
        let mask: Vec<f32> = (0..n)
            .map(|p| {
                if p + 1 < n {
                    e.loss_mask[p + 1] as f32
                } else {
                    0.0
                }
            })
            .collect();
        let u = injected_by_hand(actor, &params, &e.vectors[0]);
        let l = position_losses(
            dev,
            &actor.model,
            &actor.spec.layers,
            inject_mode(actor.spec.mode),
            &e.ids,
            &mask,
            e.sites[0],
            &u,
        );
        let k: f64 = mask.iter().map(|&m| m as f64).sum();
        let s: f64 = l.iter().sum();
        per_sample += s / k;
        pooled += s;
        count += k;
    }
    (per_sample / examples.len() as f64, pooled / count)
}

fn set_param(dev: &Dev, model: &mut Model<Dev>, idx: usize, value: f32) {
    let mut p = dev.download(View::all(&model.params)).unwrap();
    p[idx] = value;
    model.params = dev.upload(&p).unwrap();
}

/// Indices of the `k` largest |g| in `g[off..off+len]` (absolute indices).
fn largest(g: &[f32], off: usize, len: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (off..off + len).collect();
    idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    idx.truncate(k);
    idx
}

fn entry(model: &Model<Dev>, name: &str) -> (usize, usize) {
    let e = model.table.get(name).unwrap_or_else(|| panic!("no {name}"));
    (e.offset, e.len)
}

// ---------------------------------------------------------------------------------------------
// 1. the SFT loss convention

// The hand value runs each example alone (batch of 1, no padding) and builds the injected
// vector on the host in f64; ActorTrainer runs micro-batches of 2 with padding and the device's
// f32 rescale/projection. Same math, different f32 rounding: measured at most 1e-7 relative
// over 40 fresh seeds, so 1e-5 relative bounds it with margin. A wrong weighting is caught
// unless the samples' means happen to agree: the pooled token mean was 2e-5 .. 1e-1 (median
// 1.5e-2) away from the per-sample mean over 200 cases (both are printed).
const LOSS_REL: f64 = 1e-5;

/// With `release_acts` (set by `train` on a device with fixed memory) the actor hands its
/// activation buffers back after each pass and makes them again for the next: the same steps.
#[test]
fn released_activations_give_the_same_steps() {
    let dev = Dev::new();
    let seed = fresh_seed("release_acts");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = tiny_weights(&dev, seed);
    let ex: Vec<ActorExample> = [2, 7, 13]
        .iter()
        .map(|&r| example(&mut rng, r, C))
        .collect();
    let run = |release: bool| {
        let a = actor(&dev, &base, vec![0], InjectionMode::Replace, C, seed);
        let mut t = trainer_lr(&dev, a, 1e-3);
        t.release_acts = release;
        let losses: Vec<f64> = (0..3)
            .map(|_| t.sft_step(&dev, &ex, 2, EOS).unwrap().loss)
            .collect();
        assert_eq!(t.holds_activations(), !release);
        (
            losses,
            dev.download(View::all(&t.actor.model.params)).unwrap(),
        )
    };
    let (kept, released) = (run(false), run(true));
    assert_eq!(kept, released);
}

/// The first mini-batch's old log-probs come from its first update forward (before any
/// optimizer step) instead of a forward of their own: the same updates as recomputing them,
/// bit for bit, over 2 epochs of 2 mini-batches (the later epoch and mini-batch must keep
/// the old log-probs of before the first step), micro-batches of 1 and 2, KL on.
#[test]
fn rl_update_reuses_the_first_forward_as_old_log_probs() {
    let dev = Dev::new();
    let seed = fresh_seed("rl old logps");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = tiny_weights(&dev, seed);
    let seqs: Vec<RlSequence> = [(3, 1.3f32), (6, -0.8), (10, 0.45), (4, -0.9)]
        .iter()
        .map(|&(r, adv)| {
            let e = example(&mut rng, r, C);
            // as a rollout would give them: near, not equal
            let logps = (0..=r).map(|_| -1.0 - rng.random::<f32>()).collect();
            rl_sequence(e, adv, logps)
        })
        .collect();
    let reference = actor(&dev, &base, vec![0], InjectionMode::Replace, C, seed);
    let spec = PolicyLossSpec {
        clip_low: 0.2,
        clip_high: 0.2,
        dual_clip: Some(3.0),
        kl_coef: 0.1,
        kl_type: KlType::K3,
        agg: LossAgg::TokenMean,
    };
    let run = |recompute: bool, epochs: usize, mini: usize, micro: usize| {
        let a = actor(&dev, &base, vec![0], InjectionMode::Replace, C, seed);
        // large steps, so that a later pass that took moved weights' log-probs as the old ones
        // would clip where the right ones do not
        let mut t = trainer_lr(&dev, a, 3e-2);
        t.recompute_old = recompute;
        let st = t
            .rl_update(
                &dev,
                &seqs,
                Some(&reference),
                &spec,
                epochs,
                mini,
                micro,
                EOS,
            )
            .unwrap();
        (st, dev.download(View::all(&t.actor.model.params)).unwrap())
    };
    for (epochs, mini, micro) in [(1, 4, 2), (2, 2, 1), (2, 4, 4)] {
        let name = format!("epochs {epochs}, mini {mini}, micro {micro}");
        let (st, params) = run(false, epochs, mini, micro);
        let (want, want_params) = run(true, epochs, mini, micro);
        assert!(params == want_params, "{name}: the weights differ");
        assert_eq!(st, want, "{name}");
        assert!(st.rollout_logp_diff.is_finite(), "{name}");
        if epochs > 1 {
            // the later passes ran on moved weights: ratios off 1 (the check above would not
            // see old log-probs taken afresh in every pass otherwise)
            assert!((st.ratio_mean - 1.0).abs() > 1e-6, "{name}: {st:?}");
        }
    }
}

#[test]
fn sft_loss_is_the_mean_over_samples_of_token_means() {
    let dev = Dev::new();
    let seed = fresh_seed("sft_loss");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = tiny_weights(&dev, seed);
    let cases = [
        ("replace [0]", vec![0], InjectionMode::Replace, C),
        ("replace [2]", vec![2], InjectionMode::Replace, C),
        ("add [1]", vec![1], InjectionMode::Add, C),
        ("project [1] A=24", vec![1], InjectionMode::Project, 24),
        ("project [0,2] A=40", vec![0, 2], InjectionMode::Project, 40),
    ];
    let mut got = vec![];
    for (name, layers, mode, a) in cases {
        // lengths 3, 8 and 14 targets (response + EOS); micro-batch 2: [e0, e1] padded, [e2]
        let ex: Vec<ActorExample> = [2, 7, 13]
            .iter()
            .map(|&r| example(&mut rng, r, a))
            .collect();
        let mut t = trainer(&dev, actor(&dev, &base, layers, mode, a, seed));
        let loss = t.sft_loss(&dev, &ex, 2, EOS).unwrap();
        let (hand, pooled) = sft_loss_by_hand(&dev, &t.actor, &ex);
        eprintln!("{name}: sft_loss {loss:.7} hand {hand:.7} (pooled token mean {pooled:.7})");
        assert!(loss.is_finite() && loss > 0.0, "{name}: loss {loss}");
        assert!(
            (loss - hand).abs() <= LOSS_REL * hand.abs(),
            "{name}: sft_loss {loss} vs per-sample token mean by hand {hand} (pooled token mean \
             {pooled})"
        );
        // the same for one micro-batch of 3 and for 3 of 1
        for micro in [1, 3] {
            let l = t.sft_loss(&dev, &ex, micro, EOS).unwrap();
            assert!(
                (l - hand).abs() <= LOSS_REL * hand.abs(),
                "{name}: micro {micro}: {l} vs {hand}"
            );
        }
        got.push((name, loss, ex));
    }
    // injection after the last block replaces the residual row of the marker only, which feeds
    // the prediction of the prompt's next token (not in the loss): the loss is that of the
    // model without injection, while injecting at the embedding changes every later position
    let (_, _, ex2) = &got[1];
    let t = trainer(
        &dev,
        actor(&dev, &base, vec![2], InjectionMode::Replace, C, seed),
    );
    let mut plain = 0.0;
    for e in ex2 {
        let n = e.ids.len();
        let mask: Vec<f32> = (0..n)
            .map(|p| {
                if p + 1 < n {
                    e.loss_mask[p + 1] as f32
                } else {
                    0.0
                }
            })
            .collect();
        // an injection in no layer: the plain model
        let l = position_losses(
            &dev,
            &t.actor.model,
            &[],
            InjectMode::Replace,
            &e.ids,
            &mask,
            SITE,
            &[0.0; C],
        );
        plain += l.iter().sum::<f64>() / mask.iter().map(|&m| m as f64).sum::<f64>();
    }
    plain /= ex2.len() as f64;
    assert!(
        (got[1].1 - plain).abs() <= LOSS_REL * plain,
        "replace [2] {} vs no injection {plain}",
        got[1].1
    );
    // replace [0] vs [2] on the same examples: the marker's row at the embedding reaches
    // the response through attention; over 40 seeds the two losses differed by 4e-5 .. 5e-2
    // relative (median 2e-2; small when the positions' changes cancel), while two evaluations
    // of one loss differ by < 1e-7: 1e-6 tells "different" from rounding
    let mut t0 = trainer(
        &dev,
        actor(&dev, &base, vec![0], InjectionMode::Replace, C, seed),
    );
    let l0 = t0.sft_loss(&dev, ex2, 2, EOS).unwrap();
    eprintln!(
        "replace [0] {l0:.7} vs [2] {:.7} on the same examples",
        got[1].1
    );
    assert!(
        (l0 - got[1].1).abs() > 1e-6 * l0,
        "replace at [0] ({l0}) and [2] ({}) should differ",
        got[1].1
    );
}

// ---------------------------------------------------------------------------------------------
// 2. the `project` injection's gradient

// Central differences of an f32 loss, Richardson-extrapolated: R = (4 D(h/2) - D(h)) / 3 with
// D(h) = (L(x+h) - L(x-h)) / 2h cancels the h^2 truncation term of D, which for the embedding
// and attention coordinates checked reached 1% of g with plain D at h = 1e-2. The rounding
// error of R is ~2 eps_L / h, with eps_L ~ 1e-7 the f32 noise of a loss near 5 that one
// changed weight leaves (most of it cancels between the evaluations): ~2e-5. Bound:
// 1.5e-4 + 2e-3 |g|, checked where |g| > 1e-3 (the largest entries of a parameter,
// 1e-2 .. 1).
const FD_H: f64 = 1e-2;
const FD_ATOL: f64 = 1.5e-4;
const FD_RTOL: f64 = 2e-3;

/// `f(s)` sets the weights to x + s (or x + s d) and returns (loss, the step actually taken,
/// after f32 rounding); the Richardson-extrapolated central difference (see above).
fn central_diff(f: &mut dyn FnMut(f64) -> (f64, f64)) -> f64 {
    central_diff_at(f, FD_H)
}

/// [`central_diff`] from steps h and h / 2.
fn central_diff_at(f: &mut dyn FnMut(f64) -> (f64, f64), h: f64) -> f64 {
    let mut d = |h: f64| {
        let ((lu, su), (ld, sd)) = (f(h), f(-h));
        (lu - ld) / (su - sd)
    };
    let (d1, d2) = (d(h), d(h / 2.0));
    (4.0 * d2 - d1) / 3.0
}

fn assert_fd(what: &str, fd: f64, g: f64) {
    assert!(
        (fd - g).abs() <= FD_ATOL + FD_RTOL * g.abs(),
        "{what}: backward {g:.6e} vs central difference {fd:.6e}"
    );
}

#[test]
fn project_injection_gradient_matches_finite_differences() {
    let dev = Dev::new();
    let seed = fresh_seed("project grad");
    let mut rng = StdRng::seed_from_u64(seed);
    let a = 24;
    let base = tiny_weights(&dev, seed);
    let mut t = trainer(
        &dev,
        actor(&dev, &base, vec![0, 1], InjectionMode::Project, a, seed),
    );
    let ex: Vec<ActorExample> = [3, 6, 10]
        .iter()
        .map(|&r| example(&mut rng, r, a))
        .collect();
    let before = dev.download(View::all(&t.actor.model.params)).unwrap();
    let l0 = t.sft_loss(&dev, &ex, 2, EOS).unwrap();
    let st = t.sft_step(&dev, &ex, 2, EOS).unwrap();
    let after = dev.download(View::all(&t.actor.model.params)).unwrap();
    assert_eq!(st.lr, 0.0);
    assert!(before == after, "a step at lr 0 changed the weights");
    // the same passes in the same order
    assert!(
        (st.loss - l0).abs() <= 1e-12 * l0,
        "step loss {} vs {l0}",
        st.loss
    );
    let g = dev.download(View::all(&t.actor.model.grads)).unwrap();
    let off = t.actor.proj.expect("project has W");
    let gn = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    assert!(
        (st.grad_norm - gn).abs() <= 1e-5 * gn,
        "grad norm {} vs {gn}",
        st.grad_norm
    );

    let mut checked = 0;
    let mut coords: Vec<(String, usize)> = largest(&g, off, C * a, 3)
        .into_iter()
        .map(|i| (format!("W[{}, {}]", (i - off) / a, (i - off) % a), i))
        .collect();
    coords.push(("W random".into(), off + rng.random_range(0..C * a)));
    let (q1, q1n) = entry(&t.actor.model, "model.layers.1.self_attn.q_proj.weight");
    coords.push((
        "layer 1 q_proj (largest)".into(),
        largest(&g, q1, q1n, 1)[0],
    ));
    let (d0, d0n) = entry(&t.actor.model, "model.layers.0.mlp.down_proj.weight");
    coords.push((
        "layer 0 down_proj (largest)".into(),
        largest(&g, d0, d0n, 1)[0],
    ));
    for (name, i) in coords {
        let x = before[i];
        let fd = central_diff(&mut |h| {
            let v = (x as f64 + h) as f32;
            set_param(&dev, &mut t.actor.model, i, v);
            (t.sft_loss(&dev, &ex, 2, EOS).unwrap(), v as f64 - x as f64)
        });
        set_param(&dev, &mut t.actor.model, i, x);
        eprintln!("{name}: g {:.6e} fd {fd:.6e}", g[i]);
        if name != "W random" {
            assert!(
                g[i].abs() > 1e-3,
                "{name}: gradient {} too small to check",
                g[i]
            );
        }
        assert_fd(&name, fd, g[i] as f64);
        checked += 1;
    }
    // the directional derivative along a random direction of all of W
    let d = randn_vec(&mut rng, C * a, 1.0);
    let dn = d.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let gd: f64 = (0..C * a)
        .map(|k| g[off + k] as f64 * d[k] as f64 / dn)
        .sum();
    // (the f32 rounding of each entry's step is below 1e-7 relative: the nominal step is used)
    let fd = central_diff(&mut |h| {
        let mut p = before.clone();
        for k in 0..C * a {
            p[off + k] = (before[off + k] as f64 + h * d[k] as f64 / dn) as f32;
        }
        t.actor.model.params = dev.upload(&p).unwrap();
        (t.sft_loss(&dev, &ex, 2, EOS).unwrap(), h)
    });
    t.actor.model.params = dev.upload(&before).unwrap();
    eprintln!("W along a random direction: g.d {gd:.6e} fd {fd:.6e}");
    assert_fd("W along a random direction", fd, gd);
    assert_eq!(checked, 6);
}

// ---------------------------------------------------------------------------------------------
// 3. the RL update's gradient

/// logp of every target of `seqs` under `model` (each sequence alone, hand batch), with
/// `actor`'s injection: positions p >= prompt_len - 1 predict the response.
fn rl_logps(
    dev: &Dev,
    model: &Model<Dev>,
    actor: &Actor<Dev>,
    seqs: &[RlSequence],
    temperature: f32,
) -> Vec<Vec<f64>> {
    let params = dev.download(View::all(&actor.model.params)).unwrap();
    // log-probs under softmax(logits / T): logits are linear in the final norm's output, and
    // the final norm's output is linear in its weight, so dividing ln_f's weight by T divides
    // the logits by T (the LM head itself is tied to the embedding here)
    let scaled;
    let model = if temperature == 1.0 {
        model
    } else {
        let mut flat = dev.download(View::all(&model.params)).unwrap();
        let (off, len) = entry(model, "model.norm.weight");
        for w in &mut flat[off..off + len] {
            *w /= temperature;
        }
        // the base model's parameters (the actor's flat buffer also holds its projection)
        let base = nla_engine::model::ParamTable::for_config(&model.cfg).total;
        scaled = Model::from_host(dev, model.cfg.clone(), &flat[..base]).unwrap();
        &scaled
    };
    seqs.iter()
        .map(|s| {
            let n = s.ids.len();
            let mask: Vec<f32> = (0..n)
                .map(|p| f32::from(u8::from(p + 1 >= s.prompt_len && p + 1 < n)))
                .collect();
            let u = injected_by_hand(actor, &params, &s.vectors[0]);
            let l = position_losses(
                dev,
                model,
                &actor.spec.layers,
                inject_mode(actor.spec.mode),
                &s.ids,
                &mask,
                s.sites[0],
                &u,
            );
            (s.prompt_len - 1..n - 1).map(|p| -l[p]).collect()
        })
        .collect()
}

/// The RL objective by hand at the actor's current weights: per token
/// l = -A exp(logp - old) + kl_coef kl(logp, ref); per micro-batch of `micro` sequences the
/// `agg` of l, times its share of the mini-batch (all of `seqs`). Log-probs under
/// softmax(logits / temperature).
#[allow(clippy::too_many_arguments)]
fn rl_loss_by_hand(
    dev: &Dev,
    actor: &Actor<Dev>,
    seqs: &[RlSequence],
    old: &[Vec<f64>],
    reference: Option<&[Vec<f64>]>,
    spec: &PolicyLossSpec,
    micro: usize,
    temperature: f32,
) -> f64 {
    let logp = rl_logps(dev, &actor.model, actor, seqs, temperature);
    let tok = |s: usize, t: usize| {
        let lp = logp[s][t];
        let mut l = -(seqs[s].advantage as f64) * (lp - old[s][t]).exp();
        if let Some(r) = reference {
            let r = r[s][t];
            let kl = match spec.kl_type {
                KlType::K1 => lp - r,
                KlType::K2 => 0.5 * (lp - r).powi(2),
                // verl's low_var_kl: ref - logp clamped to +-20, the value to +-10
                KlType::K3 => {
                    let x = (r - lp).clamp(-20.0, 20.0);
                    (x.exp() - x - 1.0).clamp(-10.0, 10.0)
                }
            };
            l += spec.kl_coef as f64 * kl;
        }
        l
    };
    let mut total = 0.0;
    let idx: Vec<usize> = (0..seqs.len()).collect();
    for chunk in idx.chunks(micro) {
        let share = chunk.len() as f64 / seqs.len() as f64;
        let agg = match spec.agg {
            LossAgg::TokenMean => {
                let n: usize = chunk.iter().map(|&s| logp[s].len()).sum();
                chunk
                    .iter()
                    .map(|&s| (0..logp[s].len()).map(|t| tok(s, t)).sum::<f64>())
                    .sum::<f64>()
                    / n as f64
            }
            LossAgg::SeqMeanTokenMean => {
                chunk
                    .iter()
                    .map(|&s| {
                        (0..logp[s].len()).map(|t| tok(s, t)).sum::<f64>() / logp[s].len() as f64
                    })
                    .sum::<f64>()
                    / chunk.len() as f64
            }
            LossAgg::SeqMeanTokenSumNorm => unimplemented!("not checked here"),
        };
        total += share * agg;
    }
    total
}

#[test]
fn rl_update_gradient_matches_finite_differences() {
    let dev = Dev::new();
    let seed = fresh_seed("rl grad");
    let mut rng = StdRng::seed_from_u64(seed);
    let a = 24;
    let base = tiny_weights(&dev, seed);
    // the reference: another model near the actor (every weight moved by N(0, 0.01^2)), as an
    // SFT reference is near its policy; far apart, k3 would sit on its clamp (at 10) for
    // some tokens, where the loss has a kink that central differences straddle
    let ref_flat: Vec<f32> = base.iter().map(|&w| w + 0.01 * randn(&mut rng)).collect();
    let mut t = trainer(
        &dev,
        actor(&dev, &base, vec![0], InjectionMode::Project, a, seed),
    );
    // the reference is a whole actor: its injection projection moved as well, so log-probs
    // that took the policy's projection instead would miss the KL term's value and gradient
    let mut reference = actor(&dev, &ref_flat, vec![0], InjectionMode::Project, a, seed);
    let mut ref_all = dev.download(View::all(&t.actor.model.params)).unwrap();
    ref_all[..ref_flat.len()].copy_from_slice(&ref_flat);
    for w in &mut ref_all[ref_flat.len()..] {
        *w += 0.01 * randn(&mut rng);
    }
    reference.model.params = dev.upload(&ref_all).unwrap();
    // responses of 4, 7 and 11 tokens, advantages of both signs
    let seqs: Vec<RlSequence> = [(3, 1.3f32), (6, -0.8), (10, 0.45)]
        .iter()
        .map(|&(r, adv)| rl_sequence(example(&mut rng, r, a), adv, vec![]))
        .collect();
    let params = dev.download(View::all(&t.actor.model.params)).unwrap();
    let old1 = rl_logps(&dev, &t.actor.model, &t.actor, &seqs, 1.0);
    let refl1 = rl_logps(&dev, &reference.model, &reference, &seqs, 1.0);
    let (old, refl) = (&old1, &refl1);
    let off = t.actor.proj.unwrap();
    // k3 on the smooth branch for every token (far from its clamp at 10), and not ~0, so the
    // KL term adds to the gradient (measured over 300 seeds: mean >= 0.009, max <= 3.5)
    let k3: Vec<f64> = (0..3)
        .flat_map(|s| (0..old[s].len()).map(move |t| (s, t)))
        .map(|(s, t)| {
            let x = refl[s][t] - old[s][t];
            x.exp() - x - 1.0
        })
        .collect();
    let k3_max = k3.iter().fold(0f64, |m, &k| m.max(k));
    let k3_mean = k3.iter().sum::<f64>() / k3.len() as f64;
    eprintln!("k3 per token: mean {k3_mean:.3}, max {k3_max:.3}");
    assert!(k3_max < 8.0, "k3 {k3_max} near its clamp");
    assert!(
        k3_mean > 0.002,
        "k3 mean {k3_mean}: the reference is the actor"
    );
    let cases = [
        (LossAgg::TokenMean, 0.0, KlType::K1, 3),
        (LossAgg::SeqMeanTokenMean, 0.0, KlType::K1, 3),
        (LossAgg::TokenMean, 0.1, KlType::K1, 3),
        (LossAgg::SeqMeanTokenMean, 0.1, KlType::K3, 3),
        // two micro-batches (2 + 1 sequences): each weighted by its share of the mini-batch
        (LossAgg::TokenMean, 0.1, KlType::K3, 2),
    ];
    // every case at temperature 1, and two under a sampling temperature (log-probs of
    // softmax(logits / T), policy and reference); two with the LM head and cross-entropy over
    // vocabulary chunks of 5 (V 258: 51 chunks and a short last one) and block recompute
    let cases = cases
        .iter()
        .map(|&c| (c, 1.0f32, None))
        .chain([(cases[2], 0.7, None), (cases[4], 1.6, None)])
        .chain([(cases[3], 1.0, Some(5)), (cases[4], 0.7, Some(5))]);
    for ((agg, kl_coef, kl_type, micro), temp, chunk) in cases {
        let name =
            format!("{agg:?} kl {kl_coef} {kl_type:?} micro {micro} T {temp} chunk {chunk:?}");
        t.temperature = temp;
        t.memory.logits_chunk = chunk;
        // block recompute along with the chunks
        t.memory.recompute = if chunk.is_some() {
            Recompute::Block
        } else {
            Recompute::None
        };
        let (old_t, refl_t);
        let (old, refl) = if temp == 1.0 {
            (old, refl)
        } else {
            old_t = rl_logps(&dev, &t.actor.model, &t.actor, &seqs, temp);
            refl_t = rl_logps(&dev, &reference.model, &reference, &seqs, temp);
            (&old_t, &refl_t)
        };
        let spec = PolicyLossSpec {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            kl_coef,
            kl_type,
            agg,
        };
        let rf = (kl_coef != 0.0).then_some(&reference);
        let st = t
            .rl_update(&dev, &seqs, rf, &spec, 1, 3, micro, EOS)
            .unwrap();
        let now = dev.download(View::all(&t.actor.model.params)).unwrap();
        assert!(now == params, "{name}: lr 0 changed the weights");
        let g = dev.download(View::all(&t.actor.model.grads)).unwrap();
        let rref = rf.map(|_| refl.as_slice());
        let hand0 = rl_loss_by_hand(&dev, &t.actor, &seqs, old, rref, &spec, micro, temp);
        // on-policy: ratio exactly 1, nothing clipped
        assert!(
            (st.ratio_mean - 1.0).abs() < 1e-12,
            "{name}: ratio {}",
            st.ratio_mean
        );
        assert_eq!(st.clip_frac, 0.0, "{name}");
        if micro == 3 {
            // (the stats average the micro-batches unweighted, so compare with one micro-batch)
            assert!(
                (st.loss - hand0).abs() <= 1e-5 * hand0.abs().max(1e-3),
                "{name}: loss {} vs hand {hand0}",
                st.loss
            );
        }
        let mut coords = largest(&g, off, C * a, 2);
        let (q0, q0n) = entry(&t.actor.model, "model.layers.0.self_attn.q_proj.weight");
        coords.extend(largest(&g, q0, q0n, 1));
        let (w, wn) = entry(&t.actor.model, "model.embed_tokens.weight");
        coords.extend(largest(&g, w, wn, 1));
        for i in coords {
            let x = params[i];
            let fd = central_diff(&mut |h| {
                let v = (x as f64 + h) as f32;
                set_param(&dev, &mut t.actor.model, i, v);
                let l = rl_loss_by_hand(&dev, &t.actor, &seqs, old, rref, &spec, micro, temp);
                (l, v as f64 - x as f64)
            });
            set_param(&dev, &mut t.actor.model, i, x);
            eprintln!("{name} [{i}]: g {:.6e} fd {fd:.6e}", g[i]);
            assert!(
                g[i].abs() > 1e-3,
                "{name} [{i}]: gradient {} too small to check",
                g[i]
            );
            // The loss has kinks (the ratio's clip, k3's clamp): one a weight reaches within
            // FD_H of its value (seen once in ~30 seeds, at 1-2e-2 for an embedding weight)
            // spoils the differences at FD_H. Then they are taken again at FD_H / 4, inside
            // the smooth stretch; the rounding error grows 4x, to ~8e-5 (see FD_ATOL). A wrong
            // gradient fails at both steps.
            let fd = if (fd - g[i] as f64).abs() <= FD_ATOL + FD_RTOL * (g[i] as f64).abs() {
                fd
            } else {
                let near = central_diff_at(
                    &mut |h| {
                        let v = (x as f64 + h) as f32;
                        set_param(&dev, &mut t.actor.model, i, v);
                        let l =
                            rl_loss_by_hand(&dev, &t.actor, &seqs, old, rref, &spec, micro, temp);
                        (l, v as f64 - x as f64)
                    },
                    FD_H / 4.0,
                );
                set_param(&dev, &mut t.actor.model, i, x);
                eprintln!(
                    "{name} [{i}]: fd {fd:.6e} at {FD_H:e}, {near:.6e} at {:e}",
                    FD_H / 4.0
                );
                near
            };
            assert_fd(&format!("{name} [{i}]"), fd, g[i] as f64);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. train() end to end

/// Six concepts: a response word and a base direction; a row's vector is its concept's
/// direction plus noise, so the vector determines the response (actor) and the response the
/// vector up to noise (critic).
const WORDS: [&str; 6] = ["red", "blue", "cat", "dog", "sun", "rain"];

fn write_data(dir: &Path, seed: u64, train_rows: usize, val_rows: usize) -> (PathBuf, PathBuf) {
    let mut rng = StdRng::seed_from_u64(seed);
    let bases: Vec<Vec<f32>> = WORDS.iter().map(|_| randn_vec(&mut rng, C, 1.0)).collect();
    let mut rows = |n: usize| -> Vec<SampleOut> {
        (0..n)
            .map(|i| {
                let k = (i + rng.random_range(0..WORDS.len())) % WORDS.len();
                let noise = randn_vec(&mut rng, C, 0.3);
                SampleOut {
                    prompt: "Explain <INJECT>:".into(),
                    response: WORDS[k].into(),
                    activation_vector: bases[k].iter().zip(&noise).map(|(b, n)| b + n).collect(),
                    extra: vec![],
                }
            })
            .collect()
    };
    let (tr, va) = (rows(train_rows), rows(val_rows));
    let (tp, vp) = (dir.join("train.parquet"), dir.join("val.parquet"));
    write_nla_parquet(&tp, &tr).unwrap();
    write_nla_parquet(&vp, &va).unwrap();
    (tp, vp)
}

/// A tiny random model folder with the byte tokenizer.
fn write_model(dev: &Dev, dir: &Path, seed: u64) -> PathBuf {
    let model = Model::init_random(dev, tiny_config(), seed, 0.05).unwrap();
    let path = dir.join("tiny");
    save_model_folder(dev, &model, &byte_tokenizer().unwrap(), &path).unwrap();
    path
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// configs/demo.yaml for the tiny model and data, with `extra` overrides after.
fn config(model: &Path, data: &(PathBuf, PathBuf), save_dir: &Path, extra: &[&str]) -> RunConfig {
    let mut sets = vec![
        format!("model.model_name={}", p(model)),
        "model.activation_dim=32".into(),
        "model.critic.explanation_tag=null".into(),
        "model.critic.critic_prompt=null".into(),
        format!("data.train_dataset.parquet_files=[{}]", p(&data.0)),
        format!("data.val_dataset.parquet_files=[{}]", p(&data.1)),
        "data.train_dataset.max_length=48".into(),
        "data.train_batch_size=8".into(),
        "data.val_batch_size=16".into(),
        "data.micro_batch_size_per_gpu=4".into(),
        format!("trainer.save_dir={}", p(save_dir)),
        "trainer.logging_steps=0".into(),
        "generation.max_new_tokens=8".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets).unwrap()
}

fn rows(save_dir: &Path, split: &str) -> Vec<MetricsRow> {
    let log = read_metrics(&save_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.skipped, 0, "malformed lines in {}", save_dir.display());
    log.rows.into_iter().filter(|r| r.split == split).collect()
}

fn get(r: &MetricsRow, key: &str) -> f64 {
    r.get(key)
        .unwrap_or_else(|| panic!("step {} {}: no `{key}` in {:?}", r.step, r.split, r.values))
}

/// Every line of the metrics file is one JSON object with an integer step, a finite time, a
/// known split and numbers (or null) for the rest.
fn check_lines(save_dir: &Path) {
    let text = std::fs::read_to_string(save_dir.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let o = v.as_object().unwrap();
        assert!(o["step"].is_u64(), "{line}");
        assert!(o["time"].as_f64().is_some_and(f64::is_finite), "{line}");
        assert!(
            matches!(o["split"].as_str(), Some("train" | "val")),
            "{line}"
        );
        for (k, x) in o {
            if k != "split" {
                assert!(x.is_number() || x.is_null(), "{k} in {line}");
            }
        }
    }
}

#[test]
fn sft_then_grpo_and_ppo_from_its_checkpoint() {
    let dev = Dev::new();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&dev, tmp.path(), 1);
    let data = write_data(tmp.path(), 2, 48, 16);
    let sft_dir = tmp.path().join("sft");
    let cfg = config(
        &model,
        &data,
        &sft_dir,
        &[
            "trainer.total_training_steps=40",
            "trainer.save_steps=20",
            "trainer.val_steps=20",
            "optim.warmup_steps=5",
        ],
    );
    assert_eq!(cfg.trainer.train_mode, Part::Both);
    let t0 = std::time::Instant::now();
    let summary = train(&dev, &cfg, Some(false)).unwrap();
    eprintln!("SFT 40 steps: {:.1}s", t0.elapsed().as_secs_f64());
    assert_eq!(summary.steps, 40);
    check_lines(&sft_dir);
    let tr = rows(&sft_dir, "train");
    let va = rows(&sft_dir, "val");
    assert_eq!(
        tr.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    assert_eq!(
        va.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![0, 20, 40]
    );
    let (first, last) = (get(&tr[0], "actor_loss"), get(&tr[39], "actor_loss"));
    eprintln!("actor_loss {first:.3} -> {last:.3}");
    // from ~ln 258 = 5.55 (near-uniform start) to the six words: well below 0.7x
    assert!(last < 0.7 * first, "actor_loss {first} -> {last}");
    for r in &tr {
        for k in [
            "actor_loss",
            "critic_loss",
            "actor_grad_norm",
            "critic_grad_norm",
            "tokens",
        ] {
            assert!(get(r, k).is_finite(), "step {} {k}", r.step);
        }
    }
    // checkpoints: every save_steps and the last, with both models and the state
    let ckpt = summary.last_checkpoint.clone().unwrap();
    assert_eq!(ckpt, sft_dir.join("step-00000040"));
    assert!(sft_dir.join("step-00000020").is_dir());
    for f in [
        "actor/config.json",
        "actor/model.safetensors",
        "actor/tokenizer.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    for f in [
        "critic/config.json",
        "critic/model.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 40);
    // the critic's fidelity on the validation rows improves from the start
    let (f0, f1) = (get(&va[0], "critic_fve"), get(&va[2], "critic_fve"));
    eprintln!("val critic_fve {f0:.3} -> {f1:.3}");
    assert!(f1 > f0, "val critic_fve {f0} -> {f1}");

    for algo in ["grpo", "ppo"] {
        let dir = tmp.path().join(algo);
        let actor = format!("model.model_name={}", p(&ckpt.join("actor")));
        let critic = format!("model.critic.model_name={}", p(&ckpt.join("critic")));
        let algo_set = format!("trainer.algo={algo}");
        let cfg = config(
            &model,
            &data,
            &dir,
            &[
                &actor,
                &critic,
                &algo_set,
                "trainer.total_training_steps=2",
                "trainer.val_steps=0",
                "grpo.n=2",
                "data.train_batch_size=4",
                "optim.lr=3.0e-4",
                "optim.critic_lr=3.0e-4",
                "optim.warmup_steps=0",
                "optim.lr_scheduler_type=constant",
                "generation.temperature=0.7",
            ],
        );
        let t0 = std::time::Instant::now();
        let s = train(&dev, &cfg, Some(false)).unwrap();
        eprintln!("{algo} 2 steps: {:.1}s", t0.elapsed().as_secs_f64());
        assert_eq!(s.steps, 2);
        check_lines(&dir);
        let tr = rows(&dir, "train");
        assert_eq!(tr.len(), 2, "{algo}");
        for r in &tr {
            let m = |k: &str| get(r, k);
            eprintln!(
                "{algo} step {}: reward_mean {:.4} advantage_mean {:.2e} failed_frac {} \
                 clip_frac {} ratio {} kl {}",
                r.step,
                m("reward_mean"),
                m("advantage_mean"),
                m("failed_frac"),
                m("actor_clip_frac"),
                m("actor_ratio_mean"),
                m("actor_kl")
            );
            assert!(m("reward_mean").is_finite(), "{algo}");
            // GRPO: (r - group mean) / (group std + eps) has mean 0 in every group; PPO whitens
            // over the batch: mean 0 up to f32 rounding
            assert!(
                m("advantage_mean").abs() < 1e-4,
                "{algo}: {}",
                m("advantage_mean")
            );
            let cf = m("actor_clip_frac");
            assert!((0.0..=1.0).contains(&cf), "{algo}: clip_frac {cf}");
            let ff = m("failed_frac");
            assert!((0.0..=1.0).contains(&ff), "{algo}: failed_frac {ff}");
            assert!(m("actor_loss").is_finite() && m("actor_grad_norm").is_finite());
            // the training pass's log-probs (under the sampling temperature 0.7) equal the ones
            // the rollout sampled with: KV-cache decode and full forward differ by f32 rounding
            let diff = m("rollout_logp_diff");
            assert!(
                diff < 1e-4,
                "{algo} step {}: rollout_logp_diff {diff}",
                r.step
            );
            if algo == "grpo" {
                // one epoch over one mini-batch: the update starts from the weights that gave
                // the old log-probs, so the ratio is 1 exactly and nothing is clipped
                assert_eq!(m("actor_ratio_mean"), 1.0, "step {}", r.step);
                assert_eq!(m("actor_clip_frac"), 0.0, "step {}", r.step);
            }
        }
        // some rollouts parse (else every reward is the failure value and every advantage 0,
        // and the advantage check above says nothing)
        assert!(
            tr.iter()
                .any(|r| get(r, "failed_frac") < 1.0 && get(r, "advantage_std") > 0.1),
            "{algo}: no step with a parsed explanation and non-zero advantages"
        );
        if algo == "grpo" {
            // step 1: the policy is the reference (both from ckpt/actor): KL 0 exactly
            assert_eq!(get(&tr[0], "actor_kl"), 0.0);
        } else {
            // PPO has no KL loss
            assert_eq!(get(&tr[0], "actor_kl"), 0.0);
        }
        assert!(s.last_checkpoint.unwrap().join("actor").is_dir());
    }
}

#[test]
fn grpo_advantages_have_zero_mean_in_every_group() {
    let dev = Dev::new();
    let seed = fresh_seed("grpo groups");
    let mut rng = StdRng::seed_from_u64(seed);
    let (groups, n, a) = (5, 3, C);
    let s = groups * n;
    let pred = randn_vec(&mut rng, s * a, 1.0);
    let target = randn_vec(&mut rng, s * a, 1.0);
    let mut valid = vec![true; s];
    valid[4] = false; // a failure inside a group
    let spec = RewardSpec {
        mse_scale: Some((a as f32).sqrt()),
        failure_value: -2.0,
        transform: RewardTransform::Negative,
        scale: 1.0,
        batch_normalize: false,
        clip: None,
        advantage: Advantage::Grpo {
            group: n,
            norm_by_std: true,
        },
        eps: 1e-6,
    };
    let r = rewards(&dev, &pred, &target, &valid, a, &spec).unwrap();
    assert_eq!(r.reward[4], -2.0);
    for g in 0..groups {
        let adv = &r.advantage[g * n..(g + 1) * n];
        let rw = &r.reward[g * n..(g + 1) * n];
        let mean = adv.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        // A = (r - mean) / (sigma + 1e-6) with sigma the unbiased std of the group's rewards:
        // the advantages have mean 0 and sample std sigma / (sigma + 1e-6). The f32 rewards
        // (|r| ~ 2) cancel in r - mean to ~2e-7 absolute, i.e. 2e-7 / sigma relative to A
        let rm = rw.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let sigma =
            (rw.iter().map(|&x| (x as f64 - rm).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let tol = 1e-6 + 1e-6 / sigma;
        let var = adv.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(
            mean.abs() < tol,
            "group {g}: advantage mean {mean} ({adv:?}, rewards {rw:?})"
        );
        let want = sigma / (sigma + 1e-6);
        assert!(
            (var.sqrt() - want).abs() < tol,
            "group {g}: advantage std {} vs {want} (rewards {rw:?})",
            var.sqrt()
        );
    }
}

/// Keys whose values are wall-clock measurements.
fn timing(key: &str) -> bool {
    matches!(
        key,
        "tokens_per_s" | "samples_per_s" | "step_s" | "gen_tokens_per_s"
    ) || key.starts_with("time_")
}

fn comparable(r: &MetricsRow) -> (u64, String, Vec<(String, u64)>) {
    let vals = r
        .values
        .iter()
        .filter(|(k, _)| !timing(k))
        // bit patterns: exact equality, NaN included
        .map(|(k, v)| (k.clone(), v.to_bits()))
        .collect();
    (r.step, r.split.clone(), vals)
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dev = Dev::new();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&dev, tmp.path(), 3);
    let data = write_data(tmp.path(), 4, 48, 16);
    // a schedule that does not depend on total_training_steps (warm-up 2, then constant), so
    // that the 3-step first part of B takes the same steps as A; 10 rows a step over 48 rows
    // crosses an epoch in step 5, after the resume
    let common = [
        "trainer.save_steps=3",
        "trainer.val_steps=3",
        "optim.warmup_steps=2",
        "optim.lr_scheduler_type=constant",
        "data.train_batch_size=10",
    ];
    let with = |dir: &Path, extra: &[&str]| {
        let mut all: Vec<&str> = common.to_vec();
        all.extend_from_slice(extra);
        config(&model, &data, dir, &all)
    };
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    train(
        &dev,
        &with(&da, &["trainer.total_training_steps=6"]),
        Some(false),
    )
    .unwrap();
    train(
        &dev,
        &with(&db, &["trainer.total_training_steps=3"]),
        Some(false),
    )
    .unwrap();
    let s = train(
        &dev,
        &with(
            &db,
            &["trainer.total_training_steps=6", "trainer.resume=true"],
        ),
        Some(false),
    )
    .unwrap();
    assert_eq!(s.steps, 6);
    check_lines(&db);
    let read = |d: &Path| {
        let log = read_metrics(&d.join("metrics.jsonl")).unwrap();
        assert_eq!(log.skipped, 0);
        log.rows
    };
    let (ra, rb) = (read(&da), read(&db));
    let shape = |r: &[MetricsRow]| {
        r.iter()
            .map(|r| (r.step, r.split.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&ra), shape(&rb));
    let mut compared = 0;
    for (x, y) in ra.iter().zip(&rb) {
        let (cx, cy) = (comparable(x), comparable(y));
        assert_eq!(
            cx, cy,
            "step {} {}: A {:?}\nB {:?}",
            x.step, x.split, x.values, y.values
        );
        if x.split == "train" && x.step > 3 {
            assert!(cx.2.iter().any(|(k, _)| k == "actor_loss"));
            compared += 1;
        }
    }
    assert_eq!(compared, 3);
    // the final weights are the same bytes
    for f in [
        "actor/model.safetensors",
        "critic/model.safetensors",
        "actor_optim.safetensors",
    ] {
        let a = std::fs::read(da.join("step-00000006").join(f)).unwrap();
        let b = std::fs::read(db.join("step-00000006").join(f)).unwrap();
        assert!(a == b, "{f} differs between the runs");
    }
}

#[test]
fn bad_configs_name_their_field() {
    let dev = Dev::new();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&dev, tmp.path(), 5);
    let data = write_data(tmp.path(), 6, 8, 4);
    let dir = tmp.path().join("run");
    let sets = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("model.model_name={}", p(&model)),
            "model.activation_dim=32".into(),
            format!("data.train_dataset.parquet_files=[{}]", p(&data.0)),
            format!("data.val_dataset.parquet_files=[{}]", p(&data.1)),
            format!("trainer.save_dir={}", p(&dir)),
            "trainer.total_training_steps=2".into(),
            "optim.warmup_steps=0".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // the config check
    let e = RunConfig::from_yaml(
        DEMO_YAML,
        Path::new("configs/demo.yaml"),
        &sets(&["trainer.algo=grpo", "trainer.train_mode=critic"]),
    )
    .expect_err("grpo with train_mode critic is refused")
    .to_string();
    assert!(e.contains("trainer.train_mode"), "{e}");
    // train() itself refuses it for a config changed after loading
    let mut cfg =
        RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets(&[])).unwrap();
    cfg.trainer.algo = Algo::Grpo;
    cfg.trainer.train_mode = Part::Critic;
    let e = train(&dev, &cfg, Some(false))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("trainer.train_mode"), "{e}");
    // missing model folders
    let missing = tmp.path().join("no-such-model");
    let m = format!("model.model_name={}", p(&missing));
    let cfg =
        RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets(&[&m])).unwrap();
    let e = train(&dev, &cfg, Some(false))
        .expect_err("missing actor")
        .to_string();
    assert!(
        e.contains("model.model_name") && e.contains("no-such-model"),
        "{e}"
    );
    let m = format!("model.critic.model_name={}", p(&missing));
    let cfg =
        RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets(&[&m])).unwrap();
    let e = train(&dev, &cfg, Some(false))
        .expect_err("missing critic")
        .to_string();
    assert!(
        e.contains("model.critic.model_name") && e.contains("no-such-model"),
        "{e}"
    );
    assert!(
        !dir.join("metrics.jsonl").exists(),
        "nothing is written before the models load"
    );
}

/// On a device with a fixed memory (a GPU; here the emulated one given a budget), a run whose
/// step plan does not fit fails before loading anything or writing a file, naming the need
/// and the changes that would fit; with exactly the planned bytes it runs.
#[test]
fn a_run_that_does_not_fit_fails_before_its_first_step() {
    use nla_engine::device::emu::EmuMode;
    use nla_engine::device::emu_device::EmuDevice;
    use nla_engine::memory::{DtypePolicy, RunShape, StepOptions};

    let cpu = Dev::new();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&cpu, tmp.path(), 1);
    let data = write_data(tmp.path(), 2, 8, 4);
    let save = tmp.path().join("run");
    let cfg = config(
        &model,
        &data,
        &save,
        &[
            "trainer.total_training_steps=1",
            "trainer.save_steps=0",
            "trainer.val_steps=0",
            "optim.warmup_steps=0",
            "data.train_batch_size=4",
        ],
    );
    let tiny = tiny_config();
    let shape = RunShape::from_config(&cfg, tiny.clone(), tiny).unwrap();
    let opts = StepOptions {
        policy: DtypePolicy::cpu(),
        recompute: Recompute::None,
        gpus: 1,
        zero_stage: 0,
        logits_chunk: None,
    };
    let peak = shape.plan(&opts).unwrap().needed();
    eprintln!("planned peak {peak} bytes");
    assert!(peak > 100_000, "implausible plan: {peak} bytes");

    let dev = EmuDevice::new(EmuMode::Forward, 0).with_memory_budget(peak - 1);
    let e = train(&dev, &cfg, Some(false)).unwrap_err().to_string();
    assert!(
        e.contains("does not fit the device's free memory") && e.contains("per device"),
        "{e}"
    );
    assert_eq!(dev.launcher().launches(), 0, "ran kernels before refusing");
    assert!(!save.exists(), "wrote {} before refusing", save.display());

    let dev = EmuDevice::new(EmuMode::Forward, 0).with_memory_budget(peak);
    let s = train(&dev, &cfg, Some(false)).unwrap();
    assert_eq!(s.steps, 1);
    assert!(dev.launcher().launches() > 0);

    // with the logits in vocabulary chunks (V 258 in chunks of 16) and block recompute the
    // plan needs less, and a run given just that fits where the run without them is refused
    let chunked = StepOptions {
        logits_chunk: Some(16),
        recompute: Recompute::Block,
        ..opts
    };
    let peak_c = shape.plan(&chunked).unwrap().needed();
    eprintln!("planned peak with logits in chunks of 16 and block recompute: {peak_c} bytes");
    assert!(peak_c < peak, "{peak_c} vs {peak}");
    let save_c = tmp.path().join("run_chunked");
    let cfg_c = config(
        &model,
        &data,
        &save_c,
        &[
            "trainer.total_training_steps=1",
            "trainer.save_steps=0",
            "trainer.val_steps=0",
            "optim.warmup_steps=0",
            "data.train_batch_size=4",
            "trainer.logits_chunk=16",
            "trainer.recompute=block",
        ],
    );
    let dev = EmuDevice::new(EmuMode::Forward, 0).with_memory_budget(peak_c);
    let e = train(&dev, &cfg, Some(false)).unwrap_err().to_string();
    assert!(e.contains("does not fit the device's free memory"), "{e}");
    let s = train(&dev, &cfg_c, Some(false)).unwrap();
    assert_eq!(s.steps, 1);
}

/// `train` on the emulated device in bf16 (the GPU's default working dtype): SFT of actor and
/// critic with the first step's losses as the f32 CPU's up to bf16 rounding, then GRPO from the
/// same models (rollout with the KV cache in bf16, critic reward, policy loss, KL reference):
/// finite metrics, the first update's ratio 1 and KL 0 exactly (the same kernels on the same
/// weights), and rollout log-probs as the training pass's up to bf16 rounding.
#[test]
fn bf16_sft_and_grpo_run_on_the_emulated_device() {
    use nla_engine::device::emu::EmuMode;
    use nla_engine::device::emu_device::EmuDevice;
    use nla_engine::device::Dtype;

    let cpu = Dev::new();
    let bf16 = || {
        EmuDevice::new(EmuMode::Forward, 0)
            .with_work_dtype(Dtype::Bf16)
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&cpu, tmp.path(), 1);
    let data = write_data(tmp.path(), 2, 48, 16);
    let base = [
        "trainer.total_training_steps=2",
        "trainer.save_steps=0",
        "trainer.val_steps=0",
        "optim.warmup_steps=0",
        "data.train_batch_size=4",
    ];
    let (d32, d16) = (tmp.path().join("sft32"), tmp.path().join("sft16"));
    // f32 on the CPU: 40 SFT steps, whose checkpoint GRPO starts from below (explanations
    // that parse, so rewards that vary)
    let mut sft = base.to_vec();
    sft[0] = "trainer.total_training_steps=40";
    let ckpt = train(&cpu, &config(&model, &data, &d32, &sft), Some(false))
        .unwrap()
        .last_checkpoint
        .unwrap();
    let s = train(&bf16(), &config(&model, &data, &d16, &base), Some(false)).unwrap();
    assert_eq!(s.steps, 2);
    let (r32, r16) = (rows(&d32, "train"), rows(&d16, "train"));
    for k in ["actor_loss", "critic_loss"] {
        let (a, b) = (get(&r32[0], k), get(&r16[0], k));
        eprintln!("step 1 {k}: f32 {a:.6}, bf16 {b:.6}");
        // tests/bf16_model.rs: losses within 1e-3 relative on a whole model; the critic's
        // loss is an MSE of bf16-rounded states (measured there within 2.5e-3)
        assert!((a - b).abs() <= 1e-2 * a.abs(), "{k}: f32 {a} vs bf16 {b}");
    }

    let dir = tmp.path().join("grpo16");
    let actor = format!("model.model_name={}", p(&ckpt.join("actor")));
    let critic = format!("model.critic.model_name={}", p(&ckpt.join("critic")));
    let mut sets = base.to_vec();
    sets.extend([
        actor.as_str(),
        critic.as_str(),
        "trainer.algo=grpo",
        "grpo.n=2",
        "generation.temperature=0.7",
        "optim.lr_scheduler_type=constant",
    ]);
    let s = train(&bf16(), &config(&model, &data, &dir, &sets), Some(false)).unwrap();
    assert_eq!(s.steps, 2);
    let tr = rows(&dir, "train");
    for r in &tr {
        let m = |k: &str| get(r, k);
        for k in ["reward_mean", "actor_loss", "actor_grad_norm"] {
            assert!(m(k).is_finite(), "step {} {k}", r.step);
        }
        // decode (KV cache) and the full forward round differently in bf16: log-probs agree to
        // a few bf16 roundings of the logits, not to f32's 1e-4 (measured 4.5e-3, 5.1e-3)
        let diff = m("rollout_logp_diff");
        eprintln!("bf16 grpo step {}: rollout_logp_diff {diff:.2e}", r.step);
        assert!(diff < 3e-2, "step {}: rollout_logp_diff {diff}", r.step);
        assert_eq!(m("actor_ratio_mean"), 1.0, "step {}", r.step);
    }
    assert!(
        tr.iter()
            .any(|r| get(r, "failed_frac") < 1.0 && get(r, "advantage_std") > 0.1),
        "no step with a parsed explanation and non-zero advantages"
    );
    assert_eq!(get(&tr[0], "actor_kl"), 0.0);
}
