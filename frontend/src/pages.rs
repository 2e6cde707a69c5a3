//! The pages.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_json::{Value, json};

use crate::charts::{COLORS, Series, heatmap, line_chart};
use crate::{Live, LiveEvent, Page, api, go, refresh_jobs};

fn live() -> Live {
    expect_context::<Live>()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn short_path(v: &Value) -> String {
    let s = v.as_str().unwrap_or("demo");
    let name = s.rsplit('/').next().unwrap_or(s);
    // The server unpacks the demo model into `demo-model-<hash of its files>`.
    if name.starts_with("demo-model") {
        return "demo".into();
    }
    name.to_string()
}

fn method_of(job: &Value) -> String {
    match job["kind"].as_str() {
        Some("train") => job["spec"]["method"].as_str().unwrap_or("sap").to_string()
            + if job["spec"]["mix_safety_data"] == true { "+mix" } else { "" },
        Some(kind) => kind.to_string(),
        None => String::new(),
    }
}

/// Starts the demo comparison and opens it. (Contexts are not reachable from async tasks:
/// callers pass the shared state in.)
async fn start_demo_comparison(live: Live) {
    match api::post("/api/jobs", &json!({"kind": "compare", "config": {}})).await {
        Ok(job) => {
            refresh_jobs(live).await;
            if let Some(id) = job["id"].as_i64() {
                go(Page::Run(id));
            }
        }
        Err(e) => {
            let _ = web_sys::window().map(|w| w.alert_with_message(&e));
        }
    }
}

fn job_actions(job: &Value) -> impl IntoView + use<> {
    let id = job["id"].as_i64().unwrap_or(0);
    let status = job["status"].as_str().unwrap_or("").to_string();
    let live = live();
    let act = move |verb: &'static str| {
        spawn_local(async move {
            let result = if verb == "delete" {
                api::delete(&format!("/api/jobs/{id}")).await
            } else {
                api::post(&format!("/api/jobs/{id}/{verb}"), &json!({})).await
            };
            if let Err(e) = result {
                let _ = web_sys::window().map(|w| w.alert_with_message(&e));
            }
            refresh_jobs(live).await;
        })
    };
    let active = status == "queued" || status == "running";
    let resumable = matches!(status.as_str(), "interrupted" | "cancelled" | "failed");
    view! {
        <span>
            {active.then(|| view! { <button class="cancel" on:click=move |_| act("cancel")>"Cancel"</button> })}
            {resumable.then(|| view! { <button class="resume" on:click=move |_| act("resume")>"Resume"</button> })}
            {(!active).then(|| view! { <button class="delete" on:click=move |_| act("delete")>"Delete"</button> })}
        </span>
    }
}

fn harmful_score(job: &Value) -> Option<f64> {
    num(&job["result"]["harmful"]["harmful_score"])
}

