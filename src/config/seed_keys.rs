//! The verl NLA add-on's config keys: the ones read under our name, and the ones accepted and
//! ignored.
//!
//! Keys of verl's `nla_sft_config.yaml` that have the same name and meaning here (`model.*`,
//! `data.*`, `optim.*`, most of `trainer.*`) are simply ours and are not listed. A verl key
//! listed in neither table is an unknown key (an error).
//!
//! Read under our name ([`RENAMED`]); if both names are given they must hold the same value:
//!
//! | verl key | ours |
//! |---|---|
//! | `trainer.load_checkpoint` | `trainer.resume` |
//! | `trainer.save_freq` / `test_freq` | `trainer.save_steps` / `val_steps` |
//! | `trainer.default_local_dir` | `trainer.save_dir` |
//! | `trainer.max_actor_ckpt_to_keep` | `trainer.save_total_limit` |
//! | `actor_rollout_ref.model.path` | `model.model_name` |
//! | `actor_rollout_ref.actor.optim.{lr, weight_decay, lr_warmup_steps, min_lr_ratio, warmup_style}` | `optim.{lr, weight_decay, warmup_steps, min_lr_ratio, lr_scheduler_type}` |
//! | `actor_rollout_ref.actor.grad_clip` | `optim.max_norm` |
//! | `actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu` | `data.micro_batch_size_per_gpu` |
//! | `actor_rollout_ref.actor.{ppo_mini_batch_size, ppo_epochs, use_kl_loss, loss_agg_mode}` | `grpo.*` (same names) |
//! | `actor_rollout_ref.actor.{kl_loss_coef, kl_loss_type, clip_ratio_c}` | `grpo.{kl_coef, kl_type, dual_clip_c}` |
//! | `actor_rollout_ref.actor.clip_ratio` | `grpo.clip_ratio_low` and `grpo.clip_ratio_high` |
//! | `actor_rollout_ref.actor.{clip_ratio_low, clip_ratio_high}` | `grpo.*` (same names) |
//! | `actor_rollout_ref.rollout.n` | `grpo.n` |
//! | `actor_rollout_ref.rollout.{temperature, top_p, top_k}` | `generation.*` |
//! | `actor_rollout_ref.rollout.response_length`, `data.max_response_length` | `generation.max_new_tokens` |
//! | `critic.model.path` | `model.critic.model_name` |
//! | `critic.model.truncate_at_layer` | `model.critic.truncate_at_layer` |
//! | `critic.{output_layer_index, critic_prompt}` | `model.critic.*` |
//! | `critic.pooling_strategy` | `model.critic.pooling` |
//! | `critic.optim.lr` | `optim.critic_lr` |
//! | `algorithm.adv_estimator` | `trainer.algo` |
//! | `algorithm.norm_adv_by_std_in_grpo` | `grpo.norm_adv_by_std` |
//! | `data.train_files` / `val_files` | `data.train_dataset.parquet_files` / `data.val_dataset.parquet_files` |
//! | `data.{prompt_key, shuffle, truncation}` | `data.train_dataset.*` (the validation set inherits) |
//! | `data.max_prompt_length` | `data.train_dataset.max_length` |
//! | `nla.activation_dim` | `model.activation_dim` |
//! | `nla.activation_vector_key` | `data.train_dataset.activation_vector_key` |
//! | `nla.injection.{mode, layer_indices, projection_dim, injection_token}` | `model.injection.*` |
//! | `model.injection.injection_scale` | `model.injection.scale` |
//!
//! Accepted and ignored ([`IGNORED`]; a whole section where the key names one; `*` ends a
//! name prefix): the reason is in the table and is what [`super::RunConfig::warnings`] prints.
//! In short: distribution and sharding (`trainer.fsdp`, `world_size`, `n_gpus_per_node`,
//! `strategy`, ...) are one process per GPU with ZeRO sharding; precision (`mixed_precision`)
//! follows the device; memory knobs (`gradient_checkpointing`, `*_max_token_len_per_gpu`,
//! `gpu_memory_utilization`) are replaced by the memory plan; logging backends (tensorboard,
//! wandb, `logger`, project names) do not exist; the rollout engine's knobs (`rollout.name`,
//! radix cache, tensor parallel, `log_prob_*`) concern SGLang; keys verl itself never reads
//! (the `grpo` section's, `trainer.ppo_epochs`, `gamma`, ...) stay unread; and settings we hold
//! once for both models (`critic.optim.weight_decay`) are taken from ours.

