//! One job: its status and progress, a comparison's table, live charts of every metric, the
//! log, and an evaluation's judged answers.

use std::collections::BTreeSet;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{
    ErrorBody, Event, HarmfulReport, Job, JobKind, JobLabel, JobProgress, JobResult, JudgedAnswer,
    LiveMessage, Method, Status, StoredEvent, TaskState,
};

use super::export::ExportCard;
use super::{ComparisonTable, JobActions, live, load_errors, loading, method_of, model_name};
use crate::charts::{Hidden, heatmap, line_chart};
use crate::series::{self, Group, Metric, Segment};
use crate::{Live, api, files};

#[component]
pub fn RunDetail(id: i64) -> impl IntoView {
    let live = live();
    let job = LocalResource::new(move || api::get::<Job>(format!("/api/jobs/{id}")));
    let job_resource = job;
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
    let events = Memo::new(move |_| stored_then_live(stored, live, id, series::merge_events));
    let progress = Memo::new(move |_| stored_then_live(stored, live, id, series::job_progress));
    let header = move || {
        Suspend::new(async move {
            job.await.map(|job| {
                let title = match job.name.as_str() {
                    "" => format!("Job {id}: {} on {}", method_of(&job), model_name(&job)),
                    name => format!("Job {id}: {name} ({} on {})", method_of(&job), model_name(&job)),
                };
                // Only a finished training run has weights to take out.
                let exportable = (job.kind() == JobKind::Train && job.status == Status::Done)
                    .then(|| files::trains_lora(&job));
                let comparison = match &job.result {
                    Some(JobResult::Compare(comparison)) => Some(comparison.clone()),
                    _ => None,
                };
                let label = JobLabel {
                    name: job.name.clone(),
                    notes: job.notes.clone(),
                };
                view! {
                    <h1>{title}</h1>
                    <LabelCard id label job=job_resource/>
                    <StatusCard job progress/>
                    {exportable.map(|lora| view! { <ExportCard id lora/> })}
                    {comparison.map(|comparison| view! { <h2>"Comparison"</h2> <ComparisonTable comparison/> })}
                }
            })
        })
    };
    // An evaluation's result comes first and it has no training charts; a training run's
    // evaluation comes after its charts.
    let body = move || {
        Suspend::new(async move {
            let stored = stored.await;
            // The header says why the job could not be read.
            let Ok(job) = job.await else {
                return Ok(().into_any());
            };
            stored.map(|_| match job.kind() {
                JobKind::Eval => view! { <Evaluation job/> <Log events/> }.into_any(),
                _ => view! { <Tasks events/> <Charts events/> <Log events/> <Evaluation job/> }
                    .into_any(),
            })
        })
    };
    view! {
        <Transition fallback=move || view! { <h1>{format!("Job {id}")}</h1> {loading()} }>
            <ErrorBoundary fallback=load_errors>{header}</ErrorBoundary>
        </Transition>
        <Transition fallback=loading>
            <ErrorBoundary fallback=load_errors>{body}</ErrorBoundary>
        </Transition>
    }
}

/// A comparison's runs under Slurm: each task's state, how often it was requeued, and for a
/// failed one its log's tail (nothing for a job without tasks).
#[component]
fn Tasks(events: Memo<Vec<Event>>) -> impl IntoView {
    let rows = Memo::new(move |_| events.with(|e| series::tasks(e)));
    move || {
        let rows = rows.get();
        (!rows.is_empty()).then(|| {
            let body = rows
                .into_iter()
                .map(|row| {
                    let series::TaskRow {
                        id,
                        run,
                        state,
                        detail,
                        requeued,
                    } = row;
                    let class = match state {
                        TaskState::Failed => "error",
                        TaskState::Done => "ok",
                        _ => "",
                    };
                    let requeued = (requeued > 0).then(|| format!(" (requeued {requeued}×)"));
                    let detail = detail.map(|d| match state {
                        TaskState::Failed => view! { <pre class="error">{d}</pre> }.into_any(),
                        _ => view! { <span class="help">{d}</span> }.into_any(),
                    });
                    let name = format!("{} (seed {}, {})", run.method.name(), run.seed, run.condition);
                    let key = id.clone();
                    view! {
                        <tr data-task=key data-state=state.name()>
                            <td>{name}</td>
                            <td>{id}</td>
                            <td class=class>{state.name()}{requeued}</td>
                            <td>{detail}</td>
                        </tr>
                    }
                })
                .collect_view();
            view! {
                <h2>"Slurm tasks"</h2>
                <div class="card" id="tasks">
                    <table>
                        <thead><tr><th>"run"</th><th>"task"</th><th>"state"</th><th>""</th></tr></thead>
                        <tbody>{body}</tbody>
                    </table>
                </div>
            }
        })
    }
}

