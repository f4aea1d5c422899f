//! Generation: the cached attention op against full attention, greedy decoding with the KV
//! cache against full recomputation, log-probabilities, sampling filters and reproducibility,
//! and injection of vectors at prefill.

mod common;

use common::fixtures_dir;
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{AttnDims, CacheDims, Device, InjectMode, SampleSpec, View, ViewMut};
use nla_engine::generate::{generate, generate_with, GenSpec, PromptInjection, StopReason};
use nla_engine::model::{forward, forward_with, ActivationSet, Batch, Injection, KvCache, Model};
use rand::{Rng, SeedableRng};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn decode_attention_matches_full_attention_with_left_padding() {
    let dev = CpuDevice::new();
    let (t, nh, nkv, hs) = (7, 4, 2, 8);
    // reference: full causal attention of one unpadded row of length t - pad
    for pad in [0usize, 3] {
        let tr = t - pad;
        let q = randn(tr * nh * hs, 1);
        let k = randn(tr * nkv * hs, 2);
        let v = randn(tr * nkv * hs, 3);
        let d = AttnDims {
            b: 1,
            t: tr,
            nh,
            nkv,
            hs,
        };
        let mut want = dev.alloc(tr * nh * hs).unwrap();
        let mut lse = dev.alloc(nh * tr).unwrap();
        let (qb, kb, vb) = (
            dev.upload(&q).unwrap(),
            dev.upload(&k).unwrap(),
            dev.upload(&v).unwrap(),
        );
        dev.attention_fwd(
            ViewMut::all(&mut want),
            ViewMut::all(&mut lse),
            View::all(&qb),
            View::all(&kb),
            View::all(&vb),
            d,
        )
        .unwrap();
        // cached: the row sits at positions pad..t of a cache of 9, queries are all its positions
        let tmax = 9;
        let mut kc = vec![7.0f32; tmax * nkv * hs]; // garbage outside the row must not be read
        let mut vc = vec![-7.0f32; tmax * nkv * hs];
        kc[pad * nkv * hs..t * nkv * hs].copy_from_slice(&k);
        vc[pad * nkv * hs..t * nkv * hs].copy_from_slice(&v);
        let mut qp = vec![0f32; t * nh * hs];
        qp[pad * nh * hs..].copy_from_slice(&q);
        let mut got = dev.alloc(t * nh * hs).unwrap();
        let dims = CacheDims {
            b: 1,
            tq: t,
            tmax,
            nh,
            nkv,
            hs,
            pos0: 0,
        };
        let starts = dev.upload_ids(&[pad as u32]).unwrap();
        let (kcb, vcb, qpb) = (
            dev.upload(&kc).unwrap(),
            dev.upload(&vc).unwrap(),
            dev.upload(&qp).unwrap(),
        );
        // queries before the row's start see no key: only ask from the start on
        let dims_real = CacheDims {
            tq: t - pad,
            pos0: pad,
            ..dims
        };
        let mut got_real = dev.alloc(tr * nh * hs).unwrap();
        let qreal = dev.upload(&qp[pad * nh * hs..]).unwrap();
        dev.decode_attention_fwd(
            ViewMut::all(&mut got_real),
            View::all(&qreal),
            View::all(&kcb),
            View::all(&vcb),
            &starts,
            None,
            dims_real,
        )
        .unwrap();
        // f32 sums in the same order up to the max-subtraction: a few ulp
        assert!(max_abs(&got_real, &want) < 1e-6, "pad {pad}");
        if pad == 0 {
            dev.decode_attention_fwd(
                ViewMut::all(&mut got),
                View::all(&qpb),
                View::all(&kcb),
                View::all(&vcb),
                &starts,
                None,
                dims,
            )
            .unwrap();
            assert!(max_abs(&got, &want) < 1e-6);
        } else {
            // queries before the row's start read no key and get 0; the others as above
            dev.decode_attention_fwd(
                ViewMut::all(&mut got),
                View::all(&qpb),
                View::all(&kcb),
                View::all(&vcb),
                &starts,
                None,
                dims,
            )
            .unwrap();
            assert!(got[..pad * nh * hs].iter().all(|&x| x == 0.0));
            assert!(max_abs(&got[pad * nh * hs..], &want) < 1e-6);
        }
    }
}

fn fixture_model(dev: &CpuDevice) -> Model<CpuDevice> {
    Model::load(dev, &fixtures_dir().join("models/gqa_untied")).unwrap()
}

/// Logits [T,V] of one row by a full forward.
fn full_logits(dev: &CpuDevice, model: &Model<CpuDevice>, row: &[u32]) -> Vec<f32> {
    let batch = Batch::causal_lm(&[row.to_vec()]).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, 1, row.len()).unwrap();
    forward(dev, model, &mut acts, &batch.upload(dev).unwrap()).unwrap();
    dev.download(View::all(&acts.logits)).unwrap()
}

