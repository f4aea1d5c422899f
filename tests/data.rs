//! Parquet datasets: files built here with arrow's writers (and one written by pyarrow) read back
//! value for value; seeded shuffling; streaming in small batches; one test per bad input,
//! checking the message names file, row and column, and that skipping counts it; the writer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Float32Builder, Float64Builder, LargeListBuilder, ListBuilder,
    StringBuilder, StructBuilder,
};
use arrow_array::types::{Float32Type, Float64Type, Int32Type};
use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float64Array, Int64Array, LargeListArray,
    ListArray, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Fields};
use nla_engine::data::{
    write_nla_parquet, BadRow, BadRowPolicy, DatasetReader, DatasetSpec, ExtraValue, Mode,
    OnBadRow, Sample, SampleOut,
};
use nla_engine::Error;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::json;

const A: usize = 4;

/// Writes the columns as one parquet file with row groups of at most `group_rows` rows.
fn write(path: &Path, cols: Vec<(&str, ArrayRef)>, group_rows: usize) {
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group_rows))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Distinct values of both signs, exact in f32 (and so after an f64 -> f32 conversion).
fn vector(row: usize) -> Vec<f32> {
    (0..A).map(|k| row as f32 * 0.5 - k as f32 * 0.25).collect()
}

fn strings(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn opt_strings(values: Vec<Option<&str>>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}

fn list_f32(rows: &[Vec<f32>]) -> ArrayRef {
    let it = rows.iter().map(|v| Some(v.iter().map(|x| Some(*x))));
    Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(it))
}

fn large_list_f64(rows: &[Vec<f64>]) -> ArrayRef {
    let it = rows.iter().map(|v| Some(v.iter().map(|x| Some(*x))));
    Arc::new(LargeListArray::from_iter_primitive::<Float64Type, _, _>(it))
}

fn fixed_f32(rows: &[Vec<f32>]) -> ArrayRef {
    let it = rows.iter().map(|v| Some(v.iter().map(|x| Some(*x))));
    Arc::new(FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(it, A as i32))
}

