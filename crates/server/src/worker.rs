//! A job's own process (`safeprobe job`, started by the server's runner, one per job): it reads
//! the job from its standard input, runs it with the same library code the CLI calls, and
//! reports on its standard output, one JSON line per message. Whatever the job does to its
//! process (an abort on a failed allocation, the kernel's out-of-memory killer, a lost device)
//! ends this process only; the server sees the pipe close and records why.
//!
//! Control: after the job's line, a line `cancel` on standard input asks the job to stop at
//! its next step (with a checkpoint); so does SIGTERM, for whatever stops it from outside. The end of standard input (the server went away) ends
//! the job at once: no job runs on without a server watching it.

use std::io::{BufRead, Write};

use burn::tensor::Device;
use safeprobe_eval::EvalError;
use safeprobe_eval::compare::{self, Progress};
use safeprobe_eval::harmful::{self, AnswerSettings, Judges};
use safeprobe_eval::judge::{ModelJudge, RefusalJudge};
use safeprobe_model::Checkpoint;
use safeprobe_train::TrainError;
use safeprobe_train::run::{self, Cancel, Event};
use safeprobe_wire::{CompareConfig, EvalSpec, JobResult, JobSpec, Judge, JudgedAnswer, TrainJob};
use serde::{Deserialize, Serialize};

use crate::admission::Sizing;
use crate::error::ApiError;
use safeprobe_model::device::Selected;

/// The job a worker runs: its first line of input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub id: i64,
    /// Its kind and validated config, as stored.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// The most memory the job may take (the server's `--job-memory-mib`), in bytes.
    #[serde(default)]
    pub job_memory: Option<u64>,
}

/// One line of a worker's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum Report {
    /// A training step, validation, stage or other event, as the live stream carries it.
    Event { event: Event },
    /// The judged answers of an evaluation.
    Answers { answers: Vec<JudgedAnswer> },
    /// The job finished.
    Done { result: JobResult },
    /// The job stopped because it was asked to (a checkpoint was written where one was due).
    Cancelled,
    /// The job failed with this error (bad data, a model that does not load, ...).
    Failed { error: String },
}

/// The line that asks a running job to stop.
pub const CANCEL: &str = "cancel";

/// Runs the job on standard input on the `selected` device and reports on standard output.
/// The exit status is 0 whenever a final report was written.
pub fn run_from_stdin(selected: &Selected) -> Result<(), ApiError> {
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .map_err(|e| ApiError::Internal(format!("reading the job: {e}")))?;
    let assignment: Assignment = serde_json::from_str(&line)
        .map_err(|e| ApiError::Internal(format!("the job's line is not a job: {e}")))?;
    drop(stdin);
    let cancel = Cancel::default();
    watch_for_cancel(cancel.clone());
    #[cfg(unix)]
    watch_for_terminate(cancel.clone());
    // Sized for the device this process selected (a request may name its own).
    let sizing = Sizing::of(selected, assignment.job_memory);
    let report = match execute(&assignment, sizing, &selected.device, &cancel) {
        Ok(result) => Report::Done { result },
        Err(Stop::Cancelled) => Report::Cancelled,
        Err(Stop::Failed(error)) => Report::Failed { error },
    };
    send(&report);
    Ok(())
}

/// Raises `cancel` on a `cancel` line. The end of standard input means the server is gone
/// (killed, crashed): the job then ends at once, as it would have ended with the server when
/// it ran inside it, so that it cannot race a resumed run for the same folder; its newest
/// checkpoint is the one a resume continues from.
fn watch_for_cancel(cancel: Cancel) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == CANCEL => cancel.cancel(),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        eprintln!("the server that started this job has gone: stopping now");
        std::process::exit(3);
    });
}

/// Raises `cancel` on SIGTERM, so that whatever stops the job from outside (a scheduler
/// preempting it, `kill`) gets a checkpoint at its next step, as a cancel from the server does.
#[cfg(unix)]
fn watch_for_terminate(cancel: Cancel) {
    on_signals(cancel, false);
}

/// Sets `cancel` on SIGTERM, and with `interrupt` on Ctrl-C (SIGINT) too, where a second
/// Ctrl-C ends the process at once. The job stops at its next step with a checkpoint; a
/// comparison under Slurm cancels its tasks.
#[cfg(unix)]
pub fn on_signals(cancel: Cancel, interrupt: bool) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut terminate) = signal(SignalKind::terminate()) else {
                return;
            };
            let mut ctrl_c = match interrupt {
                true => signal(SignalKind::interrupt()).ok(),
                false => None,
            };
            let mut asked = false;
            loop {
                tokio::select! {
                    _ = terminate.recv() => {},
                    Some(()) = async {
                        match ctrl_c.as_mut() {
                            Some(ctrl_c) => ctrl_c.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if asked {
                            eprintln!("stopped");
                            std::process::exit(130);
                        }
                    },
                }
                if !asked {
                    eprintln!(
                        "stopping at the next step, with a checkpoint (Ctrl-C again: at once)"
                    );
                }
                asked = true;
                cancel.cancel();
            }
        });
    });
}

