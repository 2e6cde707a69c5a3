//! A harmful-score evaluation of a model (and adapter), and the evaluations so far.

use std::path::PathBuf;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{CreateJob, EvalSpec, Job, JobKind, Judge};

use super::{harmful_score, live, model_name, or_dash, with_jobs};
use crate::{Page, api, go};

/// A text field of the form.
#[component]
fn TextField(label: &'static str, help: &'static str, value: RwSignal<String>) -> impl IntoView {
    view! {
        <label>{label}</label><input prop:value=move || value.get() on:input=move |ev| value.set(event_target_value(&ev))/>
        <div class="help">{help}</div>
    }
}

/// None for an empty field, so that the server applies its default.
fn optional_path(text: String) -> Option<PathBuf> {
    let text = text.trim();
    (!text.is_empty()).then(|| PathBuf::from(text))
}

#[component]
pub fn Evaluate() -> impl IntoView {
    let live = live();
    let model = RwSignal::new("demo".to_string());
    let adapter = RwSignal::new(String::new());
    let prompts = RwSignal::new(String::new());
    let judge = RwSignal::new(Judge::default());
    let judge_model = RwSignal::new(String::new());
    let tokens = RwSignal::new("48".to_string());
    let error = RwSignal::new(None::<String>);
    let submit = move |_| {
        let Ok(max_new_tokens) = tokens.get_untracked().trim().parse::<usize>() else {
            error.set(Some("max_new_tokens: expected a whole number".into()));
            return;
        };
        let spec = EvalSpec {
            model: PathBuf::from(model.get_untracked()),
            adapter: optional_path(adapter.get_untracked()),
            prompts: optional_path(prompts.get_untracked()),
            judge: judge.get_untracked(),
            judge_model: optional_path(judge_model.get_untracked()),
            max_new_tokens,
            system: None,
        };
        let request = match serde_json::to_value(&spec) {
            Ok(config) => CreateJob {
                kind: JobKind::Eval,
                config,
            },
            Err(e) => return error.set(Some(e.to_string())),
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
        <div class="card form">
            <TextField label="model" help="\"demo\" or a checkpoint under the model directories" value=model/>
            <TextField label="adapter" help="optional PEFT adapter (e.g. runs/job-3/adapter)" value=adapter/>
            <TextField label="prompt set" help="empty: the built-in 180 held-out prompts; or BeaverTails/AdvBench/JSONL in a data directory" value=prompts/>
            <label>"judge"</label>
            <select prop:value=move || judge.get().name() on:change=move |ev| {
                if let Ok(chosen) = event_target_value(&ev).parse() {
                    judge.set(chosen);
                }
            }>
                {Judge::ALL.into_iter().map(|j| view! { <option value=j.name()>{j.name()}</option> }).collect_view()}
            </select>
            <div class="help">{move || judge.get().describe()}</div>
            <TextField label="judge model" help="a chat checkpoint for the model judge, or a guard checkpoint" value=judge_model/>
            <TextField label="max new tokens" help="answer length" value=tokens/>
        </div>
        {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
        <button class="primary" on:click=submit>"Evaluate"</button>
        <h2>"Evaluations"</h2>
        {with_jobs(|jobs| view! {
            <table>
                <thead><tr><th>"#"</th><th>"model"</th><th>"status"</th><th>"HS (%)"</th></tr></thead>
                <tbody>
                    {jobs.into_iter().filter(|j| j.kind == JobKind::Eval).map(|job| view! {
                        <tr><td><a href=Page::Run(job.id).hash()>{job.id}</a></td><td>{model_name(&job)}</td>
                            <td>{job.status.name()}</td>
                            <td>{or_dash(harmful_score(&job).map(|h| format!("{h:.1}")))}</td></tr>
                    }).collect_view()}
                </tbody>
            </table>
        })}
    }
}
