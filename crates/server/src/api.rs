//! The JSON API: small handlers with typed extractors; every failure is an `ApiError`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use safeprobe_wire::spec::form::FormField;
use safeprobe_wire::{
    AdapterInfo, ChatDone, ChatRequest, ChatToken, CreateJob, DatasetEntry, Deleted, DeviceReport,
    ErrorBody, EventPage, Job, JobEstimate, JobKind, JobLabel, JobSpec, MetricsQuery, ModelSummary,
    Preview, PreviewQuery, PreviewRow, Recommended,
};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

use crate::AppState;
use crate::error::ApiError;
use crate::jobs;
use crate::store::Status;

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// The new-run form, built from the run config's type (the panel renders it as it is).
pub async fn run_form() -> ApiResult<Vec<FormField>> {
    Ok(Json(safeprobe_wire::spec::run_form()))
}

/// The comparison form: a request refines the demo comparison, so its values are the defaults.
pub async fn compare_form() -> ApiResult<Vec<FormField>> {
    use safeprobe_eval::compare::{CompareConfig, Comparing, DEMO_CONFIG};
    let demo = CompareConfig::parse(DEMO_CONFIG, &[], std::path::Path::new("demo comparison"))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(safeprobe_wire::spec::compare_form(&demo)))
}

/// The evaluation form, built from its settings' type.
pub async fn eval_form() -> ApiResult<Vec<FormField>> {
    Ok(Json(safeprobe_wire::spec::eval_form()))
}

pub async fn device(State(state): State<Arc<AppState>>) -> ApiResult<DeviceReport> {
    let adapters = safeprobe_model::device::list_adapters()
        .into_iter()
        .map(|a| AdapterInfo {
            name: a.name,
            vendor: a.vendor,
            device_type: a.device_type,
            backend: a.backend,
            driver: a.driver,
            driver_info: a.driver_info,
        })
        .collect();
    Ok(Json(DeviceReport {
        selected: state.device_description.clone(),
        adapters,
    }))
}

fn model_summary(dir: &std::path::Path, name: &str) -> Option<ModelSummary> {
    let config = safeprobe_model::ModelConfig::from_file(&dir.join("config.json")).ok()?;
    let (parameters, f32_bytes) = safeprobe_model::size_report(&config);
    Some(ModelSummary {
        name: name.into(),
        path: dir.display().to_string(),
        parameters: parameters as u64,
        f32_bytes: f32_bytes as u64,
        layers: config.num_hidden_layers,
        hidden_size: config.hidden_size,
        recommends: recommended(dir),
    })
}

/// The model folder's `safeprobe.json`, if it has one that reads (at most 64 KiB; one that
/// does not read is left out of the list with a warning, never half applied).
fn recommended(dir: &std::path::Path) -> Option<Recommended> {
    let path = dir.join("safeprobe.json");
    let size = std::fs::metadata(&path).ok()?.len();
    if size > 64 << 10 {
        tracing::warn!("{}: {size} bytes, over 64 KiB; not read", path.display());
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    serde_json::from_str(&text)
        .map_err(|e| tracing::warn!("{}: {e}; its recommendations are not used", path.display()))
        .ok()
}

pub async fn models(State(state): State<Arc<AppState>>) -> ApiResult<Vec<ModelSummary>> {
    let demo = crate::jobs::demo_model_dir()?;
    let mut out: Vec<ModelSummary> = model_summary(&demo, "demo").into_iter().collect();
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
    for (repo, dir) in crate::hub::cached_models(&state.places.hub) {
        out.extend(model_summary(&dir, &repo));
    }
    Ok(Json(out))
}

fn is_data_file(p: &std::path::Path) -> bool {
    // Hidden files are uploads still arriving.
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| crate::files::DATA_EXTENSIONS.contains(&e))
}

/// Data files in each data directory and its immediate subfolders (run folders excluded).
pub async fn datasets(State(state): State<Arc<AppState>>) -> ApiResult<Vec<DatasetEntry>> {
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
        // A link may point anywhere: list only what resolves inside a data directory.
        files.retain(|f| state.places.data.contains(f));
        files.sort();
        for f in files {
            out.push(DatasetEntry {
                name: f.strip_prefix(root).unwrap_or(&f).display().to_string(),
                bytes: f.metadata().map(|m| m.len()).unwrap_or(0),
            });
        }
    }
    Ok(Json(out))
}

