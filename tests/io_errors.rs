//! Weights, config and tokenizer I/O: round trips, and one test per bad input, each checking the
//! error variant and that its message names the file and the tensor or field.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nla_engine::model::{
    load_params, read_tensors, save_params, weight_files, write_tensors, ModelConfig, ParamTable,
    SaveDtype, Tokenizer,
};
use nla_engine::Error;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A tensor as it is written to a test file: name, dtype, shape, little-endian bytes.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes `config.json` of a tiny model (V 16, C 8, NH 2, NKV 1, F 12, L 1) and builds its table.
fn tiny(dir: &Path, tied: bool) -> (ModelConfig, ParamTable) {
    let cfg = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 12,
        "num_hidden_layers": 1,
        "tie_word_embeddings": tied,
    });
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let cfg = ModelConfig::from_file(&path).unwrap();
    let table = ParamTable::for_config(&cfg);
    (cfg, table)
}

/// Distinct values of both signs and several magnitudes.
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32))
        .collect()
}

fn encode(x: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F64 => x.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect(),
        Dtype::I32 => x.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
        Dtype::I64 => x.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
        Dtype::U8 => x.iter().map(|&v| v as u8).collect(),
        d => panic!("no test encoder for {d}"),
    }
}

/// Every table entry, with the matching window of `flat`, as `dtype`.
fn raw_params(table: &ParamTable, flat: &[f32], dtype: Dtype) -> Vec<Raw> {
    table
        .entries
        .iter()
        .map(|e| {
            let data = &flat[e.offset..e.offset + e.len];
            (e.name.clone(), dtype, e.shape.clone(), encode(data, dtype))
        })
        .collect()
}

fn write_raw(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn raw(name: &str, dtype: Dtype, shape: &[usize]) -> Raw {
    let n = shape.iter().product();
    (
        name.into(),
        dtype,
        shape.to_vec(),
        encode(&values(n), dtype),
    )
}

/// Asserts that the error's message contains every one of `parts`.
fn assert_names(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} does not name {p:?}");
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Round trips and supported layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn roundtrip_f32_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let flat = values(table.total);
    let path = dir.path().join("model.safetensors");
    save_params(&path, &table, &flat, SaveDtype::F32).unwrap();
    // No temporary file is left next to the result.
    assert_eq!(files_in(dir.path()), ["config.json", "model.safetensors"]);
    assert_eq!(weight_files(dir.path()).unwrap(), vec![path.clone()]);
    assert_eq!(load_params(dir.path(), &table).unwrap(), flat);
    assert_eq!(load_params(&path, &table).unwrap(), flat);

    // Names, shapes, dtype and the metadata transformers expects.
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    for e in &table.entries {
        let info = meta.info(&e.name).unwrap();
        assert_eq!(info.shape, e.shape, "{}", e.name);
        assert_eq!(info.dtype, Dtype::F32, "{}", e.name);
    }
    assert_eq!(meta.tensors().len(), table.entries.len());
}

#[test]
fn roundtrip_bf16_within_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let flat = values(table.total);
    let path = dir.path().join("model.safetensors");
    save_params(&path, &table, &flat, SaveDtype::BF16).unwrap();
    let back = load_params(dir.path(), &table).unwrap();
    for (i, (&x, &y)) in flat.iter().zip(&back).enumerate() {
        // bf16 keeps 8 significant bits (7 stored + the implicit one); round-to-nearest is off by
        // at most half a unit in the last place, 2^-8 relative to |x| for normal numbers.
        let bound = x.abs() * 2f32.powi(-8);
        assert!(
            (x - y).abs() <= bound,
            "element {i}: {x} -> {y}, bound {bound}"
        );
        // and it is exactly the bf16 rounding of x
        assert_eq!(y, bf16::from_f32(x).to_f32(), "element {i}");
    }
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.iter().all(|(_, t)| t.dtype() == Dtype::BF16));
}

