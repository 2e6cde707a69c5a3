//! The first screen: the demo comparison on offer, and every job with its progress and scores.

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{Event, Job, JobProgress, Status};

use super::{
    JobActions, harmful_score, live, method_of, model_name, or_dash, start_demo_comparison,
    with_jobs,
};
use crate::{Page, series};

#[component]
pub fn Runs() -> impl IntoView {
    let live = live();
    view! {
        <div class="card hero">
            <h1>"See what fine-tuning does to safety"</h1>
            <p>"The demo comparison fine-tunes the embedded demo model on a benign task three ways — plain SFT, \
                Safety-Aware Probing (SAP) and safety-data mixing — from the same start on the same data, \
                once on the benign data and once with a tenth of it poisoned by harmful compliances (the paper's two threat models), \
                then measures each one's harmful score (HS: % of held-out harmful prompts answered instead of refused) and task accuracy."</p>
            <button class="primary" id="start-demo" on:click=move |_| spawn_local(start_demo_comparison(live))>"Run the demo comparison"</button>
        </div>
        <h2>"Runs"</h2>
        {with_jobs(|jobs| view! {
            <table id="jobs">
                <thead><tr><th>"#"</th><th>"kind / method"</th><th>"model"</th><th>"status"</th><th>"progress"</th><th>"HS (%)"</th><th>"validation loss"</th><th></th></tr></thead>
                <tbody>{jobs.into_iter().map(|job| view! { <JobRow job/> }).collect_view()}</tbody>
            </table>
        })}
    }
}

#[component]
fn JobRow(job: Job) -> impl IntoView {
    let (id, status, started_at, snapshot) =
        (job.id, job.status, job.started_at, job.progress.clone());
    let validation = match &job.last_validation {
        Some(Event::Validation { loss, .. }) => Some(format!("{loss:.3}")),
        _ => None,
    };
    let hs = harmful_score(&job).map(|h| format!("{h:.1}"));
    let (method, model) = (method_of(&job), model_name(&job));
    let status_name = job.status.name();
    view! {
        <tr data-job=job.id>
            <td><a href=Page::Run(job.id).hash()>{job.id}</a>
                {(!job.name.is_empty()).then(|| view! { <div class="job-name">{job.name.clone()}</div> })}</td>
            <td>{method}</td>
            <td>{model}</td>
            <td><span class=format!("status {status_name}")>{status_name}</span>
                // The list shows the reason's first line; the run's page shows all of it (a
                // failed process adds the end of its log).
                {job.error.map(|e| {
                    let first = e.lines().next().unwrap_or_default().to_string();
                    view! { <div class="error" title=e>{first}</div> }
                })}</td>
            <td class="job-progress"><ProgressCell id status started_at snapshot/></td>
            <td>{or_dash(hs)}</td>
            <td>{or_dash(validation)}</td>
            <td><JobActions id=job.id status=job.status/></td>
        </tr>
    }
}

/// How far the whole job is, from the list's snapshot carried on by the live stream: each
/// message is folded in once (the memo remembers how many it has read).
#[component]
fn ProgressCell(
    id: i64,
    status: Status,
    started_at: Option<f64>,
    snapshot: JobProgress,
) -> impl IntoView {
    let live = live();
    let progress = Memo::new(move |previous: Option<&(JobProgress, usize)>| {
        let (mut progress, read) = previous.cloned().unwrap_or((snapshot.clone(), 0));
        live.events.with(|messages| {
            series::advance_live(&mut progress, &messages[read.min(messages.len())..], id);
            (progress, messages.len())
        })
    });
    move || {
        progress.with(|(p, _)| {
            let Some(summary) = p.summary() else {
                return "—".to_string();
            };
            match (status == Status::Running)
                .then(|| p.eta_s(started_at))
                .flatten()
            {
                Some(eta) => format!("{summary} · {} left", series::duration(eta)),
                None => summary,
            }
        })
    }
}
