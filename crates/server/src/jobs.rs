//! Jobs: training runs, evaluations and comparisons, queued and executed one at a time on the
//! server's device by the same library code the CLI calls. Every event goes to the store and
//! to the live stream.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use burn::tensor::Device;
use safeprobe_eval::compare::{self, CompareConfig, Progress};
use safeprobe_eval::harmful::{self, AnswerSettings, Judges};
use safeprobe_eval::judge::{ModelJudge, RefusalJudge};
use safeprobe_model::Checkpoint;
use safeprobe_train::TrainError;
use safeprobe_train::run::{self, Cancel, Event, RunConfig};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::paths::Roots;
use crate::store::{Status, Store};

pub const KINDS: [&str; 3] = ["train", "eval", "compare"];

/// What the server knows about where things are.
#[derive(Clone)]
pub struct Places {
    pub models: Roots,
    pub data: Roots,
    /// Run directories go here: `<data_dir>/runs/job-<id>`.
    pub runs_dir: PathBuf,
}

impl Places {
    /// A model named in a request: "demo" (or nothing) is the embedded demo model.
    pub fn model(&self, field: &str, name: Option<&str>) -> Result<PathBuf, ApiError> {
        match name {
            None | Some("") | Some("demo") => Ok(safeprobe_eval::demo_model::bundled_dir()),
            Some(name) => self.models.resolve(field, name),
        }
    }

    pub fn run_dir(&self, id: i64) -> PathBuf {
        self.runs_dir.join(format!("job-{id}"))
    }
}

fn as_object<'a>(
    spec: &'a mut Value,
    what: &str,
) -> Result<&'a mut serde_json::Map<String, Value>, ApiError> {
    spec.as_object_mut()
        .ok_or_else(|| ApiError::Invalid(format!("{what}: expected a JSON object")))
}

/// Replaces the path fields of a request with confined, absolute paths.
fn confine(
    map: &mut serde_json::Map<String, Value>,
    roots: &Roots,
    prefix: &str,
    fields: &[&str],
) -> Result<(), ApiError> {
    for field in fields {
        match map.get(*field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                let path = roots.resolve(&format!("{prefix}{field}"), s)?;
                map.insert(field.to_string(), Value::String(path.display().to_string()));
            }
            Some(other) => {
                return Err(ApiError::Invalid(format!(
                    "{prefix}{field}: expected a path string, found {other}"
                )));
            }
        }
    }
    Ok(())
}

fn toml_text(map: &serde_json::Map<String, Value>, what: &str) -> Result<String, ApiError> {
    // JSON null means "not set" in TOML, which has no null.
    let cleaned: serde_json::Map<String, Value> = map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let value = toml::Value::try_from(Value::Object(cleaned))
        .map_err(|e| ApiError::Invalid(format!("{what}: {e}")))?;
    toml::to_string(&value).map_err(|e| ApiError::Invalid(format!("{what}: {e}")))
}

