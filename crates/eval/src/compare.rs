//! The comparison the paper reports, from one config: the base model's evaluation, then SFT,
//! SAP and the safety-mixing baseline fine-tuned on the same benign (optionally poisoned)
//! data, each a normal run directory, each evaluated the same way, over one or more seeds.
//!
//! Table: method | HS | task metric | validation loss | time per step | overhead vs SFT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safeprobe_model::Checkpoint;
use safeprobe_train::run::{Cancel, Event, RunConfig};
use serde::{Deserialize, Serialize};

use crate::builtin;
use crate::demo_model::{self, DATA_SEED};
use crate::error::{EvalError, Result};
use crate::harmful::{self, AnswerSettings, Judges};
use crate::judge::{ModelJudge, RefusalJudge};
use crate::paired;
use crate::task_metrics::{self, TaskSettings};
use crate::tasks::{Labelled, Task};

/// The demo comparison's config (`safeprobe compare` without --config).
pub const DEMO_CONFIG: &str = include_str!("../demo-compare.toml");

// What a comparison reports is made of wire types: the server stores it and the UI shows it.
pub use safeprobe_wire::{Comparison, Condition, Method, Row, RunResult, Spread, poison_percent};
use safeprobe_wire::{Defence, Mechanism};

fn default_methods() -> Vec<Method> {
    vec![Method::Sft, Method::Sap, Method::Mix]
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_task() -> String {
    "arithmetic".into()
}
fn default_output() -> PathBuf {
    "compare-output".into()
}
fn default_max_new_tokens() -> usize {
    32
}
fn benign() -> Vec<f64> {
    vec![0.0]
}

/// A number, or a list of numbers.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(f64),
        More(Vec<f64>),
    }
    match OneOrMore::deserialize(d) {
        Ok(OneOrMore::One(value)) => Ok(vec![value]),
        Ok(OneOrMore::More(values)) => Ok(values),
        Err(_) => Err(serde::de::Error::custom(
            "poison_fraction: give a number (0.1) or a list of numbers ([0.0, 0.1])",
        )),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Checkpoint to fine-tune (default: the demo model).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Built-in benign task to fine-tune on: arithmetic, sentiment or reverse.
    #[serde(default = "default_task")]
    pub task: String,
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    /// Fine-tuning methods to compare (the base model is always evaluated).
    #[serde(default = "default_methods")]
    pub methods: Vec<Method>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Poisoning: this fraction of the fine-tuning data is harmful compliance. A list makes
    /// one condition of each value (`[0.0, 0.1]`: the paper's two threat models, benign data
    /// and benign data with poisoning); every method and seed runs under each.
    #[serde(default = "benign", deserialize_with = "one_or_more")]
    pub poison_fraction: Vec<f64>,
    /// Harmful prompt set (default: the built-in held-out prompts).
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// Evaluate only the first N harmful prompts: a reduced protocol for a CPU (the order of
    /// the set is fixed, so the subset is chosen before any result is seen).
    #[serde(default)]
    pub max_prompts: Option<usize>,
    /// Also judge with this model (the refusal judge always runs).
    #[serde(default)]
    pub judge_model: Option<PathBuf>,
    /// How `judge_model` judges: "chat" (asked yes or no) or "guard" (a guard model, Llama
    /// Guard 3 or Qwen3Guard-Gen, in its own format).
    #[serde(default)]
    pub judge_model_kind: JudgeModelKind,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub device: Option<String>,
    /// Trainer settings shared by every method (any key of a run config except the data,
    /// model, method and output paths, which the comparison sets).
    #[serde(default)]
    pub train: toml::Table,
}

/// How a comparison's judge model judges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeModelKind {
    /// A chat model asked whether the answer is harmful (yes/no).
    #[default]
    Chat,
    /// A guard model in its own format.
    Guard,
}

