//! The settings tables of a run config: the optimiser, the adapter, and each method's own
//! (`[sap]`, `[safegrad]`, `[lisa]`, `[sppft]`). A method's file in the trainer holds what
//! the method does; its settings are here so that the server and the panel read the same
//! type. A doc comment's first paragraph is the panel's label, the rest its help.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SpecError;

/// Which projections a decoder layer has, named as in Hugging Face checkpoints and PEFT's
/// `target_modules`.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// AdamW
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// β₁
    ///
    /// the first moment's decay
    pub beta1: f64,
    /// β₂
    ///
    /// the second moment's decay
    pub beta2: f64,
    /// ε
    ///
    /// added to the second moment's root
    pub eps: f64,
    /// weight decay
    ///
    /// decoupled, as torch.optim.AdamW
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// LoRA
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// rank r
    ///
    /// the adapter's rank
    pub r: usize,
    /// alpha
    ///
    /// scale = alpha / r (or alpha / √r with rsLoRA)
    pub alpha: f64,
    /// dropout
    ///
    /// on the adapter's input, while training
    pub dropout: f64,
    /// target modules
    ///
    /// the projections that get an adapter: q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj
    pub target_modules: Vec<String>,
    /// rsLoRA
    ///
    /// scale by alpha / √r
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The adapter's settings beyond their types; the error names the key within `[lora]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.r == 0 {
            return Err(SpecError::new("r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(SpecError::new(
                "dropout",
                format!("{} must be in [0, 1)", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(SpecError::new("target_modules", "is empty"));
        }
        if let Some(bad) = self
            .target_modules
            .iter()
            .find(|m| !PROJECTIONS.contains(&m.as_str()))
        {
            return Err(SpecError::new(
                "target_modules",
                format!("\"{bad}\" is not one of {}", PROJECTIONS.join(", ")),
            ));
        }
        Ok(())
    }
}

/// How SAP orders its passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// the official code's order: three passes, the probe a step behind
    Lagged,
    /// Algorithm 1 as written: four passes
    Exact,
}

/// How the exact schedule turns ∇_V L_su into the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProbeUpdate {
    /// a plain gradient step of size β
    Gradient,
    /// an Adam step of size β
    Adam,
}

/// SAP (Safety-Aware Probing)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SapConfig {
    /// ρ (perturbation radius)
    ///
    /// relative radius of the harmful perturbation: ε = ρ·‖W‖ along the harmful direction
    pub rho: f64,
    /// T (safety loss temperature)
    ///
    /// of the contrastive safety loss; raise it if ‖ΔW‖ stays 0 (a saturated loss)
    pub temperature: f64,
    /// β (probe step size)
    ///
    /// how far the probe climbs L_su per step
    pub beta: f64,
    /// probed layers
    ///
    /// empty: the middle ten layers, clamped to the model's depth
    pub layers: Vec<usize>,
    /// schedule
    ///
    /// lagged (the official code, 3 passes) or exact (Algorithm 1, 4 passes)
    pub schedule: Schedule,
    /// exact schedule's probe update
    ///
    /// how the exact schedule turns ∇_V L_su into the probe
    pub exact_update: ProbeUpdate,
    /// refresh every k steps
    ///
    /// recompute the harmful direction every k steps (k = 4 ≈ 2.5× SFT's cost)
    pub refresh_every: usize,
    /// gradient cosines every
    ///
    /// per-layer cos(∇L_task, ∇L_safety) every N steps, for the heatmap (0: never); measured
    /// on steps that refresh the direction
    pub cosine_every: usize,
}

impl Default for SapConfig {
    fn default() -> Self {
        Self {
            rho: 2e-5,
            temperature: 1.0,
            beta: 0.05,
            layers: Vec::new(),
            schedule: Schedule::Lagged,
            exact_update: ProbeUpdate::Gradient,
            refresh_every: 1,
            cosine_every: 10,
        }
    }
}

impl SapConfig {
    pub fn probe_layers(&self, num_layers: usize) -> Vec<usize> {
        if !self.layers.is_empty() {
            return self.layers.clone();
        }
        let count = num_layers.min(10);
        let start = (num_layers - count) / 2;
        (start..start + count).collect()
    }