/// The first rows of a data file rendered through a model's chat template, with token counts.
pub async fn preview(
    State(state): State<Arc<AppState>>,
    Query(q): Query<PreviewQuery>,
) -> ApiResult<Preview> {
    let path = state.places.data.resolve("path", &q.path)?;
    let model = state.places.model("model", q.model.as_deref())?;
    let rows = q.rows.clamp(1, 50);
    let preview = tokio::task::spawn_blocking(move || -> Result<Preview, ApiError> {
        let config = safeprobe_model::ModelConfig::from_file(&model.join("config.json"))?;
        let tokenizer = safeprobe_model::ChatTokenizer::load(&model, &config.eos_token_ids)?;
        let examples = safeprobe_train::data::read_examples(&path)?;
        let total = examples.len();
        let shown: Vec<PreviewRow> = examples
            .into_iter()
            .take(rows)
            .map(|e| {
                let mut conversation = e.prompt.clone();
                conversation.push(safeprobe_model::Message::new(
                    "assistant",
                    e.response.clone(),
                ));
                let (prompt, response) = tokenizer.encode_exchange(&e.prompt, &e.response)?;
                Ok(PreviewRow {
                    rendered: tokenizer.render(&conversation, false)?,
                    prompt_tokens: prompt.len(),
                    response_tokens: response.len(),
                })
            })
            .collect::<Result<_, safeprobe_model::Error>>()?;
        Ok(Preview {
            examples: total,
            rows: shown,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(preview))
}

/// A request's config: JSON null (or none) is an empty one, whose keys take their defaults.
fn config_of(config: serde_json::Value) -> serde_json::Value {
    if config.is_null() { json!({}) } else { config }
}

pub async fn create_job(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Job> {
    let Json(request) = body.map_err(crate::error::rejected)?;
    let config = config_of(request.config);
    // Validation reads data files and sizes the job: off the async threads.
    let creating = state.clone();
    let id = tokio::task::spawn_blocking(move || create(&creating, request.kind, config))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    state.runner.enqueue(id);
    Ok(Json(find_job(&state, id)?))
}

/// What a job would take, checked as `create_job` checks it, without creating it.
pub async fn estimate_job(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<JobEstimate> {
    let Json(request) = body.map_err(crate::error::rejected)?;
    let config = config_of(request.config);
    let estimated = tokio::task::spawn_blocking(move || {
        let (spec, _) = jobs::validate(request.kind, config, 0, &state.places)?;
        let mut estimate = crate::admission::preview(&spec, state.places.sizing)?;
        let store = &state.runner.store;
        estimate.time = match &spec {
            JobSpec::Train(train) => {
                let steps = jobs::planned_steps(&train.config)?;
                paced_like(&store.list()?, &train.config)
                    .map(|(step_s, job)| (step_s * steps as f64, job))
            }
            JobSpec::Compare(config) => same_comparison(&store.list()?, config),
            JobSpec::Eval(_) => None,
        };
        Ok::<_, ApiError>(estimate)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(estimated))
}

/// The step time of the newest finished training run like `run` (same model, method,
/// fine-tuning, batch and length), from its newest step, with its id.
fn paced_like(jobs: &[Job], run: &safeprobe_wire::RunConfig) -> Option<(f64, i64)> {
    jobs.iter().find_map(|job| {
        let JobSpec::Train(done) = &job.spec else {
            return None;
        };
        let c = &done.config;
        let alike = (&c.model, c.method, c.finetune, c.batch_size, c.max_len)
            == (
                &run.model,
                run.method,
                run.finetune,
                run.batch_size,
                run.max_len,
            );
        match (&job.last_step, job.status) {
            (Some(safeprobe_wire::Event::Step { step_time_s, .. }), Status::Done) if alike => {
                Some((*step_time_s, job.id))
            }
            _ => None,
        }
    })
}

/// How long the newest finished comparison of the same config (its folder aside) took, with
/// its id.
fn same_comparison(jobs: &[Job], config: &safeprobe_wire::CompareConfig) -> Option<(f64, i64)> {
    jobs.iter().find_map(|job| match (&job.spec, &job.result) {
        (JobSpec::Compare(earlier), Some(safeprobe_wire::JobResult::Compare(comparison)))
            if job.status == Status::Done =>
        {
            let mut earlier = earlier.clone();
            earlier.output_dir = config.output_dir.clone();
            (earlier == *config).then_some((comparison.seconds, job.id))
        }
        _ => None,
    })
}

/// Checks, sizes and stores a job; returns its id.
fn create(state: &AppState, kind: JobKind, config: serde_json::Value) -> Result<i64, ApiError> {
    // Validate against a placeholder id first so that a bad request leaves no job behind.
    let (spec, _) = jobs::validate(kind, config.clone(), 0, &state.places)?;
    crate::admission::check_at_creation(&spec, state.places.sizing)?;
    let store = &state.runner.store;
    let id = store.create(&spec)?;
    let checked = state
        .places
        .set_aside_stale_run_dir(id)
        .and_then(|()| jobs::validate(kind, config, id, &state.places));
    match checked {
        Ok((spec, dir)) => {
            let dir = dir.map(|d| d.display().to_string());
            store.set_spec(id, &spec, dir.as_deref())?;
            Ok(id)
        }
        Err(e) => {
            store.delete(id)?;
            Err(e)
        }
    }
}

pub async fn list_jobs(State(state): State<Arc<AppState>>) -> ApiResult<Vec<Job>> {
    Ok(Json(state.runner.store.list()?))
}

fn find_job(state: &AppState, id: i64) -> Result<Job, ApiError> {
    state
        .runner
        .store
        .get(id)?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
}

pub async fn get_job(State(state): State<Arc<AppState>>, Path(id): Path<i64>) -> ApiResult<Job> {
    let mut job = find_job(&state, id)?;
    job.answers = state.runner.store.answers(id)?;
    Ok(Json(job))
}

pub async fn cancel_job(State(state): State<Arc<AppState>>, Path(id): Path<i64>) -> ApiResult<Job> {
    state.runner.cancel(id)?;
    Ok(Json(find_job(&state, id)?))
}

/// Names a job and keeps the user's notes on it (any job, in any state).
pub async fn label_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
    body: Result<Json<JobLabel>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Job> {
    let Json(label) = body.map_err(crate::error::rejected)?;
    label.check().map_err(ApiError::InvalidField)?;
    if !state.runner.store.label(id, &label)? {
        return Err(ApiError::NotFound(format!("job {id} not found")));
    }
    Ok(Json(find_job(&state, id)?))
}

/// Requeues an interrupted, cancelled or failed job; a training run continues from its newest
/// checkpoint. The check and the requeue are one transaction, so of several resumes at once
/// exactly one queues the job and the others get 409.
pub async fn resume_job(State(state): State<Arc<AppState>>, Path(id): Path<i64>) -> ApiResult<Job> {
    let job = find_job(&state, id)?;
    let not_resumable = |status: Status| {
        ApiError::Conflict(format!(
            "job {id} is {}; only interrupted, cancelled or failed jobs can be resumed",
            status.name()
        ))
    };
    if !job.status.is_resumable() {
        return Err(not_resumable(job.status));
    }
    let mut spec = job.spec.clone();
    let mut keep_steps_to = 0;
    if let JobSpec::Train(train) = &mut spec {
        let dir = PathBuf::from(job.run_dir.clone().unwrap_or_default());
        let newest = safeprobe_train::checkpoint::latest(&dir);
        train.resume = newest.is_some();
        keep_steps_to = newest.map_or(0, |(step, _)| step as i64);
    }
    if !state.runner.store.requeue(id, &spec, keep_steps_to)? {
        let now = find_job(&state, id)?.status;
        return Err(not_resumable(now));
    }
    state.runner.enqueue(id);
    Ok(Json(find_job(&state, id)?))
}

pub async fn delete_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> ApiResult<Deleted> {
    let job = find_job(&state, id)?;
    if job.status.is_active() {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; cancel it before deleting it",
            job.status.name()
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
    Ok(Json(Deleted { deleted: id }))
}

pub async fn metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
    Query(page): Query<MetricsQuery>,
) -> ApiResult<EventPage> {
    find_job(&state, id)?;
    let limit = page.limit.clamp(1, 10_000);
    let (events, next_after) = state.runner.store.events(id, page.after, limit)?;
    Ok(Json(EventPage { events, next_after }))
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

/// A named SSE event carrying a wire type as JSON.
fn sse(name: &str, data: &impl serde::Serialize) -> SseEvent {
    SseEvent::default()
        .event(name)
        .data(serde_json::to_string(data).expect("wire types serialise"))
}

/// Streamed generation: `token` events carry text as it is produced, then one `done` (or an
/// `error`). The prompt is tokenised and sized before the stream starts, so a prompt over the
/// limit or a reply that cannot fit is an HTTP error (413, 400), not a stream that dies.
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
    if request.messages.last().is_none_or(|m| m.role != "user") {
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
    let messages: Vec<safeprobe_model::Message> = request
        .messages
        .iter()
        .map(|m| safeprobe_model::Message::new(&m.role, m.content.clone()))
        .collect();
    let messages = safeprobe_train::data::with_system(&messages, request.system.as_deref());
    let chat = Arc::new(ChatModel {
        cache: state.chat_model.clone(),
        device: state.chat_device.clone(),
        model,
        adapter,
        max_prompt_tokens: state.places.limits.max_prompt_tokens,
        sizing: state.places.sizing,
    });
    let sizing = chat.clone();
    let prompt = tokio::task::spawn_blocking(move || sizing.prompt(&messages, &sampling))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::task::spawn_blocking(move || {
        let send = |event: SseEvent| tx.blocking_send(event).is_ok();
        if let Err(e) = chat.stream(prompt, &sampling, &send) {
            send(sse(
                "error",
                &ErrorBody {
                    error: e.to_string(),
                    field: None,
                },
            ));
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx).map(Ok)))
}

/// The checkpoint a chat asks for, loaded once and kept for the next message.
struct ChatModel {
    cache: crate::ChatCache,
    device: burn::tensor::Device,
    model: PathBuf,
    adapter: Option<PathBuf>,
    /// The server's cap on a prompt's tokens.
    max_prompt_tokens: usize,
    sizing: crate::admission::Sizing,
}

impl ChatModel {
    fn key(&self) -> (PathBuf, Option<PathBuf>) {
        (self.model.clone(), self.adapter.clone())
    }

    /// The prompt's token ids, once it is known to be within the limits and its reply to fit
    /// in memory (nothing of the model's weights is loaded before that).
    fn prompt(
        &self,
        messages: &[safeprobe_model::Message],
        sampling: &safeprobe_model::Sampling,
    ) -> Result<Vec<u32>, ApiError> {
        let config = crate::admission::model_config(&self.model)?;
        if sampling.max_new_tokens >= config.max_position_embeddings {
            return Err(ApiError::Invalid(format!(
                "max_new_tokens: {} leaves no room for a prompt in this model's context of {} \
                 tokens",
                sampling.max_new_tokens, config.max_position_embeddings
            )));
        }
        let context = config
            .max_position_embeddings
            .saturating_sub(sampling.max_new_tokens);
        let limit = self.max_prompt_tokens.min(context);
        let over = |tokens: String| {
            ApiError::TooLarge(format!(
                "messages: the prompt is {tokens} tokens, over the limit of {limit} ({} on this \
                 server, and the model's context of {} less max_new_tokens {}); shorten it",
                self.max_prompt_tokens, config.max_position_embeddings, sampling.max_new_tokens
            ))
        };
        // A text far longer than the limit is refused by its length alone: tokenising 900 KB
        // took 155 MB. Twice the bound leaves room for normalisation shortening the text.
        let encode = |tokenizer: &safeprobe_model::ChatTokenizer| {
            let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
            let per_token = tokenizer.longest_token_bytes.saturating_mul(2);
            if bytes > limit.saturating_mul(per_token) {
                return Err(over(format!("at least {}", bytes / per_token)));
            }
            let prompt = tokenizer.encode_prompt(messages)?;
            if prompt.len() > limit {
                return Err(over(prompt.len().to_string()));
            }
            Ok(prompt)
        };
        let (loaded, encoded) = {
            let slot = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some((key, checkpoint)) if *key == self.key() => {
                    (true, Some(encode(&checkpoint.tokenizer)?))
                }
                _ => (false, None),
            }
        };
        let prompt = match encoded {
            Some(prompt) => prompt,
            None => encode(&safeprobe_model::ChatTokenizer::load(
                &self.model,
                &config.eos_token_ids,
            )?)?,
        };
        crate::admission::check_chat(
            &config,
            prompt.len(),
            sampling.max_new_tokens,
            loaded,
            self.sizing,
        )?;
        Ok(prompt)
    }

    /// Generates a reply to `prompt`, sending each new piece of text, then the whole.
    fn stream(
        &self,
        prompt: Vec<u32>,
        sampling: &safeprobe_model::Sampling,
        send: &impl Fn(SseEvent) -> bool,
    ) -> Result<(), ApiError> {
        let mut slot = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let key = self.key();
        if slot.as_ref().is_none_or(|(k, _)| *k != key) {
            *slot = None;
            let mut checkpoint = safeprobe_model::Checkpoint::load(&self.model, &self.device)?;
            if let Some(a) = &self.adapter {
                checkpoint.load_adapter(a)?;
            }
            *slot = Some((key, checkpoint));
        }
        let checkpoint = &slot.as_ref().expect("loaded").1;
        let mut tokens = Vec::new();
        let mut shown = String::new();
        safeprobe_model::generate::generate_streaming(
            &checkpoint.model,
            &[prompt],
            sampling,
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
                let text_added = text[shown.len()..].to_string();
                shown = text;
                text_added.is_empty() || send(sse("token", &ChatToken { text: text_added }))
            },
        )?;
        send(sse(
            "done",
            &ChatDone {
                text: shown,
                tokens: tokens.len(),
            },
        ));
        Ok(())
    }
}
