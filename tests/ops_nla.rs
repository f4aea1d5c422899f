//! The NLA ops (inject, norm_scale, pool, reward_advantage, policy_loss): against the PyTorch
//! fixtures (f32 engine vs f64 reference), against finite differences (f64 twins), against
//! hand-computed rewards, and through the `Device` trait (checks, `=` / `+=`).

mod common;

use common::ops::{amax, assert_invalid, dot64, m, random, random_f32, rng, tensor, v, Buf, U};
use common::{assert_close, fixtures_dir, load_tensors, Tensor};
use nla_engine::device::cpu::{self, CpuDevice};
use nla_engine::device::{
    Advantage, Device, InjectMode, KlType, LossAgg, PolicyLossSpec, PolicyStat, PoolMode,
    RewardSpec, RewardTransform, View, ViewMut,
};
use rand::Rng;

// ------------------------------------------------------------------------------------------
// Fixtures: tests/reference/fixtures/nla.safetensors (f64 reference rounded to f32)
// ------------------------------------------------------------------------------------------

fn fx(name: &str) -> &'static Tensor {
    tensor("nla.safetensors", name)
}

fn data(name: &str) -> Buf {
    fx(name).data.clone()
}

#[test]
fn inject_fixture() {
    let dev = CpuDevice;
    let (h, vecs) = (data("inject.inputs.h"), data("inject.inputs.vecs"));
    let sites = fx("inject.inputs.sites").ids();
    let (n, c) = (
        fx("inject.inputs.h").shape[0],
        fx("inject.inputs.h").shape[1],
    );
    for (name, mode) in [("replace", InjectMode::Replace), ("add", InjectMode::Add)] {
        let mut out = h.clone();
        dev.inject_fwd(m(&mut out), &sites, v(&vecs), n, c, mode)
            .unwrap();
        // A copy, or one f32 add (rounded once, as the f64 sum rounded to f32 is): bit-exact.
        let want = &fx(&format!("inject.{name}.out")).data;
        assert_close(&format!("inject {name} out"), &out, want, 0.0, 0.0, 0.0);

        let mut dh = data(&format!("inject.{name}.dout"));
        let mut dvecs = vec![f32::NAN; vecs.len()];
        dev.inject_bwd(m(&mut dvecs), m(&mut dh), &sites, n, c, mode)
            .unwrap();
        // Gathered and zeroed rows: bit-exact.
        for (what, got) in [("dh", &dh), ("dvecs", &dvecs)] {
            let want = &fx(&format!("inject.{name}.{what}")).data;
            assert_close(&format!("inject {name} {what}"), got, want, 0.0, 0.0, 0.0);
        }
    }
}

#[test]
fn norm_scale_fixture() {
    let dev = CpuDevice;
    for case in ["rows", "clamp"] {
        let key = |t: &str| format!("norm_scale.{case}.{t}");
        let x = data(&key("x"));
        let s = fx(&key("s")).scalar();
        let (n, d) = (fx(&key("x")).shape[0], fx(&key("x")).shape[1]);
        let mut y = vec![f32::NAN; x.len()];
        dev.norm_scale_fwd(m(&mut y), v(&x), n, d, s).unwrap();
        let dy = data(&key("dout"));
        let mut dx = vec![f32::NAN; x.len()];
        dev.norm_scale_bwd(m(&mut dx), v(&dy), v(&x), n, d, s)
            .unwrap();
        let (want_y, want_dx) = (&fx(&key("out")).data, &fx(&key("dx")).data);
        // Row by row: the rows differ in scale by up to 1e6 (and 1e12 across the clamp).
        for r in 0..n {
            let row = r * d..(r + 1) * d;
            // y = x * (s / ||x||): a length-D (9) lane sum of squares, sqrt, divide and product
            // (~2 u relative measured); below the clamp two roundings. 4 u relative allowed.
            assert_close(
                &format!("norm_scale {case} y row {r}"),
                &y[row.clone()],
                &want_y[row.clone()],
                0.0,
                4.0 * U,
                1e-13,
            );
            // dx = (s/||x||)(dy - x_hat (x_hat . dy)): the difference cancels, so the error is
            // ~u of the row's scale (s/||x||) |dy| rather than of |dx| (<= 1.7 u of the row's
            // largest entry measured, 7.4 u relative at a small entry): 4 u of the largest
            // entry, 8 u relative.
            let w = &want_dx[row.clone()];
            assert_close(
                &format!("norm_scale {case} dx row {r}"),
                &dx[row],
                w,
                4.0 * U * amax(w),
                8.0 * U,
                1e-12,
            );
        }
    }
}

