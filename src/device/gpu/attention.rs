//! `kernels/attention.cu`: causal GQA attention, head sizes bucketed to 16/32/64/128 (one
//! kernel per bucket). `attention_fwd_<f32|bf16>_hs<B>`: grid (ceil(T/64), NH, B), block 128;
//! for bf16 at buckets 64 and 128 also `attention_fwd_bf16_hs<B>_bo128`, 128 query rows per
//! block, grid (ceil(T/128), NH, B) ([`fwd_rows`] picks it at 128; [`fwd_with_rows`] names it).
//! The backward is three launches: `attention_bwd_dot_<f32|bf16>` (D = rowsum(dout * out) into
//! the caller's f32 scratch, one warp per row, ceil(rows / 4) blocks of 128 capped at 4 * SMs),
//! `attention_bwd_dq_<f32|bf16>_hs<B>` (grid as the forward) and
//! `attention_bwd_dkdv_<f32|bf16>_hs<B>` (grid (ceil(T/64), NKV, B)). q, k, v, out, dout, dq,
//! dk, dv are T; lse and the scratch D f32 in both dtypes. The f32 kernels hold f32 tiles in
//! shared memory ([`smem`]); the bf16 forward, dq and dkdv run on tensor cores with bf16 tiles
//! ([`fwd_smem`], [`bwd_smem`]).

use super::{check_len, check_pos, int, EmuArgs, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::device::{AttnDims, Dtype};
use crate::{Error, Result};

/// Threads per block of every attention kernel.
pub const NT: u32 = 128;

/// The head-size bucket: the smallest of 16, 32, 64, 128 that holds `hs`.
pub fn hs_bucket(op: &'static str, hs: usize) -> Result<usize> {
    [16, 32, 64, 128]
        .into_iter()
        .find(|&b| b >= hs)
        .ok_or_else(|| Error::invalid(op, format!("HS = {hs} > 128 is not supported")))
}

/// Dynamic shared memory (bytes) of fwd, dq, dkdv for bucket `hsb`.
pub fn smem(hsb: usize) -> [usize; 3] {
    let bi = if hsb >= 128 { 32 } else { 64 };
    let (ld, lp) = (hsb + 1, bi + 2);
    [
        4 * (64 * ld + 2 * bi * ld + 64 * lp),
        4 * (2 * 64 * ld + 2 * bi * ld + 64 * lp),
        4 * (2 * 64 * ld + 2 * bi * ld + 2 * 64 * lp + 2 * bi),
    ]
}

/// Dynamic shared memory (bytes) of the forward over T for bucket `hsb` and `rows` query rows
/// per block ([`fwd_rows`]): the f32 kernel's ([`smem`]), or the bf16 tensor-core kernel's K
/// and V tiles in two buffers, 4 x BK x (HSB + 8) bf16 (BK = 64, 32 for 128 rows at HSB 128),
/// plus Q's 128 rows there (its fragments do not fit in registers).
pub fn fwd_smem<T: Storage>(hsb: usize, rows: usize) -> usize {
    let (bk, q_rows) = if rows == 128 && hsb == 128 {
        (32, 128)
    } else {
        (64, 0)
    };
    match T::DTYPE {
        Dtype::Bf16 => 2 * (4 * bk + q_rows) * (hsb + 8),
        _ => smem(hsb)[0],
    }
}

/// Query rows per block of the forward: 128 (the `_bo128` kernels, whose warps take two
/// 16-row m-tiles, so each K and V fragment read from shared memory feeds two tensor-core
/// products) for the bf16 forward at HS bucket 128 when its ceil(T/128) x NH x B blocks still
/// fill `sms` SMs twice; else 64 (twice the blocks, for short or few sequences). At HS 64 the
/// 128-row kernel exists too ([`fwd_with_rows`]) but would hold 2 blocks per SM instead of 3:
/// the benches time both, and the launcher keeps 64 until a GPU run says otherwise.
pub fn fwd_rows<T: Storage>(hsb: usize, d: &AttnDims, sms: usize) -> usize {
    let bo128 = T::DTYPE == Dtype::Bf16 && hsb == 128;
    let blocks = d.t.div_ceil(128).saturating_mul(d.nh).saturating_mul(d.b);
    if bo128 && blocks >= 2 * sms {
        128
    } else {
        64
    }
}

/// Dynamic shared memory (bytes) of the backward's dq and dkdv kernels over T for bucket `hsb`:
/// the f32 kernels' ([`smem`]), or the bf16 tensor-core kernels' bf16 tiles of HSB + 8
/// (dq: Q, dO [64] and two buffers of K, V [BK]; dkdv: K, V [64] and two buffers of Q, dO [BQ]
/// plus lse and D [BQ] in f32; BK = BQ = 64, 32 for HSB 128).
pub fn bwd_smem<T: Storage>(hsb: usize) -> [usize; 2] {
    match T::DTYPE {
        Dtype::Bf16 => {
            let (ld, bk) = (hsb + 8, if hsb >= 128 { 32 } else { 64 });
            [
                2 * (2 * 64 + 4 * bk) * ld,
                2 * (2 * 64 + 4 * bk) * ld + 16 * bk,
            ]
        }
        _ => {
            let [_, dq, dkdv] = smem(hsb);
            [dq, dkdv]
        }
    }
}

fn check_dims(op: &'static str, d: &AttnDims) -> Result<usize> {
    check_pos(op, "NH", d.nh)?;
    check_pos(op, "NKV", d.nkv)?;
    check_pos(op, "HS", d.hs)?;
    if !d.nh.is_multiple_of(d.nkv) {
        return Err(Error::invalid(
            op,
            format!("NH = {} is not a multiple of NKV = {}", d.nh, d.nkv),
        ));
    }
    if d.nh > 65535 || d.b > 65535 {
        return Err(Error::invalid(op, "NH and B must be <= 65535 (grid y, z)"));
    }
    int(op, "B*T*NH*HS", d.b * d.t * d.nh * d.hs)?;
    hs_bucket(op, d.hs)
}

fn pack_dims(a: &mut EmuArgs<'_>, d: &AttnDims, with_kv: bool) {
    a.scalar(d.b as i32).scalar(d.t as i32).scalar(d.nh as i32);
    if with_kv {
        a.scalar(d.nkv as i32);
    }
    a.scalar(d.hs as i32);
}

/// out[B,T,NH,HS], lse[B,NH,T] from q[B,T,NH,HS], k, v [B,T,NKV,HS]. out, q, k, v: T; lse: f32.
/// Query rows per block as [`fwd_rows`] picks them for `l`'s SMs.
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    lse: impl Into<Out<'a, f32>>,
    q: impl Into<In<'a, T>>,
    k: impl Into<In<'a, T>>,
    v: impl Into<In<'a, T>>,
    d: AttnDims,
) -> Result<()> {
    let rows = fwd_rows::<T>(hs_bucket("attention_fwd", d.hs)?, &d, l.sms());
    fwd_with_rows(l, out, lse, q, k, v, d, rows)
}

