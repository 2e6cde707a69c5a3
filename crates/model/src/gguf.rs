//! Reading GGUF, llama.cpp's single-file model format: the metadata, the tensor table and the
//! tensors themselves, dequantised to f32.
//!
//! The file is memory-mapped and every count, length and offset in it is checked against the
//! file's size before it is used, so a truncated or corrupt file is refused with the field
//! that gave it away instead of a panic or an allocation the size of a bogus count.
//!
//! Why not a crate: `ggml-quants` 0.1 does not implement Q4_K and Q6_K (the types of a real
//! Qwen2.5 GGUF; they panic there), `gguf-rs-lib` has no block decoders, and candle-core would bring a second
//! tensor library into the build for ~150 lines of decoding. The decoders are checked
//! against gguf-py's own numpy decoder on every type (`tests/fixtures/make_gguf.py`).

mod quants;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
pub use quants::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Far above any real model (a 70B GGUF has ~700 tensors and ~40 keys); a count beyond these
/// is corruption, refused before anything is allocated for it.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KEYS: u64 = 1 << 16;
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// A tensor's entry in the table: its shape in ggml order (`dims[0]` is the contiguous axis,
/// so a Hugging Face `[out, in]` weight is `[in, out]` here).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte range inside the file.
    start: usize,
    len: usize,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
    /// The shape as Hugging Face writes it (outermost axis first).
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: Mmap,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as `self`; a file truncated by another
        // process meanwhile is the same hazard every mmap-based loader (safetensors too) accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut reader = Reader {
            bytes: &map,
            pos: 0,
            path,
        };
        if reader.take(4, "magic")? != MAGIC {
            return Err(Error::weights(
                path,
                "not a GGUF file (it does not start with \"GGUF\")",
            ));
        }
        let version = reader.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::weights(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let tensor_count = reader.count("tensor_count", MAX_TENSORS)?;
        let key_count = reader.count("metadata_kv_count", MAX_KEYS)?;

        let mut metadata = BTreeMap::new();
        for index in 0..key_count {
            let key = reader.string(&format!("metadata key {index}"))?;
            let value = reader.value(&key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(Error::weights(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ));
                }
            },
        };

        let mut raw = Vec::with_capacity(tensor_count as usize);
        for index in 0..tensor_count {
            raw.push(reader.tensor_entry(index)?);
        }
        let data_start = (reader.pos as u64).div_ceil(alignment) * alignment;
        let tensors = raw
            .into_iter()
            .map(|entry| entry.locate(data_start, map.len() as u64, path))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's values as f32, in its own (row-major, outermost axis first) order.
    pub fn read_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = &self.map[info.start..info.start + info.len];
        quants::dequantize(info.ggml_type, bytes, info.element_count() as usize).map_err(|e| {
            Error::weights(
                &self.path,
                format!("tensor \"{}\" ({}): {e}", info.name, info.ggml_type.name()),
            )
        })
    }
}

/// A tensor entry as read, before its offset is checked against the file.
struct RawEntry {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
}

impl RawEntry {
    fn locate(self, data_start: u64, file_len: u64, path: &Path) -> Result<TensorInfo> {
        let here =
            |message: String| Error::weights(path, format!("tensor \"{}\": {message}", self.name));
        let ggml_type = GgmlType::from_id(self.type_id).ok_or_else(|| {
            here(format!(
                "unknown ggml type id {} (this file may need a newer safeprobe)",
                self.type_id
            ))
        })?;
        let elements = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| here(format!("dimensions {:?} overflow", self.dims)))?;
        let len = ggml_type
            .byte_len(elements, self.dims.first().copied().unwrap_or(1))
            .map_err(here)?;
        let start = data_start
            .checked_add(self.offset)
            .filter(|s| s.checked_add(len).is_some_and(|end| end <= file_len))
            .ok_or_else(|| {
                here(format!(
                    "its data (offset {}, {len} bytes) runs past the end of the file ({file_len} bytes): the file is truncated",
                    self.offset
                ))
            })?;
        Ok(TensorInfo {
            name: self.name,
            dims: self.dims,
            ggml_type,
            start: start as usize,
            len: len as usize,
        })
    }
}

/// A bounds-checked little-endian cursor over the mapped file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(Error::weights(
                self.path,
                format!(
                    "truncated at byte {} while reading {what} ({n} bytes needed, {remaining} left)",
                    self.pos
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn count(&mut self, what: &str, max: u64) -> Result<u64> {
        let n = self.u64(what)?;
        if n > max {
            return Err(Error::weights(
                self.path,
                format!("{what} is {n}, more than any model has ({max}): the file is corrupt"),
            ));
        }
        Ok(n)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::weights(self.path, format!("{what}: the string is not valid UTF-8"))
        })
    }

    fn value(&mut self, key: &str, depth: u32) -> Result<Value> {
        let type_id = self.u32(key)?;
        self.typed_value(type_id, key, depth)
    }

    fn typed_value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth < 2 => {
                let item_type = self.u32(key)?;
                let len = self.u64(key)?;
                // Every item takes at least one byte, so a length beyond what is left of the
                // file is corruption: refuse it before reserving memory for it.
                let remaining = (self.bytes.len() - self.pos) as u64;
                if len > remaining {
                    return Err(Error::weights(
                        self.path,
                        format!(
                            "{key}: array of {len} items in the {remaining} bytes left: the file is truncated or corrupt"
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.typed_value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::weights(
                    self.path,
                    format!("{key}: unknown metadata value type {other}"),
                ));
            }
        })
    }

    fn tensor_entry(&mut self, index: u64) -> Result<RawEntry> {
        let name = self.string(&format!("the name of tensor {index}"))?;
        let what = format!("tensor \"{name}\"");
        let n_dims = self.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(Error::weights(
                self.path,
                format!("{what}: {n_dims} dimensions (1 to {MAX_DIMS} are valid)"),
            ));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64(&what))
            .collect::<Result<Vec<_>>>()?;
        let type_id = self.u32(&what)?;
        let offset = self.u64(&what)?;
        Ok(RawEntry {
            name,
            dims,
            type_id,
            offset,
        })
    }
}
