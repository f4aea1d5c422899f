//! Training metrics: how well reconstructions match their targets (MSE, cosine, fraction of
//! variance explained), and the JSON-lines file a training run appends them to.
//!
//! # The metrics file
//!
//! One JSON object per line, written and flushed as one piece:
//!
//! ```text
//! {"step":120,"time":1764065124.531,"split":"train","loss":1.234,"fve":0.41}
//! ```
//!
//! `step` is the optimizer step (an integer), `time` the Unix time in seconds when the line was
//! written, `split` `"train"` or `"val"`; the named numbers of the [`Record`] follow in the order
//! they were set. JSON has no NaN or infinity, so **a non-finite value is written as `null`**;
//! [`read_metrics`] reads `null` back as NaN.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Names every line carries; a [`Record`] may not use them.
pub const RESERVED: [&str; 3] = ["step", "time", "split"];

/// n_s(x) = x * s / max(||x||, 1e-12): the normalisation the critic loss and the reward apply to
/// predictions and targets (`mse_scale`), written into `out`.
pub fn normalise_into(x: &[f32], s: f32, out: &mut [f64]) {
    let norm = x
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let k = s as f64 / norm.max(1e-12);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v as f64 * k;
    }
}

/// How to compare predictions with targets in [`fidelity`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FidelityOpts<'a> {
    /// Normalise predictions and targets with n_s first (`mse_scale`); `None` compares raw
    /// vectors.
    pub scale: Option<f32>,
    /// The predict-the-mean baseline for FVE, [A], in the space the metrics are computed in
    /// (normalised when `scale` is set; see [`mean_vector`]), e.g. the training set's mean.
    /// `None` uses the mean of the targets given.
    pub baseline_mean: Option<&'a [f32]>,
}

/// Reconstruction quality over a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fidelity {
    /// Mean over A of the squared error per sample, then mean over samples.
    pub mse: f64,
    /// Mean over samples of cos(prediction, target); a zero vector has cosine 0 with anything.
    pub cosine: f64,
    /// 1 - sum ||p - g||^2 / sum ||g - mean||^2: 1 for perfect predictions, 0 for predicting the
    /// baseline mean, negative for worse. NaN when the targets have no variance about the mean.
    pub fve: f64,
    /// Number of samples.
    pub samples: usize,
}

fn check_rows(op: &'static str, len: usize, a: usize) -> Result<usize> {
    if a == 0 {
        return Err(Error::invalid(op, "activation dim A is 0"));
    }
    if len == 0 || !len.is_multiple_of(a) {
        return Err(Error::invalid(
            op,
            format!("{len} values is not a positive multiple of A = {a}"),
        ));
    }
    Ok(len / a)
}

/// Mean of the rows of `x` [S,A], after n_s normalisation when `scale` is set: the FVE baseline
/// to pass as [`FidelityOpts::baseline_mean`].
pub fn mean_vector(x: &[f32], a: usize, scale: Option<f32>) -> Result<Vec<f32>> {
    let s = check_rows("mean_vector", x.len(), a)?;
    let mut sum = vec![0f64; a];
    let mut row = vec![0f64; a];
    for xr in x.chunks_exact(a) {
        load(xr, scale, &mut row);
        for (m, &v) in sum.iter_mut().zip(&row) {
            *m += v;
        }
    }
    Ok(sum.iter().map(|&m| (m / s as f64) as f32).collect())
}

fn load(x: &[f32], scale: Option<f32>, out: &mut [f64]) {
    match scale {
        Some(s) => normalise_into(x, s, out),
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v as f64;
            }
        }
    }
}

/// MSE, cosine and FVE of predictions `pred` against targets `target`, both [S,A] row-major.
/// Sums run in f64.
pub fn fidelity(pred: &[f32], target: &[f32], a: usize, opts: FidelityOpts) -> Result<Fidelity> {
    const OP: &str = "fidelity";
    if pred.len() != target.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} predicted values but {} target values",
                pred.len(),
                target.len()
            ),
        ));
    }
    let s = check_rows(OP, target.len(), a)?;
    let baseline: Vec<f64> = match opts.baseline_mean {
        Some(m) if m.len() != a => {
            return Err(Error::invalid(
                OP,
                format!("baseline mean has {} values, expected A = {a}", m.len()),
            ))
        }
        Some(m) => m.iter().map(|&v| v as f64).collect(),
        None => mean_vector(target, a, opts.scale)?
            .iter()
            .map(|&v| v as f64)
            .collect(),
    };
    let (mut p, mut g) = (vec![0f64; a], vec![0f64; a]);
    let (mut err, mut var, mut cos) = (0f64, 0f64, 0f64);
    for (pr, gr) in pred.chunks_exact(a).zip(target.chunks_exact(a)) {
        load(pr, opts.scale, &mut p);
        load(gr, opts.scale, &mut g);
        let (mut dot, mut pp, mut gg) = (0f64, 0f64, 0f64);
        for i in 0..a {
            err += (p[i] - g[i]).powi(2);
            var += (g[i] - baseline[i]).powi(2);
            dot += p[i] * g[i];
            pp += p[i] * p[i];
            gg += g[i] * g[i];
        }
        cos += dot / (pp.sqrt().max(1e-12) * gg.sqrt().max(1e-12));
    }
    let fve = if var > 0.0 { 1.0 - err / var } else { f64::NAN };
    Ok(Fidelity {
        mse: err / (s * a) as f64,
        cosine: cos / s as f64,
        fve,
        samples: s,
    })
}

