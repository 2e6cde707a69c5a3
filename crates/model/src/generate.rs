//! Generation with a KV cache (greedy or seeded temperature/top-p sampling, batched prompts
//! of different lengths) and scoring of a response under the project's token convention.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::decoder::{AttentionLayout, CausalLm, KvCache};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "--temperature {}: must be a finite number ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "--top-p {}: must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

fn int_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().map(|t| *t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), device)
}

/// Generates a continuation for each prompt (token ids). Returns the new tokens of each
/// row, ending with the stop token when one was produced.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    stop_ids: &[u32],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    generate_streaming(
        model,
        prompts,
        sampling,
        stop_ids,
        pad_id,
        device,
        |_, _| true,
    )
}

/// `generate`, reporting each new token of each unfinished row as `on_token(row, token)` the
/// moment it is chosen (for streamed chat); `on_token` returning false stops generation.
pub fn generate_streaming(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    stop_ids: &[u32],
    pad_id: u32,
    device: &Device,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    sampling.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!("prompt {i} has no tokens")));
    }
    check_vocabulary(model, prompts.iter().flatten())?;
    let width = prompts.iter().map(Vec::len).max().unwrap();
    // Left padding keeps every row's last prompt token in the last column.
    let mut key_mask: Vec<Vec<bool>> = Vec::new();
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for p in prompts {
        let pad = width - p.len();
        key_mask.push((0..width).map(|i| i >= pad).collect());
        rows.push(
            std::iter::repeat_n(pad_id, pad)
                .chain(p.iter().copied())
                .collect(),
        );
    }

    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::default();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    let mut input = int_tensor(&rows, device);
    for _ in 0..sampling.max_new_tokens {
        let layout = AttentionLayout {
            key_mask: key_mask.clone(),
        };
        let hidden = model.forward_hidden(input, &layout, Some(&mut cache), &[]);
        let [b, s, _] = hidden.dims();
        // Only the last position is projected onto the vocabulary: a prompt's pass would
        // otherwise make a [prompt, vocabulary] tensor per row only to drop all but one.
        let logits = model.logits(hidden.narrow(1, s - 1, 1));
        let v = logits.dims()[2];
        let last = logits.reshape([b, v]);
        let next: Vec<u32> = if sampling.temperature == 0.0 {
            let ids = last
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(data_error)?;
            ids.into_iter().map(|t| t as u32).collect()
        } else {
            let probs = last
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(data_error)?;
            probs
                .chunks(v)
                .map(|row| sample(row, sampling, &mut rng))
                .collect()
        };
        let mut go_on = true;
        for (i, token) in next.iter().enumerate() {
            if !done[i] {
                outputs[i].push(*token);
                done[i] = stop_ids.contains(token);
                go_on &= on_token(i, *token);
            }
        }
        if done.iter().all(|d| *d) || !go_on {
            break;
        }
        // Finished rows keep decoding into a discarded tail; rows never attend to each other.
        for mask in key_mask.iter_mut() {
            mask.push(true);
        }
        let feed: Vec<Vec<u32>> = next.iter().map(|t| vec![*t]).collect();
        input = int_tensor(&feed, device);
    }
    Ok(outputs)
}

fn data_error(e: burn::tensor::DataError) -> Error {
    Error::Invalid(format!("reading a tensor back from the device: {e:?}"))
}

/// Temperature and nucleus (top-p) sampling from one row of logits.
fn sample(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((l - max) / sampling.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Keep the smallest prefix whose mass reaches top_p (always at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= sampling.top_p {
            break;
        }
    }
    let draw: f32 = rng.random::<f32>() * mass;
    let mut acc = 0.0;
    for p in &probs[..kept] {
        acc += p.1;
        if draw < acc {
            return p.0;
        }
    }
    probs[kept - 1].0
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub total: f32,
}

/// Refuses token ids the model has no embedding for.
fn check_vocabulary<'a>(model: &CausalLm, mut ids: impl Iterator<Item = &'a u32>) -> Result<()> {
    let vocab = model.embed_tokens.dims()[0];
    match ids.find(|t| **t as usize >= vocab) {
        Some(bad) => Err(Error::Invalid(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// The log-probabilities of every vocabulary token as the next token after `ids`.
pub fn next_token_logprobs(model: &CausalLm, ids: &[u32], device: &Device) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::Invalid(
            "next_token_logprobs needs at least one token".into(),
        ));
    }
    check_vocabulary(model, ids.iter())?;
    let layout = AttentionLayout {
        key_mask: vec![vec![true; ids.len()]],
    };
    let hidden = model.forward_hidden(int_tensor(&[ids.to_vec()], device), &layout, None, &[]);
    // Only the last position is projected onto the vocabulary.
    let logits = model.logits(hidden.narrow(1, ids.len() - 1, 1));
    log_softmax(logits, 2)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(data_error)
}

/// Log-probability of each response token given everything before it (natural log).
pub fn score(
    model: &CausalLm,
    prompt_ids: &[u32],
    response_ids: &[u32],
    device: &Device,
) -> Result<Score> {
    if prompt_ids.is_empty() || response_ids.is_empty() {
        return Err(Error::Invalid(
            "score needs a non-empty prompt and response".into(),
        ));
    }
    let ids: Vec<u32> = prompt_ids.iter().chain(response_ids).copied().collect();
    check_vocabulary(model, ids.iter())?;
    let layout = AttentionLayout {
        key_mask: vec![vec![true; ids.len()]],
    };
    let logits = model.forward(int_tensor(&[ids], device), &layout, None);
    let (p, r) = (prompt_ids.len(), response_ids.len());
    // Logits at position t predict token t + 1.
    let predicting = log_softmax(logits.narrow(1, p - 1, r), 2);
    let targets: Vec<i64> = response_ids.iter().map(|t| *t as i64).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [1, r, 1]), device);
    let logprobs: Vec<f32> = predicting
        .gather(2, targets)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(data_error)?;
    let total = logprobs.iter().sum();
    Ok(Score {
        token_ids: response_ids.to_vec(),
        logprobs,
        total,
    })
}
