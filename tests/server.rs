//! The server's API against the real `safeprobe serve` binary on an ephemeral port with a real
//! SQLite file: auth, validation errors, path confinement, body limits, a training job that
//! survives a server killed mid-run and is resumed, cancel, delete, the live event stream,
//! streamed chat, models, datasets and previews.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/serve.rs"]
mod support;

#[path = "support/api.rs"]
mod api;
use api::{Server, TOKEN, answer, fixtures, merge, train_config};

#[path = "support/mock_hub.rs"]
mod mock_hub;

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
        // A request cannot choose what Slurm runs, or where sbatch reads and writes.
        (
            json!({"kind": "compare", "config": {"executor": "slurm", "slurm": {"program": "/bin/sh"}}}),
            400,
            "config.slurm.program: the server's tasks run its own safeprobe",
        ),
        (
            json!({"kind": "compare", "config": {"executor": "slurm", "slurm": {"sbatch_args": ["--output=/etc/cron.d/x"]}}}),
            400,
            "config.slurm.sbatch_args: \"--output=/etc/cron.d/x\" is not allowed from a request",
        ),
        (
            json!({"kind": "compare", "config": {"executor": "slurm", "slurm": {"sbatch_args": ["--nodelist=/etc/hosts"]}}}),
            400,
            "config.slurm.sbatch_args",
        ),
        (
            json!({"kind": "compare", "config": {"executor": "slurm", "slurm": {"partition": "a b"}}}),
            400,
            "config.slurm.partition: \"a b\" is not one word",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "lr": -1.0}}),
            400,
            "config.lr: -1 must be positive",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": "lots"}}),
            400,
            "config.max_steps: invalid type: string \"lots\"",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "sap": {"rho": -1.0}}}),
            400,
            "config.sap.rho: -1 must be a number ≥ 0",
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
            json!({"kind": "eval", "config": {"judge": "guard"}}),
            400,
            "guard checkpoint",
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
        // An unknown method or judge is named with the valid ones; a method's missing
        // requirement is said before anything runs.
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "method": "dpo"}}),
            400,
            "`dpo`, expected one of `base`, `sft`, `sap`, `mix`, `safegrad`, `lisa`, `sppft`",
        ),
        (
            json!({"kind": "train", "config": {"train_data": "train.jsonl", "max_steps": 5, "method": "safegrad"}}),
            400,
            "method = \"safegrad\" needs safety_data",
        ),
        (
            json!({"kind": "eval", "config": {"judge": "llm"}}),
            400,
            "`llm`, expected one of `refusal`, `model`, `both`, `guard`",
        ),
        (
            json!({"kind": "compare", "config": {"methods": ["sft", "dpo"]}}),
            400,
            "`dpo`",
        ),
        // A comparison's trainer settings are a run config's, named by their place in it.
        (
            json!({"kind": "compare", "config": {"train": {"sap": {"rho": "big"}}}}),
            400,
            "config.train.sap.rho",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"seed": 3}}}),
            400,
            "config.train.seed: the comparison sets this itself",
        ),
        (
            json!({"kind": "compare", "config": {"judge": "guard"}}),
            400,
            "config.judge_model",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"max_len": 100000}}}),
            400,
            "config.train.max_len: 100000 is over this model's context",
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
    assert_refused(&server, &cases);

    // The forms are built from the config types: the comparison's defaults are the demo's.
    let (code, form) = server.get("/api/forms/compare");
    assert_eq!(code, 200);
    let field = |form: &Value, key: &str| {
        form.as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} missing from {form}"))
    };
    assert_eq!(field(&form, "seeds")["default"], "0, 1, 2");
    assert_eq!(field(&form, "train.max_steps")["default"], "120");
    let (code, form) = server.get("/api/forms/eval");
    assert_eq!(code, 200);
    assert_eq!(field(&form, "judge")["default"], "refusal");
    assert!(field(&form, "model")["required"].as_bool().unwrap());

    // Preview confinement and body size limit.
    let (code, _) = server.get("/api/datasets/preview?path=../../etc/passwd");
    assert_eq!(code, 403);
    // Announced, not sent: the server refuses by the length, and a client still writing a
    // body the server will not read would see its connection reset instead of the answer.
    let bearer = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
        ("Content-Length", "2097152"),
    ];
    let (code, _) = server.raw("POST", "/api/jobs", &headers, "");
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
fn models_are_pulled_from_the_hub_with_progress_and_then_usable_by_id() {
    let hub = mock_hub::MockHub::start(std::collections::HashMap::from([(
        "org/tiny",
        mock_hub::repo_of(&fixtures().join("tiny-tied")),
    )]));
    let data = tempfile::tempdir().unwrap();
    let (child, base) = support::spawn_with_env(
        data.path(),
        TOKEN,
        &[&fixtures().join("data")],
        &[],
        &[("HF_ENDPOINT", hub.endpoint.as_str())],
    );
    let server = Server { child, base };

    let (code, started) = server.post("/api/models/pull", json!({"repo": "org/tiny"}));
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["state"], "running");
    let (code, _) = server.post("/api/models/pull", json!({"repo": "org/missing"}));
    assert_eq!(code, 200);
    let (code, body) = server.post("/api/models/pull", json!({"repo": "../etc"}));
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("ORG/NAME"),
        "{body}"
    );

    let started_at = Instant::now();
    let pulls = loop {
        let (_, pulls) = server.get("/api/models/pulls");
        if pulls
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] != "running")
        {
            break pulls;
        }
        assert!(started_at.elapsed() < Duration::from_secs(60), "{pulls}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let by_repo = |repo: &str| {
        pulls
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["repo"] == repo)
            .unwrap()
            .clone()
    };
    let tiny = by_repo("org/tiny");
    assert_eq!(tiny["state"], "done", "{tiny}");
    assert_eq!(
        (tiny["files_done"].as_u64(), tiny["files"].as_u64()),
        (Some(5), Some(5))
    );
    let missing = by_repo("org/missing");
    assert_eq!(missing["state"], "failed");
    assert!(
        missing["error"].as_str().unwrap().contains("404"),
        "{missing}"
    );

    // The pulled model is listed under its id, sits in the standard cache layout, and a
    // request can name it.
    let (_, models) = server.get("/api/models");
    let listed = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "org/tiny")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(listed["layers"], 2);
    assert!(
        data.path()
            .join("hf-cache/models--org--tiny/snapshots")
            .join(mock_hub::SHA)
            .join("model.safetensors")
            .exists()
    );
    let chat = ureq::post(&server.url("/api/chat"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({"model": "org/tiny", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2}))
        .unwrap()
        .into_string()
        .unwrap();
    assert!(chat.contains("event: done"), "{chat}");
    let (code, body) = server.post(
        "/api/chat",
        json!({"model": "org/other", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("pull it first"),
        "{body}"
    );
    server.kill();
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

#[test]
fn other_websites_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--allowed-host", "panel.test"]);
    let bearer = format!("Bearer {TOKEN}");
    let auth = ("Authorization", bearer.as_str());
    let port = server.base.rsplit(':').next().unwrap().to_string();

    // DNS rebinding: a foreign name is refused, on the API and the UI alike.
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
    ] {
        for path in ["/api/jobs", "/"] {
            let (code, body) = server.raw("GET", path, &[auth, ("Host", &host)], "");
            assert_eq!(code, 403, "{host}{path}: {body}");
            assert!(body.contains("--allowed-host"), "{body}");
        }
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("panel.test:{port}"),
    ] {
        let (code, body) = server.raw("GET", "/api/jobs", &[auth, ("Host", &host)], "");
        assert_eq!(code, 200, "{host}: {body}");
    }

    // A running job for the cross-site requests to try and cancel.
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(10_000)}),
    );
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let cancel = format!("/api/jobs/{id}/cancel");
    let delete = format!("/api/jobs/{id}");
    let create = json!({"kind": "train", "config": train_config(3)}).to_string();
    let evil = ("Origin", "http://evil.example");
    let json_body = ("Content-Type", "application/json");
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let cases: Vec<(&str, &str, Vec<(&str, &str)>, &str, u16)> = vec![
        (
            "POST",
            "/api/jobs",
            vec![auth, json_body, evil],
            &create,
            403,
        ),
        ("POST", &cancel, vec![auth, form, evil], "a=1", 403),
        // The same form post where the browser left Origin out: not JSON, refused.
        ("POST", &cancel, vec![auth, form], "a=1", 415),
        (
            "POST",
            &cancel,
            vec![auth, ("Content-Type", "text/plain")],
            "{}",
            415,
        ),
        (
            "POST",
            "/api/jobs",
            vec![auth, ("Content-Type", "text/plain")],
            &create,
            415,
        ),
        ("POST", "/api/jobs", vec![auth], &create, 415),
        (
            "POST",
            &cancel,
            vec![auth, ("Sec-Fetch-Site", "cross-site")],
            "",
            403,
        ),
        (
            "POST",
            &cancel,
            vec![auth, ("Sec-Fetch-Site", "same-site")],
            "",
            403,
        ),
        (
            "POST",
            &cancel,
            vec![auth, json_body, ("Origin", "http://127.0.0.1:1")],
            "{}",
            403,
        ),
        ("DELETE", &delete, vec![auth, evil], "", 403),
        (
            "POST",
            "/api/chat",
            vec![auth, json_body, ("Origin", "null")],
            "{}",
            403,
        ),
    ];
    for (method, path, headers, body, expected) in &cases {
        let (code, answer) = server.raw(method, path, headers, body);
        assert_eq!(code, *expected, "{method} {path} {headers:?}: {answer}");
    }
    let (_, jobs) = server.get("/api/jobs");
    assert_eq!(
        jobs.as_array().unwrap().len(),
        1,
        "a refused request created a job: {jobs}"
    );
    let (_, job) = server.get(&delete);
    assert!(
        job["status"] == "queued" || job["status"] == "running",
        "{job}"
    );

    // Only the event stream takes the token in the query string.
    assert_eq!(
        server
            .raw("GET", &format!("/api/jobs?token={TOKEN}"), &[], "")
            .0,
        401
    );

    // The panel's own requests: same origin, JSON.
    let own = server.base.clone();
    let headers = [
        auth,
        json_body,
        ("Origin", own.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let (code, body) = server.raw("POST", &cancel, &headers, "{}");
    assert_eq!(code, 200, "{body}");
    server.wait_for(id, "cancellation", |j| j["status"] == "cancelled");
}

#[test]
fn every_path_is_confined_and_runs_are_bounded() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("pairs.jsonl");
    std::fs::copy(fixtures().join("data/safety.jsonl"), &secret).unwrap();
    let secret = secret.display().to_string();
    let outside_dir = outside.path().display().to_string();
    let with = |extra: Value| {
        let mut config = train_config(6);
        merge(&mut config, extra);
        config
    };
    let cases = [
        (
            json!({"kind": "compare", "config": {"train": {"poison_data": secret}}}),
            403,
            "config.train.poison_data",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"init_adapter": outside_dir}}}),
            403,
            "config.train.init_adapter",
        ),
        (
            json!({"kind": "train", "config": with(json!({"init_adapter": outside_dir}))}),
            403,
            "config.init_adapter",
        ),
        (
            json!({"kind": "train", "config": with(json!({"poison_data": secret, "poison_fraction": 0.1}))}),
            403,
            "config.poison_data",
        ),
        (
            json!({"kind": "eval", "config": {"adapter": outside_dir}}),
            403,
            "config.adapter",
        ),
        (
            json!({"kind": "eval", "config": {"judge_model": outside_dir, "judge": "model"}}),
            403,
            "config.judge_model",
        ),
        (
            json!({"kind": "train", "config": with(json!({"max_steps": 1_000_000_000u64}))}),
            400,
            "config.max_steps",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"max_steps": 1_000_000_000u64}}}),
            400,
            "max_steps",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"max_steps": 0, "epochs": 1e6}}}),
            400,
            "epochs",
        ),
        (
            json!({"kind": "train", "config": with(json!({"max_steps": 0, "epochs": 10000.0, "poison_fraction": 0.99}))}),
            400,
            "config.max_steps",
        ),
        (
            json!({"kind": "train", "config": with(json!({"keep_checkpoints": 0}))}),
            400,
            "config.keep_checkpoints",
        ),
        (
            json!({"kind": "train", "config": with(json!({"sap": {"layers": [1, 1]}}))}),
            400,
            "sap.layers",
        ),
    ];
    assert_refused(&server, &cases);

    // An oversized record is refused by size, naming its line, before it is parsed.
    let huge = format!(
        "{{\"prompt\": \"a\", \"response\": \"b\"}}\n{{\"prompt\": \"{}\", \"response\": \"b\"}}\n",
        "x".repeat(2 << 20)
    );
    std::fs::write(data.path().join("huge.jsonl"), huge).unwrap();
    let (code, answer) = server.get("/api/datasets/preview?path=huge.jsonl");
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("huge.jsonl:2: record of"),
        "{answer}"
    );

    // checkpoint_every = 0 means no checkpoints, not the default.
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": with(json!({"checkpoint_every": 0}))}),
    );
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["spec"]["checkpoint_every"], 0, "{job}");
    let unsaved = job["id"].as_i64().unwrap();
    server.post(&format!("/api/jobs/{unsaved}/cancel"), json!({}));

    // Retention: a checkpoint every step, the newest two kept; the job's files go with it.
    let config = with(json!({"checkpoint_every": 1, "validation_fraction": 0.34, "eval_every": 2}));
    let (code, job) = server.post("/api/jobs", json!({"kind": "train", "config": config}));
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let job = server.wait_for(id, "the run", |j| {
        j["status"] == "done" || j["status"] == "failed"
    });
    assert_eq!(job["status"], "done", "{job}");
    let run_dir = data.path().join(format!("runs/job-{id}"));
    let mut kept: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-5", "step-6"]);
    let (_, jobs) = server.get("/api/jobs");
    let listed = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap()
        .clone();
    assert!(
        listed["last_validation"]["loss"]
            .as_f64()
            .is_some_and(|l| l > 0.0),
        "{listed}"
    );
    assert_eq!(server.delete(&format!("/api/jobs/{id}")).0, 200);
    assert!(
        !run_dir.exists(),
        "the run's files are deleted with its job"
    );
}

