//! The whole training step (forward + backward + AdamW) of the small model in
//! benches/small_config.json, at batch 4 x 128 tokens, and a rollout (batched generation with
//! the KV cache), on the CPU device. benches/torch_step.py
//! times PyTorch eager on the same model and batch for comparison (docs/performance.md).

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::SampleSpec;
use nla_engine::generate::{generate, GenSpec};
use nla_engine::model::{forward, ActivationSet, Batch, Model, ModelConfig};
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule};

const B: usize = 4;
const T: usize = 128;

fn rows(v: u32) -> Vec<Vec<u32>> {
    let mut s = 1u64;
    (0..B)
        .map(|_| {
            (0..T)
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

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/small_config.json");
    let cfg = ModelConfig::from_file(&path).expect("benches/small_config.json");
    let dev = CpuDevice::new();
    let batch = Batch::causal_lm(&rows(cfg.vocab_size as u32)).expect("batch");
    let model = Model::init_random(&dev, cfg, 0, 0.02).expect("model");

    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements((B * T) as u64));
    g.sample_size(10);
    {
        let mut acts = ActivationSet::new(&dev, &model.cfg, B, T).expect("activations");
        let db = batch.upload(&dev).expect("upload");
        g.bench_function("forward", |b| {
            b.iter(|| forward(&dev, &model, &mut acts, &db).expect("forward"))
        });
    }
    let mut trainer = LmTrainer::new(
        &dev,
        model,
        AdamwConfig::default(),
        LrSchedule::constant(1e-4),
        1.0,
    )
    .expect("trainer");
    g.bench_function("forward_backward_adamw", |b| {
        b.iter(|| {
            trainer
                .step(&dev, std::slice::from_ref(&batch))
                .expect("step")
        })
    });
    g.finish();

    // rollout: 8 prompts x 4 samples, 32-token prompts, 64 new tokens each (no EOS)
    let (prompts, n, new) = (8usize, 4usize, 64usize);
    let rows = rows(trainer.model.cfg.vocab_size as u32);
    let prompt_ids: Vec<Vec<u32>> = (0..prompts).map(|i| rows[i % B][..32].to_vec()).collect();
    let spec = GenSpec {
        n,
        max_new_tokens: new,
        sample: SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        eos_ids: vec![],
        seed: 0,
    };
    let mut g = c.benchmark_group("rollout");
    g.throughput(Throughput::Elements((prompts * n * new) as u64));
    g.sample_size(10);
    g.bench_function("generate_32x64", |b| {
        b.iter(|| {
            generate(&dev, &trainer.model, &prompt_ids, &spec, &|_: &[u32]| false)
                .expect("generate")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
