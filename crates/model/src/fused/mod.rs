//! Operations that the CPU backend runs on every core, each with a backward pass of its own.
//!
//! burn's CPU backend (flex) leaves cores idle in two ways, both found by per-thread `perf`
//! profiles of the real 0.5B model's SFT step: it runs every element-wise pass on the calling
//! thread alone (2.9 s of a 7.1 s step), and its matrix products let gemm pack a strided
//! operand on one thread while the others wait (1.2 s a step). Here:
//!
//! - `token_logprobs`: log p(target) of each row of a logits matrix (the loss), one
//!   row-parallel sweep forward and one backward instead of about a dozen single-threaded
//!   passes;
//! - `swiglu`: silu(gate) · up (every MLP), one chunk-parallel sweep each way;
//! - `matmul`: x · w of a linear layer, split into column blocks where gemm would leave cores
//!   idle (see `matmul.rs`);
//! - `head_matmul`: attention's per-head products, one task per head, with grouped-query
//!   attention's shared key/value heads read in place (see `head_matmul.rs`).
//!
//! On other backends (wgpu) each composes tensor ops, exactly its `_composed` twin, which is
//! also what the tests compare the fused forms against (values and gradients).

mod binary;
mod head_matmul;
mod matmul;
mod swiglu;
mod token_logprobs;

use std::mem::MaybeUninit;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::{Device, Int, Shape, Tensor, TensorData};
use rayon::prelude::*;

use binary::Binary;

#[backend_extension(Flex: cfg(all()), Autodiff: cfg(all()))]
pub trait Fused: Backend {
    /// logits [n, vocab], targets [n, 1] → log p(target) [n, 1].
    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
    /// silu(gate) · up, element-wise; both of one shape.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// x [rows, in] · w [in, out] → [rows, out].
    fn matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// a [B, H, M, K] · b [B, G, K, N] → [B, H, M, N], head h against b's head h / (H / G).
    fn head_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl Fused for Flex {
    fn token_logprobs(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        token_logprobs::forward(logits, &targets).0
    }

    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        swiglu::Swiglu::forward(gate, up)
    }

    fn matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        matmul::Matmul::forward(x, w)
    }

    fn head_matmul(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        head_matmul::HeadMatmul::forward(a, b)
    }
}

impl<C: CheckpointStrategy> Fused for Autodiff<Flex, C> {
    fn token_logprobs(logits: FloatTensor<Self>, targets: FlexTensor) -> FloatTensor<Self> {
        token_logprobs::tracked::<C>(logits, targets)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        binary::tracked::<swiglu::Swiglu, C>(gate, up)
    }

    fn matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        binary::tracked::<matmul::Matmul, C>(x, w)
    }

    fn head_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        binary::tracked::<head_matmul::HeadMatmul, C>(a, b)
    }
}

/// Whether the fused forms run here: on the CPU backend, with or without autodiff.
fn on_cpu(device: Device) -> bool {
    matches!(
        device.without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// log p(target) per row: logits [n, vocab], targets [n, 1] → [n, 1].
pub fn token_logprobs(logits: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<2> {
    if !on_cpu(logits.device()) {
        return token_logprobs_composed(logits, targets);
    }
    Tensor::from_dispatch(<Dispatch as Fused>::token_logprobs(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// `token_logprobs` from tensor ops.
pub fn token_logprobs_composed(logits: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<2> {
    log_softmax(logits, 1).gather(1, targets)
}

/// silu(gate) · up.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !on_cpu(gate.device()) {
        return swiglu_composed(gate, up);
    }
    Tensor::from_dispatch(<Dispatch as Fused>::swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// `swiglu` from tensor ops.
pub fn swiglu_composed<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

/// x [rows, in] · w [in, out] → [rows, out].
pub fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if !on_cpu(x.device()) {
        return matmul_composed(x, w);
    }
    Tensor::from_dispatch(<Dispatch as Fused>::matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// `matmul` from tensor ops.
pub fn matmul_composed(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    x.matmul(w)
}

/// a [B, H, M, K] · b [B, G, K, N] → [B, H, M, N]: query head h against key/value head
/// h / (H / G) (grouped-query attention).
pub fn head_matmul(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    if !on_cpu(a.device()) {
        return head_matmul_composed(a, b);
    }
    Tensor::from_dispatch(<Dispatch as Fused>::head_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// `head_matmul` from tensor ops: b's heads repeated H / G times each, then a batched product.
pub fn head_matmul_composed(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    let [batch, heads, _, _] = a.dims();
    let [_, groups, k, n] = b.dims();
    let b = match heads == groups {
        true => b,
        false => b
            .unsqueeze_dim::<5>(2)
            .expand([batch, groups, heads / groups, k, n])
            .reshape([batch, heads, k, n]),
    };
    a.matmul(b)
}

/// Elements per parallel task of an element-wise sweep: large enough that scheduling costs
/// nothing, small enough to share a 512 × 4864 activation between the cores evenly.
const CHUNK: usize = 1 << 14;

/// The tensor with its elements alone in its buffer, in order: a contiguous view at offset 0
/// of a larger buffer (a prefix `narrow`) is copied too, since the sweeps read whole buffers.
fn contiguous(t: FlexTensor) -> FlexTensor {
    let whole = t.bytes().len() == t.layout().num_elements() * t.dtype().size();
    if t.is_contiguous() && t.layout().start_offset() == 0 && whole {
        t
    } else {
        t.to_contiguous()
    }
}

/// A new f32 tensor of this shape, its values written by `fill`.
fn float_tensor(shape: Shape, fill: impl FnOnce(&mut [f32])) -> FlexTensor {
    let mut values = zeroed(shape.num_elements());
    fill(&mut values);
    into_tensor(values, shape)
}

/// `n` zeros, written by every core. Not the backend's `empty`: that zero-fills and then
/// copies the buffer once more to align it, both on the calling thread alone (with fresh
/// pages for a large buffer: in a profile of the 0.5B model's SFT step, 0.8 s a step on one
/// thread for the fused outputs alone).
fn zeroed(n: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    values
        .spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: every element was just written.
    unsafe { values.set_len(n) };
    values
}

/// A new f32 tensor of this shape, each of whose elements `write` stores through the
/// pointer (for gemm, which writes its output without reading it).
///
/// # Safety
/// `write` must initialise all `shape.num_elements()` elements.
unsafe fn written_tensor(shape: Shape, write: impl FnOnce(*mut f32)) -> FlexTensor {
    let n = shape.num_elements();
    let mut values = Vec::<f32>::with_capacity(n);
    write(values.as_mut_ptr());
    // SAFETY: the caller's promise.
    unsafe { values.set_len(n) };
    into_tensor(values, shape)
}

/// The values as a contiguous tensor of this shape, without a copy.
fn into_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

#[cfg(test)]
mod tests;
