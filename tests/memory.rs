//! The memory planner (offsets, reuse, bounds, the host arena), the step declarations (buffers
//! and lifetimes of actor, critic, reference, rollout; dtype policy, recompute, ZeRO, chunked
//! logits) and `nla-engine plan` on the demo config and a 7B GRPO config.

#[path = "../src/cmd/plan.rs"]
#[allow(dead_code)]
mod plan_cmd;

use std::path::Path;

use clap::Parser;
use rand::{Rng, SeedableRng};

use nla_engine::config::RunConfig;
use nla_engine::memory::{
    check_fits, parse_size, plan_step, plan_step_with, remedies, report, Arena, ArenaKind,
    BufferDecl, BufferId, Dtype, DtypePolicy, Fit, ModelKind, ModelSpec, Phase, PlanOptions,
    Planner, Recompute, RunShape, StepOptions, ALIGN,
};
use nla_engine::model::{builtin, ActivationSet, ModelConfig, ParamTable};

const GIB: usize = 1 << 30;

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

// ---------------------------------------------------------------- planner

const DTYPES: [Dtype; 4] = [Dtype::F32, Dtype::Bf16, Dtype::U32, Dtype::U8];
const ARENAS: [ArenaKind; 3] = [
    ArenaKind::Activations,
    ArenaKind::Scratch,
    ArenaKind::KvCache,
];

/// `n` random buffers over `ops` ops: sizes from 0 to ~1 MB (some tiny, some equal), random
/// lifetimes (some one op, some the whole span), three arenas.
fn random_planner(rng: &mut impl Rng, n: usize, ops: usize) -> Planner {
    let mut p = Planner::new();
    for i in 0..n {
        let elements = match rng.random_range(0..10) {
            0 => 0,
            1 => rng.random_range(1..8),
            2 => 4096,
            _ => rng.random_range(1..300_000),
        };
        let (first, last) = match rng.random_range(0..6) {
            0 => (0, ops - 1),
            1 => {
                let t = rng.random_range(0..ops);
                (t, t)
            }
            _ => {
                let a = rng.random_range(0..ops);
                let b = rng.random_range(0..ops);
                (a.min(b), a.max(b))
            }
        };
        let dtype = DTYPES[rng.random_range(0..DTYPES.len())];
        let arena = ARENAS[rng.random_range(0..ARENAS.len())];
        p.declare(format!("b{i}"), dtype, elements, arena, first, last)
            .unwrap();
    }
    p
}

