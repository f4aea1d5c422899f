//! `kernels/decode_attention.cu`: attention of TQ queries over a KV cache.
//! `decode_attention_fwd_f32_hs<B>`: grid (nsplit, TQ * NKV * ceil(G/8), B), block 128 (G =
//! NH/NKV query heads per KV head, 8 per block); with nsplit > 1 each split writes partial
//! (o, m, l) to scratch and decode_attention_combine_f32 (one warp per row, ceil(R/4) blocks
//! of 128 capped at 4 * SMs, R = B*TQ*NH) merges them.

use super::attention::hs_bucket;
use super::{check_ids, check_len, check_pos, int, EmuArgs, Launch};
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

/// out[B,TQ,NH,HS] from q[B,TQ,NH,HS], caches [B,TMAX,NKV,HS] and starts [B].
pub fn fwd<L: Launch + ?Sized>(
    l: &L,
    out: &mut [f32],
    q: &[f32],
    kcache: &[f32],
    vcache: &[f32],
    starts: &[u32],
    d: CacheDims,
) -> Result<()> {
    const OP: &str = "decode_attention_fwd";
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
    if pos0 + tq > tmax {
        return Err(Error::invalid(
            OP,
            format!(
                "queries end at position {} beyond the cache's {tmax}",
                pos0 + tq
            ),
        ));
    }
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
    check_ids(OP, "starts", starts, tmax)?;
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
    let ns = nsplit(&d, starts, l.sms());
    let rows = b * tq * nh;
    let scratch = if ns > 1 { ns * rows } else { 0 };
    // partial results (on the GPU: from the device's scratch arena)
    let mut part_o = vec![0f32; scratch * hs];
    let mut part_ml = vec![0f32; scratch * 2];
    let mut a = EmuArgs::new();
    a.ptr_mut(&mut *out)
        .ptr_mut(&mut part_o[..])
        .ptr_mut(&mut part_ml[..]);
    a.ptr(q).ptr(kcache).ptr(vcache).ptr(starts);
    for x in [b, tq, tmax, nh, nkv, hs, pos0, ns] {
        a.scalar(x as i32);
    }
    let sym = format!("decode_attention_fwd_f32_hs{hsb}");
    l.launch(
        &sym,
        [ns as u32, y as u32, b as u32],
        [NT, 1, 1],
        smem(hsb),
        &mut a,
    )?;
    drop(a);
    if ns > 1 {
        let mut a = EmuArgs::new();
        a.ptr_mut(out).ptr(&part_o[..]).ptr(&part_ml[..]);
        a.scalar(rows as i32).scalar(hs as i32).scalar(ns as i32);
        let grid = rows.div_ceil(4).min(4 * l.sms()) as u32;
        l.launch(
            "decode_attention_combine_f32",
            [grid, 1, 1],
            [128, 1, 1],
            0,
            &mut a,
        )?;
    }
    Ok(())
}
