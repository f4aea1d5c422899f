//! The CPU device: the reference twin of every kernel, and a usable engine on its own.
//!
//! Each op lives in `cpu/<op>.rs` as free functions generic over [`Real`] (f32 for the engine,
//! f64 for finite-difference checks), multi-threaded with rayon over rows. [`CpuDevice`]
//! implements [`Device`](super::Device) by checking lengths and dims, then calling them.

/// Float types the CPU twins run in: f32 (the engine) and f64 (gradient checks).
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::NumAssign
    + ndarray::LinalgScalar
    + std::iter::Sum
    + std::fmt::Debug
    + Default
    + Send
    + Sync
    + 'static
{
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
}
