//! The server's API against the real `safeprobe serve` binary on an ephemeral port with a real
//! SQLite file: auth, validation errors, path confinement, body limits, a training job that
//! survives a server killed mid-run and is resumed, cancel, delete, the live event stream,
//! streamed chat, models, datasets and previews.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/serve.rs"]
mod support;

const TOKEN: &str = "test-token-123";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(data_dir: &Path) -> Self {
        let (child, base) = support::spawn(data_dir, TOKEN, &[&fixtures().join("data")]);
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        answer(
            ureq::get(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .call(),
        )
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        answer(
            ureq::post(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .send_json(body),
        )
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        answer(
            ureq::delete(&self.url(path))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .call(),
        )
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Polls a job until `done(job)` holds.
    fn wait_for(&self, id: i64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
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

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn train_config(steps: usize) -> Value {
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

fn steps_of(server: &Server, id: i64) -> Vec<i64> {
    let (_, page) = server.get(&format!("/api/jobs/{id}/metrics?after=0&limit=10000"));
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["body"]["event"] == "step")
        .map(|e| e["body"]["step"].as_i64().unwrap())
        .collect()
}

#[test]
fn refuses_a_public_address_without_a_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_safeprobe"))
        .args([
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--device",
            "cpu",
            "--data-dir",
        ])
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("SAFEPROBE_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without an access token"), "{err}");
}

#[test]
fn api_auth_validation_confinement_and_limits() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());

    // Auth on API calls and the event stream; the UI shell itself is public.
    for path in ["/api/jobs", "/api/events"] {
        let (code, body) = answer(ureq::get(&server.url(path)).call());
        assert_eq!(code, 401, "{path}");
        assert!(body["error"].as_str().unwrap().contains("token"));
        let (code, _) = answer(
            ureq::get(&server.url(path))
                .set("Authorization", "Bearer wrong")
                .call(),
        );
        assert_eq!(code, 401);
    }
    assert_eq!(ureq::get(&server.url("/")).call().unwrap().status(), 200);

    // Validation errors name the field.
    let cases = [
        (json!({"kind": "bake", "config": {}}), 400, "kind"),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "lr": -1.0}}),
            400,
            "lr -1",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "colour": 1}}),
            400,
            "colour",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "missing.jsonl", "max_steps": 5}}),
            400,
            "config.train_data",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "output_dir": "/tmp/x"}}),
            400,
            "output_dir",
        ),
        (
            json!({"kind": "eval", "config": {"judge": "model"}}),
            400,
            "judge_model",
        ),
        (
            json!({"kind": "eval", "config": {"max_new_tokens": 0}}),
            400,
            "max_new_tokens",
        ),
        (
            json!({"kind": "compare", "config": {"task": "poetry"}}),
            400,
            "task",
        ),
        // Path confinement: parent directories, absolute paths elsewhere, a symlink escape.
        (
            json!({"kind": "train", "config": {"train_data": "../../../etc/passwd", "max_steps": 5}}),
            403,
            "config.train_data",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "/etc/passwd", "max_steps": 5}}),
            403,
            "config.train_data",
        ),
        (
            json!({"kind": "eval", "config": {"model": "/etc"}}),
            403,
            "config.model",
        ),
        (
            json!({"kind": "eval", "config": {"prompts": "escape.jsonl"}}),
            403,
            "config.prompts",
        ),
    ];
    std::os::unix::fs::symlink("/etc/hostname", data.path().join("escape.jsonl")).unwrap();
    for (body, code, needle) in cases {
        let (got, answer) = server.post("/api/jobs", body.clone());
        assert_eq!(got, code, "{body} -> {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{body}: {message:?} should name {needle}"
        );
    }
    let (_, jobs) = server.get("/api/jobs");
    assert_eq!(
        jobs.as_array().unwrap().len(),
        0,
        "rejected requests leave no job"
    );

    // Preview confinement and body size limit.
    let (code, _) = server.get("/api/datasets/preview?path=../../etc/passwd");
    assert_eq!(code, 403);
    let big = "x".repeat(2 << 20);
    let (code, _) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": {"system": big}}),
    );
    assert_eq!(code, 413);
    let (code, body) = server.get("/api/nothing-here");
    assert_eq!(code, 404, "{body}");
}