impl CompareConfig {
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let config: CompareConfig = toml::from_str(text)
            .map_err(|e| EvalError::Invalid(format!("{}: {}", origin.display(), e.message())))?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |m: String| Err(EvalError::Invalid(format!("{}: {m}", origin.display())));
        let task = Task::parse(&self.task)
            .map_err(|e| EvalError::Invalid(format!("{}: task: {e}", origin.display())))?;
        if self.methods.is_empty() {
            return bad(format!(
                "methods: name at least one of {}",
                Method::ALL.map(Method::name).join(", ")
            ));
        }
        if self.seeds.is_empty() {
            return bad("seeds: give at least one seed".into());
        }
        if let Some(method) = (1..self.methods.len())
            .find(|&i| self.methods[..i].contains(&self.methods[i]))
            .map(|i| self.methods[i])
        {
            return bad(format!(
                "methods: {} is listed twice; each method runs once per seed",
                method.name()
            ));
        }
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        if let Some(twice) = seeds.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!(
                "seeds: {} is listed twice; each seed is one run per method, paired across methods",
                twice[0]
            ));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > 4096 {
            return bad(format!(
                "max_new_tokens: {} must be in 1..=4096 (an answer of no tokens cannot be judged)",
                self.max_new_tokens
            ));
        }
        if let Some(Err(e)) = self
            .device
            .as_deref()
            .map(str::parse::<safeprobe_model::device::DeviceChoice>)
        {
            return bad(format!("device: {e}"));
        }
        if self.max_prompts == Some(0) {
            return bad("max_prompts must be at least 1".into());
        }
        if self.poison_fraction.is_empty() {
            return bad("poison_fraction: give at least one value (0.0: benign data)".into());
        }
        for (i, fraction) in self.poison_fraction.iter().enumerate() {
            if !(0.0..1.0).contains(fraction) {
                return bad(format!("poison_fraction {fraction} must be in [0, 1)"));
            }
            // Conditions are named (and their runs' folders too) by the rounded percentage.
            let percent = poison_percent(*fraction);
            if let Some(same) = self.poison_fraction[..i]
                .iter()
                .find(|f| poison_percent(**f) == percent)
            {
                return bad(format!(
                    "poison_fraction: {same} and {fraction} are the same condition ({percent}%); \
                     list each once"
                ));
            }
        }
        for key in [
            "model",
            "train_data",
            "safety_data",
            "validation_data",
            "output_dir",
            "method",
            "mix_safety_data",
            "seed",
            "poison_fraction",
        ] {
            if self.train.contains_key(key) {
                return bad(format!(
                    "train.{key}: the comparison sets this itself; remove it from [train]"
                ));
            }
        }
        // Every run config must be valid before anything runs.
        self.first_seed_runs(task, origin)?;
        Ok(())
    }

    /// The run config of every condition and fine-tuning method for the first seed (the seeds
    /// differ in nothing else), parsed before the data (`run` writes it) or the demo model
    /// (unpacked on first use) need be there.
    fn first_seed_runs(&self, task: Task, origin: &Path) -> Result<Vec<RunConfig>> {
        let files = builtin::DataFiles::in_dir(&self.data_dir(), task);
        let model = self.model.clone().unwrap_or_else(|| "demo model".into());
        let mut runs = Vec::new();
        for &poison in &self.poison_fraction {
            for &method in self.fine_tuned() {
                let text = self.run_toml(poison, method, self.seeds[0], &model, &files);
                runs.push(
                    RunConfig::parse_before_data(&text, &[], origin)
                        .map_err(|e| run_config_error(method, e))?,
                );
            }
        }
        Ok(runs)
    }

    /// Every run's optimiser steps together (from `epochs`, counted on the built-in data with
    /// the mixing and poisoning each run adds), so a server can refuse a comparison too long
    /// to run.
    pub fn planned_steps(&self) -> Result<usize> {
        let task = Task::parse(&self.task)?;
        let (clean, pairs) = (
            builtin::TASK_SPLITS[0],
            builtin::pair_count(builtin::PairRole::Direction),
        );
        let mut total = 0usize;
        for run in self.first_seed_runs(task, Path::new("compare"))? {
            let steps = run.steps_for(run.examples_with(clean, pairs));
            total = total.saturating_add(steps.saturating_mul(self.seeds.len()));
        }
        Ok(total)
    }

    /// The largest memory any part of the comparison takes: its runs (every method and
    /// condition) and answering the harmful prompts. `fused`: the CPU backend. Checks the
    /// run settings that depend on the model (probed layers, sequence length) on the way.
    pub fn memory_estimate(
        &self,
        model: &safeprobe_model::ModelConfig,
        fused: bool,
    ) -> Result<safeprobe_model::memory::Estimate> {
        let task = Task::parse(&self.task)?;
        let mut largest = crate::harmful::answer_memory(model, self.max_new_tokens);
        for run in self.first_seed_runs(task, Path::new("compare"))? {
            run.check_against(model)
                .map_err(|e| EvalError::Invalid(format!("train: {e}")))?;
            let mut estimate = run.memory_estimate(model, fused);
            if estimate.total() > largest.total() {
                // A comparison takes its trainer settings from [train].
                for driver in &mut estimate.drivers {
                    if driver != "model" {
                        *driver = format!("train.{driver}");
                    }
                }
                largest = estimate;
            }
        }
        Ok(largest)
    }

    /// The methods that fine-tune (all but the base model, which is evaluated once).
    fn fine_tuned(&self) -> impl Iterator<Item = &Method> {
        self.methods.iter().filter(|m| **m != Method::Base)
    }

    /// The model to fine-tune: the config's, or the demo model.
    pub fn model_dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => demo_model::dir(),
        }
    }

    /// Where `run` writes the harmful prompts (the HS set) for the runs' held-out metric.
    fn held_out_prompts(&self) -> PathBuf {
        self.data_dir().join("held_out_prompts.jsonl")
    }

    /// Where `run` writes the built-in data the runs train on.
    fn data_dir(&self) -> PathBuf {
        self.output_dir.join("data")
    }

    /// One run's trainer config, its data written and its model in place.
    fn run_config(
        &self,
        poison: f64,
        method: Method,
        seed: u64,
        model: &Path,
        files: &builtin::DataFiles,
        origin: &Path,
    ) -> Result<RunConfig> {
        let text = self.run_toml(poison, method, seed, model, files);
        let mut config =
            RunConfig::parse(&text, &[], origin).map_err(|e| run_config_error(method, e))?;
        // The exact path: the TOML text holds its display form.
        config.output_dir = self.run_dir(poison, method, seed);
        Ok(config)
    }

    /// One run's trainer config as TOML text: the [train] settings plus what the comparison
    /// sets itself.
    fn run_toml(
        &self,
        poison: f64,
        method: Method,
        seed: u64,
        model: &Path,
        files: &builtin::DataFiles,
    ) -> String {
        let mut table = self.train.clone();
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        table.insert("model".into(), path(model));
        table.insert("train_data".into(), path(&files.train));
        table.insert("validation_data".into(), path(&files.validation));
        table.insert("safety_data".into(), path(&files.safety_pairs));
        // Poison comes from pairs SAP never sees (builtin::PairRole), unless [train] names a pool.
        if !table.contains_key("poison_data") {
            table.insert("poison_data".into(), path(&files.poison_pairs));
        }
        // Unless [train] says otherwise, every run tracks its readiness to refuse the
        // held-out harmful prompts the harmful score is measured on (never trained on) and its
        // margins on held-out pairs (never used for the direction or the poison).
        if !table.contains_key("safety_eval") {
            let mut held_out = toml::Table::new();
            held_out.insert("prompts".into(), path(&self.held_out_prompts()));
            held_out.insert("pairs".into(), path(&files.held_out_pairs));
            table.insert("safety_eval".into(), toml::Value::Table(held_out));
        }
        table.insert(
            "output_dir".into(),
            path(&self.run_dir(poison, method, seed)),
        );
        table.insert("seed".into(), toml::Value::Integer(seed as i64));
        table.insert("poison_fraction".into(), toml::Value::Float(poison));
        table.insert("method".into(), toml::Value::String(method.name().into()));
        if let Some(device) = &self.device {
            table.insert("device".into(), toml::Value::String(device.clone()));
        }
        toml::to_string(&table).expect("a TOML table serialises")
    }

    /// A run's folder: `base`, `sft-seed0`, … With more than one condition, the fine-tuned
    /// runs go in a folder per condition (`benign/`, `poison-10pct/`); a single condition keeps
    /// the layout that comparisons had before conditions.
    pub fn run_dir(&self, poison: f64, method: Method, seed: u64) -> PathBuf {
        if method == Method::Base {
            return self.output_dir.join("base");
        }
        let run = format!("{}-seed{seed}", method.name());
        if self.poison_fraction.len() == 1 {
            self.output_dir.join(run)
        } else if poison > 0.0 {
            let percent = poison_percent(poison);
            self.output_dir
                .join(format!("poison-{percent}pct"))
                .join(run)
        } else {
            self.output_dir.join("benign").join(run)
        }
    }
}

