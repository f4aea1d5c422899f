//! The launch layer of the CUDA device: one launcher per kernel family of `kernels/*.cu`, each
//! checking lengths and dims first, then computing grid, block and dynamic shared memory as
//! the kernel's header says, packing the arguments in the kernel's parameter order and
//! launching through a [`Launch`] backend.
//!
//! The launchers take their pointer arguments as [`In`] (`const T*`), [`Out`] (`T*`) and [`Ids`]
//! (token ids or positions, checked against their bound), each either a host slice or a
//! device address ([`DevPtr`]); ids are u32. Each launcher is generic over the storage type
//! `T:` [`crate::device::Storage`] (f32 or bf16) of exactly the arguments its kernel's header
//! declares as T, launches that type's symbol `<op>_<f32|bf16>` ([`crate::device::storage::sym`])
//! and computes pack-dependent geometry from `T::PACK` (4 f32 / 8 bf16 per 16-byte access); the
//! arguments a header declares f32 in both modes (statistics, parameter gradients, masks, losses,
//! scratch) stay f32, and the families with f32 symbols only (policy_loss) are f32 only.
//! Launchers never allocate: scratch a kernel family needs is the caller's, sized by the
//! family's length function (`attention::bwd_scratch_len`, `decode_attention::scratch_lens`),
//! and checks of values (not lengths) run on host memory only (device inputs are not
//! value-checked).
//!
//! Today the one backend is [`EmuLaunch`], the CPU emulator of the CUDA execution model
//! (`device/emu.rs`), which [`crate::device::emu_device::EmuDevice`] uses to run every op but
//! matmul through the real kernels. A cudarc backend implements [`Launch`]
//! by handing [`EmuArgs::kernel_params`] to `cuLaunchKernel` (device addresses packed with
//! [`EmuArgs::device_ptr`]); the grid/block/smem arithmetic here is shared.
//!
//! Kernels whose static and dynamic shared memory together pass 48 KiB (attention with HS > 32,
//! pooling over 4k positions) need `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` raised first
//! on the GPU ([`smem_opt_in`]); the emulator takes up to 227 KiB without it.

pub mod adamw;
pub mod attention;
pub mod convert;
pub mod cross_entropy;
pub mod decode_attention;
pub mod embedding;
pub mod graph;
pub mod inject;
pub mod kernel_device;
pub mod kv_append;
pub mod norm_scale;
pub mod policy_loss;
pub mod pool;
pub mod ptr;
pub mod residual;
pub mod reward_advantage;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod scratch;
pub mod softmax;
pub mod swiglu;

pub use super::emu::{EmuArgs, EmuMode};
use crate::{Error, Result};
pub use ptr::{DevPtr, Ids, In, Out, SharedPtr};

/// `parts` fit in an allocation of `bytes` ([`crate::device::Device::alloc_shared`]) and hold
/// what the kernels store: f32 or bf16.
pub(crate) fn check_kernel_parts(bytes: usize, parts: &[crate::device::Part]) -> Result<()> {
    crate::device::check_parts(bytes, parts)?;
    match parts.iter().find(|p| {
        !matches!(
            p.dtype,
            crate::device::Dtype::F32 | crate::device::Dtype::Bf16
        )
    }) {
        Some(p) => Err(Error::invalid(
            "alloc_shared",
            format!("the kernels store f32 or bf16, not {}", p.dtype),
        )),
        None => Ok(()),
    }
}

/// Launches a kernel by symbol. `args` are packed like `cuLaunchKernel`'s `kernelParams`.
pub trait Launch {
    fn launch(
        &self,
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &mut EmuArgs<'_>,
    ) -> Result<()>;

    /// Streaming multiprocessors of the device: grid sizes of grid-stride kernels, decode
    /// attention's split, the attention forward's rows per block.
    fn sms(&self) -> usize {
        SMS_DEFAULT
    }

    /// Where this backend records launches instead of making them ([`graph`]); None: never.
    fn recorder(&self) -> Option<&graph::Recorder> {
        None
    }
}

/// SM count assumed when the backend does not know better: an H100 SXM.
pub const SMS_DEFAULT: usize = 132;

