//! What a pass over a model will allocate, estimated from the shapes alone, before anything is
//! allocated: `info` prints it, and the server and the CLI refuse a request whose estimate
//! cannot fit (a LoRA rank of 10⁹ or a batch of 10⁶ rows would otherwise abort the process).
//! Every product saturates, so absurd sizes give an absurd estimate, never an overflow.

use crate::config::ModelConfig;
use crate::decoder::{PROJECTIONS, parameter_count, projection_shape};
use crate::lora::LoraConfig;

/// `factors` multiplied, saturating at `u64::MAX`.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

const F32: u64 = 4;

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
        self.weights
            .saturating_add(self.activations)
            .saturating_add(self.logits)
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
    let tokens = product(&[rows as u64, seq_len as u64]);
    let per_token_layer = (5 * config.hidden_size + 4 * config.q_width()) as u64
        + mlp_kept * config.intermediate_size as u64
        + product(&[config.num_attention_heads as u64, seq_len as u64]);
    PassMemory {
        weights: parameter_count(config) as u64 * F32,
        activations: product(&[
            F32,
            tokens,
            per_token_layer,
            config.num_hidden_layers as u64,
        ]),
        logits: product(&[F32, tokens, vocab_kept, config.vocab_size as u64]),
    }
}

/// The parameters LoRA branches of `lora`'s rank add to `config`'s target projections: each
/// adds A [r, in] and B [out, r] per layer.
pub fn lora_parameters(config: &ModelConfig, lora: &LoraConfig) -> u64 {
    let per_layer = PROJECTIONS
        .iter()
        .filter(|p| lora.target_modules.iter().any(|t| t == *p))
        .map(|p| {
            let [input, output] = projection_shape(config, p);
            product(&[lora.r as u64, (input + output) as u64])
        })
        .fold(0u64, u64::saturating_add);
    product(&[per_layer, config.num_hidden_layers as u64])
}

/// One named part of an estimate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Part {
    pub name: &'static str,
    pub bytes: u64,
}

/// A peak-memory estimate in named parts, and the settings that drive it (named as a request
/// names them), for a refusal that says what to change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub parts: Vec<Part>,
    pub drivers: Vec<String>,
}

/// What a process holds besides its tensors (the binary, the tokenizer, allocator slack),
/// measured at about 200 MiB for the demo model's jobs; rounded up.
pub const RUNTIME_BYTES: u64 = 256 << 20;

impl Estimate {
    pub fn total(&self) -> u64 {
        self.parts
            .iter()
            .fold(RUNTIME_BYTES, |sum, p| sum.saturating_add(p.bytes))
    }

    /// "9.1 GiB (weights 1.8 GiB, activations 6.2 GiB, ...)".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| format!("{} {}", p.name, human(p.bytes)))
            .collect();
        format!("{} ({})", human(self.total()), parts.join(", "))
    }
}

/// Bytes in MiB, GiB or TiB with one decimal.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match b {
        _ if b >= (1u64 << 40) as f64 => format!("{:.1} TiB", b / (1u64 << 40) as f64),
        _ if b >= (1u64 << 30) as f64 => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        _ => format!("{:.1} MiB", b / (1u64 << 20) as f64),
    }
}

/// A training run's peak: the base weights, the trainable state beyond them (`trainable_state`
/// f32 values: for LoRA its parameters, their gradient and AdamW's two moments, 4 × the LoRA
/// parameters; for full fine-tuning the weights' gradient and two moments, 3 × the model), and
/// the largest pass (`rows` sequences of `seq_len`).
pub fn training_memory(
    config: &ModelConfig,
    trainable_state: u64,
    rows: usize,
    seq_len: usize,
    fused: bool,
) -> Estimate {
    let pass = lora_pass_memory(config, rows, seq_len, fused);
    Estimate {
        parts: vec![
            Part {
                name: "weights",
                bytes: pass.weights,
            },
            Part {
                name: "trainable parameters, gradients and optimiser state",
                bytes: product(&[F32, trainable_state]),
            },
            Part {
                name: "activations",
                bytes: pass.activations,
            },
            Part {
                name: "logits",
                bytes: pass.logits,
            },
        ],
        drivers: Vec::new(),
    }
}

/// Generating `new_tokens` after prompts of `prompt_tokens` for `rows` prompts at once: the
/// weights, the key/value cache, the prompt pass's attention scores (heads × prompt², which
/// grows fastest with a long prompt), its MLP activations, and one row of logits per prompt
/// (generation projects only the last position onto the vocabulary).
pub fn generation_memory(
    config: &ModelConfig,
    rows: usize,
    prompt_tokens: usize,
    new_tokens: usize,
) -> Estimate {
    let (rows, prompt, length) = (
        rows as u64,
        prompt_tokens as u64,
        prompt_tokens.saturating_add(new_tokens) as u64,
    );
    Estimate {
        parts: vec![
            Part {
                name: "weights",
                bytes: parameter_count(config) as u64 * F32,
            },
            Part {
                name: "key/value cache",
                bytes: product(&[
                    F32,
                    2,
                    config.num_hidden_layers as u64,
                    rows,
                    length,
                    config.kv_width() as u64,
                ]),
            },
            Part {
                // Scores and their softmax, one layer at a time.
                name: "attention scores",
                bytes: product(&[
                    F32,
                    2,
                    rows,
                    config.num_attention_heads as u64,
                    prompt,
                    prompt,
                ]),
            },
            Part {
                // gate, up and their product, one layer at a time.
                name: "activations",
                bytes: product(&[F32, 3, rows, prompt, config.intermediate_size as u64]),
            },
            Part {
                name: "logits",
                bytes: product(&[F32, rows, config.vocab_size as u64]),
            },
        ],
        drivers: Vec::new(),
    }
}

/// Memory this machine has: (total, available now), from /proc/meminfo where there is one.
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
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

    /// LoRA on q_proj and v_proj of the same shape (q 256 → 256, v 256 → 128 with 2 of 4
    /// heads for keys and values), r = 8, by hand: 8·(256+256) + 8·(256+128) per layer.
    #[test]
    fn lora_parameters_count_a_and_b_of_each_target() {
        let config = ModelConfig::qwen2(4096, 256, 704, 4, 4, 2, 4096, 1e6, vec![]);
        let lora = LoraConfig {
            r: 8,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..LoraConfig::default()
        };
        assert_eq!(lora_parameters(&config, &lora), 4 * (8 * 512 + 8 * 384));
    }

    /// The sizes that aborted the server (issue: r = 10⁹, a batch of 10⁶ rows) give estimates
    /// far over any machine, not an overflow.
    #[test]
    fn absurd_sizes_saturate_instead_of_overflowing() {
        let config = ModelConfig::qwen2(151_936, 896, 4864, 24, 14, 2, 32768, 1e6, vec![]);
        let lora = LoraConfig {
            r: 1_000_000_000,
            ..LoraConfig::default()
        };
        let state = 4 * lora_parameters(&config, &lora);
        assert!(training_memory(&config, state, 4, 128, true).total() > 1 << 40);
        let huge = training_memory(&config, 0, 1_000_000, 128, true).total();
        assert!(huge > 1 << 40, "{huge}");
        let max = training_memory(&config, u64::MAX, usize::MAX, usize::MAX, false).total();
        assert_eq!(max, u64::MAX);
        let chat = generation_memory(&config, 1, 200_000, 128);
        assert!(chat.total() > 100 << 30, "{}", chat.describe());
    }
}
