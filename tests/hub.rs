//! `safeprobe pull` against a local mock of the Hub's HTTP API (no network): the cache layout
//! `transformers` shares, offline lookup, tokens, 404/401, and resuming a broken download.

mod common;
use common::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::Device;
use safeprobe_model::Checkpoint;
use safeprobe_model::hub::{HubOptions, cached, is_repo_id, pull};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_secret";

/// One repository the mock serves.
#[derive(Clone)]
struct MockRepo {
    files: HashMap<String, Vec<u8>>,
    /// Requests must carry `Authorization: Bearer TOKEN`.
    gated: bool,
    /// The first download of this file sends half its bytes, then hangs up.
    breaks_once: Option<String>,
}

#[derive(Default)]
struct Log {
    /// (path, Range header) of every request.
    requests: Vec<(String, Option<String>)>,
    broken: bool,
}

struct MockHub {
    endpoint: String,
    log: Arc<Mutex<Log>>,
}

impl MockHub {
    fn start(repos: HashMap<&'static str, MockRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (repos, log) = (repos.clone(), shared.clone());
                std::thread::spawn(move || answer(stream, &repos, &log));
            }
        });
        Self { endpoint, log }
    }

    fn downloads(&self, file: &str) -> Vec<Option<String>> {
        let log = self.log.lock().unwrap();
        log.requests
            .iter()
            .filter(|(path, range)| {
                path.ends_with(&format!("/{file}")) && range.as_deref() != Some("bytes=0-0")
            })
            .map(|(_, range)| range.clone())
            .collect()
    }
}

fn answer(mut stream: TcpStream, repos: &HashMap<&str, MockRepo>, log: &Mutex<Log>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let range = headers.get("range").cloned();
    log.lock()
        .unwrap()
        .requests
        .push((path.clone(), range.clone()));

    let reply = |stream: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    // /api/models/ORG/NAME/revision/REV or /ORG/NAME/resolve/REV/FILE
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (repo_id, rest) = match parts.as_slice() {
        ["api", "models", org, name, rest @ ..] => (format!("{org}/{name}"), rest),
        [org, name, rest @ ..] => (format!("{org}/{name}"), rest),
        _ => return reply(&mut stream, "404 Not Found", "", b"{}"),
    };
    let Some(repo) = repos.get(repo_id.as_str()) else {
        return reply(
            &mut stream,
            "404 Not Found",
            "",
            b"{\"error\":\"Repository not found\"}",
        );
    };
    if repo.gated && headers.get("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return reply(
            &mut stream,
            "401 Unauthorized",
            "",
            b"{\"error\":\"gated\"}",
        );
    }
    match rest {
        ["revision", "main"] => {
            let mut names: Vec<&String> = repo.files.keys().collect();
            names.sort();
            let siblings: Vec<_> = names
                .iter()
                .map(|n| serde_json::json!({"rfilename": n}))
                .chain([serde_json::json!({"rfilename": "README.md"})])
                .collect();
            let body = serde_json::json!({"sha": SHA, "siblings": siblings}).to_string();
            reply(&mut stream, "200 OK", "", body.as_bytes());
        }
        ["resolve", "main", file] => {
            let Some(bytes) = repo.files.get(*file) else {
                return reply(&mut stream, "404 Not Found", "", b"{}");
            };
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let end = match range.as_deref() {
                Some("bytes=0-0") => 1,
                _ => bytes.len(),
            };
            let extra = format!(
                "Content-Range: bytes {start}-{}/{}\r\nETag: \"{:016x}\"\r\nX-Repo-Commit: {SHA}\r\n",
                end - 1,
                bytes.len(),
                fnv(bytes)
            );
            let body = &bytes[start..end];
            let mut log = log.lock().unwrap();
            if repo.breaks_once.as_deref() == Some(*file) && end > 1 && !log.broken {
                log.broken = true;
                drop(log);
                // Announce the whole body, send half of it, hang up.
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[..body.len() / 2]);
                let _ = stream.flush();
                return;
            }
            drop(log);
            reply(&mut stream, "206 Partial Content", &extra, body);
        }
        _ => reply(&mut stream, "404 Not Found", "", b"{}"),
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn tiny_repo() -> MockRepo {
    let files = std::fs::read_dir(fixture("tiny-tied"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    MockRepo {
        files,
        gated: false,
        breaks_once: None,
    }
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
    let snapshot = pull("org/tiny", &options(&hub, cache.path(), None)).unwrap();

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
    pull("org/tiny", &options(&hub, cache.path(), None)).unwrap();
    assert_eq!(hub.downloads("model.safetensors").len(), before);
}

#[test]
fn missing_and_gated_repositories_are_explained() {
    let mut gated = tiny_repo();
    gated.gated = true;
    let hub = MockHub::start(HashMap::from([("org/gated", gated)]));
    let cache = tempfile::tempdir().unwrap();

    let error = pull("org/nothing", &options(&hub, cache.path(), None))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("org/nothing@main") && error.contains("not found") && error.contains("404"),
        "{error}"
    );

    let error = pull("org/gated", &options(&hub, cache.path(), None))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("access denied") && error.contains("401") && error.contains("HF_TOKEN"),
        "{error}"
    );
    let error = pull("org/gated", &options(&hub, cache.path(), Some("hf_wrong")))
        .unwrap_err()
        .to_string();
    assert!(error.contains("401"), "{error}");

    let snapshot = pull("org/gated", &options(&hub, cache.path(), Some(TOKEN))).unwrap();
    same_files(&snapshot, &fixture("tiny-tied"));

    let error = pull("not-an-id", &options(&hub, cache.path(), None))
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

    let error = pull("org/flaky", &options(&hub, cache.path(), None))
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

    let snapshot = pull("org/flaky", &options(&hub, cache.path(), None)).unwrap();
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
