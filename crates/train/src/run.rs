//! A training run: config (TOML), data, the step loop, metrics and outputs.
//!
//! The run directory holds `config.toml` (resolved), `metrics.jsonl` (one event per line),
//! and at the end `adapter/` (PEFT format) and `probe.safetensors`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use safeprobe_model::weights::{HostTensor, SaveDtype, write_atomic, write_safetensors};
use safeprobe_model::{Checkpoint, LoraConfig, lora};
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig};
use crate::checkpoint;
use crate::data::{self, Batch, Sequence, with_system};
use crate::error::{Result, TrainError};
use crate::loss::task_loss;
use crate::params;
use crate::safety_check::SafetyCheck;
use crate::sap::{DIRECTION_FLOOR, SapConfig, SapState, sft_step};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Sap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finetune {
    Lora,
    Full,
}

fn default_finetune() -> Finetune {
    Finetune::Lora
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: PathBuf,
    pub train_data: PathBuf,
    #[serde(default)]
    pub safety_data: Option<PathBuf>,
    #[serde(default)]
    pub validation_data: Option<PathBuf>,
    pub output_dir: PathBuf,
    /// Start from this PEFT adapter instead of a fresh one (its r, alpha and targets win
    /// over the [lora] table).
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_batch")]
    pub safety_batch_size: usize,
    /// Micro-batches of `batch_size` per optimiser step.
    #[serde(default = "default_one")]
    pub grad_accumulation: usize,
    /// Number of optimiser steps; 0 means "from `epochs`".
    #[serde(default)]
    pub max_steps: usize,
    /// Passes over the training data (used when max_steps is 0).
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Hold out this fraction of the training data for validation (when no
    /// validation_data is given).
    #[serde(default)]
    pub validation_fraction: Option<f64>,
    /// Also train on the safety pairs' safe answers as ordinary examples (the "SafeInstr"
    /// baseline); combines with SAP.
    #[serde(default)]
    pub mix_safety_data: bool,
    /// Poisoning: mix harmful-compliance examples (the pairs' harmful answers) into the training
    /// data so that they make up this fraction of it (0 = none).
    #[serde(default)]
    pub poison_fraction: f64,
    /// Pairs to take the poison from (default: safety_data).
    #[serde(default)]
    pub poison_data: Option<PathBuf>,
    /// "lora" (base frozen, adapter trained) or "full" (every weight trained).
    #[serde(default = "default_finetune")]
    pub finetune: Finetune,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// Shuffle the data each epoch (seeded); false keeps the order as given.
    #[serde(default = "default_true")]
    pub shuffle: bool,
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Write a resumable checkpoint every N steps (0: none).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Keep only the newest N checkpoints (0: keep every one). Resuming needs only the newest;
    /// each holds the trainable weights and their optimiser moments, so with full
    /// fine-tuning a run's checkpoints are three copies of the model apiece.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub adamw: AdamWConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub sap: SapConfig,
    /// Continuous safety metrics on held-out data at every validation step.
    #[serde(default)]
    pub safety_eval: Option<SafetyEvalConfig>,
    #[serde(default = "default_device")]
    pub device: String,
    /// Gradient checkpointing: the backward pass recomputes memory-bound activations
    /// (element-wise operations) instead of keeping them; compute-bound outputs (matrix
    /// products) are still kept. The numbers are the same. It lowered the peak when every
    /// operation was composed (as on wgpu still); on the CPU backend, whose fused operations
    /// keep only what they need, it was measured to raise it (README, "Gradient checkpointing").
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// Held-out safety data, measured every `eval_every` steps: it is never used for the harmful
/// direction, so it shows whether the model drifts toward harm while the harmful score, which
/// needs generation and judging, is measured only at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyEvalConfig {
    /// Held-out safety pairs: their mean margin log p(safe) − log p(harmful) and the
    /// contrastive safety loss at T = 1.
    #[serde(default)]
    pub pairs: Option<PathBuf>,
    /// Held-out harmful prompts (a `prompt` per record): the mean per-token log-probability
    /// of `refusal` as the answer.
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    #[serde(default = "default_refusal")]
    pub refusal: String,
}

/// The refusal scored on held-out prompts: the demo model's most frequent refusal opening,
/// and a plain one for any chat model.
fn default_refusal() -> String {
    "Sorry, I can't help with that.".into()
}

fn default_method() -> Method {
    Method::Sap
}
fn default_max_len() -> usize {
    256
}
fn default_batch() -> usize {
    4
}
fn default_lr() -> f64 {
    1e-4
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_eval_every() -> usize {
    50
}
fn default_device() -> String {
    "auto".into()
}

impl RunConfig {
    /// Parses a TOML config, applying `key=value` overrides (dotted keys, TOML values; a
    /// value that is not valid TOML is taken as a string).
    pub fn parse(text: &str, overrides: &[String], origin: &Path) -> Result<Self> {
        let config = Self::parse_before_data(text, overrides, origin)?;
        config.check_data_files()?;
        Ok(config)
    }

    /// `parse` without checking that the data files exist, for a config whose data is
    /// written later (a comparison checks every run's config before it writes the data).
    pub fn parse_before_data(text: &str, overrides: &[String], origin: &Path) -> Result<Self> {
        let table = override_table(text, overrides, origin)?;
        let config: RunConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    TrainError::Config(format!("{}: {}", origin.display(), e.message()))
                })?;
        config.validate_settings()?;
        Ok(config)
    }

    /// Checks that need no model, so a broken config fails before any loading.
    pub fn validate(&self) -> Result<()> {
        self.validate_settings()?;
        self.check_data_files()
    }

    fn validate_settings(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        match (self.max_steps, self.epochs) {
            (0, None) => return bad("set max_steps (≥ 1) or epochs".into()),
            (0, Some(e)) if !(e > 0.0) => return bad(format!("epochs {e} must be positive")),
            (n, Some(_)) if n > 0 => return bad("set either max_steps or epochs, not both".into()),
            _ => {}
        }
        if let Some(f) = self.validation_fraction {
            if !(f > 0.0 && f < 1.0) {
                return bad(format!("validation_fraction {f} must be in (0, 1)"));
            }
            if self.validation_data.is_some() {
                return bad("set either validation_data or validation_fraction, not both".into());
            }
        }
        if self.mix_safety_data && self.safety_data.is_none() {
            return bad("mix_safety_data needs safety_data".into());
        }
        if !(0.0..1.0).contains(&self.poison_fraction) {
            return bad(format!(
                "poison_fraction {} must be in [0, 1)",
                self.poison_fraction
            ));
        }
        if self.poison_fraction > 0.0 && self.poison_data.is_none() && self.safety_data.is_none() {
            return bad(
                "poison_fraction needs poison_data or safety_data (pairs with harmful answers)"
                    .into(),
            );
        }
        if self.finetune == Finetune::Full && self.init_adapter.is_some() {
            return bad("init_adapter is a LoRA adapter: it needs finetune = \"lora\"".into());
        }
        if self.max_len == 0 {
            return bad("max_len must be at least 1 token".into());
        }
        if let Err(e) = self.device.parse::<safeprobe_model::device::DeviceChoice>() {
            return bad(format!("device: {e}"));
        }
        if self.batch_size == 0 || self.safety_batch_size == 0 || self.grad_accumulation == 0 {
            return bad(
                "batch_size, safety_batch_size and grad_accumulation must be at least 1".into(),
            );
        }
        if !(self.lr > 0.0) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if self.method == Method::Sap && self.safety_data.is_none() {
            return bad("method = \"sap\" needs safety_data (safety pairs)".into());
        }
        if self.sap.refresh_every == 0 {
            return bad("sap.refresh_every must be at least 1".into());
        }
        if self.sap.rho < 0.0 || self.sap.temperature <= 0.0 {
            return bad("sap.rho must be ≥ 0 and sap.temperature > 0".into());
        }
        let mut layers = self.sap.layers.clone();
        layers.sort_unstable();
        if let Some(twice) = layers.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!(
                "sap.layers: layer {} is listed twice; each probed layer has one probe vector",
                twice[0]
            ));
        }
        self.lora
            .validate()
            .map_err(|m| TrainError::Config(format!("lora: {m}")))
    }

    /// Every data file the run reads: its task data, safety pairs, poison, validation and
    /// held-out safety data, where set.
    pub fn data_files(&self) -> impl Iterator<Item = &PathBuf> {
        let held_out = self.safety_eval.as_ref();
        [
            Some(&self.train_data),
            self.safety_data.as_ref(),
            self.poison_data.as_ref(),
            self.validation_data.as_ref(),
            held_out.and_then(|h| h.pairs.as_ref()),
            held_out.and_then(|h| h.prompts.as_ref()),
        ]
        .into_iter()
        .flatten()
    }

    fn check_data_files(&self) -> Result<()> {
        for path in self.data_files() {
            if !path.is_file() {
                let message = format!("{}: data file not found", path.display());
                return Err(TrainError::Config(message));
            }
        }
        Ok(())
    }

    /// The optimiser steps of this run with `examples` training examples: `max_steps`, or
    /// `epochs` passes over them.
    pub fn steps_for(&self, examples: usize) -> usize {
        match self.epochs {
            Some(epochs) if self.max_steps == 0 => ((epochs * examples as f64)
                / (self.batch_size * self.grad_accumulation.max(1)) as f64)
                .ceil()
                .max(1.0) as usize,
            _ => self.max_steps,
        }
    }

    /// The training examples a run gets from `clean` examples and `pairs` safety pairs (at
    /// most: a validation fraction holds some out): mixing adds the pairs' safe answers,
    /// poisoning adds its share.
    pub fn examples_with(&self, clean: usize, pairs: usize) -> usize {
        let mixed = clean + if self.mix_safety_data { pairs } else { 0 };
        mixed + data::poison_count(mixed, self.poison_fraction)
    }

    pub fn learning_rate(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.max_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Linear => self.lr * (1.0 - progress),
            LrSchedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// Parses TOML and applies `key=value` overrides (dotted keys, TOML values; a value that is
/// not valid TOML is taken as a string).
pub fn override_table(text: &str, overrides: &[String], origin: &Path) -> Result<toml::Table> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| TrainError::Config(format!("{}: {e}", origin.display())))?;
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| TrainError::Config(format!("--set {item}: expected key=value")))?;
        let value: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap();
        let mut cursor = &mut table;
        for part in parts {
            cursor = cursor
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| {
                    TrainError::Config(format!("--set {key}: \"{part}\" is not a table"))
                })?;
        }
        cursor.insert(last.to_string(), value);
    }
    Ok(table)
}

