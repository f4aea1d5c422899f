//! The CPU device: the reference twin of every kernel, and a usable engine on its own.
//!
//! Each op lives in `cpu/<op>.rs` as free functions generic over [`Real`] (f32 for the engine,
//! f64 for finite-difference checks), multi-threaded with rayon over rows. [`CpuDevice`]
//! implements [`Device`](super::Device) by checking lengths and dims, then calling them.
//!
//! The twins take plain slices and trust their lengths; every check on what a caller passes
//! happens in [`CpuDevice`], which returns [`Error::Invalid`] instead of calling a twin with
//! inconsistent arguments.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod decode_attention;
pub mod embedding;
pub mod inject;
pub mod kv_append;
pub mod matmul;
pub mod norm_scale;
pub mod policy_loss;
pub mod pool;
pub mod residual;
pub mod reward;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod softmax;
pub mod swiglu;

use rayon::prelude::*;

use super::{AdamwStep, AttnDims, CacheDims, Device, DeviceBuf, SampleSpec, View, ViewMut};
use crate::{Error, Result};

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
    /// e^x written without calls or branches, so that loops over slices vectorise: for f32 a
    /// degree-6 polynomial after Cody-Waite range reduction, within 2 ulp of the exact value on
    /// [-87.3, 88] (0 below, e^88 above); for f64 the exact `exp` (the gradient checks need it).
    fn vexp(self) -> Self;
}

impl Real for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn vexp(self) -> Self {
        // e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2; ln 2 split in two (Cody-Waite)
        // so that x - n ln 2 is exact. Polynomial: the classic minimax fit of e^r on that range.
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const MIN_X: f32 = -87.336_55; // e^MIN_X is the smallest normal f32
        let x = self.clamp(MIN_X, 88.0);
        let n = (x * LOG2E).round_ties_even();
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 0.166_666_65;
        p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
        if self < MIN_X {
            0.0
        } else {
            e * scale
        }
    }
}

impl Real for f64 {
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn vexp(self) -> Self {
        self.exp()
    }
}

/// `sum x` accumulated in f64, in `LANES` partial sums (vectorises).
fn sum_f64<T: Real>(x: &[T]) -> f64 {
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| Real::to_f64(v)).sum();
    let mut acc = [0f64; LANES];
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += Real::to_f64(*v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Elements per rayon task in elementwise ops.
const CHUNK: usize = 1 << 14;
/// Independent accumulators in [`dot`]: lets LLVM keep them in one SIMD register.
pub(crate) const LANES: usize = 8;

/// `x` rounded to `T` (exact for f64).
fn real<T: Real>(x: f64) -> T {
    T::from_f64(x).unwrap_or_else(T::nan)
}

/// `sum_i a[i] * b[i]` over the common length, in `LANES` interleaved partial sums.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let tail: T = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    let mut acc = [T::zero(); LANES];
    for (x, y) in a.zip(b) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// `y += alpha * x`
fn axpy<T: Real>(y: &mut [T], alpha: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `x *= alpha`
fn scale<T: Real>(x: &mut [T], alpha: T) {
    for x in x.iter_mut() {
        *x *= alpha;
    }
}

/// Largest element (-inf for an empty slice; NaN elements are skipped).
fn max<T: Real>(x: &[T]) -> T {
    // LANES independent maxima, so the loop vectorises
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| m.max(v));
    let mut acc = [T::neg_infinity(); LANES];
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// The CPU device. Work runs on rayon's global pool (`RAYON_NUM_THREADS` sets its size); GEMMs
/// run on matrixmultiply's own threads (`MATMUL_NUM_THREADS`, default: physical cores, at most 4).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDevice;

impl CpuDevice {
    pub fn new() -> Self {
        CpuDevice
    }
}

impl DeviceBuf for Vec<f32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

type Buf = Vec<f32>;

/// `write`'s check: the host slice fills the window exactly.
pub(crate) fn check_write(dst: usize, host: usize) -> Result<()> {
    if dst != host {
        return Err(Error::invalid(
            "write",
            format!("dst has {dst} elements, the host slice {host}"),
        ));
    }
    Ok(())
}

/// The elements a view covers.
pub(crate) fn get<'a>(op: &'static str, what: &str, v: View<'a, Buf>) -> Result<&'a [f32]> {
    let (off, len, total) = (v.offset(), v.len(), v.buf().len());
    v.buf().get(off..off.saturating_add(len)).ok_or_else(|| {
        Error::invalid(
            op,
            format!("{what}: view {off}+{len} outside buffer of {total}"),
        )
    })
}

/// The elements a writable view covers.
pub(crate) fn get_mut<'a>(
    op: &'static str,
    what: &str,
    v: ViewMut<'a, Buf>,
) -> Result<&'a mut [f32]> {
    let (buf, off, len) = v.into_parts();
    let total = buf.len();
    buf.get_mut(off..off.saturating_add(len)).ok_or_else(|| {
        Error::invalid(
            op,
            format!("{what}: view {off}+{len} outside buffer of {total}"),
        )
    })
}

