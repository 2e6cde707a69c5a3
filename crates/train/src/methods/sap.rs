//! One training step: plain SFT, or Safety-Aware Probing (SAP, arXiv 2505.16737).
//!
//! SAP, with W the trainable parameters, a task batch b and a safety batch c:
//! 1. harmful direction: g = ∇_W L_safety(W, V; c), d = g / (‖g‖ + 1e-8), ΔW = ε·d with
//!    ε = ρ·‖W‖ (recomputed every `refresh_every` steps, reused in between);
//! 2. the probe V ascends L_su(V) = L_task(W + ΔW, V; b) − L_task(W, V; b), the loss gap
//!    that a step towards harm opens;
//! 3. W takes its optimiser step on ∇_W L_task(W, V; b) with the probe in place.
//!
//! `Lagged` (the official code's order, 3 passes): the probe gradient is taken at the current
//! probe, sharing the clean pass that gives ∇_W; after W's step V is reset to zero and takes
//! one Adam ascent step (moments persist across steps).
//! `Exact` (the paper's Algorithm 1, 4 passes): V = 0, V_safe = β·∇_V L_su at V = 0 (plain or
//! Adam-normalised), and W steps on ∇_W L_task(W, V_safe).
//!
//! Deviations from the official code: its safety log-probabilities are taken on prompt-only
//! inputs and without the causal shift; here they are teacher-forced response log-probs,
//! shifted like every other loss.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor};
use safeprobe_model::decoder::CausalLm;
use safeprobe_model::weights::{HostTensor, SaveDtype, write_safetensors};

use super::{Restore, Saved, StepInput, StepMethod};
use crate::adamw::{AdamW, AdamWConfig};
use crate::config::RunConfig;
use crate::data::Batch;
use crate::error::Result;
use crate::gradients::{Pass, accumulate, apply_update, clip, task_gradient};
use crate::kernels::{self, Implementation, ProbeAdam};
use crate::loss::{Probe, safety_loss, task_loss};
use crate::params::{self, global_norm, scalar};

pub use safeprobe_wire::spec::{ProbeUpdate, SapConfig, Schedule};

/// Everything one step reports (wire types: the UI charts them).
pub use safeprobe_wire::{Alignment, StepMetrics};

/// The probe as leaves of the autodiff graph (so ∇_V can be read after a backward).
fn tracked_probe(vectors: &[Tensor<1>], layers: &[usize], device: &Device) -> Probe {
    Probe {
        layers: layers.to_vec(),
        vectors: vectors
            .iter()
            .map(|v| params::autodiff_on(v.clone(), device).require_grad())
            .collect(),
    }
}

/// Step 1's result: ΔW = scale · g, kept as the direction and its scale so that W + ΔW is one
/// fused `axpy` kernel per tensor.
#[derive(Clone)]
pub struct HarmfulDirection {
    pub gradient: Vec<Tensor<1>>,
    pub scale: f32,
    /// ‖ΔW‖ = scale·‖g‖, kept so that steps reusing the direction don't reduce it again.
    pub norm: f64,
    /// ‖g‖ = ‖∇_W L_safety‖ before the normalisation.
    pub gradient_norm: f64,
}

impl HarmfulDirection {
    pub fn new(gradient: Vec<Tensor<1>>, scale: f32) -> Self {
        let gradient_norm = global_norm(&gradient);
        Self::with_gradient_norm(gradient, scale, gradient_norm)
    }

    /// As `new`, with ‖g‖ already read back.
    fn with_gradient_norm(gradient: Vec<Tensor<1>>, scale: f32, gradient_norm: f64) -> Self {
        Self {
            gradient,
            scale,
            norm: scale as f64 * gradient_norm,
            gradient_norm,
        }
    }
}

/// What the normalisation g/(‖g‖ + floor) adds (as the official code does): a direction whose
/// gradient is far below it is shrunk to nothing, and SAP's step is SFT's.
pub const DIRECTION_FLOOR: f64 = 1e-8;

/// Step 1: ΔW = ρ‖W‖ · g/(‖g‖ + 1e-8) with g = ∇_W L_safety (probe in place). Returns ΔW and
/// the safety loss.
pub fn harmful_direction(
    model: &CausalLm,
    safety: &Batch,
    probe: &Probe,
    config: &SapConfig,
) -> (HarmfulDirection, f64) {
    let loss = safety_loss(model, safety, Some(probe), config.temperature);
    let gradient = params::gradients(model, &loss.backward());
    let epsilon = config.rho * global_norm(&params::values(model));
    let gradient_norm = global_norm(&gradient);
    let scale = (epsilon / (gradient_norm + DIRECTION_FLOOR)) as f32;
    (
        HarmfulDirection::with_gradient_norm(gradient, scale, gradient_norm),
        scalar(&loss),
    )
}

