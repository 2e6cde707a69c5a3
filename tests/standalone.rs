//! The installed binary stands alone: it holds no path into the source tree, and a copy of it
//! run from elsewhere, with nothing but a per-user data folder, finds its demo model (which it
//! unpacks there on first use).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root, as this build saw it.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn binary_holds_no_path_into_the_source_tree() {
    // A path compiled in (env!("CARGO_MANIFEST_DIR") and the like) would be read at run time
    // and break once the source tree is gone.
    let binary = std::fs::read(env!("CARGO_BIN_EXE_safeprobe")).unwrap();
    let root = workspace_root();
    let root = root.to_str().unwrap();
    assert!(
        !contains(&binary, root.as_bytes()),
        "the safeprobe binary contains the workspace path {root}"
    );
}

/// Runs the copied binary in `cwd` with only `home` as its data folder.
fn run(binary: &Path, cwd: &Path, home: &Path, args: &[&str]) -> Output {
    let output = Command::new(binary)
        .args(args)
        .current_dir(cwd)
        .env("SAFEPROBE_HOME", home)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "safeprobe {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The folders in `home` that hold an unpacked demo model.
fn unpacked_models(home: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(home)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.join("model.safetensors").is_file())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_copy_run_elsewhere_unpacks_and_uses_the_demo_model() {
    let bin_dir = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let home = home.path().join("safeprobe-home");
    let binary = bin_dir.path().join("safeprobe");
    std::fs::copy(env!("CARGO_BIN_EXE_safeprobe"), &binary).unwrap();

    let info = run(&binary, cwd.path(), &home, &["info", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["config"]["num_hidden_layers"], 4, "{info}");
    // What train and serve size a run at: SAP's safety pass has twice the rows of SFT's batch.
    let admitted = &info["admission_bytes"]["cpu"];
    assert!(
        admitted["sap"].as_u64().unwrap() > admitted["sft"].as_u64().unwrap(),
        "{info}"
    );
    let unpacked = unpacked_models(&home);
    assert_eq!(
        unpacked.len(),
        1,
        "expected one demo model in {}",
        home.display()
    );
    let name = unpacked[0].file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("demo-model-"), "{name}");
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(unpacked[0].join(file).is_file(), "{file} not unpacked");
    }

    // A second command reuses the unpacked copy, and the full walk-through runs on it.
    let demo = run(&binary, cwd.path(), &home, &["demo", "--device", "cpu"]);
    let demo = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.contains(&unpacked[0].display().to_string()), "{demo}");
    assert_eq!(unpacked_models(&home), unpacked);
    // Nothing was written where it ran.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}

#[test]
fn a_missing_model_is_named_and_its_cause_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let output = Command::new(env!("CARGO_BIN_EXE_safeprobe"))
        .arg("info")
        .arg("--model")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&missing.join("config.json").display().to_string()),
        "{stderr}"
    );
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
}
