//! The CPU emulator of the CUDA execution model: emu/ and kernels/*.cu compiled as C++ (see
//! build.rs), plus tests/emu_kernels/*.cu (kernels that exist only to test the emulator).
//!
//! Each .cu file is compiled through a generated wrapper that includes it inside its own
//! namespace, so helpers that CUDA keeps per module (non-inline `__device__` functions of
//! common.cuh, same-named helpers in two files) do not collide when everything is linked into one
//! library; `extern "C"` kernels keep their plain symbol names. Objects are compiled in parallel
//! (NUM_JOBS) and reused while the object is newer than every file it was built from (g++ -MMD)
//! and was built with the same command, so editing one kernel recompiles one file. The archive
//! is linked whole (`+whole-archive`): kernels register themselves from static constructors
//! (NLA_EMU_KERNEL) that nothing else references.
//!
//! Without a working C++ compiler the build still succeeds (with a warning) and every emulator
//! launch returns an error saying so (`cfg(nla_emu)` is not set). NLA_EMU_CXXFLAGS adds flags
//! (e.g. `-fsanitize=thread`, `-DNLA_EMU_UCONTEXT`).
//!
//! The `memcheck` feature builds the memory check (emu/memcheck.h: out-of-bounds and misaligned
//! accesses, reads of unwritten shared memory, races between blocks): the kernels get gcc's -fsanitize=thread instrumentation (the
//! runtime does not), and emu/memcheck.cpp, built with NLA_EMU_MEMCHECK, implements its hooks
//! instead of the TSan runtime. It cannot be combined with a ThreadSanitizer build (both would
//! define the hooks).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

fn sorted_files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn abs(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|e| panic!("emu: {}: {e}", p.display()))
}