#[test]
fn loads_f16_and_bf16_files() {
    for (dtype, round) in [
        (
            Dtype::F16,
            (|x| f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |x| bf16::from_f32(x).to_f32()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_, table) = tiny(dir.path(), false);
        let flat = values(table.total);
        write_raw(
            &dir.path().join("model.safetensors"),
            &raw_params(&table, &flat, dtype),
        );
        let back = load_params(dir.path(), &table).unwrap();
        let want: Vec<f32> = flat.iter().map(|&x| round(x)).collect();
        assert_eq!(back, want, "{dtype}");
        assert_ne!(
            back, flat,
            "{dtype}: the test values must not all be representable"
        );
    }
}

/// Writes the table's tensors into two shards plus `model.safetensors.index.json`.
fn write_sharded(dir: &Path, table: &ParamTable, flat: &[f32]) -> Vec<PathBuf> {
    let all = raw_params(table, flat, Dtype::F32);
    let (a, b) = all.split_at(all.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut map = serde_json::Map::new();
    for (part, file) in [(a, names[0]), (b, names[1])] {
        write_raw(&dir.join(file), part);
        for t in part {
            map.insert(t.0.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 4 * flat.len()}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    names.iter().map(|n| dir.join(n)).collect()
}

#[test]
fn loads_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let flat = values(table.total);
    let shards = write_sharded(dir.path(), &table, &flat);
    assert_eq!(weight_files(dir.path()).unwrap(), shards);
    assert_eq!(load_params(dir.path(), &table).unwrap(), flat);
    let index = dir.path().join("model.safetensors.index.json");
    assert_eq!(load_params(&index, &table).unwrap(), flat);
}

#[test]
fn tied_embeddings_with_and_without_stray_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), true);
    assert!(table.get("lm_head.weight").is_none());
    assert_eq!(table.lm_head, table.wte);
    let flat = values(table.total);
    let path = dir.path().join("model.safetensors");

    let mut tensors = raw_params(&table, &flat, Dtype::F32);
    write_raw(&path, &tensors);
    assert_eq!(load_params(dir.path(), &table).unwrap(), flat);

    // transformers may save the tied head anyway, and old checkpoints carry rotary buffers.
    tensors.push(raw("lm_head.weight", Dtype::F32, &[16, 8]));
    tensors.push(raw(
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        Dtype::F32,
        &[2],
    ));
    write_raw(&path, &tensors);
    assert_eq!(load_params(dir.path(), &table).unwrap(), flat);
}

#[test]
fn write_and_read_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.safetensors");
    let (a, b) = (values(6), values(4));
    write_tensors(
        &path,
        &[
            ("logits".into(), vec![2, 3], &a),
            ("loss".into(), vec![4], &b),
        ],
    )
    .unwrap();
    assert_eq!(files_in(dir.path()), ["dump.safetensors"]);
    let mut got = read_tensors(&path).unwrap();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("logits".into(), vec![2, 3], a.clone()),
            ("loss".into(), vec![4], b)
        ]
    );

    // Other dtypes are converted to f32 on reading.
    let ints: Vec<f32> = vec![-3.0, 0.0, 7.0, 1e6];
    let tensors: Vec<Raw> = [Dtype::F64, Dtype::I64, Dtype::I32, Dtype::F16]
        .iter()
        .map(|&d| (format!("{d}"), d, vec![2, 2], encode(&ints, d)))
        .collect();
    write_raw(&path, &tensors);
    for (name, shape, data) in read_tensors(&path).unwrap() {
        assert_eq!(shape, [2, 2], "{name}");
        let want: Vec<f32> = if name == "F16" {
            ints.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
        } else {
            ints.clone()
        };
        assert_eq!(data, want, "{name}");
    }

    let bad = write_tensors(&path, &[("x".into(), vec![2, 2], &a)]).unwrap_err();
    assert!(matches!(bad, Error::Invalid { .. }), "{bad}");
    assert_names(&bad, &["write_tensors", "`x`"]);
}

// ---------------------------------------------------------------------------------------------
// Bad weight files
// ---------------------------------------------------------------------------------------------

/// A valid single-file checkpoint of the tiny model; returns its table and the file.
fn valid_model(dir: &Path) -> (ParamTable, PathBuf) {
    let (_, table) = tiny(dir, false);
    let path = dir.join("model.safetensors");
    save_params(&path, &table, &values(table.total), SaveDtype::F32).unwrap();
    (table, path)
}

#[test]
fn error_missing_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_names(
        &e,
        &[
            &s(dir.path()),
            "model.safetensors",
            "model.safetensors.index.json",
        ],
    );

    let nowhere = dir.path().join("no-such-model");
    let e = weight_files(&nowhere).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_names(&e, &[&s(&nowhere), "model.safetensors"]);

    // Saving into a folder that does not exist names the file to be written.
    let target = nowhere.join("model.safetensors");
    let e = save_params(&target, &table, &values(table.total), SaveDtype::F32).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_names(&e, &[&s(&target)]);
}

#[test]
fn error_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let (table, path) = valid_model(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "truncated"]);

    // Cut inside the header: the header length runs past the end of the file.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "header length"]);
}

#[test]
fn error_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"").unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "0 bytes"]);
    let e = read_tensors(&path).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
}

