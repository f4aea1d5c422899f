//! The YAML run config: the shipped configs, defaults, overrides, error messages, verl's keys.

use std::path::{Path, PathBuf};

use nla_engine::config::{
    Algo, HeadInit, InjectionMode, KlType, LossAggMode, LrSchedulerType, Part, Pooling, Resume,
    RewardTransform, RunConfig, Scale, Truncation, DEFAULT_CRITIC_PROMPT,
};
use nla_engine::train::ScheduleKind;
use nla_engine::Error;

const MINIMAL: &str = "
model:
  model_name: /models/actor
data:
  train_dataset:
    parquet_files: train.parquet
trainer:
  total_training_steps: 100
";

/// MINIMAL with the keys of `extra` added (deep merge).
fn with(extra: &str) -> String {
    fn merge(base: &mut serde_norway::Mapping, top: serde_norway::Mapping) {
        for (k, v) in top {
            match (base.get_mut(&k), v) {
                (Some(serde_norway::Value::Mapping(b)), serde_norway::Value::Mapping(t)) => {
                    merge(b, t)
                }
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
    }
    let mut base: serde_norway::Mapping = serde_norway::from_str(MINIMAL).unwrap();
    merge(&mut base, serde_norway::from_str(extra).unwrap());
    serde_norway::to_string(&base).unwrap()
}

fn load(text: &str, overrides: &[&str]) -> nla_engine::Result<RunConfig> {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::from_yaml(text, Path::new("test.yaml"), &ov)
}

/// The (field, message) of a config error, or the whole message of another error.
fn fail(text: &str, overrides: &[&str]) -> (String, String) {
    match load(text, overrides) {
        Ok(_) => panic!("expected an error for:\n{text}\n{overrides:?}"),
        Err(Error::Config { field, msg, path }) => {
            assert_eq!(path, PathBuf::from("test.yaml"));
            (field, msg)
        }
        Err(e) => (String::new(), e.to_string()),
    }
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn shipped_configs_load_and_validate() {
    let mut names = vec![];
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let cfg = RunConfig::from_file(&path, &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                cfg.ignored.is_empty(),
                "{}: {:?}",
                path.display(),
                cfg.ignored
            );
            assert!(
                cfg.renamed.is_empty(),
                "{}: {:?}",
                path.display(),
                cfg.renamed
            );
            // What to_yaml writes loads back to the same config.
            let again = RunConfig::from_yaml(&cfg.to_yaml().unwrap(), &path, &[]).unwrap();
            assert_eq!(again, cfg, "{}", path.display());
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "demo.yaml",
            "grpo.yaml",
            "plan-7b.yaml",
            "ppo.yaml",
            "sft.yaml"
        ]
    );

    let demo = RunConfig::from_file(configs_dir().join("demo.yaml"), &[]).unwrap();
    assert_eq!(demo.model.model_name, "runs/demo/base");
    assert_eq!(demo.trainer.train_mode, Part::Both);
    assert_eq!(demo.trainer.algo, Algo::Sft);
    assert_eq!(demo.model.critic.last_block(), Some(1));
    let val = demo.data.val_dataset.as_ref().unwrap();
    assert_eq!(val.mode, Part::Both, "inherited from train_dataset");
    assert_eq!(val.max_length, 64);
    assert_eq!(demo.model.critic.explanation_tag, None);
    assert!(!val.shuffle);
    // The RL stage of the demo is the same file with overrides.
    let rl = RunConfig::from_file(
        configs_dir().join("demo.yaml"),
        &["trainer.algo=grpo".into(), "trainer.resume=true".into()],
    )
    .unwrap();
    assert_eq!(rl.trainer.algo, Algo::Grpo);
    assert_eq!(rl.trainer.resume, Resume::Latest);

    let grpo = RunConfig::from_file(configs_dir().join("grpo.yaml"), &[]).unwrap();
    assert_eq!(grpo.trainer.algo, Algo::Grpo);
    assert_eq!(grpo.generation.stop, ["</explanation>"]);
    assert_eq!(grpo.model.injection.scale, Scale::Fixed(150.0));
    let ppo = RunConfig::from_file(configs_dir().join("ppo.yaml"), &[]).unwrap();
    assert_eq!(ppo.trainer.algo, Algo::Ppo);
    assert_eq!(ppo.ppo.mini_batch_size, Some(16));
    let sft = RunConfig::from_file(configs_dir().join("sft.yaml"), &[]).unwrap();
    assert_eq!(sft.actor_schedule().min_lr, 2.0e-6);
}

#[test]
fn defaults_follow_the_decisions() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.model.model_name, "/models/actor");
    assert_eq!(c.critic_model_name(), "/models/actor");
    assert_eq!(
        c.data.train_dataset.parquet_files,
        [PathBuf::from("train.parquet")]
    );
    assert!(c.data.val_dataset.is_none());
    // Injection: replace at the embedding output, raw vectors ([O]).
    let inj = &c.model.injection;
    assert_eq!(inj.mode, InjectionMode::Replace);
    assert_eq!(inj.layer_indices, [0]);
    assert_eq!(inj.injection_token, "<INJECT>");
    assert_eq!(inj.scale, Scale::Raw);
    assert_eq!(c.model.activation_dim, None);
    // Critic ([O]): last-token pooling, identity head, sqrt(d) normalisation, the summary prompt.
    let cr = &c.model.critic;
    assert_eq!(cr.pooling, Pooling::Last);
    assert_eq!(cr.head_init, HeadInit::Identity);
    assert_eq!(cr.mse_scale, Scale::SqrtDModel);
    assert_eq!(cr.mse_scale.norm(4096), Some(64.0));
    assert_eq!(cr.critic_prompt.as_deref(), Some(DEFAULT_CRITIC_PROMPT));
    assert_eq!(cr.explanation_tag.as_deref(), Some("explanation"));
    assert_eq!(cr.last_block(), None);
    // GRPO ([O] where it differs from [V]).
    let g = &c.grpo;
    assert_eq!(g.n, 4);
    assert_eq!((g.clip_ratio_low, g.clip_ratio_high), (0.2, 0.2));
    assert_eq!(g.dual_clip_c, Some(3.0));
    assert!(g.use_kl_loss);
    assert_eq!(g.kl_coef, 0.01);
    assert_eq!(g.kl_type, KlType::K1);
    assert_eq!(g.loss_agg_mode, LossAggMode::SeqMeanTokenMean);
    assert!(g.norm_adv_by_std);
    assert_eq!(g.ppo_epochs, 1);
    assert_eq!(g.ppo_mini_batch_size, None);
    assert_eq!(g.failure_reward, -2.0);
    assert_eq!(g.reward_transform, RewardTransform::Negative);
    assert_eq!(g.reward_scale, 1.0);
    assert!(!g.reward_normalize);
    assert_eq!(g.reward_clip, None);
    // PPO ([V] legacy).
    assert_eq!(
        (c.ppo.epochs, c.ppo.clip, c.ppo.critic_train_epochs),
        (4, 0.2, 1)
    );
    // Sampling ([O], Miles defaults).
    let s = &c.generation;
    assert_eq!(
        (s.temperature, s.top_p, s.top_k, s.max_new_tokens),
        (1.0, 1.0, -1, 150)
    );
    // Data and trainer ([V] seed).
    let ds = &c.data.train_dataset;
    assert_eq!(
        (
            ds.prompt_key.as_str(),
            ds.response_key.as_str(),
            ds.activation_vector_key.as_str()
        ),
        ("prompt", "response", "activation_vector")
    );
    assert_eq!(ds.truncation, Truncation::Error);
    assert_eq!(ds.mode, Part::Actor);
    assert_eq!(
        (
            c.data.train_batch_size,
            c.data.val_batch_size,
            c.data.micro_batch_size_per_gpu
        ),
        (32, 32, 4)
    );
    assert_eq!(c.trainer.train_mode, Part::Actor);
    assert_eq!(c.trainer.algo, Algo::Sft);
    assert_eq!(c.trainer.resume, Resume::No);
    assert_eq!(c.trainer.save_total_limit, Some(5));
    // Optimizer and its conversions.
    let o = &c.optim;
    assert_eq!((o.lr, o.critic_lr, o.weight_decay), (1e-5, 5e-5, 0.01));
    assert_eq!(o.lr_scheduler_type, LrSchedulerType::Cosine);
    let adamw = o.adamw();
    assert_eq!(
        (adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay),
        (0.9, 0.999, 1e-8, 0.01)
    );
    let s = c.actor_schedule();
    assert_eq!(s.kind, ScheduleKind::Cosine);
    assert_eq!((s.lr, s.min_lr), (1e-5, 1e-6));
    assert_eq!((s.warmup_steps, s.total_steps), (50, 100));
    let cs = c.critic_schedule();
    assert_eq!((cs.lr, cs.min_lr), (5e-5, 5e-6));
    assert!((cs.lr_at(100) - 5e-6).abs() < 1e-12);
    assert!(c.warnings().is_empty());
}

