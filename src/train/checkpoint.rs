//! Checkpoints: one folder per save, written whole into a temporary folder and renamed into
//! place, so a kill during a save never leaves a broken checkpoint under a final name; the
//! newest `save_total_limit` are kept.
//!
//! Layout of `save_dir`:
//! ```text
//! step-00000100/            a complete checkpoint (the caller decides what goes in:
//!   actor/ critic/          HF folders, optimizer.safetensors, trainer_state.json, ...)
//! .partial-step-00000200-N/ a save in progress (or killed): ignored, removed by the next save
//! ```
//! All randomness of a run is derived from (seed, step, index), so the step and the data
//! position are all the state a resume needs besides weights and optimizer moments.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use crate::device::{Device, View};
use crate::model::safetensors_io::{read_tensors, write_tensors};
use crate::{Error, Result};

const PREFIX: &str = "step-";
const PARTIAL: &str = ".partial-";

/// The folder name of the checkpoint of `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Writes a checkpoint of `step` under `save_dir`: `fill` writes every file into the folder it
/// is given; the folder is then renamed to `step-NNNNNNNN` (an existing checkpoint of the same
/// step is replaced). Afterwards only the newest `keep` checkpoints remain (0 keeps all), and
/// leftovers of killed saves are removed. Returns the checkpoint's path.
pub fn save_checkpoint(
    save_dir: &Path,
    step: u64,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(save_dir).map_err(|e| Error::io(save_dir, e))?;
    remove_partials(save_dir)?;
    let name = step_dir_name(step);
    let tmp = save_dir.join(format!("{PARTIAL}{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp)?;
    let dst = save_dir.join(&name);
    if dst.exists() {
        // same step saved again (e.g. after a resume): move the old one aside first
        let old = save_dir.join(format!("{PARTIAL}old-{name}-{}", std::process::id()));
        std::fs::rename(&dst, &old).map_err(|e| Error::io(&dst, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    sync_dir(save_dir)?;
    if keep > 0 {
        let all = list_checkpoints(save_dir)?;
        for (_, path) in all.iter().rev().skip(keep) {
            std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(dst)
}

/// Complete checkpoints under `save_dir`, oldest first.
pub fn list_checkpoints(save_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    if !save_dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(save_dir).map_err(|e| Error::io(save_dir, e))? {
        let entry = entry.map_err(|e| Error::io(save_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `save_dir`, if any.
pub fn latest_checkpoint(save_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_checkpoints(save_dir)?.pop())
}

fn remove_partials(save_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(save_dir).map_err(|e| Error::io(save_dir, e))? {
        let entry = entry.map_err(|e| Error::io(save_dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Flushes a folder's entries (the rename of a child) to disk; a no-op where folders cannot
/// be opened.
fn sync_dir(dir: &Path) -> Result<()> {
    if let Ok(f) = std::fs::File::open(dir) {
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Where a run stands: what a resume needs besides weights and optimizer moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// optimizer steps done
    pub step: u64,
    /// the run's seed (every random draw derives from seed, step and index)
    pub seed: u64,
    /// data position: epoch and samples consumed in it
    pub epoch: u64,
    pub samples_in_epoch: u64,
    /// what trained (e.g. "sft/actor", "grpo"), checked on resume
    pub kind: String,
}

impl TrainerState {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::format(path, e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a trainer state: {e}")))
    }
}

/// Writes the AdamW moments `m`, `v` (flat [P]) and its step count to a safetensors file.
pub fn save_adamw<D: Device>(dev: &D, opt: &AdamW<D>, path: &Path) -> Result<()> {
    let m = dev.download(View::all(&opt.m))?;
    let v = dev.download(View::all(&opt.v))?;
    // the step as two exact f32 halves (f32 holds integers up to 2^24 exactly)
    let step = [(opt.step >> 24) as f32, (opt.step & 0xff_ffff) as f32];
    write_tensors(
        path,
        &[
            ("m".into(), vec![m.len()], &m),
            ("v".into(), vec![v.len()], &v),
            ("step".into(), vec![2], &step),
        ],
    )
}

/// Restores what [`save_adamw`] wrote into an optimizer of the same parameter count.
pub fn load_adamw<D: Device>(dev: &D, opt: &mut AdamW<D>, path: &Path) -> Result<()> {
    let tensors = read_tensors(path)?;
    let get = |name: &str| {
        tensors
            .iter()
            .find(|t| t.0 == name)
            .map(|t| &t.2)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })
    };
    let (m, v, step) = (get("m")?, get("v")?, get("step")?);
    let n = crate::device::DeviceBuf::len(&opt.m);
    if m.len() != n || v.len() != n || step.len() != 2 {
        return Err(Error::format(
            path,
            format!(
                "optimizer state for {} parameters, this model has {n}",
                m.len()
            ),
        ));
    }
    opt.m = dev.upload(m)?;
    opt.v = dev.upload(v)?;
    opt.step = ((step[0] as u64) << 24) | step[1] as u64;
    Ok(())
}
