//! nvcc: kernels/*.cu -> PTX (compute_80) + cubin (sm_90a), embedded (see build.rs).
//!
//! When nvcc is found (NVCC, else CUDA_HOME/bin/nvcc, else PATH), every kernel file is compiled
//! twice, files in parallel on std threads:
//! - `-ptx -arch=compute_80`: portable PTX, JIT-compiled by the driver on sm_80 and newer;
//! - `-cubin -arch=sm_90a -Xptxas -v`: Hopper machine code, and ptxas's report of registers,
//!   shared memory and spills per kernel.
//!
//! Flags: `-std=c++17 -O3 -lineinfo`, host compiler `-ccbin g++` (NVCC_CCBIN overrides); nvcc
//! needs it even for device-only output. No `--use_fast_math`: it would turn every expf, sinf,
//! logf and division of every file into its approximate form, flush denormals to zero and relax
//! sqrt; RoPE's angles reach thousands of radians, where `__sinf` has no range reduction, and the
//! emulator (g++) would no longer compute what the GPU computes. Kernels call the fast intrinsics
//! by name where a file has shown they are accurate enough; the elementwise kernels are bound by
//! memory, so the precise forms cost nothing measurable.
//!
//! Outputs, in OUT_DIR: `kernels/<stem>.ptx`, `kernels/<stem>.cubin`, `kernels.rs`
//! (`pub const KERNELS: &[(&str, &[u8], &[u8])]`: file stem, PTX, cubin; and `LIMITS`: each
//! kernel's registers and static shared memory from ptxas, and its launch bound from the PTX's
//! `.maxntid`; included by src/device/kernels.rs) and `ptxas-report.txt` (per kernel: registers,
//! stack, spills, static shared memory, barriers; the time of every nvcc run; then ptxas's own
//! lines), copied to
//! `<target dir>/ptxas-report.txt`. Runs go longest first (by file size), NUM_JOBS (cargo -j)
//! at a time.
//!
//! Fails the build (panics) when nvcc fails on a file (with nvcc's stderr), or when a hot kernel
//! spills. A file marks kernels hot with lines `// nla: hot <symbol>`; `// nla: hot` alone marks
//! every kernel of the file.
//!
//! Without nvcc nothing is compiled: the `nla_nvcc` cfg is unset and the binary runs on the CPU.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ptxas::{hot_spills, parse_ptxas, KernelStats, CUBIN_TARGET, NVCC_FLAGS};

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

/// The two outputs of every kernel file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Ptx,
    Cubin,
}

impl Target {
    fn ext(self) -> &'static str {
        match self {
            Target::Ptx => "ptx",
            Target::Cubin => "cubin",
        }
    }
    fn flags(self) -> &'static [&'static str] {
        match self {
            Target::Ptx => &["-ptx", "-arch=compute_80"],
            Target::Cubin => CUBIN_TARGET,
        }
    }
}

/// One nvcc run: a kernel file to one target.
struct Job {
    src: PathBuf,
    stem: String,
    target: Target,
    out: PathBuf,
}

/// What one nvcc run left: its stderr (ptxas's report for the cubin) and how long it took.
struct Done {
    ok: bool,
    stderr: String,
    took: Duration,
}

