//! The fused forms against their tensor-op twins on the CPU backend: values, and under
//! autodiff the gradients of a weighted sum of the output.

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use super::*;

fn max_difference<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// The largest difference relative to the reference's largest magnitude (at least 1).
fn relative_error<const D: usize>(fused: Tensor<D>, reference: Tensor<D>) -> f32 {
    let scale: f32 = reference.clone().abs().max().into_scalar();
    let scale = scale.max(1.0);
    max_difference(fused, reference) / scale
}

/// The output of `op` on `inputs` and, under autodiff, the gradient of Σ w·output with
/// respect to each input.
fn with_gradients<const D: usize, const O: usize>(
    device: &Device,
    inputs: &[Tensor<D>],
    op: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
    weights: &Tensor<O>,
) -> (Tensor<O>, Vec<Tensor<D>>) {
    let leaves: Vec<Tensor<D>> = inputs
        .iter()
        .map(|x| {
            let x = x.clone().detach();
            if device.is_autodiff() {
                x.require_grad()
            } else {
                x
            }
        })
        .collect();
    let out = op(leaves.clone());
    if !device.is_autodiff() {
        return (out, Vec::new());
    }
    let grads = (out.clone() * weights.clone()).sum().backward();
    let gradients = leaves
        .iter()
        .map(|x| x.grad(&grads).expect("a gradient for every input"))
        .collect();
    (out, gradients)
}

fn devices() -> [Device; 2] {
    [Device::flex(), Device::flex().autodiff()]
}

/// Rows of several widths, a transposed (strided) logits matrix, logits far from 0 (the shift
/// by each row's maximum).
#[test]
fn token_logprobs_matches_log_softmax_and_gather() {
    for device in devices() {
        for (rows, vocab, transposed) in [(7, 1000, false), (5, 9, true), (13, 50_000, false)] {
            let [r, v] = if transposed {
                [vocab, rows]
            } else {
                [rows, vocab]
            };
            let raw = Tensor::<2>::random([r, v], Distribution::Normal(3.0, 4.0), &device);
            let logits = if transposed { raw.transpose() } else { raw };
            let ids: Vec<i64> = (0..rows).map(|i| ((i * 7919) % vocab) as i64).collect();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, 1]), &device);
            let weights = Tensor::<2>::random([rows, 1], Distribution::Default, &device);
            let run = |fused: bool| {
                with_gradients(
                    &device,
                    &[logits.clone()],
                    |x| {
                        let x = x[0].clone();
                        if fused {
                            token_logprobs(x, targets.clone())
                        } else {
                            token_logprobs_composed(x, targets.clone())
                        }
                    },
                    &weights,
                )
            };
            let ((fused, fused_grads), (reference, reference_grads)) = (run(true), run(false));
            assert_eq!(fused.dims(), [rows, 1]);
            let error = max_difference(fused, reference);
            assert!(error < 1e-4, "{rows}×{vocab}: log p off by {error}");
            assert_eq!(fused_grads.len(), reference_grads.len());
            for (f, r) in fused_grads.into_iter().zip(reference_grads) {
                let error = max_difference(f, r);
                assert!(error < 1e-6, "{rows}×{vocab}: gradient off by {error}");
            }
        }
    }
}

/// Both signs and large magnitudes of the gate (the two branches of σ), a strided gate.
#[test]
fn swiglu_matches_silu_times_up() {
    for device in devices() {
        for (shape, transposed) in [([2, 3, 70_000], false), ([1, 40, 9], true)] {
            let [a, b, c] = shape;
            let raw_shape = if transposed { [a, c, b] } else { shape };
            let raw = Tensor::<3>::random(raw_shape, Distribution::Normal(0.0, 6.0), &device);
            let gate = if transposed { raw.swap_dims(1, 2) } else { raw };
            let up = Tensor::<3>::random(shape, Distribution::Normal(0.0, 2.0), &device);
            let weights = Tensor::<3>::random(shape, Distribution::Default, &device);
            let run = |fused: bool| {
                with_gradients(
                    &device,
                    &[gate.clone(), up.clone()],
                    |x| {
                        if fused {
                            swiglu(x[0].clone(), x[1].clone())
                        } else {
                            swiglu_composed(x[0].clone(), x[1].clone())
                        }
                    },
                    &weights,
                )
            };
            let ((fused, fused_grads), (reference, reference_grads)) = (run(true), run(false));
            assert_eq!(fused.dims(), shape);
            let error = relative_error(fused, reference);
            assert!(error < 1e-6, "{shape:?}: value off by {error} (relative)");
            assert_eq!(fused_grads.len(), reference_grads.len());
            for (input, (f, r)) in ["gate", "up"]
                .iter()
                .zip(fused_grads.into_iter().zip(reference_grads))
            {
                let error = relative_error(f, r);
                assert!(
                    error < 1e-6,
                    "{shape:?}: ∂/∂{input} off by {error} (relative)"
                );
            }
        }
    }
}
