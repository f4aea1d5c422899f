//! The CPU twins of every op: against the PyTorch fixtures (f32 engine vs f64 reference),
//! against finite differences (f64 twins), and through the `Device` trait (checks, `=` / `+=`).

mod common;

use common::ops::{amax, assert_invalid, dot64, m, random, random_f32, rng, tensor, v, Buf, U};
use common::{assert_close, Tensor};
use nla_engine::device::cpu::{self, CpuDevice};
use nla_engine::device::{AdamwStep, AttnDims, CacheDims, Device, View, ViewMut};
use rand::Rng;

// ------------------------------------------------------------------------------------------
// Fixtures: tests/reference/fixtures/ops.safetensors (f64 reference rounded to f32)
// ------------------------------------------------------------------------------------------

fn fx(name: &str) -> &'static Tensor {
    tensor("ops.safetensors", name)
}

fn data(name: &str) -> Buf {
    fx(name).data.clone()
}

#[test]
fn embedding_fixture() {
    let dev = CpuDevice;
    let (wte, ids) = (data("embedding.wte"), fx("embedding.ids").ids());
    let c = fx("embedding.wte").shape[1];
    let n = ids.len();
    let mut out = vec![f32::NAN; n * c];
    dev.embedding_fwd(m(&mut out), &ids, v(&wte), n, c).unwrap();
    // A gather copies f32 values: exact.
    assert_close(
        "embedding out",
        &out,
        &fx("embedding.out").data,
        0.0,
        0.0,
        0.0,
    );

    let mut dwte = vec![0.0; wte.len()];
    dev.embedding_bwd(m(&mut dwte), &ids, v(&data("embedding.dout")), n, c)
        .unwrap();
    let want = &fx("embedding.dwte").data;
    // Each row sums a handful of O(1) f32 values (ids repeat up to ~4 times): a few roundings,
    // each <= u of the running sum, so ~2 u of the largest entry (cancellation defeats rtol).
    assert_close(
        "embedding dwte",
        &dwte,
        want,
        2.0 * U * amax(want),
        2.0 * U,
        1e-14,
    );
}

#[test]
fn rmsnorm_fixture() {
    let dev = CpuDevice;
    let (x, w) = (data("rmsnorm.x"), data("rmsnorm.w"));
    let eps = fx("rmsnorm.eps").scalar();
    let (n, c) = (fx("rmsnorm.x").shape[0], fx("rmsnorm.x").shape[1]);
    let mut out = vec![f32::NAN; n * c];
    let mut rstd = vec![f32::NAN; n];
    dev.rmsnorm_fwd(m(&mut out), m(&mut rstd), v(&x), v(&w), n, c, eps)
        .unwrap();
    // out = x * rstd * w: rstd carries the error of a length-C (37) sum of squares (8 lanes, so
    // ~sqrt(37/8) u), sqrt and divide, then two products: ~3 u relative measured, 6 u allowed.
    assert_close(
        "rmsnorm out",
        &out,
        &fx("rmsnorm.out").data,
        0.0,
        6.0 * U,
        1e-13,
    );

    let dout = data("rmsnorm.dout");
    let mut dx = vec![f32::NAN; n * c];
    let mut dw = vec![0.0; c];
    dev.rmsnorm_bwd(
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
    // dx = rstd*w*dout - x*rstd^3*mean(w*dout*x): two terms that cancel, so the error is ~u of
    // the row's scale rstd*|dout| rather than of |dx|: 4 u of the largest entry, 8 u relative.
    let want = &fx("rmsnorm.dx").data;
    assert_close(
        "rmsnorm dx",
        &dx,
        want,
        4.0 * U * amax(want),
        8.0 * U,
        1e-13,
    );
    // dw sums N = 19 products dout*x*rstd of mixed sign: ~sqrt(N) u of the terms' scale.
    let want = &fx("rmsnorm.dw").data;
    assert_close(
        "rmsnorm dw",
        &dw,
        want,
        4.0 * U * amax(want),
        8.0 * U,
        1e-13,
    );
}

#[test]
fn rope_fixture() {
    let dev = CpuDevice;
    let shape = fx("rope.x").shape.clone();
    let (b, t, h, hs) = (shape[0], shape[1], shape[2], shape[3]);
    let theta = fx("rope.theta").scalar();
    let mut x = data("rope.x");
    dev.rope_fwd(m(&mut x), b, t, h, hs, 0, None, theta)
        .unwrap();
    // Same f32 angles as the reference; cos/sin rounded to f32 (u each), then x1 c - x2 s: the
    // two products may cancel, so the error is ~u of max(|x1|, |x2|) (1.4 u of the largest
    // entry measured): 2 u of the largest entry, 4 u relative.
    let want = &fx("rope.out").data;
    assert_close("rope out", &x, want, 2.0 * U * amax(want), 4.0 * U, 1e-13);

    let mut dx = data("rope.dout");
    dev.rope_bwd(m(&mut dx), b, t, h, hs, 0, theta).unwrap();
    let want = &fx("rope.dx").data;
    assert_close("rope dx", &dx, want, 2.0 * U * amax(want), 4.0 * U, 1e-13);
}

fn attn_dims() -> AttnDims {
    let (q, k) = (&fx("attention.q").shape, &fx("attention.k").shape);
    AttnDims {
        b: q[0],
        t: q[1],
        nh: q[2],
        nkv: k[2],
        hs: q[3],
    }
}

#[test]
fn attention_fixture() {
    let dev = CpuDevice;
    let d = attn_dims();
    let (q, k, vv) = (
        data("attention.q"),
        data("attention.k"),
        data("attention.v"),
    );
    let mut out = vec![f32::NAN; q.len()];
    let mut lse = vec![f32::NAN; d.b * d.nh * d.t];
    dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), d)
        .unwrap();
    // Scores are length-HS (8) dots of O(1.5) values, the softmax sums <= T (9) terms, and
    // out is a convex combination of v rows, which cancel: the error is a few u of max|v|
    // (~max|out|), not of |out|. ~3 u measured for out, ~2 u for lse; 4 u allowed.
    let want = &fx("attention.out").data;
    assert_close(
        "attention out",
        &out,
        want,
        4.0 * U * amax(want),
        4.0 * U,
        1e-13,
    );
    let want = &fx("attention.lse").data;
    assert_close(
        "attention lse",
        &lse,
        want,
        4.0 * U * amax(want),
        4.0 * U,
        1e-13,
    );

    let dout = data("attention.dout");
    let mut dq = vec![f32::NAN; q.len()];
    let mut dk = vec![f32::NAN; k.len()];
    let mut dvv = vec![f32::NAN; vv.len()];
    dev.attention_bwd(
        m(&mut dq),
        m(&mut dk),
        m(&mut dvv),
        v(&dout),
        v(&q),
        v(&k),
        v(&vv),
        v(&out),
        v(&lse),
        d,
    )
    .unwrap();
    // Gradients are sums over up to T*NH/NKV (18) terms P*(dP - D) that cancel (sum_j P_ij
    // (dP_ij - D_i) = 0): the error is relative to the terms' scale, up to ~10 u of the
    // largest entry measured (dq), so 16 u of it; 8 u relative elsewhere.
    for (name, got) in [("dq", &dq), ("dk", &dk), ("dv", &dvv)] {
        let want = &fx(&format!("attention.{name}")).data;
        assert_close(
            &format!("attention {name}"),
            got,
            want,
            16.0 * U * amax(want),
            8.0 * U,
            1e-12,
        );
    }
}

#[test]
fn swiglu_fixture() {
    let dev = CpuDevice;
    let (gate, up) = (data("swiglu.gate"), data("swiglu.up"));
    let gu = [gate.as_slice(), &up].concat();
    let mut out = vec![f32::NAN; gate.len()];
    dev.swiglu_fwd(m(&mut out), v(&gu)).unwrap();
    // Elementwise: expf (~1 ulp), a divide and two products: ~6 u relative.
    assert_close(
        "swiglu out",
        &out,
        &fx("swiglu.out").data,
        0.0,
        8.0 * U,
        1e-13,
    );

    let dout = data("swiglu.dout");
    let mut dgu = vec![f32::NAN; 2 * gate.len()];
    dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu)).unwrap();
    let (dgate, dup) = dgu.split_at(gate.len());
    // silu'(g) = s (1 + g (1 - s)) cancels near g ~ -2.4 (its zero): an absolute term of a few
    // u of the largest entry covers that; elsewhere ~8 u relative.
    let want = &fx("swiglu.dgate").data;
    assert_close(
        "swiglu dgate",
        dgate,
        want,
        4.0 * U * amax(want),
        16.0 * U,
        1e-13,
    );
    assert_close(
        "swiglu dup",
        dup,
        &fx("swiglu.dup").data,
        0.0,
        8.0 * U,
        1e-13,
    );
}

