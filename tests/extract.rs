//! `nla::extract`: the vectors are the subject model's residual stream at the drawn positions
//! (checked against a forward of each text alone, and at layer 0 against the embedding table),
//! the positions are distinct and in range, the response is the decoded window ending at the
//! position; the rows survive a parquet round trip; the split keeps texts whole; bad specs and
//! files give errors that say what is wrong.

use std::collections::{BTreeMap, BTreeSet};

use nla_engine::data::{write_nla_parquet, DatasetReader, DatasetSpec, ExtraValue, SampleOut};
use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, View};
use nla_engine::model::builtin::{byte_tokenizer, demo_config};
use nla_engine::model::{forward_blocks, ActivationSet, Model, Tokenizer};
use nla_engine::nla::extract::{extract, read_texts, split_rows, ExtractSpec, Extraction};
use serde_json::json;

const L: usize = 4;
const C: usize = 128;

fn texts() -> Vec<String> {
    [
        "The cat sleeps on the warm windowsill every afternoon.",
        "Short.", // 6 tokens: fewer than min_pos + 1
        "Two plus two equals four, and four plus four equals eight.",
        "Crème brûlée is a dessert: cream, sugar and eggs.", // multi-byte characters
        "Seven t",                                           // 7 tokens: skipped too
        "The river rose after a week of steady rain, and the fields near it flooded.",
        "A dog wags its tail.",
        "Eight ch", // 8 tokens: one position (7)
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn spec() -> ExtractSpec {
    ExtractSpec {
        layer: 2,
        per_text: 3,
        min_pos: 7,
        window: 6,
        prompt: "Explain <INJECT>:".into(),
        seed: 5,
        batch: 2,
    }
}

/// The demo architecture with weights large enough (std 0.2) that attention is far from
/// uniform: a position that saw the wrong tokens (padding, another text) would show.
fn model(dev: &CpuDevice) -> Model<CpuDevice> {
    Model::init_random(dev, demo_config().unwrap(), 11, 0.2).unwrap()
}

/// The residual stream `layer` of `text` run alone (batch of one, no padding): [T*C].
fn residual_alone(
    dev: &CpuDevice,
    model: &Model<CpuDevice>,
    tok: &Tokenizer,
    text: &str,
    layer: usize,
) -> Vec<f32> {
    let ids = tok.encode(text, false).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, 1, ids.len()).unwrap();
    forward_blocks(dev, model, &mut acts, &dev.upload_ids(&ids).unwrap(), None).unwrap();
    dev.download(View::all(&acts.res[layer])).unwrap()
}

fn int(row: &SampleOut, name: &str) -> i64 {
    match row.extra.iter().find(|(n, _)| n == name) {
        Some((_, ExtraValue::Int(x))) => *x,
        other => panic!("column {name}: {other:?}"),
    }
}

fn string(row: &SampleOut, name: &str) -> String {
    match row.extra.iter().find(|(n, _)| n == name) {
        Some((_, ExtraValue::Str(x))) => x.clone(),
        other => panic!("column {name}: {other:?}"),
    }
}

fn run(spec: &ExtractSpec) -> Extraction {
    let dev = CpuDevice::new();
    extract(
        &dev,
        &model(&dev),
        &byte_tokenizer().unwrap(),
        &texts(),
        spec,
    )
    .unwrap()
}

#[test]
fn rows_are_the_residual_stream_at_distinct_positions() {
    let dev = CpuDevice::new();
    let tok = byte_tokenizer().unwrap();
    let model = model(&dev);
    let texts = texts();
    let spec = spec();
    let out = extract(&dev, &model, &tok, &texts, &spec).unwrap();
    assert_eq!(out.skipped_short, 2, "\"Short.\" and \"Seven t\"");
    assert_eq!(out.texts_used, 6);

    let mut by_text: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    let mut last = (-1i64, -1i64);
    let mut max_err = 0f32;
    for row in &out.rows {
        let (ti, p) = (int(row, "text_index"), int(row, "position"));
        assert!((ti, p) > last, "rows in text order, positions ascending");
        last = (ti, p);
        let names: Vec<&str> = row.extra.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["text_index", "position", "token", "layer"]);
        assert_eq!(int(row, "layer"), 2);
        assert_eq!(row.prompt, "Explain <INJECT>:");

        let text = &texts[ti as usize];
        let ids = tok.encode(text, false).unwrap();
        let p = p as usize;
        assert!(
            p >= spec.min_pos && p < ids.len(),
            "position {p} of {text:?}"
        );
        by_text.entry(ti).or_default().push(p);

        // response: the 6 tokens ending at p (inclusive), trimmed
        let window = &ids[p + 1 - spec.window..=p];
        assert_eq!(
            row.response,
            tok.decode(window, false).unwrap().trim(),
            "{text:?} at {p}"
        );
        assert_eq!(
            string(row, "token"),
            tok.decode(&ids[p..=p], false).unwrap()
        );
        if text.is_ascii() {
            // one byte = one token: the window is the text's bytes
            assert_eq!(row.response, text[p + 1 - spec.window..=p].trim());
            assert_eq!(string(row, "token"), &text[p..=p]);
        }

        // The same position of the text run alone. Batching pads shorter texts on the right
        // and truncates after the last drawn position; with causal attention neither changes
        // a position's residual, but the batch shape changes how the CPU GEMMs block their
        // loops, which may reorder f32 sums: 1e-5 relative to the vector's largest element
        // covers that reordering (a few ulps through two blocks) and is far below the
        // difference a wrong row, text or layer makes (order 1). (The CPU device gives the
        // same bits today; the bound is what the check needs, not what it gets.)
        let alone = residual_alone(&dev, &model, &tok, text, 2);
        let want = &alone[p * C..(p + 1) * C];
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.1, "a non-trivial vector");
        assert_eq!(row.activation_vector.len(), C);
        for (a, r) in row.activation_vector.iter().zip(want) {
            let err = (a - r).abs() / scale;
            max_err = max_err.max(err);
            assert!(err <= 1e-5, "{text:?} at {p}: {a} vs {r}");
        }
        // and not the neighbouring position's vector
        let other = if p + 1 < ids.len() { p + 1 } else { p - 1 };
        let diff = row
            .activation_vector
            .iter()
            .zip(&alone[other * C..(other + 1) * C])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff > 1e-2 * scale, "positions {p} and {other} differ");
    }
    eprintln!("largest relative difference to the lone forward: {max_err:e}");
    for (ti, ps) in &by_text {
        let n = tok.encode(&texts[*ti as usize], false).unwrap().len();
        let distinct: BTreeSet<_> = ps.iter().collect();
        assert_eq!(distinct.len(), ps.len(), "distinct positions");
        assert_eq!(ps.len(), spec.per_text.min(n - spec.min_pos));
    }
    assert_eq!(
        by_text.keys().copied().collect::<Vec<_>>(),
        [0, 2, 3, 5, 6, 7]
    );
    // "A dog wags its tail." has 20 tokens: 13 candidates, 3 drawn; "Eight ch" has one
    assert_eq!(by_text[&6].len(), 3);
    assert_eq!(by_text[&7], [7]);
}

