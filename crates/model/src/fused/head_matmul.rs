//! Attention's per-head products: a [B, H, M, K] · b [B, G, K, N] → [B, H, M, N], query head
//! h against key/value head h / (H / G). Grouped-query attention shares each of the G
//! key/value heads among H / G query heads; here they are shared in place instead of being
//! repeated into H copies first.
//!
//! burn's CPU backend runs a batched product of this size (the real 0.5B model at 4 × 128:
//! 56 products of 128 × 64 × 128, each under gemm's threading threshold) one head after the
//! other on the calling thread: in a per-thread profile of a SAP step, these products and
//! their backward passes were the largest single-threaded work left (about 3 s of the main
//! thread's 20 s). Here each head's product is one task, and the tasks share the cores.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use rayon::prelude::*;

use super::binary::Binary;
use super::matmul::{Operand, SendPtr, gemm_into, output};

/// The four dimensions of a tensor.
fn dims(t: &FlexTensor) -> [usize; 4] {
    four(t.shape())
}

/// A shape's four dimensions.
fn four(shape: Shape) -> [usize; 4] {
    assert_eq!(
        shape.num_dims(),
        4,
        "head_matmul: a 4-D tensor, not {shape:?}"
    );
    [shape[0], shape[1], shape[2], shape[3]]
}

/// [B, H, M, N] from a [B, H, M, K] · b [B, G, K, N], checked.
fn product_dims(a: &FlexTensor, b: &FlexTensor) -> ([usize; 4], usize) {
    let ([batch, heads, m, k], [b_batch, groups, b_k, n]) = (dims(a), dims(b));
    assert!(
        batch == b_batch && k == b_k && groups > 0 && heads % groups == 0,
        "head_matmul: a is [{batch}, {heads}, {m}, {k}], b is [{b_batch}, {groups}, {b_k}, {n}]"
    );
    ([batch, heads, m, n], k)
}

/// Writes one matrix of a new [.., rows, cols] tensor per task, each task given its index
/// (the two leading dimensions) and where its matrix starts.
///
/// # Safety
/// `write(index, out)` must initialise the rows × cols matrix at `out`.
unsafe fn per_matrix(
    [d0, d1, rows, cols]: [usize; 4],
    write: impl Fn([usize; 2], *mut f32) + Sync,
) -> FlexTensor {
    let shape = Shape::new([d0, d1, rows, cols]);
    let fill = |out: *mut f32| {
        let out = SendPtr(out);
        (0..d0 * d1).into_par_iter().for_each(|task| {
            write([task / d1, task % d1], out.at(task * rows * cols));
        })
    };
    // SAFETY: the tasks write disjoint matrices that together cover the tensor.
    unsafe { output(shape, rows <= 1 || cols <= 1, fill) }
}

fn forward(a: FlexTensor, b: FlexTensor) -> FlexTensor {
    let ([batch, heads, m, n], k) = product_dims(&a, &b);
    let group = heads / dims(&b)[1];
    // SAFETY: each task writes its own [m, n] matrix; the operands address matrices of a and b.
    unsafe {
        per_matrix([batch, heads, m, n], |[i, h], out| {
            let (lhs, rhs) = (
                Operand::matrix(&a, &[i, h]),
                Operand::matrix(&b, &[i, h / group]),
            );
            gemm_into(out, n, [m, k, n], lhs, rhs, false, false)
        })
    }
}

/// ∂L/∂a = dy · bᵀ, head by head.
fn a_gradient(dy: &FlexTensor, b: &FlexTensor, a_dims: [usize; 4]) -> FlexTensor {
    let [batch, heads, m, k] = a_dims;
    let group = heads / dims(b)[1];
    let n = dims(b)[3];
    assert_eq!(dims(dy), [batch, heads, m, n], "head_matmul: dy's shape");
    // SAFETY: as in `forward`.
    unsafe {
        per_matrix(a_dims, |[i, h], out| {
            let lhs = Operand::matrix(dy, &[i, h]);
            let rhs = Operand::matrix(b, &[i, h / group]).t();
            gemm_into(out, k, [m, n, k], lhs, rhs, false, false)
        })
    }
}

/// ∂L/∂b = Σ over the heads that share it of aᵀ · dy.
fn b_gradient(a: &FlexTensor, dy: &FlexTensor, b_dims: [usize; 4]) -> FlexTensor {
    let [batch, groups, k, n] = b_dims;
    let [_, heads, m, _] = dims(a);
    let group = heads / groups;
    assert_eq!(dims(dy), [batch, heads, m, n], "head_matmul: dy's shape");
    // SAFETY: each task writes its own [k, n] matrix, the first head's product first, so
    // that the others add to initialised values.
    unsafe {
        per_matrix(b_dims, |[i, g], out| {
            for h in g * group..(g + 1) * group {
                let lhs = Operand::matrix(a, &[i, h]).t();
                let rhs = Operand::matrix(dy, &[i, h]);
                gemm_into(out, n, [k, m, n], lhs, rhs, false, h > g * group)
            }
        })
    }
}

/// The operation for `binary::tracked`.
#[derive(Debug)]
pub(super) struct HeadMatmul;

impl Binary for HeadMatmul {
    /// a for ∂L/∂b, b for ∂L/∂a: an input that needs no gradient is not kept for the other.
    fn kept([a_tracked, b_tracked]: [bool; 2]) -> [bool; 2] {
        [b_tracked, a_tracked]
    }

    fn forward(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        forward(a, b)
    }

    fn gradients(
        [a, b]: [Option<FlexTensor>; 2],
        [a_shape, b_shape]: [Shape; 2],
        dy: FlexTensor,
        [a_tracked, b_tracked]: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let kept = "head_matmul keeps b for ∂L/∂a and a for ∂L/∂b";
        [
            a_tracked.then(|| a_gradient(&dy, b.as_ref().expect(kept), four(a_shape))),
            b_tracked.then(|| b_gradient(a.as_ref().expect(kept), &dy, four(b_shape))),
        ]
    }
}
