//! Checkpoints in and out: merging an adapter for export, importing GGUF, pulling from the
//! Hub.

use std::path::PathBuf;

use anyhow::{Context, Result};
use safeprobe_model::export;
use safeprobe_model::weights::SaveDtype;

use crate::{DeviceArg, select_device};

#[derive(clap::Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter to merge in (without one, the model is re-exported, e.g. as bf16)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// bf16 or f32
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl ExportArgs {
    /// Writes the merged checkpoint.
    pub fn run(self) -> Result<()> {
        let ExportArgs {
            model,
            adapter,
            out,
            dtype,
            device,
        } = self;
        let dtype = SaveDtype::parse(&dtype)?;
        let selected = select_device(&device)?;
        export::merge_and_export(&model, adapter.as_deref(), &out, dtype, &selected.device)
            .with_context(|| format!("exporting to {}", out.display()))?;
        eprintln!("wrote {}", out.display());
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The .gguf file (qwen2 architecture; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q4_K and Q6_K tensors)
    pub file: PathBuf,
    /// A new (or empty) folder for config.json, model.safetensors and the tokenizer
    #[arg(long)]
    pub out: PathBuf,
    /// bf16 or f32
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

impl ImportArgs {
    /// Writes the checkpoint folder.
    pub fn run(self) -> Result<()> {
        let ImportArgs { file, out, dtype } = self;
        let dtype = SaveDtype::parse(&dtype)?;
        let report = safeprobe_model::import::import_gguf(&file, &out, dtype)?;
        let types: Vec<String> = report
            .tensor_types
            .iter()
            .map(|(name, n)| format!("{n} {name}"))
            .collect();
        let config = &report.config;
        eprintln!(
            "imported {} ({} layers, hidden {}, vocab {}; tensors: {}; {} tokens{})",
            report.name.as_deref().unwrap_or("model"),
            config.num_hidden_layers,
            config.hidden_size,
            config.vocab_size,
            types.join(", "),
            report.vocab_tokens,
            if report.has_chat_template {
                ", chat template"
            } else {
                ", no chat template: ChatML will be assumed"
            },
        );
        eprintln!("wrote {}", report.out_dir.display());
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// ORG/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct
    pub repo: String,
    /// A branch, tag or commit
    #[arg(long, default_value = "main")]
    pub revision: String,
}

impl PullArgs {
    /// Downloads into the Hub cache and prints the folder.
    pub fn run(self) -> Result<()> {
        let PullArgs { repo, revision } = self;
        let options = safeprobe_model::hub::HubOptions {
            revision,
            ..Default::default()
        };
        let dir = safeprobe_model::hub::pull(&repo, &options, None)?;
        eprintln!("{repo}@{}: ready", options.revision);
        println!("{}", dir.display());
        Ok(())
    }
}