#[test]
fn error_garbage_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"this is not a safetensors file, just some text").unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "not a safetensors file"]);

    // A plausible header length followed by bytes that are not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    std::fs::write(&path, &bytes).unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "not valid safetensors JSON"]);
}

#[test]
fn error_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    let name = "model.layers.0.self_attn.k_proj.weight";
    let mut tensors = raw_params(&table, &values(table.total), Dtype::F32);
    for t in &mut tensors {
        if t.0 == name {
            t.2 = vec![8, 4]; // transposed: the table says [NKV*HS, C] = [4, 8]
        }
    }
    write_raw(&path, &tensors);
    let e = load_params(dir.path(), &table).unwrap_err();
    match &e {
        Error::Shape {
            name: n,
            expected,
            got,
            ..
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, &[4, 8]);
            assert_eq!(got, &[8, 4]);
        }
        _ => panic!("expected Error::Shape, got {e}"),
    }
    assert_names(&e, &[&s(&path), name, "[8, 4]", "[4, 8]"]);
}

#[test]
fn error_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    let mut tensors = raw_params(&table, &values(table.total), Dtype::F32);
    tensors.retain(|t| t.0 != "model.norm.weight");
    write_raw(&path, &tensors);
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "model.norm.weight"),
        "{e}"
    );
    assert_names(&e, &[&s(&path), "`model.norm.weight`", "missing"]);

    // An untied model needs its lm_head.
    tensors = raw_params(&table, &values(table.total), Dtype::F32);
    tensors.retain(|t| t.0 != "lm_head.weight");
    write_raw(&path, &tensors);
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "lm_head.weight"),
        "{e}"
    );
}

#[test]
fn error_extra_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    let mut tensors = raw_params(&table, &values(table.total), Dtype::F32);
    tensors.push(raw(
        "model.layers.0.self_attn.q_proj.bias",
        Dtype::F32,
        &[8],
    ));
    write_raw(&path, &tensors);
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::ExtraTensor { .. }), "{e}");
    assert_names(
        &e,
        &[
            &s(&path),
            "`model.layers.0.self_attn.q_proj.bias`",
            "not a parameter",
        ],
    );
}

#[test]
fn error_unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let path = dir.path().join("model.safetensors");
    write_raw(&path, &raw_params(&table, &values(table.total), Dtype::I32));
    let e = load_params(dir.path(), &table).unwrap_err();
    let Error::Dtype { name, dtype, .. } = &e else {
        panic!("expected Error::Dtype, got {e}");
    };
    assert_eq!(dtype, "I32");
    assert!(table.get(name).is_some(), "{name}");
    assert_names(&e, &[&s(&path), &format!("`{name}`"), "I32"]);

    // read_tensors converts more dtypes, but not bytes.
    write_raw(&path, &[raw("mask", Dtype::U8, &[3])]);
    let e = read_tensors(&path).unwrap_err();
    assert!(
        matches!(&e, Error::Dtype { dtype, .. } if dtype == "U8"),
        "{e}"
    );
    assert_names(&e, &[&s(&path), "`mask`"]);
}

#[test]
fn error_index_names_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let shards = write_sharded(dir.path(), &table, &values(table.total));
    std::fs::remove_file(&shards[1]).unwrap();
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    let index = dir.path().join("model.safetensors.index.json");
    assert_names(
        &e,
        &[
            &s(&index),
            "model-00002-of-00002.safetensors",
            "does not exist",
        ],
    );
}

#[test]
fn error_tensor_in_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (_, table) = tiny(dir.path(), false);
    let shards = write_sharded(dir.path(), &table, &values(table.total));
    // Put a copy of the first shard's tensors into the second.
    let mut second = raw_params(&table, &values(table.total), Dtype::F32);
    let first_names: Vec<String> = read_tensors(&shards[0])
        .unwrap()
        .into_iter()
        .map(|t| t.0)
        .collect();
    let dup = first_names[0].clone();
    second.retain(|t| !first_names.contains(&t.0) || t.0 == dup);
    write_raw(&shards[1], &second);
    let e = load_params(dir.path(), &table).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&shards[1]), &s(&shards[0]), &dup]);
}

// ---------------------------------------------------------------------------------------------
// Bad config.json
// ---------------------------------------------------------------------------------------------

/// Writes the tiny config with `edit` applied and loads it.
fn config_error(
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> (Error, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), false);
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, json.to_string()).unwrap();
    let e = ModelConfig::from_file(&path).unwrap_err();
    (e, path)
}