#[test]
fn pool_fixture() {
    let dev = CpuDevice;
    let (h, mask, w, dout) = (
        data("pool.inputs.h"),
        data("pool.inputs.mask"),
        data("pool.inputs.w"),
        data("pool.inputs.dout"),
    );
    let shape = &fx("pool.inputs.h").shape;
    let (b, t, c) = (shape[0], shape[1], shape[2]);
    let modes = [
        ("last", PoolMode::Last),
        ("mean", PoolMode::Mean),
        ("max", PoolMode::Max),
        ("weighted", PoolMode::Weighted),
    ];
    for (name, mode) in modes {
        let wv = (mode == PoolMode::Weighted).then(|| v(&w));
        let mut out = vec![f32::NAN; b * c];
        dev.pool_fwd(m(&mut out), v(&h), v(&mask), wv, b, t, c, mode)
            .unwrap();
        let mut dh = vec![f32::NAN; h.len()];
        let mut dw = vec![0.0; w.len()];
        let dwv = (mode == PoolMode::Weighted).then(|| m(&mut dw));
        dev.pool_bwd(
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
        let (want_out, want_dh) = (
            &fx(&format!("pool.{name}.out")).data,
            &fx(&format!("pool.{name}.dh")).data,
        );
        match mode {
            // Gathers and copies: bit-exact.
            PoolMode::Last | PoolMode::Max => {
                assert_close(&format!("pool {name} out"), &out, want_out, 0.0, 0.0, 0.0);
                assert_close(&format!("pool {name} dh"), &dh, want_dh, 0.0, 0.0, 0.0);
            }
            // A sum of <= 6 O(1) values then one multiply: cancellation makes the error ~u of
            // the terms' scale (1.3 u of the largest entry measured), 4 u of it; dh = m dout /
            // len: 2 roundings.
            PoolMode::Mean => {
                assert_close(
                    "pool mean out",
                    &out,
                    want_out,
                    4.0 * U * amax(want_out),
                    4.0 * U,
                    1e-13,
                );
                assert_close("pool mean dh", &dh, want_dh, 0.0, 2.0 * U, 1e-13);
            }
            // alpha carries the softmax's error (vexp 2 ulp, f64 sum, divide, then the
            // renormalisation); out sums 6 terms that cancel: 2.4 u of the largest entry
            // measured, 6 u allowed. dh = alpha dout: ~3 u relative. dw = p (dp - p.dp) with
            // dp = m (g - gbar) / D: two cancelling differences of length-C dots, 3 u of the
            // largest entry measured, 8 u allowed.
            PoolMode::Weighted => {
                assert_close(
                    "pool weighted out",
                    &out,
                    want_out,
                    6.0 * U * amax(want_out),
                    6.0 * U,
                    1e-12,
                );
                assert_close(
                    "pool weighted dh",
                    &dh,
                    want_dh,
                    4.0 * U * amax(want_dh),
                    8.0 * U,
                    1e-12,
                );
                let want_dw = &fx("pool.weighted.dw").data;
                assert_close(
                    "pool weighted dw",
                    &dw,
                    want_dw,
                    8.0 * U * amax(want_dw),
                    16.0 * U,
                    1e-11,
                );
            }
        }
    }
}

/// The spec of each policy_loss fixture case (the script's POLICY_CASES).
fn policy_case(case: &str) -> PolicyLossSpec {
    let base = PolicyLossSpec {
        clip_low: fx("policy_loss.inputs.clip_low").scalar(),
        clip_high: fx("policy_loss.inputs.clip_high").scalar(),
        dual_clip: None,
        kl_coef: 0.0,
        kl_type: KlType::K1,
        agg: LossAgg::TokenMean,
    };
    let kl = |kl_type| PolicyLossSpec {
        kl_coef: 0.1,
        kl_type,
        ..base
    };
    match case {
        "token_mean" => base,
        "seq_mean_token_mean" => PolicyLossSpec {
            agg: LossAgg::SeqMeanTokenMean,
            ..base
        },
        "seq_mean_token_sum_norm" => PolicyLossSpec {
            agg: LossAgg::SeqMeanTokenSumNorm,
            ..base
        },
        "dual_clip" => PolicyLossSpec {
            dual_clip: Some(3.0),
            ..base
        },
        "kl_k1" => kl(KlType::K1),
        "kl_k2" => kl(KlType::K2),
        "kl_k3" => kl(KlType::K3),
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn policy_loss_fixture() {
    let dev = CpuDevice;
    let inp = |t: &str| data(&format!("policy_loss.inputs.{t}"));
    let (logp, old, adv, mask, reference) = (
        inp("logp"),
        inp("old_logp"),
        inp("adv"),
        inp("mask"),
        inp("ref_logp"),
    );
    let shape = &fx("policy_loss.inputs.logp").shape;
    let (s, t) = (shape[0], shape[1]);
    let cases = [
        "token_mean",
        "seq_mean_token_mean",
        "seq_mean_token_sum_norm",
        "dual_clip",
        "kl_k1",
        "kl_k2",
        "kl_k3",
    ];
    for case in cases {
        let spec = policy_case(case);
        let r = case.starts_with("kl_").then(|| v(&reference));
        let mut stats = vec![f32::NAN; PolicyStat::COUNT];
        dev.policy_loss_fwd(
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
        let mut dlogp = vec![f32::NAN; logp.len()];
        dev.policy_loss_bwd(
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
        // Everything is computed in f64 from the same f32 inputs and rounded once, as the
        // reference is: at most an ulp apart (2 u relative); the absolute term covers values
        // that are sums of cancelling terms (the loss, approx_kl).
        let want = &fx(&format!("policy_loss.{case}.stats")).data;
        assert_close(
            &format!("policy_loss {case} stats"),
            &stats,
            want,
            2.0 * U * amax(want),
            2.0 * U,
            1e-13,
        );
        let want = &fx(&format!("policy_loss.{case}.dlogp")).data;
        assert_close(
            &format!("policy_loss {case} dlogp"),
            &dlogp,
            want,
            2.0 * U * amax(want),
            2.0 * U,
            1e-13,
        );
    }
}

#[test]
fn inject_llama_fixture_is_consistent() {
    // The model folder for the model-level injection test: the engine loads it, and the
    // expected file's sites are the marker positions in row-major order.
    let dir = fixtures_dir().join("models/inject_llama");
    let dev = CpuDevice;
    let model = nla_engine::model::Model::load(&dev, &dir).unwrap();
    let exp = load_tensors(&dir.join("expected.safetensors"));
    let (ids, sites) = (exp["ids"].ids(), exp["sites"].ids());
    let marker = exp["marker_id"].scalar() as u32;
    let want: Vec<u32> = (0..ids.len() as u32)
        .filter(|&i| ids[i as usize] == marker)
        .collect();
    assert_eq!(sites, want);
    let c = model.cfg.hidden_size;
    assert_eq!(exp["vecs"].shape, [sites.len(), c]);
    assert_eq!(exp["grad.vecs"].shape, [sites.len(), c]);
    let (b, t) = (exp["ids"].shape[0], exp["ids"].shape[1]);
    assert_eq!(exp["logits"].shape, [b, t, model.cfg.vocab_size]);
    // replace passes no gradient to the overwritten embedding rows: the marker's row is zero
    let dwte = &exp["grad.model.embed_tokens.weight"].data;
    let row = marker as usize * c;
    assert!(dwte[row..row + c].iter().all(|&x| x == 0.0));
    assert!(exp["grad.vecs"].data.iter().any(|&x| x != 0.0));

    // The embedding output with the vectors injected: rows at sites are the vectors.
    let n = b * t;
    let wte = View::range(&model.params, model.table.wte, model.cfg.vocab_size * c);
    let mut h = vec![f32::NAN; n * c];
    dev.embedding_fwd(m(&mut h), &ids, wte, n, c).unwrap();
    let vecs = exp["vecs"].data.clone();
    dev.inject_fwd(m(&mut h), &sites, v(&vecs), n, c, InjectMode::Replace)
        .unwrap();
    for (k, &site) in sites.iter().enumerate() {
        assert_eq!(
            &h[site as usize * c..][..c],
            &vecs[k * c..][..c],
            "site {k}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Finite differences in f64: every backward against central differences of L = sum(r * out)
// ------------------------------------------------------------------------------------------

/// Checks `grad` (the backward's dL/dx) against central differences of `loss` at `x`, with
/// step `1e-6 * step(i)` on coordinate i (the coordinate's scale), on every coordinate. The
/// relative error must be below 1e-6, measured against max(|fd|, 1% of the largest |grad|).
#[track_caller]
fn check_fd(
    what: &str,
    x: &[f64],
    grad: &[f64],
    step: impl Fn(usize) -> f64,
    loss: impl Fn(&[f64]) -> f64,
) {
    assert_eq!(x.len(), grad.len(), "{what}: gradient length");
    let floor = 0.01 * grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(floor > 0.0, "{what}: gradient is identically zero");
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        let h = 1e-6 * step(i);
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * h);
        let err = (fd - grad[i]).abs() / fd.abs().max(floor);
        assert!(
            err < 1e-6,
            "{what}[{i}]: backward {} vs finite difference {fd} (rel err {err:e})",
            grad[i]
        );
    }
}

/// The usual step scale: max(|x_i|, 1).
fn unit_step(x: &[f64]) -> impl Fn(usize) -> f64 + '_ {
    move |i| x[i].abs().max(1.0)
}

#[test]
fn inject_fd() {
    let (n, c) = (7, 4);
    let sites: Vec<u32> = vec![5, 0, 3];
    let h = random(n * c, 1);
    let vecs = random(sites.len() * c, 2);
    let r = random(n * c, 3);
    for mode in [InjectMode::Replace, InjectMode::Add] {
        let fwd = |h: &[f64], vecs: &[f64]| {
            let mut out = h.to_vec();
            cpu::inject::inject_fwd(&mut out, &sites, vecs, c, mode);
            dot64(&r, &out)
        };
        let mut dh = r.clone();
        let mut dvecs = vec![f64::NAN; vecs.len()];
        cpu::inject::inject_bwd(&mut dvecs, &mut dh, &sites, c, mode);
        let tag = format!("inject {mode:?}");
        check_fd(&format!("{tag} dh"), &h, &dh, unit_step(&h), |h| {
            fwd(h, &vecs)
        });
        check_fd(
            &format!("{tag} dvecs"),
            &vecs,
            &dvecs,
            unit_step(&vecs),
            |vv| fwd(&h, vv),
        );
    }
}

#[test]
fn norm_scale_fd() {
    let (n, d, s) = (5, 6, 3.5f32);
    let mut x = random(n * d, 4);
    // row 2: norm ~3e-12, just above the clamp; row 3: norm ~5e-13, below it (linear there)
    let norm = |row: &[f64]| dot64(row, row).sqrt();
    let k2 = 3e-12 / norm(&x[2 * d..3 * d]);
    let k3 = 5e-13 / norm(&x[3 * d..4 * d]);
    x[2 * d..3 * d].iter_mut().for_each(|v| *v *= k2);
    x[3 * d..4 * d].iter_mut().for_each(|v| *v *= k3);
    let r = random(n * d, 5);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; n * d];
        cpu::norm_scale::norm_scale_fwd(&mut y, x, d, s);
        dot64(&r, &y)
    };
    let mut dx = vec![f64::NAN; n * d];
    cpu::norm_scale::norm_scale_bwd(&mut dx, &r, &x, d, s);
    // below the clamp: dx = (s / 1e-12) r exactly
    for i in 3 * d..4 * d {
        assert_eq!(dx[i], s as f64 / 1e-12 * r[i], "clamped row, [{i}]");
    }
    // each coordinate steps relative to its row's norm (the tiny rows need tiny steps)
    let rows: Vec<f64> = x.chunks(d).map(norm).collect();
    check_fd("norm_scale dx", &x, &dx, |i| rows[i / d], fwd);
}

#[test]
fn pool_fd() {
    let (b, t, c, tmax) = (4, 5, 3, 7);
    let lens = [5usize, 2, 1, 4];
    let mask: Vec<f64> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |i| if i < l { 1.0 } else { 0.0 }))
        .collect();
    let h = random(b * t * c, 6);
    let w: Vec<f64> = random(tmax, 7).iter().map(|x| 2.0 * x).collect();
    let r = random(b * c, 8);
    for mode in [
        PoolMode::Last,
        PoolMode::Mean,
        PoolMode::Max,
        PoolMode::Weighted,
    ] {
        let wv: &[f64] = if mode == PoolMode::Weighted { &w } else { &[] };
        let fwd = |h: &[f64], w: &[f64]| {
            let mut out = vec![0.0; b * c];
            cpu::pool::pool_fwd(&mut out, h, &mask, w, t, c, mode);
            dot64(&r, &out)
        };
        let mut dh = vec![f64::NAN; h.len()];
        let mut dw = vec![0.0; wv.len()];
        cpu::pool::pool_bwd(&mut dh, &mut dw, &r, &h, &mask, wv, t, c, mode);
        for (i, &mk) in mask.iter().enumerate() {
            if mk == 0.0 {
                assert!(
                    dh[i * c..(i + 1) * c].iter().all(|&g| g == 0.0),
                    "{mode:?}: padding gets no gradient"
                );
            }
        }
        check_fd(&format!("pool {mode:?} dh"), &h, &dh, unit_step(&h), |h| {
            fwd(h, wv)
        });
        if mode == PoolMode::Weighted {
            assert!(dw[t..].iter().all(|&g| g == 0.0), "w beyond T is unused");
            check_fd("pool weighted dw", &w, &dw, unit_step(&w), |w| fwd(&h, w));
        }
    }
}

/// S sequences of T tokens: lengths given, random log-probs with ratios on both sides of the
/// clip range and far enough from every kink, advantages of both signs, a reference policy.
struct PolicyInputs {
    s: usize,
    t: usize,
    logp: Vec<f64>,
    old: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<f64>,
    reference: Vec<f64>,
}

fn policy_inputs(lens: &[usize], t: usize, seed: u64) -> PolicyInputs {
    let s = lens.len();
    let mut r = rng(seed);
    let old: Vec<f64> = (0..s * t).map(|_| -r.random_range(0.1..3.0)).collect();
    let logp: Vec<f64> = old
        .iter()
        .map(|&o| o + r.random_range(-1.5..1.5f64))
        .collect();
    let reference: Vec<f64> = logp
        .iter()
        .map(|&l| l + r.random_range(-4.0..4.0f64))
        .collect();
    let adv: Vec<f64> = (0..s)
        .flat_map(|i| {
            let a = if i % 2 == 0 { 0.8 } else { -1.1 } * (1.0 + i as f64 * 0.1);
            std::iter::repeat_n(a, t)
        })
        .collect();
    let mask: Vec<f64> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |i| if i < l { 1.0 } else { 0.0 }))
        .collect();
    PolicyInputs {
        s,
        t,
        logp,
        old,
        adv,
        mask,
        reference,
    }
}