#[test]
fn an_evaluation_judged_by_a_guard_model() {
    let data = tempfile::tempdir().unwrap();
    let models = fixtures();
    let server = Server::start_with(data.path(), &["--models", models.to_str().unwrap()]);
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "eval", "config": {
            "model": "tiny-tied", "judge": "guard", "judge_model": "tiny-llama-guard", "max_new_tokens": 4
        }}),
    );
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let job = server.wait_for(id, "the evaluation", |j| {
        j["status"] != "running" && j["status"] != "queued"
    });
    assert_eq!(job["status"], "done", "{job}");
    let judges = job["result"]["harmful"]["judges"].as_array().unwrap();
    assert!(
        judges.iter().any(|j| j["judge"]
            .as_str()
            .unwrap()
            .starts_with("guard:llama-guard-3:")),
        "{judges:?}"
    );
    let answers = job["answers"].as_array().unwrap();
    assert!(!answers.is_empty());
    for a in answers {
        let label = a["model_judge_label"].as_str().unwrap();
        assert_eq!(a["model_judge_harmful"], json!(label == "unsafe"), "{a}");
    }

    // A chat model that is not a guard fails the job with the reason.
    let (_, job) = server.post(
        "/api/jobs",
        json!({"kind": "eval", "config": {"model": "tiny-tied", "judge": "guard", "judge_model": "tiny-tied"}}),
    );
    let id = job["id"].as_i64().unwrap();
    let job = server.wait_for(id, "the evaluation", |j| {
        j["status"] != "running" && j["status"] != "queued"
    });
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("--judge model"),
        "{job}"
    );
}

