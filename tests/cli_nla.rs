//! The NLA commands through the binary: a short demo pipeline end to end, the commands on its
//! checkpoint, and bad input giving one `error:` line, exit status 1 and nothing written.

use std::path::Path;
use std::process::{Command, Output};

fn nla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nla-engine"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The command failed with exactly one `error:` line mentioning every part of `parts`.
fn assert_error(o: &Output, parts: &[&str]) {
    let (_, err) = text(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    for p in parts {
        assert!(lines[0].contains(p), "{p:?} not in {:?}", lines[0]);
    }
}

fn last_val(metrics: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(metrics).unwrap();
    let line = text.lines().rfind(|l| l.contains("\"val\"")).unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn demo_pipeline_then_the_commands_on_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = nla(&[
        "demo",
        "--out",
        out.to_str().unwrap(),
        "--pretrain-steps",
        "40",
        "--sft-steps",
        "20",
        "--grpo-steps",
        "2",
        "--per-text",
        "2",
        "--no-bar",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    for stage in ["before SFT", "after SFT", "after GRPO"] {
        assert!(stdout.contains(stage), "{stdout}");
    }
    let ckpt = out.join("sft/step-00000020");
    for f in [
        "actor/model.safetensors",
        "actor/tokenizer.json",
        "actor/tokenizer_config.json",
        "critic/value_head.safetensors",
        "actor_optim.safetensors",
        "critic_optim.safetensors",
        "trainer_state.json",
        "config.yaml",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing in {}", ckpt.display());
    }
    for m in ["sft/metrics.jsonl", "grpo/metrics.jsonl"] {
        let v = last_val(&out.join(m));
        for k in ["nla_fve", "nla_cosine", "critic_fve", "actor_loss"] {
            let x = v[k].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite(), "{m}: {k} = {x}");
        }
    }
    let grpo = std::fs::read_to_string(out.join("grpo/metrics.jsonl")).unwrap();
    assert!(grpo.contains("reward_mean") && grpo.contains("time_gen_s"));

    let val = out.join("data/val.parquet");
    let (c, d) = (ckpt.to_str().unwrap(), val.to_str().unwrap());
    let o = nla(&["generate", "--checkpoint", c, "--data", d, "--rows", "3"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("row ")).count(), 3);

    let o = nla(&["reconstruct", "--checkpoint", c, "--data", d, "--rows", "4"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("4 rows: mse"), "{stdout}");

    let o = nla(&["eval", "--checkpoint", c, "--data", d, "--rows", "8"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("nla_fve") && stdout.contains("critic_fve"),
        "{stdout}"
    );

    // bad input on a real checkpoint: errors name what is wrong, nothing is written
    let save = tmp.path().join("never");
    let o = nla(&[
        "train",
        "--config",
        ckpt.join("config.yaml").to_str().unwrap(),
        "--set",
        "model.model_name=/no/such/model",
        "--set",
        &format!("trainer.save_dir={}", save.display()),
    ]);
    assert_error(&o, &["model.model_name", "/no/such/model"]);
    assert!(!save.exists());
    let o = nla(&[
        "train",
        "--config",
        ckpt.join("config.yaml").to_str().unwrap(),
        "--set",
        "trainer.algo=grpo",
        "--train-mode",
        "critic",
        "--set",
        &format!("trainer.save_dir={}", save.display()),
    ]);
    assert_error(&o, &["trainer.train_mode"]);
    assert!(!save.exists());
    let o = nla(&["generate", "--checkpoint", c, "--data", "/no/such.parquet"]);
    assert_error(&o, &["/no/such.parquet"]);
    let texts = tmp.path().join("missing.txt");
    let o = nla(&[
        "extract",
        "--model",
        out.join("base").to_str().unwrap(),
        "--texts",
        texts.to_str().unwrap(),
        "--layer",
        "2",
        "--out",
        tmp.path().join("x.parquet").to_str().unwrap(),
    ]);
    assert_error(&o, &["missing.txt"]);
    assert!(!tmp.path().join("x.parquet").exists());
}

#[test]
fn train_with_a_missing_config_is_one_error() {
    let o = nla(&["train", "--config", "/no/such/config.yaml"]);
    assert_error(&o, &["/no/such/config.yaml"]);
    let o = nla(&["generate", "--data", "x.parquet"]);
    assert_error(&o, &["--checkpoint"]);
}
