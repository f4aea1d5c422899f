//! GGUF, llama.cpp's single-file model format (versions 2 and 3): metadata, tensor infos, the
//! weights of a Llama model dequantised to f32 in our flat HF layout, and its BPE tokenizer.
//!
//! Layout, all little-endian: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count;
//! the metadata (key: u64 length + UTF-8 bytes; u32 value type; the value; an array is u32
//! element type, u64 count, the elements); per tensor: name, u32 n_dims, n_dims x u64 `ne`
//! (innermost first: `ne[0]` is the row length, so an HF `[out, in]` matrix has `ne = [in, out]`),
//! u32 ggml type, u64 offset into the data section. The data section starts at the first multiple
//! of `general.alignment` (default 32) after the tensor infos.
//!
//! llama.cpp's converter reorders the rows of `q_proj` and `k_proj` for its RoPE, which rotates
//! adjacent pairs: within each head, row `2i + j` of the file holds HF row `j*HS/2 + i`
//! (i < HS/2, j < 2). Our RoPE is HF's rotate-half, so the loader puts the rows back.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use super::{Model, ModelConfig, ParamTable, Tokenizer};
use crate::device::Device;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for arrays of arrays (real files use none).
const MAX_ARRAY_DEPTH: usize = 8;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any number (integers included).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            Value::I8(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            Value::I64(x) => Some(x as f64),
            ref v => v.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Shows arrays of more than 8 elements as their first 8 and a count.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(x) => write!(f, "{x}"),
            Value::I8(x) => write!(f, "{x}"),
            Value::U16(x) => write!(f, "{x}"),
            Value::I16(x) => write!(f, "{x}"),
            Value::U32(x) => write!(f, "{x}"),
            Value::I32(x) => write!(f, "{x}"),
            Value::F32(x) => write!(f, "{x}"),
            Value::Bool(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::U64(x) => write!(f, "{x}"),
            Value::I64(x) => write!(f, "{x}"),
            Value::F64(x) => write!(f, "{x}"),
            Value::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().take(8).enumerate() {
                    write!(f, "{}{v}", if i > 0 { ", " } else { "" })?;
                }
                if a.len() > 8 {
                    write!(f, ", ... ({} items)", a.len())?;
                }
                write!(f, "]")
            }
        }
    }
}

/// A ggml tensor type, by its number in the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const BF16: Self = Self(30);

    /// The type's name in ggml (`Q4_K`, ...), or `type N` for a number it does not know.
    pub fn name(self) -> String {
        const NAMES: [&str; 36] = [
            "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
            "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "", "",
            "", "TQ1_0", "TQ2_0",
        ];
        match NAMES.get(self.0 as usize) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("type {}", self.0),
        }
    }

    /// Elements and bytes of one block, for the types whose layout we know.
    pub fn block(self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 | 26 => (1, 4),      // F32, I32
            1 | 25 | 30 => (1, 2), // F16, I16, BF16
            24 => (1, 1),          // I8
            27 | 28 => (1, 8),     // I64, F64
            2 => (32, 18),         // Q4_0
            3 => (32, 20),         // Q4_1
            6 => (32, 22),         // Q5_0
            7 => (32, 24),         // Q5_1
            8 => (32, 34),         // Q8_0
            9 => (32, 36),         // Q8_1
            10 => (256, 84),       // Q2_K
            11 => (256, 110),      // Q3_K
            12 => (256, 144),      // Q4_K
            13 => (256, 176),      // Q5_K
            14 => (256, 210),      // Q6_K
            15 => (256, 292),      // Q8_K
            _ => return None,
        })
    }

    /// Whether `dequantize` handles this type.
    pub fn supported(self) -> bool {
        [
            Self::F32,
            Self::F16,
            Self::BF16,
            Self::Q8_0,
            Self::Q4_0,
            Self::Q4_1,
        ]
        .contains(&self)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One tensor of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// `ne`, innermost first (`dims[0]` is the row length)
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Number of elements.
    pub elements: u64,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data, where the type's layout is known.
    pub bytes: Option<u64>,
}

