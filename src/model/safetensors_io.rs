//! HF safetensors weights: load (single file or sharded; f32/bf16/f16) into the flat buffer, save.
//!
//! Every failure names the file and the tensor: a truncated or corrupt file is `Error::Format`,
//! a tensor the table lacks `Error::ExtraTensor`, and so on. Writes go to a temporary file in the
//! same folder that is renamed into place, so a crash never leaves a half-written file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};

use super::params::ParamTable;
use crate::{Error, Result};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// A tensor read from a file: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Element type of a saved checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
}

/// The weight files of a model: `model.safetensors`, the shards listed in
/// `model.safetensors.index.json`, or `model_dir` itself when it is a `.safetensors` file (or
/// the shards of a `.safetensors.index.json` file).
pub fn weight_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(locate(model_dir)?.0)
}

/// The weight files plus the path to name when a tensor is missing from all of them
/// (the single file, or the index of the shards).
fn locate(model_dir: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    if model_dir.is_file() {
        if model_dir.extension().is_some_and(|e| e == "safetensors") {
            return Ok((vec![model_dir.to_path_buf()], model_dir.to_path_buf()));
        }
        if model_dir
            .to_string_lossy()
            .ends_with(".safetensors.index.json")
        {
            return Ok((shards(model_dir)?, model_dir.to_path_buf()));
        }
        return Err(Error::format(
            model_dir,
            "expected a model folder, a .safetensors file or a .safetensors.index.json file",
        ));
    }
    if !model_dir.is_dir() {
        return Err(not_found(
            model_dir,
            format!(
                "does not exist (expected a model folder holding {SINGLE} or {INDEX}, or a .safetensors file)"
            ),
        ));
    }
    let single = model_dir.join(SINGLE);
    if single.is_file() {
        return Ok((vec![single.clone()], single));
    }
    let index = model_dir.join(INDEX);
    if index.is_file() {
        return Ok((shards(&index)?, index));
    }
    Err(not_found(
        model_dir,
        format!("no weights found: looked for {SINGLE} and {INDEX}"),
    ))
}

fn not_found(path: &Path, msg: String) -> Error {
    Error::io(path, std::io::Error::new(ErrorKind::NotFound, msg))
}

/// The distinct shard files of a sharded checkpoint, sorted by name.
fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "`weight_map` is missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![];
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(
                index,
                format!("`weight_map` entry for tensor `{tensor}` is not a file name"),
            )
        })?;
        let path = dir.join(file);
        if files.contains(&path) {
            continue;
        }
        if !path.is_file() {
            return Err(Error::format(
                index,
                format!(
                    "shard {} (holding tensor `{tensor}`) does not exist",
                    path.display()
                ),
            ));
        }
        files.push(path);
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::format(index, "`weight_map` lists no tensors"));
    }
    Ok(files)
}

/// Loads every parameter of `table` from the model's safetensors files into one flat buffer of
/// `table.total` f32 elements (F32, BF16 and F16 are converted).
pub fn load_params(model_dir: &Path, table: &ParamTable) -> Result<Vec<f32>> {
    let (files, source) = locate(model_dir)?;
    let mut flat = vec![0f32; table.total];
    // parameter name -> the file it was loaded from
    let mut loaded: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        let map = map_file(file)?;
        for (name, dtype, shape, bytes) in tensors(file, &map)? {
            let Some(entry) = table.get(&name) else {
                let tied_head = name == "lm_head.weight";
                if tied_head || name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                return Err(Error::ExtraTensor {
                    path: file.clone(),
                    name,
                });
            };
            if let Some(first) = loaded.get(&name) {
                return Err(Error::format(
                    file,
                    format!("tensor `{name}` is also in {}", first.display()),
                ));
            }
            if shape != entry.shape {
                return Err(Error::Shape {
                    path: file.clone(),
                    name,
                    expected: entry.shape.clone(),
                    got: shape,
                });
            }
            let dst = &mut flat[entry.offset..entry.offset + entry.len];
            if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(dtype_error(file, &name, dtype));
            }
            convert(file, &name, dtype, bytes, dst)?;
            loaded.insert(name, file.clone());
        }
    }
    if let Some(e) = table.entries.iter().find(|e| !loaded.contains_key(&e.name)) {
        return Err(Error::MissingTensor {
            path: source,
            name: e.name.clone(),
        });
    }
    Ok(flat)
}

