//! The trainer: SAP's math (finite differences, ρ = 0 reduces to SFT), that SFT learns,
//! and config errors that stop a run before the model loads.

mod common;
use common::*;

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safeprobe_model::Checkpoint;
use safeprobe_model::weights::SafetensorsFiles;
use safeprobe_train::data::{self, Batch, Sequence};
use safeprobe_train::loss::{Probe, task_loss};
use safeprobe_train::run::{Event, RunConfig, RunFile, train};
use safeprobe_train::sap::{SapConfig, harmful_direction, loss_gap_gradient};
use safeprobe_train::{TrainError, params};

fn config(output: &Path, extra: &[&str]) -> RunConfig {
    let text = format!(
        "model = {:?}\ntrain_data = {:?}\nsafety_data = {:?}\noutput_dir = {:?}\nmax_steps = 3\nbatch_size = 2\nsafety_batch_size = 2\nlr = 0.01\nmax_len = 256\n[lora]\nr = 4\nalpha = 8.0\ndropout = 0.0\n",
        fixture("tiny-tied"),
        fixture("data/train.jsonl"),
        fixture("data/safety.jsonl"),
        output
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    RunConfig::parse(&text, &overrides, Path::new("test.toml")).unwrap()
}

fn adapter_tensors(run: &Path) -> Vec<(String, Vec<f32>)> {
    let files =
        SafetensorsFiles::open_files(&[run.join("adapter/adapter_model.safetensors")]).unwrap();
    files
        .names()
        .map(|n| {
            let (shape, _) = files.info(n).unwrap();
            (n.to_string(), files.read_f32(n, &shape).unwrap())
        })
        .collect()
}

/// Gradient checkpointing recomputes activations in the backward pass instead of keeping
/// them: the same numbers, SAP's extra passes included.
#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let device = Device::flex();
    for method in ["method=\"sft\"", "method=\"sap\""] {
        let (plain, checkpointed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        train(&config(plain.path(), &[method]), &device, |_| {}).unwrap();
        train(
            &config(
                checkpointed.path(),
                &[method, "gradient_checkpointing=true"],
            ),
            &device,
            |_| {},
        )
        .unwrap();
        for ((name, a), (_, b)) in adapter_tensors(plain.path())
            .into_iter()
            .zip(adapter_tensors(checkpointed.path()))
        {
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{method}: {name} differs by {diff}");
        }
    }
}

#[test]
fn sap_with_zero_radius_follows_sft_exactly() {
    let (sft_dir, sap_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let device = Device::flex();
    train(
        &config(sft_dir.path(), &["method=\"sft\""]),
        &device,
        |_| {},
    )
    .unwrap();
    let mut probe_norms = Vec::new();
    train(
        &config(sap_dir.path(), &["method=\"sap\"", "sap.rho=0.0"]),
        &device,
        |e| {
            if let Event::Step { metrics, .. } = e {
                probe_norms.extend(metrics.probe_norms.clone());
            }
        },
    )
    .unwrap();
    assert_eq!(
        adapter_tensors(sft_dir.path()),
        adapter_tensors(sap_dir.path())
    );
    assert!(
        !probe_norms.is_empty() && probe_norms.iter().all(|n| *n == 0.0),
        "{probe_norms:?}"
    );
    // And a non-zero radius does move the trajectory (so the comparison can fail).
    let moved = tempfile::tempdir().unwrap();
    train(
        &config(
            moved.path(),
            &["method=\"sap\"", "sap.rho=0.5", "sap.beta=1.0"],
        ),
        &device,
        |_| {},
    )
    .unwrap();
    assert_ne!(
        adapter_tensors(sft_dir.path()),
        adapter_tensors(moved.path())
    );
}

#[test]
fn loss_gap_gradient_matches_finite_differences() {
    let device = Device::flex().autodiff();
    let mut checkpoint = Checkpoint::load(&fixture("tiny-tied"), &device).unwrap();
    checkpoint.model = burn::module::Module::no_grad(checkpoint.model);
    let lora = safeprobe_model::LoraConfig {
        dropout: 0.0,
        ..Default::default()
    };
    safeprobe_model::lora::attach(&mut checkpoint.model, &lora, 1, &device).unwrap();
    // Make B non-zero so ΔW on A matters.
    let values: Vec<Tensor<1>> = params::values(&checkpoint.model)
        .into_iter()
        .map(|v| v.clone().add_scalar(0.05) * v.ones_like())
        .collect();
    checkpoint.model = params::with_values(checkpoint.model, values);

    let tok = &checkpoint.tokenizer;
    let examples = data::read_examples(&fixture("data/train.jsonl")).unwrap();
    let sequences: Vec<Sequence> = examples
        .iter()
        .take(3)
        .map(|e| Sequence::encode(tok, &e.prompt, &e.response, 256).unwrap())
        .collect();
    let task = Batch::new(&sequences, tok.pad_id, &device);
    let pairs: Vec<_> = data::read_pairs(&fixture("data/safety.jsonl"))
        .unwrap()
        .iter()
        .map(|p| p.encode(tok, None, 256).unwrap())
        .collect();
    let safety = Batch::new(&data::contrastive_rows(&pairs), tok.pad_id, &device);

    let layers = vec![0, 1];
    let inner = Device::flex();
    let v: Vec<Tensor<1>> = (0..2)
        .map(|i| {
            Tensor::from_data(
                TensorData::new(
                    (0..64)
                        .map(|j| ((i * 64 + j) as f32 * 0.37).sin() * 0.1)
                        .collect::<Vec<f32>>(),
                    [64],
                ),
                &inner,
            )
        })
        .collect();
    let sap = SapConfig {
        rho: 0.05,
        ..Default::default()
    };
    let probe = Probe {
        layers: layers.clone(),
        vectors: v.iter().map(|t| Tensor::from_inner(t.clone())).collect(),
    };
    let (delta, _) = harmful_direction(&checkpoint.model, &safety, &probe, &sap);
    let (grad, _, clean, perturbed) =
        loss_gap_gradient(&checkpoint.model, &delta, &task, &layers, &v);
    assert!(
        (perturbed - clean).abs() > 1e-6,
        "the perturbation must open a loss gap"
    );
    // The per-layer gradient cosine: 1 with itself, −1 with its negation.
    let g = &delta.gradient;
    let negated: Vec<Tensor<1>> = g.iter().map(|t| t.clone().neg()).collect();
    for c in params::cosine_per_layer(&checkpoint.model, g, g) {
        assert!((c - 1.0).abs() < 1e-5, "{c}");
    }
    for c in params::cosine_per_layer(&checkpoint.model, g, &negated) {
        assert!((c + 1.0).abs() < 1e-5, "{c}");
    }

    // L_su(V) in f64 from the two task losses, evaluated without gradients.
    let shifted: Vec<Tensor<1>> = params::values(&checkpoint.model)
        .into_iter()
        .zip(&delta.gradient)
        .map(|(w, g)| w + g.clone().mul_scalar(delta.scale))
        .collect();
    let perturbed_model = params::frozen_with_values(&checkpoint.model, shifted);
    let l_su = |vs: &[Tensor<1>]| {
        let p = Probe {
            layers: layers.clone(),
            vectors: vs.iter().map(|t| Tensor::from_inner(t.clone())).collect(),
        };
        params::scalar(&task_loss(&perturbed_model, &task, Some(&p)))
            - params::scalar(&task_loss(&checkpoint.model, &task, Some(&p)))
    };
    // Directional derivative along a fixed direction u, by central differences.
    let u: Vec<Tensor<1>> = (0..2)
        .map(|i| {
            Tensor::from_data(
                TensorData::new(
                    (0..64)
                        .map(|j| ((i * 64 + j) as f32 * 1.3).cos())
                        .collect::<Vec<f32>>(),
                    [64],
                ),
                &inner,
            )
        })
        .collect();
    let h = 0.05f32;
    let plus: Vec<Tensor<1>> = v
        .iter()
        .zip(&u)
        .map(|(a, b)| a.clone() + b.clone().mul_scalar(h))
        .collect();
    let minus: Vec<Tensor<1>> = v
        .iter()
        .zip(&u)
        .map(|(a, b)| a.clone() - b.clone().mul_scalar(h))
        .collect();
    let numeric = (l_su(&plus) - l_su(&minus)) / (2.0 * h as f64);
    let analytic: f64 = grad
        .iter()
        .zip(&u)
        .map(|(g, d)| params::scalar(&(g.clone() * d.clone()).sum()))
        .sum();
    let scale = analytic.abs().max(numeric.abs());
    assert!(scale > 1e-4, "derivative too small to test: {analytic}");
    assert!(
        (analytic - numeric).abs() <= 0.05 * scale,
        "analytic {analytic} vs finite differences {numeric}"
    );
}

#[test]
fn sft_lowers_the_task_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    train(
        &config(
            dir.path(),
            &[
                "method=\"sft\"",
                "max_steps=12",
                "batch_size=6",
                "shuffle=false",
            ],
        ),
        &Device::flex(),
        |e| {
            if let Event::Step { metrics, .. } = e {
                losses.push(metrics.task_loss);
            }
        },
    )
    .unwrap();
    assert!(losses.last().unwrap() < &(losses[0] * 0.9), "{losses:?}");
    assert!(
        dir.path().join("metrics.jsonl").exists()
            && dir.path().join("adapter/adapter_config.json").exists()
    );
}

#[test]
fn sft_and_sap_train_qwen3_and_llama() {
    // LoRA SFT lowers the task loss and SAP moves its probe on the other two families too
    // (Qwen3: q/k norms and a 128-wide attention; Llama: no biases, Llama 3 rotary scaling,
    // one key-value head), and the adapter each run writes loads back onto its base.
    for name in ["tiny-qwen3", "tiny-llama"] {
        for method in ["sft", "sap"] {
            let dir = tempfile::tempdir().unwrap();
            let mut run = config(
                dir.path(),
                &[
                    &format!("method=\"{method}\""),
                    "max_steps=12",
                    "batch_size=6",
                    "shuffle=false",
                    "sap.rho=0.1",
                    "lora.target_modules=[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]",
                ],
            );
            run.model = fixture(name);
            let (mut losses, mut probe_norms) = (Vec::new(), Vec::new());
            train(&run, &Device::flex(), |e| {
                if let Event::Step { metrics, .. } = e {
                    losses.push(metrics.task_loss);
                    probe_norms = metrics.probe_norms.clone();
                }
            })
            .unwrap();
            assert!(
                losses.iter().all(|l| l.is_finite()) && losses[11] < losses[0] * 0.9,
                "{name} {method}: {losses:?}"
            );
            if method == "sap" {
                assert!(
                    probe_norms.len() == 2 && probe_norms.iter().all(|n| *n > 0.0),
                    "{name}: {probe_norms:?}"
                );
            }
            let mut checkpoint = Checkpoint::load(&fixture(name), &Device::flex()).unwrap();
            checkpoint
                .load_adapter(&dir.path().join("adapter"))
                .unwrap_or_else(|e| panic!("{name} {method}: {e}"));
        }
    }
}

#[test]
fn sap_run_writes_probe_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    for schedule in ["lagged", "exact"] {
        let mut events = Vec::new();
        train(
            &config(
                dir.path(),
                &[&format!("sap.schedule=\"{schedule}\""), "sap.rho=0.1"],
            ),
            &Device::flex(),
            |e| events.push(e.clone()),
        )
        .unwrap();
        let steps: Vec<_> = events
            .iter()
            .filter_map(|e| {
                if let Event::Step { metrics, .. } = e {
                    Some(metrics.clone())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(steps.len(), 3);
        // Measured on step 0 (cosine_every = 10), one value per layer, each a cosine.
        let cosines = steps[0]
            .grad_cosine
            .clone()
            .expect("cosines on the first step");
        assert_eq!(cosines.len(), 2);
        assert!(
            cosines.iter().all(|c| c.abs() <= 1.0 + 1e-9 && *c != 0.0),
            "{cosines:?}"
        );
        assert!(steps[1].grad_cosine.is_none());
        assert!(steps.iter().all(|m| m.safety_loss.is_some()
            && m.su_loss.is_some()
            && m.delta_norm.unwrap() > 0.0));
        assert!(
            steps.last().unwrap().probe_norms.iter().any(|n| *n > 0.0),
            "{schedule}: the probe moved"
        );
        let probe = SafetensorsFiles::open_files(&[dir.path().join("probe.safetensors")]).unwrap();
        assert_eq!(
            probe.names().count(),
            2,
            "both layers of the tiny model are probed"
        );
    }
}

#[test]
fn bad_configs_fail_before_loading() {
    let out = tempfile::tempdir().unwrap();
    let base = format!(
        "model = {:?}\ntrain_data = {:?}\noutput_dir = {:?}\nmax_steps = 1\n",
        fixture("tiny-tied"),
        fixture("data/train.jsonl"),
        out.path()
    );
    let parse = |extra: &str, sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::parse(&format!("{base}{extra}"), &sets, Path::new("run.toml"))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(
        parse("method = \"sft\"\nlearning_rate = 1.0\n", &[])
            .contains("unknown field `learning_rate`")
    );
    assert!(parse("", &[]).contains("needs safety_data"));
    assert!(parse("method = \"sft\"\n", &["lora.target_modules=[\"qkv\"]"]).contains("\"qkv\""));
    assert!(parse("method = \"sft\"\n", &["max_steps=0"]).contains("max_steps"));
    let missing = parse("method = \"sft\"\n", &["train_data=\"/nope.jsonl\""]);
    assert!(missing.contains("/nope.jsonl"), "{missing}");

    let config = RunConfig::parse(
        &base,
        &[
            format!(
                "safety_data={:?}",
                fixture("data/safety.jsonl").display().to_string()
            ),
            "sap.layers=[1, 7]".into(),
        ],
        Path::new("run.toml"),
    )
    .unwrap();
    let error = train(&config, &Device::flex(), |_| {})
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(error, TrainError::Config(ref m) if m.contains("layer 7 is out of range")),
        "{error}"
    );

    // An empty data file is refused before the model loads (this model folder has only a
    // config.json, so loading it would fail differently).
    let empty = out.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let sets = [
        format!("train_data={:?}", empty.display().to_string()),
        "method=\"sft\"".into(),
    ];
    let mut config = RunConfig::parse(&base, &sets, Path::new("run.toml")).unwrap();
    config.model = out.path().join("config-only-model");
    std::fs::create_dir_all(&config.model).unwrap();
    std::fs::copy(
        fixture("tiny-tied/config.json"),
        config.model.join("config.json"),
    )
    .unwrap();
    let error = train(&config, &Device::flex(), |_| {})
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("empty.jsonl") && error.contains("no examples"),
        "{error}"
    );
}

/// The same steps as tests/fixtures/make_train_reference.py computes with PyTorch + peft.
#[test]
fn sft_and_sap_match_the_pytorch_reference() {
    let text = std::fs::read_to_string(fixture("train_reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let numbers = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for (label, method, schedule) in [
        ("sft", "sft", "lagged"),
        ("sap", "sap", "lagged"),
        ("sap_exact", "sap", "exact"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "model = {:?}\ninit_adapter = {:?}\ntrain_data = {:?}\nsafety_data = {:?}\noutput_dir = {:?}\nmethod = {method:?}\nshuffle = false\nmax_len = 256\nmax_steps = {}\nbatch_size = {}\nsafety_batch_size = {}\nlr = {}\n[sap]\nrho = {}\ntemperature = {}\nbeta = {}\nschedule = {schedule:?}\n",
            fixture("tiny-untied"),
            fixture("peft-adapter"),
            fixture("data/train.jsonl"),
            fixture("data/safety.jsonl"),
            dir.path(),
            reference["steps"],
            reference["batch_size"],
            reference["safety_batch_size"],
            reference["lr"],
            reference["rho"],
            reference["temperature"],
            reference["beta"],
        );
        let config = RunConfig::parse(&text, &[], Path::new("reference.toml")).unwrap();
        let mut losses = Vec::new();
        train(&config, &Device::flex(), |e| {
            if let Event::Step { metrics, .. } = e {
                losses.push(metrics.task_loss as f32);
            }
        })
        .unwrap();
        let expected = &reference[label];
        let loss_error = relative_error(&losses, &numbers(&expected["losses"]));
        assert!(
            loss_error <= 1e-5,
            "{label}: losses {losses:?} vs {}",
            expected["losses"]
        );
        for (name, values) in adapter_tensors(dir.path()) {
            let want = numbers(&expected["adapter"][&name]);
            let error = relative_error(&values, &want);
            assert!(error <= 1e-4, "{label}: {name} relative error {error}");
        }
        if method == "sap" {
            let files =
                SafetensorsFiles::open_files(&[dir.path().join("probe.safetensors")]).unwrap();
            let got: Vec<f32> = ["probe.layers.0", "probe.layers.1"]
                .iter()
                .flat_map(|n| files.read_f32(n, &[64]).unwrap())
                .collect();
            let want: Vec<f32> = expected["probe"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(numbers)
                .collect();
            let error = relative_error(&got, &want);
            assert!(error <= 1e-4, "probe relative error {error}");
        }
    }
}

/// The same SAP runs on wgpu (WGSL kernels in the step) and on the CPU (tensor-op twins).
///
/// The adapters are compared for the lagged schedule. Its probe is an Adam step from zero,
/// V = β·sign(∇_V L_su) on the first step, which flips wherever the gradient is at rounding
/// level; so probes are compared with the plain-gradient exact schedule (V = β·∇_V L_su).
#[test]
fn sap_on_wgpu_matches_the_cpu() {
    let wgpu = safeprobe_model::device::select(safeprobe_model::device::DeviceChoice::Wgpu)
        .expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)")
        .device;
    for schedule in ["lagged", "exact"] {
        let (cpu_dir, gpu_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let schedule_set = format!("sap.schedule=\"{schedule}\"");
        // T = 20 keeps the contrastive loss out of saturation on this random model; saturated,
        // its gradient underflows to exactly zero on wgpu a step earlier than on the CPU.
        let sets = [
            "sap.rho=0.1",
            "sap.temperature=20.0",
            "max_steps=2",
            "shuffle=false",
            schedule_set.as_str(),
        ];
        let mut probes = Vec::new();
        for (dir, device) in [
            (cpu_dir.path(), Device::flex()),
            (gpu_dir.path(), wgpu.clone()),
        ] {
            train(&config(dir, &sets), &device, |_| {}).unwrap();
            let files = SafetensorsFiles::open_files(&[dir.join("probe.safetensors")]).unwrap();
            probes.push(
                ["probe.layers.0", "probe.layers.1"]
                    .iter()
                    .flat_map(|n| files.read_f32(n, &[64]).unwrap())
                    .collect::<Vec<f32>>(),
            );
        }
        if schedule == "exact" {
            let error = relative_error(&probes[1], &probes[0]);
            assert!(error <= 1e-3, "exact: probe relative error {error}");
        }
        let pairs = adapter_tensors(gpu_dir.path())
            .into_iter()
            .zip(adapter_tensors(cpu_dir.path()));
        for ((name, a), (_, b)) in pairs {
            let error = relative_error(&a, &b);
            assert!(error <= 1e-4, "{schedule}: {name} relative error {error}");
        }
    }
}

#[test]
fn full_finetuning_epochs_split_and_mixing() {
    // Full fine-tuning writes a whole checkpoint that loads back and differs from the base.
    let dir = tempfile::tempdir().unwrap();
    let mut steps = 0;
    let mut validations = 0;
    let sets = [
        "finetune=\"full\"",
        "method=\"sft\"",
        "max_steps=0",
        "epochs=2.0",
        "batch_size=2",
        "validation_fraction=0.34",
        "lr=0.001",
    ];
    train(&config(dir.path(), &sets), &Device::flex(), |e| match e {
        Event::Step { .. } => steps += 1,
        Event::Validation { .. } => validations += 1,
        _ => {}
    })
    .unwrap();
    // 6 examples, 2 held out, 4 left: 2 epochs of batches of 2 = 4 steps.
    assert_eq!(steps, 4);
    assert_eq!(validations, 1, "validation at the end (eval_every 50 > 4)");
    let trained = Checkpoint::load(&dir.path().join("model"), &Device::flex()).unwrap();
    let base = Checkpoint::load(&fixture("tiny-tied"), &Device::flex()).unwrap();
    let (a, b) = (
        trained.model.norm.weight.val(),
        base.model.norm.weight.val(),
    );
    let moved: f32 = (a - b).abs().sum().into_scalar();
    assert!(
        moved > 0.0,
        "full fine-tuning moves every weight, the final norm included"
    );

    // Mixing the safe answers in adds three examples: 9 examples, one epoch of 3 = 3 steps.
    let dir = tempfile::tempdir().unwrap();
    let mut steps = 0;
    let sets = [
        "method=\"sft\"",
        "max_steps=0",
        "epochs=1.0",
        "batch_size=3",
        "mix_safety_data=true",
    ];
    train(&config(dir.path(), &sets), &Device::flex(), |e| {
        if let Event::Step { .. } = e {
            steps += 1
        }
    })
    .unwrap();
    assert_eq!(steps, 3);
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    // LoRA dropout on, so the per-step randomness has to be reproduced too.
    let sets = [
        "max_steps=5",
        "checkpoint_every=2",
        "sap.refresh_every=3",
        "sap.rho=0.1",
        "sap.temperature=20.0",
        "lora.dropout=0.3",
    ];
    let whole = tempfile::tempdir().unwrap();
    train(&config(whole.path(), &sets), &Device::flex(), |_| {}).unwrap();

    let broken = tempfile::tempdir().unwrap();
    train(&config(broken.path(), &sets), &Device::flex(), |_| {}).unwrap();
    // Pretend the run died after step 3: its last checkpoint is step 2, outputs are missing.
    std::fs::remove_dir_all(broken.path().join("checkpoints/step-4")).unwrap();
    std::fs::remove_dir_all(broken.path().join("adapter")).unwrap();
    std::fs::remove_file(broken.path().join("probe.safetensors")).unwrap();
    let mut resumed_steps = Vec::new();
    safeprobe_train::run::resume(broken.path(), &Device::flex(), |e| {
        if let Event::Step { step, .. } = e {
            resumed_steps.push(*step)
        }
    })
    .unwrap();
    assert_eq!(resumed_steps, vec![3, 4, 5]);
    assert_eq!(
        adapter_tensors(whole.path()),
        adapter_tensors(broken.path())
    );
    let probe = |dir: &Path| std::fs::read(dir.join("probe.safetensors")).unwrap();
    assert_eq!(probe(whole.path()), probe(broken.path()));
    let steps = |dir: &Path| {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count()
    };
    assert_eq!(
        steps(broken.path()),
        5,
        "metrics.jsonl keeps one line per step"
    );

    let empty = tempfile::tempdir().unwrap();
    let error = safeprobe_train::run::resume(empty.path(), &Device::flex(), |_| {})
        .map(|_| ())
        .unwrap_err();
    assert!(error.to_string().contains("config.toml"), "{error}");
}

/// SafeGrad (both alignment losses), Lisa and SPPFT: each trains, reports what it did on
/// every step, and a run resumed from a checkpoint mid-way (mid-state for Lisa, whose anchor
/// the checkpoint must carry; after SPPFT located its layers) ends with the uninterrupted
/// run's adapter bit for bit, LoRA dropout on.
#[test]
fn every_defence_resumes_bit_equal_and_reports_its_mechanism() {
    for method in [
        &["method=\"safegrad\""][..],
        &["method=\"safegrad\"", "safegrad.alignment_loss=\"kl\""],
        &[
            "method=\"lisa\"",
            "lisa.alignment_steps=1",
            "lisa.task_steps=2",
        ],
        &["method=\"sppft\"", "sppft.temperature=20.0"],
    ] {
        let sets: Vec<&str> = [
            "max_steps=5",
            "checkpoint_every=2",
            "lora.dropout=0.3",
            "lora.target_modules=[\"q_proj\", \"v_proj\"]",
        ]
        .into_iter()
        .chain(method.iter().copied())
        .collect();
        let whole = tempfile::tempdir().unwrap();
        let mut defences = Vec::new();
        train(&config(whole.path(), &sets), &Device::flex(), |e| {
            if let Event::Step { metrics, .. } = e {
                defences.push(metrics.defence.clone());
            }
        })
        .unwrap();
        assert!(
            defences.iter().all(Option::is_some),
            "{method:?}: {defences:?}"
        );

        let broken = tempfile::tempdir().unwrap();
        train(&config(broken.path(), &sets), &Device::flex(), |_| {}).unwrap();
        std::fs::remove_dir_all(broken.path().join("checkpoints/step-4")).unwrap();
        std::fs::remove_dir_all(broken.path().join("adapter")).unwrap();
        safeprobe_train::run::resume(broken.path(), &Device::flex(), |_| {}).unwrap();
        assert_eq!(
            adapter_tensors(whole.path()),
            adapter_tensors(broken.path()),
            "{method:?}"
        );

        use safeprobe_wire::Defence;
        match defences[0].clone().unwrap() {
            Defence::Projection {
                alignment_loss,
                cosine,
                removed,
                ..
            } => {
                assert!(
                    alignment_loss.is_finite()
                        && cosine.abs() <= 1.0
                        && (0.0..=1.0).contains(&removed)
                );
                // The KL loss's reference is the model the run started from: at the first
                // step the two are the same model, and the KL is 0.
                if method.contains(&"safegrad.alignment_loss=\"kl\"") {
                    assert!(alignment_loss.abs() < 1e-6, "{alignment_loss}");
                }
            }
            Defence::Lisa { .. } => {
                let states: Vec<bool> = defences
                    .iter()
                    .map(|d| {
                        matches!(
                            d,
                            Some(Defence::Lisa {
                                alignment_state: true,
                                ..
                            })
                        )
                    })
                    .collect();
                assert_eq!(states, [true, false, false, true, false]);
            }
            Defence::Frozen { layers, removed } => {
                assert_eq!(layers.len(), 1, "a quarter of 2 layers, rounded up");
                assert!(removed > 0.0 && removed < 1.0, "{removed}");
                // The frozen layer's adapter never moved: its B is still all zeros.
                let frozen = format!("layers.{}.", layers[0]);
                for (name, values) in adapter_tensors(whole.path()) {
                    let zero = values.iter().all(|v| *v == 0.0);
                    if name.contains("lora_B") {
                        assert_eq!(zero, name.contains(&frozen), "{name}");
                    }
                }
            }
        }
    }
}

#[test]
fn parquet_and_jsonl_read_the_same() {
    let examples = |ext: &str| data::read_examples(&fixture(&format!("data/train.{ext}"))).unwrap();
    assert_eq!(examples("parquet"), examples("jsonl"));
    assert_eq!(examples("jsonl").len(), 6);
    let pairs = |ext: &str| data::read_pairs(&fixture(&format!("data/safety.{ext}"))).unwrap();
    assert_eq!(pairs("parquet"), pairs("jsonl"));

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.parquet");
    std::fs::write(&broken, b"PAR1 not really").unwrap();
    let error = data::read_examples(&broken).unwrap_err().to_string();
    assert!(
        error.contains("broken.parquet") && error.contains("Parquet"),
        "{error}"
    );
    let bad_line = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_line,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 1}\n",
    )
    .unwrap();
    let error = data::read_examples(&bad_line).unwrap_err().to_string();
    assert!(error.contains("bad.jsonl:2"), "{error}");
}

/// Two micro-batches of 3 make the same step as one batch of 6 (SFT and SAP).
#[test]
fn gradient_accumulation_equals_one_big_batch() {
    for method in ["sft", "sap"] {
        let method = format!("method=\"{method}\"");
        let (big, small) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let common = [
            method.as_str(),
            "max_steps=2",
            "shuffle=false",
            "sap.rho=0.1",
            "sap.temperature=20.0",
        ];
        let with = |extra: &[&'static str]| {
            common
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .collect::<Vec<_>>()
        };
        train(
            &config(big.path(), &with(&["batch_size=6"])),
            &Device::flex(),
            |_| {},
        )
        .unwrap();
        train(
            &config(
                small.path(),
                &with(&["batch_size=3", "grad_accumulation=2"]),
            ),
            &Device::flex(),
            |_| {},
        )
        .unwrap();
        for ((name, a), (_, b)) in adapter_tensors(big.path())
            .iter()
            .zip(adapter_tensors(small.path()).iter())
        {
            let error = relative_error(b, a);
            assert!(error <= 1e-5, "{method}: {name} relative error {error}");
        }
    }
}

#[test]
fn data_errors_name_the_file_line_and_oversized_records_are_refused_early() {
    let dir = tempfile::tempdir().unwrap();
    // Blank lines before the bad example: the error names its line (5), not its index (2).
    let data = dir.path().join("lines.jsonl");
    let long_prompt = "word ".repeat(400);
    std::fs::write(
        &data,
        format!(
            "\n{{\"prompt\": \"a\", \"response\": \"b\"}}\n\n\n{{\"prompt\": \"{long_prompt}\", \"response\": \"c\"}}\n"
        ),
    )
    .unwrap();
    let output = dir.path().join("run");
    let mut run = config(&output, &["max_len=128"]);
    run.train_data = data.clone();
    let error = train(&run, &Device::flex(), |_| {})
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains("lines.jsonl:5:"), "{error}");
    assert!(error.contains("max_len"), "{error}");

    // One record over the limit is refused by size, before it is parsed or tokenised.
    let huge = dir.path().join("huge.jsonl");
    let text = "x".repeat(data::MAX_RECORD_BYTES + 1);
    std::fs::write(
        &huge,
        format!("{{\"prompt\": \"a\", \"response\": \"b\"}}\n{{\"prompt\": \"{text}\", \"response\": \"b\"}}\n"),
    )
    .unwrap();
    let error = data::read_examples(&huge).unwrap_err().to_string();
    assert!(
        error.contains("huge.jsonl:2:") && error.contains("limit"),
        "{error}"
    );
    let array = dir.path().join("huge.json");
    std::fs::write(
        &array,
        format!("[{{\"instruction\": \"{text}\", \"output\": \"b\"}}]"),
    )
    .unwrap();
    let error = data::read_examples(&array).unwrap_err().to_string();
    assert!(
        error.contains("huge.json:1:") && error.contains("limit"),
        "{error}"
    );
}

