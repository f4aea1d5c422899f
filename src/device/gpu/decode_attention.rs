//! `kernels/decode_attention.cu`: attention of TQ queries over a KV cache.
//! `decode_attention_fwd_<f32|bf16>_hs<B>`: grid (nsplit, TQ * NKV * ceil(G/8), B), block 128
//! (G = NH/NKV query heads per KV head, 8 per block); with nsplit > 1 each split writes partial
//! (o, m, l) to the caller's f32 scratch ([`scratch_lens`]) and
//! `decode_attention_combine_<f32|bf16>` (one warp per row, ceil(R/4) blocks of 128 capped at
//! 4 * SMs, R = B*TQ*NH) merges them. q, kcache, vcache, out are T; part_o and part_ml f32 in
//! both dtypes (and shared memory f32: [`smem`] does not depend on T).

use super::attention::hs_bucket;
use super::{check_len, check_pos, int, EmuArgs, Ids, In, Launch, Out};
use crate::device::storage::{sym, Storage};
use crate::device::CacheDims;
use crate::{Error, Result};

/// Threads per block.
pub const NT: u32 = 128;

/// decode_attention.cu's dynamic shared memory for bucket `hsb`.
pub fn smem(hsb: usize) -> usize {
    4 * (8 * hsb + 32 * (hsb + 1) + 8 * 32 + 3 * 8 + 8 * 128)
}

/// The split count: 1 when B*TQ*NKV*nhc blocks already fill the SMs twice, else about 2*SMs
/// over that, capped at ceil(Lmax/32) and 64.
pub fn nsplit(d: &CacheDims, starts: &[u32], sms: usize) -> usize {
    let nhc = (d.nh / d.nkv).div_ceil(8);
    let blocks = d.b * d.tq * d.nkv * nhc;
    if blocks >= 2 * sms {
        return 1;
    }
    let smin = starts.iter().copied().min().unwrap_or(0) as usize;
    let lmax = (d.pos0 + d.tq).saturating_sub(smin).max(1);
    (2 * sms)
        .div_ceil(blocks.max(1))
        .clamp(1, lmax.div_ceil(32).min(64))
}

/// The split count [`fwd`] uses: [`nsplit`] over host `starts`; for device starts (whose values
/// the host cannot read) as if every row started at 0, the most splits the longest row would
/// get (splits past a row's keys write l = 0, which the combine skips). With the position on
/// the device (`device_pos`), as if the queries ended at TMAX, so that the split does not
/// change from step to step.
fn splits(d: &CacheDims, starts: &Ids<'_>, device_pos: bool, sms: usize) -> usize {
    let mut d = *d;
    if device_pos {
        d.pos0 = d.tmax.saturating_sub(d.tq);
    }
    nsplit(&d, starts.host().unwrap_or(&[]), sms)
}

/// Elements of [`fwd`]'s f32 scratch `(part_o, part_ml)`: with nsplit > 1 splits over R =
/// B*TQ*NH rows, part_o [nsplit][R][HS] (each split's unnormalised partial output) and part_ml
/// [nsplit][R][2] (its max m and sum l), written by the splits and merged by
/// decode_attention_combine (no zeroing needed); (0, 0) when the launch does not split (the
/// kernel gets null scratch pointers then) or has nothing to do. `starts`, `device_pos` (whether
/// `pos` is given) and the launcher `l` (its SM count) must be the ones passed to [`fwd`],
/// which checks the lengths exactly.
pub fn scratch_lens<'a, L: Launch + ?Sized>(
    l: &L,
    d: &CacheDims,
    starts: impl Into<Ids<'a>>,
    device_pos: bool,
) -> (usize, usize) {
    let starts = starts.into();
    let rows = d.b.saturating_mul(d.tq).saturating_mul(d.nh);
    if d.nkv == 0 || d.hs == 0 || rows == 0 {
        return (0, 0);
    }
    match splits(d, &starts, device_pos, l.sms()) {
        ns if ns > 1 => (
            ns.saturating_mul(rows).saturating_mul(d.hs),
            ns.saturating_mul(rows).saturating_mul(2),
        ),
        _ => (0, 0),
    }
}

