//! The NLA commands: `train`, `generate`, `reconstruct`, `eval`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use nla_engine::config::{Algo, DeviceKind, Part, Precision, RunConfig};
use nla_engine::data::{DatasetReader, Mode, Sample};
use nla_engine::device::select::{self, AnyDevice};
use nla_engine::device::Device;
use nla_engine::nla::{CriticExample, Outcome};
use nla_engine::train::metrics::{fidelity, mean_vector, FidelityOpts, Record};
use nla_engine::train::nla::{ActorTrainer, CriticTrainer};
use nla_engine::train::run::{self, explain, sample_spec, Parts};
use nla_engine::train::setup;
use nla_engine::with_device;

/// Where the models and the config come from.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A checkpoint folder written by `train` (step-NNNNNNNN): its actor/, critic/ and
    /// config.yaml
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// A run config [default: the checkpoint's config.yaml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set generation.temperature=0.7 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// cpu, cuda, cuda:N, auto (the GPU when there is one) or emu (the CUDA kernels on the CPU
    /// emulator: slow)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Working dtype of weights' copy, activations and logits: auto (bf16 on a GPU, f32 on the
    /// CPU), bf16 or f32
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
}

/// Opens the device `--device` names in working dtype `precision` (see [`select::open_with`])
/// and says which it is.
pub fn open_device(kind: &str, precision: Precision) -> Result<AnyDevice> {
    let dev = select::open_with(kind, precision.dtype())?;
    eprintln!("device: {}", dev.name());
    Ok(dev)
}

fn config_device(cfg: &RunConfig) -> Result<AnyDevice> {
    open_device(
        match cfg.trainer.device {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Auto => "auto",
        },
        cfg.trainer.precision,
    )
}

impl ModelArgs {
    fn load(&self) -> Result<RunConfig> {
        let path = match (&self.config, &self.checkpoint) {
            (Some(c), _) => c.clone(),
            (None, Some(ck)) => ck.join("config.yaml"),
            (None, None) => bail!("give --checkpoint (a folder written by `train`) or --config"),
        };
        if let Some(ck) = &self.checkpoint {
            if !ck.is_dir() {
                bail!("--checkpoint {}: no such folder", ck.display());
            }
        }
        Ok(RunConfig::from_file(&path, &self.set)?)
    }

    fn actor_path(&self, cfg: &RunConfig) -> Result<PathBuf> {
        match &self.checkpoint {
            Some(c) if c.join("actor").is_dir() => Ok(c.join("actor")),
            Some(c) => bail!("{} has no actor/ folder", c.display()),
            None => Ok(setup::model_path(
                cfg,
                "model.model_name",
                &cfg.model.model_name,
            )?),
        }
    }