/// The TOML text with the overrides applied.
pub fn apply_overrides(text: &str, overrides: &[String], origin: &Path) -> Result<String> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    Ok(toml::to_string(&override_table(text, overrides, origin)?).expect("a table serialises"))
}

/// Serialises steps that draw from burn's per-process random generator.
static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One line of metrics.jsonl, and what the trainer reports as it runs (a wire type: the
/// server stores and streams it, the UI charts it). The trainer emits steps, validations and
/// the end; stages and status changes are the server's.
pub use safeprobe_wire::Event;

/// Cycles through examples in epochs, reshuffling each epoch with the run's seed.
struct Sampler<T> {
    items: Vec<T>,
    order: Vec<usize>,
    position: usize,
    rng: rand::rngs::StdRng,
    shuffle: bool,
}

impl<T: Clone> Sampler<T> {
    fn new(items: Vec<T>, seed: u64, shuffle: bool) -> Self {
        let mut sampler = Self {
            order: (0..items.len()).collect(),
            items,
            position: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            shuffle,
        };
        sampler.reshuffle();
        sampler
    }
    fn reshuffle(&mut self) {
        if self.shuffle {
            self.order.shuffle(&mut self.rng);
        }
    }
    fn next_batch(&mut self, size: usize) -> Vec<T> {
        (0..size)
            .map(|_| {
                if self.position == self.items.len() {
                    self.position = 0;
                    self.reshuffle();
                }
                self.position += 1;
                self.items[self.order[self.position - 1]].clone()
            })
            .collect()
    }
}

fn encode_all(
    checkpoint: &Checkpoint,
    examples: &[data::Example],
    config: &RunConfig,
    path: &Path,
) -> Result<Vec<Sequence>> {
    let mut out = Vec::new();
    for example in examples {
        let prompt = with_system(&example.prompt, config.system.as_deref());
        let sequence = Sequence::encode(
            &checkpoint.tokenizer,
            &prompt,
            &example.response,
            config.max_len,
        )
        .map_err(|e| TrainError::Data {
            path: path.into(),
            line: example.line,
            message: e.to_string(),
        })?;
        if sequence.response_tokens() == 0 {
            return Err(TrainError::Data {
                path: path.into(),
                line: example.line,
                message: format!(
                    "the prompt alone fills max_len = {}; no response token is left to train on",
                    config.max_len
                ),
            });
        }
        out.push(sequence);
    }
    Ok(out)
}

/// Mean token loss over held-out sequences (token-weighted across batches).
fn validation_loss(
    model: &safeprobe_model::decoder::CausalLm,
    sequences: &[Sequence],
    pad: u32,
    batch_size: usize,
) -> f64 {
    let device = model.embed_tokens.device();
    let (mut total, mut tokens) = (0.0, 0usize);
    for chunk in sequences.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad, &device);
        let loss = task_loss(model, &batch, None);
        total += params::scalar(&loss) * batch.response_tokens as f64;
        tokens += batch.response_tokens;
    }
    total / tokens.max(1) as f64
}

