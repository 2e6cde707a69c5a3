//! How far a job is as a whole, folded from its events in order. The job list (from the
//! store's newest stage and step of each job), a job's page (from all its events) and the
//! live stream after either fold the same way, so the list and the page agree.

use serde::{Deserialize, Serialize};

use crate::events::{Event, Part};

/// A job's progress: which part it is in (a comparison's runs), the part's step, and when the
/// newest event came.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// The part under way, for a job in parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// The newest stage's name ("sft (seed 1)", "evaluating").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The part's newest step and its step count (0 of 0 before its first step).
    pub step: usize,
    pub total_steps: usize,
    /// The newest step's time (s).
    pub step_time_s: f64,
    /// The number of the newest event folded in: an event numbered at most this is already in.
    pub seq: i64,
    /// When the newest event folded in was stored (s since the Unix epoch; 0: unknown).
    pub at: f64,
}

impl JobProgress {
    /// Folds in event number `seq`, stored at `at`, unless it is already in.
    pub fn advance(&mut self, seq: i64, at: f64, event: &Event) {
        if seq <= self.seq {
            return;
        }
        match event {
            Event::Stage { stage, part, .. } => {
                self.stage = Some(stage.clone());
                // A stage within a part (a run's evaluation) keeps the part's steps.
                if part.is_some() {
                    self.part = *part;
                    self.step = 0;
                    self.total_steps = 0;
                }
            }
            Event::Step {
                step,
                total_steps,
                step_time_s,
                ..
            } => {
                self.step = *step;
                self.total_steps = *total_steps;
                self.step_time_s = *step_time_s;
            }
            _ => {}
        }
        self.seq = seq;
        self.at = self.at.max(at);
    }

    /// The progress after these events, in order: (number, stored at, event).
    pub fn of<'a>(events: impl IntoIterator<Item = (i64, f64, &'a Event)>) -> Self {
        let mut progress = Self::default();
        progress.advance_all(events);
        progress
    }

    /// Folds in each of these events, in order, that is not in yet.
    pub fn advance_all<'a>(&mut self, events: impl IntoIterator<Item = (i64, f64, &'a Event)>) {
        for (seq, at, event) in events {
            self.advance(seq, at, event);
        }
    }

    /// The share of the part's steps done, 0–1.
    fn within_part(&self) -> f64 {
        match self.total_steps {
            0 => 0.0,
            total => (self.step as f64 / total as f64).min(1.0),
        }
    }

    /// The share of the job done, 0–1: the parts before this one whole, this one by its steps
    /// (its evaluation, which reports no steps, counts with its last step).
    pub fn fraction(&self) -> f64 {
        match self.part {
            Some(Part { number, of }) if of > 0 => {
                ((number.saturating_sub(1) as f64 + self.within_part()) / of as f64).min(1.0)
            }
            _ => self.within_part(),
        }
    }

    /// Seconds left, if anything says: for a job in parts, the time it has taken so far (from
    /// `started_at` to the newest event, both the server's clock) scaled to the share left;
    /// for a single run, the newest step's pace over its steps left.
    pub fn eta_s(&self, started_at: Option<f64>) -> Option<f64> {
        if self.part.is_none() {
            let left = self.total_steps.saturating_sub(self.step);
            return (self.total_steps > 0).then(|| self.step_time_s * left as f64);
        }
        let done = self.fraction();
        let elapsed = self.at - started_at?;
        (done > 0.0 && self.at > 0.0 && elapsed >= 0.0).then(|| elapsed * (1.0 - done) / done)
    }

    /// The job-level line: "run 3 of 19 · 14%" for a job in parts, "step 60/120" for a run.
    pub fn summary(&self) -> Option<String> {
        match self.part {
            Some(Part { number, of }) => Some(format!(
                "part {number} of {of} · {:.0}%",
                100.0 * self.fraction()
            )),
            None => {
                (self.total_steps > 0).then(|| format!("step {}/{}", self.step, self.total_steps))
            }
        }
    }

    /// The stage's detail: its name and, in a job of parts, the part's step.
    pub fn detail(&self) -> Option<String> {
        let steps = (self.part.is_some() && self.total_steps > 0)
            .then(|| format!("step {}/{}", self.step, self.total_steps));
        match (&self.stage, steps) {
            (Some(stage), Some(steps)) => Some(format!("{stage} · {steps}")),
            (Some(stage), None) => Some(stage.clone()),
            (None, steps) => steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::StepMetrics;

    fn stage(name: &str, part: Option<(usize, usize)>) -> Event {
        Event::Stage {
            stage: name.into(),
            part: part.map(|(number, of)| Part { number, of }),
            run: None,
        }
    }

    fn step(step: usize, total_steps: usize) -> Event {
        Event::Step {
            step,
            total_steps,
            lr: 0.001,
            tokens_per_s: 1.0,
            step_time_s: 0.5,
            metrics: StepMetrics::default(),
        }
    }

    #[test]
    fn a_comparison_counts_the_parts_before_this_one_whole_and_this_one_by_its_steps() {
        let events = [
            stage("evaluating the base model", Some((1, 5))),
            stage("sft (seed 0)", Some((2, 5))),
            step(30, 120),
        ];
        let p = JobProgress::of(
            events
                .iter()
                .enumerate()
                .map(|(i, e)| (i as i64 + 1, 100.0 + 10.0 * i as f64, e)),
        );
        // (1 + 30/120) / 5 = 0.25.
        assert!((p.fraction() - 0.25).abs() < 1e-12);
        assert_eq!(p.summary().as_deref(), Some("part 2 of 5 · 25%"));
        assert_eq!(p.detail().as_deref(), Some("sft (seed 0) · step 30/120"));
        // 20 s from the start to the newest event for a quarter: 60 s left.
        assert!((p.eta_s(Some(100.0)).unwrap() - 60.0).abs() < 1e-9);
        // A new part starts at its first step, not at the last part's.
        let mut next = p.clone();
        next.advance(4, 130.0, &stage("sap (seed 0)", Some((3, 5))));
        assert_eq!((next.step, next.total_steps), (0, 0));
        assert!((next.fraction() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn a_run_is_its_steps_and_its_evaluation_keeps_them() {
        let mut p = JobProgress::default();
        p.advance(1, 10.0, &step(60, 120));
        assert_eq!(p.summary().as_deref(), Some("step 60/120"));
        // 60 steps left at 0.5 s.
        assert_eq!(p.eta_s(None), Some(30.0));
        p.advance(2, 11.0, &stage("evaluating", None));
        assert!((p.fraction() - 0.5).abs() < 1e-12);
        assert_eq!(p.detail().as_deref(), Some("evaluating"));
    }

    #[test]
    fn an_event_already_folded_in_is_not_folded_again() {
        let mut p = JobProgress::default();
        p.advance(5, 10.0, &step(5, 10));
        p.advance(3, 8.0, &step(3, 10));
        assert_eq!((p.step, p.seq), (5, 5));
        // Before any step, no share and no estimate.
        assert_eq!(JobProgress::default().fraction(), 0.0);
        assert_eq!(JobProgress::default().eta_s(Some(0.0)), None);
        assert_eq!(JobProgress::default().summary(), None);
    }
}
