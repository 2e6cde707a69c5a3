//! Finished comparisons' tables, and the task loss of training runs picked side by side.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{Event, Job, JobKind, JobResult, RunOf, RunResult};

use super::{
    ComparisonTable, harmful_score, live, load_errors, method_of, or_dash, start_demo_comparison,
    with_jobs,
};
use crate::charts::line_chart;
use crate::config_form::{COMPARE_FORM, FormSections, StartBar, start_job};
use crate::files::trains_lora;
use crate::series::{self, COLORS, Metric, OVERLAYS, Series};
use crate::{Page, api};

#[component]
pub fn Compare() -> impl IntoView {
    let live = live();
    let picked = RwSignal::new(Vec::<Pick>::new());
    view! {
        <h1>"Compare"</h1>
        <div class="card hero">
            <button class="primary" on:click=move |_| spawn_local(start_demo_comparison(live))>"Run the demo comparison"</button>
            <span class="help">" base model, SFT, SAP and safety mixing on the demo model, on benign data and on 10%-poisoned data (three seeds each, about 5 minutes on two cores); the tables appear when it finishes"</span>
        </div>
        <NewComparison/>
        {with_jobs(|jobs| {
            jobs.into_iter()
                .filter_map(|job| match job.result {
                    Some(JobResult::Compare(comparison)) => Some((job.id, comparison)),
                    _ => None,
                })
                .map(|(id, comparison)| view! {
                    <div class="card">
                        <h2><a href=Page::Run(id).hash()>{format!("Comparison #{id}")}</a>{format!(" — task {}", comparison.task)}</h2>
                        <ComparisonTable comparison/>
                    </div>
                })
                .collect_view()
        })}
        <h2>"Training runs side by side"</h2>
        <p class="help">"Pick training runs, or runs inside a finished comparison, to overlay any of their metrics. The cosine columns are the newest measurement: > 0 means the task step also lowers the safety loss."</p>
        {with_jobs(move |jobs| view! {
            <table id="runs-side-by-side">
                <thead><tr><th></th><th>"#"</th><th>"method"</th><th>"fine-tune"</th><th>"status"</th><th>"HS (%)"</th><th>"final task loss"</th><th>"validation loss"</th><th>"time/step (s)"</th><th>"cos(∇L_task, ĝ) at V = 0 / probe / random"</th></tr></thead>
                <tbody>
                    {jobs.iter().filter(|j| j.kind() == JobKind::Train).cloned().map(|job| view! { <PickRow job picked/> }).collect_view()}
                    {jobs.iter().flat_map(comparison_runs).map(|(pick, run)| view! { <ComparisonRunRow pick run picked/> }).collect_view()}
                </tbody>
            </table>
        })}
        <PickedOverlay picked/>
    }
}

/// A run picked to overlay: a training job, or one run inside a comparison job; with its HS.
#[derive(Clone, Debug, PartialEq)]
struct Pick {
    job: i64,
    run: Option<RunOf>,
    harmful_score: Option<f64>,
}

impl Pick {
    fn name(&self) -> String {
        match &self.run {
            None => format!("#{}", self.job),
            Some(run) => format!(
                "#{} {} seed {} · {}",
                self.job,
                run.method.name(),
                run.seed,
                run.condition
            ),
        }
    }

    fn is(&self, other: &Pick) -> bool {
        (self.job, &self.run) == (other.job, &other.run)
    }
}

/// The fine-tuned runs of a finished comparison, each as a pick with its result.
fn comparison_runs(job: &Job) -> Vec<(Pick, RunResult)> {
    let Some(JobResult::Compare(comparison)) = &job.result else {
        return Vec::new();
    };
    comparison
        .conditions
        .iter()
        .flat_map(|condition| {
            condition.runs.iter().filter_map(move |run| {
                let seed = run.seed?;
                let pick = Pick {
                    job: job.id,
                    run: Some(RunOf {
                        method: run.method,
                        seed,
                        condition: condition.name(),
                    }),
                    harmful_score: Some(run.harmful_score),
                };
                Some((pick, run.clone()))
            })
        })
        .collect()
}

/// A checkbox that adds `pick` to the picked runs or takes it out.
#[component]
fn PickBox(pick: Pick, picked: RwSignal<Vec<Pick>>) -> impl IntoView {
    let checked = {
        let pick = pick.clone();
        move || picked.with(|p| p.iter().any(|x| x.is(&pick)))
    };
    let toggle = move |on: bool| {
        picked.update(|p| {
            p.retain(|x| !x.is(&pick));
            if on {
                p.push(pick.clone());
            }
        })
    };
    view! { <input type="checkbox" prop:checked=checked on:change=move |ev| toggle(event_target_checked(&ev))/> }
}

#[component]
fn ComparisonRunRow(pick: Pick, run: RunResult, picked: RwSignal<Vec<Pick>>) -> impl IntoView {
    let (job, name) = (pick.job, pick.name());
    view! {
        <tr class="comparison-run">
            <td><PickBox pick picked/></td>
            <td><a href=Page::Run(job).hash()>{job}</a></td>
            <td>{name}</td>
            <td>"—"</td>
            <td>"done"</td>
            <td>{format!("{:.1}", run.harmful_score)}</td>
            <td>{or_dash(run.final_task_loss.map(|l| format!("{l:.4}")))}</td>
            <td>{format!("{:.4}", run.validation_loss)}</td>
            <td>{or_dash(run.step_time_s.map(|t| format!("{t:.3}")))}</td>
            <td>"—"</td>
        </tr>
    }
}

