//! What the charts draw, computed from a job's events: plain functions over the wire types,
//! with no leptos or browser in them, so that they are tested natively (`cargo test` in
//! frontend/) and a renamed field is a compile error here rather than an empty chart.

use std::collections::BTreeMap;

use safeprobe_wire::{Event, JobProgress, LiveMessage, Method, RunOf, StoredEvent, TaskState};

pub const COLORS: [&str; 8] = [
    "#2f5bd3", "#c0392b", "#1e8449", "#8e44ad", "#d68910", "#17a589", "#7f8c8d", "#e84393",
];

/// One line of a chart: (step, value) points, and for a line that is the mean of several
/// runs, their (step, least, greatest) at each of its steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

/// Each method's colour, the same on every chart and page.
pub fn method_color(method: Method) -> &'static str {
    match method {
        Method::Base => "#7f8c8d",
        Method::Sft => "#2f5bd3",
        Method::Sap => "#c0392b",
        Method::Mix => "#1e8449",
        Method::SafeGrad => "#8e44ad",
        Method::Lisa => "#d68910",
        Method::Sppft => "#17a589",
    }
}

/// The job's events in order: the stored ones, then the live ones of job `job` numbered
/// after the newest stored one. Events are told apart by their number, never by their
/// content: a status "queued" after Resume equals the first one, yet is a new event.
/// Numbers grow and are never reused, so a live event numbered at most the newest stored
/// one is already among the stored events.
pub fn merge_events(stored: &[StoredEvent], live: &[LiveMessage], job: i64) -> Vec<Event> {
    let newest = stored.iter().map(|e| e.seq).max().unwrap_or(0);
    stored
        .iter()
        .map(|e| e.body.clone())
        .chain(
            live.iter()
                .filter(|m| m.job == job && m.seq > newest)
                .map(|m| m.body.clone()),
        )
        .collect()
}

/// How many status changes of job `job` the live stream has brought: when it grows, what the
/// server holds about the job (result, answers, stored events) has changed.
pub fn status_changes(live: &[LiveMessage], job: i64) -> usize {
    live.iter()
        .filter(|m| m.job == job && matches!(m.body, Event::Status { .. }))
        .count()
}

/// The training events of one run; a comparison trains several, one per stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    /// The stage that started it ("sft (seed 0)"), or "run" before any stage.
    pub name: String,
    /// Which of a comparison's runs it is.
    pub run: Option<RunOf>,
    /// Its step, validation, safety-check and warning events.
    pub events: Vec<Event>,
}

/// Splits events into runs: each stage starts one. Runs without a step or validation (the
/// evaluation stage, say) are left out.
pub fn segments(events: &[Event]) -> Vec<Segment> {
    let mut out = vec![Segment {
        name: "run".into(),
        run: None,
        events: Vec::new(),
    }];
    for event in events {
        match event {
            Event::Stage { stage, run, .. } => out.push(Segment {
                name: stage.clone(),
                run: run.clone(),
                events: Vec::new(),
            }),
            Event::Step { .. }
            | Event::Validation { .. }
            | Event::SafetyCheck { .. }
            | Event::Warning { .. } => out
                .last_mut()
                .expect("starts with one")
                .events
                .push(event.clone()),
            Event::Done { .. } | Event::Status { .. } | Event::Task { .. } => {}
        }
    }
    out.retain(|s| s.events.iter().any(|e| !matches!(e, Event::Warning { .. })));
    out
}

/// The runs of one method under one condition (a comparison's seeds), or a run of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Group<'a> {
    /// The method's name ("sap"), or the run's.
    pub name: String,
    pub color: &'static str,
    /// The condition its runs trained under, for a comparison's runs.
    pub condition: Option<String>,
    pub runs: Vec<&'a Segment>,
}

/// The runs put together by method and condition, in the order each first appears; a run
/// that is not a comparison's is a group of its own.
pub fn groups(segments: &[Segment]) -> Vec<Group<'_>> {
    let mut out: Vec<Group> = Vec::new();
    for segment in segments {
        let Some(run) = &segment.run else {
            let color = COLORS[out.len() % COLORS.len()];
            out.push(Group {
                name: segment.name.clone(),
                color,
                condition: None,
                runs: vec![segment],
            });
            continue;
        };
        let name = run.method.name().to_string();
        let same = |g: &&mut Group| g.name == name && g.condition.as_ref() == Some(&run.condition);
        match out.iter_mut().find(same) {
            Some(group) => group.runs.push(segment),
            None => out.push(Group {
                name,
                color: method_color(run.method),
                condition: Some(run.condition.clone()),
                runs: vec![segment],
            }),
        }
    }
    out
}

