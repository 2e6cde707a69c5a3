//! The new-run form: every run-config field with its help, presets, inline validation, and the
//! same run as a TOML file for the command line. A run config is a free-form table the server
//! validates, so the form builds it as a JSON object from its fields.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{CreateJob, Job, JobKind, Method};
use serde_json::{Map, Value};

use super::datasets::DataFiles;
use super::live;
use super::models::Models;
use crate::{Page, api, go};

/// A run-config field: dotted key, label, help, and kind.
struct Field {
    key: &'static str,
    label: &'static str,
    help: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Float,
    Int,
    Bool,
    Choice(&'static [&'static str]),
    /// A training method: the choices and their descriptions come from `safeprobe_wire::Method`,
    /// so a new method appears here without being listed.
    Method,
}

// A table: one field a line.
#[rustfmt::skip]
const FIELDS: &[(&str, &[Field])] = &[
    ("Model and data", &[
        Field { key: "model", label: "model", help: "\"demo\", a checkpoint under the server's model directories, or a pulled Hub id (ORG/NAME)", kind: Kind::Text },
        Field { key: "train_data", label: "training data", help: "JSONL/Parquet/Alpaca JSON in a data directory", kind: Kind::Text },
        Field { key: "safety_data", label: "safety pairs", help: "{prompt, chosen, rejected}; needed by every method but sft", kind: Kind::Text },
        Field { key: "validation_data", label: "validation data", help: "optional; or set a validation fraction", kind: Kind::Text },
        Field { key: "validation_fraction", label: "validation fraction", help: "hold out this share of the training data", kind: Kind::Float },
        Field { key: "system", label: "system prompt", help: "prepended to conversations that have none", kind: Kind::Text },
        Field { key: "max_len", label: "max tokens per example", help: "longer examples are truncated", kind: Kind::Int },
    ]),
    ("Method", &[
        Field { key: "method", label: "method", help: "every method but sft needs safety pairs; each one's settings are in its section below", kind: Kind::Method },
        Field { key: "finetune", label: "fine-tune", help: "LoRA adapter or every weight", kind: Kind::Choice(&["lora", "full"]) },
        Field { key: "mix_safety_data", label: "mix safety data", help: "also train on the pairs' safe answers (SafeInstr baseline)", kind: Kind::Bool },
        Field { key: "poison_fraction", label: "poison fraction", help: "share of harmful-compliance examples mixed in (poisoning experiment)", kind: Kind::Float },
    ]),
    ("Optimisation", &[
        Field { key: "max_steps", label: "steps", help: "optimizer steps (or set epochs)", kind: Kind::Int },
        Field { key: "epochs", label: "epochs", help: "passes over the data when steps is empty", kind: Kind::Float },
        Field { key: "batch_size", label: "batch size", help: "examples per micro-batch", kind: Kind::Int },
        Field { key: "grad_accumulation", label: "gradient accumulation", help: "micro-batches per step", kind: Kind::Int },
        Field { key: "lr", label: "learning rate", help: "peak learning rate", kind: Kind::Float },
        Field { key: "lr_schedule", label: "schedule", help: "after warm-up", kind: Kind::Choice(&["constant", "linear", "cosine"]) },
        Field { key: "warmup_steps", label: "warm-up steps", help: "linear warm-up", kind: Kind::Int },
        Field { key: "max_grad_norm", label: "gradient clipping", help: "global norm; empty for none", kind: Kind::Float },
        Field { key: "seed", label: "seed", help: "data order, LoRA init, dropout", kind: Kind::Int },
        Field { key: "eval_every", label: "validate every", help: "steps between validation losses", kind: Kind::Int },
        Field { key: "checkpoint_every", label: "checkpoint every", help: "steps between resumable checkpoints", kind: Kind::Int },
    ]),
    ("LoRA", &[
        Field { key: "lora.r", label: "rank r", help: "adapter rank", kind: Kind::Int },
        Field { key: "lora.alpha", label: "alpha", help: "scale = alpha / r", kind: Kind::Float },
        Field { key: "lora.dropout", label: "dropout", help: "on the adapter input", kind: Kind::Float },
    ]),
    ("Safety-Aware Probing", &[
        Field { key: "safety_batch_size", label: "safety pairs per step", help: "pairs used to find the harmful direction", kind: Kind::Int },
        Field { key: "sap.rho", label: "ρ (perturbation radius)", help: "ε = ρ·‖W‖ along the harmful direction", kind: Kind::Float },
        Field { key: "sap.temperature", label: "T (safety loss temperature)", help: "raise it if ‖ΔW‖ stays 0 (saturated loss)", kind: Kind::Float },
        Field { key: "sap.beta", label: "β (probe step size)", help: "how far the probe climbs L_su per step", kind: Kind::Float },
        Field { key: "sap.refresh_every", label: "refresh every k steps", help: "reuse the harmful direction k steps (k=4 ≈ 2.5× SFT's cost)", kind: Kind::Int },
        Field { key: "sap.schedule", label: "schedule", help: "lagged (official code, 3 passes) or exact (Algorithm 1, 4 passes)", kind: Kind::Choice(&["lagged", "exact"]) },
        Field { key: "sap.cosine_every", label: "gradient cosines every", help: "per-layer cos(∇L_task, ∇L_safety) for the heatmap", kind: Kind::Int },
    ]),
    ("SafeGrad, Lisa and SPPFT", &[
        Field { key: "safegrad.alignment_loss", label: "SafeGrad alignment loss", help: "answers: the safe answers' cross-entropy; kl: KL from the starting model on them", kind: Kind::Choice(&["answers", "kl"]) },
        Field { key: "safegrad.alignment_weight", label: "SafeGrad λ", help: "the alignment gradient's weight in the update", kind: Kind::Float },
        Field { key: "lisa.alignment_steps", label: "Lisa alignment steps", help: "steps of each block on the safe answers", kind: Kind::Int },
        Field { key: "lisa.task_steps", label: "Lisa task steps", help: "steps of each block on the task data", kind: Kind::Int },
        Field { key: "lisa.proximal", label: "Lisa ρ (proximal)", help: "pull towards where the other state left the weights", kind: Kind::Float },
        Field { key: "sppft.count", label: "SPPFT layers frozen", help: "located by the safety gradient; 0: a quarter of the layers", kind: Kind::Int },
        Field { key: "sppft.temperature", label: "SPPFT T", help: "safety loss temperature for locating them", kind: Kind::Float },
    ]),
];

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