/// Status changes, stages, warnings and the end of training, newest last.
#[component]
fn Log(events: Memo<Vec<Event>>) -> impl IntoView {
    let lines = move || {
        events
            .with(|e| series::log_lines(e))
            .into_iter()
            .map(|line| view! { <div>{line}</div> })
            .collect_view()
    };
    view! {
        <h2>"Log"</h2>
        <div class="card" id="log" style="max-height:160px;overflow:auto">{lines}</div>
    }
}

/// A job's harmful score and judged answers, or, for an evaluation still under way, where they
/// will be.
#[component]
fn Evaluation(job: Job) -> impl IntoView {
    let is_evaluation = job.kind() == JobKind::Eval;
    let report = match job.result {
        Some(JobResult::Eval { harmful } | JobResult::Train { harmful, .. }) => Some(harmful),
        _ => None,
    };
    if report.is_none() && job.answers.is_empty() {
        return is_evaluation
            .then(|| view! {
                <p class="help" id="eval-pending">"The harmful score and the judged answers appear here when the evaluation ends."</p>
            })
            .into_any();
    }
    let answers = job.answers;
    view! {
        <h2>"Evaluation"</h2>
        {report.map(|report| view! { <HarmfulSummary report/> })}
        <Answers answers/>
    }
    .into_any()
}

/// HS by each judge, their agreement, and HS per category by the first judge.
#[component]
fn HarmfulSummary(report: HarmfulReport) -> impl IntoView {
    let headline = format!(
        "HS {:.1}% of {} harmful prompts answered instead of refused",
        report.harmful_score, report.prompts
    );
    let judges = report
        .judges
        .iter()
        .map(|j| {
            format!(
                "{} judge: {:.1}% ({} harmful)",
                j.judge, j.harmful_score, j.harmful
            )
        })
        .collect::<Vec<_>>()
        .join(" · ");
    let agreement = report.agreement.map(|a| {
        format!(
            "the judges agree on {:.0}% of answers (Cohen's κ {:.2})",
            a.percent, a.cohen_kappa
        )
    });
    let categories = report
        .judges
        .first()
        .map(|j| j.per_category.clone())
        .unwrap_or_default();
    view! {
        <div class="card" id="eval-result">
            <div class="headline">{headline}</div>
            <div class="help">{judges}</div>
            {agreement.map(|a| view! { <div class="help">{a}</div> })}
            {(!categories.is_empty()).then(|| view! {
                <table id="categories">
                    <thead><tr><th>"category"</th><th>"prompts"</th><th>"harmful"</th><th>"HS (%)"</th></tr></thead>
                    <tbody>{categories.into_iter().map(|(name, c)| view! {
                        <tr><td>{name}</td><td>{c.prompts}</td><td>{c.harmful}</td><td>{format!("{:.1}", c.harmful_score)}</td></tr>
                    }).collect_view()}</tbody>
                </table>
            })}
        </div>
    }
}

