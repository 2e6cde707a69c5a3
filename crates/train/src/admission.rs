//! Sizing a run before it starts: the settings that need the model's shape (probed layers,
//! sequence length against the context) and the memory the run will take, so that the CLI
//! and the server refuse what cannot fit with the same message, before anything is allocated.

use safeprobe_model::ModelConfig;
use safeprobe_model::memory::{self, Estimate};

use crate::config::{Finetune, Method, RunConfig, SpecError};
use crate::data;
use crate::error::{Result, TrainError};
use crate::methods::safegrad::AlignmentLoss;

/// What a run config needs of the model and the data before it runs: the checks against the
/// model's shape and the memory it will take.
pub trait RunSizing {
    fn check_against(&self, model: &ModelConfig) -> std::result::Result<(), SpecError>;
    fn longest_sequence(&self) -> usize;
    fn memory_estimate(&self, model: &ModelConfig, fused: bool) -> Estimate;
}

impl RunSizing for RunConfig {
    /// Checks the settings that depend on the model: every probed layer exists, and a
    /// sequence fits the model's context.
    fn check_against(&self, model: &ModelConfig) -> std::result::Result<(), SpecError> {
        self.check_layers(model.num_hidden_layers)?;
        if self.max_len > model.max_position_embeddings {
            return Err(SpecError::new(
                "max_len",
                format!(
                    "{} is over this model's context of {} tokens",
                    self.max_len, model.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// The longest sequence the run will batch (each batch is padded to its longest row, not
    /// to `max_len`): `max_len`, or less when every record of its data is shorter. A token
    /// stands for at least one byte of text (byte-level BPE, and byte fallback), so a record of
    /// n bytes is at most n tokens, plus what the chat template and the system prompt add.
    /// Data that is not there yet (a comparison writes its own) is sized at `max_len`.
    fn longest_sequence(&self) -> usize {
        /// Role markers and a default system prompt (Qwen's is about 20 tokens), generously.
        const TEMPLATE_TOKENS: usize = 128;
        let mut longest = 0;
        for path in self.data_files() {
            let read = data::for_each_record(path, |_, record| {
                longest = longest.max(data::text_bytes(&record));
                Ok(())
            });
            if read.is_err() {
                return self.max_len;
            }
        }
        let system = self.system.as_ref().map_or(0, String::len);
        self.max_len.min(
            longest
                .saturating_add(system)
                .saturating_add(TEMPLATE_TOKENS),
        )
    }

    /// The run's peak memory: the base weights, what trains with its gradient and optimiser
    /// state, and its largest pass: a task batch, or a SAP step's safety pass over the chosen
    /// and rejected answers of `safety_batch_size` pairs, each of `longest_sequence` tokens.
    /// `fused`: the CPU backend.
    fn memory_estimate(&self, model: &ModelConfig, fused: bool) -> Estimate {
        let trainable = match self.finetune {
            Finetune::Lora => memory::lora_parameters(model, &self.lora),
            // The weights themselves are counted already.
            Finetune::Full => safeprobe_model::decoder::parameter_count(model) as u64,
        };
        // A gradient and AdamW's two moments (and the adapter itself for LoRA), plus the
        // copies the method keeps: SAP the harmful direction and the perturbed weights,
        // SafeGrad the alignment gradient (and the starting weights for its KL loss), Lisa
        // its anchor and the weights it measures the drift from, SPPFT the frozen weights
        // it puts back.
        let own = match self.finetune {
            Finetune::Lora => 4,
            Finetune::Full => 3,
        };
        let kept = match self.method {
            Method::Sap | Method::Lisa => 2,
            Method::SafeGrad if self.safegrad.alignment_loss == AlignmentLoss::Kl => 2,
            Method::SafeGrad | Method::Sppft => 1,
            Method::Base | Method::Sft | Method::Mix => 0,
        };
        let trainable_state = trainable.saturating_mul(own + kept);
        // SAP's and SPPFT's safety passes hold the chosen and the rejected answers; SafeGrad
        // and Lisa train on the chosen ones.
        let safety_rows = match self.method {
            Method::Sap | Method::Sppft | Method::Sft | Method::Mix | Method::Base => {
                self.safety_batch_size.saturating_mul(2)
            }
            Method::SafeGrad | Method::Lisa => self.safety_batch_size,
        };
        let uses_pairs = (self.method.needs_safety_pairs() && self.method != Method::Mix)
            || self.safety_eval.is_some();
        let rows = if uses_pairs {
            self.batch_size.max(safety_rows)
        } else {
            self.batch_size
        };
        let trained: &[&str] = match self.finetune {
            Finetune::Lora => &["lora.r", "lora.target_modules"],
            Finetune::Full => &["finetune"],
        };
        let seq_len = self.longest_sequence();
        let mut estimate = memory::training_memory(model, trainable_state, rows, seq_len, fused);
        estimate.drivers = ["model", "batch_size", "max_len"]
            .into_iter()
            .chain(uses_pairs.then_some("safety_batch_size"))
            .chain(trained.iter().copied())
            .map(str::to_string)
            .collect();
        estimate
    }
}

/// What a request may use of `bytes`: a tenth is left to the system (and the server).
pub fn usable(bytes: u64) -> u64 {
    bytes - bytes / 10
}

/// Refuses `estimate` when it is over 90% of the memory this machine has free now (where the
/// machine reports it): the CLI's check before it loads a model onto the CPU.
pub fn check_free_memory(estimate: &Estimate, what: &str) -> Result<()> {
    match memory::host_memory() {
        Some((_, available)) => check_fits(
            estimate,
            usable(available),
            what,
            "free on this machine now (90% of what is available)",
        ),
        None => Ok(()),
    }
}

/// Refuses `estimate` when it is over `budget` bytes; `what` names the request ("this run"),
/// `whose` the budget ("free on this machine now").
pub fn check_fits(estimate: &Estimate, budget: u64, what: &str, whose: &str) -> Result<()> {
    if estimate.total() <= budget {
        return Ok(());
    }
    Err(TrainError::TooLarge(format!(
        "{what} needs an estimated {} of memory, over the {} {whose}; lower {}",
        estimate.describe(),
        memory::human(budget),
        estimate.drivers.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunFile;

    fn run(extra: &str) -> RunConfig {
        let text = format!(
            "model = 'm'\ntrain_data = 't'\noutput_dir = 'o'\nmax_steps = 1\nmethod = 'sft'\n{extra}"
        );
        RunConfig::parse_before_data(&text, &[], std::path::Path::new("test")).unwrap()
    }

    fn model() -> ModelConfig {
        ModelConfig::qwen2(4096, 256, 704, 4, 4, 2, 512, 1e6, vec![])
    }

    #[test]
    fn settings_are_checked_against_the_models_shape() {
        assert!(
            run("[sap]\nlayers = [0, 3]")
                .check_against(&model())
                .is_ok()
        );
        let error = run("[sap]\nlayers = [4]")
            .check_against(&model())
            .unwrap_err();
        assert!(error.to_string().contains("sap.layers: layer 4"), "{error}");
        let error = run("max_len = 513").check_against(&model()).unwrap_err();
        assert!(error.to_string().contains("max_len: 513"), "{error}");
    }

    /// A generous max_len over short data is sized by the data: a record of n bytes is at most
    /// n tokens plus the template's.
    #[test]
    fn short_data_is_sized_by_its_longest_record() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("t.jsonl");
        std::fs::write(&data, "{\"prompt\": \"2+2?\", \"response\": \"4\"}\n").unwrap();
        let text = format!(
            "model = 'm'\ntrain_data = '{}'\noutput_dir = 'o'\nmax_steps = 1\nmethod = 'sft'\n",
            data.display()
        );
        let parse = |extra: &str| {
            RunConfig::parse(&format!("{text}{extra}"), &[], std::path::Path::new("test")).unwrap()
        };
        let (capped, generous) = (parse("max_len = 64"), parse("max_len = 4096"));
        assert_eq!(capped.longest_sequence(), 64);
        // 19 bytes of keys and text ("prompt", "2+2?", "response", "4"), plus 128 for the
        // template.
        assert_eq!(generous.longest_sequence(), 19 + 128);
        let model = model();
        assert!(
            generous.memory_estimate(&model, true).total()
                < run("max_len = 4096").memory_estimate(&model, true).total()
        );
    }

    /// The estimate grows with what drives it, names those settings, and a refusal gives both.
    #[test]
    fn the_estimate_names_what_drives_it() {
        let small = run("batch_size = 2").memory_estimate(&model(), true);
        let large = run("batch_size = 64").memory_estimate(&model(), true);
        assert!(large.total() > small.total());
        let ranked = run("[lora]\nr = 512").memory_estimate(&model(), true);
        assert!(ranked.total() > small.total());
        assert!(
            small.drivers.iter().any(|d| d == "lora.r"),
            "{:?}",
            small.drivers
        );
        let full = run("finetune = 'full'").memory_estimate(&model(), true);
        assert!(full.drivers.iter().any(|d| d == "finetune"));
        let error = check_fits(&large, small.total(), "this run", "allowed").unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("this run needs an estimated"),
            "{message}"
        );
        assert!(message.contains("batch_size"), "{message}");
        assert!(check_fits(&small, small.total(), "this run", "allowed").is_ok());
    }
}
