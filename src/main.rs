//! The `nla-engine` command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use nla_engine::device::{Device, Dtype, View};
use nla_engine::model::{
    backward, forward, is_gguf, load_config, load_model, safetensors_io, ActivationSet, Batch,
    ParamTable,
};

mod cmd;

#[derive(Parser)]
#[command(
    name = "nla-engine",
    version,
    about = "Train Natural Language Autoencoders: an actor LM that explains activation vectors and a critic LM that reconstructs them"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a model's architecture, parameter count and memory needs
    Info {
        /// HF model folder (config.json + model.safetensors or a sharded index) or a .gguf file
        #[arg(long)]
        model: PathBuf,
        /// Batch size to plan training memory for
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Sequence length to plan training memory for
        #[arg(long, default_value_t = 512)]
        seq: usize,
    },
    /// Run the model on token ids; dump logits, the causal-LM loss and optionally every gradient
    Forward {
        /// HF model folder (config.json + model.safetensors or a sharded index) or a .gguf file
        #[arg(long)]
        model: PathBuf,
        /// JSON array of B equal-length arrays of token ids
        #[arg(long)]
        ids: PathBuf,
        /// Output safetensors: `logits` [B,T,V], `loss` [] and with --grads `grad.<name>`
        #[arg(long)]
        dump: PathBuf,
        /// Also write the gradient of the loss for every parameter
        #[arg(long)]
        grads: bool,
        /// cpu, cuda, cuda:N, auto or emu
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The whole NLA pipeline on the CPU in minutes: a small subject model, a dataset extracted
    /// from the shipped texts, SFT of actor and critic, GRPO, fidelity before and after
    Demo(cmd::demo::DemoArgs),
    /// Time the training step (tokens/s, MFU) and the rollout (tokens/s, fraction of the
    /// weight-streaming bound) on a device
    Bench(cmd::bench::BenchArgs),
    /// What this build and machine can run on (CPU, the CUDA emulator, GPUs)
    Devices,
    /// Build an NLA dataset: a subject model's residual stream at token positions of texts
    Extract(cmd::demo::ExtractArgs),
    /// Train an NLA actor and/or critic: SFT, GRPO or PPO, as a run config says
    Train(cmd::nla::TrainArgs),
    /// Explain activation vectors: the actor writes text for each vector of a parquet file
    Generate(cmd::nla::GenerateArgs),
    /// Reconstruct vectors from explanations with the critic, and compare with given vectors
    Reconstruct(cmd::nla::ReconstructArgs),
    /// Fidelity (MSE, cosine, FVE) of actor + critic, and the critic alone, on a dataset
    Eval(cmd::nla::EvalArgs),
    /// The memory plan of a run: each arena and the peak per device, and whether it fits
    Plan(cmd::plan::PlanArgs),
    /// Draw training curves from a metrics file into a PNG: one panel per metric, train and val
    /// as two series against the step
    Plot {
        /// The JSON-lines metrics file a training run wrote
        input: PathBuf,
        /// Output PNG [default: the input's path with the extension .png]
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Comma-separated metrics to draw, e.g. loss,fve [default: every metric in the file]
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Info { model, batch, seq } => info(&model, batch, seq),
        Cmd::Forward {
            model,
            ids,
            dump,
            grads,
            device,
        } => nla_engine::device::select::open(&device)
            .map_err(anyhow::Error::from)
            .and_then(|dev| {
                nla_engine::with_device!(&dev, d => forward_cmd(d, &model, &ids, &dump, grads))
            }),
        Cmd::Demo(a) => cmd::demo::demo_cmd(&a),
        Cmd::Bench(a) => cmd::bench::bench_cmd(&a),
        Cmd::Devices => cmd::bench::devices_cmd(),
        Cmd::Extract(a) => cmd::demo::extract_cmd(&a),
        Cmd::Train(a) => cmd::nla::train_cmd(&a),
        Cmd::Generate(a) => cmd::nla::generate_cmd(&a),
        Cmd::Reconstruct(a) => cmd::nla::reconstruct_cmd(&a),
        Cmd::Eval(a) => cmd::nla::eval_cmd(&a),
        Cmd::Plan(a) => cmd::plan::plan_cmd(&a),
        Cmd::Plot {
            input,
            out,
            metrics,
        } => plot_cmd(&input, out, &metrics),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn plot_cmd(input: &Path, out: Option<PathBuf>, metrics: &[String]) -> Result<()> {
    let out = out.unwrap_or_else(|| input.with_extension("png"));
    if out == input {
        bail!("the output {} would replace the input", out.display());
    }
    let s = nla_engine::plot::plot_file(input, &out, Some(metrics))?;
    println!(
        "wrote {} ({}x{}): {} from {} lines ({}){}",
        out.display(),
        s.width,
        s.height,
        s.panels.join(", "),
        s.rows,
        s.splits.join(", "),
        if s.skipped > 0 {
            format!("; skipped {} malformed lines", s.skipped)
        } else {
            String::new()
        }
    );
    Ok(())
}

fn gib(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn info(dir: &Path, batch: usize, seq: usize) -> Result<()> {
    let cfg = load_config(dir)?;
    let table = ParamTable::for_config(&cfg);
    let p = table.total;
    println!("model        {}", dir.display());
    let source = if is_gguf(dir) {
        "GGUF file".to_string()
    } else {
        format!(
            "{} safetensors file(s)",
            safetensors_io::weight_files(dir)?.len()
        )
    };
    println!("architecture {} (weights in {source})", cfg.model_type);
    println!("layers       {}", cfg.num_hidden_layers);
    println!("d_model      {}", cfg.hidden_size);
    println!("ffn          {}", cfg.intermediate_size);
    println!(
        "heads        {} query, {} key/value, head size {}",
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    );
    println!("vocab        {}", cfg.vocab_size);
    println!("rope_theta   {}", cfg.rope_theta);
    println!("rms_norm_eps {}", cfg.rms_norm_eps);
    println!("tied embed   {}", cfg.tie_word_embeddings);
    println!("parameters   {p} ({:.2} M)", p as f64 / 1e6);
    println!(
        "memory (f32) weights {}, + grads {}, + AdamW state {}",
        gib(p * 4),
        gib(p * 4),
        gib(p * 8)
    );
    let acts = ActivationSet::plan(&cfg, batch, seq).bytes_unshared(Dtype::F32);
    println!(
        "training at batch {batch} x {seq}: activations {}, total {}",
        gib(acts),
        gib(p * 16 + acts)
    );
    Ok(())
}

fn read_ids(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of arrays of token ids",
            path.display()
        )
    })?;
    Ok(rows)
}

