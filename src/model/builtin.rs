//! The built-in demo subject model: a byte-level tokenizer (built in memory), a tiny Llama
//! config, causal-LM pre-training on a text, and saving both as an ordinary HF model folder
//! that [`super::load_model`], `ChatTemplate::load` and `Marker::choose` read like any other.
//!
//! Tokenizer: byte-level BPE without merges. Token id b (0..=255) is byte b, written as GPT-2's
//! byte-to-unicode character; `<|endoftext|>` = 256 (EOS and padding) and `<INJECT>` = 257 (the
//! NLA marker) are added special tokens.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{Batch, Model, ModelConfig, Tokenizer};
use crate::device::Device;
use crate::train::{AdamwConfig, LmTrainer, LrSchedule, ScheduleKind};
use crate::{Error, Result};

/// The end-of-text token: EOS and padding.
pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const EOS_ID: u32 = 256;
/// The NLA marker token.
pub const INJECT_TOKEN: &str = "<INJECT>";
pub const INJECT_ID: u32 = 257;
/// Vocabulary: 256 bytes + the two added tokens.
pub const DEMO_VOCAB: usize = 258;
/// Bytes per training window of [`pretrain_demo`].
pub const PRETRAIN_WINDOW: usize = 128;
/// Windows per optimizer step of [`pretrain_demo`].
pub const PRETRAIN_BATCH: usize = 8;

/// The demo corpus: short plain English sentences, one per line (`data/demo/texts.txt`).
pub const DEMO_TEXTS: &str = include_str!("../../data/demo/texts.txt");

/// The lines of [`DEMO_TEXTS`] that are not blank, trimmed.
pub fn demo_texts() -> Vec<String> {
    DEMO_TEXTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the others (controls,
/// space, a few Latin-1 ones) for U+0100 onwards, in byte order.
fn byte_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let cp = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        // every code point used (0x21..=0xFF and 0x100..0x144) is a valid char
        *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    out
}

/// The tokenizer.json of the byte-level tokenizer.
fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_to_unicode()
        .iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), json!(b)))
        .collect();
    let added = |id: u32, content: &str| {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(EOS_ID, EOS_TOKEN), added(INJECT_ID, INJECT_TOKEN)],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": false
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": false
        },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

/// The byte-level tokenizer: id = byte value for 0..=255, `<|endoftext|>` = 256,
/// `<INJECT>` = 257. Named `builtin:demo` in errors.
pub fn byte_tokenizer() -> Result<Tokenizer> {
    let origin = PathBuf::from("builtin:demo");
    let fail = |msg: String| Error::Tokenizer {
        path: origin.clone(),
        msg,
    };
    let bytes = serde_json::to_vec(&tokenizer_json()).map_err(|e| fail(e.to_string()))?;
    let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| fail(e.to_string()))?;
    for (token, id) in [(EOS_TOKEN, EOS_ID), (INJECT_TOKEN, INJECT_ID)] {
        if inner.token_to_id(token) != Some(id) {
            return Err(fail(format!("added token {token} did not get id {id}")));
        }
    }
    Ok(Tokenizer::from_tokenizers(inner, origin))
}

/// The demo subject model: a byte-level Llama, vocab 258, d_model 128, FFN 384, 4 layers,
/// 4 query / 2 key-value heads, RoPE base 1e4, 512 positions, tied embeddings, EOS 256.
pub fn demo_config() -> Result<ModelConfig> {
    let json = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": DEMO_VOCAB, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": true, "bos_token_id": null, "eos_token_id": EOS_ID,
    });
    ModelConfig::from_json(&json, Path::new("builtin:demo config"))
}

/// Random weights (std 0.02, seeded) trained as a causal LM on random windows of
/// [`PRETRAIN_WINDOW`] bytes of `text` (token id = byte value), [`PRETRAIN_BATCH`] windows a
/// step: AdamW (beta2 0.95, weight decay 0.1), cosine schedule 3e-3 -> 3e-4 after 20 warm-up
/// steps, gradients clipped at norm 1. `on_step(step, loss)` is called after every step (from 1).
/// Deterministic in `seed`.
pub fn pretrain_demo<D: Device>(
    dev: &D,
    text: &str,
    steps: u64,
    seed: u64,
    on_step: &mut dyn FnMut(u64, f64),
) -> Result<Model<D>> {
    let bytes = text.as_bytes();
    if bytes.len() <= PRETRAIN_WINDOW {
        return Err(Error::invalid(
            "pretrain_demo",
            format!(
                "the text has {} bytes; it needs more than one window of {PRETRAIN_WINDOW}",
                bytes.len()
            ),
        ));
    }
    let model = Model::init_random(dev, demo_config()?, seed, 0.02)?;
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 20.min(steps),
        total_steps: steps.max(1),
    };
    let adamw = AdamwConfig {
        beta2: 0.95,
        weight_decay: 0.1,
        ..AdamwConfig::default()
    };
    let mut trainer = LmTrainer::new(dev, model, adamw, schedule, 1.0)?;
    // a stream apart from the one that drew the weights
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    let starts = bytes.len() - PRETRAIN_WINDOW + 1;
    for _ in 0..steps {
        let rows: Vec<Vec<u32>> = (0..PRETRAIN_BATCH)
            .map(|_| {
                let at = rng.random_range(0..starts);
                bytes[at..at + PRETRAIN_WINDOW]
                    .iter()
                    .map(|&b| b as u32)
                    .collect()
            })
            .collect();
        let stats = trainer.step(dev, &[Batch::causal_lm(&rows)?])?;
        on_step(stats.step, stats.loss);
    }
    Ok(trainer.model)
}

/// Writes an HF model folder: config.json and model.safetensors ([`Model::save`]),
/// tokenizer.json, and tokenizer_config.json naming `<|endoftext|>` as EOS and padding (no BOS,
/// no chat template: the plain template).
pub fn save_model_folder<D: Device>(
    dev: &D,
    model: &Model<D>,
    tok: &Tokenizer,
    dir: &Path,
) -> Result<()> {
    if tok.token_to_id(EOS_TOKEN).is_none() {
        return Err(Error::Tokenizer {
            path: tok.path().to_path_buf(),
            msg: format!("has no {EOS_TOKEN} token to name as EOS (use byte_tokenizer())"),
        });
    }
    model.save(dev, dir)?;
    tok.save(&dir.join("tokenizer.json"))?;
    let mut decoder = serde_json::Map::new();
    let mut extra = vec![];
    for token in [EOS_TOKEN, INJECT_TOKEN] {
        if let Some(id) = tok.token_to_id(token) {
            decoder.insert(
                id.to_string(),
                json!({
                    "content": token, "lstrip": false, "normalized": false, "rstrip": false,
                    "single_word": false, "special": true
                }),
            );
            if token != EOS_TOKEN {
                extra.push(token);
            }
        }
    }
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": null,
        "additional_special_tokens": extra,
        "added_tokens_decoder": decoder,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model.cfg.max_position_embeddings,
    });
    let path = dir.join("tokenizer_config.json");
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::format(&path, e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(path, e))
}
