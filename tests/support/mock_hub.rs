//! A local mock of the Hugging Face Hub's HTTP API, enough for hf-hub's blocking client:
//! repository info, ranged file downloads with the headers it reads, 404 for unknown
//! repositories, 401 for gated ones without the token, and a download that breaks once.
//! Shared by tests/hub.rs and tests/server.rs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
pub const TOKEN: &str = "hf_secret";

/// One repository the mock serves.
#[derive(Clone)]
pub struct MockRepo {
    pub files: HashMap<String, Vec<u8>>,
    /// Requests must carry `Authorization: Bearer TOKEN`.
    pub gated: bool,
    /// The first download of this file sends half its bytes, then hangs up.
    pub breaks_once: Option<String>,
}

#[derive(Default)]
struct Log {
    /// (path, Range header) of every request.
    requests: Vec<(String, Option<String>)>,
    broken: bool,
}

pub struct MockHub {
    pub endpoint: String,
    log: Arc<Mutex<Log>>,
}

impl MockHub {
    pub fn start(repos: HashMap<&'static str, MockRepo>) -> Self {
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

    pub fn downloads(&self, file: &str) -> Vec<Option<String>> {
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

/// The files of a checkpoint folder, as a repository.
pub fn repo_of(dir: &std::path::Path) -> MockRepo {
    let files = std::fs::read_dir(dir)
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