fn log_softmax_at(x: &[f32], temp: f32, i: usize) -> f64 {
    let m = x.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = x
        .iter()
        .map(|&v| (v as f64 / temp as f64 - m / temp as f64).exp())
        .sum();
    x[i] as f64 / temp as f64 - m / temp as f64 - z.ln()
}

fn spec(temperature: f32, n: usize, seed: u64) -> GenSpec {
    GenSpec {
        n,
        max_new_tokens: 8,
        sample: SampleSpec {
            temperature,
            top_k: 0,
            top_p: 1.0,
        },
        eos_ids: vec![],
        seed,
    }
}

#[test]
fn kv_cache_generation_matches_full_recomputation() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let v = model.cfg.vocab_size;
    // different lengths: the shorter prompt is left-padded
    let prompts = vec![vec![5u32, 17, 3, 44, 9], vec![60u32, 2]];
    let never = |_: &[u32]| false;
    for temp in [0.0f32, 0.8] {
        let out = generate(&dev, &model, &prompts, &spec(temp, 2, 11), &never).unwrap();
        assert_eq!(out.len(), 4);
        for s in &out {
            assert_eq!(s.tokens.len(), 8);
            assert_eq!(s.stop, StopReason::Length);
            let mut row = prompts[s.prompt].clone();
            for (k, &tok) in s.tokens.iter().enumerate() {
                let logits = full_logits(&dev, &model, &row);
                let last = &logits[(row.len() - 1) * v..row.len() * v];
                if temp == 0.0 {
                    let argmax = (0..v).fold(0, |b, i| if last[i] > last[b] { i } else { b });
                    assert_eq!(tok as usize, argmax, "prompt {} token {k}", s.prompt);
                } else {
                    // the cached pass and the full pass round differently: f32 noise only
                    let want = log_softmax_at(last, temp, tok as usize);
                    assert!(
                        (s.logps[k] as f64 - want).abs() < 1e-4,
                        "logp {} vs {want}",
                        s.logps[k]
                    );
                }
                row.push(tok);
            }
        }
    }
}

#[test]
fn sampling_is_reproducible_and_per_sample() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let never = |_: &[u32]| false;
    let a = vec![vec![5u32, 17, 3]];
    let ab = vec![vec![5u32, 17, 3], vec![9u32, 9, 9, 9]];
    let x = generate(&dev, &model, &a, &spec(1.0, 3, 7), &never).unwrap();
    let y = generate(&dev, &model, &a, &spec(1.0, 3, 7), &never).unwrap();
    assert_eq!(x, y);
    // another prompt in the batch changes nothing for prompt 0's samples
    let z = generate(&dev, &model, &ab, &spec(1.0, 3, 7), &never).unwrap();
    for (s, t) in x.iter().zip(&z) {
        assert_eq!(s.tokens, t.tokens);
        for (p, q) in s.logps.iter().zip(&t.logps) {
            assert!((p - q).abs() < 1e-5);
        }
    }
    // samples of a group differ from each other, and another seed gives other samples
    assert!(x[0].tokens != x[1].tokens || x[1].tokens != x[2].tokens);
    let w = generate(&dev, &model, &a, &spec(1.0, 3, 8), &never).unwrap();
    assert_ne!(x, w);
}

#[test]
fn eos_and_stop_check_end_samples() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let prompts = vec![vec![1u32, 2, 3]];
    let mut s = spec(1.0, 2, 3);
    s.eos_ids = (0..model.cfg.vocab_size as u32).collect();
    let out = generate(&dev, &model, &prompts, &s, &|_: &[u32]| false).unwrap();
    assert!(out
        .iter()
        .all(|x| x.stop == StopReason::Eos && x.tokens.len() == 1));
    let out = generate(&dev, &model, &prompts, &spec(1.0, 2, 3), &|t: &[u32]| {
        t.len() == 3
    })
    .unwrap();
    assert!(out
        .iter()
        .all(|x| x.stop == StopReason::Stop && x.tokens.len() == 3));
}