/// List<List<Float32>>: several vectors per row.
fn nested_f32(rows: &[Vec<Vec<f32>>]) -> ArrayRef {
    let mut b = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
    for vs in rows {
        for v in vs {
            b.values().values().append_slice(v);
            b.values().append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// LargeList<FixedSizeList<Float64>>: several vectors per row.
fn nested_large_fixed_f64(rows: &[Vec<Vec<f32>>]) -> ArrayRef {
    let mut b = LargeListBuilder::new(FixedSizeListBuilder::new(Float64Builder::new(), A as i32));
    for vs in rows {
        for v in vs {
            for x in v {
                b.values().values().append_value(*x as f64);
            }
            b.values().append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// List<Struct{role, content}>: one chat per row.
fn chats(rows: &[Vec<(&str, &str)>]) -> ArrayRef {
    let fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let mut b = ListBuilder::new(StructBuilder::from_fields(fields, 0));
    for chat in rows {
        for (role, content) in chat {
            let s = b.values();
            s.field_builder::<StringBuilder>(0)
                .unwrap()
                .append_value(role);
            s.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_value(content);
            s.append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn spec(files: &[&Path]) -> DatasetSpec {
    DatasetSpec::new(files.iter().map(|p| p.to_path_buf()).collect(), A)
}

fn read_all(spec: DatasetSpec) -> Vec<Sample> {
    DatasetReader::open(spec)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The `id` extra column of each sample.
fn ids(samples: &[Sample]) -> Vec<i64> {
    samples
        .iter()
        .map(|s| s.extra["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn string_prompts_list_f32_and_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.parquet");
    let n = 5;
    let prompts: Vec<String> = (0..n)
        .map(|i| format!("Explain <INJECT> number {i}"))
        .collect();
    let prompt_refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let vectors: Vec<Vec<f32>> = (0..n).map(vector).collect();
    let tokens = ListArray::from_iter_primitive::<Int32Type, _, _>(
        (0..n).map(|i| Some(vec![Some(i as i32)])),
    );
    write(
        &path,
        vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(0..n as i64)) as ArrayRef,
            ),
            ("prompt", strings(&prompt_refs)),
            ("response", strings(&["r0", "r1", "r2", "r3", "r4"])),
            ("activation_vector", list_f32(&vectors)),
            (
                "score",
                Arc::new(Float64Array::from(vec![0.5, 1.5, f64::NAN, -2.0, 0.0])),
            ),
            (
                "is_chat",
                Arc::new(BooleanArray::from(vec![true, false, true, false, true])),
            ),
            (
                "note",
                opt_strings(vec![Some("x"), None, Some("z"), None, Some("")]),
            ),
            ("tokens", Arc::new(tokens)),
        ],
        2,
    );
    let mut reader = DatasetReader::open(spec(&[&path])).unwrap();
    assert_eq!(reader.num_rows(), n);
    let samples: Vec<Sample> = reader.by_ref().map(|s| s.unwrap()).collect();
    assert_eq!(samples.len(), n);
    let scores = [json!(0.5), json!(1.5), json!(null), json!(-2.0), json!(0.0)];
    let notes = [json!("x"), json!(null), json!("z"), json!(null), json!("")];
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.prompt.as_deref(), Some(prompts[i].as_str()));
        assert_eq!(s.response.as_deref(), Some(format!("r{i}").as_str()));
        assert_eq!(s.vectors, vec![vector(i)]);
        assert_eq!(&*s.source.file, path.as_path());
        assert_eq!(s.source.row, i);
        // `tokens` (a list of ints) is not an extra column type: left out.
        let expected =
            json!({"id": i, "score": scores[i], "is_chat": i % 2 == 0, "note": notes[i]});
        assert_eq!(serde_json::Value::Object(s.extra.clone()), expected);
    }
    assert_eq!(reader.stats().rows_read, n as u64);
    assert_eq!(reader.stats().samples, n as u64);
    assert_eq!(reader.stats().skipped_total(), 0);
    assert_eq!(reader.stats().to_string(), "rows 5, samples 5, skipped 0");
}

#[test]
fn chat_prompts_and_large_list_f64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.parquet");
    let rows = [
        vec![
            ("system", "be brief"),
            ("user", "<INJECT> first"),
            ("assistant", "ok"),
        ],
        vec![("user", "second <INJECT>"), ("user", "not this one")],
        vec![("assistant", "hi"), ("user", "third: <INJECT>")],
    ];
    let vectors: Vec<Vec<f64>> = (0..3)
        .map(|i| vector(i).iter().map(|x| *x as f64).collect())
        .collect();
    write(
        &path,
        vec![
            ("prompt", chats(&rows)),
            ("response", strings(&["a", "b", "c"])),
            ("activation_vector", large_list_f64(&vectors)),
        ],
        100,
    );
    let samples = read_all(spec(&[&path]));
    let prompts: Vec<&str> = samples
        .iter()
        .map(|s| s.prompt.as_deref().unwrap())
        .collect();
    assert_eq!(
        prompts,
        ["<INJECT> first", "second <INJECT>", "third: <INJECT>"]
    );
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.vectors, vec![vector(i)]);
        assert!(s.extra.is_empty());
    }
}

#[test]
fn fixed_size_lists_several_vectors_per_row_and_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.parquet");
    let two = dir.path().join("two.parquet");
    let three = dir.path().join("three.parquet");
    write(
        &one,
        vec![
            ("prompt", strings(&["<INJECT>", "x <INJECT> y"])),
            ("response", strings(&["a", "b"])),
            ("activation_vector", fixed_f32(&[vector(0), vector(1)])),
        ],
        1,
    );
    // Two markers, two vectors per row (List<List<f32>>), one marker and one vector in a list.
    let nested = vec![vec![vector(2), vector(3)], vec![vector(4)]];
    write(
        &two,
        vec![
            ("prompt", strings(&["<INJECT> and <INJECT>", "<INJECT>"])),
            ("response", strings(&["c", "d"])),
            ("activation_vector", nested_f32(&nested)),
        ],
        10,
    );
    // Three markers (LargeList<FixedSizeList<f64>>); "<INJECT><INJECT>" counts twice.
    let nested3 = vec![vec![vector(5), vector(6), vector(7)]];
    write(
        &three,
        vec![
            ("prompt", strings(&["<INJECT><INJECT> <INJECT>"])),
            ("response", strings(&["e"])),
            ("activation_vector", nested_large_fixed_f64(&nested3)),
        ],
        10,
    );
    let samples = read_all(spec(&[&one, &two, &three]));
    let got: Vec<(PathBuf, usize, Vec<Vec<f32>>)> = samples
        .iter()
        .map(|s| (s.source.file.to_path_buf(), s.source.row, s.vectors.clone()))
        .collect();
    let expected = vec![
        (one.clone(), 0, vec![vector(0)]),
        (one.clone(), 1, vec![vector(1)]),
        (two.clone(), 0, vec![vector(2), vector(3)]),
        (two.clone(), 1, vec![vector(4)]),
        (three.clone(), 0, vec![vector(5), vector(6), vector(7)]),
    ];
    assert_eq!(got, expected);
    let responses: Vec<&str> = samples
        .iter()
        .map(|s| s.response.as_deref().unwrap())
        .collect();
    assert_eq!(responses, ["a", "b", "c", "d", "e"]);
}

#[test]
fn critic_mode_reads_no_prompt_and_responses_can_be_optional() {
    let dir = tempfile::tempdir().unwrap();
    let critic = dir.path().join("critic.parquet");
    write(
        &critic,
        vec![
            ("response", strings(&["a", "b"])),
            ("activation_vector", list_f32(&[vector(0), vector(1)])),
        ],
        10,
    );
    let mut s = spec(&[&critic]);
    s.mode = Mode::Critic;
    let samples = read_all(s);
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1].prompt, None);
    assert_eq!(samples[1].response.as_deref(), Some("b"));
    assert_eq!(samples[1].vectors, vec![vector(1)]);

    // Generation: prompts and vectors only.
    let gen = dir.path().join("gen.parquet");
    write(
        &gen,
        vec![
            ("prompt", strings(&["<INJECT>"])),
            ("activation_vector", list_f32(&[vector(0)])),
        ],
        10,
    );
    let mut s = spec(&[&gen]);
    s.mode = Mode::Both;
    let err = DatasetReader::open(s.clone()).err().unwrap();
    assert!(matches!(err, Error::DataColumn { .. }), "{err}");
    s.require_response = false;
    let samples = read_all(s);
    assert_eq!(samples[0].response, None);
    assert_eq!(samples[0].prompt.as_deref(), Some("<INJECT>"));
}