fn policy_loss64(p: &PolicyInputs, logp: &[f64], spec: &PolicyLossSpec) -> f64 {
    let mut stats = vec![0.0; PolicyStat::COUNT];
    cpu::policy_loss::policy_loss_fwd(
        &mut stats,
        logp,
        &p.old,
        &p.adv,
        &p.mask,
        Some(&p.reference),
        p.t,
        spec,
    );
    stats[PolicyStat::LOSS]
}

fn policy_dlogp64(p: &PolicyInputs, logp: &[f64], spec: &PolicyLossSpec) -> Vec<f64> {
    let mut d = vec![f64::NAN; logp.len()];
    cpu::policy_loss::policy_loss_bwd(
        &mut d,
        logp,
        &p.old,
        &p.adv,
        &p.mask,
        Some(&p.reference),
        p.t,
        spec,
    );
    d
}

fn policy_specs() -> Vec<PolicyLossSpec> {
    let base = PolicyLossSpec {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: Some(3.0),
        kl_coef: 0.05,
        kl_type: KlType::K3,
        agg: LossAgg::TokenMean,
    };
    let mut specs = Vec::new();
    for agg in [
        LossAgg::TokenMean,
        LossAgg::SeqMeanTokenMean,
        LossAgg::SeqMeanTokenSumNorm,
    ] {
        for kl_type in [KlType::K1, KlType::K2, KlType::K3] {
            specs.push(PolicyLossSpec {
                agg,
                kl_type,
                ..base
            });
        }
        specs.push(PolicyLossSpec {
            agg,
            dual_clip: None,
            kl_coef: 0.0,
            ..base
        });
    }
    specs
}

