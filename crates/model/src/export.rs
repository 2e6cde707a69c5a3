//! Writing a model (with any LoRA merged in) as a Hugging Face checkpoint that
//! `transformers` loads: config.json, model.safetensors and the tokenizer files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::ModelConfig;
use crate::decoder::{CausalLm, DecoderLayer, PROJECTIONS};
use crate::error::{Error, Result};
use crate::weights::{HostTensor, SaveDtype, write_atomic, write_safetensors};

/// Files copied unchanged from the source checkpoint when present.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Loads `model_dir` (with the PEFT adapter `adapter` merged in, when given) and writes it to
/// `out_dir` as a Hugging Face checkpoint: what `safeprobe export` and the control panel's
/// export both do.
pub fn merge_and_export(
    model_dir: &Path,
    adapter: Option<&Path>,
    out_dir: &Path,
    dtype: SaveDtype,
    device: &burn::tensor::Device,
) -> Result<()> {
    let mut checkpoint = crate::Checkpoint::load(model_dir, device)?;
    if let Some(adapter) = adapter {
        checkpoint.load_adapter(adapter)?;
        crate::lora::merge(&mut checkpoint.model);
    }
    export(
        &checkpoint.model,
        &checkpoint.config,
        &checkpoint.dir,
        out_dir,
        dtype,
    )
}

/// Every weight under its Hugging Face name and layout, LoRA branches merged.
pub fn hf_tensors(model: &CausalLm) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    out.insert(
        "model.embed_tokens.weight".into(),
        HostTensor::from_tensor2(model.embed_tokens.val(), false),
    );
    out.insert(
        "model.norm.weight".into(),
        HostTensor::from_tensor1(model.norm.weight.val()),
    );
    if let Some(head) = &model.lm_head {
        out.insert(
            "lm_head.weight".into(),
            HostTensor::from_tensor2(head.merged_weight(), true),
        );
    }
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.insert(
            format!("{p}.input_layernorm.weight"),
            HostTensor::from_tensor1(layer.input_layernorm.weight.val()),
        );
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            HostTensor::from_tensor1(layer.post_attention_layernorm.weight.val()),
        );
        let attn = &layer.self_attn;
        for (name, norm) in [("q_norm", &attn.q_norm), ("k_norm", &attn.k_norm)] {
            if let Some(norm) = norm {
                out.insert(
                    format!("{p}.self_attn.{name}.weight"),
                    HostTensor::from_tensor1(norm.weight.val()),
                );
            }
        }
        for name in PROJECTIONS {
            let linear = layer.projection(name).expect("known projection");
            let path = DecoderLayer::projection_path(l, name);
            out.insert(
                format!("{path}.weight"),
                HostTensor::from_tensor2(linear.merged_weight(), true),
            );
            if let Some(bias) = &linear.bias {
                out.insert(format!("{path}.bias"), HostTensor::from_tensor1(bias.val()));
            }
        }
    }
    out
}

pub fn export(
    model: &CausalLm,
    config: &ModelConfig,
    source_dir: &Path,
    out_dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    if out_dir.exists()
        && out_dir.join("model.safetensors").exists()
        && same_dir(source_dir, out_dir)
    {
        return Err(Error::Invalid(format!(
            "--out {} is the source checkpoint; choose another directory",
            out_dir.display()
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(
        &out_dir.join("model.safetensors"),
        &hf_tensors(model),
        dtype,
        Some(metadata),
    )?;
    let config_json =
        serde_json::to_string_pretty(&config.to_hf_json(dtype.torch_name())).expect("json");
    write_atomic(&out_dir.join("config.json"), config_json.as_bytes())?;
    for name in TOKENIZER_FILES {
        let from = source_dir.join(name);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            write_atomic(&out_dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
