//! LoRA adapters in PEFT's on-disk format, and merging them into the base weights.
//!
//! PEFT stores `adapter_config.json` and `adapter_model.safetensors` with tensors named
//! `base_model.model.<module path>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]);
//! the update is `scale · B·A` with `scale = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
//! We hold A as [in, r] and B as [r, out] so the forward pass is `x·A·B`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

use crate::decoder::{CausalLm, DecoderLayer, LoraBranch, PROJECTIONS};
use crate::error::{Error, Result, read_json};
use crate::weights::{HostTensor, SafetensorsFiles, SaveDtype, write_atomic, write_safetensors};

/// The adapter's settings (a run config's `[lora]` table).
pub use safeprobe_wire::spec::LoraConfig;

/// Adds fresh LoRA branches to the target projections of every layer, initialised as PEFT
/// does: A from Kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero, so the model is unchanged.
/// A is drawn on the host from `seed`, so a run starts the same on every backend.
pub fn attach(model: &mut CausalLm, config: &LoraConfig, seed: u64, device: &Device) -> Result<()> {
    config
        .validate()
        .map_err(|e| Error::Invalid(format!("lora.{e}")))?;
    let mut rng = StdRng::seed_from_u64(seed);
    for layer in &mut model.layers {
        for name in &config.target_modules {
            let linear = layer
                .projection_mut(name)
                .expect("validated projection name");
            let [d_in, d_out] = linear.weight.dims();
            let bound = 1.0 / (d_in as f32).sqrt();
            let values: Vec<f32> = (0..d_in * config.r)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_data(TensorData::new(values, [d_in, config.r]), device);
            let b = Tensor::zeros([config.r, d_out], device);
            linear.lora = Some(LoraBranch::new(a, b, config.scale(), config.dropout));
        }
    }
    Ok(())
}

fn peft_name(layer: usize, projection: &str, part: &str) -> String {
    format!(
        "base_model.model.{}.{part}.weight",
        DecoderLayer::projection_path(layer, projection)
    )
}

/// Writes the adapter in PEFT's format (atomically, file by file).
pub fn save_peft(
    model: &CausalLm,
    config: &LoraConfig,
    dir: &Path,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for name in &config.target_modules {
            let lora = layer
                .projection(name)
                .and_then(|p| p.lora.as_ref())
                .ok_or_else(|| {
                    Error::adapter(dir, format!("layer {l} {name} has no LoRA branch to save"))
                })?;
            tensors.insert(
                peft_name(l, name, "lora_A"),
                HostTensor::from_tensor2(lora.a.val(), true),
            );
            tensors.insert(
                peft_name(l, name, "lora_B"),
                HostTensor::from_tensor2(lora.b.val(), true),
            );
        }
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        SaveDtype::F32,
        Some(metadata),
    )?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    });
    let text = serde_json::to_string_pretty(&adapter_config).expect("json");
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

/// Reads `adapter_config.json`, refusing the PEFT features we do not implement.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let json: Value = read_json(&path)?;
    let bad = |message: String| Error::adapter(&path, message);
    if let Some(kind) = json.get("peft_type").and_then(Value::as_str)
        && kind != "LORA"
    {
        return Err(bad(format!(
            "peft_type \"{kind}\" is not supported (only LORA)"
        )));
    }
    let r = json
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing integer field \"r\"".into()))? as usize;
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .unwrap_or(8.0);
    let dropout = json
        .get("lora_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let target_modules = match json.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("target_modules entry {v} is not a string")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "target_modules as a regular expression (\"{s}\") is not supported; list the modules"
            )));
        }
        _ => return Err(bad("missing list \"target_modules\"".into())),
    };
    let flag = |key: &str| json.get(key).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(bad(
            "use_dora is true: DoRA adapters are not supported".into()
        ));
    }
    if flag("fan_in_fan_out") {
        return Err(bad(
            "fan_in_fan_out is true: not supported (it describes GPT-2-style Conv1D layers; these models use nn.Linear)".into(),
        ));
    }
    if let Some(bias) = json.get("bias").and_then(Value::as_str)
        && bias != "none"
    {
        return Err(bad(format!(
            "bias \"{bias}\" is not supported (only \"none\")"
        )));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(Value::Object(map)) = json.get(key)
            && !map.is_empty()
        {
            return Err(bad(format!(
                "{key} is not supported (per-module ranks or alphas)"
            )));
        }
    }
    for key in ["modules_to_save", "layers_to_transform"] {
        if json.get(key).is_some_and(|v| !v.is_null()) {
            return Err(bad(format!("{key} is not supported")));
        }
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora: flag("use_rslora"),
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// Loads a PEFT adapter onto the model (replacing any branch already there).
pub fn load_peft(model: &mut CausalLm, dir: &Path, device: &Device) -> Result<LoraConfig> {
    let config = read_peft_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        return Err(Error::adapter(
            &path,
            "file not found (only safetensors adapters are supported)",
        ));
    }
    let files = SafetensorsFiles::open_files(&[path.clone()])?;
    let layers = model.layers.len();
    // Every tensor in the file must belong to a projection of this model.
    for name in files.names() {
        let known = (0..layers).any(|l| {
            config
                .target_modules
                .iter()
                .any(|m| name == peft_name(l, m, "lora_A") || name == peft_name(l, m, "lora_B"))
        });
        if !known {
            return Err(Error::adapter(
                &path,
                format!(
                    "tensor \"{name}\" does not match any target module of this {layers}-layer model; is the adapter for a different base model?"
                ),
            ));
        }
    }
    for (l, layer) in model.layers.iter_mut().enumerate() {
        for name in &config.target_modules {
            let linear = layer
                .projection_mut(name)
                .expect("validated projection name");
            let [d_in, d_out] = linear.weight.dims();
            let (a_name, b_name) = (peft_name(l, name, "lora_A"), peft_name(l, name, "lora_B"));
            let mismatch = |e: Error| match e {
                Error::Weights { message, .. } => Error::adapter(
                    &path,
                    format!(
                        "{message} (the base model has {name} of {d_in}→{d_out} with r={}; is the adapter for a different base model?)",
                        config.r
                    ),
                ),
                other => other,
            };
            let a = files
                .tensor2(&a_name, [config.r, d_in], true, device)
                .map_err(mismatch)?;
            let b = files
                .tensor2(&b_name, [d_out, config.r], true, device)
                .map_err(mismatch)?;
            linear.lora = Some(LoraBranch::new(a, b, config.scale(), config.dropout));
        }
    }
    Ok(config)
}

/// Folds every LoRA branch into its base weight and removes the branch.
pub fn merge(model: &mut CausalLm) {
    for layer in &mut model.layers {
        for name in PROJECTIONS {
            let linear = layer.projection_mut(name).expect("known projection");
            if linear.lora.is_some() {
                let merged = linear.merged_weight();
                linear.weight = Param::from_tensor(merged);
                linear.lora = None;
            }
        }
    }
}
