//! No request can take the panel down: the requests that once aborted or exhausted the server
//! are refused naming their fields, a job whose process dies ends as `failed` with the reason
//! while the server and the next job go on, and the small races (parallel resumes and
//! exports) and leaks (links out of the data folders, odd revisions, blank tokens) are closed.
//! Against the real `safeprobe serve` binary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

#[path = "support/api.rs"]
mod api;
use api::{Server, TOKEN, merge, train_config};

/// `base` with `patch` merged in.
fn with(mut base: Value, patch: Value) -> Value {
    merge(&mut base, patch);
    base
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the name may hold spaces, so read after its ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let parent: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if parent == pid {
            out.push(child);
        }
    }
    out
}

/// The server's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

fn still_up(server: &Server) {
    let (code, body) = server.get("/api/jobs");
    assert_eq!(code, 200, "the server answers: {body}");
}

/// The one job process the server runs now.
fn job_process(server: &Server) -> u32 {
    // A job is marked running just before its process starts.
    for _ in 0..100 {
        let workers = children_of(server.child.id());
        assert!(workers.len() <= 1, "one job process at a time: {workers:?}");
        if let [pid] = workers[..] {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no job process");
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn ended(server: &Server, id: i64, what: &str) -> Value {
    server.wait_for(id, what, |j| {
        j["status"] != "running" && j["status"] != "queued"
    })
}

#[test]
fn a_job_whose_process_aborts_fails_with_its_reason_while_the_next_one_finishes() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let mut config = train_config(10_000);
    config["checkpoint_every"] = json!(1000);
    let (_, doomed) = server.post("/api/jobs", json!({"kind": "train", "config": config}));
    let (_, next) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(2)}),
    );
    let (doomed, next) = (doomed["id"].as_i64().unwrap(), next["id"].as_i64().unwrap());
    let first_step = |j: &Value| j["last_step"]["step"].as_i64().is_some_and(|s| s >= 1);
    server.wait_for(doomed, "its first step", first_step);

    // SIGTERM from outside (a scheduler, `kill`) stops the job at its next step with a
    // checkpoint there, as a cancel does.
    signal(job_process(&server), "TERM");
    let job = ended(&server, doomed, "the terminated job");
    assert_eq!(job["status"], "cancelled", "{job}");
    let checkpointed = job["last_step"]["step"].as_i64().unwrap();
    let checkpoints = data.path().join(format!("runs/job-{doomed}/checkpoints"));
    assert_eq!(std::fs::read_dir(&checkpoints).unwrap().count(), 1);

    // What a failed allocation does to a process (the abort that used to take the server
    // down with it), to the resumed run.
    let (code, body) = server.post(&format!("/api/jobs/{doomed}/resume"), json!({}));
    assert_eq!(code, 200, "{body}");
    // The queue is first in, first out: the short job runs before the resumed one.
    let job = ended(&server, next, "the next job");
    assert_eq!(job["status"], "done", "{job}");
    // A step after the checkpoint: the resumed process is training.
    server.wait_for(doomed, "the resumed run's steps", |j| {
        j["status"] == "running"
            && j["last_step"]["step"]
                .as_i64()
                .is_some_and(|s| s > checkpointed)
    });
    signal(job_process(&server), "ABRT");
    let job = ended(&server, doomed, "the aborted job");
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("signal 6 (SIGABRT"), "{error}");
    // The end of its log comes with it: the job's own lines (its device) are there.
    assert!(error.contains(&format!("job-{doomed}.log")), "{error}");
    assert!(error.contains("device:"), "{error}");
    still_up(&server);

    // A job after it runs as usual.
    let (_, after) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(1)}),
    );
    let job = ended(
        &server,
        after["id"].as_i64().unwrap(),
        "a job after the abort",
    );
    assert_eq!(job["status"], "done", "{job}");
}