/// Writes `content` unless the file already holds it (so its mtime only moves on a change).
fn write_if_changed(path: &Path, content: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(content) {
        fs::write(path, content).unwrap_or_else(|e| panic!("emu: write {}: {e}", path.display()));
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The prerequisites listed in a make-style depfile (`obj: a b \` ...).
fn depfile_inputs(d: &str) -> Vec<PathBuf> {
    let body = d.split_once(": ").map_or("", |(_, rest)| rest);
    let body = body.replace("\\\n", " ");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                cur.push(' ');
                chars.next();
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// Whether `obj` is up to date: built by `cmd`, newer than every input in its depfile.
fn fresh(obj: &Path, cmd: &str) -> bool {
    let (Some(t), Ok(old_cmd), Ok(deps)) = (
        mtime(obj),
        fs::read_to_string(obj.with_extension("cmd")),
        fs::read_to_string(obj.with_extension("d")),
    ) else {
        return false;
    };
    old_cmd == cmd
        && depfile_inputs(&deps)
            .iter()
            .all(|p| mtime(p).is_some_and(|m| m <= t))
}

struct Job {
    src: PathBuf,
    obj: PathBuf,
    /// Flags for this file only (the memory check's instrumentation of kernels).
    extra: Vec<String>,
    /// A kernel file: its function-local statics are `__shared__` (see [`move_shared`]).
    kernel: bool,
}

/// Moves the `__shared__` variables of a kernel object into section nla_emu_smem, which the
/// runtime poisons at each block start (and the memory check knows as shared memory): under
/// -fdata-sections every zero-initialised function-local static has its own section
/// `.bss._ZZ<mangled name>`, and in a kernel file those are exactly the `__shared__` arrays (see
/// emu/cuda_emu.h). Renaming keeps each section's flags, alignment and COMDAT group.
fn move_shared(obj: &Path) -> Result<(), String> {
    let run = |c: &mut Command| -> Result<Vec<u8>, String> {
        let o = c
            .output()
            .map_err(|e| format!("{c:?}: {e} (objdump and objcopy come with binutils)"))?;
        if !o.status.success() {
            return Err(format!("{c:?}: {}", String::from_utf8_lossy(&o.stderr)));
        }
        Ok(o.stdout)
    };
    let headers = run(Command::new("objdump").args(["-h", "-w"]).arg(obj))?;
    let renames: Vec<String> = String::from_utf8_lossy(&headers)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|name| name.starts_with(".bss._ZZ"))
        .map(|name| format!("--rename-section={name}=nla_emu_smem"))
        .collect();
    if !renames.is_empty() {
        run(Command::new("objcopy").args(&renames).arg(obj))?;
    }
    Ok(())
}

pub fn build(kernels: &[PathBuf]) {
    println!("cargo::rerun-if-changed=tests/emu_kernels");
    println!("cargo::rerun-if-env-changed=NLA_EMU_CXXFLAGS");
    println!("cargo::rustc-check-cfg=cfg(nla_emu)");
    let memcheck = env::var_os("CARGO_FEATURE_MEMCHECK").is_some();
    let extra_flags = env::var("NLA_EMU_CXXFLAGS").unwrap_or_default();
    if memcheck && extra_flags.contains("-fsanitize") {
        panic!(
            "emu: the `memcheck` feature cannot be combined with NLA_EMU_CXXFLAGS={extra_flags:?}: \
             the memory check implements the -fsanitize=thread hooks itself (build one or the other)"
        );
    }
    // The memory check instruments the kernels (not the runtime); see emu/memcheck.h.
    let kernel_flags: Vec<String> = if memcheck {
        vec!["-fsanitize=thread".into()]
    } else {
        Vec::new()
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("emu");
    let (wrap_dir, obj_dir) = (out.join("wrap"), out.join("obj"));
    for d in [&wrap_dir, &obj_dir] {
        fs::create_dir_all(d).unwrap_or_else(|e| panic!("emu: mkdir {}: {e}", d.display()));
    }

    let mut cc = cc::Build::new();
    cc.cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(false)
        .extra_warnings(false)
        .cargo_warnings(false)
        .define("NLA_EMU", None)
        .include(abs(Path::new("emu/include")))
        // kernels pun shared memory and vector types like CUDA code does; the GPU sets no errno;
        // a large frame must hit the fiber's guard region instead of jumping over it
        .flag("-fdata-sections") // one section per `__shared__` variable: see move_shared
        .flag("-fno-strict-aliasing")
        .flag("-fno-math-errno")
        .flag("-fstack-clash-protection")
        .flag("-pthread")
        .link_lib_modifier("+whole-archive");
    if memcheck {
        cc.define("NLA_EMU_MEMCHECK", None);
    }
    for f in extra_flags.split_whitespace() {
        cc.flag(f);
    }
    let tool = match cc.try_get_compiler() {
        Ok(t) => t,
        Err(e) => return missing(&format!("{e}")),
    };
    if Command::new(tool.path()).arg("--version").output().is_err() {
        return missing(&format!("`{}` does not run", tool.path().display()));
    }
    if memcheck && !tool.is_like_gnu() {
        panic!(
            "emu: the `memcheck` feature needs g++ (emu/memcheck.cpp implements the hooks of gcc's \
             -fsanitize=thread instrumentation), not `{}`: set CXX=g++",
            tool.path().display()
        );
    }

    // Sources: the runtime as is; every .cu through a wrapper in its own namespace.
    let emu_dir = abs(Path::new("emu"));
    let header = emu_dir.join("cuda_emu.h");
    let mut jobs: Vec<Job> = sorted_files("emu", "cpp")
        .into_iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            Job {
                obj: obj_dir.join(format!("emu_{stem}.o")),
                src: abs(&src),
                extra: Vec::new(),
                kernel: false,
            }
        })
        .collect();
    let test_kernels = sorted_files("tests/emu_kernels", "cu");
    for (group, cu) in kernels
        .iter()
        .map(|k| ("k", k))
        .chain(test_kernels.iter().map(|k| ("t", k)))
    {
        let stem: String = cu
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("{group}_{stem}");
        let wrapper = wrap_dir.join(format!("{name}.cpp"));
        write_if_changed(
            &wrapper,
            &format!(
                "// Generated by build/emu.rs: {} in its own namespace (see emu/cuda_emu.h).\n\
                 #include \"{}\"\nnamespace nla_emu_file_{name} {{\n#include \"{}\"\n}}\n",
                cu.display(),
                header.display(),
                abs(cu).display()
            ),
        );
        jobs.push(Job {
            src: wrapper,
            obj: obj_dir.join(format!("{name}.o")),
            extra: kernel_flags.clone(),
            kernel: true,
        });
    }

    // Compile what is stale, NUM_JOBS at a time.
    let base: Vec<String> = std::iter::once(tool.path().to_string_lossy().into_owned())
        .chain(tool.args().iter().map(|a| a.to_string_lossy().into_owned()))
        .collect();
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::<String>::new());
    let njobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..njobs {
            s.spawn(|| loop {
                let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let mut args = base.clone();
                args.extend(job.extra.iter().cloned());
                args.extend(
                    ["-MMD", "-MF"]
                        .into_iter()
                        .map(String::from)
                        .chain([job.obj.with_extension("d").to_string_lossy().into_owned()])
                        .chain(["-c".into(), job.src.to_string_lossy().into_owned()])
                        .chain(["-o".into(), job.obj.to_string_lossy().into_owned()]),
                );
                let cmd = args.join(" ");
                if fresh(&job.obj, &cmd) {
                    continue;
                }
                let _ = fs::remove_file(job.obj.with_extension("cmd"));
                let mut c = Command::new(&args[0]);
                c.args(&args[1..]);
                for (k, v) in tool.get_envs() {
                    c.env(k, v);
                }
                match c.output() {
                    Ok(o) if o.status.success() => {
                        // a kernel object is fresh only once its shared memory has moved
                        let moved = if job.kernel {
                            move_shared(&job.obj)
                        } else {
                            Ok(())
                        };
                        match moved {
                            Ok(()) => {
                                let _ = fs::write(job.obj.with_extension("cmd"), &cmd);
                            }
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    }
                    Ok(o) => errors.lock().unwrap().push(format!(
                        "{}\n{}{}",
                        cmd,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => errors.lock().unwrap().push(format!("{cmd}: {e}")),
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        panic!(
            "emu: compiling for the CPU emulator failed (kernels/*.cu must compile as C++ \
             against emu/cuda_emu.h):\n\n{}",
            errors.join("\n\n")
        );
    }

    let objs: Vec<&Path> = jobs.iter().map(|j| j.obj.as_path()).collect();
    cc.out_dir(&out);
    let lib = cc.create_archive("nla_emu", objs);
    cc::emit_link_directives(&cc, &lib);
    println!("cargo::rustc-cfg=nla_emu");
}

fn missing(why: &str) {
    println!(
        "cargo::warning=no C++ compiler ({why}): the CPU emulator of the CUDA kernels is not \
         built, and emulated launches will fail (install g++ for the kernel tests)"
    );
}