/// Shared memory a block gets without opting in, static and dynamic together (CUDA's default
/// cap).
pub const SMEM_DEFAULT_MAX: usize = 48 * 1024;

/// Dynamic shared memory per block at most (Hopper, after opting in).
pub const SMEM_MAX: usize = 227 * 1024;

/// The dynamic shared memory a function must be opted in to (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_
/// SHARED_SIZE_BYTES`) before a launch with `dynamic` bytes, when it has `static_smem` bytes of
/// static shared memory and is opted in to `opted` dynamic bytes so far (None: never, so the
/// default cap applies); None when the launch fits as is. A block's static and dynamic shared
/// memory count together, against [`SMEM_DEFAULT_MAX`] without opting in and against `optin`
/// (the device's `MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`) at most: an error beyond that.
pub fn smem_opt_in(
    sym: &str,
    static_smem: usize,
    dynamic: usize,
    opted: Option<usize>,
    optin: usize,
) -> Result<Option<usize>> {
    let total = static_smem.saturating_add(dynamic);
    if total > optin {
        return Err(Error::invalid(
            "launch",
            format!(
                "{sym}: {total} bytes of shared memory per block ({static_smem} static + \
                 {dynamic} dynamic), the GPU allows {optin}"
            ),
        ));
    }
    let allowed = opted.unwrap_or(SMEM_DEFAULT_MAX.saturating_sub(static_smem));
    Ok((dynamic > allowed).then_some(dynamic))
}

/// The emulator backend: every launch runs on the CPU emulator in `mode`, with the scheduling
/// seed `seed` mixed with a per-launch counter (so Reversed mode shuffles blocks differently
/// from launch to launch, reproducibly).
#[derive(Debug)]
pub struct EmuLaunch {
    pub mode: EmuMode,
    pub seed: u64,
    /// The SM count the launchers size grids for ([`Launch::sms`]; [`SMS_DEFAULT`] unless set)
    pub sms: usize,
    count: std::sync::atomic::AtomicU64,
    recorder: graph::Recorder,
}

impl EmuLaunch {
    pub fn new(mode: EmuMode, seed: u64) -> Self {
        EmuLaunch {
            mode,
            seed,
            sms: SMS_DEFAULT,
            count: std::sync::atomic::AtomicU64::new(0),
            recorder: graph::Recorder::default(),
        }
    }
}

impl EmuLaunch {
    /// Steps captured, replayed and failed captures ([`graph::Recorder::counts`]).
    pub fn recorder_counts(&self) -> [u64; 3] {
        self.recorder.counts()
    }

    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Launch for EmuLaunch {
    fn launch(
        &self,
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &mut EmuArgs<'_>,
    ) -> Result<()> {
        if smem > SMEM_MAX {
            return Err(Error::invalid(
                "launch",
                format!("{sym}: {smem} bytes of dynamic shared memory > {SMEM_MAX}"),
            ));
        }
        // what an sm_90 GPU would refuse (where the build has ptxas's figures)
        crate::device::kernels::check_launch(sym, block, smem)?;
        if self
            .recorder
            .record(graph::CallRef::launch(sym, grid, block, smem, args))
        {
            return Ok(());
        }
        let k = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = self.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        super::emu::launch(sym, grid, block, smem, args, self.mode, seed)
    }

    fn sms(&self) -> usize {
        self.sms
    }

    fn recorder(&self) -> Option<&graph::Recorder> {
        Some(&self.recorder)
    }
}

/// A 1-D launch shape.
pub(crate) fn dim1(x: u32) -> [u32; 3] {
    [x, 1, 1]
}

/// `x` as a kernel `int`.
pub(crate) fn int(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::invalid(op, format!("{what} = {x} does not fit an int")))
}

/// A grid dimension (x up to 2^31-1, y and z up to 65535).
pub(crate) fn grid_dim(op: &'static str, what: &str, x: usize, max: usize) -> Result<u32> {
    if x == 0 || x > max {
        return Err(Error::invalid(
            op,
            format!("grid {what} = {x} outside [1, {max}]"),
        ));
    }
    Ok(x as u32)
}

