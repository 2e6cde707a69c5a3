//! `safeprobe bench`: forward-pass and generation throughput.
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
            println!("{} | {label}", selected.describe());
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
            "device": selected.describe(), "model": label, "batch": args.batch, "seq_len": args.seq_len,
            "forward_ms": forward_s * 1e3, "forward_tokens_per_s": forward_tps,
            "new_tokens": args.new_tokens, "generate_ms": gen_s * 1e3, "generate_tokens_per_s": gen_tps,
        }));
    }
    if args.json {
        println!("{}", serde_json::Value::from(results));
    }
    Ok(())
}

/// Time per training step of SFT and SAP (both schedules, direction refreshed every step
/// and every 4 steps) on the built-in small config with LoRA, and the SAP/SFT ratio.
pub fn run_train(
    args: &BenchArgs,
    select: impl Fn(&crate::DeviceArg) -> Result<Selected>,
) -> Result<()> {
    use safeprobe_train::adamw::{AdamW, AdamWConfig};
    use safeprobe_train::data::{Batch, Sequence};
    use safeprobe_train::sap::{SapConfig, SapState, Schedule, sft_step};

    let mut results = Vec::new();
    for name in &args.devices {
        let selected = select(&crate::DeviceArg {
            device: name.clone(),
        })?;
        let device = selected.device.clone().autodiff();
        let config = small_config();
        let mut base = burn::module::Module::no_grad(CausalLm::random(&config, &device));
        safeprobe_model::lora::attach(&mut base, &Default::default(), 0, &device)?;
        let sequence = |seed: usize| Sequence {
            ids: (0..args.seq_len)
                .map(|i| ((seed * 7919 + i * 104729) % config.vocab_size) as u32)
                .collect(),
            prompt_len: args.seq_len / 4,
        };
        let task = Batch::new(
            &(0..args.batch).map(sequence).collect::<Vec<_>>(),
            0,
            &device,
        );
        let safety = Batch::new(
            &(100..100 + 2 * args.batch)
                .map(sequence)
                .collect::<Vec<_>>(),
            0,
            &device,
        );
        let tokens = (args.batch * args.seq_len) as f64;

        let variants: [(&str, Option<(Schedule, usize)>); 5] = [
            ("sft", None),
            ("sap lagged k=1", Some((Schedule::Lagged, 1))),
            ("sap lagged k=4", Some((Schedule::Lagged, 4))),
            ("sap exact k=1", Some((Schedule::Exact, 1))),
            ("sap exact k=4", Some((Schedule::Exact, 4))),
        ];
        let mut sft_time = None;
        println!(
            "{} | built-in small config, LoRA r=8, batch {} × {} tokens",
            selected.describe(),
            args.batch,
            args.seq_len
        );
        for (label, sap) in variants {
            let mut model = base.clone();
            let mut optimizer = AdamW::new(AdamWConfig::default());
            let mut state = sap.map(|(schedule, k)| {
                SapState::new(
                    SapConfig {
                        schedule,
                        refresh_every: k,
                        rho: 1e-3,
                        ..Default::default()
                    },
                    &model,
                    &device,
                )
            });
            let mut step = |model: &mut CausalLm| match &mut state {
                None => sft_step(
                    model,
                    &mut optimizer,
                    std::slice::from_ref(&task),
                    1e-4,
                    None,
                    None,
                ),
                Some(state) => state.step(
                    model,
                    &mut optimizer,
                    std::slice::from_ref(&task),
                    &safety,
                    1e-4,
                    None,
                ),
            };
            step(&mut model);
            // At least 4 timed steps so that k = 4 averages over one refresh cycle.
            let iters = args.iters.max(4);
            let start = Instant::now();
            for _ in 0..iters {
                step(&mut model);
            }
            let per_step = start.elapsed().as_secs_f64() / iters as f64;
            let ratio = match sft_time {
                None => {
                    sft_time = Some(per_step);
                    1.0
                }
                Some(sft) => per_step / sft,
            };
            println!(
                "  {label:<16} {:>9.1} ms/step {:>9.0} tokens/s  {ratio:.2}× SFT",
                per_step * 1e3,
                tokens / per_step
            );
            results.push(json!({"device": selected.describe(), "variant": label, "ms_per_step": per_step * 1e3,
                                "tokens_per_s": tokens / per_step, "ratio_to_sft": ratio}));
        }
    }
    if args.json {
        println!("{}", serde_json::Value::from(results));
    }
    Ok(())
}