#[test]
fn empty_sections_are_defaults() {
    let c = load(&format!("{MINIMAL}optim:\ngrpo: {{}}\n"), &[]).unwrap();
    assert_eq!(c.optim.lr, 1e-5);
    assert_eq!(c.grpo.n, 4);
}

#[test]
fn overrides() {
    let c = load(
        MINIMAL,
        &[
            "optim.lr=3e-4",
            "model.injection.layer_indices=[0, 2]",
            "model.injection.scale=sqrt_d_model",
            "model.critic.truncate_at_layer=11",
            "grpo.dual_clip_c=null",
            "grpo.reward_clip=[-4, 0]",
            "generation.stop=['</explanation>', END]",
            "data.val_dataset.parquet_files=val.parquet",
            "trainer.resume=runs/x/step-100",
            "trainer.algo=grpo",
        ],
    )
    .unwrap();
    assert_eq!(c.optim.lr, 3e-4);
    assert_eq!(c.model.injection.layer_indices, [0, 2]);
    assert_eq!(c.model.injection.scale, Scale::SqrtDModel);
    assert_eq!(c.model.critic.last_block(), Some(11));
    assert_eq!(c.grpo.dual_clip_c, None);
    assert_eq!(c.grpo.reward_clip, Some([-4.0, 0.0]));
    assert_eq!(c.generation.stop, ["</explanation>", "END"]);
    // A path into a missing section creates it; the new validation set inherits the columns.
    let val = c.data.val_dataset.as_ref().unwrap();
    assert_eq!(val.parquet_files, [PathBuf::from("val.parquet")]);
    assert_eq!(val.prompt_key, "prompt");
    assert_eq!(c.trainer.resume, Resume::From("runs/x/step-100".into()));
    assert_eq!(c.trainer.algo, Algo::Grpo);

    // An override wins over the file, also under verl's name, and a whole section can be set.
    let file = format!("{MINIMAL}grpo:\n  n: 4\n");
    let c = load(
        &file,
        &[
            "actor_rollout_ref.rollout.n=8",
            "ppo={epochs: 2, clip: 0.1}",
        ],
    )
    .unwrap();
    assert_eq!(c.grpo.n, 8);
    assert_eq!((c.ppo.epochs, c.ppo.clip), (2, 0.1));
    assert_eq!(
        c.renamed,
        [(
            "actor_rollout_ref.rollout.n".to_string(),
            "grpo.n".to_string()
        )]
    );

    // Null on a section removes it.
    let c = load(
        &with("data:\n  val_dataset:\n    parquet_files: v\n"),
        &["data.val_dataset=null"],
    )
    .unwrap();
    assert!(c.data.val_dataset.is_none());

    // Unknown keys, in a known or a new section.
    let (field, msg) = fail(MINIMAL, &["optim.lrr=1e-4"]);
    assert_eq!(field, "optim.lrr");
    assert_eq!(
        msg,
        "unknown key; did you mean `optim.lr`? (in `--set optim.lrr=1e-4`)"
    );
    let (field, msg) = fail(MINIMAL, &["optimizer.lr=1e-4"]);
    assert_eq!(field, "optimizer");
    assert!(msg.contains("did you mean `optim`?"), "{msg}");
    // Malformed overrides, and a value of the wrong type.
    let (_, msg) = fail(MINIMAL, &["optim.lr"]);
    assert!(msg.contains("`a.b.c=value`"), "{msg}");
    let (field, msg) = fail(MINIMAL, &["optim..lr=1"]);
    assert_eq!(field, "optim..lr");
    assert!(msg.contains("dotted path"), "{msg}");
    let (field, msg) = fail(MINIMAL, &["optim.lr=[1"]);
    assert_eq!(field, "optim.lr");
    assert!(msg.contains("not YAML"), "{msg}");
    let (field, msg) = fail(MINIMAL, &["grpo.n=four"]);
    assert_eq!(field, "grpo.n");
    assert!(msg.contains("invalid type: string \"four\""), "{msg}");
    // Setting a section to a scalar.
    let (field, msg) = fail(MINIMAL, &["optim=3"]);
    assert_eq!(field, "optim");
    assert!(msg.contains("is a section"), "{msg}");
}

