//! Sizing a run before it starts: the settings that need the model's shape (probed layers,
//! sequence length against the context) and the memory the run will take, so that the CLI
//! and the server refuse what cannot fit with the same message, before anything is allocated.

use safeprobe_model::ModelConfig;
use safeprobe_model::memory::{self, Estimate};

use crate::error::{Result, TrainError};
use crate::run::{Finetune, Method, RunConfig};

impl RunConfig {
    /// Checks the settings that depend on the model: every probed layer exists, and a
    /// sequence fits the model's context.
    pub fn check_against(&self, model: &ModelConfig) -> Result<()> {
        let layers = model.num_hidden_layers;
        if let Some(layer) = self.sap.layers.iter().find(|&&l| l >= layers) {
            return Err(TrainError::Config(format!(
                "sap.layers: layer {layer} does not exist; this model has layers 0..={}",
                layers - 1
            )));
        }
        if self.max_len > model.max_position_embeddings {
            return Err(TrainError::Config(format!(
                "max_len: {} is over this model's context of {} tokens",
                self.max_len, model.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// The run's peak memory: the base weights, what trains with its gradient and optimiser
    /// state, and its largest pass: a task batch, or a SAP step's safety pass over the chosen
    /// and rejected answers of `safety_batch_size` pairs. `fused`: the CPU backend.
    pub fn memory_estimate(&self, model: &ModelConfig, fused: bool) -> Estimate {
        let trainable = match self.finetune {
            Finetune::Lora => memory::lora_parameters(model, &self.lora),
            Finetune::Full => safeprobe_model::decoder::parameter_count(model) as u64,
        };
        let safety_rows = self.safety_batch_size.saturating_mul(2);
        let uses_pairs = self.method == Method::Sap || self.safety_eval.is_some();
        let rows = if uses_pairs {
            self.batch_size.max(safety_rows)
        } else {
            self.batch_size
        };
        let trained: &[&str] = match self.finetune {
            Finetune::Lora => &["lora.r", "lora.target_modules"],
            Finetune::Full => &["finetune"],
        };
        let mut estimate = memory::training_memory(model, trainable, rows, self.max_len, fused);
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