/// Checks a job request and resolves its paths; returns the spec to store.
pub fn validate(
    kind: &str,
    mut config: Value,
    id: i64,
    places: &Places,
) -> Result<(Value, Option<PathBuf>), ApiError> {
    let map = as_object(&mut config, "config")?;
    match kind {
        "train" => {
            let model = places.model("config.model", map.get("model").and_then(Value::as_str))?;
            map.insert("model".into(), Value::String(model.display().to_string()));
            confine(
                map,
                &places.data,
                "config.",
                &[
                    "train_data",
                    "safety_data",
                    "validation_data",
                    "poison_data",
                    "init_adapter",
                ],
            )?;
            if map.contains_key("output_dir") {
                return Err(ApiError::Invalid(
                    "config.output_dir: the server chooses the run directory; remove it".into(),
                ));
            }
            let dir = places.run_dir(id);
            map.insert(
                "output_dir".into(),
                Value::String(dir.display().to_string()),
            );
            // Resumable by default: a checkpoint every 10 steps unless asked otherwise.
            if map
                .get("checkpoint_every")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                == 0
            {
                map.insert("checkpoint_every".into(), json!(10));
            }
            let text = toml_text(map, "config")?;
            RunConfig::parse(&text, &[], Path::new("request"))?;
            Ok((config, Some(dir)))
        }
        "eval" => {
            let model = places.model("config.model", map.get("model").and_then(Value::as_str))?;
            map.insert("model".into(), Value::String(model.display().to_string()));
            confine(map, &places.data, "config.", &["adapter", "prompts"])?;
            if let Some(judge) = map
                .get("judge_model")
                .and_then(Value::as_str)
                .map(str::to_string)
            {
                let path = places.model("config.judge_model", Some(&judge))?;
                map.insert(
                    "judge_model".into(),
                    Value::String(path.display().to_string()),
                );
            }
            let settings: EvalSpec = serde_json::from_value(Value::Object(map.clone()))
                .map_err(|e| ApiError::Invalid(format!("config: {e}")))?;
            settings.check()?;
            Ok((config, None))
        }
        "compare" => {
            if map.contains_key("output_dir") {
                return Err(ApiError::Invalid(
                    "config.output_dir: the server chooses the output directory; remove it".into(),
                ));
            }
            // The request refines the demo comparison: its keys override the demo config's.
            let mut merged: Value = toml::from_str::<toml::Table>(compare::DEMO_CONFIG)
                .ok()
                .and_then(|t| serde_json::to_value(t).ok())
                .unwrap_or_else(|| json!({}));
            merge(&mut merged, Value::Object(std::mem::take(map)));
            merged.as_object_mut().expect("object").remove("output_dir");
            *map = std::mem::take(merged.as_object_mut().expect("object"));
            if let Some(model) = map.get("model").and_then(Value::as_str).map(str::to_string) {
                let path = places.model("config.model", Some(&model))?;
                map.insert("model".into(), Value::String(path.display().to_string()));
            }
            confine(map, &places.data, "config.", &["prompts"])?;
            if let Some(judge) = map
                .get("judge_model")
                .and_then(Value::as_str)
                .map(str::to_string)
            {
                let path = places.model("config.judge_model", Some(&judge))?;
                map.insert(
                    "judge_model".into(),
                    Value::String(path.display().to_string()),
                );
            }
            let dir = places.run_dir(id);
            map.insert(
                "output_dir".into(),
                Value::String(dir.display().to_string()),
            );
            CompareConfig::parse(&toml_text(map, "config")?, Path::new("request"))?;
            Ok((config, Some(dir)))
        }
        other => Err(ApiError::Invalid(format!(
            "kind: {other:?} is not one of train, eval, compare"
        ))),
    }
}

/// Deep-merges `patch` into `base` (objects key by key; anything else replaces).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn default_judge() -> String {
    "refusal".into()
}
fn default_tokens() -> usize {
    48
}

/// An evaluation job's settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub model: PathBuf,
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    #[serde(default = "default_judge")]
    pub judge: String,
    #[serde(default)]
    pub judge_model: Option<PathBuf>,
    #[serde(default = "default_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub system: Option<String>,
}

impl EvalSpec {
    fn check(&self) -> Result<(), ApiError> {
        match self.judge.as_str() {
            "refusal" => Ok(()),
            "model" | "both" if self.judge_model.is_some() => Ok(()),
            "model" | "both" => Err(ApiError::Invalid(
                "config.judge_model: the model judge needs a chat checkpoint".into(),
            )),
            other => Err(ApiError::Invalid(format!(
                "config.judge: {other:?} is not one of refusal, model, both"
            ))),
        }?;
        if self.max_new_tokens == 0 || self.max_new_tokens > 4096 {
            return Err(ApiError::Invalid(format!(
                "config.max_new_tokens: {} must be in 1..=4096",
                self.max_new_tokens
            )));
        }
        Ok(())
    }
}

/// The queue and the single worker that drains it.
pub struct Runner {
    pub store: Arc<Store>,
    pub live: broadcast::Sender<String>,
    queue: Mutex<VecDeque<i64>>,
    wake: Condvar,
    cancels: Mutex<HashMap<i64, Cancel>>,
    device: Device,
}

