//! Parity with Hugging Face `transformers` and `peft`, on the CPU backend and on wgpu.
//!
//! The references come from tests/fixtures/make_fixtures.py (reference.json: the Qwen2
//! checkpoints tiny-tied and tiny-untied) and make_arch_fixtures.py (arch_reference.json:
//! tiny-qwen3, tiny-llama with Llama 3 rotary scaling, and tiny-llama-tied).
//! wgpu runs on whatever adapter `--device wgpu` would pick (Mesa's lavapipe in CI).

mod common;
use common::*;

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safeprobe_model::chat::{Message, prompt_messages};
use safeprobe_model::decoder::AttentionLayout;
use safeprobe_model::device::{DeviceChoice, select};
use safeprobe_model::weights::{SafetensorsFiles, SaveDtype};
use safeprobe_model::{Checkpoint, Sampling, export, lora};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

/// reference.json with arch_reference.json's models added to `models`.
fn reference() -> Value {
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(fixture(name)).expect(name);
        serde_json::from_str(&text).unwrap()
    };
    let mut reference = read("reference.json");
    let Value::Object(more) = read("arch_reference.json")["models"].take() else {
        panic!("arch_reference.json has no models")
    };
    reference["models"].as_object_mut().unwrap().extend(more);
    reference
}

fn devices() -> Vec<(&'static str, Device)> {
    let wgpu = select(DeviceChoice::Wgpu)
        .expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)");
    vec![("cpu", Device::flex()), ("wgpu", wgpu.device)]
}

const MODELS: [&str; 5] = [
    "tiny-tied",
    "tiny-untied",
    "tiny-qwen3",
    "tiny-llama",
    "tiny-llama-tied",
];

/// The models of make_arch_fixtures.py, which also records stop ids, rotary frequencies and
/// per-model chat templates.
const NEW_ARCHITECTURES: [&str; 3] = ["tiny-qwen3", "tiny-llama", "tiny-llama-tied"];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn logits(
    checkpoint: &Checkpoint,
    rows: &[Vec<u32>],
    key_mask: Vec<Vec<bool>>,
) -> (Vec<f32>, [usize; 3]) {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().map(|t| *t as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, s]), &checkpoint.device);
    let out = checkpoint
        .model
        .forward(input, &AttentionLayout { key_mask }, None);
    let dims = out.dims();
    (
        out.into_data().convert::<f32>().try_into_vec().unwrap(),
        dims,
    )
}

#[test]
fn logits_match_transformers() {
    let reference = reference();
    for (backend, device) in devices() {
        for name in MODELS {
            let r = &reference["models"][name];
            let checkpoint = Checkpoint::load(&fixture(name), &device).unwrap();
            let input = ids(&r["logits_ids"]);
            let (got, _) = logits(&checkpoint, &[input.clone()], vec![vec![true; input.len()]]);
            let diff = max_abs_diff(&got, &floats(&r["logits"]));
            assert!(
                diff <= TOLERANCE,
                "{name} on {backend}: max |Δlogits| = {diff}"
            );
        }
    }
}

