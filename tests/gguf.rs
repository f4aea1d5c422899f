//! GGUF loading: a tiny random Llama written here in every supported tensor type (quantised with
//! ggml's reference block algorithms, q/k rows in the converter's order) against the same weights
//! built directly; malformed files; and the real SmolLM2-135M-Instruct
//! (`scripts/fetch-smollm2.sh`) answering a question.

mod common;

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::{Rng, SeedableRng};

use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, View};
use nla_engine::model::gguf::{self, GgmlType, Value};
use nla_engine::model::{forward, ActivationSet, Batch, Model, ModelConfig, ParamTable, Tokenizer};

// ---------------------------------------------------------------------------------------------
// A small GGUF writer

const ALIGN: usize = 32;

struct Writer {
    version: u32,
    align: usize,
    kv: Vec<u8>,
    n_kv: u64,
    keys: Vec<String>,
    /// name, ne (innermost first), ggml type, data
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl Writer {
    fn new(version: u32) -> Self {
        Writer {
            version,
            align: ALIGN,
            kv: vec![],
            n_kv: 0,
            keys: vec![],
            tensors: vec![],
        }
    }

    /// One key of value type `ty` whose encoded value is `value`; a key already written is
    /// left as it was (so that a test can set a key before `tiny_gguf` writes the rest).
    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) {
        if self.keys.iter().any(|k| k == key) {
            return;
        }
        self.keys.push(key.to_string());
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
    }

    fn u32(&mut self, key: &str, v: u32) {
        self.kv(key, 4, &v.to_le_bytes());
    }

    fn f32(&mut self, key: &str, v: f32) {
        self.kv(key, 6, &v.to_le_bytes());
    }

    fn bool(&mut self, key: &str, v: bool) {
        self.kv(key, 7, &[v as u8]);
    }

    fn str(&mut self, key: &str, v: &str) {
        let mut b = vec![];
        put_str(&mut b, v);
        self.kv(key, 8, &b);
    }

    /// An array of `n` elements of type `elem`, encoded back to back in `items`.
    fn array(&mut self, key: &str, elem: u32, n: usize, items: &[u8]) {
        let mut b = elem.to_le_bytes().to_vec();
        b.extend((n as u64).to_le_bytes());
        b.extend(items);
        self.kv(key, 9, &b);
    }

    fn strs(&mut self, key: &str, items: &[String]) {
        let mut b = vec![];
        for s in items {
            put_str(&mut b, s);
        }
        self.array(key, 8, items.len(), &b);
    }

    fn i32s(&mut self, key: &str, items: &[i32]) {
        let b: Vec<u8> = items.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.array(key, 5, items.len(), &b);
    }

    fn tensor(&mut self, name: &str, ne: Vec<u64>, ty: u32, data: Vec<u8>) {
        self.tensors.push((name.to_string(), ne, ty, data));
    }

    fn bytes(&self) -> Vec<u8> {
        let pad = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(self.align) * self.align, 0);
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut data = vec![];
        for (name, ne, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            data.extend(bytes);
            pad(&mut data);
        }
        pad(&mut out);
        out.extend(data);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Reference quantisers (ggml's block algorithms) and their decoders

/// Encodes `x` (whole blocks) as ggml type `ty`.
fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(32) {
                // the value of largest magnitude, with its sign, maps to -8
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|&v| ((v * id + 8.5) as i32).min(15) as u8)
                    .collect();
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks_exact(32) {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|&v| (((v - min) * id + 0.5) as i32).min(15) as u8)
                    .collect();
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
        }
        t => panic!("no quantiser for {t}"),
    }
    out
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes what `quantize` wrote (the format's definition, written out independently).
fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| half_at(b, 0)).collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|b| (0..32).map(move |i| half_at(b, 0) * (b[2 + i] as i8) as f32))
            .collect(),
        GgmlType::Q4_0 => bytes
            .chunks_exact(18)
            .flat_map(|b| {
                let q = |i: usize| {
                    if i < 16 {
                        b[2 + i] & 15
                    } else {
                        b[2 + i - 16] >> 4
                    }
                };
                (0..32).map(move |i| half_at(b, 0) * (q(i) as i32 - 8) as f32)
            })
            .collect(),
        GgmlType::Q4_1 => bytes
            .chunks_exact(20)
            .flat_map(|b| {
                let q = |i: usize| {
                    if i < 16 {
                        b[4 + i] & 15
                    } else {
                        b[4 + i - 16] >> 4
                    }
                };
                (0..32).map(move |i| half_at(b, 0) * q(i) as f32 + half_at(b, 2))
            })
            .collect(),
        t => panic!("no decoder for {t}"),
    }
}