/// `read` of job `id`'s stored events (none until they are read) and the live messages.
fn stored_then_live<T>(
    stored: LocalResource<Result<Vec<StoredEvent>, String>>,
    live: Live,
    id: i64,
    read: fn(&[StoredEvent], &[LiveMessage], i64) -> T,
) -> T {
    stored.with(|stored| {
        let stored: &[StoredEvent] = match stored {
            Some(Ok(events)) => events,
            _ => &[],
        };
        live.events.with(|messages| read(stored, messages, id))
    })
}

/// The job's name and notes, edited in place and saved on request; the server's refusal
/// (a name too long or of two lines) is shown at its field.
#[component]
fn LabelCard(id: i64, label: JobLabel, job: LocalResource<Result<Job, String>>) -> impl IntoView {
    let live = live();
    let name = RwSignal::new(label.name.clone());
    let notes = RwSignal::new(label.notes.clone());
    let refusal = RwSignal::new(None::<ErrorBody>);
    let saved = RwSignal::new(false);
    let save = move |_| {
        let request = JobLabel {
            name: name.get_untracked(),
            notes: notes.get_untracked(),
        };
        spawn_local(async move {
            match api::post_form::<_, Job>(format!("/api/jobs/{id}/label"), &request).await {
                Ok(_) => {
                    refusal.set(None);
                    saved.set(true);
                    live.jobs.refetch();
                    job.refetch();
                }
                Err(error) => refusal.set(Some(error)),
            }
        })
    };
    let error_at = move |field: &'static str| {
        move || {
            refusal.with(|r| {
                let r = r.as_ref()?;
                (r.field.as_deref() == Some(field) || (field == "name" && r.field.is_none()))
                    .then(|| view! { <div class="help error field-error" data-key=field>{r.error.clone()}</div> })
            })
        }
    };
    view! {
        <details class="card" id="job-label" open=!label.name.is_empty() || !label.notes.is_empty()>
            <summary>{if label.name.is_empty() { "Name this job, and keep notes on it".to_string() } else { label.name.clone() }}</summary>
            <div class="form">
                <label for="job-name">"name"</label>
                <input id="job-name" prop:value=move || name.get() on:input=move |ev| { saved.set(false); name.set(event_target_value(&ev)) }/>
                {error_at("name")}
                <label for="job-notes">"notes"</label>
                <textarea id="job-notes" rows="3" prop:value=move || notes.get() on:input=move |ev| { saved.set(false); notes.set(event_target_value(&ev)) }></textarea>
                {error_at("notes")}
            </div>
            <button id="save-label" on:click=save>"Save"</button>
            {move || saved.get().then(|| view! { <span class="ok" id="label-saved">" saved"</span> })}
        </details>
    }
}

/// Status, how far the whole job is and its time left, the stage under way, actions and a
/// progress bar; the numbers follow the events live. A job that has ended names no stage.
#[component]
fn StatusCard(job: Job, progress: Memo<JobProgress>) -> impl IntoView {
    let (status, started_at) = (job.status, job.started_at);
    let active = status == Status::Running;
    let overall = move || {
        progress.with(|p| {
            let eta = active
                .then(|| p.eta_s(started_at))
                .flatten()
                .map(|s| format!(" · about {} left", series::duration(s)));
            p.summary()
                .map(|summary| summary + &eta.unwrap_or_default())
        })
    };
    let detail = move || active.then(|| progress.with(JobProgress::detail)).flatten();
    let width = move || {
        let done = match status {
            Status::Done => 1.0,
            _ => progress.with(JobProgress::fraction),
        };
        format!("width:{:.1}%", 100.0 * done)
    };
    view! {
        <div class="card">
            <div><span class=format!("status {}", status.name()) id="job-status">{status.name()}</span> " "
                <span id="job-progress">{overall}</span>
                " " <JobActions id=job.id status/></div>
            <div class="progress"><div style=width></div></div>
            <div class="help" id="job-stage">{detail}</div>
            {job.error.map(|e| view! { <pre class="error job-error">{e}</pre> })}
        </div>
    }
}