fn forward_cmd<D: Device>(dev: &D, dir: &Path, ids: &Path, dump: &Path, grads: bool) -> Result<()> {
    let (mut model, _) = load_model(dev, dir)?;
    let batch = Batch::causal_lm(&read_ids(ids)?).with_context(|| format!("{}", ids.display()))?;
    batch
        .check_vocab(model.cfg.vocab_size)
        .with_context(|| format!("{}", ids.display()))?;
    let (b, t, v) = (batch.b, batch.t, model.cfg.vocab_size);
    let mut acts = ActivationSet::new(dev, &model.cfg, b, t)?;
    let db = batch.upload(dev)?;
    let loss = forward(dev, &model, &mut acts, &db)?;
    let logits = dev.download(View::all(&acts.logits))?;
    let loss_v = [loss.mean() as f32];
    let mut out: Vec<(String, Vec<usize>, &[f32])> = vec![
        ("logits".into(), vec![b, t, v], &logits),
        ("loss".into(), vec![], &loss_v),
    ];
    let host_grads;
    if grads {
        backward(dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32)?;
        host_grads = model.grads_to_host(dev)?;
        for e in &model.table.entries {
            out.push((
                format!("grad.{}", e.name),
                e.shape.clone(),
                &host_grads[e.offset..e.offset + e.len],
            ));
        }
    }
    safetensors_io::write_tensors(dump, &out)?;
    println!(
        "loss {:.6} over {} positions; wrote {} tensors to {} ({})",
        loss.mean(),
        loss.count,
        out.len(),
        dump.display(),
        dev.name()
    );
    Ok(())
}
