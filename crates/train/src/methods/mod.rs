//! Training methods: one file each, behind one small trait.
//!
//! The run's loop (`run.rs`) draws the task micro-batches every step and a batch of safety
//! pairs on the steps a method asks for; the method turns them into one optimiser step and
//! reports what it measured. What a method carries from step to step (SAP's probe, Lisa's
//! anchor, SPPFT's frozen layers) it saves into and restores from the run's checkpoints
//! itself, so resuming gives the uninterrupted run bit for bit.
//!
//! Adding a method: a file here implementing `StepMethod`, its settings table in
//! `RunConfig`, its variant of `safeprobe_wire::Method`, and its line in `build`.

pub mod lisa;
pub mod safegrad;
pub mod sap;
pub mod sft;
pub mod sppft;

use std::path::Path;

use burn::tensor::{Device, Tensor};
use safeprobe_model::decoder::CausalLm;

use crate::adamw::AdamW;
use crate::config::{Method, RunConfig};
use crate::data::{self, Batch, Sequence};
use crate::error::Result;

pub use safeprobe_wire::StepMetrics;

/// One step of a method.
pub trait StepMethod {
    /// Whether step `step` (counted from 0) takes a batch of safety pairs. The loop draws
    /// pairs only then, so the draws (and a resumed run's replay of them) follow this.
    fn draws_pairs(&self, step: usize) -> bool;

    /// Whether step `step` trains on its task batches. On a step that does not (Lisa's
    /// alignment state) the loop shows the method the batches the next step will take, without
    /// drawing them, so no task data is skipped and the task loss is still measured.
    fn trains_on_tasks(&self, _step: usize) -> bool {
        true
    }

    /// One optimiser step of `model` from the step's batches.
    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics;

    /// What the method carries across steps, for a checkpoint.
    fn save(&self) -> Saved {
        Saved::default()
    }

    /// Takes back what `save` wrote.
    fn restore(&mut self, _saved: &Restore) -> Result<()> {
        Ok(())
    }

    /// Files the method leaves in the run's folder when it ends (SAP's probe).
    fn write_artifacts(&self, _run_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Something the user should know about the run so far (said once by the loop).
    fn warning(&self) -> Option<String> {
        None
    }
}

/// What one step gets from the loop.
pub struct StepInput<'a> {
    /// The step, counted from 0.
    pub step: usize,
    /// The task micro-batches of this optimiser step.
    pub tasks: &'a [Batch],
    /// The safety pairs, on the steps `draws_pairs` asked for them.
    pub pairs: Option<&'a PairDraw>,
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    /// Set on steps with LoRA dropout (the device's generator is then this run's): a method
    /// that makes several passes reseeds with it to give each the same masks.
    pub dropout_seed: Option<u64>,
}

/// A draw of safety pairs, batched as a method needs them.
pub struct PairDraw {
    pub pairs: Vec<(Sequence, Sequence)>,
    pub pad: u32,
    pub device: Device,
}

impl PairDraw {
    /// Safe answers, then harmful answers to the same prompts (the contrastive safety loss).
    pub fn contrastive(&self) -> Batch {
        Batch::new(&data::contrastive_rows(&self.pairs), self.pad, &self.device)
    }

    /// The safe answers alone, as ordinary training examples (the alignment data of SafeGrad
    /// and Lisa).
    pub fn safe_answers(&self) -> Batch {
        let safe: Vec<Sequence> = self.pairs.iter().map(|(safe, _)| safe.clone()).collect();
        Batch::new(&safe, self.pad, &self.device)
    }
}

/// A method's checkpointed state: counters (stored in the checkpoint's `state.json` under the
/// method's name) and groups of tensors (in `state.safetensors` as `<group>.<i>`).
#[derive(Default)]
pub struct Saved {
    pub counters: serde_json::Value,
    pub tensors: Vec<(String, Vec<Tensor<1>>)>,
}

impl Saved {
    /// One group of per-parameter tensors that a method may or may not hold (Lisa's anchor,
    /// SafeGrad's KL reference), with a counter `flag` saying whether it was saved.
    pub fn optional(flag: &str, group: &str, tensors: Option<&Vec<Tensor<1>>>) -> Saved {
        Saved {
            counters: serde_json::json!({ flag: tensors.is_some() }),
            tensors: tensors
                .map(|t| (group.to_string(), t.clone()))
                .into_iter()
                .collect(),
        }
    }
}

