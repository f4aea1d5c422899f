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

#[test]
fn cuda_and_auto_follow_the_machine() {
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