#[test]
fn layer_zero_is_the_embedding_and_seeds_decide_positions() {
    let dev = CpuDevice::new();
    let tok = byte_tokenizer().unwrap();
    let model = model(&dev);
    let params = model.params_to_host(&dev).unwrap();
    let wte = model.table.wte;
    let s = ExtractSpec {
        layer: 0,
        per_text: 1000, // more than any text has: every position from min_pos is taken
        ..spec()
    };
    let out = extract(&dev, &model, &tok, &texts(), &s).unwrap();
    let total: usize = texts()
        .iter()
        .map(|t| {
            tok.encode(t, false)
                .unwrap()
                .len()
                .saturating_sub(s.min_pos)
        })
        .sum();
    assert_eq!(out.rows.len(), total);
    for row in &out.rows {
        let text = &texts()[int(row, "text_index") as usize];
        let id = tok.encode(text, false).unwrap()[int(row, "position") as usize] as usize;
        // res[0] is the embedding row of the token, copied exactly
        assert_eq!(
            row.activation_vector,
            &params[wte + id * C..wte + (id + 1) * C]
        );
        assert_eq!(int(row, "layer"), 0);
    }

    // the last layer is allowed (the output of the last block)
    let last = run(&ExtractSpec { layer: L, ..spec() });
    let mid = run(&spec());
    assert_eq!(last.rows.len(), mid.rows.len());
    assert_ne!(
        last.rows[0].activation_vector,
        mid.rows[0].activation_vector
    );

    // the seed decides the positions: same seed, same rows; another seed, other positions
    let positions = |e: &Extraction| -> Vec<(i64, i64)> {
        e.rows
            .iter()
            .map(|r| (int(r, "text_index"), int(r, "position")))
            .collect()
    };
    assert_eq!(run(&spec()), mid);
    let other = run(&ExtractSpec { seed: 6, ..spec() });
    assert_ne!(positions(&other), positions(&mid));
    // a batch size that groups the texts differently gives the same rows
    let one = run(&ExtractSpec { batch: 1, ..spec() });
    assert_eq!(positions(&one), positions(&mid));
    for (a, b) in one.rows.iter().zip(&mid.rows) {
        assert_eq!(a.response, b.response);
        let scale = b.activation_vector.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.activation_vector.iter().zip(&b.activation_vector) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}"); // as above
        }
    }
}

