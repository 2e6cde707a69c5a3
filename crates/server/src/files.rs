//! Files in and out of the server: datasets uploaded from the browser, a run's adapter as a
//! zip, and a run merged into a full checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use safeprobe_model::weights::SaveDtype;
use safeprobe_wire::{ExportRequest, Exported, Job, JobKind, Status, Uploaded};

use crate::AppState;
use crate::error::ApiError;

/// Where uploads go, inside the data directory (a data root, so jobs can name them).
pub const UPLOADS: &str = "uploads";

/// The extensions a data file may have.
pub const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "json", "parquet", "csv"];

#[derive(serde::Deserialize)]
pub struct UploadQuery {
    /// Replace a file of the same name.
    #[serde(default)]
    replace: bool,
}

/// `POST /api/datasets`: one multipart file, streamed to disk, checked to be training
/// examples, safety pairs or a prompt set, then put in place under `uploads/`.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Query(query): Query<UploadQuery>,
    mut form: Multipart,
) -> Result<Json<Uploaded>, ApiError> {
    let dir = state.places.data_dir.join(UPLOADS);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
    let mut field = form
        .next_field()
        .await
        .map_err(multipart_error)?
        .ok_or_else(|| ApiError::Invalid("file: the form has no file".into()))?;
    let name = upload_name(field.file_name().unwrap_or_default())?;
    let target = dir.join(&name);
    if target.exists() && !query.replace {
        return Err(ApiError::Conflict(format!(
            "file: {UPLOADS}/{name} exists; upload with ?replace=true to replace it"
        )));
    }
    // Streamed to a hidden temporary file of its own (deleted if anything fails, the client
    // goes away included), so a half-received or invalid file never shows.
    let internal = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", dir.display()));
    let extension = Path::new(&name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let mut partial = tempfile::Builder::new()
        .prefix(".upload-")
        .suffix(&format!(".{extension}"))
        .tempfile_in(&dir)
        .map_err(internal)?;
    let mut bytes = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        bytes += chunk.len() as u64;
        partial.write_all(&chunk).map_err(internal)?;
    }
    partial.as_file().sync_all().map_err(internal)?;
    let path = partial.path().to_path_buf();
    let (records, holds) = tokio::task::spawn_blocking(move || what_it_holds(&path))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        // Name the file the user sent, not the temporary one.
        .map_err(|e| {
            let message = e
                .to_string()
                .replace(&partial.path().display().to_string(), &name);
            match e {
                ApiError::TooLarge(_) => ApiError::TooLarge(message),
                _ => ApiError::Invalid(message),
            }
        })?;
    let placed = if query.replace {
        partial.persist(&target).map_err(|e| e.error)
    } else {
        partial.persist_noclobber(&target).map_err(|e| e.error)
    };
    placed.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => ApiError::Conflict(format!(
            "file: {UPLOADS}/{name} exists; upload with ?replace=true to replace it"
        )),
        _ => internal(e),
    })?;
    Ok(Json(Uploaded {
        name: format!("{UPLOADS}/{name}"),
        bytes,
        records,
        holds: holds.into(),
    }))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!("file: {}", e.body_text()))
    } else {
        ApiError::Invalid(format!("file: {}", e.body_text()))
    }
}

/// The name an uploaded file is stored under: its own base name, if that is a plain name
/// with a data file's extension.
fn upload_name(sent: &str) -> Result<String, ApiError> {
    let base = sent.rsplit(['/', '\\']).next().unwrap_or_default();
    let plain = !base.is_empty()
        && !base.starts_with('.')
        && base.len() <= 128
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let extension = Path::new(base)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    if !plain || !DATA_EXTENSIONS.contains(&extension) {
        return Err(ApiError::Invalid(format!(
            "file: {sent:?} must be a plain file name (letters, digits, . - _) ending in .jsonl, .json, .parquet or .csv"
        )));
    }
    Ok(base.to_string())
}

/// The largest CSV prompt set an upload may be (a CSV is parsed whole; AdvBench is 100 KB).
const MAX_CSV_BYTES: u64 = 64 << 20;

/// Reads a file as training examples, else safety pairs, else a harmful prompt set; returns
/// how many records it holds and which. Records are read one at a time, so the memory this
/// takes is that of the largest record, whatever the number of records. When it is none of
/// them, the examples reader's error says why (it names the line).
fn what_it_holds(path: &Path) -> Result<(usize, &'static str), ApiError> {
    if path.extension().and_then(|e| e.to_str()) == Some("csv") {
        let bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
        if bytes > MAX_CSV_BYTES {
            return Err(ApiError::TooLarge(format!(
                "file: a CSV prompt set of {bytes} bytes is over the {MAX_CSV_BYTES}-byte limit \
                 for CSV; send it as JSONL"
            )));
        }
        let prompts = safeprobe_eval::prompts::load(path)?;
        return Ok((prompts.len(), "prompts"));
    }
    let none = |why: String| {
        ApiError::Invalid(format!(
            "not training examples, safety pairs or harmful prompts: {why}"
        ))
    };
    let (mut examples, mut pairs, mut prompts) = (true, true, true);
    let mut why_not_examples = None;
    let counted = safeprobe_train::data::for_each_record(path, |line, record| {
        if examples && let Err(e) = safeprobe_train::data::example_from(path, line, &record) {
            examples = false;
            why_not_examples = Some(e.to_string());
        }
        pairs = pairs && safeprobe_train::data::pair_from(path, line, &record).is_ok();
        prompts = prompts && safeprobe_eval::prompts::is_prompt_record(&record);
        if examples || pairs || prompts {
            Ok(())
        } else {
            // Stops the reading; the reason is the examples reader's.
            Err(safeprobe_train::TrainError::Config(String::new()))
        }
    });
    let records = match counted {
        Ok(0) => return Err(none(format!("{}: no records", path.display()))),
        Ok(n) => n,
        Err(safeprobe_train::TrainError::Config(_)) => {
            return Err(none(why_not_examples.unwrap_or_default()));
        }
        Err(e) => return Err(none(e.to_string())),
    };
    let holds = if examples {
        "examples"
    } else if pairs {
        "pairs"
    } else {
        "prompts"
    };
    Ok((records, holds))
}

