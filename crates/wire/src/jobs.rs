//! Jobs as the API shows them, and the requests that make them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::Event;
use crate::reports::{Comparison, HarmfulReport, JudgedAnswer};
use crate::spec::{CompareConfig, RunConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A training run (SFT or SAP), then its harmful score.
    Train,
    /// A harmful-score evaluation of a model (and adapter).
    Eval,
    /// Base model, SFT, SAP and mixing on the same data.
    Compare,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [JobKind::Train, JobKind::Eval, JobKind::Compare];

    pub fn name(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Eval => "eval",
            JobKind::Compare => "compare",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    /// Was running when the server stopped; can be resumed.
    Interrupted,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Interrupted => "interrupted",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, Status::Queued | Status::Running)
    }

    pub fn is_resumable(self) -> bool {
        matches!(
            self,
            Status::Interrupted | Status::Cancelled | Status::Failed
        )
    }
}

/// What a finished job concluded, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobResult {
    Compare(Comparison),
    Train {
        run_dir: PathBuf,
        harmful: HarmfulReport,
    },
    Eval {
        harmful: HarmfulReport,
    },
}

impl Job {
    pub fn kind(&self) -> JobKind {
        self.spec.kind()
    }
}

impl JobResult {
    /// The harmful score, where the job has a single one.
    pub fn harmful_score(&self) -> Option<f64> {
        match self {
            JobResult::Train { harmful, .. } | JobResult::Eval { harmful } => {
                Some(harmful.harmful_score)
            }
            JobResult::Compare(_) => None,
        }
    }
}

/// What a job runs, by kind: its resolved config (paths made absolute, server defaults filled
/// in). As JSON, `"kind"` names the kind and `"spec"` holds the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "lowercase")]
pub enum JobSpec {
    Train(TrainJob),
    Eval(EvalSpec),
    Compare(CompareConfig),
}

impl JobSpec {
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Train(_) => JobKind::Train,
            JobSpec::Eval(_) => JobKind::Eval,
            JobSpec::Compare(_) => JobKind::Compare,
        }
    }

    /// A stored config of a job of `kind`.
    pub fn read(kind: JobKind, config: Value) -> Result<Self, crate::SpecError> {
        crate::spec::read(serde_json::json!({"kind": kind, "spec": config}))
    }

    /// The model the job starts from (a comparison's is the demo model when it names none).
    pub fn model(&self) -> Option<&std::path::Path> {
        match self {
            JobSpec::Train(train) => Some(&train.config.model),
            JobSpec::Eval(eval) => Some(&eval.model),
            JobSpec::Compare(compare) => compare.model.as_deref(),
        }
    }

    /// The device the job asks for, where it names one; else the server's. (A run config's
    /// "auto", its default, leaves the choice to the server.)
    pub fn device(&self) -> Option<&str> {
        match self {
            JobSpec::Train(train) => Some(train.config.device.as_str()).filter(|d| *d != "auto"),
            JobSpec::Eval(_) => None,
            JobSpec::Compare(compare) => compare.device.as_deref(),
        }
    }
}

/// A training job: its run config, and whether it resumes from its newest checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    #[serde(flatten)]
    pub config: RunConfig,
    /// Set by the server when it requeues an interrupted run that has a checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// A job as listed and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: i64,
    /// Its kind (`"kind"`) and config (`"spec"`).
    #[serde(flatten)]
    pub spec: JobSpec,
    pub status: Status,
    pub run_dir: Option<String>,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// The newest step event, for lists and progress bars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step: Option<Event>,
    /// How far the job is as a whole, from its newest stage and step (the live stream's
    /// events after `progress.seq` carry it on).
    #[serde(default)]
    pub progress: crate::progress::JobProgress,
    /// The newest validation event, for lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_validation: Option<Event>,
    /// The newest mechanism measurement, for comparing runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_alignment: Option<crate::events::Alignment>,
    /// The judged answers (only in `GET /api/jobs/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<JudgedAnswer>,
    /// The user's name for the job ("" until given).
    #[serde(default)]
    pub name: String,
    /// The user's notes on it.
    #[serde(default)]
    pub notes: String,
}

/// `POST /api/jobs/estimate` (the body of `POST /api/jobs`): what the job would take, before
/// it is started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEstimate {
    /// Its estimated peak memory, in bytes.
    pub memory_bytes: u64,
    /// The same in words, with its parts ("1.2 GiB (weights 940 MiB, …)").
    pub memory: String,
    /// The most this server lets a job take here, where it knows, and in whose words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<(u64, String)>,
    /// For a training run, its time at the pace of the newest finished run like it on this
    /// server (same model, method, fine-tuning, batch and length; device and data may differ);
    /// for a comparison, the time the newest finished one of the same config took: (seconds,
    /// that job's id). None when there is nothing to go by (and for an evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<(f64, i64)>,
}

/// `POST /api/jobs/{id}/label`: a job's name and notes, replacing what it had.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLabel {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub notes: String,
}

impl JobLabel {
    /// The longest name, in characters: a list's column, not a paragraph.
    pub const NAME_CHARS: usize = 100;
    /// The longest notes, in characters.
    pub const NOTES_CHARS: usize = 10_000;

    /// The field that does not fit, and why: a name of one line within its length, notes
    /// within theirs.
    pub fn check(&self) -> Result<(), crate::SpecError> {
        let chars = |t: &str| t.chars().count();
        if chars(&self.name) > Self::NAME_CHARS {
            return Err(crate::SpecError::new(
                "name",
                format!(
                    "{} characters, over {}",
                    chars(&self.name),
                    Self::NAME_CHARS
                ),
            ));
        }
        if self.name.contains(['\n', '\r']) {
            return Err(crate::SpecError::new("name", "one line, please"));
        }
        if chars(&self.notes) > Self::NOTES_CHARS {
            return Err(crate::SpecError::new(
                "notes",
                format!(
                    "{} characters, over {}",
                    chars(&self.notes),
                    Self::NOTES_CHARS
                ),
            ));
        }
        Ok(())
    }
}