/// A checkpoint's saved method state, read back.
pub struct Restore<'a> {
    pub counters: &'a serde_json::Value,
    pub(crate) read: &'a dyn Fn(&str, usize) -> Result<Vec<Tensor<1>>>,
    pub(crate) params: usize,
    pub(crate) origin: &'a Path,
}

impl Restore<'_> {
    /// The `count` tensors of a group.
    pub fn tensors(&self, group: &str, count: usize) -> Result<Vec<Tensor<1>>> {
        (self.read)(group, count)
    }

    /// A group with one tensor per trainable parameter tensor.
    pub fn per_parameter(&self, group: &str) -> Result<Vec<Tensor<1>>> {
        self.tensors(group, self.params)
    }

    /// What `Saved::optional` wrote.
    pub fn optional(&self, flag: &str, group: &str) -> Result<Option<Vec<Tensor<1>>>> {
        let saved: std::collections::BTreeMap<String, bool> = self.counters()?;
        match saved.get(flag) {
            Some(true) => self.per_parameter(group).map(Some),
            _ => Ok(None),
        }
    }

    /// The counters, as the method wrote them.
    pub fn counters<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.counters.clone()).map_err(|e| crate::TrainError::File {
            path: self.origin.to_path_buf(),
            message: format!("the method's counters do not read: {e}"),
        })
    }
}