/// `alpha * op(a) op(b) + beta * c` in f64, naively; `a`, `b` stored as the flags say.
#[allow(clippy::too_many_arguments)]
fn naive_matmul(
    c: &[f32],
    a: &[f32],
    b: &[f32],
    [mm, n, k]: [usize; 3],
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Buf {
    let mut out = vec![0.0; mm * n];
    for i in 0..mm {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let x = if ta { a[p * mm + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * y as f64;
            }
            let prior = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * n + j] as f64
            };
            out[i * n + j] = (alpha as f64 * s + prior) as f32;
        }
    }
    out
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Buf {
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| x[i * cols + j]))
        .collect()
}

/// `sum_k |a_ik| |b_kj|` for a [M,K], b [N,K]: the scale of the f32 rounding error of a dot.
fn abs_products(a: &[f32], b: &[f32], mm: usize, n: usize, k: usize) -> Buf {
    let (aa, ba): (Buf, Buf) = (
        a.iter().map(|x| x.abs()).collect(),
        b.iter().map(|x| x.abs()).collect(),
    );
    naive_matmul(&[], &aa, &ba, [mm, n, k], false, true, 1.0, 0.0)
}

#[test]
fn matmul_fixture() {
    let dev = CpuDevice;
    let (a, b) = (data("matmul.a"), data("matmul.b"));
    let (mm, k, n) = (
        fx("matmul.a").shape[0],
        fx("matmul.a").shape[1],
        fx("matmul.b").shape[0],
    );
    // The rows of a vary in scale by 100x and dots of length K (<= 17) cancel: an element's
    // error is ~sqrt(K) u of sum_k |a_ik||b_jk| (measured <= 1.2 u of the largest such sum,
    // against a worst case of K u); 4 u of the largest is allowed, no relative term.
    let tol = |scale: &[f32]| 4.0 * U * amax(scale);

    let mut out = vec![f32::NAN; mm * n];
    dev.matmul(m(&mut out), v(&a), v(&b), mm, n, k, false, true, 1.0, 0.0)
        .unwrap();
    let want = &fx("matmul.out").data;
    assert_close(
        "matmul out",
        &out,
        want,
        tol(&abs_products(&a, &b, mm, n, k)),
        0.0,
        1e-12,
    );

    let dout = data("matmul.dout");
    let mut da = vec![f32::NAN; mm * k];
    dev.matmul(
        m(&mut da),
        v(&dout),
        v(&b),
        mm,
        k,
        n,
        false,
        false,
        1.0,
        0.0,
    )
    .unwrap();
    let bt = transpose(&b, n, k);
    let want = &fx("matmul.da").data;
    assert_close(
        "matmul da",
        &da,
        want,
        tol(&abs_products(&dout, &bt, mm, k, n)),
        0.0,
        1e-12,
    );

    let mut db = vec![f32::NAN; n * k];
    dev.matmul(m(&mut db), v(&dout), v(&a), n, k, mm, true, false, 1.0, 0.0)
        .unwrap();
    let (dt, at) = (transpose(&dout, mm, n), transpose(&a, mm, k));
    let want = &fx("matmul.db").data;
    assert_close(
        "matmul db",
        &db,
        want,
        tol(&abs_products(&dt, &at, n, k, mm)),
        0.0,
        1e-12,
    );
}

/// matmul for every transpose and (alpha, beta), and matmul_add, against an f64 reference.
#[test]
fn matmul_transposes_alpha_beta() {
    let dev = CpuDevice;
    // op(a) = fixture a [M,K], op(b) = fixture b^T [K,N]; stored as each flag combination wants.
    let (a, b) = (data("matmul.a"), data("matmul.b"));
    let (mm, k, n) = (
        fx("matmul.a").shape[0],
        fx("matmul.a").shape[1],
        fx("matmul.b").shape[0],
    );
    let c0: Buf = data("matmul.dout"); // any [M,N] values
    let scale_ab = amax(&abs_products(&a, &b, mm, n, k));
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let sa = if ta { transpose(&a, mm, k) } else { a.clone() };
        let sb = if tb { b.clone() } else { transpose(&b, n, k) };
        for (alpha, beta) in [(1.0, 0.0), (0.75, -0.5), (-2.0, 1.0)] {
            let mut c = if beta == 0.0 {
                vec![f32::NAN; mm * n]
            } else {
                c0.clone()
            };
            dev.matmul(m(&mut c), v(&sa), v(&sb), mm, n, k, ta, tb, alpha, beta)
                .unwrap();
            let want = naive_matmul(&c0, &sa, &sb, [mm, n, k], ta, tb, alpha, beta);
            // f32 dot of length K vs f64: ~sqrt(K) u of |alpha| sum|a||b|, plus u of |beta c|.
            let what = format!("matmul ta={ta} tb={tb} alpha={alpha} beta={beta}");
            let atol = 4.0 * U * (alpha.abs() * scale_ab + beta.abs() * amax(&c0));
            assert_close(&what, &c, &want, atol, 0.0, 1e-12);
        }
        // matmul_add: d = op(a) op(b) + x, d's old contents ignored; as alpha = beta = 1
        let mut d = vec![f32::NAN; mm * n];
        dev.matmul_add(m(&mut d), v(&c0), v(&sa), v(&sb), mm, n, k, ta, tb)
            .unwrap();
        let want = naive_matmul(&c0, &sa, &sb, [mm, n, k], ta, tb, 1.0, 1.0);
        let atol = 4.0 * U * (scale_ab + amax(&c0));
        assert_close(
            &format!("matmul_add ta={ta} tb={tb}"),
            &d,
            &want,
            atol,
            0.0,
            1e-12,
        );
    }
    // an addend of the wrong length is an error naming the op
    let mut d = vec![f32::NAN; mm * n];
    let short = c0[1..].to_vec();
    assert_invalid(
        "matmul_add",
        dev.matmul_add(m(&mut d), v(&short), v(&a), v(&b), mm, n, k, false, true),
    );
}

#[test]
fn residual_fixture() {
    let dev = CpuDevice;
    let (a, b) = (data("residual.a"), data("residual.b"));
    let mut out = vec![f32::NAN; a.len()];
    dev.residual_fwd(m(&mut out), v(&a), v(&b)).unwrap();
    // One f32 add, rounded once, as the reference is: bit-exact.
    assert_close(
        "residual out",
        &out,
        &fx("residual.out").data,
        0.0,
        0.0,
        0.0,
    );
}

/// The cross-entropy through the device over whole rows (one chunk of all V, as training runs
/// it): the losses, the mean loss, and the gradient written over the logits, against PyTorch.
#[test]
fn cross_entropy_fixture() {
    let dev = CpuDevice;
    let logits = data("cross_entropy.logits");
    let targets = fx("cross_entropy.targets").ids();
    let mask = data("cross_entropy.mask");
    let (n, vv) = (
        fx("cross_entropy.logits").shape[0],
        fx("cross_entropy.logits").shape[1],
    );
    let mut losses = vec![f32::NAN; n];
    let mut state = vec![f32::NAN; 3 * n];
    dev.cross_entropy_chunk_fwd(
        m(&mut losses),
        m(&mut state),
        v(&logits),
        &targets,
        v(&mask),
        n,
        vv,
        vv,
        0,
    )
    .unwrap();
    // loss = (max - x_y) + ln S: max - x_y is exact or rounded once; S (an f64 sum rounded to
    // f32) and ln add a few u of ln(V) ~ 3.4: 4 u relative plus 10 u of ln(V) absolute (the
    // one-chunk case of cross_entropy_chunk_fixture's bound).
    let lnv = (vv as f32).ln();
    let want = &fx("cross_entropy.losses").data;
    assert_close(
        "cross_entropy losses",
        &losses,
        want,
        10.0 * U * lnv,
        4.0 * U,
        1e-13,
    );
    let total: f64 =
        losses.iter().map(|&x| x as f64).sum::<f64>() / mask.iter().map(|&x| x as f64).sum::<f64>();
    let want = fx("cross_entropy.loss").scalar();
    assert_close(
        "cross_entropy loss",
        &[total as f32],
        &[want],
        0.0,
        10.0 * U,
        1e-13,
    );

    let scale = 1.0 / mask.iter().sum::<f32>();
    let mut dlogits = logits.clone();
    dev.cross_entropy_chunk_bwd(
        m(&mut dlogits),
        v(&state),
        &targets,
        v(&mask),
        n,
        vv,
        vv,
        0,
        scale,
    )
    .unwrap();
    // p = exp(x - max) / S: the exponent carries ~u of |x - max|, so p is good to ~(3 +
    // |x - max|) u relative, plus S's rounding; p - 1 at the target cancels to ~u of
    // 1 * scale, below 2 u of the largest entry.
    let want = &fx("cross_entropy.dlogits").data;
    assert_close(
        "cross_entropy dlogits",
        &dlogits,
        want,
        2.0 * U * amax(want),
        22.0 * U,
        1e-12,
    );
}

