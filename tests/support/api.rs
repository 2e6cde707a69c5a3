//! A client of the real `safeprobe serve` binary for the API tests: start it on an ephemeral
//! port, call it with the token, poll its jobs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "serve.rs"]
mod serve;

pub const TOKEN: &str = "test-token-123";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(data_dir, args, &[])
    }

    /// A server with these environment variables (its jobs' processes inherit them).
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let (child, base) =
            serve::spawn_with_env(data_dir, TOKEN, &[&fixtures().join("data")], args, env);
        Self { child, base }
    }

    /// A hand-made HTTP/1.1 request, so that Host, Origin and the body's type are exactly as
    /// given (an HTTP client would set some of them itself). Returns the status and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        use std::io::{Read, Write};
        let address = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        // A given Content-Length announces a body larger than the one sent (the limit tests).
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            request.push_str(&format!("Host: {address}\r\n"));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        // The server may answer and close before reading all of a refused body.
        let _ = stream.write_all(request.as_bytes());
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        answer(
            ureq::get(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .call(),
        )
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        answer(
            ureq::post(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .send_json(body),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        answer(
            ureq::delete(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .call(),
        )
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Polls a job until `done(job)` holds.
    pub fn wait_for(&self, id: i64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let (_, job) = self.get(&format!("/api/jobs/{id}"));
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "timed out waiting for {what}: {job}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// A short SAP run on the fixtures' data: `steps` steps, a checkpoint every 3.
pub fn train_config(steps: usize) -> Value {
    json!({
        "train_data": "train.jsonl",
        "safety_data": "safety.jsonl",
        "method": "sap",
        "max_steps": steps,
        "batch_size": 2,
        "safety_batch_size": 2,
        "lr": 1e-3,
        "checkpoint_every": 3,
        "max_len": 64,
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
        "sap": {"rho": 0.01, "temperature": 100.0}
    })
}

/// Deep-merges `patch` into `base` (objects key by key; anything else replaces).
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}