impl Runner {
    pub fn start(store: Arc<Store>, device: Device) -> Result<Arc<Self>, ApiError> {
        let (live, _) = broadcast::channel(4096);
        let queued = store.recover()?;
        let runner = Arc::new(Self {
            store,
            live,
            queue: Mutex::new(queued.into_iter().collect()),
            wake: Condvar::new(),
            cancels: Mutex::new(HashMap::new()),
            device,
        });
        let worker = runner.clone();
        std::thread::Builder::new()
            .name("safeprobe-jobs".into())
            .spawn(move || worker.work())
            .map_err(|e| ApiError::Internal(format!("cannot start the job worker: {e}")))?;
        Ok(runner)
    }

    pub fn enqueue(&self, id: i64) {
        self.queue.lock().unwrap().push_back(id);
        self.wake.notify_one();
    }

    /// Asks a job to stop: a queued job is cancelled at once, a running one at its next step.
    pub fn cancel(&self, id: i64) -> Result<(), ApiError> {
        let job = self
            .store
            .get(id)?
            .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
        match job.status {
            Status::Queued => {
                self.queue.lock().unwrap().retain(|j| *j != id);
                self.store.set_status(id, Status::Cancelled, None)?;
                self.announce(id, json!({"event": "status", "status": "cancelled"}));
                Ok(())
            }
            Status::Running => {
                if let Some(c) = self.cancels.lock().unwrap().get(&id) {
                    c.cancel();
                }
                Ok(())
            }
            other => Err(ApiError::Conflict(format!(
                "job {id} is {}; only queued or running jobs can be cancelled",
                other.as_str()
            ))),
        }
    }

    /// Stores an event and pushes it to live listeners.
    pub fn announce(&self, id: i64, body: Value) {
        let seq = self.store.add_event(id, &body).unwrap_or(0);
        let _ = self
            .live
            .send(json!({"job": id, "seq": seq, "body": body}).to_string());
    }

