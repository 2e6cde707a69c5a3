//! x · w for a linear layer: x [rows, in], w [in, out] → [rows, out].
//!
//! burn's CPU backend hands each product to gemm whole, and gemm leaves cores idle on two
//! kinds of product that a model runs all the time:
//!
//! - A linear layer's input gradient, dy · wᵀ, whose right operand is the weight transposed (a
//!   strided view). gemm packs such an operand on the calling thread alone before the cores
//!   share the multiply: a per-thread `perf` profile of the real 0.5B model's SFT step found
//!   1.2 s of main-thread packing per step (`pack_lhs`) while the other core waited.
//! - Matrix–vector products (one new token in generation) and products under gemm's threading
//!   threshold, which it runs on one thread: the tied vocabulary projection of one token alone
//!   took 45 ms on one core.
//!
//! Such a product is split here by the columns of its output into one task per block, each a
//! single-threaded gemm that packs only its own block. Every output element is still one dot
//! product; gemm may cut the sum differently for a narrower block (or take its small-matrix
//! path), so values agree to rounding (the tests: 1e-6 relative). Other products (the
//! forward product of a training batch, the weight gradient of full fine-tuning) go to gemm
//! whole. All of them write into buffers made here, not through the backend's `empty`, which
//! zero-fills each output and then copies it once more on the calling thread to align it.

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::binary::Binary;
use super::{float_tensor, written_tensor};

/// Products of at least this many multiply-adds are handed to gemm with its rayon threading
/// (burn's CPU backend's threshold); gemm still runs matrix–vector products on one thread.
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// Products of fewer multiply-adds run as one task: splitting them costs more in scheduling
/// than it saves (a [1, 896] · [896, 896] product: 0.13 ms whole, 0.19 ms in blocks).
const SPLIT_MACS: usize = 1 << 20;

/// Output columns per task at least: narrower blocks would pack and multiply in pieces too
/// small for gemm's kernels (16 to 32 columns wide, by instruction set).
const MIN_BLOCK: usize = 64;

/// A matrix operand in place: its first element and its row and column strides (elements).
#[derive(Clone, Copy)]
pub(super) struct Operand {
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
        Self::matrix(t, &[])
    }

    /// The matrix at `index` (all dimensions but the last two) of an f32 tensor, as it lies
    /// in its buffer, strided or not.
    pub(super) fn matrix(t: &FlexTensor, index: &[usize]) -> Self {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "matmul: an f32 tensor, not {:?}",
            t.dtype()
        );
        let strides = t.layout().strides();
        let rank = strides.len();
        assert_eq!(
            index.len() + 2,
            rank,
            "matmul: a matrix of a {rank}-D tensor"
        );
        let offset: isize = index
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        Self {
            // From the buffer's own start, so that negative strides (a flip) may reach
            // before the layout's start offset.
            ptr: t
                .storage::<f32>()
                .as_ptr()
                .wrapping_add(t.layout().start_offset())
                .wrapping_offset(offset),
            row_stride: strides[rank - 2],
            col_stride: strides[rank - 1],
        }
    }

    /// The transpose: the same elements, rows and columns swapped.
    pub(super) fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The operand from column `col` on.
    fn from_col(self, col: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_offset(col as isize * self.col_stride),
            ..self
        }
    }
}

/// A new [m, n] tensor: lhs [m, k] · rhs [k, n].
fn product([m, k, n]: [usize; 3], lhs: Operand, rhs: Operand) -> FlexTensor {
    let width = n.div_ceil(column_blocks([m, k, n], rhs));
    // SAFETY: the blocks cover the m × n elements, each written by one task alone; the
    // operands address [m, k] and [k, n] elements of tensors that outlive the call.
    let write = |out: *mut f32| unsafe {
        if width >= n {
            return gemm(out, n, [m, k, n], lhs, rhs, true);
        }
        let out = SendPtr(out);
        (0..n.div_ceil(width)).into_par_iter().for_each(|block| {
            let first = block * width;
            let cols = width.min(n - first);
            gemm(
                out.at(first),
                n,
                [m, k, cols],
                lhs,
                rhs.from_col(first),
                false,
            )
        })
    };
    // SAFETY: `write` writes every element (above).
    unsafe { output(Shape::new([m, n]), m <= 1 || n <= 1, write) }
}

