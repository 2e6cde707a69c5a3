//! GGUF import: block decoders against gguf-py's numpy decoder, imported checkpoints against
//! the checkpoints they were converted from and against transformers' own GGUF loading, and
//! refusals that name what is wrong.
//!
//! The fixtures in tests/fixtures/gguf/ come from tests/fixtures/make_gguf.py, the
//! transformers reference from tests/fixtures/make_gguf_reference.py.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safeprobe_model::decoder::AttentionLayout;
use safeprobe_model::gguf::Gguf;
use safeprobe_model::import::import_gguf;
use safeprobe_model::weights::{SafetensorsFiles, SaveDtype};
use safeprobe_model::{Checkpoint, Message};

fn gguf_fixture(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

fn import(name: &str, dtype: SaveDtype) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported");
    import_gguf(&gguf_fixture(name), &out, dtype).unwrap();
    (dir, out)
}

fn logits(checkpoint: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let flat: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let input =
        Tensor::<2, Int>::from_data(TensorData::new(flat, [1, ids.len()]), &checkpoint.device);
    let layout = AttentionLayout {
        key_mask: vec![vec![true; ids.len()]],
    };
    let out = checkpoint.model.forward(input, &layout, None);
    out.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// 50 strings of the kinds a tokenizer gets wrong first: code, CJK, emoji (multi-codepoint
/// too), whitespace runs, digits, contractions, special tokens, combining marks, and pairs of
/// them joined so boundaries between scripts are covered (gguf/mixed_strings.json, which
/// make_gguf_reference.py feeds transformers as well).
fn mixed_strings() -> Vec<String> {
    let text = std::fs::read_to_string(gguf_fixture("mixed_strings.json")).unwrap();
    let strings: Vec<String> = serde_json::from_str(&text).unwrap();
    assert_eq!(strings.len(), 50);
    strings
}

#[test]
fn every_block_type_decodes_as_gguf_py_does() {
    let file = Gguf::open(&gguf_fixture("quants.gguf")).unwrap();
    let names = [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k",
    ];
    for name in names {
        let tensor = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} in fixture"));
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        assert_eq!(tensor.hf_shape(), vec![4, 256], "{name}");
        let got = file.read_f32(tensor).unwrap();
        let want = file.read_f32(expected).unwrap();
        // numpy may associate a product differently from ggml's C, so allow a few ulps.
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= scale * 1e-6,
            "{name}: max |diff| {diff} (values up to {scale})"
        );
    }
}

#[test]
fn an_f32_import_is_the_original_checkpoint() {
    let device = Device::flex();
    let (_tmp, out) = import("tiny-tied-f32.gguf", SaveDtype::F32);
    let original = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    let imported = Checkpoint::load(&out, &device).unwrap();
    assert_eq!(imported.config, original.config);

    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
    let diff = max_abs_diff(&logits(&imported, &ids), &logits(&original, &ids));
    assert!(diff == 0.0, "logits differ by {diff}");

    for text in mixed_strings() {
        assert_eq!(
            imported.tokenizer.encode(&text).unwrap(),
            original.tokenizer.encode(&text).unwrap(),
            "token ids of {text:?}"
        );
    }
    let conversation = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi 你好 😀"),
    ];
    assert_eq!(
        imported.tokenizer.render(&conversation, true).unwrap(),
        original.tokenizer.render(&conversation, true).unwrap()
    );
    assert_eq!(imported.tokenizer.stop_ids, original.tokenizer.stop_ids);
    assert_eq!(imported.tokenizer.pad_id, original.tokenizer.pad_id);
}