/// Writes one report line. A server that went away cannot read it; the job then stops
/// through its closed input, so a failed write is not an error here.
fn send(report: &Report) {
    let mut out = std::io::stdout().lock();
    let line = serde_json::to_string(report).expect("reports serialise");
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn emit(event: &Event) {
    send(&Report::Event {
        event: event.clone(),
    });
}

/// How a job ended other than with a result.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl From<TrainError> for Stop {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Cancelled { .. } => Stop::Cancelled,
            other => Stop::Failed(other.to_string()),
        }
    }
}

impl From<EvalError> for Stop {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Cancelled => Stop::Cancelled,
            EvalError::Train(t) => t.into(),
            other => Stop::Failed(other.to_string()),
        }
    }
}

impl From<safeprobe_model::Error> for Stop {
    fn from(e: safeprobe_model::Error) -> Self {
        Stop::Failed(e.to_string())
    }
}

fn execute(
    job: &Assignment,
    sizing: Sizing,
    device: &Device,
    cancel: &Cancel,
) -> Result<JobResult, Stop> {
    crate::admission::check_now(&job.spec, sizing)?;
    match &job.spec {
        JobSpec::Train(spec) => train(spec, device, cancel),
        JobSpec::Eval(spec) => evaluate(spec, device, cancel),
        JobSpec::Compare(config) => comparison(config, device, cancel),
    }
}

/// A training run, then its harmful score with the refusal judge on the built-in prompts.
fn train(spec: &TrainJob, device: &Device, cancel: &Cancel) -> Result<JobResult, Stop> {
    let config = &spec.config;
    let mut model = if spec.resume {
        run::resume_cancellable(&config.output_dir, device, cancel, emit)
    } else {
        run::train_cancellable(config, device, cancel, emit)
    }?;
    model.model = burn::module::Module::valid(&model.model);
    model.device = device.clone();
    emit(&Event::Stage {
        stage: "evaluating".into(),
        part: None,
        run: None,
    });
    let (harmful, answers) = harmful::evaluate(
        &model,
        &safeprobe_eval::builtin::harmful_prompts(),
        &Judges {
            refusal: Some(RefusalJudge::default()),
            model: None,
        },
        &AnswerSettings {
            system: config.system.clone(),
            cancel: Some(cancel.clone()),
            ..AnswerSettings::default()
        },
        Some(&config.output_dir.join("answers.jsonl")),
    )?;
    send(&Report::Answers { answers });
    Ok(JobResult::Train {
        run_dir: config.output_dir.clone(),
        harmful,
    })
}

/// A harmful-score evaluation with the judges asked for.
fn evaluate(spec: &EvalSpec, device: &Device, cancel: &Cancel) -> Result<JobResult, Stop> {
    let mut checkpoint = Checkpoint::load(&spec.model, device)?;
    if let Some(adapter) = &spec.adapter {
        checkpoint.load_adapter(adapter)?;
    }
    let prompts = match &spec.prompts {
        Some(p) => safeprobe_eval::prompts::load(p)?,
        None => safeprobe_eval::builtin::harmful_prompts(),
    };
    let model_judge = match (&spec.judge_model, spec.judge) {
        (_, Judge::Refusal) | (None, _) => None,
        (Some(dir), Judge::Guard) => Some(ModelJudge::guard(Checkpoint::load(dir, device)?)?),
        (Some(dir), Judge::Model | Judge::Both) => Some(ModelJudge::new(
            Checkpoint::load(dir, device)?,
            "yes",
            "no",
        )?),
    };
    let judges = Judges {
        refusal: spec.judge.uses_refusal().then(RefusalJudge::default),
        model: model_judge.as_ref(),
    };
    let settings = AnswerSettings {
        sampling: safeprobe_model::Sampling {
            max_new_tokens: spec.max_new_tokens,
            ..Default::default()
        },
        system: spec.system.clone(),
        cancel: Some(cancel.clone()),
        ..AnswerSettings::default()
    };
    let (harmful, answers) = harmful::evaluate(&checkpoint, &prompts, &judges, &settings, None)?;
    send(&Report::Answers { answers });
    Ok(JobResult::Eval { harmful })
}

/// The comparison: base model, then each method and seed, trained and evaluated.
fn comparison(config: &CompareConfig, device: &Device, cancel: &Cancel) -> Result<JobResult, Stop> {
    let comparison = compare::run(config, device, cancel, |p| match p {
        Progress::Stage { name, part, run } => emit(&Event::Stage {
            stage: name,
            part: Some(part),
            run,
        }),
        Progress::Train(event) => emit(event),
    })?;
    Ok(JobResult::Compare(comparison))
}