/// Largest sum of aligned sizes live at one op (brute force over ops).
fn brute_max_live(decls: &[BufferDecl]) -> usize {
    let ops = decls.iter().map(|d| d.last + 1).max().unwrap_or(0);
    (0..ops)
        .map(|t| {
            decls
                .iter()
                .filter(|d| d.first <= t && t <= d.last)
                .map(|d| align(d.bytes()))
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

/// Every invariant, checked pair by pair independently of `MemoryPlan::check`.
fn assert_valid(plan: &nla_engine::memory::MemoryPlan) {
    plan.check().unwrap();
    let n = plan.decls.len();
    for i in 0..n {
        let (d, p) = (&plan.decls[i], plan.placements[i]);
        assert_eq!(p.offset % ALIGN, 0, "{} offset {}", d.name, p.offset);
        assert_eq!(p.size, align(d.bytes()), "{}", d.name);
        assert!(
            p.offset + d.bytes() <= plan.arena_size(d.arena),
            "{} [{}, +{}) outside arena {} of {}",
            d.name,
            p.offset,
            d.bytes(),
            d.arena,
            plan.arena_size(d.arena)
        );
        for j in i + 1..n {
            let (e, q) = (&plan.decls[j], plan.placements[j]);
            if d.arena != e.arena || d.bytes() == 0 || e.bytes() == 0 {
                continue;
            }
            let in_time = d.first <= e.last && e.first <= d.last;
            let in_space = p.offset < q.offset + q.size && q.offset < p.offset + p.size;
            assert!(
                !(in_time && in_space),
                "{} [{}..{}] and {} [{}..{}] are live together and share memory",
                d.name,
                d.first,
                d.last,
                e.name,
                e.first,
                e.last
            );
        }
    }
    let sum: usize = plan.arenas.iter().map(|a| a.size).sum();
    assert_eq!(plan.peak, sum);
    let lower = brute_max_live(&plan.decls);
    assert_eq!(plan.max_live().0, lower);
    assert!(plan.peak >= lower, "peak {} < live {lower}", plan.peak);
    assert!(plan.peak <= plan.declared(), "peak above the sum of all");
    for a in &plan.arenas {
        assert!(a.max_live <= a.size && a.size <= a.declared, "{a:?}");
    }
}

#[test]
fn random_declarations_never_share_memory_while_live() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    let opts = [
        PlanOptions::default(),
        PlanOptions {
            fit: Fit::First,
            ..PlanOptions::default()
        },
        PlanOptions {
            reuse: false,
            ..PlanOptions::default()
        },
    ];
    let mut reused = 0;
    for trial in 0..400 {
        let n = rng.random_range(1..120);
        let ops = rng.random_range(1..60);
        let p = random_planner(&mut rng, n, ops);
        for o in &opts {
            let plan = p.plan_with(o).unwrap();
            assert_valid(&plan);
            if !o.reuse {
                assert_eq!(plan.peak, plan.declared(), "trial {trial}");
            } else if plan.peak < plan.declared() {
                reused += 1;
            }
        }
    }
    // the random sets do give the planner room to reuse, and it does
    assert!(reused > 600, "reuse in only {reused} of 800 plans");
}

#[test]
fn a_chain_of_one_op_buffers_needs_only_the_largest() {
    // buffer i lives at op i only: nothing is live together, everything can share
    let sizes = [1000usize, 70_000, 3, 70_001, 256, 12_345];
    let mut p = Planner::new();
    for (i, &s) in sizes.iter().enumerate() {
        p.declare(format!("c{i}"), Dtype::U8, s, ArenaKind::Activations, i, i)
            .unwrap();
    }
    let plan = p.plan().unwrap();
    assert_valid(&plan);
    let largest = sizes.iter().map(|&s| align(s)).max().unwrap();
    assert_eq!(plan.max_live().0, largest);
    assert_eq!(plan.peak, largest, "the lower bound is reached");
    assert!(plan.placements.iter().all(|p| p.offset == 0));
}

#[test]
fn a_chain_of_two_op_buffers_needs_two_slots() {
    // x_{i+1} = f(x_i): buffer i lives [i, i+1], as the residual stream of a forward
    let mut p = Planner::new();
    for i in 0..40 {
        p.declare(
            format!("x{i}"),
            Dtype::F32,
            1000,
            ArenaKind::Activations,
            i,
            i + 1,
        )
        .unwrap();
    }
    let plan = p.plan().unwrap();
    assert_valid(&plan);
    assert_eq!(plan.peak, 2 * align(4000));
    assert_eq!(plan.peak, plan.max_live().0);
    let off: Vec<usize> = plan.placements.iter().map(|p| p.offset).collect();
    assert!(
        off.windows(2).all(|w| w[0] != w[1]),
        "neighbours share memory"
    );
}

#[test]
fn planning_without_reuse_costs_the_sum() {
    // fails if reuse is off in `plan()`: the chain needs its largest buffer, not the sum
    let mut p = Planner::new();
    let mut sum = 0;
    for i in 0..10 {
        let el = 1 << (10 + i % 4);
        sum += align(el * 4);
        p.declare(
            format!("x{i}"),
            Dtype::F32,
            el,
            ArenaKind::Activations,
            i,
            i,
        )
        .unwrap();
    }
    let with = p.plan().unwrap();
    let without = p
        .plan_with(&PlanOptions {
            reuse: false,
            ..PlanOptions::default()
        })
        .unwrap();
    assert_eq!(with.peak, (1 << 13) * 4);
    assert_eq!(without.peak, sum);
    assert!(with.peak * 4 < without.peak);
}

#[test]
fn best_fit_fills_the_tightest_hole() {
    // two long-lived buffers leave a 1 KiB hole between them (after a short one dies);
    // a 1 KiB buffer declared later goes there, not on top
    let mut p = Planner::new();
    let a = ArenaKind::Activations;
    p.declare("big", Dtype::U8, 8192, a, 0, 10).unwrap(); // [0, 8192)
    p.declare("mid", Dtype::U8, 4096, a, 0, 1).unwrap(); // [8192, 12288), dies at 1
    p.declare("top", Dtype::U8, 2048, a, 0, 10).unwrap(); // [12288, 14336)
    p.declare("late", Dtype::U8, 1024, a, 5, 10).unwrap();
    let plan = p.plan().unwrap();
    assert_valid(&plan);
    assert_eq!(plan.placement(BufferId(3)).offset, 8192);
    assert_eq!(plan.peak, 8192 + 4096 + 2048);
}

#[test]
fn sizes_are_aligned_and_arenas_separate() {
    let mut p = Planner::new();
    let x = p
        .declare("one byte", Dtype::U8, 1, ArenaKind::Scratch, 0, 0)
        .unwrap();
    let y = p
        .declare("bf16", Dtype::Bf16, 129, ArenaKind::Scratch, 0, 0)
        .unwrap();
    let z = p
        .declare("params", Dtype::F32, 10, ArenaKind::Params, 0, 0)
        .unwrap();
    let plan = p.plan().unwrap();
    assert_valid(&plan);
    assert_eq!(plan.placement(x).size, 256);
    assert_eq!(plan.placement(y).size, 512);
    assert_eq!(plan.placement(z).offset, 0, "own arena");
    assert_eq!(plan.arena_size(ArenaKind::Scratch), 768);
    assert_eq!(plan.arena_size(ArenaKind::Params), 256);
    assert_eq!(plan.arena_size(ArenaKind::Grads), 0);
    assert_eq!(plan.peak, 1024);
}

#[test]
fn bad_declarations_are_refused() {
    let mut p = Planner::new();
    let e = p
        .declare("backwards", Dtype::F32, 1, ArenaKind::Scratch, 3, 2)
        .unwrap_err();
    assert!(e.to_string().contains("backwards"), "{e}");
    let e = p
        .declare("huge", Dtype::F32, usize::MAX / 2, ArenaKind::Scratch, 0, 0)
        .unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
    let e = p
        .plan_with(&PlanOptions {
            align: 100,
            ..PlanOptions::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
}

/// Runs a plan's "step" on the host arena: at each op, every buffer whose lifetime starts is
/// filled with its own pattern, and every live buffer must still hold its pattern.
fn run_on_arena(plan: &nla_engine::memory::MemoryPlan) {
    let mut arena = Arena::new(plan).unwrap();
    assert_eq!(arena.allocated_bytes(), plan.peak);
    for (k, s) in arena.sizes() {
        assert_eq!(s, plan.arena_size(k));
    }
    let pattern = |id: usize, i: usize| (id.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8;
    for t in 0..plan.ops() {
        let live = plan.live_at(t);
        let mut slices = arena.slices_mut(&live).unwrap();
        for (id, s) in live.iter().zip(slices.iter_mut()) {
            assert_eq!(s.len(), plan.decls[id.0].bytes());
            if plan.decls[id.0].first == t {
                for (i, b) in s.iter_mut().enumerate() {
                    *b = pattern(id.0, i);
                }
            }
        }
        for id in &live {
            let s = arena.slice(*id);
            assert!(
                s.iter().enumerate().all(|(i, &b)| b == pattern(id.0, i)),
                "buffer `{}` was overwritten while live (op {t})",
                plan.decls[id.0].name
            );
        }
    }
}

#[test]
fn the_host_arena_allocates_the_peak_and_keeps_live_buffers_intact() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..40 {
        let n = rng.random_range(1..60);
        let p = random_planner(&mut rng, n, 30);
        run_on_arena(&p.plan().unwrap());
    }
}

#[test]
fn the_host_arena_refuses_overlapping_borrows() {
    let mut p = Planner::new();
    let a = p
        .declare("a", Dtype::F32, 64, ArenaKind::Activations, 0, 0)
        .unwrap();
    let b = p
        .declare("b", Dtype::F32, 64, ArenaKind::Activations, 1, 1)
        .unwrap();
    let plan = p.plan().unwrap();
    assert_eq!(plan.placement(a).offset, plan.placement(b).offset);
    let mut arena = Arena::new(&plan).unwrap();
    assert_eq!(arena.allocated_bytes(), 256);
    assert!(arena.slices_mut(&[a, b]).is_err());
    assert!(arena.slices_mut(&[a, a]).is_err());
    assert_eq!(arena.slices_mut(&[b]).unwrap()[0].len(), 256);
}

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
    assert_eq!(parse_size("80 GiB").unwrap(), 80 << 30);
    assert_eq!(parse_size("80gib").unwrap(), 80 << 30);
    assert_eq!(parse_size("81920MiB").unwrap(), 80 << 30);
    assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
    assert_eq!(parse_size("1.5TiB").unwrap(), 3 << 39);
    assert_eq!(parse_size("512").unwrap(), 512);
    assert_eq!(parse_size("2KB").unwrap(), 2000);
    assert_eq!(parse_size("4Ki").unwrap(), 4096);
    for bad in ["80G", "GiB", "", "eighty GiB", "80 parsecs", "1.2.3GiB"] {
        let e = parse_size(bad).unwrap_err().to_string();
        assert!(e.contains("80GiB"), "{bad}: {e}");
    }
    assert!(parse_size("80G")
        .unwrap_err()
        .to_string()
        .contains("ambiguous"));
}

// ---------------------------------------------------------------- step declarations

fn llama7b() -> ModelConfig {
    ModelConfig::from_file(Path::new("configs/models/llama-7b/config.json")).unwrap()
}

fn actor(cfg: &ModelConfig, trainable: bool) -> ModelSpec {
    ModelSpec {
        name: if trainable { "actor" } else { "reference" }.into(),
        cfg: cfg.clone(),
        kind: ModelKind::Lm {
            inject_layers: vec![0],
            a: cfg.hidden_size,
            project: false,
        },
        trainable,
    }
}

fn sft_actor(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    opts: &StepOptions,
) -> nla_engine::memory::StepPlan {
    let phases = [
        Phase::Train {
            model: 0,
            b,
            t,
            rl: false,
            kl: false,
        },
        Phase::Update { model: 0 },
    ];
    plan_step(&[actor(cfg, true)], &phases, opts).unwrap()
}

fn decl<'a>(sp: &'a nla_engine::memory::StepPlan, name: &str) -> &'a BufferDecl {
    sp.plan
        .decls
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no buffer `{name}`"))
}

/// With vocabulary chunks and block recompute, ActivationSet allocates what the plan declares
/// for the LM head (a chunk's logits and gradient, the [N,3] loss state) and one block's
/// activations for all blocks, so a run planned with the options holds less than without.
#[test]
fn memory_options_allocate_what_the_plan_declares() {
    use nla_engine::model::MemoryOptions;
    let cfg = builtin::demo_config().unwrap();
    let (b, t) = (3, 17);
    let n = b * t;
    let chunk = 100;
    let opts = StepOptions {
        logits_chunk: Some(chunk),
        recompute: Recompute::Block,
        ..StepOptions::cpu()
    };
    let sp = sft_actor(&cfg, b, t, &opts);
    assert_valid(&sp.plan);
    let mo = MemoryOptions {
        logits_chunk: Some(chunk),
        recompute: Recompute::Block,
    };
    let set = ActivationSet::plan_with(&cfg, b, t, mo);
    assert_eq!(set.logits, decl(&sp, "actor.logits.chunk0").elements);
    assert_eq!(set.logits, decl(&sp, "actor.bwd.logits.chunk0").elements);
    // a chunk's gradient overwrites its logits: no buffer in either
    assert!(!sp.plan.decls.iter().any(|d| d.name.contains("dlogits")));
    assert_eq!(set.ce_state, decl(&sp, "actor.ce_state").elements);
    assert_eq!(set.logits, n * chunk);
    assert_eq!(set.layers.len(), 1);
    let whole = ActivationSet::plan(&cfg, b, t);
    assert_eq!(whole.layers.len(), cfg.num_hidden_layers);
    assert_eq!(whole.ce_state, 3 * n);
    assert!(set.elements < whole.elements);
}

#[test]
fn a_training_pass_declares_what_activations_rs_allocates() {
    // f32, no recompute: every activation ActivationSet keeps is a buffer of the same size
    let cfg = builtin::demo_config().unwrap();
    let (b, t) = (3, 17);
    let sp = sft_actor(&cfg, b, t, &StepOptions::cpu());
    assert_valid(&sp.plan);
    let set = ActivationSet::plan(&cfg, b, t);
    for l in 0..cfg.num_hidden_layers {
        let la = &set.layers[l];
        for (name, el) in [
            ("rstd1", la.rstd1),
            ("xn1", la.xn1),
            ("q", la.q),
            ("k", la.k),
            ("v", la.v),
            ("att", la.att),
            ("lse", la.lse),
            ("x_mid", la.x_mid),
            ("rstd2", la.rstd2),
            ("xn2", la.xn2),
            ("gu", la.gu),
            ("h", la.h),
        ] {
            let d = decl(&sp, &format!("actor.layers.{l}.{name}"));
            assert_eq!((d.elements, d.dtype), (el, Dtype::F32), "layer {l} {name}");
        }
    }
    for l in 0..=cfg.num_hidden_layers {
        assert_eq!(decl(&sp, &format!("actor.res.{l}")).elements, set.res[l]);
    }
    // whole logits are one chunk: their gradient overwrites them, no buffer in either
    assert!(!sp.plan.decls.iter().any(|d| d.name.contains("dlogits")));
    for (name, el) in [
        ("actor.logits", set.logits),
        ("actor.ce_state", set.ce_state),
        ("actor.xn_f", set.xn_f),
        ("actor.rstd_f", set.rstd_f),
        ("actor.losses", set.losses),
    ] {
        assert_eq!(decl(&sp, name).elements, el, "{name}");
    }
    // parameters, gradients, AdamW m and v: the flat buffer's size, f32, no master copy
    let p = ParamTable::for_config(&cfg).total;
    assert_eq!(decl(&sp, "actor.params").elements, p);
    assert_eq!(sp.plan.arena_size(ArenaKind::Params), align(4 * p));
    assert_eq!(sp.plan.arena_size(ArenaKind::Grads), align(4 * p));
    assert_eq!(sp.plan.arena_size(ArenaKind::Optimizer), 2 * align(4 * p));
    assert!(!sp.plan.decls.iter().any(|d| d.name == "actor.master"));
    // the planned activations arena is smaller than ActivationSet's buffers each in memory
    // of its own but not below what is live at once
    let acts = sp.plan.arena_size(ArenaKind::Activations);
    let separate = set.bytes_unshared(Dtype::F32);
    assert!(acts < separate, "{acts} vs {separate}");
    assert!(acts >= sp.plan.arena(ArenaKind::Activations).unwrap().max_live);
    run_on_arena(&sp.plan);
}

#[test]
fn lifetimes_follow_the_forward_then_backward_order() {
    let cfg = builtin::demo_config().unwrap();
    let sp = sft_actor(&cfg, 2, 8, &StepOptions::cpu());
    let last_layer = cfg.num_hidden_layers - 1;
    // forward: block l before block l+1; backward: block l+1 before block l
    for l in 0..last_layer {
        let (a, b) = (
            decl(&sp, &format!("actor.layers.{l}.q")),
            decl(&sp, &format!("actor.layers.{}.q", l + 1)),
        );
        assert!(a.first < b.first && a.last > b.last, "{a:?} {b:?}");
    }
    // the whole forward happens before the logits' gradient (written over them) exists, and
    // the logits live on into backward as that gradient
    let grad = sp
        .ops
        .iter()
        .position(|o| o == "actor: cross_entropy_bwd chunk 0")
        .expect("the loss's backward");
    let logits = decl(&sp, "actor.logits");
    assert!(
        logits.first < grad && logits.last > grad,
        "{logits:?} {grad}"
    );
    // what the blocks keep lives from forward into backward (the projections are never
    // written: the residual adds are the matmuls' epilogues); the fused q/k/v projection's
    // output is the forward's scratch, read once by the split into q, k and v
    for d in &sp.plan.decls {
        if let Some(pre) = d.name.strip_suffix(".qkv") {
            // its block's own split (the first of that name: the forward's)
            let split = sp
                .ops
                .iter()
                .position(|o| *o == format!("{pre}: qkv_rope_fwd"));
            assert_eq!(Some(d.last), split, "{d:?}");
        } else if d.name.starts_with("actor.layers.") {
            assert!(d.first < grad && d.last > grad, "{d:?}");
        }
    }
    // the residual stream's gradient is one buffer from the head's backward through every
    // block's (each norm's backward adds into it) to the embedding's, the last op touching
    // activations; the embedding output is read by block 0's backward before that
    let res0 = decl(&sp, "actor.res.0");
    let dres = decl(&sp, "actor.bwd.dres_f");
    let emb = sp
        .ops
        .iter()
        .position(|o| o == "actor: embedding_bwd")
        .expect("the embedding's backward");
    assert_eq!(res0.first, 0);
    assert!(grad < dres.first && res0.last < dres.last, "{dres:?}");
    assert_eq!(dres.last, emb, "{dres:?}");
    assert!(
        !sp.plan.decls.iter().any(|d| d.name.ends_with(".dx_mid")),
        "a buffer for d x_mid"
    );
    // weights, gradients and moments live through the whole step
    let ops = sp.ops.len();
    for name in [
        "actor.params",
        "actor.grads",
        "actor.adamw.m",
        "actor.adamw.v",
    ] {
        let d = decl(&sp, name);
        assert_eq!((d.first, d.last), (0, ops - 1), "{name}");
    }
    // and the gradient scratch reuses freed activation memory
    let acts = sp.plan.arena(ArenaKind::Activations).unwrap();
    assert!(acts.size < acts.declared);
}

#[test]
fn the_cuda_policy_and_zero_sharding_size_the_persistent_arenas() {
    let cfg = llama7b();
    let p = ParamTable::for_config(&cfg).total;
    assert_eq!(p, 6_738_415_616, "Llama-2-7B parameter count");
    let mut opts = StepOptions::cuda();
    let one = sft_actor(&cfg, 1, 64, &opts);
    assert_eq!(one.plan.arena_size(ArenaKind::Params), align(2 * p), "bf16");
    assert_eq!(
        one.plan.arena_size(ArenaKind::Grads),
        align(4 * p),
        "f32 grads"
    );
    // master + m + v, f32
    assert_eq!(one.plan.arena_size(ArenaKind::Optimizer), 3 * align(4 * p));
    assert_eq!(decl(&one, "actor.layers.0.q").dtype, Dtype::Bf16);
    assert_eq!(decl(&one, "actor.logits").dtype, Dtype::Bf16);
    assert_eq!(decl(&one, "actor.layers.0.lse").dtype, Dtype::F32);
    // one GPU: nothing to gather or bucket
    assert_eq!(one.plan.arena_size(ArenaKind::Scratch), 4096);

    let g = 8;
    let shard = p.div_ceil(g);
    for (stage, params, grads, opt) in [
        (0, p, p, p),
        (1, p, p, shard),
        (2, p, shard, shard),
        (3, shard, shard, shard),
    ] {
        opts.gpus = g;
        opts.zero_stage = stage;
        let sp = sft_actor(&cfg, 1, 64, &opts);
        assert_valid(&sp.plan);
        assert_eq!(
            sp.plan.arena_size(ArenaKind::Params),
            align(2 * params),
            "stage {stage}"
        );
        assert_eq!(
            sp.plan.arena_size(ArenaKind::Grads),
            align(4 * grads),
            "stage {stage}"
        );
        assert_eq!(
            sp.plan.arena_size(ArenaKind::Optimizer),
            3 * align(4 * opt),
            "stage {stage}"
        );
        let scratch = sp.plan.arena_size(ArenaKind::Scratch);
        // a block's weights: 4 C^2 (attention) + 3 C F (MLP) + 2 C (norms)
        let layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096;
        let expected = match stage {
            // ZeRO-3: in backward, block l's gather (bf16) and block l-1's prefetched one,
            // block l's gradient bucket (f32) and block l+1's, still being reduce-scattered
            3 => 2 * layer * 2 + 2 * layer * 4,
            // ZeRO-2: the two buckets
            2 => 2 * layer * 4,
            // the gradient-norm partial sums
            _ => 4096,
        };
        assert_eq!(scratch, expected, "stage {stage}");
        assert_eq!(scratch, sp.plan.arena(ArenaKind::Scratch).unwrap().max_live);
    }
}

#[test]
fn recompute_keeps_only_the_block_inputs() {
    let cfg = llama7b();
    let (b, t) = (4, 512);
    let mut opts = StepOptions::cuda();
    let full = sft_actor(&cfg, b, t, &opts);
    opts.recompute = Recompute::Block;
    let rc = sft_actor(&cfg, b, t, &opts);
    assert_valid(&rc.plan);
    let (n, c, f) = (b * t, cfg.hidden_size, cfg.intermediate_size);
    // nothing of a block outlives the block in forward
    for d in &rc.plan.decls {
        if d.name.starts_with("actor.fwd.layers.") {
            let l: usize = d.name.split('.').nth(3).unwrap().parse().unwrap();
            let next = decl(&rc, &format!("actor.res.{}", l + 1));
            assert!(d.last <= next.first + 1, "{} outlives its block", d.name);
        }
    }
    let a_full = full.plan.arena_size(ArenaKind::Activations);
    let a_rc = rc.plan.arena_size(ArenaKind::Activations);
    // kept: L+1 residual streams; on top, one block's internals (~ 6 [N,C] + 6 [N,F] incl.
    // gradients) and the logits (f32) with their gradient
    let kept = (cfg.num_hidden_layers + 1) * n * c * 2;
    let logits = 2 * n * cfg.vocab_size * 4;
    assert!(a_rc >= kept);
    assert!(
        a_rc < kept + logits + 16 * n * (c + f) * 2,
        "recompute activations {a_rc}"
    );
    assert!(a_rc * 3 < a_full, "{a_rc} vs {a_full}");
}

#[test]
fn chunked_logits_never_hold_the_whole_vocabulary() {
    // a Llama-3 vocabulary: the whole logits are the largest buffer of the step
    let mut cfg = llama7b();
    cfg.vocab_size = 128_256;
    let (b, t) = (4, 512);
    let mut opts = StepOptions::cuda();
    opts.recompute = Recompute::Block;
    let whole = sft_actor(&cfg, b, t, &opts);
    opts.logits_chunk = Some(4096);
    let chunked = sft_actor(&cfg, b, t, &opts);
    assert_valid(&chunked.plan);
    let n = b * t;
    assert!(chunked
        .plan
        .decls
        .iter()
        .filter(|d| d.arena == ArenaKind::Activations)
        .all(|d| d.elements < n * cfg.vocab_size));
    // 128256 = 31 x 4096 + 1280
    assert!(chunked
        .plan
        .decls
        .iter()
        .any(|d| d.name == "actor.logits.chunk31" && d.elements == n * 1280));
    // whole: the arena holds the logits [N, V] bf16 (their gradient written over them);
    // chunked it is smaller, its peak elsewhere (a block's backward)
    let (w, c) = (
        whole.plan.arena_size(ArenaKind::Activations),
        chunked.plan.arena_size(ArenaKind::Activations),
    );
    assert!(
        w >= n * cfg.vocab_size * 2 && c < w,
        "whole {w}, chunked {c}"
    );
}

#[test]
fn the_rollout_plans_the_kv_cache() {
    let cfg = llama7b();
    let (rows, prompt, new) = (64, 300, 150);
    let phases = [Phase::Rollout {
        model: 0,
        rows,
        prompt,
        new_tokens: new,
    }];
    let mut frozen = actor(&cfg, false);
    frozen.name = "actor".into();
    let sp = plan_step(&[frozen], &phases, &StepOptions::cuda()).unwrap();
    assert_valid(&sp.plan);
    let per_layer = align(rows * (prompt + new) * cfg.kv_dim() * 2);
    assert_eq!(
        sp.plan.arena_size(ArenaKind::KvCache),
        2 * cfg.num_hidden_layers * per_layer
    );
    // the cache lives from its block's prefill to the last decode step
    let k0 = decl(&sp, "actor.rollout.cache.layers.0.k");
    let last = decl(&sp, "actor.rollout.next");
    assert!(k0.last > sp.ops.len() / 2 && k0.last < last.last);
    // frozen model: weights only
    assert_eq!(sp.plan.arena_size(ArenaKind::Grads), 0);
    assert_eq!(sp.plan.arena_size(ArenaKind::Optimizer), 0);
    // a frozen model cannot be trained
    let bad = [Phase::Update { model: 0 }];
    assert!(plan_step(&[actor(&cfg, false)], &bad, &StepOptions::cuda()).is_err());
}

#[test]
fn phases_share_the_activations_arena() {
    // the critic's pass reuses the memory of the rollout's workspace, the actor's that of the
    // critic's: the arena is far below the sum of the phases
    let cfg = builtin::demo_config().unwrap();
    let critic = ModelSpec {
        name: "critic".into(),
        cfg: cfg.clone(),
        kind: ModelKind::Critic {
            k: 1,
            a: cfg.hidden_size,
            pool_len: None,
        },
        trainable: true,
    };
    let models = [actor(&cfg, true), critic];
    let phases = [
        Phase::Rollout {
            model: 0,
            rows: 8,
            prompt: 30,
            new_tokens: 10,
        },
        Phase::Train {
            model: 1,
            b: 8,
            t: 12,
            rl: false,
            kl: false,
        },
        Phase::Update { model: 1 },
        Phase::Train {
            model: 0,
            b: 8,
            t: 40,
            rl: true,
            kl: false,
        },
        Phase::Update { model: 0 },
    ];
    let sp = plan_step(&models, &phases, &StepOptions::cpu()).unwrap();
    assert_valid(&sp.plan);
    run_on_arena(&sp.plan);
    let alone = |ph: &[Phase]| {
        plan_step(&models, ph, &StepOptions::cpu())
            .unwrap()
            .plan
            .arena_size(ArenaKind::Activations)
    };
    let parts = [
        alone(&phases[0..1]),
        alone(&phases[1..3]),
        alone(&phases[3..5]),
    ];
    let together = sp.plan.arena_size(ArenaKind::Activations);
    assert!(together >= *parts.iter().max().unwrap());
    assert!(
        together < parts.iter().sum::<usize>(),
        "{together} vs {parts:?}"
    );
    // the critic keeps blocks 0..=1 only
    assert!(sp.plan.decls.iter().any(|d| d.name == "critic.layers.1.q"));
    assert!(!sp.plan.decls.iter().any(|d| d.name == "critic.layers.2.q"));
    let no_reuse = plan_step_with(
        &models,
        &phases,
        &StepOptions::cpu(),
        &PlanOptions {
            reuse: false,
            ..PlanOptions::default()
        },
    )
    .unwrap();
    let acts = |p: &nla_engine::memory::MemoryPlan| p.arena_size(ArenaKind::Activations);
    println!(
        "activations {} reused, {} without reuse",
        acts(&sp.plan),
        acts(&no_reuse.plan)
    );
    assert!(acts(&sp.plan) * 2 < acts(&no_reuse.plan));
    assert!(sp.plan.peak < no_reuse.plan.peak);
}

// ---------------------------------------------------------------- run configs and the CLI

/// configs/demo.yaml with model_name pointing to the demo architecture in `dir`.
fn demo_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = builtin::demo_config().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string_pretty(&cfg.to_json()).unwrap(),
    )
    .unwrap();
    dir
}