/// Llama 3 and Qwen3 files import to their original checkpoints: llama's q and k rows come
/// back from llama.cpp's rotary layout, its llama3 rope scaling from the rope_freqs factors,
/// Qwen3's head_dim from attention.key_length and its q/k norms by name. (transformers' own
/// GGUF loading is no reference here: it drops the rope_freqs scaling, which moves these
/// logits by 7.0, and ignores Qwen3's key_length, so the Qwen3 file fails to load.)
#[test]
fn llama_and_qwen3_imports_are_their_original_checkpoints() {
    let device = Device::flex();
    for (file, original) in [
        ("tiny-llama-f32.gguf", "tiny-llama"),
        ("tiny-qwen3-f32.gguf", "tiny-qwen3"),
    ] {
        let (_tmp, out) = import(file, SaveDtype::F32);
        let original = Checkpoint::load(&fixture(original), &device).unwrap();
        let imported = Checkpoint::load(&out, &device).unwrap();
        // config.json keeps the file's one eos id; the stop ids (generation_config.json)
        // are compared below.
        let mut config = imported.config.clone();
        config.eos_token_ids = original.config.eos_token_ids.clone();
        assert_eq!(config, original.config, "{file}");
        let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 512).collect();
        let diff = max_abs_diff(&logits(&imported, &ids), &logits(&original, &ids));
        assert!(diff <= 1e-5, "{file}: logits differ by {diff}");
        for text in mixed_strings() {
            assert_eq!(
                imported.tokenizer.encode(&text).unwrap(),
                original.tokenizer.encode(&text).unwrap(),
                "{file}: token ids of {text:?}"
            );
        }
        let conversation = [Message::new("user", "Hi 你好 😀")];
        assert_eq!(
            imported.tokenizer.render(&conversation, true).unwrap(),
            original.tokenizer.render(&conversation, true).unwrap(),
            "{file}"
        );
        assert_eq!(
            imported.tokenizer.stop_ids, original.tokenizer.stop_ids,
            "{file}"
        );
    }
    // Quantised, the weights are the original's up to Q8_0's step (see the bound below).
    let (_tmp, out) = import("tiny-llama-q8_0.gguf", SaveDtype::F32);
    let (error, name) = worst_weight_error(&out, "tiny-llama");
    assert!(
        error <= 0.01,
        "tiny-llama-q8_0.gguf: {name} is off by {error:.5}"
    );
    // Encoding with special tokens starts with bos, as Llama 3's tokenizer does.
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
    assert_eq!(tokenizer.encode("Hi", true).unwrap().get_ids()[0], bos);
}

