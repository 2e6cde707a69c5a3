//! The fused forms against their tensor-op twins on the CPU backend: values, and under
//! autodiff the gradients of a weighted sum of the output.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};

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

/// Values spread evenly over `centre ± half_width`, the same on every run (burn's own random
/// generator is shared by every test in the process).
fn uniform<const D: usize>(
    shape: [usize; D],
    centre: f32,
    half_width: f32,
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| centre + half_width * rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// The CPU backend, plain and under autodiff: where the fused forms run (checked, so that the
/// comparisons cannot pass by running the composed forms twice).
fn devices() -> [Device; 2] {
    let devices = [Device::flex(), Device::flex().autodiff()];
    assert!(devices.iter().all(|d| on_cpu(d.clone())));
    devices
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
            let raw = uniform([r, v], 3.0, 12.0, 1, &device);
            let logits = if transposed { raw.transpose() } else { raw };
            let ids: Vec<i64> = (0..rows).map(|i| ((i * 7919) % vocab) as i64).collect();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, 1]), &device);
            let weights = uniform([rows, 1], 0.5, 0.5, 2, &device);
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
            // The composed reference sums up to 50 000 exponentials in f32 (the fused form in
            // f64), so each of its probabilities may be off by about 1e-6 relative; a wrong
            // gradient formula is off by far more (a half-weighted target term: 0.5).
            for (f, r) in fused_grads.into_iter().zip(reference_grads) {
                let error = relative_error(f, r);
                assert!(
                    error < 1e-5,
                    "{rows}×{vocab}: gradient off by {error} (relative)"
                );
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
            let raw = uniform(raw_shape, 0.0, 20.0, 3, &device);
            let gate = if transposed { raw.swap_dims(1, 2) } else { raw };
            let up = uniform(shape, 0.0, 4.0, 4, &device);
            let weights = uniform(shape, 0.5, 0.5, 5, &device);
            let inputs = [gate, up];
            let case = format!("{shape:?}");
            let op: (BinaryFn<3>, BinaryFn<3>) = (swiglu, swiglu_composed);
            assert_matches_composed(&device, inputs, ["gate", "up"], op, shape, &weights, &case);
        }
    }
}

/// A contiguous view of the first rows of a larger buffer (a prefix `narrow`) is read as its
/// own rows only.
#[test]
fn views_into_larger_buffers_read_only_their_rows() {
    for device in devices() {
        let logits = uniform([9, 300], 0.0, 8.0, 6, &device).narrow(0, 0, 4);
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 299, 7, 150], [4, 1]), &device);
        let weights = uniform([4, 1], 0.5, 0.5, 7, &device);
        let run = |fused: bool| {
            with_gradients(
                &device,
                &[logits.clone()],
                |x| match fused {
                    true => token_logprobs(x[0].clone(), targets.clone()),
                    false => token_logprobs_composed(x[0].clone(), targets.clone()),
                },
                &weights,
            )
        };
        let ((fused, fused_grads), (reference, reference_grads)) = (run(true), run(false));
        assert!(max_difference(fused, reference) < 1e-5);
        for (f, r) in fused_grads.into_iter().zip(reference_grads) {
            assert!(relative_error(f, r) < 1e-5);
        }

        let gate = uniform([6, 50], 0.0, 10.0, 8, &device).narrow(0, 0, 3);
        let up = uniform([3, 50], 0.0, 2.0, 9, &device);
        let error = relative_error(swiglu(gate.clone(), up.clone()), swiglu_composed(gate, up));
        assert!(error < 1e-6, "swiglu of a view off by {error}");
    }
}

/// A linear layer's product against burn's, values and both gradients, in each way it is
/// computed: ∂/∂x in column blocks (one of them narrower than the rest), a weight given
/// transposed (the tied vocabulary projection's layout: the forward product in blocks), one
/// row (a generated token: both products in blocks), and products small enough to run whole
/// on one thread.
#[test]
fn matmul_matches_burns_product() {
    for device in devices() {
        for (rows, d_in, d_out, transposed) in [
            (200, 1001, 300, false),
            (200, 300, 1000, true),
            (1, 1024, 1100, false),
            (3, 40, 24, false),
            (5, 17, 9, true),
        ] {
            let x = uniform([rows, d_in], 0.0, 1.0, 10, &device);
            let w = if transposed {
                uniform([d_out, d_in], 0.0, 1.0, 11, &device).transpose()
            } else {
                uniform([d_in, d_out], 0.0, 1.0, 11, &device)
            };
            let weights = uniform([rows, d_out], 0.0, 1.0, 12, &device);
            let case = format!("[{rows}, {d_in}] · [{d_in}, {d_out}], transposed {transposed}");
            let (inputs, dims) = ([x, w], [rows, d_out]);
            let op: (BinaryFn<2>, BinaryFn<2>) = (matmul, matmul_composed);
            assert_matches_composed(&device, inputs, ["x", "w"], op, dims, &weights, &case);
        }
    }
}

