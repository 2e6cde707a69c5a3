//! Lisa: lazy safety alignment (Huang et al., "Lisa: Lazy Safety Alignment for Large Language
//! Models against Harmful Fine-tuning Attack", arXiv 2405.18641, NeurIPS 2024).
//!
//! Bi-state optimisation: the steps alternate between an alignment state, which trains on
//! alignment data (here the safety pairs' safe answers), and a task state, which trains on
//! the user's data, in blocks of `alignment_steps` then `task_steps` (few alignment steps:
//! the paper's asymmetric allocation). Alternating alone drifts: each state runs off towards
//! its own optimum and undoes the other. Lisa adds a proximal term to each state's loss,
//! (ρ/2)·‖W − W̃‖², where W̃ (the anchor) is where the other state left the weights when this
//! state began; its gradient ρ·(W − W̃) is added to the state's loss gradient.

use burn::tensor::Tensor;
use safeprobe_model::decoder::CausalLm;

use super::{Restore, Saved, StepInput, StepMethod, StepMetrics};
use crate::adamw::AdamW;
use crate::error::Result;
use crate::gradients::{apply_update, clip, task_gradient};
use crate::loss::task_loss;
use crate::params::{self, global_norm, scalar};
use safeprobe_wire::Defence;

pub use safeprobe_wire::spec::LisaConfig;

/// Whether step `step` (from 0) begins a state (the anchor moves then).
fn begins_state(config: &LisaConfig, step: usize) -> bool {
    step == 0 || config.in_alignment(step) != config.in_alignment(step - 1)
}

pub struct Lisa {
    config: LisaConfig,
    /// W̃: the weights when the current state began.
    anchor: Option<Vec<Tensor<1>>>,
}

impl Lisa {
    pub fn new(config: LisaConfig) -> Self {
        Self {
            config,
            anchor: None,
        }
    }
}

/// ∇f + ρ·(W − W̃): a state's loss gradient with the proximal term's.
pub fn with_proximal(
    gradient: Vec<Tensor<1>>,
    values: Vec<Tensor<1>>,
    anchor: &[Tensor<1>],
    proximal: f64,
) -> Vec<Tensor<1>> {
    gradient
        .into_iter()
        .zip(values)
        .zip(anchor)
        .map(|((g, w), a)| g + (w - a.clone()).mul_scalar(proximal))
        .collect()
}

impl StepMethod for Lisa {
    fn draws_pairs(&self, step: usize) -> bool {
        self.config.in_alignment(step)
    }

    fn trains_on_tasks(&self, step: usize) -> bool {
        !self.config.in_alignment(step)
    }

    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics {
        let values = params::values(model);
        if begins_state(&self.config, input.step) || self.anchor.is_none() {
            self.anchor = Some(values.clone());
        }
        let anchor = self.anchor.as_ref().expect("set above");
        let drift = global_norm(
            &values
                .iter()
                .zip(anchor)
                .map(|(w, a)| w.clone() - a.clone())
                .collect::<Vec<_>>(),
        );
        let alignment_state = self.config.in_alignment(input.step);
        let (state_loss, gradient, task_loss) = if alignment_state {
            let answers = input
                .pairs
                .expect("Lisa draws pairs in its alignment state")
                .safe_answers();
            let loss = task_loss(model, &answers, None);
            let gradient = params::gradients(model, &loss.backward());
            // This state does not train on the task data: the loop shows it the batches the
            // next task step will take (not drawn), and their loss is reported so that the
            // task-loss line has every step.
            let measured = input
                .tasks
                .iter()
                .map(|t| scalar(&task_loss(model, t, None)) * t.response_tokens as f64)
                .sum::<f64>()
                / input
                    .tasks
                    .iter()
                    .map(|t| t.response_tokens)
                    .sum::<usize>()
                    .max(1) as f64;
            (scalar(&loss), gradient, measured)
        } else {
            let (loss, gradient) = task_gradient(model, input.tasks, None);
            (loss, gradient, loss)
        };
        let gradient = with_proximal(gradient, values, anchor, self.config.proximal);
        let (gradient, grad_norm) = clip(gradient, input.max_grad_norm);
        apply_update(model, optimizer, gradient, input.lr);
        StepMetrics {
            task_loss,
            grad_norm,
            defence: Some(Defence::Lisa {
                alignment_state,
                state_loss,
                drift,
            }),
            ..Default::default()
        }
    }

    fn save(&self) -> Saved {
        Saved::optional("anchored", "lisa.anchor", self.anchor.as_ref())
    }

    fn restore(&mut self, saved: &Restore) -> Result<()> {
        self.anchor = saved.optional("anchored", "lisa.anchor")?;
        Ok(())
    }
}
