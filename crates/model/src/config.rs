//! `config.json` of a Qwen2 checkpoint, read straight from the file.
//!
//! Two styles exist in the wild: transformers 4.x writes `rope_theta` at the top level,
//! transformers 5.x nests it in `rope_parameters`. Both are accepted. Anything the model
//! cannot honour (rope scaling, sliding-window attention, another activation) is refused
//! with the field's name instead of being silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result, read_json};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of config.json (an int or a list); generation also reads
    /// generation_config.json and the tokenizer config.
    pub eos_token_ids: Vec<u32>,
}

impl Qwen2Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let value: Value = read_json(path)?;
        let Value::Object(map) = value else {
            return Err(Error::config(
                path,
                "expected a JSON object at the top level",
            ));
        };
        Self::from_map(&map, path)
    }

    pub fn from_map(map: &Map<String, Value>, path: &Path) -> Result<Self> {
        let fields = Fields { map, path };
        match map.get("model_type").and_then(Value::as_str) {
            Some("qwen2") => {}
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!(
                        "unsupported model_type \"{other}\" (safeprobe runs \"qwen2\", the Qwen2/Qwen2.5 family)"
                    ),
                ));
            }
            None => return Err(Error::config(path, "missing field \"model_type\"")),
        }
        if let Some(act) = map.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(Error::config(
                path,
                format!("hidden_act \"{act}\" is not supported (only \"silu\")"),
            ));
        }
        if map.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config(
                path,
                "use_sliding_window is true: sliding-window attention is not supported",
            ));
        }
        if let Some(Value::Array(types)) = map.get("layer_types")
            && let Some(bad) = types.iter().find(|t| t.as_str() != Some("full_attention"))
        {
            return Err(Error::config(
                path,
                format!("layer_types contains {bad}: only \"full_attention\" is supported"),
            ));
        }

        let rope_theta = rope_theta(map, path)?;
        let hidden_size = fields.usize("hidden_size")?;
        let num_attention_heads = fields.usize("num_attention_heads")?;
        let num_key_value_heads = match map.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => fields.usize("num_key_value_heads")?,
        };
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        if let Some(head_dim) = map.get("head_dim").and_then(Value::as_u64)
            && head_dim as usize != hidden_size / num_attention_heads
        {
            return Err(Error::config(
                path,
                format!("head_dim {head_dim} differs from hidden_size / num_attention_heads"),
            ));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
                ),
            ));
        }
        let config = Self {
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_hidden_layers: fields.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            max_position_embeddings: fields.usize_or("max_position_embeddings", 32768)?,
            rms_norm_eps: fields.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
            eos_token_ids: token_ids(map.get("eos_token_id")),
        };
        if config.head_dim() % 2 != 0 {
            return Err(Error::config(
                path,
                "head dimension must be even for rotary embeddings",
            ));
        }
        Ok(config)
    }

    /// The config.json that transformers reads for this model (transformers 4.x style,
    /// which 5.x also accepts).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": false,
            "use_cache": true,
            "torch_dtype": dtype,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => Value::from(*one),
                many => Value::from(many.to_vec()),
            },
        })
    }
}

fn rope_theta(map: &Map<String, Value>, path: &Path) -> Result<f64> {
    // rope_scaling (4.x) or rope_parameters (5.x): only plain RoPE is implemented.
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(Value::Object(params)) = map.get(key) {
            let kind = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(Value::as_str);
            if let Some(kind) = kind
                && kind != "default"
            {
                return Err(Error::config(
                    path,
                    format!("{key}.rope_type \"{kind}\" is not supported (only \"default\")"),
                ));
            }
        }
    }
    if let Some(Value::Object(params)) = map.get("rope_parameters")
        && let Some(theta) = params.get("rope_theta")
    {
        return theta.as_f64().ok_or_else(|| {
            Error::config(
                path,
                format!("rope_parameters.rope_theta must be a number, found {theta}"),
            )
        });
    }
    match map.get("rope_theta") {
        Some(theta) => theta.as_f64().ok_or_else(|| {
            Error::config(path, format!("rope_theta must be a number, found {theta}"))
        }),
        None => Err(Error::config(
            path,
            "missing field \"rope_theta\" (or \"rope_parameters.rope_theta\")",
        )),
    }
}

/// eos/bos ids appear as an int, a list of ints, or null.
pub(crate) fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        match self.map.get(key) {
            None => Err(Error::config(self.path, format!("missing field \"{key}\""))),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("field \"{key}\" must be a non-negative integer, found {v}"),
                )
            }),
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.map.get(key).is_none_or(Value::is_null) {
            Ok(default)
        } else {
            self.usize(key)
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("field \"{key}\" must be a number, found {v}"),
                )
            }),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("field \"{key}\" must be true or false, found {v}"),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Qwen2Config> {
        let Value::Object(map) = serde_json::from_str(json).unwrap() else {
            panic!()
        };
        Qwen2Config::from_map(&map, Path::new("config.json"))
    }

    const BASE: &str = r#""model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1"#;

    #[test]
    fn both_rope_theta_styles() {
        let old = parse(&format!("{{{BASE},\"rope_theta\":1000000.0}}")).unwrap();
        let new = parse(&format!(
            "{{{BASE},\"rope_parameters\":{{\"rope_type\":\"default\",\"rope_theta\":1000000.0}}}}"
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.rope_theta, 1e6);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let scaled = parse(&format!(
            "{{{BASE},\"rope_theta\":1e6,\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":4}}}}"
        ));
        assert!(
            scaled
                .unwrap_err()
                .to_string()
                .contains("rope_scaling.rope_type \"yarn\"")
        );
        let sliding = parse(&format!(
            "{{{BASE},\"rope_theta\":1e6,\"use_sliding_window\":true}}"
        ));
        assert!(
            sliding
                .unwrap_err()
                .to_string()
                .contains("use_sliding_window")
        );
        let llama = parse(r#"{"model_type":"llama"}"#);
        assert!(
            llama
                .unwrap_err()
                .to_string()
                .contains("unsupported model_type \"llama\"")
        );
        let missing = parse(&format!("{{{BASE}}}"));
        assert!(missing.unwrap_err().to_string().contains("rope_theta"));
        let wrong = parse(r#"{"model_type":"qwen2","vocab_size":"ten","rope_theta":1}"#);
        assert!(wrong.unwrap_err().to_string().contains("\"hidden_size\""));
    }
}
