//! `safeprobe serve`: the web control panel's server. axum on tokio; jobs run one at a time
//! on the server's device, each in a process of its own (`safeprobe job`) running the same
//! library code as the CLI, so that nothing a job does can take the server down; a SQLite file in the
//! data directory keeps jobs, configs, metric events and answers across restarts; the
//! leptos UI is embedded in the binary.

pub mod admission;
pub mod api;
mod assets;
pub mod error;
pub mod files;
pub mod guard;
pub mod hub;
pub mod jobs;
pub mod paths;
pub mod runner;
pub mod store;
mod tar;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use burn::tensor::Device;
use safeprobe_model::device::Selected;

use admission::Sizing;
pub use error::ApiError;
use guard::HostPolicy;
use jobs::{Limits, Places};
use paths::Roots;
use runner::{Runner, WorkerCommand};
use store::Store;

/// Request bodies larger than this are refused (413).
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// Required on every API call and the event stream when set; required to bind to a
    /// non-loopback address.
    pub token: Option<String>,
    /// Holds safeprobe.db and runs/.
    pub data_dir: PathBuf,
    /// Directories requests may name models in.
    pub model_dirs: Vec<PathBuf>,
    /// Directories requests may name data files (and adapters) in; the data directory is one.
    pub dataset_dirs: Vec<PathBuf>,
    /// Host names besides the loopback names and the bound address that requests may be
    /// addressed to (a reverse proxy's or the machine's name).
    pub allowed_hosts: Vec<String>,
    /// What a job may ask for: steps, checkpoints kept.
    pub limits: Limits,
    /// The largest dataset upload, in bytes.
    pub max_upload_bytes: usize,
    /// The `--device` the server was started with: each job's process selects it again.
    pub device: String,
    /// The program jobs run in (`<program> job --device ...`): the server's own binary.
    pub worker_program: PathBuf,
}

impl ServerConfig {
    /// Refuses settings that would expose the server without a token.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(token) = self.token.as_deref().filter(|t| !t.is_empty())
            && (token.trim().is_empty() || token.trim() != token || token.len() < 8)
        {
            return Err(ApiError::Invalid(
                "--token: an access token must be at least 8 characters, with no leading or \
                 trailing whitespace (a blank token protects nothing)"
                    .into(),
            ));
        }
        if !self.bind.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::Invalid(format!(
                "refusing to listen on {} without an access token: anyone who can reach this \
                 address could run jobs and read answers. Pass --token (or SAFEPROBE_TOKEN), \
                 or bind to 127.0.0.1",
                self.bind
            )));
        }
        Ok(())
    }
}

/// The model chat used last, kept loaded: (model, adapter) and the checkpoint.
pub type ChatCache = Arc<Mutex<Option<((PathBuf, Option<PathBuf>), safeprobe_model::Checkpoint)>>>;

pub struct AppState {
    pub runner: Arc<Runner>,
    pub places: Places,
    pub token: Option<String>,
    pub hosts: HostPolicy,
    pub max_upload_bytes: usize,
    pub device_description: String,
    pub chat_device: Device,
    pub chat_model: ChatCache,
    pub pulls: hub::Pulls,
    /// Held while a merged export is written: two exports of one run would write the same
    /// files at once (one read the other's half-written weights).
    pub exports: Arc<tokio::sync::Mutex<()>>,
}