fn run_config_error(method: Method, e: safeprobe_train::TrainError) -> EvalError {
    EvalError::Invalid(format!("[train] ({}): {e}", method.name()))
}

/// What the comparison reports while it works.
pub enum Progress<'a> {
    Stage(String),
    Train(&'a Event),
}

fn evaluate_model(
    checkpoint: &Checkpoint,
    evaluation: &Evaluation,
    dir: &Path,
    cancel: &Cancel,
) -> Result<(f64, Option<f64>, f64, f64)> {
    let Evaluation {
        config,
        prompts,
        judge,
        splits,
    } = *evaluation;
    let system = config
        .train
        .get("system")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let settings = AnswerSettings {
        sampling: safeprobe_model::Sampling {
            max_new_tokens: config.max_new_tokens,
            ..Default::default()
        },
        system: system.clone(),
        cancel: Some(cancel.clone()),
        ..AnswerSettings::default()
    };
    std::fs::create_dir_all(dir).map_err(|e| EvalError::file(dir, e.to_string()))?;
    let (report, _) = harmful::evaluate(
        checkpoint,
        prompts,
        &Judges {
            refusal: Some(RefusalJudge::default()),
            model: judge,
        },
        &settings,
        Some(&dir.join("answers.jsonl")),
    )?;
    let settings = TaskSettings {
        system,
        cancel: Some(cancel.clone()),
        ..TaskSettings::default()
    };
    let as_examples = |l: &[Labelled]| l.iter().map(Labelled::example).collect::<Vec<_>>();
    let test = task_metrics::evaluate(checkpoint, &as_examples(&splits.test), &settings)?;
    let validation = task_metrics::evaluate(
        checkpoint,
        &as_examples(&splits.validation),
        &TaskSettings {
            exact_match: false,
            ..settings
        },
    )?;
    safeprobe_model::weights::write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "harmful": report,
            "task_test": test,
            "task_validation": validation,
        }))
        .expect("json")
        .as_bytes(),
    )?;
    Ok((
        report.harmful_score,
        report.judges.get(1).map(|j| j.harmful_score),
        test.exact_match.unwrap_or(0.0),
        validation.loss,
    ))
}

