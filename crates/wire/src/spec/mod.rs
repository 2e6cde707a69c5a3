//! The configs a job runs by, defined once: the trainer parses its TOML files into them, the
//! CLI's `--set` overrides their keys, the server takes them as its API's JSON and the panel
//! builds its form from their schema (`form`). Defaults and the checks that need neither files
//! nor a model are here, with errors that name the key.

mod compare;
pub mod form;
mod run;
pub mod settings;

use serde_json::Value;

pub use compare::{
    CompareConfig, Executor, RunFiles, SET_BY_COMPARISON, SlurmSettings, Task, TrainSettings,
};
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

/// The comparison form: every field of `CompareConfig`, its trainer settings as the run
/// form's fields under `train.` (less those the comparison sets). A request refines `base`
/// (the demo comparison, on the server), so each field's default is `base`'s value.
pub fn compare_form(base: &CompareConfig) -> Vec<form::FormField> {
    let mut fields = form::fields(base);
    fields.retain(|f| !f.key.starts_with("train."));
    let base_value = serde_json::to_value(base).unwrap_or_default();
    for field in &mut fields {
        field.default = form::as_text(&base_value[field.key.as_str()]);
    }
    let trainer = run_form().into_iter().filter(|f| {
        let top = f.key.split('.').next().unwrap_or_default();
        !SET_BY_COMPARISON.contains(&top)
    });
    let base_train = Value::Object(base.train.0.clone());
    for mut field in trainer {
        let set = field.key.split('.').try_fold(&base_train, |v, k| v.get(k));
        if let Some(value) = set {
            field.default = form::as_text(value);
        }
        field.key = format!("train.{}", field.key);
        field.required = false;
        fields.push(field);
    }
    fields
}

/// The evaluation form: every field of `EvalSpec`.
pub fn eval_form() -> Vec<form::FormField> {
    form::fields(&crate::EvalSpec::example())
}

/// A config read from JSON, an error naming the key it is at (`sap.rho: invalid type ...`;
/// an unknown key is named with the valid ones). JSON null means "not set".
pub fn read<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        SpecError::new(field, e.into_inner().to_string())
    })
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
        let field = match self.field.as_str() {
            "" => table.to_string(),
            key => format!("{table}.{key}"),
        };
        Self { field, ..self }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field.as_str() {
            "" => f.write_str(&self.message),
            field => write!(f, "{field}: {}", self.message),
        }
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