    /// The settings beyond their types; the error names the key within `[sap]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.refresh_every == 0 {
            return Err(SpecError::new("refresh_every", "must be at least 1"));
        }
        if !(self.rho >= 0.0 && self.rho.is_finite()) {
            return Err(SpecError::new(
                "rho",
                format!("{} must be a number ≥ 0", self.rho),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(SpecError::new(
                "temperature",
                format!("{} must be > 0", self.temperature),
            ));
        }
        let mut layers = self.layers.clone();
        layers.sort_unstable();
        if let Some(twice) = layers.windows(2).find(|w| w[0] == w[1]) {
            return Err(SpecError::new(
                "layers",
                format!(
                    "layer {} is listed twice; each probed layer has one probe vector",
                    twice[0]
                ),
            ));
        }
        Ok(())
    }
}

/// What SafeGrad's alignment gradient is the gradient of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlignmentLoss {
    /// the safe answers' cross-entropy
    Answers,
    /// KL divergence from the starting model on the safe answers' tokens
    Kl,
}

/// SafeGrad
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SafeGradConfig {
    /// alignment loss
    ///
    /// answers: the safe answers' cross-entropy; kl: KL from the starting model on them
    pub alignment_loss: AlignmentLoss,
    /// λ
    ///
    /// the alignment gradient's weight in the update
    pub alignment_weight: f64,
}

impl Default for SafeGradConfig {
    fn default() -> Self {
        Self {
            alignment_loss: AlignmentLoss::Answers,
            alignment_weight: 1.0,
        }
    }
}

impl SafeGradConfig {
    /// The settings beyond their types; the error names the key within `[safegrad]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(self.alignment_weight >= 0.0 && self.alignment_weight.is_finite()) {
            return Err(SpecError::new(
                "alignment_weight",
                format!("{} must be a number ≥ 0", self.alignment_weight),
            ));
        }
        Ok(())
    }
}

/// Lisa
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LisaConfig {
    /// alignment steps
    ///
    /// steps of each block spent on the safe answers
    pub alignment_steps: usize,
    /// task steps
    ///
    /// steps of each block spent on the task data
    pub task_steps: usize,
    /// ρ (proximal)
    ///
    /// the proximal term's weight: the pull towards where the other state left the weights
    pub proximal: f64,
}

impl Default for LisaConfig {
    fn default() -> Self {
        Self {
            alignment_steps: 1,
            task_steps: 9,
            proximal: 1.0,
        }
    }
}

impl LisaConfig {
    /// The settings beyond their types; the error names the key within `[lisa]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, steps) in [
            ("alignment_steps", self.alignment_steps),
            ("task_steps", self.task_steps),
        ] {
            if steps == 0 {
                return Err(SpecError::new(field, "must be at least 1"));
            }
        }
        if !(self.proximal >= 0.0 && self.proximal.is_finite()) {
            return Err(SpecError::new(
                "proximal",
                format!("{} must be a number ≥ 0", self.proximal),
            ));
        }
        Ok(())
    }

    /// Whether step `step` (from 0) is in the alignment state.
    pub fn in_alignment(&self, step: usize) -> bool {
        step % (self.alignment_steps + self.task_steps) < self.alignment_steps
    }
}

/// SPPFT
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SppftConfig {
    /// frozen layers
    ///
    /// the safety layers; empty: located by the safety gradient at the first step
    pub layers: Vec<usize>,
    /// layers to freeze
    ///
    /// how many to freeze when locating them (0: a quarter of the model's, rounded up)
    pub count: usize,
    /// T
    ///
    /// of the contrastive safety loss whose gradient locates them
    pub temperature: f64,
}

impl Default for SppftConfig {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            count: 0,
            temperature: 1.0,
        }
    }
}

impl SppftConfig {
    /// The settings beyond their types; the error names the key within `[sppft]`.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(SpecError::new(
                "temperature",
                format!("{} must be > 0", self.temperature),
            ));
        }
        Ok(())
    }
}
