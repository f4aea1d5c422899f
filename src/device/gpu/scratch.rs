//! [`ScratchCache`]: the f32 scratch buffers some kernel families need between their launches
//! (attention backward's D = rowsum(dout * out), decode attention's split-K partials), kept by
//! the device from one call to the next instead of allocated per call: decode attention runs once
//! per layer and generated token, where an allocation and a free per call (cuMemAllocAsync /
//! cuMemFreeAsync) would cost a few microseconds each against a step of well under a millisecond.
//!
//! A slot holds one buffer, grown (never shrunk) to the largest request; a growth frees the
//! shorter buffer once the larger one is made, so a refused allocation frees nothing. Reuse is safe because
//! every op of a device is ordered on its one stream: the next launch that writes a scratch runs
//! after the last one that read it. Taking a buffer out of its slot for the duration of a call
//! keeps two host threads from sharing one; a call that finds the slot empty allocates its own.

use std::sync::Mutex;

use crate::device::DeviceBuf;
use crate::Result;

/// Scratch slots of a device (see the module docs).
#[derive(Debug)]
pub struct ScratchCache<B> {
    slots: Mutex<Vec<Option<B>>>,
    allocations: std::sync::atomic::AtomicU64,
}

impl<B> Default for ScratchCache<B> {
    fn default() -> Self {
        ScratchCache {
            slots: Mutex::new(Vec::new()),
            allocations: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The slot of attention backward's D.
pub const ATTENTION_D: usize = 0;
/// The slots of decode attention's partial outputs and (max, sum) pairs.
pub const DECODE_O: usize = 1;
pub const DECODE_ML: usize = 2;

impl<B: DeviceBuf> ScratchCache<B> {
    /// Runs `f` on slot `slot`'s buffer, of at least `len` elements (made with `alloc` when the
    /// slot is empty or its buffer shorter), and puts the buffer back after.
    pub fn with<R>(
        &self,
        slot: usize,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<B>,
        f: impl FnOnce(&mut B) -> Result<R>,
    ) -> Result<R> {
        let cached = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.get_mut(slot).and_then(Option::take)
        };
        let mut buf = match cached {
            Some(b) if b.len() >= len => b,
            short => match alloc(len) {
                Ok(b) => {
                    // the larger buffer made: the short one goes
                    drop(short);
                    self.allocations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    b
                }
                Err(e) => {
                    // not made (a step being recorded for a graph refuses it): the slot keeps
                    // its buffer, which calls recorded before may name
                    if let Some(b) = short {
                        self.put_back(slot, b);
                    }
                    return Err(e);
                }
            },
        };
        let r = f(&mut buf);
        self.put_back(slot, buf);
        r
    }

    /// `buf` back into `slot`; another call may have put one back meanwhile: the larger stays.
    fn put_back(&self, slot: usize, buf: B) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() <= slot {
            slots.resize_with(slot + 1, || None);
        }
        match &slots[slot] {
            Some(b) if b.len() >= buf.len() => {}
            _ => slots[slot] = Some(buf),
        }
    }

    /// Buffers allocated so far (each slot's first use and each growth).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_grows_to_the_largest_request_and_is_reused() {
        let c = ScratchCache::<Vec<f32>>::default();
        let alloc = |n: usize| Ok(vec![0f32; n]);
        let lens = |c: &ScratchCache<Vec<f32>>, slot, len| {
            c.with(slot, len, alloc, |b| Ok(b.len())).unwrap()
        };
        assert_eq!(lens(&c, 1, 10), 10);
        assert_eq!(lens(&c, 1, 4), 10, "reused, not shrunk");
        assert_eq!(c.allocations(), 1);
        assert_eq!(lens(&c, 1, 12), 12, "grown");
        assert_eq!(lens(&c, 0, 3), 3, "another slot");
        assert_eq!(lens(&c, 1, 0), 12);
        assert_eq!(c.allocations(), 3);
        // the buffer keeps what the last call wrote (scratch: nothing relies on it) and an
        // error inside still gives the buffer back
        let e = c.with(1, 5, alloc, |b| {
            b[0] = 7.0;
            Err::<(), _>(crate::Error::invalid("test", "boom"))
        });
        assert!(e.is_err());
        assert_eq!(c.with(1, 5, alloc, |b| Ok(b[0])).unwrap(), 7.0);
        assert_eq!(c.allocations(), 3);
        // a growth whose allocation is refused keeps the slot's buffer (nothing freed)
        let refuse = |_: usize| Err(crate::Error::invalid("test", "no allocation"));
        assert!(c.with(1, 20, refuse, |b| Ok(b.len())).is_err());
        assert_eq!(
            c.with(1, 12, refuse, |b| Ok((b.len(), b[0]))).unwrap(),
            (12, 7.0)
        );
        assert_eq!(c.allocations(), 3);
    }
}
