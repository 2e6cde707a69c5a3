//! x · w for a linear layer: x [rows, in], w [in, out] → [rows, out].
//!
//! burn's CPU backend hands each product to gemm whole. For a linear layer's input gradient,
//! dy · wᵀ, the right operand is the weight transposed (a strided view), and gemm packs such an
//! operand on the calling thread alone before the cores share the multiply: a per-thread
//! `perf` profile of the real 0.5B model's SFT step found 1.2 s of main-thread packing per
//! step (`pack_lhs`) while the other core waited. Here that product is split by the columns
//! of dx (the rows of w) into one task per block, each a single-threaded gemm that packs only
//! its own block, so the packing is shared out as well. Every element of dx is still one dot
//! product summed in gemm's order, so the split changes no value.
//!
//! The forward product and the weight gradient (xᵀ · dy, for full fine-tuning) have layouts
//! that gemm packs in parallel itself, and run whole. All three write into buffers made here,
//! not through the backend's `empty`, which zero-fills each output and then copies it once
//! more on the calling thread to align it.

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

use super::written_tensor;

/// Products of at least this many multiply-adds use every core (burn's CPU backend's own
/// threshold, so that small products, such as LoRA's rank-8 ones, stay as they were).
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// Columns of dx per task at least: narrower blocks would pack and multiply in pieces too
/// small for gemm's kernels (16 columns each).
const MIN_BLOCK: usize = 64;

/// A matrix operand in place: its first element and its row and column strides (elements).
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

// SAFETY: an operand only reads a buffer that outlives every task given it.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

impl Operand {
    /// A 2-D f32 tensor as it lies in its buffer, strided or not.
    fn of(t: &FlexTensor) -> Self {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "matmul: an f32 tensor, not {:?}",
            t.dtype()
        );
        let strides = t.layout().strides();
        assert_eq!(
            strides.len(),
            2,
            "matmul: a 2-D tensor, not {:?}",
            t.shape()
        );
        let values = t.storage::<f32>();
        Self {
            // In bounds: the layout's start lies inside the buffer.
            ptr: values[t.layout().start_offset()..].as_ptr(),
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    /// The transpose: the same elements, rows and columns swapped.
    fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The operand from row `row` on.
    fn from_row(self, row: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_offset(row as isize * self.row_stride),
            ..self
        }
    }
}

/// out [m, n] (rows `out_row_stride` apart) = lhs [m, k] · rhs [k, n].
///
/// # Safety
/// `out` must be valid for writes of every element of the [m, n] matrix it addresses, and
/// the operands for reads of [m, k] and [k, n] elements.
unsafe fn gemm(
    out: *mut f32,
    out_row_stride: usize,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    let parallelism = match parallel && m * k * n >= PARALLEL_MACS {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the caller's promise; with read_dst false and alpha 0, gemm only writes out.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            false,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// x [rows, in] · w [in, out].
pub(super) fn forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
    let ([rows, d_in], [w_in, d_out]) = (dims(&x), dims(&w));
    assert_eq!(
        d_in, w_in,
        "matmul: x is [{rows}, {d_in}], w is [{w_in}, {d_out}]"
    );
    let (x, w) = (Operand::of(&x), Operand::of(&w));
    // SAFETY: gemm writes each of the rows × out elements.
    unsafe {
        written_tensor(Shape::new([rows, d_out]), |out| {
            gemm(out, d_out, [rows, d_in, d_out], x, w, true)
        })
    }
}

/// ∂L/∂x = dy · wᵀ, by blocks of its columns in parallel where wᵀ is strided (see the top).
fn input_gradient(dy: &FlexTensor, w: &FlexTensor) -> FlexTensor {
    let ([rows, d_out], [d_in, _]) = (dims(dy), dims(w));
    let (dy, w) = (Operand::of(dy), Operand::of(w));
    let blocks = block_count(w, d_in, rows * d_in * d_out);
    let width = d_in.div_ceil(blocks);
    // SAFETY: the blocks cover the rows × in elements, each written by one task alone.
    unsafe {
        written_tensor(Shape::new([rows, d_in]), |out| {
            if blocks == 1 {
                return gemm(out, d_in, [rows, d_out, d_in], dy, w.t(), true);
            }
            let out = SendPtr(out);
            (0..blocks).into_par_iter().for_each(|block| {
                let first = block * width;
                let cols = width.min(d_in - first);
                gemm(
                    out.at(first),
                    d_in,
                    [rows, d_out, cols],
                    dy,
                    w.from_row(first).t(),
                    false,
                )
            })
        })
    }
}

/// How many column blocks ∂L/∂x is computed in: one (gemm alone) for a product too small to
/// share, or where w's rows are contiguous in memory (wᵀ is then column-major, a layout gemm
/// packs in parallel: the tied vocabulary projection, w = embeddingᵀ); otherwise two per
/// thread, for balance.
fn block_count(w: Operand, d_in: usize, macs: usize) -> usize {
    if macs < PARALLEL_MACS || w.row_stride == 1 {
        return 1;
    }
    (2 * rayon::current_num_threads()).clamp(1, (d_in / MIN_BLOCK).max(1))
}

/// ∂L/∂w = xᵀ · dy.
fn weight_gradient(x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let ([rows, d_in], [_, d_out]) = (dims(x), dims(dy));
    let (x, dy) = (Operand::of(x), Operand::of(dy));
    // SAFETY: gemm writes each of the in × out elements.
    unsafe {
        written_tensor(Shape::new([d_in, d_out]), |out| {
            gemm(out, d_out, [d_in, rows, d_out], x.t(), dy, true)
        })
    }
}

fn dims(t: &FlexTensor) -> [usize; 2] {
    let shape = t.shape();
    assert_eq!(shape.num_dims(), 2, "matmul: a 2-D tensor, not {shape:?}");
    [shape[0], shape[1]]
}

/// The output's address, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the tasks given it write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The forward pass under autodiff, recording the backward pass.
pub(super) fn tracked<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    w: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match MatmulBackward
        .prepare::<C>([x.node(), w.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&w));
            prep.finish(state, forward(x.into_primitive(), w.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive(), w.into_primitive())),
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// The nodes of x and w.
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [x_parent, w_parent] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w) = ops.state;
        let x: FlexTensor = checkpointer.retrieve_node_output(x);
        let w: FlexTensor = checkpointer.retrieve_node_output(w);
        if let Some(parent) = x_parent {
            grads.register::<Flex>(parent.id, input_gradient(&dy, &w));
        }
        if let Some(parent) = w_parent {
            grads.register::<Flex>(parent.id, weight_gradient(&x, &dy));
        }
    }
}
