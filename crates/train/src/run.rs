//! A training run: the step loop, its metrics, checkpoints and outputs.
//!
//! The run directory holds `config.toml` (resolved), `metrics.jsonl` (one event per line),
//! `checkpoints/` (where `checkpoint_every` asks for them) and at the end `adapter/` (PEFT
//! format; `model/` for full fine-tuning) and whatever the method leaves (SAP's
//! `probe.safetensors`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use safeprobe_model::weights::{SaveDtype, write_atomic};
use safeprobe_model::{Checkpoint, lora};

use crate::adamw::AdamW;
use crate::checkpoint;
use crate::data::{Batch, Sequence};
use crate::error::{Result, TrainError};
use crate::loss::task_loss;
use crate::methods::{self, PairDraw, StepInput, StepMethod};
use crate::metrics_log::MetricsLog;
use crate::params;
use crate::prepare::{Prepared, Sampler};
use crate::safety_check::SafetyCheck;

pub use crate::config::*;

/// One line of metrics.jsonl, and what the trainer reports as it runs (a wire type: the
/// server stores and streams it, the UI charts it). The trainer emits steps, validations and
/// the end; stages and status changes are the server's.
pub use safeprobe_wire::Event;

/// Serialises steps that draw from burn's per-process random generator.
static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs a whole training run, reporting each event to `on_event` and to metrics.jsonl.
pub fn train(
    config: &RunConfig,
    device: &Device,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    run(config, device, false, &Cancel::default(), on_event)
}

/// A flag another thread sets to stop a run at the next step boundary.
#[derive(Debug, Default, Clone)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Like `train`, but stops before the next step once `cancel` is set: it then writes a
/// checkpoint of the steps done (so `resume_cancellable` continues from there) and returns
/// `TrainError::Cancelled`.
pub fn train_cancellable(
    config: &RunConfig,
    device: &Device,
    cancel: &Cancel,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    run(config, device, false, cancel, on_event)
}

/// `resume` with a cancel flag (see `train_cancellable`).
pub fn resume_cancellable(
    run_dir: &Path,
    device: &Device,
    cancel: &Cancel,
    on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    let config = read_run_config(run_dir)?;
    run(&config, device, true, cancel, on_event)
}

fn read_run_config(run_dir: &Path) -> Result<RunConfig> {
    let path = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::File {
        path: path.clone(),
        message: format!("cannot read ({e}); is this a run directory?"),
    })?;
    let mut config = RunConfig::parse(&text, &[], &path)?;
    config.output_dir = run_dir.to_path_buf();
    Ok(config)
}

/// Continues the run in `run_dir` from its newest checkpoint, with the config it was started
/// with; the result equals an uninterrupted run.
pub fn resume(run_dir: &Path, device: &Device, on_event: impl FnMut(&Event)) -> Result<Checkpoint> {
    run(
        &read_run_config(run_dir)?,
        device,
        true,
        &Cancel::default(),
        on_event,
    )
}

/// The training loop.
fn run(
    config: &RunConfig,
    device: &Device,
    resuming: bool,
    cancel: &Cancel,
    mut on_event: impl FnMut(&Event),
) -> Result<Checkpoint> {
    config.validate()?;
    write_config(config, resuming)?;
    let Prepared {
        mut checkpoint,
        lora,
        device,
        train,
        pairs,
        validation,
        safety_check,
        config,
    } = Prepared::load(config, device)?;
    let config = &config;
    let mut method = methods::build(config, &checkpoint.model, &device, !pairs.is_empty());
    let mut optimizer = AdamW::new(config.adamw);
    let pad = checkpoint.tokenizer.pad_id;
    let mut draws = Draws::new(train, pairs, config, pad, &device);
    let start = match resuming {
        true => restore_newest(
            config,
            &mut checkpoint.model,
            &mut optimizer,
            method.as_mut(),
        )?,
        false => 0,
    };
    draws.replay(start, method.as_ref());
    let mut log = MetricsLog::open(&config.output_dir, resuming.then_some(start))?;
    let mut emit = |event: Event| log.emit(event, &mut on_event);
    let dropout = lora.as_ref().is_some_and(|l| l.dropout > 0.0);

    let mut warned = false;
    for step in start..config.max_steps {
        if cancel.is_cancelled() {
            if step > start {
                save_checkpoint(config, step, &checkpoint.model, &optimizer, method.as_ref())?;
            }
            return Err(TrainError::Cancelled { step });
        }
        let model = &mut checkpoint.model;
        emit(train_step(
            step,
            config,
            model,
            &mut optimizer,
            method.as_mut(),
            &mut draws,
            dropout,
        ))?;
        if let Some(message) = method.warning().filter(|_| !warned) {
            warned = true;
            emit(Event::Warning {
                step: step + 1,
                message,
            })?;
        }
        let evaluating = (step + 1) % config.eval_every.max(1) == 0 || step + 1 == config.max_steps;
        if evaluating {
            let eval = Evaluation {
                validation: validation.as_deref(),
                safety_check: safety_check.as_ref(),
                pad,
            };
            for event in eval.measure(&checkpoint.model, config.batch_size, step + 1) {
                emit(event)?;
            }
        }
        if config.checkpoint_every > 0 && (step + 1) % config.checkpoint_every == 0 {
            save_checkpoint(
                config,
                step + 1,
                &checkpoint.model,
                &optimizer,
                method.as_ref(),
            )?;
        }
    }

    let adapter = save_trained(config, &checkpoint, lora.as_ref())?;
    method.write_artifacts(&config.output_dir)?;
    emit(Event::Done {
        steps: config.max_steps,
        adapter,
    })?;
    Ok(checkpoint)
}