/// `POST /api/jobs`: a job's kind and its config, a run config (train), an evaluation's
/// settings (eval) or a comparison config refining the demo one (compare), as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub kind: JobKind,
    #[serde(default)]
    pub config: Value,
}

/// Who decides whether an answer is harmful: the one judge choice of the CLI's `eval`, the
/// API's evaluation jobs and the panel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Judge {
    /// An answer that does not refuse counts as harmful.
    #[default]
    Refusal,
    /// A chat model asked yes or no (`judge_model`).
    Model,
    /// The refusal judge and the chat model judge.
    Both,
    /// The refusal judge and a guard model (Llama Guard 3, Qwen3Guard-Gen) in its own format.
    Guard,
}

impl Judge {
    pub const ALL: [Judge; 4] = [Judge::Refusal, Judge::Model, Judge::Both, Judge::Guard];

    pub fn name(self) -> &'static str {
        match self {
            Judge::Refusal => "refusal",
            Judge::Model => "model",
            Judge::Both => "both",
            Judge::Guard => "guard",
        }
    }

    /// What the judge does, in a few words (the form's help, the CLI's).
    pub fn describe(self) -> &'static str {
        match self {
            Judge::Refusal => "not refusing counts as harmful",
            Judge::Model => "a chat model's yes/no log-probabilities",
            Judge::Both => "the refusal judge and the model judge",
            Judge::Guard => {
                "the refusal judge and a guard model (Llama Guard 3, Qwen3Guard-Gen) in its own \
                 format"
            }
        }
    }

    /// Whether the refusal judge runs.
    pub fn uses_refusal(self) -> bool {
        self != Judge::Model
    }

    /// The kind of checkpoint `judge_model` must name, where this judge needs one.
    pub fn needs_model(self) -> Option<&'static str> {
        match self {
            Judge::Refusal => None,
            Judge::Model | Judge::Both => Some("chat"),
            Judge::Guard => Some("guard"),
        }
    }
}

impl schemars::JsonSchema for Judge {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Judge".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crate::spec::choices(Judge::ALL.map(|j| (j.name(), j.describe())))
    }
}

impl std::fmt::Display for Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Judge {
    type Err = String;

    /// A judge by name; an unknown one is refused listing the valid ones.
    fn from_str(s: &str) -> Result<Self, String> {
        Judge::ALL
            .into_iter()
            .find(|j| j.name() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Judge::ALL.iter().map(|j| j.name()).collect();
                format!("unknown judge `{s}`: expected one of {}", valid.join(", "))
            })
    }
}

fn default_eval_tokens() -> usize {
    48
}

const EVAL_WHAT: &str = "What is evaluated";
const EVAL_JUDGING: &str = "Judging";

/// An evaluation job's settings: the harmful score of a model (and adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// model
    ///
    /// "demo", a checkpoint folder or .gguf file (under the server's model directories), or a
    /// pulled Hub id (ORG/NAME)
    #[schemars(extend("x-section" = EVAL_WHAT))]
    pub model: PathBuf,
    /// adapter
    ///
    /// a PEFT adapter folder to apply to the model (under a data directory); empty: the model
    /// as it is
    #[serde(default)]
    #[schemars(extend("x-section" = EVAL_WHAT))]
    pub adapter: Option<PathBuf>,
    /// harmful prompts
    ///
    /// JSONL, CSV (AdvBench) or BeaverTails; empty: the built-in held-out set
    #[serde(default)]
    #[schemars(extend("x-section" = EVAL_WHAT))]
    pub prompts: Option<PathBuf>,
    /// system prompt
    ///
    /// prepended to each harmful prompt
    #[serde(default)]
    #[schemars(extend("x-section" = EVAL_WHAT))]
    pub system: Option<String>,
    /// judge
    ///
    /// who decides whether an answer is harmful
    #[serde(default)]
    #[schemars(extend("x-section" = EVAL_JUDGING))]
    pub judge: Judge,
    /// judge model
    ///
    /// the checkpoint the model, both or guard judge asks (under the model directories)
    #[serde(default)]
    #[schemars(extend("x-section" = EVAL_JUDGING))]
    pub judge_model: Option<PathBuf>,
    /// answer tokens
    ///
    /// the longest answer generated to each prompt
    #[serde(default = "default_eval_tokens")]
    #[schemars(extend("x-section" = EVAL_JUDGING))]
    pub max_new_tokens: usize,
}

impl EvalSpec {
    /// The settings with every default and this model.
    pub fn for_model(model: PathBuf) -> Self {
        Self {
            model,
            adapter: None,
            prompts: None,
            system: None,
            judge: Judge::default(),
            judge_model: None,
            max_new_tokens: default_eval_tokens(),
        }
    }

    /// A value with every field present (the form lists fields in this order).
    pub(crate) fn example() -> Self {
        Self {
            adapter: Some(PathBuf::new()),
            prompts: Some(PathBuf::new()),
            system: Some(String::new()),
            judge_model: Some(PathBuf::new()),
            ..Self::for_model(PathBuf::new())
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn default_chat_tokens() -> usize {
    128
}
fn one() -> f32 {
    1.0
}

/// `POST /api/chat`: streamed generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default = "default_chat_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
}
