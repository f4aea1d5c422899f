//! The `nla-engine` command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, View};
use nla_engine::model::{
    backward, forward, is_gguf, load_config, load_model, safetensors_io, ActivationSet, Batch,
    Model, ModelConfig, ParamTable,
};
use nla_engine::train::{AdamwConfig, LmTrainer, LrSchedule, ScheduleKind};

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
    },
    /// Train a tiny byte-level Llama from scratch on a built-in text and show it learning
    Demo {
        /// Optimizer steps
        #[arg(long, default_value_t = 300)]
        steps: u64,
        /// Where to write the trained model (HF format); nothing is written if absent
        #[arg(long)]
        out: Option<PathBuf>,
        /// Random seed for the weights and batches
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
        } => forward_cmd(&model, &ids, &dump, grads),
        Cmd::Demo { steps, out, seed } => demo(steps, out.as_deref(), seed),
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
    let acts = ActivationSet::plan(&cfg, batch, seq).elements;
    println!(
        "training at batch {batch} x {seq}: activations {}, total {}",
        gib(acts * 4),
        gib(p * 16 + acts * 4)
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

fn forward_cmd(dir: &Path, ids: &Path, dump: &Path, grads: bool) -> Result<()> {
    let dev = CpuDevice::new();
    let (mut model, _) = load_model(&dev, dir)?;
    let batch = Batch::causal_lm(&read_ids(ids)?).with_context(|| format!("{}", ids.display()))?;
    batch
        .check_vocab(model.cfg.vocab_size)
        .with_context(|| format!("{}", ids.display()))?;
    let (b, t, v) = (batch.b, batch.t, model.cfg.vocab_size);
    let mut acts = ActivationSet::new(&dev, &model.cfg, b, t)?;
    let db = batch.upload(&dev)?;
    let loss = forward(&dev, &model, &mut acts, &db)?;
    let logits = dev.download(View::all(&acts.logits))?;
    let loss_v = [loss.mean() as f32];
    let mut out: Vec<(String, Vec<usize>, &[f32])> = vec![
        ("logits".into(), vec![b, t, v], &logits),
        ("loss".into(), vec![], &loss_v),
    ];
    let host_grads;
    if grads {
        backward(&dev, &mut model, &mut acts, &db, (1.0 / loss.count) as f32)?;
        host_grads = model.grads_to_host(&dev)?;
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
        "loss {:.6} over {} positions; wrote {} tensors to {}",
        loss.mean(),
        loss.count,
        out.len(),
        dump.display()
    );
    Ok(())
}

const DEMO_TEXT: &str = include_str!("../data/demo.txt");

/// A small byte-level Llama (vocab 256).
fn demo_config() -> Result<ModelConfig> {
    let json = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true,
    });
    Ok(ModelConfig::from_json(&json, Path::new("<demo config>"))?)
}

fn demo(steps: u64, out: Option<&Path>, seed: u64) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let dev = CpuDevice::new();
    let cfg = demo_config()?;
    let model = Model::init_random(&dev, cfg, seed, 0.02)?;
    let text = DEMO_TEXT.as_bytes();
    let (b, t) = (8usize, 128usize);
    println!(
        "demo: byte-level Llama, {} parameters, {} layers, d_model {}; {} bytes of text; batch {b} x {t}; {} on {}",
        model.num_params(),
        model.cfg.num_hidden_layers,
        model.cfg.hidden_size,
        text.len(),
        steps,
        dev.name()
    );
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 20.min(steps),
        total_steps: steps,
    };
    let adamw = AdamwConfig {
        beta2: 0.95,
        weight_decay: 0.1,
        ..AdamwConfig::default()
    };
    let mut trainer = LmTrainer::new(&dev, model, adamw, schedule, 1.0)?;
    let mut rng_state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut first = None;
    for step in 1..=steps {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                rng_state = rng_state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (rng_state >> 33) as usize % (text.len() - t);
                text[at..at + t].iter().map(|&c| c as u32).collect()
            })
            .collect();
        let stats = trainer.step(&dev, &[Batch::causal_lm(&rows)?])?;
        tokens += stats.tokens;
        first.get_or_insert(stats.loss);
        if step == 1 || step % 25 == 0 || step == steps {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "step {step:>4}/{steps}  loss {:.4}  grad-norm {:.3}  lr {:.2e}  {:.0} tokens/s",
                stats.loss,
                stats.grad_norm,
                stats.lr,
                tokens as f64 / secs
            );
        }
    }
    let prompt = "A natural language autoencoder";
    let cont = greedy(&dev, &trainer.model, prompt.as_bytes(), 80)?;
    println!(
        "greedy continuation of {prompt:?}:\n  {prompt}{}",
        String::from_utf8_lossy(&cont)
    );
    if let Some(first) = first {
        println!(
            "loss went from {first:.3} to {:.3} (uniform guessing is ln 256 = 5.545)",
            trainer_last_loss(&dev, &trainer, text, t)?
        );
    }
    if let Some(dir) = out {
        trainer.model.save(&dev, dir)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

/// Mean loss of the model over the first window of the text.
fn trainer_last_loss<D: Device>(
    dev: &D,
    trainer: &LmTrainer<D>,
    text: &[u8],
    t: usize,
) -> Result<f64> {
    let row: Vec<u32> = text[..t].iter().map(|&c| c as u32).collect();
    let batch = Batch::causal_lm(&[row])?;
    let mut acts = ActivationSet::new(dev, &trainer.model.cfg, 1, t)?;
    Ok(forward(dev, &trainer.model, &mut acts, &batch.upload(dev)?)?.mean())
}

/// Greedy continuation by re-running the whole prefix (the demo's model is small; batched
/// generation with a KV cache belongs to the rollout engine).
fn greedy<D: Device>(dev: &D, model: &Model<D>, prompt: &[u8], n: usize) -> Result<Vec<u8>> {
    let mut ids: Vec<u32> = prompt.iter().map(|&c| c as u32).collect();
    let v = model.cfg.vocab_size;
    for _ in 0..n {
        let mut row = ids.clone();
        row.push(0);
        let t = row.len();
        let batch = Batch::causal_lm(&[row])?;
        let mut acts = ActivationSet::new(dev, &model.cfg, 1, t)?;
        forward(dev, model, &mut acts, &batch.upload(dev)?)?;
        let logits = dev.download(View::all(&acts.logits))?;
        let last = &logits[(t - 2) * v..(t - 1) * v];
        let next = last
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0;
        ids.push(next as u32);
    }
    Ok(ids[prompt.len()..].iter().map(|&c| c as u8).collect())
}