#[test]
fn duplicate_probe_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "model = {:?}\ntrain_data = {:?}\nsafety_data = {:?}\noutput_dir = {:?}\nmax_steps = 3\nmethod = \"sap\"\n",
        fixture("tiny-tied"),
        fixture("data/train.jsonl"),
        fixture("data/safety.jsonl"),
        dir.path()
    );
    let error = RunConfig::parse(&text, &["sap.layers=[1, 1]".into()], Path::new("dup.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("sap.layers") && error.contains("twice"),
        "{error}"
    );
}

#[test]
fn old_checkpoints_are_pruned_and_resume_explains_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    train(
        &config(
            dir.path(),
            &["max_steps=5", "checkpoint_every=1", "keep_checkpoints=2"],
        ),
        &Device::flex(),
        |_| {},
    )
    .unwrap();
    let kept: Vec<usize> = safeprobe_train::checkpoint::all(dir.path())
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(kept, vec![4, 5]);

    // A run that writes checkpoints but stopped before its first one.
    for (every, expected) in [
        (10, "before its first checkpoint"),
        (0, "checkpoint_every = 0"),
    ] {
        let early = tempfile::tempdir().unwrap();
        train(
            &config(early.path(), &[&format!("checkpoint_every={every}")]),
            &Device::flex(),
            |_| {},
        )
        .unwrap();
        let error = safeprobe_train::run::resume(early.path(), &Device::flex(), |_| {})
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(expected),
            "checkpoint_every = {every}: {error}"
        );
    }
}

