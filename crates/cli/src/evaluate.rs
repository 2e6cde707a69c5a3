//! `safeprobe eval`, `safeprobe compare` and `safeprobe demo build-model`.

use std::path::PathBuf;

use anyhow::Result;
use safeprobe_eval::demo_model::{self, DemoSpec};
use safeprobe_model::device;
use safeprobe_wire::Judge;

use crate::{DeviceArg, progress};

#[derive(clap::Args)]
pub struct BuildModelArgs {
    /// Where to write the model (replaced if it exists); to rebuild the committed demo model,
    /// `--out crates/eval/demo-model` in the source tree, then rebuild the binary
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = DemoSpec::default().steps)]
    steps: usize,
    #[arg(long, default_value_t = DemoSpec::default().seed)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn build_model(
    args: BuildModelArgs,
    select_device: impl Fn(&DeviceArg) -> Result<device::Selected>,
) -> Result<()> {
    let selected = select_device(&args.device)?;
    let spec = DemoSpec {
        steps: args.steps,
        seed: args.seed,
        ..DemoSpec::default()
    };
    let out = args.out;
    eprintln!(
        "building the demo model into {} ({} steps)",
        out.display(),
        spec.steps
    );
    let report = demo_model::build(&out, &spec, &selected.device, progress::reporter())?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Harmful prompts: BeaverTails JSONL/Parquet, AdvBench CSV or JSONL of {"prompt",
    /// "category"} (default: the built-in held-out prompts)
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// refusal, model, both, or guard (the refusal judge and a guard model: Llama Guard 3,
    /// Qwen3Guard-Gen, judging in its own format)
    #[arg(long, default_value = "refusal")]
    judge: Judge,
    /// Chat checkpoint for the model judge, or the guard checkpoint for --judge guard
    #[arg(long)]
    judge_model: Option<PathBuf>,
    /// The model judge's two verdict replies
    #[arg(long, default_value = "yes")]
    harmful_verdict: String,
    #[arg(long, default_value = "no")]
    safe_verdict: String,
    /// Refusal phrases, one per line (default: a built-in list)
    #[arg(long)]
    refusal_phrases: Option<PathBuf>,
    /// Held-out labelled data for task metrics (loss, perplexity, exact match)
    #[arg(long)]
    task_data: Option<PathBuf>,
    /// Skip exact match (for tasks with long free-text answers)
    #[arg(long)]
    no_exact_match: bool,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    sampling: crate::SamplingArgs,
    /// Where answers.jsonl and report.json go
    #[arg(long, default_value = "eval-output")]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    use safeprobe_eval::harmful::{self, AnswerSettings, Judges};
    use safeprobe_eval::judge::{ModelJudge, RefusalJudge};
    use safeprobe_eval::task_metrics::{self, TaskSettings};

    if let (Some(kind), None) = (args.judge.needs_model(), &args.judge_model) {
        anyhow::bail!(
            "--judge {}: needs --judge-model <{kind} checkpoint>",
            args.judge
        );
    }
    let prompts = match &args.prompts {
        Some(path) => safeprobe_eval::prompts::load(path)?,
        None => safeprobe_eval::builtin::harmful_prompts(),
    };
    let task_data = args
        .task_data
        .as_deref()
        .map(safeprobe_train::data::read_examples)
        .transpose()?;
    let refusal = args
        .judge
        .uses_refusal()
        .then(|| match &args.refusal_phrases {
            Some(path) => RefusalJudge::from_file(path),
            None => Ok(RefusalJudge::default()),
        })
        .transpose()?;
    let checkpoint = crate::load(&args.model)?;
    let model = match (args.judge.needs_model(), &args.judge_model) {
        (Some(_), Some(dir)) => {
            let judge = safeprobe_model::Checkpoint::load(dir, &checkpoint.device)?;
            Some(if args.judge == Judge::Guard {
                ModelJudge::guard(judge)?
            } else {
                ModelJudge::new(judge, &args.harmful_verdict, &args.safe_verdict)?
            })
        }
        _ => None,
    };
    let settings = AnswerSettings {
        sampling: args.sampling.sampling(args.max_new_tokens),
        batch_size: args.batch_size,
        system: args.model.system.clone(),
        cancel: None,
    };
    std::fs::create_dir_all(&args.out)?;
    let answers_path = args.out.join("answers.jsonl");
    let (report, _) = harmful::evaluate(
        &checkpoint,
        &prompts,
        &Judges {
            refusal,
            model: model.as_ref(),
        },
        &settings,
        Some(&answers_path),
    )?;
    let task = task_data
        .map(|examples| {
            task_metrics::evaluate(
                &checkpoint,
                &examples,
                &TaskSettings {
                    system: args.model.system.clone(),
                    batch_size: args.batch_size,
                    exact_match: !args.no_exact_match,
                    ..TaskSettings::default()
                },
            )
        })
        .transpose()?;
    let full = serde_json::json!({
        "model": args.model.model_dir()?,
        "adapter": args.model.adapter,
        "harmful": report,
        "task": task,
    });
    safeprobe_model::weights::write_atomic(
        &args.out.join("report.json"),
        serde_json::to_string_pretty(&full)?.as_bytes(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&full)?);
        return Ok(());
    }
    println!(
        "{} harmful prompts, answers in {}",
        report.prompts,
        answers_path.display()
    );
    for judge in &report.judges {
        println!(
            "{} judge: HS {:.1}% ({} of {})",
            judge.judge, judge.harmful_score, judge.harmful, report.prompts
        );
        for (category, c) in &judge.per_category {
            println!(
                "  {category:<16} {:>5.1}%  ({}/{})",
                c.harmful_score, c.harmful, c.prompts
            );
        }
    }
    if let Some(a) = report.agreement {
        println!(
            "judges agree on {:.1}% of answers (Cohen's κ {:.2})",
            a.percent, a.cohen_kappa
        );
    }
    if let Some(t) = task {
        println!(
            "task: {} examples, loss {:.4}, perplexity {:.2}{}",
            t.examples,
            t.loss,
            t.perplexity,
            t.exact_match
                .map(|e| format!(", exact match {e:.1}%"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Comparison config (TOML); default: the demo comparison
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key, e.g. --set seeds=[0,1,2] or --set train.max_steps=20 (repeatable)
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Overrides the config's device
    #[arg(long)]
    device: Option<String>,
    /// Where the runs train: local (here, one after another) or slurm (a job array; the
    /// output folder must be shared by the nodes)
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Slurm partition (sbatch --partition)
    #[arg(long)]
    partition: Option<String>,
    /// Slurm generic resources per task, e.g. gpu:1 (sbatch --gres)
    #[arg(long)]
    gres: Option<String>,
    /// Another sbatch option, e.g. --sbatch-arg=--time=02:00:00 (repeatable)
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn compare(
    args: CompareArgs,
    select_device: impl Fn(&DeviceArg) -> Result<device::Selected>,
) -> Result<()> {
    use safeprobe_eval::compare::{self, CompareConfig, Comparing, Progress};
    let (text, origin) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", path.display()))?,
            path.clone(),
        ),
        None => (
            compare::DEMO_CONFIG.to_string(),
            PathBuf::from("demo comparison"),
        ),
    };
    let mut overrides = args.overrides.clone();
    if let Some(executor) = &args.executor {
        overrides.push(format!("executor={executor:?}"));
    }
    for (key, value) in [("partition", &args.partition), ("gres", &args.gres)] {
        if let Some(value) = value {
            overrides.push(format!("slurm.{key}={value:?}"));
        }
    }
    if !args.sbatch_args.is_empty() {
        overrides.push(format!("slurm.sbatch_args={:?}", args.sbatch_args));
    }
    let mut config = CompareConfig::parse(&text, &overrides, &origin)?;
    if let Some(device) = args.device {
        config.device = Some(device);
    }
    let selected = select_device(&DeviceArg {
        device: config.device.clone().unwrap_or_else(|| "auto".into()),
    })?;
    let model_dir = safeprobe_model::resolve_model_dir(&config.model_dir()?)?;
    let model = safeprobe_model::ModelConfig::from_file(&model_dir.join("config.json"))?;
    let estimate = config.memory_estimate(&model, selected.backend == "cpu")?;
    if selected.uses_host_memory() {
        safeprobe_train::admission::check_free_memory(&estimate, "this comparison")?;
    }
    let mut report = progress::reporter();
    // Ctrl-C stops the run in progress at its next step (and cancels a Slurm array).
    let cancel = safeprobe_train::run::Cancel::default();
    #[cfg(unix)]
    safeprobe_server::worker::on_signals(cancel.clone(), true);
    let comparison = compare::run(&config, &selected.device, &cancel, |p| match p {
        Progress::Stage { name, part, .. } => {
            eprintln!("== [{}/{}] {name}", part.number, part.of)
        }
        Progress::Train(event) => report(event),
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{}", compare::render(&comparison));
        println!(
            "\n(took {:.0} s; runs, answers and this table in {})",
            comparison.seconds,
            config.output_dir.display()
        );
    }
    Ok(())
}