/// The chunked cross-entropy (`cross_entropy_chunk_fwd` over vocabulary chunks, then each
/// chunk's `cross_entropy_chunk_bwd`) against the PyTorch fixture, for chunks that divide V,
/// chunks that leave a short last one, a chunk of 1 column and one chunk of all V.
#[test]
fn cross_entropy_chunk_fixture() {
    use nla_engine::device::cpu::cross_entropy::{
        cross_entropy_chunk_bwd, cross_entropy_chunk_fwd, CE_STATE,
    };
    let logits = data("cross_entropy.logits");
    let targets = fx("cross_entropy.targets").ids();
    let mask = data("cross_entropy.mask");
    let (n, vv) = (
        fx("cross_entropy.logits").shape[0],
        fx("cross_entropy.logits").shape[1],
    );
    let scale = 1.0 / mask.iter().sum::<f32>();
    let lnv = (vv as f32).ln();
    let col = |v0: usize, vc: usize| -> Vec<f32> {
        logits
            .chunks(vv)
            .flat_map(|r| r[v0..v0 + vc].to_vec())
            .collect()
    };
    for vc in [vv, vv / 2, 7, 1, vv - 1] {
        let starts: Vec<usize> = (0..vv).step_by(vc).collect();
        let mut losses = vec![f32::NAN; n];
        let mut state = vec![f32::NAN; n * CE_STATE];
        for &v0 in &starts {
            let c = vc.min(vv - v0);
            let x = col(v0, c);
            cross_entropy_chunk_fwd(&mut losses, &mut state, &x, &targets, &mask, c, vv, v0);
        }
        let mut dlogits = vec![f32::NAN; n * vv];
        for &v0 in &starts {
            let c = vc.min(vv - v0);
            let mut d = col(v0, c);
            cross_entropy_chunk_bwd(&mut d, &state, &targets, &mask, c, v0, scale);
            for (row, part) in d.chunks(c).enumerate() {
                dlogits[row * vv + v0..row * vv + v0 + c].copy_from_slice(part);
            }
        }
        // As the whole-row losses, plus S kept in f32 between chunks and merged with two
        // rescales (2 ulp each) per chunk: 4 u relative plus (4 + 6 per chunk) u of ln V.
        let k = 4.0 + 6.0 * starts.len() as f32;
        assert_close(
            &format!("cross_entropy_chunk losses (VC {vc})"),
            &losses,
            &fx("cross_entropy.losses").data,
            k * U * lnv,
            4.0 * U,
            1e-13,
        );
        // As the whole-row dlogits, plus the same relative error of S in each p.
        let want = &fx("cross_entropy.dlogits").data;
        assert_close(
            &format!("cross_entropy_chunk dlogits (VC {vc})"),
            &dlogits,
            want,
            2.0 * U * amax(want),
            (12.0 + k) * U,
            1e-12,
        );
    }
}

#[test]
fn softmax_fixture() {
    let dev = CpuDevice;
    let x = data("softmax.x");
    let (n, vv) = (fx("softmax.x").shape[0], fx("softmax.x").shape[1]);
    let mut out = vec![f32::NAN; n * vv];
    dev.softmax_fwd(m(&mut out), v(&x), n, vv).unwrap();
    // exp(x - max): x - max is rounded at most once (~u |x - max|, |x - max| <= ~16 here, and
    // exact by Sterbenz in the +100 row), then expf and the normalising divide: <= ~20 u.
    let want = &fx("softmax.out").data;
    assert_close("softmax out", &out, want, 0.0, 20.0 * U, 1e-12);

    let dout = data("softmax.dout");
    let mut dx = vec![f32::NAN; n * vv];
    dev.softmax_bwd(m(&mut dx), v(&dout), v(&out), n, vv)
        .unwrap();
    // out * (dout - s): dout - s cancels, so the error is ~u of p*(|dout| + |s|), below 2 u of
    // the largest entry; otherwise the relative error of out (as above).
    let want = &fx("softmax.dx").data;
    assert_close(
        "softmax dx",
        &dx,
        want,
        2.0 * U * amax(want),
        20.0 * U,
        1e-12,
    );
}

fn adamw_hp(step: u64) -> AdamwStep {
    AdamwStep {
        lr: fx("adamw.lr").scalar(),
        beta1: fx("adamw.beta1").scalar(),
        beta2: fx("adamw.beta2").scalar(),
        eps: fx("adamw.eps").scalar(),
        weight_decay: fx("adamw.weight_decay").scalar(),
        step,
        grad_scale: 1.0,
    }
}

#[test]
fn adamw_fixture() {
    let dev = CpuDevice;
    let mut p = data("adamw.p0");
    let (mut mm, mut vv) = (vec![0.0; p.len()], vec![0.0; p.len()]);
    for step in 1..=3u64 {
        let g = data(&format!("adamw.g{step}"));
        dev.adamw(
            m(&mut p),
            None,
            v(&g),
            m(&mut mm),
            m(&mut vv),
            &adamw_hp(step),
        )
        .unwrap();
        // p ~ N(0,1) moves by ~lr = 1e-2 a step; the update m/(sqrt(v)+eps) is O(1) with a few
        // u of relative error, so p is off by ~u of itself per step (plus lr * a few u): <= 2 u
        // measured after 3 steps, relative or of the largest entry; 3 u allowed.
        let want = &fx(&format!("adamw.p{step}")).data;
        assert_close(
            &format!("adamw p{step}"),
            &p,
            want,
            3.0 * U * amax(want),
            3.0 * U,
            1e-13,
        );
    }
}

#[test]
fn adamw_grad_scale_folds_into_the_gradient() {
    let dev = CpuDevice;
    let p0 = data("adamw.p0");
    let g = data("adamw.g1");
    let (mut p1, mut m1, mut v1) = (p0.clone(), vec![0.0; p0.len()], vec![0.0; p0.len()]);
    let hp = AdamwStep {
        grad_scale: 0.25,
        ..adamw_hp(1)
    };
    dev.adamw(m(&mut p1), None, v(&g), m(&mut m1), m(&mut v1), &hp)
        .unwrap();
    let g4: Buf = g.iter().map(|x| x * 0.25).collect(); // exact: a power of two
    let (mut p2, mut m2, mut v2) = (p0.clone(), vec![0.0; p0.len()], vec![0.0; p0.len()]);
    dev.adamw(
        m(&mut p2),
        None,
        v(&g4),
        m(&mut m2),
        m(&mut v2),
        &adamw_hp(1),
    )
    .unwrap();
    assert_eq!(p1, p2);
    assert_eq!(m1, m2);
    assert_eq!(v1, v2);
}

#[test]
fn sum_squares_matches_f64() {
    let dev = CpuDevice;
    let x = random_f32(100_003, 11);
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let got = dev.sum_squares(v(&x)).unwrap();
    // Both accumulate exact f32 squares in f64, in different orders: ~n * 1e-16 relative.
    assert!(
        (got - want).abs() <= 1e-11 * want,
        "sum_squares {got} vs {want}"
    );
    let window = dev.sum_squares(View::range(&x, 10, 3)).unwrap();
    let want: f64 = x[10..13].iter().map(|&v| v as f64 * v as f64).sum();
    assert!(
        (window - want).abs() <= 1e-15 * want,
        "sum_squares window {window} vs {want}"
    );
}

// ------------------------------------------------------------------------------------------
// Finite differences in f64: every backward against central differences of L = sum(r * out)
// ------------------------------------------------------------------------------------------

