//! `safeprobe train`: one run from its TOML config, or resumed from its folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use safeprobe_model::ModelConfig;
use safeprobe_train::admission::RunSizing;
use safeprobe_train::run::{RunConfig, RunFile};

use crate::{DeviceArg, model_or_demo, progress, select_device};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Override a config key, e.g. --set sap.rho=1e-4 (repeatable)
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Overrides the config's device
    #[arg(long)]
    pub device: Option<String>,
    /// For a Slurm task (a comparison's executor = "slurm" writes it): when Slurm has
    /// requeued the task (SLURM_RESTART_COUNT > 0) and the run has a checkpoint, resume from
    /// its newest instead of starting again
    #[arg(long, requires = "config")]
    pub resume_when_requeued: bool,
}

/// Whether Slurm started this process again after preempting or requeueing it.
fn requeued_by_slurm() -> bool {
    std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

impl TrainArgs {
    /// Trains (or resumes), after checking that the run fits.
    pub fn run(self) -> Result<()> {
        let TrainArgs {
            config,
            resume,
            overrides,
            device,
            resume_when_requeued,
        } = self;
        let run = match (&config, &resume) {
            (Some(config), _) => {
                let text = std::fs::read_to_string(config)
                    .with_context(|| format!("reading {}", config.display()))?;
                RunConfig::parse(&text, &overrides, config)?
            }
            (None, Some(dir)) => {
                let path = dir.join("config.toml");
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "reading {} (is {} a run directory?)",
                        path.display(),
                        dir.display()
                    )
                })?;
                RunConfig::parse(&text, &[], &path)?
            }
            (None, None) => unreachable!("clap requires --config or --resume"),
        };
        let selected = select_device(&DeviceArg {
            device: device.unwrap_or_else(|| run.device.clone()),
        })?;
        let model =
            ModelConfig::from_file(&model_or_demo(Some(run.model.clone()))?.join("config.json"))?;
        run.check_against(&model)?;
        if selected.uses_host_memory() {
            let estimate = run.memory_estimate(&model, selected.backend == "cpu");
            safeprobe_train::admission::check_free_memory(&estimate, "this run")?;
        }
        let report = progress::reporter();
        let resume = resume.or_else(|| {
            (resume_when_requeued
                && requeued_by_slurm()
                && safeprobe_train::checkpoint::latest(&run.output_dir).is_some())
            .then(|| run.output_dir.clone())
        });
        if resume.is_some() && resume_when_requeued {
            eprintln!(
                "requeued by Slurm: resuming {} from its newest checkpoint",
                run.output_dir.display()
            );
        }
        match &resume {
            Some(dir) => safeprobe_train::run::resume(dir, &selected.device, report)?,
            None => safeprobe_train::run::train(&run, &selected.device, report)?,
        };
        Ok(())
    }
}
