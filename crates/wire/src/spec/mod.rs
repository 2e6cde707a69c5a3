//! The configs a job runs by, defined once: the trainer parses its TOML files into them, the
//! CLI's `--set` overrides their keys, the server takes them as its API's JSON and the panel
//! builds its form from their schema (`form`). Defaults and the checks that need neither files
//! nor a model are here, with errors that name the key.

pub mod form;
mod run;
pub mod settings;

pub use run::{Finetune, LrSchedule, RunConfig, SafetyEvalConfig, poison_count};
pub use settings::{
    AdamWConfig, AlignmentLoss, LisaConfig, LoraConfig, PROJECTIONS, ProbeUpdate, SafeGradConfig,
    SapConfig, Schedule, SppftConfig,
};

/// The new-run form: every field of `RunConfig` (its optional tables present, so that their
/// fields are listed too).
pub fn run_form() -> Vec<form::FormField> {
    let mut example = RunConfig::with_paths("".into(), "".into(), "".into());
    example.safety_eval = Some(SafetyEvalConfig::default());
    form::fields(&example)
}

/// A config value that is wrong, named by its key (dotted within a table: `sap.rho`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for a key of the table `table`.
    pub fn within(self, table: &str) -> Self {
        Self {
            field: format!("{table}.{}", self.field),
            ..self
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

/// The schema of a choice among named values, each described (what serde and schemars derive
/// for an enum with documented variants, for the enums whose descriptions are methods).
pub(crate) fn choices<const N: usize>(named: [(&str, &str); N]) -> schemars::Schema {
    let options: Vec<serde_json::Value> = named
        .iter()
        .map(|(name, describe)| {
            serde_json::json!({"type": "string", "const": name, "description": describe})
        })
        .collect();
    schemars::json_schema!({ "oneOf": options })
}

/// Where a run computes: `auto` takes a hardware GPU through wgpu where there is one, else
/// the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Wgpu,
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!(
                "unknown device \"{other}\": expected auto, wgpu or cpu"
            )),
        }
    }
}
