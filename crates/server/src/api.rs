//! The JSON API: small handlers with typed extractors; every failure is an `ApiError`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

use crate::AppState;
use crate::error::ApiError;
use crate::jobs::{self, KINDS};
use crate::store::Status;

type ApiResult<T> = Result<Json<T>, ApiError>;

pub async fn device(State(state): State<Arc<AppState>>) -> ApiResult<Value> {
    Ok(Json(json!({
        "selected": state.device_description,
        "adapters": safeprobe_model::device::list_adapters(),
    })))
}

fn model_summary(dir: &std::path::Path, name: &str) -> Option<Value> {
    let config = safeprobe_model::Qwen2Config::from_file(&dir.join("config.json")).ok()?;
    let (params, bytes) = safeprobe_model::size_report(&config);
    Some(json!({
        "name": name,
        "path": dir,
        "parameters": params,
        "f32_bytes": bytes,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }))
}

pub async fn models(State(state): State<Arc<AppState>>) -> ApiResult<Vec<Value>> {
    let demo = crate::jobs::demo_model_dir()?;
    let mut out: Vec<Value> = model_summary(&demo, "demo").into_iter().collect();
    for root in &state.places.models.dirs {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("config.json").is_file())
            .collect();
        found.sort();
        for dir in found {
            let name = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
            out.extend(model_summary(&dir, &name));
        }
    }
    Ok(Json(out))
}

const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "json", "parquet", "csv"];

fn is_data_file(p: &std::path::Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| DATA_EXTENSIONS.contains(&e))
}

/// Data files in each data directory and its immediate subfolders (run folders excluded).
pub async fn datasets(State(state): State<Arc<AppState>>) -> ApiResult<Vec<Value>> {
    let mut out = Vec::new();
    for root in &state.places.data.dirs {
        let list = |dir: &std::path::Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default()
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for path in list(root) {
            if is_data_file(&path) {
                files.push(path);
            } else if path.is_dir() && path != state.places.runs_dir {
                files.extend(list(&path).into_iter().filter(|p| is_data_file(p)));
            }
        }
        files.sort();
        for f in files {
            out.push(json!({
                "name": f.strip_prefix(root).unwrap_or(&f).display().to_string(),
                "bytes": f.metadata().map(|m| m.len()).unwrap_or(0),
            }));
        }
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct PreviewQuery {
    path: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "five")]
    rows: usize,
}
fn five() -> usize {
    5
}

/// The first rows of a data file rendered through a model's chat template, with token counts.
pub async fn preview(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PreviewQuery>,
) -> ApiResult<Value> {
    let path = state.places.data.resolve("path", &q.path)?;
    let model = state.places.model("model", q.model.as_deref())?;
    let rows = q.rows.clamp(1, 50);
    let value = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let config = safeprobe_model::Qwen2Config::from_file(&model.join("config.json"))?;
        let tokenizer = safeprobe_model::ChatTokenizer::load(&model, &config.eos_token_ids)?;
        let examples = safeprobe_train::data::read_examples(&path)?;
        let total = examples.len();
        let shown: Vec<Value> = examples
            .into_iter()
            .take(rows)
            .map(|e| {
                let mut conversation = e.prompt.clone();
                conversation.push(safeprobe_model::Message::new(
                    "assistant",
                    e.response.clone(),
                ));
                let (prompt, response) = tokenizer.encode_exchange(&e.prompt, &e.response)?;
                Ok(json!({
                    "rendered": tokenizer.render(&conversation, false)?,
                    "prompt_tokens": prompt.len(),
                    "response_tokens": response.len(),
                }))
            })
            .collect::<Result<_, safeprobe_model::Error>>()?;
        Ok(json!({"examples": total, "rows": shown}))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(value))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    kind: String,
    #[serde(default)]
    config: Value,
}

