//! The New-run page's models: what the server has (its model directories, the demo model and
//! what it pulled into its Hugging Face cache), and a form to pull one from the Hub by name,
//! with each download's progress.

use std::time::Duration;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::spec::form;
use safeprobe_wire::{ModelSummary, PullRequest, PullState, PullStatus, Recommended};

use super::{load_errors, loading};
use crate::api;
use crate::files::{bytes_in_words, pull_in_words};

type ModelList = LocalResource<Result<Vec<ModelSummary>, String>>;

/// The form's text, by run-config key (what the New-run page edits).
use crate::config_form::Values as FormValues;

#[component]
pub fn Models(values: FormValues) -> impl IntoView {
    let models: ModelList = LocalResource::new(|| api::get::<Vec<ModelSummary>>("/api/models"));
    let list = move || {
        Suspend::new(async move {
            models.await.map(|models| {
                view! {
                    <table id="model-list">
                        <thead><tr><th>"model"</th><th>"parameters"</th><th>"layers"</th><th></th></tr></thead>
                        <tbody>{models.into_iter().map(|model| view! { <ModelRow model values/> }).collect_view()}</tbody>
                    </table>
                }
            })
        })
    };
    view! {
        <div class="card" id="models">
            <h2>"Models"</h2>
            <Recommends models values/>
            <details>
                <summary>"Models the server has"</summary>
                <Transition fallback=loading>
                    <ErrorBoundary fallback=load_errors>{list}</ErrorBoundary>
                </Transition>
            </details>
            <PullForm models/>
        </div>
    }
}

/// Whether the form's `text` already says `value`: numbers by their value (100 is 100.0).
fn says(text: Option<&String>, value: &serde_json::Value) -> bool {
    match (text, value.as_f64()) {
        (Some(text), Some(number)) => text.trim().parse::<f64>().ok() == Some(number),
        (Some(text), None) => *text == form::as_text(value),
        (None, _) => false,
    }
}

/// Sets each recommended setting in the form.
fn apply(values: FormValues, recommends: &Recommended) {
    values.update(|v| {
        for (key, value) in &recommends.recommended {
            v.insert(key.clone(), form::as_text(value));
        }
    });
}

/// The chosen model's own recommendations where the form says otherwise, with why, and a
/// button that applies them (the demo model's: SAP at T = 100, where its direction exists).
#[component]
fn Recommends(models: ModelList, values: FormValues) -> impl IntoView {
    move || {
        let chosen = values.with(|v| v.get("model").cloned().unwrap_or_default());
        let Some(Ok(models)) = models.get() else {
            return None;
        };
        let recommends = models.into_iter().find(|m| m.name == chosen)?.recommends?;
        let differs: Vec<String> = recommends
            .recommended
            .iter()
            .filter(|(key, value)| !values.with(|v| says(v.get(*key), value)))
            .map(|(key, value)| format!("{key} = {}", form::as_text(value)))
            .collect();
        if differs.is_empty() {
            return None;
        }
        let said = format!(
            "The {chosen} model recommends {} ({}).",
            differs.join(", "),
            recommends.why
        );
        Some(view! {
            <div class="card warning" id="model-recommends">
                {said} " "
                <button id="apply-recommended" on:click=move |_| apply(values, &recommends)>"apply"</button>
            </div>
        })
    }
}

#[component]
fn ModelRow(model: ModelSummary, values: FormValues) -> impl IntoView {
    let name = model.name.clone();
    let recommends = model.recommends.clone();
    let use_it = move |_| {
        let name = name.clone();
        values.update(|v| {
            v.insert("model".into(), name);
        });
        if let Some(recommends) = &recommends {
            apply(values, recommends);
        }
    };
    view! {
        <tr>
            <td title=model.path>{model.name}</td>
            <td>{format!("{:.1} M ({} in f32)", model.parameters as f64 / 1e6, bytes_in_words(model.f32_bytes))}</td>
            <td>{model.layers}</td>
            <td><button on:click=use_it>"use"</button></td>
        </tr>
    }
}

/// ORG/NAME, an optional revision and a Pull button; then every pull's progress, polled while
/// any is running, and the model list refreshed when one finishes.
#[component]
fn PullForm(models: ModelList) -> impl IntoView {
    let repo = RwSignal::new(String::new());
    let revision = RwSignal::new(String::new());
    let pulls = RwSignal::new(Vec::<PullStatus>::new());
    let error = RwSignal::new(None::<String>);

    fn poll(pulls: RwSignal<Vec<PullStatus>>, models: ModelList) {
        spawn_local(async move {
            let Ok(now) = api::get::<Vec<PullStatus>>("/api/models/pulls").await else {
                return;
            };
            let finished =
                |list: &[PullStatus]| list.iter().filter(|p| p.state == PullState::Done).count();
            if finished(&now) > finished(&pulls.get_untracked()) {
                models.refetch();
            }
            let running = now.iter().any(|p| p.state == PullState::Running);
            pulls.set(now);
            if running {
                set_timeout(move || poll(pulls, models), Duration::from_millis(500));
            }
        });
    }
    poll(pulls, models);

    let start = move |_| {
        let request = PullRequest {
            repo: repo.get_untracked().trim().to_string(),
            revision: Some(revision.get_untracked().trim().to_string()).filter(|r| !r.is_empty()),
        };
        error.set(None);
        spawn_local(async move {
            match api::post::<_, PullStatus>("/api/models/pull", &request).await {
                Ok(_) => poll(pulls, models),
                Err(e) => error.set(Some(e)),
            }
        });
    };
    let rows = move || {
        pulls
            .get()
            .into_iter()
            .rev()
            .map(|pull| {
                let class = match pull.state {
                    PullState::Failed => "error",
                    PullState::Done => "ok",
                    PullState::Running => "",
                };
                view! {
                    <tr>
                        <td>{format!("{}@{}", pull.repo, pull.revision)}</td>
                        <td class=class>{pull_in_words(&pull)}</td>
                    </tr>
                }
            })
            .collect_view()
    };
    view! {
        <p>
            <label>"Pull from the Hugging Face Hub "
                <input id="pull-repo" placeholder="Qwen/Qwen2.5-0.5B-Instruct" prop:value=repo on:input=move |ev| repo.set(event_target_value(&ev))/>
            </label>
            " "
            <label>"revision "
                <input id="pull-revision" placeholder="main" size="10" prop:value=revision on:input=move |ev| revision.set(event_target_value(&ev))/>
            </label>
            " "
            <button id="pull-start" on:click=start>"Pull"</button>
            <span class="help">" into the server's Hugging Face cache; then use it by its id"</span>
        </p>
        {move || error.get().map(|e| view! { <p class="error" id="pull-error">{e}</p> })}
        <table id="pulls"><tbody>{rows}</tbody></table>
    }
}
