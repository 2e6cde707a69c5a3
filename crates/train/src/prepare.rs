//! What a run is made of before its first step: the model with its adapter, and the data,
//! encoded, split and poisoned as the config says.

use std::path::Path;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use safeprobe_model::{Checkpoint, LoraConfig, lora};

use crate::config::{Finetune, RunConfig};
use crate::data::{self, Sequence, with_system};
use crate::error::{Result, TrainError};
use crate::params;
use crate::safety_check::SafetyCheck;

/// The model and data of a run, ready for its first step.
pub struct Prepared {
    pub checkpoint: Checkpoint,
    /// The adapter's settings (None: full fine-tuning).
    pub lora: Option<LoraConfig>,
    /// The device the run trains on (with autodiff).
    pub device: Device,
    pub train: Vec<Sequence>,
    pub pairs: Vec<(Sequence, Sequence)>,
    pub validation: Option<Vec<Sequence>>,
    pub safety_check: Option<SafetyCheck>,
    /// The config with `max_steps` resolved from `epochs`.
    pub config: RunConfig,
}

impl Prepared {
    pub fn load(config: &RunConfig, device: &Device) -> Result<Self> {
        // Checked from config.json alone, before the weights are loaded.
        let model_config =
            safeprobe_model::ModelConfig::from_file(&config.model.join("config.json"))?;
        config.check_layers(model_config.num_hidden_layers)?;
        // The data too: an empty or malformed file fails before the weights load.
        let raw_train = data::read_examples(&config.train_data)?;
        let raw_pairs = match &config.safety_data {
            Some(path) => data::read_pairs(path)?,
            None => Vec::new(),
        };
        let raw_validation = match &config.validation_data {
            Some(path) => Some(data::read_examples(path)?),
            None => None,
        };
        let device = params::training_device(device, config.gradient_checkpointing);
        let (checkpoint, lora) = load_model(config, &device)?;

        let mut train = encode_all(&checkpoint, &raw_train, config, &config.train_data)?;
        let pairs = match &config.safety_data {
            Some(path) => encode_pairs(&checkpoint, &raw_pairs, config, path)?,
            None => Vec::new(),
        };
        if config.mixes_safety_data() {
            train.extend(pairs.iter().map(|(safe, _)| safe.clone()));
        }
        let validation = match (&config.validation_data, raw_validation) {
            (Some(path), Some(raw)) => Some(encode_all(&checkpoint, &raw, config, path)?),
            _ => match config.validation_fraction {
                Some(fraction) => Some(hold_out(&mut train, fraction, config)?),
                None => None,
            },
        };
        if train.is_empty() {
            return Err(TrainError::Config("no training examples".into()));
        }
        let safety_check = SafetyCheck::prepare(&checkpoint, config)?;
        if config.poison_fraction > 0.0 {
            // Poison only the part trained on; validation stays clean.
            let (path, source) = match &config.poison_data {
                Some(path) => (path.clone(), data::read_pairs(path)?),
                None => (config.safety_data.clone().expect("validated"), raw_pairs),
            };
            let poison = data::poison(train.len(), &source, config.poison_fraction, config.seed)?;
            train.extend(encode_all(&checkpoint, &poison, config, &path)?);
        }
        let mut config = config.clone();
        config.max_steps = config.steps_for(train.len());
        Ok(Self {
            checkpoint,
            lora,
            device,
            train,
            pairs,
            validation,
            safety_check,
            config,
        })
    }
}

/// The model, its base frozen and an adapter attached for LoRA (fresh, or the config's
/// `init_adapter`), every weight trainable for full fine-tuning.
fn load_model(config: &RunConfig, device: &Device) -> Result<(Checkpoint, Option<LoraConfig>)> {
    let mut checkpoint = Checkpoint::load(&config.model, device)?;
    let lora = match config.finetune {
        Finetune::Full => None,
        Finetune::Lora => {
            checkpoint.model = burn::module::Module::no_grad(checkpoint.model);
            Some(match &config.init_adapter {
                Some(dir) => lora::load_peft(&mut checkpoint.model, dir, device)?,
                None => {
                    lora::attach(&mut checkpoint.model, &config.lora, config.seed, device)?;
                    config.lora.clone()
                }
            })
        }
    };
    Ok((checkpoint, lora))
}

