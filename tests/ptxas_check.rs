//! The build's spill check (build/ptxas.rs, run by build/nvcc.rs on every kernel's ptxas -v
//! report): reading ptxas's lines, the `// nla: hot` marks, and the check on a kernel that
//! ptxas really spills (tests/ptxas/spill.cu, compiled here with the build's nvcc: NVCC, as
//! .ci/run exports it; without one that case prints why and passes as skipped).

#[path = "../build/ptxas.rs"]
mod ptxas;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use ptxas::{hot_spills, is_hot, parse_ptxas, KernelStats};

/// ptxas 13's -v lines for two kernels, one spilling, as the build reads them.
const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fast_f32' for 'sm_90a'
ptxas info    : Function properties for fast_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 8.804 ms
ptxas info    : Compiling entry function 'big_bf16' for 'sm_90a'
ptxas info    : Function properties for big_bf16
    24 bytes stack frame, 28 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 69632 bytes smem
ptxas info    : Compile time = 1.5 ms
";

#[test]
fn ptxas_lines_give_each_kernels_figures() {
    let mut stats = BTreeMap::new();
    parse_ptxas("k", REPORT, &mut stats);
    let f = &stats["fast_f32"];
    assert!(f.entry && f.file == "k");
    assert_eq!(
        (f.registers, f.barriers, f.smem, f.stack),
        (Some(22), 1, 256, 0)
    );
    assert_eq!((f.spill_stores, f.spill_loads), (0, 0));
    let b = &stats["big_bf16"];
    assert_eq!((b.registers, b.smem, b.stack), (Some(255), 69632, 24));
    assert_eq!((b.spill_stores, b.spill_loads), (28, 36));
    assert_eq!(stats.len(), 2, "{:?}", stats.keys());
}

#[test]
fn hot_marks_name_kernels_or_the_whole_file() {
    let file = "// nla: hot big_bf16 other\n__global__ void big_bf16() {}\n";
    assert!(is_hot(file, "big_bf16") && is_hot(file, "other"));
    assert!(!is_hot(file, "big"), "a prefix of a marked name");
    assert!(!is_hot(file, "fast_f32"));
    // the bare mark: every kernel of the file
    assert!(is_hot("  //   nla: hot\n", "fast_f32"));
    // only a comment line marks
    assert!(!is_hot("int x; // nla: hot\n", "fast_f32"));
    assert!(!is_hot("/* nla: hot */\n", "fast_f32"));

    let mut stats = BTreeMap::new();
    parse_ptxas("k", REPORT, &mut stats);
    let files = |text: &str| vec![(PathBuf::from("kernels/k.cu"), text.to_string())];
    let spills = hot_spills(&files("// nla: hot\n"), &stats);
    assert_eq!(spills.len(), 1, "{spills:?}");
    assert!(
        spills[0].starts_with("big_bf16 (kernels/k.cu): ")
            && spills[0].contains("28 bytes spill stores"),
        "{}",
        spills[0]
    );
    assert!(hot_spills(&files("// nla: hot fast_f32\n"), &stats).is_empty());
    // kernels of another file are not this file's
    let other = vec![(PathBuf::from("kernels/j.cu"), "// nla: hot\n".to_string())];
    assert!(hot_spills(&other, &stats).is_empty());
}

/// tests/ptxas/spill.cu through nvcc and ptxas with build/nvcc.rs's cubin flags: the
/// hot spilling kernel is reported, the spilling one not marked hot and the hot one that fits
/// are not.
#[test]
fn a_hot_kernel_that_ptxas_spills_is_reported() {
    let Some(nvcc) = std::env::var_os("NVCC").filter(|p| !p.is_empty()) else {
        eprintln!("skipped: NVCC is not set (scripts/install-nvcc.sh prints one)");
        return;
    };
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ptxas/spill.cu");
    let out = tempfile::tempdir().unwrap();
    let ccbin = std::env::var("NVCC_CCBIN").unwrap_or_else(|_| "g++".into());
    let run = Command::new(&nvcc)
        .args(ptxas::CUBIN_TARGET)
        .args(ptxas::NVCC_FLAGS)
        .args(["-ccbin", &ccbin, "-o"])
        .arg(out.path().join("spill.cubin"))
        .arg(&src)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "nvcc failed:\n{text}");
    let mut stats: BTreeMap<String, KernelStats> = BTreeMap::new();
    parse_ptxas("spill", &text, &mut stats);
    let get = |k: &str| match stats.get(k) {
        Some(s) => s,
        None => panic!("{k} is not in ptxas's report:\n{text}"),
    };
    for k in ["spills_hot", "spills_cold"] {
        assert!(get(k).spill_stores > 0, "{k} does not spill:\n{text}");
        assert_eq!(get(k).registers, Some(32), "{k}");
    }
    assert_eq!(get("fits_hot").spill_stores, 0);
    let file = std::fs::read_to_string(&src).unwrap();
    let spills = hot_spills(&[(src.clone(), file)], &stats);
    assert_eq!(spills.len(), 1, "{spills:?}");
    assert!(spills[0].starts_with("spills_hot ("), "{}", spills[0]);
}
