//! A training run's config: the one type the TOML files, the CLI's `--set`, the server's API
//! and the panel's form all read. Its defaults and the checks that need neither files nor a
//! model are here; the trainer adds those that do (data files exist, layers in range).
//!
//! A field's doc comment is its label in the panel (the first paragraph) and its help (the
//! rest); `x-section` groups the top-level fields there. The nested tables are sections of
//! their own.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::settings::{
    AdamWConfig, LisaConfig, LoraConfig, SafeGradConfig, SapConfig, SppftConfig,
};
use super::{DeviceChoice, SpecError};
use crate::Method;

/// What is trained: a LoRA adapter over a frozen base, or every weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Finetune {
    /// a LoRA adapter; the base stays frozen
    Lora,
    /// every weight
    Full,
}

/// The learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// the peak rate throughout
    Constant,
    /// down to 0 in a straight line
    Linear,
    /// down to 0 along half a cosine
    Cosine,
}

const DATA: &str = "Model and data";
const METHOD: &str = "Method";
const TRAINING: &str = "Training";
const RUN: &str = "Validation, checkpoints and device";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// model
    ///
    /// "demo", a checkpoint folder or .gguf file (under the server's model directories), or a
    /// pulled Hub id (ORG/NAME)
    #[schemars(extend("x-section" = DATA))]
    pub model: PathBuf,
    /// training data
    ///
    /// JSONL, Parquet or Alpaca JSON (under a data directory)
    #[schemars(extend("x-section" = DATA))]
    pub train_data: PathBuf,
    /// safety pairs
    ///
    /// {prompt, chosen, rejected}: a harmful prompt, a safe answer and a harmful one; every
    /// method but sft needs them
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub safety_data: Option<PathBuf>,
    /// validation data
    ///
    /// optional; or set a validation fraction
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub validation_data: Option<PathBuf>,
    /// run folder
    ///
    /// where the adapter, metrics and checkpoints go (the server chooses it for its jobs)
    #[schemars(extend("x-section" = DATA, "x-set-by" = "server"))]
    pub output_dir: PathBuf,
    /// starting adapter
    ///
    /// start from this PEFT adapter instead of a fresh one (its r, alpha and targets win over
    /// the LoRA settings)
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub init_adapter: Option<PathBuf>,
    /// method
    ///
    /// every method but sft needs safety pairs; each one's settings are in its own section
    #[serde(default = "default_method")]
    #[schemars(extend("x-section" = METHOD))]
    pub method: Method,
    /// safety pairs per step
    ///
    /// pairs per step for the harmful direction (SAP) or the alignment gradient (the
    /// defences)
    #[serde(default = "default_batch")]
    #[schemars(extend("x-section" = METHOD))]
    pub safety_batch_size: usize,
    /// system prompt
    ///
    /// prepended to conversations that have none
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub system: Option<String>,
    /// max tokens per example
    ///
    /// longer examples are truncated
    #[serde(default = "default_max_len")]
    #[schemars(extend("x-section" = DATA))]
    pub max_len: usize,
    /// batch size
    ///
    /// examples per micro-batch
    #[serde(default = "default_batch")]
    #[schemars(extend("x-section" = TRAINING))]
    pub batch_size: usize,
    /// gradient accumulation
    ///
    /// micro-batches of batch size per optimiser step
    #[serde(default = "default_one")]
    #[schemars(extend("x-section" = TRAINING))]
    pub grad_accumulation: usize,
    /// steps
    ///
    /// optimiser steps; 0 or empty: from epochs
    #[serde(default)]
    #[schemars(extend("x-section" = TRAINING))]
    pub max_steps: usize,
    /// epochs
    ///
    /// passes over the training data, when steps is 0
    #[serde(default)]
    #[schemars(extend("x-section" = TRAINING))]
    pub epochs: Option<f64>,
    /// validation fraction
    ///
    /// hold out this share of the training data for validation (when no validation data is
    /// given)
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub validation_fraction: Option<f64>,
    /// mix in safe answers
    ///
    /// also train on the safety pairs' safe answers as ordinary examples (the SafeInstr
    /// baseline); combines with any method
    #[serde(default)]
    #[schemars(extend("x-section" = METHOD))]
    pub mix_safety_data: bool,
    /// poison fraction
    ///
    /// mix harmful-compliance examples (the pairs' harmful answers) into the training data so
    /// that they make up this share of it (0: none)
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub poison_fraction: f64,
    /// poison pairs
    ///
    /// pairs to take the poison from (default: the safety pairs)
    #[serde(default)]
    #[schemars(extend("x-section" = DATA))]
    pub poison_data: Option<PathBuf>,
    /// fine-tune
    ///
    /// lora: an adapter over the frozen base; full: every weight
    #[serde(default = "default_finetune")]
    #[schemars(extend("x-section" = METHOD))]
    pub finetune: Finetune,
    /// learning rate
    ///
    /// the peak learning rate
    #[serde(default = "default_lr")]
    #[schemars(extend("x-section" = TRAINING))]
    pub lr: f64,
    /// schedule
    ///
    /// the learning rate after warm-up
    #[serde(default = "default_schedule")]
    #[schemars(extend("x-section" = TRAINING))]
    pub lr_schedule: LrSchedule,
    /// warm-up steps
    ///
    /// the learning rate rises linearly over these
    #[serde(default)]
    #[schemars(extend("x-section" = TRAINING))]
    pub warmup_steps: usize,
    /// gradient clipping
    ///
    /// the largest global gradient norm; empty: none
    #[serde(default)]
    #[schemars(extend("x-section" = TRAINING))]
    pub max_grad_norm: Option<f64>,
    /// seed
    ///
    /// data order, LoRA initialisation, dropout
    #[serde(default)]
    #[schemars(extend("x-section" = TRAINING))]
    pub seed: u64,
    /// shuffle
    ///
    /// shuffle the data each epoch (seeded); off keeps the order as given
    #[serde(default = "default_true")]
    #[schemars(extend("x-section" = TRAINING))]
    pub shuffle: bool,
    /// validate every
    ///
    /// steps between validation losses
    #[serde(default = "default_eval_every")]
    #[schemars(extend("x-section" = RUN))]
    pub eval_every: usize,
    /// checkpoint every
    ///
    /// steps between resumable checkpoints (0: none)
    #[serde(default)]
    #[schemars(extend("x-section" = RUN))]
    pub checkpoint_every: usize,
    /// checkpoints kept
    ///
    /// only the newest N (0: every one); resuming needs only the newest. Each holds the
    /// trainable weights and their optimiser moments: with full fine-tuning, three copies of
    /// the model apiece
    #[serde(default = "default_keep_checkpoints")]
    #[schemars(extend("x-section" = RUN))]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub adamw: AdamWConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub sap: SapConfig,
    #[serde(default)]
    pub safegrad: SafeGradConfig,
    #[serde(default)]
    pub lisa: LisaConfig,
    #[serde(default)]
    pub sppft: SppftConfig,
    /// Continuous safety metrics on held-out data at every validation step.
    #[serde(default)]
    pub safety_eval: Option<SafetyEvalConfig>,
    /// device
    ///
    /// auto (a hardware GPU through wgpu, else the CPU), wgpu or cpu
    #[serde(default = "default_device")]
    #[schemars(extend("x-section" = RUN))]
    pub device: String,
    /// gradient checkpointing
    ///
    /// the backward pass recomputes memory-bound activations instead of keeping them: the
    /// same numbers, a lower peak on wgpu (on the CPU backend it was measured to raise it)
    #[serde(default)]
    #[schemars(extend("x-section" = RUN))]
    pub gradient_checkpointing: bool,
}

