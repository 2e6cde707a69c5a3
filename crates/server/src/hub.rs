//! Models from the Hugging Face Hub, for the control panel: pulls run in the background with
//! their progress kept for `GET /api/models/pulls`, and a model already in the server's
//! Hugging Face cache can be named by its id (`ORG/NAME`) wherever a request takes a model.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use safeprobe_model::hub::{self, HubOptions, PullProgress};
use safeprobe_wire::{PullRequest, PullState, PullStatus};

use crate::AppState;
use crate::api::ApiResult;
use crate::error::ApiError;

/// The pulls this server started, newest last.
pub type Pulls = Arc<Mutex<Vec<PullStatus>>>;

/// `POST /api/models/pull`: starts downloading, answers at once with the pull's status.
pub async fn start(
    State(state): State<Arc<AppState>>,
    Json(request): Json<PullRequest>,
) -> ApiResult<PullStatus> {
    if !hub::is_repo_id(&request.repo) {
        return Err(ApiError::Invalid(format!(
            "repo: {:?} is not a Hub model id (expected ORG/NAME)",
            request.repo
        )));
    }
    let revision = request.revision.unwrap_or_else(|| "main".into());
    if !hub::is_revision(&revision) {
        return Err(ApiError::Invalid(format!(
            "revision: {revision:?} is not a branch, tag or commit name"
        )));
    }
    let options = HubOptions {
        revision,
        progress: false,
        ..state.places.hub.clone()
    };
    let status = PullStatus::started(&request.repo, &options.revision);
    let index = {
        let mut pulls = state.pulls.lock().unwrap();
        let running = |p: &PullStatus| {
            p.repo == status.repo && p.revision == status.revision && p.state == PullState::Running
        };
        if pulls.iter().any(running) {
            return Err(ApiError::Conflict(format!(
                "{}@{} is already being pulled",
                status.repo, status.revision
            )));
        }
        pulls.push(status.clone());
        pulls.len() - 1
    };
    let pulls = state.pulls.clone();
    std::thread::spawn(move || {
        let update = |edit: &dyn Fn(&mut PullStatus)| edit(&mut pulls.lock().unwrap()[index]);
        let mut report = |p: &PullProgress| {
            update(&|s| {
                s.file = p.file.clone();
                s.files_done = p.files_done;
                s.files = p.files;
                s.bytes = p.bytes;
                s.total = p.total;
            })
        };
        let result = hub::pull(&request.repo, &options, Some(&mut report));
        update(&|s| match &result {
            Ok(_) => s.state = PullState::Done,
            Err(e) => {
                s.state = PullState::Failed;
                s.error = Some(e.to_string());
            }
        });
    });
    Ok(Json(status))
}

/// `GET /api/models/pulls`.
pub async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Vec<PullStatus>> {
    Ok(Json(state.pulls.lock().unwrap().clone()))
}

/// Every model finished in the Hugging Face cache, as (ORG/NAME, snapshot folder).
pub fn cached_models(options: &HubOptions) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(&options.cache_dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let folder = e.file_name().to_string_lossy().into_owned();
            let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
            let repo = format!("{org}/{name}");
            let dir = hub::cached(&repo, &options.revision, &options.cache_dir)?;
            Some((repo, dir))
        })
        .collect();
    out.sort();
    out
}
