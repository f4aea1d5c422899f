//! The storage types of device buffers: the `T` of `kernels/*.cu` (f32, or bf16 with f32
//! arithmetic inside the kernels). The CPU device stores f32 only; the kernel devices (emulated
//! and CUDA) store either, and each kernel launch picks the symbol `<op>_<f32|bf16>` from the
//! type of its `T` buffers.

use half::bf16;

pub use crate::memory::Dtype;

/// A storage type of kernel buffers: `f32` or `bf16`.
pub trait Storage:
    bytemuck::Pod + Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    /// The buffer dtype this type stores.
    const DTYPE: Dtype;
    /// The symbol suffix of the kernels over this type: `f32` or `bf16`.
    const SUFFIX: &'static str;
    /// Elements per 16-byte access (4 f32 / 8 bf16).
    const PACK: usize = 16 / size_of::<Self>();
    /// `x` rounded to this type (round to nearest even).
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Storage for f32 {
    const DTYPE: Dtype = Dtype::F32;
    const SUFFIX: &'static str = "f32";
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Storage for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    const SUFFIX: &'static str = "bf16";
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// The kernel symbol `<base>_<f32|bf16>`.
pub fn sym<T: Storage>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even significand (1)
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(
            <bf16 as Storage>::from_f32(1.0 + 3.0 / 256.0).to_f32(),
            1.0 + 4.0 / 256.0
        );
        assert_eq!(<bf16 as Storage>::PACK, 8);
        assert_eq!(<f32 as Storage>::PACK, 4);
        assert_eq!(sym::<bf16>("rmsnorm_fwd"), "rmsnorm_fwd_bf16");
    }
}