fn demo_shape(dir: &Path, sets: &[&str]) -> RunShape {
    let mut over = vec![format!("model.model_name={}", dir.display())];
    over.extend(sets.iter().map(|s| s.to_string()));
    let cfg = RunConfig::from_file("configs/demo.yaml", &over).unwrap();
    let m = nla_engine::model::load_config(dir).unwrap();
    RunShape::from_config(&cfg, m.clone(), m).unwrap()
}

/// A run's need is the plan's peak plus what the engine's whole activation sets hold beyond
/// the planned arena: for the demo config's SFT step the larger of the actor's set (micro 32 x
/// 64) and the critic's (blocks only) minus the arena, with and without the memory options;
/// the fit check, its remedies and the report use that need; a bf16 plan has no extra.
#[test]
fn the_need_adds_the_engines_activation_sets_to_the_plan() {
    use nla_engine::model::MemoryOptions;
    let dir = demo_model_dir();
    let m = nla_engine::model::load_config(dir.path()).unwrap();
    for (chunk, recompute) in [(None, Recompute::None), (Some(100), Recompute::Block)] {
        let sets = match chunk {
            None => vec![],
            Some(_) => vec!["trainer.logits_chunk=100", "trainer.recompute=block"],
        };
        let shape = demo_shape(dir.path(), &sets);
        let opts = StepOptions {
            logits_chunk: chunk,
            recompute,
            ..StepOptions::cpu()
        };
        let sp = shape.plan(&opts).unwrap();
        let mo = MemoryOptions {
            logits_chunk: chunk,
            recompute,
        };
        let actor = ActivationSet::plan_with(&m, 32, 64, mo)
            .bytes(Dtype::F32)
            .unwrap();
        let mut critic_cfg = m.clone();
        critic_cfg.num_hidden_layers = shape.critic_k + 1;
        let critic = ActivationSet::plan_blocks(&critic_cfg, 32, 64, recompute)
            .bytes(Dtype::F32)
            .unwrap();
        let arena = sp.plan.arena_size(ArenaKind::Activations);
        let extra = actor.max(critic).saturating_sub(arena);
        println!("{chunk:?} {recompute:?}: actor set {actor}, critic set {critic}, arena {arena}");
        assert_eq!(sp.engine_extra, extra);
        assert!(
            extra > 0,
            "a set shares memory by phase, the plan by op: {actor} vs {arena}"
        );
        assert_eq!(sp.needed(), sp.plan.peak + extra);
        // a budget between the planned peak and the need does not fit
        let e = check_fits(&shape, &opts, &sp, sp.plan.peak).unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
        assert!(check_fits(&shape, &opts, &sp, sp.needed()).is_ok());
        assert!(report(&shape, &opts, &sp, None).contains("engine"));
    }
    // bf16: the sets in bf16, their statistics (1/rms, logsumexp, losses) f32
    let bf16 = StepOptions::cuda();
    let sp = demo_shape(dir.path(), &[]).plan(&bf16).unwrap();
    let actor = ActivationSet::plan_with(&m, 32, 64, MemoryOptions::default());
    let (a16, a32) = (
        actor.bytes(Dtype::Bf16).unwrap(),
        actor.bytes(Dtype::F32).unwrap(),
    );
    assert!(a16 < a32 && 2 * a16 > a32, "{a16} vs {a32}");
    assert_eq!(
        actor.bytes_unshared(Dtype::Bf16),
        2 * actor.elements + 2 * actor.stat_elements,
        "stats 4 bytes, the rest 2"
    );
    let mut critic_cfg = m.clone();
    critic_cfg.num_hidden_layers = demo_shape(dir.path(), &[]).critic_k + 1;
    let critic = ActivationSet::plan_blocks(&critic_cfg, 32, 64, Recompute::None);
    let arena = sp.plan.arena_size(ArenaKind::Activations);
    let extra = a16
        .max(critic.bytes(Dtype::Bf16).unwrap())
        .saturating_sub(arena);
    assert_eq!(sp.engine_extra, extra);
}