/// Checks `grad` (the backward's dL/dx) against central differences of `loss` at `x`, on every
/// coordinate when there are at most 64, else on 64 random ones. Relative error < 1e-6, where a
/// coordinate's error is measured against max(|fd|, 1% of the largest |grad|) so that tiny
/// gradients are not held to a relative bound their rounding cannot meet.
#[track_caller]
fn check_fd(what: &str, x: &[f64], grad: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), grad.len(), "{what}: gradient length");
    let floor = 0.01 * grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(floor > 0.0, "{what}: gradient is identically zero");
    let coords: Vec<usize> = if x.len() <= 64 {
        (0..x.len()).collect()
    } else {
        let mut r = rng(x.len() as u64);
        (0..64).map(|_| r.random_range(0..x.len())).collect()
    };
    let mut xp = x.to_vec();
    for i in coords {
        let h = 1e-6 * x[i].abs().max(1.0);
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

#[test]
fn embedding_fd() {
    let (vv, c) = (7, 5);
    let ids: Vec<u32> = vec![3, 0, 3, 6, 1, 3, 0, 2, 6, 3, 5, 1];
    let wte = random(vv * c, 1);
    let r = random(ids.len() * c, 2);
    let fwd = |wte: &[f64]| {
        let mut out = vec![0.0; ids.len() * c];
        cpu::embedding::embedding_fwd(&mut out, &ids, wte, c);
        dot64(&r, &out)
    };
    let mut dwte = vec![0.0; vv * c];
    cpu::embedding::embedding_bwd(&mut dwte, &ids, &r, c);
    check_fd("embedding dwte", &wte, &dwte, fwd);
}

#[test]
fn rmsnorm_fd() {
    let (n, c, eps) = (5, 13, 1e-5);
    let mut x = random(n * c, 3);
    for v in &mut x[2 * c..3 * c] {
        *v *= 1e-3; // mean(x^2) ~ eps: the eps term matters in this row
    }
    let w: Vec<f64> = random(c, 4).iter().map(|v| 1.0 + 0.5 * v).collect();
    let r = random(n * c, 5);
    let fwd = |x: &[f64], w: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        cpu::rmsnorm::rmsnorm_fwd(&mut out, &mut rstd, x, w, c, eps);
        (dot64(&r, &out), rstd)
    };
    let rstd = fwd(&x, &w).1;
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    cpu::rmsnorm::rmsnorm_bwd(&mut dx, &mut dw, &r, &x, &w, &rstd, c, false);
    check_fd("rmsnorm dx", &x, &dx, |x| fwd(x, &w).0);
    check_fd("rmsnorm dw", &w, &dw, |w| fwd(&x, w).0);
}

#[test]
fn rope_fd() {
    let (b, t, h, hs, pos0, theta) = (2, 5, 3, 10, 3, 10000.0);
    let x = random(b * t * h * hs, 6);
    let r = random(x.len(), 7);
    let fwd = |x: &[f64]| {
        let mut y = x.to_vec();
        cpu::rope::rope_fwd(&mut y, t, h, hs, pos0, theta);
        dot64(&r, &y)
    };
    let mut dx = r.clone();
    cpu::rope::rope_bwd(&mut dx, t, h, hs, pos0, theta);
    check_fd("rope dx", &x, &dx, fwd);
}

#[test]
fn rope_angles_are_formed_in_f32_like_hf() {
    // x_i = 1, x_{i+HS/2} = 0 rotates to (cos a_i, sin a_i): read the angles back at large
    // positions, where the f32 product p * inv_freq differs visibly from an f64 one.
    let (t, hs, pos0, theta) = (3, 8, 100_000, 500_000.0f32);
    let half = hs / 2;
    let unit: Vec<f64> = (0..t)
        .flat_map(|_| (0..hs).map(|c| if c < half { 1.0 } else { 0.0 }))
        .collect();
    let mut y = unit.clone();
    cpu::rope::rope_fwd(&mut y, t, 1, hs, pos0, theta);
    let mut y32: Buf = unit.iter().map(|&x| x as f32).collect();
    cpu::rope::rope_fwd(&mut y32, t, 1, hs, pos0, theta);
    for ti in 0..t {
        for i in 0..half {
            // transformers: inv_freq = 1 / theta ** (arange(0, HS, 2).float() / HS), in f32;
            // angle = float(position) * inv_freq, in f32.
            let inv_freq = 1.0 / theta.powf((2 * i) as f32 / hs as f32);
            let angle = ((pos0 + ti) as f32 * inv_freq) as f64;
            let (c, s) = (y[ti * hs + i], y[ti * hs + half + i]);
            assert!(
                (c - angle.cos()).abs() < 1e-12 && (s - angle.sin()).abs() < 1e-12,
                "t={ti} i={i}"
            );
            let (c32, s32) = (y32[ti * hs + i], y32[ti * hs + half + i]);
            assert_eq!(
                (c32, s32),
                (angle.cos() as f32, angle.sin() as f32),
                "f32 twin t={ti} i={i}"
            );
        }
    }
}

fn attention_fd_case(nh: usize, nkv: usize, seed: u64) {
    let d = AttnDims {
        b: 2,
        t: 6,
        nh,
        nkv,
        hs: 5,
    };
    let (nq, nk) = (d.b * d.t * nh * d.hs, d.b * d.t * nkv * d.hs);
    let q: Vec<f64> = random(nq, seed).iter().map(|x| 2.0 * x).collect();
    let k: Vec<f64> = random(nk, seed + 1).iter().map(|x| 2.0 * x).collect();
    let vv = random(nk, seed + 2);
    let r = random(nq, seed + 3);
    let fwd = |q: &[f64], k: &[f64], vv: &[f64]| {
        let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; d.b * nh * d.t]);
        cpu::attention::attention_fwd(&mut out, &mut lse, q, k, vv, d);
        (out, lse)
    };
    let (out, lse) = fwd(&q, &k, &vv);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    cpu::attention::attention_bwd(&mut dq, &mut dk, &mut dv, &r, &q, &k, &vv, &out, &lse, d);
    let tag = format!("attention NH={nh} NKV={nkv}");
    check_fd(&format!("{tag} dq"), &q, &dq, |q| {
        dot64(&r, &fwd(q, &k, &vv).0)
    });
    check_fd(&format!("{tag} dk"), &k, &dk, |k| {
        dot64(&r, &fwd(&q, k, &vv).0)
    });
    check_fd(&format!("{tag} dv"), &vv, &dv, |vv| {
        dot64(&r, &fwd(&q, &k, vv).0)
    });
}

#[test]
fn attention_fd_gqa() {
    attention_fd_case(4, 2, 10);
}

#[test]
fn attention_fd_mqa() {
    attention_fd_case(4, 1, 20);
}

#[test]
fn attention_fd_mha() {
    attention_fd_case(3, 3, 30);
}

#[test]
fn attention_lse_is_logsumexp_of_causal_scores() {
    let d = AttnDims {
        b: 1,
        t: 4,
        nh: 2,
        nkv: 1,
        hs: 3,
    };
    let (q, k, vv) = (random(24, 40), random(12, 41), random(12, 42));
    let (mut out, mut lse) = (vec![0.0; 24], vec![0.0; 8]);
    cpu::attention::attention_fwd(&mut out, &mut lse, &q, &k, &vv, d);
    for h in 0..2 {
        for i in 0..4 {
            let qi = &q[(i * 2 + h) * 3..][..3];
            let s: Vec<f64> = (0..=i)
                .map(|j| dot64(qi, &k[j * 3..][..3]) / 3f64.sqrt())
                .collect();
            let want = s.iter().map(|x| x.exp()).sum::<f64>().ln();
            assert!((lse[h * 4 + i] - want).abs() < 1e-12, "lse[{h},{i}]");
            let o: Vec<f64> = (0..3)
                .map(|c| (0..=i).map(|j| (s[j] - want).exp() * vv[j * 3 + c]).sum())
                .collect();
            for c in 0..3 {
                assert!(
                    (out[(i * 2 + h) * 3 + c] - o[c]).abs() < 1e-12,
                    "out[{i},{h},{c}]"
                );
            }
        }
    }
}

#[test]
fn swiglu_fd() {
    let n = 40;
    let gate: Vec<f64> = random(n, 8).iter().map(|x| 4.0 * x).collect();
    let up = random(n, 9);
    let r = random(n, 10);
    let fwd = |g: &[f64], u: &[f64]| {
        let mut out = vec![0.0; n];
        cpu::swiglu::swiglu_fwd(&mut out, &[g, u].concat());
        dot64(&r, &out)
    };
    let mut dgu = vec![0.0; 2 * n];
    cpu::swiglu::swiglu_bwd(&mut dgu, &r, &[gate.as_slice(), &up].concat());
    let (dg, du) = dgu.split_at(n);
    check_fd("swiglu dgate", &gate, dg, |g| fwd(g, &up));
    check_fd("swiglu dup", &up, du, |u| fwd(&gate, u));
}

