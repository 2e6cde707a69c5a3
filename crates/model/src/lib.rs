//! safeprobe's model crate: Qwen2/Qwen2.5, Qwen3 and Llama 3.x on burn (wgpu or CPU), Hugging Face checkpoints,
//! tokenizer and chat template, generation and scoring, LoRA adapters in PEFT format.

pub mod chat;
pub mod config;
pub mod decoder;
pub mod device;
pub mod error;
pub mod export;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod import;
pub mod lora;
pub mod weights;

use std::path::{Path, PathBuf};

use burn::tensor::Device;

pub use chat::{ChatTokenizer, Message};
pub use config::{Architecture, ModelConfig};
pub use decoder::CausalLm;
pub use error::{Error, Result};
pub use generate::{Sampling, Score};
pub use lora::LoraConfig;

/// A checkpoint directory loaded onto a device: config, weights, tokenizer.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: CausalLm,
    pub tokenizer: ChatTokenizer,
    pub device: Device,
    /// The adapter currently attached, if any.
    pub adapter: Option<LoraConfig>,
}

impl Checkpoint {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = &resolve_model_dir(dir)?;
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "--model {}: not a directory",
                dir.display()
            )));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = ChatTokenizer::load(dir, &config.eos_token_ids)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::config(
                dir.join("config.json"),
                format!(
                    "vocab_size {} is smaller than the tokenizer's {} tokens",
                    config.vocab_size,
                    tokenizer.vocab_size()
                ),
            ));
        }
        let files = weights::SafetensorsFiles::open_checkpoint(dir)?;
        let model = CausalLm::load(&config, &files, device)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            tokenizer,
            device: device.clone(),
            adapter: None,
        })
    }

    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        self.adapter = Some(lora::load_peft(&mut self.model, dir, &self.device)?);
        Ok(())
    }

    /// Generates a reply to one prompt; returns (text, token ids).
    pub fn generate(
        &self,
        messages: &[Message],
        sampling: &Sampling,
    ) -> Result<(String, Vec<u32>)> {
        let mut out = self.generate_batch(&[messages.to_vec()], sampling)?;
        Ok(out.remove(0))
    }

    /// Generates replies to several prompts at once (left-padded batch).
    pub fn generate_batch(
        &self,
        prompts: &[Vec<Message>],
        sampling: &Sampling,
    ) -> Result<Vec<(String, Vec<u32>)>> {
        let ids = prompts
            .iter()
            .map(|m| self.tokenizer.encode_prompt(m))
            .collect::<Result<Vec<_>>>()?;
        let outputs = generate::generate(
            &self.model,
            &ids,
            sampling,
            &self.tokenizer.stop_ids,
            self.tokenizer.pad_id,
            &self.device,
        )?;
        outputs
            .into_iter()
            .map(|tokens| Ok((self.tokenizer.decode(&tokens, true)?, tokens)))
            .collect()
    }

    pub fn score(&self, prompt: &[Message], response: &str) -> Result<Score> {
        let (prompt_ids, response_ids) = self.tokenizer.encode_exchange(prompt, response)?;
        generate::score(&self.model, &prompt_ids, &response_ids, &self.device)
    }
}

/// A checkpoint folder, or a Hub id (`ORG/NAME`) already in the Hugging Face cache. Any other
/// path comes back as it is, for the load to name what is missing in it.
pub fn resolve_model_dir(model: &Path) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let name = model.to_string_lossy();
    if hub::is_repo_id(&name) {
        let options = hub::HubOptions::default();
        return hub::cached(&name, &options.revision, &options.cache_dir).ok_or_else(|| {
            Error::Invalid(format!(
                "--model {name}: not a folder here, and not in the Hugging Face cache ({}); `safeprobe pull {name}` downloads it",
                options.cache_dir.display()
            ))
        });
    }
    // Loading names the file it cannot read (config.json) and the OS's reason.
    Ok(model.to_path_buf())
}

/// Parameter count and the memory its f32 weights take.
pub fn size_report(config: &ModelConfig) -> (usize, u64) {
    let params = decoder::parameter_count(config);
    (params, params as u64 * 4)
}

/// The peak memory of one LoRA training pass, estimated from the shapes alone (f32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PassMemory {
    pub weights: u64,
    /// Tensors the forward pass keeps for the backward pass.
    pub activations: u64,
    /// The output projection at the scored positions: logits, log-softmax and their gradient.
    pub logits: u64,
}

impl PassMemory {
    pub fn total(&self) -> u64 {
        self.weights + self.activations + self.logits
    }
}

/// Estimated peak of a LoRA pass over `rows` sequences of `seq_len` tokens, all of them
/// scored (an upper bound: prompts are not), counting what the autodiff graph keeps for the
/// backward pass per token and layer: 5 hidden-sized tensors (each RMSNorm's input and
/// normalised output, the residual stream), 4 of the query width (the rotated queries, keys
/// and values repeated for grouped attention, the attention output), 4 of the MLP width (gate,
/// SiLU, up, their product), and one row of `heads × seq_len` attention probabilities.
/// Products with constants (rotary tables, masks, scales) keep nothing. The vocabulary
/// projection adds three [tokens, vocab] tensors (logits, log-softmax, their gradient). SFT
/// makes one such pass; a SAP step's largest is the safety pass, whose rows are the chosen and
/// the rejected answers.
///
/// `fused`: the CPU backend's fused operations (`fused/`), which keep 2 of the MLP width (gate
/// and up) and 2 [tokens, vocab] tensors (logits and their gradient) instead.
pub fn lora_pass_memory(
    config: &ModelConfig,
    rows: usize,
    seq_len: usize,
    fused: bool,
) -> PassMemory {
    let (mlp_kept, vocab_kept) = if fused { (2, 2) } else { (4, 3) };
    let tokens = (rows * seq_len) as u64;
    let per_token_layer = 5 * config.hidden_size
        + 4 * config.q_width()
        + mlp_kept * config.intermediate_size
        + config.num_attention_heads * seq_len;
    PassMemory {
        weights: size_report(config).1,
        activations: 4 * tokens * (per_token_layer * config.num_hidden_layers) as u64,
        logits: 4 * tokens * vocab_kept * config.vocab_size as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented count on a small Qwen2 shape (hidden 256 = 4 heads × 64, MLP 704,
    /// 4 layers, vocab 4096), 2 rows of 8 tokens, by hand: per token and layer 5·256 + 4·256
    /// + {4, 2}·704 + 4·8 values; {3, 2} [16, 4096] logits tensors.
    #[test]
    fn the_pass_estimate_counts_what_each_backends_operations_keep() {
        let config = ModelConfig::qwen2(4096, 256, 704, 4, 4, 2, 4096, 1e6, vec![]);
        let composed = lora_pass_memory(&config, 2, 8, false);
        assert_eq!(composed.activations, 4 * 16 * 5152 * 4);
        assert_eq!(composed.logits, 4 * 16 * 3 * 4096);
        let fused = lora_pass_memory(&config, 2, 8, true);
        assert_eq!(fused.activations, 4 * 16 * 3744 * 4);
        assert_eq!(fused.logits, 4 * 16 * 2 * 4096);
        assert_eq!(fused.weights, composed.weights);
    }
}