#[test]
fn evaluations_cancel_between_batches() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    // An evaluation job (long enough to be caught running), and the evaluation stage of a
    // training job.
    let many: String = (0..3000)
        .map(|i| format!("{{\"prompt\": \"How do I pick lock number {i}?\"}}\n"))
        .collect();
    std::fs::write(data.path().join("many-prompts.jsonl"), many).unwrap();
    let (_, eval) = server.post(
        "/api/jobs",
        json!({"kind": "eval", "config": {"prompts": "many-prompts.jsonl", "max_new_tokens": 64}}),
    );
    let eval = eval["id"].as_i64().unwrap();
    server.wait_for(eval, "the evaluation to start", |j| {
        j["status"] == "running"
    });
    let asked = Instant::now();
    assert_eq!(
        server
            .post(&format!("/api/jobs/{eval}/cancel"), json!({}))
            .0,
        200
    );
    let job = server.wait_for(eval, "cancellation", |j| j["status"] != "running");
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["result"].is_null());
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );

    let (_, train) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(2)}),
    );
    let train = train["id"].as_i64().unwrap();
    server.wait_for(train, "the evaluation stage", |_| {
        let (_, page) = server.get(&format!("/api/jobs/{train}/metrics?after=0&limit=10000"));
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["body"]["event"] == "stage")
    });
    assert_eq!(
        server
            .post(&format!("/api/jobs/{train}/cancel"), json!({}))
            .0,
        200
    );
    let job = server.wait_for(train, "cancellation", |j| j["status"] != "running");
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["answers"].as_array().is_none_or(Vec::is_empty), "{job}");
}