#[test]
fn models_datasets_preview_and_device() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let (_, models) = server.get("/api/models");
    assert_eq!(models[0]["name"], "demo");
    assert!(models[0]["parameters"].as_u64().unwrap() > 1_000_000);
    let (_, datasets) = server.get("/api/datasets");
    let names: Vec<&str> = datasets
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"train.jsonl") && names.contains(&"train.parquet"),
        "{names:?}"
    );
    let (code, preview) = server.get("/api/datasets/preview?path=train.jsonl&rows=2");
    assert_eq!(code, 200, "{preview}");
    assert_eq!(preview["rows"].as_array().unwrap().len(), 2);
    let rendered = preview["rows"][0]["rendered"].as_str().unwrap();
    assert!(rendered.starts_with("<|im_start|>user\n"), "{rendered}");
    assert!(preview["rows"][0]["response_tokens"].as_u64().unwrap() > 0);
    let (_, device) = server.get("/api/device");
    assert!(
        device["selected"].as_str().unwrap().contains("CPU")
            || device["selected"].as_str().unwrap().contains("cpu"),
        "{device}"
    );
}

#[test]
fn a_run_survives_a_killed_server_and_resumes_from_its_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(24)}),
    );
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    server.wait_for(id, "a checkpoint", |_| {
        data.path()
            .join(format!("runs/job-{id}/checkpoints/step-6"))
            .exists()
    });
    server.kill();

    let server = Server::start(data.path());
    let (_, job) = server.get(&format!("/api/jobs/{id}"));
    assert_eq!(job["status"], "interrupted", "{job}");
    let (code, _) = server.post(&format!("/api/jobs/{id}/resume"), json!({}));
    assert_eq!(code, 200);
    let job = server.wait_for(id, "the resumed run", |j| {
        j["status"] != "queued" && j["status"] != "running"
    });
    assert_eq!(job["status"], "done", "{job}");
    // Every step once, in order: the steps after the checkpoint were replayed, not duplicated.
    assert_eq!(steps_of(&server, id), (1..=24).collect::<Vec<_>>());
    let hs = job["result"]["harmful"]["harmful_score"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&hs));
    assert_eq!(job["answers"].as_array().unwrap().len(), 180);
    assert!(
        data.path()
            .join(format!("runs/job-{id}/adapter/adapter_model.safetensors"))
            .is_file()
    );

    // Done jobs cannot be resumed or cancelled, and can be deleted.
    assert_eq!(
        server.post(&format!("/api/jobs/{id}/resume"), json!({})).0,
        409
    );
    assert_eq!(
        server.post(&format!("/api/jobs/{id}/cancel"), json!({})).0,
        409
    );
    assert_eq!(server.delete(&format!("/api/jobs/{id}")).0, 200);
    assert_eq!(server.get(&format!("/api/jobs/{id}")).0, 404);
}

#[test]
fn cancel_stops_within_a_step_and_events_stream_live() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let stream = ureq::get(&server.url(&format!("/api/events?token={TOKEN}")))
        .call()
        .unwrap();
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(10_000)}),
    );
    assert_eq!(code, 200);
    let id = job["id"].as_i64().unwrap();
    // The stream carries the job's status and its first steps as they happen.
    let mut seen_step = false;
    for line in BufReader::new(stream.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(data).unwrap();
            if event["job"] == id && event["body"]["event"] == "step" {
                seen_step = true;
                break;
            }
        }
    }
    assert!(seen_step);
    let asked = Instant::now();
    assert_eq!(
        server.post(&format!("/api/jobs/{id}/cancel"), json!({})).0,
        200
    );
    let job = server.wait_for(id, "cancellation", |j| j["status"] == "cancelled");
    assert!(asked.elapsed() < Duration::from_secs(20));
    let steps = steps_of(&server, id);
    assert!(steps.len() < 10_000);
    assert_eq!(job["status"], "cancelled");
}

#[test]
fn chat_streams_tokens() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let response = ureq::post(&server.url("/api/chat"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({
            "messages": [{"role": "user", "content": "Reverse the order of these words: red cat moon"}],
            "max_new_tokens": 16
        }))
        .unwrap();
    let mut tokens = String::new();
    let mut done = None;
    let mut kind = String::new();
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap();
            match kind.as_str() {
                "token" => tokens.push_str(v["text"].as_str().unwrap()),
                "done" => {
                    done = Some(v);
                    break;
                }
                other => panic!("unexpected event {other}: {v}"),
            }
        }
    }
    let done = done.expect("a done event");
    assert_eq!(done["text"].as_str().unwrap(), tokens);
    assert_eq!(tokens.trim(), "moon cat red");
    let (code, body) = server.post("/api/chat", json!({"messages": []}));
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("messages"));
}