/// Product of dims, or an error on overflow.
fn numel(op: &'static str, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("{what}: dims {dims:?} overflow usize")))
}

/// `what` (e.g. "x [N,C]") must hold exactly the product of `dims` elements.
/// matmul's lengths: a [M,K] (or [K,M] when ta), b [K,N] (or [N,K] when tb), c [M,N]; every
/// device checks them.
pub(crate) fn check_matmul(
    [a, b, c]: [usize; 3],
    [m, n, k]: [usize; 3],
    ta: bool,
    tb: bool,
) -> Result<()> {
    const OP: &str = "matmul";
    check_len(OP, if ta { "a [K,M]" } else { "a [M,K]" }, a, &[m, k])?;
    check_len(OP, if tb { "b [N,K]" } else { "b [K,N]" }, b, &[k, n])?;
    check_len(OP, "c [M,N]", c, &[m, n])
}

fn check_len(op: &'static str, what: &str, got: usize, dims: &[usize]) -> Result<()> {
    let want = numel(op, what, dims)?;
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: expected {want} elements (dims {dims:?}), got {got}"),
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

/// A dim that must be positive.
fn check_pos(op: &'static str, name: &str, x: usize) -> Result<()> {
    if x > 0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be > 0")))
    }
}

/// Every id must be below `limit`.
fn check_ids(op: &'static str, what: &str, ids: &[u32], limit: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= limit) {
        None => Ok(()),
        Some((i, id)) => Err(Error::invalid(
            op,
            format!("{what}[{i}] = {id} is out of range (must be < {limit})"),
        )),
    }
}

/// The position an op starts at: the one id of `pos` where given, else `pos0`.
pub(crate) fn position(op: &'static str, pos: Option<&Vec<u32>>, pos0: usize) -> Result<usize> {
    match pos.map(|p| p.as_slice()) {
        None => Ok(pos0),
        Some(&[p]) => Ok(p as usize),
        Some(p) => Err(Error::invalid(
            op,
            format!("pos holds {} ids, expected 1", p.len()),
        )),
    }
}

/// `d` at the position the op starts at ([`position`]), whose TQ positions must end within
/// the cache's TMAX.
fn at_position(op: &'static str, pos: Option<&Vec<u32>>, d: CacheDims) -> Result<CacheDims> {
    let d = CacheDims {
        pos0: position(op, pos, d.pos0)?,
        ..d
    };
    match d.pos0.checked_add(d.tq) {
        Some(end) if end <= d.tmax => Ok(d),
        _ => Err(Error::invalid(
            op,
            format!(
                "{} positions from {} end beyond the cache's {}",
                d.tq, d.pos0, d.tmax
            ),
        )),
    }
}

/// A table `[rows, c]` given as a flat length: the number of rows.
fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if len.is_multiple_of(c) {
        Ok(len / c)
    } else {
        Err(Error::invalid(
            op,
            format!("{what}: {len} elements is not a multiple of C = {c}"),
        ))
    }
}

fn check_attn(op: &'static str, d: &AttnDims) -> Result<()> {
    check_pos(op, "NH", d.nh)?;
    check_pos(op, "NKV", d.nkv)?;
    check_pos(op, "HS", d.hs)?;
    if !d.nh.is_multiple_of(d.nkv) {
        return Err(Error::invalid(
            op,
            format!("NH = {} is not a multiple of NKV = {}", d.nh, d.nkv),
        ));
    }
    Ok(())
}

fn check_rope(op: &'static str, len: usize, dims: [usize; 4], theta: f32) -> Result<()> {
    let [_, _, h, hs] = dims;
    check_pos(op, "H", h)?;
    check_rotation(op, hs, theta)?;
    check_len(op, "x [B,T,H,HS]", len, &dims)
}

/// HS even, > 0 and <= 512 (the CUDA kernels' limit: their table in shared memory, kept here
/// for parity), theta finite and > 0.
fn check_rotation(op: &'static str, hs: usize, theta: f32) -> Result<()> {
    if hs == 0 || !hs.is_multiple_of(2) || hs > 512 {
        return Err(Error::invalid(
            op,
            format!("HS = {hs} must be even, > 0 and <= 512"),
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::invalid(
            op,
            format!("theta = {theta} must be finite and > 0"),
        ));
    }
    Ok(())
}

/// q [B,TQ,NH,HS], k and v [B,TMAX,NKV,HS] and the fused qkv [B,TQ,NH+2NKV,HS] (`lens` in
/// that order), with rope's conditions on HS and theta; `d` at the position the op starts at
/// ([`at_position`]).
fn check_qkv_rope(
    op: &'static str,
    lens: [usize; 4],
    names: [&str; 4],
    pos: Option<&Vec<u32>>,
    d: CacheDims,
    theta: f32,
) -> Result<CacheDims> {
    let CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        ..
    } = d;
    check_pos(op, "NH", nh)?;
    check_pos(op, "NKV", nkv)?;
    check_rotation(op, hs, theta)?;
    let dims = [
        [b, tq, nh, hs],
        [b, tmax, nkv, hs],
        [b, tmax, nkv, hs],
        [b, tq, nh + 2 * nkv, hs],
    ];
    for ((len, name), dims) in lens.into_iter().zip(names).zip(&dims) {
        check_len(op, name, len, dims)?;
    }
    at_position(op, pos, d)
}

