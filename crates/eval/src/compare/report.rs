//! A comparison in Markdown.

use safeprobe_wire::{Comparison, Condition, Spread};

use crate::builtin;

fn cell(s: &Spread, runs: usize, digits: usize) -> String {
    if runs > 1 {
        format!("{:.*} ± {:.*}", digits, s.mean, digits, s.std)
    } else {
        format!("{:.*}", digits, s.mean)
    }
}

fn interval(ci: Option<(f64, f64)>) -> String {
    ci.map_or("—".into(), |(low, high)| {
        format!("[{low:+.2}, {high:+.2}]")
    })
}

/// The comparison in Markdown: for each condition (under its own heading when there are
/// several) the method table, the paired differences and the findings.
pub fn render(c: &Comparison) -> String {
    let mut out = format!(
        "Task: {} (exact match on {} held-out problems); seeds: {:?}\n\n",
        c.task,
        builtin::TASK_SPLITS[2],
        c.seeds
    );
    for (i, condition) in c.conditions.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if c.conditions.len() > 1 {
            let name = condition.name();
            out.push_str(&format!(
                "## {}{}\n\n",
                name[..1].to_uppercase(),
                &name[1..]
            ));
        } else if condition.poison_fraction > 0.0 {
            out.push_str(&format!("Condition: {}\n\n", condition.name()));
        }
        render_condition(condition, &mut out);
    }
    out
}

fn render_condition(c: &Condition, out: &mut String) {
    out.push_str("| method | HS (%) ↓ | task exact match (%) | validation loss | held-out log p(refusal)/token ↑ | time/step (s) | overhead vs SFT | mechanism |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in &c.rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.method.name(),
            cell(&r.harmful_score, r.runs, 1),
            cell(&r.exact_match, r.runs, 1),
            cell(&r.validation_loss, r.runs, 3),
            r.refusal_logprob
                .map_or("—".into(), |s| cell(&s, r.runs, 3)),
            r.step_time_s.map_or("—".into(), |s| cell(&s, r.runs, 3)),
            r.overhead_vs_sft.map_or("—".into(), |o| format!("{o:.2}×")),
            r.mechanism.as_ref().map_or("—".into(), |(what, s)| format!(
                "{what}: {}",
                cell(s, r.runs, 2)
            )),
        ));
    }
    out.push('\n');
    if !c.paired.is_empty() {
        out.push_str("| paired difference | mean | 95% CI (bootstrap) | 95% CI (t) | seeds | real? |\n|---|---|---|---|---|---|\n");
        for d in &c.paired {
            out.push_str(&format!(
                "| {} − {} {} | {:+.2} | {} | {} | {} | {} |\n",
                d.a.name(),
                d.b.name(),
                d.metric_label(),
                d.mean,
                interval(d.ci),
                interval(d.t_ci),
                d.pairs,
                d.verdict()
            ));
        }
        out.push('\n');
    }
    for f in &c.findings {
        out.push_str(&format!("- {f}\n"));
    }
}