pub async fn create_job(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Value> {
    let Json(request) = body.map_err(crate::error::rejected)?;
    if !KINDS.contains(&request.kind.as_str()) {
        return Err(ApiError::Invalid(format!(
            "kind: {:?} is not one of train, eval, compare",
            request.kind
        )));
    }
    let config = if request.config.is_null() {
        json!({})
    } else {
        request.config
    };
    // Validate against a placeholder id first so that a bad request leaves no job behind.
    jobs::validate(&request.kind, config.clone(), 0, &state.places)?;
    let store = state.runner.store.clone();
    let id = store.create(&request.kind, &config)?;
    match jobs::validate(&request.kind, config, id, &state.places) {
        Ok((spec, dir)) => {
            let dir = dir.map(|d| d.display().to_string());
            store.set_spec(id, &spec, dir.as_deref())?;
        }
        Err(e) => {
            store.delete(id)?;
            return Err(e);
        }
    }
    state.runner.enqueue(id);
    state
        .runner
        .announce(id, json!({"event": "status", "status": "queued"}));
    Ok(Json(serde_json::to_value(store.get(id)?).expect("json")))
}

pub async fn list_jobs(State(state): State<Arc<AppState>>) -> ApiResult<Value> {
    Ok(Json(
        serde_json::to_value(state.runner.store.list()?).expect("json"),
    ))
}

fn job(state: &AppState, id: i64) -> Result<crate::store::Job, ApiError> {
    state
        .runner
        .store
        .get(id)?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
}

pub async fn get_job(State(state): State<Arc<AppState>>, Path(id): Path<i64>) -> ApiResult<Value> {
    let job = job(&state, id)?;
    let answers = state.runner.store.answers(id)?;
    let mut value = serde_json::to_value(job).expect("json");
    value["answers"] = Value::Array(answers);
    Ok(Json(value))
}

pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> ApiResult<Value> {
    state.runner.cancel(id)?;
    Ok(Json(serde_json::to_value(job(&state, id)?).expect("json")))
}

/// Requeues an interrupted, cancelled or failed job; a training run continues from its newest
/// checkpoint.
pub async fn resume_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> ApiResult<Value> {
    let job = job(&state, id)?;
    if job.status.is_active() || job.status == Status::Done {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; only interrupted, cancelled or failed jobs can be resumed",
            job.status.as_str()
        )));
    }
    let store = &state.runner.store;
    let mut spec = job.spec.clone();
    if job.kind == "train" {
        let dir = PathBuf::from(job.run_dir.clone().unwrap_or_default());
        match safeprobe_train::checkpoint::latest(&dir) {
            Some((step, _)) => {
                spec["resume"] = json!(true);
                store.truncate_steps_after(id, step as i64)?;
            }
            None => {
                spec["resume"] = json!(false);
                store.truncate_steps_after(id, 0)?;
            }
        }
        store.set_spec(id, &spec, job.run_dir.as_deref())?;
    }
    store.set_status(id, Status::Queued, None)?;
    state.runner.enqueue(id);
    state
        .runner
        .announce(id, json!({"event": "status", "status": "queued"}));
    Ok(Json(serde_json::to_value(store.get(id)?).expect("json")))
}

pub async fn delete_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> ApiResult<Value> {
    let job = job(&state, id)?;
    if job.status.is_active() {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; cancel it before deleting it",
            job.status.as_str()
        )));
    }
    // Move the run's files aside first, so that a failure leaves the job listed with its
    // files; once the row is gone, nothing refers to them.
    let trash = match job.run_dir.as_deref().map(PathBuf::from) {
        Some(dir) if dir.starts_with(&state.places.runs_dir) && dir.exists() => {
            let trash = state.places.runs_dir.join(format!(".deleted-job-{id}"));
            std::fs::rename(&dir, &trash).map_err(|e| {
                ApiError::Internal(format!(
                    "{}: cannot delete the run's files: {e}",
                    dir.display()
                ))
            })?;
            Some((dir, trash))
        }
        _ => None,
    };
    if let Err(e) = state.runner.store.delete(id) {
        if let Some((dir, trash)) = &trash {
            let _ = std::fs::rename(trash, dir);
        }
        return Err(e);
    }
    if let Some((_, trash)) = trash {
        let shown = trash.display().to_string();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&trash))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("{shown}: cannot delete: {e}")))?;
    }
    Ok(Json(json!({"deleted": id})))
}

