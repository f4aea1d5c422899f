//! ptxas's -v report, read per kernel, and the spill check on kernels marked hot (build/nvcc.rs;
//! tests/ptxas_check.rs runs both on ptxas's own output). A kernel file marks kernels hot with
//! lines `// nla: hot <symbol> ...`; `// nla: hot` alone marks every kernel of the file.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// nvcc's flags for every kernel file (build/nvcc.rs adds `-ccbin` and the output).
pub const NVCC_FLAGS: &[&str] = &["-std=c++17", "-O3", "-lineinfo"];
/// nvcc's target flags for the cubin, whose ptxas -v report is read here.
pub const CUBIN_TARGET: &[&str] = &["-cubin", "-arch=sm_90a", "-Xptxas", "-v"];

/// ptxas's figures for one kernel (sm_90a).
#[derive(Default, Debug)]
pub struct KernelStats {
    pub file: String,
    /// an `extern "C" __global__` kernel (else a subroutine ptxas kept, e.g. a math slow path)
    pub entry: bool,
    pub registers: Option<u32>,
    pub barriers: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub smem: u32,
    pub lines: Vec<String>,
}

/// Reads ptxas -v lines ("Compiling entry function 'x' for 'sm_90a'", "Function properties for
/// x", "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers, used
/// N barriers, N bytes smem") into per-kernel figures.
pub fn parse_ptxas(stem: &str, text: &str, stats: &mut BTreeMap<String, KernelStats>) {
    let mut current: Option<String> = None;
    for line in text.lines() {
        let quoted = line.split('\'').nth(1).map(str::to_string);
        if line.contains("Compiling entry function") || line.contains("Function properties for") {
            if let Some(name) = line
                .split("Function properties for ")
                .nth(1)
                .map(|s| s.trim().to_string())
                .or(quoted)
            {
                current = Some(name);
            }
        }
        let Some(name) = &current else { continue };
        let k = stats.entry(name.clone()).or_default();
        k.file = stem.to_string();
        k.entry |= line.contains("Compiling entry function");
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        k.lines.push(l.to_string());
        if l.contains("stack frame") || l.contains("spill") {
            k.stack = number_before(l, "bytes stack frame").unwrap_or(k.stack);
            k.spill_stores = number_before(l, "bytes spill stores").unwrap_or(k.spill_stores);
            k.spill_loads = number_before(l, "bytes spill loads").unwrap_or(k.spill_loads);
        }
        if l.contains("Used") && l.contains("registers") {
            k.registers = number_after(l, "Used ");
            k.barriers = number_before(l, "barriers").unwrap_or(0);
            k.smem = number_before(l, "bytes smem").unwrap_or(0);
        }
    }
}

/// The integer right before `unit` in `line` ("12 bytes spill stores" -> 12).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// The integer right after `prefix` in `line` ("Used 30 registers" -> 30).
fn number_after(line: &str, prefix: &str) -> Option<u32> {
    let tail = &line[line.find(prefix)? + prefix.len()..];
    tail.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// Whether `symbol` is marked hot in a kernel file's text: a line `// nla: hot` (every kernel
/// of the file) or `// nla: hot <symbol> ...`.
pub fn is_hot(text: &str, symbol: &str) -> bool {
    text.lines().any(|l| {
        let Some(rest) = l.trim().strip_prefix("//") else {
            return false;
        };
        let Some(names) = rest.trim().strip_prefix("nla: hot") else {
            return false;
        };
        let names: Vec<&str> = names.split_whitespace().collect();
        names.is_empty() || names.contains(&symbol)
    })
}

/// Every entry kernel of `files` (path, text) that is marked hot and spills, with ptxas's
/// spill lines: "symbol (path): ...".
pub fn hot_spills(
    files: &[(PathBuf, String)],
    stats: &BTreeMap<String, KernelStats>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (src, text) in files {
        let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        for (name, k) in stats.iter().filter(|(_, k)| k.file == stem && k.entry) {
            if is_hot(text, name) && (k.spill_stores > 0 || k.spill_loads > 0) {
                let spills: Vec<&str> = k
                    .lines
                    .iter()
                    .filter(|l| l.contains("spill"))
                    .map(|l| l.trim())
                    .collect();
                out.push(format!("{name} ({}): {}", src.display(), spills.join("; ")));
            }
        }
    }
    out
}
