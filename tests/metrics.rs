//! Fidelity metrics against hand-computed values, the JSON-lines metrics file (round trip,
//! resume, NaN), the progress display's text, and `plot`.

use std::fs;
use std::path::Path;
use std::process::Command;

use nla_engine::plot::{grid, plot_file, PANEL_HEIGHT, PANEL_WIDTH};
use nla_engine::train::metrics::{
    fidelity, mean_vector, read_metrics, FidelityOpts, MetricsWriter, Record, Split,
};
use nla_engine::train::progress::{format_value, summary, Progress};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + b.abs())
}

fn raw() -> FidelityOpts<'static> {
    FidelityOpts::default()
}

#[test]
fn fidelity_hand_computed() {
    // errors per sample 0 and 4 -> per-sample MSE 0 and 2; cosines 1 and -1; the targets' mean
    // is [0.5, -0.5], their spread about it 4 * 0.25 = 1, so FVE = 1 - 4/1.
    let f = fidelity(&[1., 0., 0., 1.], &[1., 0., 0., -1.], 2, raw()).unwrap();
    assert!(close(f.mse, 1.0), "{f:?}");
    assert!(close(f.cosine, 0.0), "{f:?}");
    assert!(close(f.fve, -3.0), "{f:?}");
    assert_eq!(f.samples, 2);
}

#[test]
fn cosine_of_opposite_vectors_is_minus_one() {
    let f = fidelity(&[1., 2., 3.], &[-1., -2., -3.], 3, raw()).unwrap();
    assert!(close(f.cosine, -1.0));
    assert!(close(f.mse, (4. + 16. + 36.) / 3.));
    // A zero prediction has cosine 0, not NaN.
    let z = fidelity(&[0., 0., 0.], &[1., 2., 3.], 3, raw()).unwrap();
    assert_eq!(z.cosine, 0.0);
}

#[test]
fn fve_is_zero_for_the_mean_one_for_perfect_negative_for_worse() {
    let target = [1., 2., 3., 4., 5., 0.]; // mean [3, 2]
    let mean = [3., 2., 3., 2., 3., 2.];
    assert!(close(fidelity(&mean, &target, 2, raw()).unwrap().fve, 0.0));
    assert!(close(
        fidelity(&target, &target, 2, raw()).unwrap().fve,
        1.0
    ));
    let worse = [5., 0., 3., 4., 1., 2.];
    // errors 16+4, 0, 16+4 = 40; spread 4+0 + 0+4 + 4+4 = 16
    assert!(close(
        fidelity(&worse, &target, 2, raw()).unwrap().fve,
        1.0 - 40.0 / 16.0
    ));
}

#[test]
fn fve_against_a_given_baseline() {
    let target = [1., 0., 0., 1.];
    let pred = [0.5, 0., 0., 0.5]; // error 0.25 + 0.25
    let zero = [0f32, 0.];
    let opts = FidelityOpts {
        scale: None,
        baseline_mean: Some(&zero),
    };
    // spread about [0, 0] is 2
    assert!(close(fidelity(&pred, &target, 2, opts).unwrap().fve, 0.75));
    // about the batch mean [0.5, 0.5] it is 1
    assert!(close(fidelity(&pred, &target, 2, raw()).unwrap().fve, 0.5));
    // one sample has no spread about its own mean
    assert!(fidelity(&[1., 1.], &[1., 0.], 2, raw())
        .unwrap()
        .fve
        .is_nan());
}

#[test]
fn normalised_metrics() {
    // n_2([3, 4]) = [1.2, 1.6], n_2([0, 5]) = [0, 2]: error 1.44 + 0.16 over A = 2.
    let opts = FidelityOpts {
        scale: Some(2.0),
        baseline_mean: None,
    };
    let f = fidelity(&[3., 4.], &[0., 5.], 2, opts).unwrap();
    assert!(close(f.mse, 0.8), "{f:?}");
    assert!(close(f.cosine, 0.8), "{f:?}");
    // with s = sqrt(A) the MSE is 2 (1 - cos), whatever the raw norms
    let (p, g) = ([1f32, -2., 0.5, 3.], [0.3f32, 1., -4., 2.]);
    let opts = FidelityOpts {
        scale: Some(2.0),
        baseline_mean: None,
    };
    let f = fidelity(&p, &g, 4, opts).unwrap();
    assert!((f.mse - 2.0 * (1.0 - f.cosine)).abs() < 1e-6, "{f:?}");
    // the baseline mean of normalised rows: n_1([3,4]) = [.6,.8], n_1([0,5]) = [0,1]
    let m = mean_vector(&[3., 4., 0., 5.], 2, Some(1.0)).unwrap();
    assert!(
        (m[0] - 0.3).abs() < 1e-6 && (m[1] - 0.9).abs() < 1e-6,
        "{m:?}"
    );
}

