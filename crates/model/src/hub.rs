//! Models from the Hugging Face Hub: `safeprobe pull ORG/NAME` downloads a checkpoint into the
//! standard Hugging Face cache (so `transformers` finds it too), and `--model ORG/NAME` finds
//! it there without the network.
//!
//! Built on the `hf-hub` crate (its blocking client): cache layout, `HF_HOME`/`HF_ENDPOINT`,
//! resumable `.part` downloads and the progress bar are its; which files a checkpoint needs and
//! what a failure means for the user are ours.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Where and how to pull from. `Default` reads the environment as `huggingface_hub` does.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// A branch, tag or commit (default: main).
    pub revision: String,
    /// `HF_ENDPOINT`, else huggingface.co.
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, else the token `huggingface-cli login` saved in the cache.
    pub token: Option<String>,
    /// The hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    pub progress: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) => Cache::new(dir.into()),
            None => Cache::from_env(),
        };
        Self {
            revision: "main".into(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or_else(|| cache.token()),
            cache_dir: cache.path().clone(),
            progress: true,
        }
    }
}

/// Whether `name` has the shape of a Hub model id (`org/name`), as opposed to a local path.
pub fn is_repo_id(name: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(name.split_once('/'), Some((org, repo)) if ok(org) && ok(repo))
}

/// Whether `name` can be a branch, tag or commit: git's rules for a ref name
/// (`git check-ref-format`), with the characters a Hub revision uses. The revision becomes a
/// file name in the cache (`refs/<revision>`), so `..`, a leading `/` and the like must never
/// reach it.
pub fn is_revision(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
    !name.is_empty()
        && name.len() <= 255
        && name.chars().all(allowed)
        && !name.contains("..")
        && !name.contains("//")
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.ends_with(".lock")
        && !name.ends_with('.')
        && name.split('/').all(|part| !part.starts_with('.'))
}

/// The files of a repository that make a checkpoint safeprobe loads.
fn wanted(file: &str) -> bool {
    const EXACT: [&str; 7] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    ];
    !file.contains('/') && (EXACT.contains(&file) || file.ends_with(".safetensors"))
}

/// Where a pull stands, for a caller that shows it its own way (the control panel).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullProgress {
    pub file: String,
    /// Files finished so far, of `files`.
    pub files_done: usize,
    pub files: usize,
    /// Bytes of `file` on disk so far (a resumed download starts above 0), of `total`.
    pub bytes: u64,
    pub total: u64,
}

/// Adapts a progress callback to hf-hub's per-file `Progress`.
struct Reporter<'a> {
    progress: PullProgress,
    report: &'a mut dyn FnMut(&PullProgress),
}

impl hf_hub::api::Progress for Reporter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.progress.total = size as u64;
        self.progress.bytes = 0;
        (self.report)(&self.progress);
    }
    fn update(&mut self, size: usize) {
        self.progress.bytes += size as u64;
        (self.report)(&self.progress);
    }
    fn finish(&mut self) {}
}

