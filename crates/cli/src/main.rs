//! `safeprobe`: the headless command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use safeprobe_model::device::{self, DeviceChoice};
use safeprobe_model::{Checkpoint, Sampling};

mod allocator;
mod bench;
mod checkpoints;
mod evaluate;
mod inspect;
mod progress;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "safeprobe",
    version,
    about = "Safety-aware fine-tuning of Qwen2.5, Qwen3 and Llama 3 chat models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DeviceArg {
    /// auto (wgpu on a hardware GPU, else CPU), wgpu, or cpu
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json);
    /// default: the demo model
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT LoRA adapter directory to apply
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// System prompt (default: the chat template's own)
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

/// How replies are sampled (with each command's own --max-new-tokens).
#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self, max_new_tokens: usize) -> Sampling {
        Sampling {
            max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show the wgpu adapters and which device `auto` picks
    Device(inspect::DeviceArgs),
    /// Show a checkpoint's configuration, parameter count and memory estimate
    Info(inspect::InfoArgs),
    /// Generate a reply to a prompt
    Generate(inspect::GenerateArgs),
    /// Log-probabilities of a response's tokens given a prompt
    Score(inspect::ScoreArgs),
    /// Merge an adapter into the base weights and write a Hugging Face checkpoint
    Export(checkpoints::ExportArgs),
    /// Convert a GGUF file (llama.cpp's format) into a checkpoint folder safeprobe loads
    Import(checkpoints::ImportArgs),
    /// Download a model from the Hugging Face Hub into its standard cache; afterwards
    /// `--model ORG/NAME` finds it there without the network
    Pull(checkpoints::PullArgs),
    /// Fine-tune with any method (sft, sap, mix, safegrad, lisa, sppft) from a TOML run config
    Train(train::TrainArgs),
    /// Harmful-score evaluation (refusal and/or model judge) and task metrics
    Eval(evaluate::EvalArgs),
    /// The base model and every method asked for on the same data, with paired intervals
    /// against SFT: the paper's table
    Compare(evaluate::CompareArgs),
    /// The web control panel: API, job queue and the embedded UI
    Serve(serve::ServeArgs),
    /// Runs one job of the web server in this process (the server starts it; not for direct use)
    #[command(hide = true)]
    Job(serve::JobArgs),
    /// Forward-pass and generation throughput on a small config (or --model)
    Bench(bench::BenchArgs),
    /// Walk through a checkpoint (by default the demo model): template, replies to a benign
    /// and a harmful prompt, scores, a LoRA attached; `demo build-model` rebuilds the demo model
    Demo(inspect::DemoArgs),
}

fn select_device(arg: &DeviceArg) -> Result<device::Selected> {
    let choice: DeviceChoice = arg.device.parse().map_err(anyhow::Error::msg)?;
    let selected = device::select(choice)?;
    eprintln!("device: {} — {}", selected.describe(), selected.reason);
    Ok(selected)
}

/// This program, for the server to start its jobs with. On Linux its /proc link, which still
/// runs this binary after an upgrade replaced the file (`current_exe` then names a deleted
/// path).
fn this_program() -> Result<PathBuf> {
    let link = PathBuf::from("/proc/self/exe");
    if cfg!(target_os = "linux") && link.exists() {
        return Ok(link);
    }
    std::env::current_exe().context("finding this program, which runs the server's jobs")
}

/// The model a user named, or else the demo model (unpacked only then).
fn model_or_demo(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(safeprobe_model::resolve_model_dir(&dir)?),
        None => Ok(safeprobe_eval::demo_model::dir()?),
    }
}

impl ModelArgs {
    fn model_dir(&self) -> Result<PathBuf> {
        model_or_demo(self.model.clone())
    }
}

fn load(args: &ModelArgs) -> Result<Checkpoint> {
    let dir = args.model_dir()?;
    let selected = select_device(&args.device)?;
    let mut checkpoint = Checkpoint::load(&dir, &selected.device)?;
    if let Some(adapter) = &args.adapter {
        checkpoint.load_adapter(adapter)?;
    }
    Ok(checkpoint)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Device(args) => args.run(),
        Command::Info(args) => args.run(),
        Command::Generate(args) => args.run(),
        Command::Score(args) => args.run(),
        Command::Export(args) => args.run(),
        Command::Import(args) => args.run(),
        Command::Pull(args) => args.run(),
        Command::Train(args) => args.run(),
        Command::Eval(args) => evaluate::eval(args),
        Command::Compare(args) => evaluate::compare(args, select_device),
        Command::Serve(args) => args.run(),
        Command::Job(args) => args.run(),
        Command::Bench(args) => bench::run(args, select_device),
        Command::Demo(args) => args.run(),
    }
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    // Mesa's Vulkan drivers print an error on every start when XDG_RUNTIME_DIR is unset
    // (containers, CI); any private writable folder silences it.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("safeprobe-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            // SAFETY: still single-threaded; nothing has read the environment yet.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
