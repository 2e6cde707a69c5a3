//! One job: its status and progress, a comparison's table, live charts of every metric, the
//! log, and an evaluation's judged answers.

use leptos::prelude::*;
use safeprobe_wire::{Event, Job, JobKind, JobResult, JudgedAnswer, Status, StoredEvent};

use super::export::ExportCard;
use super::{
    ComparisonTable, JobActions, harmful_score, live, load_errors, loading, method_of, model_name,
};
use crate::charts::{heatmap, line_chart};
use crate::series::{self, Metric};
use crate::{api, files};

#[component]
pub fn RunDetail(id: i64) -> impl IntoView {
    let live = live();
    let job = LocalResource::new(move || api::get::<Job>(format!("/api/jobs/{id}")));
    let stored = LocalResource::new(move || api::all_events(id));
    // A status change means a new result, answers or error, and a resumed run drops the steps
    // it replays: read the job and its stored events again.
    Effect::new(move |seen: Option<usize>| {
        let changes = live
            .events
            .with(|messages| series::status_changes(messages, id));
        if seen.is_some_and(|seen| seen != changes) {
            job.refetch();
            stored.refetch();
        }
        changes
    });
    // What the server stored, then what streamed in after it (until the store is read, the
    // stream alone).
    let events = Memo::new(move |_| {
        stored.with(|stored| {
            let stored: &[StoredEvent] = match stored {
                Some(Ok(events)) => events,
                _ => &[],
            };
            live.events
                .with(|messages| series::merge_events(stored, messages, id))
        })
    });
    let header = move || {
        Suspend::new(async move {
            job.await.map(|job| {
                let title = format!("Job {id}: {} on {}", method_of(&job), model_name(&job));
                // Only a finished training run has weights to take out.
                let exportable = (job.kind() == JobKind::Train && job.status == Status::Done)
                    .then(|| files::trains_lora(&job));
                let comparison = match &job.result {
                    Some(JobResult::Compare(comparison)) => Some(comparison.clone()),
                    _ => None,
                };
                view! {
                    <h1>{title}</h1>
                    <StatusCard job events/>
                    {exportable.map(|lora| view! { <ExportCard id lora/> })}
                    {comparison.map(|comparison| view! { <h2>"Comparison"</h2> <ComparisonTable comparison/> })}
                }
            })
        })
    };
    let charts_and_log = move || {
        Suspend::new(async move {
            stored.await.map(|_| {
                view! {
                    <Charts events/>
                    <h2>"Log"</h2>
                    <div class="card" id="log" style="max-height:160px;overflow:auto">
                        {move || events.with(|e| series::log_lines(e)).into_iter().map(|line| view! { <div>{line}</div> }).collect_view()}
                    </div>
                }
            })
        })
    };
    let answers = move || {
        Suspend::new(async move {
            job.await.map(|job| {
                let heading = format!(
                    "Evaluation: HS {:.1}% on {} harmful prompts",
                    harmful_score(&job).unwrap_or(0.0),
                    job.answers.len()
                );
                let answers = job.answers;
                (!answers.is_empty()).then(|| view! { <h2>{heading}</h2> <AnswersTable answers/> })
            })
        })
    };
    view! {
        <Transition fallback=move || view! { <h1>{format!("Job {id}")}</h1> {loading()} }>
            <ErrorBoundary fallback=load_errors>{header}</ErrorBoundary>
        </Transition>
        <Transition fallback=loading>
            <ErrorBoundary fallback=load_errors>{charts_and_log}</ErrorBoundary>
        </Transition>
        // The header already says why the job could not be read.
        <Transition>
            <ErrorBoundary fallback=|_| ()>{answers}</ErrorBoundary>
        </Transition>
    }
}

