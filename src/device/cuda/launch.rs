//! [`CudaLaunch`]: the [`Launch`] backend on a GPU: the embedded kernels loaded once as modules,
//! functions looked up by symbol and cached, launches through `cuLaunchKernel` on the device's
//! stream with the argument array the launchers packed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::device::gpu::graph::{CallRef, Recorder};
use crate::device::gpu::{smem_opt_in, EmuArgs, Launch};
use crate::device::kernels;
use crate::{Error, Result};

/// One kernel file loaded into the context.
struct Module {
    stem: &'static str,
    /// The PTX text: which symbols the file defines (`.entry <sym>(`).
    ptx: &'static str,
    module: Arc<CudaModule>,
}

/// A function, its static shared memory and the dynamic shared memory it was opted in to.
struct Func {
    f: CudaFunction,
    static_smem: usize,
    opted: Option<usize>,
}

// A symbol's first launch checks its packed arguments against the kernel's C++ signature
// (where the emulator is built); a launcher packs the same kinds every time, so later launches
// skip the check (a registry lookup: kept off the hot path).

/// The GPU launch backend (see the module docs).
pub struct CudaLaunch {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<Module>,
    funcs: Mutex<HashMap<String, Func>>,
    sms: usize,
    /// Dynamic shared memory per block after opting in.
    smem_optin: usize,
    cubin: bool,
    recorder: Recorder,
}

impl CudaLaunch {
    /// Loads every embedded kernel file: the sm_90a cubin on compute capability 9.0, the
    /// compute_80 PTX elsewhere (the driver JIT-compiles it for the GPU it runs on).
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        cc: (i32, i32),
    ) -> Result<Self> {
        if cc < (8, 0) {
            return Err(Error::cuda(
                "--device cuda",
                format!(
                    "the GPU has compute capability {}.{}; the kernels need 8.0 or newer",
                    cc.0, cc.1
                ),
            ));
        }
        let cubin = cc == (9, 0);
        let mut modules = Vec::new();
        for &(stem, ptx, bin) in kernels::KERNELS {
            let text = std::str::from_utf8(ptx)
                .map_err(|_| Error::cuda(format!("kernels/{stem}.cu"), "PTX is not UTF-8"))?
                .trim_end_matches('\0');
            let image = if cubin {
                Ptx::from_binary(bin.to_vec())
            } else {
                Ptx::from_src(text)
            };
            let module = ctx.load_module(image).map_err(|e| {
                Error::cuda(
                    format!(
                        "loading kernels/{stem}.cu ({})",
                        if cubin { "cubin" } else { "PTX" }
                    ),
                    e,
                )
            })?;
            modules.push(Module {
                stem,
                ptx: text,
                module,
            });
        }
        let attr = |a: CUdevice_attribute, what: &str| -> Result<usize> {
            ctx.attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(|e| Error::cuda(what, e))
        };
        let sms = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "SM count",
        )?;
        let smem_optin = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "shared memory per block",
        )?;
        Ok(CudaLaunch {
            ctx: ctx.clone(),
            stream: stream.clone(),
            modules,
            funcs: Mutex::new(HashMap::new()),
            sms,
            smem_optin,
            cubin,
            recorder: Recorder::default(),
        })
    }

    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// "cubin sm_90a" or "PTX compute_80 (JIT)".
    pub fn code_kind(&self) -> &'static str {
        if self.cubin {
            "cubin sm_90a"
        } else {
            "PTX compute_80 (JIT)"
        }
    }

    /// The function `sym`, opted in to `smem` bytes of dynamic shared memory; its arguments
    /// checked on its first launch.
    fn function(&self, sym: &str, smem: usize, args: &EmuArgs<'_>) -> Result<CudaFunction> {
        let mut funcs = self
            .funcs
            .lock()
            .map_err(|_| Error::cuda(sym, "the function cache lock is poisoned"))?;
        if !funcs.contains_key(sym) {
            crate::device::emu::check_device_signature(sym, args)?;
            let entry = format!(".entry {sym}(");
            let m = self
                .modules
                .iter()
                .find(|m| m.ptx.contains(&entry))
                .ok_or_else(|| Error::cuda(sym, "no kernel file defines this symbol"))?;
            let f = m
                .module
                .load_function(sym)
                .map_err(|e| Error::cuda(format!("kernels/{}.cu: {sym}", m.stem), e))?;
            let static_smem = f
                .shared_size_bytes()
                .map_err(|e| Error::cuda(format!("{sym}: static shared memory"), e))?
                .max(0) as usize;
            funcs.insert(
                sym.to_string(),
                Func {
                    f,
                    static_smem,
                    opted: None,
                },
            );
        }
        let func = funcs
            .get_mut(sym)
            .ok_or_else(|| Error::cuda(sym, "function cache"))?;
        if let Some(dynamic) =
            smem_opt_in(sym, func.static_smem, smem, func.opted, self.smem_optin)?
        {
            func.f
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic as i32,
                )
                .map_err(|e| {
                    Error::cuda(format!("{sym}: opt in to {dynamic} B of shared memory"), e)
                })?;
            func.opted = Some(dynamic);
        }
        Ok(func.f.clone())
    }
}

impl Launch for CudaLaunch {
    fn launch(
        &self,
        sym: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: usize,
        args: &mut EmuArgs<'_>,
    ) -> Result<()> {
        if let Some(i) = args.host_pointer() {
            return Err(Error::cuda(
                sym,
                format!("argument {i} is host memory; the GPU needs device buffers"),
            ));
        }
        if self.cubin {
            // the figures are the sm_90a cubin's: a clear error before the driver's
            kernels::check_launch(sym, block, smem)?;
        }
        if self
            .recorder
            .record(CallRef::launch(sym, grid, block, smem, args))
        {
            return Ok(());
        }
        // a replayed graph holds only launches made (and so checked) before
        args.check_overlap(sym)?;
        // the context first: loading a function and opting it in are driver calls too
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))?;
        let f = self.function(sym, smem, args)?;
        let params = args.kernel_params();
        // SAFETY: `f` is a function of a module this launcher holds (alive as long as `self`).
        // `params` holds one pointer per kernel parameter, each to an 8-byte slot owned by
        // `args` (alive across this call; the driver copies the values at launch). Every
        // pointer argument is a device address of a buffer borrowed for `args`' lifetime or
        // null (no host pointer, and none written that overlaps another: checked above); where
        // the emulator is built the count, sizes and kinds were checked against the kernel's
        // C++ signature on the symbol's first launch (its launcher packs the same kinds every
        // time). The launcher checked the
        // lengths and dims the kernel indexes with, and the grid/block/smem it computed from
        // them (smem opted in above). The launch is ordered on our one stream after every
        // earlier write to these buffers and before any later read or free.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                smem as u32,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(|e| Error::cuda(format!("launching {sym}"), e))
    }

    fn sms(&self) -> usize {
        self.sms
    }

    fn recorder(&self) -> Option<&Recorder> {
        Some(&self.recorder)
    }
}