/// Three files of 300 rows (row groups of 50) with a global `id` column.
fn numbered_files(dir: &Path) -> Vec<PathBuf> {
    (0..3)
        .map(|f| {
            let path = dir.join(format!("part{f}.parquet"));
            let ids: Vec<i64> = (f * 300..(f + 1) * 300).collect();
            let n = ids.len();
            let vectors: Vec<Vec<f32>> = (0..n).map(vector).collect();
            write(
                &path,
                vec![
                    ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
                    ("prompt", strings(&vec!["<INJECT>"; n])),
                    ("response", strings(&vec!["r"; n])),
                    ("activation_vector", list_f32(&vectors)),
                ],
                50,
            );
            path
        })
        .collect()
}

#[test]
fn shuffling_is_a_seeded_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let files = numbered_files(dir.path());
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let base = spec(&refs);
    let in_order = ids(&read_all(base.clone()));
    assert_eq!(in_order, (0..900).collect::<Vec<i64>>());

    let shuffled = |seed: u64, buffer: usize| {
        let mut s = base.clone();
        s.shuffle = true;
        s.seed = seed;
        s.shuffle_buffer = buffer;
        s.batch_rows = 16;
        ids(&read_all(s))
    };
    let a = shuffled(7, 64);
    assert_ne!(a, in_order);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, in_order, "not a permutation");
    assert_eq!(shuffled(7, 64), a, "same seed, different order");
    assert_ne!(shuffled(8, 64), a, "different seeds, same order");
    // Without a buffer only files and row groups move: runs of 50 consecutive ids.
    let groups = shuffled(7, 0);
    assert_ne!(groups, in_order);
    for run in groups.chunks(50) {
        assert_eq!(run[0] % 50, 0);
        assert!(run.windows(2).all(|w| w[1] == w[0] + 1));
    }

    // Epochs: a new order per epoch, reproducible by epoch number; stats add up over epochs.
    let mut s = base.clone();
    s.shuffle = true;
    s.seed = 7;
    s.shuffle_buffer = 64;
    s.batch_rows = 16;
    let mut reader = DatasetReader::open(s).unwrap();
    let epoch0 = ids(&reader.by_ref().map(|r| r.unwrap()).collect::<Vec<_>>());
    assert_eq!(epoch0, a);
    assert!(reader.next().is_none());
    reader.next_epoch();
    assert_eq!(reader.epoch(), 1);
    let epoch1 = ids(&reader.by_ref().map(|r| r.unwrap()).collect::<Vec<_>>());
    assert_ne!(epoch1, epoch0);
    let mut sorted = epoch1.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, in_order);
    reader.set_epoch(0);
    let first: Vec<i64> = ids(&reader
        .by_ref()
        .take(10)
        .map(|r| r.unwrap())
        .collect::<Vec<_>>());
    assert_eq!(first, epoch0[..10]);
    reader.reset();
    let again = ids(&reader.by_ref().map(|r| r.unwrap()).collect::<Vec<_>>());
    assert_eq!(again, epoch0);
    assert_eq!(reader.stats().samples, 900 * 3 + 10);
}