/// The conditions the groups trained under, in order (none: runs that are not a comparison's).
pub fn conditions(groups: &[Group]) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = Vec::new();
    for group in groups {
        if !out.contains(&group.condition) {
            out.push(group.condition.clone());
        }
    }
    out
}

/// One line per group for `metric`: at each step any of its runs measured, the mean of the
/// runs that did, and for a group of several runs, their least and greatest value there.
pub fn group_series(groups: &[&Group], metric: Metric) -> Vec<Series> {
    groups
        .iter()
        .map(|group| {
            let mut at: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for run in &group.runs {
                for (step, value) in metric.points(&run.events) {
                    at.entry(step.to_bits()).or_default().push(value);
                }
            }
            let steps = at
                .into_iter()
                .map(|(bits, values)| (f64::from_bits(bits), values));
            let mut series = Series {
                name: group.name.clone(),
                color: group.color,
                ..Series::default()
            };
            for (step, values) in steps {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                series.points.push((step, mean));
                if group.runs.len() > 1 {
                    let least = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let greatest = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    series.band.push((step, least, greatest));
                }
            }
            series
        })
        .collect()
}

/// The runs that measured SAP's mechanism (the probe's alignment or the per-layer cosines).
pub fn mechanism_runs(segments: &[Segment]) -> Vec<&Segment> {
    segments
        .iter()
        .filter(|s| {
            s.events.iter().any(|e| match e {
                Event::Step { metrics, .. } => {
                    metrics.alignment.is_some() || metrics.grad_cosine.is_some()
                }
                _ => false,
            })
        })
        .collect()
}

/// What a run warned of (SAP's harmful direction vanishing, say), each once.
pub fn warnings(segment: &Segment) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for event in &segment.events {
        if let Event::Warning { step, message } = event
            && !out.iter().any(|m| m.ends_with(message.as_str()))
        {
            out.push(format!("from step {step}: {message}"));
        }
    }
    out
}

/// A quantity charted against the step, one line per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    TaskLoss,
    ValidationLoss,
    SafetyLoss,
    SuLoss,
    LearningRate,
    TokensPerSecond,
    StepTime,
    /// Held-out pairs' mean margin log p(safe) − log p(harmful).
    PairMargin,
    /// Held-out prompts' mean per-token log p(refusal).
    RefusalLogprob,
    /// cos(∇L_task, ĝ) at the probe used, on measurement steps (> 0: the step also lowers
    /// the safety loss).
    ProbeAlignment,
}

/// The metrics runs can be overlaid by, with each one's title and unit.
pub const OVERLAYS: [(Metric, &str, &str); 7] = [
    (Metric::TaskLoss, "Task loss", "nats/token"),
    (Metric::ValidationLoss, "Validation loss", "nats/token"),
    (Metric::SafetyLoss, "Safety loss", "contrastive, nats"),
    (
        Metric::SuLoss,
        "L_su (loss gap the probe climbs)",
        "nats/token",
    ),
    (
        Metric::RefusalLogprob,
        "Held-out refusal log p / token",
        "nats",
    ),
    (Metric::PairMargin, "Held-out pair margin", "nats"),
    (
        Metric::ProbeAlignment,
        "cos(∇L_task, ĝ) at the probe used",
        "cosine",
    ),
];

impl Metric {
    /// (step, value) of this metric in `event`, if the event carries it.
    pub fn point(self, event: &Event) -> Option<(f64, f64)> {
        let value = match (self, event) {
            (Metric::ValidationLoss, Event::Validation { loss, .. }) => Some(*loss),
            (Metric::ValidationLoss, _) => None,
            (Metric::PairMargin, Event::SafetyCheck { pair_margin, .. }) => *pair_margin,
            (
                Metric::RefusalLogprob,
                Event::SafetyCheck {
                    refusal_logprob, ..
                },
            ) => *refusal_logprob,
            (Metric::PairMargin | Metric::RefusalLogprob, _) => None,
            (Metric::ProbeAlignment, Event::Step { metrics, .. }) => {
                metrics.alignment.as_ref()?.at_probe
            }
            (Metric::ProbeAlignment, _) => None,
            (
                _,
                Event::Step {
                    lr,
                    tokens_per_s,
                    step_time_s,
                    metrics,
                    ..
                },
            ) => match self {
                Metric::TaskLoss => Some(metrics.task_loss),
                Metric::SafetyLoss => metrics.safety_loss,
                Metric::SuLoss => metrics.su_loss,
                Metric::LearningRate => Some(*lr),
                Metric::TokensPerSecond => Some(*tokens_per_s),
                Metric::StepTime => Some(*step_time_s),
                Metric::ValidationLoss
                | Metric::PairMargin
                | Metric::RefusalLogprob
                | Metric::ProbeAlignment => None,
            },
            _ => None,
        }?;
        Some((event.step()? as f64, value))
    }