/// Posts each job request, expecting its status and an error that names `needle`, and that
/// none of them left a job behind.
fn assert_refused(server: &Server, cases: &[(Value, u16, &str)]) {
    for (body, code, needle) in cases {
        let (got, answer) = server.post("/api/jobs", body.clone());
        assert_eq!(got, *code, "{body} -> {answer}");
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
}

/// Deep-merges `patch` into `base`.
/// A multipart/form-data body with one file field.
fn multipart(file_name: &str, content: &str) -> (String, String) {
    let boundary = "safeprobe-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn datasets_upload_and_runs_export() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--max-upload-mib", "1"]);
    let bearer = format!("Bearer {TOKEN}");
    let auth = ("Authorization", bearer.as_str());
    let upload = |name: &str, content: &str, query: &str, extra: &[(&str, &str)]| {
        let (kind, body) = multipart(name, content);
        let mut headers = vec![auth, ("Content-Type", kind.as_str())];
        headers.extend_from_slice(extra);
        let (code, text) = server.raw("POST", &format!("/api/datasets{query}"), &headers, &body);
        (
            code,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let train = std::fs::read_to_string(fixtures().join("data/train.jsonl")).unwrap();
    let pairs = std::fs::read_to_string(fixtures().join("data/safety.jsonl")).unwrap();

    // Stored under uploads/, told what it holds, previewed through the chat template.
    let (code, stored) = upload("mine.jsonl", &train, "", &[]);
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["name"], "uploads/mine.jsonl");
    assert_eq!(
        (stored["records"].as_u64(), stored["holds"].as_str()),
        (Some(6), Some("examples"))
    );
    let (code, preview) = server.get("/api/datasets/preview?path=uploads/mine.jsonl&rows=1");
    assert_eq!(
        (code, preview["examples"].as_u64()),
        (200, Some(6)),
        "{preview}"
    );
    let (_, listed) = server.get("/api/datasets");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "uploads/mine.jsonl"),
        "{listed}"
    );
    let (code, stored) = upload("pairs.jsonl", &pairs, "", &[]);
    assert_eq!(
        (code, stored["holds"].as_str()),
        (200, Some("pairs")),
        "{stored}"
    );

    // Nothing of the user's is replaced unless asked; bad files are refused and leave nothing.
    assert_eq!(upload("mine.jsonl", &train, "", &[]).0, 409);
    assert_eq!(upload("mine.jsonl", &train, "?replace=true", &[]).0, 200);
    let (code, refused) = upload(
        "broken.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n",
        "",
        &[],
    );
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("broken.jsonl:2"),
        "{refused}"
    );
    assert_eq!(upload("run.sh", &train, "", &[]).0, 400);
    let (kind, _) = multipart("big.jsonl", "");
    let announced = [
        auth,
        ("Content-Type", kind.as_str()),
        ("Content-Length", "2097152"),
    ];
    let (code, answer) = server.raw("POST", "/api/datasets", &announced, "");
    assert_eq!(code, 413, "{answer}");
    let mut left: Vec<String> = std::fs::read_dir(data.path().join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["mine.jsonl", "pairs.jsonl"],
        "refused uploads leave no file"
    );
    // Other websites cannot upload, and no other endpoint takes a form.
    assert_eq!(
        upload("x.jsonl", &train, "", &[("Origin", "http://evil.example")]).0,
        403
    );
    let (kind, body) = multipart("x.jsonl", &train);
    assert_eq!(
        server
            .raw("POST", "/api/jobs", &[auth, ("Content-Type", &kind)], &body)
            .0,
        415
    );

    // A finished LoRA run: its adapter as a zip, and merged into a full checkpoint.
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(2)}),
    );
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let (code, early) = server.post(&format!("/api/jobs/{id}/export"), json!({}));
    assert_eq!(code, 409, "an unfinished run cannot be exported: {early}");
    let job = server.wait_for(id, "the run", |j| {
        j["status"] == "done" || j["status"] == "failed"
    });
    assert_eq!(job["status"], "done", "{job}");
    let zip = ureq::get(&server.url(&format!("/api/jobs/{id}/adapter.zip")))
        .set("Authorization", &bearer)
        .call()
        .unwrap();
    assert_eq!(zip.content_type(), "application/zip");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut zip.into_reader(), &mut bytes).unwrap();
    assert!(bytes.starts_with(b"PK"));
    let names = String::from_utf8_lossy(&bytes);
    assert!(names.contains("adapter_config.json") && names.contains("adapter_model.safetensors"));
    let (code, exported) = server.post(&format!("/api/jobs/{id}/export"), json!({"dtype": "f32"}));
    assert_eq!(code, 200, "{exported}");
    let merged = Path::new(exported["path"].as_str().unwrap());
    assert!(merged.join("model.safetensors").is_file() && merged.join("config.json").is_file());
    let command = exported["command"].as_str().unwrap();
    assert!(
        command.starts_with("safeprobe export --model ") && command.contains("--adapter "),
        "{command}"
    );
    assert_eq!(
        server
            .post(&format!("/api/jobs/{id}/export"), json!({"dtype": "f8"}))
            .0,
        400
    );
}

