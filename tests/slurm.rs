//! The Slurm executor against a real Slurm (Debian's slurmctld, slurmd and munge, started by
//! the test from a generated config): a comparison submitted as a job array gives the local
//! executor's table, with one task requeued mid-run (it resumes from its checkpoint, and its
//! adapter is the uninterrupted run's bit for bit); a refused submission, a missing sbatch and
//! failing tasks are errors that say what happened, and leave nothing queued.
//!
//! One test, one cluster, one comparison at a time: the node has this machine's two cores.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/slurm.rs"]
mod slurm;

#[path = "support/api.rs"]
mod api;
use slurm::{Cluster, wait_for};

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../eval/demo-model")
}

/// `safeprobe compare` on a small comparison (SFT and SAP, one seed, LoRA, 60 steps with a
/// checkpoint every 4, 4 harmful prompts), into `out`.
fn compare(cluster: &Cluster, out: &Path, extra: &[&str]) -> Command {
    let mut command = cluster.command(env!("CARGO_BIN_EXE_safeprobe"));
    command
        .args(["compare", "--device", "cpu"])
        .args([
            "--set",
            &format!("output_dir={:?}", out.display().to_string()),
        ])
        .args([
            "--set",
            &format!("model={:?}", demo_model().display().to_string()),
        ])
        .args(["--set", "methods=[\"sft\", \"sap\"]"])
        .args(["--set", "seeds=[0]"])
        .args(["--set", "poison_fraction=[0.0]"])
        .args(["--set", "max_prompts=4"])
        .args(["--set", "max_new_tokens=6"])
        .args(["--set", "train.finetune=\"lora\""])
        .args(["--set", "train.max_steps=60"])
        .args(["--set", "train.checkpoint_every=4"])
        .args(["--set", "train.eval_every=20"])
        .args(["--set", "train.batch_size=4"])
        .args(["--set", "train.safety_batch_size=4"])
        .args(["--set", "slurm.poll_seconds=0.2"])
        .args(extra)
        .stdin(Stdio::null());
    command
}

fn finished(command: &mut Command) -> Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The runs of a comparison.json, without what differs between two machines running the same
/// thing (folders, times).
fn runs(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("comparison.json")).unwrap();
    let comparison: Value = serde_json::from_str(&text).unwrap();
    comparison["conditions"][0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            let mut run = run.clone();
            let object = run.as_object_mut().unwrap();
            object.remove("run_dir");
            object.remove("step_time_s");
            run
        })
        .collect()
}

fn adapter(out: &Path, method: &str) -> Vec<u8> {
    std::fs::read(
        out.join(format!("{method}-seed0"))
            .join("adapter/adapter_model.safetensors"),
    )
    .unwrap()
}

fn queue_is_empty(cluster: &Cluster) -> bool {
    cluster.run("squeue", &["-h"]).trim().is_empty()
}

