//! `safeprobe import`: a GGUF file to a Hugging Face checkpoint folder that safeprobe (and
//! `transformers`) loads: `config.json` from the metadata, the tensors dequantised into
//! `model.safetensors`, and the tokenizer rebuilt from `tokenizer.ggml.*`.
//!
//! The mapping is the inverse of llama.cpp's `convert_hf_to_gguf.py` for qwen2, qwen3 and
//! llama: the same tensor names and token types; llama's q and k rows back from llama.cpp's
//! rotary layout; llama3 rope scaling back from the `rope_freqs` factors the converter stores.
//! Whatever it cannot map (another architecture, another tokenizer, another rope scaling, an
//! unknown tensor) is refused by name, never guessed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json, json};

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo, Value};
use crate::weights::{SaveDtype, write_atomic, write_safetensors_streaming};

/// What an import wrote, for the CLI to report.
#[derive(Debug)]
pub struct ImportReport {
    pub out_dir: PathBuf,
    pub name: Option<String>,
    pub config: ModelConfig,
    /// How many tensors of each ggml type the file held.
    pub tensor_types: BTreeMap<&'static str, usize>,
    pub vocab_tokens: usize,
    pub has_chat_template: bool,
}

/// Imports `gguf_path` into `out_dir`, which must not exist yet or be empty. The files are
/// written into a staging folder beside it and renamed into place at the end, so a failed
/// import leaves nothing half-written under the name the user chose.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: SaveDtype) -> Result<ImportReport> {
    refuse_occupied(out_dir)?;
    let gguf = Gguf::open(gguf_path)?;
    let meta = Metadata(&gguf);
    let arch = meta.str("general.architecture")?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(meta.error(format!(
            "general.architecture \"{arch}\" is not supported (safeprobe imports {})",
            ARCHITECTURES.join(", ")
        )));
    }
    let config = model_config(&gguf, arch)?;
    let planned = plan_tensors(&gguf, &config)?;
    let tokenizer = TokenizerFiles::from_gguf(&meta, arch)?;

    let staging = staging_dir(out_dir)?;
    let written = (|| {
        let entries: Vec<(String, Vec<usize>)> = planned
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        write_safetensors_streaming(
            &staging.join("model.safetensors"),
            &entries,
            dtype,
            Some([("format".to_string(), "pt".to_string())].into()),
            |i| read_planned(&gguf, &planned[i], config.head_dim).map(Cow::Owned),
        )?;
        write_json(
            &staging.join("config.json"),
            &config.to_hf_json(dtype.torch_name()),
        )?;
        write_json(&staging.join("tokenizer.json"), &tokenizer.tokenizer)?;
        write_json(
            &staging.join("tokenizer_config.json"),
            &tokenizer.tokenizer_config,
        )?;
        write_json(
            &staging.join("generation_config.json"),
            &tokenizer.generation_config,
        )?;
        // The folder must exist for the rename; an empty one was checked above.
        if out_dir.exists() {
            std::fs::remove_dir(out_dir).map_err(|e| Error::io(out_dir, e))?;
        }
        std::fs::rename(&staging, out_dir).map_err(|e| Error::io(out_dir, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written?;

    let mut tensor_types = BTreeMap::new();
    for t in &gguf.tensors {
        *tensor_types.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    Ok(ImportReport {
        out_dir: out_dir.to_path_buf(),
        name: meta.opt_str("general.name").map(str::to_string),
        config,
        tensor_types,
        vocab_tokens: tokenizer.vocab_tokens,
        has_chat_template: tokenizer.has_chat_template,
    })
}

/// The `general.architecture`s imported: Qwen2/2.5, Qwen3 (dense), Llama 3.x.
const ARCHITECTURES: [&str; 3] = ["qwen2", "qwen3", "llama"];

fn refuse_occupied(out_dir: &Path) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(out_dir)
        && entries.next().is_some()
    {
        return Err(Error::Invalid(format!(
            "--out {}: the folder is not empty; choose a new one (nothing was changed)",
            out_dir.display()
        )));
    }
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "--out {}: a file of that name exists",
            out_dir.display()
        )));
    }
    Ok(())
}