/// Largest error that quantising `block` (the values of one block) as `ty` may make, from the
/// algorithm: rounding to the nearest level costs half a step (a full step for Q4_0, whose top
/// level 15 is clipped), and storing the scale (and Q4_1's minimum) as f16 moves every level
/// by up to |q| times the scale's rounding error. F16/BF16 round each value to 11/8 significant
/// bits (plus half an f16 subnormal step). A 1e-6 relative slack covers f32 arithmetic.
fn quant_bound(ty: GgmlType, block: &[f32]) -> Vec<f32> {
    let r16 = |x: f32| (f16::from_f32(x).to_f32() - x).abs();
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let slack = 1e-6 * amax;
    match ty {
        GgmlType::F32 => block.iter().map(|_| 0.0).collect(),
        GgmlType::F16 => block
            .iter()
            .map(|x| x.abs() * 2f32.powi(-11) + 2f32.powi(-25))
            .collect(),
        GgmlType::BF16 => block.iter().map(|x| x.abs() * 2f32.powi(-8)).collect(),
        GgmlType::Q8_0 => {
            let d = amax / 127.0;
            vec![d / 2.0 + 127.0 * r16(d) + slack; 32]
        }
        GgmlType::Q4_0 => {
            let d = amax / 8.0;
            vec![d + 8.0 * r16(d) + slack; 32]
        }
        GgmlType::Q4_1 => {
            let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let d = (max - min) / 15.0;
            vec![d / 2.0 + 15.0 * r16(d) + r16(min) + slack; 32]
        }
        t => panic!("no bound for {t}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The tiny Llama

fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        vocab_size: 64,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Random weights in the HF layout; norm weights near 1 but all different.
fn tiny_weights(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let table = ParamTable::for_config(cfg);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut flat = vec![0f32; table.total];
    for e in &table.entries {
        let norm = e.shape.len() == 1;
        for x in &mut flat[e.offset..e.offset + e.len] {
            let u: f32 = rng.random::<f32>() - 0.5;
            *x = if norm { 1.0 + 0.4 * u } else { 0.3 * u };
        }
    }
    flat
}

/// The llama.cpp name of an HF parameter name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        p => panic!("unknown part {p}"),
    };
    format!("blk.{layer}.{g}.weight")
}

/// What llama.cpp's converter does to q_proj/k_proj: per head, the rows viewed as (2, HS/2)
/// are transposed to (HS/2, 2), so that the two rotate-half partners become adjacent rows.
fn converter_permute(w: &[f32], heads: usize, row: usize) -> Vec<f32> {
    let hs = w.len() / row / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hs / 2 {
                let src = (h * hs + j * hs / 2 + i) * row;
                let dst = (h * hs + 2 * i + j) * row;
                out[dst..dst + row].copy_from_slice(&w[src..src + row]);
            }
        }
    }
    out
}

/// The tokenizer of the tiny model: 3 control tokens, single characters (byte-level: `Ġ` is the
/// space) and a few merges, among them "1 2" (which the "smollm" pre-tokenizer never applies,
/// since it splits digits apart first).
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(('0'..='9').map(String::from));
    tokens.extend(["Ġ", ".", ",", "?", "!"].map(String::from));
    let merges: Vec<String> = ["t h", "th e", "Ġ the", "a t", "c at", "Ġ cat", "1 2", "Ġ s"]
        .map(String::from)
        .to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    while tokens.len() < 64 {
        tokens.push(format!("<|unused{}|>", tokens.len()));
    }
    let types = tokens
        .iter()
        .map(|t| if t.starts_with("<|") { 3 } else { 1 })
        .collect();
    (tokens, types, merges)
}

