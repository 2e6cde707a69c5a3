//! A comparison config as a file and as a plan: parsed from TOML with its `--set` overrides,
//! each run's config with its data written, and what the comparison will take (steps,
//! memory). The config type itself, its defaults and the checks of its values are the shared
//! `safeprobe_wire::spec::CompareConfig`, which the server and the panel read too.

use std::path::{Path, PathBuf};

use safeprobe_train::admission::RunSizing;
use safeprobe_train::run::{RunConfig, RunFile};
use safeprobe_wire::spec::{Executor, RunFiles, SpecError};
use safeprobe_wire::{Method, spec};

pub use safeprobe_wire::spec::CompareConfig;

use crate::builtin;
use crate::demo_model;
use crate::error::{EvalError, Result};

/// A comparison config read from its file, and what it plans.
pub trait Comparing: Sized {
    /// Parses a TOML config, applying `key=value` overrides (as the trainer's `--set`), and
    /// checks its values and every run's.
    fn parse(text: &str, overrides: &[String], origin: &Path) -> Result<Self>;

    /// The model to fine-tune: the config's, or the demo model.
    fn model_dir(&self) -> Result<PathBuf>;

    /// Where the comparison writes its built-in data for the runs.
    fn run_files(&self) -> RunFiles;

    /// One run's config, its data written and its model in place.
    fn checked_run(
        &self,
        poison: f64,
        method: Method,
        seed: u64,
        model: &Path,
    ) -> Result<RunConfig>;

    /// Every run's optimiser steps together (from `epochs`, counted on the built-in data with
    /// the mixing and poisoning each run adds), so a server can refuse a comparison too long
    /// to run.
    fn planned_steps(&self) -> Result<usize>;

    /// The largest memory any part of the comparison takes here: its runs (every method and
    /// condition) and answering the harmful prompts; under Slurm the runs train on the nodes,
    /// so only the answering. `fused`: the CPU backend. Checks the run settings that depend
    /// on the model (probed layers, sequence length) on the way.
    fn memory_estimate(
        &self,
        model: &safeprobe_model::ModelConfig,
        fused: bool,
    ) -> Result<safeprobe_model::memory::Estimate>;
}

impl Comparing for CompareConfig {
    fn parse(text: &str, overrides: &[String], origin: &Path) -> Result<Self> {
        let in_file = |e: SpecError| EvalError::Invalid(format!("{}: {e}", origin.display()));
        let table = safeprobe_train::run::override_table(text, overrides, origin)?;
        let value = serde_json::to_value(table)
            .map_err(|e| EvalError::Invalid(format!("{}: {e}", origin.display())))?;
        let config: CompareConfig = spec::read(value).map_err(in_file)?;
        config.validate_settings().map_err(in_file)?;
        Ok(config)
    }

    fn model_dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => demo_model::dir(),
        }
    }

    fn run_files(&self) -> RunFiles {
        builtin::DataFiles::in_dir(&self.data_dir(), self.task).for_runs()
    }

    fn checked_run(
        &self,
        poison: f64,
        method: Method,
        seed: u64,
        model: &Path,
    ) -> Result<RunConfig> {
        let config = self.run_config(poison, method, seed, model, &self.run_files())?;
        config.check_data_files()?;
        Ok(config)
    }

    fn planned_steps(&self) -> Result<usize> {
        let (clean, pairs) = (
            builtin::TASK_SPLITS[0],
            builtin::pair_count(builtin::PairRole::Direction),
        );
        let mut total = 0usize;
        for run in self.first_seed_runs(Path::new("model"), &self.run_files())? {
            let steps = run.steps_for(run.examples_with(clean, pairs));
            total = total.saturating_add(steps.saturating_mul(self.seeds.len()));
        }
        Ok(total)
    }

    fn memory_estimate(
        &self,
        model: &safeprobe_model::ModelConfig,
        fused: bool,
    ) -> Result<safeprobe_model::memory::Estimate> {
        let mut largest = crate::harmful::answer_memory(model, self.max_new_tokens);
        for run in self.first_seed_runs(Path::new("model"), &self.run_files())? {
            run.check_against(model)
                .map_err(|e| EvalError::Spec(e.within("train")))?;
            if self.executor == Executor::Slurm {
                continue;
            }
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
}