/// Creates the run's folder; a new run writes its resolved config there.
fn write_config(config: &RunConfig, resuming: bool) -> Result<()> {
    std::fs::create_dir_all(&config.output_dir).map_err(|e| TrainError::File {
        path: config.output_dir.clone(),
        message: e.to_string(),
    })?;
    if !resuming {
        let resolved =
            toml::to_string_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
        write_atomic(&config.output_dir.join("config.toml"), resolved.as_bytes())?;
    }
    Ok(())
}

/// One optimiser step of `method`, timed, as its event.
fn train_step(
    step: usize,
    config: &RunConfig,
    model: &mut safeprobe_model::decoder::CausalLm,
    optimizer: &mut AdamW,
    method: &mut dyn StepMethod,
    draws: &mut Draws,
    dropout: bool,
) -> Event {
    let started = Instant::now();
    // LoRA dropout draws from the device's generator, which burn keeps per process: seeding it
    // per step makes the masks a function of (seed, step), so a resumed run draws the ones it
    // would have drawn, and the lock keeps concurrent runs from reseeding it mid-step (their
    // steps with dropout take turns).
    let generator_lock = dropout.then(|| {
        let guard = DEVICE_RNG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        draws.device.seed(
            config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(step as u64),
        );
        guard
    });
    let lr = config.learning_rate(step);
    let tasks = draws.tasks(method.trains_on_tasks(step));
    let pairs = method.draws_pairs(step).then(|| draws.pairs());
    let input = StepInput {
        step,
        tasks: &tasks,
        pairs: pairs.as_ref(),
        lr,
        max_grad_norm: config.max_grad_norm,
        // With dropout the generator is this run's for the step (the lock above).
        dropout_seed: generator_lock.is_some().then(|| {
            (config.seed ^ 0xa11_9e)
                .wrapping_mul(1_000_003)
                .wrapping_add(step as u64)
        }),
    };
    let metrics = method.step(model, optimizer, &input);
    drop(generator_lock);
    // The mechanism measurement is not part of training: its time is reported on its own.
    let measuring = metrics.alignment.as_ref().map_or(0.0, |a| a.seconds);
    let elapsed = started.elapsed().as_secs_f64() - measuring;
    let tokens: f64 = tasks
        .iter()
        .map(|t| t.input_ids.dims().iter().product::<usize>() as f64)
        .sum();
    Event::Step {
        step: step + 1,
        total_steps: config.max_steps,
        lr,
        tokens_per_s: tokens / elapsed,
        step_time_s: elapsed,
        metrics,
    }
}

/// The samplers of the task data and the safety pairs, deterministic in the run's seed.
struct Draws {
    tasks: Sampler<Sequence>,
    pairs: Sampler<(Sequence, Sequence)>,
    batch_size: usize,
    micro_batches: usize,
    safety_batch_size: usize,
    pad: u32,
    device: Device,
}

impl Draws {
    fn new(
        train: Vec<Sequence>,
        pairs: Vec<(Sequence, Sequence)>,
        config: &RunConfig,
        pad: u32,
        device: &Device,
    ) -> Self {
        Self {
            tasks: Sampler::new(train, config.seed, config.shuffle),
            pairs: Sampler::new(pairs, config.seed.wrapping_add(1), config.shuffle),
            batch_size: config.batch_size,
            micro_batches: config.grad_accumulation.max(1),
            safety_batch_size: config.safety_batch_size,
            pad,
            device: device.clone(),
        }
    }

    /// A step's task micro-batches: drawn when the step trains on them, else only looked at.
    fn tasks(&mut self, drawn: bool) -> Vec<Batch> {
        if drawn {
            (0..self.micro_batches)
                .map(|_| self.tasks.next_batch(self.batch_size))
                .map(|rows| Batch::new(&rows, self.pad, &self.device))
                .collect()
        } else {
            // The next step's micro-batches, as it will draw them.
            let rows = self.tasks.peek_batch(self.batch_size * self.micro_batches);
            rows.chunks(self.batch_size.max(1))
                .map(|rows| Batch::new(rows, self.pad, &self.device))
                .collect()
        }
    }

