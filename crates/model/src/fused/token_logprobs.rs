//! log p(target) of each row of a logits matrix.
//!
//! Composed (`log_softmax` then `gather`), the loss over a 152k-token vocabulary made about a
//! dozen single-threaded passes over the [positions, vocabulary] matrix: max, shift, exp, sum,
//! log, subtract, then scatter, expand, multiply and add in backward. Here the forward pass is
//! one parallel sweep per row (its log-sum-exp) and the backward pass one more:
//!
//!   out_i = x[i, t_i] − lse_i,   ∂out_i/∂x[i, j] = [j = t_i] − exp(x[i, j] − lse_i).

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::{contiguous, float_tensor};

/// Rows per parallel task: each is vocabulary-wide, so a few make a task.
const ROWS_PER_TASK: usize = 4;

/// log p(target) [n, 1], with what the backward pass needs: the target ids and each row's
/// log-sum-exp.
pub(super) fn forward(
    logits: FlexTensor,
    targets: &FlexTensor,
) -> (FlexTensor, Vec<usize>, Vec<f32>) {
    let logits = contiguous(logits);
    let targets = target_ids(targets);
    let shape = logits.shape();
    let (rows, vocab) = (shape[0], shape[1]);
    assert_eq!(
        rows,
        targets.len(),
        "token_logprobs: one target per row of logits"
    );
    if let Some(t) = targets.iter().find(|&&t| t >= vocab) {
        panic!("token_logprobs: target id {t} is outside the vocabulary of {vocab}");
    }
    let lse = log_sum_exp(&logits);
    let x = logits.storage::<f32>();
    let out = float_tensor(Shape::new([rows, 1]), |out| {
        for (i, (o, (&t, &lse))) in out.iter_mut().zip(targets.iter().zip(&lse)).enumerate() {
            *o = x[i * vocab + t] - lse;
        }
    });
    (out, targets, lse)
}

/// The forward pass under autodiff, recording the backward pass.
pub(super) fn tracked<C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<Flex, C>>,
    targets: FlexTensor,
) -> FloatTensor<Autodiff<Flex, C>> {
    match TokenLogprobsBackward
        .prepare::<C>([logits.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let node = prep.checkpoint(&logits);
            let (out, ids, lse) = forward(logits.into_primitive(), &targets);
            prep.finish((node, ids, lse), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(logits.into_primitive(), &targets).0),
    }
}

#[derive(Debug)]
struct TokenLogprobsBackward;

impl Backward<Flex, 1> for TokenLogprobsBackward {
    /// The logits' node, the target ids and each row's log-sum-exp.
    type State = (NodeId, Vec<usize>, Vec<f32>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [parent] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (logits, targets, lse) = ops.state;
        if let Some(parent) = parent {
            let logits: FlexTensor = checkpointer.retrieve_node_output(logits);
            let grad = grad_logits(&contiguous(logits), &targets, &lse, grad.storage());
            grads.register::<Flex>(parent.id, grad);
        }
    }
}

fn target_ids(targets: &FlexTensor) -> Vec<usize> {
    let targets = contiguous(targets.clone());
    match targets.dtype() {
        DType::I64 => targets
            .storage::<i64>()
            .iter()
            .map(|&t| t as usize)
            .collect(),
        DType::I32 => targets
            .storage::<i32>()
            .iter()
            .map(|&t| t as usize)
            .collect(),
        other => panic!("token_logprobs: target ids of type {other:?}"),
    }
}

/// Each row's log Σ_j exp(x_j), shifted by its maximum, summed in f64.
fn log_sum_exp(logits: &FlexTensor) -> Vec<f32> {
    let shape = logits.shape();
    let vocab = shape[shape.num_dims() - 1];
    logits
        .storage::<f32>()
        .par_chunks(vocab * ROWS_PER_TASK)
        .flat_map_iter(|rows| {
            rows.chunks(vocab).map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
                max + sum.ln() as f32
            })
        })
        .collect()
}

/// ∂L/∂x[i, j] = g_i · ([j = t_i] − exp(x[i, j] − lse_i)).
fn grad_logits(logits: &FlexTensor, targets: &[usize], lse: &[f32], grad: &[f32]) -> FlexTensor {
    let x = logits.storage::<f32>();
    let vocab = logits.shape()[1];
    float_tensor(logits.shape(), |out| {
        out.par_chunks_mut(vocab * ROWS_PER_TASK)
            .zip(x.par_chunks(vocab * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (out, x))| {
                for (r, (out, x)) in out.chunks_mut(vocab).zip(x.chunks(vocab)).enumerate() {
                    let i = task * ROWS_PER_TASK + r;
                    let (g, lse) = (grad[i], lse[i]);
                    for (o, &x) in out.iter_mut().zip(x) {
                        *o = -g * (x - lse).exp();
                    }
                    out[targets[i]] += g;
                }
            })
    })
}