#[test]
fn error_config_unknown_architecture() {
    let (e, path) = config_error(|m| {
        m.insert("model_type".into(), "gpt2".into());
    });
    assert!(
        matches!(&e, Error::Config { field, .. } if field == "model_type"),
        "{e}"
    );
    assert_names(&e, &[&s(&path), "`model_type`", "gpt2"]);
}

#[test]
fn error_config_rope_scaling() {
    let (e, path) = config_error(|m| {
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "linear", "factor": 2.0}),
        );
    });
    assert!(
        matches!(&e, Error::Config { field, .. } if field == "rope_scaling"),
        "{e}"
    );
    assert_names(&e, &[&s(&path), "`rope_scaling`"]);
}

#[test]
fn error_config_missing_field() {
    let (e, path) = config_error(|m| {
        m.remove("hidden_size");
    });
    assert!(
        matches!(&e, Error::Config { field, .. } if field == "hidden_size"),
        "{e}"
    );
    assert_names(&e, &[&s(&path), "`hidden_size`", "missing"]);
}

#[test]
fn error_config_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, "model_type: llama\n").unwrap();
    let e = ModelConfig::from_file(&path).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &[&s(&path), "not valid JSON"]);
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A word-level tokenizer.json small enough to write by hand.
const WORD_TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"}
}"#;

#[test]
fn tokenizer_encode_decode_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, WORD_TOKENIZER).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.encode("hello world nope", false).unwrap(), [0, 1, 2]);
    assert_eq!(tok.decode(&[1, 0], false).unwrap(), "world hello");
    assert_eq!(tok.token_to_id("world"), Some(1));
    assert_eq!(tok.token_to_id("absent"), None);
    assert_eq!(tok.vocab_size(true), 3);

    let copy = dir.path().join("copy.json");
    tok.save(&copy).unwrap();
    let again = Tokenizer::from_file(&copy).unwrap();
    assert_eq!(again.encode("world hello", false).unwrap(), [1, 0]);
}

#[test]
fn error_tokenizer_missing_or_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let e = Tokenizer::from_file(&path).err().unwrap();
    assert!(matches!(e, Error::Tokenizer { .. }), "{e}");
    assert_names(&e, &[&s(&path), "cannot read"]);

    std::fs::write(&path, r#"{"model": {"type": "NoSuchModel"}}"#).unwrap();
    let e = Tokenizer::from_file(&path).err().unwrap();
    assert!(matches!(e, Error::Tokenizer { .. }), "{e}");
    assert_names(&e, &[&s(&path), "not a valid tokenizer.json"]);
}

/// The reference tokenizer against ids produced by Python `tokenizers` for the same file.
#[test]
fn tokenizer_matches_python_reference() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/fixtures/models/gqa_untied");
    let (tok_path, cases_path) = (dir.join("tokenizer.json"), dir.join("tokenizer_cases.json"));
    for p in [&tok_path, &cases_path] {
        assert!(
            p.is_file(),
            "reference fixture {} is missing: generate it with the script in tests/reference/",
            p.display()
        );
    }
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&cases_path).unwrap()).unwrap();
    assert!(!cases.is_empty(), "{} holds no cases", cases_path.display());
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, want, "encode({text:?})");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "decode(encode({text:?}))"
        );
        if let Some(special) = case.get("ids_with_special_tokens") {
            let want: Vec<u32> = serde_json::from_value(special.clone()).unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                want,
                "encode({text:?}, special)"
            );
            assert_eq!(
                tok.decode(&want, true).unwrap(),
                text,
                "decode skipping specials"
            );
        }
    }
}

/// Every reference model written by transformers (single file, sharded, tied) loads into its
/// table, and each parameter equals the tensor of the same name read straight from the files.
#[test]
fn loads_reference_models() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/fixtures/models");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("reference models missing at {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no reference model under {}",
        root.display()
    );
    for dir in dirs {
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let table = ParamTable::for_config(&cfg);
        let flat = load_params(&dir, &table).unwrap();
        let mut seen = 0;
        for file in weight_files(&dir).unwrap() {
            for (name, shape, data) in read_tensors(&file).unwrap() {
                let Some(e) = table.get(&name) else {
                    assert!(
                        cfg.tie_word_embeddings && name == "lm_head.weight",
                        "{name}"
                    );
                    continue;
                };
                assert_eq!(shape, e.shape, "{}: {name}", dir.display());
                assert_eq!(
                    &flat[e.offset..e.offset + e.len],
                    &data[..],
                    "{}: {name}",
                    dir.display()
                );
                seen += 1;
            }
        }
        assert_eq!(seen, table.entries.len(), "{}", dir.display());
    }
}
