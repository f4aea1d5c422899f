//! The training progress display: a bar over the steps with an ETA and the latest key metrics
//! (`loss 1.234 fve 0.4100`) on a terminal; where stderr is not a terminal (CI, a log file) no
//! bar is drawn and a plain line is printed every `every` steps instead. Nothing here fails or
//! panics: progress output is best effort.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::Record;

/// Formats `value` compactly: 4 decimals in [1e-3, 1e4), scientific notation otherwise.
pub fn format_value(value: f64) -> String {
    let a = value.abs();
    if value == 0.0 || (1e-3..1e4).contains(&a) {
        format!("{value:.4}")
    } else if value.is_finite() {
        format!("{value:.3e}")
    } else {
        format!("{value}")
    }
}

/// `name value` pairs of the `keys` present in `rec`, in the order of `keys`.
pub fn summary(rec: &Record, keys: &[&str]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|&k| rec.get(k).map(|v| format!("{k} {}", format_value(v))))
        .collect();
    parts.join(" ")
}

fn format_secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Writes a line to stderr, ignoring errors (`eprintln!` panics on a closed pipe).
fn plain(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Progress over the steps `start+1 ..= total` of a run (`start` > 0 when resumed).
pub struct Progress {
    bar: Option<ProgressBar>,
    start: u64,
    total: u64,
    every: u64,
    began: Instant,
    message: String,
}

impl Progress {
    /// A bar on stderr when it is a terminal, else a plain line every `every` steps (and at the
    /// last step).
    pub fn new(start: u64, total: u64, every: u64) -> Self {
        Self::with_bar(start, total, every, std::io::stderr().is_terminal())
    }

    /// As [`Progress::new`], choosing the bar (`true`) or plain lines (`false`) explicitly.
    pub fn with_bar(start: u64, total: u64, every: u64, bar: bool) -> Self {
        let start = start.min(total);
        let bar = bar.then(|| {
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            let pb = ProgressBar::new(total)
                .with_style(style.progress_chars("=> "))
                .with_position(start);
            pb.reset_eta();
            pb
        });
        Self {
            bar,
            start,
            total,
            every: every.max(1),
            began: Instant::now(),
            message: String::new(),
        }
    }

    /// Marks `step` as done and shows `keys` of `rec` as the message.
    pub fn update(&mut self, step: u64, rec: &Record, keys: &[&str]) {
        self.update_message(step, summary(rec, keys));
    }

    /// Marks `step` as done with a free-form message.
    pub fn update_message(&mut self, step: u64, message: String) {
        self.message = message;
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(self.message.clone());
            }
            None => {
                if step.is_multiple_of(self.every) || step == self.total {
                    plain(&self.plain_line(step));
                }
            }
        }
    }

    /// The line printed without a terminal:
    /// `step 40/100 (40%) elapsed 1.2s eta 1.8s loss 1.2340`.
    pub fn plain_line(&self, step: u64) -> String {
        let elapsed = self.began.elapsed();
        let done = step.saturating_sub(self.start);
        let left = self.total.saturating_sub(step);
        let eta = if done > 0 {
            format_secs(elapsed.mul_f64(left as f64 / done as f64))
        } else {
            "?".into()
        };
        let pct = (100 * step.min(self.total))
            .checked_div(self.total)
            .unwrap_or(100);
        let mut line = format!(
            "step {step}/{} ({pct}%) elapsed {} eta {eta}",
            self.total,
            format_secs(elapsed)
        );
        if !self.message.is_empty() {
            line.push(' ');
            line.push_str(&self.message);
        }
        line
    }

    /// Prints a line (e.g. a validation result) without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => plain(line),
        }
    }

    /// Leaves the bar at its final state with the last message.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
