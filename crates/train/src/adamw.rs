//! AdamW exactly as PyTorch's `torch.optim.AdamW` computes it (decoupled weight decay,
//! bias-corrected moments), over flat lists of plain tensors.

use burn::tensor::Tensor;

pub use safeprobe_wire::spec::AdamWConfig;

pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub(crate) first: Vec<Tensor<1>>,
    pub(crate) second: Vec<Tensor<1>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            first: Vec::new(),
            second: Vec::new(),
        }
    }

    /// One descent step: returns the updated parameters.
    pub fn step(
        &mut self,
        params: Vec<Tensor<1>>,
        grads: Vec<Tensor<1>>,
        lr: f64,
    ) -> Vec<Tensor<1>> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        if self.first.is_empty() {
            self.first = grads.iter().map(|g| g.zeros_like()).collect();
            self.second = grads.iter().map(|g| g.zeros_like()).collect();
        }
        self.step += 1;
        let correction1 = 1.0 - beta1.powi(self.step as i32);
        let correction2 = 1.0 - beta2.powi(self.step as i32);
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            let m = self.first[i].clone().mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1);
            let v = self.second[i].clone().mul_scalar(beta2)
                + g.powf_scalar(2.0).mul_scalar(1.0 - beta2);
            let denom = v.clone().div_scalar(correction2).sqrt().add_scalar(eps);
            let update = m.clone().div_scalar(correction1) / denom;
            let decayed = p.mul_scalar(1.0 - lr * weight_decay);
            out.push(decayed - update.mul_scalar(lr));
            self.first[i] = m;
            self.second[i] = v;
        }
        out
    }
}
