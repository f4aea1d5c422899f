//! Helpers shared by the kernel-vs-CPU-twin tests (tests/kernels_emu_*.rs): buffers with canary
//! regions, bf16 conversions, launching in both emulator orders, and random inputs.

use half::bf16;
use nla_engine::device::emu::{launch, EmuArgs, EmuMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---- element types with a canary value

/// An element type a kernel buffer may hold, with a canary bit pattern no kernel computes.
pub trait Elem: bytemuck::Pod + PartialEq + std::fmt::Debug {
    const CANARY: Self;
    /// The bits of the value, to compare canaries and results exactly (NaN included).
    fn bits(&self) -> u64;
}

impl Elem for f32 {
    const CANARY: f32 = f32::from_bits(0x7fa5_a5a5); // a NaN payload no kernel makes
    fn bits(&self) -> u64 {
        self.to_bits() as u64
    }
}
impl Elem for f64 {
    const CANARY: f64 = f64::from_bits(0x7ff5_a5a5_a5a5_a5a5);
    fn bits(&self) -> u64 {
        self.to_bits()
    }
}
impl Elem for bf16 {
    const CANARY: bf16 = bf16::from_bits(0x7fa5);
    fn bits(&self) -> u64 {
        self.to_bits() as u64
    }
}
impl Elem for u32 {
    const CANARY: u32 = 0xa5a5_a5a5;
    fn bits(&self) -> u64 {
        *self as u64
    }
}
impl Elem for i32 {
    const CANARY: i32 = 0x25a5_a5a5;
    fn bits(&self) -> u64 {
        *self as u32 as u64
    }
}

// ---- kernel storage types (T of the kernel files: f32 or bf16)

/// The storage type T of a kernel symbol `<op>_<suffix>`.
pub trait Storage: Elem {
    /// `f32` or `bf16`
    const SUFFIX: &'static str;
    /// Elements per 16-byte access (4 f32 / 8 bf16).
    const PACK: usize = 16 / size_of::<Self>();
    fn from_f32s(x: &[f32]) -> Vec<Self>;
    fn to_f32s(x: &[Self]) -> Vec<f32>;
    fn nan() -> Self;
    /// `x` stored as Self and read back (the identity for f32).
    fn round(x: &[f32]) -> Vec<f32> {
        Self::to_f32s(&Self::from_f32s(x))
    }
}

impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32s(x: &[f32]) -> Vec<f32> {
        x.to_vec()
    }
    fn to_f32s(x: &[f32]) -> Vec<f32> {
        x.to_vec()
    }
    fn nan() -> f32 {
        f32::NAN
    }
}

impl Storage for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32s(x: &[f32]) -> Vec<bf16> {
        to_bf16(x)
    }
    fn to_f32s(x: &[bf16]) -> Vec<f32> {
        from_bf16(x)
    }
    fn nan() -> bf16 {
        bf16::NAN
    }
}

/// The kernel symbol `<base>_<f32|bf16>`.
pub fn sym<T: Storage>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

// ---- guarded buffers

/// Canary elements on each side of a guarded buffer.
pub const GUARD: usize = 64;

/// A buffer of `n` elements with canary regions on both sides, to catch writes out of range.
/// The inner slice starts on a 16-byte boundary plus `misalign` elements, so a test chooses
/// between a kernel's 16-byte vector path (misalign 0) and its scalar path (misalign 1).
pub struct Guarded<T: Elem> {
    buf: Vec<T>,
    start: usize,
    n: usize,
}

impl<T: Elem> Guarded<T> {
    /// `n` copies of `fill`, 16-byte aligned.
    pub fn new(n: usize, fill: T) -> Self {
        Self::from_slice_misaligned(&vec![fill; n], 0)
    }

    /// A copy of `x`, 16-byte aligned.
    pub fn from_slice(x: &[T]) -> Self {
        Self::from_slice_misaligned(x, 0)
    }

