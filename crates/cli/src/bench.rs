//! `safeprobe bench`: forward-pass and generation throughput, and (`--train`) training-step
//! time of SFT against SAP. `bench/side_by_side.py` runs it beside PyTorch + peft.
//!
//! Runs on a small random Qwen2-shaped model (no download needed) or on `--model DIR`. Each measurement
//! reads its result back from the device, so queued GPU work is included in the time.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};
use safeprobe_model::decoder::{AttentionLayout, CausalLm};
use safeprobe_model::device::Selected;
use safeprobe_model::generate::{Sampling, generate};
use safeprobe_model::{Checkpoint, ModelConfig};
use serde_json::json;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Benchmark this checkpoint instead of the built-in small config
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Devices to compare: any of cpu, wgpu, auto (comma-separated)
    #[arg(long, default_value = "cpu,wgpu", value_delimiter = ',')]
    devices: Vec<String>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed repetitions after one warm-up
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long)]
    json: bool,
    /// Benchmark training steps (SFT against SAP) instead of inference
    #[arg(long)]
    train: bool,
    /// With --train: safety pairs per step (default: --batch)
    #[arg(long)]
    safety_batch: Option<usize>,
    /// With --train: which of sft, lagged-1, lagged-4, exact-1, exact-4 to time (default: all)
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// With --train: gradient checkpointing (recompute memory-bound activations in backward)
    #[arg(long)]
    gradient_checkpointing: bool,
}

impl BenchArgs {
    fn safety_pairs(&self) -> usize {
        self.safety_batch.unwrap_or(self.batch)
    }
}

/// The built-in benchmark config: Qwen2.5's shape ratios at a size a laptop CPU runs quickly.
fn small_config() -> ModelConfig {
    ModelConfig::qwen2(4096, 256, 704, 4, 4, 2, 4096, 1e6, vec![])
}

pub fn run(args: BenchArgs, select: impl Fn(&crate::DeviceArg) -> Result<Selected>) -> Result<()> {
    if args.train {
        return run_train(&args, select);
    }
    let mut results = Vec::new();
    for name in &args.devices {
        let selected = select(&crate::DeviceArg {
            device: name.clone(),
        })?;
        let device = selected.device.clone();
        let loaded = Instant::now();
        let (model, label) = match &args.model {
            Some(dir) => (
                Checkpoint::load(dir, &device)?.model,
                dir.display().to_string(),
            ),
            None => (
                CausalLm::random(&small_config(), &device),
                "built-in small config (4 layers, hidden 256, vocab 4096)".into(),
            ),
        };
        let load_s = loaded.elapsed().as_secs_f64();
        let vocab = model.embed_tokens.dims()[0];
        let ids: Vec<i64> = (0..args.batch * args.seq_len)
            .map(|i| ((i * 7919) % vocab) as i64)
            .collect();
        let layout = AttentionLayout {
            key_mask: vec![vec![true; args.seq_len]; args.batch],
        };
        let forward = || {
            let input = Tensor::<2, Int>::from_data(
                TensorData::new(ids.clone(), [args.batch, args.seq_len]),
                &device,
            );
            let logits = model.forward(input, &layout, None);
            // Reading one value forces the queued work to finish.
            let _ = logits.narrow(1, args.seq_len - 1, 1).sum().into_data();
        };
        forward();
        let start = Instant::now();
        for _ in 0..args.iters {
            forward();
        }
        let forward_s = start.elapsed().as_secs_f64() / args.iters as f64;
        let forward_tps = (args.batch * args.seq_len) as f64 / forward_s;

        let prompts: Vec<Vec<u32>> = (0..args.batch)
            .map(|b| {
                (0..16)
                    .map(|i| ((b * 31 + i * 17) % vocab) as u32)
                    .collect()
            })
            .collect();
        let sampling = Sampling {
            max_new_tokens: args.new_tokens,
            ..Sampling::default()
        };
        generate(
            &model,
            &prompts,
            &Sampling {
                max_new_tokens: 2,
                ..sampling
            },
            &[],
            0,
            &device,
        )?;
        let start = Instant::now();
        for _ in 0..args.iters {
            generate(&model, &prompts, &sampling, &[], 0, &device)?;
        }
        let gen_s = start.elapsed().as_secs_f64() / args.iters as f64;
        let gen_tps = (args.batch * args.new_tokens) as f64 / gen_s;
        if !args.json {
            println!(
                "{} | {label} (loaded in {load_s:.1} s)",
                selected.describe()
            );
            println!(
                "  forward  batch {} × {} tokens: {:.1} ms, {:.0} tokens/s",
                args.batch,
                args.seq_len,
                forward_s * 1e3,
                forward_tps
            );
            println!(
                "  generate batch {} × {} new tokens: {:.1} ms, {:.1} tokens/s",
                args.batch,
                args.new_tokens,
                gen_s * 1e3,
                gen_tps
            );
        }
        results.push(json!({
            "device": selected.describe(), "model": label, "load_s": load_s, "batch": args.batch, "seq_len": args.seq_len,
            "forward_ms": forward_s * 1e3, "forward_tokens_per_s": forward_tps,
            "new_tokens": args.new_tokens, "generate_ms": gen_s * 1e3, "generate_tokens_per_s": gen_tps,
        }));
    }
    if args.json {
        println!("{}", serde_json::Value::from(results));
    }
    Ok(())
}

/// The training variants `bench --train` times, by the names `--variants` takes.
const TRAIN_VARIANTS: [&str; 5] = ["sft", "lagged-1", "lagged-4", "exact-1", "exact-4"];

