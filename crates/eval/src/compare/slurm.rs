//! The Slurm executor: a comparison's runs as the tasks of one job array.
//!
//! Task i runs `safeprobe train` on run i's config in that run's folder, which every node must
//! see at the same path (the comparison's output folder on a shared file system). The task
//! records each attempt and its exit status there, so the comparison reads how its tasks ended
//! from the folders, and asks `squeue` only how the live ones stand. A task that Slurm
//! preempts or requeues starts again with `SLURM_RESTART_COUNT` > 0 and resumes from its
//! run's newest checkpoint, so its adapter is the uninterrupted run's.
//!
//! The array is one `sbatch`, so a comparison is submitted whole or not at all; until every
//! task has ended, dropping the `Array` (an error, a cancel, Ctrl-C) cancels it (`scancel`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use safeprobe_train::run::{Cancel, Event, RunConfig};
use safeprobe_wire::spec::SlurmSettings;
use safeprobe_wire::{Part, RunOf, TaskState};

use super::execute::Progress;
use crate::error::{EvalError, Result};

/// What each task leaves in its run's folder.
const CONFIG: &str = "task.toml";
const ATTEMPTS: &str = "task-attempts";
const EXIT: &str = "task-exit";

/// How long `squeue` may keep failing (a controller restarting) before the comparison gives
/// up on it.
const SQUEUE_PATIENCE: Duration = Duration::from_secs(300);

/// One run for a task: its config and how the comparison names it.
pub struct TaskRun<'a> {
    pub config: &'a RunConfig,
    pub label: String,
    pub run: RunOf,
}

/// A submitted job array, cancelled when dropped before its tasks have all ended.
pub struct Array {
    pub id: String,
    folder: PathBuf,
    ended: bool,
}

impl Drop for Array {
    fn drop(&mut self) {
        if !self.ended {
            // Best effort: the comparison is failing or cancelled already, and a Slurm that
            // cannot be reached has no tasks of ours to stop.
            let _ = Command::new("scancel").arg(&self.id).output();
        }
    }
}

/// Writes each run's config and the array's script into `folder` (the comparison's output
/// folder), and submits the array.
pub fn submit(settings: &SlurmSettings, folder: &Path, runs: &[TaskRun]) -> Result<Array> {
    let own = folder.join("slurm");
    std::fs::create_dir_all(&own).map_err(|e| EvalError::file(&own, e.to_string()))?;
    let folder = std::path::absolute(folder).map_err(|e| EvalError::file(folder, e.to_string()))?;
    let mut dirs = Vec::new();
    for task in runs {
        let dir = std::path::absolute(&task.config.output_dir)
            .map_err(|e| EvalError::file(&task.config.output_dir, e.to_string()))?;
        std::fs::create_dir_all(&dir).map_err(|e| EvalError::file(&dir, e.to_string()))?;
        // A folder reused from an earlier comparison keeps nothing that would read as this
        // one's task having started, trained or ended: its events would be passed on as this
        // run's, and a task requeued before its first checkpoint would resume from the earlier
        // run's. (The local executor overwrites the same files.)
        for stale in [ATTEMPTS, EXIT, "metrics.jsonl"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let checkpoints = dir.join("checkpoints");
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints)
                .map_err(|e| EvalError::file(&checkpoints, e.to_string()))?;
        }
        let mut config = task.config.clone();
        config.output_dir = dir.clone();
        let text =
            toml::to_string_pretty(&config).map_err(|e| EvalError::Invalid(e.to_string()))?;
        safeprobe_model::weights::write_atomic(&dir.join(CONFIG), text.as_bytes())?;
        dirs.push(dir);
    }
    let program = match &settings.program {
        Some(program) => program.clone(),
        None => std::env::current_exe()
            .map_err(|e| EvalError::Invalid(format!("cannot find this program's path: {e}")))?,
    };
    let script = own.join("tasks.sh");
    safeprobe_model::weights::write_atomic(&script, task_script(&program, &dirs).as_bytes())?;

    let here = std::env::current_dir()
        .map_err(|e| EvalError::Invalid(format!("cannot read the current folder: {e}")))?;
    let mut command = Command::new("sbatch");
    command
        .arg("--parsable")
        .arg(format!("--array=0-{}", runs.len().saturating_sub(1)))
        .arg("--requeue")
        .arg("--job-name=safeprobe-compare")
        .arg(format!("--output={}", own.join("task-%a.log").display()))
        .arg("--open-mode=append")
        // The tasks start where the comparison was started, so that the paths in the runs'
        // configs (the data under a relative output folder, a relative model) name the same
        // files on the nodes as here.
        .arg(format!("--chdir={}", here.display()));
    if let Some(partition) = &settings.partition {
        command.arg(format!("--partition={partition}"));
    }
    if let Some(gres) = &settings.gres {
        command.arg(format!("--gres={gres}"));
    }
    command.args(&settings.sbatch_args).arg(&script);
    let stdout = run_command(&mut command)?;
    // `--parsable` prints "id" or "id;cluster".
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(EvalError::Invalid(format!(
            "{} printed {:?}, not a job id",
            shown(&command),
            stdout.trim()
        )));
    }
    let array = Array {
        id,
        folder,
        ended: false,
    };
    safeprobe_model::weights::write_atomic(&own.join("job-id"), array.id.as_bytes())?;
    Ok(array)
}

