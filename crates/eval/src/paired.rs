//! Paired comparisons of two methods. The runs of one seed start from the same model and
//! see the same data in the same order, so the difference between two methods' runs of a
//! seed removes what the seed alone does; the mean of those differences gets a percentile
//! bootstrap interval. A difference counts as real only when that interval excludes 0.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::compare::{Method, RunResult};
pub use safeprobe_wire::PairedDifference;

/// Resamples of the bootstrap: enough that the 2.5% and 97.5% points move by well under
/// a tenth of the interval between reruns with other seeds.
const RESAMPLES: usize = 10_000;

/// The resampling is seeded, so the same runs always give the same interval.
const BOOTSTRAP_SEED: u64 = 0x5afe_b007;

/// The metrics compared, by name, and how each is read from a run (None: not measured).
const METRICS: [(&str, fn(&RunResult) -> Option<f64>); 4] = [
    ("harmful_score", |r| Some(r.harmful_score)),
    ("exact_match", |r| Some(r.exact_match)),
    ("validation_loss", |r| Some(r.validation_loss)),
    ("refusal_logprob", |r| r.refusal_logprob),
];

/// `a − b` for every metric, over the seeds both methods ran; empty when they share none.
pub fn differences(runs: &[RunResult], a: Method, b: Method) -> Vec<PairedDifference> {
    let seeded = |m: Method| {
        runs.iter()
            .filter(move |r| r.method == m && r.seed.is_some())
    };
    let pairs: Vec<(&RunResult, &RunResult)> = seeded(a)
        .filter_map(|ra| seeded(b).find(|rb| rb.seed == ra.seed).map(|rb| (ra, rb)))
        .collect();
    if pairs.is_empty() {
        return Vec::new();
    }
    METRICS
        .iter()
        .filter_map(|(metric, value)| {
            let d: Vec<f64> = pairs
                .iter()
                .filter_map(|(ra, rb)| Some(value(ra)? - value(rb)?))
                .collect();
            (!d.is_empty()).then(|| PairedDifference {
                metric: metric.to_string(),
                a,
                b,
                pairs: d.len(),
                mean: mean(&d),
                ci: bootstrap_interval(&d, 0.95),
                t_ci: t_interval(&d),
            })
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The percentile-bootstrap interval of the mean at `level` (e.g. 0.95): resample the values
/// with replacement, take each resample's mean, and read the (1 − level)/2 and (1 + level)/2
/// quantiles of those means. None with fewer than 2 values.
pub fn bootstrap_interval(values: &[f64], level: f64) -> Option<(f64, f64)> {
    if values.len() < 2 {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let sum: f64 = (0..values.len())
                .map(|_| values[rng.random_range(0..values.len())])
                .sum();
            sum / values.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    Some((at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)))
}

/// Two-sided 95% quantiles of Student's t for 1..=30 degrees of freedom.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// The 95% Student-t interval of the mean (the normal quantile past 30 degrees of freedom);
/// None with fewer than 2 values.
pub fn t_interval(values: &[f64]) -> Option<(f64, f64)> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let m = mean(values);
    let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let t = T_975.get(n - 2).copied().unwrap_or(1.96);
    let half = t * sd / (n as f64).sqrt();
    Some((m - half, m + half))
}

/// One sentence on a paired difference, saying whether it is real.
pub fn finding(d: &PairedDifference) -> String {
    let unit = match d.metric.as_str() {
        "validation_loss" | "refusal_logprob" => " nats",
        _ => " points",
    };
    let interval = match (d.ci, d.t_ci) {
        (Some((low, high)), Some((t_low, t_high))) => {
            format!("95% CI [{low:+.2}, {high:+.2}] (bootstrap), [{t_low:+.2}, {t_high:+.2}] (t)")
        }
        _ => "no interval from one seed".into(),
    };
    let verdict = if d.same_in_every_pair() {
        format!(
            "the same in all {} seeds, so no interval can say how much it would vary: not \
             called real",
            d.pairs
        )
    } else if d.is_real() {
        "a real difference (both intervals exclude 0)".to_string()
    } else if d.pairs < PairedDifference::FEWEST_PAIRS {
        format!(
            "not called real: {} seed(s), at least {} are needed",
            d.pairs,
            PairedDifference::FEWEST_PAIRS
        )
    } else {
        "not a real difference (an interval contains 0)".to_string()
    };
    format!(
        "{} − {} {}: {:+.2}{unit} over {} paired seed(s), {interval}: {verdict}.",
        d.a.name(),
        d.b.name(),
        d.metric_label(),
        d.mean,
        d.pairs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_matches_the_normal_one_on_many_values() {
        // 400 values spread evenly: mean 0.5, standard error of the mean sd/√n.
        let values: Vec<f64> = (0..400).map(|i| (i as f64 + 0.5) / 400.0).collect();
        let m = mean(&values);
        let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 399.0).sqrt();
        let half = 1.96 * sd / 20.0;
        let (low, high) = bootstrap_interval(&values, 0.95).unwrap();
        assert!(
            (low - (m - half)).abs() < 0.1 * half,
            "{low} vs {}",
            m - half
        );
        assert!(
            (high - (m + half)).abs() < 0.1 * half,
            "{high} vs {}",
            m + half
        );
    }

    #[test]
    fn an_interval_excludes_zero_only_when_the_pairs_agree() {
        let (low, high) = bootstrap_interval(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95).unwrap();
        assert!(
            low > 0.0 && low <= 3.0 && high >= 3.0 && high <= 5.0,
            "[{low}, {high}]"
        );
        let (low, high) = bootstrap_interval(&[-1.0, 1.0, -1.0, 1.0, -1.5, 1.5], 0.95).unwrap();
        assert!(low < 0.0 && high > 0.0, "[{low}, {high}]");
        assert_eq!(bootstrap_interval(&[2.0], 0.95), None);
        assert_eq!(
            bootstrap_interval(&[1.0, 2.0, 3.0], 0.95),
            bootstrap_interval(&[1.0, 2.0, 3.0], 0.95)
        );
    }

    fn run(method: Method, seed: u64, hs: f64) -> RunResult {
        RunResult {
            method,
            seed: Some(seed),
            run_dir: Default::default(),
            harmful_score: hs,
            harmful_score_model_judge: None,
            exact_match: 50.0,
            validation_loss: 1.0,
            step_time_s: None,
            final_task_loss: None,
            refusal_logprob: None,
            mechanism: None,
        }
    }

    #[test]
    fn runs_pair_by_seed_and_findings_call_only_real_differences_real() {
        // SAP is 9 to 11 points below SFT on every seed, though the seeds themselves differ by
        // 40.
        let below = [9.0, 11.0, 10.0, 10.0];
        let mut runs: Vec<RunResult> = (0..4)
            .flat_map(|s| {
                [
                    run(Method::Sft, s, 50.0 + 10.0 * s as f64),
                    run(Method::Sap, s, 50.0 + 10.0 * s as f64 - below[s as usize]),
                ]
            })
            .collect();
        runs.push(run(Method::Sap, 9, 0.0)); // no SFT run of seed 9: not a pair
        let hs = &differences(&runs, Method::Sap, Method::Sft)[0];
        assert_eq!(
            (hs.metric.as_str(), hs.pairs, hs.mean),
            ("harmful_score", 4, -10.0)
        );
        let (low, high) = hs.ci.unwrap();
        assert!(low >= -11.0 && high <= -9.0, "{hs:?}");
        assert!(hs.is_real());
        assert_eq!(hs.verdict(), "yes");
        assert!(finding(hs).contains("a real difference"), "{}", finding(hs));
        let em = &differences(&runs, Method::Sap, Method::Sft)[1];
        assert!(!em.is_real(), "no difference in exact match");

        // Two seeds cannot make a difference real, however much they agree.
        let two: Vec<RunResult> = runs
            .iter()
            .filter(|r| r.seed.is_some_and(|s| s < 2))
            .cloned()
            .collect();
        let hs = &differences(&two, Method::Sap, Method::Sft)[0];
        assert!(!hs.is_real());
        assert!(
            finding(hs).contains("at least 3 are needed"),
            "{}",
            finding(hs)
        );
        assert!(differences(&runs, Method::Mix, Method::Sft).is_empty());
    }

    /// Differences that every seed gives alike have intervals of no width: told as such, never
    /// called real (there is no spread to say how much they would vary).
    #[test]
    fn a_difference_the_same_in_every_seed_is_said_so_not_called_real() {
        for (change, mean) in [(2.0, 2.0), (0.0, 0.0)] {
            let runs: Vec<RunResult> = (0..3)
                .flat_map(|s| {
                    [
                        run(Method::Sft, s, 40.0 + s as f64),
                        run(Method::Mix, s, 40.0 + s as f64 + change),
                    ]
                })
                .collect();
            let hs = &differences(&runs, Method::Mix, Method::Sft)[0];
            assert_eq!((hs.pairs, hs.mean), (3, mean));
            assert!(hs.same_in_every_pair() && !hs.is_real(), "{hs:?}");
            assert_eq!(hs.verdict(), "the same in all 3 seeds");
            let said = finding(hs);
            assert!(
                said.starts_with("mix − sft harmful score (%)")
                    && said.contains("the same in all 3 seeds")
                    && said.contains("not called real"),
                "{said}"
            );
        }
    }

    #[test]
    fn three_seeds_of_one_sign_are_not_enough_when_they_scatter() {
        // All positive, so the bootstrap interval excludes 0, but the t interval does not.
        let runs: Vec<RunResult> = [1.0, 2.0, 30.0]
            .iter()
            .enumerate()
            .flat_map(|(s, d)| {
                [
                    run(Method::Sft, s as u64, 50.0),
                    run(Method::Sap, s as u64, 50.0 + d),
                ]
            })
            .collect();
        let hs = &differences(&runs, Method::Sap, Method::Sft)[0];
        assert!(hs.ci.unwrap().0 > 0.0, "{hs:?}");
        assert!(hs.t_ci.unwrap().0 < 0.0, "{hs:?}");
        assert!(!hs.is_real());
        let (low, high) = t_interval(&[1.0, 2.0, 3.0]).unwrap();
        // mean 2, sd 1, se 1/√3, t(2) = 4.303
        assert!(
            (low - (2.0 - 4.303 / 3f64.sqrt())).abs() < 1e-9
                && (high - (2.0 + 4.303 / 3f64.sqrt())).abs() < 1e-9
        );
    }
}
