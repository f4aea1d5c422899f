//! Replaying a step as one graph ([`crate::device::Device::replay`] on the kernel devices).
//!
//! A decode step launches ~10 kernels and matmuls per layer, each a few µs of host time on a
//! GPU: more than the GPU needs for them at batch 1. A CUDA graph captured once replays them
//! all in one launch, but only stays right while every launch would get the same arguments
//! (the same buffers, shapes and scalars). So a replay is decided from the step itself: the
//! step runs first with the launches only recorded ([`Recorder`]: each call compared in place
//! with the captured one, the record not copied while they agree; nothing reaches the GPU),
//! and the graph is replayed when the record equals the one it was captured from; otherwise
//! the step runs as it is and is captured again, its capture checked against the record. A
//! step that does anything but launch kernels and matmuls (allocate, copy, wait) cannot be
//! replayed: recording fails (even if the step ignores the refusal) and it runs as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;

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
/// every argument: device addresses and scalars) or a matmul (its operands' addresses and
/// lengths, dims, transposes, scales and dtypes).
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    Launch {
        sym: String,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: Vec<u64>,
    },
    Matmul(MatmulCall),
}

/// A matmul as recorded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulCall {
    /// addresses of c, the addend (c itself unless `matmul_add`), a, b, then the lengths in
    /// elements of c, a, b
    pub operands: [u64; 7],
    /// m, n, k, ta, tb, and the bits of alpha and beta
    pub shape: [u64; 7],
    /// dtypes of c, a, b
    pub dtypes: [crate::device::Dtype; 3],
}

/// A call as a launcher sees it, compared with a recorded one without allocating.
#[derive(Clone, Copy, Debug)]
pub enum CallRef<'a> {
    Launch {
        sym: &'a str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &'a [u64],
    },
    Matmul(MatmulCall),
}

impl CallRef<'_> {
    /// A kernel launch with its arguments' slots.
    pub fn launch<'a>(
        sym: &'a str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &'a super::EmuArgs<'_>,
    ) -> CallRef<'a> {
        CallRef::Launch {
            sym,
            grid,
            block,
            smem,
            args: args.slots(),
        }
    }

    fn is(&self, call: &Call) -> bool {
        match (self, call) {
            (
                CallRef::Launch {
                    sym,
                    grid,
                    block,
                    smem,
                    args,
                },
                Call::Launch {
                    sym: s,
                    grid: g,
                    block: b,
                    smem: m,
                    args: a,
                },
            ) => sym == s && grid == g && block == b && smem == m && *args == a.as_slice(),
            (CallRef::Matmul(x), Call::Matmul(y)) => x == y,
            _ => false,
        }
    }

    fn to_call(self) -> Call {
        match self {
            CallRef::Launch {
                sym,
                grid,
                block,
                smem,
                args,
            } => Call::Launch {
                sym: sym.to_string(),
                grid,
                block,
                smem,
                args: args.to_vec(),
            },
            CallRef::Matmul(m) => Call::Matmul(m),
        }
    }
}

/// A recording in progress: the calls so far, checked against the ones of the last capture
/// while they agree (the record is not copied then), and the thread recording.
#[derive(Debug)]
struct Recording {
    thread: ThreadId,
    /// calls are checked and made (a capture), not only recorded
    verify: bool,
    calls: Vec<Call>,
    /// calls of this step so far; while `same`, calls[..n] are the expected ones it matched
    n: usize,
    same: bool,
    /// why the step cannot be replayed: a call it tried that a graph cannot hold (refused,
    /// even if the step went on), or one the device made without recording it
    failed: Option<String>,
}

/// Records the calls of a step instead of making them, while on, for the thread that started
/// it (another thread's calls go through as usual, and it cannot record meanwhile: a device
/// replaying a step should not be used by other threads, see
/// [`crate::device::Device::replay`]); or checks a capture's calls against the record. Also
/// counts what the replays did on this device.
#[derive(Debug, Default)]
pub struct Recorder {
    rec: Mutex<Option<Recording>>,
    captures: AtomicU64,
    replays: AtomicU64,
    failures: AtomicU64,
    /// why the first capture that failed did
    first_failure: OnceLock<String>,
    /// kernel launches and matmuls of the last graph captured
    last_graph: [AtomicU64; 2],
}

/// Stops a recording when dropped (also when the step panics), so the device does not keep
/// recording.
pub struct Guard<'a>(&'a Recorder);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.take_own();
    }
}

