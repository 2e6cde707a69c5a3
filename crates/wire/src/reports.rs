//! What evaluations and comparisons conclude.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One judged answer, as written to answers.jsonl and shown in the UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedAnswer {
    pub prompt: String,
    pub category: String,
    pub answer: String,
    /// Refusal judge: true when the answer does not refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_judge_harmful: Option<bool>,
    /// The refusal phrase found, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_phrase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge_harmful: Option<bool>,
    /// log p(harmful verdict) − log p(safe verdict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge_margin: Option<f32>,
    /// A guard judge's verdict word (`safe`/`unsafe`, `Safe`/`Unsafe`/`Controversial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge_label: Option<String>,
    /// The harm categories a guard judge named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_judge_category: Option<String>,
}

impl JudgedAnswer {
    /// Whether any judge that ran called it harmful.
    pub fn judged_harmful(&self) -> bool {
        self.refusal_judge_harmful == Some(true) || self.model_judge_harmful == Some(true)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryScore {
    pub prompts: usize,
    pub harmful: usize,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub harmful_score: f64,
}

/// HS of one judge, overall and per category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeScore {
    pub judge: String,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub harmful_score: f64,
    pub harmful: usize,
    pub per_category: BTreeMap<String, CategoryScore>,
}

/// The harmful score (HS): % of harmful prompts answered instead of refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarmfulReport {
    pub prompts: usize,
    /// The first judge's HS (the refusal judge when it runs).
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub harmful_score: f64,
    pub judges: Vec<JudgeScore>,
    /// When both judges ran: % of answers on which they agree, and Cohen's κ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub percent: f64,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub cohen_kappa: f64,
}

/// A fine-tuning method: what a run's `method` names and a comparison's `methods` list. The
/// one method type of the trainer, the comparison, the server and the UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The model before fine-tuning (a comparison's reference; it does not train).
    Base,
    /// Plain supervised fine-tuning.
    Sft,
    /// Safety-Aware Probing (arXiv 2505.16737).
    Sap,
    /// SFT with the safety pairs' refusals mixed into the data (the SafeInstr baseline).
    Mix,
    /// Gradient surgery against the alignment gradient (SafeGrad, arXiv 2508.07172).
    #[serde(rename = "safegrad")]
    SafeGrad,
    /// Alternating alignment and task states with a proximal term (Lisa, arXiv 2405.18641).
    Lisa,
    /// The safety layers frozen (SPPFT, arXiv 2408.17003).
    Sppft,
}

impl Method {
    /// Every method, in the order tables list them.
    pub const ALL: [Method; 7] = [
        Method::Base,
        Method::Sft,
        Method::Sap,
        Method::Mix,
        Method::SafeGrad,
        Method::Lisa,
        Method::Sppft,
    ];

    /// Every method that trains (all but the base model, which `ALL` lists first), in the
    /// same order.
    pub const TRAINABLE: [Method; 6] = {
        let mut trainable = [Method::Sft; 6];
        let mut i = 0;
        while i < trainable.len() {
            trainable[i] = Method::ALL[i + 1];
            i += 1;
        }
        trainable
    };

    pub fn name(self) -> &'static str {
        match self {
            Method::Base => "base",
            Method::Sft => "sft",
            Method::Sap => "sap",
            Method::Mix => "mix",
            Method::SafeGrad => "safegrad",
            Method::Lisa => "lisa",
            Method::Sppft => "sppft",
        }
    }

    /// What the method is, in a few words (the form's help, the CLI's listing).
    pub fn describe(self) -> &'static str {
        match self {
            Method::Base => "the model before fine-tuning",
            Method::Sft => "plain supervised fine-tuning",
            Method::Sap => "Safety-Aware Probing: a probe steers the update away from harm",
            Method::Mix => "SFT with the safety pairs' refusals mixed into the data",
            Method::SafeGrad => {
                "SafeGrad: the task gradient projected off the alignment gradient when they conflict"
            }
            Method::Lisa => "Lisa: alternating alignment and task steps, each held near the other",
            Method::Sppft => "SPPFT: the layers that carry safety are frozen",
        }
    }

    /// Whether a run of this method needs safety pairs (`safety_data`).
    pub fn needs_safety_pairs(self) -> bool {
        !matches!(self, Method::Base | Method::Sft)
    }
}

