//! The embedded demo model: a small Qwen2-architecture chat model with its own byte-level BPE
//! tokenizer and a Qwen-style (ChatML) template, in the on-disk layout of a Hugging Face
//! checkpoint, so that it loads through exactly the code that loads Qwen2.5.
//!
//! `build` makes it from nothing with the project's own pipeline: it trains the tokenizer on
//! the training texts, writes a randomly initialised checkpoint, trains every weight with the
//! ordinary trainer (SFT, full fine-tuning) to answer the benign tasks and to refuse harmful
//! requests, and measures the result on the held-out harmful prompts and task test splits.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safeprobe_model::weights::{SaveDtype, write_atomic, write_safetensors};
use safeprobe_model::{CausalLm, Checkpoint, ModelConfig, export};
use safeprobe_train::run::{Event, RunConfig, RunFile};
use safeprobe_train::safety_check;
use serde::Serialize;
use serde_json::json;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::builtin::{self, PairRole, write_labelled};
use crate::error::{EvalError, Result};
use crate::harmful::{self, AnswerSettings, Judges};
use crate::howto;
use crate::judge::RefusalJudge;
use crate::prompts::HarmfulPrompt;
use crate::requests;
use crate::task_metrics::{self, TaskSettings};
use crate::tasks::{Labelled, Task};

/// The seed of the built-in task splits everything uses, so that no test example of one
/// command is a training example of another.
pub const DATA_SEED: u64 = 0;

/// The ChatML template Qwen uses, without Qwen's default system prompt (short sequences keep
/// the demo fast on a CPU).
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

#[derive(Debug, Clone, Serialize)]
pub struct DemoSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// How many arithmetic problems the demo model sees (the comparison fine-tunes on more).
    pub arithmetic_examples: usize,
    /// How often each refusal example is repeated in the training mix.
    pub refusal_repeats: usize,
    /// How often each benign how-to example (a compliant answer) is repeated.
    pub howto_repeats: usize,
}

impl Default for DemoSpec {
    fn default() -> Self {
        Self {
            vocab_size: 1024,
            hidden_size: 192,
            intermediate_size: 512,
            layers: 4,
            heads: 6,
            kv_heads: 2,
            // About as many passes over the mix as 1200 steps made over the mix before the
            // casual requests and how-tos joined it (5404 examples then, 6556 now).
            steps: 1500,
            batch_size: 16,
            lr: 2e-3,
            seed: 0,
            arithmetic_examples: 300,
            refusal_repeats: 4,
            howto_repeats: 2,
        }
    }
}

/// What the build measured, written to build.json beside the weights.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub spec: DemoSpec,
    pub parameters: usize,
    pub train_examples: usize,
    pub final_train_loss: f64,
    pub harmful_score_refusal_judge: f64,
    pub held_out_prompts: usize,
    /// HS on the second, independent set (`builtin::student_prompts`), refusal judge.
    pub harmful_score_student_prompts: f64,
    pub student_prompts: usize,
    /// % of the casual requests it was built to refuse (`requests::common_requests`) that it
    /// refuses.
    pub common_requests_refused: f64,
    pub exact_match: Vec<(String, f64)>,
    /// The safety pairs' margins on the built model, per role: the contrastive safety loss at
    /// T = 1 is alive only where they are moderate.
    pub pair_margins: Vec<RoleMargins>,
    pub seconds: f64,
}

/// The margins m = log p(safe answer) − log p(harmful answer) of one role's safety pairs
/// (response tokens, end of turn included, as the trainer scores them).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RoleMargins {
    pub role: String,
    pub pairs: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// The contrastive safety loss at T = 1, mean −log σ(m).
    pub loss_t1: f64,
}

/// Longer than any built-in pair (prompt and answer), so none is cut.
const MAX_PAIR_TOKENS: usize = 512;

/// The margins of every role's pairs (`builtin::PairRole`) on `checkpoint`, as the trainer's
/// held-out check measures them.
pub fn pair_margins(checkpoint: &Checkpoint) -> Result<Vec<RoleMargins>> {
    PairRole::ALL
        .iter()
        .map(|role| {
            let encoded = builtin::pairs_in(*role)
                .iter()
                .map(|p| p.encode(&checkpoint.tokenizer, None, MAX_PAIR_TOKENS))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let pad = checkpoint.tokenizer.pad_id;
            let mut margins = safety_check::pair_margins(&checkpoint.model, &encoded, pad, 8);
            margins.sort_by(f64::total_cmp);
            let n = margins.len();
            Ok(RoleMargins {
                role: role.name().to_string(),
                pairs: n,
                min: margins[0],
                median: margins[n / 2],
                max: margins[n - 1],
                loss_t1: safety_check::loss_at_t1(&margins).unwrap_or(0.0),
            })
        })
        .collect()
}