/// Opens the store, recovers interrupted jobs and starts the worker.
pub fn state(
    config: &ServerConfig,
    device: Device,
    device_description: String,
    sizing: Sizing,
) -> Result<Arc<AppState>, ApiError> {
    let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", config.data_dir.display()));
    std::fs::create_dir_all(config.data_dir.join("runs")).map_err(io)?;
    let data_dir = config.data_dir.canonicalize().map_err(io)?;
    let store = Arc::new(Store::open(&data_dir.join("safeprobe.db"))?);
    // The built-in data, where forms and presets can name it (builtin/reverse-train.jsonl, ...).
    for task in safeprobe_eval::tasks::Task::ALL {
        safeprobe_eval::builtin::write(
            &data_dir.join("builtin"),
            task,
            safeprobe_eval::demo_model::DATA_SEED,
        )?;
    }
    let mut dataset_dirs = config.dataset_dirs.clone();
    dataset_dirs.push(data_dir.clone());
    let places = Places {
        models: Roots::new("model", &config.model_dirs),
        data: Roots::new("data", &dataset_dirs),
        data_dir: data_dir.clone(),
        runs_dir: data_dir.join("runs"),
        limits: config.limits.clone(),
        hub: safeprobe_model::hub::HubOptions::default(),
        sizing,
    };
    let worker = WorkerCommand {
        program: config.worker_program.clone(),
        device: config.device.clone(),
        logs_dir: data_dir.join("logs"),
        job_memory: config.limits.job_memory,
    };
    Ok(Arc::new(AppState {
        runner: Runner::start(store, worker)?,
        places,
        token: config.token.clone().filter(|t| !t.is_empty()),
        hosts: HostPolicy::new(config.bind, &config.allowed_hosts),
        max_upload_bytes: config.max_upload_bytes,
        device_description,
        chat_device: device,
        chat_model: Arc::new(Mutex::new(None)),
        pulls: Default::default(),
        exports: Default::default(),
    }))
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_upload = state.max_upload_bytes;
    let api = Router::new()
        .route("/device", get(api::device))
        .route("/forms/run", get(api::run_form))
        .route("/forms/compare", get(api::compare_form))
        .route("/forms/eval", get(api::eval_form))
        .route("/models", get(api::models))
        .route("/models/pull", post(hub::start))
        .route("/models/pulls", get(hub::list))
        .route(
            "/datasets",
            get(api::datasets)
                .post(files::upload)
                .layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/datasets/preview", get(api::preview))
        .route("/jobs", get(api::list_jobs).post(api::create_job))
        .route("/jobs/estimate", post(api::estimate_job))
        .route("/jobs/{id}", get(api::get_job).delete(api::delete_job))
        .route("/jobs/{id}/cancel", post(api::cancel_job))
        .route("/jobs/{id}/resume", post(api::resume_job))
        .route("/jobs/{id}/label", post(api::label_job))
        .route("/jobs/{id}/metrics", get(api::metrics))
        .route("/jobs/{id}/adapter.zip", get(files::adapter_zip))
        .route("/jobs/{id}/export", post(files::export))
        .route("/jobs/{id}/merged.tar", get(files::merged_tar))
        .route("/events", get(api::events))
        .route("/chat", post(api::chat))
        .fallback(|| async { ApiError::NotFound("no such API endpoint".into()) })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_token,
        ));
    // Outermost first: the Host check, then the cross-site check, then the token (per route).
    Router::new()
        .nest("/api", api)
        .fallback(assets::serve)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::check_length,
        ))
        .layer(middleware::from_fn(guard::check_origin))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::check_host,
        ))
        .layer(request_log())
        .with_state(state)
}

/// One log line per request (method, path, status, milliseconds) through tower-http's trace
/// layer. The span names the path only: the query may carry the access token.
fn request_log() -> tower_http::trace::TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&axum::http::Request<axum::body::Body>) -> tracing::Span + Clone,
    tower_http::trace::DefaultOnRequest,
    tower_http::trace::DefaultOnResponse,
> {
    use tower_http::trace::{DefaultOnRequest, DefaultOnResponse, TraceLayer};
    TraceLayer::new_for_http()
        .make_span_with(|request: &axum::http::Request<axum::body::Body>| {
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
        })
        .on_request(DefaultOnRequest::new().level(tracing::Level::DEBUG))
        .on_response(
            DefaultOnResponse::new()
                .level(tracing::Level::INFO)
                .latency_unit(tower_http::LatencyUnit::Millis),
        )
}

/// Prints the request log on stderr (once per process; a second call changes nothing).
fn start_request_log() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .try_init();
}

/// Serves until the process is stopped. On Ctrl-C (or SIGTERM) the running job stops at its
/// next step with a checkpoint and is marked interrupted, ready for Resume.
pub async fn serve(config: ServerConfig, selected: Selected) -> Result<(), ApiError> {
    config.check()?;
    start_request_log();
    let sizing = Sizing::of(&selected, config.limits.job_memory);
    let state = state(
        &config,
        selected.device.clone(),
        selected.describe(),
        sizing,
    )?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot listen on {}: {e}", config.bind)))?;
    let address = listener
        .local_addr()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    println!("safeprobe is serving on http://{address}/");
    let runner = state.runner.clone();
    // Open event streams never end by themselves, so the server does not wait for its
    // connections: it stops the job and exits.
    tokio::select! {
        served = axum::serve(listener, router(state)) => served.map_err(|e| ApiError::Internal(e.to_string())),
        () = stop_signal() => {
            eprintln!("stopping: the running job checkpoints at its next step (Resume continues it)");
            tokio::task::spawn_blocking(move || runner.shutdown(std::time::Duration::from_secs(120)))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))
        }
    }
}

/// Ctrl-C, or SIGTERM where there is one.
async fn stop_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// `serve` on a new multi-threaded tokio runtime, for callers without one (the CLI).
pub fn serve_blocking(config: ServerConfig, selected: Selected) -> Result<(), ApiError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ApiError::Internal(format!("cannot start the async runtime: {e}")))?
        .block_on(serve(config, selected))
}