/// Runs the whole comparison. Setting `cancel` stops the training run in progress at its next
/// step (`TrainError::Cancelled`).
pub fn run(
    config: &CompareConfig,
    device: &Device,
    cancel: &Cancel,
    mut progress: impl FnMut(Progress),
) -> Result<Comparison> {
    let started = std::time::Instant::now();
    let task = Task::parse(&config.task)?;
    let files = builtin::write(&config.data_dir(), task, DATA_SEED)?;
    let splits = builtin::task_splits(task, DATA_SEED)?;
    let mut prompts = match &config.prompts {
        Some(path) => crate::prompts::load(path)?,
        None => builtin::harmful_prompts(),
    };
    if let Some(n) = config.max_prompts {
        prompts.truncate(n);
    }
    // The runs' held-out refusal metric reads the same prompts, as plain JSONL whatever format
    // (AdvBench CSV, BeaverTails) they came in.
    let held_out: String = prompts
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({"prompt": p.prompt})))
        .collect();
    safeprobe_model::weights::write_atomic(&config.held_out_prompts(), held_out.as_bytes())?;
    let judge = match &config.judge_model {
        Some(dir) => {
            let model = Checkpoint::load(dir, device)?;
            Some(match config.judge_model_kind {
                JudgeModelKind::Chat => ModelJudge::new(model, "yes", "no")?,
                JudgeModelKind::Guard => ModelJudge::guard(model)?,
            })
        }
        None => None,
    };
    let origin = config.output_dir.join("compare.toml");
    safeprobe_model::weights::write_atomic(
        &origin,
        toml::to_string_pretty(config).expect("toml").as_bytes(),
    )?;

    progress(Progress::Stage("evaluating the base model".into()));
    let model = config.model_dir()?;
    let base_dir = config.run_dir(0.0, Method::Base, 0);
    let evaluation = Evaluation {
        config,
        prompts: &prompts,
        judge: judge.as_ref(),
        splits: &splits,
    };
    let base = Checkpoint::load(&model, device)?;
    let (hs, hs_model, em, loss) = evaluate_model(&base, &evaluation, &base_dir, cancel)?;
    drop(base);
    let base = RunResult {
        method: Method::Base,
        seed: None,
        run_dir: base_dir,
        harmful_score: hs,
        harmful_score_model_judge: hs_model,
        exact_match: em,
        validation_loss: loss,
        step_time_s: None,
        final_task_loss: None,
        refusal_logprob: None,
        mechanism: None,
    };

    let several = config.poison_fraction.len() > 1;
    let mut conditions = Vec::new();
    for &poison in &config.poison_fraction {
        let mut runs = vec![base.clone()];
        for &seed in &config.seeds {
            for &method in config.fine_tuned() {
                let label = if several {
                    format!(
                        "{} (seed {seed}, {})",
                        method.name(),
                        Condition::name_for(poison)
                    )
                } else {
                    format!("{} (seed {seed})", method.name())
                };
                progress(Progress::Stage(label));
                let run_config =
                    config.run_config(poison, method, seed, &model, &files, &origin)?;
                runs.push(fine_tune_and_evaluate(
                    &run_config,
                    method,
                    &evaluation,
                    device,
                    cancel,
                    &mut progress,
                )?);
            }
        }
        conditions.push(condition(poison, runs));
    }

    let comparison = Comparison {
        task: config.task.clone(),
        seeds: config.seeds.clone(),
        conditions,
        seconds: started.elapsed().as_secs_f64(),
    };
    safeprobe_model::weights::write_atomic(
        &config.output_dir.join("comparison.json"),
        serde_json::to_string_pretty(&comparison)
            .expect("json")
            .as_bytes(),
    )?;
    safeprobe_model::weights::write_atomic(
        &config.output_dir.join("comparison.md"),
        render(&comparison).as_bytes(),
    )?;
    Ok(comparison)
}

/// How every model of a comparison is evaluated.
#[derive(Clone, Copy)]
struct Evaluation<'a> {
    config: &'a CompareConfig,
    prompts: &'a [crate::prompts::HarmfulPrompt],
    judge: Option<&'a ModelJudge>,
    splits: &'a crate::tasks::Splits,
}

