//! Job requests: where the paths they name may lie, their checks and defaults, so that what is
//! stored is a spec the job's process can run as it is (`admission` sizes them, `runner`
//! queues and supervises them, `worker` runs them).

use std::path::PathBuf;

use safeprobe_eval::compare::{self, CompareConfig, Comparing};
use safeprobe_train::run::{RunConfig, RunFile};
use serde_json::{Value, json};

use crate::admission::Sizing;
use crate::error::ApiError;
use crate::paths::Roots;
use safeprobe_wire::{EvalSpec, JobKind, JobSpec, TrainJob};

/// What one job may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Optimiser steps a job may plan in all (a comparison counts every run's steps).
    pub max_steps: usize,
    /// Checkpoints a training run keeps (its newest ones), unless the request asks for fewer.
    pub keep_checkpoints: usize,
    /// The most memory one job may take, in bytes (`--job-memory-mib`); else what the machine
    /// has, where tensors live in its memory.
    pub job_memory: Option<u64>,
    /// The longest prompt a chat may send, in tokens (also capped by the model's context).
    pub max_prompt_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 100_000,
            keep_checkpoints: 2,
            job_memory: None,
            max_prompt_tokens: 4096,
        }
    }
}

/// What the server knows about where things are.
#[derive(Clone)]
pub struct Places {
    pub models: Roots,
    pub data: Roots,
    /// The server's own folder (safeprobe.db, runs/, uploads/, builtin/); one of the data roots.
    pub data_dir: PathBuf,
    /// Run directories go here: `<data_dir>/runs/job-<id>`.
    pub runs_dir: PathBuf,
    pub limits: Limits,
    /// The Hugging Face cache (and endpoint and token) pulls use and model ids resolve in.
    pub hub: safeprobe_model::hub::HubOptions,
    /// How jobs and chats on the server's device are sized.
    pub sizing: Sizing,
}

impl Places {
    /// A model named in a request: "demo" (or nothing; an empty name is refused) is the
    /// embedded demo model; a folder
    /// under the model directories; else a Hub id (`ORG/NAME`) finished in the Hugging Face
    /// cache. An id has exactly one `/` and no `..`, so it cannot reach outside the cache.
    pub fn model(&self, field: &str, name: Option<&str>) -> Result<PathBuf, ApiError> {
        match name {
            None | Some("demo") => demo_model_dir(),
            // An emptied field is a mistake, not a wish for the demo model.
            Some("") => Err(ApiError::field(
                field,
                "empty: name a model (\"demo\" for the embedded one)",
            )),
            Some(name) => self.models.resolve(field, name).or_else(|error| {
                if !safeprobe_model::hub::is_repo_id(name) {
                    return Err(error);
                }
                safeprobe_model::hub::cached(name, &self.hub.revision, &self.hub.cache_dir)
                    .ok_or_else(|| {
                        ApiError::field(field, format!(
                            "{name:?} is not in the model directories, nor pulled into the Hugging Face cache; pull it first (the Models page, or `safeprobe pull {name}`)"
                        ))
                    })
            }),
        }
    }

    pub fn run_dir(&self, id: i64) -> PathBuf {
        self.runs_dir.join(format!("job-{id}"))
    }

    /// Makes sure a new job's run folder is its own: a folder of that name left by an earlier
    /// store (job numbers restart with a new safeprobe.db) is moved aside, never reused,
    /// pruned or deleted with the new job.
    pub fn set_aside_stale_run_dir(&self, id: i64) -> Result<(), ApiError> {
        let dir = self.run_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let stamp = crate::store::now() as u64;
        let aside = self.runs_dir.join(format!("job-{id}.before-{stamp}"));
        std::fs::rename(&dir, &aside).map_err(|e| {
            ApiError::Internal(format!(
                "{}: cannot move an earlier run's folder aside: {e}",
                dir.display()
            ))
        })
    }

    fn resolve(&self, root: Root, field: &str, requested: &str) -> Result<PathBuf, ApiError> {
        match root {
            Root::Model => self.model(field, Some(requested)),
            Root::Data => self.data.resolve(field, requested),
        }
    }
}

/// Which configured directories a path must lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The model directories (or "demo", the embedded demo model).
    Model,
    /// The data directories (data files and adapters).
    Data,
}

