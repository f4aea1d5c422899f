//! The launches of benches/common/op_cases.rs (the kernel benches benches/cuda.rs times on the
//! GPU) on the emulator at tiny sizes, in f32 and bf16: every case's buffers and dimensions
//! pass the launchers' checks and launch kernels, and the bench ids are distinct, so a wrong
//! case fails here instead of stopping a GPU run's benches.

#[path = "../benches/common/op_cases.rs"]
#[allow(dead_code)] // GPU: the benches' sizes
mod op_cases;

use std::collections::HashSet;

use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::EmuDevice;
use nla_engine::device::Dtype;

#[test]
fn every_bench_case_launches_on_the_emulator() {
    let dev = EmuDevice::new(EmuMode::Forward, 0);
    let mut ids = HashSet::new();
    for dt in [Dtype::F32, Dtype::Bf16] {
        let mut time =
            |group: &str,
             name: &str,
             bytes: u64,
             launch: &mut dyn FnMut(usize) -> nla_engine::Result<()>| {
                let before = dev.launcher().launches();
                // twice, as a bench repeats it (the `+=` and in-place cases run on their last output)
                launch(0)?;
                launch(1)?;
                let n = dev.launcher().launches() - before;
                assert!(n >= 2, "{group}/{name}: {n} kernel launches for 2 calls");
                assert!(bytes > 0, "{group}/{name}: no bytes");
                assert!(
                    ids.insert(format!("{group}/{name}")),
                    "{group}/{name} twice"
                );
                Ok(())
            };
        op_cases::each(&dev, &op_cases::TINY, dt, &mut time).unwrap();
    }
    // 16 cases in each dtype, and the policy loss (fwd, bwd) and the conversions (both ways)
    // once
    assert_eq!(ids.len(), 2 * 16 + 2 + 2, "{ids:?}");
}