#[test]
fn imports_match_transformers_own_gguf_loading() {
    // transformers dequantises GGUF tensors to f32 itself (gguf_file=...), and builds its
    // tokenizer from tokenizer.ggml.*; make_gguf_reference.py recorded both.
    let text = std::fs::read_to_string(gguf_fixture("transformers_reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = reference["logits_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let strings = mixed_strings();
    let files = reference["files"].as_object().unwrap();
    assert_eq!(
        files.len(),
        9,
        "every qwen2 tiny-*.gguf fixture has a reference"
    );
    for (file, expected) in files {
        let (_tmp, out) = import(file, SaveDtype::F32);
        let imported = Checkpoint::load(&out, &Device::flex()).unwrap();
        let want: Vec<f32> = expected["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let diff = max_abs_diff(&logits(&imported, &ids), &want);
        assert!(
            diff <= 1e-4,
            "{file}: max |Δlogits| = {diff} against transformers"
        );
        let nfc_stable = reference["nfc_stable"].as_array().unwrap();
        let cases = strings
            .iter()
            .zip(expected["token_ids"].as_array().unwrap())
            .zip(nfc_stable)
            // transformers' GGUF tokenizer drops the NFC normalizer Qwen2's tokenizer.json
            // has; the import keeps it, and an_f32_import_is_the_original_checkpoint checks
            // those strings against the original tokenizer.
            .filter(|(_, stable)| stable.as_bool().unwrap())
            .map(|(case, _)| case)
            .collect::<Vec<_>>();
        assert_eq!(cases.len(), 47, "three strings carry a combining accent");
        for (text, want) in cases {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                imported.tokenizer.encode(text).unwrap(),
                want,
                "{file}: token ids of {text:?}"
            );
        }
    }
}

/// Relative RMS error of every imported weight against the original checkpoint's.
fn worst_weight_error(imported: &Path, original: &str) -> (f64, String) {
    let a = SafetensorsFiles::open_checkpoint(imported).unwrap();
    let b = SafetensorsFiles::open_checkpoint(&fixture(original)).unwrap();
    let names: Vec<String> = b.names().map(str::to_string).collect();
    assert_eq!(
        a.names().count(),
        names.len(),
        "the import has the original's tensors"
    );
    let mut worst = (0.0, String::new());
    for name in names {
        let (shape, _) = b.info(&name).unwrap();
        let error = relative_error(
            &a.read_f32(&name, &shape).unwrap(),
            &b.read_f32(&name, &shape).unwrap(),
        );
        if error > worst.0 {
            worst = (error, name);
        }
    }
    worst
}

#[test]
fn quantised_imports_are_the_original_up_to_their_precision() {
    // Bounds from each format's step size, not from a run: bf16 holds the bf16 originals
    // exactly; f16 has 3 more mantissa bits than bf16 (values this small stay normal);
    // Q8_0's step is max|block|/127, an RMS error of ~0.3% of a Gaussian block's RMS; Q5_0's is
    // max/16, ~2%. Twice those allow for heavy-tailed blocks; a transposed or misordered
    // tensor is off by ~140%.
    let cases = [
        ("tiny-tied-bf16.gguf", "tiny-tied", 0.0),
        ("tiny-tied-f16.gguf", "tiny-tied", 1e-3),
        ("tiny-tied-q8_0.gguf", "tiny-tied", 0.01),
        ("tiny-tied-q5_0.gguf", "tiny-tied", 0.05),
        // Q5_1 (a minimum and a step per block) is at least as fine as Q5_0. Q4_0's step is
        // max/8 and Q4_1's range/15, an RMS error of ~8% of a Gaussian block's RMS: 2.5× that.
        ("tiny-tied-q5_1.gguf", "tiny-tied", 0.05),
        ("tiny-tied-q4_0.gguf", "tiny-tied", 0.2),
        ("tiny-tied-q4_1.gguf", "tiny-tied", 0.2),
        ("tiny-untied-q8_0.gguf", "tiny-untied", 0.01),
    ];
    for (file, original, bound) in cases {
        let (_tmp, out) = import(file, SaveDtype::F32);
        let (error, name) = worst_weight_error(&out, original);
        assert!(
            error <= bound,
            "{file}: {name} is off by {error:.5} (bound {bound})"
        );
        // And it loads and runs as a model.
        Checkpoint::load(&out, &Device::flex()).unwrap();
    }
}

#[test]
fn a_bf16_import_writes_bf16() {
    let (_tmp, out) = import("tiny-tied-q8_0.gguf", SaveDtype::Bf16);
    let files = SafetensorsFiles::open_checkpoint(&out).unwrap();
    let (_, dtype) = files.info("model.embed_tokens.weight").unwrap();
    assert_eq!(dtype, safetensors::Dtype::BF16);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(
        config["rms_norm_eps"], 1e-6,
        "the f32 epsilon reads as written"
    );
}

// ---- refusals --------------------------------------------------------------------------

/// A copy of a fixture with `edit` applied to its bytes.
fn edited(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf_fixture(name)).unwrap();
    edit(&mut bytes);
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} in fixture", String::from_utf8_lossy(needle)))
}

/// Overwrites the ggml type id of a one-dimensional tensor's table entry.
fn set_type_of_1d_tensor(bytes: &mut [u8], tensor: &str, type_id: u32) {
    let mut entry = (tensor.len() as u64).to_le_bytes().to_vec();
    entry.extend_from_slice(tensor.as_bytes());
    entry.extend_from_slice(&1u32.to_le_bytes());
    let at = find(bytes, &entry) + entry.len() + 8;
    bytes[at..at + 4].copy_from_slice(&type_id.to_le_bytes());
}