/// A GGUF file of the tiny model: matrices in `ty`, norms in F32 (as the converter writes
/// them). Returns the bytes and the weights that the file holds, decoded, in the HF layout.
fn tiny_gguf(cfg: &ModelConfig, flat: &[f32], ty: GgmlType, w: &mut Writer) -> Vec<f32> {
    let (tokens, types, merges) = tiny_vocab();
    w.str("general.architecture", "llama");
    w.str("general.name", "tiny");
    w.u32("llama.block_count", cfg.num_hidden_layers as u32);
    w.u32("llama.context_length", cfg.max_position_embeddings as u32);
    w.u32("llama.embedding_length", cfg.hidden_size as u32);
    w.u32("llama.feed_forward_length", cfg.intermediate_size as u32);
    w.u32("llama.attention.head_count", cfg.num_attention_heads as u32);
    w.u32(
        "llama.attention.head_count_kv",
        cfg.num_key_value_heads as u32,
    );
    w.f32("llama.rope.freq_base", cfg.rope_theta);
    w.f32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps);
    w.u32("llama.rope.dimension_count", cfg.head_dim as u32);
    w.str("tokenizer.ggml.model", "gpt2");
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strs("tokenizer.ggml.merges", &merges);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.bool("tokenizer.ggml.add_bos_token", false);
    let table = ParamTable::for_config(cfg);
    let mut decoded = vec![0f32; table.total];
    for e in &table.entries {
        let hf = &flat[e.offset..e.offset + e.len];
        let row = e.shape[e.shape.len() - 1];
        let stored = if e.name.ends_with("q_proj.weight") {
            converter_permute(hf, cfg.num_attention_heads, row)
        } else if e.name.ends_with("k_proj.weight") {
            converter_permute(hf, cfg.num_key_value_heads, row)
        } else {
            hf.to_vec()
        };
        let t = if e.shape.len() == 1 {
            GgmlType::F32
        } else {
            ty
        };
        let bytes = quantize(t, &stored);
        // the decoded file values, permuted back by rows (both orders use whole rows)
        let back = dequantize(t, &bytes);
        let unpermuted = if stored == hf {
            back
        } else {
            let heads = if e.name.contains("q_proj") {
                cfg.num_attention_heads
            } else {
                cfg.num_key_value_heads
            };
            let mut out = vec![0f32; back.len()];
            for (src_row, dst_row) in row_order(heads, e.shape[0] / heads) {
                out[dst_row * row..(dst_row + 1) * row]
                    .copy_from_slice(&back[src_row * row..(src_row + 1) * row]);
            }
            out
        };
        decoded[e.offset..e.offset + e.len].copy_from_slice(&unpermuted);
        let ne = e.shape.iter().rev().map(|&d| d as u64).collect();
        w.tensor(&gguf_name(&e.name), ne, t.0, bytes);
    }
    decoded
}

/// (file row, HF row) pairs of `converter_permute`.
fn row_order(heads: usize, hs: usize) -> Vec<(usize, usize)> {
    let mut v = vec![];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hs / 2 {
                v.push((h * hs + 2 * i + j, h * hs + j * hs / 2 + i));
            }
        }
    }
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn logits(dev: &CpuDevice, model: &Model<CpuDevice>, rows: &[Vec<u32>]) -> Vec<f32> {
    let batch = Batch::causal_lm(rows).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, batch.b, batch.t).unwrap();
    forward(dev, model, &mut acts, &batch.upload(dev).unwrap()).unwrap();
    dev.download(View::all(&acts.logits)).unwrap()
}

