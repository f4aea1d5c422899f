//! `--device`: which device each kind opens, and the errors where it cannot. The CUDA cases
//! depend on the machine: without a GPU (CI) `cuda` must fail saying why and `auto` must fall
//! back to the CPU; with one, both open it.

use nla_engine::device::cuda;
use nla_engine::device::select::{open, AnyDevice};
use nla_engine::device::{Device, View, ViewMut};

#[test]
fn cpu_and_emu_open() {
    assert!(matches!(open("cpu").unwrap(), AnyDevice::Cpu(_)));
    let AnyDevice::Emu(emu) = open("emu").unwrap() else {
        panic!("emu did not open the emulated device");
    };
    // it runs kernels: residual out = a + b
    let (a, b) = (
        emu.upload(&[1.0, 2.5]).unwrap(),
        emu.upload(&[0.5, -4.0]).unwrap(),
    );
    let mut out = emu.alloc(2).unwrap();
    emu.residual_fwd(ViewMut::all(&mut out), View::all(&a), View::all(&b))
        .unwrap();
    assert_eq!(emu.download(View::all(&out)).unwrap(), vec![1.5, -1.5]);
    assert_eq!(emu.launcher().launches(), 1);
}

#[test]
fn unknown_kinds_are_refused_naming_the_choices() {
    for kind in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
        let e = open(kind).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{kind}`")) && e.contains("cpu, cuda, cuda:N, auto or emu"),
            "{kind}: {e}"
        );
    }
}

/// Held by the tests of this file that open the GPU, one at a time.
static ONE_GPU_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn cuda_and_auto_follow_the_machine() {
    let _one = ONE_GPU_TEST.lock().unwrap_or_else(|e| e.into_inner());
    match cuda::probe() {
        Err(why) => {
            // scripts/gpu-check.sh sets NLA_REQUIRE_GPU=1: there a missing GPU is a failure
            if std::env::var("NLA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("NLA_REQUIRE_GPU=1 but no usable GPU: {why}");
            }
            eprintln!("no GPU here: {why}");
            for kind in ["cuda", "cuda:0", "cuda:3"] {
                let e = open(kind).unwrap_err().to_string();
                assert!(e.starts_with("cuda: --device cuda: "), "{kind}: {e}");
                assert!(e.contains(&why), "{kind}: {e} does not say why ({why})");
            }
            let dev = open("auto").unwrap();
            assert!(matches!(dev, AnyDevice::Cpu(_)), "auto: {}", dev.name());
        }
        Ok(n) => {
            eprintln!("{n} GPU(s)");
            assert!(matches!(open("cuda").unwrap(), AnyDevice::Cuda(_)));
            assert!(matches!(open("auto").unwrap(), AnyDevice::Cuda(_)));
            let e = open(&format!("cuda:{n}")).unwrap_err().to_string();
            assert!(e.contains(&format!("GPU {n} asked for")), "{e}");
        }
    }
}

/// The GPU's memory budget counts memory freed into the device's pool as free: the pool keeps
/// what a step frees (for the next step's allocations), which cuMemGetInfo counts as used.
/// (Measured with the other GPU test of this file held off: a device it opens allocates too.)
#[test]
fn cuda_memory_budget_counts_memory_freed_into_the_pool() {
    let _one = ONE_GPU_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(_) = cuda::probe() else {
        assert!(
            !std::env::var("NLA_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "NLA_REQUIRE_GPU=1 but no usable GPU"
        );
        return;
    };
    let dev = cuda::CudaDevice::new(0).unwrap();
    let budget = |what: &str| {
        let b = dev.memory_budget().unwrap().unwrap();
        eprintln!("{what}: {:.3} GiB", b as f64 / (1u64 << 30) as f64);
        b as i64
    };
    const GIB: i64 = 1 << 30;
    // other allocations of the driver or cuBLASLt may come and go by a few MiB
    const SLACK: i64 = 64 << 20;
    let before = budget("before");
    let buf = dev.alloc(1 << 28).unwrap(); // 1 GiB of f32
    dev.synchronize().unwrap();
    let held = budget("1 GiB held");
    assert!((before - GIB - held).abs() < SLACK, "{before} -> {held}");
    drop(buf);
    dev.synchronize().unwrap();
    let after = budget("freed");
    assert!((before - after).abs() < SLACK, "{before} -> {after}");
    // the pool kept the freed GiB (else the driver took it back and the budget above proves
    // nothing about the pool)
    let idle = dev.pool_idle().unwrap() as i64;
    assert!(
        idle > GIB - SLACK,
        "the pool keeps {idle} bytes after a GiB was freed"
    );
}
