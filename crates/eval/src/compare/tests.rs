use std::path::{Path, PathBuf};

use super::aggregate::{condition, findings, table_rows};
use super::*;
use crate::builtin;
use crate::error::Result;
use safeprobe_wire::spec::Task;

fn result(method: Method, hs: f64, em: f64, time: Option<f64>) -> RunResult {
    RunResult {
        method,
        seed: Some(0),
        run_dir: PathBuf::new(),
        harmful_score: hs,
        harmful_score_model_judge: None,
        exact_match: em,
        validation_loss: 1.0,
        step_time_s: time,
        final_task_loss: None,
        refusal_logprob: None,
        mechanism: None,
    }
}

fn demo_config_with(overrides: &[&str]) -> Result<CompareConfig> {
    let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
    let origin = Path::new("test");
    CompareConfig::parse(DEMO_CONFIG, &overrides, origin)
}

/// The committed comparison configs (configs/) stay valid: every run config they make is
/// checked, as `safeprobe compare --config` would.
#[test]
fn the_committed_configs_parse() {
    for (name, text) in [
        (
            "compare-official-lora.toml",
            include_str!("../../../../configs/compare-official-lora.toml"),
        ),
        (
            "compare-qwen2.5-lora-poisoned.toml",
            include_str!("../../../../configs/compare-qwen2.5-lora-poisoned.toml"),
        ),
        (
            "compare-qwen2.5-lora-poisoned-cpu.toml",
            include_str!("../../../../configs/compare-qwen2.5-lora-poisoned-cpu.toml"),
        ),
    ] {
        let config = CompareConfig::parse(text, &[], Path::new(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.train.0["lora"]["r"].as_u64(), Some(8), "{name}");
        assert_eq!(
            config.train.0["sap"]["temperature"].as_f64(),
            Some(1.0),
            "{name}"
        );
    }
}

/// The all-methods config keeps the demo comparison's runs and adds one per defence, each
/// with its settings in [train].
#[test]
fn the_all_methods_config_runs_every_method_on_the_demo_settings() {
    let name = "compare-all-methods.toml";
    let text = include_str!("../../../../configs/compare-all-methods.toml");
    let all = CompareConfig::parse(text, &[], Path::new(name)).unwrap();
    let demo = demo_config_with(&[]).unwrap();
    let fine_tuned: Vec<Method> = Method::ALL
        .into_iter()
        .filter(|m| *m != Method::Base)
        .collect();
    assert_eq!(all.methods, fine_tuned);
    assert_eq!(
        (&all.seeds, &all.poison_fraction),
        (&demo.seeds, &demo.poison_fraction)
    );
    for key in ["finetune", "max_steps", "batch_size", "lr", "sap"] {
        assert_eq!(all.train.0[key], demo.train.0[key], "train.{key}");
    }
    let runs = all
        .first_seed_runs(Path::new("m"), &all.run_files())
        .unwrap();
    let methods: Vec<Method> = runs.iter().map(|r| r.method).collect();
    assert_eq!(methods, [fine_tuned.clone(), fine_tuned].concat());
    assert!(
        runs.iter()
            .all(|r| r.sppft.temperature == 100.0 && r.lisa.task_steps == 9)
    );
}

#[test]
fn a_config_is_checked_before_its_data_and_model_exist() {
    // Nothing at the output folder yet, and the demo model need not be unpacked.
    let nowhere = "output_dir=\"/nonexistent/safeprobe-compare\"";
    let config = demo_config_with(&[nowhere]).unwrap();
    assert_eq!(config.model, None);
    assert!(!Path::new("/nonexistent").exists());
    // The runs' trainer settings are still checked.
    let e = demo_config_with(&[nowhere, "train.lr=0.0"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.lr: 0 must be positive") && e.contains("(the sft runs)"),
        "{e}"
    );
}

#[test]
fn rows_spread_and_overhead() {
    let runs = vec![
        result(Method::Base, 5.0, 10.0, None),
        result(Method::Sft, 40.0, 80.0, Some(0.1)),
        result(Method::Sft, 50.0, 90.0, Some(0.1)),
        result(Method::Sap, 20.0, 84.0, Some(0.25)),
        result(Method::Sap, 30.0, 86.0, Some(0.25)),
    ];
    let rows = table_rows(&runs);
    assert_eq!(rows.len(), 3);
    let sft = &rows[1];
    assert_eq!(sft.harmful_score.mean, 45.0);
    assert!((sft.harmful_score.std - 50f64.sqrt()).abs() < 1e-12);
    assert!((rows[2].overhead_vs_sft.unwrap() - 2.5).abs() < 1e-12);
    let findings = findings(&rows);
    assert!(
        findings[0].starts_with("SFT raised HS from 5.0% (base) to 45.0%"),
        "{findings:?}"
    );
    assert!(
        findings[1].starts_with("SAP's HS is 20.0 points below SFT's"),
        "{findings:?}"
    );
    assert!(findings[2].contains("within 5% of SFT"), "{findings:?}");
}

#[test]
fn findings_say_when_sap_does_not_help() {
    let runs = vec![
        result(Method::Sft, 20.0, 80.0, Some(0.1)),
        result(Method::Sap, 25.0, 60.0, Some(0.2)),
    ];
    let findings = findings(&table_rows(&runs));
    assert!(findings[0].contains("did NOT lower HS"), "{findings:?}");
    assert!(
        findings[1].contains("25.0% below SFT: more than 5%"),
        "{findings:?}"
    );
}

#[test]
fn config_errors_name_the_field() {
    let origin = Path::new("c.toml");
    let err = CompareConfig::parse("task = \"poetry\"", &[], origin).unwrap_err();
    assert!(err.to_string().contains("task"), "{err}");
    let err = CompareConfig::parse("[train]\nmethod = \"sft\"", &[], origin).unwrap_err();
    assert!(err.to_string().contains("train.method"), "{err}");
    let err = CompareConfig::parse("[train]\nmax_steps = 5\nlr = -1.0", &[], origin).unwrap_err();
    assert!(err.to_string().contains("lr: -1 must be positive"), "{err}");
    let err =
        CompareConfig::parse("methods = []\n[train]\nmax_steps = 5", &[], origin).unwrap_err();
    assert!(err.to_string().contains("methods"), "{err}");
    let err = CompareConfig::parse("poison_fraction = 1.5\n[train]\nmax_steps = 5", &[], origin)
        .unwrap_err();
    assert!(err.to_string().contains("poison_fraction"), "{err}");
    let err =
        CompareConfig::parse("seeds = [1, 2, 1]\n[train]\nmax_steps = 5", &[], origin).unwrap_err();
    assert!(
        err.to_string().contains("seeds: 1 is listed twice"),
        "{err}"
    );
    let err = CompareConfig::parse("colour = 1", &[], origin).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    for (text, says) in [
        (
            "poison_fraction = [0.0, 0.1, 0.1]",
            "0.1 and 0.1 are the same condition (10%)",
        ),
        (
            "methods = [\"sft\", \"sap\", \"sft\"]",
            "methods: sft is listed twice",
        ),
        (
            "poison_fraction = [0.1, 0.10001]",
            "0.1 and 0.10001 are the same condition",
        ),
        (
            "poison_fraction = []",
            "poison_fraction: give at least one value",
        ),
        (
            "poison_fraction = [0.0, 1.0]",
            "poison_fraction: 1 must be in [0, 1)",
        ),
        (
            "poison_fraction = \"a tenth\"",
            "poison_fraction: give a number (0.1) or a list",
        ),
    ] {
        let err = CompareConfig::parse(&format!("{text}\n[train]\nmax_steps = 5"), &[], origin)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(says) && err.contains("c.toml"),
            "{text}: {err}"
        );
    }
}

/// Slurm settings are checked with the config, each named by its key; under Slurm the memory
/// this machine needs is the answering alone (the runs train on the nodes).
#[test]
fn slurm_settings_are_checked_and_size_only_what_runs_here() {
    for (text, says) in [
        ("executor = \"pbs\"", "executor"),
        (
            "[slurm]\npartition = \"a b\"",
            "slurm.partition: \"a b\" is not one word",
        ),
        (
            "[slurm]\nsbatch_args = [\"time=1\"]",
            "slurm.sbatch_args: \"time=1\" is not an option",
        ),
        (
            "[slurm]\npoll_seconds = 0.0",
            "slurm.poll_seconds: 0 must be in 0.1..=600",
        ),
        ("[slurm]\nqueue = \"x\"", "queue"),
        (
            &format!("[slurm]\npartition = \"{}\"", "p".repeat(257)),
            "slurm.partition: 257 characters is longer than 256",
        ),
        (
            &format!(
                "[slurm]\nsbatch_args = [\"--comment={}\"]",
                "c".repeat(2000)
            ),
            "slurm.sbatch_args: \"--comment=ccc",
        ),
        (
            &format!(
                "[slurm]\nsbatch_args = [{}]",
                vec!["\"--nice=1\""; 65].join(", ")
            ),
            "slurm.sbatch_args: 65 options is more than 64",
        ),
    ] {
        let err = CompareConfig::parse(text, &[], Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
    let model = safeprobe_model::ModelConfig::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model/config.json"),
    )
    .unwrap();
    let local = demo_config_with(&[]).unwrap();
    let on_slurm = demo_config_with(&["executor=\"slurm\""]).unwrap();
    let answering = crate::harmful::answer_memory(&model, local.max_new_tokens);
    let here = on_slurm.memory_estimate(&model, true).unwrap();
    assert_eq!(here.total(), answering.total());
    assert!(local.memory_estimate(&model, true).unwrap().total() > here.total());
}

/// The demo compares under the paper's two threat models; one value (as `--set
/// poison_fraction=0.1` gives) is one condition, whose runs keep the single-condition
/// layout, while several conditions each get a folder.
#[test]
fn poison_fractions_are_conditions() {
    let demo = demo_config_with(&[]).unwrap();
    assert_eq!(demo.poison_fraction, vec![0.0, 0.1]);
    let out = &demo.output_dir;
    assert_eq!(
        demo.run_dir(0.0, Method::Sap, 2),
        out.join("benign/sap-seed2")
    );
    assert_eq!(
        demo.run_dir(0.1, Method::Sft, 0),
        out.join("poison-10pct/sft-seed0")
    );
    assert_eq!(demo.run_dir(0.1, Method::Base, 0), out.join("base"));
    let steps = demo.planned_steps().unwrap();
    assert_eq!(
        steps,
        2 * 3 * 3 * 120,
        "conditions × seeds × methods × steps"
    );

    let one = demo_config_with(&["poison_fraction=0.05"]).unwrap();
    assert_eq!(one.poison_fraction, vec![0.05]);
    assert_eq!(one.run_dir(0.05, Method::Mix, 1), out.join("mix-seed1"));
    assert_eq!(one.planned_steps().unwrap(), steps / 2);
    // Each condition's runs are trained on that condition's data.
    let files = builtin::DataFiles::in_dir(&demo.data_dir(), Task::Arithmetic).for_runs();
    for poison in [0.0, 0.1] {
        let run = demo
            .run_config(poison, Method::Sap, 0, Path::new("m"), &files)
            .unwrap();
        assert_eq!(run.poison_fraction, poison);
        assert_eq!(run.output_dir, demo.run_dir(poison, Method::Sap, 0));
    }
}

/// Markdown: a heading per condition when there are several, none for one benign one.
#[test]
fn the_rendering_names_each_condition() {
    let runs = vec![
        result(Method::Base, 1.0, 10.0, None),
        result(Method::Sft, 40.0, 80.0, Some(0.1)),
    ];
    let mut comparison = Comparison {
        task: "arithmetic".into(),
        seeds: vec![0],
        conditions: vec![condition(0.0, runs.clone()), condition(0.1, runs)],
        seconds: 1.0,
    };
    let text = render(&comparison);
    assert!(
        text.contains("## Benign data\n\n| method")
            && text.contains("## Benign data, 10% poisoned\n\n| method"),
        "{text}"
    );
    assert_eq!(text.matches("| sft | 40.0 |").count(), 2, "{text}");
    comparison.conditions.truncate(1);
    let text = render(&comparison);
    assert!(!text.contains("##") && !text.contains("poisoned"), "{text}");
}