/// verl key -> our key(s).
pub const RENAMED: &[(&str, &[&str])] = &[
    ("trainer.load_checkpoint", &["trainer.resume"]),
    ("trainer.save_freq", &["trainer.save_steps"]),
    ("trainer.test_freq", &["trainer.val_steps"]),
    ("trainer.default_local_dir", &["trainer.save_dir"]),
    (
        "trainer.max_actor_ckpt_to_keep",
        &["trainer.save_total_limit"],
    ),
    ("actor_rollout_ref.model.path", &["model.model_name"]),
    ("actor_rollout_ref.actor.optim.lr", &["optim.lr"]),
    (
        "actor_rollout_ref.actor.optim.weight_decay",
        &["optim.weight_decay"],
    ),
    (
        "actor_rollout_ref.actor.optim.lr_warmup_steps",
        &["optim.warmup_steps"],
    ),
    (
        "actor_rollout_ref.actor.optim.min_lr_ratio",
        &["optim.min_lr_ratio"],
    ),
    (
        "actor_rollout_ref.actor.optim.warmup_style",
        &["optim.lr_scheduler_type"],
    ),
    ("actor_rollout_ref.actor.grad_clip", &["optim.max_norm"]),
    (
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        &["data.micro_batch_size_per_gpu"],
    ),
    (
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        &["grpo.ppo_mini_batch_size"],
    ),
    ("actor_rollout_ref.actor.ppo_epochs", &["grpo.ppo_epochs"]),
    ("actor_rollout_ref.actor.use_kl_loss", &["grpo.use_kl_loss"]),
    ("actor_rollout_ref.actor.kl_loss_coef", &["grpo.kl_coef"]),
    ("actor_rollout_ref.actor.kl_loss_type", &["grpo.kl_type"]),
    (
        "actor_rollout_ref.actor.loss_agg_mode",
        &["grpo.loss_agg_mode"],
    ),
    (
        "actor_rollout_ref.actor.clip_ratio",
        &["grpo.clip_ratio_low", "grpo.clip_ratio_high"],
    ),
    (
        "actor_rollout_ref.actor.clip_ratio_low",
        &["grpo.clip_ratio_low"],
    ),
    (
        "actor_rollout_ref.actor.clip_ratio_high",
        &["grpo.clip_ratio_high"],
    ),
    (
        "actor_rollout_ref.actor.clip_ratio_c",
        &["grpo.dual_clip_c"],
    ),
    ("actor_rollout_ref.rollout.n", &["grpo.n"]),
    (
        "actor_rollout_ref.rollout.temperature",
        &["generation.temperature"],
    ),
    ("actor_rollout_ref.rollout.top_p", &["generation.top_p"]),
    ("actor_rollout_ref.rollout.top_k", &["generation.top_k"]),
    (
        "actor_rollout_ref.rollout.response_length",
        &["generation.max_new_tokens"],
    ),
    ("critic.model.path", &["model.critic.model_name"]),
    (
        "critic.model.truncate_at_layer",
        &["model.critic.truncate_at_layer"],
    ),
    (
        "critic.output_layer_index",
        &["model.critic.output_layer_index"],
    ),
    ("critic.critic_prompt", &["model.critic.critic_prompt"]),
    ("critic.pooling_strategy", &["model.critic.pooling"]),
    ("critic.optim.lr", &["optim.critic_lr"]),
    ("algorithm.adv_estimator", &["trainer.algo"]),
    (
        "algorithm.norm_adv_by_std_in_grpo",
        &["grpo.norm_adv_by_std"],
    ),
    ("data.train_files", &["data.train_dataset.parquet_files"]),
    ("data.val_files", &["data.val_dataset.parquet_files"]),
    ("data.prompt_key", &["data.train_dataset.prompt_key"]),
    ("data.shuffle", &["data.train_dataset.shuffle"]),
    ("data.truncation", &["data.train_dataset.truncation"]),
    ("data.max_prompt_length", &["data.train_dataset.max_length"]),
    ("data.max_response_length", &["generation.max_new_tokens"]),
    ("nla.activation_dim", &["model.activation_dim"]),
    (
        "nla.activation_vector_key",
        &["data.train_dataset.activation_vector_key"],
    ),
    ("nla.injection.mode", &["model.injection.mode"]),
    (
        "nla.injection.layer_indices",
        &["model.injection.layer_indices"],
    ),
    (
        "nla.injection.projection_dim",
        &["model.injection.projection_dim"],
    ),
    (
        "nla.injection.injection_token",
        &["model.injection.injection_token"],
    ),
    (
        "model.injection.injection_scale",
        &["model.injection.scale"],
    ),
];