impl TensorInfo {
    /// The shape in HF (outermost-first) order: `dims` reversed.
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file: its header, and the memory map that holds the tensor data.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    /// Key/values in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    map: memmap2::Mmap,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The values of tensor `name` as f32, in file order (`dims[0]` fastest).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        // (checked first: only a supported type's size was checked against the file)
        if !t.ty.supported() {
            return Err(self.unsupported(t));
        }
        let mut out = vec![0f32; t.elements as usize];
        self.dequantize(t, &mut out)?;
        Ok(out)
    }

    /// Decodes tensor `t` into `dst` (its number of elements).
    fn dequantize(&self, t: &TensorInfo, dst: &mut [f32]) -> Result<()> {
        let (bytes, (per_block, _)) = t
            .bytes
            .zip(t.ty.block())
            .filter(|_| t.ty.supported())
            .ok_or_else(|| self.unsupported(t))?;
        if dst.len() as u64 != t.elements {
            return Err(Error::invalid(
                "gguf",
                format!(
                    "tensor `{}`: {} elements, buffer {}",
                    t.name,
                    t.elements,
                    dst.len()
                ),
            ));
        }
        // read_gguf checked that the data lies inside the file.
        let start = t.offset as usize;
        let src = self.map.get(start..start + bytes as usize).ok_or_else(|| {
            self.err(format!(
                "tensor `{}`: data past the end of the file",
                t.name
            ))
        })?;
        let half = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        match t.ty {
            GgmlType::F32 => blocks::<4>(src, dst, 1, |b, o| o[0] = f32::from_le_bytes(*b)),
            GgmlType::F16 => blocks::<2>(src, dst, 1, |b, o| o[0] = f16::from_le_bytes(*b).into()),
            GgmlType::BF16 => {
                blocks::<2>(src, dst, 1, |b, o| o[0] = bf16::from_le_bytes(*b).into())
            }
            // Q8_0: f16 scale d, 32 x i8 q; x = d*q
            GgmlType::Q8_0 => blocks::<34>(src, dst, per_block as usize, |b, o| {
                let d = half(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = d * f32::from(q as i8);
                }
            }),
            // Q4_0: f16 d, 16 bytes; low nibbles are elements 0..16, high ones 16..32; x = d*(q-8)
            GgmlType::Q4_0 => blocks::<18>(src, dst, per_block as usize, |b, o| {
                let d = half(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
                    *l = d * f32::from(i16::from(q & 15) - 8);
                    *h = d * f32::from(i16::from(q >> 4) - 8);
                }
            }),
            // Q4_1: f16 d, f16 m, 16 bytes (nibbles as Q4_0); x = d*q + m
            _ => blocks::<20>(src, dst, per_block as usize, |b, o| {
                let (d, m) = (half(b, 0), half(b, 2));
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
                    *l = d * f32::from(q & 15) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }),
        }
        Ok(())
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        self.err(format!(
            "tensor `{}` has type {}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
            t.name, t.ty
        ))
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(&self.path, msg)
    }

    fn key_err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.path, key, msg)
    }

    /// A non-negative integer value.
    fn usize_at(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        self.key_err(key, format!("expected a non-negative integer, found {v}"))
                    })
            })
            .transpose()
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize_at(key)?
            .ok_or_else(|| self.key_err(key, "missing"))
    }

    fn f32_at(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.key_err(key, format!("expected a number, found {v}")))
            })
            .transpose()
    }

    fn str_at(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.key_err(key, format!("expected a string, found {v}")))
            })
            .transpose()
    }

    fn bool_at(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.key_err(key, format!("expected true or false, found {v}")))
            })
            .transpose()
    }

    /// An array whose elements `f` converts, or `None` where the key is absent.
    fn array_at<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let a = v
            .as_array()
            .ok_or_else(|| self.key_err(key, format!("expected an array of {what}")))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                f(x).ok_or_else(|| self.key_err(key, format!("item {i} is {x}, expected {what}")))
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