/// Loads every parameter of `table` from a checkpoint that may hold more tensors (the layers
/// past a truncated model's last block, an LM head, a critic's value head): tensors the table
/// does not name are skipped; shapes, dtypes and missing tensors are checked as in
/// [`load_params`].
pub fn load_params_subset(model_dir: &Path, table: &ParamTable) -> Result<Vec<f32>> {
    let (files, source) = locate(model_dir)?;
    let mut flat = vec![0f32; table.total];
    let mut loaded: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        let map = map_file(file)?;
        for (name, dtype, shape, bytes) in tensors(file, &map)? {
            let Some(entry) = table.get(&name) else {
                continue;
            };
            if let Some(first) = loaded.get(&name) {
                return Err(Error::format(
                    file,
                    format!("tensor `{name}` is also in {}", first.display()),
                ));
            }
            if shape != entry.shape {
                return Err(Error::Shape {
                    path: file.clone(),
                    name,
                    expected: entry.shape.clone(),
                    got: shape,
                });
            }
            if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(dtype_error(file, &name, dtype));
            }
            let dst = &mut flat[entry.offset..entry.offset + entry.len];
            convert(file, &name, dtype, bytes, dst)?;
            loaded.insert(name, file.clone());
        }
    }
    if let Some(e) = table.entries.iter().find(|e| !loaded.contains_key(&e.name)) {
        return Err(Error::MissingTensor {
            path: source,
            name: e.name.clone(),
        });
    }
    Ok(flat)
}

/// Reads every tensor of one safetensors file, in file order, converted to f32
/// (F32, BF16, F16, F64, I64, I32).
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let map = map_file(path)?;
    tensors(path, &map)?
        .into_iter()
        .map(|(name, dtype, shape, bytes)| {
            let mut data = vec![0f32; shape.iter().product()];
            convert(path, &name, dtype, bytes, &mut data)?;
            Ok((name, shape, data))
        })
        .collect()
}

/// Writes one safetensors file with every parameter of `table` under its HF name and shape.
pub fn save_params(path: &Path, table: &ParamTable, flat: &[f32], dtype: SaveDtype) -> Result<()> {
    if flat.len() != table.total {
        return Err(Error::invalid(
            "save_params",
            format!(
                "flat buffer has {} elements, the table {}",
                flat.len(),
                table.total
            ),
        ));
    }
    let dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::BF16 => Dtype::BF16,
    };
    let out = table.entries.iter().map(|e| {
        let data = &flat[e.offset..e.offset + e.len];
        (
            e.name.clone(),
            OutTensor {
                dtype,
                shape: e.shape.clone(),
                data,
            },
        )
    });
    write_atomic(path, out.collect())
}

/// Writes F32 tensors `(name, shape, data)` to one safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let mut out = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::invalid(
                "write_tensors",
                format!(
                    "tensor `{name}` has shape {shape:?} but {} elements",
                    data.len()
                ),
            ));
        }
        let t = OutTensor {
            dtype: Dtype::F32,
            shape: shape.clone(),
            data,
        };
        out.push((name.clone(), t));
    }
    write_atomic(path, out)
}

/// Memory-maps a whole file for reading.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!("file is {len} bytes, too short for a safetensors header"),
        ));
    }
    // SAFETY: the map is read-only and lives only while this function's caller reads it. Another
    // process truncating the file meanwhile could fault the reads, the accepted caveat of every
    // memory-mapped weight loader; nothing here writes through the map.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// One tensor of a file: name, dtype, shape and its little-endian bytes.
type RawTensor<'a> = (String, Dtype, Vec<usize>, &'a [u8]);

/// Parses the header of a safetensors file and returns its tensors in file order.
fn tensors<'a>(path: &Path, buf: &'a [u8]) -> Result<Vec<RawTensor<'a>>> {
    let (n, meta) = SafeTensors::read_metadata(buf).map_err(|e| header_error(path, buf, e))?;
    let data = buf.get(8 + n..).unwrap_or_default();
    let mut out = vec![];
    for name in meta.offset_keys() {
        let info = meta.info(&name).ok_or_else(|| {
            Error::format(path, format!("tensor `{name}` vanished from the header"))
        })?;
        let (start, end) = info.data_offsets;
        let bytes = data.get(start..end).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor `{name}`: data offsets run past the end of the file"),
            )
        })?;
        out.push((name, info.dtype, info.shape.clone(), bytes));
    }
    Ok(out)
}