#[test]
fn requests_that_once_crashed_the_server_are_refused_naming_their_fields() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let train = |patch: Value| json!({"kind": "train", "config": with(train_config(5), patch)});
    let cases = [
        // Each of the first two aborted the server on a failed allocation (768 GB, 20 TB).
        (train(json!({"lora": {"r": 1_000_000_000}})), "lora.r"),
        (train(json!({"batch_size": 1_000_000})), "batch_size"),
        (train(json!({"device": "evil"})), "device"),
        (train(json!({"sap": {"layers": [99]}})), "sap.layers"),
        (train(json!({"max_len": 0})), "max_len"),
        (
            json!({"kind": "compare", "config": {"max_new_tokens": 0}}),
            "max_new_tokens",
        ),
        // The demo comparison fine-tunes every weight: its batch is what can be too large.
        (
            json!({"kind": "compare", "config": {"train": {"batch_size": 1_000_000}}}),
            "train.batch_size",
        ),
        (
            json!({"kind": "compare", "config": {"train": {"finetune": "lora", "lora": {"r": 1_000_000_000}}}}),
            "train.lora.r",
        ),
        (
            json!({"kind": "compare", "config": {"device": "evil"}}),
            "device",
        ),
        (
            json!({"kind": "eval", "config": {"max_new_tokens": 1_000_000}}),
            "max_new_tokens",
        ),
    ];
    for (request, field) in cases {
        let (code, body) = server.post("/api/jobs", request.clone());
        assert_eq!(code, 400, "{request}: {body}");
        assert!(error_of(&body).contains(field), "{request}: {body}");
    }
    // The memory refusals give the estimate.
    let (_, body) = server.post("/api/jobs", train(json!({"lora": {"r": 1_000_000_000}})));
    assert!(error_of(&body).contains("estimated"), "{body}");
    assert!(error_of(&body).contains("TiB"), "{body}");
    // Nothing was queued, and the server is up.
    let (_, jobs) = server.get("/api/jobs");
    assert_eq!(jobs.as_array().unwrap().len(), 0, "{jobs}");

    // A prompt of 900 KB (under the body limit) is refused before the model sees it.
    let prompt = "tell me a story about a cat. ".repeat(900_000 / 29);
    let (code, body) = server.post(
        "/api/chat",
        json!({"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 8}),
    );
    assert_eq!(code, 413, "{body}");
    assert!(error_of(&body).contains("messages"), "{body}");
    assert!(error_of(&body).contains("tokens"), "{body}");
    still_up(&server);
}

/// A server whose jobs may take at most 1 MiB refuses a job that the machine could run, and
/// says why with the estimate: the limit is what decides, not luck.
#[test]
fn a_server_memory_limit_refuses_what_would_not_fit() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--job-memory-mib", "1"]);
    let (code, body) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(2)}),
    );
    assert_eq!(code, 400, "{body}");
    let error = error_of(&body);
    assert!(error.contains("--job-memory-mib"), "{error}");
    assert!(error.contains("batch_size"), "{error}");
    assert!(error.contains("weights"), "{error}");
}

#[test]
fn parallel_resumes_queue_once_and_parallel_exports_all_succeed() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());

    let (_, finished) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(1)}),
    );
    let finished = finished["id"].as_i64().unwrap();
    let job = ended(&server, finished, "a short run");
    assert_eq!(job["status"], "done", "{job}");
    let exports: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    server.post(
                        &format!("/api/jobs/{finished}/export"),
                        json!({"dtype": "f32"}),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (code, body) in &exports {
        assert_eq!(*code, 200, "{body}");
    }

    let (_, long) = server.post(
        "/api/jobs",
        json!({"kind": "train", "config": train_config(10_000)}),
    );
    let long = long["id"].as_i64().unwrap();
    server.wait_for(long, "its first step", |j| {
        j["last_step"]["step"].as_i64().is_some_and(|s| s >= 1)
    });
    server.post(&format!("/api/jobs/{long}/cancel"), json!({}));
    server.wait_for(long, "cancellation", |j| j["status"] == "cancelled");
    let codes: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..5)
            .map(|_| {
                scope.spawn(|| {
                    server
                        .post(&format!("/api/jobs/{long}/resume"), json!({}))
                        .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = codes.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 409, 409, 409, 409], "{codes:?}");
    let (_, page) = server.get(&format!("/api/jobs/{long}/metrics?after=0&limit=10000"));
    let queued = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["body"]["event"] == "status" && e["body"]["status"] == "queued")
        .count();
    // Once when created, once when resumed.
    assert_eq!(queued, 2, "{page}");
    server.post(&format!("/api/jobs/{long}/cancel"), json!({}));
}

