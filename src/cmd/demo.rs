//! `extract` (texts -> NLA dataset) and `demo` (the whole NLA pipeline on the CPU in minutes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use nla_engine::config::RunConfig;
use nla_engine::data::write_nla_parquet;
use nla_engine::device::Device;
use nla_engine::model::{builtin, load_model};
use nla_engine::nla::extract::{extract, read_texts, split_rows, ExtractSpec};
use nla_engine::train::metrics::read_metrics;
use nla_engine::train::run;
use nla_engine::with_device;

use super::nla::open_device;
use nla_engine::config::Precision;

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The subject model: HF folder (with tokenizer.json) or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Texts, one per line (UTF-8)
    #[arg(long)]
    pub texts: PathBuf,
    /// Residual stream to read: 0 = the embedding output, i = after block i-1
    #[arg(long)]
    pub layer: usize,
    /// Output parquet (prompt, response, activation_vector, text_index, position, token, layer)
    #[arg(long)]
    pub out: PathBuf,
    /// Also write this fraction of the texts' rows to --val-out
    #[arg(long, default_value_t = 0.0)]
    pub val_fraction: f64,
    /// Validation parquet (with --val-fraction)
    #[arg(long)]
    pub val_out: Option<PathBuf>,
    /// Positions per text
    #[arg(long, default_value_t = 4)]
    pub per_text: usize,
    /// Earliest token position
    #[arg(long, default_value_t = 8)]
    pub min_pos: usize,
    /// Tokens of text before (and including) the position that make the response
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// The actor prompt of every row (holds <INJECT> once)
    #[arg(long, default_value = "Explain <INJECT>:")]
    pub prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn extract_cmd(args: &ExtractArgs) -> Result<()> {
    let dev = open_device(&args.device, Precision::Auto)?;
    with_device!(&dev, d => extract_on(d, args))
}

