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
const STUDENT_PROMPTS: &str = include_str!("../data/student_prompts.jsonl");

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

/// The part a built-in safety pair plays. The pairs are dealt into three disjoint thirds (by
/// position, so each category lands in all three), and no pair plays two parts: the pairs the
/// harmful direction is computed from would otherwise also be the poison it is tested against,
/// or the yardstick it is measured by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairRole {
    /// SAP's harmful direction (and the mixing baseline's safe answers): `safety_data`.
    Direction,
    /// The continuous safety metric's held-out pairs: `safety_eval.pairs`.
    HeldOut,
    /// Where poisoning takes its harmful answers: `poison_data`.
    Poison,
}

impl PairRole {
    pub const ALL: [PairRole; 3] = [PairRole::Direction, PairRole::HeldOut, PairRole::Poison];

    pub fn of(index: usize) -> Self {
        Self::ALL[index % 3]
    }

    pub fn name(self) -> &'static str {
        match self {
            PairRole::Direction => "direction",
            PairRole::HeldOut => "held_out",
            PairRole::Poison => "poison",
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            PairRole::Direction => "safety_pairs.jsonl",
            PairRole::HeldOut => "held_out_pairs.jsonl",
            PairRole::Poison => "poison_pairs.jsonl",
        }
    }
}

/// The JSONL lines of the pairs that play `role`, as written in the built-in file.
fn pair_lines(role: PairRole) -> String {
    SAFETY_PAIRS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .filter(|(i, _)| PairRole::of(*i) == role)
        .map(|(_, l)| format!("{l}\n"))
        .collect()
}

/// How many built-in pairs play `role`.
pub fn pair_count(role: PairRole) -> usize {
    pair_lines(role).lines().count()
}