#[test]
fn links_out_of_the_data_folders_odd_revisions_and_blank_tokens_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.jsonl"),
        data.path().join("leak.jsonl"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), data.path().join("elsewhere")).unwrap();
    let server = Server::start(data.path());
    let (_, datasets) = server.get("/api/datasets");
    let names: Vec<&str> = datasets
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"train.jsonl"), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.contains("leak") || n.contains("secret")),
        "{names:?}"
    );

    for revision in ["../../../../x", "/etc", "main/../../x", ".hidden", "a b"] {
        let (code, body) = server.post(
            "/api/models/pull",
            json!({"repo": "org/tiny", "revision": revision}),
        );
        assert_eq!(code, 400, "{revision}: {body}");
        assert!(error_of(&body).contains("revision"), "{body}");
    }

    for token in [" ", "   \t", " padded-token ", "short"] {
        let out = Command::new(env!("CARGO_BIN_EXE_safeprobe"))
            .args([
                "serve",
                "--bind",
                "0.0.0.0:0",
                "--device",
                "cpu",
                "--token",
                token,
            ])
            .arg("--data-dir")
            .arg(data.path().join("other"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{token:?} served");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--token"), "{token:?}: {err}");
    }
}

/// Writes `bytes` of small JSONL training records.
fn many_records(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let line = b"{\"prompt\": \"2+2?\", \"response\": \"4\"}\n";
    for _ in 0..bytes / line.len() {
        file.write_all(line).unwrap();
    }
}

/// An upload is checked one record at a time: 40 MB of tiny records (which took the server to
/// about 28 times the file's size when they were all parsed at once) raise its peak by less
/// than 150 MB.
#[test]
fn uploads_are_checked_with_bounded_memory() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    still_up(&server);
    let before = peak_rss(server.child.id());
    let file = data.path().join("records.jsonl");
    many_records(&file, 40 << 20);
    let body = upload(&server, &file);
    assert_eq!(body["holds"], "examples", "{body}");
    assert!(body["records"].as_u64().unwrap() > 1_000_000, "{body}");
    let after = peak_rss(server.child.id());
    let grew = after.saturating_sub(before);
    assert!(grew < 150 << 20, "the peak grew by {} MiB", grew >> 20);

    // A record over the limit is named by its line, not read whole.
    let long = data.path().join("long.jsonl");
    let record = format!(
        "{{\"prompt\": \"{}\", \"response\": \"x\"}}\n",
        "a".repeat(3 << 20)
    );
    std::fs::write(
        &long,
        format!("{{\"prompt\": \"p\", \"response\": \"r\"}}\n{record}"),
    )
    .unwrap();
    let body = upload(&server, &long);
    assert!(error_of(&body).contains(":2:"), "{body}");
    assert!(error_of(&body).contains("limit"), "{body}");
}

/// `file` sent to the upload endpoint as a multipart form.
fn upload(server: &Server, file: &Path) -> Value {
    let boundary = "safeprobe-test-boundary";
    let name = file.file_name().unwrap().to_string_lossy();
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend(std::fs::read(file).unwrap());
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let response = ureq::post(&server.url("/api/datasets"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .set(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .timeout(Duration::from_secs(300))
        .send_bytes(&body);
    api::answer(response).1
}