#[test]
fn unknown_keys_name_the_path_and_the_closest_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "optimm:\n  lr: 1.0e-4\n",
            "optimm",
            "unknown key; did you mean `optim`?",
        ),
        (
            "optim:\n  lrr: 1.0e-4\n",
            "optim.lrr",
            "unknown key; did you mean `optim.lr`?",
        ),
        (
            "model:\n  injection:\n    moed: add\n",
            "model.injection.moed",
            "unknown key; did you mean `model.injection.mode`?",
        ),
        (
            "data:\n  train_dataset:\n    prompt_kye: p\n",
            "data.train_dataset.prompt_kye",
            "unknown key; did you mean `data.train_dataset.prompt_key`?",
        ),
        (
            "trainer:\n  critic_lr: 1.0e-4\n",
            "trainer.critic_lr",
            "unknown key; did you mean `optim.critic_lr`?",
        ),
        (
            "actor_rollout_ref:\n  rollout:\n    nn: 4\n",
            "actor_rollout_ref.rollout.nn",
            "unknown key; did you mean `actor_rollout_ref.rollout.n`?",
        ),
    ];
    for (extra, field, msg) in cases {
        let (f, m) = fail(&with(extra), &[]);
        assert_eq!((f.as_str(), m.as_str()), (*field, *msg), "{extra}");
    }
    // Nothing close: the keys of that level are listed.
    let (f, m) = fail(&format!("{MINIMAL}ppo:\n  banana: 1\n"), &[]);
    assert_eq!(f, "ppo.banana");
    assert_eq!(
        m,
        "unknown key; the keys at ppo are: clip, critic_train_epochs, epochs, mini_batch_size, whiten_advantages"
    );
    // Only our keys are listed, not verl's.
    let (_, m) = fail(&with("grpo:\n  banana: 1\n"), &[]);
    assert!(m.contains("dual_clip_c, failure_reward, kl_coef"), "{m}");
    // The full message, as the CLI prints it.
    let e = load(&format!("{MINIMAL}optim:\n  lrr: 1\n"), &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.yaml: field `optim.lrr`: unknown key; did you mean `optim.lr`?"
    );
}

