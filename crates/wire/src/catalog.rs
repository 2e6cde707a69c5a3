//! What the server offers: its device, models, data files, previews, chat stream pieces and
//! errors.

use serde::{Deserialize, Serialize};

/// A graphics adapter wgpu found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    pub vendor: String,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
}

/// `GET /api/device`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The device jobs run on, and why it was chosen.
    pub selected: String,
    pub adapters: Vec<AdapterInfo>,
}

/// One entry of `GET /api/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// What requests call it ("demo", or its folder under a model directory).
    pub name: String,
    pub path: String,
    pub parameters: u64,
    pub f32_bytes: u64,
    pub layers: usize,
    pub hidden_size: usize,
    /// The run settings the model's folder recommends (its `safeprobe.json`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommends: Option<Recommended>,
}

/// A model's own recommendation for runs on it (`safeprobe.json` in its folder:
/// `{"recommended": {"sap.temperature": 100.0}, "why": "..."}`), by run-config key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recommended {
    pub recommended: std::collections::BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub why: String,
}

/// `POST /api/models/pull`: download a model from the Hugging Face Hub into the server's
/// Hugging Face cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    /// ORG/NAME
    pub repo: String,
    /// A branch, tag or commit (default: main).
    #[serde(default)]
    pub revision: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullState {
    Running,
    Done,
    Failed,
}

/// A pull the server started: one entry of `GET /api/models/pulls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullStatus {
    pub repo: String,
    pub revision: String,
    pub state: PullState,
    /// The file being downloaded.
    pub file: String,
    pub files_done: usize,
    pub files: usize,
    /// Bytes of `file` so far, of `total`.
    pub bytes: u64,
    pub total: u64,
    /// Why it failed, in the user's terms.
    pub error: Option<String>,
}

impl PullStatus {
    /// A pull that has just started: nothing known yet about its files.
    pub fn started(repo: impl Into<String>, revision: impl Into<String>) -> Self {
        Self {
            repo: repo.into(),
            revision: revision.into(),
            state: PullState::Running,
            file: String::new(),
            files_done: 0,
            files: 0,
            bytes: 0,
            total: 0,
            error: None,
        }
    }
}

/// One entry of `GET /api/datasets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetEntry {
    /// Relative to its data directory; what requests name it by.
    pub name: String,
    pub bytes: u64,
}

/// `GET /api/datasets/preview?path=&model=&rows=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewQuery {
    pub path: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "five")]
    pub rows: usize,
}

fn five() -> usize {
    5
}

/// A data file's first examples rendered through the chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    /// Examples in the whole file.
    pub examples: usize,
    pub rows: Vec<PreviewRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewRow {
    pub rendered: String,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
}

/// `GET /api/jobs/{id}/metrics?after=&limit=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsQuery {
    #[serde(default)]
    pub after: i64,
    #[serde(default = "page_size")]
    pub limit: i64,
}

fn page_size() -> i64 {
    1000
}

/// The chat stream's `token` event: text added since the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatToken {
    pub text: String,
}

/// The chat stream's `done` event: the whole reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatDone {
    pub text: String,
    pub tokens: usize,
}

/// The body of every error response (and of the chat stream's `error` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The request's field at fault, by its key within the request (`config.max_steps`), where
    /// the error is about one field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `DELETE /api/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: i64,
}

/// `POST /api/datasets` (multipart, one file): what was stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uploaded {
    /// What requests name it by (under the data directory's `uploads/`).
    pub name: String,
    pub bytes: u64,
    /// Records read from it.
    pub records: usize,
    /// What it holds: "examples" (training data), "pairs" (safety pairs) or "prompts"
    /// (a harmful prompt set).
    pub holds: String,
}

fn bf16() -> String {
    "bf16".into()
}

/// `POST /api/jobs/{id}/export`: merge a finished run into a full checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// bf16 or f32.
    #[serde(default = "bf16")]
    pub dtype: String,
}

/// Where the merged checkpoint was written, and the command that does the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub path: String,
    pub command: String,
}