#[test]
fn parquet_round_trip() {
    let out = run(&spec());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.parquet");
    write_nla_parquet(&path, &out.rows).unwrap();
    let samples = DatasetReader::open(DatasetSpec::new(vec![path.clone()], C))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(samples.len(), out.rows.len());
    for (s, row) in samples.iter().zip(&out.rows) {
        assert_eq!(s.prompt.as_deref(), Some(row.prompt.as_str()));
        assert_eq!(s.response.as_deref(), Some(row.response.as_str()));
        assert_eq!(s.vectors, vec![row.activation_vector.clone()]);
        let expected = json!({
            "text_index": int(row, "text_index"),
            "position": int(row, "position"),
            "token": string(row, "token"),
            "layer": 2,
        });
        assert_eq!(serde_json::Value::Object(s.extra.clone()), expected);
    }
}

#[test]
fn split_keeps_texts_whole() {
    // 40 texts with 3 rows each
    let rows: Vec<SampleOut> = (0..120)
        .map(|i| SampleOut {
            prompt: "p <INJECT>".into(),
            response: format!("r{i}"),
            activation_vector: vec![i as f32],
            extra: vec![("text_index".into(), ExtraValue::Int(i / 3))],
        })
        .collect();
    let (train, val) = split_rows(rows.clone(), 0.1, 9).unwrap();
    assert_eq!(train.len() + val.len(), 120);
    let texts =
        |rs: &[SampleOut]| -> BTreeSet<i64> { rs.iter().map(|r| int(r, "text_index")).collect() };
    let (tt, vt) = (texts(&train), texts(&val));
    assert_eq!(vt.len(), 4, "round(0.1 * 40) texts");
    assert_eq!(val.len(), 12, "all 3 rows of each val text");
    assert!(tt.is_disjoint(&vt));
    // order is kept on each side
    let order = |rs: &[SampleOut]| {
        rs.iter()
            .map(|r| r.activation_vector[0])
            .collect::<Vec<_>>()
    };
    let mut sorted = order(&train);
    sorted.sort_by(f32::total_cmp);
    assert_eq!(order(&train), sorted);
    // deterministic in the seed; another seed picks other texts
    assert_eq!(split_rows(rows.clone(), 0.1, 9).unwrap(), (train, val));
    let (_, val2) = split_rows(rows.clone(), 0.1, 10).unwrap();
    assert_ne!(texts(&val2), vt);
    // a tiny fraction still gives one val text; 0 gives none
    assert_eq!(
        texts(&split_rows(rows.clone(), 0.001, 0).unwrap().1).len(),
        1
    );
    assert!(split_rows(rows.clone(), 0.0, 0).unwrap().1.is_empty());
    for bad in [1.0, -0.1, f64::NAN] {
        let err = split_rows(rows.clone(), bad, 0).unwrap_err().to_string();
        assert!(err.contains("val_fraction"), "{err}");
    }
}

#[test]
fn bad_specs_are_errors() {
    let dev = CpuDevice::new();
    let tok = byte_tokenizer().unwrap();
    let model = model(&dev);
    let err = |spec: ExtractSpec, texts: &[String]| {
        extract(&dev, &model, &tok, texts, &spec)
            .unwrap_err()
            .to_string()
    };
    let t = texts();
    let e = err(ExtractSpec { layer: 5, ..spec() }, &t);
    assert!(e.contains("layer 5") && e.contains("4 blocks"), "{e}");
    for prompt in ["Explain this:", "<INJECT> and <INJECT>"] {
        let e = err(
            ExtractSpec {
                prompt: prompt.into(),
                ..spec()
            },
            &t,
        );
        assert!(e.contains("exactly once") && e.contains(prompt), "{e}");
    }
    let e = err(spec(), &[]);
    assert!(e.contains("no texts"), "{e}");
    let short = vec!["tiny".to_string(), "".to_string()];
    let e = err(spec(), &short);
    assert!(
        e.contains("no usable text") && e.contains("8 tokens"),
        "{e}"
    );
    let e = err(
        ExtractSpec {
            per_text: 0,
            ..spec()
        },
        &t,
    );
    assert!(e.contains("per_text"), "{e}");
}

#[test]
fn read_texts_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("texts.txt");
    std::fs::write(&path, "first line\r\n\n   \n  second line  \nthird").unwrap();
    assert_eq!(
        read_texts(&path).unwrap(),
        ["first line", "second line", "third"]
    );
    std::fs::write(&path, b"ok\nfine\nbad \xff byte\n").unwrap();
    let e = read_texts(&path).unwrap_err().to_string();
    assert!(
        e.contains("texts.txt") && e.contains("line 3") && e.contains("UTF-8"),
        "{e}"
    );
    let e = read_texts(&dir.path().join("missing.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.txt"), "{e}");
}
