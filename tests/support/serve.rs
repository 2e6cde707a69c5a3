//! Starts the real `safeprobe serve` binary on an ephemeral port (shared by the API and
//! browser tests).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Spawns the server on 127.0.0.1:0 with `token` and `data_dir` (plus `datasets` directories)
/// and returns it with its base URL, read from the line it prints once listening.
#[allow(dead_code)]
pub fn spawn(data_dir: &Path, token: &str, datasets: &[&Path]) -> (Child, String) {
    spawn_with(data_dir, token, datasets, &[])
}

/// `spawn` with more command-line arguments.
#[allow(dead_code)]
pub fn spawn_with(
    data_dir: &Path,
    token: &str,
    datasets: &[&Path],
    args: &[&str],
) -> (Child, String) {
    spawn_with_env(data_dir, token, datasets, args, &[])
}

/// `spawn_with` and environment variables. The Hugging Face cache is the test's own
/// (`data_dir/hf-cache`) and the user's HF_TOKEN and HF_ENDPOINT are not passed on, unless
/// `env` sets them.
#[allow(dead_code)]
pub fn spawn_with_env(
    data_dir: &Path,
    token: &str,
    datasets: &[&Path],
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_safeprobe"));
    command
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env("HF_HUB_CACHE", data_dir.join("hf-cache"))
        .envs(env.iter().copied());
    command
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--token",
            token,
            "--data-dir",
        ])
        .arg(data_dir)
        .args(args)
        // The demo model unpacks into the test's own folder, not the user's home.
        .env("SAFEPROBE_HOME", data_dir.join("home"));
    for dir in datasets {
        command.arg("--datasets").arg(dir);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("safeprobe is serving on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim_end_matches('/')
        .to_string();
    (child, base)
}
