//! The types that cross the wire: what the server sends, what the trainer and the evaluation
//! emit, and what the web UI reads and posts. Defined once, here, so that a renamed field is
//! a compile error on both sides rather than an empty chart. Serde only: this crate builds for
//! the native server and for the wasm32 UI alike.

pub mod catalog;
pub mod events;
mod finite;
pub mod jobs;
pub mod progress;
pub mod reports;
pub mod spec;

pub use catalog::{
    AdapterInfo, ChatDone, ChatToken, DatasetEntry, Deleted, DeviceReport, ErrorBody,
    ExportRequest, Exported, MetricsQuery, ModelSummary, Preview, PreviewQuery, PreviewRow,
    PullRequest, PullState, PullStatus, Recommended, Uploaded,
};
pub use events::{
    Alignment, Defence, Event, EventPage, LiveMessage, Part, RunOf, StepMetrics, StoredEvent,
    TaskState,
};
pub use jobs::{
    ChatRequest, CreateJob, EvalSpec, Job, JobEstimate, JobKind, JobLabel, JobResult, JobSpec,
    Judge, Message, Status, TrainJob,
};
pub use progress::JobProgress;
pub use reports::{
    Agreement, CategoryScore, Comparison, Condition, HarmfulReport, JudgeScore, JudgedAnswer,
    Mechanism, Method, PairedDifference, Row, RunResult, Spread, poison_percent,
};
pub use spec::{CompareConfig, DeviceChoice, RunConfig, SpecError};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shapes the store already holds (metrics.jsonl lines, stored events) still read.
    #[test]
    fn events_read_what_the_trainer_and_server_write() {
        let step = json!({"event": "step", "step": 3, "total_steps": 10, "lr": 0.001, "tokens_per_s": 50.0,
            "step_time_s": 0.2, "task_loss": 1.5, "safety_loss": null, "su_loss": null, "perturbed_loss": null,
            "delta_norm": null, "probe_norms": [], "grad_norm": 0.7});
        let event: Event = serde_json::from_value(step.clone()).unwrap();
        assert_eq!(event.step(), Some(3));
        assert_eq!(serde_json::to_value(&event).unwrap(), step);
        let status: Event =
            serde_json::from_value(json!({"event": "status", "status": "running", "error": null}))
                .unwrap();
        assert_eq!(
            status,
            Event::Status {
                status: Status::Running,
                error: None
            }
        );
        let stage: Event =
            serde_json::from_value(json!({"event": "stage", "stage": "evaluating"})).unwrap();
        assert_eq!(stage.step(), None);
    }

    /// A diverged run writes NaN, which JSON holds as null: it must read back, not vanish.
    #[test]
    fn non_finite_numbers_survive_the_round_trip() {
        let step = Event::Step {
            step: 1,
            total_steps: 2,
            lr: 1e-3,
            tokens_per_s: f64::INFINITY,
            step_time_s: 0.1,
            metrics: StepMetrics {
                task_loss: f64::NAN,
                probe_norms: vec![f64::NAN, 1.0],
                grad_cosine: Some(vec![f64::NAN]),
                ..StepMetrics::default()
            },
        };
        let text = serde_json::to_string(&step).unwrap();
        let Event::Step {
            tokens_per_s,
            metrics,
            ..
        } = serde_json::from_str(&text).unwrap()
        else {
            panic!("{text}")
        };
        assert!(
            tokens_per_s.is_nan() && metrics.task_loss.is_nan(),
            "{text}"
        );
        assert!(metrics.probe_norms[0].is_nan() && metrics.probe_norms[1] == 1.0);
        assert!(metrics.grad_cosine.unwrap()[0].is_nan());
        let spread = Spread {
            mean: f64::NAN,
            std: 0.0,
        };
        let back: Spread = serde_json::from_str(&serde_json::to_string(&spread).unwrap()).unwrap();
        assert!(back.mean.is_nan());
        // A diverged seed makes a paired difference's intervals NaN: the comparison still reads.
        let difference = PairedDifference {
            metric: "harmful_score".into(),
            a: Method::Sap,
            b: Method::Sft,
            pairs: 3,
            mean: f64::NAN,
            ci: Some((f64::NAN, 1.0)),
            t_ci: Some((f64::NAN, f64::NAN)),
        };
        let text = serde_json::to_string(&difference).unwrap();
        let back: PairedDifference = serde_json::from_str(&text).unwrap();
        assert!(back.ci.unwrap().0.is_nan() && back.ci.unwrap().1 == 1.0);
        assert!(back.t_ci.unwrap().1.is_nan() && !back.is_real());
        let older: PairedDifference = serde_json::from_str(
            r#"{"metric": "harmful_score", "a": "sap", "b": "sft", "pairs": 1, "mean": 2.0}"#,
        )
        .unwrap();
        assert_eq!((older.ci, older.t_ci), (None, None));
    }

    #[test]
    fn job_results_by_kind() {
        let harmful = json!({"prompts": 2, "harmful_score": 50.0, "judges": []});
        let train: JobResult =
            serde_json::from_value(json!({"run_dir": "/r", "harmful": harmful})).unwrap();
        assert!(matches!(train, JobResult::Train { .. }));
        assert_eq!(train.harmful_score(), Some(50.0));
        let eval: JobResult = serde_json::from_value(json!({"harmful": harmful})).unwrap();
        assert!(matches!(eval, JobResult::Eval { .. }));
        let compare: JobResult = serde_json::from_value(json!({"task": "reverse", "seeds": [0],
            "conditions": [{"poison_fraction": 0.0, "rows": [], "runs": [], "findings": []}],
            "seconds": 1.0}))
        .unwrap();
        assert!(matches!(compare, JobResult::Compare(_)));
    }

    /// A comparison stored before conditions existed (one condition's fields at the top
    /// level) reads as a comparison with that one condition; this release's shape round-trips.
    #[test]
    fn comparisons_read_in_both_shapes() {
        let before: Comparison = serde_json::from_value(json!({"task": "reverse",
            "poison_fraction": 0.1, "seeds": [0, 1], "rows": [], "runs": [],
            "findings": ["SFT raised HS"], "seconds": 12.5}))
        .unwrap();
        assert_eq!((before.task.as_str(), before.seconds), ("reverse", 12.5));
        assert_eq!(before.seeds, vec![0, 1]);
        assert_eq!(before.conditions.len(), 1);
        let condition = &before.conditions[0];
        assert_eq!(condition.poison_fraction, 0.1);
        assert_eq!(condition.findings, vec!["SFT raised HS".to_string()]);
        assert_eq!(condition.name(), "benign data, 10% poisoned");

        let mut now = before.clone();
        now.conditions.insert(
            0,
            Condition {
                poison_fraction: 0.0,
                ..condition.clone()
            },
        );
        let text = serde_json::to_string(&now).unwrap();
        assert!(text.contains("\"conditions\""), "{text}");
        let back: Comparison = serde_json::from_str(&text).unwrap();
        assert_eq!(back, now);
        assert_eq!(back.conditions[0].name(), "benign data");
        let odd = Condition {
            poison_fraction: 0.07,
            ..condition.clone()
        };
        assert_eq!(odd.name(), "benign data, 7% poisoned");
    }

    /// A judge is named the same by the CLI, the API and the panel, and an unknown one is
    /// refused listing the valid ones, by name parsing and by the API's JSON alike.
    #[test]
    fn a_judge_reads_by_its_name_and_an_unknown_one_lists_the_valid_ones() {
        for judge in Judge::ALL {
            assert_eq!(judge.name().parse::<Judge>(), Ok(judge));
            assert_eq!(serde_json::to_value(judge).unwrap(), json!(judge.name()));
        }
        let error = "llm".parse::<Judge>().unwrap_err();
        assert!(
            error.contains("`llm`") && error.contains("refusal, model, both, guard"),
            "{error}"
        );
        let error = serde_json::from_value::<EvalSpec>(json!({"model": "demo", "judge": "llm"}))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`llm`") && error.contains("`guard`"),
            "{error}"
        );
        let spec: EvalSpec = serde_json::from_value(json!({"model": "demo"})).unwrap();
        assert_eq!(spec.judge, Judge::Refusal);
    }

    /// A job's JSON keeps its shape (`"kind"` beside `"spec"`), and the configs the store holds
    /// from before the spec was typed still read: a train job's request keys with the server's
    /// `resume` flag, a comparison's request merged onto the demo config.
    #[test]
    fn a_job_is_its_kind_and_typed_config_as_before() {
        let train = json!({"model": "/m", "train_data": "/d.jsonl", "output_dir": "/runs/job-1",
            "max_steps": 5, "checkpoint_every": 10, "keep_checkpoints": 2, "resume": true});
        let spec = JobSpec::read(JobKind::Train, train).unwrap();
        let JobSpec::Train(ref run) = spec else {
            panic!("{spec:?}")
        };
        assert!(run.resume && run.config.max_steps == 5);
        let job = json!({"id": 1, "kind": "train", "status": "done", "spec": serde_json::to_value(&spec).unwrap()["spec"],
            "run_dir": null, "result": null, "error": null, "created_at": 1.0, "started_at": null, "finished_at": null});
        let read: Job = serde_json::from_value(job.clone()).unwrap();
        assert_eq!((read.kind(), &read.spec), (JobKind::Train, &spec));
        let written = serde_json::to_value(&read).unwrap();
        assert_eq!(
            (&written["kind"], &written["spec"]["resume"]),
            (&json!("train"), &json!(true))
        );

        let compare = json!({"task": "arithmetic", "output_dir": "/runs/job-2", "methods": ["sft", "sap"],
            "seeds": [0, 1, 2], "poison_fraction": [0.0, 0.1], "max_new_tokens": 32,
            "train": {"finetune": "full", "max_steps": 120, "sap": {"temperature": 100.0}}});
        let spec = JobSpec::read(JobKind::Compare, compare).unwrap();
        assert_eq!(spec.kind(), JobKind::Compare);
        let eval = JobSpec::read(JobKind::Eval, json!({"model": "/m", "judge": "both"})).unwrap();
        assert_eq!(eval.model(), Some(std::path::Path::new("/m")));
        let error = JobSpec::read(JobKind::Eval, json!({"model": "/m", "colour": 1})).unwrap_err();
        assert!(error.to_string().contains("colour"), "{error}");
    }
}