#[test]
fn the_demo_config_fits_in_one_gib() {
    let dir = demo_model_dir();
    let opts = StepOptions::cpu();
    for sets in [&[][..], &["trainer.algo=grpo"][..]] {
        let shape = demo_shape(dir.path(), sets);
        let sp = shape.plan(&opts).unwrap();
        assert_valid(&sp.plan);
        assert!(sp.plan.peak < GIB, "{sets:?}: {}", sp.plan.peak);
        let line = check_fits(&shape, &opts, &sp, GIB).unwrap();
        assert!(line.starts_with("fits:"), "{line}");
        println!("{sets:?}\n{}", report(&shape, &opts, &sp, None));
        // the host allocator gets exactly the planned bytes
        let arena = Arena::new(&sp.plan).unwrap();
        assert_eq!(arena.allocated_bytes(), sp.plan.peak);
    }
    // SFT both: actor then critic, T = max_length = 64, micro-batch 32
    let shape = demo_shape(dir.path(), &[]);
    assert_eq!(
        (shape.actor_t(), shape.critic_t(), shape.micro_rows(1)),
        (64, 64, 32)
    );
    let sp = shape.plan(&opts).unwrap();
    assert_eq!(
        sp.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["actor", "critic"]
    );
    // GRPO: 32 prompts x 4 samples, prompt 64 + 16 new tokens; the reference is loaded
    let shape = demo_shape(dir.path(), &["trainer.algo=grpo"]);
    assert_eq!((shape.rows_per_gpu(1), shape.actor_t()), (128, 80));
    let sp = shape.plan(&opts).unwrap();
    assert_eq!(
        sp.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["actor", "critic", "reference"]
    );
}

