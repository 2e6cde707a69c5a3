//! The losses SFT and SAP optimise, with an optional probe in place.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, log_softmax};
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

/// The logits at the positions that predict a response token, shape [tokens, vocab]: only
/// the scored positions reach the vocabulary projection.
fn scored_logits(model: &CausalLm, batch: &Batch, probe: Option<&Probe>) -> Tensor<2> {
    let offsets = probe
        .map(|p| p.offsets(model.layers.len()))
        .unwrap_or_default();
    let hidden = model.forward_hidden(batch.input_ids.clone(), &batch.layout, None, &offsets);
    let [b, s, h] = hidden.dims();
    let scored = hidden
        .reshape([b * s, h])
        .select(0, batch.scored_positions.clone());
    let [n, _] = scored.dims();
    let logits = model.logits(scored.reshape([1, n, h]));
    let vocab = logits.dims()[2];
    logits.reshape([n, vocab])
}

/// Summed log-probability of the response tokens of each row, shape [batch].
pub fn response_logprobs(
    model: &CausalLm,
    batch: &Batch,
    probe: Option<&Probe>,
) -> (Tensor<1>, Tensor<1>) {
    let [b, _] = batch.input_ids.dims();
    let logits = scored_logits(model, batch, probe);
    let token_logp = fused::token_logprobs(logits, batch.scored_targets.clone());
    let per_row = batch.row_of_scored.clone().matmul(token_logp).reshape([b]);
    (per_row.clone(), per_row.sum())
}

/// KL(p_reference ‖ p_model) of the next-token distributions at every response position of
/// the batch, averaged over those positions: how far the model's answers have moved from the
/// reference's (a constant of the graph). With LoRA dropout, `dropout_seed` gives both passes
/// the same masks, so that the model as it started is at KL 0 (without it each pass would
/// draw its own and the two would differ by the masks alone). A batch without response tokens
/// (every answer cut off by `max_len`) has a loss of 0, not that of its placeholder position.
pub fn kl_from_reference(
    model: &CausalLm,
    reference: &CausalLm,
    batch: &Batch,
    dropout_seed: Option<u64>,
) -> Tensor<1> {
    let device = model.embed_tokens.device();
    let reseed = || {
        if let Some(seed) = dropout_seed {
            device.seed(seed);
        }
    };
    reseed();
    let reference_logp = log_softmax(scored_logits(reference, batch, None), 1).detach();
    reseed();
    let model_logp = log_softmax(scored_logits(model, batch, None), 1);
    let per_position = (reference_logp.clone().exp() * (reference_logp - model_logp)).sum_dim(1);
    let total = per_position.sum().reshape([1]);
    match batch.response_tokens {
        0 => total.mul_scalar(0.0),
        tokens => total.div_scalar(tokens as f64),
    }
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