/// Step 2's gradient, ∇_V L_su at probe `vectors`: the probe gradient of the perturbed task
/// loss L_task(W + ΔW, V) minus that of the clean one L_task(W, V). Also returns the clean
/// pass's ∇_W (step 3 reuses it) and both loss values (clean, perturbed).
pub fn loss_gap_gradient(
    model: &CausalLm,
    delta: &HarmfulDirection,
    task: &Batch,
    layers: &[usize],
    vectors: &[Tensor<1>],
) -> (Vec<Tensor<1>>, Vec<Tensor<1>>, f64, f64) {
    let device = model.embed_tokens.device();
    let clean_probe = tracked_probe(vectors, layers, &device);
    let clean = task_loss(model, task, Some(&clean_probe));
    let clean_grads = clean.backward();
    let grad_w = params::gradients(model, &clean_grads);
    let grad_v_clean: Vec<Tensor<1>> = clean_probe
        .vectors
        .iter()
        .map(|v| v.grad(&clean_grads).expect("probe gradient"))
        .collect();

    let shifted: Vec<Tensor<1>> = params::values(model)
        .into_iter()
        .zip(&delta.gradient)
        .map(|(w, g)| kernels::axpy(w, g.clone(), delta.scale, Implementation::Auto))
        .collect();
    let perturbed_model = params::frozen_with_values(model, shifted);
    let perturbed_probe = tracked_probe(vectors, layers, &device);
    let perturbed = task_loss(&perturbed_model, task, Some(&perturbed_probe));
    let perturbed_grads = perturbed.backward();
    let grad_su = perturbed_probe
        .vectors
        .iter()
        .zip(grad_v_clean)
        .map(|(v, clean)| v.grad(&perturbed_grads).expect("probe gradient") - clean)
        .collect();
    (grad_su, grad_w, scalar(&clean), scalar(&perturbed))
}

/// Random ±1 vectors, each scaled to the norm of its counterpart in `like`: the control
/// probe, as large as the real one but pointing nowhere in particular.
pub fn random_signs_like(like: &[Tensor<1>], seed: u64) -> Vec<Tensor<1>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xc0_47_01);
    like.iter()
        .map(|v| {
            let n = v.dims()[0];
            let size = global_norm(std::slice::from_ref(v)) / (n as f64).sqrt();
            let signs: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        size as f32
                    } else {
                        -size as f32
                    }
                })
                .collect();
            Tensor::from_data(burn::tensor::TensorData::new(signs, [n]), &v.device())
        })
        .collect()
}

/// The probe and what SAP carries from step to step.
pub struct SapState {
    pub config: SapConfig,
    pub probe: Probe,
    /// The probe's Adam moments, carried across steps.
    pub(crate) moments: (Vec<Tensor<1>>, Vec<Tensor<1>>),
    pub(crate) probe_updates: u64,
    /// ΔW, kept between refreshes of the harmful direction.
    pub(crate) delta: Option<HarmfulDirection>,
    pub step: usize,
    /// Mixed into the random control probe's seed (the run's seed), so seeds differ in it.
    pub control_seed: u64,
    /// Set for steps with LoRA dropout (the device generator then belongs to this run): the
    /// mechanism measurement reseeds with it before each of its passes.
    pub dropout_seed: Option<u64>,
}

impl SapState {
    pub fn new(config: SapConfig, model: &CausalLm, device: &burn::tensor::Device) -> Self {
        let hidden = model.embed_tokens.dims()[1];
        let layers = config.probe_layers(model.layers.len());
        let mut probe = Probe::zeros(layers, hidden, device);
        // The probe lives outside the autodiff graph between steps.
        probe.vectors = probe
            .vectors
            .into_iter()
            .map(|v| if v.is_autodiff() { v.inner() } else { v })
            .collect();
        let moments = (probe.vectors.clone(), probe.vectors.clone());
        Self {
            config,
            probe,
            moments,
            probe_updates: 0,
            delta: None,
            step: 0,
            control_seed: 0,
            dropout_seed: None,
        }
    }

    /// The probe as constants of the autodiff graph: tensors without autodiff, which an
    /// operation with tracked inputs treats as constants.
    fn constant_probe(&self, vectors: &[Tensor<1>]) -> Probe {
        Probe {
            layers: self.probe.layers.clone(),
            vectors: vectors.to_vec(),
        }
    }