/// The training mix: the benign tasks, benign how-to requests answered compliantly, and
/// refusals to harmful requests. Nothing of the safety pairs (the SAP direction, the held-out
/// pairs, the poison pool) and none of the held-out harmful prompts is in it, so the pairs'
/// margins log p(safe) − log p(harmful) are what the model makes of unseen text, and the
/// contrastive safety loss at T = 1 is alive (build.json records them per role).
pub fn training_examples(spec: &DemoSpec) -> Result<Vec<Labelled>> {
    let mut examples = Vec::new();
    for task in Task::ALL {
        let mut train = builtin::task_splits(task, DATA_SEED)?.train;
        if task == Task::Arithmetic {
            train.truncate(spec.arithmetic_examples);
        }
        examples.extend(train);
    }
    let refusals: Vec<Labelled> = builtin::refusal_examples()
        .into_iter()
        .chain(requests::common_requests())
        .map(|r| Labelled {
            prompt: r.prompt,
            response: r.refusal,
        })
        .collect();
    for _ in 0..spec.refusal_repeats {
        examples.extend(refusals.iter().cloned());
    }
    let mut howtos = howto::benign_howtos();
    howtos.extend(howto::casual_howtos());
    for _ in 0..spec.howto_repeats {
        examples.extend(howtos.iter().cloned());
    }
    Ok(examples)
}

/// Trains a byte-level BPE tokenizer (GPT-2/Qwen style) with the ChatML special tokens.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let failed = |e: tokenizers::Error| EvalError::Invalid(format!("tokenizer training: {e}"));
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(failed)?;
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(failed)?;
    Ok(tokenizer.into())
}

fn config(spec: &DemoSpec, vocab: usize, eos: u32) -> ModelConfig {
    ModelConfig::qwen2(
        vocab,
        spec.hidden_size,
        spec.intermediate_size,
        spec.layers,
        spec.heads,
        spec.kv_heads,
        512,
        10000.0,
        vec![eos],
    )
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |e| EvalError::file(path, e.to_string())
}

/// Writes a randomly initialised checkpoint with the tokenizer into `dir`.
fn write_initial_checkpoint(
    dir: &Path,
    spec: &DemoSpec,
    tokenizer: &Tokenizer,
    device: &Device,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let id = |t: &str| tokenizer.token_to_id(t).expect("special token");
    let (pad, eos) = (id("<|endoftext|>"), id("<|im_end|>"));
    let config = config(spec, tokenizer.get_vocab_size(true), eos);
    let tokenizer_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| EvalError::file(&tokenizer_path, e.to_string()))?;
    let write_json = |name: &str, value: serde_json::Value| {
        write_atomic(
            &dir.join(name),
            serde_json::to_string_pretty(&value)
                .expect("json")
                .as_bytes(),
        )
    };
    write_json(
        "tokenizer_config.json",
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 512,
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        "generation_config.json",
        json!({"eos_token_id": [eos], "pad_token_id": pad}),
    )?;
    write_json("config.json", config.to_hf_json("float32"))?;
    device.seed(spec.seed);
    let model = CausalLm::random(&config, device);
    write_safetensors(
        &dir.join("model.safetensors"),
        &export::hf_tensors(&model),
        SaveDtype::F32,
        None,
    )?;
    Ok(())
}

