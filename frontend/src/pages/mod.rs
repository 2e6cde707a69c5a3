//! The pages, one per file, and what several of them show: a job's actions, a comparison's
//! table, a job's model and method, and how a failed load reads.

pub mod chat;
pub mod compare;
pub mod datasets;
pub mod device;
pub mod evaluate;
pub mod export;
pub mod models;
pub mod new_run;
pub mod run_detail;
pub mod runs;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{Comparison, Condition, CreateJob, Job, JobKind, JobSpec, Spread, Status};

use crate::{Live, Page, api, go};

fn live() -> Live {
    expect_context::<Live>()
}

fn alert(message: &str) {
    if let Some(w) = web_sys::window() {
        let _ = w.alert_with_message(message);
    }
}

/// "—" for a value not there yet.
fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "—".into())
}

/// The model's short name: the demo model's folder reads "demo", others their last component.
fn model_name(job: &Job) -> String {
    let model = job
        .spec
        .model()
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "demo".into());
    let name = model.rsplit('/').next().unwrap_or(&model);
    // The server unpacks the demo model into `demo-model-<hash of its files>`.
    if name.starts_with("demo-model") {
        return "demo".into();
    }
    name.to_string()
}

/// A training run's method ("sap", "sft+mix"), or the job's kind.
fn method_of(job: &Job) -> String {
    match &job.spec {
        JobSpec::Train(train) => {
            let method = train.config.method.name().to_string();
            if train.config.mix_safety_data {
                method + "+mix"
            } else {
                method
            }
        }
        spec => spec.kind().name().to_string(),
    }
}

fn harmful_score(job: &Job) -> Option<f64> {
    job.result.as_ref()?.harmful_score()
}

/// Starts the demo comparison and opens it. (Contexts are not reachable from async tasks:
/// callers pass the shared state in.)
async fn start_demo_comparison(live: Live) {
    let request = CreateJob {
        kind: JobKind::Compare,
        config: serde_json::Value::Object(Default::default()),
    };
    match api::post::<_, Job>("/api/jobs", &request).await {
        Ok(job) => {
            live.jobs.refetch();
            go(Page::Run(job.id));
        }
        Err(e) => alert(&e),
    }
}

/// Cancel, Resume and Delete, as the job's status allows.
#[component]
fn JobActions(id: i64, status: Status) -> impl IntoView {
    let live = live();
    let act = move |verb: &'static str| {
        spawn_local(async move {
            let path = format!("/api/jobs/{id}");
            // Cancel and resume answer with the job, delete with its id; only failure matters
            // here, since the job list is read again either way.
            let result = match verb {
                "delete" => api::delete::<safeprobe_wire::Deleted>(path).await.map(drop),
                _ => api::post::<_, Job>(format!("{path}/{verb}"), &serde_json::Map::new())
                    .await
                    .map(drop),
            };
            if let Err(e) = result {
                alert(&e);
            }
            live.jobs.refetch();
        })
    };
    let active = status.is_active();
    view! {
        <span>
            {active.then(|| view! { <button class="cancel" on:click=move |_| act("cancel")>"Cancel"</button> })}
            {status.is_resumable().then(|| view! { <button class="resume" on:click=move |_| act("resume")>"Resume"</button> })}
            {(!active).then(|| view! { <button class="delete" on:click=move |_| act("delete")>"Delete"</button> })}
        </span>
    }
}

/// "mean ± std" over seeds, or the mean alone for one seed.
fn spread(value: &Spread, digits: usize) -> String {
    if value.std > 0.0 {
        format!("{:.digits$} ± {:.digits$}", value.mean, value.std)
    } else {
        format!("{:.digits$}", value.mean)
    }
}

/// Each condition's table (under its name when there are several), one row per method, then
/// the paired differences and what the numbers show.
#[component]
fn ComparisonTable(comparison: Comparison) -> impl IntoView {
    let several = comparison.conditions.len() > 1;
    comparison
        .conditions
        .into_iter()
        .map(|condition| {
            // Named when there are several, or when the one there is is not plain benign data.
            let named = several || condition.poison_fraction > 0.0;
            view! {
                <div class="condition">
                    {named.then(|| view! { <h3>{condition.name()}</h3> })}
                    <ConditionTable condition/>
                </div>
            }
        })
        .collect_view()
}

#[component]
fn ConditionTable(condition: Condition) -> impl IntoView {
    view! {
        <table class="comparison">
            <thead><tr><th>"method"</th><th>"HS (%) ↓"</th><th>"task exact match (%)"</th><th>"validation loss"</th><th>"held-out log p(refusal)/token ↑"</th><th>"time/step (s)"</th><th>"overhead vs SFT"</th><th>"mechanism"</th></tr></thead>
            <tbody>
                {condition.rows.into_iter().map(|row| view! {
                    <tr>
                        <td>{row.method.name()}</td>
                        <td>{spread(&row.harmful_score, 1)}</td>
                        <td>{spread(&row.exact_match, 1)}</td>
                        <td>{spread(&row.validation_loss, 3)}</td>
                        <td>{or_dash(row.refusal_logprob.map(|s| spread(&s, 3)))}</td>
                        <td>{or_dash(row.step_time_s.map(|s| spread(&s, 3)))}</td>
                        <td>{or_dash(row.overhead_vs_sft.map(|o| format!("{o:.2}×")))}</td>
                        <td>{or_dash(row.mechanism.as_ref().map(|(what, s)| format!("{what}: {}", spread(s, 2))))}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
        {(!condition.paired.is_empty()).then(|| view! {
            <table class="paired">
                <thead><tr><th>"paired difference (by seed)"</th><th>"mean"</th><th>"95% CI (bootstrap)"</th><th>"95% CI (t)"</th><th>"seeds"</th><th>"real?"</th></tr></thead>
                <tbody>
                    {condition.paired.iter().map(|d| view! {
                        <tr>
                            <td>{format!("{} − {} {}", d.a.name(), d.b.name(), d.metric_label())}</td>
                            <td>{format!("{:+.2}", d.mean)}</td>
                            <td>{or_dash(d.ci.map(|(low, high)| format!("[{low:+.2}, {high:+.2}]")))}</td>
                            <td>{or_dash(d.t_ci.map(|(low, high)| format!("[{low:+.2}, {high:+.2}]")))}</td>
                            <td>{d.pairs}</td>
                            <td>{d.verdict()}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
        })}
        <ul>{condition.findings.into_iter().map(|f| view! { <li>{f}</li> }).collect_view()}</ul>
    }
}

/// What an `ErrorBoundary` shows when a load fails.
fn load_errors(errors: ArcRwSignal<Errors>) -> impl IntoView {
    let messages = move || {
        errors.with(|errors| {
            errors
                .iter()
                .map(|(_, e)| view! { <p class="error">{e.to_string()}</p> })
                .collect_view()
        })
    };
    view! { <div class="load-errors">{messages}</div> }
}

fn loading() -> impl IntoView {
    view! { <p class="help">"loading…"</p> }
}

/// The job list through `render`: "loading…" until it first arrives, the previous list while
/// it is read again, and the error if reading it fails.
fn with_jobs<V>(render: impl Fn(Vec<Job>) -> V + Clone + Send + Sync + 'static) -> impl IntoView
where
    V: IntoView + Send + 'static,
{
    let jobs = live().jobs;
    view! {
        <Transition fallback=loading>
            <ErrorBoundary fallback=load_errors>
                {move || {
                    let render = render.clone();
                    Suspend::new(async move { jobs.await.map(render) })
                }}
            </ErrorBoundary>
        </Transition>
    }
}