#[test]
fn sample_op_follows_temperature_top_k_and_top_p() {
    let dev = CpuDevice::new();
    let logits = vec![2.0f32, 1.0, 0.5, -1.0, 1.5];
    let v = logits.len();
    let n = 20000;
    let all: Vec<f32> = logits.iter().cycle().take(n * v).copied().collect();
    let lb = dev.upload(&all).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let u: Vec<f32> = (0..n).map(|_| r.random::<f32>()).collect();
    let ub = dev.upload(&u).unwrap();
    let freq = |spec: SampleSpec| {
        let mut ids = dev.upload_ids(&vec![0; n]).unwrap();
        let mut lp = dev.alloc(n).unwrap();
        dev.sample_fwd(
            &mut ids,
            ViewMut::all(&mut lp),
            View::all(&lb),
            View::all(&ub),
            n,
            v,
            &spec,
        )
        .unwrap();
        let mut f = vec![0f64; v];
        for id in dev.download_ids(&ids).unwrap() {
            f[id as usize] += 1.0 / n as f64;
        }
        f
    };
    let probs = |t: f64, keep: &[usize]| {
        let z: f64 = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).sum();
        let mut p = vec![0f64; v];
        for &i in keep {
            p[i] = (logits[i] as f64 / t).exp() / z;
        }
        p
    };
    // 20000 draws: a frequency's standard error is at most 0.0036; allow 4 sigma
    let close = |got: Vec<f64>, want: Vec<f64>| {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.015, "{got:?} vs {want:?}");
        }
    };
    close(
        freq(SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }),
        probs(1.0, &[0, 1, 2, 3, 4]),
    );
    close(
        freq(SampleSpec {
            temperature: 0.5,
            top_k: 0,
            top_p: 1.0,
        }),
        probs(0.5, &[0, 1, 2, 3, 4]),
    );
    close(
        freq(SampleSpec {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        }),
        probs(1.0, &[0, 4]),
    );
    // softmax(2, 1.5, 1, .5, -1): 0.43, 0.26, ... -> top_p 0.6 keeps the first two
    close(
        freq(SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.6,
        }),
        probs(1.0, &[0, 4]),
    );
    close(
        freq(SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }),
        probs(1.0, &[0]),
    );
    // bad settings are errors
    let mut ids = dev.upload_ids(&[0]).unwrap();
    let mut lp = dev.alloc(1).unwrap();
    let one = dev.upload(&logits).unwrap();
    let u1 = dev.upload(&[0.5]).unwrap();
    for bad in [
        SampleSpec {
            temperature: -1.0,
            top_k: 0,
            top_p: 1.0,
        },
        SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.0,
        },
    ] {
        assert!(dev
            .sample_fwd(
                &mut ids,
                ViewMut::all(&mut lp),
                View::all(&one),
                View::all(&u1),
                1,
                v,
                &bad
            )
            .is_err());
    }
}

/// Logits [T,V] of one unpadded row by a full forward, with `inj`'s vectors of prompt `p` at
/// its positions.
fn full_logits_injected(
    dev: &CpuDevice,
    model: &Model<CpuDevice>,
    row: &[u32],
    inj: &PromptInjection,
    p: usize,
) -> Vec<f32> {
    let batch = Batch::causal_lm(&[row.to_vec()]).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, 1, row.len()).unwrap();
    let sites: Vec<u32> = inj.sites[p].iter().map(|&t| t as u32).collect();
    let i = Injection::new(
        dev,
        inj.layers.clone(),
        inj.mode,
        &sites,
        &inj.vecs[p],
        model.cfg.hidden_size,
    )
    .unwrap();
    forward_with(dev, model, &mut acts, &batch.upload(dev).unwrap(), Some(&i)).unwrap();
    dev.download(View::all(&acts.logits)).unwrap()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

/// Three prompts of different lengths (left padding): marker sites in the middle, at the last
/// position (where an injection after the last block reaches the logits), and none.
fn injection_case(
    c: usize,
    layers: Vec<usize>,
    mode: InjectMode,
) -> (Vec<Vec<u32>>, PromptInjection) {
    let prompts = vec![vec![5u32, 17, 3, 44, 9], vec![60u32, 2], vec![8u32, 31, 70]];
    let sites = vec![vec![1usize, 3], vec![0, 1], vec![]];
    let vecs = sites
        .iter()
        .enumerate()
        .map(|(p, s)| randn(s.len() * c, 100 + p as u64))
        .collect();
    let inj = PromptInjection {
        layers,
        mode,
        sites,
        vecs,
    };
    (prompts, inj)
}