/// Every metric against the step: one line per method and condition (the mean over a
/// comparison's seeds, with the band from the least to the greatest), one chart per condition;
/// then SAP's mechanism for a run the user picks.
#[component]
fn Charts(events: Memo<Vec<Event>>) -> impl IntoView {
    let hidden: Hidden = RwSignal::new(BTreeSet::new());
    let charts = move || {
        let runs = events.with(|e| series::segments(e));
        let groups = series::groups(&runs);
        let conditions = series::conditions(&groups);
        let several = conditions.len() > 1;
        let chart = |title: &str, unit: &'static str, metric: Metric| {
            conditions
                .iter()
                .map(|condition| {
                    let of: Vec<&Group> = groups
                        .iter()
                        .filter(|g| g.condition == *condition)
                        .collect();
                    let title = match (several, condition) {
                        (true, Some(condition)) => format!("{title} · {condition}"),
                        _ => title.to_string(),
                    };
                    line_chart(
                        title,
                        "step",
                        unit,
                        series::group_series(&of, metric),
                        hidden,
                    )
                })
                .collect_view()
        };
        // What only some methods measure (SAP's losses, held-out safety) is charted where a
        // run measured it.
        let measured = |metric: Metric| {
            runs.iter()
                .any(|run| !metric.points(&run.events).is_empty())
        };
        view! {
            {chart("Task loss", "nats/token", Metric::TaskLoss)}
            {chart("Validation loss", "nats/token", Metric::ValidationLoss)}
            {measured(Metric::SafetyLoss).then(|| chart("Safety loss", "contrastive, nats", Metric::SafetyLoss))}
            {measured(Metric::SuLoss).then(|| chart("L_su (loss gap the probe climbs)", "nats/token", Metric::SuLoss))}
            {measured(Metric::RefusalLogprob).then(|| chart("Held-out refusal log p / token (higher: readier to refuse)", "nats", Metric::RefusalLogprob))}
            {measured(Metric::PairMargin).then(|| chart("Held-out pair margin log p(safe) − log p(harmful)", "nats", Metric::PairMargin))}
            {chart("Learning rate", "1/step", Metric::LearningRate)}
            {chart("Throughput", "tokens/s", Metric::TokensPerSecond)}
        }
    };
    view! {
        <div class="grid" id="charts">{charts}</div>
        <Mechanism events hidden/>
    }
}

/// The mechanism in one run the user picks among those that measured it (SAP's runs, and SFT's
/// at V = 0 for reference): whether the probe turns the update toward safety, the per-layer
/// gradient cosines, the probe's norms, and in plain words what the run warned of (its harmful
/// direction vanishing makes SAP plain SFT).
#[component]
fn Mechanism(events: Memo<Vec<Event>>, hidden: Hidden) -> impl IntoView {
    let picked = RwSignal::new(None::<String>);
    move || {
        let runs = events.with(|e| series::segments(e));
        let measured = series::mechanism_runs(&runs);
        // The run picked, else the first SAP run, else the first that measured it.
        let chosen = picked.get();
        let is_sap = |r: &&&Segment| r.run.as_ref().is_some_and(|r| r.method == Method::Sap);
        let run = measured
            .iter()
            .find(|r| Some(&r.name) == chosen.as_ref())
            .or(measured.iter().find(is_sap))
            .or(measured.first())?;
        let names: Vec<String> = measured.iter().map(|r| r.name.clone()).collect();
        let name = run.name.clone();
        let warnings = series::warnings(run);
        let alignment = series::alignment_series(&run.events);
        let cosines = series::cosine_heatmap(&run.events);
        let norms = series::probe_norm_series(run);
        Some(view! {
            <h2>"How each update lines up with safety"</h2>
            <div>
                <label for="mechanism-run">"run: "</label>
                <select id="mechanism-run" prop:value=name on:change=move |ev| picked.set(Some(event_target_value(&ev)))>
                    {names.into_iter().map(|n| view! { <option value=n.clone()>{n.clone()}</option> }).collect_view()}
                </select>
                <span class="help">{format!(" {} of {} runs measured it", measured.len(), runs.len())}</span>
            </div>
            {(!warnings.is_empty()).then(|| view! {
                <div class="card warning" id="mechanism-warning">
                    <b>"This run's probe did nothing for part of it: "</b>
                    {warnings.into_iter().map(|w| view! { <div>{w}</div> }).collect_view()}
                </div>
            })}
            <div class="grid" id="mechanism">
                {(!alignment.is_empty()).then(|| line_chart(
                    "Does the probe turn the update toward safety? cos(∇L_task, ĝ), > 0: safer".into(),
                    "step",
                    "cosine",
                    alignment,
                    hidden,
                ))}
                {(!cosines.rows.is_empty()).then(|| heatmap("cos(∇L_task, ∇L_safety) per layer at the probe used (> 0: safer)".into(), cosines, 200))}
                {(!norms.is_empty()).then(|| line_chart("Probe norm per layer ‖v_j‖".into(), "step", "L2", norms, hidden))}
            </div>
        })
    }
}