fn staging_dir(out_dir: &Path) -> Result<PathBuf> {
    let name = out_dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("--out {}: not a folder name", out_dir.display())))?;
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = parent.join(format!(
        ".{}.importing-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    Ok(staging)
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Typed access to the metadata, with errors that name the file and the key.
struct Metadata<'a>(&'a Gguf);

impl<'a> Metadata<'a> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::config(&self.0.path, message)
    }
    fn required(&self, key: &str) -> Result<&'a Value> {
        self.0
            .get(key)
            .ok_or_else(|| self.error(format!("missing metadata key \"{key}\"")))
    }
    fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).and_then(Value::as_str)
    }
    fn str(&self, key: &str) -> Result<&'a str> {
        self.required(key)?
            .as_str()
            .ok_or_else(|| self.error(format!("metadata key \"{key}\" must be a string")))
    }
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key \"{key}\" must be a non-negative integer, found {v:?}"
                ))
            }),
        }
    }
    fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.error(format!("missing metadata key \"{key}\"")))
    }
    /// A float stored as f32 comes back as the decimal it was written from (1e-6, not
    /// 9.99999997e-7), as it reads in the original config.json.
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(v.to_string().parse().expect("f32 prints as a number"))),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key \"{key}\" must be a number, found {v:?}"
                ))
            }),
        }
    }
    fn array(&self, key: &str) -> Result<&'a [Value]> {
        match self.required(key)? {
            Value::Array(items) => Ok(items),
            other => Err(self.error(format!(
                "metadata key \"{key}\" must be an array, found {other:?}"
            ))),
        }
    }
}

