//! Reading and writing safetensors checkpoints.
//!
//! Files are memory-mapped and each tensor is converted to f32 on its own, straight into the
//! device tensor, so loading never holds a second full copy of the weights in memory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result, read_json};

/// One or more safetensors files and the index of which tensor lives where.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    location: BTreeMap<String, usize>,
}

impl SafetensorsFiles {
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_checkpoint(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let json: serde_json::Value = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::weights(&index, "missing object \"weight_map\""))?;
            let mut shards: Vec<String> = Vec::new();
            let mut wanted: BTreeMap<String, String> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::weights(
                        &index,
                        format!("weight_map[\"{name}\"] must be a file name"),
                    )
                })?;
                if !shards.iter().any(|s| s == file) {
                    shards.push(file.to_string());
                }
                wanted.insert(name.clone(), file.to_string());
            }
            let files = Self::open_files(&shards.iter().map(|s| dir.join(s)).collect::<Vec<_>>())?;
            // The index is the source of truth: every tensor it names must be in its shard.
            for (name, file) in wanted {
                let shard = shards.iter().position(|s| *s == file).unwrap();
                if files.location.get(&name) != Some(&shard) {
                    return Err(Error::weights(
                        dir.join(&file),
                        format!("tensor \"{name}\" listed in {} is missing", index.display()),
                    ));
                }
            }
            Ok(files)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(Error::weights(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ))
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut location = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on the
            // user not truncating a checkpoint while it is being read.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::weights(
                    path,
                    format!("not a valid safetensors file ({e}); is it truncated?"),
                )
            })?;
            for name in tensors.names() {
                location.insert(name.to_string(), i);
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, location })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Shape and dtype of a tensor without reading its data.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, Dtype)> {
        let (_, view) = self.view(name).ok()?;
        Some((view.shape().to_vec(), view.dtype()))
    }

    fn view(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let i = *self.location.get(name).ok_or_else(|| {
            Error::weights(&self.files[0].0, format!("missing tensor \"{name}\""))
        })?;
        let (path, mmap) = &self.files[i];
        let tensors =
            SafeTensors::deserialize(mmap).map_err(|e| Error::weights(path, e.to_string()))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| Error::weights(path, format!("tensor \"{name}\": {e}")))?;
        Ok((path, view))
    }

    /// A tensor converted to f32 on the host, checked against the shape the model expects.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let (path, view) = self.view(name)?;
        if view.shape() != expected_shape {
            return Err(Error::weights(
                path,
                format!(
                    "tensor \"{name}\" has shape {:?}, expected {:?}",
                    view.shape(),
                    expected_shape
                ),
            ));
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::weights(
                    path,
                    format!(
                        "tensor \"{name}\" has dtype {other:?}; only BF16, F16 and F32 are supported"
                    ),
                ));
            }
        };
        Ok(values)
    }

    /// A 2-D tensor on the device, optionally transposed (Hugging Face stores linear weights
    /// as [out, in]; we compute `x · W` with W as [in, out]).
    pub fn tensor2(
        &self,
        name: &str,
        shape: [usize; 2],
        transpose: bool,
        device: &Device,
    ) -> Result<Tensor<2>> {
        let values = self.read_f32(name, &shape)?;
        Ok(if transpose {
            let [rows, cols] = shape;
            Tensor::from_data(
                TensorData::new(transposed(&values, rows, cols), [cols, rows]),
                device,
            )
        } else {
            Tensor::from_data(TensorData::new(values, shape), device)
        })
    }

    pub fn tensor1(&self, name: &str, len: usize, device: &Device) -> Result<Tensor<1>> {
        let values = self.read_f32(name, &[len])?;
        Ok(Tensor::from_data(TensorData::new(values, [len]), device))
    }
}

/// A row-major [rows, cols] matrix as row-major [cols, rows].
fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Output dtype of written checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

impl SaveDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(Error::Invalid(format!(
                "--dtype \"{other}\": expected bf16 or f32"
            ))),
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// A host tensor waiting to be written.
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    /// Reads a device tensor back, transposing a 2-D [in, out] weight to Hugging Face's [out, in].
    pub fn from_tensor2(tensor: Tensor<2>, transpose: bool) -> Self {
        let [rows, cols] = tensor.dims();
        let values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 tensor data");
        if transpose {
            Self {
                shape: vec![cols, rows],
                values: transposed(&values, rows, cols),
            }
        } else {
            Self {
                shape: vec![rows, cols],
                values,
            }
        }
    }
    pub fn from_tensor1(tensor: Tensor<1>) -> Self {
        let [n] = tensor.dims();
        Self {
            shape: vec![n],
            values: tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32 tensor data"),
        }
    }
}

/// Writes a safetensors file atomically (temporary file, then rename), so an interrupted
/// save never leaves a half-written checkpoint where a good one was.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: SaveDtype,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let entries: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.shape.clone()))
        .collect();
    write_safetensors_streaming(path, &entries, dtype, metadata, |i| {
        Ok(std::borrow::Cow::Borrowed(&tensors[&entries[i].0].values))
    })
}

/// `write_safetensors` for tensors made one at a time: `values(i)` gives the f32 values of
/// `entries[i]` (name, shape) when its turn comes, so that no more than one tensor and its
/// encoding are in memory at once (an import dequantising a whole model would otherwise hold
/// it twice over).
pub fn write_safetensors_streaming<'a>(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    dtype: SaveDtype,
    metadata: Option<std::collections::HashMap<String, String>>,
    mut values: impl FnMut(usize) -> Result<std::borrow::Cow<'a, [f32]>>,
) -> Result<()> {
    let (st_dtype, width) = match dtype {
        SaveDtype::F32 => ("F32", 4),
        SaveDtype::Bf16 => ("BF16", 2),
    };
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, shape) in entries {
        let end = offset + shape.iter().product::<usize>() * width;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    // The data start 8-byte aligned, as the format's own writer pads them.
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomic_with(path, |out, tmp| {
        let io = |e| Error::io(tmp, e);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header).map_err(io)?;
        for (i, (name, shape)) in entries.iter().enumerate() {
            let data = values(i)?;
            if data.len() != shape.iter().product::<usize>() {
                return Err(Error::weights(
                    path,
                    format!(
                        "tensor \"{name}\": {} values for shape {shape:?}",
                        data.len()
                    ),
                ));
            }
            let bytes: Vec<u8> = match dtype {
                SaveDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SaveDtype::Bf16 => data
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            out.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })
}

/// Write to `<path>.tmp` and rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out, tmp| {
        out.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// `write_atomic` for content written piece by piece: `write` fills the temporary file
/// (buffered; its path is given for errors), which is synced and renamed over `path` only when
/// it succeeded, and removed when it failed.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>, &Path) -> Result<()>,
) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let written = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut out, &tmp)?;
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