/// A finished training job's run directory and whether it trained a LoRA adapter.
fn finished_run(state: &AppState, id: i64) -> Result<(Job, PathBuf), ApiError> {
    let job = state
        .runner
        .store
        .get(id)?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
    if job.kind() != JobKind::Train || job.status != Status::Done {
        return Err(ApiError::Conflict(format!(
            "job {id} is a {} job that is {}; only finished training runs can be exported",
            job.kind().name(),
            job.status.name()
        )));
    }
    let dir = PathBuf::from(job.run_dir.clone().unwrap_or_default());
    Ok((job, dir))
}

/// `GET /api/jobs/{id}/adapter.zip`: the run's PEFT adapter folder as a zip.
pub async fn adapter_zip(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<i64>,
) -> Result<Response, ApiError> {
    let (_, run_dir) = finished_run(&state, id)?;
    let adapter = run_dir.join("adapter");
    if !adapter.is_dir() {
        return Err(ApiError::Conflict(format!(
            "job {id} fine-tuned every weight and has no adapter; export it as a checkpoint instead"
        )));
    }
    let zipped = tokio::task::spawn_blocking(move || zip_folder(&adapter))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"job-{id}-adapter.zip\""),
            ),
        ],
        zipped,
    )
        .into_response())
}

/// `GET /api/jobs/{id}/merged.tar?dtype=bf16`: the checkpoint an export wrote, as a tar
/// archive streamed from disk a piece at a time (a merged model may be many gigabytes), its
/// length known up front.
pub async fn merged_tar(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<i64>,
    Query(request): Query<ExportRequest>,
) -> Result<Response, ApiError> {
    SaveDtype::parse(&request.dtype).map_err(|e| ApiError::field("dtype", e.to_string()))?;
    let (_, run_dir) = finished_run(&state, id)?;
    let dir = run_dir.join(format!("merged-{}", request.dtype));
    if !dir.join("config.json").is_file() {
        return Err(ApiError::Conflict(format!(
            "job {id} has no {} checkpoint yet; export it first",
            request.dtype
        )));
    }
    let folder = format!("job-{id}-merged-{}", request.dtype);
    let members = crate::tar::members(&dir, &folder)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
    let length = crate::tar::archive_len(&members);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        let sent = crate::tar::stream(&members, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
        if let Err(e) = sent {
            tracing::error!(%e, "merged checkpoint download");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{folder}.tar\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// The files of a folder (not its subfolders) in a zip, deflated.
fn zip_folder(dir: &Path) -> Result<Vec<u8>, ApiError> {
    let failed = |e: &dyn std::fmt::Display| {
        ApiError::Internal(format!("{}: cannot zip: {e}", dir.display()))
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| failed(&e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        zip.start_file(name, options).map_err(|e| failed(&e))?;
        let bytes = std::fs::read(&file).map_err(|e| failed(&e))?;
        zip.write_all(&bytes).map_err(|e| failed(&e))?;
    }
    Ok(zip.finish().map_err(|e| failed(&e))?.into_inner())
}

/// `POST /api/jobs/{id}/export`: the run merged into a full Hugging Face checkpoint in
/// `<run>/merged-<dtype>` by `safeprobe export` itself, in a process of its own (a merge holds
/// the whole model in memory: a large one must not take the server with it). Exports run one
/// at a time (two of the same run would write the same files).
pub async fn export(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<i64>,
    body: Result<Json<ExportRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Exported>, ApiError> {
    let Json(request) = body.map_err(crate::error::rejected)?;
    SaveDtype::parse(&request.dtype).map_err(|e| ApiError::Invalid(format!("dtype: {e}")))?;
    let (job, run_dir) = finished_run(&state, id)?;
    // A LoRA run merges its adapter into the base model; a full fine-tune re-exports its model.
    let adapter = run_dir.join("adapter");
    let (model, adapter) = if adapter.is_dir() {
        let base = job.spec.model().unwrap_or(Path::new(""));
        (base.to_path_buf(), Some(adapter))
    } else {
        (run_dir.join("model"), None)
    };
    let out = run_dir.join(format!("merged-{}", request.dtype));
    let mut args: Vec<String> = vec!["export".into(), "--model".into()];
    args.push(model.display().to_string());
    if let Some(a) = &adapter {
        args.extend(["--adapter".into(), a.display().to_string()]);
    }
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(["--dtype".into(), request.dtype.clone()]);
    let command = format!("safeprobe {}", args.join(" "));
    let worker = state.runner.worker().clone();
    args.extend(["--device".into(), worker.device.clone()]);
    // Held by the export itself, so that a client that goes away does not release it while
    // the process still writes.
    let one_at_a_time = state.exports.clone().lock_owned().await;
    let output = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = one_at_a_time;
        std::process::Command::new(&worker.program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("cannot start `{command}`: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ApiError::Internal(format!(
            "`{command}` failed ({}): {}",
            output.status,
            tail.join("\n")
        )));
    }
    Ok(Json(Exported {
        path: out.display().to_string(),
        command,
    }))
}