/// Every path a job request can carry, by job kind, with the directories it must lie in.
/// This table is the one place that decides what a request may make the server read: a job
/// is validated by confining each of these fields (dots reach into nested tables), and a
/// test checks that the trainer reads no path this table does not name.
pub const PATH_FIELDS: &[(JobKind, &str, Root)] = &[
    (JobKind::Train, "model", Root::Model),
    (JobKind::Train, "train_data", Root::Data),
    (JobKind::Train, "safety_data", Root::Data),
    (JobKind::Train, "validation_data", Root::Data),
    (JobKind::Train, "poison_data", Root::Data),
    (JobKind::Train, "init_adapter", Root::Data),
    (JobKind::Train, "safety_eval.pairs", Root::Data),
    (JobKind::Train, "safety_eval.prompts", Root::Data),
    (JobKind::Eval, "model", Root::Model),
    (JobKind::Eval, "adapter", Root::Data),
    (JobKind::Eval, "prompts", Root::Data),
    (JobKind::Eval, "judge_model", Root::Model),
    (JobKind::Compare, "model", Root::Model),
    (JobKind::Compare, "prompts", Root::Data),
    (JobKind::Compare, "judge_model", Root::Model),
    (JobKind::Compare, "train.model", Root::Model),
    (JobKind::Compare, "train.train_data", Root::Data),
    (JobKind::Compare, "train.safety_data", Root::Data),
    (JobKind::Compare, "train.validation_data", Root::Data),
    (JobKind::Compare, "train.poison_data", Root::Data),
    (JobKind::Compare, "train.init_adapter", Root::Data),
    (JobKind::Compare, "train.safety_eval.pairs", Root::Data),
    (JobKind::Compare, "train.safety_eval.prompts", Root::Data),
];

/// The demo model, unpacked on first use; failing to unpack it is the server's problem, not
/// the request's.
pub fn demo_model_dir() -> Result<PathBuf, ApiError> {
    safeprobe_eval::demo_model::dir().map_err(|e| ApiError::Internal(e.to_string()))
}

fn as_object<'a>(
    spec: &'a mut Value,
    what: &str,
) -> Result<&'a mut serde_json::Map<String, Value>, ApiError> {
    spec.as_object_mut()
        .ok_or_else(|| ApiError::Invalid(format!("{what}: expected a JSON object")))
}