#[test]
fn wrong_types_name_the_key_and_the_type() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "optim:\n  lr: fast\n",
            "optim.lr",
            "invalid type: string \"fast\", expected f64",
        ),
        (
            "model:\n  injection:\n    mode: inject\n",
            "model.injection.mode",
            "unknown variant `inject`, expected one of `replace`, `add`, `project`",
        ),
        (
            "model:\n  injection:\n    layer_indices: [0, x]\n",
            "model.injection.layer_indices[1]",
            "invalid type: string \"x\", expected usize",
        ),
        (
            "model:\n  injection:\n    scale: big\n",
            "model.injection.scale",
            "invalid value: string \"big\", expected a positive number, \"sqrt_d_model\" or null",
        ),
        (
            "grpo:\n  n:\n",
            "grpo.n",
            "invalid type: null (an empty value), expected usize",
        ),
        (
            "trainer:\n  resume: 3\n",
            "trainer.resume",
            "invalid type: integer `3`, expected true, false or a checkpoint path",
        ),
        (
            "grpo:\n  kl_type: k4\n",
            "grpo.kl_type",
            "unknown variant `k4`, expected one of `k1`, `kl`, `k2`, `mse`, `k3`, `low_var_kl`",
        ),
    ];
    for (extra, field, msg) in cases {
        let (f, m) = fail(&with(extra), &[]);
        assert_eq!((f.as_str(), m.as_str()), (*field, *msg), "{extra}");
    }
    let (f, m) = fail(&format!("{MINIMAL}optim: 3\n"), &[]);
    assert_eq!(f, "optim");
    assert_eq!(m, "is a section: expected keys under it, found a number");
}

#[test]
fn missing_required_keys_are_named() {
    let (f, m) = fail("data:\n  train_dataset:\n    parquet_files: t.parquet\ntrainer:\n  total_training_steps: 1\n", &[]);
    assert_eq!(f, "model.model_name");
    assert!(m.starts_with("required key is missing"), "{m}");
    let (f, _) = fail(
        "model:\n  model_name: m\ntrainer:\n  total_training_steps: 1\n",
        &[],
    );
    assert_eq!(f, "data.train_dataset.parquet_files");
    let (f, _) = fail(
        "model:\n  model_name: m\ndata:\n  train_dataset:\n    parquet_files: t\n",
        &[],
    );
    assert_eq!(f, "trainer.total_training_steps");
    let (f, _) = fail(
        &format!("{MINIMAL}  val_dataset:\n    max_length: 5\n")
            .replace("trainer:\n  total_training_steps: 100\n", ""),
        &["trainer.total_training_steps=3"],
    );
    assert_eq!(f, "data.val_dataset.parquet_files");
}