/// `what` must hold exactly the product of `dims` elements.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, dims: &[usize]) -> Result<()> {
    let want = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("{what}: dims {dims:?} overflow usize")))?;
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: expected {want} elements (dims {dims:?}), got {got}"),
        ))
    }
}

/// The TQ new positions from pos0 (the host's, or the one id of the device word `pos`) end
/// within the cache's TMAX.
pub(crate) fn check_positions(
    op: &'static str,
    pos: Option<Ids<'_>>,
    pos0: usize,
    tq: usize,
    tmax: usize,
) -> Result<()> {
    let Some(p) = pos else {
        return match pos0.checked_add(tq) {
            Some(end) if end <= tmax => Ok(()),
            _ => Err(Error::invalid(
                op,
                format!("{tq} new positions from {pos0} end beyond the cache's {tmax}"),
            )),
        };
    };
    check_len(op, "pos", p.len(), &[1])?;
    if tq > tmax {
        return Err(Error::invalid(
            op,
            format!("{tq} new positions do not fit the cache's {tmax}"),
        ));
    }
    p.check(op, "pos (+ TQ <= TMAX)", tmax - tq + 1)
}

/// A dim that must be positive.
pub(crate) fn check_pos(op: &'static str, name: &str, x: usize) -> Result<()> {
    if x > 0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be > 0")))
    }
}

/// Block of the row kernels that give each row's channels to threads in 16-byte packs of
/// `pack` elements (the storage type's [`crate::device::Storage::PACK`]: 4 f32 / 8 bf16):
/// 32 * ceil(C / p / 32) capped at `cap`, p = `pack` when C is a multiple of it, else 1 (the
/// kernels' one-element-at-a-time path).
pub(crate) fn pack_block(c: usize, pack: usize, cap: usize) -> u32 {
    let p = if c.is_multiple_of(pack) { pack } else { 1 };
    (32 * c.div_ceil(p).div_ceil(32)).min(cap) as u32
}

/// Grid of the elementwise kernels over 16-byte packs of `pack` elements
/// ([`crate::device::Storage::PACK`]): block 256, ceil(n / (256 * pack)) blocks.
pub(crate) fn elementwise_grid(op: &'static str, n: usize, pack: usize) -> Result<u32> {
    grid_dim(op, "x", n.div_ceil(256 * pack).max(1), i32::MAX as usize)
}

/// A table `[rows, c]` given as a flat length: the number of rows.
pub(crate) fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if len.is_multiple_of(c) {
        Ok(len / c)
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: {len} elements is not a multiple of C = {c}"),
        ))
    }
}