    fn pairs(&mut self) -> PairDraw {
        PairDraw {
            pairs: self.pairs.next_batch(self.safety_batch_size),
            pad: self.pad,
            device: self.device.clone(),
        }
    }

    /// Draws what `steps` steps of `method` drew, so that a resumed run continues the data
    /// order where it stopped.
    fn replay(&mut self, steps: usize, method: &dyn StepMethod) {
        for step in 0..steps {
            if method.trains_on_tasks(step) {
                for _ in 0..self.micro_batches {
                    self.tasks.next_batch(self.batch_size);
                }
            }
            if method.draws_pairs(step) {
                self.pairs.next_batch(self.safety_batch_size);
            }
        }
    }
}

/// What a run measures on held-out data every `eval_every` steps.
struct Evaluation<'a> {
    validation: Option<&'a [Sequence]>,
    safety_check: Option<&'a SafetyCheck>,
    pad: u32,
}

impl Evaluation<'_> {
    fn measure(
        &self,
        model: &safeprobe_model::decoder::CausalLm,
        batch_size: usize,
        step: usize,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        if self.validation.is_none() && self.safety_check.is_none() {
            return events;
        }
        // Inference mode: no dropout, no autodiff graph.
        let eval_model = burn::module::Module::valid(model);
        if let Some(validation) = self.validation {
            let loss = validation_loss(&eval_model, validation, self.pad, batch_size);
            events.push(Event::Validation { step, loss });
        }
        if let Some(check) = self.safety_check {
            events.push(check.measure(&eval_model, self.pad, batch_size, step));
        }
        events
    }
}

/// Mean token loss over held-out sequences (token-weighted across batches).
fn validation_loss(
    model: &safeprobe_model::decoder::CausalLm,
    sequences: &[Sequence],
    pad: u32,
    batch_size: usize,
) -> f64 {
    let device = model.embed_tokens.device();
    let (mut total, mut tokens) = (0.0, 0usize);
    for chunk in sequences.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad, &device);
        let loss = task_loss(model, &batch, None);
        total += params::scalar(&loss) * batch.response_tokens as f64;
        tokens += batch.response_tokens;
    }
    total / tokens.max(1) as f64
}

/// Writes a checkpoint after `step` steps and deletes the ones past `keep_checkpoints`.
fn save_checkpoint(
    config: &RunConfig,
    step: usize,
    model: &safeprobe_model::decoder::CausalLm,
    optimizer: &AdamW,
    method: &dyn StepMethod,
) -> Result<()> {
    checkpoint::save(
        &config.output_dir,
        step,
        model,
        optimizer,
        config.method,
        method,
    )?;
    checkpoint::prune(&config.output_dir, config.keep_checkpoints)
}

/// Restores the run's newest checkpoint; returns the steps it had done.
fn restore_newest(
    config: &RunConfig,
    model: &mut safeprobe_model::decoder::CausalLm,
    optimizer: &mut AdamW,
    method: &mut dyn StepMethod,
) -> Result<usize> {
    let (_, dir) = checkpoint::latest(&config.output_dir).ok_or_else(|| TrainError::File {
        path: config.output_dir.join("checkpoints"),
        message: if config.checkpoint_every == 0 {
            "no checkpoint to resume from: the run was started with checkpoint_every = 0 \
             (set it to write checkpoints)"
                .into()
        } else {
            format!(
                "no checkpoint to resume from: the run stopped before its first checkpoint \
                 (checkpoint_every = {}); start it again",
                config.checkpoint_every
            )
        },
    })?;
    let device = model.embed_tokens.device();
    checkpoint::load(&dir, model, optimizer, config.method, method, &device)
}

/// The trained weights: the adapter (PEFT format) for LoRA, the whole model for full
/// fine-tuning. Returns their folder.
fn save_trained(
    config: &RunConfig,
    checkpoint: &Checkpoint,
    lora: Option<&LoraConfig>,
) -> Result<PathBuf> {
    match lora {
        Some(lora_config) => {
            let dir = config.output_dir.join("adapter");
            let base = config.model.display().to_string();
            lora::save_peft(&checkpoint.model, lora_config, &dir, &base)?;
            Ok(dir)
        }
        None => {
            let dir = config.output_dir.join("model");
            safeprobe_model::export::export(
                &checkpoint.model,
                &checkpoint.config,
                &config.model,
                &dir,
                SaveDtype::F32,
            )?;
            Ok(dir)
        }
    }
}