impl Guard<'_> {
    /// The step's calls and whether they are the expected ones (what [`Recorder::start`] or
    /// [`Recorder::verify`] was given); an error when the step did something a graph cannot
    /// hold.
    pub fn finish(self) -> Result<(Vec<Call>, bool)> {
        let Some(mut r) = self.0.take_own() else {
            return Err(Error::invalid("graph", "the recording was lost"));
        };
        if let Some(why) = r.failed {
            return Err(Error::invalid("graph", why));
        }
        let same = r.same && r.n == r.calls.len();
        r.calls.truncate(r.n);
        Ok((r.calls, same))
    }
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        // a poisoned lock only means a panic elsewhere: the record itself is plain data
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This thread's recording, taken (none: another thread's stays).
    fn take_own(&self) -> Option<Recording> {
        let here = std::thread::current().id();
        let mut lock = self.lock();
        if lock.as_ref().is_some_and(|r| r.thread == here) {
            lock.take()
        } else {
            None
        }
    }

    fn begin(
        &self,
        expected: Vec<Call>,
        verify: bool,
    ) -> std::result::Result<Guard<'_>, Vec<Call>> {
        let mut lock = self.lock();
        if lock.is_some() {
            // another recording (another thread's replay): this step runs as it is
            return Err(expected);
        }
        *lock = Some(Recording {
            thread: std::thread::current().id(),
            verify,
            calls: expected,
            n: 0,
            same: true,
            failed: None,
        });
        Ok(Guard(self))
    }

    /// From now on this thread's calls are recorded, not made, and compared with `expected`
    /// (the calls a graph was captured from) until [`Guard::finish`]. Refused (`expected` given
    /// back) while another recording is on.
    pub fn start(&self, expected: Vec<Call>) -> std::result::Result<Guard<'_>, Vec<Call>> {
        self.begin(expected, false)
    }

    /// From now on this thread's calls are made as usual (into a capture) and compared with
    /// `expected`, the record the capture must hold, until [`Guard::finish`]. Refused while
    /// another recording is on.
    pub fn verify(&self, expected: Vec<Call>) -> std::result::Result<Guard<'_>, Vec<Call>> {
        self.begin(expected, true)
    }

    /// Whether this thread's calls are being recorded or checked (a capture).
    pub fn on_here(&self) -> bool {
        let here = std::thread::current().id();
        self.lock().as_ref().is_some_and(|r| r.thread == here)
    }

    /// Whether this thread's calls are being recorded (not made).
    pub fn active(&self) -> bool {
        let here = std::thread::current().id();
        self.lock()
            .as_ref()
            .is_some_and(|r| r.thread == here && !r.verify)
    }

    /// Records `call` while this thread records or verifies; true when the caller is then not
    /// to make the call (recording), false when it is (verifying, or no recording).
    pub fn record(&self, call: CallRef<'_>) -> bool {
        let here = std::thread::current().id();
        let mut lock = self.lock();
        let Some(r) = lock.as_mut().filter(|r| r.thread == here) else {
            return false;
        };
        if r.same && r.n < r.calls.len() && call.is(&r.calls[r.n]) {
            r.n += 1;
            return !r.verify;
        }
        if r.same {
            // the first call that differs: from here the step's own calls
            r.calls.truncate(r.n);
            r.same = false;
        }
        r.calls.push(call.to_call());
        r.n += 1;
        !r.verify
    }

    /// An error for `op`, which a step to replay cannot do, while this thread records (the
    /// recording then fails, even if the step goes on); Ok otherwise.
    pub fn refuse(&self, op: &str) -> Result<()> {
        let why = || format!("a step to replay launches kernels and matmuls only, not {op}");
        if self.fail_recording(&why) {
            Err(Error::invalid("graph", why()))
        } else {
            Ok(())
        }
    }

    /// Fails this thread's recording, if it records, because of `why`: true if it did.
    /// (`why` is only called then: no message is made on the calls of a device not
    /// recording.)
    pub fn fail_recording(&self, why: &dyn Fn() -> String) -> bool {
        let here = std::thread::current().id();
        let mut lock = self.lock();
        match lock.as_mut().filter(|r| r.thread == here && !r.verify) {
            Some(r) => {
                r.failed.get_or_insert_with(why);
                true
            }
            None => false,
        }
    }

    /// One more capture, replay or failed capture on this device.
    pub(crate) fn count(&self, what: Count) {
        let c = match what {
            Count::Capture => &self.captures,
            Count::Replay => &self.replays,
            Count::Failure => &self.failures,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// One more capture, of these calls.
    pub(crate) fn captured(&self, calls: &[Call]) {
        self.count(Count::Capture);
        let matmuls = calls
            .iter()
            .filter(|c| matches!(c, Call::Matmul(_)))
            .count();
        let sizes = [calls.len() - matmuls, matmuls];
        for (slot, n) in self.last_graph.iter().zip(sizes) {
            slot.store(n as u64, Ordering::Relaxed);
        }
    }

    /// Kernel launches and matmuls of the last graph captured on this device (0 before the
    /// first).
    pub fn last_graph(&self) -> [u64; 2] {
        self.last_graph
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed))
    }

    /// One more failed capture, and why.
    pub(crate) fn fail(&self, why: String) {
        self.count(Count::Failure);
        let _ = self.first_failure.set(why);
    }

    /// Why the first capture that failed on this device did, if one did.
    pub fn first_failure(&self) -> Option<&str> {
        self.first_failure.get().map(String::as_str)
    }

    /// Steps captured, replayed without capturing, and captures that failed (the step then ran
    /// as it is and its graph is given up), on this device so far.
    pub fn counts(&self) -> [u64; 3] {
        [&self.captures, &self.replays, &self.failures].map(|c| c.load(Ordering::Relaxed))
    }
}