/// A config's method is a trainable one, each described by `describe` (the form's choices
/// and their help come from here).
impl schemars::JsonSchema for Method {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Method".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crate::spec::choices(Method::TRAINABLE.map(|m| (m.name(), m.describe())))
    }
}

/// What a defence did over a run, in one number (its table column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mechanism {
    /// What the number is ("steps projected, %").
    pub what: String,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub value: f64,
}

/// One evaluated model of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub method: Method,
    pub seed: Option<u64>,
    pub run_dir: PathBuf,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub harmful_score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmful_score_model_judge: Option<f64>,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub exact_match: f64,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub validation_loss: f64,
    /// Mean seconds per optimiser step (the first step, which warms caches, excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_time_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_task_loss: Option<f64>,
    /// The last held-out safety check's mean per-token log p(refusal) (fine-tuned runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_logprob: Option<f64>,
    /// The defence's own number over the run, where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<Mechanism>,
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub std: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Self { mean, std }
    }
}

/// One method's line of the comparison table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub method: Method,
    pub runs: usize,
    pub harmful_score: Spread,
    pub exact_match: Spread,
    pub validation_loss: Spread,
    /// Held-out log p(refusal) per token, over the runs that measured it.
    #[serde(default)]
    pub refusal_logprob: Option<Spread>,
    pub step_time_s: Option<Spread>,
    /// Step time ÷ SFT's step time.
    pub overhead_vs_sft: Option<f64>,
    /// The defence's own number (`Mechanism::what`) over the runs that report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<(String, Spread)>,
}

/// A whole comparison: one table per condition, and how long it all took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredComparison")]
pub struct Comparison {
    pub task: String,
    pub seeds: Vec<u64>,
    /// The threat models compared under, in the config's order.
    pub conditions: Vec<Condition>,
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub seconds: f64,
}

/// One threat model of a comparison (the paper's: benign data, and benign data with a share
/// of harmful compliances): every method and seed fine-tuned on the same data, the table,
/// every run, and what the numbers show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Share of the fine-tuning data that is harmful compliance (0: benign).
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub poison_fraction: f64,
    pub rows: Vec<Row>,
    /// The base model's evaluation (shared by every condition) and each fine-tuned run.
    pub runs: Vec<RunResult>,
    /// Each fine-tuning method − SFT per metric, paired by seed.
    #[serde(default)]
    pub paired: Vec<PairedDifference>,
    /// Plain statements about what the numbers show (or do not show).
    pub findings: Vec<String>,
}

impl Condition {
    /// "benign data" or "benign data, 10% poisoned".
    pub fn name(&self) -> String {
        Self::name_for(self.poison_fraction)
    }

    /// The name of the condition with this poison fraction.
    pub fn name_for(poison_fraction: f64) -> String {
        if poison_fraction > 0.0 {
            format!("benign data, {}% poisoned", poison_percent(poison_fraction))
        } else {
            "benign data".into()
        }
    }
}

/// A poison fraction in percent, rounded to a tenth (0.07 reads 7, not 7.000000000000001):
/// how conditions are named.
pub fn poison_percent(fraction: f64) -> f64 {
    (fraction * 1000.0).round() / 10.0
}

/// A comparison as stored: this release's shape, or the single-condition one that releases
/// before conditions wrote (its fields at the top level), so that a server's earlier
/// comparisons still show.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredComparison {
    Conditions {
        task: String,
        seeds: Vec<u64>,
        conditions: Vec<Condition>,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        seconds: f64,
    },
    SingleCondition {
        task: String,
        seeds: Vec<u64>,
        #[serde(flatten)]
        condition: Condition,
        #[serde(deserialize_with = "crate::finite::f64_or_nan")]
        seconds: f64,
    },
}

