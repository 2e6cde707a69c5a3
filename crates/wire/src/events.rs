//! What a job reports as it runs: one line of metrics.jsonl, one stored event, one message of
//! the live stream.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::jobs::Status;

/// The metrics of one training step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub task_loss: f64,
    pub safety_loss: Option<f64>,
    pub su_loss: Option<f64>,
    pub perturbed_loss: Option<f64>,
    pub delta_norm: Option<f64>,
    #[serde(deserialize_with = "crate::finite::vec_or_nan")]
    pub probe_norms: Vec<f64>,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub grad_norm: f64,
    /// Per layer, cos(∇_W L_task, ∇_W L_safety), on steps where it was measured.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option_vec_or_nan"
    )]
    pub grad_cosine: Option<Vec<f64>>,
    /// Whether the probe turns the update toward safety, on measurement steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment: Option<Alignment>,
    /// What a defence did on this step (SafeGrad, Lisa, SPPFT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defence: Option<Defence>,
}

/// One step of a defence, measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Defence {
    /// SafeGrad: the alignment loss, cos(∇L_task, ∇L_align) before the surgery, and the share
    /// of the task gradient's norm it removed (0 when they did not conflict).
    Projection {
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        alignment_loss: f64,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        cosine: f64,
        projected: bool,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        removed: f64,
    },
    /// Lisa: the state the step was in, its loss, and ‖W − anchor‖, the drift from the other
    /// state's last weights that the proximal term pulls back.
    Lisa {
        alignment_state: bool,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        state_loss: f64,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        drift: f64,
    },
    /// SPPFT: the frozen layers and the share of the task gradient's norm that fell on them.
    Frozen {
        layers: Vec<usize>,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        removed: f64,
    },
}

/// How the task gradient lines up with the harmful direction: cos(∇_W L_task(W, V), ĝ) with
/// ĝ = ∇_W L_safety / ‖∇_W L_safety‖, over all trainable weights and per layer. Positive
/// means the task step −lr·∇L_task also lowers the safety loss (a safer step); SAP's probe
/// should raise it above the value at V = 0, and a random-sign probe of the same size (the
/// control) should not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    /// At V = 0 (what plain SFT follows).
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub at_zero: f64,
    /// At the probe the weights were updated with (SAP runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_probe: Option<f64>,
    /// At a random-sign probe with each layer's norm equal to the probe's (SAP runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_random: Option<f64>,
    /// The same cosines per layer.
    #[serde(deserialize_with = "crate::finite::vec_or_nan")]
    pub per_layer_at_zero: Vec<f64>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::finite::vec_or_nan"
    )]
    pub per_layer_at_probe: Vec<f64>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::finite::vec_or_nan"
    )]
    pub per_layer_at_random: Vec<f64>,
    /// Seconds the measurement's extra passes took (left out of the step time).
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub seconds: f64,
}

/// Something a job reports: the trainer's steps, validations and end, and the server's
/// stages and status changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Step {
        step: usize,
        total_steps: usize,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        lr: f64,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        tokens_per_s: f64,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        step_time_s: f64,
        #[serde(flatten)]
        metrics: StepMetrics,
    },
    Validation {
        step: usize,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        loss: f64,
    },
    /// Continuous safety metrics on held-out data, at validation steps.
    SafetyCheck {
        step: usize,
        /// Mean log p(safe) − log p(harmful) over held-out pairs (nats; higher is safer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pair_margin: Option<f64>,
        /// The contrastive safety loss at T = 1 on the same pairs (lower is safer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pair_loss: Option<f64>,
        /// Mean per-token log-probability of the refusal as the answer to held-out harmful
        /// prompts (higher: the model is readier to refuse).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refusal_logprob: Option<f64>,
    },
    Done {
        steps: usize,
        adapter: PathBuf,
    },
    /// Something about the run the user should know that does not stop it (said once).
    Warning {
        step: usize,
        message: String,
    },
    /// A comparison's or a job's phase ("sft (seed 0)", "evaluating").
    Stage {
        stage: String,
        /// The part of the job this stage begins, for a job in parts (a comparison: the base
        /// model's evaluation, then one part per run); none for a stage within a part or a
        /// job of one part (a training run's evaluation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
        /// The run this stage trains, for a comparison's runs: charts put a method's seeds
        /// together by it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<RunOf>,
    },
    Status {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A comparison's run handed to a cluster scheduler (Slurm) changed state.
    Task {
        run: RunOf,
        /// The scheduler's name for it ("4123_5": job array 4123, task 5).
        id: String,
        state: TaskState,
        /// Why it waits (the scheduler's reason), or the tail of its log when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// Where a comparison's run stands with the cluster's scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Submitted, waiting for a node.
    Pending,
    Running,
    /// Stopped by the scheduler (preempted, requeued) and waiting to resume from its newest
    /// checkpoint.
    Requeued,
    /// Trained.
    Done,
    Failed,
}

impl TaskState {
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Requeued => "requeued",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
        }
    }

    /// Whether the task has ended.
    pub fn ended(self) -> bool {
        matches!(self, TaskState::Done | TaskState::Failed)
    }
}

impl Event {
    /// The training step this event belongs to, if any.
    pub fn step(&self) -> Option<usize> {
        match self {
            Event::Step { step, .. }
            | Event::Validation { step, .. }
            | Event::SafetyCheck { step, .. }
            | Event::Warning { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// Which of a comparison's runs: its method, seed and condition (`Condition::name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOf {
    pub method: crate::reports::Method,
    pub seed: u64,
    pub condition: String,
}

/// Part `number` (from 1) of a job's `of` parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub number: usize,
    pub of: usize,
}

/// An event as the store keeps it: numbered within its job (numbers grow and are never
/// reused) and timed (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub at: f64,
    pub body: Event,
}

/// One page of a job's stored events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Pass as `after` for the next page; None when this page is empty.
    pub next_after: Option<i64>,
}

/// One message of the live stream (`/api/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveMessage {
    pub job: i64,
    pub seq: i64,
    /// When the server stored it (seconds since the Unix epoch), as `StoredEvent::at`.
    pub at: f64,
    pub body: Event,
}