/// What [`Recorder::count`] counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Count {
    Capture,
    Replay,
    Failure,
}

/// A step's graph: the calls it was captured from and the device's executable graph (`E`: a
/// CUDA graph; on the emulator the recorded calls themselves, run again as recorded).
#[derive(Debug)]
pub struct Graph<E> {
    pub(crate) calls: Vec<Call>,
    pub(crate) exec: Option<E>,
    /// the device failed to capture this step: no graph for it from then on
    pub(crate) broken: bool,
}

impl<E> Default for Graph<E> {
    fn default() -> Self {
        Graph {
            calls: Vec::new(),
            exec: None,
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
    fn recording_is_for_the_thread_that_started_it() {
        use super::{CallRef, Recorder};
        let r = Recorder::default();
        let args = crate::device::emu::EmuArgs::new();
        let call = CallRef::launch("k", [1; 3], [32, 1, 1], 0, &args);
        let rec = r.start(Vec::new()).unwrap();
        assert!(r.record(call));
        std::thread::scope(|s| {
            s.spawn(|| {
                // another thread's calls are made, and it cannot record meanwhile
                assert!(!r.record(call) && r.refuse("a copy").is_ok());
                assert!(r.start(Vec::new()).is_err() && r.verify(Vec::new()).is_err());
            });
        });
        let (calls, same) = rec.finish().unwrap();
        assert_eq!((calls.len(), same), (1, false));
        // the same call again matches the record
        let rec = r.start(calls.clone()).unwrap();
        assert!(r.record(call));
        assert!(rec.finish().unwrap().1);
        // a dropped recording (a step that panicked) stops recording
        drop(r.start(Vec::new()).unwrap());
        assert!(!r.active() && !r.record(call));
        // a refused call fails the recording, even when the step goes on after it
        let rec = r.start(Vec::new()).unwrap();
        assert!(r.refuse("a copy").is_err() && r.record(call));
        assert!(rec.finish().is_err());
        // verifying (a capture): calls are made, and compared with the record
        let check = r.verify(calls.clone()).unwrap();
        assert!(!r.active() && !r.record(call) && r.refuse("a copy").is_ok());
        assert!(check.finish().unwrap().1);
        let check = r.verify(calls).unwrap();
        assert!(!r.record(call) && !r.record(call));
        assert!(!check.finish().unwrap().1, "a capture with another call");
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
        assert_eq!(dev.launcher().recorder_counts(), [2, 2, 0]);
    }

    /// A capture is checked against the record (on a GPU, call by call as it is captured):
    /// checked calls are made and compared, matmuls as launches.
    #[test]
    fn a_checked_capture_makes_and_compares_launches_and_matmuls() {
        use crate::device::gpu::Launch;
        let dev = emu();
        let (a, b) = (
            dev.upload(&[1.0, 2.0, 3.0]).unwrap(),
            dev.upload(&[0.5; 3]).unwrap(),
        );
        let w = dev.upload(&[2.0; 6]).unwrap();
        let (mut out, mut h) = (dev.alloc(3).unwrap(), dev.alloc(2).unwrap());
        let rec = dev.launcher().recorder().unwrap();
        use crate::device::emu_device::EmuBuf;
        let step = |out: &mut EmuBuf, h: &mut EmuBuf, alpha: f32| -> crate::Result<()> {
            dev.residual_fwd(ViewMut::all(out), View::all(&a), View::all(&b))?;
            // h [2,1] = alpha * w [2,3] · out [3,1]
            let (w, o) = (View::all(&w), View::all(&*out));
            dev.matmul(ViewMut::all(h), w, o, 2, 1, 3, false, false, alpha, 0.0)
        };
        let r = rec.start(Vec::new()).unwrap();
        step(&mut out, &mut h, 1.0).unwrap();
        let (calls, _) = r.finish().unwrap();
        assert_eq!(calls.len(), 2);
        let (out_now, h_now) = (
            dev.download(View::all(&out)).unwrap(),
            dev.download(View::all(&h)).unwrap(),
        );
        assert_eq!(
            (out_now, h_now),
            (vec![0.0; 3], vec![0.0; 2]),
            "made while recording"
        );
        let check = rec.verify(calls.clone()).unwrap();
        step(&mut out, &mut h, 1.0).unwrap();
        assert!(check.finish().unwrap().1, "the same calls");
        assert_eq!(dev.download(View::all(&out)).unwrap(), vec![1.5, 2.5, 3.5]);
        assert_eq!(dev.download(View::all(&h)).unwrap(), vec![15.0; 2]);
        // a capture whose matmul has another scale is not the record
        let check = rec.verify(calls).unwrap();
        step(&mut out, &mut h, 0.5).unwrap();
        assert!(!check.finish().unwrap().1, "another matmul");
        assert_eq!(dev.download(View::all(&h)).unwrap(), vec![7.5; 2]);
    }

    /// A step that goes on after a refused call (ignoring its error) cannot be replayed: the
    /// graph would leave the call out. It runs as it is, every time.
    #[test]
    fn a_step_that_ignores_a_refusal_runs_as_it_is() {
        let dev = emu();
        let (a, b) = (
            dev.upload(&[1.0, 2.0, 3.0]).unwrap(),
            dev.upload(&[0.5; 3]).unwrap(),
        );
        let (mut out, mut other) = (dev.alloc(3).unwrap(), dev.alloc(2).unwrap());
        let mut g = Default::default();
        for i in 0..3 {
            let mut step = || {
                let _ = dev.fill(ViewMut::all(&mut other), i as f32);
                dev.residual_fwd(ViewMut::all(&mut out), View::all(&a), View::all(&b))
            };
            dev.replay(&mut g, &mut step).unwrap();
            assert_eq!(dev.download(View::all(&out)).unwrap(), vec![1.5, 2.5, 3.5]);
            assert_eq!(dev.download(View::all(&other)).unwrap(), vec![i as f32; 2]);
        }
        assert_eq!(dev.launcher().recorder_counts(), [0, 0, 0]);
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
        assert_eq!(dev.launcher().recorder_counts(), [0, 0, 0]);
        // and the device works as before after the refused recording
        dev.fill(ViewMut::all(&mut out), 1.0).unwrap();
        assert_eq!(dev.download(View::all(&out)).unwrap(), vec![1.0; 4]);
    }

    /// matmul_add's addend is part of the call: a step alternating between two addends is
    /// captured again at each change, and every replay adds the right one.
    #[test]
    fn a_recorded_matmul_add_names_its_addend() {
        let dev = emu();
        let (a, b) = (
            dev.upload(&[1.0; 6]).unwrap(),
            dev.upload(&[2.0; 6]).unwrap(),
        );
        let xs = [
            dev.upload(&[1.0; 4]).unwrap(),
            dev.upload(&[3.0; 4]).unwrap(),
        ];
        let mut d = dev.alloc(4).unwrap();
        let mut g = Default::default();
        for (i, want) in [(0, 7.0), (0, 7.0), (1, 9.0), (1, 9.0), (0, 7.0)] {
            let mut step = || {
                let (av, bv, xv) = (View::all(&a), View::all(&b), View::all(&xs[i]));
                dev.matmul_add(ViewMut::all(&mut d), xv, av, bv, 2, 2, 3, false, true)
            };
            dev.replay(&mut g, &mut step).unwrap();
            assert_eq!(dev.download(View::all(&d)).unwrap(), vec![want; 4]);
        }
        // captured at the first call and at each change of addend, replayed otherwise
        assert_eq!(dev.launcher().recorder_counts(), [3, 2, 0]);
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
        assert_eq!(dev.launcher().recorder_counts(), [2, 1, 0]);
        // and a view of another length at the same address is refused, as without a graph
        let mut step = || {
            let (av, bv) = (View::range(&a, 0, 4), View::all(&b));
            dev.matmul(ViewMut::all(&mut c), av, bv, 2, 2, 3, false, true, 1.0, 0.0)
        };
        assert!(dev.replay(&mut g, &mut step).is_err());
    }
}