/// `dst[k*E..(k+1)*E] = f(src[k*B..(k+1)*B])` for every block k, in parallel over large chunks.
fn blocks<const B: usize>(
    src: &[u8],
    dst: &mut [f32],
    per_block: usize,
    f: impl Fn(&[u8; B], &mut [f32]) + Sync,
) {
    const CHUNK: usize = 4096;
    dst.par_chunks_mut(CHUNK * per_block)
        .zip(src.par_chunks(CHUNK * B))
        .for_each(|(d, s)| {
            for (o, b) in d.chunks_exact_mut(per_block).zip(s.chunks_exact(B)) {
                if let Ok(b) = <&[u8; B]>::try_from(b) {
                    f(b, o);
                }
            }
        });
}

/// Parses the header of a GGUF file and checks that every tensor's data lies inside the file.
pub fn read_gguf(path: &Path) -> Result<Gguf> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 4 {
        return Err(Error::format(
            path,
            format!("file is {len} bytes: truncated or not a GGUF file"),
        ));
    }
    // SAFETY: the map is read-only and owned by the returned `Gguf`, which only reads it. Another
    // process truncating the file meanwhile could fault the reads, the accepted caveat of every
    // memory-mapped weight loader; nothing here writes through the map.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let mut r = Reader {
        buf: &map,
        pos: 0,
        path,
        what: "the magic number".into(),
    };
    let magic = r.take(4)?;
    if magic != MAGIC {
        return Err(Error::format(
            path,
            format!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file"),
        ));
    }
    r.what = "the version".into();
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::format(
            path,
            format!("GGUF version {version} is not supported (only 2 and 3)"),
        ));
    }
    r.what = "the tensor count".into();
    let n_tensors = r.u64()?;
    r.what = "the metadata count".into();
    let n_kv = r.u64()?;
    let mut metadata: Vec<(String, Value)> = vec![];
    for i in 0..n_kv {
        r.what = format!("metadata key {i}");
        let key = r.string()?;
        r.what = format!("metadata `{key}`");
        let ty = r.u32()?;
        let value = r.value(ty, 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(Error::format(
                path,
                format!("metadata key `{key}` appears twice"),
            ));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(Error::config(
                path,
                "general.alignment",
                format!("{v} is not a power of two (u32)"),
            ))
        }
    };
    let mut tensors: Vec<TensorInfo> = vec![];
    let mut seen: HashSet<String> = HashSet::new();
    for i in 0..n_tensors {
        r.what = format!("tensor info {i}");
        let name = r.string()?;
        r.what = format!("tensor info {i} (`{name}`)");
        let n_dims = r.u32()? as usize;
        if n_dims > MAX_DIMS {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"),
            ));
        }
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let ty = GgmlType(r.u32()?);
        let rel = r.u64()?;
        if !seen.insert(name.clone()) {
            return Err(Error::format(
                path,
                format!("tensor `{name}` appears twice"),
            ));
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                Error::format(path, format!("tensor `{name}`: dims {dims:?} overflow"))
            })?;
        let bytes = match ty.block() {
            None => None,
            Some((per, size)) => {
                // a scalar (no dims) is one row of one element
                let row = dims.first().copied().unwrap_or(1);
                if row % per != 0 {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}`: row length {row} is not a multiple of {ty}'s block of {per}"),
                    ));
                }
                let bytes = (elements / per).checked_mul(size);
                Some(bytes.ok_or_else(|| {
                    Error::format(path, format!("tensor `{name}`: dims {dims:?} overflow"))
                })?)
            }
        };
        if rel % alignment != 0 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}`: offset {rel} is not a multiple of the alignment {alignment}"
                ),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            elements,
            offset: rel,
            bytes,
        });
    }
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    for t in &mut tensors {
        t.offset = t.offset.saturating_add(data_offset);
        let end = t.offset.saturating_add(t.bytes.unwrap_or(0));
        if end > len {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{}`: data [{}, {end}) runs past the end of the file ({len} bytes): truncated file",
                    t.name, t.offset
                ),
            ));
        }
    }
    Ok(Gguf {
        path: path.to_path_buf(),
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        map,
    })
}

/// A cursor over the header; errors name the file and what was being read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    what: String,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self) -> Error {
        Error::format(
            self.path,
            format!(
                "truncated: the file ends at byte {} while reading {}",
                self.buf.len(),
                self.what
            ),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.truncated())?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::format(
                self.path,
                format!("{}: string is not valid UTF-8", self.what),
            )
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [b] => {
                    return Err(Error::format(
                        self.path,
                        format!("{}: bool byte is {b} (not 0 or 1)", self.what),
                    ))
                }
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::format(
                        self.path,
                        format!("{}: arrays nested over {MAX_ARRAY_DEPTH} deep", self.what),
                    ));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                // every element takes at least one byte
                if n > self.remaining() as u64 {
                    return Err(self.truncated());
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => {
                return Err(Error::format(
                    self.path,
                    format!("{}: unknown value type {t}", self.what),
                ));
            }
        })
    }
}

/// The Llama architecture described by the metadata. The embeddings are tied when the file has
/// no `output.weight`.
pub fn gguf_config(g: &Gguf) -> Result<ModelConfig> {
    let arch_key = "general.architecture";
    let arch = g
        .str_at(arch_key)?
        .ok_or_else(|| g.key_err(arch_key, "missing"))?;
    if arch != "llama" {
        return Err(g.key_err(
            arch_key,
            format!("architecture {arch:?} is not supported (only \"llama\")"),
        ));
    }
    if let Some(n) = g.usize_at("llama.expert_count")? {
        if n > 0 {
            return Err(g.key_err(
                "llama.expert_count",
                format!("{n} experts: mixture-of-experts models are not supported"),
            ));
        }
    }
    let scaling = g.str_at("llama.rope.scaling.type")?;
    if let Some(kind) = scaling.filter(|&s| s != "none") {
        return Err(g.key_err(
            "llama.rope.scaling.type",
            format!("RoPE scaling {kind:?} is not supported (only \"none\")"),
        ));
    }
    if scaling.is_none() {
        for key in ["llama.rope.scale_linear", "llama.rope.scaling.factor"] {
            if let Some(x) = g.f32_at(key)?.filter(|&x| x != 1.0) {
                return Err(g.key_err(key, format!("RoPE scaling by {x} is not supported")));
            }
        }
    }
    let c = g.req_usize("llama.embedding_length")?;
    let nh = g.req_usize("llama.attention.head_count")?;
    let nkv = g.usize_at("llama.attention.head_count_kv")?.unwrap_or(nh);
    let layers = g.req_usize("llama.block_count")?;
    let ffn = g.req_usize("llama.feed_forward_length")?;
    for (key, v) in [
        ("llama.block_count", layers),
        ("llama.embedding_length", c),
        ("llama.feed_forward_length", ffn),
        ("llama.attention.head_count", nh),
        ("llama.attention.head_count_kv", nkv),
    ] {
        if v == 0 {
            return Err(g.key_err(key, "must be positive"));
        }
    }
    if nh % nkv != 0 {
        return Err(g.key_err(
            "llama.attention.head_count_kv",
            format!("{nkv} does not divide head_count {nh}"),
        ));
    }
    let head_dim = match g.usize_at("llama.attention.key_length")? {
        Some(hs) => hs,
        None if c % nh == 0 => c / nh,
        None => {
            return Err(g.key_err(
                "llama.attention.head_count",
                format!("{nh} does not divide embedding_length {c}"),
            ))
        }
    };
    for key in ["llama.attention.value_length", "llama.rope.dimension_count"] {
        if let Some(n) = g.usize_at(key)?.filter(|&n| n != head_dim) {
            return Err(g.key_err(key, format!("{n} differs from the head size {head_dim}")));
        }
    }
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(g.key_err(
            "llama.attention.key_length",
            format!("head size {head_dim} is not a positive even number"),
        ));
    }
    let eps_key = "llama.attention.layer_norm_rms_epsilon";
    let eps = g
        .f32_at(eps_key)?
        .ok_or_else(|| g.key_err(eps_key, "missing"))?;
    if eps.is_nan() || eps <= 0.0 {
        return Err(g.key_err(eps_key, "must be positive"));
    }
    let theta = g.f32_at("llama.rope.freq_base")?.unwrap_or(10000.0);
    if theta.is_nan() || theta <= 0.0 {
        return Err(g.key_err("llama.rope.freq_base", "must be positive"));
    }
    let n_tokens = g
        .get("tokenizer.ggml.tokens")
        .map(|v| {
            v.as_array()
                .map(<[Value]>::len)
                .ok_or_else(|| g.key_err("tokenizer.ggml.tokens", "expected an array of strings"))
        })
        .transpose()?;
    let vocab_size = match (g.usize_at("llama.vocab_size")?, n_tokens) {
        (Some(v), Some(n)) if n > v => {
            return Err(g.key_err(
                "llama.vocab_size",
                format!("{v} is below the {n} tokens of tokenizer.ggml.tokens"),
            ))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => {
            return Err(g.key_err("llama.vocab_size", "missing, and no tokenizer.ggml.tokens"))
        }
    };
    if vocab_size == 0 {
        return Err(g.key_err("llama.vocab_size", "must be positive"));
    }
    Ok(ModelConfig {
        model_type: "llama".into(),
        vocab_size,
        hidden_size: c,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: nh,
        num_key_value_heads: nkv,
        head_dim,
        rms_norm_eps: eps,
        rope_theta: theta,
        max_position_embeddings: g.req_usize("llama.context_length")?,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        bos_token_id: g.usize_at("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_token_ids: g
            .usize_at("tokenizer.ggml.eos_token_id")?
            .map(|x| x as u32)
            .into_iter()
            .collect(),
    })
}

/// llama.cpp names of the parameters outside the blocks, and HF's.
const TOP_NAMES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// llama.cpp names of a block's parameters (`blk.N.<name>.weight`), and HF's
/// (`model.layers.N.<name>.weight`).
const BLOCK_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a weight name through `TOP_NAMES`/`BLOCK_NAMES`, llama.cpp -> HF (`to_hf`) or back.
fn map_name(name: &str, to_hf: bool) -> Option<String> {
    let (blk, out_blk) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let pick = |pair: &(&'static str, &'static str)| if to_hf { *pair } else { (pair.1, pair.0) };
    let stem = name.strip_suffix(".weight")?;
    if let Some((_, to)) = TOP_NAMES.iter().map(pick).find(|(from, _)| *from == stem) {
        return Some(format!("{to}.weight"));
    }
    let (layer, part) = stem.strip_prefix(blk)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = BLOCK_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == part)?;
    Some(format!("{out_blk}{layer}.{to}.weight"))
}

/// Every parameter of `cfg`, dequantised into one flat buffer laid out as
/// `ParamTable::for_config(cfg)`, with the q/k rows put back in HF order.
pub fn gguf_params(g: &Gguf, cfg: &ModelConfig) -> Result<Vec<f32>> {
    // Every supported type takes at least half a byte per value: refuse a config too big for
    // the file before allocating its buffer.
    let file_len = g.map.len() as u64;
    let needed = param_count(cfg);
    if needed.is_none_or(|n| n as u64 / 2 > file_len) {
        return Err(g.err(format!(
            "the metadata describes a model of {} parameters, more than {file_len} bytes can hold",
            needed.map_or("too many".into(), |n| n.to_string())
        )));
    }
    let table = ParamTable::for_config(cfg);
    let mut flat = vec![0f32; table.total];
    let mut loaded = vec![false; table.entries.len()];
    for t in &g.tensors {
        let extra = || Error::ExtraTensor {
            path: g.path.clone(),
            name: t.name.clone(),
        };
        let hf = map_name(&t.name, true).ok_or_else(extra)?;
        let i = table
            .entries
            .iter()
            .position(|e| e.name == hf)
            .ok_or_else(extra)?;
        let e = &table.entries[i];
        let got = t.hf_shape();
        if got != e.shape {
            return Err(Error::Shape {
                path: g.path.clone(),
                name: t.name.clone(),
                expected: e.shape.clone(),
                got,
            });
        }
        let dst = &mut flat[e.offset..e.offset + e.len];
        let heads = if hf.ends_with("q_proj.weight") {
            cfg.num_attention_heads
        } else if hf.ends_with("k_proj.weight") {
            cfg.num_key_value_heads
        } else {
            0
        };
        if heads == 0 {
            g.dequantize(t, dst)?;
        } else {
            let mut rows = vec![0f32; e.len];
            g.dequantize(t, &mut rows)?;
            unpermute_rows(&rows, dst, heads, cfg.head_dim, cfg.hidden_size);
        }
        loaded[i] = true;
    }
    if let Some(i) = loaded.iter().position(|&l| !l) {
        return Err(Error::MissingTensor {
            path: g.path.clone(),
            name: map_name(&table.entries[i].name, false)
                .unwrap_or_else(|| table.entries[i].name.clone()),
        });
    }
    Ok(flat)
}

/// Number of parameters of `cfg` (as `ParamTable::for_config` lays them out), unless it
/// overflows.
fn param_count(cfg: &ModelConfig) -> Option<usize> {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_attention_heads.checked_mul(cfg.head_dim)?,
        cfg.num_key_value_heads.checked_mul(cfg.head_dim)?,
    );
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    let layer = [2 * qd, 2 * kvd, 3 * f, 2]
        .iter()
        .try_fold(0usize, |n, &m| n.checked_add(m.checked_mul(c)?))?;
    cfg.vocab_size
        .checked_mul(c)?
        .checked_mul(heads)?
        .checked_add(layer.checked_mul(cfg.num_hidden_layers)?)?
        .checked_add(c)
}

/// Puts the converter's q/k rows back in HF order: within each of `heads` heads of `hs` rows of
/// length `row`, file row `2i + j` is HF row `j*hs/2 + i`.
fn unpermute_rows(src: &[f32], dst: &mut [f32], heads: usize, hs: usize, row: usize) {
    let half = hs / 2;
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let s = (h * hs + 2 * i + j) * row;
                let d = (h * hs + j * half + i) * row;
                dst[d..d + row].copy_from_slice(&src[s..s + row]);
            }
        }
    }
}

/// The HF twin of llama.cpp's pre-tokenizer `tokenizer.ggml.pre`: "gpt2" is GPT-2's regex
/// split (HF's ByteLevel with its regex); "smollm" and "starcoder" first make every digit its own
/// piece (HF's Sequence[Digits(individual), ByteLevel], as SmolLM2's tokenizer.json has it).
fn pre_tokenizer(g: &Gguf) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match g.str_at("tokenizer.ggml.pre")? {
        None | Some("gpt2") => Ok(byte_level.into()),
        Some("smollm" | "starcoder") => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
        }
        Some(other) => Err(g.key_err(
            "tokenizer.ggml.pre",
            format!("pre-tokenizer {other:?} is not supported (only \"gpt2\", \"smollm\", \"starcoder\")"),
        )),
    }
}

/// The tokenizer in the metadata: a GPT-2-style byte-level BPE (`tokenizer.ggml.model` "gpt2")
/// with its control tokens (`token_type` 3) as special tokens.
pub fn gguf_tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model_key = "tokenizer.ggml.model";
    let model = g
        .str_at(model_key)?
        .ok_or_else(|| g.key_err(model_key, "missing: the file holds no tokenizer"))?;
    if model != "gpt2" {
        return Err(g.key_err(
            model_key,
            format!("tokenizer model {model:?} is not supported (only \"gpt2\", byte-level BPE)"),
        ));
    }
    let tokens_key = "tokenizer.ggml.tokens";
    let tokens = g
        .array_at(tokens_key, "strings", |v| v.as_str().map(str::to_string))?
        .ok_or_else(|| g.key_err(tokens_key, "missing"))?;
    let merges_key = "tokenizer.ggml.merges";
    let merges = g
        .array_at(merges_key, "strings", |v| v.as_str().map(str::to_string))?
        .ok_or_else(|| g.key_err(merges_key, "missing"))?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    g.key_err(
                        merges_key,
                        format!("item {i} ({m:?}) is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let types_key = "tokenizer.ggml.token_type";
    let types = g
        .array_at(types_key, "integers", Value::as_u64)?
        .unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(g.key_err(
            types_key,
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        // a repeated token string keeps its first id
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| g.key_err(merges_key, format!("cannot build the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(g)?));
    inner.with_decoder(Some(ByteLevel::default()));
    // 3 = control tokens (special), 4 = user-defined tokens (matched whole, kept when decoding)
    let added = |kind: u64| {
        tokens
            .iter()
            .zip(&types)
            .filter(move |(_, &t)| t == kind)
            .map(move |(s, _)| AddedToken::from(s.clone(), kind == 3))
    };
    inner
        .add_special_tokens(added(3))
        .and_then(|_| inner.add_tokens(added(4)))
        .map_err(|e| g.key_err(types_key, format!("cannot add the special tokens: {e}")))?;
    let token_at = |key: &str| -> Result<Option<(String, u32)>> {
        match g.usize_at(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .map(|t| Some((t.clone(), id as u32)))
                .ok_or_else(|| {
                    g.key_err(
                        key,
                        format!("token id {id} is past the {} tokens", tokens.len()),
                    )
                }),
        }
    };
    // BOS/EOS added around each sequence when the file asks for it
    let mut ends = vec![];
    for (flag, key) in [
        (
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id",
        ),
        (
            "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.eos_token_id",
        ),
    ] {
        let wanted = g.bool_at(flag)?.unwrap_or(false);
        let token = token_at(key)?;
        ends.push(match (wanted, token) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => return Err(g.key_err(key, format!("missing, but {flag} is true"))),
        });
    }
    if let [bos, eos] = &ends[..] {
        if bos.is_some() || eos.is_some() {
            inner.with_post_processor(Some(template(g, bos, eos)?));
        }
    }
    Ok(Tokenizer::from_tokenizers(inner, g.path.clone()))
}

/// The post-processor that puts `bos` before and `eos` after each sequence (of a pair too).
fn template(
    g: &Gguf,
    bos: &Option<(String, u32)>,
    eos: &Option<(String, u32)>,
) -> Result<TemplateProcessing> {
    let (b, e) = (bos.as_ref().map(|t| &t.0), eos.as_ref().map(|t| &t.0));
    let seq = |piece: &str, type_id: &str| {
        let mut parts: Vec<String> = b.iter().map(|t| format!("{t}{type_id}")).collect();
        parts.push(format!("{piece}{type_id}"));
        parts.extend(e.iter().map(|t| format!("{t}{type_id}")));
        parts.join(" ")
    };
    let fail = |e: String| {
        g.key_err(
            "tokenizer.ggml.add_bos_token",
            format!("cannot build the BOS/EOS template: {e}"),
        )
    };
    TemplateProcessing::builder()
        .try_single(seq("$A", ""))
        .map_err(fail)?
        .try_pair(format!("{} {}", seq("$A", ""), seq("$B", ":1")))
        .map_err(fail)?
        .special_tokens(bos.iter().chain(eos).cloned().collect::<Vec<_>>())
        .build()
        .map_err(|e| fail(e.to_string()))
}

/// Loads a Llama model and its tokenizer from one GGUF file.
pub fn load_gguf<D: Device>(dev: &D, path: &Path) -> Result<(Model<D>, Tokenizer)> {
    let g = read_gguf(path)?;
    let cfg = gguf_config(&g)?;
    let tokenizer = gguf_tokenizer(&g)?;
    let flat = gguf_params(&g, &cfg)?;
    Ok((Model::from_host(dev, cfg, &flat)?, tokenizer))
}
