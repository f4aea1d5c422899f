//! `nla-engine plan`: the memory plan of a run config's step on a GPU count, and whether it fits.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use nla_engine::config::{DeviceKind, Precision, RunConfig};
use nla_engine::memory::{
    check_fits, gib, parse_size, report, DtypePolicy, Recompute, RunShape, StepOptions,
};
use nla_engine::model::{load_config, ModelConfig};

/// What the forward keeps for backward.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecomputeArg {
    /// Every activation of every block
    None,
    /// Only each block's input; blocks run again before their backward
    Block,
}

#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    /// The run config (YAML)
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. --set data.micro_batch_size_per_gpu=4 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Data-parallel GPUs (one process each)
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Memory of one GPU, e.g. 80GiB, 80GB (decimal), 81920MiB
    #[arg(long, default_value = "80GiB")]
    pub gpu_memory: String,
    /// ZeRO stage with --gpus > 1: 1 shards the optimizer state and master weights, 2 also
    /// the gradients, 3 also the weights
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=3))]
    pub zero_stage: u8,
    /// Activation recompute
    #[arg(long, value_enum, default_value_t = RecomputeArg::None)]
    pub recompute: RecomputeArg,
    /// Vocabulary entries per chunk of the LM head and cross-entropy (0 = whole logits)
    /// [default: the config's trainer.logits_chunk]
    #[arg(long)]
    pub logits_chunk: Option<usize>,
    /// Element types: f32 everywhere (the CPU engine), or bf16 weights, activations and logits
    /// with f32 master weights, gradients and AdamW state; auto = f32 when trainer.device is
    /// cpu, else bf16 [default: trainer.precision]
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// The actor's config.json, instead of model.model_name's (for a model not on disk); also
    /// the critic's unless --critic-model-config or model.critic.model_name says otherwise
    #[arg(long, value_name = "FILE.json")]
    pub model_config: Option<PathBuf>,
    /// The critic backbone's config.json, instead of model.critic.model_name's
    #[arg(long, value_name = "FILE.json")]
    pub critic_model_config: Option<PathBuf>,
    /// Also list every buffer: arena, offset, size, dtype x elements, lifetime
    #[arg(long)]
    pub buffers: bool,
}

/// A model's architecture from a config.json file, an HF model folder or a .gguf file (no
/// weights are read).
fn read_model_config(path: &Path, what: &str) -> Result<ModelConfig> {
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        return Ok(ModelConfig::from_file(path)?);
    }
    if !path.exists() {
        bail!(
            "{what} {}: no such model folder, .gguf or config.json file (give its config.json \
             with --model-config / --critic-model-config)",
            path.display()
        );
    }
    load_config(path).with_context(|| format!("reading the {what}'s config"))
}

pub fn plan_cmd(args: &PlanArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&args.config, &args.set)?;
    for w in cfg.warnings() {
        eprintln!("{w}");
    }
    let budget = parse_size(&args.gpu_memory).context("--gpu-memory")?;
    if args.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    let (actor, actor_src) = match &args.model_config {
        Some(p) => (read_model_config(p, "actor")?, p.display().to_string()),
        None => {
            let p = PathBuf::from(&cfg.model.model_name);
            (
                read_model_config(&p, "model.model_name")?,
                cfg.model.model_name.clone(),
            )
        }
    };
    let (critic, critic_src) = match (&args.critic_model_config, &cfg.model.critic.model_name) {
        (Some(p), _) => (read_model_config(p, "critic")?, p.display().to_string()),
        (None, Some(name)) if *name != cfg.model.model_name => (
            read_model_config(Path::new(name), "model.critic.model_name")?,
            name.clone(),
        ),
        _ => (actor.clone(), actor_src.clone()),
    };
    let shape = RunShape::from_config(&cfg, actor, critic)?;
    let policy = match args.precision.unwrap_or(cfg.trainer.precision) {
        Precision::F32 => DtypePolicy::cpu(),
        Precision::Bf16 => DtypePolicy::cuda(),
        Precision::Auto if cfg.trainer.device == DeviceKind::Cpu => DtypePolicy::cpu(),
        Precision::Auto => DtypePolicy::cuda(),
    };
    let opts = StepOptions {
        policy,
        recompute: match args.recompute {
            RecomputeArg::None => Recompute::None,
            RecomputeArg::Block => Recompute::Block,
        },
        gpus: args.gpus,
        zero_stage: args.zero_stage,
        logits_chunk: match args.logits_chunk {
            Some(0) => None,
            Some(c) => Some(c),
            None => cfg.trainer.logits_chunk,
        },
    };
    let plan = shape.plan(&opts)?;
    let without = shape.plan_without_reuse(&opts)?.plan.peak;
    println!("config      {}", args.config.display());
    println!("actor       {actor_src}");
    println!("critic      {critic_src}");
    print!("{}", report(&shape, &opts, &plan, Some(without)));
    if args.buffers {
        println!("buffers     arena, offset, size, dtype x elements, ops [first, last]");
        let p = &plan.plan;
        for (d, pl) in p.decls.iter().zip(&p.placements) {
            println!(
                "  {:<11} {:>16} {:>12}  {} x {:<12} [{}, {}]  {}",
                d.arena.name(),
                pl.offset,
                gib(pl.size),
                d.dtype,
                d.elements,
                d.first,
                d.last,
                d.name
            );
        }
    }
    let line = check_fits(&shape, &opts, &plan, budget as usize)?;
    println!("{line}");
    Ok(())
}
