//! The New-run page's data files: upload one from this computer, see what it holds and how its
//! first examples read through the model's chat template before training on it, and put any
//! listed file into the form.

use leptos::html;
use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{DatasetEntry, Preview, Uploaded};

use super::{load_errors, loading};
use crate::api;
use crate::files::{bytes_in_words, field_for, holds_in_words, preview_url};

type Datasets = LocalResource<Result<Vec<DatasetEntry>, String>>;

/// The form's text, by run-config key (what the New-run page edits).
use crate::config_form::Values as FormValues;

#[component]
pub fn DataFiles(values: FormValues) -> impl IntoView {
    let datasets: Datasets = LocalResource::new(|| api::get::<Vec<DatasetEntry>>("/api/datasets"));
    let previewed = RwSignal::new(None::<String>);
    let list = move || {
        Suspend::new(async move {
            datasets.await.map(|entries| {
                view! {
                    <table id="dataset-list">
                        <thead><tr><th>"file"</th><th>"size"</th><th></th></tr></thead>
                        <tbody>
                            {entries.into_iter().map(|entry| view! { <DatasetRow entry values previewed/> }).collect_view()}
                        </tbody>
                    </table>
                }
            })
        })
    };
    view! {
        <div class="card" id="datasets">
            <h2>"Data files"</h2>
            <UploadForm datasets previewed values/>
            <details>
                <summary>"Files the server has"</summary>
                <Transition fallback=loading>
                    <ErrorBoundary fallback=load_errors>{list}</ErrorBoundary>
                </Transition>
            </details>
            <DatasetPreview previewed values/>
        </div>
    }
}

/// Puts `name` into the form's `field`.
fn use_as(values: FormValues, field: &'static str, name: &str) {
    let name = name.to_string();
    values.update(|v| {
        v.insert(field.to_string(), name);
    });
}

#[component]
fn DatasetRow(
    entry: DatasetEntry,
    values: FormValues,
    previewed: RwSignal<Option<String>>,
) -> impl IntoView {
    let name = entry.name.clone();
    let (train, pairs, shown) = (name.clone(), name.clone(), name.clone());
    view! {
        <tr>
            <td>{entry.name}</td>
            <td>{bytes_in_words(entry.bytes)}</td>
            <td>
                <button on:click=move |_| use_as(values, "train_data", &train)>"train on it"</button> " "
                <button on:click=move |_| use_as(values, "safety_data", &pairs)>"as safety pairs"</button> " "
                <button on:click=move |_| previewed.set(Some(shown.clone()))>"preview"</button>
            </td>
        </tr>
    }
}

/// A file input, a replace checkbox and an Upload button; then what the server made of the
/// file, or why it refused it.
#[component]
fn UploadForm(
    datasets: Datasets,
    previewed: RwSignal<Option<String>>,
    values: FormValues,
) -> impl IntoView {
    let input = NodeRef::<html::Input>::new();
    let replace = RwSignal::new(false);
    let sending = RwSignal::new(false);
    let outcome = RwSignal::new(None::<Result<Uploaded, String>>);
    let send = move |_| {
        let file = input
            .get_untracked()
            .and_then(|i| i.files())
            .and_then(|files| files.get(0));
        let Some(file) = file else {
            outcome.set(Some(Err("choose a file first".into())));
            return;
        };
        let replace = replace.get_untracked();
        sending.set(true);
        spawn_local(async move {
            let result = api::upload(&file, replace).await;
            if let Ok(uploaded) = &result {
                datasets.refetch();
                // Only training examples have a preview (the server renders them as chats).
                if uploaded.holds == "examples" {
                    previewed.set(Some(uploaded.name.clone()));
                }
            }
            outcome.set(Some(result));
            sending.set(false);
        });
    };
    let result = move || {
        outcome.get().map(|result| match result {
            Ok(uploaded) => {
                let summary = format!(
                    "Stored {}: {}, {}.",
                    uploaded.name,
                    holds_in_words(&uploaded.holds, uploaded.records),
                    bytes_in_words(uploaded.bytes)
                );
                let field = field_for(&uploaded.holds);
                let name = uploaded.name;
                view! {
                    <p class="ok" id="upload-result">{summary} " "
                        {field.map(|field| view! {
                            <button id="upload-use" on:click=move |_| use_as(values, field, &name)>{format!("use as {field}")}</button>
                        })}
                    </p>
                }
                .into_any()
            }
            Err(error) => view! { <p class="error" id="upload-error">{error}</p> }.into_any(),
        })
    };
    view! {
        <div>
            <input type="file" id="upload-file" accept=".jsonl,.json,.parquet,.csv" node_ref=input/> " "
            <label><input type="checkbox" id="upload-replace" prop:checked=replace
                on:change=move |ev| replace.set(event_target_checked(&ev))/>" replace a file of the same name"</label> " "
            <button id="upload-send" on:click=send disabled=sending>
                {move || if sending.get() { "uploading…" } else { "Upload" }}
            </button>
            <div class="help">"JSONL, JSON, Parquet or CSV: training examples, safety pairs {prompt, chosen, rejected} or harmful prompts. Stored under uploads/."</div>
            {result}
        </div>
    }
}

/// The previewed file's first examples as the model will see them.
#[component]
fn DatasetPreview(previewed: RwSignal<Option<String>>, values: FormValues) -> impl IntoView {
    // Only the model matters here: the preview is not read again on every keystroke elsewhere.
    let model = Memo::new(move |_| values.with(|v| v.get("model").cloned().unwrap_or_default()));
    let preview = LocalResource::new(move || {
        let path = previewed.get();
        let model = model.get();
        async move {
            let Some(path) = path else {
                return Ok(None);
            };
            let preview: Preview = api::get(preview_url(&path, &model, 3)).await?;
            Ok::<_, String>(Some((path, preview)))
        }
    });
    let shown = move || {
        Suspend::new(async move {
            preview.await.map(|preview| {
                preview.map(|(path, preview)| {
                    let heading = format!(
                        "{path}: the first {} of {} examples through the chat template",
                        preview.rows.len(),
                        preview.examples
                    );
                    view! {
                        <div id="dataset-preview">
                            <h3>{heading}</h3>
                            {preview.rows.into_iter().map(|row| view! {
                                <div class="help">{format!("{} prompt tokens, {} response tokens (trained on)", row.prompt_tokens, row.response_tokens)}</div>
                                <pre class="preview-row">{row.rendered}</pre>
                            }).collect_view()}
                        </div>
                    }
                })
            })
        })
    };
    view! {
        <Transition fallback=loading>
            <ErrorBoundary fallback=load_errors>{shown}</ErrorBoundary>
        </Transition>
    }
}