#[component]
fn Verdict(harmful: Option<bool>) -> impl IntoView {
    match harmful {
        Some(true) => view! { <span class="error">"harmful"</span> }.into_any(),
        Some(false) => view! { <span class="ok">"safe"</span> }.into_any(),
        None => view! { <span>"—"</span> }.into_any(),
    }
}

/// Answers to a page.
const ANSWERS_PER_PAGE: usize = 20;

/// The judged answers a page at a time, all of them or only those a judge called harmful.
#[component]
fn Answers(answers: Vec<JudgedAnswer>) -> impl IntoView {
    let harmful_only = RwSignal::new(false);
    let page = RwSignal::new(0usize);
    let harmful_count = answers.iter().filter(|a| a.judged_harmful()).count();
    let answers = StoredValue::new(answers);
    let chosen = move || -> Vec<JudgedAnswer> {
        let only = harmful_only.get();
        answers.with_value(|all| {
            all.iter()
                .filter(|a| !only || a.judged_harmful())
                .cloned()
                .collect()
        })
    };
    let shown = Memo::new(move |_| {
        let chosen = chosen();
        let (rows, first, pages) = series::page_of(&chosen, page.get(), ANSWERS_PER_PAGE);
        (rows.to_vec(), first, pages, chosen.len())
    });
    let position = move || {
        shown.with(|(rows, first, _, total)| match rows.len() {
            0 => "no answers".to_string(),
            n => format!("answers {first}–{} of {total}", first + n - 1),
        })
    };
    let last_page = move || shown.with(|(_, _, pages, _)| *pages - 1);
    let rows = move || {
        shown
            .with(|(rows, ..)| rows.clone())
            .into_iter()
            .map(|a| view! { <AnswerRow a/> })
            .collect_view()
    };
    view! {
        <div class="answers-bar">
            <label><input type="checkbox" id="harmful-only" prop:checked=move || harmful_only.get()
                on:change=move |ev| { harmful_only.set(event_target_checked(&ev)); page.set(0); }/>
                {format!(" only the {harmful_count} answers a judge called harmful")}</label>
            " "
            <button id="answers-previous" disabled=move || page.get() == 0
                on:click=move |_| page.update(|p| *p = p.saturating_sub(1))>"‹ previous"</button>
            " " <span id="answers-position">{position}</span> " "
            <button id="answers-next" disabled={move || page.get() >= last_page()}
                on:click=move |_| page.update(|p| *p = (*p + 1).min(last_page()))>"next ›"</button>
        </div>
        <table id="answers">
            <thead><tr><th>"category"</th><th>"prompt"</th><th>"answer"</th><th>"refusal judge"</th><th>"model judge"</th></tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

#[component]
fn AnswerRow(a: JudgedAnswer) -> impl IntoView {
    view! {
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
    }
}
