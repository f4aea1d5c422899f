//! The host cost of deciding a graph replay ([`nla_engine::device::Device::replay`]): before a
//! decode step is replayed, its calls are recorded (arguments packed, each call compared with
//! the captured one), on the host, at every step. This bench records the calls of one decoder
//! layer at batch 1 (d_model 2048, FFN 5632, 32 heads of 64, 4 KV heads: a 1.1B Llama's
//! shapes) on the emulated CUDA device, where the launchers run the same host code as on a GPU;
//! nothing is launched. Throughput is in calls: "elem/s" reads as calls/s.
//!
//! `cargo bench --bench graph`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nla_engine::device::emu::EmuMode;
use nla_engine::device::emu_device::{EmuBuf, EmuDevice};
use nla_engine::device::gpu::Launch;
use nla_engine::device::{CacheDims, Device, View, ViewMut};

const C: usize = 2048;
const F: usize = 5632;
const NH: usize = 32;
const NKV: usize = 4;
const HS: usize = 64;
const QKV: usize = (NH + 2 * NKV) * HS;
/// the KV cache's positions
const TMAX: usize = 16;

fn buf(dev: &EmuDevice, n: usize) -> EmuBuf {
    dev.upload(&vec![0.5; n]).expect("upload")
}

fn v(x: &EmuBuf) -> View<'_, EmuBuf> {
    View::all(x)
}
fn m(x: &mut EmuBuf) -> ViewMut<'_, EmuBuf> {
    ViewMut::all(x)
}

/// One layer's calls at batch 1 (one row): 2 norms, 4 matmuls (q, k and v as one, o and down
/// adding into the residual stream, gate and up as one), the split with RoPE, SwiGLU.
fn layer(dev: &EmuDevice, b: &mut Bufs, pos: &Vec<u32>) -> nla_engine::Result<()> {
    dev.rmsnorm_fwd(
        m(&mut b.xn),
        m(&mut b.rstd),
        v(&b.x),
        v(&b.norm),
        1,
        C,
        1e-5,
    )?;
    // q, k and v as one matmul, then split and rotated
    dev.matmul(
        m(&mut b.qkv),
        v(&b.xn),
        v(&b.wqkv),
        1,
        QKV,
        C,
        false,
        true,
        1.0,
        0.0,
    )?;
    // k and v into the cache at the position `pos` holds
    let d = CacheDims {
        b: 1,
        tq: 1,
        tmax: TMAX,
        nh: NH,
        nkv: NKV,
        hs: HS,
        pos0: 0,
    };
    dev.qkv_rope_fwd(
        m(&mut b.q),
        m(&mut b.k),
        m(&mut b.v),
        v(&b.qkv),
        Some(pos),
        d,
        10000.0,
    )?;
    dev.matmul_add(
        m(&mut b.x_mid),
        v(&b.x),
        v(&b.q),
        v(&b.wq),
        1,
        C,
        NH * HS,
        false,
        false,
    )?;
    dev.rmsnorm_fwd(
        m(&mut b.xn),
        m(&mut b.rstd),
        v(&b.x_mid),
        v(&b.norm),
        1,
        C,
        1e-5,
    )?;
    let xn = v(&b.xn);
    // gate and up as one matmul, feature-major ([2F,1])
    dev.matmul(
        m(&mut b.gu),
        v(&b.wgu),
        xn,
        2 * F,
        1,
        C,
        false,
        true,
        1.0,
        0.0,
    )?;
    dev.swiglu_fwd(m(&mut b.h), v(&b.gu))?;
    dev.matmul_add(
        m(&mut b.x),
        v(&b.x_mid),
        v(&b.h),
        v(&b.wf),
        1,
        C,
        F,
        true,
        true,
    )
}
const CALLS: u64 = 8;

struct Bufs {
    x: EmuBuf,
    xn: EmuBuf,
    rstd: EmuBuf,
    norm: EmuBuf,
    qkv: EmuBuf,
    q: EmuBuf,
    k: EmuBuf,
    v: EmuBuf,
    x_mid: EmuBuf,
    gu: EmuBuf,
    h: EmuBuf,
    wqkv: EmuBuf,
    wq: EmuBuf,
    wf: EmuBuf,
    wgu: EmuBuf,
}

fn graph_record(c: &mut Criterion) {
    let dev = EmuDevice::new(EmuMode::Forward, 1);
    let mut b = Bufs {
        x: buf(&dev, C),
        xn: buf(&dev, C),
        rstd: buf(&dev, 1),
        norm: buf(&dev, C),
        qkv: buf(&dev, QKV),
        q: buf(&dev, NH * HS),
        k: buf(&dev, TMAX * NKV * HS),
        v: buf(&dev, TMAX * NKV * HS),
        x_mid: buf(&dev, C),
        gu: buf(&dev, 2 * F),
        h: buf(&dev, F),
        wqkv: buf(&dev, QKV * C),
        wq: buf(&dev, NH * HS * C),
        wf: buf(&dev, F * C),
        wgu: buf(&dev, 2 * F * C),
    };
    let pos = dev.upload_ids(&[7]).expect("upload ids");
    let rec = dev
        .launcher()
        .recorder()
        .expect("the emulated device records");
    // the record a replay compares with: the layer's calls once
    let first = rec.start(Vec::new()).expect("no other recording");
    layer(&dev, &mut b, &pos).expect("layer");
    let (mut expected, _) = first.finish().expect("a recordable layer");
    assert_eq!(expected.len() as u64, CALLS);

    let mut g = c.benchmark_group("graph_record");
    g.throughput(Throughput::Elements(CALLS));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("layer_b1_calls", |bench| {
        bench.iter(|| {
            let r = rec
                .start(std::mem::take(&mut expected))
                .expect("no other recording");
            layer(&dev, &mut b, &pos).expect("layer");
            let (calls, same) = r.finish().expect("a recordable layer");
            assert!(same, "the layer's calls changed");
            expected = calls;
        })
    });
    g.finish();
}

criterion_group!(benches, graph_record);
criterion_main!(benches);
