//! Helpers shared by the op tests (tests/ops_cpu.rs, tests/ops_nla.rs).

use std::collections::HashMap;
use std::sync::Mutex;

use nla_engine::device::{View, ViewMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{fixtures_dir, load_tensors, Tensor};

pub type Buf = Vec<f32>;

pub fn v(x: &Buf) -> View<'_, Buf> {
    View::all(x)
}

pub fn m(x: &mut Buf) -> ViewMut<'_, Buf> {
    ViewMut::all(x)
}

/// Tensor `name` of the fixture file `file` (under tests/reference/fixtures), read once.
pub fn tensor(file: &str, name: &str) -> &'static Tensor {
    static FILES: Mutex<Vec<(String, &'static HashMap<String, Tensor>)>> = Mutex::new(Vec::new());
    let map = {
        let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        match files.iter().find(|(f, _)| f == file) {
            Some((_, map)) => *map,
            None => {
                let map: &'static HashMap<String, Tensor> =
                    Box::leak(Box::new(load_tensors(&fixtures_dir().join(file))));
                files.push((file.to_string(), map));
                map
            }
        }
    };
    map.get(name)
        .unwrap_or_else(|| panic!("{file} has no tensor `{name}`"))
}

/// Largest |x|: absolute tolerances are stated relative to the size of the tensor.
pub fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, &v| m.max(v.abs()))
}

/// f32 unit roundoff.
pub const U: f32 = f32::EPSILON / 2.0;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` uniform values in [-1, 1), fresh for each seed.
pub fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut r = rng(seed);
    (0..n).map(|_| r.random_range(-1.0..1.0)).collect()
}

pub fn random_f32(n: usize, seed: u64) -> Buf {
    random(n, seed).into_iter().map(|x| x as f32).collect()
}

pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `r` is an error whose message starts with the op's name.
#[track_caller]
pub fn assert_invalid(op: &str, r: nla_engine::Result<()>) {
    match r {
        Err(e) => assert!(
            e.to_string().starts_with(op),
            "error `{e}` should name {op}"
        ),
        Ok(()) => panic!("{op}: expected an error"),
    }
}
