//! Continuous safety metrics on held-out data, measured at every validation step: the mean
//! margin log p(safe) − log p(harmful) and the contrastive loss at T = 1 over held-out
//! pairs, and the mean per-token log-probability of a refusal to held-out harmful prompts.
//! None of it is used for the harmful direction, so it shows a drift toward harm long
//! before the harmful score (generation and judging, at the end) does.

use safeprobe_model::Checkpoint;
use safeprobe_model::chat::prompt_messages;
use safeprobe_model::decoder::CausalLm;

use crate::data::{self, Batch, Sequence, with_system};
use crate::error::{Result, TrainError};
use crate::loss::response_logprobs;
use crate::prepare::encode_pairs;
use crate::run::{Event, RunConfig};

/// The held-out data, tokenised once.
pub struct SafetyCheck {
    pairs: Vec<(Sequence, Sequence)>,
    refusals: Vec<Sequence>,
}

impl SafetyCheck {
    /// Reads and tokenises the run's held-out data; None when it has none.
    pub fn prepare(checkpoint: &Checkpoint, config: &RunConfig) -> Result<Option<Self>> {
        let Some(held_out) = &config.safety_eval else {
            return Ok(None);
        };
        let pairs = match &held_out.pairs {
            Some(path) => encode_pairs(checkpoint, &data::read_pairs(path)?, config, path)?,
            None => Vec::new(),
        };
        let mut refusals = Vec::new();
        if let Some(path) = &held_out.prompts {
            for (line, prompt) in data::read_prompts(path)? {
                let prompt = with_system(&prompt_messages(None, &prompt), config.system.as_deref());
                let sequence = Sequence::encode(
                    &checkpoint.tokenizer,
                    &prompt,
                    &held_out.refusal,
                    config.max_len,
                )
                .map_err(|e| TrainError::Data {
                    path: path.clone(),
                    line,
                    message: e.to_string(),
                })?;
                refusals.push(sequence);
            }
        }
        Ok(Some(Self { pairs, refusals }))
    }

    /// The metrics for `model` (in inference mode) after `step` steps.
    pub fn measure(&self, model: &CausalLm, pad: u32, batch_size: usize, step: usize) -> Event {
        let device = model.embed_tokens.device();
        let batch_size = batch_size.max(1);
        let margins = pair_margins(model, &self.pairs, pad, batch_size);
        let mut refusal_logprobs = Vec::new();
        for chunk in self.refusals.chunks(batch_size) {
            let (per_row, _) = response_logprobs(model, &Batch::new(chunk, pad, &device), None);
            let per_token = values(per_row)
                .into_iter()
                .zip(chunk)
                .map(|(logp, s)| logp / s.response_tokens().max(1) as f64);
            refusal_logprobs.extend(per_token);
        }
        Event::SafetyCheck {
            step,
            pair_margin: mean(&margins),
            pair_loss: loss_at_t1(&margins),
            refusal_logprob: mean(&refusal_logprobs),
        }
    }
}

/// The margins log p(safe) − log p(harmful) of encoded (safe, harmful) pairs under `model`
/// (in inference mode), `batch_size` pairs per pass.
pub fn pair_margins(
    model: &CausalLm,
    pairs: &[(Sequence, Sequence)],
    pad: u32,
    batch_size: usize,
) -> Vec<f64> {
    let device = model.embed_tokens.device();
    let mut margins = Vec::new();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let rows = data::contrastive_rows(chunk);
        let (per_row, _) = response_logprobs(model, &Batch::new(&rows, pad, &device), None);
        let logp = values(per_row);
        let n = chunk.len();
        margins.extend((0..n).map(|i| logp[i] - logp[n + i]));
    }
    margins
}

/// The contrastive safety loss at T = 1 of these margins: mean −log σ(m).
pub fn loss_at_t1(margins: &[f64]) -> Option<f64> {
    mean(&margins.iter().map(|m| -log_sigmoid(*m)).collect::<Vec<_>>())
}

/// A vector's values on the host.
fn values(t: burn::tensor::Tensor<1>) -> Vec<f64> {
    let t = if t.is_autodiff() { t.inner() } else { t };
    let data = t.into_data().convert::<f32>();
    data.try_to_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// log σ(x), without overflow for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_is_exact_at_both_ends() {
        assert!((log_sigmoid(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!((log_sigmoid(3.0) - (1.0 / (1.0 + (-3.0f64).exp())).ln()).abs() < 1e-15);
        assert_eq!(log_sigmoid(-800.0), -800.0);
        assert_eq!(log_sigmoid(800.0), 0.0);
    }
}