#[test]
fn syntax_errors_give_file_line_and_column() {
    let text = "model:\n  model_name: m\n  activation_dim: [1\ndata: {}\n";
    let e = load(text, &[]).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("test.yaml: line 4, column 5: "), "{msg}");
    assert!(msg.contains("flow sequence"), "{msg}");

    let e = load("model:\n  model_name: m\n\tbad: 1\n", &[]).unwrap_err();
    assert!(
        e.to_string().starts_with("test.yaml: line 3, column 1: "),
        "{e}"
    );
    // A key given twice is an error, with its place.
    let e = load("optim:\n  lr: 1\n  lr: 2\n", &[]).unwrap_err();
    assert!(e.to_string().contains("duplicate"), "{e}");
    // Files that cannot be read say which.
    let e = RunConfig::from_file("/no/such/config.yaml", &[]).unwrap_err();
    assert!(e.to_string().starts_with("/no/such/config.yaml: "), "{e}");
}

#[test]
fn validation_gives_clear_messages() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["optim.lr=0"], "optim.lr", "0: must be > 0"),
        (
            &["optim.warmup_steps=200"],
            "optim.warmup_steps",
            "200 is more than trainer.total_training_steps (100)",
        ),
        (&["grpo.clip_ratio_high=1.5"], "grpo.clip_ratio_high", "1.5 is not in (0, 1)"),
        (&["grpo.n=0"], "grpo.n", "the group size must be at least 1"),
        (&["model.activation_dim=0"], "model.activation_dim", "must be at least 1 (or null)"),
        (&["optim.beta2=1"], "optim.beta2", "1 is not in [0, 1)"),
        (&["generation.top_p=0"], "generation.top_p", "0 is not in (0, 1]"),
        (&["grpo.dual_clip_c=0.5"], "grpo.dual_clip_c", "must be > 1 (or null = off)"),
        (&["grpo.reward_clip=[0, -4]"], "grpo.reward_clip", "[0, -4]: min must be < max"),
        (
            &["grpo.ppo_mini_batch_size=5"],
            "grpo.ppo_mini_batch_size",
            "5 must be at least 1 and divide data.train_batch_size (32)",
        ),
        (
            &["model.critic.truncate_at_layer=10", "model.critic.output_layer_index=10"],
            "model.critic.output_layer_index",
            "10 disagrees with truncate_at_layer 10 (blocks 0..=10 kept means output_layer_index 11); give one of them",
        ),
        (
            &["model.injection.projection_dim=64"],
            "model.injection.projection_dim",
            "is used only by `mode: project`; set it to null",
        ),
        (
            &["trainer.train_mode=critic"],
            "data.train_dataset.mode",
            "`actor` rows cannot train trainer.train_mode `critic`",
        ),
        (
            &["trainer.train_mode=critic", "trainer.algo=grpo"],
            "trainer.train_mode",
            "`critic` trains no actor; RL (grpo, ppo) needs `actor` or `both`",
        ),
        (&["trainer.total_training_steps=0", "optim.warmup_steps=0"], "trainer.total_training_steps", "must be at least 1"),
        (&["model.injection.scale=-1"], "model.injection.scale", "-1: must be a positive number, \"sqrt_d_model\" or null"),
    ];
    for (ov, field, msg) in cases {
        let (f, m) = fail(MINIMAL, ov);
        assert_eq!((f.as_str(), m.as_str()), (*field, *msg), "{ov:?}");
    }
    // A config changed in code is checked again by validate().
    let mut c = load(MINIMAL, &[]).unwrap();
    c.optim.min_lr_ratio = 2.0;
    let e = c.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.yaml: field `optim.min_lr_ratio`: 2 is not in [0, 1]"
    );
}

#[test]
fn model_dimension_checks() {
    let c = load(
        MINIMAL,
        &[
            "model.activation_dim=512",
            "model.critic.output_layer_index=6",
        ],
    )
    .unwrap();
    assert_eq!(c.model.critic.last_block(), Some(5));
    assert!(c.check_model_dims(512, 8, 8).is_ok());
    let e = c.check_model_dims(256, 8, 8).unwrap_err();
    assert!(
        e.to_string()
            .contains("512 differs from the actor's hidden size 256"),
        "{e}"
    );
    let e = c.check_model_dims(512, 8, 5).unwrap_err();
    assert!(
        e.to_string()
            .contains("block 5: the critic backbone has blocks 0 ..< 5"),
        "{e}"
    );
    let c = load(
        MINIMAL,
        &["model.activation_dim=512", "model.injection.mode=project"],
    )
    .unwrap();
    assert!(c.check_model_dims(256, 8, 8).is_ok());
    let c = load(MINIMAL, &["model.injection.layer_indices=[0, 9]"]).unwrap();
    let e = c.check_model_dims(64, 8, 8).unwrap_err();
    assert!(
        e.to_string().contains("layer 9: the actor has 8 blocks"),
        "{e}"
    );
}

