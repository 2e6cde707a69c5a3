//! Recording a fused operation of two inputs under autodiff, and its backward pass: what
//! `swiglu`, `matmul` and `head_matmul` share.

use std::marker::PhantomData;

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;

/// A fused operation of two inputs, with a backward pass of its own.
pub(super) trait Binary: std::fmt::Debug + Send + 'static {
    /// Which inputs the backward pass needs kept, given which are tracked (need a gradient).
    fn kept(tracked: [bool; 2]) -> [bool; 2];

    /// The output from the inputs.
    fn forward(a: FlexTensor, b: FlexTensor) -> FlexTensor;

    /// ∂L/∂a and ∂L/∂b from the kept inputs, the inputs' shapes and ∂L/∂output, each only
    /// where `tracked`.
    fn gradients(
        kept: [Option<FlexTensor>; 2],
        shapes: [Shape; 2],
        grad: FlexTensor,
        tracked: [bool; 2],
    ) -> [Option<FlexTensor>; 2];
}

/// `O`'s forward pass under autodiff, recording its backward pass with the inputs it needs.
/// The operations are compute-bound: gradient checkpointing keeps their outputs rather than
/// recomputing them.
pub(super) fn tracked<O: Binary, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<Flex, C>>,
    b: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match BinaryBackward::<O>(PhantomData)
        .prepare::<C>([a.node(), b.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let [keep_a, keep_b] = O::kept([a.is_tracked(), b.is_tracked()]);
            let state = (
                keep_a.then(|| prep.checkpoint(&a)),
                keep_b.then(|| prep.checkpoint(&b)),
                [a.shape(), b.shape()],
            );
            prep.finish(state, O::forward(a.into_primitive(), b.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(O::forward(a.into_primitive(), b.into_primitive())),
    }
}

#[derive(Debug)]
struct BinaryBackward<O>(PhantomData<O>);

impl<O: Binary> Backward<Flex, 2> for BinaryBackward<O> {
    /// The nodes of the kept inputs, and the inputs' shapes.
    type State = (Option<NodeId>, Option<NodeId>, [Shape; 2]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [a_parent, b_parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (a, b, shapes) = ops.state;
        let kept = [a, b].map(|node| node.map(|id| checkpointer.retrieve_node_output(id)));
        let tracked = [a_parent.is_some(), b_parent.is_some()];
        let [grad_a, grad_b] = O::gradients(kept, shapes, grad, tracked);
        for (parent, grad) in [(a_parent, grad_a), (b_parent, grad_b)] {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<Flex>(parent.id, grad);
            }
        }
    }
}