#[allow(clippy::too_many_arguments)]
fn mm64(
    c: &mut [f64],
    a: &[f64],
    b: &[f64],
    dims: [usize; 3],
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) {
    cpu::matmul::matmul(c, a, b, dims, ta, tb, alpha, beta).unwrap();
}

#[test]
fn matmul_fd() {
    let (mm, n, k) = (4, 5, 3);
    let (alpha, beta) = (0.75f32, 0.5f32);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = random(mm * k, 11);
        let b = random(k * n, 12);
        let c0 = random(mm * n, 13);
        let r = random(mm * n, 14);
        let fwd = |a: &[f64], b: &[f64], c0: &[f64]| {
            let mut c = c0.to_vec();
            mm64(&mut c, a, b, [mm, n, k], ta, tb, alpha, beta);
            dot64(&r, &c)
        };
        // C = alpha op(A) op(B) + beta C0 with dC = R:
        // d op(A) = alpha R op(B)^T [M,K], d op(B) = alpha op(A)^T R [K,N], dC0 = beta R.
        let mut da = vec![0.0; mm * k];
        if ta {
            mm64(&mut da, &b, &r, [k, mm, n], tb, true, alpha, 0.0); // dA [K,M] = op(B) R^T
        } else {
            mm64(&mut da, &r, &b, [mm, k, n], false, !tb, alpha, 0.0); // dA [M,K] = R op(B)^T
        }
        let mut db = vec![0.0; k * n];
        if tb {
            mm64(&mut db, &r, &a, [n, k, mm], true, ta, alpha, 0.0); // dB [N,K] = R^T op(A)
        } else {
            mm64(&mut db, &a, &r, [k, n, mm], !ta, false, alpha, 0.0); // dB [K,N] = op(A)^T R
        }
        let dc0: Vec<f64> = r.iter().map(|x| x * beta as f64).collect();
        let tag = format!("matmul ta={ta} tb={tb}");
        check_fd(&format!("{tag} da"), &a, &da, |a| fwd(a, &b, &c0));
        check_fd(&format!("{tag} db"), &b, &db, |b| fwd(&a, b, &c0));
        check_fd(&format!("{tag} dc"), &c0, &dc0, |c0| fwd(&a, &b, c0));
    }
}

#[test]
fn residual_fd() {
    let n = 30;
    let (a, b, r) = (random(n, 15), random(n, 16), random(n, 17));
    let fwd = |a: &[f64], b: &[f64]| {
        let mut out = vec![0.0; n];
        cpu::residual::residual_fwd(&mut out, a, b);
        dot64(&r, &out)
    };
    let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
    cpu::residual::residual_bwd(&mut da, &r);
    cpu::residual::residual_bwd(&mut db, &r);
    check_fd("residual da", &a, &da, |a| fwd(a, &b));
    check_fd("residual db", &b, &db, |b| fwd(&a, b));
}

#[test]
fn cross_entropy_fd() {
    let (n, vv, scale) = (6, 7, 0.37f32);
    let logits: Vec<f64> = random(n * vv, 18).iter().map(|x| 3.0 * x).collect();
    let targets: Vec<u32> = vec![0, 6, 3, 3, 1, 5];
    let mask = vec![1.0, 0.0, 1.0, 0.5, 1.0, 0.0];
    use cpu::cross_entropy::{cross_entropy_chunk_bwd, cross_entropy_chunk_fwd, CE_STATE};
    // the whole vocabulary as one chunk (as training runs it), then the gradient written over
    // a copy of the logits
    let ce = |x: &[f64]| {
        let (mut losses, mut state) = (vec![0.0; n], vec![f64::NAN; n * CE_STATE]);
        cross_entropy_chunk_fwd(&mut losses, &mut state, x, &targets, &mask, vv, vv, 0);
        (losses, state)
    };
    let fwd = |x: &[f64]| scale as f64 * ce(x).0.iter().sum::<f64>();
    let mut dl = logits.clone();
    cross_entropy_chunk_bwd(&mut dl, &ce(&logits).1, &targets, &mask, vv, 0, scale);
    assert!(
        dl[vv..2 * vv].iter().all(|&x| x == 0.0),
        "a masked row has zero gradient"
    );
    check_fd("cross_entropy dlogits", &logits, &dl, fwd);
}

#[test]
fn softmax_fd() {
    let (n, vv) = (4, 9);
    let x: Vec<f64> = random(n * vv, 19).iter().map(|x| 3.0 * x).collect();
    let r = random(n * vv, 20);
    let fwd = |x: &[f64]| {
        let mut out = vec![0.0; n * vv];
        cpu::softmax::softmax_fwd(&mut out, x, vv);
        out
    };
    let out = fwd(&x);
    let mut dx = vec![0.0; n * vv];
    cpu::softmax::softmax_bwd(&mut dx, &r, &out, vv);
    check_fd("softmax dx", &x, &dx, |x| dot64(&r, &fwd(x)));
}

// ------------------------------------------------------------------------------------------
// Through the Device trait: argument checks, `=` overwrites, `+=` accumulates, windows
// ------------------------------------------------------------------------------------------

#[test]
fn copy_fill_upload_download() {
    let dev = CpuDevice;
    let mut x = dev.alloc(6).unwrap();
    assert_eq!(x, vec![0.0; 6]);
    dev.fill(ViewMut::range(&mut x, 2, 3), 7.0).unwrap();
    assert_eq!(x, [0.0, 0.0, 7.0, 7.0, 7.0, 0.0]);
    let src = dev.upload(&[1.0, 2.0]).unwrap();
    dev.copy(ViewMut::range(&mut x, 4, 2), v(&src)).unwrap();
    assert_eq!(
        dev.download(View::range(&x, 3, 3)).unwrap(),
        [7.0, 1.0, 2.0]
    );
    assert_invalid("copy", dev.copy(ViewMut::range(&mut x, 0, 3), v(&src)));
    assert_eq!(dev.upload_ids(&[3, 1]).unwrap(), vec![3, 1]);
    assert!(dev.name().starts_with("cpu"));
}

#[test]
fn embedding_device() {
    let dev = CpuDevice;
    let (n, c, vv) = (5, 3, 4);
    let wte = random_f32(vv * c, 21);
    let ids: Vec<u32> = vec![1, 3, 1, 0, 2];
    let mut out = vec![f32::NAN; n * c];
    dev.embedding_fwd(m(&mut out), &ids, v(&wte), n, c).unwrap();
    assert_eq!(&out[3..6], &wte[9..12]);
    assert_invalid(
        "embedding_fwd",
        dev.embedding_fwd(m(&mut out), &vec![1, 4, 1, 0, 2], v(&wte), n, c),
    );
    assert_invalid(
        "embedding_fwd",
        dev.embedding_fwd(m(&mut out), &ids, v(&wte), n, 4),
    );
    assert_invalid(
        "embedding_fwd",
        dev.embedding_fwd(m(&mut out), &ids, v(&wte), n, 0),
    );
    assert_invalid(
        "embedding_fwd",
        dev.embedding_fwd(m(&mut out), &ids[..4].to_vec(), v(&wte), n, c),
    );

    let dout = random_f32(n * c, 22);
    let mut dwte = vec![0.0; vv * c];
    dev.embedding_bwd(m(&mut dwte), &ids, v(&dout), n, c)
        .unwrap();
    let once = dwte.clone();
    assert_eq!(
        &once[3..6],
        &[dout[0] + dout[6], dout[1] + dout[7], dout[2] + dout[8]]
    );
    dev.embedding_bwd(m(&mut dwte), &ids, v(&dout), n, c)
        .unwrap();
    assert_eq!(
        dwte,
        once.iter().map(|x| 2.0 * x).collect::<Buf>(),
        "dwte accumulates"
    );
    assert_invalid(
        "embedding_bwd",
        dev.embedding_bwd(m(&mut dwte), &vec![1, 3, 1, 0, 9], v(&dout), n, c),
    );
    assert_invalid(
        "embedding_bwd",
        dev.embedding_bwd(m(&mut dwte), &ids, v(&dout[..6].to_vec()), n, c),
    );
}