/// out[B,TQ,NH,HS] from q[B,TQ,NH,HS], caches [B,TMAX,NKV,HS] and starts [B], with the scratch
/// `part_o`, `part_ml` of [`scratch_lens`] elements (empty when the launch does not split).
/// out, q, kcache, vcache: T; part_o, part_ml: f32. `pos`: one id, pos0 read on the device
/// instead of `d.pos0` (the launch is then the same at every position).
#[allow(clippy::too_many_arguments)]
pub fn fwd<'a, T: Storage, L: Launch + ?Sized>(
    l: &L,
    out: impl Into<Out<'a, T>>,
    part_o: impl Into<Out<'a, f32>>,
    part_ml: impl Into<Out<'a, f32>>,
    q: impl Into<In<'a, T>>,
    kcache: impl Into<In<'a, T>>,
    vcache: impl Into<In<'a, T>>,
    starts: impl Into<Ids<'a>>,
    pos: Option<Ids<'a>>,
    d: CacheDims,
) -> Result<()> {
    const OP: &str = "decode_attention_fwd";
    let (mut out, mut part_o, mut part_ml) = (out.into(), part_o.into(), part_ml.into());
    let (q, kcache, vcache, starts) = (q.into(), kcache.into(), vcache.into(), starts.into());
    let CacheDims {
        b,
        tq,
        tmax,
        nh,
        nkv,
        hs,
        pos0,
    } = d;
    check_pos(OP, "NH", nh)?;
    check_pos(OP, "NKV", nkv)?;
    check_pos(OP, "HS", hs)?;
    if !nh.is_multiple_of(nkv) {
        return Err(Error::invalid(
            OP,
            format!("NH = {nh} is not a multiple of NKV = {nkv}"),
        ));
    }
    super::check_positions(OP, pos, pos0, tq, tmax)?;
    let hsb = hs_bucket(OP, hs)?;
    check_len(OP, "out [B,TQ,NH,HS]", out.len(), &[b, tq, nh, hs])?;
    check_len(OP, "q [B,TQ,NH,HS]", q.len(), &[b, tq, nh, hs])?;
    check_len(
        OP,
        "kcache [B,TMAX,NKV,HS]",
        kcache.len(),
        &[b, tmax, nkv, hs],
    )?;
    check_len(
        OP,
        "vcache [B,TMAX,NKV,HS]",
        vcache.len(),
        &[b, tmax, nkv, hs],
    )?;
    check_len(OP, "starts [B]", starts.len(), &[b])?;
    starts.check(OP, "starts", tmax)?;
    let ns = splits(&d, &starts, pos.is_some(), l.sms());
    let rows = b * tq * nh;
    // partial results: the caller's scratch, used only when the launch splits
    let split = ns > 1 && rows > 0;
    let scratch = if split { ns * rows } else { 0 };
    check_len(OP, "part_o [nsplit,R,HS]", part_o.len(), &[scratch, hs])?;
    check_len(OP, "part_ml [nsplit,R,2]", part_ml.len(), &[scratch, 2])?;
    if b * tq == 0 {
        return Ok(());
    }
    int(OP, "B*TMAX*NKV*HS", b * tmax * nkv * hs)?;
    let nhc = (nh / nkv).div_ceil(8);
    let y = tq * nkv * nhc;
    if y > 65535 || b > 65535 {
        return Err(Error::invalid(
            OP,
            "TQ*NKV*ceil(G/8) and B must be <= 65535 (grid y, z)",
        ));
    }
    let mut a = EmuArgs::new();
    a.output(out.reborrow());
    if split {
        a.output(part_o.reborrow()).output(part_ml.reborrow());
    } else {
        // nsplit = 1 writes out directly: scratch unused, null
        a.null_mut::<f32>().null_mut::<f32>();
    }
    a.input(q).input(kcache).input(vcache).ids(starts);
    match pos {
        Some(p) => a.ids(p),
        None => a.null::<u32>(),
    };
    let pos0 = if pos.is_some() { 0 } else { pos0 };
    for x in [b, tq, tmax, nh, nkv, hs, pos0, ns] {
        a.scalar(x as i32);
    }
    let name = format!("{}_hs{hsb}", sym::<T>("decode_attention_fwd"));
    l.launch(
        &name,
        [ns as u32, y as u32, b as u32],
        [NT, 1, 1],
        smem(hsb),
        &mut a,
    )?;
    drop(a);
    if ns > 1 {
        let mut a = EmuArgs::new();
        a.output(out).input(part_o.as_in()).input(part_ml.as_in());
        a.scalar(rows as i32).scalar(hs as i32).scalar(ns as i32);
        let grid = rows.div_ceil(4).min(4 * l.sms()) as u32;
        l.launch(
            &sym::<T>("decode_attention_combine"),
            [grid, 1, 1],
            [128, 1, 1],
            0,
            &mut a,
        )?;
    }
    Ok(())
}