/// Two lengths that must agree.
pub(crate) fn check_same(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: expected {want} elements, got {got}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn emulated_launches_are_held_to_what_an_sm90_block_can_hold() {
        use super::{EmuArgs, EmuLaunch, EmuMode, Launch};
        let sym = "attention_bwd_dkdv_bf16_hs128";
        let Some(l) = crate::device::kernels::limits(sym) else {
            eprintln!("no nvcc at build time: no kernel limits to check");
            return;
        };
        // refused before anything runs (the arguments are not even looked at)
        let e = EmuLaunch::new(EmuMode::Forward, 1)
            .launch(
                sym,
                [1, 1, 1],
                [2 * l.max_threads, 1, 1],
                0,
                &mut EmuArgs::new(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(sym) && e.contains("the kernel allows 128"),
            "{e}"
        );
    }

    #[test]
    fn smem_opt_in_counts_static_and_dynamic_shared_memory_together() {
        use super::{smem_opt_in, SMEM_DEFAULT_MAX as D, SMEM_MAX as MAX};
        // no static: up to the default cap without opting in
        assert_eq!(smem_opt_in("k", 0, D, None, MAX).unwrap(), None);
        assert_eq!(smem_opt_in("k", 0, D + 4, None, MAX).unwrap(), Some(D + 4));
        // pool_bwd at T = 4096: 256 B static + 12 * 4096 dynamic is over the default cap
        assert_eq!(
            smem_opt_in("k", 256, 12 * 4096, None, MAX).unwrap(),
            Some(12 * 4096)
        );
        assert_eq!(smem_opt_in("k", 256, D - 256, None, MAX).unwrap(), None);
        // once opted in to 60 KiB, up to that needs nothing more
        let o = Some(60 * 1024);
        assert_eq!(smem_opt_in("k", 256, 50 * 1024, o, MAX).unwrap(), None);
        assert_eq!(
            smem_opt_in("k", 256, 61 * 1024, o, MAX).unwrap(),
            Some(61 * 1024)
        );
        // the per-block limit holds for the sum
        assert!(smem_opt_in("k", 0, MAX, None, MAX).is_ok());
        let e = smem_opt_in("pool_bwd_f32", 256, MAX, None, MAX).unwrap_err();
        assert!(e.to_string().contains("pool_bwd_f32"), "{e}");
        assert!(e.to_string().contains("256 static"), "{e}");
    }

    use std::cell::RefCell;

    use super::*;
    use crate::device::{AttnDims, CacheDims};

    /// Records each launch (symbol, whether any argument is a host pointer; and its grid, block
    /// and dynamic shared memory) without running it.
    #[derive(Default)]
    #[allow(clippy::type_complexity)]
    struct Record(
        RefCell<Vec<(String, bool)>>,
        RefCell<Vec<([u32; 3], [u32; 3], usize)>>,
    );

    impl Launch for Record {
        fn launch(
            &self,
            sym: &str,
            grid: [u32; 3],
            block: [u32; 3],
            smem: usize,
            args: &mut EmuArgs<'_>,
        ) -> Result<()> {
            let host = args.host_pointer().is_some();
            self.0.borrow_mut().push((sym.to_string(), host));
            self.1.borrow_mut().push((grid, block, smem));
            Ok(())
        }
    }

    impl Record {
        fn syms(&self) -> Vec<String> {
            self.0.borrow().iter().map(|(s, _)| s.clone()).collect()
        }
        /// The last launch's (symbol, grid x, block x, smem).
        fn last(&self) -> (String, u32, u32, usize) {
            let (grid, block, smem) = *self.1.borrow().last().unwrap();
            (self.syms().pop().unwrap(), grid[0], block[0], smem)
        }
    }

    /// The bf16 forward at HS bucket 128 takes 128 query rows per block (the `_bo128` kernel)
    /// where ceil(T/128) x NH x B blocks fill the SMs twice, else 64; HS 64 and f32 take 64
    /// (HS 64's 128-row kernel only by name).
    #[test]
    fn the_attention_forward_takes_128_rows_where_the_grid_fills_the_sms() {
        use half::bf16;
        let l = Record::default();
        let fwd = |t: usize, nh: usize, hs: usize, bf: bool| {
            let d = AttnDims {
                b: 1,
                t,
                nh,
                nkv: 1,
                hs,
            };
            let (nq, nkv, nl) = attn_lens(&d);
            if bf {
                let (q, kv) = (dev::<bf16>(nq), dev::<bf16>(nkv));
                attention::fwd(&l, q, dev::<f32>(nl), q, kv, kv, d).unwrap();
            } else {
                let (q, kv) = (dev::<f32>(nq), dev::<f32>(nkv));
                attention::fwd(&l, q, dev::<f32>(nl), q, kv, kv, d).unwrap();
            }
            l.last()
        };
        // 32 x 32 = 1024 blocks of 128 rows >= 2 x 132
        let bo128 = ("attention_fwd_bf16_hs128_bo128".to_string(), 32, 128, 69632);
        assert_eq!(fwd(4096, 32, 128, true), bo128);
        // the boundary: 8 x 33 = 264 = 2 x 132 blocks take 128 rows, 8 x 32 = 256 do not
        assert_eq!(fwd(1024, 33, 128, true).0, bo128.0);
        assert_eq!(fwd(1024, 32, 128, true).0, "attention_fwd_bf16_hs128");
        // 4 x 32 = 128 blocks of 128 rows would leave SMs idle: 64 rows, 256 blocks
        let bo64 = ("attention_fwd_bf16_hs128".to_string(), 8, 128, 69632);
        assert_eq!(fwd(512, 32, 128, true), bo64);
        // HS 64 keeps 64 rows (3 blocks per SM); its 128-row kernel by name
        assert_eq!(fwd(4096, 32, 64, true).0, "attention_fwd_bf16_hs64");
        let d64 = AttnDims {
            b: 1,
            t: 4096,
            nh: 32,
            nkv: 1,
            hs: 64,
        };
        let (nq, nkv, nl) = attn_lens(&d64);
        let (q, kv) = (dev::<bf16>(nq), dev::<bf16>(nkv));
        attention::fwd_with_rows(&l, q, dev::<f32>(nl), q, kv, kv, d64, 128).unwrap();
        let hs64 = ("attention_fwd_bf16_hs64_bo128".to_string(), 32, 128, 36864);
        assert_eq!(l.last(), hs64);
        // HS 32 and f32 have no 128-row kernel
        assert_eq!(fwd(4096, 32, 32, true).0, "attention_fwd_bf16_hs32");
        assert_eq!(fwd(4096, 32, 128, false).0, "attention_fwd_f32_hs128");
        assert_eq!(l.last().1, 64);
        // asked for by name, where it does not exist: an error
        let d = AttnDims {
            b: 1,
            t: 64,
            nh: 1,
            nkv: 1,
            hs: 32,
        };
        let (nq, nkv, nl) = attn_lens(&d);
        let (q, kv) = (dev::<bf16>(nq), dev::<bf16>(nkv));
        let e = attention::fwd_with_rows(&l, q, dev::<f32>(nl), q, kv, kv, d, 128).unwrap_err();
        assert!(e.to_string().contains("128 for bf16 at HS > 32"), "{e}");
        let (q, kv) = (dev::<f32>(nq), dev::<f32>(nkv));
        let e = attention::fwd_with_rows(&l, q, dev::<f32>(nl), q, kv, kv, d, 128).unwrap_err();
        assert!(e.to_string().contains("f32"), "{e}");
    }

    /// A bf16 launch picks the `_bf16` symbol and the geometry of 8 bf16 per 16-byte access
    /// where the kernel's header makes it depend on the pack (rmsnorm.cu: "block 512 for C = 4096
    /// in bf16"; f32: 4096 / 4 = 1024).
    #[test]
    fn bf16_launches_pick_the_bf16_symbol_and_pack() {
        use half::bf16;
        let l = Record::default();
        let rmsnorm = |c: usize, bf: bool| {
            let (rstd, n) = (dev::<f32>(2), 2 * c);
            if bf {
                rmsnorm::fwd(
                    &l,
                    dev::<bf16>(n),
                    rstd,
                    dev::<bf16>(n),
                    dev::<bf16>(c),
                    2,
                    c,
                    1e-5,
                )
            } else {
                rmsnorm::fwd(
                    &l,
                    dev::<f32>(n),
                    rstd,
                    dev::<f32>(n),
                    dev::<f32>(c),
                    2,
                    c,
                    1e-5,
                )
            }
            .unwrap();
            l.last()
        };
        assert_eq!(rmsnorm(4096, true), ("rmsnorm_fwd_bf16".into(), 2, 512, 0));
        assert_eq!(rmsnorm(4096, false), ("rmsnorm_fwd_f32".into(), 2, 1024, 0));
        // C = 1000 = 125 packs of 8 (bf16) or 250 of 4 (f32)
        assert_eq!(rmsnorm(1000, true).2, 128);
        assert_eq!(rmsnorm(1000, false).2, 256);
        // C = 1004: a multiple of 4 but not of 8, so bf16 goes one element at a time
        assert_eq!(rmsnorm(1004, false).2, 256);
        assert_eq!(rmsnorm(1004, true).2, 1024);
        // embedding (cap 256): C = 1000 -> 128 threads in bf16, 256 in f32
        let ids = Ids::Device {
            ptr: dev::<u32>(1),
            bound: 1,
        };
        embedding::fwd(&l, dev::<bf16>(1000), ids, dev::<bf16>(1000), 1, 1000).unwrap();
        assert_eq!(l.last(), ("embedding_fwd_bf16".into(), 1, 128, 0));
        embedding::fwd(&l, dev::<f32>(1000), ids, dev::<f32>(1000), 1, 1000).unwrap();
        assert_eq!(l.last(), ("embedding_fwd_f32".into(), 1, 256, 0));
        // elementwise: ceil(n / (256 * pack)) blocks, n = 3 * 2048
        let n = 3 * 2048;
        residual::fwd(&l, dev::<bf16>(n), dev::<bf16>(n), dev::<bf16>(n)).unwrap();
        assert_eq!(l.last(), ("residual_fwd_bf16".into(), 3, 256, 0));
        residual::fwd(&l, dev::<f32>(n), dev::<f32>(n), dev::<f32>(n)).unwrap();
        assert_eq!(l.last(), ("residual_fwd_f32".into(), 6, 256, 0));
        swiglu::bwd(&l, dev::<bf16>(2 * n), dev::<bf16>(n), dev::<bf16>(2 * n)).unwrap();
        assert_eq!(l.last(), ("swiglu_bwd_bf16".into(), 3, 256, 0));
        // the attention buckets follow the dtype
        let d = AttnDims {
            b: 1,
            t: 3,
            nh: 2,
            nkv: 1,
            hs: 8,
        };
        let (nq, nkv, nl) = attn_lens(&d);
        let (q, kv) = (dev::<bf16>(nq), dev::<bf16>(nkv));
        attention::fwd(&l, q, dev::<f32>(nl), q, kv, kv, d).unwrap();
        assert_eq!(l.last().0, "attention_fwd_bf16_hs16");
        // adamw: p16 picks adamw_bf16; sum_squares over bf16
        let hp = crate::device::AdamwStep {
            step: 1,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_scale: 1.0,
        };
        let p = dev::<f32>(10);
        adamw::adamw(&l, p, Some(dev::<bf16>(10).into()), p, p, p, &hp).unwrap();
        assert_eq!(l.last().0, "adamw_bf16");
        assert!(adamw::adamw(&l, p, Some(dev::<bf16>(9).into()), p, p, p, &hp).is_err());
        adamw::adamw(&l, p, None, p, p, p, &hp).unwrap();
        assert_eq!(l.last().0, "adamw_f32");
        adamw::sum_squares(&l, dev::<f64>(1), dev::<bf16>(10)).unwrap();
        assert_eq!(l.last().0, "sum_squares_bf16");
    }

    fn dev<'a, T>(len: usize) -> DevPtr<'a, T> {
        DevPtr::new(0x1000, len)
    }

    #[test]
    fn sum_squares_takes_one_slot_and_skips_empty_input() {
        let l = Record::default();
        let x = vec![1f32; 10];
        let mut two = [0f64; 2];
        assert!(adamw::sum_squares(&l, &mut two[..], &x).is_err());
        let mut out = [5f64; 1];
        adamw::sum_squares(&l, &mut out[..], &x[..0]).unwrap();
        assert!(l.syms().is_empty());
        assert_eq!(out[0], 5.0);
        adamw::sum_squares(&l, &mut out[..], &x).unwrap();
        adamw::sum_squares(&l, dev::<f64>(1), dev::<f32>(10)).unwrap();
        assert_eq!(l.syms(), ["sum_squares_f32", "sum_squares_f32"]);
        assert!(!l.0.borrow()[1].1, "device arguments only");
    }

    #[test]
    fn attention_bwd_checks_its_scratch() {
        let d = AttnDims {
            b: 2,
            t: 3,
            nh: 4,
            nkv: 2,
            hs: 8,
        };
        let n = attn_lens(&d);
        assert_eq!(attention::bwd_scratch_len(&d), 2 * 4 * 3);
        let l = Record::default();
        let (q, kv, lse) = (dev::<f32>(n.0), dev::<f32>(n.1), dev::<f32>(n.2));
        let run = |scratch: usize| {
            attention::bwd(&l, q, kv, kv, dev::<f32>(scratch), q, q, kv, kv, q, lse, d)
        };
        let err = run(n.2 - 1).unwrap_err().to_string();
        assert!(err.contains("dscratch"), "{err}");
        assert!(l.syms().is_empty());
        run(n.2).unwrap();
        assert_eq!(l.syms().len(), 3);
        assert!(l.0.borrow().iter().all(|(_, host)| !host));
        // B*T = 0: no scratch, nothing launched
        let d0 = AttnDims { b: 0, ..d };
        assert_eq!(attention::bwd_scratch_len(&d0), 0);
        let e = dev::<f32>(0);
        attention::bwd(&l, e, e, e, e, e, e, e, e, e, e, d0).unwrap();
        assert_eq!(l.syms().len(), 3);
    }

    /// (q/out elements, k/v elements, lse elements) of `d`.
    fn attn_lens(d: &AttnDims) -> (usize, usize, usize) {
        (
            d.b * d.t * d.nh * d.hs,
            d.b * d.t * d.nkv * d.hs,
            d.b * d.nh * d.t,
        )
    }

    #[test]
    fn decode_attention_scratch_follows_the_split() {
        // one block of work: splits over ceil(L / 32) key tiles
        let d = CacheDims {
            b: 1,
            tq: 1,
            tmax: 100,
            nh: 2,
            nkv: 1,
            hs: 8,
            pos0: 64,
        };
        let (rows, hs) = (2, 8);
        let cache = dev::<f32>(100 * 8);
        let l = Record::default();
        // starts 0: L = 65 keys, 3 splits
        let starts = vec![0u32];
        let (lo, lml) = decode_attention::scratch_lens(&l, &d, &starts, false);
        assert_eq!((lo, lml), (3 * rows * hs, 3 * rows * 2));
        let (mut out, q) = (vec![0f32; rows * hs], vec![0f32; rows * hs]);
        let (mut po, mut pml) = (vec![0f32; lo], vec![0f32; lml]);
        let err = decode_attention::fwd(
            &l,
            &mut out,
            &mut po[1..],
            &mut pml,
            &q,
            cache,
            cache,
            &starts,
            None,
            d,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("part_o"), "{err}");
        let (outd, qd) = (dev::<f32>(rows * hs), dev::<f32>(rows * hs));
        decode_attention::fwd(
            &l,
            outd,
            dev::<f32>(lo),
            dev::<f32>(lml),
            qd,
            cache,
            cache,
            &starts,
            None,
            d,
        )
        .unwrap();
        assert_eq!(
            l.syms(),
            [
                "decode_attention_fwd_f32_hs16",
                "decode_attention_combine_f32"
            ]
        );
        // starts 40: L = 25 keys, no split: no scratch, null scratch pointers, one launch
        let starts = vec![40u32];
        assert_eq!(
            decode_attention::scratch_lens(&l, &d, &starts, false),
            (0, 0)
        );
        let e = dev::<f32>(0);
        decode_attention::fwd(&l, outd, e, e, qd, cache, cache, &starts, None, d).unwrap();
        assert_eq!(l.syms().len(), 3);
        // device starts: their values are unknown, so the split as if they were 0
        let ds = Ids::Device {
            ptr: dev::<u32>(1),
            bound: 41,
        };
        assert_eq!(decode_attention::scratch_lens(&l, &d, ds, false), (lo, lml));
        let (po, pml) = (dev::<f32>(lo), dev::<f32>(lml));
        decode_attention::fwd(&l, outd, po, pml, qd, cache, cache, ds, None, d).unwrap();
        assert_eq!(l.syms().len(), 5);
        assert!(l.0.borrow()[3..].iter().all(|(_, host)| !host));
        // device starts out of the cache
        let bad = Ids::Device {
            ptr: dev::<u32>(1),
            bound: 101,
        };
        assert!(decode_attention::fwd(&l, outd, po, pml, qd, cache, cache, bad, None, d).is_err());
        // nothing to do: no scratch
        let d0 = CacheDims { b: 0, ..d };
        assert_eq!(
            decode_attention::scratch_lens(&l, &d0, &vec![], false),
            (0, 0)
        );
    }
}