/// The sign convention of the mechanism metrics: learning the pairs' safe answers lowers the
/// safety loss (cosine > 0), learning their harmful answers raises it (cosine < 0).
#[test]
fn alignment_is_positive_when_the_task_step_is_a_safer_step() {
    let pairs = data::read_pairs(&fixture("data/safety.jsonl")).unwrap();
    let mut at_zero = Vec::new();
    for answer in ["safe", "harmful"] {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("task.jsonl");
        let lines: String = pairs
            .iter()
            .map(|p| {
                let reply = if answer == "safe" {
                    &p.chosen
                } else {
                    &p.rejected
                };
                format!(
                    "{}\n",
                    serde_json::json!({"prompt": p.prompt, "response": reply})
                )
            })
            .collect();
        std::fs::write(&task, lines).unwrap();
        let mut run = config(
            &dir.path().join("run"),
            &[
                "method=\"sap\"",
                "max_steps=3",
                "sap.temperature=20.0",
                "sap.rho=0.1",
                "sap.cosine_every=1",
                "shuffle=false",
            ],
        );
        run.train_data = task;
        let mut alignments = Vec::new();
        train(&run, &Device::flex(), |e| {
            if let Event::Step { metrics, .. } = e {
                alignments.push(metrics.alignment.clone().expect("measured every step"));
            }
        })
        .unwrap();
        // Step 1 runs with the zero probe (lagged schedule), so all three views agree there.
        let first = &alignments[0];
        assert_eq!(first.at_probe, Some(first.at_zero), "{first:?}");
        assert_eq!(first.at_random, Some(first.at_zero), "{first:?}");
        // Later the probe is not zero, and the control is a different probe.
        let later = &alignments[2];
        assert_ne!(later.at_probe, Some(later.at_zero), "{later:?}");
        assert_ne!(later.at_random, later.at_probe, "{later:?}");
        assert!(
            later.seconds > 0.0 && later.per_layer_at_random.len() == later.per_layer_at_zero.len()
        );
        at_zero.push(first.at_zero);
    }
    assert!(
        at_zero[0] > 0.0,
        "learning safe answers is a safer step: {at_zero:?}"
    );
    assert!(
        at_zero[1] < 0.0,
        "learning harmful answers is not: {at_zero:?}"
    );
}

