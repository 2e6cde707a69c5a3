//! Finished comparisons' tables, and the task loss of training runs picked side by side.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{Event, Job, JobKind, JobResult};

use super::{
    ComparisonTable, harmful_score, live, load_errors, method_of, or_dash, start_demo_comparison,
    with_jobs,
};
use crate::charts::line_chart;
use crate::config_form::{COMPARE_FORM, FormSections, StartBar, start_job};
use crate::files::trains_lora;
use crate::series::{COLORS, Metric, Series};
use crate::{Page, api};

#[component]
pub fn Compare() -> impl IntoView {
    let live = live();
    let picked = RwSignal::new(Vec::<i64>::new());
    view! {
        <h1>"Compare"</h1>
        <div class="card hero">
            <button class="primary" on:click=move |_| spawn_local(start_demo_comparison(live))>"Run the demo comparison"</button>
            <span class="help">" base model, SFT, SAP and safety mixing on the demo model, on benign data and on 10%-poisoned data (three seeds each, about 10 minutes on two cores); the tables appear when it finishes"</span>
        </div>
        <NewComparison/>
        {with_jobs(|jobs| {
            jobs.into_iter()
                .filter_map(|job| match job.result {
                    Some(JobResult::Compare(comparison)) => Some((job.id, comparison)),
                    _ => None,
                })
                .map(|(id, comparison)| view! {
                    <div class="card">
                        <h2><a href=Page::Run(id).hash()>{format!("Comparison #{id}")}</a>{format!(" — task {}", comparison.task)}</h2>
                        <ComparisonTable comparison/>
                    </div>
                })
                .collect_view()
        })}
        <h2>"Training runs side by side"</h2>
        <p class="help">"Pick runs to overlay their task loss. The cosine columns are the newest measurement: > 0 means the task step also lowers the safety loss."</p>
        {with_jobs(move |jobs| view! {
            <table id="runs-side-by-side">
                <thead><tr><th></th><th>"#"</th><th>"method"</th><th>"fine-tune"</th><th>"status"</th><th>"HS (%)"</th><th>"final task loss"</th><th>"validation loss"</th><th>"time/step (s)"</th><th>"cos(∇L_task, ĝ) at V = 0 / probe / random"</th></tr></thead>
                <tbody>
                    {jobs.into_iter().filter(|j| j.kind() == JobKind::Train).map(|job| view! { <PickRow job picked/> }).collect_view()}
                </tbody>
            </table>
        })}
        <PickedTaskLoss picked/>
    }
}

/// A comparison with the user's settings: the demo comparison's, changed where the form says.
#[component]
fn NewComparison() -> impl IntoView {
    let live = live();
    let state = COMPARE_FORM.state(BTreeMap::new);
    view! {
        <details class="card" id="new-comparison">
            <summary>"A comparison of your own: methods, seeds, poisoning, task, judge and trainer settings (empty fields keep the demo comparison's values)"</summary>
            <FormSections state except="train."/>
            <details>
                <summary>"Trainer settings of every run"</summary>
                <FormSections state prefix="train."/>
            </details>
            <StartBar state label="Start comparison" id="start-comparison" on_start=move || start_job(live, JobKind::Compare, state)/>
        </details>
    }
}

#[component]
fn PickRow(job: Job, picked: RwSignal<Vec<i64>>) -> impl IntoView {
    let id = job.id;
    let last = job.last_step.as_ref();
    let task_loss = last
        .and_then(|e| Metric::TaskLoss.point(e))
        .map(|(_, l)| format!("{l:.4}"));
    let step_time = last
        .and_then(|e| Metric::StepTime.point(e))
        .map(|(_, t)| format!("{t:.3}"));
    let validation = job
        .last_validation
        .as_ref()
        .and_then(|e| Metric::ValidationLoss.point(e))
        .map(|(_, l)| format!("{l:.4}"));
    let alignment = job.last_alignment.as_ref().map(|a| {
        let show = |c: Option<f64>| c.map_or("—".to_string(), |c| format!("{c:+.3}"));
        format!(
            "{} / {} / {}",
            show(Some(a.at_zero)),
            show(a.at_probe),
            show(a.at_random)
        )
    });
    view! {
        <tr>
            <td><input type="checkbox" prop:checked=move || picked.get().contains(&id)
                on:change=move |ev| picked.update(|p| if event_target_checked(&ev) { p.push(id) } else { p.retain(|x| *x != id) })/></td>
            <td><a href=Page::Run(id).hash()>{id}</a></td>
            <td>{method_of(&job)}</td>
            // Runs of one method differ most by what they trained: an adapter or every weight.
            <td>{if trains_lora(&job) { "LoRA" } else { "full" }}</td>
            <td>{job.status.name()}</td>
            <td>{or_dash(harmful_score(&job).map(|h| format!("{h:.1}")))}</td>
            <td>{or_dash(task_loss)}</td>
            <td>{or_dash(validation)}</td>
            <td>{or_dash(step_time)}</td>
            <td>{or_dash(alignment)}</td>
        </tr>
    }
}

/// One task-loss line per picked run, read again whenever the pick changes.
#[component]
fn PickedTaskLoss(picked: RwSignal<Vec<i64>>) -> impl IntoView {
    let hidden = RwSignal::new(Default::default());
    let curves = LocalResource::new(move || {
        let ids = picked.get();
        async move {
            let mut curves = Vec::new();
            for (i, id) in ids.into_iter().enumerate() {
                let events: Vec<Event> = api::all_events(id)
                    .await?
                    .into_iter()
                    .map(|e| e.body)
                    .collect();
                curves.push(Series {
                    name: format!("#{id}"),
                    color: COLORS[i % COLORS.len()],
                    points: Metric::TaskLoss.points(&events),
                    ..Series::default()
                });
            }
            Ok::<_, String>(curves)
        }
    });
    let chart = move || {
        Suspend::new(async move {
            curves.await.map(|curves| {
                line_chart(
                    "Task loss of the picked runs".into(),
                    "step",
                    "nats/token",
                    curves,
                    hidden,
                )
            })
        })
    };
    view! {
        <Transition>
            <ErrorBoundary fallback=load_errors><div>{chart}</div></ErrorBoundary>
        </Transition>
    }
}