/// The array's script: task i trains run i, resuming when requeued, and writes its exit
/// status last (atomically), so a folder with `task-exit` holds a task that ended by itself.
fn task_script(program: &Path, dirs: &[PathBuf]) -> String {
    let mut script = String::from(
        "#!/bin/sh\n# Written by safeprobe compare: task i of this job array trains run i.\n\
         case \"${SLURM_ARRAY_TASK_ID:-}\" in\n",
    );
    for (i, dir) in dirs.iter().enumerate() {
        script += &format!("  {i}) run={} ;;\n", quoted(dir));
    }
    script += &format!(
        "  *) echo \"safeprobe: task ${{SLURM_ARRAY_TASK_ID:-?}} is not one of this \
         comparison's\" >&2; exit 2 ;;\nesac\n\
         echo \"$(date -u +%Y-%m-%dT%H:%M:%SZ) attempt ${{SLURM_RESTART_COUNT:-0}} on \
         ${{SLURMD_NODENAME:-$(hostname)}}\" >> \"$run/{ATTEMPTS}\"\n\
         rm -f \"$run/{EXIT}\"\n\
         {} train --config \"$run/{CONFIG}\" --resume-when-requeued\n\
         status=$?\n\
         echo $status > \"$run/{EXIT}.part\" && mv \"$run/{EXIT}.part\" \"$run/{EXIT}\"\n\
         exit $status\n",
        quoted(program)
    );
    script
}