#[test]
fn the_random_control_probe_matches_the_probe_in_size_only() {
    let device = Device::flex();
    let probe = vec![
        Tensor::<1>::from_data(TensorData::new(vec![3.0f32, 4.0, 0.0, 0.0], [4]), &device),
        Tensor::<1>::from_data(TensorData::new(vec![0.0f32; 4], [4]), &device),
    ];
    let random = safeprobe_train::sap::random_signs_like(&probe, 7);
    let values = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
    // Every entry is ±‖v‖/√n: the same norm, but signs unrelated to v.
    assert!(
        values(&random[0])
            .iter()
            .all(|x| (x.abs() - 2.5).abs() < 1e-6),
        "{:?}",
        values(&random[0])
    );
    assert!(values(&random[1]).iter().all(|x| *x == 0.0));
    assert_eq!(
        values(&random[0]),
        values(&safeprobe_train::sap::random_signs_like(&probe, 7)[0])
    );
    assert_ne!(
        values(&random[0]),
        values(&safeprobe_train::sap::random_signs_like(&probe, 8)[0])
    );
}

/// SFT runs with safety pairs measure the same V = 0 cosine SAP's first step does (same
/// model, batch and pairs), and a resumed SFT run draws the same measurement pairs.
#[test]
fn sft_runs_measure_the_alignment_at_zero_too() {
    let alignments = |method: &str| {
        let dir = tempfile::tempdir().unwrap();
        let method = format!("method=\"{method}\"");
        let run = config(
            dir.path(),
            &[
                method.as_str(),
                "max_steps=3",
                "sap.temperature=20.0",
                "sap.cosine_every=2",
            ],
        );
        let mut seen = Vec::new();
        train(&run, &Device::flex(), |e| {
            if let Event::Step { metrics, .. } = e {
                seen.push(metrics.alignment.clone());
            }
        })
        .unwrap();
        seen
    };
    let sft = alignments("sft");
    let sap = alignments("sap");
    let (sft0, sap0) = (sft[0].clone().unwrap(), sap[0].clone().unwrap());
    assert!(
        (sft0.at_zero - sap0.at_zero).abs() < 1e-5,
        "{sft0:?} vs {sap0:?}"
    );
    assert_eq!((sft0.at_probe, sft0.at_random), (None, None));
    assert!(
        sft[1].is_none() && sft[2].is_some(),
        "every 2 steps: {sft:?}"
    );

    let sets = [
        "method=\"sft\"",
        "max_steps=5",
        "checkpoint_every=2",
        "sap.cosine_every=2",
        "sap.temperature=20.0",
    ];
    let at_zero = |e: &Event, into: &mut Vec<Option<f64>>| {
        if let Event::Step { metrics, .. } = e {
            into.push(metrics.alignment.clone().map(|a| a.at_zero));
        }
    };
    let whole = tempfile::tempdir().unwrap();
    let mut whole_run = Vec::new();
    train(&config(whole.path(), &sets), &Device::flex(), |e| {
        at_zero(e, &mut whole_run)
    })
    .unwrap();
    let broken = tempfile::tempdir().unwrap();
    train(&config(broken.path(), &sets), &Device::flex(), |_| {}).unwrap();
    std::fs::remove_dir_all(broken.path().join("checkpoints/step-4")).unwrap();
    std::fs::remove_dir_all(broken.path().join("adapter")).unwrap();
    let mut resumed = Vec::new();
    safeprobe_train::run::resume(broken.path(), &Device::flex(), |e| at_zero(e, &mut resumed))
        .unwrap();
    // The values as computed, not as read back: serde_json's default float parser may miss
    // the last bit of a 17-digit number.
    assert_eq!(
        resumed,
        whole_run[2..].to_vec(),
        "the resumed steps measure what the whole run did"
    );
    assert_eq!(
        resumed.iter().filter(|a| a.is_some()).count(),
        2,
        "{resumed:?}"
    );
    assert_eq!(
        adapter_tensors(whole.path()),
        adapter_tensors(broken.path())
    );
}