#[test]
fn streams_many_small_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.parquet");
    let n = 1000;
    let vectors: Vec<Vec<f32>> = (0..n).map(vector).collect();
    write(
        &path,
        vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(0..n as i64)) as ArrayRef,
            ),
            ("prompt", strings(&vec!["<INJECT>"; n])),
            ("response", strings(&vec!["r"; n])),
            ("activation_vector", list_f32(&vectors)),
        ],
        37,
    );
    let groups = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap())
        .unwrap()
        .metadata()
        .num_row_groups();
    assert_eq!(groups, 1000usize.div_ceil(37));
    let mut s = spec(&[&path]);
    s.batch_rows = 3;
    let samples = read_all(s);
    assert_eq!(ids(&samples), (0..n as i64).collect::<Vec<_>>());
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.source.row, i);
        assert_eq!(s.vectors, vec![vector(i)]);
    }
}

/// A file of four rows whose row 2 is bad in one way.
struct BadCase {
    cols: Vec<(&'static str, ArrayRef)>,
    class: BadRow,
    column: &'static str,
    msg: String,
}

fn prompts4() -> ArrayRef {
    strings(&["<INJECT> 0", "<INJECT> 1", "<INJECT> 2", "<INJECT> 3"])
}

fn responses4() -> ArrayRef {
    strings(&["r0", "r1", "r2", "r3"])
}

/// Four good vectors with row 2 replaced.
fn vectors4(row2: Vec<f32>) -> Vec<Vec<f32>> {
    vec![vector(0), vector(1), row2, vector(3)]
}

fn bad_cases() -> Vec<(&'static str, BadCase)> {
    let with_vectors = |vectors: ArrayRef| {
        vec![
            ("prompt", prompts4()),
            ("response", responses4()),
            ("activation_vector", vectors),
        ]
    };
    let f64s = |row2: Vec<f64>| {
        let mut rows: Vec<Vec<f64>> = (0..4)
            .map(|i| vector(i).iter().map(|x| *x as f64).collect())
            .collect();
        rows[2] = row2;
        large_list_f64(&rows)
    };
    let null_vector: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(
        (0..4).map(|i| (i != 2).then(|| vector(i).into_iter().map(Some))),
    ));
    let null_element: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(
        (0..4).map(|i| {
            let v = vector(i);
            Some((0..A).map(move |k| (i != 2 || k != 1).then_some(v[k])))
        }),
    ));
    let vectors = list_f32(&vectors4(vector(2)));
    vec![
        (
            "wrong length",
            BadCase {
                cols: with_vectors(list_f32(&vectors4(vec![1.0, 2.0, 3.0]))),
                class: BadRow::VectorLength,
                column: "activation_vector",
                msg: "vector has 3 elements, expected 4 (activation_dim)".into(),
            },
        ),
        (
            "NaN",
            BadCase {
                cols: with_vectors(list_f32(&vectors4(vec![0.0, f32::NAN, 0.0, 0.0]))),
                class: BadRow::NonFinite,
                column: "activation_vector",
                msg: "vector: element 1 is NaN".into(),
            },
        ),
        (
            "inf in f64",
            BadCase {
                cols: with_vectors(f64s(vec![0.0, 0.0, 0.0, f64::NEG_INFINITY])),
                class: BadRow::NonFinite,
                column: "activation_vector",
                msg: "vector: element 3 is -inf".into(),
            },
        ),
        (
            "f64 beyond f32",
            BadCase {
                cols: with_vectors(f64s(vec![0.0, 1e300, 0.0, 0.0])),
                class: BadRow::NonFinite,
                column: "activation_vector",
                msg: "vector: element 1 = 1e300 overflows f32".into(),
            },
        ),
        (
            "null vector",
            BadCase {
                cols: with_vectors(null_vector),
                class: BadRow::Missing,
                column: "activation_vector",
                msg: "null; a vector is needed".into(),
            },
        ),
        (
            "null element",
            BadCase {
                cols: with_vectors(null_element),
                class: BadRow::Missing,
                column: "activation_vector",
                msg: "vector: element 1 is null".into(),
            },
        ),
        (
            "null prompt",
            BadCase {
                cols: vec![
                    (
                        "prompt",
                        opt_strings(vec![
                            Some("<INJECT>"),
                            Some("<INJECT>"),
                            None,
                            Some("<INJECT>"),
                        ]),
                    ),
                    ("response", responses4()),
                    ("activation_vector", vectors.clone()),
                ],
                class: BadRow::Missing,
                column: "prompt",
                msg: "null; a prompt is needed".into(),
            },
        ),
        (
            "null response",
            BadCase {
                cols: vec![
                    ("prompt", prompts4()),
                    (
                        "response",
                        opt_strings(vec![Some("a"), Some("b"), None, Some("d")]),
                    ),
                    ("activation_vector", vectors.clone()),
                ],
                class: BadRow::Missing,
                column: "response",
                msg: "null; a response is needed".into(),
            },
        ),
        (
            "chat without a user message",
            BadCase {
                cols: vec![
                    (
                        "prompt",
                        chats(&[
                            vec![("user", "<INJECT>")],
                            vec![("user", "<INJECT>")],
                            vec![("system", "<INJECT>"), ("assistant", "no")],
                            vec![("user", "<INJECT>")],
                        ]),
                    ),
                    ("response", responses4()),
                    ("activation_vector", vectors.clone()),
                ],
                class: BadRow::Missing,
                column: "prompt",
                msg: "the chat has no `user` message".into(),
            },
        ),
        (
            "no marker",
            BadCase {
                cols: vec![
                    (
                        "prompt",
                        strings(&["<INJECT>", "<INJECT>", "<INJEC T>", "<INJECT>"]),
                    ),
                    ("response", responses4()),
                    ("activation_vector", vectors.clone()),
                ],
                class: BadRow::NoMarker,
                column: "prompt",
                msg: "no `<INJECT>` marker in the prompt".into(),
            },
        ),
        (
            "two markers, one vector",
            BadCase {
                cols: vec![
                    (
                        "prompt",
                        strings(&["<INJECT>", "<INJECT>", "<INJECT> <INJECT>", "<INJECT>"]),
                    ),
                    ("response", responses4()),
                    ("activation_vector", vectors.clone()),
                ],
                class: BadRow::MarkerCount,
                column: "prompt",
                msg: "2 `<INJECT>` marker(s) in the prompt but 1 activation vector(s) in \
                  `activation_vector`"
                    .into(),
            },
        ),
        (
            "one marker, two vectors",
            BadCase {
                cols: with_vectors(nested_f32(&[
                    vec![vector(0)],
                    vec![vector(1)],
                    vec![vector(2), vector(3)],
                    vec![vector(3)],
                ])),
                class: BadRow::MarkerCount,
                column: "prompt",
                msg: "1 `<INJECT>` marker(s) in the prompt but 2 activation vector(s) in \
                  `activation_vector`"
                    .into(),
            },
        ),
        (
            "second vector too short",
            BadCase {
                cols: vec![
                    (
                        "prompt",
                        strings(&["<INJECT>", "<INJECT>", "<INJECT><INJECT>", "<INJECT>"]),
                    ),
                    ("response", responses4()),
                    (
                        "activation_vector",
                        nested_f32(&[
                            vec![vector(0)],
                            vec![vector(1)],
                            vec![vector(2), vec![1.0]],
                            vec![vector(3)],
                        ]),
                    ),
                ],
                class: BadRow::VectorLength,
                column: "activation_vector",
                msg: "vector 1 of 2 has 1 elements, expected 4 (activation_dim)".into(),
            },
        ),
    ]
}