#[test]
fn tiny_llama_in_every_tensor_type_matches_the_directly_built_model() {
    let dev = CpuDevice::new();
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        vec![5, 17, 3, 60, 42, 9, 33, 1],
        vec![63, 0, 12, 12, 7, 50, 21, 4],
    ];
    let cases = [
        (GgmlType::F32, false, 3, 32, Some("smollm")),
        (GgmlType::F16, true, 2, 64, Some("gpt2")),
        (GgmlType::BF16, true, 3, 32, None),
        (GgmlType::Q8_0, true, 3, 32, Some("smollm")),
        (GgmlType::Q4_0, true, 2, 32, Some("smollm")),
        (GgmlType::Q4_1, true, 3, 128, Some("smollm")),
    ];
    for (ty, tied, version, align, pre) in cases {
        let cfg = tiny_config(tied);
        let flat = tiny_weights(&cfg, 7 + ty.0 as u64);
        let mut w = Writer::new(version);
        w.align = align;
        if align != 32 {
            w.u32("general.alignment", align as u32);
        }
        if let Some(pre) = pre {
            w.str("tokenizer.ggml.pre", pre);
        }
        let add_bos = ty == GgmlType::F16;
        w.bool("tokenizer.ggml.add_bos_token", add_bos);
        let decoded = tiny_gguf(&cfg, &flat, ty, &mut w);
        let path = write(dir.path(), &format!("tiny-{ty}.gguf"), &w.bytes());
        let (model, tok) = gguf::load_gguf(&dev, &path).unwrap();
        assert_eq!(model.cfg, cfg, "{ty}: config");
        let loaded = model.params_to_host(&dev).unwrap();

        // The loader must reproduce the file's values exactly (same decode formula, f32 math).
        assert!(
            loaded == decoded,
            "{ty}: loaded weights differ from the file's values"
        );
        // And those are the original weights up to what the quantisation may cost: exact for
        // F32, per element or per 32-block bounds from the algorithm otherwise (see quant_bound).
        for e in &model.table.entries {
            let (orig, got) = (&flat[e.offset..][..e.len], &loaded[e.offset..][..e.len]);
            let t = if e.shape.len() == 1 {
                GgmlType::F32
            } else {
                ty
            };
            let block = if matches!(t, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
                32
            } else {
                1
            };
            // blocks follow file rows; q/k rows moved as wholes, so HF rows hold whole blocks
            for (k, (o, g)) in orig.chunks(block).zip(got.chunks(block)).enumerate() {
                for ((x, y), b) in o.iter().zip(g).zip(quant_bound(t, o)) {
                    assert!(
                        (x - y).abs() <= b,
                        "{ty}: {} block {k}: {y} vs {x} (bound {b})",
                        e.name
                    );
                }
            }
        }
        if ty != GgmlType::F32 {
            assert!(
                loaded != flat,
                "{ty}: the quantised weights should not be exact"
            );
        }

        // The same logits as the model built from the same values.
        let direct = Model::from_host(&dev, cfg.clone(), &decoded).unwrap();
        assert_eq!(
            logits(&dev, &model, &rows),
            logits(&dev, &direct, &rows),
            "{ty}: logits"
        );

        check_tiny_tokenizer(&tok, pre.unwrap_or("gpt2"), add_bos);
    }
}

fn check_tiny_tokenizer(tok: &Tokenizer, pre: &str, add_bos: bool) {
    let id = |s: &str| tok.token_to_id(s).unwrap();
    let ids = tok.encode("the cat sat.", false).unwrap();
    assert_eq!(
        ids,
        [id("the"), id("Ġcat"), id("Ġs"), id("at"), id(".")],
        "{pre}"
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "the cat sat.");
    // control tokens are matched whole in text and skipped when asked
    let ids = tok.encode("<|im_start|>the<|im_end|>", false).unwrap();
    assert_eq!(ids, [1, id("the"), 2]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "the");
    // "smollm" splits every digit off before BPE: the merge "1 2" never applies
    let ids = tok.encode("12", false).unwrap();
    let want = if pre == "smollm" {
        vec![id("1"), id("2")]
    } else {
        vec![id("12")]
    };
    assert_eq!(ids, want, "{pre}: digits");
    // `add_special_tokens` puts BOS first where the file asks for it
    let ids = tok.encode("the", true).unwrap();
    let want = if add_bos {
        vec![1, id("the")]
    } else {
        vec![id("the")]
    };
    assert_eq!(ids, want, "add_bos_token {add_bos}");
}

