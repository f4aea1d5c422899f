//! Replaying a step as one graph ([`crate::device::Device::replay`] on the kernel devices).
//!
//! A decode step launches ~16 kernels and matmuls per layer, each a few µs of host time on a
//! GPU: more than the GPU needs for them at batch 1. A CUDA graph captured once replays them
//! all in one launch, but only stays right while every launch would get the same arguments
//! (the same buffers, shapes and scalars). So a replay is decided from the step itself: the
//! step runs first with the launches only recorded ([`Recorder`]: ~0.1 µs a call, nothing
//! reaches the GPU), and the graph is replayed when the record equals the one it was captured
//! from, captured again when it does not. A step that does anything but launch kernels and
//! matmuls (allocate, copy, wait) cannot be replayed: recording fails and it runs as it is.

use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// Whether the kernel devices replay steps as graphs: yes, unless the environment sets
/// `NLA_GRAPHS=0` (to measure what the graphs gain, or to rule them out when debugging).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| enabled_by(std::env::var("NLA_GRAPHS").ok().as_deref()))
}

/// [`enabled`] for a value of `NLA_GRAPHS`: off for "0", "false", "off" or "no".
fn enabled_by(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "false" | "off" | "no")
    )
}

/// One call a recorded step made: a kernel launch (its symbol, geometry and the 8-byte slot of
/// every argument: device addresses and scalars) or a matmul (its operands' addresses, dims,
/// transposes, scales and dtypes).
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    Launch {
        sym: String,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: Vec<u64>,
    },
    Matmul {
        /// addresses of c, a, b
        addrs: [u64; 3],
        /// m, n, k, ta, tb, and the bits of alpha and beta
        shape: [u64; 7],
        /// dtypes of c, a, b
        dtypes: [crate::device::Dtype; 3],
    },
}

impl Call {
    /// A kernel launch with its arguments' slots.
    pub fn launch(
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &super::EmuArgs<'_>,
    ) -> Call {
        Call::Launch {
            sym: sym.to_string(),
            grid,
            block,
            smem,
            args: args.slots().to_vec(),
        }
    }
}

/// Records the calls of a step instead of making them, while on.
#[derive(Debug, Default)]
pub struct Recorder {
    calls: Mutex<Option<Vec<Call>>>,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Call>>> {
        // a poisoned lock only means a panic elsewhere: the record itself is plain data
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, calls are recorded, not made.
    pub fn start(&self) {
        *self.lock() = Some(Vec::new());
    }

    /// Stops recording; the calls recorded since [`Recorder::start`].
    pub fn stop(&self) -> Vec<Call> {
        self.lock().take().unwrap_or_default()
    }

    /// Whether calls are being recorded.
    pub fn active(&self) -> bool {
        self.lock().is_some()
    }

    /// Records `call()` and returns true while recording (the caller then does not make the
    /// call); false otherwise.
    pub fn record(&self, call: impl FnOnce() -> Call) -> bool {
        match self.lock().as_mut() {
            Some(calls) => {
                calls.push(call());
                true
            }
            None => false,
        }
    }

    /// An error for `op`, which a step to replay cannot do, while recording; Ok otherwise.
    pub fn refuse(&self, op: &str) -> Result<()> {
        if self.lock().is_some() {
            Err(Error::invalid(
                "graph",
                format!("a step to replay launches kernels and matmuls only, not {op}"),
            ))
        } else {
            Ok(())
        }
    }
}

/// A step's graph: the calls it was captured from and the device's executable graph (`E`: a
/// CUDA graph; `()` on the emulator, which runs the recorded step's launches instead).
#[derive(Debug)]
pub struct Graph<E> {
    pub(crate) calls: Vec<Call>,
    pub(crate) exec: Option<E>,
    /// times the graph was captured, and replayed without capturing
    pub captures: u64,
    pub replays: u64,
    /// the device failed to capture a step: no graphs from then on
    pub broken: bool,
}

impl<E> Default for Graph<E> {
    fn default() -> Self {
        Graph {
            calls: Vec::new(),
            exec: None,
            captures: 0,
            replays: 0,
            broken: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::device::emu::EmuMode;
    use crate::device::emu_device::EmuDevice;
    use crate::device::{Device, View, ViewMut};

    fn emu() -> EmuDevice {
        EmuDevice::new(EmuMode::Forward, 3)
    }

    #[test]
    fn nla_graphs_turns_graphs_off() {
        for (v, on) in [(None, true), (Some("1"), true), (Some("0"), false)] {
            assert_eq!(super::enabled_by(v), on, "{v:?}");
        }
        assert!(!super::enabled_by(Some(" Off")));
    }

    #[test]
    fn a_step_is_replayed_while_its_launches_stay_the_same() {
        let dev = emu();
        let (a, b) = (
            dev.upload(&[1.0, 2.0, 3.0]).unwrap(),
            dev.upload(&[10.0; 3]).unwrap(),
        );
        let a2 = dev.upload(&[5.0, 6.0, 7.0]).unwrap();
        let mut out = dev.alloc(3).unwrap();
        let mut g = Default::default();
        for (x, want, captures) in [(&a, 11.0, 1), (&a, 11.0, 1), (&a2, 15.0, 2), (&a2, 15.0, 2)] {
            let mut step = || dev.residual_fwd(ViewMut::all(&mut out), View::all(x), View::all(&b));
            dev.replay(&mut g, &mut step).unwrap();
            let got = dev.download(View::all(&out)).unwrap();
            assert_eq!(got[0], want);
            // another input buffer is another launch: captured again
            assert_eq!(dev.graph_captures(), captures);
        }
        assert_eq!((g.captures, g.replays), (2, 2));
    }

    #[test]
    fn a_step_that_does_more_than_launch_runs_as_it_is() {
        let dev = emu();
        let mut out = dev.alloc(4).unwrap();
        let mut g = Default::default();
        for _ in 0..2 {
            // a fill is a driver memset, which a graph of launches does not hold
            let mut step = || dev.fill(ViewMut::all(&mut out), 2.5);
            dev.replay(&mut g, &mut step).unwrap();
            assert_eq!(dev.download(View::all(&out)).unwrap(), vec![2.5; 4]);
        }
        assert_eq!((dev.graph_captures(), g.captures, g.replays), (0, 0, 0));
        // and the device works as before after the refused recording
        dev.fill(ViewMut::all(&mut out), 1.0).unwrap();
        assert_eq!(dev.download(View::all(&out)).unwrap(), vec![1.0; 4]);
    }

    #[test]
    fn a_recorded_matmul_names_its_operands() {
        let dev = emu();
        let (a, b) = (
            dev.upload(&[1.0; 6]).unwrap(),
            dev.upload(&[2.0; 6]).unwrap(),
        );
        let mut c = dev.alloc(4).unwrap();
        let mut g = Default::default();
        for scale in [1.0, 1.0, 0.5] {
            let mut step = || {
                let (av, bv) = (View::all(&a), View::all(&b));
                dev.matmul(
                    ViewMut::all(&mut c),
                    av,
                    bv,
                    2,
                    2,
                    3,
                    false,
                    true,
                    scale,
                    0.0,
                )
            };
            dev.replay(&mut g, &mut step).unwrap();
            assert_eq!(dev.download(View::all(&c)).unwrap(), vec![6.0 * scale; 4]);
        }
        // alpha is part of the call: 0.5 is another graph
        assert_eq!((g.captures, g.replays), (2, 1));
    }
}