#[test]
fn each_bad_row_fails_naming_file_row_and_column_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    for (name, case) in bad_cases() {
        let path = dir
            .path()
            .join(format!("{}.parquet", name.replace(' ', "_")));
        write(&path, case.cols, 3);

        // Fail: rows 0 and 1 come through, then the error, then nothing.
        let mut reader = DatasetReader::open(spec(&[&path])).unwrap();
        for row in 0..2 {
            let s = reader.next().unwrap().unwrap();
            assert_eq!(s.source.row, row, "{name}");
        }
        let err = reader.next().unwrap().err().unwrap();
        let expected = format!(
            "{}: row 2, column `{}`: {}",
            path.display(),
            case.column,
            case.msg
        );
        assert_eq!(err.to_string(), expected, "{name}");
        assert!(matches!(err, Error::Data { row: 2, .. }), "{name}");
        assert!(
            reader.next().is_none(),
            "{name}: reading went on after an error"
        );

        // Skip this class: rows 0, 1, 3 come through and the skip is counted.
        let mut s = spec(&[&path]);
        s.on_bad_row.set(case.class, OnBadRow::Skip);
        let mut reader = DatasetReader::open(s.clone()).unwrap();
        let rows: Vec<usize> = reader.by_ref().map(|r| r.unwrap().source.row).collect();
        assert_eq!(rows, [0, 1, 3], "{name}");
        let stats = reader.stats();
        assert_eq!(stats.skipped(case.class), 1, "{name}");
        assert_eq!(stats.skipped_total(), 1, "{name}");
        assert_eq!((stats.rows_read, stats.samples), (4, 3), "{name}");
        assert_eq!(
            stats.to_string(),
            format!("rows 4, samples 3, skipped 1 ({} 1)", case.class.name())
        );

        // Skipping every other class still fails on this one.
        for other in BadRow::ALL.into_iter().filter(|c| *c != case.class) {
            let mut s = s.clone();
            s.on_bad_row = BadRowPolicy::all(OnBadRow::Skip);
            s.on_bad_row.set(other, OnBadRow::Fail);
            assert_eq!(read_all(s).len(), 3, "{name}");
        }
        let mut s = s.clone();
        s.on_bad_row = BadRowPolicy::all(OnBadRow::Skip);
        s.on_bad_row.set(case.class, OnBadRow::Fail);
        let results: Vec<_> = DatasetReader::open(s).unwrap().collect();
        assert_eq!(results.len(), 3, "{name}");
        assert!(results[2].is_err(), "{name}");
    }
}

