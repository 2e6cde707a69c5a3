//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `checkpoints/step-N/` holds `state.safetensors` (trainable parameters, AdamW moments, and
//! what the method carries: SAP's probe, its moments and the cached harmful direction, Lisa's
//! anchor, …) and `state.json` (counters, the method's under its name). The data
//! position needs no storage: the samplers are deterministic in the seed and are replayed to
//! the saved step. A checkpoint is written to a temporary folder and renamed into place, so
//! an interrupted save never replaces a good checkpoint with a broken one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safeprobe_model::decoder::CausalLm;
use safeprobe_model::weights::{
    HostTensor, SafetensorsFiles, SaveDtype, write_atomic, write_safetensors,
};
use serde::{Deserialize, Serialize};

use crate::adamw::AdamW;
use crate::config::Method;
use crate::error::{Result, TrainError};
use crate::methods::{Restore, StepMethod};
use crate::params;

#[derive(Debug, Serialize, Deserialize)]
struct Counters {
    step: usize,
    adam_step: u64,
    params: usize,
    /// The method that wrote it (absent before methods were parts: `sap` then held SAP's
    /// counters, or null for SFT).
    #[serde(default)]
    method: Option<Method>,
    /// The method's own counters, under its name.
    #[serde(flatten)]
    method_counters: serde_json::Map<String, serde_json::Value>,
}

fn host(tensors: &[Tensor<1>], prefix: &str, out: &mut BTreeMap<String, HostTensor>) {
    for (i, t) in tensors.iter().enumerate() {
        out.insert(format!("{prefix}.{i}"), HostTensor::from_tensor1(t.clone()));
    }
}

/// Saves the state after `step` completed steps; returns the checkpoint folder.
pub fn save(
    run_dir: &Path,
    step: usize,
    model: &CausalLm,
    optimizer: &AdamW,
    method: Method,
    state: &dyn StepMethod,
) -> Result<PathBuf> {
    let io = |path: &Path, e: std::io::Error| TrainError::File {
        path: path.into(),
        message: e.to_string(),
    };
    let parent = run_dir.join("checkpoints");
    let final_dir = parent.join(format!("step-{step}"));
    let tmp = parent.join(format!(".step-{step}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;

    let mut tensors = BTreeMap::new();
    let values = params::values(model);
    host(&values, "param", &mut tensors);
    host(&optimizer.first, "adam.m", &mut tensors);
    host(&optimizer.second, "adam.v", &mut tensors);
    let saved = state.save();
    for (group, group_tensors) in &saved.tensors {
        host(group_tensors, group, &mut tensors);
    }
    write_safetensors(
        &tmp.join("state.safetensors"),
        &tensors,
        SaveDtype::F32,
        None,
    )?;
    let counters = Counters {
        step,
        adam_step: optimizer.step,
        params: values.len(),
        method: Some(method),
        method_counters: [(method.name().to_string(), saved.counters)]
            .into_iter()
            .collect(),
    };
    write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&counters)
            .expect("json")
            .as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    Ok(final_dir)
}

/// The complete checkpoints of a run, oldest first.
pub fn all(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<usize>()
                .ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Option<(usize, PathBuf)> {
    all(run_dir).pop()
}

/// Deletes all but the newest `keep` checkpoints (0 keeps every one), so a long run's disk
/// use stays bounded.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let found = all(run_dir);
    for (_, dir) in &found[..found.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::File {
            path: dir.clone(),
            message: format!("cannot delete an old checkpoint: {e}"),
        })?;
    }
    Ok(())
}

/// Restores model parameters, optimiser and the method's state; returns the completed step
/// count.
pub fn load(
    dir: &Path,
    model: &mut CausalLm,
    optimizer: &mut AdamW,
    method: Method,
    state: &mut dyn StepMethod,
    device: &Device,
) -> Result<usize> {
    let json_path = dir.join("state.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| TrainError::File {
        path: json_path.clone(),
        message: e.to_string(),
    })?;
    let counters: Counters = serde_json::from_str(&text).map_err(|e| TrainError::File {
        path: json_path.clone(),
        message: format!("malformed JSON: {e}"),
    })?;
    let files = SafetensorsFiles::open_files(&[dir.join("state.safetensors")])?;
    let read = |prefix: &str, count: usize| -> Result<Vec<Tensor<1>>> {
        (0..count)
            .map(|i| {
                let name = format!("{prefix}.{i}");
                let (shape, _) = files.info(&name).ok_or_else(|| TrainError::File {
                    path: dir.join("state.safetensors"),
                    message: format!("missing tensor \"{name}\""),
                })?;
                let n: usize = shape.iter().product();
                let values = files.read_f32(&name, &shape)?;
                let t: Tensor<1> = Tensor::from_data(TensorData::new(values, [n]), device);
                Ok(if t.is_autodiff() { t.inner() } else { t })
            })
            .collect()
    };
    let current = params::values(model);
    if current.len() != counters.params {
        return Err(TrainError::File {
            path: json_path,
            message: format!(
                "checkpoint has {} trainable tensors, the run has {}",
                counters.params,
                current.len()
            ),
        });
    }
    let values = read("param", counters.params)?;
    for (i, (a, b)) in values.iter().zip(&current).enumerate() {
        if a.dims() != b.dims() {
            return Err(TrainError::File {
                path: dir.join("state.safetensors"),
                message: format!(
                    "param.{i} has {:?} elements, the run expects {:?}",
                    a.dims(),
                    b.dims()
                ),
            });
        }
    }
    *model = params::with_values(model.clone(), values);
    optimizer.step = counters.adam_step;
    if counters.adam_step > 0 {
        optimizer.first = read("adam.m", counters.params)?;
        optimizer.second = read("adam.v", counters.params)?;
    }
    let written_by = counters
        .method
        .unwrap_or(match counters.method_counters.get("sap") {
            Some(sap) if !sap.is_null() => Method::Sap,
            _ => Method::Sft,
        });
    // SFT and mixing differ in their data only.
    let same = |m: Method| if m == Method::Mix { Method::Sft } else { m };
    if same(written_by) != same(method) {
        return Err(TrainError::File {
            path: json_path,
            message: format!(
                "checkpoint and run disagree on the method ({} vs {})",
                written_by.name(),
                method.name()
            ),
        });
    }
    let null = serde_json::Value::Null;
    state.restore(&Restore {
        counters: counters.method_counters.get(method.name()).unwrap_or(&null),
        read: &read,
        params: counters.params,
        origin: &json_path,
    })?;
    Ok(counters.step)
}
