//! Every kernels/*.cu compiled by NVRTC (CUDA's runtime compiler library, no GPU needed) for
//! sm_80 and sm_90: a second compiler front end over the kernels, beside nvcc in build/nvcc.rs
//! (compute_80 PTX and an sm_90a cubin) and g++ in the emulator (NLA_EMU). For a real
//! architecture (sm_XX) NVRTC also runs its built-in ptxas, so a file that passes here also
//! assembles for that GPU.
//!
//! Per file and architecture: the compile succeeds (else the NVRTC log is printed with the file
//! and the architecture), the PTX and the cubin are non-empty, and the PTX's `.visible .entry`
//! kernels are exactly the symbols the file registers with `NLA_EMU_KERNEL(sym);` (every
//! `extern "C" __global__` kernel of a file is registered there for the emulator). NVRTC's
//! warnings, if any, are printed; they do not fail the test. Compiles run on every core; each
//! prints its time (`-- --nocapture` shows them).
//!
//! Options: those of build/nvcc.rs that apply to NVRTC (`-std=c++17`, no `--use_fast_math`),
//! `--include-path` kernels/ (common.cuh) and `$NLA_CUDA_INCLUDE` (cuda_bf16.h and what it
//! includes). libnvrtc.so.13 is found through LD_LIBRARY_PATH. `scripts/install-nvrtc.sh` installs
//! both and prints the two variables:
//!     eval "$(bash scripts/install-nvrtc.sh)"
//!     NLA_REQUIRE_NVRTC=1 cargo test --release --test nvrtc -- --nocapture
//!
//! Without libnvrtc or without NLA_CUDA_INCLUDE the test says why on stderr and passes, unless
//! NLA_REQUIRE_NVRTC=1 (set by .ci/run), when it fails instead.

use std::collections::BTreeSet;
use std::env;
use std::ffi::{c_char, CString};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cudarc::nvrtc::result::{self, NvrtcError};
use cudarc::nvrtc::sys;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Why NVRTC cannot run here, if it cannot: NLA_CUDA_INCLUDE unset, or not a folder with
/// cuda_bf16.h, or no libnvrtc to load.
fn unavailable() -> Result<PathBuf, String> {
    let include = match env::var_os("NLA_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            return Err(
                "NLA_CUDA_INCLUDE is unset (the CUDA include folder, with cuda_bf16.h)".to_string(),
            )
        }
    };
    if !include.join("cuda_bf16.h").is_file() {
        return Err(format!(
            "NLA_CUDA_INCLUDE={} holds no cuda_bf16.h",
            include.display()
        ));
    }
    // SAFETY: only tries to dlopen the library's candidate names; every other nvrtc function
    // panics when the library is absent, so none is called before this returns true.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!(
            "libnvrtc does not load (LD_LIBRARY_PATH={})",
            env::var("LD_LIBRARY_PATH").unwrap_or_default()
        ));
    }
    Ok(include)
}

/// The kernel files, sorted by name.
fn kernel_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("read a kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

/// The symbols of the `NLA_EMU_KERNEL(sym);` lines of a kernel file.
fn registered_kernels(src: &str) -> BTreeSet<String> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("NLA_EMU_KERNEL("))
        .filter_map(|rest| rest.split_once(')'))
        .map(|(sym, _)| sym.trim().to_string())
        .collect()
}

/// The kernels a PTX module defines: the names of its `.visible .entry` lines.
fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|rest| rest.split('(').next().unwrap_or(rest).trim().to_string())
        .collect()
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once
        unsafe { result::destroy_program(self.0) }.expect("nvrtcDestroyProgram");
    }
}

/// A NUL-terminated buffer of NVRTC (log, PTX) as text.
fn c_text(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// NVRTC on one source: its log (warnings, or the errors) and, when it compiled, the PTX and the
/// size of the cubin (NVRTC assembles the PTX when the architecture is a real one, sm_XX).
fn compile(
    src: &str,
    name: &str,
    options: &[String],
) -> (Result<(String, usize), NvrtcError>, String) {
    let src = CString::new(src).expect("no NUL in a kernel file");
    let cname = CString::new(name).expect("no NUL in a file name");
    let prog = Program(result::create_program(&src, Some(&cname)).expect("nvrtcCreateProgram"));
    // SAFETY: prog is a live program (src and cname outlive it); the log and the outputs are
    // read after nvrtcCompileProgram returned, the outputs only when it succeeded
    let compiled = unsafe { result::compile_program(prog.0, options) };
    let log = unsafe { result::get_program_log(prog.0) }.expect("nvrtcGetProgramLog");
    let out = compiled.and_then(|()| {
        let ptx = unsafe { result::get_ptx(prog.0) }?;
        let mut cubin = 0usize;
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut cubin) }.result()?;
        Ok((c_text(&ptx), cubin))
    });
    (out, c_text(&log).trim().to_string())
}

