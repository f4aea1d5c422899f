//! Writing NLA datasets: prompt, response, activation_vector (List<Float32>) and extra string or
//! integer columns, snappy-compressed, written to a temporary file and renamed into place.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::Compression;
use ::parquet::file::properties::WriterProperties;
use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::{Error, Result};

/// Rows per row group and per record batch written.
const GROUP_ROWS: usize = 4096;

/// A value of an extra column; every row must give the same columns with the same kinds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraValue {
    Str(String),
    Int(i64),
}

/// One row to write.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOut {
    pub prompt: String,
    pub response: String,
    pub activation_vector: Vec<f32>,
    /// Written as columns after the three above, in this order.
    pub extra: Vec<(String, ExtraValue)>,
}

/// Writes `rows` to `path` (columns `prompt`, `response`, `activation_vector`, then the extras),
/// replacing any file there only once the new one is complete.
pub fn write_nla_parquet(path: &Path, rows: &[SampleOut]) -> Result<()> {
    let schema = schema_of(rows)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_file(&tmp, schema, rows);
    if written.is_err() {
        // The temporary file is incomplete; removing it is all that can be done.
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The schema of `rows`, after checking that all rows agree with the first.
fn schema_of(rows: &[SampleOut]) -> Result<SchemaRef> {
    let err =
        |row: usize, msg: String| Error::invalid("write_nla_parquet", format!("row {row}: {msg}"));
    let item = Field::new_list_field(DataType::Float32, true);
    let mut fields = vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response", DataType::Utf8, false),
        Field::new_list("activation_vector", item, false),
    ];
    let Some(first) = rows.first() else {
        return Ok(Arc::new(Schema::new(fields)));
    };
    for (name, value) in &first.extra {
        let dt = match value {
            ExtraValue::Str(_) => DataType::Utf8,
            ExtraValue::Int(_) => DataType::Int64,
        };
        if fields.iter().any(|f| f.name() == name) {
            return Err(err(0, format!("column `{name}` given twice")));
        }
        fields.push(Field::new(name.as_str(), dt, false));
    }
    let dim = first.activation_vector.len();
    for (r, row) in rows.iter().enumerate() {
        if row.activation_vector.len() != dim {
            let msg = format!(
                "activation_vector has {} elements, row 0 has {dim}",
                row.activation_vector.len()
            );
            return Err(err(r, msg));
        }
        let same = row.extra.len() == first.extra.len()
            && row
                .extra
                .iter()
                .zip(&first.extra)
                .all(|((n, v), (n0, v0))| {
                    n == n0 && std::mem::discriminant(v) == std::mem::discriminant(v0)
                });
        if !same {
            let cols = |row: &SampleOut| {
                let names: Vec<&str> = row.extra.iter().map(|(n, _)| n.as_str()).collect();
                names.join(", ")
            };
            let msg = format!(
                "extra columns [{}] differ from row 0's [{}] (names, order or kind)",
                cols(row),
                cols(first)
            );
            return Err(err(r, msg));
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

fn write_file(tmp: &Path, schema: SchemaRef, rows: &[SampleOut]) -> Result<()> {
    let io = |e| Error::io(tmp, e);
    let format = |e: ::parquet::errors::ParquetError| Error::format(tmp, e.to_string());
    let file = File::create(tmp).map_err(io)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(GROUP_ROWS))
        .build();
    let mut writer = ArrowWriter::try_new(&file, schema.clone(), Some(props)).map_err(format)?;
    for chunk in rows.chunks(GROUP_ROWS) {
        let batch = RecordBatch::try_new(schema.clone(), columns(chunk))
            .map_err(|e| Error::format(tmp, e.to_string()))?;
        writer.write(&batch).map_err(format)?;
    }
    writer.close().map_err(format)?;
    file.sync_all().map_err(io)
}

/// The arrays of `rows`, which [`schema_of`] found to agree with the first row in extra
/// names and kinds (the other kind's arm below is never taken).
fn columns(rows: &[SampleOut]) -> Vec<ArrayRef> {
    let prompts = StringArray::from_iter_values(rows.iter().map(|r| r.prompt.as_str()));
    let responses = StringArray::from_iter_values(rows.iter().map(|r| r.response.as_str()));
    let mut vectors = ListBuilder::new(Float32Builder::new());
    for row in rows {
        vectors.values().append_slice(&row.activation_vector);
        vectors.append(true);
    }
    let mut out: Vec<ArrayRef> = vec![
        Arc::new(prompts),
        Arc::new(responses),
        Arc::new(vectors.finish()),
    ];
    let Some(first) = rows.first() else {
        return out;
    };
    for (c, (_, kind)) in first.extra.iter().enumerate() {
        let values = rows.iter().map(|r| &r.extra[c].1);
        out.push(match kind {
            ExtraValue::Str(_) => {
                Arc::new(StringArray::from_iter_values(values.map(|v| match v {
                    ExtraValue::Str(s) => s.as_str(),
                    ExtraValue::Int(_) => "",
                })))
            }
            ExtraValue::Int(_) => Arc::new(Int64Array::from_iter_values(values.map(|v| match v {
                ExtraValue::Int(i) => *i,
                ExtraValue::Str(_) => 0,
            }))),
        });
    }
    out
}