/// The first field that does not read as its kind: (key, what was expected).
type FieldError = (&'static str, &'static str);

/// The run config from the form's text: empty fields are left to the server's defaults, and
/// a dotted key ("sap.rho") goes into its table.
fn build_config(values: &BTreeMap<String, String>) -> Result<Map<String, Value>, FieldError> {
    let mut root = Map::new();
    for field in FIELDS.iter().flat_map(|(_, fields)| fields.iter()) {
        let raw = values.get(field.key).map(|s| s.trim()).unwrap_or_default();
        if raw.is_empty() {
            continue;
        }
        let value = match field.kind {
            Kind::Text | Kind::Choice(_) | Kind::Method => Value::String(raw.to_string()),
            Kind::Bool => Value::Bool(raw == "true"),
            Kind::Int => raw
                .parse::<u64>()
                .map(Value::from)
                .map_err(|_| (field.key, "a whole number ≥ 0"))?,
            Kind::Float => raw
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Value::from)
                .ok_or((field.key, "a number"))?,
        };
        match field.key.split_once('.') {
            Some((table, key)) => {
                let table = root
                    .entry(table)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(table) = table {
                    table.insert(key.to_string(), value);
                }
            }
            None => {
                root.insert(field.key.to_string(), value);
            }
        }
    }
    Ok(root)
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

/// One field: its input (text, choice or checkbox), help, and error if it does not read.
#[component]
fn FieldInput(
    field: &'static Field,
    values: RwSignal<BTreeMap<String, String>>,
    config: Memo<Result<Map<String, Value>, FieldError>>,
) -> impl IntoView {
    let key = field.key;
    let get = move || values.with(|v| v.get(key).cloned().unwrap_or_default());
    let set = move |text: String| {
        values.update(|v| {
            v.insert(key.to_string(), text);
        })
    };
    let input = match field.kind {
        Kind::Choice(options) => view! {
            <select name=key prop:value=get on:change=move |ev| set(event_target_value(&ev))>
                {options.iter().map(|o| view! { <option value=*o>{*o}</option> }).collect_view()}
            </select>
        }
        .into_any(),
        Kind::Method => {
            let trainable = Method::ALL.into_iter().filter(|m| *m != Method::Base);
            let described = move || {
                let chosen = get();
                Method::ALL
                    .into_iter()
                    .find(|m| m.name() == chosen)
                    .map(Method::describe)
            };
            view! {
                <select name=key prop:value=get on:change=move |ev| set(event_target_value(&ev))>
                    {trainable.map(|m| view! { <option value=m.name()>{m.name()}</option> }).collect_view()}
                </select>
                <div class="help">{described}</div>
            }
            .into_any()
        }
        Kind::Bool => view! {
            <input type="checkbox" name=key prop:checked=move || get() == "true"
                on:change=move |ev| set(event_target_checked(&ev).to_string())/>
        }
        .into_any(),
        Kind::Text | Kind::Int | Kind::Float => {
            view! { <input name=key prop:value=get on:input=move |ev| set(event_target_value(&ev))/> }.into_any()
        }
    };
    let error = move || match config.get() {
        Err((k, expected)) if k == key => {
            Some(view! { <div class="help error">{format!("{key}: expected {expected}")}</div> })
        }
        _ => None,
    };
    view! {
        <label for=key>{field.label}</label> {input}
        <div class="help">{field.help}</div>
        {error}
    }
}

#[component]
pub fn NewRun() -> impl IntoView {
    let live = live();
    let values = RwSignal::new(preset(Preset::Demo));
    let server_error = RwSignal::new(None::<String>);
    let config = Memo::new(move |_| values.with(build_config));
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
        {FIELDS.iter().map(|(group, fields)| view! {
            <div class="card">
                <h2>{*group}</h2>
                <div class="form">
                    {fields.iter().map(|field| view! { <FieldInput field values config/> }).collect_view()}
                </div>
            </div>
        }).collect_view()}
        {move || server_error.get().map(|e| view! { <p class="error" id="server-error">{e}</p> })}
        <button class="primary" id="start-run" on:click=submit disabled=move || config.get().is_err()>"Start run"</button>
        <h2>"The same run from the command line"</h2>
        <pre id="config-toml">{move || match config.get() {
            Ok(c) => format!("# safeprobe train --config run.toml   (add output_dir = \"runs/name\")\n{}", as_toml(&c)),
            Err((k, expected)) => format!("{k}: expected {expected}"),
        }}</pre>
    }
}
