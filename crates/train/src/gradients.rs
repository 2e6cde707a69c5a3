//! What the methods share: gradients over micro-batches, clipping and the optimiser step.

use burn::tensor::Tensor;
use safeprobe_model::decoder::CausalLm;

use crate::adamw::AdamW;
use crate::data::Batch;
use crate::loss::{Probe, task_loss};
use crate::params::{self, global_norm, scalar};

/// Rescales gradients so their global norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip(grads: Vec<Tensor<1>>, max_norm: Option<f64>) -> (Vec<Tensor<1>>, f64) {
    let norm = global_norm(&grads);
    match max_norm {
        Some(max) if norm > max => {
            let factor = max / (norm + 1e-6);
            (
                grads.into_iter().map(|g| g.mul_scalar(factor)).collect(),
                norm,
            )
        }
        _ => (grads, norm),
    }
}

pub fn apply_update(model: &mut CausalLm, optimizer: &mut AdamW, grads: Vec<Tensor<1>>, lr: f64) {
    let updated = optimizer.step(params::values(model), grads, lr);
    *model = params::with_values(model.clone(), updated);
}

/// L_task and ∇_W L_task over the micro-batches (token-weighted), with `probe` in place.
pub fn task_gradient(
    model: &CausalLm,
    tasks: &[Batch],
    probe: Option<&Probe>,
) -> (f64, Vec<Tensor<1>>) {
    let mut pass = accumulate(tasks, |task| {
        let loss = task_loss(model, task, probe);
        Pass {
            grads: vec![params::gradients(model, &loss.backward())],
            losses: vec![scalar(&loss)],
        }
    });
    (pass.losses[0], pass.grads.remove(0))
}

/// Gradients and loss values of one pass.
pub struct Pass {
    pub grads: Vec<Vec<Tensor<1>>>,
    pub losses: Vec<f64>,
}

/// Gradient accumulation: runs `pass` on each micro-batch and weights each by its share of
/// the response tokens, so the result equals one pass over all of them (every loss here is a
/// mean over response tokens).
pub fn accumulate(tasks: &[Batch], mut pass: impl FnMut(&Batch) -> Pass) -> Pass {
    let total = tasks
        .iter()
        .map(|t| t.response_tokens)
        .sum::<usize>()
        .max(1) as f64;
    let mut sum: Option<Pass> = None;
    for task in tasks {
        let weight = task.response_tokens as f64 / total;
        let mut p = pass(task);
        if tasks.len() > 1 {
            p.grads = p
                .grads
                .into_iter()
                .map(|g| g.into_iter().map(|t| t.mul_scalar(weight)).collect())
                .collect();
            p.losses = p.losses.into_iter().map(|l| l * weight).collect();
        }
        sum = Some(match sum {
            None => p,
            Some(acc) => Pass {
                grads: acc
                    .grads
                    .into_iter()
                    .zip(p.grads)
                    .map(|(a, b)| a.into_iter().zip(b).map(|(x, y)| x + y).collect())
                    .collect(),
                losses: acc
                    .losses
                    .iter()
                    .zip(&p.losses)
                    .map(|(a, b)| a + b)
                    .collect(),
            },
        });
    }
    sum.expect("at least one micro-batch")
}

/// The gradient of a loss over the trainable weights, and the loss.
pub fn loss_gradient(model: &CausalLm, loss: Tensor<1>) -> (f64, Vec<Tensor<1>>) {
    let gradient = params::gradients(model, &loss.backward());
    (scalar(&loss), gradient)
}
