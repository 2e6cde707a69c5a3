//! Training progress on stderr: a redrawn bar on a terminal, one line per step otherwise.

use safeprobe_train::run::Event;

/// A reporter for the trainer's events.
pub fn reporter() -> impl FnMut(&Event) {
    let mut started = std::time::Instant::now();
    let mut first_step = None;
    let mut last_step = 0;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    move |event: &Event| {
        match event {
            Event::Step {
                step,
                total_steps,
                metrics,
                tokens_per_s,
                ..
            } => {
                // A new run (compare trains several in a row) restarts the clock.
                if *step <= last_step {
                    started = std::time::Instant::now();
                    first_step = None;
                }
                last_step = *step;
                let first = *first_step.get_or_insert(*step);
                let done = (step + 1 - first) as f64;
                let eta = started.elapsed().as_secs_f64() / done * (total_steps - step) as f64;
                let sap = match (metrics.su_loss, metrics.safety_loss) {
                    (Some(su), safety) => format!(
                        " | L_su {su:.4}{} | ‖ΔW‖ {:.2e}",
                        safety
                            .map(|s| format!(" | safety {s:.4}"))
                            .unwrap_or_default(),
                        metrics.delta_norm.unwrap_or(0.0)
                    ),
                    _ => String::new(),
                };
                let line = format!(
                    "step {step}/{total_steps} | loss {:.4}{sap} | {tokens_per_s:.0} tok/s | ETA {eta:.0}s",
                    metrics.task_loss
                );
                if interactive {
                    // One redrawn line on a terminal: a bar, then the numbers.
                    let width = 20;
                    let filled = (step * width / (*total_steps).max(1)).min(width);
                    let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled));
                    eprint!("\r\x1b[2K{bar} {line}");
                    if step == total_steps {
                        eprintln!();
                    }
                } else {
                    eprintln!("{line}");
                }
            }
            Event::Validation { step, loss } => {
                if interactive {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("step {step}: validation loss {loss:.4}")
            }
            Event::Done { adapter, .. } => {
                eprintln!("written to {}", adapter.display())
            }
            Event::SafetyCheck {
                step,
                pair_margin,
                pair_loss,
                refusal_logprob,
            } => {
                if interactive {
                    eprint!("\r\x1b[2K");
                }
                let shown = |name: &str, v: &Option<f64>| {
                    v.map(|v| format!(" {name} {v:.4}")).unwrap_or_default()
                };
                eprintln!(
                    "step {step}: held-out safety{}{}{}",
                    shown("margin", pair_margin),
                    shown("loss(T=1)", pair_loss),
                    shown("log p(refusal)/token", refusal_logprob)
                )
            }
            Event::Warning { step, message } => {
                if interactive {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("warning (step {step}): {message}")
            }
            Event::Task {
                run,
                id,
                state,
                detail,
            } => {
                if interactive {
                    eprint!("\r\x1b[2K");
                }
                let detail = detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                eprintln!(
                    "slurm task {id} ({} seed {}, {}) {}{detail}",
                    run.method.name(),
                    run.seed,
                    run.condition,
                    state.name()
                )
            }
            // The server's events; the trainer does not send them.
            Event::Stage { .. } | Event::Status { .. } => {}
        }
    }
}
