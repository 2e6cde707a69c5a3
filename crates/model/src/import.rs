//! `safeprobe import`: a GGUF file to a Hugging Face checkpoint folder that safeprobe (and
//! `transformers`) loads: `config.json` from the metadata, the tensors dequantised into
//! `model.safetensors`, and the tokenizer rebuilt from `tokenizer.ggml.*`.
//!
//! The mapping is the inverse of llama.cpp's `convert_hf_to_gguf.py` for qwen2: the same
//! tensor names, the same token types. Whatever it cannot map (another architecture, another
//! tokenizer, rope scaling, an unknown tensor) is refused by name, never guessed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json, json};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};
use crate::weights::{HostTensor, SaveDtype, write_atomic, write_safetensors};

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
    if arch != "qwen2" {
        return Err(meta.error(format!(
            "general.architecture \"{arch}\" is not supported (safeprobe imports \"qwen2\": Qwen2 and Qwen2.5)"
        )));
    }
    let config = model_config(&gguf, arch)?;
    let tensors = hf_tensors(&gguf)?;
    let tokenizer = TokenizerFiles::from_gguf(&meta)?;

    let staging = staging_dir(out_dir)?;
    let written = (|| {
        write_safetensors(
            &staging.join("model.safetensors"),
            &tensors,
            dtype,
            Some([("format".to_string(), "pt".to_string())].into()),
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
    if let Some(eos) = meta.opt_u64("tokenizer.ggml.eos_token_id")? {
        map.insert("eos_token_id".into(), json!(eos));
    }
    ModelConfig::from_map(&map, &gguf.path)
}

/// llama.cpp's per-layer tensor names and the Hugging Face module they come from.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
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

fn hf_tensors(gguf: &Gguf) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for info in &gguf.tensors {
        let name = hf_name(&info.name).ok_or_else(|| {
            Error::weights(
                &gguf.path,
                format!(
                    "tensor \"{}\" has no qwen2 counterpart; this file is not a plain Qwen2 model",
                    info.name
                ),
            )
        })?;
        let values = gguf.read_f32(info)?;
        out.insert(
            name,
            HostTensor {
                shape: info.hf_shape(),
                values,
            },
        );
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
    fn from_gguf(meta: &Metadata) -> Result<Self> {
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
        let tokenizer = json!({
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
        let template = meta.opt_str("tokenizer.chat_template");
        let mut tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "model_max_length": meta.opt_u64("qwen2.context_length")?,
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