#[test]
fn injected_generation_matches_full_recomputation() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let (v, c) = (model.cfg.vocab_size, model.cfg.hidden_size);
    assert!(model.cfg.num_hidden_layers >= 2);
    let never = |_: &[u32]| false;
    let greedy = spec(0.0, 2, 11);
    for layers in [vec![0usize], vec![0, 2], vec![1]] {
        for mode in [InjectMode::Replace, InjectMode::Add] {
            let (prompts, inj) = injection_case(c, layers.clone(), mode);
            let plain = generate(&dev, &model, &prompts, &greedy, &never).unwrap();
            let out = generate_with(&dev, &model, &prompts, &greedy, Some(&inj), &never).unwrap();
            assert_eq!(out.len(), 6);
            for s in &out {
                assert_eq!(s.tokens.len(), 8);
                let mut row = prompts[s.prompt].clone();
                for (k, &tok) in s.tokens.iter().enumerate() {
                    let logits = full_logits_injected(&dev, &model, &row, &inj, s.prompt);
                    let last = &logits[(row.len() - 1) * v..row.len() * v];
                    assert_eq!(
                        tok as usize,
                        argmax(last),
                        "layers {layers:?} {mode:?} prompt {} sample {} token {k}",
                        s.prompt,
                        s.index
                    );
                    row.push(tok);
                }
            }
            // the vectors reach the output of the prompts that have sites; the other is as
            // without injection
            for (a, b) in out.iter().zip(&plain) {
                if inj.sites[a.prompt].is_empty() {
                    assert_eq!(a.tokens, b.tokens, "layers {layers:?} {mode:?}");
                } else {
                    assert_ne!(
                        a.tokens, b.tokens,
                        "layers {layers:?} {mode:?} prompt {}",
                        a.prompt
                    );
                }
            }
        }
    }
}

#[test]
fn empty_injection_equals_plain_generation() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let never = |_: &[u32]| false;
    let (prompts, mut inj) = injection_case(model.cfg.hidden_size, vec![0], InjectMode::Add);
    inj.sites = vec![vec![]; 3];
    inj.vecs = vec![vec![]; 3];
    let s = spec(0.8, 2, 5);
    let a = generate(&dev, &model, &prompts, &s, &never).unwrap();
    let b = generate_with(&dev, &model, &prompts, &s, Some(&inj), &never).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_injection_is_an_error_naming_the_prompt() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let c = model.cfg.hidden_size;
    let never = |_: &[u32]| false;
    let s = spec(0.0, 2, 1);
    let err = |inj: &PromptInjection, prompts: &[Vec<u32>]| {
        generate_with(&dev, &model, prompts, &s, Some(inj), &never)
            .unwrap_err()
            .to_string()
    };
    // a site past prompt 1's end (it has 2 tokens)
    let (prompts, mut inj) = injection_case(c, vec![0], InjectMode::Replace);
    inj.sites[1] = vec![0, 2];
    let e = err(&inj, &prompts);
    assert!(e.contains("prompt 1") && e.contains("site 2"), "{e}");
    // a vector of the wrong length
    let (prompts, mut inj) = injection_case(c, vec![0], InjectMode::Replace);
    inj.vecs[1].pop();
    let e = err(&inj, &prompts);
    assert!(
        e.contains("prompt 1") && e.contains("vector elements"),
        "{e}"
    );
    // a site twice
    let (prompts, mut inj) = injection_case(c, vec![0], InjectMode::Replace);
    inj.sites[0] = vec![3, 3];
    let e = err(&inj, &prompts);
    assert!(e.contains("prompt 0") && e.contains("twice"), "{e}");
    // sites for another number of prompts
    let (prompts, mut inj) = injection_case(c, vec![0], InjectMode::Replace);
    inj.sites.pop();
    assert!(err(&inj, &prompts).contains("need 3"));
    // a layer past the last block's output (L = 2)
    let (prompts, inj) = injection_case(c, vec![3], InjectMode::Replace);
    assert!(err(&inj, &prompts).contains("layer 3"));
}

#[test]
fn kv_cache_step_rejects_sites_outside_the_step() {
    let dev = CpuDevice::new();
    let model = fixture_model(&dev);
    let c = model.cfg.hidden_size;
    let (b, tq) = (2, 3);
    let mut cache = KvCache::new(&dev, &model.cfg, &[0, 0], 8, tq).unwrap();
    let ids = dev.upload_ids(&[1, 2, 3, 4, 5, 6]).unwrap();
    let bad = Injection::new(&dev, vec![0], InjectMode::Add, &[5, 6], &randn(2 * c, 3), c).unwrap();
    let e = cache
        .step_with(&dev, &model, &ids, tq, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 6") && e.contains(&format!("{}", b * tq)),
        "{e}"
    );
    let layer = Injection::new(&dev, vec![3], InjectMode::Add, &[5], &randn(c, 3), c).unwrap();
    assert!(cache
        .step_with(&dev, &model, &ids, tq, Some(&layer))
        .is_err());
    // nothing was written: a good step still starts at position 0
    assert_eq!(cache.len, 0);
    let ok = Injection::new(&dev, vec![0], InjectMode::Add, &[5], &randn(c, 3), c).unwrap();
    cache.step_with(&dev, &model, &ids, tq, Some(&ok)).unwrap();
    assert_eq!(cache.len, tq);
}