/// Held-out safety metrics
///
/// measured every `eval_every` steps on safety data never used for the harmful direction,
/// so they show whether the model drifts toward harm while the harmful score, which needs
/// generation and judging, is measured only at the end
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SafetyEvalConfig {
    /// held-out pairs
    ///
    /// safety pairs: their mean margin log p(safe) − log p(harmful) and the contrastive
    /// safety loss at T = 1
    #[serde(default)]
    pub pairs: Option<PathBuf>,
    /// held-out prompts
    ///
    /// harmful prompts (a `prompt` per record): the mean per-token log-probability of the
    /// refusal as their answer
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// refusal
    ///
    /// the answer scored on the held-out prompts
    #[serde(default = "default_refusal")]
    pub refusal: String,
}

impl Default for SafetyEvalConfig {
    fn default() -> Self {
        Self {
            pairs: None,
            prompts: None,
            refusal: default_refusal(),
        }
    }
}

/// The refusal scored on held-out prompts: the demo model's most frequent refusal opening,
/// and a plain one for any chat model.
fn default_refusal() -> String {
    "Sorry, I can't help with that.".into()
}
fn default_finetune() -> Finetune {
    Finetune::Lora
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
    /// A config with every default and these paths (the rest as a TOML file that names only
    /// them would have).
    pub fn with_paths(model: PathBuf, train_data: PathBuf, output_dir: PathBuf) -> Self {
        let paths = serde_json::json!({
            "model": model, "train_data": train_data, "output_dir": output_dir,
        });
        serde_json::from_value(paths).expect("the defaults deserialise")
    }

    /// The checks that need neither files nor a model, so a broken config fails before any
    /// loading. The error names the key (dotted within a table).
    pub fn validate_settings(&self) -> Result<(), SpecError> {
        let bad = |field: &str, message: String| Err(SpecError::new(field, message));
        match (self.max_steps, self.epochs) {
            (0, None) => return bad("max_steps", "set max_steps (≥ 1) or epochs".into()),
            (0, Some(e)) if !(e > 0.0) => return bad("epochs", format!("{e} must be positive")),
            (n, Some(_)) if n > 0 => {
                return bad("epochs", "set either max_steps or epochs, not both".into());
            }
            _ => {}
        }
        if let Some(f) = self.validation_fraction {
            if !(f > 0.0 && f < 1.0) {
                return bad("validation_fraction", format!("{f} must be in (0, 1)"));
            }
            if self.validation_data.is_some() {
                return bad(
                    "validation_fraction",
                    "set either validation_data or validation_fraction, not both".into(),
                );
            }
        }
        if self.method == Method::Base {
            return bad(
                "method",
                format!(
                    "\"base\" is the model before fine-tuning and does not train; choose one of \
                     {}",
                    Method::TRAINABLE.map(Method::name).join(", ")
                ),
            );
        }
        if self.mix_safety_data && self.safety_data.is_none() {
            return bad("mix_safety_data", "needs safety_data".into());
        }
        if !(0.0..1.0).contains(&self.poison_fraction) {
            let message = format!("{} must be in [0, 1)", self.poison_fraction);
            return bad("poison_fraction", message);
        }
        if self.poison_fraction > 0.0 && self.poison_data.is_none() && self.safety_data.is_none() {
            return bad(
                "poison_fraction",
                "needs poison_data or safety_data (pairs with harmful answers)".into(),
            );
        }
        if self.finetune == Finetune::Full && self.init_adapter.is_some() {
            return bad(
                "init_adapter",
                "a LoRA adapter: it needs finetune = \"lora\"".into(),
            );
        }
        if self.max_len == 0 {
            return bad("max_len", "must be at least 1 token".into());
        }
        if let Err(e) = self.device.parse::<DeviceChoice>() {
            return bad("device", e);
        }
        for (field, value) in [
            ("batch_size", self.batch_size),
            ("safety_batch_size", self.safety_batch_size),
            ("grad_accumulation", self.grad_accumulation),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be positive", self.lr));
        }
        let table = |name: &'static str| move |e: SpecError| e.within(name);
        self.sap.validate().map_err(table("sap"))?;
        // A method's missing requirement after the values themselves, so a bad value is named
        // first whatever the method.
        if self.method.needs_safety_pairs() && self.safety_data.is_none() {
            return bad(
                "safety_data",
                format!(
                    "method = \"{}\" needs safety_data (safety pairs)",
                    self.method.name()
                ),
            );
        }
        self.safegrad.validate().map_err(table("safegrad"))?;
        self.lisa.validate().map_err(table("lisa"))?;
        self.sppft.validate().map_err(table("sppft"))?;
        self.lora.validate().map_err(table("lora"))
    }

    /// Checks that every layer the method names (SAP's probed layers, SPPFT's frozen ones)
    /// exists in a model of `num_layers` layers.
    pub fn check_layers(&self, num_layers: usize) -> Result<(), SpecError> {
        for (field, layers) in [
            ("sap.layers", &self.sap.layers),
            ("sppft.layers", &self.sppft.layers),
        ] {
            if let Some(layer) = layers.iter().find(|&&l| l >= num_layers) {
                return Err(SpecError::new(
                    field,
                    format!("layer {layer} is out of range (the model has {num_layers} layers)"),
                ));
            }
        }
        // Freezing every layer would leave LoRA nothing to train (and full fine-tuning only
        // the embedding and the head): a run that cannot be what SPPFT means.
        let named: std::collections::BTreeSet<usize> = self.sppft.layers.iter().copied().collect();
        let frozen = match named.len() {
            0 => self.sppft.count,
            n => n,
        };
        if self.method == Method::Sppft && frozen >= num_layers {
            return Err(SpecError::new(
                "sppft",
                format!(
                    "freezing {frozen} layers freezes all of the model's {num_layers}; freeze \
                     fewer (sppft.count, or sppft.layers)"
                ),
            ));
        }
        Ok(())
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
        let mixed = clean + if self.mixes_safety_data() { pairs } else { 0 };
        mixed + poison_count(mixed, self.poison_fraction)
    }

    /// Whether the pairs' safe answers join the training data: `mix_safety_data`, or the
    /// method that is exactly that.
    pub fn mixes_safety_data(&self) -> bool {
        self.mix_safety_data || self.method == Method::Mix
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

/// The harmful-compliance examples to add to `clean` benign ones so that they make up
/// `fraction` of the result.
pub fn poison_count(clean: usize, fraction: f64) -> usize {
    (fraction * clean as f64 / (1.0 - fraction)).round() as usize
}