fn import_error(path: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported");
    let error = import_gguf(path, &out, SaveDtype::F32)
        .expect_err("a broken file was imported")
        .to_string();
    assert!(!out.exists(), "a failed import left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "a failed import left {leftovers:?}");
    error
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(error.contains(part), "{part:?} not in: {error}");
    }
}

#[test]
fn a_truncated_file_is_refused_with_where_it_ends() {
    for keep in [3, 100, 20_000, 90_000] {
        let (_dir, path) = edited("tiny-tied-q5_0.gguf", |b| b.truncate(keep));
        let error = import_error(&path);
        assert_mentions(&error, &["tiny-tied-q5_0.gguf", "truncated"]);
    }
}

#[test]
fn an_unsupported_or_unknown_type_is_refused_by_name() {
    // 16 is IQ2_XXS: a real type whose decoder we do not have. Its size check comes first, and
    // a 64-wide row does not fill a 256-value block, which is refused naming the tensor.
    let (_dir, path) = edited("tiny-tied-f32.gguf", |b| {
        set_type_of_1d_tensor(b, "output_norm.weight", 16)
    });
    assert_mentions(
        &import_error(&path),
        &["output_norm.weight", "IQ2_XXS", "blocks of 256"],
    );
    // 20 is IQ4_NL (blocks of 32): sized fine, then refused for want of a decoder. Its 64
    // values take 36 bytes instead of 256, so the file is still long enough.
    let (_dir, path) = edited("tiny-tied-f32.gguf", |b| {
        set_type_of_1d_tensor(b, "output_norm.weight", 20)
    });
    assert_mentions(
        &import_error(&path),
        &["output_norm.weight", "IQ4_NL", "not supported", "Q4_K"],
    );
    let (_dir, path) = edited("tiny-tied-f32.gguf", |b| {
        set_type_of_1d_tensor(b, "output_norm.weight", 99)
    });
    assert_mentions(
        &import_error(&path),
        &["output_norm.weight", "unknown ggml type id 99"],
    );
}

#[test]
fn an_unknown_architecture_or_missing_tokenizer_is_refused_by_name() {
    let (_dir, path) = edited("tiny-tied-q8_0.gguf", |b| {
        // The value of general.architecture: its string follows the key and type 8.
        let key = b"general.architecture";
        let at = find(b, key) + key.len() + 4 + 8;
        b[at..at + 5].copy_from_slice(b"gemma");
    });
    assert_mentions(
        &import_error(&path),
        &[
            "general.architecture \"gemma\" is not supported",
            "qwen2, qwen3, llama",
        ],
    );

    let (_dir, path) = edited("tiny-tied-q8_0.gguf", |b| {
        let at = find(b, b"tokenizer.ggml.merges");
        b[at..at + 21].copy_from_slice(b"tokenizer.ggml.mergez");
    });
    assert_mentions(
        &import_error(&path),
        &[
            "tiny-tied-q8_0.gguf",
            "missing metadata key \"tokenizer.ggml.merges\"",
        ],
    );

    let (_dir, path) = edited("tiny-tied-q8_0.gguf", |b| {
        let at = find(b, b"tokenizer.ggml.pre") + 18 + 4 + 8;
        b[at..at + 5].copy_from_slice(b"falcn");
    });
    assert_mentions(&import_error(&path), &["tokenizer.ggml.pre \"falcn\""]);

    let (_dir, path) = edited("tiny-tied-q8_0.gguf", |b| b[..4].copy_from_slice(b"GGML"));
    assert_mentions(&import_error(&path), &["not a GGUF file"]);
}

#[test]
fn an_occupied_output_folder_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let error = import_gguf(&gguf_fixture("tiny-tied-q8_0.gguf"), &out, SaveDtype::Bf16)
        .unwrap_err()
        .to_string();
    assert_mentions(&error, &["not empty"]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // An empty folder is fine: it is what `mkdir` before an import leaves.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    import_gguf(
        &gguf_fixture("tiny-tied-q8_0.gguf"),
        &empty,
        SaveDtype::Bf16,
    )
    .unwrap();
    assert!(empty.join("model.safetensors").exists());
}