    /// Its points in `events`, in order.
    pub fn points<'a>(self, events: impl IntoIterator<Item = &'a Event>) -> Vec<(f64, f64)> {
        events.into_iter().filter_map(|e| self.point(e)).collect()
    }
}

/// ‖v_j‖ of each probed layer of one run, one line per layer (as many layers as the run's
/// first step reports).
pub fn probe_norm_series(segment: &Segment) -> Vec<Series> {
    let steps = || {
        segment.events.iter().filter_map(|e| match e {
            Event::Step { step, metrics, .. } => Some((*step as f64, &metrics.probe_norms)),
            _ => None,
        })
    };
    let layers = steps().next().map_or(0, |(_, norms)| norms.len());
    (0..layers)
        .map(|layer| Series {
            name: format!("layer {layer}"),
            color: COLORS[layer % COLORS.len()],
            points: steps()
                .filter_map(|(step, norms)| Some((step, *norms.get(layer)?)))
                .collect(),
            ..Series::default()
        })
        .collect()
}

/// A layer × step matrix: `rows[layer][column]` is the value at `steps[column]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heatmap {
    pub steps: Vec<f64>,
    pub rows: Vec<Vec<f64>>,
}

/// cos(∇L_task, ∇L_safety) per layer over the steps that measured it, for one run's events.
/// The layer count is the first measurement's; a later, shorter one reads 0 where it has none.
pub fn cosine_heatmap(events: &[Event]) -> Heatmap {
    let measured: Vec<(f64, &Vec<f64>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, metrics, .. } => metrics
                .grad_cosine
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| (*step as f64, c)),
            _ => None,
        })
        .collect();
    let layers = measured.first().map_or(0, |(_, c)| c.len());
    Heatmap {
        steps: measured.iter().map(|(step, _)| *step).collect(),
        rows: (0..layers)
            .map(|layer| {
                measured
                    .iter()
                    .map(|(_, c)| c.get(layer).copied().unwrap_or(0.0))
                    .collect()
            })
            .collect(),
    }
}

/// How far job `job` is: its stored events, then the live ones after them, folded in order.
pub fn job_progress(stored: &[StoredEvent], live: &[LiveMessage], job: i64) -> JobProgress {
    let mut progress = JobProgress::of(stored.iter().map(|e| (e.seq, e.at, &e.body)));
    advance_live(&mut progress, live, job);
    progress
}

/// `progress` carried on by the live messages of job `job` it does not have yet.
pub fn advance_live(progress: &mut JobProgress, live: &[LiveMessage], job: i64) {
    let mine = live.iter().filter(|m| m.job == job);
    progress.advance_all(mine.map(|m| (m.seq, m.at, &m.body)));
}

/// Page `page` (from 0, clamped to the last) of `items`, `per_page` to a page, with the
/// number of the first item on it (from 1) and the number of pages (at least 1).
pub fn page_of<T>(items: &[T], page: usize, per_page: usize) -> (&[T], usize, usize) {
    let pages = items.len().div_ceil(per_page).max(1);
    let start = page.min(pages - 1) * per_page;
    let end = (start + per_page).min(items.len());
    (&items[start..end], start + 1, pages)
}

/// A time left, as a person would say it: "40 s", "6 min", "1 h 12 min".
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..90 => format!("{s} s"),
        90..5400 => format!("{} min", (s + 30) / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600 + 30) / 60),
    }
}