    fn critic_path(&self, cfg: &RunConfig) -> Result<PathBuf> {
        match &self.checkpoint {
            Some(c) if c.join("critic").is_dir() => Ok(c.join("critic")),
            Some(c) => bail!("{} has no critic/ folder", c.display()),
            None => Ok(setup::model_path(
                cfg,
                "model.critic.model_name",
                cfg.critic_model_name(),
            )?),
        }
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run config (YAML; see configs/)
    #[arg(long)]
    pub config: PathBuf,
    /// Override trainer.train_mode
    #[arg(long, value_parser = ["actor", "critic", "both"])]
    pub train_mode: Option<String>,
    /// Override trainer.algo
    #[arg(long, value_parser = ["sft", "grpo", "ppo"])]
    pub algo: Option<String>,
    /// Continue from the latest checkpoint in trainer.save_dir
    #[arg(long)]
    pub resume: bool,
    /// Override a config key, e.g. --set optim.lr=1e-5 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Plain progress lines instead of a bar
    #[arg(long)]
    pub no_bar: bool,
    /// cpu, cuda, cuda:N, auto or emu [default: trainer.device]
    #[arg(long)]
    pub device: Option<String>,
}

pub fn train_cmd(args: &TrainArgs) -> Result<()> {
    let mut sets = args.set.clone();
    if let Some(m) = &args.train_mode {
        sets.push(format!("trainer.train_mode={m}"));
    }
    if let Some(a) = &args.algo {
        sets.push(format!("trainer.algo={a}"));
    }
    if args.resume {
        sets.push("trainer.resume=true".into());
    }
    if let Some(d) = &args.device {
        sets.push(format!("trainer.device={d}"));
    }
    let cfg = RunConfig::from_file(&args.config, &sets)?;
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    let dev = config_device(&cfg)?;
    with_device!(&dev, d => train_on(d, args, &cfg))
}

fn train_on<D: Device>(dev: &D, args: &TrainArgs, cfg: &RunConfig) -> Result<()> {
    let what = match cfg.trainer.algo {
        Algo::Sft => "SFT",
        Algo::Grpo => "GRPO",
        Algo::Ppo => "PPO",
    };
    let parts = match cfg.trainer.train_mode {
        Part::Actor => "actor",
        Part::Critic => "critic",
        Part::Both => "actor and critic",
    };
    eprintln!(
        "train: {what} of the {parts}, {} steps, into {} ({})",
        cfg.trainer.total_training_steps,
        cfg.trainer.save_dir.display(),
        dev.name()
    );
    let s = run::train(dev, cfg, args.no_bar.then_some(false))?;
    print_summary(&s);
    Ok(())
}

pub fn print_summary(s: &run::RunSummary) {
    if let Some(r) = &s.last_train {
        println!("step {} train: {}", s.steps, line(r));
    }
    if let Some(r) = &s.last_val {
        println!("step {} val: {}", s.steps, line(r));
    }
    println!("metrics: {}", s.metrics.display());
    if let Some(c) = &s.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
}

fn line(r: &Record) -> String {
    r.iter()
        .filter(|(k, _)| !k.starts_with("time_"))
        .map(|(k, v)| format!("{k} {}", nla_engine::train::progress::format_value(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first `rows` samples of a parquet file, read with the config's column names.
fn read_rows(
    cfg: &RunConfig,
    data: &Path,
    rows: usize,
    a: usize,
    mode: Mode,
    response: bool,
) -> Result<Vec<Sample>> {
    let mut c = cfg.clone();
    c.data.train_dataset.parquet_files = vec![data.to_path_buf()];
    c.data.train_dataset.shuffle = false;
    let spec = setup::dataset_spec(&c, "train_dataset", mode, a, response)?;
    let rows: Vec<Sample> = DatasetReader::open(spec)?
        .take(rows)
        .collect::<nla_engine::Result<_>>()?;
    if rows.is_empty() {
        bail!("{}: no rows", data.display());
    }
    Ok(rows)
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Parquet file with `prompt` (holding the marker) and `activation_vector` columns
    #[arg(long)]
    pub data: PathBuf,
    /// Rows to explain (from the first)
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    /// Explanations per row
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature (0 = greedy) [default: generation.temperature]
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Also write the explanations as JSON lines here
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn generate_cmd(args: &GenerateArgs) -> Result<()> {
    let mut cfg = args.model.load()?;
    if let Some(t) = args.temperature {
        cfg.generation.temperature = t;
    }
    let dev = open_device(&args.model.device, args.model.precision)?;
    with_device!(&dev, d => generate_on(d, args, &cfg))
}

fn generate_on<D: Device>(dev: &D, args: &GenerateArgs, cfg: &RunConfig) -> Result<()> {
    let path = args.model.actor_path(cfg)?;
    let (side, mut actor) = setup::load_actor(dev, cfg, &path)?;
    actor.model.freeze(dev)?; // generation only: no gradients
    let rows = read_rows(cfg, &args.data, args.rows, actor.spec.a, Mode::Actor, false)?;
    let enc = setup::actor_encoder(cfg, &side)?;
    let mut prompts = vec![];
    for r in &rows {
        match enc.prompt(r)? {
            Outcome::Example(p) => prompts.push(p),
            Outcome::Skipped(s) => bail!("row {}: {s:?}", r.source.row),
        }
    }
    let greedy = cfg.generation.temperature == 0.0;
    let expl = explain(
        dev,
        cfg,
        &side,
        &actor,
        None,
        &prompts,
        args.samples.max(1),
        sample_spec(cfg, greedy),
        cfg.trainer.seed,
    )?;
    let mut out = match &args.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    for e in &expl {
        let r = &rows[e.prompt];
        println!("row {} ({:?}): {}", r.source.row, e.stop, e.text.trim());
        if let Some(w) = out.as_mut() {
            let j = serde_json::json!({
                "row": r.source.row, "explanation": e.text, "stop": format!("{:?}", e.stop),
                "tokens": e.tokens.len(),
            });
            writeln!(w, "{j}")?;
        }
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ReconstructArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An explanation to reconstruct a vector from
    #[arg(long)]
    pub text: Option<String>,
    /// Parquet file: its vectors are compared with the reconstruction (and without --text, its
    /// responses are the explanations)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Rows of --data (from the first)
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    /// Write the reconstructed vectors as JSON lines here
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn reconstruct_cmd(args: &ReconstructArgs) -> Result<()> {
    let cfg = args.model.load()?;
    let dev = open_device(&args.model.device, args.model.precision)?;
    with_device!(&dev, d => reconstruct_on(d, args, &cfg))
}

fn reconstruct_on<D: Device>(dev: &D, args: &ReconstructArgs, cfg: &RunConfig) -> Result<()> {
    let path = args.model.critic_path(cfg)?;
    let (side, mut critic) = setup::load_critic(dev, cfg, &path, None)?;
    critic.model.freeze(dev)?; // forward only: no gradients
    let a = critic.spec.a;
    let enc = setup::critic_encoder(cfg, &side);
    let rows = match &args.data {
        Some(d) => read_rows(cfg, d, args.rows, a, Mode::Critic, args.text.is_none())?,
        None => vec![],
    };
    let mut examples = vec![];
    let texts: Vec<String> = match (&args.text, rows.is_empty()) {
        (Some(t), true) => vec![t.clone()],
        (Some(t), false) => vec![t.clone(); rows.len()],
        (None, false) => rows
            .iter()
            .map(|r| r.response.clone().unwrap_or_default())
            .collect(),
        (None, true) => bail!("give --text, --data, or both"),
    };
    for (i, t) in texts.iter().enumerate() {
        let mut ids = match enc.text_ids(t, None)? {
            Outcome::Example(ids) => ids,
            Outcome::Skipped(s) => bail!("text {i}: {s:?}"),
        };
        ids.extend(side.cls_id.iter());
        let target = rows.get(i).map_or(vec![0.0; a], |r| r.vectors[0].clone());
        examples.push(CriticExample { ids, target });
    }
    let mut t = CriticTrainer::new(
        dev,
        critic,
        Default::default(),
        nla_engine::train::LrSchedule::constant(0.0),
        0.0,
        side.mse_scale,
    )?;
    let pass = t.pass(dev, &examples, None, 16, side.pad_id, false, 1)?;
    let mut out = match &args.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    for (i, ex) in examples.iter().enumerate() {
        let p = &pass.pred[i * a..(i + 1) * a];
        let norm = p.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        if rows.is_empty() {
            println!("text {i}: |vector| {norm:.4}");
        } else {
            let f = fidelity(
                p,
                &ex.target,
                a,
                FidelityOpts {
                    scale: side.mse_scale,
                    baseline_mean: None,
                },
            )?;
            println!(
                "row {}: mse {:.5} cosine {:.4} |vector| {norm:.4}",
                rows[i].source.row, f.mse, f.cosine
            );
        }
        if let Some(w) = out.as_mut() {
            writeln!(w, "{}", serde_json::json!({ "index": i, "vector": p }))?;
        }
    }
    if !rows.is_empty() {
        let target: Vec<f32> = examples
            .iter()
            .flat_map(|e| e.target.iter().copied())
            .collect();
        let base = mean_vector(&target, a, side.mse_scale)?;
        let f = fidelity(
            &pass.pred,
            &target,
            a,
            FidelityOpts {
                scale: side.mse_scale,
                baseline_mean: Some(&base),
            },
        )?;
        println!(
            "{} rows: mse {:.5} cosine {:.4} fve {:.4} (baseline: these rows' mean)",
            f.samples, f.mse, f.cosine, f.fve
        );
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Parquet file to evaluate on (prompt, response, activation_vector)
    #[arg(long)]
    pub data: PathBuf,
    /// Rows (from the first)
    #[arg(long, default_value_t = 256)]
    pub rows: usize,
}

/// Fidelity of actor + critic on a dataset: the validation of `train` on these rows.
pub fn eval_cmd(args: &EvalArgs) -> Result<()> {
    let rec = eval_record(&args.model, &args.data, args.rows)?;
    for (k, v) in rec.iter() {
        println!("{k:<20} {}", nla_engine::train::progress::format_value(v));
    }
    Ok(())
}

/// The validation record of the models of `m` on the first `rows` rows of `data`.
pub fn eval_record(m: &ModelArgs, data: &Path, rows: usize) -> Result<Record> {
    let cfg = m.load()?;
    let dev = open_device(&m.device, m.precision)?;
    with_device!(&dev, d => eval_on(d, m, cfg, data, rows))
}

fn eval_on<D: Device>(
    dev: &D,
    m: &ModelArgs,
    mut cfg: RunConfig,
    data: &Path,
    rows: usize,
) -> Result<Record> {
    let mut vd = cfg
        .data
        .val_dataset
        .clone()
        .unwrap_or_else(|| cfg.data.train_dataset.clone());
    vd.parquet_files = vec![data.to_path_buf()];
    vd.shuffle = false;
    cfg.data.val_dataset = Some(vd);
    cfg.data.val_batch_size = rows;
    let (aside, mut actor) = setup::load_actor(dev, &cfg, &m.actor_path(&cfg)?)?;
    let a = actor.spec.a;
    let (cside, mut critic) = setup::load_critic(dev, &cfg, &m.critic_path(&cfg)?, Some(a))?;
    // evaluation runs forward only: no gradients
    actor.model.freeze(dev)?;
    critic.model.freeze(dev)?;
    let sched = nla_engine::train::LrSchedule::constant(0.0);
    let mut parts = Parts {
        actor: Some((
            aside,
            ActorTrainer::new(dev, actor, Default::default(), sched, 0.0)?,
        )),
        critic: Some(
            CriticTrainer::new(dev, critic, Default::default(), sched, 0.0, cside.mse_scale)
                .map(|t| (cside, t))?,
        ),
    };
    let mse_scale = parts.critic.as_ref().and_then(|(s, _)| s.mse_scale);
    let samples = read_rows(&cfg, data, rows, a, Mode::Critic, false)?;
    let flat: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.vectors.iter().flatten().copied())
        .collect();
    let base = mean_vector(&flat, a, mse_scale)?;
    Ok(run::validate(dev, &cfg, &mut parts, a, &base)?)
}