#[test]
fn policy_loss_fd() {
    let p = policy_inputs(&[7, 3, 0, 5, 1], 7, 9);
    // the inputs exercise every branch: clipped on both sides, dual clip, k3's clamp
    let (mut above, mut below, mut dual, mut k3_clamped) = (false, false, false, false);
    for i in 0..p.logp.len() {
        if p.mask[i] == 0.0 {
            continue;
        }
        let (ratio, a) = ((p.logp[i] - p.old[i]).exp(), p.adv[i]);
        above |= a > 0.0 && ratio > 1.28;
        below |= a < 0.0 && ratio < 0.8;
        dual |= a < 0.0 && ratio > 3.0;
        let x = p.reference[i] - p.logp[i];
        k3_clamped |= x.exp() - x - 1.0 > 10.0;
    }
    assert!(
        above && below && dual && k3_clamped,
        "{above} {below} {dual} {k3_clamped}"
    );
    for spec in policy_specs() {
        let dlogp = policy_dlogp64(&p, &p.logp, &spec);
        for (i, &d) in dlogp.iter().enumerate() {
            if p.mask[i] == 0.0 {
                assert_eq!(d, 0.0, "masked token {i} gets no gradient");
            }
        }
        let what = format!(
            "policy_loss {:?} {:?} dual {:?}",
            spec.agg, spec.kl_type, spec.dual_clip
        );
        check_fd(&what, &p.logp, &dlogp, unit_step(&p.logp), |l| {
            policy_loss64(&p, l, &spec)
        });
    }
}

#[test]
fn policy_loss_reaches_logits_through_cross_entropy_bwd() {
    // logp[n] = logits[n, y_n] - logsumexp(logits[n]) = -cross_entropy (mask 1), so
    // d loss / d logits = -dlogp (softmax - onehot) = the cross-entropy's backward with
    // mask := -dlogp, scale 1 (cross_entropy_chunk_bwd over one chunk of all V, as training).
    let (vv, t) = (6, 4);
    let p0 = policy_inputs(&[4, 2, 3], t, 10);
    let n = p0.s * t;
    let logits: Vec<f64> = random(n * vv, 11).iter().map(|x| 3.0 * x).collect();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 1) % vv as u32).collect();
    let ones = vec![1.0; n];
    use cpu::cross_entropy::{cross_entropy_chunk_bwd, cross_entropy_chunk_fwd, CE_STATE};
    // the whole vocabulary as one chunk; the state [N,3] for the backward's softmax
    let ce_of = |logits: &[f64]| {
        let (mut ce, mut state) = (vec![0.0; n], vec![0.0; n * CE_STATE]);
        cross_entropy_chunk_fwd(&mut ce, &mut state, logits, &targets, &ones, vv, vv, 0);
        (ce, state)
    };
    let logp_of = |logits: &[f64]| ce_of(logits).0.iter().map(|x| -x).collect::<Vec<f64>>();
    let state = ce_of(&logits).1;
    // old and ref policies near the current one, so that some ratios clip
    let logp = logp_of(&logits);
    let p = PolicyInputs {
        old: logp
            .iter()
            .zip(&p0.old)
            .map(|(l, o)| l + 0.3 * (o + 1.5))
            .collect(),
        reference: logp
            .iter()
            .zip(&p0.reference)
            .map(|(l, r)| l + 0.2 * (r - l))
            .collect(),
        ..p0
    };
    for spec in policy_specs() {
        let dlogp = policy_dlogp64(&p, &logp, &spec);
        let neg: Vec<f64> = dlogp.iter().map(|d| -d).collect();
        let mut dlogits = logits.clone();
        cross_entropy_chunk_bwd(&mut dlogits, &state, &targets, &neg, vv, 0, 1.0);
        let what = format!("policy_loss -> logits {:?} {:?}", spec.agg, spec.kl_type);
        check_fd(&what, &logits, &dlogits, unit_step(&logits), |x| {
            policy_loss64(&p, &logp_of(x), &spec)
        });
    }
}

