//! Bad input gets an error that names the file and the problem, never a panic.

mod common;
use common::*;

use std::path::Path;

use burn::tensor::Device;
use safeprobe_model::decoder::CausalLm;
use safeprobe_model::{Checkpoint, LoraConfig, ModelConfig, lora};

/// A writable copy of a fixture checkpoint.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match Checkpoint::load(dir, &Device::flex()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error \"{message}\" does not mention \"{part}\""
        );
    }
}

#[test]
fn missing_files() {
    let dir = copy_of("tiny-tied");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json", "cannot read"]);

    let dir = copy_of("tiny-tied");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_mentions(&load_error(dir.path()), &["tokenizer.json", "not found"]);

    let dir = copy_of("tiny-tied");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_error(dir.path()), &["no model.safetensors"]);

    let dir = copy_of("tiny-untied");
    std::fs::remove_file(dir.path().join("model-00003-of-00011.safetensors")).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model-00003-of-00011.safetensors"],
    );

    assert_mentions(
        &load_error(Path::new("/nonexistent/model")),
        &["/nonexistent/model", "not a directory"],
    );
}

#[test]
fn malformed_json() {
    let dir = copy_of("tiny-tied");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen2\",",
    )
    .unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json", "malformed JSON"]);

    let dir = copy_of("tiny-untied");
    std::fs::write(dir.path().join("model.safetensors.index.json"), "[1, 2").unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors.index.json", "malformed JSON"],
    );
}

#[test]
fn unknown_model_type_and_unsupported_fields() {
    let dir = copy_of("tiny-tied");
    edit_json(&dir.path().join("config.json"), |c| {
        c["model_type"] = "gemma3".into()
    });
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "unsupported model_type \"gemma3\""],
    );

    // A Qwen2 checkpoint labelled Qwen3 lacks the q/k norms (and has biases Qwen3 does not
    // read): the missing tensor is named.
    let dir = copy_of("tiny-tied");
    edit_json(&dir.path().join("config.json"), |c| {
        c["model_type"] = "qwen3".into()
    });
    assert_mentions(
        &load_error(dir.path()),
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_norm.weight",
        ],
    );

    let dir = copy_of("tiny-tied");
    edit_json(&dir.path().join("config.json"), |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "rope_scaling.rope_type \"yarn\""],
    );
}

#[test]
fn tensor_shape_mismatch() {
    let dir = copy_of("tiny-tied");
    edit_json(&dir.path().join("config.json"), |c| {
        c["intermediate_size"] = 128.into()
    });
    assert_mentions(
        &load_error(dir.path()),
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "has shape [160, 64], expected [128, 64]",
        ],
    );
}

#[test]
fn tensor_dtype_mismatch() {
    let dir = copy_of("tiny-tied");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Rewrite the file with the final norm stored as int32.
    let ints: Vec<u8> = vec![0u8; 64 * 4];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .filter(|(n, _)| *n != "model.norm.weight")
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    views.push((
        "model.norm.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![64], &ints).unwrap(),
    ));
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", "model.norm.weight", "dtype I32"],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = copy_of("tiny-tied");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors", "truncated"]);

    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn adapter_for_a_different_base_model() {
    // An adapter trained on a wider model (hidden 32 instead of 64).
    let other = ModelConfig {
        hidden_size: 32,
        ..ModelConfig::from_file(&fixture("tiny-tied/config.json")).unwrap()
    };
    let device = Device::flex();
    let mut model = CausalLm::random(&other, &device);
    let config = LoraConfig {
        target_modules: vec!["q_proj".into()],
        ..LoraConfig::default()
    };
    lora::attach(&mut model, &config, 0, &device).unwrap();
    let adapter = tempfile::tempdir().unwrap();
    lora::save_peft(&model, &config, adapter.path(), "other").unwrap();

    let mut checkpoint = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    let error = checkpoint
        .load_adapter(adapter.path())
        .unwrap_err()
        .to_string();
    assert_mentions(
        &error,
        &[
            "adapter_model.safetensors",
            "lora_A",
            "different base model",
        ],
    );

    // One with more layers than the base has.
    let deeper = ModelConfig {
        num_hidden_layers: 3,
        ..other.clone()
    };
    let deeper = ModelConfig {
        hidden_size: 64,
        ..deeper
    };
    let mut model = CausalLm::random(&deeper, &device);
    lora::attach(&mut model, &config, 0, &device).unwrap();
    lora::save_peft(&model, &config, adapter.path(), "deeper").unwrap();
    let error = checkpoint
        .load_adapter(adapter.path())
        .unwrap_err()
        .to_string();
    assert_mentions(&error, &["model.layers.2", "different base model"]);
}

#[test]
fn bad_adapter_config() {
    let adapter = tempfile::tempdir().unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixture("peft-adapter").join(file),
            adapter.path().join(file),
        )
        .unwrap();
    }
    let mut checkpoint = Checkpoint::load(&fixture("tiny-untied"), &Device::flex()).unwrap();
    edit_json(&adapter.path().join("adapter_config.json"), |c| {
        c["use_dora"] = true.into()
    });
    assert_mentions(
        &checkpoint
            .load_adapter(adapter.path())
            .unwrap_err()
            .to_string(),
        &["adapter_config.json", "use_dora"],
    );

    std::fs::remove_file(adapter.path().join("adapter_config.json")).unwrap();
    assert_mentions(
        &checkpoint
            .load_adapter(adapter.path())
            .unwrap_err()
            .to_string(),
        &["adapter_config.json", "cannot read"],
    );
}
