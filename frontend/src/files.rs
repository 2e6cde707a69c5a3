//! What the file features decide, as plain functions with native tests: what an upload holds
//! in words, which run-config field a data file fits, whether a run has an adapter to
//! download, and the names and URLs used.

use safeprobe_wire::spec::Finetune;
use safeprobe_wire::{Job, JobSpec};

/// The upload endpoint; without `replace` the server refuses a name that exists (409), so a
/// re-upload has to be asked for.
pub fn upload_url(replace: bool) -> &'static str {
    if replace {
        "/api/datasets?replace=true"
    } else {
        "/api/datasets"
    }
}

/// "6 training examples", "4 safety pairs", "2 harmful prompts".
pub fn holds_in_words(holds: &str, records: usize) -> String {
    let what = match holds {
        "examples" => "training examples",
        "pairs" => "safety pairs",
        "prompts" => "harmful prompts",
        other => return format!("{records} records ({other})"),
    };
    format!("{records} {what}")
}

/// The run-config field a file holding `holds` can be used as; harmful prompts are for
/// evaluations, not training runs.
pub fn field_for(holds: &str) -> Option<&'static str> {
    match holds {
        "examples" => Some("train_data"),
        "pairs" => Some("safety_data"),
        _ => None,
    }
}

/// A size for people: "812 B", "3.4 kB", "1.2 MB".
pub fn bytes_in_words(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

/// A pull's state in words: the file and bytes while running, the reason when it failed.
pub fn pull_in_words(pull: &safeprobe_wire::PullStatus) -> String {
    use safeprobe_wire::PullState;
    match pull.state {
        PullState::Done => format!("done: {} files", pull.files),
        PullState::Failed => format!(
            "failed: {}",
            pull.error.as_deref().unwrap_or("unknown error")
        ),
        PullState::Running if pull.files == 0 => "asking the Hub for the file list".into(),
        PullState::Running => {
            let mut text = format!(
                "{} (file {} of {})",
                pull.file,
                (pull.files_done + 1).min(pull.files),
                pull.files
            );
            if pull.total > 0 {
                text.push_str(&format!(
                    ": {} of {} ({:.0}%)",
                    bytes_in_words(pull.bytes),
                    bytes_in_words(pull.total),
                    100.0 * pull.bytes as f64 / pull.total as f64
                ));
            }
            text
        }
    }
}

/// The preview endpoint for a data file, rendered through `model`'s chat template (the
/// server's default model when the form names none).
pub fn preview_url(path: &str, model: &str, rows: usize) -> String {
    let mut url = format!("/api/datasets/preview?path={}&rows={rows}", encode(path));
    if !model.trim().is_empty() {
        url.push_str(&format!("&model={}", encode(model.trim())));
    }
    url
}

/// Percent-encodes everything but unreserved characters and `/`, enough for a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a training run trained a LoRA adapter (the only runs with one to download).
pub fn trains_lora(job: &Job) -> bool {
    matches!(&job.spec, JobSpec::Train(train) if train.config.finetune == Finetune::Lora)
}

/// What a downloaded adapter is saved as (the name the server's Content-Disposition gives).
pub fn adapter_file_name(id: i64) -> String {
    format!("job-{id}-adapter.zip")
}

/// The merge dtypes the server takes, the default first.
pub const EXPORT_DTYPES: [&str; 2] = ["bf16", "f32"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_reads_as_its_file_bytes_or_failure() {
        use safeprobe_wire::{PullState, PullStatus};
        let mut pull = PullStatus::started("org/m", "main");
        assert_eq!(pull_in_words(&pull), "asking the Hub for the file list");
        pull.file = "model.safetensors".into();
        (pull.files_done, pull.files, pull.bytes, pull.total) = (2, 5, 250_000_000, 1_000_000_000);
        assert_eq!(
            pull_in_words(&pull),
            "model.safetensors (file 3 of 5): 250.0 MB of 1000.0 MB (25%)"
        );
        pull.state = PullState::Failed;
        pull.error = Some("org/m@main: not found (404)".into());
        assert_eq!(pull_in_words(&pull), "failed: org/m@main: not found (404)");
        pull.state = PullState::Done;
        assert_eq!(pull_in_words(&pull), "done: 5 files");
    }
    use safeprobe_wire::{JobKind, Status};
    use serde_json::json;

    /// A finished training job whose config sets `settings` (over a model, data and folder).
    fn job(settings: serde_json::Value) -> Job {
        let mut config = json!({"model": "m", "train_data": "t.jsonl", "output_dir": "o"});
        for (key, value) in settings.as_object().unwrap() {
            config[key] = value.clone();
        }
        Job {
            id: 3,
            status: Status::Done,
            spec: JobSpec::read(JobKind::Train, config).unwrap(),
            run_dir: None,
            result: None,
            error: None,
            created_at: 0.0,
            started_at: None,
            finished_at: None,
            last_step: None,
            progress: Default::default(),
            last_validation: None,
            last_alignment: None,
            answers: Vec::new(),
            name: String::new(),
            notes: String::new(),
        }
    }

    #[test]
    fn an_upload_is_told_in_words_and_fits_its_field() {
        assert_eq!(holds_in_words("examples", 6), "6 training examples");
        assert_eq!(holds_in_words("pairs", 1), "1 safety pairs");
        assert_eq!(holds_in_words("prompts", 2), "2 harmful prompts");
        assert_eq!(holds_in_words("tables", 2), "2 records (tables)");
        assert_eq!(field_for("examples"), Some("train_data"));
        assert_eq!(field_for("pairs"), Some("safety_data"));
        assert_eq!(field_for("prompts"), None);
    }

    #[test]
    fn replacing_is_asked_for_in_the_url() {
        assert_eq!(upload_url(false), "/api/datasets");
        assert_eq!(upload_url(true), "/api/datasets?replace=true");
    }

    #[test]
    fn sizes_read_in_units() {
        assert_eq!(bytes_in_words(812), "812 B");
        assert_eq!(bytes_in_words(3_400), "3.4 kB");
        assert_eq!(bytes_in_words(1_250_000), "1.2 MB");
    }

    #[test]
    fn preview_urls_encode_the_path_and_skip_an_empty_model() {
        assert_eq!(
            preview_url("uploads/my data.jsonl", "", 3),
            "/api/datasets/preview?path=uploads/my%20data.jsonl&rows=3"
        );
        assert_eq!(
            preview_url("a&b.jsonl", " demo ", 1),
            "/api/datasets/preview?path=a%26b.jsonl&rows=1&model=demo"
        );
    }

    #[test]
    fn only_lora_runs_have_an_adapter() {
        assert!(trains_lora(&job(json!({"finetune": "lora"}))));
        assert!(trains_lora(&job(json!({}))));
        assert!(!trains_lora(&job(json!({"finetune": "full"}))));
        let eval = JobSpec::read(JobKind::Eval, json!({"model": "m"})).unwrap();
        assert!(!trains_lora(&Job {
            spec: eval,
            ..job(json!({}))
        }));
        assert_eq!(adapter_file_name(7), "job-7-adapter.zip");
    }
}
