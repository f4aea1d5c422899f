//! `nla-engine bench`: the end-to-end SFT training step (tokens/s, MFU) and the rollout
//! (generated tokens/s, fraction of the weight-streaming bound) on any device; and
//! `nla-engine devices`: what this build and machine can run on.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use nla_engine::bench::{self, BenchOpts};
use nla_engine::device::{cuda, emu, kernels, Device, Dtype};
use nla_engine::model::{MemoryOptions, Recompute};
use nla_engine::with_device;

use super::nla::open_device;
use nla_engine::config::Precision;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// cpu, cuda, cuda:N, auto or emu
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Working dtype: auto (bf16 on a GPU, f32 on the CPU), bf16 or f32
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    /// small: the 5.25M-parameter model of benches/small_config.json, batch 4 x 128;
    /// llama-1b: a TinyLlama-1.1B-shaped model at batch 1 x 2048 (for GPUs)
    #[arg(long, default_value = "small", value_parser = ["small", "llama-1b"])]
    pub preset: String,
    /// Timed iterations of each part [default: the preset's]
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed iterations before [default: the preset's]
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Peak FLOP/s the MFU is taken against, in TFLOP/s [default on a GPU: the H100 SXM's
    /// 989 dense bf16, or 67 f32 with `--precision f32`; none on the CPU]
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Training step: run the LM head and cross-entropy over vocabulary chunks of this many
    /// entries (as `trainer.logits_chunk`) [default: whole logits]
    #[arg(long)]
    pub logits_chunk: Option<usize>,
    /// Training step: keep only each block's input and run the block again before its
    /// backward (as `trainer.recompute: block`)
    #[arg(long)]
    pub recompute: bool,
    /// Training step: rows per step [default: the preset's]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Training step: tokens per row [default: the preset's]
    #[arg(long)]
    pub seq: Option<usize>,
    /// Rollout: distinct prompts [default: the preset's]
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Rollout: samples per prompt; `--prompts 1 --samples 1` is batch-1 decode
    /// [default: the preset's]
    #[arg(long)]
    pub samples: Option<usize>,
    /// Rollout: tokens sampled per row [default: the preset's]
    #[arg(long)]
    pub new_tokens: Option<usize>,
    /// Only the training step, or only the rollout
    #[arg(long, value_parser = ["step", "rollout"])]
    pub only: Option<String>,
    /// Also write the reports as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// H100 SXM dense bf16 tensor-core rate, the usual MFU denominator.
const H100_BF16_TFLOPS: f64 = 989.0;
/// H100 SXM f32 rate on the SIMT cores (the f32 matmuls use no TF32): the denominator in f32.
const H100_F32_TFLOPS: f64 = 67.0;

pub fn bench_cmd(args: &BenchArgs) -> Result<()> {
    let dev = open_device(&args.device, args.precision)?;
    let gpu = matches!(dev, nla_engine::device::select::AnyDevice::Cuda(_));
    with_device!(&dev, d => {
        // the peak of the precision the step computes in
        let default_peak = match d.work_dtype() {
            Dtype::F32 => H100_F32_TFLOPS,
            _ => H100_BF16_TFLOPS,
        };
        let peak = args
            .peak_tflops
            .or(gpu.then_some(default_peak))
            .map(|t| t * 1e12);
        bench_on(d, args, peak, gpu)
    })
}

fn bench_on<D: Device>(dev: &D, args: &BenchArgs, peak: Option<f64>, gpu: bool) -> Result<()> {
    let mut o = match args.preset.as_str() {
        "llama-1b" => BenchOpts::llama_1b(),
        _ => BenchOpts::small(),
    };
    if let Some(i) = args.iters {
        o.iters = i;
    }
    if let Some(w) = args.warmup {
        o.warmup = w;
    }
    for (flag, value, field) in [
        ("--batch", args.batch, &mut o.batch),
        ("--seq", args.seq, &mut o.seq),
        ("--prompts", args.prompts, &mut o.rollout_prompts),
        ("--samples", args.samples, &mut o.rollout_samples),
        ("--new-tokens", args.new_tokens, &mut o.new_tokens),
    ] {
        if let Some(x) = value {
            if x == 0 {
                anyhow::bail!("{flag} must be at least 1");
            }
            *field = x;
        }
    }
    if args.logits_chunk == Some(0) {
        anyhow::bail!("--logits-chunk must be at least 1");
    }
    o.memory = MemoryOptions {
        logits_chunk: args.logits_chunk,
        recompute: if args.recompute {
            Recompute::Block
        } else {
            Recompute::None
        },
    };
    let sync = || dev.synchronize();
    let mut how = o
        .memory
        .logits_chunk
        .map_or(String::new(), |c| format!(", logits in chunks of {c}"));
    if args.recompute {
        how += ", block recompute";
    }
    println!("bench: {} on {}{how}", args.preset, dev.name());
    let mut json = serde_json::Map::new();
    json.insert("device".into(), dev.name().into());
    json.insert("preset".into(), args.preset.clone().into());
    json.insert("logits_chunk".into(), o.memory.logits_chunk.into());
    json.insert("recompute".into(), args.recompute.into());
    if args.only.as_deref() != Some("rollout") {
        let r = bench::sft_step(dev, &o, &sync).context("the training step")?;
        println!("{r}");
        if let Some(p) = peak {
            println!("  MFU {:.1} % of {:.0} TFLOP/s", 100.0 * r.mfu(p), p / 1e12);
        }
        json.insert("step".into(), serde_json::to_value(&r)?);
    }
    if args.only.as_deref() != Some("step") {
        // a GPU copies 256 MiB in ~0.2 ms, where the synchronisations around a timed copy
        // would weigh: 1 GiB there
        let bytes = if gpu { 1 << 30 } else { 256 << 20 };
        let bw =
            bench::measure_copy_bandwidth(dev, bytes, 5, &sync).context("the copy bandwidth")?;
        println!("copy bandwidth {:.1} GB/s (read + written)", bw / 1e9);
        let r = bench::rollout(dev, &o, &sync).context("the rollout")?;
        println!("{r}");
        println!(
            "  {:.1} % of the weight-streaming bound at the measured copy bandwidth",
            100.0 * r.bandwidth_fraction(bw)
        );
        json.insert("copy_bandwidth".into(), bw.into());
        json.insert("rollout".into(), serde_json::to_value(&r)?);
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// What this build and machine can run on.
pub fn devices_cmd() -> Result<()> {
    println!("cpu: yes ({} threads)", rayon::current_num_threads());
    if emu::available() {
        println!("emu: yes (the CUDA kernels on the CPU emulator)");
    } else {
        println!("emu: no (no C++ compiler when this binary was built)");
    }
    if kernels::available() {
        println!(
            "kernels: {} files (PTX compute_80 + cubin sm_90a) from {}",
            kernels::KERNELS.len(),
            kernels::NVCC
        );
    }
    match cuda::probe() {
        Err(why) => println!("cuda: no: {why}"),
        Ok(n) => {
            for i in 0..n {
                match cuda::CudaDevice::new(i) {
                    Ok(d) => {
                        let (free, total) = d.memory()?;
                        println!(
                            "cuda:{i}: {} ({:.1} of {:.1} GiB free)",
                            d.name(),
                            free as f64 / (1u64 << 30) as f64,
                            total as f64 / (1u64 << 30) as f64
                        );
                    }
                    Err(e) => println!("cuda:{i}: cannot open: {e}"),
                }
            }
            // which cuBLASLt the device loaded (cudarc tries several names; a report should
            // say which one served the matmuls)
            if let Some(lib) = loaded_library("libcublasLt") {
                println!("cublasLt: {lib} (version {})", cuda::cublaslt_version());
            }
        }
    }
    Ok(())
}

/// The path of a loaded shared library whose file name starts with `name` (Linux: from
/// /proc/self/maps), if any.
fn loaded_library(name: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_a_loaded_library_by_name() {
        let libc = super::loaded_library("libc.so").expect("the C library is loaded");
        assert!(libc.starts_with('/') && libc.contains("libc.so"), "{libc}");
        assert_eq!(super::loaded_library("libno-such-library"), None);
    }
}
