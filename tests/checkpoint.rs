//! Checkpoints: atomic folders, rotation, and a resumed run equal to an uninterrupted one.

use std::path::Path;

use nla_engine::device::cpu::CpuDevice;
use nla_engine::model::{Batch, Model, ModelConfig};
use nla_engine::train::checkpoint::{
    latest_checkpoint, list_checkpoints, load_adamw, save_adamw, save_checkpoint, TrainerState,
};
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule, ScheduleKind};

fn tiny() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
    });
    ModelConfig::from_json(&json, Path::new("tiny")).unwrap()
}

/// The batch of step s: derived from s only, as every random draw of a run is.
fn batch_of(step: u64) -> Batch {
    let mut x = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let rows = (0..3)
        .map(|_| {
            (0..9)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % 48) as u32
                })
                .collect()
        })
        .collect::<Vec<Vec<u32>>>();
    Batch::causal_lm(&rows).unwrap()
}

fn trainer(dev: &CpuDevice, model: Model<CpuDevice>) -> LmTrainer<CpuDevice> {
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        lr: 5e-3,
        min_lr: 5e-4,
        warmup_steps: 2,
        total_steps: 8,
    };
    LmTrainer::new(dev, model, AdamwConfig::default(), schedule, 1.0).unwrap()
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dev = CpuDevice::new();
    let tmp = tempfile::tempdir().unwrap();
    let save_dir = tmp.path().join("ckpt");

    // uninterrupted: 8 steps
    let mut a = trainer(&dev, Model::init_random(&dev, tiny(), 1, 0.1).unwrap());
    let losses_a: Vec<f64> = (1..=8)
        .map(|s| a.step(&dev, &[batch_of(s)]).unwrap().loss)
        .collect();

    // interrupted after 5 steps, saved, then resumed in a fresh trainer for 3 more
    let mut b = trainer(&dev, Model::init_random(&dev, tiny(), 1, 0.1).unwrap());
    let mut losses_b: Vec<f64> = (1..=5)
        .map(|s| b.step(&dev, &[batch_of(s)]).unwrap().loss)
        .collect();
    save_checkpoint(&save_dir, 5, 2, |dir| {
        b.model.save(&dev, &dir.join("actor"))?;
        save_adamw(&dev, &b.opt, &dir.join("optimizer.safetensors"))?;
        TrainerState {
            step: 5,
            seed: 1,
            epoch: 0,
            samples_in_epoch: 15,
            kind: "lm".into(),
        }
        .save(&dir.join("trainer_state.json"))
    })
    .unwrap();
    drop(b);
    let (step, dir) = latest_checkpoint(&save_dir).unwrap().unwrap();
    assert_eq!(step, 5);
    let state = TrainerState::load(&dir.join("trainer_state.json")).unwrap();
    assert_eq!(state.step, 5);
    let mut c = trainer(&dev, Model::load(&dev, &dir.join("actor")).unwrap());
    load_adamw(&dev, &mut c.opt, &dir.join("optimizer.safetensors")).unwrap();
    assert_eq!(c.opt.step, 5);
    for s in state.step + 1..=8 {
        losses_b.push(c.step(&dev, &[batch_of(s)]).unwrap().loss);
    }
    // every op is deterministic on the CPU: the curves and weights are equal bit for bit
    assert_eq!(losses_a, losses_b);
    assert_eq!(
        a.model.params_to_host(&dev).unwrap(),
        c.model.params_to_host(&dev).unwrap()
    );
}

#[test]
fn saves_are_atomic_and_rotated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |d: &Path, tag: &str| -> nla_engine::Result<()> {
        std::fs::write(d.join("file.txt"), tag).map_err(|e| nla_engine::Error::io(d, e))
    };
    for step in [10, 20, 30, 40] {
        save_checkpoint(dir, step, 2, |d| write(d, &format!("s{step}"))).unwrap();
    }
    let kept: Vec<u64> = list_checkpoints(dir)
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(kept, vec![30, 40]);

    // a save that fails half-way leaves no checkpoint of its step and the others intact
    let err = save_checkpoint(dir, 50, 2, |d| {
        write(d, "half")?;
        Err(nla_engine::Error::invalid("test", "killed"))
    });
    assert!(err.is_err());
    assert_eq!(latest_checkpoint(dir).unwrap().unwrap().0, 40);
    // a folder left by a killed process is not a checkpoint, and the next save removes it
    std::fs::create_dir(dir.join(".partial-step-00000060-999")).unwrap();
    assert_eq!(latest_checkpoint(dir).unwrap().unwrap().0, 40);
    save_checkpoint(dir, 70, 0, |d| write(d, "s70")).unwrap();
    assert!(!dir.join(".partial-step-00000060-999").exists());
    let (step, path) = latest_checkpoint(dir).unwrap().unwrap();
    assert_eq!(step, 70);
    assert_eq!(
        std::fs::read_to_string(path.join("file.txt")).unwrap(),
        "s70"
    );
    // saving a step again replaces it
    save_checkpoint(dir, 70, 0, |d| write(d, "again")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("step-00000070/file.txt")).unwrap(),
        "again"
    );
}

#[test]
fn optimizer_state_of_another_model_is_refused() {
    let dev = CpuDevice::new();
    let tmp = tempfile::tempdir().unwrap();
    let a = trainer(&dev, Model::init_random(&dev, tiny(), 1, 0.1).unwrap());
    save_adamw(&dev, &a.opt, &tmp.path().join("opt.safetensors")).unwrap();
    let mut cfg = tiny();
    cfg.intermediate_size = 24;
    let mut b = trainer(&dev, Model::init_random(&dev, cfg, 1, 0.1).unwrap());
    let e = load_adamw(&dev, &mut b.opt, &tmp.path().join("opt.safetensors")).unwrap_err();
    assert!(e.to_string().contains("opt.safetensors"), "{e}");
}
