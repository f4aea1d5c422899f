//! NVTX ranges around the phases of a step (forward, backward, optimizer, rollout, reward,
//! critic forward/backward), so that `nsys profile --trace=cuda,nvtx` shows where a step goes.
//! NVTX v3 is header-only and compiled in by the `nvtx` crate: with no profiler attached a
//! range is a call into an inert stub, and nothing needs to be installed.

/// An open range; it ends when dropped (on the thread that opened it).
#[must_use = "the range ends when this guard is dropped"]
pub struct Range(std::marker::PhantomData<*const ()>);

/// Opens the range `name` on this thread.
pub fn range(name: &'static str) -> Range {
    nvtx::range_push!("{name}");
    Range(std::marker::PhantomData)
}

impl Drop for Range {
    fn drop(&mut self) {
        nvtx::range_pop!();
    }
}
