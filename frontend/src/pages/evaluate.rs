//! A harmful-score evaluation of a model (and adapter), its form built from the settings'
//! type (`EvalSpec`), and the evaluations so far.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{CreateJob, Job, JobKind};
use serde_json::Value;

use super::{harmful_score, live, model_name, or_dash, with_jobs};
use crate::config_form::{EVAL_FORM, FormSections};
use crate::{Page, api, go};

#[component]
pub fn Evaluate() -> impl IntoView {
    let live = live();
    let values = RwSignal::new(BTreeMap::from([("model".to_string(), "demo".to_string())]));
    let error = RwSignal::new(None::<String>);
    let loaded = EVAL_FORM.load(error);
    let config = EVAL_FORM.config(loaded, values);
    let submit = move |_| {
        let Ok(config) = config.get_untracked() else {
            return;
        };
        let request = CreateJob {
            kind: JobKind::Eval,
            config: Value::Object(config),
        };
        spawn_local(async move {
            match api::post::<_, Job>("/api/jobs", &request).await {
                Ok(job) => {
                    live.jobs.refetch();
                    go(Page::Run(job.id));
                }
                Err(e) => error.set(Some(e)),
            }
        })
    };
    view! {
        <h1>"Evaluate"</h1>
        <FormSections form=&EVAL_FORM loaded values config/>
        {move || error.get().map(|e| view! { <p class="error" id="eval-error">{e}</p> })}
        <button class="primary" id="start-eval" on:click=submit disabled=move || !loaded.get() || config.get().is_err()>"Evaluate"</button>
        <h2>"Evaluations"</h2>
        {with_jobs(|jobs| view! {
            <table>
                <thead><tr><th>"#"</th><th>"model"</th><th>"status"</th><th>"HS (%)"</th></tr></thead>
                <tbody>
                    {jobs.into_iter().filter(|j| j.kind() == JobKind::Eval).map(|job| view! {
                        <tr><td><a href=Page::Run(job.id).hash()>{job.id}</a></td><td>{model_name(&job)}</td>
                            <td>{job.status.name()}</td>
                            <td>{or_dash(harmful_score(&job).map(|h| format!("{h:.1}")))}</td></tr>
                    }).collect_view()}
                </tbody>
            </table>
        })}
    }
}