/// The keys of verl's `nla_sft_config.yaml` (NLA_SEMANTICS.md section 6).
const VERL_SFT: &str = r#"
model:
  model_name: "meta-llama/Llama-2-7b-hf"
  activation_dim: 768
  enable_flashattn: true
  injection:
    mode: replace
    layer_indices: [0]
    projection_dim: null
    injection_token: "<INJECT>"
    injection_token_id: null
  critic:
    model_name: "meta-llama/Llama-2-7b-hf"
    pooling: last
    dropout: 0.1
    projection_layers: 2
data:
  train_dataset:
    parquet_files: ["data/train.parquet"]
    prompt_key: prompt
    response_key: response
    max_length: 2048
    truncation: right
    use_shm: false
    mode: actor
    activation_dim: 768
    injection_token: "<INJECT>"
  val_dataset:
    parquet_files: ["data/val.parquet"]
    prompt_key: prompt
    response_key: response
    max_length: 2048
    truncation: right
    use_shm: false
    mode: actor
    activation_dim: 768
    injection_token: "<INJECT>"
  train_batch_size: 32
  val_batch_size: 32
  micro_batch_size_per_gpu: 4
optim:
  lr: 1e-5
  weight_decay: 0.01
  beta1: 0.9
  beta2: 0.999
  max_norm: 1.0
  critic_lr: 5e-5
  warmup_steps: 100
  lr_scheduler_type: cosine
trainer:
  total_training_steps: 10000
  val_steps: 500
  save_steps: 1000
  logging_steps: 10
  train_mode: actor
  critic_epochs: 1
  save_dir: "./checkpoints/nla_sft"
  save_total_limit: 5
  load_checkpoint: null
  mixed_precision: bf16
  gradient_checkpointing: false
  device: cuda
  world_size: 1
  local_rank: 0
  backend: nccl
  fsdp:
    sharding_strategy: FULL_SHARD
    cpu_offload: false
    mixed_precision: true
    backward_prefetch: BACKWARD_PRE
  num_epochs: 1
  use_tensorboard: true
  tensorboard_dir: ./logs
  use_wandb: false
  wandb_project: nla
  wandb_run_name: null
eval:
  max_new_tokens: 512
  temperature: 0.7
  top_p: 0.9
  do_sample: true
  compute_perplexity: true
  compute_critic_mse: true
"#;

#[test]
fn verl_sft_config_loads_with_ignored_keys_reported() {
    let c = load(VERL_SFT, &[]).unwrap();
    assert_eq!(c.model.model_name, "meta-llama/Llama-2-7b-hf");
    assert_eq!(c.model.activation_dim, Some(768));
    assert_eq!(c.model.critic.pooling, Pooling::Last);
    assert_eq!(c.data.train_dataset.truncation, Truncation::Right);
    assert_eq!(
        c.data.val_dataset.as_ref().unwrap().parquet_files,
        [PathBuf::from("data/val.parquet")]
    );
    assert_eq!(
        (c.optim.lr, c.optim.critic_lr, c.optim.warmup_steps),
        (1e-5, 5e-5, 100)
    );
    assert_eq!(c.trainer.total_training_steps, 10000);
    assert_eq!(c.trainer.resume, Resume::No);
    assert_eq!(c.trainer.save_dir, PathBuf::from("./checkpoints/nla_sft"));
    assert_eq!(
        c.renamed,
        [(
            "trainer.load_checkpoint".to_string(),
            "trainer.resume".to_string()
        )]
    );
    let ignored: Vec<&str> = c.ignored.iter().map(|k| k.path.as_str()).collect();
    assert_eq!(
        ignored,
        [
            "model.enable_flashattn",
            "model.critic.dropout",
            "model.critic.projection_layers",
            "data.train_dataset.use_shm",
            "data.train_dataset.activation_dim",
            "data.train_dataset.injection_token",
            "data.val_dataset.use_shm",
            "data.val_dataset.activation_dim",
            "data.val_dataset.injection_token",
            "trainer.mixed_precision",
            "trainer.gradient_checkpointing",
            "trainer.world_size",
            "trainer.local_rank",
            "trainer.backend",
            "trainer.fsdp",
            "trainer.num_epochs",
            "trainer.use_tensorboard",
            "trainer.tensorboard_dir",
            "trainer.use_wandb",
            "trainer.wandb_project",
            "trainer.wandb_run_name",
            "eval",
        ]
    );
    let w = c.warnings();
    assert_eq!(w.len(), ignored.len() + 1);
    assert!(w.contains(&"config: `trainer.fsdp` is ignored: one process per GPU with ZeRO sharding of the flat buffers; the launcher (torchrun, SLURM, mpirun) sets the ranks".to_string()), "{w:#?}");
    assert!(
        w.contains(&"config: `trainer.load_checkpoint` is read as `trainer.resume`".to_string())
    );
}