/// The log's lines: status changes, stages, warnings and the end of training.
pub fn log_lines(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Status { status, error } => Some(format!(
                "status: {}{}",
                status.name(),
                error
                    .as_ref()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            )),
            Event::Stage { stage, .. } => Some(format!("stage: {stage}")),
            Event::Task {
                id, state, detail, ..
            } => Some(format!(
                "slurm task {id}: {}{}",
                state.name(),
                detail
                    .as_ref()
                    .map(|d| format!(" ({})", d.lines().next().unwrap_or_default()))
                    .unwrap_or_default()
            )),
            Event::Done { steps, .. } => Some(format!("finished {steps} steps")),
            Event::Warning { step, message } => Some(format!("warning (step {step}): {message}")),
            Event::Step { .. } | Event::Validation { .. } | Event::SafetyCheck { .. } => None,
        })
        .collect()
}

/// "Does the probe turn the update toward safety?": cos(∇_W L_task, ĝ) over all weights at
/// V = 0, at the probe used and at the random control, for one run's measurement steps.
/// Positive: the task step also lowers the safety loss.
pub fn alignment_series(events: &[Event]) -> Vec<Series> {
    type View = fn(&safeprobe_wire::Alignment) -> Option<f64>;
    let views: [(&str, View); 3] = [
        ("V = 0", |a| Some(a.at_zero)),
        ("probe used", |a| a.at_probe),
        ("random probe (control)", |a| a.at_random),
    ];
    views
        .iter()
        .enumerate()
        .map(|(i, (name, view))| Series {
            name: name.to_string(),
            color: COLORS[i % COLORS.len()],
            points: events
                .iter()
                .filter_map(|e| match e {
                    Event::Step { step, metrics, .. } => {
                        Some((*step as f64, view(metrics.alignment.as_ref()?)?))
                    }
                    _ => None,
                })
                .collect(),
            ..Series::default()
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// A comparison's run under a cluster scheduler, as its newest task event left it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRow {
    pub id: String,
    pub run: RunOf,
    pub state: TaskState,
    pub detail: Option<String>,
    /// How many times it was requeued.
    pub requeued: usize,
}

/// Each task's newest state, in the order the tasks first reported.
pub fn tasks(events: &[Event]) -> Vec<TaskRow> {
    let mut rows: Vec<TaskRow> = Vec::new();
    for event in events {
        let Event::Task {
            run,
            id,
            state,
            detail,
        } = event
        else {
            continue;
        };
        let index = match rows.iter().position(|r| &r.id == id) {
            Some(i) => i,
            None => {
                rows.push(TaskRow {
                    id: id.clone(),
                    run: run.clone(),
                    state: *state,
                    detail: None,
                    requeued: 0,
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[index];
        if *state == TaskState::Requeued && row.state != TaskState::Requeued {
            row.requeued += 1;
        }
        row.state = *state;
        row.detail = detail.clone();
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeprobe_wire::{Status, StepMetrics};

    fn step(step: usize, task_loss: f64) -> Event {
        Event::Step {
            step,
            total_steps: 10,
            lr: 1e-3,
            tokens_per_s: 100.0,
            step_time_s: 0.5,
            metrics: StepMetrics {
                task_loss,
                probe_norms: vec![0.1 * step as f64, 0.2 * step as f64],
                ..StepMetrics::default()
            },
        }
    }

    fn with_cosine(step: usize, cosine: Vec<f64>) -> Event {
        let Event::Step {
            total_steps,
            lr,
            tokens_per_s,
            step_time_s,
            mut metrics,
            ..
        } = self::step(step, 1.0)
        else {
            unreachable!()
        };
        metrics.grad_cosine = Some(cosine);
        Event::Step {
            step,
            total_steps,
            lr,
            tokens_per_s,
            step_time_s,
            metrics,
        }
    }

    fn stage(name: &str) -> Event {
        Event::Stage {
            stage: name.into(),
            part: None,
            run: None,
        }
    }

    fn status(status: Status) -> Event {
        Event::Status {
            status,
            error: None,
        }
    }

    fn stored(seq: i64, body: Event) -> StoredEvent {
        StoredEvent {
            seq,
            at: seq as f64,
            body,
        }
    }

    fn live(job: i64, seq: i64, body: Event) -> LiveMessage {
        LiveMessage {
            job,
            seq,
            at: seq as f64,
            body,
        }
    }

    #[test]
    fn live_events_already_stored_are_not_repeated() {
        let stored = [stored(1, status(Status::Queued)), stored(2, step(1, 2.0))];
        let live = [
            live(7, 2, step(1, 2.0)),
            live(7, 3, step(2, 1.5)),
            // Another job's events are not this one's.
            live(8, 4, step(9, 9.0)),
        ];
        assert_eq!(
            merge_events(&stored, &live, 7),
            vec![status(Status::Queued), step(1, 2.0), step(2, 1.5)]
        );
    }

    #[test]
    fn an_event_equal_to_an_older_one_but_numbered_after_it_is_kept() {
        // Resume announces "queued" again: same content, new number.
        let stored = [
            stored(1, status(Status::Queued)),
            stored(2, status(Status::Failed)),
        ];
        let live = [live(7, 3, status(Status::Queued))];
        assert_eq!(
            merge_events(&stored, &live, 7),
            vec![
                status(Status::Queued),
                status(Status::Failed),
                status(Status::Queued)
            ]
        );
    }

    #[test]
    fn before_the_stored_events_arrive_the_live_ones_are_all_there_is() {
        let live = [live(7, 5, step(3, 1.0)), live(7, 6, step(4, 0.9))];
        assert_eq!(
            merge_events(&[], &live, 7),
            vec![step(3, 1.0), step(4, 0.9)]
        );
    }

    #[test]
    fn status_changes_count_only_this_jobs_statuses() {
        let live = [
            live(7, 1, status(Status::Queued)),
            live(7, 2, step(1, 1.0)),
            live(8, 1, status(Status::Queued)),
            live(7, 3, status(Status::Running)),
        ];
        assert_eq!(status_changes(&live, 7), 2);
        assert_eq!(status_changes(&live, 9), 0);
    }

    #[test]
    fn each_stage_starts_a_run_and_runs_without_steps_are_dropped() {
        let events = [
            status(Status::Running),
            stage("sft (seed 0)"),
            step(1, 2.0),
            Event::Validation { step: 1, loss: 2.5 },
            stage("sap (seed 0)"),
            step(1, 2.1),
            step(2, 1.9),
            stage("evaluating"),
            status(Status::Done),
        ];
        let runs = segments(&events);
        let names: Vec<&str> = runs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sft (seed 0)", "sap (seed 0)"]);
        assert_eq!(runs[0].events.len(), 2);
        assert_eq!(runs[1].events, vec![step(1, 2.1), step(2, 1.9)]);
    }

    #[test]
    fn steps_before_any_stage_form_one_run() {
        let runs = segments(&[step(1, 2.0), step(2, 1.0)]);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].name, "run");
    }

    #[test]
    fn metrics_come_each_from_its_own_event() {
        let events = [
            step(1, 2.0),
            Event::Validation { step: 1, loss: 2.5 },
            step(2, 1.5),
        ];
        assert_eq!(
            Metric::TaskLoss.points(&events),
            vec![(1.0, 2.0), (2.0, 1.5)]
        );
        assert_eq!(Metric::ValidationLoss.points(&events), vec![(1.0, 2.5)]);
        assert_eq!(
            Metric::LearningRate.points(&events),
            vec![(1.0, 1e-3), (2.0, 1e-3)]
        );
        // SFT has no safety loss: no points rather than zeros.
        assert!(Metric::SafetyLoss.points(&events).is_empty());
    }

    fn run_stage(method: Method, seed: u64, condition: &str) -> Event {
        Event::Stage {
            stage: format!("{} (seed {seed}, {condition})", method.name()),
            part: None,
            run: Some(RunOf {
                method,
                seed,
                condition: condition.into(),
            }),
        }
    }

    #[test]
    fn a_comparisons_seeds_are_one_line_per_method_and_condition_with_their_band() {
        let events = [
            run_stage(Method::Sft, 0, "benign"),
            step(1, 2.0),
            step(2, 1.0),
            run_stage(Method::Sap, 0, "benign"),
            step(1, 3.0),
            run_stage(Method::Sft, 1, "benign"),
            step(1, 4.0),
            step(2, 2.0),
            run_stage(Method::Sft, 0, "poisoned"),
            step(1, 5.0),
        ];
        let runs = segments(&events);
        let groups = groups(&runs);
        let named: Vec<(&str, Option<&str>, usize)> = groups
            .iter()
            .map(|g| (g.name.as_str(), g.condition.as_deref(), g.runs.len()))
            .collect();
        assert_eq!(
            named,
            [
                ("sft", Some("benign"), 2),
                ("sap", Some("benign"), 1),
                ("sft", Some("poisoned"), 1)
            ]
        );
        assert_eq!(
            conditions(&groups),
            [Some("benign".to_string()), Some("poisoned".to_string())]
        );
        // A method keeps its colour under every condition.
        assert_eq!(groups[0].color, groups[2].color);
        assert_ne!(groups[0].color, groups[1].color);
        let lines = group_series(&[&groups[0], &groups[1]], Metric::TaskLoss);
        assert_eq!(lines[0].points, vec![(1.0, 3.0), (2.0, 1.5)]);
        assert_eq!(lines[0].band, vec![(1.0, 2.0, 4.0), (2.0, 1.0, 2.0)]);
        // One run: its own values, no band.
        assert_eq!(lines[1].points, vec![(1.0, 3.0)]);
        assert!(lines[1].band.is_empty());
    }

    #[test]
    fn runs_that_are_not_a_comparisons_are_each_their_own_line() {
        let runs = segments(&[stage("a"), step(1, 1.0), stage("b"), step(1, 1.0)]);
        let groups = groups(&runs);
        assert_eq!(groups.len(), 2);
        assert_ne!(groups[0].color, groups[1].color);
        assert_eq!(conditions(&groups), [None]);
    }

    #[test]
    fn one_probe_norm_line_per_layer_and_the_runs_warnings_once_each() {
        let warning = |step| Event::Warning {
            step,
            message: "SAP's harmful direction vanishes".into(),
        };
        let runs = segments(&[
            stage("sap"),
            step(1, 1.0),
            warning(1),
            step(2, 1.0),
            warning(2),
        ]);
        let lines = probe_norm_series(&runs[0]);
        let names: Vec<&str> = lines.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["layer 0", "layer 1"]);
        assert_eq!(lines[1].points, vec![(1.0, 0.2), (2.0, 0.4)]);
        assert_eq!(
            warnings(&runs[0]),
            ["from step 1: SAP's harmful direction vanishes"]
        );
        // A stage with nothing but a warning is no run.
        assert!(segments(&[stage("x"), warning(3)]).is_empty());
    }

    #[test]
    fn the_heatmap_has_a_row_per_layer_and_a_column_per_measured_step() {
        let events = [
            with_cosine(10, vec![0.5, -0.5, 0.1]),
            step(11, 1.0),
            with_cosine(20, vec![0.4, -0.6, 0.2]),
            with_cosine(30, vec![]),
        ];
        let map = cosine_heatmap(&events);
        assert_eq!(map.steps, vec![10.0, 20.0]);
        assert_eq!(
            map.rows,
            vec![vec![0.5, 0.4], vec![-0.5, -0.6], vec![0.1, 0.2]]
        );
        assert_eq!(cosine_heatmap(&[step(1, 1.0)]), Heatmap::default());
    }

    #[test]
    fn a_jobs_progress_is_its_stored_events_then_the_live_ones_after_them() {
        let part = |number| Event::Stage {
            stage: format!("part {number}"),
            part: Some(safeprobe_wire::Part { number, of: 4 }),
            run: None,
        };
        let stored = [
            stored(1, part(1)),
            stored(2, part(2)),
            stored(3, step(2, 1.0)),
        ];
        // The live stream repeats event 3, then brings a step and the next part; job 8's
        // messages are not this job's.
        let live = [
            live(7, 3, step(2, 1.0)),
            live(7, 4, step(5, 0.9)),
            live(8, 5, part(4)),
            live(7, 5, part(3)),
            live(7, 6, step(1, 0.8)),
        ];
        let p = job_progress(&stored, &live[..2], 7);
        assert_eq!((p.part.unwrap().number, p.step, p.total_steps), (2, 5, 10));
        assert!((p.fraction() - 1.5 / 4.0).abs() < 1e-12);
        let p = job_progress(&stored, &live, 7);
        assert_eq!((p.part.unwrap().number, p.step, p.seq), (3, 1, 6));
        assert_eq!(p.detail().as_deref(), Some("part 3 · step 1/10"));
        // Carried on from a snapshot (the job list's), the same.
        let mut snapshot = job_progress(&stored, &[], 7);
        advance_live(&mut snapshot, &live, 7);
        assert_eq!(snapshot, p);
    }

    #[test]
    fn pages_hold_their_share_and_a_page_past_the_end_is_the_last() {
        let items: Vec<usize> = (0..45).collect();
        assert_eq!(page_of(&items, 0, 20), (&items[0..20], 1, 3));
        assert_eq!(page_of(&items, 2, 20), (&items[40..45], 41, 3));
        assert_eq!(page_of(&items, 9, 20), (&items[40..45], 41, 3));
        let none: [usize; 0] = [];
        assert_eq!(page_of(&none, 0, 20), (&none[..], 1, 1));
    }

    #[test]
    fn times_left_read_as_a_person_says_them() {
        assert_eq!(duration(40.2), "40 s");
        assert_eq!(duration(370.0), "6 min");
        assert_eq!(duration(4320.0), "72 min");
        assert_eq!(duration(7920.0), "2 h 12 min");
        assert_eq!(duration(-3.0), "0 s");
    }

    #[test]
    fn the_log_shows_statuses_stages_and_the_end() {
        let events = [
            status(Status::Running),
            stage("sft"),
            step(1, 1.0),
            Event::Done {
                steps: 30,
                adapter: "runs/job-1/adapter".into(),
            },
            Event::Status {
                status: Status::Failed,
                error: Some("out of memory".into()),
            },
        ];
        assert_eq!(
            log_lines(&events),
            [
                "status: running",
                "stage: sft",
                "finished 30 steps",
                "status: failed (out of memory)"
            ]
        );
    }

    #[test]
    fn alignment_curves_and_held_out_safety_are_charted() {
        let mut measured = step(2, 1.0);
        if let Event::Step { metrics, .. } = &mut measured {
            metrics.alignment = Some(safeprobe_wire::Alignment {
                at_zero: 0.03,
                at_probe: Some(0.26),
                at_random: Some(0.02),
                ..Default::default()
            });
        }
        let check = Event::SafetyCheck {
            step: 2,
            pair_margin: Some(-3.0),
            pair_loss: None,
            refusal_logprob: Some(-0.7),
        };
        let events = vec![step(1, 1.0), measured, check];
        let curves = alignment_series(&events);
        let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["V = 0", "probe used", "random probe (control)"]);
        let points: Vec<Vec<(f64, f64)>> = curves.iter().map(|c| c.points.clone()).collect();
        assert_eq!(
            points,
            [vec![(2.0, 0.03)], vec![(2.0, 0.26)], vec![(2.0, 0.02)]]
        );
        // Held-out checks belong to their run's segment and chart by step.
        let runs = segments(&events);
        assert_eq!(runs[0].events.len(), 3);
        assert_eq!(
            Metric::RefusalLogprob.points(&runs[0].events),
            [(2.0, -0.7)]
        );
        assert_eq!(Metric::PairMargin.points(&runs[0].events), [(2.0, -3.0)]);
        // The overlay's alignment is the probe's, on measurement steps only.
        assert_eq!(Metric::ProbeAlignment.points(&events), [(2.0, 0.26)]);
        assert!(Metric::TaskLoss.point(&events[2]).is_none());
        assert!(log_lines(&events).is_empty());
    }

    #[test]
    fn tasks_show_each_ones_newest_state_and_count_its_requeues() {
        let run = |method| RunOf {
            method,
            seed: 0,
            condition: "benign data".into(),
        };
        let task = |id: &str, method, state, detail: Option<&str>| Event::Task {
            run: run(method),
            id: id.into(),
            state,
            detail: detail.map(str::to_string),
        };
        let events = vec![
            task("7_0", Method::Sft, TaskState::Pending, Some("Resources")),
            task("7_1", Method::Sap, TaskState::Pending, None),
            task("7_0", Method::Sft, TaskState::Running, None),
            step(1, 1.0),
            task("7_0", Method::Sft, TaskState::Requeued, Some("BeginTime")),
            task("7_0", Method::Sft, TaskState::Running, None),
            task("7_1", Method::Sap, TaskState::Failed, Some("exit status 1")),
            task("7_0", Method::Sft, TaskState::Done, None),
        ];
        let rows = tasks(&events);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].id.as_str(), rows[0].state, rows[0].requeued),
            ("7_0", TaskState::Done, 1)
        );
        assert_eq!(rows[0].run, run(Method::Sft));
        assert_eq!(rows[0].detail, None);
        assert_eq!(
            (rows[1].state, rows[1].detail.as_deref()),
            (TaskState::Failed, Some("exit status 1"))
        );
        assert!(tasks(&[step(1, 1.0)]).is_empty());
        assert_eq!(
            log_lines(&events[6..7]),
            vec!["slurm task 7_1: failed (exit status 1)".to_string()]
        );
    }
}