#[test]
fn metadata_of_every_value_type_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new(3);
    w.kv("t.u8", 0, &[200]);
    w.kv("t.i8", 1, &(-5i8).to_le_bytes());
    w.kv("t.u16", 2, &60000u16.to_le_bytes());
    w.kv("t.i16", 3, &(-300i16).to_le_bytes());
    w.u32("t.u32", 4_000_000_000);
    w.kv("t.i32", 5, &(-70000i32).to_le_bytes());
    w.f32("t.f32", 0.25);
    w.bool("t.bool", true);
    w.str("t.str", "héllo");
    w.kv("t.u64", 10, &(1u64 << 40).to_le_bytes());
    w.kv("t.i64", 11, &(-(1i64 << 40)).to_le_bytes());
    w.kv("t.f64", 12, &(-1.5f64).to_le_bytes());
    w.i32s("t.arr", &[1, -2, 3]);
    // an array of two arrays of u8
    let mut nested = vec![];
    for items in [&[1u8, 2][..], &[3u8][..]] {
        nested.extend(0u32.to_le_bytes());
        nested.extend((items.len() as u64).to_le_bytes());
        nested.extend(items);
    }
    w.array("t.nested", 9, 2, &nested);
    w.tensor("x", vec![4, 2], 0, vec![0; 32]);
    let path = write(dir.path(), "meta.gguf", &w.bytes());
    let g = gguf::read_gguf(&path).unwrap();
    let want = [
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-5)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-300)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-70000)),
        ("t.f32", Value::F32(0.25)),
        ("t.bool", Value::Bool(true)),
        ("t.str", Value::Str("héllo".into())),
        ("t.u64", Value::U64(1 << 40)),
        ("t.i64", Value::I64(-(1 << 40))),
        ("t.f64", Value::F64(-1.5)),
        (
            "t.arr",
            Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)]),
        ),
        (
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::U8(1), Value::U8(2)]),
                Value::Array(vec![Value::U8(3)]),
            ]),
        ),
    ];
    assert_eq!(g.metadata.len(), want.len());
    for (k, v) in want {
        assert_eq!(g.get(k), Some(&v), "{k}");
    }
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    let t = g.tensor("x").unwrap();
    assert_eq!(
        (t.dims.clone(), t.ty, t.elements),
        (vec![4, 2], GgmlType::F32, 8)
    );
    assert_eq!(t.hf_shape(), [2, 4]);
    assert_eq!(t.offset % 32, 0);
    assert_eq!(g.tensor_f32("x").unwrap(), [0.0; 8]);
}

/// The error of loading `bytes` as a GGUF model; it must name the file.
fn load_error(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = write(dir, name, bytes);
    match gguf::load_gguf(&CpuDevice::new(), &path) {
        Ok(_) => panic!("{name}: loaded without error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(name),
                "{name}: message does not name the file: {msg}"
            );
            msg
        }
    }
}

#[test]
fn malformed_files_are_errors_naming_file_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = tiny_config(true);
    let flat = tiny_weights(&cfg, 1);
    let good = |edit: &dyn Fn(&mut Writer)| {
        let mut w = Writer::new(3);
        edit(&mut w);
        tiny_gguf(&cfg, &flat, GgmlType::F32, &mut w);
        w
    };
    let bytes = good(&|_| {}).bytes();

    let msg = load_error(d, "cut-data.gguf", &bytes[..bytes.len() / 2]);
    assert!(msg.contains("runs past the end of the file"), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    let msg = load_error(d, "cut-header.gguf", &bytes[..300]);
    assert!(msg.contains("truncated"), "{msg}");
    let msg = load_error(d, "tiny.gguf", &bytes[..3]);
    assert!(msg.contains("truncated or not a GGUF file"), "{msg}");

    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    let msg = load_error(d, "magic.gguf", &bad);
    assert!(
        msg.contains("bad magic") && msg.contains("not a GGUF file"),
        "{msg}"
    );

    let mut bad = bytes.clone();
    bad[4..8].copy_from_slice(&1u32.to_le_bytes());
    let msg = load_error(d, "v1.gguf", &bad);
    assert!(msg.contains("version 1"), "{msg}");

    let msg = load_error(
        d,
        "valtype.gguf",
        &good(&|w| w.kv("x.bad", 13, &[0; 8])).bytes(),
    );
    assert!(
        msg.contains("`x.bad`") && msg.contains("unknown value type 13"),
        "{msg}"
    );

    let mut w = good(&|_| {});
    let up = w
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.ffn_up.weight")
        .unwrap();
    up.2 = 6; // Q5_0: 22 bytes per 32 elements
    up.3 = vec![0; 128 * 64 / 32 * 22];
    let msg = load_error(d, "q5.gguf", &w.bytes());
    assert!(
        msg.contains("`blk.0.ffn_up.weight`") && msg.contains("Q5_0"),
        "{msg}"
    );

    let mut w = good(&|_| {});
    w.tensors.retain(|t| t.0 != "blk.1.ffn_down.weight");
    let msg = load_error(d, "missing.gguf", &w.bytes());
    assert!(msg.contains("`blk.1.ffn_down.weight` is missing"), "{msg}");

    let mut w = good(&|_| {});
    w.tensor("blk.0.attn_q.bias", vec![64], 0, vec![0; 256]);
    let msg = load_error(d, "extra.gguf", &w.bytes());
    assert!(
        msg.contains("`blk.0.attn_q.bias` is not a parameter"),
        "{msg}"
    );

    let mut w = good(&|_| {});
    let q = w
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.1.attn_q.weight")
        .unwrap();
    q.1 = vec![32, 128];
    let msg = load_error(d, "shape.gguf", &w.bytes());
    assert!(
        msg.contains("`blk.1.attn_q.weight` has shape [128, 32]"),
        "{msg}"
    );

    let msg = load_error(
        d,
        "arch.gguf",
        &good(&|w| w.str("general.architecture", "gpt2")).bytes(),
    );
    assert!(
        msg.contains("`general.architecture`") && msg.contains("\"gpt2\" is not supported"),
        "{msg}"
    );

    let mut w = good(&|_| {});
    put_str(&mut w.kv, "general.name");
    w.kv.extend(8u32.to_le_bytes());
    put_str(&mut w.kv, "again");
    w.n_kv += 1;
    let msg = load_error(d, "twice.gguf", &w.bytes());
    assert!(msg.contains("`general.name` appears twice"), "{msg}");

    let msg = load_error(
        d,
        "scaling.gguf",
        &good(&|w| w.str("llama.rope.scaling.type", "yarn")).bytes(),
    );
    assert!(
        msg.contains("llama.rope.scaling.type") && msg.contains("yarn"),
        "{msg}"
    );
    let msg = load_error(
        d,
        "vocab.gguf",
        &good(&|w| w.u32("llama.vocab_size", 32)).bytes(),
    );
    assert!(msg.contains("llama.vocab_size"), "{msg}");
}