pub fn build(kernels: &[PathBuf]) {
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=NVCC_CCBIN");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rustc-check-cfg=cfg(nla_nvcc)");
    let Some(nvcc) = find_nvcc() else {
        println!("cargo::rustc-env=NLA_NVCC=");
        return;
    };
    if !nvcc.is_file() {
        panic!(
            "NVCC={} is not a file; install the CUDA compiler with `bash scripts/install-nvcc.sh` \
             and pass the path it prints, or unset NVCC to build without GPU kernels",
            nvcc.display()
        );
    }
    println!("cargo::rustc-cfg=nla_nvcc");
    println!("cargo::rustc-env=NLA_NVCC={}", nvcc.display());

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kdir = out_dir.join("kernels");
    fs::create_dir_all(&kdir).expect("create OUT_DIR/kernels");
    let ccbin = env::var("NVCC_CCBIN").unwrap_or_else(|_| "g++".to_string());

    let mut jobs = Vec::new();
    for src in kernels {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file names are UTF-8")
            .to_string();
        for target in [Target::Cubin, Target::Ptx] {
            let out = kdir.join(format!("{stem}.{}", target.ext()));
            jobs.push(Job {
                src: src.clone(),
                stem: stem.clone(),
                target,
                out,
            });
        }
    }

    // longest first (file size as the guess; the cubin, whose ptxas run is the longer one,
    // before the PTX), so that the big files do not start last and set the wall time
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    jobs.sort_by_key(|j| (std::cmp::Reverse(size(&j.src)), j.target != Target::Cubin));

    let started = Instant::now();
    let workers = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(2)
        .clamp(1, jobs.len().max(1));
    let done = run_jobs(&nvcc, &ccbin, &jobs, workers);
    let wall = started.elapsed();

    let failures: Vec<String> = jobs
        .iter()
        .zip(&done)
        .filter(|(_, d)| !d.ok)
        .map(|(j, d)| {
            format!(
                "nvcc failed on {} ({}):\n{}",
                j.src.display(),
                j.target.ext(),
                d.stderr.trim_end()
            )
        })
        .collect();
    if !failures.is_empty() {
        panic!(
            "CUDA kernels failed to compile ({}):\n\n{}",
            nvcc.display(),
            failures.join("\n\n")
        );
    }
    for (j, d) in jobs.iter().zip(&done) {
        for line in d.stderr.lines().filter(|l| l.contains("warning")) {
            println!("cargo::warning={} ({}): {line}", j.stem, j.target.ext());
        }
    }

    // ptxas report of the cubins
    let mut stats: BTreeMap<String, KernelStats> = BTreeMap::new();
    for (j, d) in jobs.iter().zip(&done) {
        if j.target == Target::Cubin {
            parse_ptxas(&j.stem, &d.stderr, &mut stats);
        }
    }
    let texts: Vec<(PathBuf, String)> = kernels
        .iter()
        .map(|src| (src.clone(), fs::read_to_string(src).unwrap_or_default()))
        .collect();
    let hot_spills = hot_spills(&texts, &stats);
    let report = render_report(&nvcc, &jobs, &done, &stats, wall, workers);
    fs::write(out_dir.join("ptxas-report.txt"), &report).expect("write ptxas-report.txt");
    if let Some(target_dir) = target_dir(&out_dir) {
        // best effort: a read-only target dir must not fail the build
        let _ = fs::write(target_dir.join("ptxas-report.txt"), &report);
    }
    if !hot_spills.is_empty() {
        panic!(
            "hot kernels spill registers (marked `// nla: hot`; see {}):\n{}",
            out_dir.join("ptxas-report.txt").display(),
            hot_spills.join("\n")
        );
    }

    write_kernels_rs(&out_dir, &jobs, &stats);
}

/// Runs every job on `workers` threads (a shared queue); results in job order.
fn run_jobs(nvcc: &Path, ccbin: &str, jobs: &[Job], workers: usize) -> Vec<Done> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Done>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let d = run_nvcc(nvcc, ccbin, job);
                results.lock().expect("no worker panics holding the lock")[i] = Some(d);
            });
        }
    });
    results
        .into_inner()
        .expect("no worker panicked")
        .into_iter()
        .map(|d| d.expect("every job ran"))
        .collect()
}

fn run_nvcc(nvcc: &Path, ccbin: &str, job: &Job) -> Done {
    let t0 = Instant::now();
    let out = Command::new(nvcc)
        .args(job.target.flags())
        .args(NVCC_FLAGS)
        .args(["-ccbin", ccbin])
        .arg("-o")
        .arg(&job.out)
        .arg(&job.src)
        .output();
    let took = t0.elapsed();
    match out {
        Ok(o) => Done {
            ok: o.status.success(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            took,
        },
        Err(e) => Done {
            ok: false,
            stderr: format!("could not run {}: {e}", nvcc.display()),
            took,
        },
    }
}

fn render_report(
    nvcc: &Path,
    jobs: &[Job],
    done: &[Done],
    stats: &BTreeMap<String, KernelStats>,
    wall: Duration,
    workers: usize,
) -> String {
    let mut r = String::new();
    let cpu: f64 = done.iter().map(|d| d.took.as_secs_f64()).sum();
    let _ = writeln!(
        r,
        "ptxas report: kernels/*.cu -> sm_90a ({})",
        nvcc.display()
    );
    let _ = writeln!(
        r,
        "{} files, {} nvcc runs on {workers} threads: {:.1} s wall, {:.1} s summed",
        jobs.len() / 2,
        jobs.len(),
        wall.as_secs_f64(),
        cpu
    );
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "{:<16} {:<38} {:>4} {:>5} {:>7} {:>7} {:>6} {:>4}",
        "file", "kernel", "regs", "stack", "spill-s", "spill-l", "smem", "bar"
    );
    let mut by_file: Vec<(&String, &KernelStats)> = stats.iter().collect();
    by_file.sort_by(|a, b| (&a.1.file, a.0).cmp(&(&b.1.file, b.0)));
    for (name, k) in &by_file {
        let regs = k.registers.map_or("-".to_string(), |n| n.to_string());
        let name = if k.entry {
            name.to_string()
        } else {
            format!("({name})")
        };
        let _ = writeln!(
            r,
            "{:<16} {:<38} {:>4} {:>5} {:>7} {:>7} {:>6} {:>4}",
            k.file, name, regs, k.stack, k.spill_stores, k.spill_loads, k.smem, k.barriers
        );
    }
    let _ = writeln!(
        r,
        "(regs: registers a thread; stack: bytes of local memory a thread (a subroutine's frame, \
         not a spill); spill-s/-l: bytes of registers spilled; smem: static shared memory a \
         block, dynamic excluded; bar: barriers; names in parentheses: subroutines)"
    );
    let _ = writeln!(r);
    let _ = writeln!(r, "nvcc time per run, longest first:");
    let mut runs: Vec<(&Job, &Done)> = jobs.iter().zip(done).collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.1.took));
    for (j, d) in runs {
        let _ = writeln!(
            r,
            "  {:<20} {:<5} {:>6.2} s",
            j.stem,
            j.target.ext(),
            d.took.as_secs_f64()
        );
    }
    let _ = writeln!(r);
    let _ = writeln!(r, "ptxas -v:");
    let mut cubins: Vec<(&Job, &Done)> = jobs.iter().zip(done).collect();
    cubins.sort_by_key(|c| &c.0.stem);
    for (j, d) in cubins {
        if j.target == Target::Cubin {
            let _ = writeln!(r, "--- {}", j.src.display());
            let _ = writeln!(r, "{}", d.stderr.trim_end());
        }
    }
    r
}

