//! silu(gate) · up, the MLP's gate, element-wise.
//!
//! Composed (`silu(gate) * up`, with silu = gate · sigmoid(gate)), it is three single-threaded
//! passes forward and about eight backward, and the graph keeps four activations of
//! [tokens, intermediate] per layer (gate, its sigmoid, the silu, up). Here it is one parallel
//! pass each way, keeping gate and up. With s = σ(g):
//!
//!   out = g·s·u,   ∂out/∂u = g·s,   ∂out/∂g = u·s·(1 + g·(1 − s)).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use rayon::prelude::*;

use super::binary::Binary;
use super::{CHUNK, contiguous, float_tensor, into_tensor, zeroed};

/// silu(gate) · up; both of one shape.
fn forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
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

/// The operation for `binary::tracked`.
#[derive(Debug)]
pub(super) struct Swiglu;

impl Binary for Swiglu {
    /// Both inputs: both gradients come from one sweep over gate, up and ∂L/∂out, computed even
    /// if one is not wanted (only LoRA on `up_proj` without `gate_proj` would waste that).
    fn kept(_tracked: [bool; 2]) -> [bool; 2] {
        [true, true]
    }

    fn forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        forward(gate, up)
    }

    fn gradients(
        kept: [Option<FlexTensor>; 2],
        _shapes: [Shape; 2],
        grad: FlexTensor,
        _tracked: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let [Some(gate), Some(up)] = kept else {
            unreachable!("swiglu keeps both inputs")
        };
        let (grad_gate, grad_up) = gradients(&contiguous(gate), &contiguous(up), &contiguous(grad));
        [Some(grad_gate), Some(grad_up)]
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
