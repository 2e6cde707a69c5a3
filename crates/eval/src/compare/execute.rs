//! Running a comparison: the base model's evaluation, then every method, seed and condition
//! trained and evaluated the same way.

use std::path::Path;

use burn::tensor::Device;
use safeprobe_model::Checkpoint;
use safeprobe_train::run::{Cancel, Event, RunConfig};
use safeprobe_wire::spec::Executor;
use safeprobe_wire::{
    Comparison, Condition, Defence, Judge, Mechanism, Method, Part, RunOf, RunResult,
};

use super::aggregate::condition;
use super::report::render;
use super::slurm::{self, TaskRun};
use super::{CompareConfig, Comparing};
use crate::builtin;
use crate::demo_model::DATA_SEED;
use crate::error::{EvalError, Result};
use crate::harmful::{self, AnswerSettings, Judges};
use crate::judge::{ModelJudge, RefusalJudge};
use crate::task_metrics::{self, TaskSettings};
use crate::tasks::Labelled;

/// What the comparison reports while it works.
pub enum Progress<'a> {
    /// A part begins: the base model's evaluation, or one run (trained, then evaluated).
    Stage {
        name: String,
        part: Part,
        run: Option<RunOf>,
    },
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
        .0
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
    builtin::write(&config.data_dir(), config.task, DATA_SEED)?;
    let splits = builtin::task_splits(config.task, DATA_SEED)?;
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
            // The config's checks leave both (a chat model) and guard here.
            Some(match config.judge() {
                Judge::Guard => ModelJudge::guard(model)?,
                _ => ModelJudge::new(model, "yes", "no")?,
            })
        }
        None => None,
    };
    let origin = config.output_dir.join("compare.toml");
    safeprobe_model::weights::write_atomic(
        &origin,
        toml::to_string_pretty(config).expect("toml").as_bytes(),
    )?;

    let of = config.parts();
    let model = config.model_dir()?;
    let planned = plan(config, &model)?;
    let tasks: Vec<TaskRun> = planned.iter().map(Planned::task).collect();
    // Under Slurm the runs are submitted first, so they train while the base model is
    // evaluated here.
    let mut array = match config.executor {
        Executor::Slurm => Some(slurm::submit(&config.slurm, &config.output_dir, &tasks)?),
        Executor::Local => None,
    };
    progress(Progress::Stage {
        name: "evaluating the base model".into(),
        part: Part { number: 1, of },
        run: None,
    });
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

    let trained = match &mut array {
        None => {
            let mut trained = Vec::new();
            for (i, run) in planned.iter().enumerate() {
                progress(Progress::Stage {
                    name: run.label.clone(),
                    part: Part { number: 2 + i, of },
                    run: Some(run.run.clone()),
                });
                trained.push(fine_tune_and_evaluate(
                    &run.config,
                    run.run.method,
                    &evaluation,
                    device,
                    cancel,
                    &mut progress,
                )?);
            }
            trained
        }
        Some(array) => {
            let poll = slurm::poll_interval(&config.slurm);
            array.wait(&tasks, 2, of, poll, cancel, &mut progress)?;
            let mut trained = Vec::new();
            for run in &planned {
                progress(Progress::Train(&Event::Stage {
                    stage: format!("evaluating {}", run.label),
                    part: None,
                    run: None,
                }));
                trained.push(evaluate_trained(run, &model, &evaluation, device, cancel)?);
            }
            trained
        }
    };
    let conditions = config
        .poison_fraction
        .iter()
        .map(|&poison| {
            let runs = std::iter::once(base.clone())
                .chain(
                    planned
                        .iter()
                        .zip(&trained)
                        .filter(|(run, _)| run.poison == poison)
                        .map(|(_, result)| result.clone()),
                )
                .collect();
            condition(poison, runs)
        })
        .collect();

    let comparison = Comparison {
        task: config.task.name().to_string(),
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

/// One run of the comparison: a method and seed under one condition.
struct Planned {
    poison: f64,
    label: String,
    run: RunOf,
    config: RunConfig,
}

impl Planned {
    fn task(&self) -> TaskRun<'_> {
        TaskRun {
            config: &self.config,
            label: self.label.clone(),
            run: self.run.clone(),
        }
    }
}

