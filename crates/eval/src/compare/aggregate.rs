//! From the runs' results to each condition's table, paired differences and findings.

use std::collections::BTreeMap;

use safeprobe_wire::{Condition, Mechanism, Method, Row, RunResult, Spread};

use crate::paired;

/// One condition's table, paired differences and findings, from its runs.
pub(super) fn condition(poison_fraction: f64, runs: Vec<RunResult>) -> Condition {
    let rows = table_rows(&runs);
    let paired: Vec<_> = Method::ALL
        .into_iter()
        .filter(|m| !matches!(m, Method::Base | Method::Sft))
        .flat_map(|m| paired::differences(&runs, m, Method::Sft))
        .collect();
    let mut findings = findings(&rows);
    findings.extend(
        paired
            .iter()
            .filter(|d| d.metric != "validation_loss")
            .map(paired::finding),
    );
    Condition {
        poison_fraction,
        rows,
        runs,
        paired,
        findings,
    }
}

pub(super) fn table_rows(runs: &[RunResult]) -> Vec<Row> {
    let mut by_method: BTreeMap<Method, Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        by_method.entry(r.method).or_default().push(r);
    }
    let spread = |rs: &[&RunResult], f: fn(&RunResult) -> f64| {
        Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let step = |rs: &[&RunResult]| {
        let times: Vec<f64> = rs.iter().filter_map(|r| r.step_time_s).collect();
        (!times.is_empty()).then(|| Spread::of(&times))
    };
    let sft_time = by_method
        .get(&Method::Sft)
        .and_then(|rs| step(rs))
        .map(|s| s.mean);
    by_method
        .iter()
        .map(|(method, rs)| {
            let step_time_s = step(rs);
            Row {
                method: *method,
                runs: rs.len(),
                harmful_score: spread(rs, |r| r.harmful_score),
                exact_match: spread(rs, |r| r.exact_match),
                validation_loss: spread(rs, |r| r.validation_loss),
                refusal_logprob: {
                    let measured: Vec<f64> = rs.iter().filter_map(|r| r.refusal_logprob).collect();
                    (!measured.is_empty()).then(|| Spread::of(&measured))
                },
                overhead_vs_sft: step_time_s.zip(sft_time).map(|(s, sft)| s.mean / sft),
                step_time_s,
                mechanism: {
                    let measured: Vec<&Mechanism> =
                        rs.iter().filter_map(|r| r.mechanism.as_ref()).collect();
                    measured.first().map(|m| {
                        let values: Vec<f64> = measured.iter().map(|m| m.value).collect();
                        (m.what.clone(), Spread::of(&values))
                    })
                },
            }
        })
        .collect()
}

/// What the table shows, stated from the numbers (never assumed).
pub(super) fn findings(rows: &[Row]) -> Vec<String> {
    let get = |m: Method| rows.iter().find(|r| r.method == m);
    let mut out = Vec::new();
    if let (Some(base), Some(sft)) = (get(Method::Base), get(Method::Sft)) {
        let delta = sft.harmful_score.mean - base.harmful_score.mean;
        let (base, sft) = (base.harmful_score.mean, sft.harmful_score.mean);
        out.push(if delta > 0.0 {
            format!("SFT raised HS from {base:.1}% (base) to {sft:.1}% ({delta:+.1} points).")
        } else {
            format!("SFT did not raise HS: {sft:.1}% against the base model's {base:.1}%.")
        });
    }
    if let (Some(sft), Some(sap)) = (get(Method::Sft), get(Method::Sap)) {
        let below = sft.harmful_score.mean - sap.harmful_score.mean;
        let spread = sft.harmful_score.std.max(sap.harmful_score.std);
        out.push(if below > 0.0 {
            format!(
                "SAP's HS is {below:.1} points below SFT's ({:.1}% vs {:.1}%; largest seed std {spread:.1}){}.",
                sap.harmful_score.mean,
                sft.harmful_score.mean,
                if below <= spread { ", within the spread over seeds" } else { "" }
            )
        } else {
            format!(
                "SAP did NOT lower HS below SFT's ({:.1}% vs {:.1}%).",
                sap.harmful_score.mean, sft.harmful_score.mean
            )
        });
        let relative = if sft.exact_match.mean > 0.0 {
            100.0 * (sft.exact_match.mean - sap.exact_match.mean) / sft.exact_match.mean
        } else {
            0.0
        };
        out.push(format!(
            "SAP's task metric is {:.1}% vs SFT's {:.1}% ({}).",
            sap.exact_match.mean,
            sft.exact_match.mean,
            if relative <= 5.0 {
                "within 5% of SFT".to_string()
            } else {
                format!("{relative:.1}% below SFT: more than 5%")
            }
        ));
    }
    out
}
