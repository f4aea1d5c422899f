//! Helpers of the whole-model device checks (tests/device_parity.rs in f32, tests/bf16_model.rs
//! in bf16): the `gqa_untied` fixture model and its rows, the actor examples, the GPU when one
//! is usable (also tests/cuda_ops.rs's), and the max-relative error (also tests/model.rs's).

use nla_engine::device::cuda::{probe, CudaDevice};
use nla_engine::device::{Device, Dtype, View};
use nla_engine::model::{
    backward, forward, ActivationSet, Batch, MemoryOptions, Model, ParamTable, Recompute,
};
use nla_engine::nla::ActorExample;

use super::{fixtures_dir, rel_l2};

/// GPU 0 in working dtype `dtype`, or None (the test passes as skipped) when [`probe`] says no
/// GPU is usable here; with `NLA_REQUIRE_GPU=1` a missing GPU fails instead. A GPU that probes
/// usable but does not open fails either way.
pub fn gpu(dtype: Dtype) -> Option<CudaDevice> {
    match probe() {
        Ok(_) => {
            let dev = CudaDevice::new(0)
                .and_then(|d| d.with_work_dtype(dtype))
                .unwrap_or_else(|e| panic!("CudaDevice::new(0): {e}"));
            eprintln!("{}", dev.name());
            Some(dev)
        }
        Err(why) if std::env::var("NLA_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("NLA_REQUIRE_GPU=1 but no usable GPU: {why}")
        }
        Err(why) => {
            eprintln!("skipped (no usable GPU): {why}");
            None
        }
    }
}

/// Largest |got - want| over the largest |want|; NaN or infinity in `got` fails.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    err / scale
}

/// The `gqa_untied` fixture (C 48, 6 query heads over 2 KV heads of size 8, FFN 112, vocab 96,
/// 2 layers) on `dev`.
pub fn model<D: Device>(dev: &D) -> Model<D> {
    Model::load(dev, &fixtures_dir().join("models/gqa_untied")).unwrap()
}

/// The fixture's token rows (B 2, T 12).
pub fn rows() -> Vec<Vec<u32>> {
    let path = fixtures_dir().join("models/gqa_untied/ids.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Two actor examples: 4 prompt tokens (the vector injected at position 2), 6 response tokens
/// in the loss.
pub fn actor_examples(a: usize) -> Vec<ActorExample> {
    (0..2u32)
        .map(|k| {
            let ids: Vec<u32> = (0..10).map(|i| (7 * i + 13 * k + 5) % 96).collect();
            ActorExample {
                loss_mask: (0..ids.len()).map(|p| u8::from(p >= 4)).collect(),
                ids,
                prompt_len: 4,
                sites: vec![2],
                vectors: vec![(0..a)
                    .map(|i| ((i as f32 + 1.0) * (k as f32 + 0.5)).sin())
                    .collect()],
            }
        })
        .collect()
}

/// Every parameter's gradient in `grads` against `want` (flat, `table`'s layout): finite and
/// within `bound` relative L2; prints the worst.
pub fn check_grads(label: &str, table: &ParamTable, grads: &[f32], want: &[f32], bound: f64) {
    let mut worst = (0f64, "");
    for entry in &table.entries {
        let r = entry.offset..entry.offset + entry.len;
        let (g, w) = (&grads[r.clone()], &want[r]);
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{label}: grad {}: non-finite",
            entry.name
        );
        let err = rel_l2(g, w);
        assert!(
            err < bound,
            "{label}: grad {} rel L2 err {err:.2e}",
            entry.name
        );
        if err > worst.0 {
            worst = (err, &entry.name);
        }
    }
    eprintln!(
        "{label}: worst gradient rel L2 err {:.2e} ({})",
        worst.0, worst.1
    );
}

/// (logits, loss, every gradient) of one forward and backward, the logits in vocabulary
/// chunks of `chunk` (None = whole; chunked, the logits buffer [N,VC] returned starts with the
/// last chunk's [N,W]).
pub fn forward_backward<D: Device>(dev: &D, chunk: Option<usize>) -> (Vec<f32>, f64, Vec<f32>) {
    // block recompute along with the chunks: the blocks run again from their inputs
    let opts = MemoryOptions {
        logits_chunk: chunk,
        recompute: if chunk.is_some() {
            Recompute::Block
        } else {
            Recompute::None
        },
    };
    forward_backward_with(dev, opts)
}

/// [`forward_backward`] with any memory options.
pub fn forward_backward_with<D: Device>(dev: &D, opts: MemoryOptions) -> (Vec<f32>, f64, Vec<f32>) {
    let mut model = model(dev);
    let batch = Batch::causal_lm(&rows()).unwrap();
    let mut acts = ActivationSet::with_options(dev, &model.cfg, batch.b, batch.t, opts).unwrap();
    let db = batch.upload(dev).unwrap();
    let loss = forward(dev, &model, &mut acts, &db).unwrap();
    let logits = dev.download(View::all(&acts.logits)).unwrap();
    model.zero_grads(dev).unwrap();
    backward(dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32).unwrap();
    (logits, loss.mean(), model.grads_to_host(dev).unwrap())
}