/// config.json's fields from `<arch>.*`, validated by the same parser a checkpoint's
/// config.json goes through.
fn model_config(gguf: &Gguf, arch: &str) -> Result<ModelConfig> {
    let meta = Metadata(gguf);
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(kind) = meta.opt_str(&key("rope.scaling.type"))
        && kind != "none"
    {
        return Err(meta.error(format!(
            "{} \"{kind}\": rope scaling is not supported",
            key("rope.scaling.type")
        )));
    }
    let embeddings = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| meta.error("missing tensor \"token_embd.weight\""))?;
    let vocab_size = embeddings.dims.get(1).copied().unwrap_or(0);
    let heads = meta.u64(&key("attention.head_count"))?;
    let mut map = Map::new();
    map.insert("model_type".into(), json!(arch));
    map.insert("hidden_act".into(), json!("silu"));
    map.insert("vocab_size".into(), json!(vocab_size));
    map.insert(
        "hidden_size".into(),
        json!(meta.u64(&key("embedding_length"))?),
    );
    map.insert(
        "intermediate_size".into(),
        json!(meta.u64(&key("feed_forward_length"))?),
    );
    map.insert(
        "num_hidden_layers".into(),
        json!(meta.u64(&key("block_count"))?),
    );
    map.insert("num_attention_heads".into(), json!(heads));
    map.insert(
        "num_key_value_heads".into(),
        json!(
            meta.opt_u64(&key("attention.head_count_kv"))?
                .unwrap_or(heads)
        ),
    );
    map.insert(
        "max_position_embeddings".into(),
        json!(meta.u64(&key("context_length"))?),
    );
    let eps = meta
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            meta.error(format!(
                "missing metadata key \"{}\"",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    map.insert("rms_norm_eps".into(), json!(eps));
    map.insert(
        "rope_theta".into(),
        json!(meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
    );
    map.insert(
        "tie_word_embeddings".into(),
        json!(gguf.tensor("output.weight").is_none()),
    );
    if let Some(head_dim) = meta.opt_u64(&key("attention.key_length"))? {
        let value_length = meta.opt_u64(&key("attention.value_length"))?;
        if value_length.is_some_and(|v| v != head_dim) {
            return Err(meta.error(format!(
                "{} {head_dim} differs from {} {}: not supported",
                key("attention.key_length"),
                key("attention.value_length"),
                value_length.unwrap_or_default()
            )));
        }
        map.insert("head_dim".into(), json!(head_dim));
    }
    if let Some(info) = gguf.tensor("rope_freqs.weight") {
        let head_dim = match map.get("head_dim") {
            Some(d) => d.as_u64().unwrap_or(0),
            None => meta.u64(&key("embedding_length"))? / heads.max(1),
        };
        let theta = map["rope_theta"].as_f64().unwrap_or(10_000.0);
        let factors = gguf.read_f32(info)?;
        if let Some(scaling) = llama3_scaling(&factors, theta, head_dim as usize)
            .map_err(|e| Error::weights(&gguf.path, format!("tensor \"rope_freqs.weight\": {e}")))?
        {
            map.insert("rope_scaling".into(), scaling);
        }
    }
    if let Some(eos) = meta.opt_u64("tokenizer.ggml.eos_token_id")? {
        map.insert("eos_token_id".into(), json!(eos));
    }
    ModelConfig::from_map(&map, &gguf.path)
}

/// The llama3 rope scaling that gives the per-frequency divisors `factors` (what the
/// converter stores as `rope_freqs.weight`), as config.json's `rope_scaling`; None when every
/// divisor is 1. The divisors are 1 for short wavelengths, `factor` for long ones, and
/// between them 1 / ((1 − s) / factor + s) with s = (old / λ − low) / (high − low). Scaling
/// (old, low, high) together changes nothing, so low = 1 (as in every Llama 3.x); high and old
/// come from the smooth part, or Llama's high = 4 where it has fewer than two points. The
/// result is checked by recomputing every divisor.
fn llama3_scaling(
    factors: &[f32],
    theta: f64,
    head_dim: usize,
) -> std::result::Result<Option<Json>, String> {
    if factors.len() * 2 != head_dim {
        return Err(format!(
            "{} values for head_dim {head_dim} (expected head_dim / 2)",
            factors.len()
        ));
    }
    let factors: Vec<f64> = factors.iter().map(|f| *f as f64).collect();
    let factor = factors.iter().copied().fold(1.0, f64::max);
    if factors.iter().all(|f| (f - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let wavelength =
        |i: usize| 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / head_dim as f64);
    let tolerance = 1e-5 * factor;
    let smooth: Vec<(f64, f64)> = (0..factors.len())
        .filter(|i| factors[*i] > 1.0 + tolerance && factors[*i] < factor - tolerance)
        .map(|i| {
            let s = (1.0 / factors[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
            (1.0 / wavelength(i), s)
        })
        .collect();
    let (high, old) = match smooth.len() {
        0 => {
            // Any old with every unscaled wavelength below old / 4 and every scaled one above old.
            let below = (0..factors.len())
                .filter(|i| factors[*i] <= 1.0 + tolerance)
                .map(wavelength)
                .fold(0.0, f64::max);
            let above = (0..factors.len())
                .filter(|i| factors[*i] >= factor - tolerance)
                .map(wavelength)
                .fold(f64::INFINITY, f64::min);
            (4.0, (4.0 * below * above).sqrt())
        }
        1 => {
            let (inv_wavelength, s) = smooth[0];
            (4.0, (3.0 * s + 1.0) / inv_wavelength)
        }
        n => {
            // s = a / λ + b, with a = old / (high − 1) and b = −1 / (high − 1).
            let n = n as f64;
            let (mx, my) = smooth
                .iter()
                .fold((0.0, 0.0), |(x, y), (a, b)| (x + a / n, y + b / n));
            let sxy: f64 = smooth.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
            let sxx: f64 = smooth.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
            let a = sxy / sxx;
            let b = my - a * mx;
            (1.0 - 1.0 / b, -a / b)
        }
    };
    // Context lengths are whole numbers; the fit is exact up to rounding.
    let old = if (old - old.round()).abs() < 1e-3 * old {
        old.round()
    } else {
        old
    };
    for (i, f) in factors.iter().enumerate() {
        let lambda = wavelength(i);
        let expected = if lambda < old / high {
            1.0
        } else if lambda > old {
            factor
        } else {
            let s = (old / lambda - 1.0) / (high - 1.0);
            1.0 / ((1.0 - s) / factor + s)
        };
        if (expected - f).abs() > 1e-4 * f.abs().max(1.0) {
            return Err(format!(
                "the divisors are not those of llama3 rope scaling (value {i} is {f}, the closest \
                 llama3 scaling gives {expected}); this rope scaling is not supported"
            ));
        }
    }
    let high = if (high - high.round()).abs() < 1e-6 {
        high.round()
    } else {
        high
    };
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    })))
}

/// llama.cpp's per-layer tensor names and the Hugging Face module they come from.
const LAYER_TENSORS: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a llama.cpp tensor name, if it is one safeprobe knows.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.split_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let (_, hf_module) = LAYER_TENSORS.iter().find(|(short, _)| *short == module)?;
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// One tensor of the output: where it comes from in the file, its Hugging Face name and
/// shape, and, for llama's q and k, the heads whose rotary layout to undo.
struct Planned<'g> {
    info: &'g TensorInfo,
    name: String,
    shape: Vec<usize>,
    rotary_heads: Option<usize>,
}