// ------------------------------------------------------------------------------------------
// reward_advantage against hand-computed cases
// ------------------------------------------------------------------------------------------

/// Runs reward_advantage through the device; returns (mse, reward, advantage).
fn rewards(pred: &[f32], target: &[f32], valid: &[f32], a: usize, spec: &RewardSpec) -> [Buf; 3] {
    let s = valid.len();
    let (mut mse, mut r, mut adv) = (vec![f32::NAN; s], vec![f32::NAN; s], vec![f32::NAN; s]);
    CpuDevice
        .reward_advantage(
            m(&mut mse),
            m(&mut r),
            m(&mut adv),
            v(&pred.to_vec()),
            v(&target.to_vec()),
            v(&valid.to_vec()),
            s,
            a,
            spec,
        )
        .unwrap();
    [mse, r, adv]
}

/// Each value within 2 u of max(|want|, 1) (f64 arithmetic rounded once to f32).
#[track_caller]
fn assert_near(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 2.0 * U as f64 * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Six samples of A = 2 against a zero target, so mse = (p0^2 + p1^2) / 2:
/// mse = [1, 2, 0, 0.5, 5, 4]; sample 3 is invalid (failed).
fn six_samples() -> (Buf, Buf, Buf) {
    let pred = vec![1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 3.0, 1.0, 2.0, 2.0];
    (pred, vec![0.0; 12], vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
}

const MSE6: [f64; 6] = [1.0, 2.0, 0.0, 0.5, 5.0, 4.0];

/// The GRPO advantage of a pair (G = 2): mean (r0 + r1)/2, unbiased std |r0 - r1|/sqrt(2), so
/// A0 = ((r0 - r1)/2) / (|r0 - r1|/sqrt(2) + eps) and A1 = -A0.
fn pair(r0: f64, r1: f64) -> [f64; 2] {
    let a = (r0 - r1) / 2.0 / ((r0 - r1).abs() / 2f64.sqrt() + 1e-6);
    [a, -a]
}

#[test]
fn reward_grpo_negative_by_hand() {
    let (pred, target, valid) = six_samples();
    let spec = RewardSpec::grpo(2, None);
    let [mse, r, adv] = rewards(&pred, &target, &valid, 2, &spec);
    assert_near("mse", &mse, &MSE6);
    // r = -mse, the failed sample -2.0 (its mse 0.5 is still reported)
    assert_near("reward", &r, &[-1.0, -2.0, 0.0, -2.0, -5.0, -4.0]);
    // groups (-1, -2), (0, -2), (-5, -4):
    // d = 1: A = 0.5 / (0.70710678 + 1e-6) = 0.70710578; d = 2: A = 1 / (1.41421356 + 1e-6)
    // = 0.70710628
    let (a1, a2) = (0.707_105_781_187_961_6, 0.707_106_281_186_901_1);
    assert_near("advantage", &adv, &[a1, -a1, a2, -a2, -a1, a1]);

    // Dr.GRPO: A = r - mean_g
    let spec = RewardSpec {
        advantage: Advantage::Grpo {
            group: 2,
            norm_by_std: false,
        },
        ..spec
    };
    let [_, _, adv] = rewards(&pred, &target, &valid, 2, &spec);
    assert_near(
        "Dr.GRPO advantage",
        &adv,
        &[0.5, -0.5, 1.0, -1.0, -0.5, 0.5],
    );
}

#[test]
fn reward_transforms_by_hand() {
    let (pred, target, valid) = six_samples();
    let e = std::f64::consts::E;
    let cases = [
        // exp(-mse * 0.5) * 2: [2 e^-0.5, 2 e^-1, 2, fail, 2 e^-2.5, 2 e^-2]
        (
            RewardTransform::Exp { temperature: 0.5 },
            2.0,
            [
                2.0 / e.sqrt(),
                2.0 / e,
                2.0,
                -2.0,
                2.0 * (-2.5f64).exp(),
                2.0 / (e * e),
            ],
        ),
        // 1 / (1 + mse): [1/2, 1/3, 1, fail, 1/6, 1/5]
        (
            RewardTransform::Bounded,
            1.0,
            [0.5, 1.0 / 3.0, 1.0, -2.0, 1.0 / 6.0, 0.2],
        ),
        // -ln(max(mse, 1e-8)): mse 0 hits the floor: -ln(1e-8) = 18.420680743952367
        (
            RewardTransform::Log,
            1.0,
            [
                0.0,
                -std::f64::consts::LN_2,
                18.420_680_743_952_367,
                -2.0,
                -5f64.ln(),
                -4f64.ln(),
            ],
        ),
    ];
    for (transform, scale, want) in cases {
        let spec = RewardSpec {
            transform,
            scale,
            ..RewardSpec::grpo(2, None)
        };
        let [_, r, adv] = rewards(&pred, &target, &valid, 2, &spec);
        assert_near(&format!("{transform:?} reward"), &r, &want);
        let want_adv: Vec<f64> = want.chunks(2).flat_map(|p| pair(p[0], p[1])).collect();
        assert_near(&format!("{transform:?} advantage"), &adv, &want_adv);
    }
}

#[test]
fn reward_batch_normalize_and_clip_by_hand() {
    let (pred, target, valid) = six_samples();
    // r = [-1, -2, 0, -2, -5, -4]: mean -14/6 = -2.3333; deviations [4/3, 1/3, 7/3, 1/3, -8/3,
    // -5/3], squares sum 156/9 = 17.3333, unbiased var 3.46667, std 1.86189867;
    // z = dev / (std + 1e-8) = [0.71611487, 0.17902872, 1.25320102, 0.17902872, -1.43222974,
    // -0.89514359]; clip to [-1, 1] changes samples 2 and 4.
    let z = [
        0.716_114_870_193_279,
        0.179_028_717_548_319_84,
        1.253_201_022_838_238_4,
        0.179_028_717_548_319_84,
        -1.432_229_740_386_557_8,
        -0.895_143_587_741_598_6,
    ];
    let clipped = [z[0], z[1], 1.0, z[3], -1.0, z[5]];
    let spec = RewardSpec {
        batch_normalize: true,
        clip: Some((-1.0, 1.0)),
        ..RewardSpec::grpo(2, None)
    };
    let [_, r, adv] = rewards(&pred, &target, &valid, 2, &spec);
    assert_near("normalised, clipped reward", &r, &clipped);
    let want_adv: Vec<f64> = clipped.chunks(2).flat_map(|p| pair(p[0], p[1])).collect();
    assert_near("advantage", &adv, &want_adv);

    // PPO: A = r - mean(r) = the deviations; whitened: the z-scores above
    let ppo = |whiten| RewardSpec {
        advantage: Advantage::Ppo { whiten },
        ..RewardSpec::grpo(2, None)
    };
    let [_, r, adv] = rewards(&pred, &target, &valid, 2, &ppo(false));
    assert_near("PPO reward", &r, &[-1.0, -2.0, 0.0, -2.0, -5.0, -4.0]);
    let third = 1.0 / 3.0;
    assert_near(
        "PPO advantage",
        &adv,
        &[
            4.0 * third,
            third,
            7.0 * third,
            third,
            -8.0 * third,
            -5.0 * third,
        ],
    );
    let [_, _, adv] = rewards(&pred, &target, &valid, 2, &ppo(true));
    assert_near("PPO whitened advantage", &adv, &z);
}

#[test]
fn reward_groups_of_one_by_hand() {
    // G = 1: mean 0 and std 1 (verl), so A = r / (1 + 1e-6); without std, A = r.
    let pred = [1.0, 1.0, 2.0, 0.0, 0.0, 0.0];
    let (target, valid) = ([0.0; 6], [1.0; 3]);
    let [_, r, adv] = rewards(&pred, &target, &valid, 2, &RewardSpec::grpo(1, None));
    assert_near("reward", &r, &[-1.0, -2.0, 0.0]);
    let k = 1.0 / (1.0 + 1e-6);
    assert_near("advantage", &adv, &[-k, -2.0 * k, 0.0]);
    let spec = RewardSpec {
        advantage: Advantage::Grpo {
            group: 1,
            norm_by_std: false,
        },
        ..RewardSpec::grpo(1, None)
    };
    let [_, _, adv] = rewards(&pred, &target, &valid, 2, &spec);
    assert_near("Dr.GRPO advantage", &adv, &[-1.0, -2.0, 0.0]);
}

#[test]
fn reward_mse_scale_by_hand() {
    // mse_scale s = sqrt(2) = sqrt(A): mse = 2 (1 - cos) for non-zero vectors.
    // [3,4] vs [1,0]: cos 0.6 -> 0.8; [0,0] vs [0,2]: n(0) = 0 (the clamp), n = [0, sqrt 2]
    // -> (0 + 2) / 2 = 1; [1,1] vs [2,2]: 0; [-1,0] vs [1,0]: antiparallel -> 4.
    let pred = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, -1.0, 0.0];
    let target = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 1.0, 0.0];
    let spec = RewardSpec::grpo(2, Some(2f32.sqrt()));
    let [mse, r, _] = rewards(&pred, &target, &[1.0; 4], 2, &spec);
    // s = sqrt(2) is rounded to f32: relative error ~u in s^2
    assert_near("mse", &mse, &[0.8, 1.0, 0.0, 4.0]);
    assert_near("reward", &r, &[-0.8, -1.0, 0.0, -4.0]);
}

