//! What a comparison compares: its config, checked before anything runs, and the run config
//! of each method, seed and condition.

use std::path::{Path, PathBuf};

use safeprobe_train::admission::RunSizing;
use safeprobe_train::run::{RunConfig, RunFile};
use safeprobe_wire::{Method, poison_percent};
use serde::{Deserialize, Serialize};

use crate::builtin;
use crate::demo_model;
use crate::error::{EvalError, Result};
use crate::tasks::Task;

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

    pub(super) fn validate(&self, origin: &Path) -> Result<()> {
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
    pub(super) fn first_seed_runs(&self, task: Task, origin: &Path) -> Result<Vec<RunConfig>> {
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
                .map_err(|e| EvalError::Invalid(e.within("train").to_string()))?;
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
    pub(super) fn fine_tuned(&self) -> impl Iterator<Item = &Method> {
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
    pub(super) fn held_out_prompts(&self) -> PathBuf {
        self.data_dir().join("held_out_prompts.jsonl")
    }

    /// Where `run` writes the built-in data the runs train on.
    pub(super) fn data_dir(&self) -> PathBuf {
        self.output_dir.join("data")
    }

    /// One run's trainer config, its data written and its model in place.
    pub(super) fn run_config(
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
    pub(super) fn run_toml(
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