#[test]
fn skipping_counts_each_class() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.parquet");
    write(
        &path,
        vec![
            (
                "prompt",
                strings(&["<INJECT>", "none", "<INJECT>", "<INJECT>", "<INJECT>"]),
            ),
            ("response", responses4_plus()),
            (
                "activation_vector",
                list_f32(&[
                    vector(0),
                    vector(1),
                    vec![1.0],
                    vec![f32::INFINITY; A],
                    vector(4),
                ]),
            ),
        ],
        2,
    );
    let mut s = spec(&[&path]);
    s.on_bad_row = BadRowPolicy::all(OnBadRow::Skip);
    let mut reader = DatasetReader::open(s).unwrap();
    let rows: Vec<usize> = reader.by_ref().map(|r| r.unwrap().source.row).collect();
    assert_eq!(rows, [0, 4]);
    assert_eq!(
        reader.stats().to_string(),
        "rows 5, samples 2, skipped 3 (vector_length 1, non_finite 1, no_marker 1)"
    );
}

fn responses4_plus() -> ArrayRef {
    strings(&["r0", "r1", "r2", "r3", "r4"])
}

#[test]
fn file_level_errors_name_the_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = |path: &Path| {
        write(
            path,
            vec![
                ("prompt", prompts4()),
                ("response", responses4()),
                ("activation_vector", list_f32(&vectors4(vector(2)))),
            ],
            2,
        )
    };

    let no_response = dir.path().join("no_response.parquet");
    write(
        &no_response,
        vec![
            ("prompt", prompts4()),
            ("activation_vector", list_f32(&vectors4(vector(2)))),
        ],
        2,
    );
    let err = DatasetReader::open(spec(&[&no_response])).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: column `response`: missing; the file has columns: prompt, activation_vector",
            no_response.display()
        )
    );

    let renamed = dir.path().join("renamed.parquet");
    good(&renamed);
    let mut s = spec(&[&renamed]);
    s.activation_vector_key = "acts".into();
    let err = DatasetReader::open(s).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: column `acts`: missing; the file has columns: prompt, response, activation_vector",
            renamed.display()
        )
    );

    let text_vectors = dir.path().join("text_vectors.parquet");
    write(
        &text_vectors,
        vec![
            ("prompt", prompts4()),
            ("response", responses4()),
            ("activation_vector", strings(&["1", "2", "3", "4"])),
        ],
        2,
    );
    let err = DatasetReader::open(spec(&[&text_vectors])).err().unwrap();
    assert!(matches!(err, Error::DataColumn { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: column `activation_vector`: has type Utf8, expected a List, LargeList or \
             FixedSizeList of Float32 or Float64, or a list of those",
            text_vectors.display()
        )
    );

    let int_vectors = dir.path().join("int_vectors.parquet");
    let ints =
        ListArray::from_iter_primitive::<Int32Type, _, _>((0..4).map(|_| Some(vec![Some(1); A])));
    write(
        &int_vectors,
        vec![
            ("prompt", prompts4()),
            ("response", responses4()),
            ("activation_vector", Arc::new(ints) as ArrayRef),
        ],
        2,
    );
    let err = DatasetReader::open(spec(&[&int_vectors])).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: column `activation_vector`: has type List(",
            int_vectors.display()
        )),
        "{msg}"
    );

    let int_prompts = dir.path().join("int_prompts.parquet");
    write(
        &int_prompts,
        vec![
            (
                "prompt",
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
            ),
            ("response", responses4()),
            ("activation_vector", list_f32(&vectors4(vector(2)))),
        ],
        2,
    );
    let err = DatasetReader::open(spec(&[&int_prompts])).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: column `prompt`: has type Int64, expected a string or a list of {{role, content}} \
             string structs",
            int_prompts.display()
        )
    );
    // Critic mode does not read the prompt column.
    let mut s = spec(&[&int_prompts]);
    s.mode = Mode::Critic;
    let samples = read_all(s);
    assert_eq!(samples.len(), 4);
    assert!(samples[0].extra.is_empty());

    let not_parquet = dir.path().join("notes.parquet");
    std::fs::write(&not_parquet, "prompt,response\nhello,world\n").unwrap();
    let err = DatasetReader::open(spec(&[&not_parquet])).err().unwrap();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: not a readable parquet file: ",
            not_parquet.display()
        )),
        "{err}"
    );

    let whole = dir.path().join("whole.parquet");
    good(&whole);
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // The good file comes first: the error names the bad one.
    let err = DatasetReader::open(spec(&[&whole, &truncated]))
        .err()
        .unwrap();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: not a readable parquet file: ",
            truncated.display()
        )),
        "{err}"
    );

    let absent = dir.path().join("absent.parquet");
    let err = DatasetReader::open(spec(&[&absent])).err().unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().starts_with(&absent.display().to_string()));

    let err = DatasetReader::open(spec(&[])).err().unwrap();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let mut s = spec(&[&whole]);
    s.activation_dim = 0;
    assert!(matches!(DatasetReader::open(s), Err(Error::Invalid { .. })));
}