/// A new tensor of products, each element stored by `write` through the pointer.
/// `vector`: a product of one row or column, whose output starts zeroed rather than
/// uninitialised, since gemm's matrix–vector path makes a slice of it before writing it.
///
/// # Safety
/// `write` must initialise every element.
pub(super) unsafe fn output(
    shape: Shape,
    vector: bool,
    write: impl FnOnce(*mut f32),
) -> FlexTensor {
    if vector {
        return float_tensor(shape, |out| write(out.as_mut_ptr()));
    }
    // SAFETY: the caller's promise.
    unsafe { written_tensor(shape, write) }
}

/// How many column blocks a product is computed in: two per thread where gemm would leave
/// cores idle (it runs the product on one thread, or packs a right operand whose columns are
/// strided on the calling thread first); one, left to gemm whole, otherwise.
fn column_blocks([m, k, n]: [usize; 3], rhs: Operand) -> usize {
    let macs = m * k * n;
    let one_thread = m <= 1 || macs < PARALLEL_MACS;
    let serial_packing = rhs.col_stride != 1;
    if macs < SPLIT_MACS || !(one_thread || serial_packing) {
        return 1;
    }
    (2 * rayon::current_num_threads()).clamp(1, (n / MIN_BLOCK).max(1))
}

/// out [m, n] (rows `out_row_stride` apart) = lhs [m, k] · rhs [k, n], on every core if
/// `parallel` and the product is large.
///
/// # Safety
/// `out` must be valid for writes of every element of the [m, n] matrix it addresses, and
/// the operands for reads of [m, k] and [k, n] elements.
unsafe fn gemm(
    out: *mut f32,
    out_row_stride: usize,
    shape: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    // SAFETY: the caller's promise.
    unsafe { gemm_into(out, out_row_stride, shape, lhs, rhs, parallel, false) }
}

/// As `gemm`, adding the product to out's values if `accumulate`.
///
/// # Safety
/// As `gemm`; with `accumulate`, out's elements must also be initialised.
pub(super) unsafe fn gemm_into(
    out: *mut f32,
    out_row_stride: usize,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
    accumulate: bool,
) {
    let parallelism = match parallel && m * k * n >= PARALLEL_MACS {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller's promise; without `accumulate` (read_dst false, alpha 0) gemm only
    // writes out.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The output's address, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);

// SAFETY: the tasks given it write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(super) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// x [rows, in] · w [in, out].
fn forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
    let ([rows, d_in], [w_in, d_out]) = (dims(&x), dims(&w));
    assert_eq!(
        d_in, w_in,
        "matmul: x is [{rows}, {d_in}], w is [{w_in}, {d_out}]"
    );
    product([rows, d_in, d_out], Operand::of(&x), Operand::of(&w))
}

/// ∂L/∂x = dy · wᵀ.
fn input_gradient(dy: &FlexTensor, w: &FlexTensor) -> FlexTensor {
    let ([rows, d_out], [d_in, w_out]) = (dims(dy), dims(w));
    assert_eq!(
        d_out, w_out,
        "matmul: dy is [{rows}, {d_out}], w is [{d_in}, {w_out}]"
    );
    product([rows, d_out, d_in], Operand::of(dy), Operand::of(w).t())
}

/// ∂L/∂w = xᵀ · dy.
fn weight_gradient(x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let ([rows, d_in], [dy_rows, d_out]) = (dims(x), dims(dy));
    assert_eq!(
        rows, dy_rows,
        "matmul: x is [{rows}, {d_in}], dy is [{dy_rows}, {d_out}]"
    );
    product([d_in, rows, d_out], Operand::of(x).t(), Operand::of(dy))
}

fn dims(t: &FlexTensor) -> [usize; 2] {
    let shape = t.shape();
    assert_eq!(shape.num_dims(), 2, "matmul: a 2-D tensor, not {shape:?}");
    [shape[0], shape[1]]
}

/// The operation for `binary::tracked`.
#[derive(Debug)]
pub(super) struct Matmul;

impl Binary for Matmul {
    /// x for ∂L/∂w, w for ∂L/∂x: with a frozen weight (LoRA) the input is not kept.
    fn kept([x_tracked, w_tracked]: [bool; 2]) -> [bool; 2] {
        [w_tracked, x_tracked]
    }

    fn forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        forward(x, w)
    }

    fn gradients(
        [x, w]: [Option<FlexTensor>; 2],
        _shapes: [Shape; 2],
        dy: FlexTensor,
        [x_tracked, w_tracked]: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let kept = "matmul keeps w for ∂L/∂x and x for ∂L/∂w";
        [
            x_tracked.then(|| input_gradient(&dy, w.as_ref().expect(kept))),
            w_tracked.then(|| weight_gradient(x.as_ref().expect(kept), &dy)),
        ]
    }
}