    fn work(&self) {
        loop {
            let id = {
                let mut queue = self.queue.lock().unwrap();
                loop {
                    if let Some(id) = queue.pop_front() {
                        break id;
                    }
                    queue = self.wake.wait(queue).unwrap();
                }
            };
            let Ok(Some(job)) = self.store.get(id) else {
                continue;
            };
            if job.status != Status::Queued {
                continue;
            }
            let cancel = Cancel::default();
            self.cancels.lock().unwrap().insert(id, cancel.clone());
            let _ = self.store.set_status(id, Status::Running, None);
            self.announce(id, json!({"event": "status", "status": "running"}));
            // A panic in a job must not take the worker (and the queue) down with it.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.execute(id, &job.kind, &job.spec, &cancel)
            }))
            .unwrap_or_else(|_| Err(ApiError::Internal("the job panicked".into())));
            self.cancels.lock().unwrap().remove(&id);
            let (status, error) = match outcome {
                Ok(result) => {
                    let _ = self.store.set_result(id, &result);
                    (Status::Done, None)
                }
                Err(ApiError::Conflict(m)) if m == CANCELLED => (Status::Cancelled, None),
                Err(e) => (Status::Failed, Some(e.to_string())),
            };
            let _ = self.store.set_status(id, status, error.as_deref());
            self.announce(
                id,
                json!({"event": "status", "status": status.as_str(), "error": error}),
            );
        }
    }

    fn execute(
        &self,
        id: i64,
        kind: &str,
        spec: &Value,
        cancel: &Cancel,
    ) -> Result<Value, ApiError> {
        let cancelled = |e: TrainError| match e {
            TrainError::Cancelled { .. } => ApiError::Conflict(CANCELLED.into()),
            other => ApiError::Invalid(other.to_string()),
        };
        match kind {
            "train" => {
                // `resume` is the server's own flag, not a run-config key.
                let mut map = spec.as_object().expect("validated").clone();
                map.remove("resume");
                let config =
                    RunConfig::parse(&toml_text(&map, "config")?, &[], Path::new("request"))?;
                let on_event = |event: &Event| {
                    self.announce(id, serde_json::to_value(event).expect("json"));
                };
                let resuming = spec.get("resume").and_then(Value::as_bool).unwrap_or(false);
                let trained = if resuming {
                    run::resume_cancellable(&config.output_dir, &self.device, cancel, on_event)
                } else {
                    run::train_cancellable(&config, &self.device, cancel, on_event)
                }
                .map_err(cancelled)?;
                // The run's harmful score with the refusal judge on the built-in prompts.
                let mut model = trained;
                model.model = burn::module::Module::valid(&model.model);
                model.device = self.device.clone();
                self.announce(id, json!({"event": "stage", "stage": "evaluating"}));
                let (report, answers) = harmful::evaluate(
                    &model,
                    &safeprobe_eval::builtin::harmful_prompts(),
                    &Judges {
                        refusal: Some(RefusalJudge::default()),
                        model: None,
                    },
                    &AnswerSettings {
                        system: config.system.clone(),
                        ..AnswerSettings::default()
                    },
                    Some(&config.output_dir.join("answers.jsonl")),
                )?;
                let answers: Vec<Value> = answers
                    .iter()
                    .map(|a| serde_json::to_value(a).unwrap())
                    .collect();
                self.store.set_answers(id, &answers)?;
                Ok(json!({"run_dir": config.output_dir, "harmful": report}))
            }
            "eval" => {
                let spec: EvalSpec = serde_json::from_value(spec.clone())
                    .map_err(|e| ApiError::Invalid(e.to_string()))?;
                let mut checkpoint = Checkpoint::load(&spec.model, &self.device)?;
                if let Some(adapter) = &spec.adapter {
                    checkpoint.load_adapter(adapter)?;
                }
                let prompts = match &spec.prompts {
                    Some(p) => safeprobe_eval::prompts::load(p)?,
                    None => safeprobe_eval::builtin::harmful_prompts(),
                };
                let model_judge = match (&spec.judge_model, spec.judge.as_str()) {
                    (Some(dir), "model" | "both") => Some(ModelJudge::new(
                        Checkpoint::load(dir, &self.device)?,
                        "yes",
                        "no",
                    )?),
                    _ => None,
                };
                let judges = Judges {
                    refusal: (spec.judge != "model").then(RefusalJudge::default),
                    model: model_judge.as_ref(),
                };
                let (report, answers) = harmful::evaluate(
                    &checkpoint,
                    &prompts,
                    &judges,
                    &AnswerSettings {
                        sampling: safeprobe_model::Sampling {
                            max_new_tokens: spec.max_new_tokens,
                            ..Default::default()
                        },
                        system: spec.system.clone(),
                        ..AnswerSettings::default()
                    },
                    None,
                )?;
                let answers: Vec<Value> = answers
                    .iter()
                    .map(|a| serde_json::to_value(a).unwrap())
                    .collect();
                self.store.set_answers(id, &answers)?;
                Ok(json!({"harmful": report}))
            }
            "compare" => {
                let text = toml_text(spec.as_object().expect("validated"), "config")?;
                let config = CompareConfig::parse(&text, Path::new("request"))?;
                let comparison = compare::run(&config, &self.device, cancel, |p| match p {
                    Progress::Stage(stage) => {
                        self.announce(id, json!({"event": "stage", "stage": stage}))
                    }
                    Progress::Train(event) => {
                        self.announce(id, serde_json::to_value(event).expect("json"))
                    }
                })
                .map_err(|e| match e {
                    safeprobe_eval::EvalError::Train(t) => cancelled(t),
                    other => ApiError::Invalid(other.to_string()),
                })?;
                Ok(serde_json::to_value(&comparison).expect("json"))
            }
            other => Err(ApiError::Invalid(format!("unknown job kind {other}"))),
        }
    }
}

const CANCELLED: &str = "cancelled";