/// Replaces every path field of a `kind` request (see `PATH_FIELDS`) with its confined,
/// absolute path.
fn confine_paths(
    kind: JobKind,
    config: &mut serde_json::Map<String, Value>,
    places: &Places,
) -> Result<(), ApiError> {
    for (_, key, root) in PATH_FIELDS.iter().filter(|(k, _, _)| *k == kind) {
        let field = format!("config.{key}");
        let (parents, name) = key.rsplit_once('.').unwrap_or(("", key));
        // A nested field whose table is absent is simply not set.
        let Some(table) =
            parents
                .split('.')
                .filter(|p| !p.is_empty())
                .try_fold(&mut *config, |table, parent| match table.get_mut(parent) {
                    Some(Value::Object(inner)) => Some(inner),
                    _ => None,
                })
        else {
            continue;
        };
        match table.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::String(requested)) => {
                let path = places.resolve(*root, &field, requested)?;
                table.insert(name.into(), Value::String(path.display().to_string()));
            }
            Some(other) => {
                return Err(ApiError::field(
                    field,
                    format!("expected a path string, found {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// Sets `key` to `value` where the request leaves it out (absent or null).
fn or_default(map: &mut serde_json::Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.into(), value);
    }
}

/// A job without a model uses the embedded demo model.
fn default_model(map: &mut serde_json::Map<String, Value>) {
    or_default(map, "model", json!("demo"));
}

/// The keys a request sets, in every table: JSON null means "not set" (a config type takes a
/// missing key as its default).
fn set_keys(map: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    map.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::Object(table) => (k.clone(), Value::Object(set_keys(table))),
            other => (k.clone(), other.clone()),
        })
        .collect()
}

/// Refuses a server-chosen key in a request.
fn refuse_output_dir(map: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    if map.contains_key("output_dir") {
        return Err(ApiError::field(
            "config.output_dir",
            "the server chooses the run directory; remove it",
        ));
    }
    Ok(())
}

/// A request's `device` (train and compare jobs run on it instead of the server's): one that
/// parses and, for wgpu, exists on this machine.
fn check_device(map: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    use safeprobe_model::device::{DeviceChoice, list_adapters};
    let Some(device) = map.get("device").filter(|d| !d.is_null()) else {
        return Ok(());
    };
    let choice: DeviceChoice = device
        .as_str()
        .ok_or_else(|| {
            ApiError::field(
                "config.device",
                format!("expected a string, found {device}"),
            )
        })?
        .parse()
        .map_err(|e| ApiError::field("config.device", format!("{e}")))?;
    if choice == DeviceChoice::Wgpu && list_adapters().is_empty() {
        return Err(ApiError::field(
            "config.device",
            "\"wgpu\" was asked for, but this machine has no wgpu adapter; use \"cpu\" or \
             \"auto\"",
        ));
    }
    Ok(())
}

/// The sbatch options a request may pass: none of them names a file, a folder or a program
/// (a request may not make sbatch read, write or run where it likes; `--output`, `--chdir`,
/// `--export` and the like stay the server's).
const REQUEST_SBATCH_OPTIONS: [&str; 19] = [
    "--time",
    "--time-min",
    "--mem",
    "--mem-per-cpu",
    "--mem-per-gpu",
    "--cpus-per-task",
    "--cpus-per-gpu",
    "--gpus",
    "--gpus-per-node",
    "--gpus-per-task",
    "--account",
    "--qos",
    "--constraint",
    "--nodelist",
    "--exclude",
    "--reservation",
    "--nice",
    "--comment",
    "--exclusive",
];

/// A comparison request's Slurm settings: the tasks run this server's own safeprobe, and
/// sbatch takes only the options above, their values naming no path.
fn check_slurm_request(slurm: &safeprobe_wire::spec::SlurmSettings) -> Result<(), ApiError> {
    if slurm.program.is_some() {
        return Err(ApiError::field(
            "config.slurm.program",
            "the server's tasks run its own safeprobe; remove it (the command line's compare \
             takes it)",
        ));
    }
    for arg in &slurm.sbatch_args {
        let (name, value) = arg.split_once('=').unwrap_or((arg, ""));
        if !REQUEST_SBATCH_OPTIONS.contains(&name) || value.contains('/') {
            return Err(ApiError::field(
                "config.slurm.sbatch_args",
                format!(
                    "{arg:?} is not allowed from a request; use --name=value with one of {} \
                     (values without /)",
                    REQUEST_SBATCH_OPTIONS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a job request and resolves its paths; returns the spec to store.
pub fn validate(
    kind: JobKind,
    mut config: Value,
    id: i64,
    places: &Places,
) -> Result<(JobSpec, Option<PathBuf>), ApiError> {
    let map = as_object(&mut config, "config")?;
    if kind != JobKind::Eval {
        check_device(map)?;
    }
    match kind {
        JobKind::Train => {
            refuse_output_dir(map)?;
            default_model(map);
            confine_paths(kind, map, places)?;
            let dir = places.run_dir(id);
            map.insert(
                "output_dir".into(),
                Value::String(dir.display().to_string()),
            );
            // Resumable by default: a checkpoint every 10 steps unless the request says
            // otherwise (0: none), keeping the server's number of them.
            or_default(map, "checkpoint_every", json!(10));
            or_default(
                map,
                "keep_checkpoints",
                json!(places.limits.keep_checkpoints),
            );
            let run = checked_run(map)?;
            check_retention(run.keep_checkpoints, places, "config.keep_checkpoints")?;
            check_steps(planned_steps(&run)?, places, "config.max_steps")?;
            let train = TrainJob {
                config: run,
                resume: false,
            };
            Ok((JobSpec::Train(train), Some(dir)))
        }
        JobKind::Eval => {
            default_model(map);
            confine_paths(kind, map, places)?;
            let settings: EvalSpec = typed(map)?;
            check_eval(&settings)?;
            Ok((JobSpec::Eval(settings), None))
        }
        JobKind::Compare => {
            refuse_output_dir(map)?;
            // The request refines the demo comparison: its keys override the demo config's.
            let mut merged: Value = toml::from_str::<toml::Table>(compare::DEMO_CONFIG)
                .ok()
                .and_then(|t| serde_json::to_value(t).ok())
                .unwrap_or_else(|| json!({}));
            merge(&mut merged, Value::Object(std::mem::take(map)));
            merged.as_object_mut().expect("object").remove("output_dir");
            *map = std::mem::take(merged.as_object_mut().expect("object"));
            confine_paths(kind, map, places)?;
            let dir = places.run_dir(id);
            map.insert(
                "output_dir".into(),
                Value::String(dir.display().to_string()),
            );
            let comparison: CompareConfig = typed(map)?;
            comparison.validate_settings()?;
            check_slurm_request(&comparison.slurm)?;
            let keep = comparison.train.0.get("keep_checkpoints");
            if let Some(keep) = keep.and_then(Value::as_u64) {
                check_retention(keep as usize, places, "config.train.keep_checkpoints")?;
            }
            check_steps(
                comparison.planned_steps()?,
                places,
                "config.train.max_steps or epochs (× seeds × methods × poison_fraction conditions)",
            )?;
            Ok((JobSpec::Compare(comparison), Some(dir)))
        }
    }
}

/// A train request's config as the trainer's, its values checked (a wrong one named by its
/// key) and its data files found.
fn checked_run(map: &serde_json::Map<String, Value>) -> Result<RunConfig, ApiError> {
    let run: RunConfig = typed(map)?;
    run.validate_settings()?;
    run.check_data_files()?;
    Ok(run)
}

/// A request's config as its type, read straight from the JSON: a wrong value is refused
/// naming its key (`config.sap.rho: invalid type ...`), an unknown key listing the valid
/// ones. JSON null means "not set".
fn typed<T: serde::de::DeserializeOwned>(
    map: &serde_json::Map<String, Value>,
) -> Result<T, ApiError> {
    Ok(safeprobe_wire::spec::read(Value::Object(set_keys(map)))?)
}

/// The optimiser steps a run will take at most (from `epochs`: counted on its data with the
/// mixing and poisoning the trainer adds).
pub fn planned_steps(config: &RunConfig) -> Result<usize, ApiError> {
    if config.max_steps > 0 {
        return Ok(config.max_steps);
    }
    let clean = safeprobe_train::data::records(&config.train_data)?.len();
    let pairs = match &config.safety_data {
        Some(path) => safeprobe_train::data::records(path)?.len(),
        None => 0,
    };
    Ok(config.steps_for(config.examples_with(clean, pairs)))
}

fn check_steps(steps: usize, places: &Places, field: &str) -> Result<(), ApiError> {
    let limit = places.limits.max_steps;
    if steps > limit {
        return Err(ApiError::field(
            field,
            format!(
                "{steps} steps is over this server's limit of {limit} \
                 (start it with --max-steps to allow longer runs)"
            ),
        ));
    }
    Ok(())
}

fn check_retention(keep: usize, places: &Places, field: &str) -> Result<(), ApiError> {
    let limit = places.limits.keep_checkpoints;
    if keep == 0 || keep > limit {
        return Err(ApiError::field(
            field,
            format!(
                "{keep} must be in 1..={limit} on this server (start it with \
                 --keep-checkpoints to keep more)"
            ),
        ));
    }
    Ok(())
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

/// Checks an evaluation job's settings beyond their types.
fn check_eval(spec: &EvalSpec) -> Result<(), ApiError> {
    if let (Some(kind), None) = (spec.judge.needs_model(), &spec.judge_model) {
        return Err(ApiError::field(
            "config.judge_model",
            format!(
                "the {} judge needs a {kind} checkpoint{}",
                spec.judge,
                if kind == "guard" {
                    " (Llama Guard 3, Qwen3Guard-Gen)"
                } else {
                    ""
                }
            ),
        ));
    }
    if spec.max_new_tokens == 0 || spec.max_new_tokens > 4096 {
        return Err(ApiError::field(
            "config.max_new_tokens",
            format!("{} must be in 1..=4096", spec.max_new_tokens),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The keys of a config type that hold paths (dotted into nested tables), found from the
    /// type itself: a number where a path belongs is refused as "expected path string".
    fn path_keys<T: serde::de::DeserializeOwned>(valid: &Value) -> Vec<String> {
        fn walk<T: serde::de::DeserializeOwned>(
            root: &Value,
            at: &[String],
            out: &mut Vec<String>,
        ) {
            let table = at.iter().fold(root, |v, k| &v[k.as_str()]);
            for (key, value) in table.as_object().unwrap() {
                let mut path = at.to_vec();
                path.push(key.clone());
                if value.is_object() {
                    walk::<T>(root, &path, out);
                    continue;
                }
                let mut probe = root.clone();
                *path.iter().fold(&mut probe, |v, k| &mut v[k.as_str()]) = json!(12345);
                if let Err(e) = serde_json::from_value::<T>(probe)
                    && e.to_string().contains("path string")
                {
                    out.push(path.join("."));
                }
            }
        }
        let mut keys = Vec::new();
        walk::<T>(valid, &[], &mut keys);
        keys.sort();
        keys
    }

    fn listed(kind: JobKind, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = PATH_FIELDS
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .filter_map(|(_, key, _)| key.strip_prefix(prefix))
            // A comparison's [train] table is checked against the run config on its own.
            .filter(|key| !prefix.is_empty() || !key.starts_with("train."))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_path_table_names_every_path_the_jobs_read() {
        // Every key of each config type, paths set so that they are present (toml::from_str
        // checks types only, not that files exist).
        let run: RunConfig = toml::from_str(
            "model = 'm'\ntrain_data = 't'\nsafety_data = 's'\nvalidation_data = 'v'\n\
             poison_data = 'p'\ninit_adapter = 'a'\noutput_dir = 'o'\nmax_steps = 1\n\
             [safety_eval]\npairs = 'h'\nprompts = 'q'\n",
        )
        .unwrap();
        let mut trainer = path_keys::<RunConfig>(&serde_json::to_value(run).unwrap());
        trainer.retain(|k| k != "output_dir"); // chosen by the server, never by a request
        assert!(trainer.len() >= 6, "{trainer:?}");
        assert_eq!(listed(JobKind::Train, ""), trainer, "train jobs");
        assert_eq!(
            listed(JobKind::Compare, "train."),
            trainer,
            "a comparison's [train] table"
        );

        let comparison: CompareConfig =
            toml::from_str("model = 'm'\nprompts = 'p'\njudge_model = 'j'\n").unwrap();
        let mut keys = path_keys::<CompareConfig>(&serde_json::to_value(comparison).unwrap());
        // Chosen by the server, and refused from a request (check_slurm_request).
        keys.retain(|k| k != "output_dir" && k != "slurm.program");
        assert_eq!(listed(JobKind::Compare, ""), keys, "compare jobs");

        let eval = json!({"model": "m", "adapter": "a", "prompts": "p", "judge_model": "j"});
        assert_eq!(
            listed(JobKind::Eval, ""),
            path_keys::<EvalSpec>(&eval),
            "eval jobs"
        );
    }

    fn places(models: &Path, data: &Path, runs: &Path) -> Places {
        Places {
            models: Roots::new("model", &[models.to_path_buf()]),
            data: Roots::new("data", &[data.to_path_buf()]),
            data_dir: data.to_path_buf(),
            runs_dir: runs.to_path_buf(),
            limits: Limits::default(),
            sizing: Sizing::default(),
            hub: safeprobe_model::hub::HubOptions {
                cache_dir: runs.join("hf-cache"),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_hub_id_names_a_finished_model_in_the_cache_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let (models, data, runs) = (
            root.path().join("m"),
            root.path().join("d"),
            root.path().join("r"),
        );
        for dir in [&models, &data, &runs] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let places = places(&models, &data, &runs);
        // The layout huggingface_hub (and `safeprobe pull`) leaves.
        let repo = runs.join("hf-cache/models--org--m");
        let snapshot = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        assert!(
            places.model("model", Some("")).is_err(),
            "an emptied model is refused, not the demo model"
        );
        assert!(
            places.model("model", Some("org/m")).is_err(),
            "no config.json yet"
        );
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        assert_eq!(places.model("model", Some("org/m")).unwrap(), snapshot);
        for name in ["org/other", "../org/m", "org/m/..", "/org/m", "org/../m"] {
            assert!(places.model("model", Some(name)).is_err(), "{name}");
        }
        // A folder of that name in a model directory wins.
        std::fs::create_dir_all(models.join("org/m")).unwrap();
        assert_eq!(
            places.model("model", Some("org/m")).unwrap(),
            models.join("org/m").canonicalize().unwrap()
        );
    }

    /// A config of `kind` whose `key` (dotted: nested) is `value`.
    fn with_field(key: &str, value: &str) -> Value {
        let mut config = json!({});
        let mut table = config.as_object_mut().unwrap();
        let parts: Vec<&str> = key.split('.').collect();
        for parent in &parts[..parts.len() - 1] {
            table = table
                .entry(parent.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap();
        }
        table.insert(parts[parts.len() - 1].into(), json!(value));
        config
    }

    #[test]
    fn every_path_field_of_every_kind_is_confined() {
        let (models, data, runs, outside) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        std::fs::write(outside.path().join("secret.jsonl"), "{}").unwrap();
        let places = places(models.path(), data.path(), runs.path());
        for (kind, key, _) in PATH_FIELDS {
            for escape in [
                outside.path().join("secret.jsonl").display().to_string(),
                "../../etc/passwd".into(),
            ] {
                let err = validate(*kind, with_field(key, &escape), 0, &places).unwrap_err();
                assert!(
                    matches!(err, ApiError::ForbiddenField(_)),
                    "{kind:?} {key} = {escape}: {err}"
                );
                assert_eq!(err.faulty_field(), Some(&*format!("config.{key}")));
                assert!(
                    err.to_string().starts_with(&format!("config.{key}:")),
                    "{kind:?} {key}: {err}"
                );
            }
        }
    }
}