#[test]
fn rmsnorm_device() {
    let dev = CpuDevice;
    let (n, c) = (3, 8);
    let (x, w, dout) = (
        random_f32(n * c, 23),
        random_f32(c, 24),
        random_f32(n * c, 25),
    );
    // out written into a window of a larger buffer: the rest stays untouched.
    let mut big = vec![-9.0; n * c + 4];
    let mut rstd = vec![f32::NAN; n];
    dev.rmsnorm_fwd(
        ViewMut::range(&mut big, 2, n * c),
        m(&mut rstd),
        v(&x),
        v(&w),
        n,
        c,
        1e-5,
    )
    .unwrap();
    assert_eq!([big[0], big[1], big[n * c + 2], big[n * c + 3]], [-9.0; 4]);
    let out = big[2..2 + n * c].to_vec();
    let mut ref_out = vec![0.0; n * c];
    let mut ref_rstd = vec![0.0; n];
    cpu::rmsnorm::rmsnorm_fwd(&mut ref_out, &mut ref_rstd, &x, &w, c, 1e-5);
    assert_eq!((out, rstd.clone()), (ref_out, ref_rstd));

    let mut dx = vec![f32::NAN; n * c];
    let mut dw = vec![0.0; c];
    dev.rmsnorm_bwd(
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
    assert!(dx.iter().all(|x| x.is_finite()), "dx overwrites");
    let (dx1, dw1) = (dx.clone(), dw.clone());
    dev.rmsnorm_bwd(
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
    assert_eq!(dx, dx1, "dx overwrites");
    assert_eq!(
        dw,
        dw1.iter().map(|x| 2.0 * x).collect::<Buf>(),
        "dw accumulates"
    );
    // accumulate: dx += the same values, each one f32 add (bit-exact)
    let dx0 = random_f32(n * c, 44);
    let mut dx = dx0.clone();
    dev.rmsnorm_bwd(
        m(&mut dx),
        m(&mut dw),
        v(&dout),
        v(&x),
        v(&w),
        v(&rstd),
        n,
        c,
        true,
    )
    .unwrap();
    let want: Buf = dx0.iter().zip(&dx1).map(|(a, b)| a + b).collect();
    assert_eq!(dx, want, "dx accumulates with accumulate");

    let mut out = vec![0.0; n * c];
    assert_invalid(
        "rmsnorm_fwd",
        dev.rmsnorm_fwd(
            m(&mut out),
            m(&mut rstd),
            v(&x),
            v(&w[..7].to_vec()),
            n,
            c,
            1e-5,
        ),
    );
    assert_invalid(
        "rmsnorm_fwd",
        dev.rmsnorm_fwd(m(&mut out), m(&mut rstd), v(&x), v(&w), n, c, -1.0),
    );
    assert_invalid(
        "rmsnorm_fwd",
        dev.rmsnorm_fwd(
            m(&mut out[..5].to_vec()),
            m(&mut rstd),
            v(&x),
            v(&w),
            n,
            c,
            1e-5,
        ),
    );
    assert_invalid(
        "rmsnorm_bwd",
        dev.rmsnorm_bwd(
            m(&mut dx),
            m(&mut dw),
            v(&dout),
            v(&x),
            v(&w),
            v(&rstd[..2].to_vec()),
            n,
            c,
            false,
        ),
    );
    assert_invalid(
        "rmsnorm_bwd",
        dev.rmsnorm_bwd(
            m(&mut dx),
            m(&mut dw),
            v(&dout),
            v(&x),
            v(&w),
            v(&rstd),
            n,
            usize::MAX,
            false,
        ),
    );
}

#[test]
fn rope_device() {
    let dev = CpuDevice;
    let (b, t, h, hs) = (2, 3, 2, 6);
    let x = random_f32(b * t * h * hs, 26);
    let mut y = x.clone();
    dev.rope_fwd(m(&mut y), b, t, h, hs, 5, None, 10000.0)
        .unwrap();
    // Position 0 of a batch started at pos0 = 0 is the identity; here pos0 = 5, so nothing is.
    assert_ne!(y[..hs], x[..hs]);
    dev.rope_bwd(m(&mut y), b, t, h, hs, 5, 10000.0).unwrap();
    // bwd is the inverse rotation: it undoes fwd up to rounding.
    assert_close("rope inverse", &y, &x, 1e-6, 1e-6, 1e-12);
    let mut z = x.clone();
    dev.rope_fwd(m(&mut z), b, t, h, hs, 0, None, 10000.0)
        .unwrap();
    assert_eq!(z[..h * hs], x[..h * hs], "position 0 is not rotated");
    assert_invalid(
        "rope_fwd",
        dev.rope_fwd(m(&mut y), b, t, h, 5, 0, None, 10000.0),
    );
    assert_invalid(
        "rope_fwd",
        dev.rope_fwd(m(&mut y), b, t + 1, h, hs, 0, None, 10000.0),
    );
    assert_invalid(
        "rope_fwd",
        dev.rope_fwd(m(&mut y), b, t, h, hs, 0, None, 0.0),
    );
    assert_invalid("rope_bwd", dev.rope_bwd(m(&mut y), b, t, h, 0, 0, 10000.0));
}

/// qkv_rope is the split of the fused rows followed by rope (bit for bit: the same rotation)
/// and, into a cache, kv_append of those keys and values; its backward is the forward's
/// adjoint: <fwd(x), g> = <x, bwd(g)> over the written positions (a rotation and copies),
/// checked in f64 on the f32 results.
#[test]
fn qkv_rope_device() {
    let dev = CpuDevice;
    // positions 5..8 of a 10-position cache: earlier and later positions are kept
    let d = CacheDims {
        b: 2,
        tq: 3,
        tmax: 10,
        nh: 4,
        nkv: 2,
        hs: 6,
        pos0: 5,
    };
    let (rows, qd, kvd) = (d.b * d.tq, d.nh * d.hs, d.nkv * d.hs);
    let ld = qd + 2 * kvd;
    let (pos0, theta) = (d.pos0, 10000.0);
    let x = random_f32(rows * ld, 61);
    let part = |x: &[f32], lo: usize, w: usize| -> Buf {
        x.chunks(ld).flat_map(|r| r[lo..lo + w].to_vec()).collect()
    };
    // the window of positions pos0..pos0+TQ of each row of a cache [B,TMAX,KVD]
    let win = |x: &[f32]| -> Buf {
        (0..d.b)
            .flat_map(|b| x[(b * d.tmax + pos0) * kvd..(b * d.tmax + pos0 + d.tq) * kvd].to_vec())
            .collect()
    };
    let (kc0, vc0) = (
        random_f32(d.b * d.tmax * kvd, 63),
        random_f32(d.b * d.tmax * kvd, 64),
    );
    let mut q = vec![f32::NAN; rows * qd];
    let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
    dev.qkv_rope_fwd(m(&mut q), m(&mut kc), m(&mut vc), v(&x), None, d, theta)
        .unwrap();
    let (mut wq, mut wk, wv) = (part(&x, 0, qd), part(&x, qd, kvd), part(&x, qd + kvd, kvd));
    dev.rope_fwd(m(&mut wq), d.b, d.tq, d.nh, d.hs, pos0, None, theta)
        .unwrap();
    dev.rope_fwd(m(&mut wk), d.b, d.tq, d.nkv, d.hs, pos0, None, theta)
        .unwrap();
    assert_eq!(
        (&q, &win(&kc), &win(&vc)),
        (&wq, &wk, &wv),
        "split, then rope"
    );
    // = kv_append of those keys and values: every other cache position kept
    let (mut kc1, mut vc1) = (kc0.clone(), vc0.clone());
    dev.kv_append_fwd(m(&mut kc1), m(&mut vc1), v(&wk), v(&wv), None, d)
        .unwrap();
    assert_eq!(
        (&kc, &vc),
        (&kc1, &vc1),
        "kv_append of the rotated keys and values"
    );
    // the batch as its own cache (training's layout): [B,TQ] outputs, positions from 0
    let own = CacheDims::from(AttnDims {
        b: d.b,
        t: d.tq,
        nh: d.nh,
        nkv: d.nkv,
        hs: d.hs,
    });
    let [mut q1, mut k1, mut v1] = [qd, kvd, kvd].map(|w| vec![f32::NAN; rows * w]);
    dev.qkv_rope_fwd(m(&mut q1), m(&mut k1), m(&mut v1), v(&x), None, own, theta)
        .unwrap();
    let (mut oq, mut ok) = (part(&x, 0, qd), part(&x, qd, kvd));
    dev.rope_fwd(m(&mut oq), d.b, d.tq, d.nh, d.hs, 0, None, theta)
        .unwrap();
    dev.rope_fwd(m(&mut ok), d.b, d.tq, d.nkv, d.hs, 0, None, theta)
        .unwrap();
    assert_eq!(
        (&q1, &k1, &v1),
        (&oq, &ok, &wv),
        "TMAX = TQ: split, then rope"
    );
    // the position held in memory: the same
    let mut q2 = vec![f32::NAN; rows * qd];
    let (mut kc2, mut vc2) = (kc0.clone(), vc0.clone());
    let pos = vec![pos0 as u32];
    let at0 = CacheDims { pos0: 0, ..d };
    dev.qkv_rope_fwd(
        m(&mut q2),
        m(&mut kc2),
        m(&mut vc2),
        v(&x),
        Some(&pos),
        at0,
        theta,
    )
    .unwrap();
    assert_eq!((&q2, &kc2, &vc2), (&q, &kc, &vc), "pos in memory");

    let (gq, gk, gv) = (
        random_f32(rows * qd, 62),
        random_f32(d.b * d.tmax * kvd, 65),
        random_f32(d.b * d.tmax * kvd, 66),
    );
    let mut dx = vec![f32::NAN; rows * ld];
    dev.qkv_rope_bwd(m(&mut dx), v(&gq), v(&gk), v(&gv), d, theta)
        .unwrap();
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    let lhs = dot(&q, &gq) + dot(&win(&kc), &win(&gk)) + dot(&win(&vc), &win(&gv));
    let rhs = dot(&x, &dx);
    // each side rounds ~rows * ld products of |x| < 1 to f32 once: 1e-5 relative covers it
    assert!(
        (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
    // the backward's parts are rope_bwd's of dq and of dk's window, and dv's window
    let (mut bq, mut bk) = (gq.clone(), win(&gk));
    dev.rope_bwd(m(&mut bq), d.b, d.tq, d.nh, d.hs, pos0, theta)
        .unwrap();
    dev.rope_bwd(m(&mut bk), d.b, d.tq, d.nkv, d.hs, pos0, theta)
        .unwrap();
    let dparts = (
        part(&dx, 0, qd),
        part(&dx, qd, kvd),
        part(&dx, qd + kvd, kvd),
    );
    assert_eq!(dparts, (bq, bk, win(&gv)), "rope_bwd, then concatenated");

    // wrong lengths, HS, theta and positions are refused
    let short = vec![0.0; rows * ld - 1];
    let fwd = |q: &mut Buf, k: &mut Buf, vv: &mut Buf, x: &Buf, pos: Option<&Vec<u32>>, d| {
        dev.qkv_rope_fwd(m(q), m(k), m(vv), v(x), pos, d, theta)
    };
    assert_invalid(
        "qkv_rope_fwd",
        fwd(&mut q, &mut kc, &mut vc, &short, None, d),
    );
    // q where k goes
    assert_invalid("qkv_rope_fwd", fwd(&mut kc, &mut q, &mut vc, &x, None, d));
    let odd = CacheDims { hs: 5, ..d };
    assert_invalid("qkv_rope_fwd", fwd(&mut q, &mut kc, &mut vc, &x, None, odd));
    let two = vec![0u32; 2];
    assert_invalid(
        "qkv_rope_fwd",
        fwd(&mut q, &mut kc, &mut vc, &x, Some(&two), d),
    );
    // positions past the cache's end, from the host or from memory
    let past = CacheDims { pos0: 8, ..d };
    assert_invalid(
        "qkv_rope_fwd",
        fwd(&mut q, &mut kc, &mut vc, &x, None, past),
    );
    let beyond = vec![8u32];
    assert_invalid(
        "qkv_rope_fwd",
        fwd(&mut q, &mut kc, &mut vc, &x, Some(&beyond), d),
    );
    assert_invalid(
        "qkv_rope_bwd",
        dev.qkv_rope_bwd(m(&mut dx), v(&gq), v(&gk), v(&gv), d, f32::NAN),
    );
    assert_invalid(
        "qkv_rope_bwd",
        dev.qkv_rope_bwd(m(&mut dx), v(&gq), v(&gv[1..].to_vec()), v(&gv), d, theta),
    );
    assert_invalid(
        "qkv_rope_bwd",
        dev.qkv_rope_bwd(m(&mut dx), v(&gq), v(&gk), v(&gv), past, theta),
    );
}

#[test]
fn attention_device() {
    let dev = CpuDevice;
    let d = AttnDims {
        b: 2,
        t: 5,
        nh: 4,
        nkv: 2,
        hs: 8,
    };
    let (nq, nk, nl) = (2 * 5 * 4 * 8, 2 * 5 * 2 * 8, 2 * 4 * 5);
    let (q, k, vv, dout) = (
        random_f32(nq, 27),
        random_f32(nk, 28),
        random_f32(nk, 29),
        random_f32(nq, 30),
    );
    let (mut out, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
    dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), d)
        .unwrap();
    let (out1, lse1) = (out.clone(), lse.clone());
    dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), d)
        .unwrap();
    assert_eq!((&out, &lse), (&out1, &lse1), "out and lse overwrite");
    assert!(out.iter().chain(&lse).all(|x| x.is_finite()));

    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
    let run = |dq: &mut Buf, dk: &mut Buf, dv: &mut Buf| {
        dev.attention_bwd(
            m(dq),
            m(dk),
            m(dv),
            v(&dout),
            v(&q),
            v(&k),
            v(&vv),
            v(&out),
            v(&lse),
            d,
        )
    };
    run(&mut dq, &mut dk, &mut dv).unwrap();
    assert!(
        dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()),
        "NaN garbage overwritten"
    );
    let (dq1, dk1, dv1) = (dq.clone(), dk.clone(), dv.clone());
    run(&mut dq, &mut dk, &mut dv).unwrap();
    assert_eq!((dq, dk, dv), (dq1, dk1, dv1), "dq, dk, dv overwrite");

    let bad = AttnDims { nkv: 3, ..d };
    assert_invalid(
        "attention_fwd",
        dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), bad),
    );
    let bad = AttnDims { nkv: 0, ..d };
    assert_invalid(
        "attention_fwd",
        dev.attention_fwd(m(&mut out), m(&mut lse), v(&q), v(&k), v(&vv), bad),
    );
    assert_invalid(
        "attention_fwd",
        dev.attention_fwd(
            m(&mut out),
            m(&mut lse[..nl - 1].to_vec()),
            v(&q),
            v(&k),
            v(&vv),
            d,
        ),
    );
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk + 1]);
    assert_invalid(
        "attention_bwd",
        dev.attention_bwd(
            m(&mut dq),
            m(&mut dk),
            m(&mut dv),
            v(&dout),
            v(&q),
            v(&k),
            v(&vv),
            v(&out),
            v(&lse),
            d,
        ),
    );
}

