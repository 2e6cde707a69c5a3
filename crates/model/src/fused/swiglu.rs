//! silu(gate) · up, the MLP's gate, element-wise.
//!
//! Composed (`silu(gate) * up`, with silu = gate · sigmoid(gate)), it is three single-threaded
//! passes forward and about eight backward, and the graph keeps four activations of
//! [tokens, intermediate] per layer (gate, its sigmoid, the silu, up). Here it is one parallel
//! pass each way, keeping gate and up. With s = σ(g):
//!
//!   out = g·s·u,   ∂out/∂u = g·s,   ∂out/∂g = u·s·(1 + g·(1 − s)).

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use rayon::prelude::*;

use super::{CHUNK, contiguous, float_tensor, into_tensor, zeroed};

/// silu(gate) · up; both of one shape.
pub(super) fn forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    assert_eq!(
        gate.shape(),
        up.shape(),
        "swiglu: gate and up differ in shape"
    );
    let (gate, up) = (contiguous(gate), contiguous(up));
    let (g, u) = (gate.storage::<f32>(), up.storage::<f32>());
    float_tensor(gate.shape(), |out| {
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(out, (g, u))| {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            })
    })
}

/// The forward pass under autodiff, recording the backward pass.
pub(super) fn tracked<C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<Flex, C>>,
    up: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match SwigluBackward
        .prepare::<C>([gate.node(), up.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&gate), prep.checkpoint(&up));
            prep.finish(state, forward(gate.into_primitive(), up.into_primitive()))
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(gate.into_primitive(), up.into_primitive()))
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// The nodes of gate and up.
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [gate_parent, up_parent] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let gate: FlexTensor = contiguous(checkpointer.retrieve_node_output(gate));
        let up: FlexTensor = contiguous(checkpointer.retrieve_node_output(up));
        let (grad_gate, grad_up) = gradients(&gate, &up, &grad);
        if let Some(parent) = gate_parent {
            grads.register::<Flex>(parent.id, grad_gate);
        }
        if let Some(parent) = up_parent {
            grads.register::<Flex>(parent.id, grad_up);
        }
    }
}

/// (∂L/∂gate, ∂L/∂up) in one sweep.
fn gradients(gate: &FlexTensor, up: &FlexTensor, grad: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (g, u, d) = (
        gate.storage::<f32>(),
        up.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let mut grad_gate = zeroed(g.len());
    let mut grad_up = zeroed(g.len());
    grad_gate
        .par_chunks_mut(CHUNK)
        .zip(grad_up.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(d.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), d))| {
            for i in 0..dg.len() {
                let s = sigmoid(g[i]);
                du[i] = d[i] * g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    (
        into_tensor(grad_gate, gate.shape()),
        into_tensor(grad_up, gate.shape()),
    )
}

/// σ(x) without overflow for either sign.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