impl Device for CpuDevice {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Graph = ();

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&self, n: usize) -> Result<Self::Buf> {
        Ok(vec![0.0; n])
    }

    fn upload(&self, host: &[f32]) -> Result<Self::Buf> {
        Ok(host.to_vec())
    }

    fn write(&self, dst: ViewMut<'_, Buf>, host: &[f32]) -> Result<()> {
        check_write(dst.len(), host.len())?;
        get_mut("write", "dst", dst)?.copy_from_slice(host);
        Ok(())
    }

    fn download(&self, x: View<'_, Buf>) -> Result<Vec<f32>> {
        Ok(get("download", "x", x)?.to_vec())
    }

    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids> {
        Ok(host.to_vec())
    }

    fn write_ids(&self, ids: &mut Vec<u32>, host: &[u32]) -> Result<()> {
        check_same("write_ids", "ids", ids.len(), host.len())?;
        ids.copy_from_slice(host);
        Ok(())
    }

    fn fill(&self, x: ViewMut<'_, Buf>, value: f32) -> Result<()> {
        get_mut("fill", "x", x)?
            .par_chunks_mut(CHUNK)
            .for_each(|x| x.fill(value));
        Ok(())
    }

    fn copy(&self, dst: ViewMut<'_, Buf>, src: View<'_, Buf>) -> Result<()> {
        const OP: &str = "copy";
        check_same(OP, "dst", dst.len(), src.len())?;
        get_mut(OP, "dst", dst)?
            .par_chunks_mut(CHUNK)
            .zip(get(OP, "src", src)?.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    }

    fn embedding_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        ids: &Self::Ids,
        wte: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_fwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "ids [N]", ids.len(), &[n])?;
        check_len(OP, "out [N,C]", out.len(), &[n, c])?;
        let v = rows_of(OP, "wte [V,C]", wte.len(), c)?;
        check_ids(OP, "ids", ids, v)?;
        embedding::embedding_fwd(get_mut(OP, "out", out)?, ids, get(OP, "wte", wte)?, c);
        Ok(())
    }

    fn embedding_bwd(
        &self,
        dwte: ViewMut<'_, Buf>,
        ids: &Self::Ids,
        dout: View<'_, Buf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_bwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "ids [N]", ids.len(), &[n])?;
        check_len(OP, "dout [N,C]", dout.len(), &[n, c])?;
        let v = rows_of(OP, "dwte [V,C]", dwte.len(), c)?;
        check_ids(OP, "ids", ids, v)?;
        embedding::embedding_bwd(get_mut(OP, "dwte", dwte)?, ids, get(OP, "dout", dout)?, c);
        Ok(())
    }

    fn rmsnorm_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        rstd: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        w: View<'_, Buf>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_fwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "out [N,C]", out.len(), &[n, c])?;
        check_len(OP, "rstd [N]", rstd.len(), &[n])?;
        check_len(OP, "x [N,C]", x.len(), &[n, c])?;
        check_len(OP, "w [C]", w.len(), &[c])?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(
                OP,
                format!("eps = {eps} must be finite and >= 0"),
            ));
        }
        rmsnorm::rmsnorm_fwd(
            get_mut(OP, "out", out)?,
            get_mut(OP, "rstd", rstd)?,
            get(OP, "x", x)?,
            get(OP, "w", w)?,
            c,
            eps,
        );
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dw: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        x: View<'_, Buf>,
        w: View<'_, Buf>,
        rstd: View<'_, Buf>,
        n: usize,
        c: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_bwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "dx [N,C]", dx.len(), &[n, c])?;
        check_len(OP, "dw [C]", dw.len(), &[c])?;
        check_len(OP, "dout [N,C]", dout.len(), &[n, c])?;
        check_len(OP, "x [N,C]", x.len(), &[n, c])?;
        check_len(OP, "w [C]", w.len(), &[c])?;
        check_len(OP, "rstd [N]", rstd.len(), &[n])?;
        rmsnorm::rmsnorm_bwd(
            get_mut(OP, "dx", dx)?,
            get_mut(OP, "dw", dw)?,
            get(OP, "dout", dout)?,
            get(OP, "x", x)?,
            get(OP, "w", w)?,
            get(OP, "rstd", rstd)?,
            c,
            accumulate,
        );
        Ok(())
    }

    fn rope_fwd(
        &self,
        x: ViewMut<'_, Buf>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        pos: Option<&Vec<u32>>,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_fwd";
        check_rope(OP, x.len(), [b, t, h, hs], theta)?;
        let pos0 = position(OP, pos, pos0)?;
        rope::rope_fwd(get_mut(OP, "x", x)?, t, h, hs, pos0, theta);
        Ok(())
    }

    fn rope_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        b: usize,
        t: usize,
        h: usize,
        hs: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_bwd";
        check_rope(OP, dx.len(), [b, t, h, hs], theta)?;
        rope::rope_bwd(get_mut(OP, "dx", dx)?, t, h, hs, pos0, theta);
        Ok(())
    }

    fn qkv_rope_fwd(
        &self,
        q: ViewMut<'_, Buf>,
        k: ViewMut<'_, Buf>,
        v: ViewMut<'_, Buf>,
        qkv: View<'_, Buf>,
        pos: Option<&Vec<u32>>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "qkv_rope_fwd";
        let lens = [q.len(), k.len(), v.len(), qkv.len()];
        let d = check_qkv_rope(OP, lens, ["q", "k", "v", "qkv"], pos, d, theta)?;
        rope::qkv_rope_fwd(
            get_mut(OP, "q", q)?,
            get_mut(OP, "k", k)?,
            get_mut(OP, "v", v)?,
            get(OP, "qkv", qkv)?,
            d,
            theta,
        );
        Ok(())
    }

    fn qkv_rope_bwd(
        &self,
        dqkv: ViewMut<'_, Buf>,
        dq: View<'_, Buf>,
        dk: View<'_, Buf>,
        dv: View<'_, Buf>,
        d: CacheDims,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "qkv_rope_bwd";
        let lens = [dq.len(), dk.len(), dv.len(), dqkv.len()];
        let d = check_qkv_rope(OP, lens, ["dq", "dk", "dv", "dqkv"], None, d, theta)?;
        rope::qkv_rope_bwd(
            get_mut(OP, "dqkv", dqkv)?,
            get(OP, "dq", dq)?,
            get(OP, "dk", dk)?,
            get(OP, "dv", dv)?,
            d,
            theta,
        );
        Ok(())
    }

    fn attention_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        lse: ViewMut<'_, Buf>,
        q: View<'_, Buf>,
        k: View<'_, Buf>,
        v: View<'_, Buf>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_fwd";
        check_attn(OP, &d)?;
        let AttnDims { b, t, nh, nkv, hs } = d;
        check_len(OP, "out [B,T,NH,HS]", out.len(), &[b, t, nh, hs])?;
        check_len(OP, "lse [B,NH,T]", lse.len(), &[b, nh, t])?;
        check_len(OP, "q [B,T,NH,HS]", q.len(), &[b, t, nh, hs])?;
        check_len(OP, "k [B,T,NKV,HS]", k.len(), &[b, t, nkv, hs])?;
        check_len(OP, "v [B,T,NKV,HS]", v.len(), &[b, t, nkv, hs])?;
        attention::attention_fwd(
            get_mut(OP, "out", out)?,
            get_mut(OP, "lse", lse)?,
            get(OP, "q", q)?,
            get(OP, "k", k)?,
            get(OP, "v", v)?,
            d,
        );
        Ok(())
    }

    fn attention_bwd(
        &self,
        dq: ViewMut<'_, Buf>,
        dk: ViewMut<'_, Buf>,
        dv: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        q: View<'_, Buf>,
        k: View<'_, Buf>,
        v: View<'_, Buf>,
        out: View<'_, Buf>,
        lse: View<'_, Buf>,
        d: AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention_bwd";
        check_attn(OP, &d)?;
        let AttnDims { b, t, nh, nkv, hs } = d;
        check_len(OP, "dq [B,T,NH,HS]", dq.len(), &[b, t, nh, hs])?;
        check_len(OP, "dk [B,T,NKV,HS]", dk.len(), &[b, t, nkv, hs])?;
        check_len(OP, "dv [B,T,NKV,HS]", dv.len(), &[b, t, nkv, hs])?;
        check_len(OP, "dout [B,T,NH,HS]", dout.len(), &[b, t, nh, hs])?;
        check_len(OP, "q [B,T,NH,HS]", q.len(), &[b, t, nh, hs])?;
        check_len(OP, "k [B,T,NKV,HS]", k.len(), &[b, t, nkv, hs])?;
        check_len(OP, "v [B,T,NKV,HS]", v.len(), &[b, t, nkv, hs])?;
        check_len(OP, "out [B,T,NH,HS]", out.len(), &[b, t, nh, hs])?;
        check_len(OP, "lse [B,NH,T]", lse.len(), &[b, nh, t])?;
        attention::attention_bwd(
            get_mut(OP, "dq", dq)?,
            get_mut(OP, "dk", dk)?,
            get_mut(OP, "dv", dv)?,
            get(OP, "dout", dout)?,
            get(OP, "q", q)?,
            get(OP, "k", k)?,
            get(OP, "v", v)?,
            get(OP, "out", out)?,
            get(OP, "lse", lse)?,
            d,
        );
        Ok(())
    }

    fn swiglu_fwd(&self, out: ViewMut<'_, Buf>, gu: View<'_, Buf>) -> Result<()> {
        const OP: &str = "swiglu_fwd";
        check_same(OP, "gu", gu.len(), 2 * out.len())?;
        swiglu::swiglu_fwd(get_mut(OP, "out", out)?, get(OP, "gu", gu)?);
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        dgu: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        gu: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "swiglu_bwd";
        let n = dout.len();
        check_same(OP, "dgu", dgu.len(), 2 * n)?;
        check_same(OP, "gu", gu.len(), 2 * n)?;
        swiglu::swiglu_bwd(
            get_mut(OP, "dgu", dgu)?,
            get(OP, "dout", dout)?,
            get(OP, "gu", gu)?,
        );
        Ok(())
    }

    fn matmul(
        &self,
        c: ViewMut<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "matmul";
        check_matmul([a.len(), b.len(), c.len()], [m, n, k], ta, tb)?;
        matmul::matmul(
            get_mut(OP, "c", c)?,
            get(OP, "a", a)?,
            get(OP, "b", b)?,
            [m, n, k],
            ta,
            tb,
            alpha,
            beta,
        )
    }

    fn matmul_add(
        &self,
        d: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> Result<()> {
        const OP: &str = "matmul_add";
        check_matmul([a.len(), b.len(), d.len()], [m, n, k], ta, tb)?;
        check_same(OP, "x", x.len(), d.len())?;
        // d and x are distinct borrows: d = x, then d += op(a) op(b)
        let d = get_mut(OP, "d", d)?;
        d.copy_from_slice(get(OP, "x", x)?);
        matmul::matmul(
            d,
            get(OP, "a", a)?,
            get(OP, "b", b)?,
            [m, n, k],
            ta,
            tb,
            1.0,
            1.0,
        )
    }

    fn residual_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        a: View<'_, Buf>,
        b: View<'_, Buf>,
    ) -> Result<()> {
        const OP: &str = "residual_fwd";
        check_same(OP, "a", a.len(), out.len())?;
        check_same(OP, "b", b.len(), out.len())?;
        residual::residual_fwd(get_mut(OP, "out", out)?, get(OP, "a", a)?, get(OP, "b", b)?);
        Ok(())
    }

    fn residual_bwd(&self, da: ViewMut<'_, Buf>, dout: View<'_, Buf>) -> Result<()> {
        const OP: &str = "residual_bwd";
        check_same(OP, "dout", dout.len(), da.len())?;
        residual::residual_bwd(get_mut(OP, "da", da)?, get(OP, "dout", dout)?);
        Ok(())
    }

    fn cross_entropy_chunk_fwd(
        &self,
        losses: ViewMut<'_, Buf>,
        state: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        targets: &Self::Ids,
        mask: View<'_, Buf>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_chunk_fwd";
        cross_entropy::check_chunk(OP, (vc, v, v0), state.len(), targets.len(), mask.len(), n)?;
        check_ids(OP, "targets", targets, v)?;
        check_len(OP, "losses [N]", losses.len(), &[n])?;
        check_len(OP, "logits [N,VC]", logits.len(), &[n, vc])?;
        cross_entropy::cross_entropy_chunk_fwd(
            get_mut(OP, "losses", losses)?,
            get_mut(OP, "state", state)?,
            get(OP, "logits", logits)?,
            targets,
            get(OP, "mask", mask)?,
            vc,
            v,
            v0,
        );
        Ok(())
    }

    fn cross_entropy_chunk_bwd(
        &self,
        logits: ViewMut<'_, Buf>,
        state: View<'_, Buf>,
        targets: &Self::Ids,
        mask: View<'_, Buf>,
        n: usize,
        vc: usize,
        v: usize,
        v0: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_chunk_bwd";
        cross_entropy::check_chunk(OP, (vc, v, v0), state.len(), targets.len(), mask.len(), n)?;
        check_ids(OP, "targets", targets, v)?;
        check_len(OP, "logits [N,VC]", logits.len(), &[n, vc])?;
        cross_entropy::cross_entropy_chunk_bwd(
            get_mut(OP, "logits", logits)?,
            get(OP, "state", state)?,
            targets,
            get(OP, "mask", mask)?,
            vc,
            v0,
            scale,
        );
        Ok(())
    }

    fn softmax_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_fwd";
        check_pos(OP, "V", v)?;
        check_len(OP, "out [N,V]", out.len(), &[n, v])?;
        check_len(OP, "x [N,V]", x.len(), &[n, v])?;
        softmax::softmax_fwd(get_mut(OP, "out", out)?, get(OP, "x", x)?, v);
        Ok(())
    }

    fn softmax_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dout: View<'_, Buf>,
        out: View<'_, Buf>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_bwd";
        check_pos(OP, "V", v)?;
        check_len(OP, "dx [N,V]", dx.len(), &[n, v])?;
        check_len(OP, "dout [N,V]", dout.len(), &[n, v])?;
        check_len(OP, "out [N,V]", out.len(), &[n, v])?;
        softmax::softmax_bwd(
            get_mut(OP, "dx", dx)?,
            get(OP, "dout", dout)?,
            get(OP, "out", out)?,
            v,
        );
        Ok(())
    }

    fn inject_fwd(
        &self,
        h: ViewMut<'_, Buf>,
        sites: &Self::Ids,
        vecs: View<'_, Buf>,
        n: usize,
        c: usize,
        mode: super::InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_fwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "h [N,C]", h.len(), &[n, c])?;
        check_len(OP, "vecs [S,C]", vecs.len(), &[sites.len(), c])?;
        inject::check_sites(OP, sites, n)?;
        inject::inject_fwd(get_mut(OP, "h", h)?, sites, get(OP, "vecs", vecs)?, c, mode);
        Ok(())
    }

    fn inject_bwd(
        &self,
        dvecs: ViewMut<'_, Buf>,
        dh: ViewMut<'_, Buf>,
        sites: &Self::Ids,
        n: usize,
        c: usize,
        mode: super::InjectMode,
    ) -> Result<()> {
        const OP: &str = "inject_bwd";
        check_pos(OP, "C", c)?;
        check_len(OP, "dvecs [S,C]", dvecs.len(), &[sites.len(), c])?;
        check_len(OP, "dh [N,C]", dh.len(), &[n, c])?;
        inject::check_sites(OP, sites, n)?;
        inject::inject_bwd(
            get_mut(OP, "dvecs", dvecs)?,
            get_mut(OP, "dh", dh)?,
            sites,
            c,
            mode,
        );
        Ok(())
    }

    fn norm_scale_fwd(
        &self,
        y: ViewMut<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()> {
        const OP: &str = "norm_scale_fwd";
        check_pos(OP, "D", d)?;
        check_len(OP, "y [N,D]", y.len(), &[n, d])?;
        check_len(OP, "x [N,D]", x.len(), &[n, d])?;
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("s = {s} must be finite and > 0"),
            ));
        }
        norm_scale::norm_scale_fwd(get_mut(OP, "y", y)?, get(OP, "x", x)?, d, s);
        Ok(())
    }

    fn norm_scale_bwd(
        &self,
        dx: ViewMut<'_, Buf>,
        dy: View<'_, Buf>,
        x: View<'_, Buf>,
        n: usize,
        d: usize,
        s: f32,
    ) -> Result<()> {
        const OP: &str = "norm_scale_bwd";
        check_pos(OP, "D", d)?;
        check_len(OP, "dx [N,D]", dx.len(), &[n, d])?;
        check_len(OP, "dy [N,D]", dy.len(), &[n, d])?;
        check_len(OP, "x [N,D]", x.len(), &[n, d])?;
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("s = {s} must be finite and > 0"),
            ));
        }
        norm_scale::norm_scale_bwd(
            get_mut(OP, "dx", dx)?,
            get(OP, "dy", dy)?,
            get(OP, "x", x)?,
            d,
            s,
        );
        Ok(())
    }

    fn pool_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        h: View<'_, Buf>,
        mask: View<'_, Buf>,
        w: Option<View<'_, Buf>>,
        b: usize,
        t: usize,
        c: usize,
        mode: super::PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_fwd";
        check_pos(OP, "T", t)?;
        check_pos(OP, "C", c)?;
        check_len(OP, "out [B,C]", out.len(), &[b, c])?;
        check_len(OP, "h [B,T,C]", h.len(), &[b, t, c])?;
        check_len(OP, "mask [B,T]", mask.len(), &[b, t])?;
        pool::check_weights(OP, "w", w.map(|w| w.len()), t, mode)?;
        let w = w.map_or(Ok(&[][..]), |w| get(OP, "w", w))?;
        let mask = get(OP, "mask", mask)?;
        pool::check_padding_mask(OP, mask, t)?;
        pool::pool_fwd(
            get_mut(OP, "out", out)?,
            get(OP, "h", h)?,
            mask,
            w,
            t,
            c,
            mode,
        );
        Ok(())
    }

    fn pool_bwd(
        &self,
        dh: ViewMut<'_, Buf>,
        dw: Option<ViewMut<'_, Buf>>,
        dout: View<'_, Buf>,
        h: View<'_, Buf>,
        mask: View<'_, Buf>,
        w: Option<View<'_, Buf>>,
        b: usize,
        t: usize,
        c: usize,
        mode: super::PoolMode,
    ) -> Result<()> {
        const OP: &str = "pool_bwd";
        check_pos(OP, "T", t)?;
        check_pos(OP, "C", c)?;
        check_len(OP, "dh [B,T,C]", dh.len(), &[b, t, c])?;
        check_len(OP, "dout [B,C]", dout.len(), &[b, c])?;
        check_len(OP, "h [B,T,C]", h.len(), &[b, t, c])?;
        check_len(OP, "mask [B,T]", mask.len(), &[b, t])?;
        pool::check_weights(OP, "w", w.map(|w| w.len()), t, mode)?;
        pool::check_weights(OP, "dw", dw.as_ref().map(|w| w.len()), t, mode)?;
        if let (Some(w), Some(dw)) = (&w, &dw) {
            check_same(OP, "dw [Tmax]", dw.len(), w.len())?;
        }
        let w = w.map_or(Ok(&[][..]), |w| get(OP, "w", w))?;
        let dw = match dw {
            Some(dw) => get_mut(OP, "dw", dw)?,
            None => &mut [][..],
        };
        let mask = get(OP, "mask", mask)?;
        pool::check_padding_mask(OP, mask, t)?;
        pool::pool_bwd(
            get_mut(OP, "dh", dh)?,
            dw,
            get(OP, "dout", dout)?,
            get(OP, "h", h)?,
            mask,
            w,
            t,
            c,
            mode,
        );
        Ok(())
    }

    fn reward_advantage(
        &self,
        mse: ViewMut<'_, Buf>,
        reward: ViewMut<'_, Buf>,
        advantage: ViewMut<'_, Buf>,
        pred: View<'_, Buf>,
        target: View<'_, Buf>,
        valid: View<'_, Buf>,
        s: usize,
        a: usize,
        spec: &super::RewardSpec,
    ) -> Result<()> {
        const OP: &str = "reward_advantage";
        check_pos(OP, "S", s)?;
        check_pos(OP, "A", a)?;
        check_len(OP, "mse [S]", mse.len(), &[s])?;
        check_len(OP, "reward [S]", reward.len(), &[s])?;
        check_len(OP, "advantage [S]", advantage.len(), &[s])?;
        check_len(OP, "pred [S,A]", pred.len(), &[s, a])?;
        check_len(OP, "target [S,A]", target.len(), &[s, a])?;
        check_len(OP, "valid [S]", valid.len(), &[s])?;
        reward::check_spec(OP, spec, s)?;
        let valid = get(OP, "valid", valid)?;
        pool::check_binary(OP, "valid", valid)?;
        reward::reward_advantage(
            get_mut(OP, "mse", mse)?,
            get_mut(OP, "reward", reward)?,
            get_mut(OP, "advantage", advantage)?,
            get(OP, "pred", pred)?,
            get(OP, "target", target)?,
            valid,
            a,
            spec,
        );
        Ok(())
    }

    fn policy_loss_fwd(
        &self,
        stats: ViewMut<'_, Buf>,
        logp: View<'_, Buf>,
        old_logp: View<'_, Buf>,
        adv: View<'_, Buf>,
        mask: View<'_, Buf>,
        ref_logp: Option<View<'_, Buf>>,
        s: usize,
        t: usize,
        spec: &super::PolicyLossSpec,
    ) -> Result<()> {
        const OP: &str = "policy_loss_fwd";
        check_len(OP, "stats", stats.len(), &[super::PolicyStat::COUNT])?;
        let (logp, old_logp, adv, mask, ref_logp) =
            policy_loss::device_inputs(OP, [logp, old_logp, adv, mask], ref_logp, s, t, spec)?;
        policy_loss::policy_loss_fwd(
            get_mut(OP, "stats", stats)?,
            logp,
            old_logp,
            adv,
            mask,
            ref_logp,
            t,
            spec,
        );
        Ok(())
    }

    fn policy_loss_bwd(
        &self,
        dlogp: ViewMut<'_, Buf>,
        logp: View<'_, Buf>,
        old_logp: View<'_, Buf>,
        adv: View<'_, Buf>,
        mask: View<'_, Buf>,
        ref_logp: Option<View<'_, Buf>>,
        s: usize,
        t: usize,
        spec: &super::PolicyLossSpec,
    ) -> Result<()> {
        const OP: &str = "policy_loss_bwd";
        check_len(OP, "dlogp [N]", dlogp.len(), &[s, t])?;
        let (logp, old_logp, adv, mask, ref_logp) =
            policy_loss::device_inputs(OP, [logp, old_logp, adv, mask], ref_logp, s, t, spec)?;
        policy_loss::policy_loss_bwd(
            get_mut(OP, "dlogp", dlogp)?,
            logp,
            old_logp,
            adv,
            mask,
            ref_logp,
            t,
            spec,
        );
        Ok(())
    }

    fn adamw(
        &self,
        p: ViewMut<'_, Buf>,
        work: Option<ViewMut<'_, Buf>>,
        g: View<'_, Buf>,
        m: ViewMut<'_, Buf>,
        v: ViewMut<'_, Buf>,
        hp: &AdamwStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        if let Some(w) = &work {
            check_same(OP, "work", w.len(), p.len())?;
        }
        check_same(OP, "g", g.len(), p.len())?;
        check_same(OP, "m", m.len(), p.len())?;
        check_same(OP, "v", v.len(), p.len())?;
        if hp.step == 0 {
            return Err(Error::invalid(OP, "step is 1-based, got 0"));
        }
        if !((0.0..1.0).contains(&hp.beta1) && (0.0..1.0).contains(&hp.beta2)) {
            return Err(Error::invalid(
                OP,
                format!(
                    "beta1 = {} and beta2 = {} must lie in [0, 1)",
                    hp.beta1, hp.beta2
                ),
            ));
        }
        let p = get_mut(OP, "p", p)?;
        adamw::adamw(
            p,
            get(OP, "g", g)?,
            get_mut(OP, "m", m)?,
            get_mut(OP, "v", v)?,
            hp,
        );
        // the working copy: f32 here, like p
        if let Some(w) = work {
            get_mut(OP, "work", w)?.copy_from_slice(p);
        }
        Ok(())
    }

    fn sum_squares(&self, x: View<'_, Buf>) -> Result<f64> {
        Ok(adamw::sum_squares(get("sum_squares", "x", x)?))
    }

    fn download_ids(&self, ids: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(ids.clone())
    }

    fn kv_append_fwd(
        &self,
        kcache: ViewMut<'_, Buf>,
        vcache: ViewMut<'_, Buf>,
        k: View<'_, Buf>,
        v: View<'_, Buf>,
        pos: Option<&Vec<u32>>,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "kv_append_fwd";
        let d = at_position(OP, pos, d)?;
        let (kc, vc) = (
            get_mut(OP, "kcache", kcache)?,
            get_mut(OP, "vcache", vcache)?,
        );
        let (k, v) = (get(OP, "k", k)?, get(OP, "v", v)?);
        let cache = [d.b, d.tmax, d.nkv, d.hs];
        check_len(OP, "kcache [B,TMAX,NKV,HS]", kc.len(), &cache)?;
        check_len(OP, "vcache [B,TMAX,NKV,HS]", vc.len(), &cache)?;
        check_len(OP, "k [B,TQ,NKV,HS]", k.len(), &[d.b, d.tq, d.nkv, d.hs])?;
        check_len(OP, "v [B,TQ,NKV,HS]", v.len(), &[d.b, d.tq, d.nkv, d.hs])?;
        kv_append::kv_append_fwd(kc, vc, k, v, d);
        Ok(())
    }

    fn decode_attention_fwd(
        &self,
        out: ViewMut<'_, Buf>,
        q: View<'_, Buf>,
        kcache: View<'_, Buf>,
        vcache: View<'_, Buf>,
        starts: &Vec<u32>,
        pos: Option<&Vec<u32>>,
        d: CacheDims,
    ) -> Result<()> {
        const OP: &str = "decode_attention_fwd";
        let d = at_position(OP, pos, d)?;
        check_attn(
            OP,
            &AttnDims {
                b: d.b,
                t: d.tq,
                nh: d.nh,
                nkv: d.nkv,
                hs: d.hs,
            },
        )?;
        let out = get_mut(OP, "out", out)?;
        let (q, kc, vc) = (
            get(OP, "q", q)?,
            get(OP, "kcache", kcache)?,
            get(OP, "vcache", vcache)?,
        );
        check_len(OP, "out [B,TQ,NH,HS]", out.len(), &[d.b, d.tq, d.nh, d.hs])?;
        check_len(OP, "q [B,TQ,NH,HS]", q.len(), &[d.b, d.tq, d.nh, d.hs])?;
        check_len(
            OP,
            "kcache [B,TMAX,NKV,HS]",
            kc.len(),
            &[d.b, d.tmax, d.nkv, d.hs],
        )?;
        check_len(
            OP,
            "vcache [B,TMAX,NKV,HS]",
            vc.len(),
            &[d.b, d.tmax, d.nkv, d.hs],
        )?;
        check_len(OP, "starts [B]", starts.len(), &[d.b])?;
        check_ids(OP, "starts", starts, d.tmax)?;
        decode_attention::decode_attention_fwd(out, q, kc, vc, starts, d);
        Ok(())
    }

    fn sample_fwd(
        &self,
        ids: &mut Vec<u32>,
        logp: ViewMut<'_, Buf>,
        logits: View<'_, Buf>,
        u: View<'_, Buf>,
        n: usize,
        v: usize,
        spec: &SampleSpec,
    ) -> Result<()> {
        const OP: &str = "sample_fwd";
        check_pos(OP, "V", v)?;
        let logp = get_mut(OP, "logp", logp)?;
        let (logits, u) = (get(OP, "logits", logits)?, get(OP, "u", u)?);
        check_len(OP, "ids [N]", ids.len(), &[n])?;
        check_len(OP, "logp [N]", logp.len(), &[n])?;
        check_len(OP, "logits [N,V]", logits.len(), &[n, v])?;
        check_len(OP, "u [N]", u.len(), &[n])?;
        if !(spec.temperature >= 0.0 && spec.temperature.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("temperature {} must be >= 0", spec.temperature),
            ));
        }
        if !(spec.top_p > 0.0 && spec.top_p <= 1.0) {
            return Err(Error::invalid(
                OP,
                format!("top_p {} must be in (0, 1]", spec.top_p),
            ));
        }
        if let Some(i) = u.iter().position(|x| !(0.0..1.0).contains(x)) {
            return Err(Error::invalid(
                OP,
                format!("u[{i}] = {} is not in [0, 1)", u[i]),
            ));
        }
        sample::sample_fwd(ids, logp, logits, u, v, *spec);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn vexp_is_within_2_ulp_of_exp() {
        // every 1/4096 step over the range softmax, cross-entropy, attention and silu use
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = x.vexp() as f64;
            worst = worst.max((got - want).abs() / want);
            x += 1.0 / 4096.0;
        }
        // 2 ulp of f32 is 2 * 2^-23 relative at most
        assert!(
            worst < 2.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!((-100f32).vexp(), 0.0);
        assert_eq!(f32::NEG_INFINITY.vexp(), 0.0);
        assert_eq!(0f32.vexp(), 1.0);
        assert!(f32::NAN.vexp().is_nan());
        assert!(100f32.vexp() > 1e38);
    }
}
