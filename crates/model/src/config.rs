//! `config.json` of a checkpoint, read straight from the file.
//!
//! Three decoder families share one implementation ([`crate::decoder`]) and differ only in
//! what the config says: Qwen2/Qwen2.5 (q/k/v bias), Qwen3 (q/k RMSNorm, explicit
//! `head_dim`, no bias) and Llama 3.x (no bias, `llama3` rotary scaling). Two config styles
//! exist in the wild: transformers 4.x writes `rope_theta` and `rope_scaling` at the top
//! level, transformers 5.x nests both in `rope_parameters`; both are accepted. Anything the
//! model cannot honour (another rope scaling, sliding-window attention, another activation,
//! MLP bias) is refused with the field's name instead of being silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result, read_json};

/// The decoder families safeprobe runs, by their config.json `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Qwen2,
    Qwen3,
    Llama,
}

impl Architecture {
    pub const ALL: [Architecture; 3] = [Self::Qwen2, Self::Qwen3, Self::Llama];

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Llama => "llama",
        }
    }

    /// The transformers class config.json names under `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Llama => "LlamaForCausalLM",
        }
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// Whether queries and keys are RMS-normalised per head before the rotary embedding.
    pub fn qk_norm(self) -> bool {
        self == Self::Qwen3
    }
}

/// Llama 3.x's rotary scaling (`rope_type: "llama3"`): long wavelengths are divided by
/// `factor`, short ones kept, the band between interpolated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width: `head_dim` when the config gives it (Qwen3 does), else
    /// hidden_size / num_attention_heads.
    pub head_dim: usize,
    /// Bias on the q, k and v projections (always for Qwen2; `attention_bias` otherwise).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` for Qwen3 and Llama; never for Qwen2).
    pub o_bias: bool,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of config.json (an int or a list); generation also reads
    /// generation_config.json and the tokenizer config.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// A Qwen2 config with the per-head width implied by the sizes (the shape of the demo and
    /// benchmark models).
    #[allow(clippy::too_many_arguments)]
    pub fn qwen2(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        rope_theta: f64,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        Self {
            architecture: Architecture::Qwen2,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads,
            qkv_bias: true,
            o_bias: false,
            max_position_embeddings,
            rms_norm_eps: 1e-6,
            rope_theta,
            rope_scaling: None,
            tie_word_embeddings: true,
            eos_token_ids,
        }
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
        let architecture = architecture(map, path)?;
        refuse_unsupported(map, path)?;
        let (rope_theta, rope_scaling) = rope(map, path)?;
        let hidden_size = fields.usize("hidden_size")?;
        let num_attention_heads = fields.usize("num_attention_heads")?;
        let num_key_value_heads = match map.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => fields.usize("num_key_value_heads")?,
        };
        if num_attention_heads == 0 {
            return Err(Error::config(path, "num_attention_heads is 0"));
        }
        let head_dim = match map.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        path,
                        format!(
                            "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => fields.usize("head_dim")?,
        };
        if architecture == Architecture::Qwen2 && head_dim * num_attention_heads != hidden_size {
            return Err(Error::config(
                path,
                format!(
                    "head_dim {head_dim} differs from hidden_size / num_attention_heads (Qwen2 ties them)"
                ),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim {head_dim}: must be even and non-zero for rotary embeddings"),
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
        let attention_bias = fields.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Qwen3 | Architecture::Llama => (attention_bias, attention_bias),
        };
        Ok(Self {
            architecture,
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_hidden_layers: fields.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            qkv_bias,
            o_bias,
            max_position_embeddings: fields.usize_or("max_position_embeddings", 32768)?,
            rms_norm_eps: fields.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
            eos_token_ids: token_ids(map.get("eos_token_id")),
        })
    }

    /// Width of the concatenated query heads (the input of `o_proj`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The rotary inverse frequencies, one per pair of head dimensions, in f32 as
    /// transformers computes them (with Llama 3's scaling applied when configured).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let old_context = s.original_max_position_embeddings as f32;
        let (low_freq_wavelen, high_freq_wavelen) = (old_context / low, old_context / high);
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_freq_wavelen {
                    freq
                } else if wavelen > low_freq_wavelen {
                    freq / factor
                } else {
                    let smooth = (old_context / wavelen - low) / (high - low);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            })
            .collect()
    }

    /// The config.json that transformers reads for this model (transformers 4.x style,
    /// which 5.x also accepts).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut config = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.as_ref().map(|s| serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                // A context length: transformers wants an integer here when it is one.
                "original_max_position_embeddings": whole_number(s.original_max_position_embeddings),
            })),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": true,
            "torch_dtype": dtype,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => Value::from(*one),
                many => Value::from(many.to_vec()),
            },
        });
        let map = config.as_object_mut().expect("object");
        match self.architecture {
            Architecture::Qwen2 => {
                map.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Qwen3 => {
                map.insert("use_sliding_window".into(), false.into());
                map.insert("attention_bias".into(), self.qkv_bias.into());
            }
            Architecture::Llama => {
                map.insert("attention_bias".into(), self.qkv_bias.into());
                map.insert("mlp_bias".into(), false.into());
            }
        }
        config
    }
}