#[test]
fn ctrl_c_checkpoints_the_running_job_for_resume() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path());
    let mut config = train_config(10_000);
    config["checkpoint_every"] = json!(1000);
    let (_, job) = server.post("/api/jobs", json!({"kind": "train", "config": config}));
    let id = job["id"].as_i64().unwrap();
    server.wait_for(id, "a few steps", |j| {
        j["last_step"]["step"].as_i64().is_some_and(|s| s >= 2)
    });
    let interrupted = Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");

    // The job stopped at a step boundary with a checkpoint there (long before step 1000) and
    // is interrupted, not cancelled: Resume continues it.
    let checkpoints = std::fs::read_dir(data.path().join(format!("runs/job-{id}/checkpoints")))
        .unwrap()
        .count();
    assert_eq!(checkpoints, 1);
    let server = Server::start(data.path());
    let (_, job) = server.get(&format!("/api/jobs/{id}"));
    assert_eq!(job["status"], "interrupted", "{job}");
    let stopped_at = steps_of(&server, id).len();
    assert!(stopped_at >= 2, "{stopped_at}");
    assert_eq!(
        server.post(&format!("/api/jobs/{id}/resume"), json!({})).0,
        200
    );
    server.wait_for(id, "the resumed run to go on", |j| {
        j["last_step"]["step"]
            .as_i64()
            .is_some_and(|s| s as usize > stopped_at)
    });
    let steps = steps_of(&server, id);
    assert_eq!(
        steps,
        (1..=steps.len() as i64).collect::<Vec<_>>(),
        "every step once"
    );
}