/// The keys of verl's `nla_grpo_full.yaml` (NLA_SEMANTICS.md section 6), with the critic keys
/// it reads but does not set.
const VERL_GRPO: &str = r#"
defaults:
  - ppo_trainer
  - _self_
trainer:
  n_gpus_per_node: 1
  nnodes: 1
  save_freq: 100
  total_epochs: 1
  total_training_steps: 10
  default_local_dir: checkpoints/nla_grpo
  default_hdfs_dir: null
  project_name: nla
  experiment_name: grpo
  logger: ["console"]
  max_actor_ckpt_to_keep: null
  max_critic_ckpt_to_keep: null
  worker_module: x
  steps_per_update: 1
  ppo_mini_batch_size: 8
  ppo_epochs: 2
  clip_ratio: 1
  value_clip: 0.2
  max_grad_norm: 1.0
  normalize_reward: true
  normalize_advantages: true
  gamma: 1.0
  lam: 1.0
  gradient_checkpointing: false
actor_rollout_ref:
  model:
    path: /models/qwen
    use_shm: false
    trust_remote_code: true
    enable_gradient_checkpointing: true
  actor:
    strategy: fsdp2
    ppo_mini_batch_size: 32
    ppo_micro_batch_size_per_gpu: 32
    ppo_max_token_len_per_gpu: 4500
    use_kl_loss: false
    optim:
      lr: 1e-5
      weight_decay: 0.01
      lr_warmup_steps: 5
  rollout:
    name: nla_sglang
    n: 4
    log_prob_micro_batch_size_per_gpu: 32
    log_prob_max_token_len_per_gpu: 4500
    tensor_model_parallel_size: 1
    disable_radix_cache: true
    gpu_memory_utilization: 0.4
    response_length: 50
    temperature: 0.7
    top_p: 0.9
    do_sample: true
    calculate_log_probs: true
  ref:
    enable: false
critic:
  enable: true
  strategy: fsdp2
  ppo_micro_batch_size_per_gpu: 32
  ppo_max_token_len_per_gpu: 3000
  forward_max_token_len_per_gpu: 3000
  optim:
    lr: 5e-5
    weight_decay: 0.01
    lr_warmup_steps: 5
  output_layer_index: 21
  critic_prompt: "Reconstruct: "
  pooling_strategy: mean
algorithm:
  adv_estimator: grpo
  norm_adv_by_std_in_grpo: true
  use_kl_in_reward: false
  kl_ctrl:
    type: fixed
    value: 0.1
data:
  train_batch_size: 32
  max_prompt_length: 128
  max_response_length: 50
  prompt_key: prompt
  train_files: [rl/train.parquet]
  val_files: [rl/val.parquet]
  shuffle: true
  micro_batch_size_per_gpu: 32
  val_batch_size: 32
  batch_size: 32
  dataloader_num_workers: 4
grpo:
  group_normalize_advantages: true
  critic_supervised_weight: 1.0
  critic_learning_rate: 5e-5
  critic_train_epochs: 1
  reward_normalize: false
  reward_transform: negative
  reward_scale: 1.0
  actor_learning_rate: 1e-5
  ppo_epochs: 1
  ppo_clip_ratio: 0.2
nla:
  activation_dim: null
  injection_position: manual
  injection_mode: replace
  injection_layer_indices: [0]
  activation_vector_key: activation_vector
  injection:
    mode: replace
    layer_indices: [0]
    projection_dim: null
    injection_token: "<INJECT>"
    position: manual
reward_model:
  enable: false
ray_kwargs:
  ray_init:
    num_cpus: null
engine_kwargs:
  sglang:
    attention_backend: null
"#;