/// What one compile (a file for an architecture) found.
struct Checked {
    /// what went wrong, with the NVRTC log where it failed
    error: Option<String>,
    /// NVRTC's log where it compiled (warnings)
    warnings: String,
    took: Duration,
    entries: usize,
    cubin_bytes: usize,
}

/// Compiles one file for one architecture and checks the PTX against its registered kernels.
fn check(file: &Path, arch: &str, include: &[String]) -> Checked {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let src = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let expected = registered_kernels(&src);
    let mut options: Vec<String> = include
        .iter()
        .map(|d| format!("--include-path={d}"))
        .collect();
    options.extend([
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ]);
    let t = Instant::now();
    let (ptx, log) = compile(&src, &name, &options);
    let took = t.elapsed();
    let (ptx, cubin_bytes) = match ptx {
        Ok(out) => out,
        Err(e) => {
            let error =
                format!("{name} ({arch}): NVRTC failed ({e:?}), options {options:?}, log:\n{log}");
            return Checked {
                error: Some(error),
                warnings: String::new(),
                took,
                entries: 0,
                cubin_bytes: 0,
            };
        }
    };
    let mut problems = Vec::new();
    if ptx.trim().is_empty() {
        problems.push("the PTX is empty".to_string());
    }
    if cubin_bytes == 0 {
        problems.push("no cubin".to_string());
    }
    if expected.is_empty() {
        problems.push("the file has no `NLA_EMU_KERNEL(sym);` line".to_string());
    }
    let entries = ptx_entries(&ptx);
    let missing: Vec<_> = expected.difference(&entries).collect();
    if !missing.is_empty() {
        problems.push(format!("no `.visible .entry` in the PTX for {missing:?}"));
    }
    let unregistered: Vec<_> = entries.difference(&expected).collect();
    if !unregistered.is_empty() {
        problems.push(format!(
            "PTX entries {unregistered:?} have no `NLA_EMU_KERNEL` line"
        ));
    }
    let error = (!problems.is_empty()).then(|| format!("{name} ({arch}): {}", problems.join("; ")));
    Checked {
        error,
        warnings: log,
        took,
        entries: entries.len(),
        cubin_bytes,
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let require = env::var("NLA_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let include = match unavailable() {
        Ok(dir) => dir,
        Err(why) => {
            let how = "install it with `eval \"$(bash scripts/install-nvrtc.sh)\"`";
            if require {
                panic!("NLA_REQUIRE_NVRTC=1 but NVRTC cannot run: {why}; {how}");
            }
            eprintln!("nvrtc: skipped: {why}; {how} (NLA_REQUIRE_NVRTC=1 makes this a failure)");
            return;
        }
    };
    let kdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let include_paths = vec![
        kdir.to_string_lossy().into_owned(),
        include.to_string_lossy().into_owned(),
    ];
    let files = kernel_files(&kdir);
    assert!(!files.is_empty(), "no kernels/*.cu in {}", kdir.display());

    // (file, arch) jobs, largest files first, on every core; reported in file order
    let mut jobs: Vec<(PathBuf, &'static str)> = files
        .iter()
        .flat_map(|f| ARCHS.iter().map(move |&a| (f.clone(), a)))
        .collect();
    jobs.sort_by_key(|(f, _)| std::cmp::Reverse(fs::metadata(f).map(|m| m.len()).unwrap_or(0)));
    let results = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((file, arch)) = jobs.get(i) else {
                    break;
                };
                let r = check(file, arch, &include_paths);
                results.lock().unwrap().push((file.clone(), *arch, r));
            });
        }
    });
    let wall = t.elapsed();
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));

    let mut failures = Vec::new();
    let mut total = Duration::ZERO;
    for (file, arch, c) in results {
        total += c.took;
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let status = if c.error.is_some() { "FAILED" } else { "ok" };
        eprintln!(
            "nvrtc: {name:<22} {arch}  {:>6.2} s  {:>2} kernels  cubin {:>7} B  {status}",
            c.took.as_secs_f64(),
            c.entries,
            c.cubin_bytes
        );
        if !c.warnings.is_empty() {
            eprintln!("nvrtc: {name} ({arch}): NVRTC log:\n{}", c.warnings);
        }
        failures.extend(c.error);
    }
    eprintln!(
        "nvrtc: {} files x {:?}: {:.1} s of compiles, {:.1} s wall on {workers} threads",
        files.len(),
        ARCHS,
        total.as_secs_f64(),
        wall.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} NVRTC compiles failed:\n\n{}",
        failures.len(),
        files.len() * ARCHS.len(),
        failures.join("\n\n")
    );
}