#[test]
fn fidelity_rejects_bad_shapes() {
    assert!(fidelity(&[1., 2.], &[1.], 1, raw()).is_err());
    assert!(fidelity(&[1., 2., 3.], &[1., 2., 3.], 2, raw()).is_err());
    assert!(fidelity(&[1.], &[1.], 0, raw()).is_err());
    assert!(fidelity(&[], &[], 2, raw()).is_err());
    let short = [0f32];
    let opts = FidelityOpts {
        scale: None,
        baseline_mean: Some(&short),
    };
    let e = fidelity(&[1., 2.], &[1., 2.], 2, opts).unwrap_err();
    assert!(e.to_string().contains("baseline"), "{e}");
}

#[test]
fn record_keeps_order_and_replaces_in_place() {
    let f = fidelity(&[1., 0.], &[1., 0.], 2, raw()).unwrap();
    let mut r = Record::new().with("loss", 2.0).with("lr", 1e-3);
    r.set("loss", 1.5);
    let r = r.with_fidelity("val_", &f);
    let names: Vec<&str> = r.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["loss", "lr", "val_mse", "val_cosine", "val_fve"]);
    assert_eq!(r.get("loss"), Some(1.5));
    assert_eq!(r.get("val_cosine"), Some(1.0));
    assert_eq!(r.len(), 5);
}

#[test]
fn writer_round_trip_and_nan_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    w.write(
        1,
        Split::Train,
        &Record::new().with("loss", 1.5).with("fve", f64::NAN),
    )
    .unwrap();
    w.write(1, Split::Val, &Record::new().with("mse", 0.25))
        .unwrap();
    w.write(2, Split::Train, &Record::new().with("loss", f64::INFINITY))
        .unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with(r#"{"step":1,"time":"#), "{}", lines[0]);
    assert!(
        lines[0].ends_with(r#","split":"train","loss":1.5,"fve":null}"#),
        "{}",
        lines[0]
    );
    assert!(lines[2].ends_with(r#""loss":null}"#), "{}", lines[2]);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["time"].as_f64().unwrap() > 1.6e9);
    }

    let log = read_metrics(&path).unwrap();
    assert_eq!(log.skipped, 0);
    assert_eq!(log.rows.len(), 3);
    assert_eq!((log.rows[1].step, log.rows[1].split.as_str()), (1, "val"));
    assert_eq!(log.rows[0].get("loss"), Some(1.5));
    assert!(log.rows[0].get("fve").unwrap().is_nan());
    assert_eq!(log.rows[1].get("mse"), Some(0.25));
    let names: Vec<&str> = log.rows[0].values.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["loss", "fve"], "file order is kept");

    // names every line carries cannot be metrics
    let e = w
        .write(3, Split::Train, &Record::new().with("step", 1.0))
        .unwrap_err();
    assert!(e.to_string().contains("step"), "{e}");
}

#[test]
fn malformed_lines_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let text = concat!(
        "{\"step\":1,\"split\":\"train\",\"loss\":2,\"note\":\"x\"}\n",
        "not json\n",
        "\n",
        "{\"step\":\"2\",\"split\":\"train\"}\n",
        "[1,2]\n",
        "{\"step\":3,\"split\":\"val\",\"loss\":1}"
    );
    fs::write(&path, text).unwrap();
    let log = read_metrics(&path).unwrap();
    assert_eq!(log.skipped, 3);
    assert_eq!(log.rows.len(), 2);
    assert_eq!(log.rows[0].values, vec![("loss".to_string(), 2.0)]);
    assert!(log.rows[0].time.is_nan());
}

#[test]
fn resume_keeps_lines_up_to_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    for step in 1..=5 {
        let rec = Record::new().with("loss", 1.0 / step as f64);
        w.write(step, Split::Train, &rec).unwrap();
        if step % 2 == 0 {
            w.write(step, Split::Val, &rec).unwrap();
        }
    }
    drop(w);
    // a line cut short by a kill
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(r#"{"step":6,"ti"#);
    fs::write(&path, text).unwrap();

    let mut w = MetricsWriter::open_for_resume(&path, 3).unwrap();
    let log = read_metrics(&path).unwrap();
    let kept: Vec<(u64, &str)> = log
        .rows
        .iter()
        .map(|r| (r.step, r.split.as_str()))
        .collect();
    assert_eq!(kept, [(1, "train"), (2, "train"), (2, "val"), (3, "train")]);
    assert_eq!(log.skipped, 0);
    w.write(4, Split::Train, &Record::new().with("loss", 0.2))
        .unwrap();
    let log = read_metrics(&path).unwrap();
    assert_eq!(log.rows.len(), 5);
    assert_eq!(log.rows.iter().filter(|r| r.step == 4).count(), 1);
    assert_eq!(log.rows[4].get("loss"), Some(0.2));
    // no temporary file is left behind
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // resuming a run that never wrote metrics starts the file
    let fresh = dir.path().join("fresh.jsonl");
    let mut w = MetricsWriter::open_for_resume(&fresh, 10).unwrap();
    w.write(11, Split::Val, &Record::new().with("fve", 0.5))
        .unwrap();
    assert_eq!(read_metrics(&fresh).unwrap().rows.len(), 1);
}