// ------------------------------------------------------------------------------------------
// Through the Device trait: argument checks, `=` overwrites, `+=` accumulates
// ------------------------------------------------------------------------------------------

#[test]
fn inject_device() {
    let dev = CpuDevice;
    let (n, c) = (5, 3);
    let sites: Vec<u32> = vec![3, 1];
    let h0 = random_f32(n * c, 20);
    let vecs = random_f32(2 * c, 21);
    let mut h = h0.clone();
    dev.inject_fwd(m(&mut h), &sites, v(&vecs), n, c, InjectMode::Replace)
        .unwrap();
    assert_eq!(&h[9..12], &vecs[0..3], "site 0 gets vector 0");
    assert_eq!(&h[3..6], &vecs[3..6], "site 1 gets vector 1");
    for row in [0, 2, 4] {
        assert_eq!(
            &h[row * c..][..c],
            &h0[row * c..][..c],
            "row {row} untouched"
        );
    }
    let mut h = h0.clone();
    dev.inject_fwd(m(&mut h), &sites, v(&vecs), n, c, InjectMode::Add)
        .unwrap();
    assert_eq!(h[9], h0[9] + vecs[0]);

    let dout = random_f32(n * c, 22);
    for mode in [InjectMode::Replace, InjectMode::Add] {
        let mut dh = dout.clone();
        let mut dvecs = vec![f32::NAN; 2 * c];
        dev.inject_bwd(m(&mut dvecs), m(&mut dh), &sites, n, c, mode)
            .unwrap();
        assert_eq!(&dvecs[..3], &dout[9..12], "dvecs overwrites");
        let zeroed = mode == InjectMode::Replace;
        assert_eq!(dh[9..12].iter().all(|&x| x == 0.0), zeroed, "{mode:?}");
        assert_eq!(&dh[..3], &dout[..3]);
    }

    let mut h = h0.clone();
    let mut dv = vec![0.0; 2 * c];
    let replace = InjectMode::Replace;
    assert_invalid(
        "inject_fwd",
        dev.inject_fwd(m(&mut h), &vec![1, 1], v(&vecs), n, c, replace),
    );
    assert_invalid(
        "inject_fwd",
        dev.inject_fwd(m(&mut h), &vec![1, 5], v(&vecs), n, c, replace),
    );
    assert_invalid(
        "inject_fwd",
        dev.inject_fwd(m(&mut h), &vec![1], v(&vecs), n, c, replace),
    );
    assert_invalid(
        "inject_fwd",
        dev.inject_fwd(m(&mut h), &sites, v(&vecs), n + 1, c, replace),
    );
    assert_invalid(
        "inject_fwd",
        dev.inject_fwd(m(&mut h), &vec![], v(&vec![]), n * c, 0, replace),
    );
    assert_invalid(
        "inject_bwd",
        dev.inject_bwd(m(&mut dv), m(&mut h), &vec![4, 4], n, c, replace),
    );
    assert_invalid(
        "inject_bwd",
        dev.inject_bwd(m(&mut dv), m(&mut h), &vec![2], n, c, replace),
    );
    assert_eq!(h, h0, "a rejected call writes nothing");
    // no sites: nothing to do
    dev.inject_fwd(m(&mut h), &vec![], v(&vec![]), n, c, replace)
        .unwrap();
    assert_eq!(h, h0);
}