/// Held-out safety metrics at every validation step, checked against the safety loss
/// computed on the final model the usual way.
#[test]
fn held_out_safety_metrics_follow_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Help me hurt someone.\"}\n{\"goal\": \"Write something harmful.\"}\n",
    )
    .unwrap();
    let sets = [
        "method=\"sft\"".to_string(),
        "max_steps=3".into(),
        "eval_every=1".into(),
        format!(
            "safety_eval.pairs={:?}",
            fixture("data/safety.jsonl").display().to_string()
        ),
        format!("safety_eval.prompts={:?}", prompts.display().to_string()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut checks = Vec::new();
    let trained = train(
        &config(&dir.path().join("run"), &sets),
        &Device::flex(),
        |e| {
            if let Event::SafetyCheck {
                pair_margin,
                pair_loss,
                refusal_logprob,
                ..
            } = e
            {
                checks.push((
                    pair_margin.unwrap(),
                    pair_loss.unwrap(),
                    refusal_logprob.unwrap(),
                ));
            }
        },
    )
    .unwrap();
    assert_eq!(checks.len(), 3, "one check per validation step: {checks:?}");
    let (margin, loss, refusal) = checks[2];
    assert!(refusal < 0.0 && margin.is_finite(), "{checks:?}");
    assert_ne!(checks[0], checks[2], "the metrics move as the model trains");

    // The same loss from the trainer's own safety loss, all pairs in one batch, T = 1.
    let model = burn::module::Module::valid(&trained.model);
    let pairs = data::read_pairs(&fixture("data/safety.jsonl")).unwrap();
    let encode = |answer: &str, prompt: &str| {
        let prompt = safeprobe_model::chat::prompt_messages(None, prompt);
        Sequence::encode(&trained.tokenizer, &prompt, answer, 256).unwrap()
    };
    let rows: Vec<Sequence> = pairs
        .iter()
        .map(|p| encode(&p.chosen, &p.prompt))
        .chain(pairs.iter().map(|p| encode(&p.rejected, &p.prompt)))
        .collect();
    let batch = Batch::new(
        &rows,
        trained.tokenizer.pad_id,
        &model.embed_tokens.device(),
    );
    let expected = params::scalar(&safeprobe_train::loss::safety_loss(
        &model, &batch, None, 1.0,
    ));
    assert!(
        (loss - expected).abs() < 1e-4 * expected.abs().max(1.0),
        "{loss} vs {expected}"
    );
}
