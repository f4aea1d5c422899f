//! Parquet datasets of NLA rows: a prompt holding `<INJECT>` markers, a response, and one
//! activation vector per marker (columns as in `reference/NLA_SEMANTICS.md` section 5).
//!
//! [`DatasetReader`] streams [`Sample`]s from a list of parquet files one record batch at a
//! time, optionally in a seeded shuffled order, and checks every row. [`write_nla_parquet`]
//! writes such a file. Rows are counted from 0 within their file in every message.

mod columns;
mod parquet;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::parquet::DatasetReader;
pub use self::writer::{write_nla_parquet, ExtraValue, SampleOut};

/// Which model the rows feed; it decides the columns a row needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Prompt with markers, vectors, response.
    Actor,
    /// Vectors and response; the prompt column is not read.
    Critic,
    /// Everything the actor needs (the critic reads the same response).
    Both,
}

/// What the reader does with a row that fails a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBadRow {
    /// Stop with an error naming the file, row and column.
    Fail,
    /// Drop the row and count it in [`DataStats::skipped`].
    Skip,
}

/// The classes of bad rows; each has its own [`OnBadRow`] in [`BadRowPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BadRow {
    /// A null where a value is needed (also: a chat prompt with no `user` message).
    Missing,
    /// A vector whose length is not `activation_dim`.
    VectorLength,
    /// NaN or infinity in a vector (or an f64 too large for f32).
    NonFinite,
    /// A prompt without the marker (actor, both).
    NoMarker,
    /// Markers in the prompt and vectors in the row differ in number (actor, both).
    MarkerCount,
}

impl BadRow {
    pub const ALL: [BadRow; 5] = [
        BadRow::Missing,
        BadRow::VectorLength,
        BadRow::NonFinite,
        BadRow::NoMarker,
        BadRow::MarkerCount,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BadRow::Missing => "missing",
            BadRow::VectorLength => "vector_length",
            BadRow::NonFinite => "non_finite",
            BadRow::NoMarker => "no_marker",
            BadRow::MarkerCount => "marker_count",
        }
    }
}

/// Fail or skip, per class of bad row. Missing or mistyped columns and unreadable files
/// always fail: they concern a whole file, not a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRowPolicy {
    pub missing: OnBadRow,
    pub vector_length: OnBadRow,
    pub non_finite: OnBadRow,
    pub no_marker: OnBadRow,
    pub marker_count: OnBadRow,
}

impl BadRowPolicy {
    /// The same choice for every class.
    pub fn all(on: OnBadRow) -> Self {
        BadRowPolicy {
            missing: on,
            vector_length: on,
            non_finite: on,
            no_marker: on,
            marker_count: on,
        }
    }

    pub fn set(&mut self, class: BadRow, on: OnBadRow) {
        match class {
            BadRow::Missing => self.missing = on,
            BadRow::VectorLength => self.vector_length = on,
            BadRow::NonFinite => self.non_finite = on,
            BadRow::NoMarker => self.no_marker = on,
            BadRow::MarkerCount => self.marker_count = on,
        }
    }

    pub fn get(&self, class: BadRow) -> OnBadRow {
        match class {
            BadRow::Missing => self.missing,
            BadRow::VectorLength => self.vector_length,
            BadRow::NonFinite => self.non_finite,
            BadRow::NoMarker => self.no_marker,
            BadRow::MarkerCount => self.marker_count,
        }
    }
}

impl Default for BadRowPolicy {
    fn default() -> Self {
        BadRowPolicy::all(OnBadRow::Fail)
    }
}

/// Where the rows come from and how to read them.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSpec {
    /// Read in this order unless `shuffle`.
    pub parquet_files: Vec<PathBuf>,
    pub prompt_key: String,
    pub response_key: String,
    pub activation_vector_key: String,
    /// A: the length of every vector.
    pub activation_dim: usize,
    pub mode: Mode,
    /// False for generation-only use: the response column may then be absent or null.
    pub require_response: bool,
    /// The marker text in prompts; the k-th marker gets the k-th vector.
    pub injection_token: String,
    /// Shuffle the order of files, of row groups within each file, and rows through a buffer
    /// of `shuffle_buffer` rows; the order depends only on `seed` and the epoch.
    pub shuffle: bool,
    pub seed: u64,
    pub shuffle_buffer: usize,
    /// Rows per record batch read from a file: what the reader holds beyond the shuffle buffer.
    pub batch_rows: usize,
    pub on_bad_row: BadRowPolicy,
}

impl DatasetSpec {
    /// The default column names and marker, actor mode, files in order, failing on bad rows.
    pub fn new(parquet_files: Vec<PathBuf>, activation_dim: usize) -> Self {
        DatasetSpec {
            parquet_files,
            prompt_key: "prompt".into(),
            response_key: "response".into(),
            activation_vector_key: "activation_vector".into(),
            activation_dim,
            mode: Mode::Actor,
            require_response: true,
            injection_token: "<INJECT>".into(),
            shuffle: false,
            seed: 0,
            shuffle_buffer: 1024,
            batch_rows: 256,
            on_bad_row: BadRowPolicy::default(),
        }
    }

    /// Whether the prompt column is read and its markers checked.
    pub fn needs_prompt(&self) -> bool {
        self.mode != Mode::Critic
    }
}

/// The file and row (from 0) a sample was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSource {
    pub file: Arc<Path>,
    pub row: usize,
}

/// One dataset row.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The prompt text (the first `user` content of a chat prompt); None in critic mode.
    pub prompt: Option<String>,
    /// None only when the response is not required and absent or null.
    pub response: Option<String>,
    /// One vector of `activation_dim` per marker (one in critic mode unless the row holds
    /// a list of vectors).
    pub vectors: Vec<Vec<f32>>,
    /// The other columns holding strings, integers, floats or booleans (null -> `Null`,
    /// NaN and infinities -> `Null`); columns of other types are left out.
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub source: RowSource,
}

/// What a reader has read since it was opened (over all epochs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Rows taken from the files, skipped ones included.
    pub rows_read: u64,
    /// Rows handed out as samples.
    pub samples: u64,
    /// Rows dropped under [`OnBadRow::Skip`], by class.
    pub skipped: BTreeMap<BadRow, u64>,
}

impl DataStats {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    pub fn skipped(&self, class: BadRow) -> u64 {
        self.skipped.get(&class).copied().unwrap_or(0)
    }
}

impl fmt::Display for DataStats {
    /// `rows 100, samples 97, skipped 3 (non_finite 1, vector_length 2)`
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "rows {}, samples {}, skipped {}",
            self.rows_read,
            self.samples,
            self.skipped_total()
        )?;
        let parts: Vec<String> = BadRow::ALL
            .iter()
            .filter(|c| self.skipped(**c) > 0)
            .map(|c| format!("{} {}", c.name(), self.skipped(*c)))
            .collect();
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}