/// Attention's per-head products against burn's batched product of repeated heads, values and
/// both gradients: grouped heads (3 query heads to each key/value head) with keys given
/// transposed (the scores' layout) and queries strided as the attention makes them, one
/// query row (a generated token), and one key/value head per query head.
#[test]
fn head_matmul_matches_repeated_heads() {
    for device in devices() {
        for ([batch, heads, groups, m, k, n], strided) in [
            ([2, 6, 2, 5, 7, 9], true),
            ([2, 4, 2, 1, 16, 33], true),
            ([1, 4, 4, 64, 32, 64], false),
        ] {
            let (a, b) = if strided {
                (
                    uniform([batch, m, heads, k], 0.0, 1.0, 15, &device).swap_dims(1, 2),
                    uniform([batch, groups, n, k], 0.0, 1.0, 16, &device).swap_dims(2, 3),
                )
            } else {
                (
                    uniform([batch, heads, m, k], 0.0, 1.0, 15, &device),
                    uniform([batch, groups, k, n], 0.0, 1.0, 16, &device),
                )
            };
            let dims = [batch, heads, m, n];
            let weights = uniform(dims, 0.0, 1.0, 17, &device);
            let case = format!("{heads} heads on {groups}, [{m}, {k}] · [{k}, {n}]");
            let op: (BinaryFn<4>, BinaryFn<4>) = (head_matmul, head_matmul_composed);
            assert_matches_composed(&device, [a, b], ["a", "b"], op, dims, &weights, &case);
        }
    }
}

/// An operation of two tensors of one rank.
type BinaryFn<const D: usize> = fn(Tensor<D>, Tensor<D>) -> Tensor<D>;

/// A fused operation of two inputs against its composed twin on one case: the output's
/// shape, its values, and under autodiff each input's gradient, all to 1e-6 relative.
fn assert_matches_composed<const D: usize>(
    device: &Device,
    inputs: [Tensor<D>; 2],
    names: [&str; 2],
    (fused, composed): (BinaryFn<D>, BinaryFn<D>),
    dims: [usize; D],
    weights: &Tensor<D>,
    case: &str,
) {
    let run = |op: BinaryFn<D>| {
        with_gradients(device, &inputs, |v| op(v[0].clone(), v[1].clone()), weights)
    };
    let ((fused, fused_grads), (reference, reference_grads)) = (run(fused), run(composed));
    assert_eq!(fused.dims(), dims, "{case}");
    let error = relative_error(fused, reference);
    assert!(error < 1e-6, "{case}: value off by {error} (relative)");
    assert_eq!(fused_grads.len(), reference_grads.len());
    for (input, (f, r)) in names
        .iter()
        .zip(fused_grads.into_iter().zip(reference_grads))
    {
        let error = relative_error(f, r);
        assert!(error < 1e-6, "{case}: ∂/∂{input} off by {error} (relative)");
    }
}

/// A frozen weight (the usual case, LoRA): only x gets a gradient, and it is the same.
#[test]
fn matmul_with_a_frozen_weight_gives_x_its_gradient() {
    let device = Device::flex().autodiff();
    assert!(on_cpu(device.clone()));
    let x = uniform([64, 600], 0.0, 1.0, 13, &device).require_grad();
    let w = uniform([600, 500], 0.0, 1.0, 14, &device);
    let dx = |fused: bool| {
        let x = x.clone();
        let y = match fused {
            true => matmul(x.clone(), w.clone()),
            false => matmul_composed(x.clone(), w.clone()),
        };
        let grads = (y.clone() * y).sum().backward();
        assert!(w.grad(&grads).is_none());
        x.grad(&grads).expect("x's gradient")
    };
    let error = relative_error(dx(true), dx(false));
    assert!(error < 1e-6, "∂/∂x off by {error} (relative)");
}
