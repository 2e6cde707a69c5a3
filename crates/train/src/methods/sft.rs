//! Plain supervised fine-tuning, the baseline every defence is compared with (and, with the
//! safety pairs' refusals mixed into its data, the `mix` baseline).
//!
//! With safety pairs, every `sap.cosine_every` steps it also measures how its update lines up
//! with the harmful direction (at V = 0: it has no probe), so that SFT's and SAP's alignment
//! lines are one quantity.

use safeprobe_model::decoder::CausalLm;

use super::{StepInput, StepMethod, StepMetrics};
use crate::adamw::AdamW;
use crate::data::Batch;
use crate::gradients::{apply_update, clip, task_gradient};
use crate::loss::safety_loss;
use crate::methods::sap::SapConfig;
use crate::params::{self, scalar};
use safeprobe_wire::Alignment;

pub struct Sft {
    cosine_every: usize,
    temperature: f64,
    has_pairs: bool,
}

impl Sft {
    pub fn new(sap: &SapConfig, has_pairs: bool) -> Self {
        Self {
            cosine_every: sap.cosine_every,
            temperature: sap.temperature,
            has_pairs,
        }
    }
}

impl StepMethod for Sft {
    fn draws_pairs(&self, step: usize) -> bool {
        self.has_pairs && self.cosine_every > 0 && step % self.cosine_every == 0
    }

    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics {
        let measure = input.pairs.map(|pairs| pairs.contrastive());
        sft_step(
            model,
            optimizer,
            input.tasks,
            input.lr,
            input.max_grad_norm,
            measure.as_ref().map(|safety| (safety, self.temperature)),
        )
    }
}

/// One supervised step. With `measure` (a safety batch and T), it also records how the step
/// lines up with the harmful direction, as SAP runs do at V = 0.
pub fn sft_step(
    model: &mut CausalLm,
    optimizer: &mut AdamW,
    tasks: &[Batch],
    lr: f64,
    max_grad_norm: Option<f64>,
    measure: Option<(&Batch, f64)>,
) -> StepMetrics {
    let (task_loss, grads) = task_gradient(model, tasks, None);
    // Clipping reads the gradient norm, which also waits for the backward pass to finish, so
    // none of it is timed as measurement; clipping scales uniformly, so cosines are unchanged.
    let (grads, grad_norm) = clip(grads, max_grad_norm);
    let mut metrics = StepMetrics {
        task_loss,
        grad_norm,
        ..Default::default()
    };
    if let Some((safety, temperature)) = measure {
        let started = std::time::Instant::now();
        let loss = safety_loss(model, safety, None, temperature);
        let safety_gradient = params::gradients(model, &loss.backward());
        metrics.safety_loss = Some(scalar(&loss));
        metrics.alignment = Some(Alignment {
            at_zero: params::cosine(&grads, &safety_gradient),
            per_layer_at_zero: params::cosine_per_layer(model, &grads, &safety_gradient),
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
    }
    apply_update(model, optimizer, grads, lr);
    metrics
}