fn shape_7b(sets: &[&str]) -> RunShape {
    let over: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = RunConfig::from_file("configs/plan-7b.yaml", &over).unwrap();
    RunShape::from_config(&cfg, llama7b(), llama7b()).unwrap()
}

const BUDGET_80: usize = 80 * GIB;

#[test]
fn the_7b_grpo_config_does_not_fit_one_gpu_and_says_what_to_change() {
    let shape = shape_7b(&[]);
    assert_eq!(shape.critic_k, 20);
    assert!(shape.reference);
    assert_eq!(shape.rows_per_gpu(1), 512);
    let opts = StepOptions::cuda();
    let sp = shape.plan(&opts).unwrap();
    assert_valid(&sp.plan);
    println!("{}", report(&shape, &opts, &sp, None));
    assert!(sp.plan.peak > BUDGET_80);
    let e = check_fits(&shape, &opts, &sp, BUDGET_80)
        .unwrap_err()
        .to_string();
    println!("{e}");
    for remedy in [
        "--set data.micro_batch_size_per_gpu=",
        "--set data.train_dataset.max_length=",
        "--set generation.max_new_tokens=",
        "--recompute block",
        "--gpus ",
        "GiB",
    ] {
        assert!(e.contains(remedy), "no `{remedy}` in: {e}");
    }
    // weights, gradients and AdamW state of actor + critic alone exceed a GPU: only more GPUs
    // help, and the error says so with the figure
    let rem = remedies(&shape, &opts, BUDGET_80).unwrap();
    for r in &rem {
        assert_eq!(r.fits, r.peak <= BUDGET_80);
        assert_eq!(r.fits, r.change.contains("--gpus"), "{r:?}");
    }
    let gpus = rem.iter().find(|r| r.change.starts_with("--gpus")).unwrap();
    assert!(gpus.fits);
}