fn extract_on<D: Device>(dev: &D, args: &ExtractArgs) -> Result<()> {
    if args.val_fraction > 0.0 && args.val_out.is_none() {
        bail!("--val-fraction {} needs --val-out", args.val_fraction);
    }
    let texts = read_texts(&args.texts)?;
    let (model, tok) = load_model(dev, &args.model)?;
    let Some(tok) = tok else {
        bail!(
            "{}: no tokenizer.json next to the model",
            args.model.display()
        );
    };
    let spec = ExtractSpec {
        layer: args.layer,
        per_text: args.per_text,
        min_pos: args.min_pos,
        window: args.window,
        prompt: args.prompt.clone(),
        seed: args.seed,
        ..ExtractSpec::default()
    };
    let t0 = Instant::now();
    let ex = extract(dev, &model, &tok, &texts, &spec)?;
    let (train, val) = split_rows(ex.rows, args.val_fraction, args.seed)?;
    write_nla_parquet(&args.out, &train)?;
    if let Some(v) = &args.val_out {
        write_nla_parquet(v, &val)?;
        println!("wrote {} rows to {}", val.len(), v.display());
    }
    println!(
        "wrote {} rows to {} ({} texts used, {} too short, layer {}, A = {}, {:.1} s)",
        train.len(),
        args.out.display(),
        ex.texts_used,
        ex.skipped_short,
        args.layer,
        model.cfg.hidden_size,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its model, data, checkpoints and metrics
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Causal-LM steps that make the built-in subject model (cached in OUT/base)
    #[arg(long, default_value_t = 600)]
    pub pretrain_steps: u64,
    /// SFT steps [default: configs/demo.yaml]
    #[arg(long)]
    pub sft_steps: Option<u64>,
    /// GRPO steps after SFT
    #[arg(long, default_value_t = 20)]
    pub grpo_steps: u64,
    /// Positions (rows) drawn per text
    #[arg(long, default_value_t = 24)]
    pub per_text: usize,
    /// Tokens (bytes) of text ending at each position that make its explanation
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override a key of configs/demo.yaml for both stages (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Plain progress lines instead of bars
    #[arg(long)]
    pub no_bar: bool,
    /// cpu, cuda, cuda:N, auto or emu (the figures in the README are the CPU's)
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

const DEMO_YAML: &str = include_str!("../../configs/demo.yaml");

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// The demo: pretrain a tiny subject model, extract a dataset from the shipped texts, SFT the
/// actor and critic from the subject's weights, a few GRPO steps, fidelity before and after.
pub fn demo_cmd(args: &DemoArgs) -> Result<()> {
    let dev = open_device(&args.device, Precision::Auto)?;
    with_device!(&dev, d => demo_on(d, args))
}

fn demo_on<D: Device>(dev: &D, args: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = &args.out;
    let base = out.join("base");
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let tok = builtin::byte_tokenizer()?;
    let texts = builtin::demo_texts();

    println!(
        "== 1/4 subject model: a byte-level Llama (4 blocks, d_model 128) learns the demo texts"
    );
    let subject = if base.join("config.json").is_file() && base.join("model.safetensors").is_file()
    {
        println!("   using {} (delete it to train again)", base.display());
        load_model(dev, &base)?.0
    } else {
        let steps = args.pretrain_steps.max(1);
        let mut last = 0.0;
        let m = builtin::pretrain_demo(dev, &texts.join("\n"), steps, args.seed, &mut |s, l| {
            last = l;
            if s == 1 || s % 100 == 0 || s == steps {
                println!("   step {s:>4}/{steps}  loss {l:.3}");
            }
        })?;
        builtin::save_model_folder(dev, &m, &tok, &base)?;
        println!(
            "   loss {last:.3} (uniform: ln 258 = 5.55); saved {}",
            base.display()
        );
        m
    };

    println!("== 2/4 extract: the subject's residual stream after block 1 (layer 2) at {} positions of each text", args.per_text);
    let spec = ExtractSpec {
        seed: args.seed,
        window: args.window,
        per_text: args.per_text,
        ..ExtractSpec::default()
    };
    let ex = extract(dev, &subject, &tok, &texts, &spec)?;
    let (train, val) = split_rows(ex.rows, 0.1, args.seed)?;
    let (train_pq, val_pq) = (data.join("train.parquet"), data.join("val.parquet"));
    write_nla_parquet(&train_pq, &train)?;
    write_nla_parquet(&val_pq, &val)?;
    println!(
        "   {} train rows, {} val rows; a row: prompt {:?}, response {:?}",
        train.len(),
        val.len(),
        train[0].prompt,
        train[0].response
    );

    let sft_dir = out.join("sft");
    let mut sets = vec![
        format!("model.model_name={}", p(&base)),
        format!("data.train_dataset.parquet_files=[{}]", p(&train_pq)),
        format!("data.val_dataset.parquet_files=[{}]", p(&val_pq)),
        format!("trainer.save_dir={}", p(&sft_dir)),
        format!("trainer.seed={}", args.seed),
    ];
    if let Some(s) = args.sft_steps {
        sets.push(format!("trainer.total_training_steps={s}"));
    }
    sets.extend(args.set.iter().cloned());
    let cfg = RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets)?;
    println!(
        "== 3/4 SFT of actor and critic from the subject's weights ({} steps, batch {})",
        cfg.trainer.total_training_steps, cfg.data.train_batch_size
    );
    let bar = args.no_bar.then_some(false);
    let sft = run::train(dev, &cfg, bar)?;
    let Some(ckpt) = sft.last_checkpoint.clone() else {
        bail!("SFT wrote no checkpoint");
    };

    let grpo_dir = out.join("grpo");
    let mut rl = None;
    if args.grpo_steps > 0 {
        let mut sets = sets.clone();
        sets.extend([
            format!("model.model_name={}", p(&ckpt.join("actor"))),
            format!("model.critic.model_name={}", p(&ckpt.join("critic"))),
            format!("trainer.save_dir={}", p(&grpo_dir)),
            "trainer.algo=grpo".into(),
            format!("trainer.total_training_steps={}", args.grpo_steps),
            format!("trainer.val_steps={}", args.grpo_steps),
            format!("trainer.save_steps={}", args.grpo_steps),
            "trainer.logging_steps=1".into(),
            "optim.lr=3.0e-4".into(),
            "optim.critic_lr=1.0e-4".into(),
            "optim.warmup_steps=0".into(),
            "optim.lr_scheduler_type=constant".into(),
        ]);
        let cfg = RunConfig::from_yaml(DEMO_YAML, Path::new("configs/demo.yaml"), &sets)?;
        println!(
            "== 4/4 GRPO: {} steps, {} prompts x {} samples, reward = -MSE of the critic's reconstruction",
            args.grpo_steps, cfg.data.train_batch_size, cfg.grpo.n
        );
        rl = Some(run::train(dev, &cfg, bar)?);
    }

    // fidelity on the validation rows: before (step 0 of SFT), after SFT, after GRPO
    let log = read_metrics(&sft.metrics)?;
    let vals: Vec<_> = log.rows.iter().filter(|r| r.split == "val").collect();
    let n_val = sft
        .last_val
        .as_ref()
        .and_then(|r| r.get("samples"))
        .unwrap_or(0.0);
    println!("\nfidelity on {n_val} held-out vectors (the actor explains each vector, greedily; the critic");
    println!("reconstructs it from the explanation; FVE = 1 - MSE / MSE of predicting the mean):");
    println!(
        "   {:<14} {:>9} {:>9} {:>10} {:>11}",
        "stage", "nla_fve", "nla_cos", "critic_fve", "actor_loss"
    );
    let show = |name: &str, get: &dyn Fn(&str) -> Option<f64>| {
        let f = |k: &str| get(k).map_or("-".to_string(), |v| format!("{v:.3}"));
        println!(
            "   {:<14} {:>9} {:>9} {:>10} {:>11}",
            name,
            f("nla_fve"),
            f("nla_cosine"),
            f("critic_fve"),
            f("actor_loss")
        );
    };
    if let Some(first) = vals.first() {
        show("before SFT", &|k| first.get(k));
    }
    if let Some(r) = &sft.last_val {
        show("after SFT", &|k| r.get(k));
    }
    if let Some(r) = rl.as_ref().and_then(|s| s.last_val.as_ref()) {
        show("after GRPO", &|k| r.get(k));
    }
    println!(
        "\nmetrics: {} and {}; curves: nla-engine plot {}",
        sft.metrics.display(),
        rl.as_ref().map_or("-".into(), |s| p(&s.metrics)),
        sft.metrics.display()
    );
    println!("done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