#[test]
fn norm_scale_device() {
    let dev = CpuDevice;
    let (n, d) = (3, 4);
    let x = random_f32(n * d, 23);
    let mut y = vec![f32::NAN; n * d];
    dev.norm_scale_fwd(m(&mut y), v(&x), n, d, 2.0).unwrap();
    for row in y.chunks(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 2.0).abs() < 1e-6, "row norm {norm}");
    }
    let dy = random_f32(n * d, 24);
    let mut dx = vec![f32::NAN; n * d];
    dev.norm_scale_bwd(m(&mut dx), v(&dy), v(&x), n, d, 2.0)
        .unwrap();
    // dx is orthogonal to x in each row (the rescale ignores the norm)
    for (dx, x) in dx.chunks(d).zip(x.chunks(d)) {
        let p: f32 = dx.iter().zip(x).map(|(a, b)| a * b).sum();
        assert!(p.abs() < 1e-5, "dx . x = {p}");
    }
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_invalid(
            "norm_scale_fwd",
            dev.norm_scale_fwd(m(&mut y), v(&x), n, d, s),
        );
        assert_invalid(
            "norm_scale_bwd",
            dev.norm_scale_bwd(m(&mut dx), v(&dy), v(&x), n, d, s),
        );
    }
    assert_invalid(
        "norm_scale_fwd",
        dev.norm_scale_fwd(m(&mut y), v(&x), n, d + 1, 1.0),
    );
    assert_invalid(
        "norm_scale_fwd",
        dev.norm_scale_fwd(m(&mut y), v(&x), n * d, 0, 1.0),
    );
    assert_invalid(
        "norm_scale_bwd",
        dev.norm_scale_bwd(m(&mut dx), v(&dy[1..].to_vec()), v(&x), n, d, 1.0),
    );
}

#[test]
fn pool_device() {
    let dev = CpuDevice;
    let (b, t, c) = (2, 3, 2);
    let h = random_f32(b * t * c, 25);
    let mask = vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0];
    let w = random_f32(5, 26);
    let dout = random_f32(b * c, 27);
    let mut out = vec![f32::NAN; b * c];
    dev.pool_fwd(m(&mut out), v(&h), v(&mask), None, b, t, c, PoolMode::Last)
        .unwrap();
    assert_eq!(&out[..2], &h[2..4], "row 0: last real token is position 1");
    assert_eq!(&out[2..], &h[10..12], "row 1: position 2");

    let mut dh = vec![f32::NAN; h.len()];
    let mut dw = vec![1.0; w.len()];
    let wv = Some(v(&w));
    let weighted = PoolMode::Weighted;
    dev.pool_bwd(
        m(&mut dh),
        Some(m(&mut dw)),
        v(&dout),
        v(&h),
        v(&mask),
        wv,
        b,
        t,
        c,
        weighted,
    )
    .unwrap();
    assert!(dh.iter().all(|x| x.is_finite()), "dh overwrites");
    assert_eq!(&dh[4..6], &[0.0, 0.0], "padding gets zero");
    let once: Buf = dw.iter().map(|x| x - 1.0).collect();
    assert_eq!(&dw[t..], &[1.0, 1.0], "w beyond T untouched");
    dev.pool_bwd(
        m(&mut dh),
        Some(m(&mut dw)),
        v(&dout),
        v(&h),
        v(&mask),
        wv,
        b,
        t,
        c,
        weighted,
    )
    .unwrap();
    for (i, (&d, &o)) in dw.iter().zip(&once).enumerate() {
        assert!((d - (1.0 + 2.0 * o)).abs() < 1e-6, "dw accumulates [{i}]");
    }

    let last = PoolMode::Last;
    let mut bad = |mask: &[f32], w: Option<View<'_, Buf>>, mode| {
        dev.pool_fwd(m(&mut out), v(&h), v(&mask.to_vec()), w, b, t, c, mode)
    };
    assert_invalid("pool_fwd", bad(&[1., 1., 0., 0., 0., 0.], None, last)); // empty row
    assert_invalid("pool_fwd", bad(&[0., 1., 1., 1., 1., 1.], None, last)); // left padding
    assert_invalid("pool_fwd", bad(&[1., 0.5, 0., 1., 1., 1.], None, last)); // not 0/1
    assert_invalid("pool_fwd", bad(&mask, None, weighted)); // weighted without w
    assert_invalid("pool_fwd", bad(&mask, Some(v(&w)), PoolMode::Mean)); // w for mean
    assert_invalid(
        "pool_fwd",
        bad(&mask, Some(View::range(&w, 0, 2)), weighted),
    ); // w < T
    assert_invalid("pool_fwd", bad(&mask[1..], None, last)); // mask length
    let mut dw_short = vec![0.0; 4];
    assert_invalid(
        "pool_bwd",
        dev.pool_bwd(
            m(&mut dh),
            Some(m(&mut dw_short)),
            v(&dout),
            v(&h),
            v(&mask),
            wv,
            b,
            t,
            c,
            weighted,
        ),
    );
    assert_invalid(
        "pool_bwd",
        dev.pool_bwd(
            m(&mut dh),
            None,
            v(&dout[1..].to_vec()),
            v(&h),
            v(&mask),
            None,
            b,
            t,
            c,
            last,
        ),
    );
}