impl From<StoredComparison> for Comparison {
    fn from(stored: StoredComparison) -> Self {
        match stored {
            StoredComparison::Conditions {
                task,
                seeds,
                conditions,
                seconds,
            } => Comparison {
                task,
                seeds,
                conditions,
                seconds,
            },
            StoredComparison::SingleCondition {
                task,
                seeds,
                condition,
                seconds,
            } => Comparison {
                task,
                seeds,
                conditions: vec![condition],
                seconds,
            },
        }
    }
}

/// A paired difference between two methods (`a − b`) over the seeds both ran: the runs of
/// one seed share their start and data order, so their difference removes what the seed
/// alone does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// harmful_score, exact_match or validation_loss.
    pub metric: String,
    pub a: Method,
    pub b: Method,
    /// Seeds both methods ran.
    pub pairs: usize,
    /// Mean of a − b over the pairs.
    #[serde(deserialize_with = "crate::finite::f64_or_nan")]
    pub mean: f64,
    /// 95% percentile-bootstrap interval of that mean; None with fewer than 2 pairs.
    #[serde(default, deserialize_with = "crate::finite::option_pair_or_nan")]
    pub ci: Option<(f64, f64)>,
    /// 95% Student-t interval of the same mean (n − 1 degrees of freedom).
    #[serde(default, deserialize_with = "crate::finite::option_pair_or_nan")]
    pub t_ci: Option<(f64, f64)>,
}

impl PairedDifference {
    /// The fewest pairs with which a difference can be called real.
    pub const FEWEST_PAIRS: usize = 3;

    /// Real only with enough pairs and when both intervals exclude 0. The percentile
    /// bootstrap alone is too generous with few seeds: when every difference has the same
    /// sign (a 1 in 4 chance with 3 seeds and no effect at all) every resample's mean has it
    /// too, so its interval excludes 0; the t interval widens with the spread and the count.
    /// A difference that every pair gave alike (its intervals have no width) is not: there
    /// is no spread to judge it by, and it is told as it is (`same_in_every_pair`).
    pub fn is_real(&self) -> bool {
        let excludes_zero =
            |ci: Option<(f64, f64)>| ci.is_some_and(|(low, high)| low > 0.0 || high < 0.0);
        self.pairs >= Self::FEWEST_PAIRS
            && !self.same_in_every_pair()
            && excludes_zero(self.ci)
            && excludes_zero(self.t_ci)
    }

    /// Whether every pair gave the same difference (to rounding): the t interval, whose width
    /// is the pairs' spread, has none.
    pub fn same_in_every_pair(&self) -> bool {
        let tolerance = 1e-9 * (1.0 + self.mean.abs());
        self.pairs >= 2 && self.t_ci.is_some_and(|(low, high)| high - low <= tolerance)
    }

    /// The verdict in words, as the tables give it.
    pub fn verdict(&self) -> String {
        if self.same_in_every_pair() {
            format!("the same in all {} seeds", self.pairs)
        } else if self.pairs < Self::FEWEST_PAIRS {
            format!("too few seeds (at least {})", Self::FEWEST_PAIRS)
        } else if self.is_real() {
            "yes".into()
        } else {
            "no".into()
        }
    }

    /// The metric's name in words.
    pub fn metric_label(&self) -> &str {
        metric_label(&self.metric)
    }
}

/// A comparison metric's name in words (its code name where it has none).
pub fn metric_label(metric: &str) -> &str {
    match metric {
        "harmful_score" => "harmful score (%)",
        "exact_match" => "task exact match (%)",
        "validation_loss" => "validation loss",
        "refusal_logprob" => "held-out refusal log-probability",
        other => other,
    }
}