#[test]
fn writer_round_trips_and_replaces_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.parquet");
    std::fs::write(&path, "old contents").unwrap();
    let rows: Vec<SampleOut> = (0..10)
        .map(|i| SampleOut {
            prompt: format!("Explain: <INJECT> #{i}"),
            response: format!("response {i}"),
            activation_vector: vector(i),
            extra: vec![
                ("sample_uuid".into(), ExtraValue::Str(format!("u{i}"))),
                ("activation_layer".into(), ExtraValue::Int(i as i64 - 3)),
            ],
        })
        .collect();
    write_nla_parquet(&path, &rows).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["out.parquet"], "a temporary file was left behind");

    let samples = read_all(spec(&[&path]));
    assert_eq!(samples.len(), rows.len());
    for (s, r) in samples.iter().zip(&rows) {
        assert_eq!(s.prompt.as_deref(), Some(r.prompt.as_str()));
        assert_eq!(s.response.as_deref(), Some(r.response.as_str()));
        assert_eq!(s.vectors, vec![r.activation_vector.clone()]);
        let expected = r
            .extra
            .iter()
            .map(|(n, v)| {
                let v = match v {
                    ExtraValue::Str(s) => json!(s),
                    ExtraValue::Int(i) => json!(i),
                };
                (n.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>();
        assert_eq!(s.extra, expected);
    }

    // Rows that disagree are refused and the file written before stays as it was.
    let before = std::fs::read(&path).unwrap();
    let mut bad = rows.clone();
    bad[3].extra[1].1 = ExtraValue::Str("ten".into());
    let err = write_nla_parquet(&path, &bad).err().unwrap();
    assert!(err.to_string().contains("row 3: extra columns"), "{err}");
    let mut bad = rows.clone();
    bad[4].activation_vector.pop();
    let err = write_nla_parquet(&path, &bad).err().unwrap();
    assert_eq!(
        err.to_string(),
        "write_nla_parquet: row 4: activation_vector has 3 elements, row 0 has 4"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // No rows: a valid empty file.
    let empty = dir.path().join("empty.parquet");
    write_nla_parquet(&empty, &[]).unwrap();
    let mut reader = DatasetReader::open(spec(&[&empty])).unwrap();
    assert_eq!(reader.num_rows(), 0);
    assert!(reader.next().is_none());
}

/// Written by pyarrow 26.0.1 (default snappy compression) with:
/// ```python
/// import pyarrow as pa, pyarrow.parquet as pq
/// rows = 5
/// prompts = [[{"role": "system", "content": "You explain activations."},
///             {"role": "user", "content": f"Explain the following: <concept><INJECT></concept> #{i}"},
///             {"role": "user", "content": "a second user turn"}] for i in range(rows)]
/// vectors = [[(i * 8 + k) * 0.25 - 3.0 for k in range(8)] for i in range(rows)]
/// table = pa.table({
///     "prompt": pa.array(prompts, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
///     "response": pa.array([f"explanation {i}" for i in range(rows)], pa.string()),
///     "activation_vector": pa.array(vectors, pa.large_list(pa.float32())),
///     "sample_uuid": pa.array([f"uuid-{i}" for i in range(rows)], pa.string()),
///     "activation_layer": pa.array([10] * rows, pa.int64()),
///     "is_chat": pa.array([True] * rows, pa.bool_()),
/// })
/// pq.write_table(table, "pyarrow_chat_large_list.parquet")
/// ```
#[test]
fn reads_a_file_written_by_pyarrow() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pyarrow_chat_large_list.parquet");
    let mut s = spec(&[&path]);
    s.activation_dim = 8;
    let samples = read_all(s);
    assert_eq!(samples.len(), 5);
    for (i, s) in samples.iter().enumerate() {
        let prompt = format!("Explain the following: <concept><INJECT></concept> #{i}");
        assert_eq!(s.prompt.as_deref(), Some(prompt.as_str()));
        assert_eq!(
            s.response.as_deref(),
            Some(format!("explanation {i}").as_str())
        );
        let v: Vec<f32> = (0..8).map(|k| (i * 8 + k) as f32 * 0.25 - 3.0).collect();
        assert_eq!(s.vectors, vec![v]);
        let extra =
            json!({"sample_uuid": format!("uuid-{i}"), "activation_layer": 10, "is_chat": true});
        assert_eq!(serde_json::Value::Object(s.extra.clone()), extra);
    }
}

#[test]
fn reader_can_move_to_another_thread() {
    fn send<T: Send>() {}
    send::<DatasetReader>();
}