/// Which data a line of metrics describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Named numbers for one line of the metrics file, kept in the order they were first set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    values: Vec<(String, f64)>,
}

impl Record {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` (replacing an earlier value of the same name in place) and returns the record.
    pub fn with(mut self, name: impl Into<String>, value: f64) -> Self {
        self.set(name, value);
        self
    }

    /// Sets `name`, replacing an earlier value of the same name in place.
    pub fn set(&mut self, name: impl Into<String>, value: f64) -> &mut Self {
        let name = name.into();
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.values.push((name, value)),
        }
        self
    }

    /// Adds `mse`, `cosine` and `fve`, each name prefixed with `prefix` (e.g. `""` or `"val_"`).
    pub fn with_fidelity(self, prefix: &str, f: &Fidelity) -> Self {
        self.with(format!("{prefix}mse"), f.mse)
            .with(format!("{prefix}cosine"), f.cosine)
            .with(format!("{prefix}fve"), f.fve)
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.values.iter().map(|(n, v)| (n.as_str(), *v))
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// A JSON number, or `null` for NaN and infinities (JSON has neither).
fn json_number(v: f64) -> String {
    if v.is_finite() {
        serde_json::Number::from_f64(v).map_or_else(|| "null".into(), |n| n.to_string())
    } else {
        "null".into()
    }
}

/// One line of the metrics file, without its newline.
pub fn format_line(step: u64, time: f64, split: Split, rec: &Record) -> Result<String> {
    let mut line = format!(
        "{{\"step\":{step},\"time\":{},\"split\":\"{}\"",
        json_number(time),
        split.as_str()
    );
    for (name, v) in rec.iter() {
        if RESERVED.contains(&name) {
            return Err(Error::invalid(
                "metrics",
                format!("`{name}` is written on every line and cannot be a metric name"),
            ));
        }
        let key = serde_json::Value::String(name.to_string()).to_string();
        line.push(',');
        line.push_str(&key);
        line.push(':');
        line.push_str(&json_number(v));
    }
    line.push('}');
    Ok(line)
}

/// Appends [`Record`]s to a JSON-lines metrics file, one flushed line per call.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Starts a new metrics file at `path`, replacing any file there.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Continues the metrics file of a run resumed from a checkpoint at `step`: lines with a step
    /// after `step` (written after that checkpoint) and malformed lines (a line cut short by a
    /// kill) are removed, so the resumed run appends without duplicates. The file is rewritten
    /// through a temporary file and a rename, so a crash leaves either the old or the new file.
    /// A missing file is created.
    pub fn open_for_resume(path: impl Into<PathBuf>, step: u64) -> Result<Self> {
        let path = path.into();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Self::create(path),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut kept = Vec::with_capacity(bytes.len());
        for line in bytes.split(|&c| c == b'\n') {
            if parse_line(line).is_some_and(|row| row.step <= step) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&kept).and_then(|_| f.sync_all()))
            .and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = written {
            // Best effort: the temporary file is useless once the rename failed.
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&path, e));
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line for `step` and `split`, stamped with the current Unix time.
    pub fn write(&mut self, step: u64, split: Split, rec: &Record) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut line = format_line(step, (now * 1e3).round() / 1e3, split, rec)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// One line read back from a metrics file.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    pub step: u64,
    /// NaN when the line has no usable `time`.
    pub time: f64,
    pub split: String,
    /// The numeric fields other than `step` and `time`, in file order; `null` reads as NaN.
    /// Fields of other types are ignored.
    pub values: Vec<(String, f64)>,
}

impl MetricsRow {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

/// The lines of a metrics file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsLog {
    pub rows: Vec<MetricsRow>,
    /// Non-empty lines that were not a JSON object with an integer `step` and a string `split`.
    pub skipped: usize,
}

/// A JSON object's fields in file order (serde_json's own map sorts them).
struct Fields(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Fields, M::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Parses one line; `None` when it is not a metrics line.
fn parse_line(line: &[u8]) -> Option<MetricsRow> {
    let Fields(fields) = serde_json::from_slice(line).ok()?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let step = field("step")?.as_u64()?;
    let split = field("split")?.as_str()?.to_string();
    let time = field("time").and_then(|t| t.as_f64()).unwrap_or(f64::NAN);
    let values = fields
        .iter()
        .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => Some((k.clone(), f64::NAN)),
            v => v.as_f64().map(|x| (k.clone(), x)),
        })
        .collect();
    Some(MetricsRow {
        step,
        time,
        split,
        values,
    })
}

/// Reads a metrics file, skipping (and counting) malformed lines.
pub fn read_metrics(path: &Path) -> Result<MetricsLog> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut log = MetricsLog::default();
    for line in bytes.split(|&c| c == b'\n') {
        if line.iter().all(|c| c.is_ascii_whitespace()) {
            continue;
        }
        match parse_line(line) {
            Some(row) => log.rows.push(row),
            None => log.skipped += 1,
        }
    }
    Ok(log)
}