/// A comparison with the user's settings: the demo comparison's, changed where the form says.
#[component]
fn NewComparison() -> impl IntoView {
    let live = live();
    let state = COMPARE_FORM.state(BTreeMap::new);
    view! {
        <details class="card" id="new-comparison">
            <summary>"A comparison of your own: methods, seeds, poisoning, task, judge and trainer settings (empty fields keep the demo comparison's values)"</summary>
            <FormSections state except="train."/>
            <details>
                <summary>"Trainer settings of every run"</summary>
                <FormSections state prefix="train."/>
            </details>
            <StartBar state kind=JobKind::Compare label="Start comparison" id="start-comparison" on_start=move || start_job(live, JobKind::Compare, state)/>
        </details>
    }
}

#[component]
fn PickRow(job: Job, picked: RwSignal<Vec<Pick>>) -> impl IntoView {
    let id = job.id;
    let pick = Pick {
        job: id,
        run: None,
        harmful_score: harmful_score(&job),
    };
    let last = job.last_step.as_ref();
    let task_loss = last
        .and_then(|e| Metric::TaskLoss.point(e))
        .map(|(_, l)| format!("{l:.4}"));
    let step_time = last
        .and_then(|e| Metric::StepTime.point(e))
        .map(|(_, t)| format!("{t:.3}"));
    let validation = job
        .last_validation
        .as_ref()
        .and_then(|e| Metric::ValidationLoss.point(e))
        .map(|(_, l)| format!("{l:.4}"));
    let alignment = job.last_alignment.as_ref().map(|a| {
        let show = |c: Option<f64>| c.map_or("—".to_string(), |c| format!("{c:+.3}"));
        format!(
            "{} / {} / {}",
            show(Some(a.at_zero)),
            show(a.at_probe),
            show(a.at_random)
        )
    });
    view! {
        <tr>
            <td><PickBox pick picked/></td>
            <td><a href=Page::Run(id).hash()>{id}</a></td>
            <td>{method_of(&job)}</td>
            // Runs of one method differ most by what they trained: an adapter or every weight.
            <td>{if trains_lora(&job) { "LoRA" } else { "full" }}</td>
            <td>{job.status.name()}</td>
            <td>{or_dash(harmful_score(&job).map(|h| format!("{h:.1}")))}</td>
            <td>{or_dash(task_loss)}</td>
            <td>{or_dash(validation)}</td>
            <td>{or_dash(step_time)}</td>
            <td>{or_dash(alignment)}</td>
        </tr>
    }
}

/// The picked runs' events, read again whenever the pick changes (each job once), and one
/// chart of the metric chosen, a line per run; then their HS side by side.
#[component]
fn PickedOverlay(picked: RwSignal<Vec<Pick>>) -> impl IntoView {
    let hidden = RwSignal::new(Default::default());
    let metric = RwSignal::new(0usize);
    let runs = LocalResource::new(move || {
        let picks = picked.get();
        async move {
            let mut events: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
            for pick in &picks {
                if !events.contains_key(&pick.job) {
                    let read = api::all_events(pick.job).await?;
                    events.insert(pick.job, read.into_iter().map(|e| e.body).collect());
                }
            }
            let runs = picks
                .into_iter()
                .map(|pick| {
                    let all = &events[&pick.job];
                    let own = match &pick.run {
                        None => all.clone(),
                        Some(run) => series::segments(all)
                            .into_iter()
                            .find(|s| s.run.as_ref() == Some(run))
                            .map(|s| s.events)
                            .unwrap_or_default(),
                    };
                    (pick, own)
                })
                .collect::<Vec<_>>();
            Ok::<_, String>(runs)
        }
    });
    let chart = move || {
        let (which, title, unit) = OVERLAYS[metric.get()];
        Suspend::new(async move {
            runs.await.map(|runs| {
                let curves = runs
                    .iter()
                    .enumerate()
                    .map(|(i, (pick, events))| Series {
                        name: pick.name(),
                        color: COLORS[i % COLORS.len()],
                        points: which.points(events),
                        ..Series::default()
                    })
                    .collect();
                let scores = runs
                    .iter()
                    .map(|(pick, _)| {
                        let hs = pick.harmful_score;
                        let width = format!("width:{:.1}%", hs.unwrap_or(0.0).clamp(0.0, 100.0));
                        view! {
                            <div class="hs-bar"><span class="hs-name">{pick.name()}</span>
                                <span class="hs-track"><span style=width></span></span>
                                <span>{or_dash(hs.map(|h| format!("{h:.1}%")))}</span></div>
                        }
                    })
                    .collect_view();
                view! {
                    {line_chart(format!("{title} of the picked runs"), "step", unit, curves, hidden)}
                    {(!runs.is_empty()).then(|| view! { <div class="card" id="picked-hs"><b>"HS of the picked runs"</b>{scores}</div> })}
                }
            })
        })
    };
    view! {
        <div>
            <label for="overlay-metric">"overlay: "</label>
            <select id="overlay-metric" on:change=move |ev| metric.set(event_target_value(&ev).parse().unwrap_or(0))>
                {OVERLAYS.iter().enumerate().map(|(i, (_, title, _))| view! { <option value=i.to_string()>{*title}</option> }).collect_view()}
            </select>
        </div>
        <Transition>
            <ErrorBoundary fallback=load_errors><div>{chart}</div></ErrorBoundary>
        </Transition>
    }
}