/// Every tensor of the file, mapped (nothing is read yet: the writer dequantises one at a time).
fn plan_tensors<'g>(gguf: &'g Gguf, config: &ModelConfig) -> Result<Vec<Planned<'g>>> {
    let arch = config.architecture.model_type();
    let mut planned = Vec::new();
    for info in &gguf.tensors {
        if info.name == "rope_freqs.weight" {
            continue; // read into config.json's rope_scaling
        }
        let name = hf_name(&info.name).ok_or_else(|| {
            Error::weights(
                &gguf.path,
                format!(
                    "tensor \"{}\" has no {arch} counterpart; this file is not a plain {arch} model",
                    info.name
                ),
            )
        })?;
        // The converter interleaves the rotary halves of llama's q and k rows.
        let rotary_heads = match config.architecture {
            Architecture::Llama if name.ends_with("q_proj.weight") => {
                Some(config.num_attention_heads)
            }
            Architecture::Llama if name.ends_with("k_proj.weight") => {
                Some(config.num_key_value_heads)
            }
            _ => None,
        };
        planned.push(Planned {
            info,
            name,
            shape: info.hf_shape(),
            rotary_heads,
        });
    }
    planned.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(planned)
}

/// A planned tensor's values in Hugging Face's layout.
fn read_planned(gguf: &Gguf, t: &Planned, head_dim: usize) -> Result<Vec<f32>> {
    let values = gguf.read_f32(t.info)?;
    match t.rotary_heads {
        Some(heads) => from_rotary_layout(&values, &t.shape, heads, head_dim)
            .map_err(|e| Error::weights(&gguf.path, format!("tensor \"{}\": {e}", t.info.name))),
        None => Ok(values),
    }
}

