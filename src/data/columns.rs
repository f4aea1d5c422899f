//! The column types the reader accepts, and reading one row's values out of a record batch.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};
use serde_json::Value;

use super::{BadRow, DatasetSpec};
use crate::{Error, Result};

/// The columns of one file that the reader uses, checked against the spec when the file opens.
pub(super) struct Layout {
    prompt: bool,
    response: bool,
    /// 1: each row holds one vector; 2: each row holds a list of vectors.
    depth: usize,
    extras: Vec<String>,
    /// Indices of the columns to read, for the projection.
    pub roots: Vec<usize>,
}

impl Layout {
    pub fn new(spec: &DatasetSpec, schema: &Schema, path: &Path) -> Result<Layout> {
        let column_err = |column: &str, msg: String| Error::DataColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            msg,
        };
        let missing = |column: &str| {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            column_err(
                column,
                format!("missing; the file has columns: {}", names.join(", ")),
            )
        };
        let wrong_type = |column: &str, dt: &DataType, expected: &str| {
            column_err(column, format!("has type {dt}, expected {expected}"))
        };
        const STRING: &str = "a string";
        let mut roots = vec![];

        let key = &spec.activation_vector_key;
        let (i, field) = schema.fields().find(key).ok_or_else(|| missing(key))?;
        let depth = vector_depth(field.data_type()).ok_or_else(|| {
            wrong_type(
                key,
                field.data_type(),
                "a List, LargeList or FixedSizeList of Float32 or Float64, or a list of those",
            )
        })?;
        roots.push(i);

        let prompt = spec.needs_prompt();
        if prompt {
            let key = &spec.prompt_key;
            let (i, field) = schema.fields().find(key).ok_or_else(|| missing(key))?;
            if !is_prompt_type(field.data_type()) {
                let expected = "a string or a list of {role, content} string structs";
                return Err(wrong_type(key, field.data_type(), expected));
            }
            roots.push(i);
        }

        let key = &spec.response_key;
        let response = match schema.fields().find(key) {
            Some((i, field)) => {
                if !is_string(field.data_type()) {
                    return Err(wrong_type(key, field.data_type(), STRING));
                }
                roots.push(i);
                true
            }
            None if spec.require_response => return Err(missing(key)),
            None => false,
        };

        let known = [
            &spec.prompt_key,
            &spec.response_key,
            &spec.activation_vector_key,
        ];
        let mut extras = vec![];
        for (i, field) in schema.fields().iter().enumerate() {
            if !known.contains(&field.name()) && is_extra_type(field.data_type()) {
                extras.push(field.name().clone());
                roots.push(i);
            }
        }
        roots.sort_unstable();
        Ok(Layout {
            prompt,
            response,
            depth,
            extras,
            roots,
        })
    }

    /// The arrays of one record batch, ready for [`Columns::row`].
    pub fn columns<'a>(
        &'a self,
        spec: &'a DatasetSpec,
        batch: &'a RecordBatch,
        path: &Path,
    ) -> Result<Columns<'a>> {
        let get = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| Error::DataColumn {
                path: path.to_path_buf(),
                column: name.to_string(),
                msg: "missing from a record batch".into(),
            })
        };
        Ok(Columns {
            spec,
            depth: self.depth,
            prompt: self.prompt.then(|| get(&spec.prompt_key)).transpose()?,
            response: self.response.then(|| get(&spec.response_key)).transpose()?,
            vector: get(&spec.activation_vector_key)?,
            extras: self
                .extras
                .iter()
                .map(|name| Ok((name.as_str(), get(name)?)))
                .collect::<Result<_>>()?,
        })
    }
}

fn is_string(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn is_float(dt: &DataType) -> bool {
    matches!(dt, DataType::Float32 | DataType::Float64)
}

fn list_item_type(dt: &DataType) -> Option<&DataType> {
    match dt {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            Some(f.data_type())
        }
        _ => None,
    }
}

/// How many list levels hold the floats: 1 (one vector per row) or 2 (a list of vectors).
fn vector_depth(dt: &DataType) -> Option<usize> {
    let item = list_item_type(dt)?;
    if is_float(item) {
        return Some(1);
    }
    is_float(list_item_type(item)?).then_some(2)
}

/// A string, or a chat: a list of structs with string fields `role` and `content`.
fn is_prompt_type(dt: &DataType) -> bool {
    if is_string(dt) {
        return true;
    }
    let (DataType::List(item) | DataType::LargeList(item)) = dt else {
        return false;
    };
    let DataType::Struct(fields) = item.data_type() else {
        return false;
    };
    ["role", "content"].iter().all(|name| {
        fields
            .find(name)
            .is_some_and(|(_, f)| is_string(f.data_type()))
    })
}