/// Moves a seeded `fraction` of `train` out, as the validation set (a split independent of
/// the shuffling's seed stream).
fn hold_out(train: &mut Vec<Sequence>, fraction: f64, config: &RunConfig) -> Result<Vec<Sequence>> {
    if train.len() < 2 {
        return Err(TrainError::Config(format!(
            "validation_fraction needs at least 2 training examples, {} has {}",
            config.train_data.display(),
            train.len()
        )));
    }
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed ^ 0x5eed));
    let held = ((train.len() as f64 * fraction).round() as usize).clamp(1, train.len() - 1);
    let mut held_out = vec![false; train.len()];
    order[..held].iter().for_each(|i| held_out[*i] = true);
    let (validation, kept): (Vec<_>, Vec<_>) = std::mem::take(train)
        .into_iter()
        .zip(held_out)
        .partition(|(_, held)| *held);
    *train = kept.into_iter().map(|(s, _)| s).collect();
    Ok(validation.into_iter().map(|(s, _)| s).collect())
}

/// Cycles through examples in epochs, reshuffling each epoch with the run's seed.
pub struct Sampler<T> {
    items: Vec<T>,
    cursor: Cursor,
}

/// Where a sampler is in its epochs: what `next_batch` advances and `peek_batch` copies.
#[derive(Clone)]
struct Cursor {
    order: Vec<usize>,
    position: usize,
    rng: rand::rngs::StdRng,
    shuffle: bool,
}

impl Cursor {
    fn reshuffle(&mut self) {
        if self.shuffle {
            self.order.shuffle(&mut self.rng);
        }
    }

    fn next_index(&mut self) -> usize {
        if self.position == self.order.len() {
            self.position = 0;
            self.reshuffle();
        }
        self.position += 1;
        self.order[self.position - 1]
    }
}

impl<T: Clone> Sampler<T> {
    pub fn new(items: Vec<T>, seed: u64, shuffle: bool) -> Self {
        let mut cursor = Cursor {
            order: (0..items.len()).collect(),
            position: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            shuffle,
        };
        cursor.reshuffle();
        Self { items, cursor }
    }

    pub fn next_batch(&mut self, size: usize) -> Vec<T> {
        (0..size)
            .map(|_| self.items[self.cursor.next_index()].clone())
            .collect()
    }

    /// The batch `next_batch` would return, leaving the sampler where it is.
    pub fn peek_batch(&self, size: usize) -> Vec<T> {
        let mut cursor = self.cursor.clone();
        (0..size)
            .map(|_| self.items[cursor.next_index()].clone())
            .collect()
    }
}

fn encode_all(
    checkpoint: &Checkpoint,
    examples: &[data::Example],
    config: &RunConfig,
    path: &Path,
) -> Result<Vec<Sequence>> {
    let mut out = Vec::new();
    for example in examples {
        let prompt = with_system(&example.prompt, config.system.as_deref());
        let sequence = Sequence::encode(
            &checkpoint.tokenizer,
            &prompt,
            &example.response,
            config.max_len,
        )
        .map_err(|e| TrainError::Data {
            path: path.into(),
            line: example.line,
            message: e.to_string(),
        })?;
        if sequence.response_tokens() == 0 {
            return Err(TrainError::Data {
                path: path.into(),
                line: example.line,
                message: format!(
                    "the prompt alone fills max_len = {}; no response token is left to train on",
                    config.max_len
                ),
            });
        }
        out.push(sequence);
    }
    Ok(out)
}

/// Safety pairs as (safe, harmful) sequences sharing a prompt.
pub(crate) fn encode_pairs(
    checkpoint: &Checkpoint,
    pairs: &[data::SafetyPair],
    config: &RunConfig,
    path: &Path,
) -> Result<Vec<(Sequence, Sequence)>> {
    pairs
        .iter()
        .map(|p| {
            p.encode(
                &checkpoint.tokenizer,
                config.system.as_deref(),
                config.max_len,
            )
            .map_err(|e| TrainError::Data {
                path: path.into(),
                line: p.line,
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Sampler;

    /// A peek is the next draw, across an epoch's reshuffle too, and leaves the sampler as it
    /// was (Lisa's alignment steps look at the task data without skipping any).
    #[test]
    fn a_peek_is_the_next_draw_and_draws_nothing() {
        let mut sampler = Sampler::new((0..5).collect::<Vec<u32>>(), 7, true);
        let mut twin = Sampler::new((0..5).collect::<Vec<u32>>(), 7, true);
        for size in [3, 4, 2, 6] {
            let peeked = sampler.peek_batch(size);
            assert_eq!(peeked, sampler.peek_batch(size));
            assert_eq!(peeked, sampler.next_batch(size));
            assert_eq!(peeked, twin.next_batch(size));
        }
    }
}
