//! The bench core on the CPU device with a tiny model: the work it counts (FLOPs of a step,
//! bytes a decode must read) against hand-computed values, and the rates derived from its
//! timings. No timing is asserted beyond being positive.

use std::path::Path;

use nla_engine::bench::{self, BenchOpts};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::model::{MemoryOptions, ModelConfig, Recompute};
use nla_engine::Result;

fn no_sync() -> Result<()> {
    Ok(())
}

/// 2 layers, d 32, 4 heads / 2 KV heads of 8, FFN 48, vocab 64, untied.
fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn tiny_opts() -> BenchOpts {
    BenchOpts {
        config: tiny_config(false),
        batch: 2,
        seq: 16,
        warmup: 1,
        iters: 2,
        rollout_prompts: 3,
        rollout_samples: 2,
        prompt_len: 5,
        new_tokens: 7,
        seed: 7,
        memory: MemoryOptions::default(),
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn sft_step_counts_flops_and_rates() {
    let o = tiny_opts();
    let r = bench::sft_step(&CpuDevice::new(), &o, &no_sync).unwrap();

    // by hand: C 32, F 48, V 64, L 2, NH*HS = 32, NKV*HS = 16, tokens = 2 * 16 = 32
    let wq = 32 * 32;
    let wk = 16 * 32;
    let wv = 16 * 32;
    let wo = 32 * 32;
    let (wgate, wup, wdown) = (48 * 32, 48 * 32, 32 * 48);
    let lm_head = 64 * 32;
    let matmul = 2 * (wq + wk + wv + wo + wgate + wup + wdown) + lm_head;
    assert_eq!(matmul, 2 * 7680 + 2048);
    assert_eq!(r.matmul_params, matmul);
    let embed = 64 * 32;
    let norms = 2 * 2 * 32 + 32;
    assert_eq!(r.model.params, matmul + embed + norms);

    let tokens = 32.0;
    // causal attention forward 2 * 2 * B * T^2/2 * NH*HS * L, step = 3x forward
    let attn_fwd = 2.0 * 2.0 * 2.0 * (16.0 * 16.0 / 2.0) * 32.0 * 2.0;
    let flops = 6.0 * matmul as f64 * tokens + 3.0 * attn_fwd;
    assert_eq!(r.attention_flops_per_step, 3.0 * attn_fwd);
    assert!(
        close(r.flops_per_step, flops, 1e-12),
        "{} vs {flops}",
        r.flops_per_step
    );
    assert_eq!(r.flops_per_step, 3_342_336.0 + 196_608.0);

    assert_eq!(r.tokens_per_step, 32);
    assert_eq!(r.step_s.len(), 2);
    assert!(r.step_s.iter().all(|&t| t > 0.0));
    let med = (r.step_s[0] + r.step_s[1]) / 2.0;
    assert!(close(r.step_s_median, med, 1e-12));
    assert_eq!(r.step_s_min, r.step_s[0].min(r.step_s[1]));
    assert!(close(r.tokens_per_s, tokens / r.step_s_median, 1e-9));
    assert!(close(r.flops_per_s, flops / r.step_s_median, 1e-9));
    assert!(close(r.mfu(1e12), flops / r.step_s_median / 1e12, 1e-9));
    assert!(r.last_loss.is_finite());

    let text = r.to_string();
    assert!(text.contains("2 x 16 = 32 tokens"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["flops_per_step"].as_f64(), Some(flops));
    assert_eq!(json["model"]["layers"].as_u64(), Some(2));
}

/// The step with the logits in vocabulary chunks, with block recompute, and with both trains
/// the same model: the same losses (the same weights, batch and updates; f32 rounding of the
/// chunked sums only) and FLOPs (model FLOPs: recompute is not counted).
#[test]
fn sft_step_with_memory_options_trains_the_same() {
    let o = tiny_opts();
    let whole = bench::sft_step(&CpuDevice::new(), &o, &no_sync).unwrap();
    for (logits_chunk, recompute) in [
        (Some(10), Recompute::None),
        (None, Recompute::Block),
        (Some(10), Recompute::Block),
    ] {
        let o = BenchOpts {
            memory: MemoryOptions {
                logits_chunk,
                recompute,
            },
            ..o.clone()
        };
        let r = bench::sft_step(&CpuDevice::new(), &o, &no_sync).unwrap();
        assert!(
            close(whole.last_loss, r.last_loss, 1e-5),
            "{:?}: {} vs {}",
            o.memory,
            whole.last_loss,
            r.last_loss
        );
        assert_eq!(whole.flops_per_step, r.flops_per_step);
    }
}

#[test]
fn tied_lm_head_still_counts() {
    // tying shares the weight; the LM-head matmul (and its FLOPs) remains
    let (tied, untied) = (tiny_config(true), tiny_config(false));
    assert_eq!(bench::matmul_params(&tied), bench::matmul_params(&untied));
    assert_eq!(
        bench::train_step_flops(&tied, 2, 16),
        bench::train_step_flops(&untied, 2, 16)
    );
    // a tied table is streamed as the LM head, an untied embedding table is only gathered
    assert_eq!(
        bench::streamed_params(&tied),
        2 * 7680 + 2 * 2 * 32 + 32 + 64 * 32
    );
    assert_eq!(
        bench::streamed_params(&untied),
        2 * 7680 + 2 * 2 * 32 + 32 + 64 * 32
    );
}

#[test]
fn rollout_counts_tokens_and_bytes() {
    let o = tiny_opts();
    let r = bench::rollout(&CpuDevice::new(), &o, &no_sync).unwrap();
    let (rows, tp, new) = (3 * 2, 5, 7);
    assert_eq!(r.rows, rows);
    assert_eq!(r.generated_tokens, 3 * 2 * 7);
    assert!(close(r.tokens_per_s, 42.0 / r.rollout_s_median, 1e-9));
    assert!(r.rollout_s.iter().chain(&r.prefill_s).all(|&t| t > 0.0));
    assert_eq!(r.rollout_s.len(), 2);

    // by hand, f32: each of the 6 decode steps reads every parameter but the (untied)
    // embedding table; decode step k attends over 5 + k positions of K and V in 2 layers,
    // NKV*HS = 16; each of the 7 samplings reads [6, 64] logits
    let params = 2 * (32 * 32 * 2 + 16 * 32 * 2 + 3 * 48 * 32) + 2 * 2 * 32 + 32 + 64 * 32;
    let weights = 6.0 * params as f64 * 4.0;
    let positions: usize = (1..new).map(|k| tp + k).sum();
    assert_eq!(positions, 6 * 5 + 21);
    let kv = (2 * 2 * rows * positions * 16 * 4) as f64;
    let logits = (7 * rows * 64 * 4) as f64;
    let b = &r.decode_bytes;
    assert_eq!(b.decode_steps, 6);
    assert_eq!(b.weights_per_step, params as f64 * 4.0);
    assert_eq!(b.weights, weights);
    assert_eq!(b.kv_cache, kv);
    assert_eq!(b.logits, logits);
    let total = weights + kv + logits;
    assert_eq!(b.total(), total);

    let decode: Vec<f64> = r
        .rollout_s
        .iter()
        .zip(&r.prefill_s)
        .map(|(a, p)| a - p)
        .collect();
    assert!(close(
        r.decode_s_median,
        (decode[0] + decode[1]) / 2.0,
        1e-12
    ));
    let peak = 5e10;
    assert!(close(
        r.bandwidth_fraction(peak),
        total / r.decode_s_median / peak,
        1e-9
    ));

    let text = r.to_string();
    assert!(text.contains("3 prompts x 2 samples = 6 rows"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["generated_tokens"].as_u64(), Some(42));
}

/// On the emulated CUDA device the report says what the decode steps' graphs did: each
/// rollout's first decode step captured, its 5 others replayed, over 1 warm-up and 2 timed
/// rollouts. The CPU device has no graphs.
#[test]
fn rollout_reports_the_decode_graphs() {
    use nla_engine::device::emu::EmuMode;
    use nla_engine::device::emu_device::EmuDevice;
    use nla_engine::device::GraphStats;
    let o = tiny_opts();
    let cpu = bench::rollout(&CpuDevice::new(), &o, &no_sync).unwrap();
    assert_eq!(cpu.graphs, None);
    if !nla_engine::device::gpu::graph::enabled() {
        return;
    }
    let r = bench::rollout(&EmuDevice::new(EmuMode::Forward, 3), &o, &no_sync).unwrap();
    // a decode step of L = 2 blocks: per block 4 matmuls (q, k and v as one, o and down adding
    // into the residual stream, gate and up as one) and 5 kernels (2 rmsnorm, the q/k/v split
    // with RoPE writing k and v into the cache, decode attention in one split of the short
    // cache, swiglu); then
    // the final rmsnorm and the LM head's matmul; and the embedding first
    let l = o.config.num_hidden_layers as u64;
    let want = GraphStats {
        captures: 3,
        replays: 3 * 5,
        failures: 0,
        first_failure: None,
        graph_kernels: 5 * l + 2,
        graph_matmuls: 4 * l + 1,
    };
    assert_eq!(r.graphs, Some(want));
    let text = r.to_string();
    assert!(
        text.contains(
            "decode steps as graphs: 3 captured, 15 replayed, 0 failed captures; \
             a graph: 12 kernel launches + 9 matmuls"
        ),
        "{text}"
    );
}

#[test]
fn copy_bandwidth_is_positive() {
    let bw = bench::measure_copy_bandwidth(&CpuDevice::new(), 1 << 20, 3, &no_sync).unwrap();
    assert!(bw > 0.0 && bw.is_finite(), "{bw}");
}

#[test]
fn presets() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/small_config.json");
    let s = BenchOpts::small();
    assert_eq!(s.config, ModelConfig::from_file(&path).unwrap());
    assert_eq!((s.batch, s.seq), (4, 128));
    assert_eq!((s.rollout_prompts, s.rollout_samples), (8, 4));
    assert_eq!((s.prompt_len, s.new_tokens), (32, 64));
    assert_eq!(bench::ModelDims::of(&s.config).params, 5_245_184);

    let l = BenchOpts::llama_1b();
    let p = bench::ModelDims::of(&l.config).params;
    // TinyLlama-1.1B: 1,100,048,384 parameters
    assert_eq!(p, 1_100_048_384);
    assert_eq!((l.batch, l.seq), (1, 2048));
}

#[test]
fn zero_iterations_is_an_error() {
    let o = BenchOpts {
        iters: 0,
        ..tiny_opts()
    };
    assert!(bench::sft_step(&CpuDevice::new(), &o, &no_sync).is_err());
    assert!(bench::rollout(&CpuDevice::new(), &o, &no_sync).is_err());
}