#[test]
fn the_7b_grpo_config_fits_eight_gpus() {
    let shape = shape_7b(&[]);
    let mut opts = StepOptions::cuda();
    opts.gpus = 8;
    opts.recompute = Recompute::Block;
    let sp = shape.plan(&opts).unwrap();
    assert_valid(&sp.plan);
    println!("{}", report(&shape, &opts, &sp, None));
    let line = check_fits(&shape, &opts, &sp, BUDGET_80).unwrap();
    println!("{line}");
    assert!(sp.plan.peak < BUDGET_80);
    // each GPU rolls out 64 of the 512 sequences: the KV cache is 64 x 450 positions x 32
    // blocks x (K, V) x 4096 x bf16
    assert_eq!(shape.rows_per_gpu(8), 64);
    assert_eq!(
        sp.plan.arena_size(ArenaKind::KvCache),
        64 * 450 * 32 * 2 * 4096 * 2
    );
    // without recompute the activations alone take more than 3x as much
    opts.recompute = Recompute::None;
    let full = shape.plan(&opts).unwrap();
    println!("without recompute:\n{}", report(&shape, &opts, &full, None));
    assert!(
        full.plan.arena_size(ArenaKind::Activations)
            > 3 * sp.plan.arena_size(ArenaKind::Activations)
    );
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: plan_cmd::PlanArgs,
}