/// The method a run's config names, ready for its first step. `has_pairs`: the run has safety
/// pairs (SFT measures against them).
pub fn build(
    config: &RunConfig,
    model: &CausalLm,
    device: &Device,
    has_pairs: bool,
) -> Box<dyn StepMethod> {
    match config.method {
        Method::Sft | Method::Mix => Box::new(sft::Sft::new(&config.sap, has_pairs)),
        Method::Sap => Box::new(sap::SapState::for_run(config, model, device)),
        Method::SafeGrad => Box::new(safegrad::SafeGrad::new(config.safegrad.clone(), model)),
        Method::Lisa => Box::new(lisa::Lisa::new(config.lisa.clone())),
        Method::Sppft => Box::new(sppft::Sppft::new(config.sppft.clone(), model)),
        Method::Base => unreachable!("a run's config refuses method = \"base\""),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::tensor::{Device, Tensor, TensorData};

    use super::lisa::{LisaConfig, with_proximal};
    use super::safegrad::project_conflict;
    use super::sppft::heaviest_block;
    use crate::config::{RunConfig, RunFile};

    fn tensor(values: &[f32]) -> Tensor<1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Device::flex(),
        )
    }

    fn host(t: &[Tensor<1>]) -> Vec<f32> {
        t.iter()
            .flat_map(|t| t.clone().into_data().try_to_vec::<f32>().unwrap())
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// SafeGrad's surgery, by hand. g_t = (1, 0 | 0), g_a = (−1, 1 | 0), split over two
    /// tensors as a model's are: g_t·g_a = −1 < 0, they conflict, and
    /// g_t' = g_t − (−1/2)·g_a = (0.5, 0.5 | 0), which is orthogonal to g_a; the part removed,
    /// (0.5, −0.5 | 0), is 1/√2 of ‖g_t‖. A task gradient that does not conflict is kept.
    #[test]
    fn safegrad_projects_exactly_when_the_gradients_conflict() {
        let alignment = [tensor(&[-1.0, 1.0]), tensor(&[0.0])];
        let (projected, did, removed) =
            project_conflict(vec![tensor(&[1.0, 0.0]), tensor(&[0.0])], &alignment);
        assert!(did);
        assert!(
            close(&host(&projected), &[0.5, 0.5, 0.0]),
            "{:?}",
            host(&projected)
        );
        assert!((removed - 0.5f64.sqrt()).abs() < 1e-6, "{removed}");
        let dot: f32 = host(&projected)
            .iter()
            .zip(host(&alignment))
            .map(|(a, b)| a * b)
            .sum();
        assert!(dot.abs() < 1e-6, "the projection is orthogonal: {dot}");

        // g_t·g_a = 1 > 0 (no conflict) and = 0 (orthogonal already): unchanged.
        for task in [[1.0, 0.0, 1.0], [1.0, 1.0, 5.0]] {
            let (kept, did, removed) = project_conflict(
                vec![tensor(&task[..2]), tensor(&task[2..])],
                &[tensor(&[0.0, 1.0]), tensor(&[0.0])],
            );
            let expected_did = task[1] < 0.0;
            assert_eq!((did, removed), (expected_did, 0.0));
            assert!(close(&host(&kept), &task));
        }
        // A vanishing alignment gradient projects nothing (no division by zero).
        let (kept, did, _) = project_conflict(vec![tensor(&[1.0])], &[tensor(&[0.0])]);
        assert!(!did && close(&host(&kept), &[1.0]));
    }

    /// Lisa's schedule and proximal gradient, by hand: blocks of 1 alignment step then 2 task
    /// steps; ∇f + ρ(W − W̃) with ∇f = 1, W = 3, W̃ = 1, ρ = 0.5 is 2.
    #[test]
    fn lisa_alternates_its_states_and_pulls_towards_the_anchor() {
        let config = LisaConfig {
            alignment_steps: 1,
            task_steps: 2,
            proximal: 0.5,
        };
        let states: Vec<bool> = (0..6).map(|s| config.in_alignment(s)).collect();
        assert_eq!(states, [true, false, false, true, false, false]);
        let gradient = with_proximal(
            vec![tensor(&[1.0, -1.0])],
            vec![tensor(&[3.0, 0.0])],
            &[tensor(&[1.0, 0.0])],
            0.5,
        );
        assert!(close(&host(&gradient), &[2.0, -1.0]));
        let bad = LisaConfig {
            task_steps: 0,
            ..config
        };
        assert_eq!(bad.validate().unwrap_err().field, "task_steps");
    }

    /// SPPFT's safety layers: the contiguous block holding the most of the safety gradient.
    #[test]
    fn sppft_freezes_the_heaviest_contiguous_block() {
        assert_eq!(heaviest_block(&[1.0, 5.0, 4.0, 0.5], 2), vec![1, 2]);
        assert_eq!(heaviest_block(&[9.0, 0.0, 5.0, 4.0], 2), vec![0, 1]);
        assert_eq!(
            heaviest_block(&[1.0, 1.0, 1.0], 2),
            vec![0, 1],
            "first on a tie"
        );
        assert_eq!(
            heaviest_block(&[1.0, 2.0], 5),
            vec![0, 1],
            "at most every layer"
        );
    }

    fn parse(extra: &str) -> crate::Result<RunConfig> {
        let text =
            format!("model = 'm'\ntrain_data = 't'\noutput_dir = 'o'\nmax_steps = 1\n{extra}");
        RunConfig::parse_before_data(&text, &[], Path::new("run.toml"))
    }

    /// An unknown method is refused naming the valid ones; a method without what it needs is
    /// refused before anything loads; a method's settings are checked by name.
    #[test]
    fn methods_are_checked_by_name_before_anything_loads() {
        let error = parse("method = 'safe'").unwrap_err().to_string();
        for name in ["sft", "sap", "mix", "safegrad", "lisa", "sppft"] {
            assert!(error.contains(name), "{error}");
        }
        for method in ["safegrad", "lisa", "sppft", "sap", "mix"] {
            let error = parse(&format!("method = '{method}'"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(method) && error.contains("safety_data"),
                "{error}"
            );
        }
        let error = parse("method = 'base'").unwrap_err().to_string();
        assert!(error.contains("does not train"), "{error}");
        let with_pairs = "safety_data = 's'\n";
        let error = parse(&format!(
            "{with_pairs}method = 'lisa'\n[lisa]\nproximal = -1.0"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("lisa.proximal"), "{error}");
        let error = parse(&format!(
            "{with_pairs}method = 'safegrad'\n[safegrad]\nalignment_loss = 'kld'"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("answers") && error.contains("kl"), "{error}");
        let error = parse(&format!(
            "{with_pairs}method = 'sppft'\n[sppft]\nfreeze = 1"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("freeze"), "{error}");
        assert!(
            parse(&format!(
                "{with_pairs}method = 'sppft'\n[sppft]\nlayers = [1]"
            ))
            .is_ok()
        );
        // Against a model of 4 layers: freezing all of them is refused, by count or by name.
        for frozen in ["count = 4", "count = 9", "layers = [0, 1, 2, 3]"] {
            let config =
                parse(&format!("{with_pairs}method = 'sppft'\n[sppft]\n{frozen}")).unwrap();
            let error = config.check_layers(4).unwrap_err().to_string();
            assert!(
                error.contains("freezes all of the model's 4"),
                "{frozen}: {error}"
            );
        }
        let config = parse(&format!("{with_pairs}method = 'sppft'\n[sppft]\ncount = 3")).unwrap();
        assert!(config.check_layers(4).is_ok());
    }
}