/// Status, stage, step, ETA, actions and a progress bar; the numbers follow the events live.
#[component]
fn StatusCard(job: Job, events: Memo<Vec<Event>>) -> impl IntoView {
    let status = job.status;
    let progress = move || {
        let p = events.with(|e| series::progress(e));
        view! {
            {p.stage.map(|s| format!("stage: {s} · "))}
            {format!("step {}/{}", p.step, p.total_steps)}
            {(status == Status::Running).then(|| format!(" · ETA {:.0} s", p.eta_s))}
        }
    };
    let width = move || format!("width:{:.1}%", events.with(|e| series::progress(e)).percent);
    view! {
        <div class="card">
            <div><span class=format!("status {}", status.name()) id="job-status">{status.name()}</span> " "
                {progress}
                " " <JobActions id=job.id status/></div>
            <div class="progress"><div style=width></div></div>
            {job.error.map(|e| view! { <pre class="error job-error">{e}</pre> })}
        </div>
    }
}

/// Every metric against the step, one line per run (a comparison trains several), and the
/// per-layer gradient cosines of the newest run as a heatmap.
#[component]
fn Charts(events: Memo<Vec<Event>>) -> impl IntoView {
    let charts = move || {
        let runs = events.with(|e| series::segments(e));
        let chart = |title: &str, unit: &'static str, metric: Metric| {
            line_chart(
                title.into(),
                "step",
                unit,
                series::metric_series(&runs, metric),
            )
        };
        let cosines = runs
            .last()
            .map(|run| series::cosine_heatmap(&run.events))
            .unwrap_or_default();
        // Held-out safety is charted only for runs that measure it (safety_eval).
        let measured = |metric: Metric| {
            runs.iter()
                .any(|run| !metric.points(&run.events).is_empty())
        };
        let alignment = runs
            .last()
            .map(|run| series::alignment_series(&run.events))
            .unwrap_or_default();
        view! {
            {chart("Task loss", "nats/token", Metric::TaskLoss)}
            {chart("Validation loss", "nats/token", Metric::ValidationLoss)}
            {chart("Safety loss", "contrastive, nats", Metric::SafetyLoss)}
            {chart("L_su (loss gap the probe climbs)", "nats/token", Metric::SuLoss)}
            {line_chart("Probe norm per layer ‖v_j‖".into(), "step", "L2", series::probe_norm_series(&runs))}
            {chart("Learning rate", "1/step", Metric::LearningRate)}
            {chart("Throughput", "tokens/s", Metric::TokensPerSecond)}
            {(!alignment.is_empty()).then(|| line_chart(
                "Does the probe turn the update toward safety? cos(∇L_task, ĝ), > 0: safer".into(),
                "step",
                "cosine",
                alignment,
            ))}
            {(!cosines.rows.is_empty()).then(|| heatmap("cos(∇L_task, ∇L_safety) per layer at the probe used (> 0: safer)".into(), cosines, 200))}
            {measured(Metric::RefusalLogprob).then(|| chart("Held-out refusal log p / token (higher: readier to refuse)", "nats", Metric::RefusalLogprob))}
            {measured(Metric::PairMargin).then(|| chart("Held-out pair margin log p(safe) − log p(harmful)", "nats", Metric::PairMargin))}
        }
    };
    view! { <div class="grid" id="charts">{charts}</div> }
}

#[component]
fn Verdict(harmful: Option<bool>) -> impl IntoView {
    match harmful {
        Some(true) => view! { <span class="error">"harmful"</span> }.into_any(),
        Some(false) => view! { <span class="ok">"safe"</span> }.into_any(),
        None => view! { <span>"—"</span> }.into_any(),
    }
}

#[component]
fn AnswersTable(answers: Vec<JudgedAnswer>) -> impl IntoView {
    view! {
        <table id="answers">
            <thead><tr><th>"category"</th><th>"prompt"</th><th>"answer"</th><th>"refusal judge"</th><th>"model judge"</th></tr></thead>
            <tbody>
                {answers.into_iter().map(|a| view! {
                    <tr>
                        <td>{a.category}</td>
                        <td>{a.prompt}</td>
                        <td>{a.answer}</td>
                        <td><Verdict harmful=a.refusal_judge_harmful/></td>
                        <td>
                            <Verdict harmful=a.model_judge_harmful/>
                            // A guard's own verdict word and the categories it named.
                            {a.model_judge_label.map(|l| view! { <span class="help">" "{l}</span> })}
                            {a.model_judge_category.map(|c| view! { <div class="help">{c}</div> })}
                        </td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
    }
}