#[test]
fn swiglu_device() {
    let dev = CpuDevice;
    let n = 50;
    let (g, u, dout) = (random_f32(n, 31), random_f32(n, 32), random_f32(n, 33));
    let gu = [g.as_slice(), &u].concat();
    let mut out = vec![f32::NAN; n];
    dev.swiglu_fwd(m(&mut out), v(&gu)).unwrap();
    let silu = |x: f32| x / (1.0 + (-x).exp());
    assert_close(
        "swiglu out",
        &out,
        &g.iter()
            .zip(&u)
            .map(|(&g, &u)| silu(g) * u)
            .collect::<Buf>(),
        0.0,
        4.0 * U,
        1e-13,
    );
    let mut dgu = vec![f32::NAN; 2 * n];
    dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu)).unwrap();
    // against the separate formulas, in [dgate; dup] order
    let s = |x: f32| 1.0 / (1.0 + (-x).exp());
    let want: Buf = (0..2 * n)
        .map(|i| {
            let j = i % n;
            let (g, u, d) = (g[j], u[j], dout[j]);
            if i < n {
                d * u * s(g) * (1.0 + g * (1.0 - s(g)))
            } else {
                d * silu(g)
            }
        })
        .collect();
    assert_close("swiglu dgu", &dgu, &want, 4.0 * U, 16.0 * U, 1e-13);
    let dgu1 = dgu.clone();
    dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu)).unwrap();
    assert_eq!(dgu, dgu1, "dgate and dup overwrite");
    assert_invalid(
        "swiglu_fwd",
        dev.swiglu_fwd(m(&mut out), v(&gu[1..].to_vec())),
    );
    let mut short = vec![0.0; 2 * n - 1];
    assert_invalid(
        "swiglu_bwd",
        dev.swiglu_bwd(m(&mut short), v(&dout), v(&gu)),
    );
    assert_invalid(
        "swiglu_bwd",
        dev.swiglu_bwd(m(&mut dgu), v(&dout), v(&gu[1..].to_vec())),
    );
}

