//! The new-run form: built from the run config's type (`safeprobe_wire::spec::form`), so every
//! field the trainer reads is here with its label, help and default, in the type's order and
//! sections; presets, inline validation, and the same run as a TOML file for the command line.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::spec::form::{self, FieldError, FormField, Input};
use safeprobe_wire::{CreateJob, Job, JobKind};
use serde_json::{Map, Value};

use super::datasets::DataFiles;
use super::live;
use super::models::Models;
use crate::{Page, api, go};

/// The run config's form as the server sent it (`GET /api/forms/run`, built from the type
/// there: the schema code stays out of the panel), kept for the page's life once fetched.
static RUN_FORM: OnceLock<Vec<FormField>> = OnceLock::new();

/// The fields a request may set (the server chooses the run folder); empty until fetched.
fn run_fields() -> &'static [FormField] {
    RUN_FORM.get().map(Vec::as_slice).unwrap_or_default()
}

/// The fields grouped by section, sections in the order they first appear.
fn sections() -> Vec<(&'static str, Vec<&'static FormField>)> {
    let mut grouped: Vec<(&'static str, Vec<&'static FormField>)> = Vec::new();
    for field in run_fields().iter().filter(|f| !f.server_sets) {
        match grouped.iter_mut().find(|(name, _)| *name == field.section) {
            Some((_, fields)) => fields.push(field),
            None => grouped.push((field.section.as_str(), vec![field])),
        }
    }
    grouped
}

/// A starting point for the form.
#[derive(Clone, Copy)]
enum Preset {
    /// The paper's hyper-parameters (data to be filled in).
    Paper,
    /// The demo model on the built-in word-reversal task: trains in a minute.
    Demo,
}

/// The form's text for each field of `preset`.
#[rustfmt::skip]
fn preset(preset: Preset) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match preset {
        Preset::Paper => &[
            ("model", "demo"), ("train_data", ""), ("safety_data", ""), ("method", "sap"), ("finetune", "lora"),
            ("max_steps", "500"), ("batch_size", "4"), ("lr", "1e-4"), ("lr_schedule", "constant"),
            ("lora.r", "8"), ("lora.alpha", "16"), ("lora.dropout", "0.05"), ("safety_batch_size", "4"),
            ("sap.rho", "2e-5"), ("sap.temperature", "1"), ("sap.beta", "0.05"), ("sap.refresh_every", "1"), ("sap.schedule", "lagged"),
            ("sap.cosine_every", "10"), ("checkpoint_every", "50"), ("eval_every", "50"),
        ],
        Preset::Demo => &[
            ("model", "demo"), ("train_data", "builtin/reverse-train.jsonl"), ("safety_data", "builtin/safety_pairs.jsonl"),
            ("validation_data", "builtin/reverse-validation.jsonl"), ("method", "sap"), ("finetune", "full"),
            ("max_steps", "120"), ("batch_size", "12"), ("lr", "1e-3"), ("lr_schedule", "constant"), ("max_len", "128"),
            ("safety_batch_size", "8"), ("sap.rho", "0.002"), ("sap.temperature", "100"), ("sap.beta", "0.05"),
            ("sap.refresh_every", "4"), ("sap.schedule", "lagged"), ("sap.cosine_every", "10"), ("checkpoint_every", "20"), ("eval_every", "20"),
        ],
    };
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The config as a TOML run file: top-level keys first, then one section per table.
fn as_toml(config: &Map<String, Value>) -> String {
    let mut top = String::new();
    let mut tables = String::new();
    for (key, value) in config {
        match value {
            Value::Object(table) => {
                tables.push_str(&format!("\n[{key}]\n"));
                for (key, value) in table {
                    tables.push_str(&format!("{key} = {value}\n"));
                }
            }
            _ => top.push_str(&format!("{key} = {value}\n")),
        }
    }
    top + &tables
}

