//! The new-run form: built from the run config's type (`safeprobe_wire::spec::form`), so every
//! field the trainer reads is here with its label, help and default, in the type's order and
//! sections; presets, inline validation, and the same run as a TOML file for the command line.

use std::collections::BTreeMap;

use leptos::prelude::*;
use safeprobe_wire::JobKind;

use super::datasets::DataFiles;
use super::live;
use super::models::Models;
use crate::config_form::{FormSections, RUN_FORM, StartBar, as_toml, start_job};

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

#[component]
pub fn NewRun() -> impl IntoView {
    let live = live();
    let state = RUN_FORM.state(|| preset(Preset::Demo));
    let values = state.values;
    view! {
        <h1>"New run"</h1>
        <div>"Presets: "
            <button id="preset-paper" on:click=move |_| values.set(preset(Preset::Paper))>"paper defaults"</button> " "
            <button id="preset-demo" on:click=move |_| values.set(preset(Preset::Demo))>"demo"</button>
            <span class="help">" (the demo preset fine-tunes the demo model on the built-in word-reversal task; your edits are kept in this browser until you pick a preset)"</span>
        </div>
        <Models values/>
        <DataFiles values/>
        <FormSections state/>
        <StartBar state kind=JobKind::Train label="Start run" id="start-run" on_start=move || start_job(live, JobKind::Train, state)/>
        <h2>"The same run from the command line"</h2>
        <pre id="config-toml">{move || match state.config.get() {
            Ok(c) => format!("# safeprobe train --config run.toml   (add output_dir = \"runs/name\")\n{}", as_toml(&c)),
            Err(e) => e.to_string(),
        }}</pre>
    }
}