#[test]
fn a_comparison_on_slurm_equals_the_local_one_through_a_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&dir.path().join("slurm"));

    // The reference: the same comparison, run here.
    let local = dir.path().join("local");
    finished(&mut compare(&cluster, &local, &["--executor", "local"]));
    assert!(!local.join("slurm").exists());

    // Under Slurm, task 0 (SFT) requeued once it has a checkpoint. The output folder is
    // relative, as a user's usually is: the tasks must find the runs' data where it is here.
    let on_slurm = dir.path().join("on-slurm");
    let mut child = compare(&cluster, Path::new("on-slurm"), &["--executor", "slurm"])
        .current_dir(dir.path())
        .stderr(std::fs::File::create(dir.path().join("compare.err")).unwrap())
        .spawn()
        .unwrap();
    let run0 = on_slurm.join("sft-seed0");
    wait_for(
        || {
            std::fs::read_dir(run0.join("checkpoints"))
                .is_ok_and(|mut entries| entries.next().is_some())
        },
        "task 0's first checkpoint",
        &cluster.dir,
    );
    let job = std::fs::read_to_string(on_slurm.join("slurm/job-id")).unwrap();
    let task = format!("{}_0", job.trim());
    cluster.run("scontrol", &["requeue", &task]);
    // A requeued job waits before it may start again; let it start now.
    wait_for(
        || {
            cluster
                .run("squeue", &["-h", "-r", "-j", &task, "-o", "%T"])
                .contains("PENDING")
        },
        "the requeued task to be pending",
        &cluster.dir,
    );
    cluster.run(
        "scontrol",
        &["update", &format!("JobId={task}"), "StartTime=now"],
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the comparison did not end"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = std::fs::read_to_string(dir.path().join("compare.err")).unwrap();
    assert!(status.success(), "{stderr}");

    // The task ran twice, the second time from its checkpoint; the comparison saw it.
    let attempts = std::fs::read_to_string(run0.join("task-attempts")).unwrap();
    assert_eq!(attempts.lines().count(), 2, "{attempts}");
    assert!(
        attempts.lines().nth(1).unwrap().contains("attempt 1"),
        "{attempts}"
    );
    // The two tasks started on the two nodes.
    let first_attempts: Vec<String> = ["sft-seed0", "sap-seed0"]
        .iter()
        .map(|run| {
            let attempts =
                std::fs::read_to_string(on_slurm.join(run).join("task-attempts")).unwrap();
            attempts
                .lines()
                .next()
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut nodes = first_attempts.clone();
    nodes.sort();
    let mut expected = cluster.nodes.to_vec();
    expected.sort();
    assert_eq!(nodes, expected, "{first_attempts:?}");
    let log = std::fs::read_to_string(on_slurm.join("slurm/task-0.log")).unwrap();
    assert!(log.contains("resuming"), "{log}");
    for state in ["running", "requeued", "done"] {
        assert!(
            stderr.contains(&format!(
                "slurm task {task} (sft seed 0, benign data) {state}"
            )),
            "no {state} in:\n{stderr}"
        );
    }

    // The same table, and the same adapters bit for bit.
    assert_eq!(runs(&on_slurm), runs(&local));
    for method in ["sft", "sap"] {
        assert!(
            adapter(&on_slurm, method) == adapter(&local, method),
            "{method}'s adapter differs"
        );
    }
    assert!(queue_is_empty(&cluster));

    // A partition that does not exist: sbatch's own words, and nothing submitted.
    let refused = compare(
        &cluster,
        &dir.path().join("refused"),
        &["--executor", "slurm", "--partition", "nowhere"],
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("sbatch --parsable")
            && said.contains("--partition=nowhere")
            && said.contains("invalid partition"),
        "{said}"
    );
    assert!(queue_is_empty(&cluster));

    // No Slurm where the comparison runs.
    let absent = compare(
        &cluster,
        &dir.path().join("absent"),
        &["--executor", "slurm"],
    )
    .env("PATH", "/nonexistent")
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&absent.stderr);
    assert!(!absent.status.success());
    assert!(said.contains("sbatch is not on PATH"), "{said}");

    // Tasks that fail: each run named, with its log's tail, and no table. Their folder held
    // an earlier run's events and checkpoint, which must not pass for this one's.
    let failing = dir.path().join("failing");
    let stale = failing.join("sft-seed0");
    std::fs::create_dir_all(stale.join("checkpoints/step-4")).unwrap();
    std::fs::write(
        stale.join("metrics.jsonl"),
        "{\"event\": \"validation\", \"step\": 4, \"loss\": 9.0}\n",
    )
    .unwrap();
    let out = compare(
        &cluster,
        &failing,
        &[
            "--executor",
            "slurm",
            "--set",
            "slurm.program=\"/bin/false\"",
        ],
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("2 of the comparison's 2 runs did not train under Slurm")
            && said.contains("sft (seed 0) (task ")
            && said.contains("sap (seed 0) (task ")
            && said.contains("exit status 1"),
        "{said}"
    );
    assert!(!failing.join("comparison.json").exists());
    assert!(!stale.join("checkpoints").exists() && !stale.join("metrics.jsonl").exists());
    assert!(queue_is_empty(&cluster));

    // Ctrl-C while the tasks run cancels the array.
    let interrupted = dir.path().join("interrupted");
    let mut child = compare(&cluster, &interrupted, &["--executor", "slurm"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || {
            cluster
                .run("squeue", &["-h", "-o", "%T"])
                .contains("RUNNING")
        },
        "the tasks to run",
        &cluster.dir,
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(!child.wait().unwrap().success());
    wait_for(
        || queue_is_empty(&cluster),
        "the array to be cancelled",
        &cluster.dir,
    );

    // The panel's way: a comparison job with executor = slurm runs as an array, its tasks'
    // states in the job's events; cancelling a job cancels its array.
    let data = dir.path().join("server");
    std::fs::create_dir_all(&data).unwrap();
    let conf = cluster.conf.display().to_string();
    let server = api::Server::start_with_env(&data, &[], &[("SLURM_CONF", &conf)]);
    let config = json!({
        "executor": "slurm",
        "device": "cpu",
        "methods": ["sft", "sap"],
        "seeds": [0],
        "poison_fraction": [0.0],
        "max_prompts": 4,
        "max_new_tokens": 6,
        "slurm": {"poll_seconds": 0.2},
        "train": {"finetune": "lora", "max_steps": 60, "checkpoint_every": 4, "eval_every": 20,
                  "batch_size": 4, "safety_batch_size": 4},
    });
    let (code, job) = server.post("/api/jobs", json!({"kind": "compare", "config": config}));
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let job = server.wait_for(id, "the comparison job", |j| {
        ["done", "failed"].contains(&j["status"].as_str().unwrap_or(""))
    });
    assert_eq!(job["status"], "done", "{job}");
    let (_, page) = server.get(&format!("/api/jobs/{id}/metrics?after=0&limit=100000"));
    let events: Vec<&Value> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["body"])
        .collect();
    let states = |method: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["event"] == "task" && e["run"]["method"] == method)
            .map(|e| e["state"].as_str().unwrap().to_string())
            .collect()
    };
    for method in ["sft", "sap"] {
        let seen = states(method);
        assert_eq!(
            seen.last().map(String::as_str),
            Some("done"),
            "{method}: {seen:?}"
        );
        assert!(seen.contains(&"running".to_string()), "{method}: {seen:?}");
    }
    // Each run's steps came through as its own part, in order.
    let steps = events.iter().filter(|e| e["event"] == "step").count();
    assert_eq!(steps, 2 * 60);
    let rows = &job["result"]["conditions"][0]["runs"];
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows}");

    let (code, job) = server.post("/api/jobs", json!({"kind": "compare", "config": config}));
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    wait_for(
        || {
            cluster
                .run("squeue", &["-h", "-o", "%T"])
                .contains("RUNNING")
        },
        "the job's tasks to run",
        &cluster.dir,
    );
    let (code, answer) = server.post(&format!("/api/jobs/{id}/cancel"), json!({}));
    assert!(code < 300, "{answer}");
    server.wait_for(id, "the cancelled job", |j| j["status"] == "cancelled");
    wait_for(
        || queue_is_empty(&cluster),
        "the job's array to be cancelled",
        &cluster.dir,
    );
}