/// Undoes llama.cpp's row order for llama's q and k: within each head, row 2j + t of the
/// file is row t · head_dim / 2 + j of the Hugging Face weight.
fn from_rotary_layout(
    values: &[f32],
    shape: &[usize],
    heads: usize,
    head_dim: usize,
) -> std::result::Result<Vec<f32>, String> {
    let rows = shape.first().copied().unwrap_or(0);
    if rows != heads * head_dim || values.len() % rows.max(1) != 0 {
        return Err(format!(
            "shape {shape:?} is not {heads} heads of {head_dim} rows"
        ));
    }
    let cols = values.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let from = (h * head_dim + 2 * j + t) * cols;
                let to = (h * head_dim + t * half + j) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    Ok(out)
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: u64 = 1;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const UNUSED: u64 = 5;

/// The Split pattern each `tokenizer.ggml.pre` stands for, as the Hugging Face tokenizer of
/// that family writes it.
fn pre_tokenizer_pattern(pre: &str) -> Option<&'static str> {
    match pre {
        "qwen2" => Some(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "llama-bpe" => Some(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        _ => None,
    }
}

/// Control tokens that end a turn in the families' own generation configs. GGUF records one
/// eos id, so like llama.cpp we also stop on these when the vocabulary has them as control
/// tokens (Qwen2.5's generation_config.json lists both <|im_end|> and <|endoftext|>).
const END_OF_GENERATION: [&str; 5] = [
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
];

/// The ids generation stops on: eos, eot and eom from the metadata, and the control tokens
/// of `END_OF_GENERATION`.
fn end_of_generation_ids(meta: &Metadata, tokens: &[Value], types: &[Value]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        ids.extend(meta.opt_u64(key)?);
    }
    for (id, (token, kind)) in tokens.iter().zip(types).enumerate() {
        if kind.as_u64() == Some(CONTROL)
            && token
                .as_str()
                .is_some_and(|t| END_OF_GENERATION.contains(&t))
        {
            ids.push(id as u64);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the metadata.
struct TokenizerFiles {
    tokenizer: Json,
    tokenizer_config: Json,
    generation_config: Json,
    vocab_tokens: usize,
    has_chat_template: bool,
}

impl TokenizerFiles {
    fn from_gguf(meta: &Metadata, arch: &str) -> Result<Self> {
        let model = meta.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta.error(format!(
                "tokenizer.ggml.model \"{model}\" is not supported (only \"gpt2\", byte-level BPE)"
            )));
        }
        let pre = meta.str("tokenizer.ggml.pre")?;
        let pattern = pre_tokenizer_pattern(pre).ok_or_else(|| {
            meta.error(format!(
                "tokenizer.ggml.pre \"{pre}\" is not supported (supported: qwen2, llama-bpe)"
            ))
        })?;
        let tokens = meta.array("tokenizer.ggml.tokens")?;
        let types = match meta.0.get("tokenizer.ggml.token_type") {
            Some(_) => meta.array("tokenizer.ggml.token_type")?,
            None => &[],
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(meta.error(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            let text = token.as_str().ok_or_else(|| {
                meta.error(format!("tokenizer.ggml.tokens[{id}] is not a string"))
            })?;
            let kind = types.get(id).and_then(Value::as_u64).unwrap_or(NORMAL);
            if kind == UNUSED {
                continue;
            }
            // Added tokens go into the model's vocabulary too: `tokenizers` keeps an added
            // token's id only if the vocabulary has it, and otherwise numbers it after the
            // vocabulary, which collides when the specials are not the last ids.
            vocab.insert(text.to_string(), json!(id));
            if kind == CONTROL || kind == USER_DEFINED {
                added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": kind == CONTROL,
                }));
            }
        }
        let merges = meta
            .array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                let pair = merge.as_str().and_then(|m| m.split_once(' '));
                match pair {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                        Ok(json!([a, b]))
                    }
                    _ => Err(meta.error(format!(
                        "tokenizer.ggml.merges[{i}] is {merge:?}, not two tokens separated by a space"
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let vocab_tokens = vocab.len();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let mut tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": if pre == "qwen2" { json!({"type": "NFC"}) } else { Json::Null },
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });

        let token_text = |key: &str| -> Result<Option<String>> {
            let Some(id) = meta.opt_u64(key)? else {
                return Ok(None);
            };
            let text = tokens
                .get(id as usize)
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    meta.error(format!(
                        "{key} is {id}, beyond the {} tokens of tokenizer.ggml.tokens",
                        tokens.len()
                    ))
                })?;
            Ok(Some(text.to_string()))
        };
        let eos = token_text("tokenizer.ggml.eos_token_id")?;
        let pad = token_text("tokenizer.ggml.padding_token_id")?;
        let add_bos = meta
            .0
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let bos = if add_bos {
            token_text("tokenizer.ggml.bos_token_id")?
        } else {
            None
        };
        if let (Some(bos), Some(id)) = (&bos, meta.opt_u64("tokenizer.ggml.bos_token_id")?) {
            // Encoding with special tokens starts with bos, as Llama 3's own tokenizer.json does.
            let special = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
            let sequence =
                |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
            tokenizer["post_processor"] = json!({"type": "Sequence", "processors": [
                byte_level,
                {
                    "type": "TemplateProcessing",
                    "single": [special(0), sequence("A", 0)],
                    "pair": [special(0), sequence("A", 0), special(1), sequence("B", 1)],
                    "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}},
                },
            ]});
        }
        let template = meta.opt_str("tokenizer.chat_template");
        let mut tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "model_max_length": meta.opt_u64(&format!("{arch}.context_length"))?,
        });
        if let Some(template) = template {
            tokenizer_config["chat_template"] = json!(template);
        }
        let mut generation_config = json!({});
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = meta.opt_u64(gguf_key)? {
                generation_config[hf_key] = json!(id);
            }
        }
        let stop_ids = end_of_generation_ids(meta, tokens, types)?;
        if !stop_ids.is_empty() {
            generation_config["eos_token_id"] = json!(stop_ids);
        }
        Ok(Self {
            tokenizer,
            tokenizer_config,
            generation_config,
            vocab_tokens,
            has_chat_template: template.is_some(),
        })
    }
}