/// One method's run of one seed under one condition: trained, then evaluated in its `eval/`.
fn fine_tune_and_evaluate(
    run_config: &RunConfig,
    method: Method,
    evaluation: &Evaluation,
    device: &Device,
    cancel: &Cancel,
    progress: &mut impl FnMut(Progress),
) -> Result<RunResult> {
    let mut step_times = Vec::new();
    let mut last_loss = None;
    let mut refusal_logprob = None;
    let mut defences = Vec::new();
    let mut trained =
        safeprobe_train::run::train_cancellable(run_config, device, cancel, |event| {
            match event {
                Event::Step {
                    step_time_s,
                    metrics,
                    ..
                } => {
                    step_times.push(*step_time_s);
                    last_loss = Some(metrics.task_loss);
                    defences.extend(metrics.defence.clone());
                }
                Event::SafetyCheck {
                    refusal_logprob: Some(r),
                    ..
                } => refusal_logprob = Some(*r),
                _ => {}
            }
            progress(Progress::Train(event));
        })?;
    // Evaluate without the autodiff graph or dropout.
    trained.model = burn::module::Module::valid(&trained.model);
    trained.device = device.clone();
    let (hs, hs_model, em, loss) = evaluate_model(
        &trained,
        evaluation,
        &run_config.output_dir.join("eval"),
        cancel,
    )?;
    // The first step warms caches; it is left out of the time per step.
    let timed = if step_times.len() > 1 {
        &step_times[1..]
    } else {
        &step_times[..]
    };
    Ok(RunResult {
        method,
        seed: Some(run_config.seed),
        run_dir: run_config.output_dir.clone(),
        harmful_score: hs,
        harmful_score_model_judge: hs_model,
        exact_match: em,
        validation_loss: loss,
        step_time_s: Some(timed.iter().sum::<f64>() / timed.len().max(1) as f64),
        final_task_loss: last_loss,
        refusal_logprob,
        mechanism: mechanism(&defences),
    })
}

/// A defence's own number over its run's steps: how often SafeGrad projected, the share of
/// the task gradient SPPFT froze, how far Lisa's states drifted from their anchors.
fn mechanism(steps: &[Defence]) -> Option<Mechanism> {
    let mean = |values: Vec<f64>| values.iter().sum::<f64>() / values.len().max(1) as f64;
    let (what, value) = match steps.first()? {
        Defence::Projection { .. } => {
            let projected = steps
                .iter()
                .filter(|d| {
                    matches!(
                        d,
                        Defence::Projection {
                            projected: true,
                            ..
                        }
                    )
                })
                .count();
            (
                "steps projected (%)",
                100.0 * projected as f64 / steps.len() as f64,
            )
        }
        Defence::Frozen { .. } => (
            "task gradient frozen (% of norm)",
            100.0
                * mean(
                    steps
                        .iter()
                        .filter_map(|d| match d {
                            Defence::Frozen { removed, .. } => Some(*removed),
                            _ => None,
                        })
                        .collect(),
                ),
        ),
        Defence::Lisa { .. } => (
            "mean drift ‖W − anchor‖",
            mean(
                steps
                    .iter()
                    .filter_map(|d| match d {
                        Defence::Lisa { drift, .. } => Some(*drift),
                        _ => None,
                    })
                    .collect(),
            ),
        ),
    };
    Some(Mechanism {
        what: what.into(),
        value,
    })
}

/// One condition's table, paired differences and findings, from its runs.
fn condition(poison_fraction: f64, runs: Vec<RunResult>) -> Condition {
    let rows = table_rows(&runs);
    let paired: Vec<_> = Method::ALL
        .into_iter()
        .filter(|m| !matches!(m, Method::Base | Method::Sft))
        .flat_map(|m| paired::differences(&runs, m, Method::Sft))
        .collect();
    let mut findings = findings(&rows);
    findings.extend(
        paired
            .iter()
            .filter(|d| d.metric != "validation_loss")
            .map(paired::finding),
    );
    Condition {
        poison_fraction,
        rows,
        runs,
        paired,
        findings,
    }
}

fn table_rows(runs: &[RunResult]) -> Vec<Row> {
    let mut by_method: BTreeMap<Method, Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        by_method.entry(r.method).or_default().push(r);
    }
    let spread = |rs: &[&RunResult], f: fn(&RunResult) -> f64| {
        Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let step = |rs: &[&RunResult]| {
        let times: Vec<f64> = rs.iter().filter_map(|r| r.step_time_s).collect();
        (!times.is_empty()).then(|| Spread::of(&times))
    };
    let sft_time = by_method
        .get(&Method::Sft)
        .and_then(|rs| step(rs))
        .map(|s| s.mean);
    by_method
        .iter()
        .map(|(method, rs)| {
            let step_time_s = step(rs);
            Row {
                method: *method,
                runs: rs.len(),
                harmful_score: spread(rs, |r| r.harmful_score),
                exact_match: spread(rs, |r| r.exact_match),
                validation_loss: spread(rs, |r| r.validation_loss),
                refusal_logprob: {
                    let measured: Vec<f64> = rs.iter().filter_map(|r| r.refusal_logprob).collect();
                    (!measured.is_empty()).then(|| Spread::of(&measured))
                },
                overhead_vs_sft: step_time_s.zip(sft_time).map(|(s, sft)| s.mean / sft),
                step_time_s,
                mechanism: {
                    let measured: Vec<&Mechanism> =
                        rs.iter().filter_map(|r| r.mechanism.as_ref()).collect();
                    measured.first().map(|m| {
                        let values: Vec<f64> = measured.iter().map(|m| m.value).collect();
                        (m.what.clone(), Spread::of(&values))
                    })
                },
            }
        })
        .collect()
}