/// Downloads `repo_id` at `options.revision` (what is already cached is not fetched again; a
/// `.part` left by an interrupted download is resumed) and returns its snapshot folder.
/// Progress goes to `report` when given, else to hf-hub's terminal bar if `options.progress`.
pub fn pull(
    repo_id: &str,
    options: &HubOptions,
    mut report: Option<&mut dyn FnMut(&PullProgress)>,
) -> Result<PathBuf> {
    if !is_repo_id(repo_id) {
        return Err(Error::Invalid(format!(
            "\"{repo_id}\" is not a Hub model id (expected ORG/NAME)"
        )));
    }
    if !is_revision(&options.revision) {
        return Err(Error::Invalid(format!(
            "revision {:?} is not a branch, tag or commit name",
            options.revision
        )));
    }
    let mut builder = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_token(options.token.clone())
        .with_progress(options.progress);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| hub_error(repo_id, options, "", e))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        options.revision.clone(),
    ));
    let info = repo
        .info()
        .map_err(|e| hub_error(repo_id, options, "", e))?;
    let mut files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| wanted(f))
        .collect();
    // config.json comes last, so its presence in the cache marks a finished pull (`cached`).
    files.sort_by_key(|f| *f == "config.json");
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(Error::Invalid(format!(
            "{repo_id}@{}: the repository has no .safetensors weights (safeprobe loads safetensors; for a .gguf file, download it and run `safeprobe import`)",
            options.revision
        )));
    }
    if !files.contains(&"config.json") {
        return Err(Error::Invalid(format!(
            "{repo_id}@{}: the repository has no config.json",
            options.revision
        )));
    }
    let cache = Cache::new(options.cache_dir.clone()).repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        options.revision.clone(),
    ));
    let mut snapshot = None;
    let count = files.len();
    for (index, file) in files.into_iter().enumerate() {
        let path = match (cache.get(file), report.as_deref_mut()) {
            (Some(path), _) => Ok(path),
            (None, Some(report)) => {
                let progress = PullProgress {
                    file: file.to_string(),
                    files_done: index,
                    files: count,
                    ..Default::default()
                };
                repo.download_with_progress(file, Reporter { progress, report })
            }
            (None, None) => repo.download(file),
        }
        .map_err(|e| hub_error(repo_id, options, file, e))?;
        if let Some(report) = report.as_deref_mut() {
            report(&PullProgress {
                file: file.to_string(),
                files_done: index + 1,
                files: count,
                ..Default::default()
            });
        }
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| Error::Invalid(format!("{repo_id}: nothing was downloaded")))
}

/// The cached snapshot of `repo_id` at `revision`, if `pull` (or `transformers`) finished
/// one there. Never touches the network.
pub fn cached(repo_id: &str, revision: &str, cache_dir: &Path) -> Option<PathBuf> {
    if !is_repo_id(repo_id) || !is_revision(revision) {
        return None;
    }
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let config = Cache::new(cache_dir.to_path_buf())
        .repo(repo)
        .get("config.json")?;
    config.parent().map(Path::to_path_buf)
}

/// What a failed request means, in the user's terms.
fn hub_error(repo_id: &str, options: &HubOptions, file: &str, error: ApiError) -> Error {
    let what = if file.is_empty() {
        format!("{repo_id}@{}", options.revision)
    } else {
        format!("{repo_id}@{}: {file}", options.revision)
    };
    let endpoint = options
        .endpoint
        .as_deref()
        .unwrap_or("https://huggingface.co");
    let message = match &error {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(401, _) | ureq::Error::Status(403, _) => format!(
                "{what}: access denied by {endpoint} ({}); the repository may be gated or private: accept its terms on the Hub and set HF_TOKEN",
                status_of(e)
            ),
            ureq::Error::Status(404, _) => {
                format!("{what}: not found on {endpoint} (404): check the name and the revision")
            }
            ureq::Error::Status(code, _) => format!("{what}: {endpoint} answered {code}"),
            ureq::Error::Transport(t) => format!(
                "{what}: could not reach {endpoint}: {t}; what was downloaded is kept, and running the command again resumes"
            ),
        },
        ApiError::IoError(e) => format!(
            "{what}: the download was interrupted ({e}); run the same command again to resume"
        ),
        other => format!("{what}: {other}"),
    };
    Error::Invalid(message)
}

fn status_of(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Status(code, _) => code.to_string(),
        ureq::Error::Transport(_) => "transport error".into(),
    }
}

#[cfg(test)]
mod revision_tests {
    use super::is_revision;

    /// Branches, tags and commits pass; anything that could leave `refs/` in the cache, or
    /// that git itself refuses as a ref name, does not.
    #[test]
    fn a_revision_is_a_git_ref_name() {
        for good in [
            "main",
            "v1.0",
            "refs/pr/3",
            "release-2024_01",
            "a1b2c3d4e5f6",
        ] {
            assert!(is_revision(good), "{good}");
        }
        for bad in [
            "",
            "../../../../x",
            "/etc",
            "main/../../x",
            ".hidden",
            "a/.b",
            "a b",
            "a//b",
            "main/",
            "x.lock",
            "v1.",
            "a\\b",
            "a:b",
            "tag@{1}",
        ] {
            assert!(!is_revision(bad), "{bad:?}");
        }
    }
}
