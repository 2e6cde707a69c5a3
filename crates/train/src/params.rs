//! The trainable parameters of a model as one flat list, whatever the mode: the LoRA
//! factors when fine-tuning with LoRA (base weights frozen), every weight in full mode.
//!
//! Optimiser and SAP arithmetic works on these lists of plain (non-autodiff) tensors; the
//! model's parameters are then replaced with the results, tracked again for the next pass.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor};
use safeprobe_model::decoder::CausalLm;

struct Collect<'a> {
    grads: Option<&'a Gradients>,
    out: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        if !tensor.is_require_grad() {
            return;
        }
        let n = tensor.shape().num_elements();
        let value = match self.grads {
            None => tensor.inner(),
            Some(grads) => match tensor.grad(grads) {
                Some(grad) => grad,
                // A trainable tensor the loss does not reach has a zero gradient.
                None => tensor.inner().zeros_like(),
            },
        };
        self.out.push(value.reshape([n]));
    }
}

struct Layers {
    path: Vec<String>,
    out: Vec<Option<usize>>,
}

impl ModuleVisitor for Layers {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.val().is_require_grad() {
            return;
        }
        let layer = self
            .path
            .windows(2)
            .find(|w| w[0] == "layers")
            .and_then(|w| w[1].parse().ok());
        self.out.push(layer);
    }
}

/// The decoder layer each trainable parameter belongs to (None for the embedding and the
/// final norm), in `values` order.
pub fn layer_of_each(model: &CausalLm) -> Vec<Option<usize>> {
    let mut layers = Layers {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut layers);
    layers.out
}

/// a·b over every tensor together, from the dot reduction kernel.
pub fn dot(a: &[Tensor<1>], b: &[Tensor<1>]) -> f64 {
    use crate::kernels::{Implementation, dot};
    a.iter()
        .zip(b)
        .map(|(x, y)| scalar(&dot(x.clone(), y.clone(), Implementation::Auto)))
        .sum()
}

/// cos(a, b) over every tensor together (0 when either is zero).
pub fn cosine(a: &[Tensor<1>], b: &[Tensor<1>]) -> f64 {
    use crate::kernels::{Implementation, dot};
    let mut sums = [0.0f64; 3];
    for (x, y) in a.iter().zip(b) {
        let dots = [(x, y), (x, x), (y, y)]
            .map(|(p, q)| scalar(&dot(p.clone(), q.clone(), Implementation::Auto)));
        for k in 0..3 {
            sums[k] += dots[k];
        }
    }
    let [xy, xx, yy] = sums;
    xy / (xx.sqrt() * yy.sqrt()).max(1e-30)
}

/// Cosine similarity of two gradients per decoder layer (the paper's gradient-entanglement
/// observation), from the dot/norm reduction kernels.
pub fn cosine_per_layer(model: &CausalLm, a: &[Tensor<1>], b: &[Tensor<1>]) -> Vec<f64> {
    use crate::kernels::{Implementation, dot};
    let owners = layer_of_each(model);
    let layers = owners.iter().flatten().max().map_or(0, |m| m + 1);
    let mut sums = vec![[0.0f64; 3]; layers];
    for ((owner, x), y) in owners.iter().zip(a).zip(b) {
        if let Some(layer) = owner {
            let dots = [(x, y), (x, x), (y, y)]
                .map(|(p, q)| scalar(&dot(p.clone(), q.clone(), Implementation::Auto)));
            for k in 0..3 {
                sums[*layer][k] += dots[k];
            }
        }
    }
    sums.iter()
        .map(|[xy, xx, yy]| xy / (xx.sqrt() * yy.sqrt()).max(1e-30))
        .collect()
}

/// Current values of the trainable parameters (flattened, plain tensors).
pub fn values(model: &CausalLm) -> Vec<Tensor<1>> {
    let mut collect = Collect {
        grads: None,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect.out
}

/// Gradients of the trainable parameters from a backward pass, in `values` order.
pub fn gradients(model: &CausalLm, grads: &Gradients) -> Vec<Tensor<1>> {
    let mut collect = Collect {
        grads: Some(grads),
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect.out
}

struct Replace {
    values: std::vec::IntoIter<Tensor<1>>,
    track: bool,
}

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.val().is_require_grad() {
            return param;
        }
        let value = self
            .values
            .next()
            .expect("one value per trainable parameter");
        let track = self.track;
        param.map(|old| {
            let shaped = autodiff_on(value.reshape(old.dims()), &old.device());
            if track { shaped.require_grad() } else { shaped }
        })
    }
}

/// The device a training pass runs on: `device` with autodiff, and with burn's balanced
/// gradient-checkpointing strategy when asked (the backward pass recomputes memory-bound
/// activations instead of keeping them).
pub fn training_device(device: &Device, gradient_checkpointing: bool) -> Device {
    let device = device.clone().autodiff();
    if gradient_checkpointing {
        device.gradient_checkpointing()
    } else {
        device
    }
}

/// `inner` with autodiff, on `device`'s gradient-checkpointing strategy: `Tensor::from_inner`
/// alone takes the default strategy, and an operation refuses to mix two.
pub fn autodiff_on<const D: usize>(inner: Tensor<D>, device: &Device) -> Tensor<D> {
    let tensor = Tensor::from_inner(inner);
    match device.gradient_checkpointing_strategy() {
        Some(strategy) => tensor.with_gradient_checkpointing_strategy(strategy),
        None => tensor,
    }
}

/// The model with its trainable parameters replaced (same order as `values`), still trainable.
pub fn with_values(model: CausalLm, values: Vec<Tensor<1>>) -> CausalLm {
    model.map(&mut Replace {
        values: values.into_iter(),
        track: true,
    })
}

/// A throw-away copy with replaced parameters that are not tracked (for passes that only
/// need gradients with respect to something else, like the probe).
pub fn frozen_with_values(model: &CausalLm, values: Vec<Tensor<1>>) -> CausalLm {
    model.clone().map(&mut Replace {
        values: values.into_iter(),
        track: false,
    })
}

/// √(Σ‖tᵢ‖²) over a list of tensors, read back to the host.
pub fn global_norm(tensors: &[Tensor<1>]) -> f64 {
    if tensors.is_empty() {
        return 0.0;
    }
    let squares: Vec<Tensor<1>> = tensors
        .iter()
        .map(|t| t.clone().powf_scalar(2.0).sum())
        .collect();
    let total = Tensor::cat(squares, 0).sum().sqrt();
    scalar(&total)
}

/// A one-element tensor's value on the host (autodiff or not).
pub fn scalar(t: &Tensor<1>) -> f64 {
    let t = if t.is_autodiff() {
        t.clone().inner()
    } else {
        t.clone()
    };
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")[0] as f64
}