/// The pairs that play `role`, for the trainer.
pub fn pairs_in(role: PairRole) -> Vec<SafetyPair> {
    lines::<CategorisedPair>(&pair_lines(role))
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

/// A second harmful set, independent of the first and of everything the demo model trained
/// on: 240 requests as students type them into a chat box, written apart from the training
/// requests (`requests.rs`) and never used to choose anything.
pub fn student_prompts() -> Vec<HarmfulPrompt> {
    lines(STUDENT_PROMPTS)
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
    /// The direction pairs (`PairRole::Direction`).
    pub safety_pairs: PathBuf,
    pub held_out_pairs: PathBuf,
    pub poison_pairs: PathBuf,
    pub harmful_prompts: PathBuf,
}

impl DataFiles {
    /// Where `write` puts the files for `task` in `dir`.
    pub fn in_dir(dir: &Path, task: Task) -> Self {
        Self {
            train: dir.join(format!("{}-train.jsonl", task.name())),
            validation: dir.join(format!("{}-validation.jsonl", task.name())),
            test: dir.join(format!("{}-test.jsonl", task.name())),
            safety_pairs: dir.join(PairRole::Direction.file_name()),
            held_out_pairs: dir.join(PairRole::HeldOut.file_name()),
            poison_pairs: dir.join(PairRole::Poison.file_name()),
            harmful_prompts: dir.join("harmful_prompts.jsonl"),
        }
    }

    /// The files a comparison's runs read.
    pub fn for_runs(self) -> safeprobe_wire::spec::RunFiles {
        safeprobe_wire::spec::RunFiles {
            train: self.train,
            validation: self.validation,
            safety_pairs: self.safety_pairs,
            poison_pairs: self.poison_pairs,
            held_out_pairs: self.held_out_pairs,
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

/// Writes the task's splits, the safety pairs (one file per role) and the harmful prompts
/// into `dir`.
pub fn write(dir: &Path, task: Task, seed: u64) -> Result<DataFiles> {
    std::fs::create_dir_all(dir).map_err(|e| crate::EvalError::file(dir, e.to_string()))?;
    let splits = task_splits(task, seed)?;
    let files = DataFiles::in_dir(dir, task);
    write_labelled(&files.train, &splits.train)?;
    write_labelled(&files.validation, &splits.validation)?;
    write_labelled(&files.test, &splits.test)?;
    for (role, path) in [
        (PairRole::Direction, &files.safety_pairs),
        (PairRole::HeldOut, &files.held_out_pairs),
        (PairRole::Poison, &files.poison_pairs),
    ] {
        safeprobe_model::weights::write_atomic(path, pair_lines(role).as_bytes())?;
    }
    safeprobe_model::weights::write_atomic(&files.harmful_prompts, HARMFUL_PROMPTS.as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Content words, for telling a paraphrase from a different request ("how do i make pizza
    /// at home" and "how do i make cyanide at home" share all their function words).
    fn words(text: &str) -> HashSet<String> {
        const FUNCTION: [&str; 28] = [
            "a", "an", "the", "to", "of", "in", "on", "at", "for", "with", "and", "or", "i", "me",
            "my", "you", "your", "it", "is", "do", "how", "what", "whats", "can", "way", "best",
            "easiest", "without",
        ];
        text.to_lowercase()
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty() && !FUNCTION.contains(w))
            .map(str::to_string)
            .collect()
    }

    /// The second harmful set measures what the demo model never saw: none of its requests is,
    /// or nearly is (70% of words shared), one the model trained on, one the first set holds or
    /// a safety pair's; and it is 240 requests in the first set's ten categories.
    #[test]
    fn the_student_set_is_independent_of_the_training_and_the_first_set() {
        let students = student_prompts();
        assert_eq!(students.len(), 240);
        let categories = |p: &[HarmfulPrompt]| -> HashSet<String> {
            p.iter().map(|p| p.category.clone()).collect()
        };
        assert_eq!(categories(&students), categories(&harmful_prompts()));
        let seen: Vec<String> = refusal_examples()
            .into_iter()
            .chain(crate::requests::common_requests())
            .map(|r| r.prompt)
            .chain(crate::howto::benign_howtos().into_iter().map(|h| h.prompt))
            .chain(crate::howto::casual_howtos().into_iter().map(|h| h.prompt))
            .chain(harmful_prompts().into_iter().map(|p| p.prompt))
            .chain(safety_pairs().into_iter().map(|p| p.prompt))
            .collect();
        let seen: Vec<HashSet<String>> = seen.iter().map(|t| words(t)).collect();
        for student in &students {
            let mine = words(&student.prompt);
            for other in &seen {
                let shared = mine.intersection(other).count() as f64;
                let jaccard = shared / mine.union(other).count() as f64;
                assert!(
                    jaccard < 0.7,
                    "{:?} is nearly one seen ({other:?})",
                    student.prompt
                );
            }
        }
    }

    #[test]
    fn the_pair_roles_split_the_pairs_into_disjoint_thirds() {
        let all = safety_pairs();
        let roles: Vec<Vec<SafetyPair>> = PairRole::ALL.iter().map(|r| pairs_in(*r)).collect();
        assert_eq!(roles.iter().map(Vec::len).sum::<usize>(), all.len());
        for (role, pairs) in PairRole::ALL.iter().zip(&roles) {
            assert_eq!(pairs.len(), pair_count(*role));
            assert!(pairs.len() >= all.len() / 3, "{role:?}");
        }
        // No prompt, safe answer or harmful answer is in two roles, nor is any pair prompt
        // among the harmful prompts the harmful score is measured on.
        let texts = |pairs: &[SafetyPair]| -> HashSet<String> {
            pairs
                .iter()
                .flat_map(|p| [p.prompt.clone(), p.chosen.clone(), p.rejected.clone()])
                .collect()
        };
        for a in 0..3 {
            for b in a + 1..3 {
                let shared: Vec<_> = texts(&roles[a])
                    .intersection(&texts(&roles[b]))
                    .cloned()
                    .collect();
                assert!(
                    shared.is_empty(),
                    "{:?} and {:?} share {shared:?}",
                    PairRole::ALL[a],
                    PairRole::ALL[b]
                );
            }
        }
        let evaluated: HashSet<String> = harmful_prompts().into_iter().map(|p| p.prompt).collect();
        for pairs in &roles {
            assert!(pairs.iter().all(|p| !evaluated.contains(&p.prompt)));
        }
        // Every category is in every role.
        let categories: HashSet<&str> = all.iter().map(|p| p.category.as_str()).collect();
        for role in PairRole::ALL {
            let present: HashSet<&str> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| PairRole::of(*i) == role)
                .map(|(_, p)| p.category.as_str())
                .collect();
            assert_eq!(present, categories, "{role:?}");
        }
    }
}