#[test]
fn matmul_device() {
    let dev = CpuDevice;
    let (mm, n, k) = (9, 10, 11);
    let (a, b) = (random_f32(mm * k, 34), random_f32(k * n, 35));
    let mut c = vec![f32::NAN; mm * n];
    dev.matmul(m(&mut c), v(&a), v(&b), mm, n, k, false, false, 1.0, 0.0)
        .unwrap();
    assert!(c.iter().all(|x| x.is_finite()), "beta = 0 ignores NaN in c");
    let once = c.clone();
    dev.matmul(m(&mut c), v(&a), v(&b), mm, n, k, false, false, 1.0, 1.0)
        .unwrap();
    assert_close(
        "matmul beta=1 accumulates",
        &c,
        &once.iter().map(|x| 2.0 * x).collect::<Buf>(),
        0.0,
        2.0 * U,
        1e-14,
    );
    assert_invalid(
        "matmul",
        dev.matmul(
            m(&mut c),
            v(&a),
            v(&b),
            mm,
            n,
            k + 1,
            false,
            false,
            1.0,
            0.0,
        ),
    );
    assert_invalid(
        "matmul",
        dev.matmul(m(&mut c), v(&a), v(&b), mm + 1, n, k, true, true, 1.0, 0.0),
    );
    assert_invalid(
        "matmul",
        dev.matmul(
            m(&mut c),
            v(&a),
            v(&b),
            usize::MAX,
            2,
            k,
            false,
            false,
            1.0,
            0.0,
        ),
    );
    // Degenerate K = 0: c = beta * c.
    let mut c = vec![3.0; 4];
    dev.matmul(
        m(&mut c),
        v(&vec![]),
        v(&vec![]),
        2,
        2,
        0,
        false,
        false,
        1.0,
        0.5,
    )
    .unwrap();
    assert_eq!(c, [1.5; 4]);
}

#[test]
fn residual_device() {
    let dev = CpuDevice;
    let n = 40_000; // more than one parallel chunk
    let (a, b) = (random_f32(n, 36), random_f32(n, 37));
    let mut out = vec![f32::NAN; n];
    dev.residual_fwd(m(&mut out), v(&a), v(&b)).unwrap();
    assert!(out
        .iter()
        .zip(a.iter().zip(&b))
        .all(|(&o, (&a, &b))| o == a + b));
    let mut da = vec![0.0; n];
    dev.residual_bwd(m(&mut da), v(&a)).unwrap();
    dev.residual_bwd(m(&mut da), v(&a)).unwrap();
    assert_eq!(
        da,
        a.iter().map(|x| 2.0 * x).collect::<Buf>(),
        "da accumulates"
    );
    assert_invalid(
        "residual_fwd",
        dev.residual_fwd(m(&mut out), v(&a), v(&b[1..].to_vec())),
    );
    assert_invalid(
        "residual_bwd",
        dev.residual_bwd(m(&mut da), v(&a[1..].to_vec())),
    );
}

/// The cross-entropy through the device over whole rows (one chunk of all V): masked rows,
/// the gradient over the logits, and the errors of bad targets and lengths.
#[test]
fn cross_entropy_device() {
    let dev = CpuDevice;
    let (n, vv) = (4, 6);
    let logits = random_f32(n * vv, 38);
    let targets: Vec<u32> = vec![5, 0, 2, 2];
    let mut mask = vec![1.0, 0.0, 1.0, 1.0];
    let mut padded = logits.clone();
    padded[vv..2 * vv].fill(f32::NAN); // a masked row's logits are never read
    let (mut losses, mut state) = (vec![f32::NAN; n], vec![f32::NAN; 3 * n]);
    let fwd = |losses: &mut Buf, state: &mut Buf, x: &Buf, t: &Vec<u32>, mask: &Buf| {
        let (l, s) = (m(losses), m(state));
        dev.cross_entropy_chunk_fwd(l, s, v(x), t, v(mask), n, vv, vv, 0)
    };
    let bwd = |x: &mut Buf, state: &Buf, t: &Vec<u32>, mask: &Buf, scale: f32| {
        dev.cross_entropy_chunk_bwd(m(x), v(state), t, v(mask), n, vv, vv, 0, scale)
    };
    fwd(&mut losses, &mut state, &padded, &targets, &mask).unwrap();
    assert_eq!(losses[1], 0.0);
    let row = &logits[..vv];
    let want = row.iter().map(|x| x.exp()).sum::<f32>().ln() - row[5];
    assert!((losses[0] - want).abs() < 1e-6, "{} vs {want}", losses[0]);
    let mut dl = padded.clone();
    bwd(&mut dl, &state, &targets, &mask, 0.5).unwrap();
    assert!(dl.iter().all(|x| x.is_finite()), "the gradient overwrites");
    assert!(dl[vv..2 * vv].iter().all(|&x| x == 0.0));
    // Each unmasked row of dlogits sums to zero (softmax sums to one).
    assert!(dl[..vv].iter().sum::<f32>().abs() < 1e-6);
    let (fwd_op, bwd_op) = ("cross_entropy_chunk_fwd", "cross_entropy_chunk_bwd");
    let (bad_fwd, bad_bwd) = (vec![5, 0, 6, 2], vec![5, 0, 2, 6]);
    let mut x = logits.clone();
    assert_invalid(
        fwd_op,
        fwd(&mut losses, &mut state, &logits, &bad_fwd, &mask),
    );
    assert_invalid(bwd_op, bwd(&mut x, &state, &bad_bwd, &mask, 1.0));
    mask.pop();
    assert_invalid(
        fwd_op,
        fwd(&mut losses, &mut state, &logits, &targets, &mask),
    );
    assert_invalid(bwd_op, bwd(&mut x, &state, &targets, &mask, 1.0));
}

#[test]
fn softmax_device() {
    let dev = CpuDevice;
    let (n, vv) = (3, 7);
    let x = random_f32(n * vv, 39);
    let mut out = vec![f32::NAN; n * vv];
    dev.softmax_fwd(m(&mut out), v(&x), n, vv).unwrap();
    for row in out.chunks(vv) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    let dout = random_f32(n * vv, 40);
    let mut dx = vec![f32::NAN; n * vv];
    dev.softmax_bwd(m(&mut dx), v(&dout), v(&out), n, vv)
        .unwrap();
    assert!(dx.iter().all(|x| x.is_finite()), "dx overwrites");
    assert!(
        dx[..vv].iter().sum::<f32>().abs() < 1e-6,
        "rows of dx sum to zero"
    );
    assert_invalid(
        "softmax_fwd",
        dev.softmax_fwd(m(&mut out), v(&x), n, vv + 1),
    );
    assert_invalid("softmax_fwd", dev.softmax_fwd(m(&mut out), v(&x), n, 0));
    assert_invalid(
        "softmax_bwd",
        dev.softmax_bwd(m(&mut dx), v(&dout[1..].to_vec()), v(&out), n, vv),
    );
}

#[test]
fn adamw_device() {
    let dev = CpuDevice;
    let n = 10;
    let (mut p, g) = (random_f32(n, 41), random_f32(n, 42));
    let (mut mm, mut vv) = (vec![0.0; n], vec![0.0; n]);
    let hp = AdamwStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let p0 = p.clone();
    dev.adamw(m(&mut p), None, v(&g), m(&mut mm), m(&mut vv), &hp)
        .unwrap();
    // First step without decay: m/(1-b1) = g, v/(1-b2) = g^2, so p moves by lr * sign(g).
    for i in 0..n {
        assert!((p0[i] - p[i] - 1e-3 * g[i].signum()).abs() < 1e-6, "p[{i}]");
    }
    assert_invalid(
        "adamw",
        dev.adamw(
            m(&mut p),
            None,
            v(&g),
            m(&mut mm),
            m(&mut vv),
            &AdamwStep { step: 0, ..hp },
        ),
    );
    assert_invalid(
        "adamw",
        dev.adamw(
            m(&mut p),
            None,
            v(&g),
            m(&mut mm),
            m(&mut vv),
            &AdamwStep { beta1: 1.0, ..hp },
        ),
    );
    assert_invalid(
        "adamw",
        dev.adamw(
            m(&mut p),
            None,
            v(&g[1..].to_vec()),
            m(&mut mm),
            m(&mut vv),
            &hp,
        ),
    );
    assert_invalid(
        "adamw",
        dev.adamw(
            m(&mut p),
            None,
            v(&g),
            m(&mut mm),
            m(&mut vv[1..].to_vec()),
            &hp,
        ),
    );
}