#[test]
fn progress_text() {
    assert_eq!(format_value(1.23456), "1.2346");
    assert_eq!(format_value(0.0), "0.0000");
    assert_eq!(format_value(1e-5), "1.000e-5");
    assert_eq!(format_value(f64::NAN), "NaN");
    let rec = Record::new()
        .with("loss", 1.234)
        .with("lr", 3e-4)
        .with("fve", 0.41);
    assert_eq!(
        summary(&rec, &["loss", "fve", "kl"]),
        "loss 1.2340 fve 0.4100"
    );
    let mut p = Progress::with_bar(10, 110, 25, false);
    assert!(p.plain_line(10).starts_with("step 10/110 (9%)"));
    p.update(60, &rec, &["loss"]);
    let line = p.plain_line(60);
    assert!(line.starts_with("step 60/110 (54%) elapsed "), "{line}");
    assert!(line.ends_with(" loss 1.2340"), "{line}");
    // out-of-range steps and a bar that draws nowhere do not panic
    p.update(500, &rec, &["loss"]);
    p.finish();
    let mut b = Progress::with_bar(0, 0, 0, true);
    b.update(3, &rec, &["loss"]);
    b.println("validation done");
    b.finish();
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = fs::read(path).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

fn write_run(path: &Path) {
    let mut w = MetricsWriter::create(path).unwrap();
    for step in 1..=40u64 {
        let x = step as f64;
        let rec = Record::new()
            .with("loss", 3.0 / x.sqrt())
            .with("fve", 1.0 - 1.0 / x)
            .with("lr", 1e-4);
        w.write(step, Split::Train, &rec).unwrap();
        if step % 10 == 0 {
            let rec = Record::new()
                .with("loss", 3.3 / x.sqrt())
                .with("fve", 0.9 - 1.0 / x);
            w.write(step, Split::Val, &rec).unwrap();
        }
    }
}

#[test]
fn plot_writes_a_png_with_one_panel_per_metric() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("run.jsonl");
    write_run(&input);
    fs::write(
        &input,
        fs::read_to_string(&input).unwrap() + "garbage line\n",
    )
    .unwrap();

    let out = dir.path().join("curves.png");
    let chosen = ["loss".to_string(), "fve".to_string()];
    let s = plot_file(&input, &out, Some(&chosen)).unwrap();
    assert_eq!(s.panels, chosen);
    assert_eq!(s.splits, ["train", "val"]);
    assert_eq!((s.rows, s.skipped), (44, 1));
    assert_eq!(grid(2), (2, 1));
    assert_eq!(png_size(&out), (2 * PANEL_WIDTH, PANEL_HEIGHT));
    assert_eq!((s.width, s.height), (2 * PANEL_WIDTH, PANEL_HEIGHT));

    // both series are drawn in their colours
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(&out).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    let count = |rgb: [u8; 3]| buf.chunks_exact(3).filter(|p| *p == rgb).count();
    assert!(count([31, 119, 180]) > 200, "train series");
    assert!(count([255, 127, 14]) > 50, "val series");

    // every metric by default: loss, fve, lr -> a 2 x 2 grid
    let all = dir.path().join("all.png");
    let s = plot_file(&input, &all, None).unwrap();
    assert_eq!(s.panels, ["loss", "fve", "lr"]);
    assert_eq!(png_size(&all), (2 * PANEL_WIDTH, 2 * PANEL_HEIGHT));

    let e = plot_file(&input, &all, Some(&["fev".to_string()])).unwrap_err();
    assert!(e.to_string().contains("`fev`"), "{e}");
}

#[test]
fn plot_of_a_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run.jsonl");
    let e = plot_file(&missing, &dir.path().join("x.png"), None).unwrap_err();
    assert!(e.to_string().contains("no-such-run.jsonl"), "{e}");

    let out = Command::new(env!("CARGO_BIN_EXE_nla-engine"))
        .arg("plot")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-run.jsonl"), "{stderr}");
}

#[test]
fn plot_command_writes_next_to_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("run.jsonl");
    write_run(&input);
    let out = Command::new(env!("CARGO_BIN_EXE_nla-engine"))
        .args(["plot", "--metrics", "loss"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        png_size(&dir.path().join("run.png")),
        (PANEL_WIDTH, PANEL_HEIGHT)
    );
}

#[test]
fn plot_survives_extreme_and_flat_series() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("odd.jsonl");
    fs::write(
        &input,
        concat!(
            "{\"step\":1,\"split\":\"train\",\"huge\":1e308,\"flat\":1e6,\"none\":null}\n",
            "{\"step\":2,\"split\":\"train\",\"huge\":-1e308,\"flat\":1e6}\n",
            "{\"step\":2,\"split\":\"val\",\"huge\":0,\"flat\":1000000.0000000001}\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("odd.png");
    let s = plot_file(&input, &out, None).unwrap();
    assert_eq!(s.panels, ["huge", "flat", "none"]);
    assert_eq!(png_size(&out), (2 * PANEL_WIDTH, 2 * PANEL_HEIGHT));
}