/// The target directory, from OUT_DIR = <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out.
fn target_dir(out_dir: &Path) -> Option<PathBuf> {
    let build = out_dir
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "build"))?;
    let profile = build.parent()?;
    let above = profile.parent()?;
    // with --target, <target>/<triple>/<profile>: the report goes next to <triple>
    let triple = env::var("TARGET").ok();
    match (above.file_name().and_then(|n| n.to_str()), triple) {
        (Some(n), Some(t)) if n == t => above.parent().map(Path::to_path_buf),
        _ => Some(above.to_path_buf()),
    }
}

/// The launch bound of every entry of a PTX text: `.maxntid x, y, z` (from `__launch_bounds__`)
/// between the entry's parameter list and its body, as threads per block.
fn max_threads(ptx: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for part in ptx.split(".entry ").skip(1) {
        let Some((name, rest)) = part.split_once('(') else {
            continue;
        };
        let head = rest.split('{').next().unwrap_or_default();
        if let Some(dims) = head.split(".maxntid").nth(1) {
            let n: u32 = dims
                .lines()
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|d| d.trim().parse::<u32>().unwrap_or(1))
                .product();
            out.insert(name.trim().to_string(), n);
        }
    }
    out
}

fn write_kernels_rs(out_dir: &Path, jobs: &[Job], stats: &BTreeMap<String, KernelStats>) {
    let mut s = String::from(
        "// Generated by build/nvcc.rs: (file stem, PTX for compute_80, cubin for sm_90a).\n\
         pub const KERNELS: &[(&str, &[u8], &[u8])] = &[\n",
    );
    let mut stems: Vec<&str> = jobs
        .iter()
        .filter(|j| j.target == Target::Ptx)
        .map(|j| j.stem.as_str())
        .collect();
    stems.sort_unstable();
    for stem in stems {
        let path = |t: Target| {
            let p = jobs
                .iter()
                .find(|j| j.stem == stem && j.target == t)
                .map(|j| j.out.display().to_string())
                .unwrap_or_default();
            format!("{p:?}")
        };
        let _ = writeln!(
            s,
            "    ({stem:?}, include_bytes!({}), include_bytes!({})),",
            path(Target::Ptx),
            path(Target::Cubin)
        );
    }
    s.push_str("];\n");

    // what a launch of each entry may ask for (src/device/kernels.rs: check_launch)
    let mut bounds = BTreeMap::new();
    for j in jobs.iter().filter(|j| j.target == Target::Ptx) {
        let ptx = fs::read_to_string(&j.out).unwrap_or_default();
        bounds.append(&mut max_threads(&ptx));
    }
    s.push_str(
        "// Generated by build/nvcc.rs: (symbol, registers per thread on sm_90a, static shared \
         memory bytes, most threads per block: __launch_bounds__ or 1024).\n\
         pub const LIMITS: &[(&str, u32, u32, u32)] = &[\n",
    );
    for (name, k) in stats.iter().filter(|(_, k)| k.entry) {
        let _ = writeln!(
            s,
            "    ({name:?}, {}, {}, {}),",
            k.registers.unwrap_or(0),
            k.smem,
            bounds.get(name).copied().unwrap_or(1024)
        );
    }
    s.push_str("];\n");
    fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}