    /// V from ∇_V L_su: one Adam ascent step from zero (moments persist) or β·∇_V L_su, as the
    /// fused WGSL kernel on wgpu.
    fn probe_update(&mut self, grad_su: Vec<Tensor<1>>, plain_gradient: bool) -> Vec<Tensor<1>> {
        let adam = AdamWConfig::default();
        if !plain_gradient {
            self.probe_updates += 1;
        }
        let hp = ProbeAdam {
            lr: self.config.beta as f32,
            beta1: adam.beta1 as f32,
            beta2: adam.beta2 as f32,
            eps: adam.eps as f32,
            step: self.probe_updates,
            plain_gradient,
        };
        let mut vectors = Vec::new();
        for (i, g) in grad_su.into_iter().enumerate() {
            let (m, v) = (self.moments.0[i].clone(), self.moments.1[i].clone());
            let (probe, m, v) = kernels::probe_adam(g, m, v, &hp, Implementation::Auto);
            self.moments.0[i] = m;
            self.moments.1[i] = v;
            vectors.push(probe);
        }
        vectors
    }

    /// The mechanism, measured: the task gradient's cosine with the harmful direction at
    /// V = 0, at the probe used (`at_probe`, whose gradient the step already has) and at a
    /// random-sign probe of the same per-layer size. Two extra passes; nothing is updated.
    fn alignment(
        &self,
        model: &CausalLm,
        tasks: &[Batch],
        safety: &Batch,
        used: &[Tensor<1>],
    ) -> Alignment {
        let started = std::time::Instant::now();
        // ĝ at V = 0, as an SFT run measures it, so the two runs' lines are one quantity.
        let loss = safety_loss(model, safety, None, self.config.temperature);
        let safety_gradient = &params::gradients(model, &loss.backward());
        // The three views of the task gradient in passes of their own, each with the same
        // dropout masks, so that their differences are the probe's alone.
        let device = model.embed_tokens.device();
        let gradient_with = |vectors: Option<&[Tensor<1>]>| {
            if let Some(seed) = self.dropout_seed {
                device.seed(seed);
            }
            let probe = vectors.map(|v| self.constant_probe(v));
            task_gradient(model, tasks, probe.as_ref()).1
        };
        let random = random_signs_like(
            used,
            self.control_seed
                .wrapping_mul(1_000_003)
                .wrapping_add(self.step as u64),
        );
        let at_zero = gradient_with(None);
        let at_probe = &gradient_with(Some(used));
        let at_random = gradient_with(Some(&random));
        Alignment {
            at_zero: params::cosine(&at_zero, safety_gradient),
            at_probe: Some(params::cosine(at_probe, safety_gradient)),
            at_random: Some(params::cosine(&at_random, safety_gradient)),
            per_layer_at_zero: params::cosine_per_layer(model, &at_zero, safety_gradient),
            per_layer_at_probe: params::cosine_per_layer(model, at_probe, safety_gradient),
            per_layer_at_random: params::cosine_per_layer(model, &at_random, safety_gradient),
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// ‖∇_W L_safety‖ of the current harmful direction when it is below `DIRECTION_FLOOR`
    /// (the direction then vanishes and the step is SFT's).
    pub fn vanishing_direction(&self) -> Option<f64> {
        self.delta
            .as_ref()
            .map(|d| d.gradient_norm)
            .filter(|g| *g < DIRECTION_FLOOR)
    }

    /// One SAP step.
    pub fn sap_step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        tasks: &[Batch],
        safety: &Batch,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> StepMetrics {
        let mut metrics = StepMetrics::default();
        // In the exact schedule the probe starts every step at zero.
        let start = match self.config.schedule {
            Schedule::Lagged => self.probe.vectors.clone(),
            Schedule::Exact => self.probe.vectors.iter().map(|v| v.zeros_like()).collect(),
        };

        // 1. The harmful direction, refreshed every k steps.
        let refresh = self.delta.is_none() || self.step % self.config.refresh_every.max(1) == 0;
        if refresh {
            let probe = self.constant_probe(&start);
            let (delta, safety) = harmful_direction(model, safety, &probe, &self.config);
            metrics.safety_loss = Some(safety);
            self.delta = Some(delta);
        }
        let delta = self.delta.clone().expect("direction computed");
        metrics.delta_norm = Some(delta.norm);

        // 2. The probe's gradient on the loss gap.
        let layers = self.probe.layers.clone();
        let mut gap = accumulate(tasks, |task| {
            let (grad_su, grad_w, clean, perturbed) =
                loss_gap_gradient(model, &delta, task, &layers, &start);
            Pass {
                grads: vec![grad_su, grad_w],
                losses: vec![clean, perturbed],
            }
        });
        let (grad_w, grad_su) = (gap.grads.pop().unwrap(), gap.grads.pop().unwrap());
        let (clean, perturbed) = (gap.losses[0], gap.losses[1]);
        metrics.perturbed_loss = Some(perturbed);
        metrics.su_loss = Some(perturbed - clean);

        // 3. W's step with the probe in place, and the probe's own update.
        let (grad_w, used) = match self.config.schedule {
            Schedule::Lagged => {
                metrics.task_loss = clean;
                self.probe.vectors = self.probe_update(grad_su, false);
                (grad_w, start)
            }
            Schedule::Exact => {
                let plain = self.config.exact_update == ProbeUpdate::Gradient;
                let v_safe = self.probe_update(grad_su, plain);
                let probe = self.constant_probe(&v_safe);
                let (loss, grads) = task_gradient(model, tasks, Some(&probe));
                metrics.task_loss = loss;
                self.probe.vectors = v_safe.clone();
                (grads, v_safe)
            }
        };
        let every = self.config.cosine_every;
        if refresh && every > 0 && self.step % every == 0 {
            let alignment = self.alignment(model, tasks, safety, &used);
            // The heatmap's per-layer cosines are the alignment's at the probe used.
            metrics.grad_cosine = Some(alignment.per_layer_at_probe.clone());
            metrics.alignment = Some(alignment);
        }
        let (grad_w, grad_norm) = clip(grad_w, max_grad_norm);
        metrics.grad_norm = grad_norm;
        apply_update(model, optimizer, grad_w, lr);
        metrics.probe_norms = self
            .probe
            .vectors
            .iter()
            .map(|v| global_norm(std::slice::from_ref(v)))
            .collect();
        self.step += 1;
        metrics
    }
}

impl SapState {
    /// The state a run of `config` starts from.
    pub fn for_run(config: &RunConfig, model: &CausalLm, device: &Device) -> Self {
        let mut state = Self::new(config.sap.clone(), model, device);
        state.control_seed = config.seed;
        state
    }
}

/// SAP's counters in a checkpoint (its tensors: `probe`, `probe.m`, `probe.v`, `direction`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SapCounters {
    step: usize,
    probe_updates: u64,
    probe_vectors: usize,
    delta_scale: Option<f32>,
}

impl StepMethod for SapState {
    fn draws_pairs(&self, _step: usize) -> bool {
        true
    }