    /// A copy of `x` starting `misalign` elements after a 16-byte boundary.
    pub fn from_slice_misaligned(x: &[T], misalign: usize) -> Self {
        let sz = size_of::<T>();
        let slack = 16 / sz.min(16) + misalign;
        let mut buf = vec![T::CANARY; x.len() + 2 * GUARD + slack];
        let base = buf.as_ptr() as usize;
        // first index >= GUARD whose address is 16-byte aligned
        let start = (GUARD..GUARD + 16)
            .find(|&i| (base + i * sz).is_multiple_of(16))
            .unwrap_or(GUARD)
            + misalign;
        buf[start..start + x.len()].copy_from_slice(x);
        Guarded {
            buf,
            start,
            n: x.len(),
        }
    }

    pub fn get(&self) -> &[T] {
        &self.buf[self.start..self.start + self.n]
    }

    pub fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.n]
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.get().to_vec()
    }

    /// Offsets (relative to the inner slice's start: -1 is just before it) written outside.
    pub fn overruns(&self) -> Vec<isize> {
        (0..self.buf.len())
            .filter(|&i| {
                !(self.start..self.start + self.n).contains(&i)
                    && self.buf[i].bits() != T::CANARY.bits()
            })
            .map(|i| i as isize - self.start as isize)
            .collect()
    }

    /// Fails if anything outside the inner slice was written.
    #[track_caller]
    pub fn assert_intact(&self, what: &str) {
        let o = self.overruns();
        assert!(
            o.is_empty(),
            "{what}: written outside the buffer at offsets {o:?}"
        );
    }
}

// ---- bf16

pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

pub fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// `x` rounded to bf16 (nearest even) and back: the inputs a bf16 kernel and its f32 twin share.
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

// ---- launching

/// The two fiber schedules every kernel test runs in, each with its own seed: threads in index
/// order and blocks in grid order; threads in reverse order and blocks shuffled by the seed.
pub const ORDERS: [(EmuMode, u64); 2] = [(EmuMode::Forward, 1), (EmuMode::Reversed, 0x5eed_b10c)];

/// Launches `name` on a 1-D grid and block; panics with the emulator's message on an error.
#[track_caller]
pub fn launch1(
    name: &str,
    grid: u32,
    block: u32,
    dyn_smem: usize,
    args: &mut EmuArgs<'_>,
    mode: EmuMode,
    seed: u64,
) {
    if let Err(e) = launch(
        name,
        [grid, 1, 1],
        [block, 1, 1],
        dyn_smem,
        args,
        mode,
        seed,
    ) {
        panic!("{name} ({mode:?}, seed {seed:#x}): {e}");
    }
}

/// Runs `f` once per schedule of [`ORDERS`] (fresh buffers each time: `f` builds them) and
/// returns both results, Forward first.
pub fn both_orders<R>(mut f: impl FnMut(EmuMode, u64) -> R) -> [R; 2] {
    let [(m0, s0), (m1, s1)] = ORDERS;
    [f(m0, s0), f(m1, s1)]
}

/// Fails unless `a` and `b` hold identical bits (for kernels whose result does not depend on
/// scheduling).
#[track_caller]
pub fn assert_same_bits<T: Elem>(what: &str, a: &[T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i].bits() != b[i].bits()) {
        panic!(
            "{what}: the two schedules differ at [{i}]: {:?} vs {:?}",
            a[i], b[i]
        );
    }
}

/// Fails unless every element is finite.
#[track_caller]
pub fn assert_finite(what: &str, x: &[f32]) {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        panic!("{what}: [{i}] = {} is not finite", x[i]);
    }
}

// ---- random inputs

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` uniforms in `[lo, hi)`.
pub fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// `n` values in [-scale, scale), none of them zero (so an output left at zero shows).
pub fn nonzero(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let m: f32 = r.random_range(0.05..1.0);
            if r.random_bool(0.5) {
                m * scale
            } else {
                -m * scale
            }
        })
        .collect()
}
