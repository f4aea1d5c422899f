//! `nla-engine plot`: training curves from a metrics file (see [`crate::train::metrics`]) drawn
//! into a PNG, one panel per metric, one series per split (train, val) against the step.
//!
//! Text is rasterised from an embedded DejaVu Sans face, so rendering needs no font libraries
//! on the machine.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};
use crate::train::metrics::{read_metrics, MetricsLog};

/// Size of one panel in pixels.
pub const PANEL_WIDTH: u32 = 480;
pub const PANEL_HEIGHT: u32 = 320;

/// Series colours, by order of the split's first appearance (train first in practice).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// What [`plot_file`] drew.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotSummary {
    /// The metric of each panel, row by row.
    pub panels: Vec<String>,
    /// The splits drawn as series.
    pub splits: Vec<String>,
    /// Lines read, and malformed lines skipped.
    pub rows: usize,
    pub skipped: usize,
    pub width: u32,
    pub height: u32,
}

/// Columns and rows of the panel grid for `n` panels: up to 3 columns.
pub fn grid(n: usize) -> (usize, usize) {
    let cols = match n {
        0..=1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    (cols, n.max(1).div_ceil(cols))
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", e.to_string())
}

fn ensure_font() -> Result<()> {
    static FONT: OnceLock<bool> = OnceLock::new();
    let ok = *FONT.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(plot_err("the embedded font could not be loaded"))
    }
}

/// Metric names in order of first appearance.
fn all_metrics(log: &MetricsLog) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for row in &log.rows {
        for (name, _) in &row.values {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
}

/// Steps are whole numbers: fractional ticks (on short runs) stay unlabelled.
fn step_tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// Compact axis labels: up to 3 decimals, or 4 significant digits in scientific notation.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-2..1e5).contains(&a) {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        let s = format!("{v:.3e}");
        match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
            None => s,
        }
    }
}

/// Values beyond this are drawn at it: a span near f64::MAX overflows the axis arithmetic.
const LIMIT: f64 = 1e300;

/// A range with some room around the data; finite and non-empty for any input.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) || lo > hi {
        return (0.0, 1.0);
    }
    let (lo, hi) = (lo.clamp(-LIMIT, LIMIT), hi.clamp(-LIMIT, LIMIT));
    // A flat series (spread below a millionth of its magnitude, where f64 ticks would crowd)
    // gets a tenth of its magnitude.
    let mag = lo.abs().max(hi.abs());
    let span = if hi - lo > mag * 1e-6 {
        hi - lo
    } else if mag > 0.0 {
        mag * 0.1
    } else {
        1.0
    };
    let mid = lo / 2.0 + hi / 2.0;
    (mid - span * 0.55, mid + span * 0.55)
}

/// Draws `metrics` (every metric in the file when `None`) from the metrics file `input` into
/// the PNG `output`.
pub fn plot_file(input: &Path, output: &Path, metrics: Option<&[String]>) -> Result<PlotSummary> {
    let log = read_metrics(input)?;
    if log.rows.is_empty() {
        return Err(Error::format(
            input,
            format!("no metrics lines ({} malformed lines)", log.skipped),
        ));
    }
    let present = all_metrics(&log);
    let names = match metrics {
        Some(wanted) if !wanted.is_empty() => {
            if let Some(missing) = wanted.iter().find(|w| !present.contains(w)) {
                return Err(Error::format(
                    input,
                    format!(
                        "no metric `{missing}`; the file has: {}",
                        present.join(", ")
                    ),
                ));
            }
            wanted.to_vec()
        }
        _ => present,
    };
    if names.is_empty() {
        return Err(Error::format(input, "the lines hold no metrics"));
    }
    let (pixels, width, height, splits) = render(&log, &names)?;
    write_png(output, &pixels, width, height)?;
    Ok(PlotSummary {
        panels: names,
        splits,
        rows: log.rows.len(),
        skipped: log.skipped,
        width,
        height,
    })
}

/// Renders the panels into an RGB buffer; returns it with its width, height and the splits.
pub fn render(log: &MetricsLog, names: &[String]) -> Result<(Vec<u8>, u32, u32, Vec<String>)> {
    ensure_font()?;
    let mut splits: Vec<String> = Vec::new();
    for row in &log.rows {
        if !splits.contains(&row.split) {
            splits.push(row.split.clone());
        }
    }
    let (cols, rows) = grid(names.len());
    let (width, height) = (PANEL_WIDTH * cols as u32, PANEL_HEIGHT * rows as u32);
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (x_lo, x_hi) = log.rows.iter().fold((u64::MAX, 0), |(lo, hi), r| {
            (lo.min(r.step), hi.max(r.step))
        });
        let (x_lo, x_hi) = if x_hi > x_lo {
            (x_lo as f64, x_hi as f64)
        } else {
            (x_lo as f64 - 1.0, x_hi as f64 + 1.0)
        };
        for (area, name) in root.split_evenly((rows, cols)).iter().zip(names) {
            let series: Vec<(usize, Vec<(f64, f64)>)> = splits
                .iter()
                .enumerate()
                .map(|(i, split)| {
                    let mut pts: Vec<(f64, f64)> = log
                        .rows
                        .iter()
                        .filter(|r| &r.split == split)
                        .filter_map(|r| r.get(name).map(|v| (r.step as f64, v)))
                        .filter(|(_, v)| v.is_finite())
                        .map(|(x, v)| (x, v.clamp(-LIMIT, LIMIT)))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (i, pts)
                })
                .filter(|(_, pts)| !pts.is_empty())
                .collect();
            let (lo, hi) = series
                .iter()
                .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
            let (y_lo, y_hi) = padded(lo, hi);
            let caption = if series.is_empty() {
                format!("{name} (no finite values)")
            } else {
                name.clone()
            };
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .caption(caption, ("sans-serif", 20))
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&step_tick)
                .y_label_formatter(&tick)
                .light_line_style(RGBColor(246, 246, 246))
                .draw()
                .map_err(plot_err)?;
            for (i, pts) in &series {
                let colour = COLOURS[i % COLOURS.len()];
                let few = pts.len() <= 60;
                chart
                    .draw_series(
                        LineSeries::new(pts.iter().copied(), colour.stroke_width(2))
                            .point_size(if few { 3 } else { 0 }),
                    )
                    .map_err(plot_err)?
                    .label(splits[*i].clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
            }
            if let Some((_, first)) = series.first() {
                // The legend goes in the right-hand corner away from where the curve ends.
                let ends_high = first.last().is_some_and(|p| p.1 > (y_lo + y_hi) / 2.0);
                chart
                    .configure_series_labels()
                    .position(if ends_high {
                        SeriesLabelPosition::LowerRight
                    } else {
                        SeriesLabelPosition::UpperRight
                    })
                    .background_style(WHITE.mix(0.8))
                    .border_style(RGBColor(200, 200, 200))
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok((pixels, width, height, splits))
}

/// Encodes an RGB buffer as an 8-bit PNG at `path`.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let png_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => Error::io(path, e),
        e => Error::format(path, format!("PNG encoding: {e}")),
    };
    let file = File::create(path).map_err(io)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)
}
