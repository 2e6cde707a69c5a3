//! Every WGSL kernel against its burn tensor-op twin, on wgpu (Mesa's lavapipe in CI), on
//! random inputs of awkward sizes: tiny, not multiples of the workgroup size, several
//! reduction passes, and more workgroups than one grid dimension holds.

mod common;
use common::*;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use safeprobe_model::device::{DeviceChoice, select};
use safeprobe_train::kernels::{Implementation, ProbeAdam, axpy, dot, on_wgpu, probe_adam};

fn wgpu() -> Device {
    let device = select(DeviceChoice::Wgpu)
        .expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)")
        .device;
    // Otherwise both sides would be the twin and nothing would be compared.
    assert!(
        on_wgpu(&Tensor::<1>::zeros([1], &device)),
        "the kernels must run on wgpu here"
    );
    device
}

fn random(n: usize, seed: u64, device: &Device) -> (Tensor<1>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    (
        Tensor::from_data(TensorData::new(values.clone(), [n]), device),
        values,
    )
}

fn host(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

const SIZES: [usize; 7] = [1, 7, 255, 257, 1023, 1025, 70_001];

#[test]
fn probe_adam_matches_its_twin() {
    let device = wgpu();
    for (i, n) in SIZES.into_iter().enumerate() {
        let (g, _) = random(n, 10 + i as u64, &device);
        let (m, _) = random(n, 20 + i as u64, &device);
        let (v, _) = random(n, 30 + i as u64, &device);
        let v = v.abs();
        for plain_gradient in [false, true] {
            let hp = ProbeAdam {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: 3,
                plain_gradient,
            };
            let (p1, m1, v1) =
                probe_adam(g.clone(), m.clone(), v.clone(), &hp, Implementation::Auto);
            let (p2, m2, v2) = probe_adam(
                g.clone(),
                m.clone(),
                v.clone(),
                &hp,
                Implementation::TensorOps,
            );
            for (what, a, b) in [("probe", p1, p2), ("m", m1, m2), ("v", v1, v2)] {
                let error = relative_error(&host(a), &host(b));
                assert!(
                    error <= 1e-5,
                    "n = {n}, plain = {plain_gradient}: {what} relative error {error}"
                );
            }
        }
    }
}

#[test]
fn axpy_matches_its_twin() {
    let device = wgpu();
    // The last size needs more than 65535 workgroups of 256: the grid goes 2-D.
    for (i, n) in SIZES.into_iter().chain([65_535 * 256 + 513]).enumerate() {
        let (w, _) = random(n, 40 + i as u64, &device);
        let (g, _) = random(n, 50 + i as u64, &device);
        let kernel = host(axpy(w.clone(), g.clone(), -0.37, Implementation::Auto));
        let twin = host(axpy(w, g, -0.37, Implementation::TensorOps));
        let error = relative_error(&kernel, &twin);
        assert!(error <= 1e-5, "n = {n}: relative error {error}");
    }
}

#[test]
fn dot_matches_its_twin_and_the_cpu() {
    let device = wgpu();
    for (i, n) in SIZES.into_iter().chain([3_000_000]).enumerate() {
        let (a, values_a) = random(n, 60 + i as u64, &device);
        let (b, values_b) = random(n, 70 + i as u64, &device);
        let kernel = host(dot(a.clone(), b.clone(), Implementation::Auto));
        let twin = host(dot(a, b, Implementation::TensorOps));
        let exact: f64 = values_a
            .iter()
            .zip(&values_b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum();
        assert_eq!(kernel.len(), 1);
        let error = relative_error(&kernel, &twin);
        assert!(error <= 1e-5, "n = {n}: kernel {kernel:?} vs twin {twin:?}");
        assert!(
            (kernel[0] as f64 - exact).abs() <= 1e-5 * values_a.len() as f64,
            "n = {n}: {} vs {exact}",
            kernel[0]
        );
    }
}

#[test]
fn twins_run_on_the_cpu() {
    let device = Device::flex();
    let (a, values) = random(1000, 1, &device);
    let norm = host(dot(a.clone(), a.clone(), Implementation::Auto))[0] as f64;
    let exact: f64 = values.iter().map(|x| (*x as f64).powi(2)).sum();
    assert!((norm - exact).abs() < 1e-3);
    let moved = host(axpy(a.clone(), a, 1.0, Implementation::Auto));
    assert!((moved[5] - 2.0 * values[5]).abs() < 1e-6);
}

#[test]
fn probe_adam_with_aliased_inputs() {
    let device = wgpu();
    let (g, _) = random(64, 1, &device);
    let zeros = Tensor::<1>::zeros([64], &device);
    for plain_gradient in [true, false] {
        let hp = ProbeAdam {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
            plain_gradient,
        };
        let (p1, _, _) = probe_adam(
            g.clone(),
            zeros.clone(),
            zeros.clone(),
            &hp,
            Implementation::Auto,
        );
        let (p2, _, _) = probe_adam(
            g.clone(),
            zeros.clone(),
            zeros.clone(),
            &hp,
            Implementation::TensorOps,
        );
        let error = relative_error(&host(p1), &host(p2));
        assert!(
            error <= 1e-5,
            "plain = {plain_gradient}: relative error {error}"
        );
    }
}

/// burn's own whole-tensor sum on wgpu, fused with the product before it, over a million
/// elements. With burn's `autotune` feature this picked a chained reduction that on lavapipe
/// summed only the first 262 132 elements; the twins above rely on this sum being right.
#[test]
fn large_sums_on_wgpu_count_every_element() {
    let device = wgpu();
    for n in [1_000_000, 3_000_000] {
        let ones = host(Tensor::<1>::ones([n], &device).sum())[0];
        assert_eq!(ones, n as f32, "sum of {n} ones");
        let (a, values_a) = random(n, 80, &device);
        let (b, values_b) = random(n, 90, &device);
        let exact: f64 = values_a
            .iter()
            .zip(&values_b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum();
        let fused = host((a * b).sum())[0] as f64;
        // A rounding bound far above what the tree reduction loses (1e-4 at 3e6), far under any
        // dropped block of terms.
        assert!(
            (fused - exact).abs() <= 1e-7 * n as f64,
            "n = {n}: {fused} vs {exact}"
        );
    }
}