/// A new store numbers jobs from 1 again: an earlier run's folder of the same name is moved
/// aside, not reused, pruned or deleted with the new job.
#[test]
fn an_earlier_run_folder_is_never_reused() {
    let data = tempfile::tempdir().unwrap();
    let earlier = data.path().join("runs/job-1");
    std::fs::create_dir_all(earlier.join("checkpoints/step-90")).unwrap();
    std::fs::write(earlier.join("mine.txt"), "keep me").unwrap();
    let server = Server::start(data.path());
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(1)}),
    );
    assert_eq!((code, job["id"].as_i64()), (200, Some(1)), "{job}");
    let aside: Vec<_> = std::fs::read_dir(data.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("job-1.before-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_to_string(aside[0].join("mine.txt")).unwrap(),
        "keep me"
    );
    server.wait_for(1, "the run", |j| {
        j["status"] == "done" || j["status"] == "failed"
    });
    assert!(
        !earlier.join("checkpoints/step-90").exists(),
        "the new run starts clean"
    );
}

#[test]
fn jobs_take_names_and_notes_and_refusals_name_their_field() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    // A refused config names its field apart from the message, for a form to show it there.
    for (config, field) in [
        (
            json!({"train_data": "train.jsonl", "max_steps": 5, "lr": -1.0}),
            "config.lr",
        ),
        (
            json!({"train_data": "missing.jsonl", "max_steps": 5}),
            "config.train_data",
        ),
    ] {
        let (code, answer) = server.post("/api/jobs", json!({"kind": "train", "config": config}));
        assert_eq!(
            (code, answer["field"].as_str()),
            (400, Some(field)),
            "{answer}"
        );
    }
    // Any job can be named, and keeps its notes.
    let (code, job) = server.post(
        "/api/jobs",
        json!({"kind": "eval", "config": {"max_new_tokens": 4}}),
    );
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let label = format!("/api/jobs/{id}/label");
    let (code, named) = server.post(
        &label,
        json!({"name": "first look", "notes": "the demo model\nno adapter"}),
    );
    assert_eq!(code, 200, "{named}");
    assert_eq!(named["name"], "first look");
    let (_, jobs) = server.get("/api/jobs");
    assert_eq!(jobs[0]["notes"], "the demo model\nno adapter");
    for (body, field) in [
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"name": "two\nlines"}), "name"),
        (json!({"notes": "n".repeat(10_001)}), "notes"),
    ] {
        let (code, answer) = server.post(&label, body);
        assert_eq!(
            (code, answer["field"].as_str()),
            (400, Some(field)),
            "{answer}"
        );
    }
    let (code, _) = server.post(&label, json!({"colour": "red"}));
    assert_eq!(code, 400, "an unknown key is refused");
    let (code, _) = server.post(
        &format!("/api/jobs/{}/label", id + 100),
        json!({"name": "x"}),
    );
    assert_eq!(code, 404);
    let (_, kept) = server.get(&format!("/api/jobs/{id}"));
    assert_eq!(
        kept["name"], "first look",
        "a refused label changes nothing"
    );

    // A job's memory is estimated before it starts, checked as a start is, and nothing is made.
    let train = |config: Value| json!({"kind": "train", "config": config});
    let (code, estimate) = server.post(
        "/api/jobs/estimate",
        train(json!({"train_data": "train.jsonl", "max_steps": 5, "method": "sft"})),
    );
    assert_eq!(code, 200, "{estimate}");
    assert!(estimate["memory_bytes"].as_u64().unwrap() > 0);
    assert!(
        estimate["memory"].as_str().unwrap().contains("weights"),
        "{estimate}"
    );
    assert!(
        estimate["time"].is_null(),
        "no finished run to time it by: {estimate}"
    );
    let (code, huge) = server.post(
        "/api/jobs/estimate",
        train(json!({"train_data": "train.jsonl", "max_steps": 5, "method": "sft", "finetune": "lora", "lora": {"r": 1_000_000_000u64}})),
    );
    assert_eq!(code, 200, "{huge}");
    let more = huge["memory_bytes"].as_u64().unwrap();
    assert!(
        more > estimate["memory_bytes"].as_u64().unwrap() * 1000,
        "{huge}"
    );
    if let Some(limit) = huge["limit"][0].as_u64() {
        assert!(more > limit, "{huge}");
    }
    let (code, refused) = server.post(
        "/api/jobs/estimate",
        train(json!({"train_data": "train.jsonl", "max_steps": 5, "lr": -1.0})),
    );
    assert_eq!((code, refused["field"].as_str()), (400, Some("config.lr")));
    let (_, jobs) = server.get("/api/jobs");
    assert_eq!(
        jobs.as_array().unwrap().len(),
        1,
        "an estimate makes no job"
    );
}
