//! A harmful-score evaluation of a model (and adapter), its form built from the settings'
//! type (`EvalSpec`), and the evaluations so far.

use std::collections::BTreeMap;

use leptos::prelude::*;
use safeprobe_wire::JobKind;

use super::{harmful_score, live, model_name, or_dash, with_jobs};
use crate::Page;
use crate::config_form::{EVAL_FORM, FormSections, StartBar, start_job};

#[component]
pub fn Evaluate() -> impl IntoView {
    let live = live();
    let state = EVAL_FORM.state(|| BTreeMap::from([("model".to_string(), "demo".to_string())]));
    view! {
        <h1>"Evaluate"</h1>
        <FormSections state/>
        <StartBar state kind=JobKind::Eval label="Evaluate" id="start-eval" on_start=move || start_job(live, JobKind::Eval, state)/>
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