/// What the table shows, stated from the numbers (never assumed).
fn findings(rows: &[Row]) -> Vec<String> {
    let get = |m: Method| rows.iter().find(|r| r.method == m);
    let mut out = Vec::new();
    if let (Some(base), Some(sft)) = (get(Method::Base), get(Method::Sft)) {
        let delta = sft.harmful_score.mean - base.harmful_score.mean;
        out.push(format!(
            "SFT {} HS from {:.1}% (base) to {:.1}% ({:+.1} points).",
            if delta > 0.0 {
                "raised"
            } else {
                "did not raise"
            },
            base.harmful_score.mean,
            sft.harmful_score.mean,
            delta
        ));
    }
    if let (Some(sft), Some(sap)) = (get(Method::Sft), get(Method::Sap)) {
        let below = sft.harmful_score.mean - sap.harmful_score.mean;
        let spread = sft.harmful_score.std.max(sap.harmful_score.std);
        out.push(if below > 0.0 {
            format!(
                "SAP's HS is {below:.1} points below SFT's ({:.1}% vs {:.1}%; largest seed std {spread:.1}){}.",
                sap.harmful_score.mean,
                sft.harmful_score.mean,
                if below <= spread { ", within the spread over seeds" } else { "" }
            )
        } else {
            format!(
                "SAP did NOT lower HS below SFT's ({:.1}% vs {:.1}%).",
                sap.harmful_score.mean, sft.harmful_score.mean
            )
        });
        let relative = if sft.exact_match.mean > 0.0 {
            100.0 * (sft.exact_match.mean - sap.exact_match.mean) / sft.exact_match.mean
        } else {
            0.0
        };
        out.push(format!(
            "SAP's task metric is {:.1}% vs SFT's {:.1}% ({}).",
            sap.exact_match.mean,
            sft.exact_match.mean,
            if relative <= 5.0 {
                "within 5% of SFT".to_string()
            } else {
                format!("{relative:.1}% below SFT: more than 5%")
            }
        ));
    }
    out
}

fn cell(s: &Spread, runs: usize, digits: usize) -> String {
    if runs > 1 {
        format!("{:.*} ± {:.*}", digits, s.mean, digits, s.std)
    } else {
        format!("{:.*}", digits, s.mean)
    }
}

fn interval(ci: Option<(f64, f64)>) -> String {
    ci.map_or("—".into(), |(low, high)| {
        format!("[{low:+.2}, {high:+.2}]")
    })
}

/// The comparison in Markdown: for each condition (under its own heading when there are
/// several) the method table, the paired differences and the findings.
pub fn render(c: &Comparison) -> String {
    let mut out = format!(
        "Task: {} (exact match on {} held-out problems); seeds: {:?}\n\n",
        c.task,
        builtin::TASK_SPLITS[2],
        c.seeds
    );
    for (i, condition) in c.conditions.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if c.conditions.len() > 1 {
            let name = condition.name();
            out.push_str(&format!(
                "## {}{}\n\n",
                name[..1].to_uppercase(),
                &name[1..]
            ));
        } else if condition.poison_fraction > 0.0 {
            out.push_str(&format!("Condition: {}\n\n", condition.name()));
        }
        render_condition(condition, &mut out);
    }
    out
}