fn is_extra_type(dt: &DataType) -> bool {
    is_string(dt) || is_float(dt) || dt.is_integer() || *dt == DataType::Boolean
}

/// Row `i` of a List, LargeList or FixedSizeList array.
fn list_value(arr: &dyn Array, i: usize) -> Option<ArrayRef> {
    match arr.data_type() {
        DataType::List(_) => Some(arr.as_list_opt::<i32>()?.value(i)),
        DataType::LargeList(_) => Some(arr.as_list_opt::<i64>()?.value(i)),
        DataType::FixedSizeList(..) => Some(arr.as_fixed_size_list_opt()?.value(i)),
        _ => None,
    }
}

/// Row `i` of a string array (None for another type; the caller checks nulls first).
fn str_at(arr: &dyn Array, i: usize) -> Option<&str> {
    match arr.data_type() {
        DataType::Utf8 => Some(arr.as_string_opt::<i32>()?.value(i)),
        DataType::LargeUtf8 => Some(arr.as_string_opt::<i64>()?.value(i)),
        DataType::Utf8View => Some(arr.as_string_view_opt()?.value(i)),
        _ => None,
    }
}

/// A value of an extra column as JSON; None for a type that is not read.
fn json_at(arr: &dyn Array, i: usize) -> Option<Value> {
    if arr.is_null(i) {
        return Some(Value::Null);
    }
    macro_rules! int {
        ($t:ty) => {
            Value::from(arr.as_primitive_opt::<$t>()?.value(i))
        };
    }
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    Some(match arr.data_type() {
        DataType::Boolean => Value::Bool(arr.as_boolean_opt()?.value(i)),
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float32 => float(arr.as_primitive_opt::<Float32Type>()?.value(i) as f64),
        DataType::Float64 => float(arr.as_primitive_opt::<Float64Type>()?.value(i)),
        _ => Value::String(str_at(arr, i)?.to_string()),
    })
}

/// Why a row was refused. `class` None: a type mismatch no policy may skip.
pub(super) struct Bad {
    pub class: Option<BadRow>,
    pub column: String,
    pub msg: String,
}

fn bad(class: BadRow, column: &str, msg: impl Into<String>) -> Bad {
    Bad {
        class: Some(class),
        column: column.to_string(),
        msg: msg.into(),
    }
}

fn wrong_type(column: &str, arr: &dyn Array) -> Bad {
    Bad {
        class: None,
        column: column.to_string(),
        msg: format!("unexpected type {}", arr.data_type()),
    }
}

/// The values of one row.
pub(super) struct RowValues {
    pub prompt: Option<String>,
    pub response: Option<String>,
    pub vectors: Vec<Vec<f32>>,
    pub extra: serde_json::Map<String, Value>,
}

/// The arrays of one record batch.
pub(super) struct Columns<'a> {
    spec: &'a DatasetSpec,
    depth: usize,
    prompt: Option<&'a ArrayRef>,
    response: Option<&'a ArrayRef>,
    vector: &'a ArrayRef,
    extras: Vec<(&'a str, &'a ArrayRef)>,
}