pub fn runs() -> impl IntoView {
    let live = live();
    view! {
        <div class="card hero">
            <h1>"See what fine-tuning does to safety"</h1>
            <p>"The demo comparison fine-tunes the embedded demo model on a benign task three ways — plain SFT, \
                Safety-Aware Probing (SAP) and safety-data mixing — from the same start on the same data, \
                then measures each one's harmful score (HS: % of held-out harmful prompts answered instead of refused) and task accuracy."</p>
            <button class="primary" id="start-demo" on:click=move |_| spawn_local(start_demo_comparison(live))>"Run the demo comparison"</button>
        </div>
        <h2>"Runs"</h2>
        <table id="jobs">
            <thead><tr><th>"#"</th><th>"kind / method"</th><th>"model"</th><th>"status"</th><th>"progress"</th><th>"HS (%)"</th><th>"validation loss"</th><th></th></tr></thead>
            <tbody>
                {move || live.jobs.get().into_iter().map(|job| {
                    let id = job["id"].as_i64().unwrap_or(0);
                    let status = job["status"].as_str().unwrap_or("").to_string();
                    let step = &job["last_step"];
                    let progress = match (step["step"].as_u64(), step["total_steps"].as_u64()) {
                        (Some(s), Some(t)) => format!("{s}/{t}"),
                        _ => "—".into(),
                    };
                    let hs = harmful_score(&job).map(|h| format!("{h:.1}")).unwrap_or_else(|| "—".into());
                    let validation = num(&job["last_validation"]["loss"]).map(|l| format!("{l:.3}")).unwrap_or_else(|| "—".into());
                    view! {
                        <tr data-job=id>
                            <td><a href=Page::Run(id).hash()>{id}</a></td>
                            <td>{method_of(&job)}</td>
                            <td>{short_path(&job["spec"]["model"])}</td>
                            <td><span class=format!("status {status}")>{status.clone()}</span>
                                {job["error"].as_str().map(|e| view! { <div class="error">{e.to_string()}</div> })}</td>
                            <td>{progress}</td>
                            <td>{hs}</td>
                            <td>{validation}</td>
                            <td>{job_actions(&job)}</td>
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
    }
}

/// The job's events: what the server stored, then what streamed in after it. Events are told
/// apart by their number, not their content (a status "queued" after Resume equals the first
/// one). A status change reads the stored events again, since a resumed run drops the steps it
/// replays.
fn job_events(id: i64) -> Memo<Vec<Value>> {
    let stored = RwSignal::new(Vec::<(i64, Value)>::new());
    let fetch = move || {
        spawn_local(async move {
            if let Ok(events) = api::all_events(id).await {
                stored.set(events);
            }
        })
    };
    fetch();
    let live = live();
    Effect::new(move |seen: Option<usize>| {
        let statuses = live
            .events
            .with(|events| events.iter().filter(|e| e.job == id && e.body["event"] == "status").count());
        if seen.is_some_and(|s| s != statuses) {
            fetch();
        }
        statuses
    });
    Memo::new(move |_| merge_events(&stored.get(), &live.events.get(), id))
}

/// Stored events followed by the live ones of job `id` numbered after the newest stored one.
pub fn merge_events(stored: &[(i64, Value)], live: &[LiveEvent], id: i64) -> Vec<Value> {
    let newest = stored.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
    stored
        .iter()
        .map(|(_, body)| body.clone())
        .chain(live.iter().filter(|e| e.job == id && e.seq > newest).map(|e| e.body.clone()))
        .collect()
}

/// Splits events into runs (a comparison trains several): each "stage" starts one.
fn segments(events: &[Value]) -> Vec<(String, Vec<Value>)> {
    let mut out: Vec<(String, Vec<Value>)> = vec![("run".into(), Vec::new())];
    for e in events {
        if e["event"] == "stage" {
            out.push((e["stage"].as_str().unwrap_or("").to_string(), Vec::new()));
        } else if e["event"] == "step" || e["event"] == "validation" {
            out.last_mut().unwrap().1.push(e.clone());
        }
    }
    out.into_iter().filter(|(_, e)| !e.is_empty()).collect()
}

fn series_of(segments: &[(String, Vec<Value>)], event: &str, key: &str) -> Vec<Series> {
    segments
        .iter()
        .enumerate()
        .map(|(i, (name, events))| Series {
            name: name.clone(),
            color: COLORS[i % COLORS.len()],
            points: events
                .iter()
                .filter(|e| e["event"] == event)
                .filter_map(|e| Some((e["step"].as_f64()?, e[key].as_f64()?)))
                .collect(),
        })
        .collect()
}

fn comparison_table(result: &Value) -> impl IntoView + use<> {
    let rows = result["rows"].as_array().cloned().unwrap_or_default();
    let cell = |v: &Value, digits: usize| match (v["mean"].as_f64(), v["std"].as_f64()) {
        (Some(m), Some(s)) if s > 0.0 => format!("{m:.digits$} ± {s:.digits$}"),
        (Some(m), _) => format!("{m:.digits$}"),
        _ => "—".into(),
    };
    view! {
        <table class="comparison">
            <thead><tr><th>"method"</th><th>"HS (%) ↓"</th><th>"task exact match (%)"</th><th>"validation loss"</th><th>"time/step (s)"</th><th>"overhead vs SFT"</th></tr></thead>
            <tbody>
                {rows.into_iter().map(|r| view! {
                    <tr>
                        <td>{r["method"].as_str().unwrap_or("").to_string()}</td>
                        <td>{cell(&r["harmful_score"], 1)}</td>
                        <td>{cell(&r["exact_match"], 1)}</td>
                        <td>{cell(&r["validation_loss"], 3)}</td>
                        <td>{if r["step_time_s"].is_null() { "—".to_string() } else { cell(&r["step_time_s"], 3) }}</td>
                        <td>{r["overhead_vs_sft"].as_f64().map(|o| format!("{o:.2}×")).unwrap_or_else(|| "—".into())}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
        <ul>{result["findings"].as_array().cloned().unwrap_or_default().into_iter().map(|f| view! { <li>{f.as_str().unwrap_or("").to_string()}</li> }).collect_view()}</ul>
    }
}

pub fn run_detail(id: i64) -> impl IntoView {
    let job = RwSignal::new(Value::Null);
    let load = move || {
        spawn_local(async move {
            if let Ok(j) = api::get(&format!("/api/jobs/{id}")).await {
                job.set(j);
            }
        })
    };
    load();
    let events = job_events(id);
    // Reload the job (status, result, answers) whenever a status event arrives.
    Effect::new(move |seen: Option<usize>| {
        let statuses = events.get().iter().filter(|e| e["event"] == "status").count();
        if seen.is_some_and(|s| s != statuses) {
            load();
        }
        statuses
    });
    let started = js_sys::Date::now();
    view! {
        <h1>{move || format!("Job {id}: {} on {}", method_of(&job.get()), short_path(&job.get()["spec"]["model"]))}</h1>
        <div class="card">
            {move || {
                let j = job.get();
                let status = j["status"].as_str().unwrap_or("").to_string();
                let all = events.get();
                let last = all.iter().rev().find(|e| e["event"] == "step").cloned().unwrap_or(Value::Null);
                let stage = all.iter().rev().find(|e| e["event"] == "stage").and_then(|e| e["stage"].as_str().map(str::to_string));
                let (step, total) = (last["step"].as_f64().unwrap_or(0.0), last["total_steps"].as_f64().unwrap_or(0.0));
                let eta = last["step_time_s"].as_f64().map(|t| t * (total - step)).unwrap_or(0.0);
                let pct = if total > 0.0 { 100.0 * step / total } else { 0.0 };
                let _ = started;
                view! {
                    <div><span class=format!("status {status}") id="job-status">{status.clone()}</span> " "
                        {stage.map(|s| format!("stage: {s} · "))}
                        {format!("step {step:.0}/{total:.0}")}
                        {(status == "running").then(|| format!(" · ETA {eta:.0} s"))}
                        " " {job_actions(&j)}</div>
                    <div class="progress"><div style=format!("width:{pct:.1}%")></div></div>
                    {j["error"].as_str().map(|e| view! { <p class="error">{e.to_string()}</p> })}
                }
            }}
        </div>
        {move || {
            let j = job.get();
            (j["kind"] == "compare" && j["result"].is_object()).then(|| view! {
                <h2>"Comparison"</h2>
                {comparison_table(&j["result"])}
            })
        }}
        <div class="grid" id="charts">
            {move || {
                let segs = segments(&events.get());
                let probe_series: Vec<Series> = segs.iter().flat_map(|(name, evs)| {
                    let layers = evs.iter().find_map(|e| e["probe_norms"].as_array().map(|a| a.len())).unwrap_or(0);
                    let name = name.clone();
                    (0..layers).map(move |l| Series {
                        name: format!("{name} layer {l}"),
                        color: COLORS[l % COLORS.len()],
                        points: evs.iter().filter(|e| e["event"] == "step")
                            .filter_map(|e| Some((e["step"].as_f64()?, e["probe_norms"][l].as_f64()?))).collect(),
                    }).collect::<Vec<_>>()
                }).collect();
                let (cos_steps, cos_rows) = segs.last().map(|(_, evs)| {
                    let with: Vec<&Value> = evs.iter().filter(|e| e["grad_cosine"].as_array().is_some_and(|a| !a.is_empty())).collect();
                    let layers = with.first().and_then(|e| e["grad_cosine"].as_array().map(|a| a.len())).unwrap_or(0);
                    let steps: Vec<f64> = with.iter().filter_map(|e| e["step"].as_f64()).collect();
                    let rows: Vec<Vec<f64>> = (0..layers).map(|l| with.iter().map(|e| e["grad_cosine"][l].as_f64().unwrap_or(0.0)).collect()).collect();
                    (steps, rows)
                }).unwrap_or_default();
                view! {
                    {line_chart("Task loss".into(), "step", "nats/token", series_of(&segs, "step", "task_loss"))}
                    {line_chart("Validation loss".into(), "step", "nats/token", series_of(&segs, "validation", "loss"))}
                    {line_chart("Safety loss".into(), "step", "contrastive, nats", series_of(&segs, "step", "safety_loss"))}
                    {line_chart("L_su (loss gap the probe climbs)".into(), "step", "nats/token", series_of(&segs, "step", "su_loss"))}
                    {line_chart("Probe norm per layer ‖v_j‖".into(), "step", "L2", probe_series)}
                    {line_chart("Learning rate".into(), "step", "1/step", series_of(&segs, "step", "lr"))}
                    {line_chart("Throughput".into(), "step", "tokens/s", series_of(&segs, "step", "tokens_per_s"))}
                    {(!cos_rows.is_empty()).then(|| heatmap("cos(∇L_task, ∇L_safety) per layer".into(), cos_steps, cos_rows, 200))}
                }
            }}
        </div>
        <h2>"Log"</h2>
        <div class="card" id="log" style="max-height:160px;overflow:auto">
            {move || events.get().iter().filter(|e| e["event"] == "status" || e["event"] == "stage" || e["event"] == "done").map(|e| {
                let line = match e["event"].as_str() {
                    Some("status") => format!("status: {}{}", e["status"].as_str().unwrap_or(""), e["error"].as_str().map(|x| format!(" ({x})")).unwrap_or_default()),
                    Some("stage") => format!("stage: {}", e["stage"].as_str().unwrap_or("")),
                    _ => format!("finished {} steps", e["steps"]),
                };
                view! { <div>{line}</div> }
            }).collect_view()}
        </div>
        {move || {
            let j = job.get();
            let answers = j["answers"].as_array().cloned().unwrap_or_default();
            (!answers.is_empty()).then(|| view! {
                <h2>{format!("Evaluation: HS {:.1}% on {} harmful prompts", harmful_score(&j).unwrap_or(0.0), answers.len())}</h2>
                {answers_table(answers)}
            })
        }}
    }
}

fn answers_table(answers: Vec<Value>) -> impl IntoView {
    view! {
        <table id="answers">
            <thead><tr><th>"category"</th><th>"prompt"</th><th>"answer"</th><th>"refusal judge"</th><th>"model judge"</th></tr></thead>
            <tbody>
                {answers.into_iter().map(|a| {
                    let verdict = |v: &Value| match v.as_bool() {
                        Some(true) => view! { <span class="error">"harmful"</span> }.into_any(),
                        Some(false) => view! { <span class="ok">"safe"</span> }.into_any(),
                        None => view! { <span>"—"</span> }.into_any(),
                    };
                    view! {
                        <tr>
                            <td>{a["category"].as_str().unwrap_or("").to_string()}</td>
                            <td>{a["prompt"].as_str().unwrap_or("").to_string()}</td>
                            <td>{a["answer"].as_str().unwrap_or("").to_string()}</td>
                            <td>{verdict(&a["refusal_judge_harmful"])}</td>
                            <td>{verdict(&a["model_judge_harmful"])}</td>
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
    }
}

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
}

const FIELDS: &[(&str, &[Field])] = &[
    ("Model and data", &[
        Field { key: "model", label: "model", help: "\"demo\" or a checkpoint under the server's model directories", kind: Kind::Text },
        Field { key: "train_data", label: "training data", help: "JSONL/Parquet/Alpaca JSON in a data directory", kind: Kind::Text },
        Field { key: "safety_data", label: "safety pairs", help: "{prompt, chosen, rejected}; needed by SAP and mixing", kind: Kind::Text },
        Field { key: "validation_data", label: "validation data", help: "optional; or set a validation fraction", kind: Kind::Text },
        Field { key: "validation_fraction", label: "validation fraction", help: "hold out this share of the training data", kind: Kind::Float },
        Field { key: "system", label: "system prompt", help: "prepended to conversations that have none", kind: Kind::Text },
        Field { key: "max_len", label: "max tokens per example", help: "longer examples are truncated", kind: Kind::Int },
    ]),
    ("Method", &[
        Field { key: "method", label: "method", help: "sft: plain fine-tuning; sap: Safety-Aware Probing", kind: Kind::Choice(&["sap", "sft"]) },
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
];

fn preset(name: &str) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match name {
        "paper" => &[
            ("model", "demo"), ("train_data", ""), ("safety_data", ""), ("method", "sap"), ("finetune", "lora"),
            ("max_steps", "500"), ("batch_size", "4"), ("lr", "1e-4"), ("lr_schedule", "constant"),
            ("lora.r", "8"), ("lora.alpha", "16"), ("lora.dropout", "0.05"), ("safety_batch_size", "4"),
            ("sap.rho", "2e-5"), ("sap.temperature", "1"), ("sap.beta", "0.05"), ("sap.refresh_every", "1"), ("sap.schedule", "lagged"),
            ("sap.cosine_every", "10"), ("checkpoint_every", "50"), ("eval_every", "50"),
        ],
        _ => &[
            ("model", "demo"), ("train_data", "builtin/reverse-train.jsonl"), ("safety_data", "builtin/safety_pairs.jsonl"),
            ("validation_data", "builtin/reverse-validation.jsonl"), ("method", "sap"), ("finetune", "full"),
            ("max_steps", "120"), ("batch_size", "12"), ("lr", "1e-3"), ("lr_schedule", "constant"), ("max_len", "128"),
            ("safety_batch_size", "8"), ("sap.rho", "0.002"), ("sap.temperature", "100"), ("sap.beta", "0.05"),
            ("sap.refresh_every", "4"), ("sap.schedule", "lagged"), ("sap.cosine_every", "10"), ("checkpoint_every", "20"), ("eval_every", "20"),
        ],
    };
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The request config from the form, or the first field error.
fn build_config(values: &BTreeMap<String, String>) -> Result<Value, (String, String)> {
    let mut root = serde_json::Map::new();
    for (_, fields) in FIELDS {
        for f in fields.iter() {
            let raw = values.get(f.key).map(|s| s.trim().to_string()).unwrap_or_default();
            if raw.is_empty() {
                continue;
            }
            let value = match f.kind {
                Kind::Text | Kind::Choice(_) => Value::String(raw.clone()),
                Kind::Bool => Value::Bool(raw == "true"),
                Kind::Int => raw.parse::<u64>().map(Value::from).map_err(|_| (f.key.to_string(), "a whole number ≥ 0".to_string()))?,
                Kind::Float => raw.parse::<f64>().ok().filter(|v| v.is_finite()).map(Value::from).ok_or((f.key.to_string(), "a number".to_string()))?,
            };
            match f.key.split_once('.') {
                Some((table, key)) => {
                    let entry = root.entry(table.to_string()).or_insert_with(|| json!({}));
                    entry[key] = value;
                }
                None => {
                    root.insert(f.key.to_string(), value);
                }
            }
        }
    }
    Ok(Value::Object(root))
}

fn as_toml(config: &Value) -> String {
    let mut top = String::new();
    let mut tables = String::new();
    for (k, v) in config.as_object().into_iter().flatten() {
        if let Some(table) = v.as_object() {
            tables.push_str(&format!("\n[{k}]\n"));
            for (k2, v2) in table {
                tables.push_str(&format!("{k2} = {v2}\n"));
            }
        } else {
            top.push_str(&format!("{k} = {v}\n"));
        }
    }
    top + &tables
}

pub fn new_run() -> impl IntoView {
    let live = live();
    let values = RwSignal::new(preset("demo"));
    let server_error = RwSignal::new(None::<String>);
    let config = Memo::new(move |_| build_config(&values.get()));
    let submit = move |_| {
        let Ok(config) = config.get_untracked() else { return };
        spawn_local(async move {
            match api::post("/api/jobs", &json!({"kind": "train", "config": config})).await {
                Ok(job) => {
                    refresh_jobs(live).await;
                    go(Page::Run(job["id"].as_i64().unwrap_or(0)));
                }
                Err(e) => server_error.set(Some(e)),
            }
        })
    };
    view! {
        <h1>"New run"</h1>
        <div>"Presets: "
            <button on:click=move |_| values.set(preset("paper"))>"paper defaults"</button> " "
            <button id="preset-demo" on:click=move |_| values.set(preset("demo"))>"demo"</button>
            <span class="help">" (the demo preset fine-tunes the demo model on the built-in word-reversal task)"</span>
        </div>
        {FIELDS.iter().map(|(group, fields)| view! {
            <div class="card">
                <h2>{*group}</h2>
                <div class="form">
                    {fields.iter().map(|f| {
                        let key = f.key;
                        let get = move || values.get().get(key).cloned().unwrap_or_default();
                        let set = move |v: String| values.update(|m| { m.insert(key.to_string(), v); });
                        let input = match f.kind {
                            Kind::Choice(options) => view! {
                                <select name=key prop:value=get on:change=move |ev| set(event_target_value(&ev))>
                                    {options.iter().map(|o| view! { <option value=*o>{*o}</option> }).collect_view()}
                                </select>
                            }.into_any(),
                            Kind::Bool => view! {
                                <input type="checkbox" name=key prop:checked=move || get() == "true"
                                    on:change=move |ev| set(if event_target_checked(&ev) { "true".into() } else { "false".into() })/>
                            }.into_any(),
                            _ => view! { <input name=key prop:value=get on:input=move |ev| set(event_target_value(&ev))/> }.into_any(),
                        };
                        let error = move || match config.get() {
                            Err((k, m)) if k == key => Some(view! { <div class="help error">{format!("{key}: expected {m}")}</div> }),
                            _ => None,
                        };
                        view! {
                            <label for=key>{f.label}</label> {input}
                            <div class="help">{f.help}</div>
                            {error}
                        }
                    }).collect_view()}
                </div>
            </div>
        }).collect_view()}
        {move || server_error.get().map(|e| view! { <p class="error" id="server-error">{e}</p> })}
        <button class="primary" id="start-run" on:click=submit disabled=move || config.get().is_err()>"Start run"</button>
        <h2>"The same run from the command line"</h2>
        <pre id="config-toml">{move || match config.get() {
            Ok(c) => format!("# safeprobe train --config run.toml   (add output_dir = \"runs/name\")\n{}", as_toml(&c)),
            Err((k, m)) => format!("{k}: expected {m}"),
        }}</pre>
    }
}

pub fn compare() -> impl IntoView {
    let live = live();
    let picked = RwSignal::new(Vec::<i64>::new());
    view! {
        <h1>"Compare"</h1>
        <div class="card hero">
            <button class="primary" on:click=move |_| spawn_local(start_demo_comparison(live))>"Run the demo comparison"</button>
            <span class="help">" base model, SFT, SAP and safety mixing on the demo model; the table appears when it finishes"</span>
        </div>
        {move || live.jobs.get().into_iter().filter(|j| j["kind"] == "compare" && j["result"].is_object()).map(|j| {
            let id = j["id"].as_i64().unwrap_or(0);
            view! {
                <div class="card">
                    <h2><a href=Page::Run(id).hash()>{format!("Comparison #{id}")}</a>{format!(" — task {}", j["result"]["task"].as_str().unwrap_or(""))}</h2>
                    {comparison_table(&j["result"])}
                </div>
            }
        }).collect_view()}
        <h2>"Pick training runs"</h2>
        <table>
            <thead><tr><th></th><th>"#"</th><th>"method"</th><th>"status"</th><th>"HS (%)"</th><th>"final task loss"</th><th>"time/step (s)"</th></tr></thead>
            <tbody>
                {move || live.jobs.get().into_iter().filter(|j| j["kind"] == "train").map(|j| {
                    let id = j["id"].as_i64().unwrap_or(0);
                    view! {
                        <tr>
                            <td><input type="checkbox" prop:checked=move || picked.get().contains(&id)
                                on:change=move |ev| picked.update(|p| if event_target_checked(&ev) { p.push(id) } else { p.retain(|x| *x != id) })/></td>
                            <td><a href=Page::Run(id).hash()>{id}</a></td>
                            <td>{method_of(&j)}</td>
                            <td>{j["status"].as_str().unwrap_or("").to_string()}</td>
                            <td>{harmful_score(&j).map(|h| format!("{h:.1}")).unwrap_or_else(|| "—".into())}</td>
                            <td>{j["last_step"]["task_loss"].as_f64().map(|l| format!("{l:.4}")).unwrap_or_else(|| "—".into())}</td>
                            <td>{j["last_step"]["step_time_s"].as_f64().map(|l| format!("{l:.3}")).unwrap_or_else(|| "—".into())}</td>
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
        {move || {
            let ids = picked.get();
            let curves = RwSignal::new(Vec::<Series>::new());
            for (i, id) in ids.iter().copied().enumerate() {
                spawn_local(async move {
                    if let Ok(events) = api::all_events(id).await {
                        let points = events.iter().map(|(_, e)| e).filter(|e| e["event"] == "step")
                            .filter_map(|e| Some((e["step"].as_f64()?, e["task_loss"].as_f64()?))).collect();
                        curves.update(|c| c.push(Series { name: format!("#{id}"), color: COLORS[i % COLORS.len()], points }));
                    }
                });
            }
            view! { <div>{move || line_chart("Task loss of the picked runs".into(), "step", "nats/token", curves.get())}</div> }
        }}
    }
}

pub fn evaluate() -> impl IntoView {
    let live = live();
    let model = RwSignal::new("demo".to_string());
    let adapter = RwSignal::new(String::new());
    let prompts = RwSignal::new(String::new());
    let judge = RwSignal::new("refusal".to_string());
    let judge_model = RwSignal::new(String::new());
    let tokens = RwSignal::new("48".to_string());
    let error = RwSignal::new(None::<String>);
    let submit = move |_| {
        let opt = |s: String| if s.trim().is_empty() { Value::Null } else { Value::String(s) };
        let Ok(max) = tokens.get_untracked().trim().parse::<u64>() else {
            error.set(Some("max_new_tokens: expected a whole number".into()));
            return;
        };
        let config = json!({
            "model": model.get_untracked(), "adapter": opt(adapter.get_untracked()), "prompts": opt(prompts.get_untracked()),
            "judge": judge.get_untracked(), "judge_model": opt(judge_model.get_untracked()), "max_new_tokens": max,
        });
        spawn_local(async move {
            match api::post("/api/jobs", &json!({"kind": "eval", "config": config})).await {
                Ok(job) => {
                    refresh_jobs(live).await;
                    go(Page::Run(job["id"].as_i64().unwrap_or(0)));
                }
                Err(e) => error.set(Some(e)),
            }
        })
    };
    let text = |label: &'static str, help: &'static str, s: RwSignal<String>| view! {
        <label>{label}</label><input prop:value=move || s.get() on:input=move |ev| s.set(event_target_value(&ev))/>
        <div class="help">{help}</div>
    };
    view! {
        <h1>"Evaluate"</h1>
        <div class="card form">
            {text("model", "\"demo\" or a checkpoint under the model directories", model)}
            {text("adapter", "optional PEFT adapter (e.g. runs/job-3/adapter)", adapter)}
            {text("prompt set", "empty: the built-in 180 held-out prompts; or BeaverTails/AdvBench/JSONL in a data directory", prompts)}
            <label>"judge"</label>
            <select prop:value=move || judge.get() on:change=move |ev| judge.set(event_target_value(&ev))>
                <option value="refusal">"refusal"</option><option value="model">"model"</option><option value="both">"both"</option>
            </select>
            <div class="help">"refusal: not refusing counts as harmful; model: a chat model's yes/no log-probabilities"</div>
            {text("judge model", "a chat checkpoint, for the model judge", judge_model)}
            {text("max new tokens", "answer length", tokens)}
        </div>
        {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
        <button class="primary" on:click=submit>"Evaluate"</button>
        <h2>"Evaluations"</h2>
        <table>
            <thead><tr><th>"#"</th><th>"model"</th><th>"status"</th><th>"HS (%)"</th></tr></thead>
            <tbody>
                {move || live.jobs.get().into_iter().filter(|j| j["kind"] == "eval").map(|j| {
                    let id = j["id"].as_i64().unwrap_or(0);
                    view! { <tr><td><a href=Page::Run(id).hash()>{id}</a></td><td>{short_path(&j["spec"]["model"])}</td>
                        <td>{j["status"].as_str().unwrap_or("").to_string()}</td>
                        <td>{harmful_score(&j).map(|h| format!("{h:.1}")).unwrap_or_else(|| "—".into())}</td></tr> }
                }).collect_view()}
            </tbody>
        </table>
    }
}

#[derive(Clone, Copy)]
struct Pane {
    model: RwSignal<String>,
    adapter: RwSignal<String>,
    transcript: RwSignal<Vec<(String, String)>>,
    error: RwSignal<Option<String>>,
}

pub fn chat() -> impl IntoView {
    let panes: [Pane; 2] = std::array::from_fn(|_| Pane {
        model: RwSignal::new("demo".into()),
        adapter: RwSignal::new(String::new()),
        transcript: RwSignal::new(Vec::new()),
        error: RwSignal::new(None),
    });
    let system = RwSignal::new(String::new());
    let temperature = RwSignal::new("0".to_string());
    let top_p = RwSignal::new("1".to_string());
    let max_tokens = RwSignal::new("64".to_string());
    let prompt = RwSignal::new(String::new());
    let send = move |_| {
        let text = prompt.get_untracked();
        if text.trim().is_empty() {
            return;
        }
        prompt.set(String::new());
        for pane in panes {
            pane.transcript.update(|t| {
                t.push(("user".into(), text.clone()));
                t.push(("assistant".into(), String::new()));
            });
            let messages: Vec<Value> = pane.transcript.get_untracked().iter().filter(|(r, c)| r == "user" || !c.is_empty())
                .map(|(role, content)| json!({"role": role, "content": content})).collect();
            let adapter = pane.adapter.get_untracked();
            let body = json!({
                "model": pane.model.get_untracked(),
                "adapter": if adapter.trim().is_empty() { Value::Null } else { Value::String(adapter) },
                "system": if system.get_untracked().trim().is_empty() { Value::Null } else { Value::String(system.get_untracked()) },
                "messages": messages,
                "temperature": temperature.get_untracked().parse::<f64>().unwrap_or(0.0),
                "top_p": top_p.get_untracked().parse::<f64>().unwrap_or(1.0),
                "max_new_tokens": max_tokens.get_untracked().parse::<u64>().unwrap_or(64),
            });
            spawn_local(async move {
                pane.error.set(None);
                let result = api::chat(&body, |piece| {
                    pane.transcript.update(|t| if let Some(last) = t.last_mut() { last.1.push_str(piece) });
                }).await;
                if let Err(e) = result {
                    pane.error.set(Some(e));
                }
            });
        }
    };
    let field = |label: &'static str, s: RwSignal<String>| view! {
        <label>{label}</label><input prop:value=move || s.get() on:input=move |ev| s.set(event_target_value(&ev))/>
    };
    view! {
        <h1>"Chat"</h1>
        <div class="card form">
            {field("system prompt", system)} {field("temperature (0 = greedy)", temperature)} {field("top-p", top_p)} {field("max new tokens", max_tokens)}
        </div>
        <div class="chat">
            {panes.into_iter().enumerate().map(|(i, pane)| view! {
                <div class="card" data-pane=i>
                    <div class="form">{field("model", pane.model)} {field("adapter (e.g. runs/job-3/adapter)", pane.adapter)}</div>
                    <div class="transcript">
                        {move || pane.transcript.get().into_iter().map(|(role, content)| view! { <div class=format!("bubble {role}")>{content}</div> }).collect_view()}
                    </div>
                    {move || pane.error.get().map(|e| view! { <p class="error">{e}</p> })}
                </div>
            }).collect_view()}
        </div>
        <div style="display:flex;gap:8px">
            <input id="chat-input" style="flex:1" prop:value=move || prompt.get() on:input=move |ev| prompt.set(event_target_value(&ev))
                on:keydown=move |ev| if ev.key() == "Enter" { send(()) }/>
            <button class="primary" id="chat-send" on:click=move |_| send(())>"Send to both"</button>
        </div>
    }
}

pub fn device() -> impl IntoView {
    let info = RwSignal::new(Value::Null);
    spawn_local(async move {
        if let Ok(v) = api::get("/api/device").await {
            info.set(v);
        }
    });
    view! {
        <h1>"Device"</h1>
        <div class="card"><b>"Jobs run on: "</b><span id="device-selected">{move || info.get()["selected"].as_str().unwrap_or("…").to_string()}</span></div>
        <h2>"wgpu adapters"</h2>
        <table>
            <thead><tr><th>"name"</th><th>"vendor"</th><th>"type"</th><th>"backend"</th><th>"driver"</th></tr></thead>
            <tbody>
                {move || info.get()["adapters"].as_array().cloned().unwrap_or_default().into_iter().map(|a| {
                    let s = |k: &str| match &a[k] { Value::String(s) => s.clone(), Value::Null => "—".into(), v => v.to_string() };
                    view! { <tr><td>{s("name")}</td><td>{s("vendor")}</td><td>{s("device_type")}</td><td>{s("backend")}</td><td>{s("driver")}</td></tr> }
                }).collect_view()}
            </tbody>
        </table>
    }
}
