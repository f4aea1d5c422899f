//! The library's one error type. Every message names what went wrong and where (file, tensor,
//! field, row), so that the CLI can print it as one line.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (The I/O error is part of the message, not a `source`, so that a printed error chain
    /// does not repeat it.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file exists but its contents are not what its format promises (truncated, bad header).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A config field we cannot handle, or a value out of range.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` is not a parameter of this model")]
    ExtraTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}, supported: F32, BF16, F16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A dataset row that fails validation; `row` counts from 0 within the file.
    #[error("{path}: row {row}, column `{column}`: {msg}")]
    Data {
        path: PathBuf,
        row: usize,
        column: String,
        msg: String,
    },
    /// A dataset column that is missing or of a type the reader cannot use.
    #[error("{path}: column `{column}`: {msg}")]
    DataColumn {
        path: PathBuf,
        column: String,
        msg: String,
    },
    /// Bad arguments to an op or API call (lengths, dims); names the op and the argument.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// The CUDA device: no driver or GPU, or a driver/library call that failed (`what` names
    /// the call or the kernel).
    #[error("cuda: {what}: {msg}")]
    Cuda { what: String, msg: String },
}

impl Error {
    pub fn cuda(what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Cuda {
            what: what.into(),
            msg: msg.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }
}
