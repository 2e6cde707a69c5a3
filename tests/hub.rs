//! `safeprobe pull` against a local mock of the Hub's HTTP API (no network): the cache layout
//! `transformers` shares, offline lookup, tokens, 404/401, and resuming a broken download.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[path = "support/mock_hub.rs"]
mod mock_hub;
use mock_hub::{MockHub, MockRepo, SHA, TOKEN, repo_of};

use burn::tensor::Device;
use safeprobe_model::Checkpoint;
use safeprobe_model::hub::{HubOptions, cached, is_repo_id, pull};

fn tiny_repo() -> MockRepo {
    repo_of(&fixture("tiny-tied"))
}

fn options(hub: &MockHub, cache: &Path, token: Option<&str>) -> HubOptions {
    HubOptions {
        revision: "main".into(),
        endpoint: Some(hub.endpoint.clone()),
        token: token.map(str::to_string),
        cache_dir: cache.to_path_buf(),
        progress: false,
    }
}

fn same_files(snapshot: &Path, original: &Path) {
    for entry in std::fs::read_dir(original).unwrap() {
        let entry = entry.unwrap();
        let pulled: PathBuf = snapshot.join(entry.file_name());
        assert_eq!(
            std::fs::read(&pulled).unwrap(),
            std::fs::read(entry.path()).unwrap(),
            "{}",
            pulled.display()
        );
    }
}

#[test]
fn a_pull_lands_in_the_hugging_face_cache_and_is_found_offline() {
    let hub = MockHub::start(HashMap::from([("org/tiny", tiny_repo())]));
    let cache = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let snapshot = pull(
        "org/tiny",
        &options(&hub, cache.path(), None),
        Some(&mut |p: &safeprobe_model::hub::PullProgress| seen.push(p.clone())),
    )
    .unwrap();
    // Progress: every file ends counted, and the weights' bytes are reported up to their size.
    let last = seen.last().unwrap();
    assert_eq!((last.files_done, last.files), (5, 5), "{last:?}");
    let weights = std::fs::metadata(fixture("tiny-tied/model.safetensors"))
        .unwrap()
        .len();
    assert!(
        seen.iter()
            .any(|p| p.file == "model.safetensors" && p.bytes == weights && p.total == weights),
        "{seen:?}"
    );

    // huggingface_hub's layout: models--ORG--NAME/{refs/main, snapshots/SHA, blobs}.
    let repo_dir = cache.path().join("models--org--tiny");
    assert_eq!(snapshot, repo_dir.join("snapshots").join(SHA));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA
    );
    assert!(std::fs::read_dir(repo_dir.join("blobs")).unwrap().count() >= 5);
    same_files(&snapshot, &fixture("tiny-tied"));
    assert!(
        !snapshot.join("README.md").exists(),
        "only checkpoint files are pulled"
    );
    Checkpoint::load(&snapshot, &Device::flex()).unwrap();

    // Found again without the network, and a second pull downloads nothing.
    assert_eq!(
        cached("org/tiny", "main", cache.path()),
        Some(snapshot.clone())
    );
    assert_eq!(cached("org/other", "main", cache.path()), None);
    let before = hub.downloads("model.safetensors").len();
    assert_eq!(before, 1);
    pull("org/tiny", &options(&hub, cache.path(), None), None).unwrap();
    assert_eq!(hub.downloads("model.safetensors").len(), before);
}

#[test]
fn missing_and_gated_repositories_are_explained() {
    let mut gated = tiny_repo();
    gated.gated = true;
    let hub = MockHub::start(HashMap::from([("org/gated", gated)]));
    let cache = tempfile::tempdir().unwrap();

    let error = pull("org/nothing", &options(&hub, cache.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("org/nothing@main") && error.contains("not found") && error.contains("404"),
        "{error}"
    );

    let error = pull("org/gated", &options(&hub, cache.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("access denied") && error.contains("401") && error.contains("HF_TOKEN"),
        "{error}"
    );
    let error = pull(
        "org/gated",
        &options(&hub, cache.path(), Some("hf_wrong")),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("401"), "{error}");

    let snapshot = pull("org/gated", &options(&hub, cache.path(), Some(TOKEN)), None).unwrap();
    same_files(&snapshot, &fixture("tiny-tied"));

    let error = pull("not-an-id", &options(&hub, cache.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("ORG/NAME"), "{error}");
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let mut flaky = tiny_repo();
    flaky.breaks_once = Some("model.safetensors".into());
    let hub = MockHub::start(HashMap::from([("org/flaky", flaky)]));
    let cache = tempfile::tempdir().unwrap();

    let error = pull("org/flaky", &options(&hub, cache.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("again to resume"),
        "{error}"
    );
    assert_eq!(
        cached("org/flaky", "main", cache.path()),
        None,
        "nothing half-done is offered"
    );

    let snapshot = pull("org/flaky", &options(&hub, cache.path(), None), None).unwrap();
    same_files(&snapshot, &fixture("tiny-tied"));
    let ranges = hub.downloads("model.safetensors");
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    let resumed_at: usize = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap();
    let size = std::fs::metadata(fixture("tiny-tied/model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        resumed_at > 0 && resumed_at <= size / 2,
        "the second request asked for {:?} of {size} bytes",
        ranges[1]
    );
}

#[test]
fn repo_ids_and_paths_are_told_apart() {
    assert!(is_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
    assert!(is_repo_id("org/name_v1.2"));
    for path in [
        "models/qwen/extra",
        "./qwen",
        "../x",
        "/abs/path",
        "qwen",
        "a/",
        "../..",
    ] {
        assert!(!is_repo_id(path), "{path}");
    }
}
