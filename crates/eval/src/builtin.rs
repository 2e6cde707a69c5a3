//! The data safeprobe ships, written for the project and compiled into the binary:
//! safety pairs (harmful request, safe refusal, non-actionable harmful compliance), held-out
//! harmful evaluation prompts, refusal examples used only to build the demo model, and the
//! generated benign tasks. `write` puts them on disk where a run config can name them.

use std::path::{Path, PathBuf};

use safeprobe_train::data::SafetyPair;
use serde::Deserialize;
use serde_json::json;

use crate::error::Result;
use crate::prompts::HarmfulPrompt;
use crate::tasks::{self, Labelled, Splits, Task};

const SAFETY_PAIRS: &str = include_str!("../data/safety_pairs.jsonl");
const HARMFUL_PROMPTS: &str = include_str!("../data/harmful_prompts.jsonl");
const REFUSAL_PROMPTS: &str = include_str!("../data/refusal_prompts.jsonl");

fn lines<T: for<'de> Deserialize<'de>>(text: &str) -> Vec<T> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("built-in data is valid (tested)"))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
pub struct CategorisedPair {
    pub category: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

pub fn safety_pairs() -> Vec<CategorisedPair> {
    lines(SAFETY_PAIRS)
}

pub fn pairs_for_training() -> Vec<SafetyPair> {
    safety_pairs()
        .into_iter()
        .enumerate()
        .map(|(i, p)| SafetyPair {
            prompt: p.prompt,
            chosen: p.chosen,
            rejected: p.rejected,
            line: i + 1,
        })
        .collect()
}

/// The held-out harmful prompts the harmful score is measured on.
pub fn harmful_prompts() -> Vec<HarmfulPrompt> {
    lines(HARMFUL_PROMPTS)
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefusalExample {
    pub category: String,
    pub prompt: String,
    pub refusal: String,
}

/// Harmful requests with refusals, used only to teach the demo model to refuse.
pub fn refusal_examples() -> Vec<RefusalExample> {
    lines(REFUSAL_PROMPTS)
}

/// Sizes of the benign task splits (train, validation, test).
pub const TASK_SPLITS: [usize; 3] = [2000, 100, 100];

/// The benign task's splits, the same for every caller with the same seed.
pub fn task_splits(task: Task, seed: u64) -> Result<Splits> {
    tasks::generate(task, TASK_SPLITS, seed)
}

/// Paths of the files `write` produced.
#[derive(Debug, Clone)]
pub struct DataFiles {
    pub train: PathBuf,
    pub validation: PathBuf,
    pub test: PathBuf,
    pub safety_pairs: PathBuf,
    pub harmful_prompts: PathBuf,
}

impl DataFiles {
    /// Where `write` puts the files for `task` in `dir`.
    pub fn in_dir(dir: &Path, task: Task) -> Self {
        Self {
            train: dir.join(format!("{}-train.jsonl", task.name())),
            validation: dir.join(format!("{}-validation.jsonl", task.name())),
            test: dir.join(format!("{}-test.jsonl", task.name())),
            safety_pairs: dir.join("safety_pairs.jsonl"),
            harmful_prompts: dir.join("harmful_prompts.jsonl"),
        }
    }
}

/// Writes `{"prompt", "response"}` lines.
pub fn write_labelled(path: &Path, examples: &[Labelled]) -> Result<()> {
    let text: String = examples
        .iter()
        .map(|e| format!("{}\n", json!({"prompt": e.prompt, "response": e.response})))
        .collect();
    safeprobe_model::weights::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Writes the task's splits, the safety pairs and the harmful prompts into `dir`.
pub fn write(dir: &Path, task: Task, seed: u64) -> Result<DataFiles> {
    std::fs::create_dir_all(dir).map_err(|e| crate::EvalError::file(dir, e.to_string()))?;
    let splits = task_splits(task, seed)?;
    let files = DataFiles::in_dir(dir, task);
    write_labelled(&files.train, &splits.train)?;
    write_labelled(&files.validation, &splits.validation)?;
    write_labelled(&files.test, &splits.test)?;
    safeprobe_model::weights::write_atomic(&files.safety_pairs, SAFETY_PAIRS.as_bytes())?;
    safeprobe_model::weights::write_atomic(&files.harmful_prompts, HARMFUL_PROMPTS.as_bytes())?;
    Ok(files)
}