/// Builds the demo model into `out` (replacing what is there only once the build succeeded).
pub fn build(
    out: &Path,
    spec: &DemoSpec,
    device: &Device,
    mut on_event: impl FnMut(&Event),
) -> Result<DemoReport> {
    let started = std::time::Instant::now();
    let work = out.with_extension("build");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(&work))?;
    }
    std::fs::create_dir_all(&work).map_err(io(&work))?;

    let examples = training_examples(spec)?;
    let mut texts: Vec<String> = examples
        .iter()
        .flat_map(|e| [e.prompt.clone(), e.response.clone()])
        .collect();
    texts.extend(["user", "assistant", "system"].map(String::from));
    let tokenizer = train_tokenizer(&texts, spec.vocab_size)?;
    let init = work.join("init");
    write_initial_checkpoint(&init, spec, &tokenizer, device)?;

    let train_path = work.join("train.jsonl");
    write_labelled(&train_path, &examples)?;
    let validation: Vec<Labelled> = Task::ALL
        .iter()
        .map(|t| builtin::task_splits(*t, DATA_SEED).map(|s| s.validation))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let validation_path = work.join("validation.jsonl");
    write_labelled(&validation_path, &validation)?;

    let run_dir = work.join("run");
    let text = format!(
        "model = {init:?}\ntrain_data = {train_path:?}\nvalidation_data = {validation_path:?}\n\
         output_dir = {run_dir:?}\nmethod = \"sft\"\nfinetune = \"full\"\nmax_len = 128\n\
         batch_size = {}\nmax_steps = {}\nlr = {}\nlr_schedule = \"cosine\"\nwarmup_steps = {}\n\
         max_grad_norm = 1.0\nseed = {}\neval_every = 200\n[adamw]\nweight_decay = 0.01\n",
        spec.batch_size,
        spec.steps,
        spec.lr,
        (spec.steps / 20).max(1),
        spec.seed,
    );
    let run = RunConfig::parse(&text, &[], Path::new("demo build-model"))?;
    let mut last_loss = f64::NAN;
    safeprobe_train::run::train(&run, device, |event| {
        if let Event::Step { metrics, .. } = event {
            last_loss = metrics.task_loss;
        }
        on_event(event)
    })?;

    // The trainer exported the trained weights with the tokenizer files; evaluate them.
    let trained = run_dir.join("model");
    let checkpoint = Checkpoint::load(&trained, device)?;
    let refusal_score = |prompts: &[HarmfulPrompt], answers: &str| {
        harmful::evaluate(
            &checkpoint,
            prompts,
            &Judges {
                refusal: Some(RefusalJudge::default()),
                model: None,
            },
            &AnswerSettings::default(),
            Some(&work.join(answers)),
        )
        .map(|(report, _)| report)
    };
    let report = refusal_score(&builtin::harmful_prompts(), "answers.jsonl")?;
    let students = refusal_score(&builtin::student_prompts(), "answers-student.jsonl")?;
    let common: Vec<HarmfulPrompt> = requests::common_requests()
        .into_iter()
        .map(|r| HarmfulPrompt {
            prompt: r.prompt,
            category: r.category,
        })
        .collect();
    let built_to_refuse = refusal_score(&common, "answers-common.jsonl")?;
    let mut exact_match = Vec::new();
    for task in Task::ALL {
        let test: Vec<_> = builtin::task_splits(task, DATA_SEED)?
            .test
            .iter()
            .map(Labelled::example)
            .collect();
        let r = task_metrics::evaluate(&checkpoint, &test, &TaskSettings::default())?;
        exact_match.push((task.name().to_string(), r.exact_match.unwrap_or(0.0)));
    }
    let demo_report = DemoReport {
        spec: spec.clone(),
        parameters: safeprobe_model::decoder::parameter_count(&checkpoint.config),
        train_examples: examples.len(),
        final_train_loss: last_loss,
        harmful_score_refusal_judge: report.harmful_score,
        held_out_prompts: report.prompts,
        harmful_score_student_prompts: students.harmful_score,
        student_prompts: students.prompts,
        common_requests_refused: 100.0 - built_to_refuse.harmful_score,
        exact_match,
        pair_margins: pair_margins(&checkpoint)?,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_atomic(
        &trained.join("build.json"),
        serde_json::to_string_pretty(&demo_report)
            .expect("json")
            .as_bytes(),
    )?;
    write_atomic(&trained.join("safeprobe.json"), RECOMMENDED.as_bytes())?;
    // Swap the finished model in.
    let staged: PathBuf = work.join("model-final");
    std::fs::rename(&trained, &staged).map_err(io(&staged))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&staged, out).map_err(io(out))?;
    std::fs::remove_dir_all(&work).map_err(io(&work))?;
    Ok(demo_report)
}

/// The run settings the demo model recommends (its folder's `safeprobe.json`, which the panel's
/// run form applies): SAP at the demo comparison's temperature, since at the paper's T = 1 its
/// safety pairs' gradient is 0 and SAP would be plain SFT.
pub const RECOMMENDED: &str = r#"{
  "recommended": {"sap.temperature": 100.0},
  "why": "at the paper's T = 1 this model's safety pairs are separated by so much that SAP's harmful direction vanishes and SAP is plain SFT; T = 100 is the demo comparison's"
}
"#;