/// A path as one shell word.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn shown(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a Slurm command; its standard output, or an error naming the command and what it
/// said.
fn run_command(command: &mut Command) -> Result<String> {
    let name = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|e| {
        EvalError::Invalid(match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{name} is not on PATH: executor = \"slurm\" needs Slurm's commands (sbatch, \
                 squeue, scancel) where the comparison runs; install them or use executor = \
                 \"local\""
            ),
            _ => format!("{}: {e}", shown(command)),
        })
    })?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let said = match said.is_empty() {
            true => String::from_utf8_lossy(&output.stdout).trim().to_string(),
            false => said,
        };
        return Err(EvalError::Invalid(format!(
            "{} failed ({}): {said}",
            shown(command),
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A live task as `squeue` shows it: its state and why it waits.
struct Queued {
    state: String,
    reason: String,
}

impl Array {
    /// The array's tasks that Slurm still holds, by task index.
    fn queued(&self) -> Result<BTreeMap<usize, Queued>> {
        let mut command = Command::new("squeue");
        command.args(["-h", "-r", "-j", &self.id, "-o", "%K|%T|%r"]);
        match run_command(&mut command) {
            Ok(out) => Ok(out
                .lines()
                .filter_map(|line| {
                    let mut fields = line.splitn(3, '|');
                    let index = fields.next()?.trim().parse().ok()?;
                    Some((
                        index,
                        Queued {
                            state: fields.next()?.trim().to_string(),
                            reason: fields.next().unwrap_or("").trim().to_string(),
                        },
                    ))
                })
                .collect()),
            // A job whose tasks have all ended and been purged is no longer a valid id.
            Err(EvalError::Invalid(said)) if said.contains("Invalid job id") => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }

    /// A task's state from its folder and the queue: an exit status means it ended by itself;
    /// otherwise Slurm's state, a pending task that ran before being requeued.
    fn state_of(dir: &Path, queued: Option<&Queued>) -> Option<(TaskState, Option<String>)> {
        if let Ok(status) = std::fs::read_to_string(dir.join(EXIT)) {
            return Some(match status.trim() {
                "0" => (TaskState::Done, None),
                other => (
                    TaskState::Failed,
                    Some(format!("exit status {other}; its log ends:\n")),
                ),
            });
        }
        let queued = queued?;
        let ran_before = std::fs::metadata(dir.join(ATTEMPTS)).is_ok_and(|m| m.len() > 0);
        Some(match queued.state.as_str() {
            "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "CONFIGURING" => {
                let reason = (!queued.reason.is_empty() && queued.reason != "None")
                    .then(|| queued.reason.clone());
                match ran_before {
                    true => (TaskState::Requeued, reason),
                    false => (TaskState::Pending, reason),
                }
            }
            _ => (TaskState::Running, None),
        })
    }

    /// Waits for every task to end, reporting each change of state and streaming the runs'
    /// training events from their folders: all of one run's, in order, then the next's, so
    /// that each run is one part of the comparison as with the local executor (the runs after
    /// the first unfinished one catch up when their turn comes). Fails, naming each run that
    /// did not train and with its log's tail, unless all did.
    pub fn wait(
        &mut self,
        runs: &[TaskRun],
        first_part: usize,
        of: usize,
        poll: Duration,
        cancel: &Cancel,
        progress: &mut impl FnMut(Progress),
    ) -> Result<()> {
        let mut states: Vec<Option<(TaskState, Option<String>)>> = vec![None; runs.len()];
        let mut missing = vec![0usize; runs.len()];
        let mut streams: Vec<Stream> = runs.iter().map(|_| Stream::default()).collect();
        let mut current = 0;
        let mut squeue_ok = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Err(EvalError::Cancelled);
            }
            let queued = match self.queued() {
                Ok(queued) => {
                    squeue_ok = Instant::now();
                    Some(queued)
                }
                Err(e) if squeue_ok.elapsed() > SQUEUE_PATIENCE => return Err(e),
                Err(_) => None,
            };
            for (i, task) in runs.iter().enumerate() {
                if states[i].as_ref().is_some_and(|(s, _)| s.ended()) {
                    continue;
                }
                let dir = &task.config.output_dir;
                let Some(queued) = &queued else { continue };
                let mut seen = Self::state_of(dir, queued.get(&i));
                if seen.is_some() {
                    missing[i] = 0;
                } else {
                    // Gone from the queue without an exit status: cancelled from outside, over
                    // its time limit, or its node failed. Twice, so a task between its last
                    // write and leaving the queue is not taken for one.
                    missing[i] += 1;
                    if missing[i] < 2 {
                        continue;
                    }
                    seen = Some((
                        TaskState::Failed,
                        Some(
                            "ended without an exit status (cancelled, over its time limit, or \
                             its node failed); its log ends:\n"
                                .into(),
                        ),
                    ));
                }
                if let Some((TaskState::Failed, Some(detail))) = &mut seen {
                    detail.push_str(&self.log_tail(i));
                }
                if seen != states[i] {
                    let (state, detail) = seen.clone().expect("seen");
                    progress(Progress::Train(&Event::Task {
                        run: task.run.clone(),
                        id: format!("{}_{i}", self.id),
                        state,
                        detail,
                    }));
                    states[i] = seen;
                }
            }
            // Stream the first unfinished run's events; the ones before it are complete.
            while current < runs.len() {
                let task = &runs[current];
                if !streams[current].started {
                    streams[current].started = true;
                    progress(Progress::Stage {
                        name: task.label.clone(),
                        part: Part {
                            number: first_part + current,
                            of,
                        },
                        run: Some(task.run.clone()),
                    });
                }
                streams[current].follow(&task.config.output_dir, progress);
                match &states[current] {
                    Some((state, _)) if state.ended() => current += 1,
                    _ => break,
                }
            }
            if states
                .iter()
                .all(|s| s.as_ref().is_some_and(|(s, _)| s.ended()))
            {
                break;
            }
            std::thread::sleep(poll);
        }
        self.ended = true;
        let failed: Vec<String> = runs
            .iter()
            .zip(&states)
            .enumerate()
            .filter_map(|(i, (task, state))| match state {
                Some((TaskState::Failed, detail)) => Some(format!(
                    "{} (task {}_{i}): {}",
                    task.label,
                    self.id,
                    detail.as_deref().unwrap_or("failed")
                )),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            return Err(EvalError::Invalid(format!(
                "{} of the comparison's {} runs did not train under Slurm, so there is no \
                 table (their folders are under {}; fix the cause and run the comparison \
                 again):\n{}",
                failed.len(),
                runs.len(),
                self.folder.display(),
                failed.join("\n")
            )));
        }
        Ok(())
    }

    /// The last lines of task `i`'s log.
    fn log_tail(&self, i: usize) -> String {
        let path = self.folder.join("slurm").join(format!("task-{i}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        match tail.is_empty() {
            true => format!("({} is empty or missing)", path.display()),
            false => tail,
        }
    }
}

/// How far a run's `metrics.jsonl` has been passed on.
#[derive(Default)]
struct Stream {
    started: bool,
    /// Events passed on. A run that resumes cuts its log back to its checkpoint and writes
    /// the same steps again (bit for bit), so lines up to this count are not passed twice.
    sent: usize,
}

impl Stream {
    fn follow(&mut self, run_dir: &Path, progress: &mut impl FnMut(Progress)) {
        let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else {
            return;
        };
        // Only whole lines: the task may be writing the last one.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => return,
        };
        for line in complete.lines().skip(self.sent) {
            self.sent += 1;
            if let Ok(event) = serde_json::from_str::<Event>(line) {
                progress(Progress::Train(&event));
            }
        }
    }
}

/// The poll interval the settings ask for (2 s by default).
pub fn poll_interval(settings: &SlurmSettings) -> Duration {
    Duration::from_secs_f64(settings.poll_seconds.unwrap_or(2.0))
}