    fn step(
        &mut self,
        model: &mut CausalLm,
        optimizer: &mut AdamW,
        input: &StepInput,
    ) -> StepMetrics {
        self.dropout_seed = input.dropout_seed;
        let safety = input
            .pairs
            .expect("SAP draws pairs every step")
            .contrastive();
        self.sap_step(
            model,
            optimizer,
            input.tasks,
            &safety,
            input.lr,
            input.max_grad_norm,
        )
    }

    fn save(&self) -> Saved {
        let mut tensors = vec![
            ("probe".to_string(), self.probe.vectors.clone()),
            ("probe.m".to_string(), self.moments.0.clone()),
            ("probe.v".to_string(), self.moments.1.clone()),
        ];
        if let Some(delta) = &self.delta {
            tensors.push(("direction".to_string(), delta.gradient.clone()));
        }
        let counters = SapCounters {
            step: self.step,
            probe_updates: self.probe_updates,
            probe_vectors: self.probe.vectors.len(),
            delta_scale: self.delta.as_ref().map(|d| d.scale),
        };
        Saved {
            counters: serde_json::to_value(counters).expect("json"),
            tensors,
        }
    }

    fn restore(&mut self, saved: &Restore) -> Result<()> {
        let c: SapCounters = saved.counters()?;
        self.step = c.step;
        self.probe_updates = c.probe_updates;
        self.probe.vectors = saved.tensors("probe", c.probe_vectors)?;
        self.moments = (
            saved.tensors("probe.m", c.probe_vectors)?,
            saved.tensors("probe.v", c.probe_vectors)?,
        );
        self.delta = match c.delta_scale {
            Some(scale) => Some(HarmfulDirection::new(
                saved.per_parameter("direction")?,
                scale,
            )),
            None => None,
        };
        Ok(())
    }

    fn write_artifacts(&self, run_dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (layer, v) in self.probe.layers.iter().zip(&self.probe.vectors) {
            tensors.insert(
                format!("probe.layers.{layer}"),
                HostTensor::from_tensor1(v.clone()),
            );
        }
        write_safetensors(
            &run_dir.join("probe.safetensors"),
            &tensors,
            SaveDtype::F32,
            None,
        )?;
        Ok(())
    }

    fn warning(&self) -> Option<String> {
        self.vanishing_direction()
            .map(|norm| vanishing_direction_warning(norm, self.config.temperature))
    }
}

/// Why SAP is doing nothing, and what to change.
fn vanishing_direction_warning(gradient_norm: f64, temperature: f64) -> String {
    format!(
        "SAP's harmful direction vanishes: ‖∇L_safety‖ = {gradient_norm:.1e}, far below the \
         {DIRECTION_FLOOR:.0e} its normalisation adds, so ΔW is about 0 and these steps are plain \
         SFT. The model already separates the safety pairs by so much that their contrastive \
         loss at T = {temperature} is saturated: raise sap.temperature, or use pairs it does not \
         separate as clearly."
    )
}
