//! Admission: every job and every chat is sized from the model's shape and its settings before
//! anything is allocated. A job that could never fit is refused when it is created (a 400
//! naming the settings that drive the estimate); one that does not fit in what is free when
//! its turn comes fails at its start with the same message, before loading anything.

use safeprobe_eval::compare::Comparing;
use safeprobe_model::ModelConfig;
use safeprobe_model::memory::{self, Estimate};
use safeprobe_train::admission::{RunSizing, check_fits, usable};
use safeprobe_wire::JobSpec;

use crate::error::ApiError;

/// How jobs on this server's device are sized.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sizing {
    /// The CPU backend, whose fused operations keep less for the backward pass.
    pub fused: bool,
    /// Tensors live in this machine's memory (the CPU, or a software GPU adapter), so what
    /// the machine has is what a job can use. A GPU's own memory is not reported through wgpu:
    /// there only `limit` applies.
    pub host_memory: bool,
    /// The server's `--job-memory-mib`, in bytes.
    pub limit: Option<u64>,
}

impl Sizing {
    /// Sizing for jobs on the `selected` device under `limit`.
    pub fn of(selected: &safeprobe_model::device::Selected, limit: Option<u64>) -> Self {
        Self {
            fused: selected.backend == "cpu",
            host_memory: selected.uses_host_memory(),
            limit,
        }
    }
}

/// The model config a job (or chat) names, read from its folder.
pub fn model_config(dir: &std::path::Path) -> Result<ModelConfig, ApiError> {
    Ok(ModelConfig::from_file(&dir.join("config.json"))?)
}

/// The largest memory a validated job spec will take on this backend (`cpu_backend`: the
/// fused CPU operations), after checking the settings that depend on the model.
pub fn estimate(spec: &JobSpec, cpu_backend: bool) -> Result<Estimate, ApiError> {
    match spec {
        JobSpec::Train(train) => {
            let run = &train.config;
            let model = model_config(&run.model)?;
            run.check_against(&model)?;
            Ok(run.memory_estimate(&model, cpu_backend))
        }
        JobSpec::Eval(eval) => {
            let model = model_config(&eval.model)?;
            check_answer_length(eval.max_new_tokens, &model, "config.max_new_tokens")?;
            let estimate = safeprobe_eval::harmful::answer_memory(&model, eval.max_new_tokens);
            with_judge(estimate, eval.judge_model.as_deref())
        }
        JobSpec::Compare(config) => {
            let model = model_config(&config.model_dir()?)?;
            check_answer_length(config.max_new_tokens, &model, "config.max_new_tokens")?;
            let estimate = config.memory_estimate(&model, cpu_backend)?;
            with_judge(estimate, config.judge_model.as_deref())
        }
    }
}

/// Answers of `max_new_tokens` must leave room for a prompt in the model's context (every
/// prompt would fail to be answered otherwise).
fn check_answer_length(
    max_new_tokens: usize,
    model: &ModelConfig,
    field: &str,
) -> Result<(), ApiError> {
    /// The least a prompt needs: the chat template's markers alone are 10 to 30 tokens.
    const PROMPT_ROOM: usize = 64;
    let context = model.max_position_embeddings;
    if max_new_tokens > context.saturating_sub(PROMPT_ROOM) {
        return Err(ApiError::field(
            field,
            format!(
                "{max_new_tokens} leaves too little of this model's context of {context} \
                 tokens for the prompt"
            ),
        ));
    }
    Ok(())
}

/// `estimate` with a judge model's weights, which stay loaded beside the judged model.
fn with_judge(
    mut estimate: Estimate,
    judge: Option<&std::path::Path>,
) -> Result<Estimate, ApiError> {
    if let Some(judge) = judge {
        estimate.parts.push(memory::Part {
            name: "judge model weights",
            bytes: safeprobe_model::size_report(&model_config(judge)?).1,
        });
        estimate.drivers.push("judge_model".into());
    }
    Ok(estimate)
}

/// The most a job may ever take: the server's `--job-memory-mib`, else (where tensors live in
/// this machine's memory) the machine's memory less headroom; and in which words to name it.
fn ceiling(sizing: Sizing) -> Option<(u64, &'static str)> {
    match sizing.limit {
        Some(bytes) => Some((bytes, "this server allows a job (--job-memory-mib)")),
        None if sizing.host_memory => memory::host_memory().map(|(total, _)| {
            (
                usable(total),
                "this machine has for a job (90% of its memory)",
            )
        }),
        None => None,
    }
}

/// What a validated job would take, and the most a job may take here, for a form to show
/// before the job is started.
pub fn preview(spec: &JobSpec, sizing: Sizing) -> Result<safeprobe_wire::JobEstimate, ApiError> {
    let estimate = estimate(spec, sizing.fused)?;
    Ok(safeprobe_wire::JobEstimate {
        memory_bytes: estimate.total(),
        memory: estimate.describe(),
        limit: ceiling(sizing).map(|(bytes, whose)| (bytes, whose.to_string())),
        time: None,
    })
}

/// Refuses, at creation, a job that could not fit even on an idle machine.
pub fn check_at_creation(spec: &JobSpec, sizing: Sizing) -> Result<(), ApiError> {
    let estimate = estimate(spec, sizing.fused)?;
    let kind = spec.kind();
    if let Some((budget, whose)) = ceiling(sizing) {
        check_fits(
            &estimate,
            budget,
            &format!("this {} job", kind.name()),
            whose,
        )?;
    }
    Ok(())
}

/// In the job's own process, before it loads anything: the job must fit in what is free now
/// (and under the server's limit).
pub fn check_now(spec: &JobSpec, sizing: Sizing) -> Result<(), ApiError> {
    let estimate = estimate(spec, sizing.fused)?;
    let what = format!("this {} job", spec.kind().name());
    if let Some((budget, whose)) = ceiling(sizing) {
        check_fits(&estimate, budget, &what, whose)?;
    }
    let free = memory::host_memory().filter(|_| sizing.host_memory);
    if let Some((_, available)) = free {
        check_fits(
            &estimate,
            usable(available),
            &what,
            "free on this machine now (90% of what is available); it can be resumed once \
             memory is free",
        )?;
    }
    Ok(())
}

/// Refuses a chat whose reply cannot fit in what is free now: the model's weights (unless it
/// is the one already loaded), its key/value cache and the prompt pass.
pub fn check_chat(
    model: &ModelConfig,
    prompt_tokens: usize,
    max_new_tokens: usize,
    loaded: bool,
    sizing: Sizing,
) -> Result<(), ApiError> {
    let mut estimate = memory::generation_memory(model, 1, prompt_tokens, max_new_tokens);
    if loaded {
        estimate.parts.retain(|p| p.name != "weights");
    }
    estimate.drivers = vec!["messages".into(), "max_new_tokens".into(), "model".into()];
    if let Some((budget, whose)) = ceiling(sizing) {
        check_fits(&estimate, budget, "this chat", whose)?;
    }
    if let Some((_, available)) = memory::host_memory().filter(|_| sizing.host_memory) {
        check_fits(
            &estimate,
            usable(available),
            "this chat",
            "free on this machine now",
        )?;
    }
    Ok(())
}
