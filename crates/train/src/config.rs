//! A run's settings: the TOML config, its defaults, overrides and the checks that need no
//! model.

use std::path::{Path, PathBuf};

use safeprobe_model::LoraConfig;
use serde::{Deserialize, Serialize};

pub use safeprobe_wire::Method;

use crate::adamw::AdamWConfig;
use crate::data;
use crate::error::{Result, TrainError};
use crate::methods::lisa::LisaConfig;
use crate::methods::safegrad::SafeGradConfig;
use crate::methods::sap::SapConfig;
use crate::methods::sppft::SppftConfig;

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
    #[serde(default)]
    pub safegrad: SafeGradConfig,
    #[serde(default)]
    pub lisa: LisaConfig,
    #[serde(default)]
    pub sppft: SppftConfig,
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
        if self.method == Method::Base {
            let trainable: Vec<&str> = Method::ALL
                .into_iter()
                .filter(|m| *m != Method::Base)
                .map(Method::name)
                .collect();
            return bad(format!(
                "method: \"base\" is the model before fine-tuning and does not train; choose \
                 one of {}",
                trainable.join(", ")
            ));
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
        // A method's missing requirement after the values themselves, so a bad value is named
        // first whatever the method.
        if self.method.needs_safety_pairs() && self.safety_data.is_none() {
            return bad(format!(
                "method = \"{}\" needs safety_data (safety pairs)",
                self.method.name()
            ));
        }
        let field =
            |table: &'static str| move |m: String| TrainError::Config(format!("{table}.{m}"));
        self.safegrad.validate().map_err(field("safegrad"))?;
        self.lisa.validate().map_err(field("lisa"))?;
        self.sppft.validate().map_err(field("sppft"))?;
        self.lora
            .validate()
            .map_err(|m| TrainError::Config(format!("lora: {m}")))
    }

    /// Checks that every layer the method names (SAP's probed layers, SPPFT's frozen ones)
    /// exists in a model of `num_layers` layers.
    pub fn check_layers(&self, num_layers: usize) -> Result<()> {
        for (field, layers) in [
            ("sap.layers", &self.sap.layers),
            ("sppft.layers", &self.sppft.layers),
        ] {
            if let Some(layer) = layers.iter().find(|&&l| l >= num_layers) {
                return Err(TrainError::Config(format!(
                    "{field}: layer {layer} is out of range (the model has {num_layers} layers)"
                )));
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
            return Err(TrainError::Config(format!(
                "sppft: freezing {frozen} layers freezes all of the model's {num_layers}; freeze \
                 fewer (sppft.count, or sppft.layers)"
            )));
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
        let mixed = clean + if self.mixes_safety_data() { pairs } else { 0 };
        mixed + data::poison_count(mixed, self.poison_fraction)
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