fn architecture(map: &Map<String, Value>, path: &Path) -> Result<Architecture> {
    let supported = || {
        Architecture::ALL
            .map(|a| format!("\"{}\"", a.model_type()))
            .join(", ")
    };
    match map.get("model_type").and_then(Value::as_str) {
        Some(model_type) => Architecture::from_model_type(model_type).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "unsupported model_type \"{model_type}\" (safeprobe runs {}: Qwen2/Qwen2.5, Qwen3, Llama 3.x)",
                    supported()
                ),
            )
        }),
        None => Err(Error::config(path, "missing field \"model_type\"")),
    }
}

/// Settings the shared decoder does not implement, each refused by name.
fn refuse_unsupported(map: &Map<String, Value>, path: &Path) -> Result<()> {
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
    if map.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
        return Err(Error::config(
            path,
            "mlp_bias is true: MLP biases are not supported",
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
    Ok(())
}

/// `rope_theta` and the rotary scaling, from `rope_scaling` + top-level `rope_theta`
/// (transformers 4.x) or `rope_parameters` (5.x). Plain RoPE and Llama 3's scaling are
/// implemented; every other `rope_type` is refused.
fn rope(map: &Map<String, Value>, path: &Path) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let mut scaling = None;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(Value::Object(params)) = map.get(key) else {
            continue;
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str);
        match kind {
            None | Some("default") => {}
            Some("llama3") => {
                let number = |field: &str| {
                    params.get(field).and_then(Value::as_f64).ok_or_else(|| {
                        Error::config(
                            path,
                            format!("{key}.{field} must be a number for rope_type \"llama3\""),
                        )
                    })
                };
                let s = Llama3RopeScaling {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                if !(s.factor > 0.0
                    && s.high_freq_factor > s.low_freq_factor
                    && s.low_freq_factor > 0.0)
                {
                    return Err(Error::config(
                        path,
                        format!(
                            "{key}: llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0"
                        ),
                    ));
                }
                scaling = Some(s);
            }
            Some(kind) => {
                return Err(Error::config(
                    path,
                    format!(
                        "{key}.rope_type \"{kind}\" is not supported (only \"default\" and \"llama3\")"
                    ),
                ));
            }
        }
    }
    let theta = if let Some(Value::Object(params)) = map.get("rope_parameters")
        && let Some(theta) = params.get("rope_theta")
    {
        theta.as_f64().ok_or_else(|| {
            Error::config(
                path,
                format!("rope_parameters.rope_theta must be a number, found {theta}"),
            )
        })?
    } else {
        match map.get("rope_theta") {
            Some(theta) => theta.as_f64().ok_or_else(|| {
                Error::config(path, format!("rope_theta must be a number, found {theta}"))
            })?,
            None => {
                return Err(Error::config(
                    path,
                    "missing field \"rope_theta\" (or \"rope_parameters.rope_theta\")",
                ));
            }
        }
    };
    Ok((theta, scaling))
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

/// `x` as a JSON integer when it is a whole number, else as it is.
fn whole_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 2f64.powi(53) {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let Value::Object(map) = serde_json::from_str(json).unwrap() else {
            panic!()
        };
        ModelConfig::from_map(&map, Path::new("config.json"))
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
        let gemma = parse(r#"{"model_type":"gemma2"}"#);
        assert!(
            gemma
                .unwrap_err()
                .to_string()
                .contains("unsupported model_type \"gemma2\"")
        );
        let yarn = parse(&format!(
            "{{{BASE},\"rope_parameters\":{{\"rope_type\":\"yarn\",\"rope_theta\":1e6,\"factor\":4}}}}"
        ));
        assert!(
            yarn.unwrap_err()
                .to_string()
                .contains("rope_parameters.rope_type \"yarn\"")
        );
        let mlp_bias = parse(&format!(
            "{{{},\"rope_theta\":1e6,\"mlp_bias\":true}}",
            BASE.replace("qwen2", "llama")
        ));
        assert!(mlp_bias.unwrap_err().to_string().contains("mlp_bias"));
        let odd = parse(&format!(
            "{{{},\"rope_theta\":1e6,\"head_dim\":5}}",
            BASE.replace("qwen2", "qwen3")
        ));
        assert!(odd.unwrap_err().to_string().contains("head_dim 5"));
        let missing = parse(&format!("{{{BASE}}}"));
        assert!(missing.unwrap_err().to_string().contains("rope_theta"));
        let wrong = parse(r#"{"model_type":"qwen2","vocab_size":"ten","rope_theta":1}"#);
        assert!(wrong.unwrap_err().to_string().contains("\"hidden_size\""));
    }

    #[test]
    fn qwen3_takes_head_dim_and_bias_from_the_config() {
        let qwen3 = parse(&format!(
            "{{{},\"rope_theta\":1e6,\"head_dim\":8,\"attention_bias\":false}}",
            BASE.replace("qwen2", "qwen3")
        ))
        .unwrap();
        assert_eq!(qwen3.architecture, Architecture::Qwen3);
        assert_eq!(
            (qwen3.head_dim, qwen3.q_width(), qwen3.kv_width()),
            (8, 16, 8)
        );
        assert!(!qwen3.qkv_bias && !qwen3.o_bias);
        let qwen2 = parse(&format!("{{{BASE},\"rope_theta\":1e6}}")).unwrap();
        assert!(qwen2.qkv_bias && !qwen2.o_bias);
        let mismatched = parse(&format!("{{{BASE},\"rope_theta\":1e6,\"head_dim\":8}}"));
        assert!(
            mismatched
                .unwrap_err()
                .to_string()
                .contains("Qwen2 ties them")
        );
    }

    #[test]
    fn llama3_rope_scaling_in_both_styles() {
        let scaling = r#""rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192"#;
        let base = BASE.replace("qwen2", "llama");
        let old = parse(&format!(
            "{{{base},\"rope_theta\":500000.0,\"rope_scaling\":{{{scaling}}}}}"
        ))
        .unwrap();
        let new = parse(&format!(
            "{{{base},\"rope_parameters\":{{{scaling},\"rope_theta\":500000.0}}}}"
        ))
        .unwrap();
        assert_eq!(old, new);
        let s = old.rope_scaling.as_ref().unwrap();
        assert_eq!(
            (s.factor, s.original_max_position_embeddings),
            (8.0, 8192.0)
        );
        // head_dim 4: frequencies 1 (wavelength 2π, kept) and 500000^-0.5 (wavelength
        // ≈ 4443, between 8192/4 = 2048 and 8192/1: interpolated).
        let freqs = old.rope_inv_freq();
        assert_eq!(freqs[0], 1.0);
        let f = 1.0 / 500000f32.sqrt();
        let smooth = (8192.0 / (2.0 * std::f32::consts::PI / f) - 1.0) / 3.0;
        let expected = (1.0 - smooth) * f / 8.0 + smooth * f;
        assert!(
            (freqs[1] - expected).abs() < 1e-9,
            "{} vs {expected}",
            freqs[1]
        );
        assert!(freqs[1] < f && freqs[1] > f / 8.0);
    }
}