fn cli(args: &[&str]) -> plan_cmd::PlanArgs {
    let mut all = vec!["plan"];
    all.extend(args);
    Cli::try_parse_from(all).unwrap().args
}

#[test]
fn plan_command_on_the_demo_and_7b_configs() {
    let dir = demo_model_dir();
    let set = format!("model.model_name={}", dir.path().display());
    let a = cli(&[
        "--config",
        "configs/demo.yaml",
        "--set",
        &set,
        "--gpu-memory",
        "1GiB",
    ]);
    assert_eq!(a.gpus, 1);
    plan_cmd::plan_cmd(&a).unwrap();

    // 7B: one GPU does not fit (the error lists the remedies), 8 GPUs with recompute do
    let e = plan_cmd::plan_cmd(&cli(&["--config", "configs/plan-7b.yaml"])).unwrap_err();
    let msg = format!("{e:#}");
    println!("error: {msg}");
    assert!(
        msg.contains("--recompute block") && msg.contains("--gpus"),
        "{msg}"
    );
    plan_cmd::plan_cmd(&cli(&[
        "--config",
        "configs/plan-7b.yaml",
        "--gpus",
        "8",
        "--recompute",
        "block",
        "--gpu-memory",
        "81920MiB",
    ]))
    .unwrap();

    // the escape hatch: an actor config.json given directly
    let a = cli(&[
        "--config",
        "configs/demo.yaml",
        "--set",
        "model.model_name=/nonexistent/model",
        "--model-config",
        dir.path().join("config.json").to_str().unwrap(),
        "--gpu-memory",
        "1GiB",
        "--precision",
        "bf16",
        "--logits-chunk",
        "64",
        "--buffers",
    ]);
    assert!(a.buffers);
    plan_cmd::plan_cmd(&a).unwrap();
    // without it, a missing model says what to pass
    let mut a = a;
    a.model_config = None;
    let e = format!("{:#}", plan_cmd::plan_cmd(&a).unwrap_err());
    assert!(e.contains("--model-config"), "{e}");
    // sizes and ranges are checked
    let mut bad = cli(&["--config", "configs/plan-7b.yaml", "--gpu-memory", "80G"]);
    assert!(format!("{:#}", plan_cmd::plan_cmd(&bad).unwrap_err()).contains("ambiguous"));
    bad.gpu_memory = "80GiB".into();
    bad.gpus = 0;
    assert!(plan_cmd::plan_cmd(&bad).is_err());
    assert!(Cli::try_parse_from(["plan", "--config", "x", "--zero-stage", "4"]).is_err());
}

#[test]
fn the_cpu_policy_is_f32_everywhere() {
    let p = DtypePolicy::cpu();
    assert!([
        p.weights,
        p.grads,
        p.optimizer,
        p.activations,
        p.logits,
        p.stats
    ]
    .iter()
    .all(|&d| d == Dtype::F32));
    assert_eq!(p.master, None);
    let c = DtypePolicy::cuda();
    assert_eq!((c.weights, c.activations), (Dtype::Bf16, Dtype::Bf16));
    assert_eq!(
        (c.master, c.grads, c.optimizer),
        (Some(Dtype::F32), Dtype::F32, Dtype::F32)
    );
}