#[derive(Deserialize)]
pub struct Page {
    #[serde(default)]
    after: i64,
    #[serde(default = "page_size")]
    limit: i64,
}
fn page_size() -> i64 {
    1000
}

pub async fn metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
    Query(page): Query<Page>,
) -> ApiResult<Value> {
    job(&state, id)?;
    let limit = page.limit.clamp(1, 10_000);
    let events = state.runner.store.events(id, page.after, limit)?;
    let next = events.last().map(|e| e.seq);
    Ok(Json(json!({"events": events, "next_after": next})))
}

/// Every job's events as they happen (Server-Sent Events).
pub async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(state.runner.live.subscribe())
        .filter_map(|m| m.ok())
        .map(|m| Ok(SseEvent::default().data(m)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    system: Option<String>,
    messages: Vec<safeprobe_model::Message>,
    #[serde(default = "chat_tokens")]
    max_new_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
}
fn chat_tokens() -> usize {
    128
}
fn one() -> f32 {
    1.0
}

/// Streamed generation: `token` events carry text as it is produced, then one `done`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Json(request) = body.map_err(crate::error::rejected)?;
    let model = state.places.model("model", request.model.as_deref())?;
    let adapter = request
        .adapter
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(|a| state.places.data.resolve("adapter", a))
        .transpose()?;
    if request.messages.is_empty() || request.messages.last().is_some_and(|m| m.role != "user") {
        return Err(ApiError::Invalid(
            "messages: must end with a user message".into(),
        ));
    }
    if request.max_new_tokens == 0 || request.max_new_tokens > 2048 {
        return Err(ApiError::Invalid(format!(
            "max_new_tokens: {} must be in 1..=2048",
            request.max_new_tokens
        )));
    }
    let sampling = safeprobe_model::Sampling {
        max_new_tokens: request.max_new_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
    };
    sampling.validate()?;
    let messages = safeprobe_train::data::with_system(&request.messages, request.system.as_deref());
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let device = state.chat_device.clone();
    let cache = state.chat_model.clone();
    tokio::task::spawn_blocking(move || {
        let send = |event: SseEvent| tx.blocking_send(event).is_ok();
        let result = (|| -> Result<(), ApiError> {
            let mut slot = cache.lock().unwrap_or_else(|p| p.into_inner());
            let key = (model.clone(), adapter.clone());
            if slot.as_ref().is_none_or(|(k, _)| *k != key) {
                *slot = None;
                let mut checkpoint = safeprobe_model::Checkpoint::load(&model, &device)?;
                if let Some(a) = &adapter {
                    checkpoint.load_adapter(a)?;
                }
                *slot = Some((key, checkpoint));
            }
            let checkpoint = &slot.as_ref().expect("loaded").1;
            let prompt = checkpoint.tokenizer.encode_prompt(&messages)?;
            let mut tokens = Vec::new();
            let mut shown = String::new();
            safeprobe_model::generate::generate_streaming(
                &checkpoint.model,
                &[prompt],
                &sampling,
                &checkpoint.tokenizer.stop_ids,
                checkpoint.tokenizer.pad_id,
                &checkpoint.device,
                |_, token| {
                    tokens.push(token);
                    let text = checkpoint
                        .tokenizer
                        .decode(&tokens, true)
                        .unwrap_or_default();
                    // Hold back a partial UTF-8 sequence until it completes.
                    if text.ends_with('\u{fffd}') || !text.starts_with(&shown) {
                        return true;
                    }
                    let delta = text[shown.len()..].to_string();
                    shown = text;
                    delta.is_empty()
                        || send(
                            SseEvent::default()
                                .event("token")
                                .data(json!({"text": delta}).to_string()),
                        )
                },
            )?;
            send(
                SseEvent::default()
                    .event("done")
                    .data(json!({"text": shown, "tokens": tokens.len()}).to_string()),
            );
            Ok(())
        })();
        if let Err(e) = result {
            send(
                SseEvent::default()
                    .event("error")
                    .data(json!({"error": e.to_string()}).to_string()),
            );
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx).map(Ok)))
}
