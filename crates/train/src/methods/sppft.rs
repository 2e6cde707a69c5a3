//! SPPFT: safely partial-parameter fine-tuning (Li et al., "Safety Layers in Aligned Large
//! Language Models: The Key to LLM Security", arXiv 2408.17003, ICLR 2025).
//!
//! The paper finds that an aligned model's ability to tell harmful from benign requests lives
//! in a small contiguous block of middle layers, the safety layers, and that fine-tuning with
//! those layers frozen keeps much of the alignment at little cost to the task. Here the
//! trainable weights of the safety layers take no step at all (no gradient, no weight decay).
//!
//! Locating them: the paper compares the hidden states of harmful and benign prompts layer by
//! layer. This uses what every run of this tool has instead, the safety pairs: at the first
//! step, the gradient of the contrastive safety loss (safe over harmful answers, at
//! `temperature`) is taken over the trainable weights, and the safety layers are the
//! contiguous block of `count` layers that holds the largest share of its squared norm (the
//! layers whose change would most move the model between refusing and complying). `layers`
//! names them instead, skipping the search.

use burn::tensor::Tensor;
use safeprobe_model::decoder::CausalLm;

use super::{Restore, Saved, StepInput, StepMethod, StepMetrics};
use crate::adamw::AdamW;
use crate::error::Result;
use crate::gradients::{apply_update, clip, task_gradient};
use crate::loss::safety_loss;
use crate::params::{self, global_norm};
use safeprobe_wire::Defence;

pub use safeprobe_wire::spec::SppftConfig;

pub struct Sppft {
    config: SppftConfig,
    num_layers: usize,
    /// The decoder layer of each trainable tensor, in `params::values` order.
    owners: Vec<Option<usize>>,
    frozen: Option<Vec<usize>>,
}

impl Sppft {
    pub fn new(config: SppftConfig, model: &CausalLm) -> Self {
        let frozen = (!config.layers.is_empty()).then(|| config.layers.clone());
        Self {
            config,
            num_layers: model.layers.len(),
            owners: params::layer_of_each(model),
            frozen,
        }
    }

    fn count(&self) -> usize {
        match self.config.count {
            0 => self.num_layers.div_ceil(4),
            n => n,
        }
        .clamp(1, self.num_layers.max(1))
    }
}

/// The `count` contiguous layers with the largest sum of `per_layer` (the first such block
/// on a tie).
pub fn heaviest_block(per_layer: &[f64], count: usize) -> Vec<usize> {
    let count = count.clamp(1, per_layer.len().max(1));
    let mut best = (f64::NEG_INFINITY, 0);
    for start in 0..=per_layer.len().saturating_sub(count) {
        let sum: f64 = per_layer[start..(start + count).min(per_layer.len())]
            .iter()
            .sum();
        if sum > best.0 {
            best = (sum, start);
        }
    }
    (best.1..best.1 + count).collect()
}

/// Per decoder layer, the squared norm of `gradient` over that layer's tensors.
fn squared_norm_per_layer(
    gradient: &[Tensor<1>],
    owners: &[Option<usize>],
    layers: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; layers];
    for (g, owner) in gradient.iter().zip(owners) {
        if let Some(layer) = owner {
            out[*layer] += global_norm(std::slice::from_ref(g)).powi(2);
        }
    }
    out
}

impl StepMethod for Sppft {
    fn draws_pairs(&self, step: usize) -> bool {
        step == 0 && self.config.layers.is_empty()
    }

    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics {
        if self.frozen.is_none() {
            let pairs = input.pairs.expect("SPPFT draws pairs to locate the layers");
            let loss = safety_loss(model, &pairs.contrastive(), None, self.config.temperature);
            let gradient = params::gradients(model, &loss.backward());
            let per_layer = squared_norm_per_layer(&gradient, &self.owners, self.num_layers);
            self.frozen = Some(heaviest_block(&per_layer, self.count()));
        }
        let frozen = self.frozen.clone().expect("located above");
        let is_frozen: Vec<bool> = self
            .owners
            .iter()
            .map(|owner| owner.is_some_and(|l| frozen.contains(&l)))
            .collect();
        let (task_loss, gradient) = task_gradient(model, input.tasks, None);
        let total = global_norm(&gradient);
        let on_frozen: Vec<Tensor<1>> = gradient
            .iter()
            .zip(&is_frozen)
            .filter(|(_, f)| **f)
            .map(|(g, _)| g.clone())
            .collect();
        let removed = global_norm(&on_frozen) / total.max(f64::MIN_POSITIVE);
        let gradient = gradient
            .into_iter()
            .zip(&is_frozen)
            .map(|(g, f)| if *f { g.zeros_like() } else { g })
            .collect();
        let (gradient, grad_norm) = clip(gradient, input.max_grad_norm);
        let before = params::values(model);
        apply_update(model, optimizer, gradient, input.lr);
        // AdamW's weight decay moves weights without a gradient: the frozen ones are put back.
        let after = params::values(model)
            .into_iter()
            .zip(before)
            .zip(&is_frozen)
            .map(|((new, old), f)| if *f { old } else { new })
            .collect();
        *model = params::with_values(model.clone(), after);
        StepMetrics {
            task_loss,
            grad_norm,
            defence: Some(Defence::Frozen {
                layers: frozen,
                removed,
            }),
            ..Default::default()
        }
    }

    fn save(&self) -> Saved {
        Saved {
            counters: serde_json::json!({ "layers": self.frozen }),
            tensors: Vec::new(),
        }
    }

    fn restore(&mut self, saved: &Restore) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Counters {
            layers: Option<Vec<usize>>,
        }
        let counters: Counters = saved.counters()?;
        if counters.layers.is_some() {
            self.frozen = counters.layers;
        }
        Ok(())
    }
}