impl Columns<'_> {
    /// Reads and checks row `i` of the batch.
    pub fn row(&self, i: usize) -> Result<RowValues, Bad> {
        let spec = self.spec;
        let prompt = match self.prompt {
            Some(col) => Some(self.prompt_at(col, i)?),
            None => None,
        };
        let vectors = self.vectors_at(i)?;
        if let Some(prompt) = &prompt {
            let marker = &spec.injection_token;
            let markers = prompt.matches(marker.as_str()).count();
            if markers == 0 {
                let msg = format!("no `{marker}` marker in the prompt");
                return Err(bad(BadRow::NoMarker, &spec.prompt_key, msg));
            }
            if markers != vectors.len() {
                let msg = format!(
                    "{markers} `{marker}` marker(s) in the prompt but {} activation vector(s) \
                     in `{}`",
                    vectors.len(),
                    spec.activation_vector_key
                );
                return Err(bad(BadRow::MarkerCount, &spec.prompt_key, msg));
            }
        }
        let key = &spec.response_key;
        let response = match self.response {
            Some(col) if !col.is_null(i) => {
                let text = str_at(col, i).ok_or_else(|| wrong_type(key, col))?;
                Some(text.to_string())
            }
            _ if spec.require_response => {
                return Err(bad(BadRow::Missing, key, "null; a response is needed"));
            }
            _ => None,
        };
        let mut extra = serde_json::Map::new();
        for (name, col) in &self.extras {
            let value = json_at(col, i).ok_or_else(|| wrong_type(name, col))?;
            extra.insert(name.to_string(), value);
        }
        Ok(RowValues {
            prompt,
            response,
            vectors,
            extra,
        })
    }

    /// The prompt text, or the content of the first `user` message of a chat.
    fn prompt_at(&self, col: &ArrayRef, i: usize) -> Result<String, Bad> {
        let key = &self.spec.prompt_key;
        if col.is_null(i) {
            return Err(bad(BadRow::Missing, key, "null; a prompt is needed"));
        }
        if let Some(text) = str_at(col, i) {
            return Ok(text.to_string());
        }
        let chat = list_value(col, i).ok_or_else(|| wrong_type(key, col))?;
        let chat = chat.as_struct_opt().ok_or_else(|| wrong_type(key, col))?;
        let role = chat.column_by_name("role");
        let content = chat.column_by_name("content");
        let (Some(role), Some(content)) = (role, content) else {
            return Err(wrong_type(key, col));
        };
        for j in 0..chat.len() {
            if chat.is_null(j) || role.is_null(j) || str_at(role, j) != Some("user") {
                continue;
            }
            if content.is_null(j) {
                let msg = format!("message {j} (the first `user` message) has null content");
                return Err(bad(BadRow::Missing, key, msg));
            }
            let text = str_at(content, j).ok_or_else(|| wrong_type(key, col))?;
            return Ok(text.to_string());
        }
        Err(bad(BadRow::Missing, key, "the chat has no `user` message"))
    }

    fn vectors_at(&self, i: usize) -> Result<Vec<Vec<f32>>, Bad> {
        let key = &self.spec.activation_vector_key;
        let col = self.vector;
        if col.is_null(i) {
            return Err(bad(BadRow::Missing, key, "null; a vector is needed"));
        }
        let item = list_value(col, i).ok_or_else(|| wrong_type(key, col))?;
        if self.depth == 1 {
            return Ok(vec![self.floats(&item, "vector")?]);
        }
        if item.is_empty() {
            return Err(bad(BadRow::Missing, key, "empty list of vectors"));
        }
        let mut vectors = Vec::with_capacity(item.len());
        for j in 0..item.len() {
            let which = format!("vector {j} of {}", item.len());
            if item.is_null(j) {
                return Err(bad(BadRow::Missing, key, format!("{which} is null")));
            }
            let v = list_value(&item, j).ok_or_else(|| wrong_type(key, col))?;
            vectors.push(self.floats(&v, &which)?);
        }
        Ok(vectors)
    }

    /// One vector as f32, checked for nulls, length and finite values.
    fn floats(&self, arr: &ArrayRef, which: &str) -> Result<Vec<f32>, Bad> {
        let key = &self.spec.activation_vector_key;
        let dim = self.spec.activation_dim;
        if let Some(k) = (0..arr.len()).find(|&k| arr.is_null(k)) {
            let msg = format!("{which}: element {k} is null");
            return Err(bad(BadRow::Missing, key, msg));
        }
        if arr.len() != dim {
            let msg = format!(
                "{which} has {} elements, expected {dim} (activation_dim)",
                arr.len()
            );
            return Err(bad(BadRow::VectorLength, key, msg));
        }
        let non_finite = |k: usize, x: f64| {
            let msg = if x.is_finite() {
                format!("{which}: element {k} = {x:e} overflows f32")
            } else {
                format!("{which}: element {k} is {x}")
            };
            Err(bad(BadRow::NonFinite, key, msg))
        };
        if let Some(a) = arr.as_primitive_opt::<Float32Type>() {
            let v = a.values().to_vec();
            match v.iter().position(|x| !x.is_finite()) {
                Some(k) => non_finite(k, v[k] as f64),
                None => Ok(v),
            }
        } else if let Some(a) = arr.as_primitive_opt::<Float64Type>() {
            let v: Vec<f32> = a.values().iter().map(|&x| x as f32).collect();
            match v.iter().position(|x| !x.is_finite()) {
                Some(k) => non_finite(k, a.value(k)),
                None => Ok(v),
            }
        } else {
            Err(wrong_type(key, arr))
        }
    }
}
