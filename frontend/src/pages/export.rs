//! A finished training run's way out of the server: its LoRA adapter as a zip, or the run
//! merged into a full Hugging Face checkpoint, with the command line that does the same.

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{ExportRequest, Exported};

use crate::api;
use crate::files::{EXPORT_DTYPES, adapter_file_name, bytes_in_words};

#[component]
pub fn ExportCard(id: i64, lora: bool) -> impl IntoView {
    view! {
        <div class="card" id="export">
            <h2>"Take the model out"</h2>
            {lora.then(|| view! { <DownloadAdapter id/> })}
            <ExportMerged id lora/>
        </div>
    }
}

#[component]
fn DownloadAdapter(id: i64) -> impl IntoView {
    let outcome = RwSignal::new(None::<Result<u64, String>>);
    let download = move |_| {
        spawn_local(async move {
            let name = adapter_file_name(id);
            let result = api::download(&format!("/api/jobs/{id}/adapter.zip"), &name).await;
            outcome.set(Some(result));
        })
    };
    let said = move || {
        outcome.get().map(|result| match result {
            Ok(bytes) => {
                view! { <span class="ok" id="download-result">{format!(" saved {} ({})", adapter_file_name(id), bytes_in_words(bytes))}</span> }.into_any()
            }
            Err(error) => view! { <span class="error" id="download-result">{format!(" {error}")}</span> }.into_any(),
        })
    };
    view! {
        <div>
            <button id="download-adapter" on:click=download>"Download adapter (zip)"</button>
            <span class="help">" the PEFT adapter folder: adapter_config.json and adapter_model.safetensors"</span>
            {said}
        </div>
    }
}

#[component]
fn ExportMerged(id: i64, lora: bool) -> impl IntoView {
    let dtype = RwSignal::new(EXPORT_DTYPES[0].to_string());
    let exporting = RwSignal::new(false);
    let outcome = RwSignal::new(None::<Result<Exported, String>>);
    let export = move |_| {
        let request = ExportRequest {
            dtype: dtype.get_untracked(),
        };
        exporting.set(true);
        spawn_local(async move {
            let result = api::post(format!("/api/jobs/{id}/export"), &request).await;
            outcome.set(Some(result));
            exporting.set(false);
        })
    };
    let what = if lora {
        " the base model with the adapter merged in, as a Hugging Face checkpoint"
    } else {
        " the fine-tuned model as a Hugging Face checkpoint"
    };
    let said = move || {
        outcome.get().map(|result| match result {
            Ok(exported) => {
                let dtype = dtype.get_untracked();
                view! { <ExportedCheckpoint id dtype exported/> }.into_any()
            }
            Err(error) => view! { <p class="error" id="export-error">{error}</p> }.into_any(),
        })
    };
    view! {
        <div>
            <select id="export-dtype" prop:value=move || dtype.get() on:change=move |ev| dtype.set(event_target_value(&ev))>
                {EXPORT_DTYPES.iter().map(|d| view! { <option value=*d>{*d}</option> }).collect_view()}
            </select> " "
            <button id="export-merged" on:click=export disabled=exporting>
                {move || if exporting.get() { "exporting…" } else { "Export merged checkpoint" }}
            </button>
            <span class="help">{what}</span>
            {said}
        </div>
    }
}

/// Where the checkpoint went, and the command that writes it again, with a Copy button; and
/// the checkpoint itself as a download (a tar archive the server streams from disk).
#[component]
fn ExportedCheckpoint(id: i64, dtype: String, exported: Exported) -> impl IntoView {
    let outcome = RwSignal::new(None::<Result<u64, String>>);
    let name = format!("job-{id}-merged-{dtype}.tar");
    let download = {
        let name = name.clone();
        move |_| {
            let (path, name) = (
                format!("/api/jobs/{id}/merged.tar?dtype={dtype}"),
                name.clone(),
            );
            spawn_local(async move { outcome.set(Some(api::download(&path, &name).await)) })
        }
    };
    let said = move || {
        outcome.get().map(|result| match result {
            Ok(bytes) => view! { <span class="ok" id="download-merged-result">{format!(" saved {name} ({})", bytes_in_words(bytes))}</span> }.into_any(),
            Err(error) => view! { <span class="error" id="download-merged-result">{format!(" {error}")}</span> }.into_any(),
        })
    };
    let command = exported.command.clone();
    let copy = move |_| {
        if let Some(window) = web_sys::window() {
            let _ = window.navigator().clipboard().write_text(&command);
        }
    };
    view! {
        <p class="ok" id="export-path">"Written to " <code>{exported.path}</code></p>
        <div class="help">"The same from the command line:"</div>
        <pre><code id="export-command">{exported.command}</code></pre>
        <button id="export-copy" on:click=copy>"Copy command"</button> " "
        <button id="download-merged" on:click=download>"Download checkpoint (tar)"</button>
        <span class="help">" the browser holds it whole before saving it: for a model of many gigabytes, copy the folder from the server instead"</span>
        {said}
    }
}
