//! The losses SFT and SAP optimise, with an optional probe in place.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use safeprobe_model::decoder::CausalLm;
use safeprobe_model::fused;

use crate::data::Batch;

/// Vectors added to the outputs of some layers: x_j = layer_j(x_{j−1}) + v_j.
#[derive(Clone, Debug)]
pub struct Probe {
    pub layers: Vec<usize>,
    pub vectors: Vec<Tensor<1>>,
}

impl Probe {
    pub fn zeros(layers: Vec<usize>, hidden: usize, device: &burn::tensor::Device) -> Self {
        let vectors = layers
            .iter()
            .map(|_| Tensor::zeros([hidden], device))
            .collect();
        Self { layers, vectors }
    }

    /// Per-layer offsets for `CausalLm::forward_hidden`.
    pub fn offsets(&self, num_layers: usize) -> Vec<Option<Tensor<3>>> {
        let mut offsets = vec![None; num_layers];
        for (layer, v) in self.layers.iter().zip(&self.vectors) {
            let [h] = v.dims();
            offsets[*layer] = Some(v.clone().reshape([1, 1, h]));
        }
        offsets
    }
}

/// Summed log-probability of the response tokens of each row, shape [batch].
pub fn response_logprobs(
    model: &CausalLm,
    batch: &Batch,
    probe: Option<&Probe>,
) -> (Tensor<1>, Tensor<1>) {
    let offsets = probe
        .map(|p| p.offsets(model.layers.len()))
        .unwrap_or_default();
    let hidden = model.forward_hidden(batch.input_ids.clone(), &batch.layout, None, &offsets);
    let [b, s, h] = hidden.dims();
    // Only the scored positions reach the vocabulary projection.
    let scored = hidden
        .reshape([b * s, h])
        .select(0, batch.scored_positions.clone());
    let [n, _] = scored.dims();
    let logits = model.logits(scored.reshape([1, n, h]));
    let vocab = logits.dims()[2];
    let token_logp =
        fused::token_logprobs(logits.reshape([n, vocab]), batch.scored_targets.clone());
    let per_row = batch.row_of_scored.clone().matmul(token_logp).reshape([b]);
    (per_row.clone(), per_row.sum())
}

/// Mean token cross-entropy over every response token of the batch (as transformers computes
/// a causal-LM loss with ignored prompt positions).
pub fn task_loss(model: &CausalLm, batch: &Batch, probe: Option<&Probe>) -> Tensor<1> {
    let (_, total) = response_logprobs(model, batch, probe);
    total.neg().div_scalar(batch.response_tokens.max(1) as f64)
}

/// Contrastive safety loss over a batch whose first half holds the safe answers and second
/// half the harmful ones to the same prompts: mean of −log σ((log p(safe) − log p(harmful)) / T).
pub fn safety_loss(
    model: &CausalLm,
    pairs: &Batch,
    probe: Option<&Probe>,
    temperature: f64,
) -> Tensor<1> {
    let (per_row, _) = response_logprobs(model, pairs, probe);
    let [rows] = per_row.dims();
    let n = rows / 2;
    let margin =
        (per_row.clone().narrow(0, 0, n) - per_row.narrow(0, n, n)).div_scalar(temperature);
    log_sigmoid(margin).mean().neg()
}
