//! SafeGrad: gradient surgery for safe fine-tuning (Yi et al., "Gradient Surgery for Safe
//! LLM Fine-Tuning", arXiv 2508.07172).
//!
//! Each step takes the task gradient g_t = ∇L_task and the alignment gradient
//! g_a = ∇L_align on a batch of the safety pairs' safe answers. The task update −lr·g_t
//! changes the alignment loss by about −lr·(g_t·g_a): when g_t·g_a < 0 the task step raises
//! it (the two conflict), and the task gradient is projected onto the plane orthogonal to the
//! alignment gradient, g_t' = g_t − (g_t·g_a / ‖g_a‖²)·g_a, so that it no longer moves the
//! alignment loss to first order; otherwise g_t is kept. The weights then step on
//! g_t' + λ·g_a: both objectives, the task's stripped of what undoes alignment.
//!
//! The alignment loss is the safe answers' cross-entropy (`alignment_loss = "answers"`), or,
//! as the paper prefers, KL(p_start ‖ p_W) on those answers against the model the run started
//! from (`"kl"`): it keeps the starting model's whole distribution over each answer's tokens
//! rather than only the answer's own tokens. The reference is the same model with the
//! trainable weights at their starting values (for LoRA, the adapter as it started).

use burn::tensor::Tensor;
use safeprobe_model::decoder::CausalLm;

use super::{Restore, Saved, StepInput, StepMethod, StepMetrics};
use crate::adamw::AdamW;
use crate::error::Result;
use crate::gradients::{apply_update, clip, loss_gradient, task_gradient};
use crate::loss::{kl_from_reference, task_loss};
use crate::params::{self, global_norm};
use safeprobe_wire::Defence;

pub use safeprobe_wire::spec::{AlignmentLoss, SafeGradConfig};

pub struct SafeGrad {
    config: SafeGradConfig,
    /// The trainable weights as the run started (the KL loss's reference).
    start: Option<Vec<Tensor<1>>>,
}

impl SafeGrad {
    pub fn new(config: SafeGradConfig, model: &CausalLm) -> Self {
        let start = (config.alignment_loss == AlignmentLoss::Kl).then(|| params::values(model));
        Self { config, start }
    }

    fn alignment_loss(
        &self,
        model: &CausalLm,
        answers: &crate::data::Batch,
        dropout_seed: Option<u64>,
    ) -> Tensor<1> {
        match &self.start {
            Some(start) => {
                let reference = params::frozen_with_values(model, start.clone());
                kl_from_reference(model, &reference, answers, dropout_seed)
            }
            None => task_loss(model, answers, None),
        }
    }
}

/// The surgery: `task` projected off `alignment` when their dot product is negative, and
/// the share of `task`'s norm removed (0 when kept).
pub fn project_conflict(
    task: Vec<Tensor<1>>,
    alignment: &[Tensor<1>],
) -> (Vec<Tensor<1>>, bool, f64) {
    let dot = params::dot(&task, alignment);
    let alignment_norm_sq = global_norm(alignment).powi(2);
    if !(dot < 0.0) || alignment_norm_sq == 0.0 {
        return (task, false, 0.0);
    }
    let task_norm = global_norm(&task);
    let factor = dot / alignment_norm_sq;
    let projected = task
        .into_iter()
        .zip(alignment)
        .map(|(t, a)| t - a.clone().mul_scalar(factor))
        .collect();
    // ‖g_t − g_t'‖ = |g_t·g_a| / ‖g_a‖.
    let removed = dot.abs() / alignment_norm_sq.sqrt() / task_norm.max(f64::MIN_POSITIVE);
    (projected, true, removed)
}

impl StepMethod for SafeGrad {
    fn draws_pairs(&self, _step: usize) -> bool {
        true
    }

    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics {
        let answers = input
            .pairs
            .expect("SafeGrad draws pairs every step")
            .safe_answers();
        let (task_loss, task) = task_gradient(model, input.tasks, None);
        let (alignment_loss, alignment) = loss_gradient(
            model,
            self.alignment_loss(model, &answers, input.dropout_seed),
        );
        let cosine = params::cosine(&task, &alignment);
        let (task, projected, removed) = project_conflict(task, &alignment);
        let weight = self.config.alignment_weight;
        let update = task
            .into_iter()
            .zip(alignment)
            .map(|(t, a)| t + a.mul_scalar(weight))
            .collect();
        let (update, grad_norm) = clip(update, input.max_grad_norm);
        apply_update(model, optimizer, update, input.lr);
        StepMetrics {
            task_loss,
            grad_norm,
            defence: Some(Defence::Projection {
                alignment_loss,
                cosine,
                projected,
                removed,
            }),
            ..Default::default()
        }
    }

    fn save(&self) -> Saved {
        Saved::optional("kl_reference", "safegrad.start", self.start.as_ref())
    }

    fn restore(&mut self, saved: &Restore) -> Result<()> {
        if let Some(start) = saved.optional("kl_reference", "safegrad.start")? {
            self.start = Some(start);
        }
        Ok(())
    }
}
