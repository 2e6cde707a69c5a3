//! A run's `metrics.jsonl`: one event per line, appended as the run goes, and cut back to
//! its checkpoint when a run resumes (the steps after it are run again).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safeprobe_model::weights::write_atomic;

use crate::error::{Result, TrainError};
use crate::run::Event;

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log of the run in `run_dir`: empty for a new run; for one resuming after
    /// `resumed_at` steps, its events up to that step.
    pub fn open(run_dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: String = match resumed_at {
            Some(start) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= start)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            None => String::new(),
        };
        write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Self { path, file })
    }

    /// Appends `event` and hands it to `on_event`.
    pub fn emit(&mut self, event: Event, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let line = serde_json::to_string(&event).expect("json");
        writeln!(self.file, "{line}").map_err(|e| TrainError::File {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        on_event(&event);
        Ok(())
    }
}