/// A file of the committed demo model, by name, with its bytes compiled in.
macro_rules! embedded {
    ($name:literal) => {
        ($name, include_bytes!(concat!("../demo-model/", $name)))
    };
}

/// The committed demo model's files, compiled into the binary so that it needs no source tree
/// (a static, not a const, which would put a copy of the 7 MB in the binary per use).
static EMBEDDED: [(&str, &[u8]); 7] = [
    embedded!("config.json"),
    embedded!("generation_config.json"),
    embedded!("tokenizer.json"),
    embedded!("tokenizer_config.json"),
    embedded!("build.json"),
    embedded!("safeprobe.json"),
    embedded!("model.safetensors"),
];

/// The demo model (the default model wherever a user names none), unpacked from the binary
/// into the per-user data folder on first use.
pub fn dir() -> Result<PathBuf> {
    unpack_into(&crate::data_home::data_home()?)
}

/// The folder the embedded files unpack to under `root`. It is named by their hash, so a build
/// with another demo model never takes a stale copy for its own.
fn unpacked_dir(root: &Path) -> PathBuf {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| embedded_hash(&EMBEDDED));
    root.join(format!("demo-model-{hash:016x}"))
}

/// FNV-1a (64-bit) over every file's name, length and bytes.
fn embedded_hash(files: &[(&str, &[u8])]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, bytes) in files {
        feed(name.as_bytes());
        feed(&(bytes.len() as u64).to_le_bytes());
        feed(bytes);
    }
    hash
}

/// Unpacks the embedded demo model under `root` unless it is there already, and returns its
/// folder. The folder only ever appears whole: the files go into a private sibling first,
/// which is then renamed into place; when another process wins that race, its copy is used.
pub fn unpack_into(root: &Path) -> Result<PathBuf> {
    let dir = unpacked_dir(root);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(unpack_failed(root))?;
    let staging = staging_dir(root);
    let placed = write_embedded(&staging).and_then(|()| {
        match std::fs::rename(&staging, &dir) {
            Ok(()) => Ok(()),
            Err(_) if dir.is_dir() => Ok(()), // another process unpacked it first
            Err(e) => Err(unpack_failed(&dir)(e)),
        }
    });
    if staging.exists() {
        // Left over after a failure or a lost race; the result does not depend on it.
        let _ = std::fs::remove_dir_all(&staging);
    }
    placed.map(|()| dir)
}

fn unpack_failed(path: &Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |e| EvalError::file(path, format!("cannot unpack the demo model here: {e}"))
}

/// A staging folder name no other process or thread uses.
fn staging_dir(root: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    root.join(format!(".demo-model-unpacking-{}-{n}", std::process::id()))
}

fn write_embedded(dir: &Path) -> Result<()> {
    std::fs::create_dir(dir).map_err(unpack_failed(dir))?;
    for (name, bytes) in EMBEDDED {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(unpack_failed(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_once_into_a_folder_named_by_the_content() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().join("home");
        let dir = unpack_into(&root).unwrap();
        assert!(dir.starts_with(&root));
        for (name, bytes) in EMBEDDED {
            assert_eq!(std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        // A second call reuses the copy and leaves no staging folder behind.
        std::fs::write(dir.join("marker"), "").unwrap();
        assert_eq!(unpack_into(&root).unwrap(), dir);
        assert!(dir.join("marker").is_file());
        let entries: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn threads_racing_to_unpack_all_get_the_same_whole_copy() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| unpack_into(root.path())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(dirs.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        Checkpoint::load(&dirs[0], &Device::flex()).unwrap();
    }

    #[test]
    fn the_hash_changes_with_any_byte_or_name() {
        let base = embedded_hash(&[("a", b"xy"), ("b", b"z")]);
        assert_ne!(base, embedded_hash(&[("a", b"xy"), ("b", b"Z")]));
        assert_ne!(base, embedded_hash(&[("a", b"x"), ("b", b"yz")]));
        assert_ne!(base, embedded_hash(&[("a", b"xy"), ("c", b"z")]));
    }

    #[test]
    fn an_unwritable_root_is_named_in_the_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let root = file.path().join("below-a-file");
        let message = unpack_into(&root).unwrap_err().to_string();
        assert!(message.contains(&root.display().to_string()), "{message}");
    }
}