#[test]
fn verl_grpo_config_loads_with_ignored_keys_reported() {
    let c = load(VERL_GRPO, &[]).unwrap();
    assert_eq!(c.model.model_name, "/models/qwen");
    assert_eq!(c.model.activation_dim, None);
    assert_eq!(c.trainer.algo, Algo::Grpo);
    assert_eq!(c.trainer.total_training_steps, 10);
    assert_eq!(c.trainer.save_steps, 100);
    assert_eq!(c.trainer.save_dir, PathBuf::from("checkpoints/nla_grpo"));
    assert_eq!(c.trainer.save_total_limit, None);
    assert_eq!(c.grpo.n, 4);
    assert!(!c.grpo.use_kl_loss);
    assert!(c.grpo.norm_adv_by_std);
    assert_eq!(c.grpo.ppo_mini_batch_size, Some(32));
    assert_eq!(
        (c.optim.lr, c.optim.critic_lr, c.optim.warmup_steps),
        (1e-5, 5e-5, 5)
    );
    assert_eq!((c.generation.temperature, c.generation.top_p), (0.7, 0.9));
    assert_eq!(c.generation.max_new_tokens, 50);
    assert_eq!(c.data.micro_batch_size_per_gpu, 32);
    let ds = &c.data.train_dataset;
    assert_eq!(ds.parquet_files, [PathBuf::from("rl/train.parquet")]);
    assert_eq!(ds.max_length, 128);
    assert!(ds.shuffle);
    let val = c.data.val_dataset.as_ref().unwrap();
    assert_eq!(val.parquet_files, [PathBuf::from("rl/val.parquet")]);
    assert_eq!(val.max_length, 128, "inherited");
    let cr = &c.model.critic;
    assert_eq!(cr.output_layer_index, Some(21));
    assert_eq!(cr.last_block(), Some(20));
    assert_eq!(cr.critic_prompt.as_deref(), Some("Reconstruct: "));
    assert_eq!(cr.pooling, Pooling::Mean);
    assert_eq!(c.model.injection.mode, InjectionMode::Replace);

    let renamed: Vec<(&str, &str)> = c
        .renamed
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    for pair in [
        ("actor_rollout_ref.rollout.n", "grpo.n"),
        ("actor_rollout_ref.model.path", "model.model_name"),
        ("critic.optim.lr", "optim.critic_lr"),
        ("algorithm.adv_estimator", "trainer.algo"),
        ("data.train_files", "data.train_dataset.parquet_files"),
        ("data.max_response_length", "generation.max_new_tokens"),
        (
            "actor_rollout_ref.rollout.response_length",
            "generation.max_new_tokens",
        ),
        (
            "nla.injection.injection_token",
            "model.injection.injection_token",
        ),
    ] {
        assert!(renamed.contains(&pair), "{pair:?} not in {renamed:#?}");
    }
    let ignored: Vec<&str> = c.ignored.iter().map(|k| k.path.as_str()).collect();
    for key in [
        "defaults",
        "trainer.n_gpus_per_node",
        "trainer.total_epochs",
        "trainer.logger",
        "trainer.ppo_epochs",
        "trainer.gamma",
        "actor_rollout_ref.actor.strategy",
        "actor_rollout_ref.rollout.name",
        "actor_rollout_ref.rollout.gpu_memory_utilization",
        "actor_rollout_ref.ref",
        "critic.enable",
        "critic.optim.weight_decay",
        "algorithm.kl_ctrl",
        "data.batch_size",
        "data.dataloader_num_workers",
        "grpo.ppo_clip_ratio",
        "nla.injection_mode",
        "nla.injection.position",
        "reward_model",
        "ray_kwargs",
        "engine_kwargs",
    ] {
        assert!(ignored.contains(&key), "{key} not in {ignored:#?}");
    }
    let n_ignored = c.ignored.len();
    assert_eq!(c.warnings().len(), n_ignored + c.renamed.len());
    // The two names of one setting must agree.
    let (f, m) = fail(
        &VERL_GRPO.replace("    response_length: 50", "    response_length: 60"),
        &[],
    );
    assert_eq!(f, "data.max_response_length");
    assert_eq!(
        m,
        "sets `generation.max_new_tokens` to 50, but `actor_rollout_ref.rollout.response_length` sets it to 60; keep one"
    );
    // The same with our own name.
    let (f, m) = fail(
        &format!("{VERL_GRPO}generation:\n  temperature: 1.0\n"),
        &[],
    );
    assert_eq!(f, "actor_rollout_ref.rollout.temperature");
    assert_eq!(
        m,
        "sets `generation.temperature` to 0.7, but `generation.temperature` is also given, as 1.0; keep one"
    );
}

#[test]
fn hydra_interpolation_is_an_error() {
    let text = format!("{MINIMAL}generation:\n  max_new_tokens: ${{data.max_response_length}}\n");
    let (f, m) = fail(&text, &[]);
    assert_eq!(f, "generation.max_new_tokens");
    assert!(m.contains("Hydra interpolation"), "{m}");
}