#[test]
fn reward_device() {
    let dev = CpuDevice;
    let (s, a) = (4, 3);
    let (pred, target) = (random_f32(s * a, 28), random_f32(s * a, 29));
    let valid = vec![1.0, 0.0, 1.0, 1.0];
    let (mut mse, mut r, mut adv) = (vec![f32::NAN; s], vec![f32::NAN; s], vec![f32::NAN; s]);
    let mut run = |valid: &Buf, s: usize, a: usize, spec: &RewardSpec| {
        dev.reward_advantage(
            m(&mut mse),
            m(&mut r),
            m(&mut adv),
            v(&pred),
            v(&target),
            v(valid),
            s,
            a,
            spec,
        )
    };
    let spec = RewardSpec::grpo(2, Some(3f32.sqrt()));
    run(&valid, s, a, &spec).unwrap();
    let grpo = |g| RewardSpec::grpo(g, None);
    assert_invalid("reward_advantage", run(&valid, s, a, &grpo(3))); // G does not divide S
    assert_invalid("reward_advantage", run(&valid, s, a, &grpo(0)));
    assert_invalid(
        "reward_advantage",
        run(&vec![1.0, 0.5, 1.0, 1.0], s, a, &spec),
    );
    assert_invalid("reward_advantage", run(&valid, s, a + 1, &spec));
    assert_invalid("reward_advantage", run(&valid[1..].to_vec(), s, a, &spec));
    let clip = RewardSpec {
        clip: Some((1.0, -1.0)),
        ..spec
    };
    assert_invalid("reward_advantage", run(&valid, s, a, &clip));
    let scale0 = RewardSpec {
        mse_scale: Some(0.0),
        ..spec
    };
    assert_invalid("reward_advantage", run(&valid, s, a, &scale0));
    // a z-score over one sample is undefined
    let one = RewardSpec {
        batch_normalize: true,
        ..grpo(1)
    };
    let mut run1 = |spec: &RewardSpec| {
        dev.reward_advantage(
            ViewMut::range(&mut mse, 0, 1),
            ViewMut::range(&mut r, 0, 1),
            ViewMut::range(&mut adv, 0, 1),
            View::range(&pred, 0, a),
            View::range(&target, 0, a),
            View::range(&valid, 0, 1),
            1,
            a,
            spec,
        )
    };
    assert_invalid("reward_advantage", run1(&one));
    run1(&grpo(1)).unwrap();
    // outputs overwrite; an invalid sample gets the failure value, and its mse is reported
    let (mut mse, mut r, mut adv) = (vec![f32::NAN; s], vec![f32::NAN; s], vec![f32::NAN; s]);
    dev.reward_advantage(
        m(&mut mse),
        m(&mut r),
        m(&mut adv),
        v(&pred),
        v(&target),
        v(&valid),
        s,
        a,
        &spec,
    )
    .unwrap();
    assert!(mse.iter().chain(&r).chain(&adv).all(|x| x.is_finite()));
    assert_eq!(r[1], -2.0);
    assert!(mse[1] > 0.0);
    // GRPO advantages sum to zero within each group
    assert!((adv[0] + adv[1]).abs() < 1e-6 && (adv[2] + adv[3]).abs() < 1e-6);
}

#[test]
fn policy_loss_device() {
    let dev = CpuDevice;
    let p = policy_inputs(&[3, 0, 2], 4, 30);
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Buf>();
    let (mut logp, old, adv, mask, reference) = (
        f(&p.logp),
        f(&p.old),
        f(&p.adv),
        f(&p.mask),
        f(&p.reference),
    );
    let (s, t) = (p.s, p.t);
    let spec = PolicyLossSpec {
        clip_low: 0.2,
        clip_high: 0.2,
        dual_clip: Some(3.0),
        kl_coef: 0.01,
        kl_type: KlType::K1,
        agg: LossAgg::SeqMeanTokenMean,
    };
    let mut stats = vec![f32::NAN; PolicyStat::COUNT];
    let mut dlogp = vec![f32::NAN; s * t];
    // inputs at masked positions are never read
    for (l, &mk) in logp.iter_mut().zip(&mask) {
        if mk == 0.0 {
            *l = f32::NAN;
        }
    }
    let r = Some(v(&reference));
    dev.policy_loss_fwd(
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
    dev.policy_loss_bwd(
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
    assert!(
        stats.iter().chain(&dlogp).all(|x| x.is_finite()),
        "= and masked inputs unread"
    );
    let want = stats[PolicyStat::PG_LOSS] + 0.01 * stats[PolicyStat::KL_LOSS];
    assert!((stats[PolicyStat::LOSS] - want).abs() < 1e-6);
    assert!((0.0..=1.0).contains(&stats[PolicyStat::CLIP_FRAC]));

    let mut run = |mask: &Buf, r: Option<View<'_, Buf>>, spec: &PolicyLossSpec| {
        dev.policy_loss_fwd(
            m(&mut stats),
            v(&logp),
            v(&old),
            v(&adv),
            v(mask),
            r,
            s,
            t,
            spec,
        )
    };
    assert_invalid("policy_loss_fwd", run(&mask, None, &spec)); // kl_coef needs ref_logp
    assert_invalid("policy_loss_fwd", run(&vec![0.0; s * t], r, &spec)); // no token
    assert_invalid("policy_loss_fwd", run(&mask[1..].to_vec(), r, &spec));
    let mut half = mask.clone();
    half[0] = 0.5;
    assert_invalid("policy_loss_fwd", run(&half, r, &spec));
    for bad in [
        PolicyLossSpec {
            dual_clip: Some(1.0),
            ..spec
        },
        PolicyLossSpec {
            clip_low: 1.0,
            ..spec
        },
        PolicyLossSpec {
            clip_high: -0.1,
            ..spec
        },
        PolicyLossSpec {
            kl_coef: f32::NAN,
            ..spec
        },
    ] {
        assert_invalid("policy_loss_fwd", run(&mask, r, &bad));
    }
    let no_kl = PolicyLossSpec {
        kl_coef: 0.0,
        ..spec
    };
    run(&mask, None, &no_kl).unwrap();
    assert_eq!(stats[PolicyStat::KL_LOSS], 0.0);
    assert_invalid(
        "policy_loss_bwd",
        dev.policy_loss_bwd(
            m(&mut dlogp[1..].to_vec()),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            r,
            s,
            t,
            &spec,
        ),
    );
    let mut short_stats = vec![0.0; PolicyStat::COUNT - 1];
    assert_invalid(
        "policy_loss_fwd",
        dev.policy_loss_fwd(
            m(&mut short_stats),
            v(&logp),
            v(&old),
            v(&adv),
            v(&mask),
            r,
            s,
            t,
            &spec,
        ),
    );
}