/// Every run, in the order the comparison reports them (condition, seed, method), each config
/// checked and its data written.
fn plan(config: &CompareConfig, model: &Path) -> Result<Vec<Planned>> {
    let several = config.poison_fraction.len() > 1;
    let mut planned = Vec::new();
    for &poison in &config.poison_fraction {
        for &seed in &config.seeds {
            for method in config.fine_tuned() {
                let condition = Condition::name_for(poison);
                let label = match several {
                    true => format!("{} (seed {seed}, {condition})", method.name()),
                    false => format!("{} (seed {seed})", method.name()),
                };
                planned.push(Planned {
                    poison,
                    label,
                    run: RunOf {
                        method,
                        seed,
                        condition,
                    },
                    config: config.checked_run(poison, method, seed, model)?,
                });
            }
        }
    }
    Ok(planned)
}

/// How every model of a comparison is evaluated.
#[derive(Clone, Copy)]
struct Evaluation<'a> {
    config: &'a CompareConfig,
    prompts: &'a [crate::prompts::HarmfulPrompt],
    judge: Option<&'a ModelJudge>,
    splits: &'a crate::tasks::Splits,
}

/// What a run's events say about it for the table.
#[derive(Default)]
struct RunLog {
    step_times: Vec<f64>,
    last_loss: Option<f64>,
    refusal_logprob: Option<f64>,
    defences: Vec<Defence>,
    /// Where the trained weights went (the adapter, or the whole model).
    trained: Option<std::path::PathBuf>,
}

impl RunLog {
    fn record(&mut self, event: &Event) {
        match event {
            Event::Step {
                step_time_s,
                metrics,
                ..
            } => {
                self.step_times.push(*step_time_s);
                self.last_loss = Some(metrics.task_loss);
                self.defences.extend(metrics.defence.clone());
            }
            Event::SafetyCheck {
                refusal_logprob: Some(r),
                ..
            } => self.refusal_logprob = Some(*r),
            Event::Done { adapter, .. } => self.trained = Some(adapter.clone()),
            _ => {}
        }
    }

    /// A run's `metrics.jsonl`, read whole.
    fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let text =
            std::fs::read_to_string(&path).map_err(|e| EvalError::file(&path, e.to_string()))?;
        let mut log = Self::default();
        for (i, line) in text.lines().enumerate() {
            let event: Event = serde_json::from_str(line).map_err(|e| EvalError::Data {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            log.record(&event);
        }
        Ok(log)
    }

    /// The run's row, from its evaluation (harmful score, by the model judge too, exact
    /// match, validation loss).
    fn result(
        self,
        config: &RunConfig,
        method: Method,
        (hs, hs_model, em, loss): (f64, Option<f64>, f64, f64),
    ) -> RunResult {
        // The first step warms caches; it is left out of the time per step.
        let timed = match self.step_times.len() > 1 {
            true => &self.step_times[1..],
            false => &self.step_times[..],
        };
        RunResult {
            method,
            seed: Some(config.seed),
            run_dir: config.output_dir.clone(),
            harmful_score: hs,
            harmful_score_model_judge: hs_model,
            exact_match: em,
            validation_loss: loss,
            step_time_s: Some(timed.iter().sum::<f64>() / timed.len().max(1) as f64),
            final_task_loss: self.last_loss,
            refusal_logprob: self.refusal_logprob,
            mechanism: mechanism(&self.defences),
        }
    }
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
    let mut log = RunLog::default();
    let mut trained =
        safeprobe_train::run::train_cancellable(run_config, device, cancel, |event| {
            log.record(event);
            progress(Progress::Train(event));
        })?;
    // Evaluate without the autodiff graph or dropout.
    trained.model = burn::module::Module::valid(&trained.model);
    trained.device = device.clone();
    let scores = evaluate_model(
        &trained,
        evaluation,
        &run_config.output_dir.join("eval"),
        cancel,
    )?;
    Ok(log.result(run_config, method, scores))
}

/// A run trained elsewhere (a Slurm task), loaded from its folder and evaluated as a local
/// run is.
fn evaluate_trained(
    run: &Planned,
    model: &Path,
    evaluation: &Evaluation,
    device: &Device,
    cancel: &Cancel,
) -> Result<RunResult> {
    let dir = &run.config.output_dir;
    let log = RunLog::read(dir)?;
    let trained = log.trained.clone().ok_or_else(|| {
        EvalError::file(
            dir.join("metrics.jsonl"),
            "the run ended without saying where its weights are (no done event)",
        )
    })?;
    let checkpoint = match trained.join("adapter_config.json").is_file() {
        true => {
            let mut checkpoint = Checkpoint::load(model, device)?;
            checkpoint.load_adapter(&trained)?;
            checkpoint
        }
        false => Checkpoint::load(&trained, device)?,
    };
    let scores = evaluate_model(&checkpoint, evaluation, &dir.join("eval"), cancel)?;
    Ok(log.result(&run.config, run.run.method, scores))
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