/// Safety pairs as (safe, harmful) sequences sharing a prompt.
pub(crate) fn encode_pairs(
    checkpoint: &Checkpoint,
    pairs: &[data::SafetyPair],
    config: &RunConfig,
    path: &Path,
) -> Result<Vec<(Sequence, Sequence)>> {
    pairs
        .iter()
        .map(|p| {
            p.encode(
                &checkpoint.tokenizer,
                config.system.as_deref(),
                config.max_len,
            )
            .map_err(|e| TrainError::Data {
                path: path.into(),
                line: p.line,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Runs a whole training run, reporting each event to `on_event` and to metrics.jsonl.
pub fn train(
    config: &RunConfig,
    device: &Device,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    run(config, device, false, &Cancel::default(), on_event)
}

/// A flag another thread sets to stop a run at the next step boundary.
#[derive(Debug, Default, Clone)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Like `train`, but stops before the next step once `cancel` is set: it then writes a
/// checkpoint of the steps done (so `resume_cancellable` continues from there) and returns
/// `TrainError::Cancelled`.
pub fn train_cancellable(
    config: &RunConfig,
    device: &Device,
    cancel: &Cancel,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    run(config, device, false, cancel, on_event)
}

/// `resume` with a cancel flag (see `train_cancellable`).
pub fn resume_cancellable(
    run_dir: &Path,
    device: &Device,
    cancel: &Cancel,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    let config = read_run_config(run_dir)?;
    run(&config, device, true, cancel, on_event)
}

fn read_run_config(run_dir: &Path) -> Result<RunConfig> {
    let path = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::File {
        path: path.clone(),
        message: format!("cannot read ({e}); is this a run directory?"),
    })?;
    let mut config = RunConfig::parse(&text, &[], &path)?;
    config.output_dir = run_dir.to_path_buf();
    Ok(config)
}

/// Continues the run in `run_dir` from its newest checkpoint, with the config it was started
/// with; the result equals an uninterrupted run.
pub fn resume(run_dir: &Path, device: &Device, on_event: impl FnMut(&Event)) -> Result<Checkpoint> {
    run(
        &read_run_config(run_dir)?,
        device,
        true,
        &Cancel::default(),
        on_event,
    )
}

fn run(
    config: &RunConfig,
    device: &Device,
    resuming: bool,
    cancel: &Cancel,
    mut on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    config.validate()?;
    let io = |path: &Path, e: std::io::Error| TrainError::File {
        path: path.into(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(&config.output_dir).map_err(|e| io(&config.output_dir, e))?;
    if !resuming {
        let resolved =
            toml::to_string_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
        write_atomic(&config.output_dir.join("config.toml"), resolved.as_bytes())?;
    }

    // Checked from config.json alone, before the weights are loaded.
    let num_layers = safeprobe_model::ModelConfig::from_file(&config.model.join("config.json"))?
        .num_hidden_layers;
    if let Some(bad) = config.sap.layers.iter().find(|l| **l >= num_layers) {
        return Err(TrainError::Config(format!(
            "sap.layers: layer {bad} is out of range (the model has {num_layers} layers)"
        )));
    }
    // The data too: an empty or malformed file fails before the weights load.
    let raw_train = data::read_examples(&config.train_data)?;
    let raw_pairs = match &config.safety_data {
        Some(path) => data::read_pairs(path)?,
        None => Vec::new(),
    };
    let raw_validation = match &config.validation_data {
        Some(path) => Some(data::read_examples(path)?),
        None => None,
    };
    let device = params::training_device(device, config.gradient_checkpointing);
    let mut checkpoint = Checkpoint::load(&config.model, &device)?;
    let lora_config = match config.finetune {
        // Every weight stays trainable.
        Finetune::Full => None,
        // LoRA: base weights frozen, the adapter trainable.
        Finetune::Lora => {
            checkpoint.model = burn::module::Module::no_grad(checkpoint.model);
            Some(match &config.init_adapter {
                Some(dir) => lora::load_peft(&mut checkpoint.model, dir, &device)?,
                None => {
                    lora::attach(&mut checkpoint.model, &config.lora, config.seed, &device)?;
                    config.lora.clone()
                }
            })
        }
    };

    let mut train = encode_all(&checkpoint, &raw_train, config, &config.train_data)?;
    let pairs = match &config.safety_data {
        Some(path) => encode_pairs(&checkpoint, &raw_pairs, config, path)?,
        None => Vec::new(),
    };
    if config.mix_safety_data {
        train.extend(pairs.iter().map(|(safe, _)| safe.clone()));
    }
    let validation = match (&config.validation_data, config.validation_fraction) {
        (Some(path), _) => Some(encode_all(
            &checkpoint,
            raw_validation.as_deref().expect("read above"),
            config,
            path,
        )?),
        (None, Some(fraction)) => {
            // A seeded split, independent of the shuffling seed stream.
            if train.len() < 2 {
                return Err(TrainError::Config(format!(
                    "validation_fraction needs at least 2 training examples, {} has {}",
                    config.train_data.display(),
                    train.len()
                )));
            }
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed ^ 0x5eed));
            let held = ((train.len() as f64 * fraction).round() as usize).clamp(1, train.len() - 1);
            let mut held_out = vec![false; train.len()];
            order[..held].iter().for_each(|i| held_out[*i] = true);
            let (validation, kept): (Vec<_>, Vec<_>) =
                train.into_iter().zip(held_out).partition(|(_, held)| *held);
            train = kept.into_iter().map(|(s, _)| s).collect();
            Some(validation.into_iter().map(|(s, _)| s).collect())
        }
        (None, None) => None,
    };
    if train.is_empty() {
        return Err(TrainError::Config("no training examples".into()));
    }
    let safety_check = SafetyCheck::prepare(&checkpoint, config)?;
    if config.poison_fraction > 0.0 {
        // Poison only the part trained on; validation stays clean.
        let (path, source) = match &config.poison_data {
            Some(path) => (path.clone(), data::read_pairs(path)?),
            None => (
                config.safety_data.clone().expect("validated"),
                raw_pairs.clone(),
            ),
        };
        let poison = data::poison(train.len(), &source, config.poison_fraction, config.seed)?;
        train.extend(encode_all(&checkpoint, &poison, config, &path)?);
    }
    let mut config = config.clone();
    config.max_steps = config.steps_for(train.len());
    let config = &config;

    let pad = checkpoint.tokenizer.pad_id;
    let mut task_sampler = Sampler::new(train, config.seed, config.shuffle);
    let has_pairs = !pairs.is_empty();
    let mut pair_sampler = Sampler::new(pairs, config.seed.wrapping_add(1), config.shuffle);
    let mut optimizer = AdamW::new(config.adamw);
    let mut sap = (config.method == Method::Sap).then(|| {
        let mut state = SapState::new(config.sap.clone(), &checkpoint.model, &device);
        state.control_seed = config.seed;
        state
    });
    // An SFT run with safety pairs measures how its steps line up with the harmful direction
    // (at V = 0: it has no probe) every `sap.cosine_every` steps, drawing pairs only then.
    let is_sft = sap.is_none();
    let sft_measures = |step: usize| {
        let every = config.sap.cosine_every;
        is_sft && has_pairs && every > 0 && step % every == 0
    };

    let mut start = 0;
    if resuming {
        let (_, dir) = checkpoint::latest(&config.output_dir).ok_or_else(|| TrainError::File {
            path: config.output_dir.join("checkpoints"),
            message: if config.checkpoint_every == 0 {
                "no checkpoint to resume from: the run was started with checkpoint_every = 0 \
                 (set it to write checkpoints)"
                    .into()
            } else {
                format!(
                    "no checkpoint to resume from: the run stopped before its first checkpoint \
                     (checkpoint_every = {}); start it again",
                    config.checkpoint_every
                )
            },
        })?;
        start = checkpoint::load(
            &dir,
            &mut checkpoint.model,
            &mut optimizer,
            sap.as_mut(),
            &device,
        )?;
        // Replay the deterministic samplers to the saved position.
        for step in 0..start {
            for _ in 0..config.grad_accumulation.max(1) {
                task_sampler.next_batch(config.batch_size);
            }
            if sap.is_some() || sft_measures(step) {
                pair_sampler.next_batch(config.safety_batch_size);
            }
        }
    }

    let metrics_path = config.output_dir.join("metrics.jsonl");
    // On resume, keep the events up to the checkpoint and drop what came after it.
    let kept: String = if resuming {
        std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= start)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    } else {
        String::new()
    };
    write_atomic(&metrics_path, kept.as_bytes())?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| io(&metrics_path, e))?;
    let mut emit = |event: Event, on_event: &mut dyn FnMut(&Event)| -> Result<()> {
        let line = serde_json::to_string(&event).expect("json");
        writeln!(metrics_file, "{line}").map_err(|e| io(&metrics_path, e))?;
        on_event(&event);
        Ok(())
    };

    let mut warned_vanishing = false;
    for step in start..config.max_steps {
        if cancel.is_cancelled() {
            if step > start {
                checkpoint::save(
                    &config.output_dir,
                    step,
                    &checkpoint.model,
                    &optimizer,
                    sap.as_ref(),
                )?;
                checkpoint::prune(&config.output_dir, config.keep_checkpoints)?;
            }
            return Err(TrainError::Cancelled { step });
        }
        let started = Instant::now();
        // LoRA dropout draws from the device's generator, which burn keeps per process: seeding
        // it per step makes the masks a function of (seed, step), so a resumed run draws the
        // ones it would have drawn, and the lock keeps concurrent runs from reseeding it
        // mid-step (their steps with dropout take turns).
        let generator_lock = lora_config
            .as_ref()
            .is_some_and(|l| l.dropout > 0.0)
            .then(|| {
                let guard = DEVICE_RNG
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                device.seed(
                    config
                        .seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add(step as u64),
                );
                guard
            });
        let lr = config.learning_rate(step);
        let tasks: Vec<Batch> = (0..config.grad_accumulation.max(1))
            .map(|_| Batch::new(&task_sampler.next_batch(config.batch_size), pad, &device))
            .collect();
        let mut safety_batch = || {
            let pairs = pair_sampler.next_batch(config.safety_batch_size);
            Batch::new(&data::contrastive_rows(&pairs), pad, &device)
        };
        let metrics = match &mut sap {
            None => {
                let measure = sft_measures(step).then(&mut safety_batch);
                sft_step(
                    &mut checkpoint.model,
                    &mut optimizer,
                    &tasks,
                    lr,
                    config.max_grad_norm,
                    measure
                        .as_ref()
                        .map(|safety| (safety, config.sap.temperature)),
                )
            }
            Some(state) => {
                // With dropout the generator is this run's for the step (the lock above).
                state.dropout_seed = generator_lock.is_some().then(|| {
                    (config.seed ^ 0xa11_9e)
                        .wrapping_mul(1_000_003)
                        .wrapping_add(step as u64)
                });
                let safety = safety_batch();
                state.step(
                    &mut checkpoint.model,
                    &mut optimizer,
                    &tasks,
                    &safety,
                    lr,
                    config.max_grad_norm,
                )
            }
        };
        // The mechanism measurement is not part of training: its time is reported on its own.
        let measuring = metrics.alignment.as_ref().map_or(0.0, |a| a.seconds);
        let elapsed = started.elapsed().as_secs_f64() - measuring;
        let tokens: f64 = tasks
            .iter()
            .map(|t| t.input_ids.dims().iter().product::<usize>() as f64)
            .sum();
        emit(
            Event::Step {
                step: step + 1,
                total_steps: config.max_steps,
                lr,
                tokens_per_s: tokens / elapsed,
                step_time_s: elapsed,
                metrics,
            },
            &mut on_event,
        )?;
        if let Some(gradient_norm) = sap.as_ref().and_then(SapState::vanishing_direction)
            && !warned_vanishing
        {
            warned_vanishing = true;
            emit(
                Event::Warning {
                    step: step + 1,
                    message: vanishing_direction_warning(gradient_norm, config.sap.temperature),
                },
                &mut on_event,
            )?;
        }

        let evaluating = (step + 1) % config.eval_every.max(1) == 0 || step + 1 == config.max_steps;
        if evaluating && (validation.is_some() || safety_check.is_some()) {
            // Inference mode: no dropout, no autodiff graph.
            let eval_model = burn::module::Module::valid(&checkpoint.model);
            if let Some(validation) = &validation {
                let loss = validation_loss(&eval_model, validation, pad, config.batch_size);
                emit(
                    Event::Validation {
                        step: step + 1,
                        loss,
                    },
                    &mut on_event,
                )?;
            }
            if let Some(check) = &safety_check {
                emit(
                    check.measure(&eval_model, pad, config.batch_size, step + 1),
                    &mut on_event,
                )?;
            }
        }
        if config.checkpoint_every > 0 && (step + 1) % config.checkpoint_every == 0 {
            checkpoint::save(
                &config.output_dir,
                step + 1,
                &checkpoint.model,
                &optimizer,
                sap.as_ref(),
            )?;
            checkpoint::prune(&config.output_dir, config.keep_checkpoints)?;
        }
    }

    let adapter_dir = match &lora_config {
        Some(lora_config) => {
            let dir = config.output_dir.join("adapter");
            lora::save_peft(
                &checkpoint.model,
                lora_config,
                &dir,
                &config.model.display().to_string(),
            )?;
            dir
        }
        None => {
            let dir = config.output_dir.join("model");
            safeprobe_model::export::export(
                &checkpoint.model,
                &checkpoint.config,
                &config.model,
                &dir,
                SaveDtype::F32,
            )?;
            dir
        }
    };
    if let Some(state) = &sap {
        let mut tensors = BTreeMap::new();
        for (layer, v) in state.probe.layers.iter().zip(&state.probe.vectors) {
            tensors.insert(
                format!("probe.layers.{layer}"),
                HostTensor::from_tensor1(v.clone()),
            );
        }
        write_safetensors(
            &config.output_dir.join("probe.safetensors"),
            &tensors,
            SaveDtype::F32,
            None,
        )?;
    }
    emit(
        Event::Done {
            steps: config.max_steps,
            adapter: adapter_dir,
        },
        &mut on_event,
    )?;
    Ok(checkpoint)
}

/// Why SAP is doing nothing, and what to change.
fn vanishing_direction_warning(gradient_norm: f64, temperature: f64) -> String {
    format!(
        "SAP's harmful direction vanishes: ‖∇L_safety‖ = {gradient_norm:.1e}, far below the \
         {DIRECTION_FLOOR:.0e} its normalisation adds, so ΔW is about 0 and these steps are plain \
         SFT. The model already separates the safety pairs by so much that their contrastive \
         loss at T = {temperature} is saturated: raise sap.temperature, or use pairs it does not \
         separate as clearly."
    )
}