/// Says in plain words what is wrong with a file whose header the safetensors crate rejected.
fn header_error(path: &Path, buf: &[u8], e: SafeTensorError) -> Error {
    let mut n_bytes = [0u8; 8];
    if let Some(b) = buf.get(..8) {
        n_bytes.copy_from_slice(b);
    }
    let n = u64::from_le_bytes(n_bytes);
    let len = buf.len() as u64;
    let header = buf.get(8..).and_then(|b| b.get(..usize::try_from(n).ok()?));
    let msg = match e {
        SafeTensorError::HeaderTooLarge => {
            format!("header length {n} is over the format's 100 MB limit: not a safetensors file")
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "header length {n} does not fit in the file ({len} bytes): truncated or not a safetensors file"
        ),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("header is not valid safetensors JSON ({e}): corrupt or not a safetensors file")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            let have = len.saturating_sub(8 + n);
            match header.and_then(declared_data_len) {
                Some(want) if want > have => format!(
                    "truncated: the header describes {want} bytes of tensor data, the file holds {have}"
                ),
                Some(want) => format!(
                    "the header describes {want} bytes of tensor data, the file holds {have}: corrupt file"
                ),
                None => format!("tensor data does not match the header: {e}"),
            }
        }
        e => format!("invalid safetensors header: {e}"),
    };
    Error::format(path, msg)
}

/// The end of the last tensor's data according to a header (only used for error messages).
fn declared_data_len(header: &[u8]) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    let ends = json
        .as_object()?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64());
    ends.max()
}

fn dtype_error(path: &Path, name: &str, dtype: Dtype) -> Error {
    Error::Dtype {
        path: path.to_path_buf(),
        name: name.to_string(),
        dtype: dtype.to_string(),
    }
}

/// Decodes little-endian `bytes` of `dtype` into `dst` (same number of elements).
fn convert(path: &Path, name: &str, dtype: Dtype, bytes: &[u8], dst: &mut [f32]) -> Result<()> {
    let width = match dtype {
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F64 | Dtype::I64 => 8,
        _ => return Err(dtype_error(path, name, dtype)),
    };
    if bytes.len() != dst.len() * width {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}`: {} bytes of data for {} elements of {dtype}",
                bytes.len(),
                dst.len()
            ),
        ));
    }
    match dtype {
        Dtype::F32 => decode(bytes, dst, f32::from_le_bytes),
        Dtype::BF16 => decode(bytes, dst, |b| bf16::from_le_bytes(b).to_f32()),
        Dtype::F16 => decode(bytes, dst, |b| f16::from_le_bytes(b).to_f32()),
        Dtype::F64 => decode(bytes, dst, |b| f64::from_le_bytes(b) as f32),
        Dtype::I64 => decode(bytes, dst, |b| i64::from_le_bytes(b) as f32),
        _ => decode(bytes, dst, |b| i32::from_le_bytes(b) as f32),
    }
    Ok(())
}

/// `dst[i] = f(bytes[N*i .. N*i+N])`, in parallel over large chunks.
fn decode<const N: usize>(bytes: &[u8], dst: &mut [f32], f: impl Fn([u8; N]) -> f32 + Sync) {
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * N))
        .for_each(|(d, s)| {
            for (x, b) in d.iter_mut().zip(s.chunks_exact(N)) {
                let mut a = [0u8; N];
                a.copy_from_slice(b);
                *x = f(a);
            }
        });
}

/// A tensor to write: f32 values stored as `dtype` (F32 or BF16), converted when written.
struct OutTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.dtype {
            Dtype::BF16 => self
                .data
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            _ if cfg!(target_endian = "little") => Cow::Borrowed(bytemuck::cast_slice(self.data)),
            _ => self.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn data_len(&self) -> usize {
        self.data.len() * if self.dtype == Dtype::BF16 { 2 } else { 4 }
    }
}

/// Writes `tensors` (with metadata `format: pt`, which transformers expects) to a temporary file
/// next to `path`, flushes it to disk and renames it to `path`.
fn write_atomic(path: &Path, tensors: Vec<(String, OutTensor<'_>)>) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::format(path, "not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(tensors, Some(meta), &tmp)
        .map_err(|e| match e {
            SafeTensorError::IoError(io) => Error::io(path, io),
            e => Error::format(path, format!("cannot serialize: {e}")),
        })
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(path, e))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