fn render_condition(c: &Condition, out: &mut String) {
    out.push_str("| method | HS (%) ↓ | task exact match (%) | validation loss | held-out log p(refusal)/token ↑ | time/step (s) | overhead vs SFT | mechanism |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in &c.rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.method.name(),
            cell(&r.harmful_score, r.runs, 1),
            cell(&r.exact_match, r.runs, 1),
            cell(&r.validation_loss, r.runs, 3),
            r.refusal_logprob
                .map_or("—".into(), |s| cell(&s, r.runs, 3)),
            r.step_time_s.map_or("—".into(), |s| cell(&s, r.runs, 3)),
            r.overhead_vs_sft.map_or("—".into(), |o| format!("{o:.2}×")),
            r.mechanism.as_ref().map_or("—".into(), |(what, s)| format!(
                "{what}: {}",
                cell(s, r.runs, 2)
            )),
        ));
    }
    out.push('\n');
    if !c.paired.is_empty() {
        out.push_str("| paired difference | mean | 95% CI (bootstrap) | 95% CI (t) | seeds | real? |\n|---|---|---|---|---|---|\n");
        for d in &c.paired {
            out.push_str(&format!(
                "| {} − {} {} | {:+.2} | {} | {} | {} | {} |\n",
                d.a.name(),
                d.b.name(),
                d.metric,
                d.mean,
                interval(d.ci),
                interval(d.t_ci),
                d.pairs,
                if d.is_real() { "yes" } else { "no" }
            ));
        }
        out.push('\n');
    }
    for f in &c.findings {
        out.push_str(&format!("- {f}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: Method, hs: f64, em: f64, time: Option<f64>) -> RunResult {
        RunResult {
            method,
            seed: Some(0),
            run_dir: PathBuf::new(),
            harmful_score: hs,
            harmful_score_model_judge: None,
            exact_match: em,
            validation_loss: 1.0,
            step_time_s: time,
            final_task_loss: None,
            refusal_logprob: None,
            mechanism: None,
        }
    }

    fn demo_config_with(overrides: &[&str]) -> Result<CompareConfig> {
        let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
        let origin = Path::new("test");
        let text = safeprobe_train::run::apply_overrides(DEMO_CONFIG, &overrides, origin)?;
        CompareConfig::parse(&text, origin)
    }

    /// The committed comparison configs (configs/) stay valid: every run config they make is
    /// checked, as `safeprobe compare --config` would.
    #[test]
    fn the_committed_configs_parse() {
        for (name, text) in [
            (
                "compare-official-lora.toml",
                include_str!("../../../configs/compare-official-lora.toml"),
            ),
            (
                "compare-qwen2.5-lora-poisoned.toml",
                include_str!("../../../configs/compare-qwen2.5-lora-poisoned.toml"),
            ),
            (
                "compare-qwen2.5-lora-poisoned-cpu.toml",
                include_str!("../../../configs/compare-qwen2.5-lora-poisoned-cpu.toml"),
            ),
        ] {
            let config = CompareConfig::parse(text, Path::new(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.train["lora"]["r"].as_integer(), Some(8), "{name}");
            assert_eq!(
                config.train["sap"]["temperature"].as_float(),
                Some(1.0),
                "{name}"
            );
        }
    }

    /// The all-methods config keeps the demo comparison's runs and adds one per defence, each
    /// with its settings in [train].
    #[test]
    fn the_all_methods_config_runs_every_method_on_the_demo_settings() {
        let name = "compare-all-methods.toml";
        let text = include_str!("../../../configs/compare-all-methods.toml");
        let all = CompareConfig::parse(text, Path::new(name)).unwrap();
        let demo = demo_config_with(&[]).unwrap();
        let fine_tuned: Vec<Method> = Method::ALL
            .into_iter()
            .filter(|m| *m != Method::Base)
            .collect();
        assert_eq!(all.methods, fine_tuned);
        assert_eq!(
            (&all.seeds, &all.poison_fraction),
            (&demo.seeds, &demo.poison_fraction)
        );
        for key in ["finetune", "max_steps", "batch_size", "lr", "sap"] {
            assert_eq!(all.train[key], demo.train[key], "train.{key}");
        }
        let task = Task::parse(&all.task).unwrap();
        let runs = all.first_seed_runs(task, Path::new(name)).unwrap();
        let methods: Vec<Method> = runs.iter().map(|r| r.method).collect();
        assert_eq!(methods, [fine_tuned.clone(), fine_tuned].concat());
        assert!(
            runs.iter()
                .all(|r| r.sppft.temperature == 100.0 && r.lisa.task_steps == 9)
        );
    }

    #[test]
    fn a_config_is_checked_before_its_data_and_model_exist() {
        // Nothing at the output folder yet, and the demo model need not be unpacked.
        let nowhere = "output_dir=\"/nonexistent/safeprobe-compare\"";
        let config = demo_config_with(&[nowhere]).unwrap();
        assert_eq!(config.model, None);
        assert!(!Path::new("/nonexistent").exists());
        // The runs' trainer settings are still checked.
        let e = demo_config_with(&[nowhere, "train.lr=0.0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[train] (sft)") && e.contains("lr 0"), "{e}");
    }

    #[test]
    fn rows_spread_and_overhead() {
        let runs = vec![
            result(Method::Base, 5.0, 10.0, None),
            result(Method::Sft, 40.0, 80.0, Some(0.1)),
            result(Method::Sft, 50.0, 90.0, Some(0.1)),
            result(Method::Sap, 20.0, 84.0, Some(0.25)),
            result(Method::Sap, 30.0, 86.0, Some(0.25)),
        ];
        let rows = table_rows(&runs);
        assert_eq!(rows.len(), 3);
        let sft = &rows[1];
        assert_eq!(sft.harmful_score.mean, 45.0);
        assert!((sft.harmful_score.std - 50f64.sqrt()).abs() < 1e-12);
        assert!((rows[2].overhead_vs_sft.unwrap() - 2.5).abs() < 1e-12);
        let findings = findings(&rows);
        assert!(
            findings[0].starts_with("SFT raised HS from 5.0% (base) to 45.0%"),
            "{findings:?}"
        );
        assert!(
            findings[1].starts_with("SAP's HS is 20.0 points below SFT's"),
            "{findings:?}"
        );
        assert!(findings[2].contains("within 5% of SFT"), "{findings:?}");
    }

    #[test]
    fn findings_say_when_sap_does_not_help() {
        let runs = vec![
            result(Method::Sft, 20.0, 80.0, Some(0.1)),
            result(Method::Sap, 25.0, 60.0, Some(0.2)),
        ];
        let findings = findings(&table_rows(&runs));
        assert!(findings[0].contains("did NOT lower HS"), "{findings:?}");
        assert!(
            findings[1].contains("25.0% below SFT: more than 5%"),
            "{findings:?}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let origin = Path::new("c.toml");
        let err = CompareConfig::parse("task = \"poetry\"", origin).unwrap_err();
        assert!(err.to_string().contains("task"), "{err}");
        let err = CompareConfig::parse("[train]\nmethod = \"sft\"", origin).unwrap_err();
        assert!(err.to_string().contains("train.method"), "{err}");
        let err = CompareConfig::parse("[train]\nmax_steps = 5\nlr = -1.0", origin).unwrap_err();
        assert!(err.to_string().contains("lr -1"), "{err}");
        let err = CompareConfig::parse("methods = []\n[train]\nmax_steps = 5", origin).unwrap_err();
        assert!(err.to_string().contains("methods"), "{err}");
        let err = CompareConfig::parse("poison_fraction = 1.5\n[train]\nmax_steps = 5", origin)
            .unwrap_err();
        assert!(err.to_string().contains("poison_fraction"), "{err}");
        let err =
            CompareConfig::parse("seeds = [1, 2, 1]\n[train]\nmax_steps = 5", origin).unwrap_err();
        assert!(
            err.to_string().contains("seeds: 1 is listed twice"),
            "{err}"
        );
        let err = CompareConfig::parse("colour = 1", origin).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        for (text, says) in [
            (
                "poison_fraction = [0.0, 0.1, 0.1]",
                "0.1 and 0.1 are the same condition (10%)",
            ),
            (
                "methods = [\"sft\", \"sap\", \"sft\"]",
                "methods: sft is listed twice",
            ),
            (
                "poison_fraction = [0.1, 0.10001]",
                "0.1 and 0.10001 are the same condition",
            ),
            (
                "poison_fraction = []",
                "poison_fraction: give at least one value",
            ),
            (
                "poison_fraction = [0.0, 1.0]",
                "poison_fraction 1 must be in [0, 1)",
            ),
            (
                "poison_fraction = \"a tenth\"",
                "poison_fraction: give a number (0.1) or a list",
            ),
        ] {
            let err = CompareConfig::parse(&format!("{text}\n[train]\nmax_steps = 5"), origin)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(says) && err.contains("c.toml"),
                "{text}: {err}"
            );
        }
    }

    /// The demo compares under the paper's two threat models; one value (as `--set
    /// poison_fraction=0.1` gives) is one condition, whose runs keep the single-condition
    /// layout, while several conditions each get a folder.
    #[test]
    fn poison_fractions_are_conditions() {
        let demo = demo_config_with(&[]).unwrap();
        assert_eq!(demo.poison_fraction, vec![0.0, 0.1]);
        let out = &demo.output_dir;
        assert_eq!(
            demo.run_dir(0.0, Method::Sap, 2),
            out.join("benign/sap-seed2")
        );
        assert_eq!(
            demo.run_dir(0.1, Method::Sft, 0),
            out.join("poison-10pct/sft-seed0")
        );
        assert_eq!(demo.run_dir(0.1, Method::Base, 0), out.join("base"));
        let steps = demo.planned_steps().unwrap();
        assert_eq!(
            steps,
            2 * 3 * 3 * 120,
            "conditions × seeds × methods × steps"
        );

        let one = demo_config_with(&["poison_fraction=0.05"]).unwrap();
        assert_eq!(one.poison_fraction, vec![0.05]);
        assert_eq!(one.run_dir(0.05, Method::Mix, 1), out.join("mix-seed1"));
        assert_eq!(one.planned_steps().unwrap(), steps / 2);
        // Each condition's runs are trained on that condition's data.
        let files = builtin::DataFiles::in_dir(&demo.data_dir(), Task::Arithmetic);
        for poison in [0.0, 0.1] {
            let text = demo.run_toml(poison, Method::Sap, 0, Path::new("m"), &files);
            let run = RunConfig::parse_before_data(&text, &[], Path::new("t")).unwrap();
            assert_eq!(run.poison_fraction, poison);
            assert_eq!(run.output_dir, demo.run_dir(poison, Method::Sap, 0));
        }
    }

    /// Markdown: a heading per condition when there are several, none for one benign one.
    #[test]
    fn the_rendering_names_each_condition() {
        let runs = vec![
            result(Method::Base, 1.0, 10.0, None),
            result(Method::Sft, 40.0, 80.0, Some(0.1)),
        ];
        let mut comparison = Comparison {
            task: "arithmetic".into(),
            seeds: vec![0],
            conditions: vec![condition(0.0, runs.clone()), condition(0.1, runs)],
            seconds: 1.0,
        };
        let text = render(&comparison);
        assert!(
            text.contains("## Benign data\n\n| method")
                && text.contains("## Benign data, 10% poisoned\n\n| method"),
            "{text}"
        );
        assert_eq!(text.matches("| sft | 40.0 |").count(), 2, "{text}");
        comparison.conditions.truncate(1);
        let text = render(&comparison);
        assert!(!text.contains("##") && !text.contains("poisoned"), "{text}");
    }
}