#[test]
fn cut_or_corrupted_headers_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(false);
    let mut w = Writer::new(3);
    tiny_gguf(&cfg, &tiny_weights(&cfg, 3), GgmlType::Q8_0, &mut w);
    let bytes = w.bytes();
    let path = write(dir.path(), "good.gguf", &bytes);
    let header = gguf::read_gguf(&path).unwrap().data_offset as usize;
    let dev = CpuDevice::new();
    for cut in (0..header).step_by(5) {
        let path = write(dir.path(), "cut.gguf", &bytes[..cut]);
        assert!(
            gguf::read_gguf(&path).is_err(),
            "cut at {cut} read without error"
        );
    }
    // flipped header bytes may still give a loadable model, but never a panic
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..300 {
        let mut bad = bytes.clone();
        let at = rng.random_range(4..header);
        bad[at] ^= 1 << rng.random_range(0..8);
        let path = write(dir.path(), "flip.gguf", &bad);
        let _ = gguf::load_gguf(&dev, &path);
    }
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct

fn smollm2_path() -> PathBuf {
    common::smollm2_gguf()
}

#[test]
fn smollm2_answers_in_english() {
    let dev = CpuDevice::new();
    let path = smollm2_path();
    let g = gguf::read_gguf(&path).unwrap();
    let count = |ty: GgmlType| g.tensors.iter().filter(|t| t.ty == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::Q8_0),
            count(GgmlType::F32)
        ),
        (210, 1, 61)
    );
    let (model, tok) = gguf::load_gguf(&dev, &path).unwrap();
    let cfg = &model.cfg;
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads
        ),
        (30, 576, 9)
    );
    assert_eq!(
        (
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size
        ),
        (3, 64, 1536, 49152)
    );
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (1e5, 1e-5));
    assert!(cfg.tie_word_embeddings);
    assert_eq!(tok.vocab_size(true), 49152);

    let text = "The quick brown fox jumps over the lazy dog, twice in 2024!";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // SmolLM2 splits numbers into single digits
    let digits = tok.encode("2024", false).unwrap();
    let pieces: Vec<String> = digits
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap())
        .collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
    let end = tok.token_to_id("<|im_end|>").unwrap();

    // one user turn in ChatML, then the model's turn opened
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let mut ids = tok.encode(prompt, false).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    let n_prompt = ids.len();
    // greedy, re-running the whole prefix for each new token
    for _ in 0..20 {
        let mut row = ids.clone();
        row.push(0);
        let t = row.len();
        let logits = logits(&dev, &model, &[row]);
        let last = &logits[(t - 2) * cfg.vocab_size..(t - 1) * cfg.vocab_size];
        let next = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b }) as u32;
        ids.push(next);
        if next == end {
            break;
        }
    }
    let answer = tok.decode(&ids[n_prompt..], true).unwrap();
    println!("SmolLM2 greedy answer: {answer:?}");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    assert_eq!(ids.last(), Some(&end), "the answer should end its turn");
}