/// One field: its input (text, choice or checkbox) with the default as its placeholder, its
/// help, and its error if its text does not read.
#[component]
fn FieldInput(
    field: &'static FormField,
    values: RwSignal<BTreeMap<String, String>>,
    config: Memo<Result<Map<String, Value>, FieldError>>,
) -> impl IntoView {
    let key = field.key.as_str();
    let get = move || values.with(|v| v.get(key).cloned().unwrap_or_default());
    let set = move |text: String| {
        values.update(|v| {
            v.insert(key.to_string(), text);
        })
    };
    let input = match &field.input {
        Input::Choice(choices) => {
            let chosen = move || {
                let text = get();
                if text.is_empty() {
                    field.default.clone()
                } else {
                    text
                }
            };
            let described = move || {
                let chosen = chosen();
                choices
                    .iter()
                    .find(|(value, _)| *value == chosen)
                    .map(|(_, about)| about.clone())
            };
            view! {
                <select name=key prop:value=chosen on:change=move |ev| set(event_target_value(&ev))>
                    {choices.iter().map(|(value, _)| view! { <option value=value.clone()>{value.clone()}</option> }).collect_view()}
                </select>
                <div class="help">{described}</div>
            }
            .into_any()
        }
        Input::Bool => {
            let checked = move || match get().as_str() {
                "" => field.default == "true",
                text => text == "true",
            };
            view! {
                <input type="checkbox" name=key prop:checked=checked
                    on:change=move |ev| set(event_target_checked(&ev).to_string())/>
            }
            .into_any()
        }
        Input::Text | Input::Int | Input::Float | Input::Ints | Input::Words => view! {
            <input name=key placeholder=field.default.clone() prop:value=get
                on:input=move |ev| set(event_target_value(&ev))/>
        }
        .into_any(),
    };
    let error = move || match config.get() {
        Err(e) if e.key == key => Some(view! {
            <div class="help error">{format!("{}: expected {}", field.label, e.expected)}</div>
        }),
        _ => None,
    };
    let label = if field.required {
        format!("{} *", field.label)
    } else {
        field.label.clone()
    };
    view! {
        <label for=key title=key>{label}</label> {input}
        <div class="help">{field.help.clone()}</div>
        {error}
    }
}

#[component]
pub fn NewRun() -> impl IntoView {
    let live = live();
    let values = RwSignal::new(preset(Preset::Demo));
    let server_error = RwSignal::new(None::<String>);
    let loaded = RwSignal::new(RUN_FORM.get().is_some());
    if !loaded.get_untracked() {
        spawn_local(async move {
            match api::get::<Vec<FormField>>("/api/forms/run").await {
                Ok(fields) => {
                    let _ = RUN_FORM.set(fields);
                    loaded.set(true);
                }
                Err(e) => server_error.set(Some(format!("the form could not be loaded: {e}"))),
            }
        });
    }
    let config = Memo::new(move |_| {
        // The fields arrive once; the config is rebuilt from them when they do.
        loaded.get();
        values.with(|v| form::config_from_text(run_fields(), v))
    });
    let submit = move |_| {
        let Ok(config) = config.get_untracked() else {
            return;
        };
        let request = CreateJob {
            kind: JobKind::Train,
            config: Value::Object(config),
        };
        spawn_local(async move {
            match api::post::<_, Job>("/api/jobs", &request).await {
                Ok(job) => {
                    live.jobs.refetch();
                    go(Page::Run(job.id));
                }
                Err(e) => server_error.set(Some(e)),
            }
        })
    };
    view! {
        <h1>"New run"</h1>
        <div>"Presets: "
            <button on:click=move |_| values.set(preset(Preset::Paper))>"paper defaults"</button> " "
            <button id="preset-demo" on:click=move |_| values.set(preset(Preset::Demo))>"demo"</button>
            <span class="help">" (the demo preset fine-tunes the demo model on the built-in word-reversal task)"</span>
        </div>
        <Models values/>
        <DataFiles values/>
        {move || loaded.get().then(|| sections().into_iter().map(|(section, fields)| view! {
            <div class="card">
                <h2>{section}</h2>
                <div class="form">
                    {fields.into_iter().map(|field| view! { <FieldInput field values config/> }).collect_view()}
                </div>
            </div>
        }).collect_view())}
        {move || server_error.get().map(|e| view! { <p class="error" id="server-error">{e}</p> })}
        <button class="primary" id="start-run" on:click=submit disabled=move || !loaded.get() || config.get().is_err()>"Start run"</button>
        <h2>"The same run from the command line"</h2>
        <pre id="config-toml">{move || match config.get() {
            Ok(c) => format!("# safeprobe train --config run.toml   (add output_dir = \"runs/name\")\n{}", as_toml(&c)),
            Err(e) => e.to_string(),
        }}</pre>
    }
}