/// Time per training step of SFT and SAP (both schedules, harmful direction refreshed every
/// step and every 4 steps), LoRA r = 8 (α = 16, no dropout) on q_proj and v_proj, the probe on
/// the middle ten layers, on the built-in small config or `--model`, with the SAP/SFT ratio.
///
/// The data are deterministic token ids (the first quarter of each sequence is the prompt),
/// so `bench/side_by_side.py` can feed PyTorch exactly the same batches.
pub fn run_train(
    args: &BenchArgs,
    select: impl Fn(&crate::DeviceArg) -> Result<Selected>,
) -> Result<()> {
    use safeprobe_train::adamw::{AdamW, AdamWConfig};
    use safeprobe_train::methods::sft::sft_step;
    use safeprobe_train::sap::{SapConfig, SapState, Schedule};

    for variant in &args.variants {
        anyhow::ensure!(
            TRAIN_VARIANTS.contains(&variant.as_str()),
            "--variants: unknown variant \"{variant}\" (known: {})",
            TRAIN_VARIANTS.join(", ")
        );
    }
    let mut results = Vec::new();
    for name in &args.devices {
        let selected = select(&crate::DeviceArg {
            device: name.clone(),
        })?;
        let device =
            safeprobe_train::params::training_device(&selected.device, args.gradient_checkpointing);
        let loaded = Instant::now();
        let (mut base, label) = match &args.model {
            Some(dir) => (
                Checkpoint::load(dir, &device)?.model,
                dir.display().to_string(),
            ),
            None => (
                CausalLm::random(&small_config(), &device),
                "built-in small config".into(),
            ),
        };
        let load_s = loaded.elapsed().as_secs_f64();
        base = burn::module::Module::no_grad(base);
        let lora = safeprobe_model::LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
        };
        safeprobe_model::lora::attach(&mut base, &lora, 0, &device)?;
        let (task, safety) = bench_batches(args, base.embed_tokens.dims()[0], &device);
        let tokens = (args.batch * args.seq_len) as f64;
        println!(
            "{} | {label} (loaded in {load_s:.1} s), LoRA r=8 q/v, batch {} + {} safety pairs × {} tokens",
            selected.describe(),
            args.batch,
            args.safety_pairs(),
            args.seq_len
        );
        let mut sft_time = None;
        for variant in TRAIN_VARIANTS {
            if !args.variants.is_empty() && !args.variants.iter().any(|v| v == variant) {
                continue;
            }
            let sap = match variant.split_once('-') {
                Some(("lagged", k)) => Some((Schedule::Lagged, k.parse::<usize>()?)),
                Some(("exact", k)) => Some((Schedule::Exact, k.parse::<usize>()?)),
                _ => None,
            };
            let mut model = base.clone();
            let mut optimizer = AdamW::new(AdamWConfig::default());
            let mut sap_state = sap.map(|(schedule, k)| {
                let config = SapConfig {
                    schedule,
                    refresh_every: k,
                    rho: 1e-3,
                    // No alignment measurement: its extra passes run on measurement steps only.
                    cosine_every: 0,
                    ..Default::default()
                };
                SapState::new(config, &model, &device)
            });
            let mut step = |model: &mut CausalLm| match &mut sap_state {
                None => sft_step(
                    model,
                    &mut optimizer,
                    std::slice::from_ref(&task),
                    1e-4,
                    None,
                    None,
                ),
                Some(state) => state.sap_step(
                    model,
                    &mut optimizer,
                    std::slice::from_ref(&task),
                    &safety,
                    1e-4,
                    None,
                ),
            };
            step(&mut model);
            // Whole refresh cycles (k = 4: the refreshing step and the three that reuse it).
            let k = sap.map_or(1, |(_, k)| k);
            let iters = args.iters.max(1).div_ceil(k) * k;
            let start = Instant::now();
            for _ in 0..iters {
                step(&mut model);
            }
            let per_step = start.elapsed().as_secs_f64() / iters as f64;
            let ratio = match (variant, sft_time) {
                ("sft", _) => {
                    sft_time = Some(per_step);
                    Some(1.0)
                }
                (_, Some(sft)) => Some(per_step / sft),
                (_, None) => None,
            };
            println!(
                "  {variant:<9} {:>9.1} ms/step {:>9.0} tokens/s{}",
                per_step * 1e3,
                tokens / per_step,
                ratio.map_or(String::new(), |r| format!("  {r:.2}× SFT"))
            );
            results.push(json!({"device": selected.describe(), "model": label, "variant": variant,
                                "batch": args.batch, "safety_pairs": args.safety_pairs(), "seq_len": args.seq_len,
                                "steps_timed": iters, "load_s": load_s, "ms_per_step": per_step * 1e3,
                                "tokens_per_s": tokens / per_step, "ratio_to_sft": ratio}));
        }
    }
    if args.json {
        println!("{}", serde_json::Value::from(results));
    }
    Ok(())
}

/// The task batch and the safety batch (chosen rows, then rejected rows) of `bench --train`:
/// token ids `(seed · 7919 + i · 104729) mod vocab`, the first quarter being the prompt.
fn bench_batches(
    args: &BenchArgs,
    vocab: usize,
    device: &burn::tensor::Device,
) -> (safeprobe_train::data::Batch, safeprobe_train::data::Batch) {
    use safeprobe_train::data::{Batch, Sequence};
    let sequence = |seed: usize| Sequence {
        ids: (0..args.seq_len)
            .map(|i| ((seed * 7919 + i * 104729) % vocab) as u32)
            .collect(),
        prompt_len: args.seq_len / 4,
    };
    let rows = |seeds: std::ops::Range<usize>| seeds.map(sequence).collect::<Vec<_>>();
    let pairs = args.safety_pairs();
    (
        Batch::new(&rows(0..args.batch), 0, device),
        Batch::new(&rows(100..100 + 2 * pairs), 0, device),
    )
}