/// [`fwd`] with `rows` query rows per block: 64, or 128 for the bf16 forward at HS > 32 (the
/// benches time both).
#[allow(clippy::too_many_arguments)]
pub fn fwd_with_rows<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    lse: impl Into<Out<'a, f32>>,
    q: impl Into<In<'a, T>>,
    k: impl Into<In<'a, T>>,
    v: impl Into<In<'a, T>>,
    d: AttnDims,
    rows: usize,
) -> Result<()> {
    const OP: &str = "attention_fwd";
    let (out, lse, q, k, v) = (out.into(), lse.into(), q.into(), k.into(), v.into());
    let hsb = check_dims(OP, &d)?;
    if rows != 64 && !(rows == 128 && T::DTYPE == Dtype::Bf16 && hsb >= 64) {
        return Err(Error::invalid(
            OP,
            format!(
                "{rows} query rows per block: 64, or 128 for bf16 at HS > 32 (here {} HS {})",
                T::DTYPE,
                d.hs
            ),
        ));
    }
    let AttnDims { b, t, nh, nkv, hs } = d;
    check_len(OP, "out [B,T,NH,HS]", out.len(), &[b, t, nh, hs])?;
    check_len(OP, "lse [B,NH,T]", lse.len(), &[b, nh, t])?;
    check_len(OP, "q [B,T,NH,HS]", q.len(), &[b, t, nh, hs])?;
    check_len(OP, "k [B,T,NKV,HS]", k.len(), &[b, t, nkv, hs])?;
    check_len(OP, "v [B,T,NKV,HS]", v.len(), &[b, t, nkv, hs])?;
    if b * t == 0 {
        return Ok(());
    }
    let mut a = EmuArgs::new();
    a.output(out).output(lse).input(q).input(k).input(v);
    a.scalar(b as i32)
        .scalar(t as i32)
        .scalar(nh as i32)
        .scalar(nkv as i32)
        .scalar(hs as i32);
    let grid = [t.div_ceil(rows) as u32, nh as u32, b as u32];
    let bo = if rows == 128 { "_bo128" } else { "" };
    let name = format!("{}_hs{hsb}{bo}", sym::<T>("attention_fwd"));
    l.launch(&name, grid, [NT, 1, 1], fwd_smem::<T>(hsb, rows), &mut a)
}