#[test]
fn left_padded_batch_matches_transformers() {
    let reference = reference();
    for (backend, device) in devices() {
        for name in MODELS {
            let r = &reference["models"][name];
            let checkpoint = Checkpoint::load(&fixture(name), &device).unwrap();
            let long = ids(&r["logits_ids"]);
            let short = ids(&r["padded_short_ids"]);
            let pad = long.len() - short.len();
            let padded: Vec<u32> = std::iter::repeat_n(0, pad)
                .chain(short.iter().copied())
                .collect();
            let mask = vec![
                vec![true; long.len()],
                (0..long.len()).map(|i| i >= pad).collect(),
            ];
            let (got, [_, s, v]) = logits(&checkpoint, &[long.clone(), padded], mask);
            let short_rows = &got[(s + pad) * v..2 * s * v];
            let diff = max_abs_diff(short_rows, &floats(&r["padded_short_logits"]));
            assert!(
                diff <= TOLERANCE,
                "{name} on {backend}: padded row max |Δlogits| = {diff}"
            );
            // The long row is unaffected by its neighbour's padding.
            let diff = max_abs_diff(&got[..s * v], &floats(&r["logits"]));
            assert!(
                diff <= TOLERANCE,
                "{name} on {backend}: long row max |Δlogits| = {diff}"
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let reference = reference();
    let sampling = Sampling {
        max_new_tokens: 12,
        ..Sampling::default()
    };
    for (backend, device) in devices() {
        for name in MODELS {
            let r = &reference["models"][name];
            let checkpoint = Checkpoint::load(&fixture(name), &device).unwrap();
            let prompts: Vec<Vec<u32>> = r["greedy_prompts"]
                .as_array()
                .unwrap()
                .iter()
                .map(ids)
                .collect();
            let expected: Vec<Vec<u32>> = r["greedy_single"]
                .as_array()
                .unwrap()
                .iter()
                .map(ids)
                .collect();
            let tok = &checkpoint.tokenizer;
            for (prompt, want) in prompts.iter().zip(&expected) {
                let got = safeprobe_model::generate::generate(
                    &checkpoint.model,
                    &[prompt.clone()],
                    &sampling,
                    &tok.stop_ids,
                    tok.pad_id,
                    &device,
                )
                .unwrap();
                assert_eq!(&got[0], want, "{name} on {backend}: single prompt");
            }
            let batch = safeprobe_model::generate::generate(
                &checkpoint.model,
                &prompts,
                &sampling,
                &tok.stop_ids,
                tok.pad_id,
                &device,
            )
            .unwrap();
            let expected_batch: Vec<Vec<u32>> = r["greedy_batch"]
                .as_array()
                .unwrap()
                .iter()
                .map(ids)
                .collect();
            assert_eq!(
                batch, expected_batch,
                "{name} on {backend}: left-padded batch"
            );
        }
    }
}

#[test]
fn chat_template_renderings_equal_transformers() {
    let reference = reference();
    // tiny-tied carries the template in tokenizer_config.json, tiny-untied in
    // chat_template.jinja; the Qwen3 and Llama 3.2 templates are their models' own.
    for name in MODELS {
        let checkpoint = Checkpoint::load(&fixture(name), &Device::flex()).unwrap();
        let cases = match &reference["models"][name]["templates"] {
            Value::Null => &reference["templates"],
            own => own,
        };
        for case in cases.as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let generation = case["add_generation_prompt"].as_bool().unwrap();
            let got = checkpoint.tokenizer.render(&messages, generation).unwrap();
            // Llama's template shows today's date (strftime_now); the reference was rendered
            // on another day.
            let want = case["text"]
                .as_str()
                .unwrap()
                .replace("{{today}}", &safeprobe_model::chat::today("%d %b %Y"));
            assert_eq!(
                got, want,
                "{name}: {messages:?} (generation prompt {generation})"
            );
        }
    }
}

#[test]
fn new_architectures_stop_ids_and_rotary_frequencies_match_transformers() {
    let reference = reference();
    for name in NEW_ARCHITECTURES {
        let r = &reference["models"][name];
        let checkpoint = Checkpoint::load(&fixture(name), &Device::flex()).unwrap();
        assert_eq!(checkpoint.tokenizer.stop_ids, ids(&r["stop_ids"]), "{name}");
        assert_eq!(
            checkpoint.tokenizer.pad_id,
            r["pad_id"].as_u64().unwrap() as u32,
            "{name}"
        );
        let want = floats(&r["rope_inv_freq"]);
        let got = &checkpoint.model.rope_inv_freq;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| ((g - w) / w).abs())
            .fold(0.0f32, f32::max);
        assert!(
            got.len() == want.len() && worst < 1e-6,
            "{name}: inverse frequencies {got:?} vs transformers' {want:?}"
        );
    }
    // Llama 3's scaling divides the long wavelengths: the plain frequencies differ.
    let llama = Checkpoint::load(&fixture("tiny-llama"), &Device::flex()).unwrap();
    let plain = safeprobe_model::ModelConfig {
        rope_scaling: None,
        ..llama.config.clone()
    }
    .rope_inv_freq();
    assert!(
        plain
            .iter()
            .zip(&llama.model.rope_inv_freq)
            .any(|(p, s)| p / s > 7.9)
    );
}

#[test]
fn response_scores_match_transformers() {
    let reference = reference();
    for (backend, device) in devices() {
        for name in MODELS {
            let checkpoint = Checkpoint::load(&fixture(name), &device).unwrap();
            for case in reference["models"][name]["scores"].as_array().unwrap() {
                let messages =
                    prompt_messages(case["system"].as_str(), case["prompt"].as_str().unwrap());
                let score = checkpoint
                    .score(&messages, case["response"].as_str().unwrap())
                    .unwrap();
                assert_eq!(
                    score.token_ids,
                    ids(&case["token_ids"]),
                    "{name}: response tokens"
                );
                assert_eq!(
                    *score.token_ids.last().unwrap(),
                    checkpoint.tokenizer.end_of_turn_id.unwrap()
                );
                // Llama's template puts the day it renders on into the prompt, and the response's
                // log-probabilities depend on it: they are compared on the prompt rendered with
                // the reference's date, through the scoring `Checkpoint::score` ends in.
                let prompt = match reference["models"][name]["rendered_on"].as_str() {
                    Some(day) => {
                        let today = safeprobe_model::chat::today("%d %b %Y");
                        let text = checkpoint.tokenizer.render(&messages, true).unwrap();
                        checkpoint
                            .tokenizer
                            .encode(&text.replace(&today, day))
                            .unwrap()
                    }
                    None => checkpoint.tokenizer.encode_prompt(&messages).unwrap(),
                };
                let logprobs = safeprobe_model::generate::score(
                    &checkpoint.model,
                    &prompt,
                    &score.token_ids,
                    &checkpoint.device,
                )
                .unwrap()
                .logprobs;
                let diff = max_abs_diff(&logprobs, &floats(&case["logprobs"]));
                assert!(
                    diff <= TOLERANCE,
                    "{name} on {backend}: max |Δlogprob| = {diff}"
                );
                let sum: f32 = score.logprobs.iter().sum();
                assert!((score.total - sum).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn peft_adapter_matches_peft() {
    let reference = reference();
    let input = ids(&reference["models"]["tiny-untied"]["logits_ids"]);
    for (backend, device) in devices() {
        let mut checkpoint = Checkpoint::load(&fixture("tiny-untied"), &device).unwrap();
        let (plain, _) = logits(&checkpoint, &[input.clone()], vec![vec![true; input.len()]]);
        checkpoint.load_adapter(&fixture("peft-adapter")).unwrap();
        let (adapted, _) = logits(&checkpoint, &[input.clone()], vec![vec![true; input.len()]]);
        let expected = floats(&reference["adapter_logits"]);
        let diff = max_abs_diff(&adapted, &expected);
        assert!(
            diff <= TOLERANCE,
            "adapter on {backend}: max |Δlogits| = {diff}"
        );
        // The adapter really changes the model, so the comparison above can fail.
        assert!(max_abs_diff(&plain, &expected) > 100.0 * TOLERANCE);
    }
}

#[test]
fn peft_adapters_on_qwen3_and_llama_match_peft() {
    // LoRA on all seven projections: on Qwen3 q_proj is 64 → 128 and o_proj 128 → 64
    // (explicit head_dim), on Llama k/v are 64 → 16 (one key-value head).
    let reference = reference();
    for name in ["tiny-qwen3", "tiny-llama"] {
        let r = &reference["models"][name];
        let input = ids(&r["logits_ids"]);
        for (backend, device) in devices() {
            let mut checkpoint = Checkpoint::load(&fixture(name), &device).unwrap();
            let full = vec![vec![true; input.len()]];
            let (plain, _) = logits(&checkpoint, &[input.clone()], full.clone());
            checkpoint
                .load_adapter(&fixture(&format!("peft-adapters/{name}")))
                .unwrap();
            let (adapted, _) = logits(&checkpoint, &[input.clone()], full);
            let expected = floats(&r["adapter_logits"]);
            let diff = max_abs_diff(&adapted, &expected);
            assert!(
                diff <= TOLERANCE,
                "{name} adapter on {backend}: max |Δlogits| = {diff}"
            );
            assert!(max_abs_diff(&plain, &expected) > 100.0 * TOLERANCE);
        }
    }
}

/// Every tensor of two safetensors files, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let files = SafetensorsFiles::open_files(&[path.to_path_buf()]).unwrap();
    files
        .names()
        .map(|name| {
            let (shape, _) = files.info(name).unwrap();
            (
                name.to_string(),
                shape.clone(),
                files.read_f32(name, &shape).unwrap(),
            )
        })
        .collect()
}

#[test]
fn adapter_round_trip_keeps_peft_format() {
    let out = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut checkpoint = Checkpoint::load(&fixture("tiny-untied"), &device).unwrap();
    checkpoint.load_adapter(&fixture("peft-adapter")).unwrap();
    let config = checkpoint.adapter.clone().unwrap();
    lora::save_peft(&checkpoint.model, &config, out.path(), "tiny-untied").unwrap();
    // Same tensor names, shapes and values as the file peft wrote.
    assert_eq!(
        tensors(&out.path().join("adapter_model.safetensors")),
        tensors(&fixture("peft-adapter/adapter_model.safetensors"))
    );
    assert_eq!(lora::read_peft_config(out.path()).unwrap(), config);
    // peft verified this very format (make_fixtures.py check-rust on rust-adapter/).
    let verified = fixture("rust-adapter/adapter_model.safetensors");
    assert_eq!(
        tensors(&out.path().join("adapter_model.safetensors")),
        tensors(&verified)
    );
}

#[test]
fn merged_export_loads_back_with_merged_logits() {
    let reference = reference();
    let input = ids(&reference["models"]["tiny-untied"]["logits_ids"]);
    for (backend, device) in devices() {
        let out = tempfile::tempdir().unwrap();
        let mut checkpoint = Checkpoint::load(&fixture("tiny-untied"), &device).unwrap();
        checkpoint.load_adapter(&fixture("peft-adapter")).unwrap();
        lora::merge(&mut checkpoint.model);
        export::export(
            &checkpoint.model,
            &checkpoint.config,
            &fixture("tiny-untied"),
            out.path(),
            SaveDtype::F32,
        )
        .unwrap();
        let exported = Checkpoint::load(out.path(), &device).unwrap();
        let (got, _) = logits(&exported, &[input.clone()], vec![vec![true; input.len()]]);
        let diff = max_abs_diff(&got, &floats(&reference["merged_logits"]));
        assert!(
            diff <= TOLERANCE,
            "export on {backend}: max |Δlogits| = {diff}"
        );
        if backend == "cpu" {
            // transformers verified this format (make_fixtures.py check-rust on rust-export/).
            let ours = tensors(&out.path().join("model.safetensors"));
            let verified = tensors(&fixture("rust-export/model.safetensors"));
            assert_eq!(ours.len(), verified.len());
            for ((n1, s1, v1), (n2, s2, v2)) in ours.iter().zip(&verified) {
                assert_eq!((n1, s1), (n2, s2));
                assert!(max_abs_diff(v1, v2) <= 1e-6, "{n1}");
            }
        }
    }
}

#[test]
fn bf16_export_is_readable() {
    let out = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut checkpoint = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    lora::attach(&mut checkpoint.model, &Default::default(), 0, &device).unwrap();
    lora::merge(&mut checkpoint.model);
    export::export(
        &checkpoint.model,
        &checkpoint.config,
        &fixture("tiny-tied"),
        out.path(),
        SaveDtype::Bf16,
    )
    .unwrap();
    let exported = Checkpoint::load(out.path(), &device).unwrap();
    let input: Vec<u32> = vec![5, 6, 7];
    let (a, _) = logits(&checkpoint, &[input.clone()], vec![vec![true; 3]]);
    let (b, _) = logits(&exported, &[input], vec![vec![true; 3]]);
    // tiny-tied's weights are bf16 already and a fresh LoRA has B = 0, so nothing is rounded.
    assert!(max_abs_diff(&a, &b) <= TOLERANCE);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn generation_stops_at_end_of_turn() {
    let device = Device::flex();
    let checkpoint = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    let prompt = checkpoint
        .tokenizer
        .encode_prompt(&prompt_messages(None, "Hello!"))
        .unwrap();
    let free = Sampling {
        max_new_tokens: 6,
        ..Sampling::default()
    };
    let run = |stop: &[u32]| {
        safeprobe_model::generate::generate(
            &checkpoint.model,
            &[prompt.clone()],
            &free,
            stop,
            0,
            &device,
        )
        .unwrap()
        .remove(0)
    };
    let unstopped = run(&[]);
    assert_eq!(unstopped.len(), 6);
    // Declare the third greedy token a stop token: generation ends right after it.
    let stopped = run(&[unstopped[2]]);
    assert_eq!(stopped, unstopped[..3].to_vec());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let device = Device::flex();
    let checkpoint = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    let messages = prompt_messages(None, "Hello!");
    let sampled = |seed| {
        checkpoint
            .generate(
                &messages,
                &Sampling {
                    max_new_tokens: 8,
                    temperature: 1.0,
                    top_p: 0.9,
                    seed,
                },
            )
            .unwrap()
            .1
    };
    assert_eq!(sampled(7), sampled(7));
    assert_ne!(sampled(7), sampled(8));
}

/// Writes tests/fixtures/rust-adapter and rust-export for `make_fixtures.py check-rust`,
/// which loads them with peft and transformers. Run after changing the writers:
/// `cargo test --release --test parity -- --ignored write_fixture_outputs`.
#[test]
#[ignore]
fn write_fixture_outputs() {
    let device = Device::flex();
    let mut checkpoint = Checkpoint::load(&fixture("tiny-untied"), &device).unwrap();
    checkpoint.load_adapter(&fixture("peft-adapter")).unwrap();
    let config = checkpoint.adapter.clone().unwrap();
    lora::save_peft(
        &checkpoint.model,
        &config,
        &fixture("rust-adapter"),
        "tiny-untied",
    )
    .unwrap();
    lora::merge(&mut checkpoint.model);
    export::export(
        &checkpoint.model,
        &checkpoint.config,
        &fixture("tiny-untied"),
        &fixture("rust-export"),
        SaveDtype::F32,
    )
    .unwrap();
}