const DIST: &str = "one process per GPU with ZeRO sharding of the flat buffers; the launcher (torchrun, SLURM, mpirun) sets the ranks";
const PRECISION: &str =
    "precision follows the device: f32 on the CPU, bf16 with f32 master weights on CUDA";
const MEMORY: &str = "memory is planned ahead (see `nla-engine plan`); there is no activation checkpointing or token budget";
const LOGGING: &str =
    "metrics go to the console and the run's metrics file; no tensorboard or wandb";
const ROLLOUT: &str = "generation runs inside nla-engine, not in SGLang or vLLM";
const RAY: &str = "there is no Ray; one process per GPU";
const UNREAD: &str = "verl does not read it either";
const SHARED_OPTIM: &str = "one setting serves both models: see `optim`";
const SAMPLING: &str = "`generation.temperature` decides (0 = greedy)";
const FILES: &str = "files are read with memory maps; no shared-memory copy";

/// Keys accepted and ignored, with the reason. A path whose last part ends with `*` matches
/// every key with that prefix.
pub const IGNORED: &[(&str, &str)] = &[
    (
        "defaults",
        "Hydra's defaults list; there is no config composition here",
    ),
    ("hydra", "there is no Hydra here"),
    (
        "model.enable_flashattn",
        "attention uses nla-engine's own kernels",
    ),
    (
        "model.critic.dropout",
        "the critic head is one Linear; no dropout (verl does not read it either)",
    ),
    (
        "model.critic.projection_layers",
        "the critic head is one Linear (verl does not read this key either)",
    ),
    ("data.train_dataset.use_shm", FILES),
    (
        "data.train_dataset.activation_dim",
        "`model.activation_dim` is the one setting",
    ),
    (
        "data.train_dataset.injection_token",
        "`model.injection.injection_token` is the one setting",
    ),
    ("data.val_dataset.use_shm", FILES),
    (
        "data.val_dataset.activation_dim",
        "`model.activation_dim` is the one setting",
    ),
    (
        "data.val_dataset.injection_token",
        "`model.injection.injection_token` is the one setting",
    ),
    ("data.batch_size", UNREAD),
    (
        "data.num_workers",
        "parquet is read on the trainer's threads",
    ),
    (
        "data.dataloader_num_workers",
        "parquet is read on the trainer's threads",
    ),
    ("trainer.mixed_precision", PRECISION),
    ("trainer.gradient_checkpointing", MEMORY),
    ("trainer.world_size", DIST),
    ("trainer.local_rank", DIST),
    (
        "trainer.backend",
        "NCCL on CUDA; a single process on the CPU",
    ),
    ("trainer.fsdp", DIST),
    ("trainer.n_gpus_per_node", DIST),
    ("trainer.nnodes", DIST),
    ("trainer.use_tensorboard", LOGGING),
    ("trainer.tensorboard_dir", LOGGING),
    ("trainer.use_wandb", LOGGING),
    ("trainer.wandb_*", LOGGING),
    ("trainer.logger", LOGGING),
    ("trainer.project_name", LOGGING),
    ("trainer.experiment_name", LOGGING),
    ("trainer.log_val_generations", LOGGING),
    ("trainer.rollout_data_dir", LOGGING),
    (
        "trainer.val_before_train",
        "validation runs every `trainer.val_steps` and at the end",
    ),
    (
        "trainer.num_epochs",
        "the run length is `trainer.total_training_steps`",
    ),
    (
        "trainer.total_epochs",
        "the run length is `trainer.total_training_steps`",
    ),
    (
        "trainer.default_hdfs_dir",
        "checkpoints go to the local `trainer.save_dir`",
    ),
    (
        "trainer.max_critic_ckpt_to_keep",
        "`trainer.save_total_limit` counts checkpoints of both models",
    ),
    ("trainer.worker_module", UNREAD),
    ("trainer.steps_per_update", UNREAD),
    ("trainer.ppo_mini_batch_size", UNREAD),
    ("trainer.ppo_epochs", UNREAD),
    ("trainer.clip_ratio", UNREAD),
    ("trainer.value_clip", UNREAD),
    ("trainer.max_grad_norm", UNREAD),
    ("trainer.normalize_reward", UNREAD),
    ("trainer.normalize_advantages", UNREAD),
    ("trainer.gamma", UNREAD),
    ("trainer.lam", UNREAD),
    (
        "eval",
        "validation reports losses, reconstruction MSE and FVE; samples use `generation`",
    ),
    ("actor_rollout_ref.hybrid_engine", ROLLOUT),
    ("actor_rollout_ref.model.use_shm", FILES),
    (
        "actor_rollout_ref.model.trust_remote_code",
        "models are Llama-family architectures built in; no remote code",
    ),
    (
        "actor_rollout_ref.model.enable_gradient_checkpointing",
        MEMORY,
    ),
    ("actor_rollout_ref.actor.strategy", DIST),
    ("actor_rollout_ref.actor.fsdp_config", DIST),
    ("actor_rollout_ref.actor.use_dynamic_bsz", MEMORY),
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", MEMORY),
    (
        "actor_rollout_ref.actor.entropy_coeff",
        "no entropy bonus (0 in both reference systems)",
    ),
    ("actor_rollout_ref.rollout.name", ROLLOUT),
    (
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
        MEMORY,
    ),
    (
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
        MEMORY,
    ),
    (
        "actor_rollout_ref.rollout.tensor_model_parallel_size",
        ROLLOUT,
    ),
    ("actor_rollout_ref.rollout.disable_radix_cache", ROLLOUT),
    ("actor_rollout_ref.rollout.gpu_memory_utilization", MEMORY),
    ("actor_rollout_ref.rollout.do_sample", SAMPLING),
    (
        "actor_rollout_ref.rollout.calculate_log_probs",
        "log-probs of the samples are always computed",
    ),
    (
        "actor_rollout_ref.ref",
        "the frozen SFT actor is kept exactly when `grpo.use_kl_loss` is on",
    ),
    (
        "critic.enable",
        "the critic always gives the reward; `trainer.train_mode` decides whether it trains",
    ),
    ("critic.strategy", DIST),
    (
        "critic.ppo_micro_batch_size_per_gpu",
        "`data.micro_batch_size_per_gpu` serves both models",
    ),
    ("critic.ppo_max_token_len_per_gpu", MEMORY),
    ("critic.forward_max_token_len_per_gpu", MEMORY),
    ("critic.use_dynamic_bsz", MEMORY),
    ("critic.optim.weight_decay", SHARED_OPTIM),
    ("critic.optim.lr_warmup_steps", SHARED_OPTIM),
    ("critic.model.use_shm", FILES),
    (
        "critic.model.trust_remote_code",
        "models are Llama-family architectures built in; no remote code",
    ),
    ("critic.model.enable_gradient_checkpointing", MEMORY),
    ("critic.model.fsdp_config", DIST),
    (
        "algorithm.use_kl_in_reward",
        "the KL term is a loss (`grpo.use_kl_loss`), never part of the reward",
    ),
    (
        "algorithm.kl_ctrl",
        "the KL term is a loss with the fixed `grpo.kl_coef`",
    ),
    ("grpo.group_normalize_advantages", UNREAD),
    ("grpo.critic_supervised_weight", UNREAD),
    (
        "grpo.critic_learning_rate",
        "verl does not read it either; see `optim.critic_lr`",
    ),
    (
        "grpo.critic_train_epochs",
        "verl does not read it either; GRPO trains the critic once per rollout",
    ),
    (
        "grpo.actor_learning_rate",
        "verl does not read it either; see `optim.lr`",
    ),
    (
        "grpo.ppo_clip_ratio",
        "verl does not read it either; see `grpo.clip_ratio_low` / `clip_ratio_high`",
    ),
    ("nla.injection_position", UNREAD),
    ("nla.injection_mode", UNREAD),
    ("nla.injection_layer_indices", UNREAD),
    (
        "nla.injection.position",
        "the marker text must be in the prompt (verl's `manual`)",
    ),
    (
        "nla_eval",
        "string-match evaluation is not part of training here",
    ),
    (
        "reward_model",
        "the reward is the critic's reconstruction error",
    ),
    ("ray_kwargs", RAY),
    ("engine_kwargs", ROLLOUT),
];
