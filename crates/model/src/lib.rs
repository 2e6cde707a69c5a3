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
pub mod memory;
pub mod weights;

use std::path::{Path, PathBuf};

use burn::tensor::Device;

pub use chat::{ChatTokenizer, Message};
pub use config::{Architecture, ModelConfig};
pub use decoder::CausalLm;
pub use error::{Error, Result};
pub use generate::{Sampling, Score};
pub use lora::LoraConfig;
pub use memory::{PassMemory, lora_pass_memory};

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
        let context = self.config.max_position_embeddings;
        if let Some(longest) = ids.iter().map(Vec::len).max()
            && longest.saturating_add(sampling.max_new_tokens) > context
        {
            return Err(Error::Invalid(format!(
                "a prompt of {longest} tokens and max_new_tokens {} are over this model's \
                 context of {context} tokens; shorten the prompt",
                sampling.max_new_tokens
            )));
        }
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