/// Elements of [`bwd`]'s f32 scratch `dscratch`: D [B,NH,T] (D_i = dout_i . out_i, written by
/// attention_bwd_dot and read by the dq and dkdv kernels; no zeroing needed). 0 when B*T = 0
/// (nothing is launched then).
pub fn bwd_scratch_len(d: &AttnDims) -> usize {
    d.b.saturating_mul(d.nh).saturating_mul(d.t)
}

/// dq =, dk =, dv = from dout and the forward's q, k, v, out, lse. `dscratch` is the scratch D
/// of [`bwd_scratch_len`] elements (its contents on entry do not matter; it is overwritten).
/// dq, dk, dv, dout, q, k, v, out: T; dscratch, lse: f32.
#[allow(clippy::too_many_arguments)]
pub fn bwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    dq: impl Into<Out<'a, T>>,
    dk: impl Into<Out<'a, T>>,
    dv: impl Into<Out<'a, T>>,
    dscratch: impl Into<Out<'a, f32>>,
    dout: impl Into<In<'a, T>>,
    q: impl Into<In<'a, T>>,
    k: impl Into<In<'a, T>>,
    v: impl Into<In<'a, T>>,
    out: impl Into<In<'a, T>>,
    lse: impl Into<In<'a, f32>>,
    d: AttnDims,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    let (dq, dk, dv, mut dscratch) = (dq.into(), dk.into(), dv.into(), dscratch.into());
    let (dout, q, k, v) = (dout.into(), q.into(), k.into(), v.into());
    let (out, lse) = (out.into(), lse.into());
    let hsb = check_dims(OP, &d)?;
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
    check_len(OP, "dscratch [B,NH,T]", dscratch.len(), &[b, nh, t])?;
    if b * t == 0 {
        return Ok(());
    }
    let [smem_dq, smem_dkdv] = bwd_smem::<T>(hsb);
    // scratch D [B,NH,T]: rows > 0 here (B*T > 0, NH > 0)
    let rows = b * t * nh;
    // 1. D = rowsum(dout * out)
    let dot_grid = rows.div_ceil(4).min(4 * l.sms()) as u32;
    let mut a = EmuArgs::new();
    a.output(dscratch.reborrow()).input(dout).input(out);
    pack_dims(&mut a, &d, false);
    l.launch(
        &sym::<T>("attention_bwd_dot"),
        [dot_grid, 1, 1],
        [NT, 1, 1],
        0,
        &mut a,
    )?;
    drop(a);
    let dscratch = dscratch.as_in();
    // 2. dq
    let mut a = EmuArgs::new();
    a.output(dq)
        .input(dout)
        .input(q)
        .input(k)
        .input(v)
        .input(lse)
        .input(dscratch);
    pack_dims(&mut a, &d, true);
    let grid = [t.div_ceil(64) as u32, nh as u32, b as u32];
    let name = format!("{}_hs{hsb}", sym::<T>("attention_bwd_dq"));
    l.launch(&name, grid, [NT, 1, 1], smem_dq, &mut a)?;
    // 3. dk, dv
    let mut a = EmuArgs::new();
    a.output(dk)
        .output(dv)
        .input(dout)
        .input(q)
        .input(k)
        .input(v)
        .input(lse)
        .input(dscratch);
    pack_dims(&mut a, &d, true);
    let grid = [t.div_ceil(64) as u32, nkv as u32, b as u32];
    let name = format!("{}_hs{hsb}", sym::<T>("attention_bwd_dkdv"));
    l.launch(&name, grid, [NT, 1, 1], smem_dkdv, &mut a)
}
