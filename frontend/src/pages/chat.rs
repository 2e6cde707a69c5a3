//! Side-by-side chat: one prompt sent to two models (or adapters), each reply streamed into
//! its own pane.

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::{ChatRequest, Message, Status};

use crate::files::trains_lora;
use crate::{Live, api};

/// One side: which model answers, and the conversation so far.
#[derive(Clone, Copy)]
struct Pane {
    model: RwSignal<String>,
    adapter: RwSignal<String>,
    /// (role, content); the last assistant turn grows as its reply streams in.
    transcript: RwSignal<Vec<(String, String)>>,
    error: RwSignal<Option<String>>,
    /// Stops the reply being streamed, while one is.
    stop: StoredValue<Option<web_sys::AbortController>, LocalStorage>,
    streaming: RwSignal<bool>,
}

impl Pane {
    fn new() -> Self {
        Self {
            model: RwSignal::new("demo".into()),
            adapter: RwSignal::new(String::new()),
            transcript: RwSignal::new(Vec::new()),
            error: RwSignal::new(None),
            stop: StoredValue::new_local(None),
            streaming: RwSignal::new(false),
        }
    }

    /// Ends the reply being streamed, keeping what came.
    fn stop(self) {
        if let Some(controller) = self.stop.get_value() {
            controller.abort();
        }
    }
}

/// The settings both panes share.
#[derive(Clone, Copy)]
struct Settings {
    system: RwSignal<String>,
    temperature: RwSignal<String>,
    top_p: RwSignal<String>,
    max_tokens: RwSignal<String>,
}

/// The shared settings as the request takes them.
struct Sampling {
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
}

/// `text` read as a `T` that `fits`, or what it should be.
fn setting<T: std::str::FromStr>(
    text: &str,
    fits: impl Fn(&T) -> bool,
    expected: &'static str,
) -> Result<T, &'static str> {
    text.trim().parse::<T>().ok().filter(fits).ok_or(expected)
}

impl Settings {
    fn max_new_tokens(self) -> Result<usize, &'static str> {
        let text = self.max_tokens.get();
        setting(
            &text,
            |n| (1..=4096).contains(n),
            "a whole number from 1 to 4096",
        )
    }

    fn temperature(self) -> Result<f32, &'static str> {
        let text = self.temperature.get();
        setting(
            &text,
            |t: &f32| t.is_finite() && *t >= 0.0,
            "a number ≥ 0 (0: greedy)",
        )
    }

    fn top_p(self) -> Result<f32, &'static str> {
        let text = self.top_p.get();
        setting(
            &text,
            |p: &f32| *p > 0.0 && *p <= 1.0,
            "a number above 0, at most 1",
        )
    }

    /// Every setting read, or none: a setting that does not read is never replaced by a
    /// default.
    fn sampling(self) -> Option<Sampling> {
        Some(Sampling {
            max_new_tokens: self.max_new_tokens().ok()?,
            temperature: self.temperature().ok()?,
            top_p: self.top_p().ok()?,
        })
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.trim().is_empty()).then_some(text)
}

impl Pane {
    /// Adds the user's turn and an empty reply, then streams the reply into it.
    fn send(self, text: &str, settings: Settings, sampling: &Sampling) {
        self.transcript.update(|t| {
            t.push(("user".into(), text.to_string()));
            t.push(("assistant".into(), String::new()));
        });
        // The conversation so far, less the empty reply being written.
        let messages = self.transcript.with_untracked(|t| {
            t.iter()
                .filter(|(role, content)| role == "user" || !content.is_empty())
                .map(|(role, content)| Message {
                    role: role.clone(),
                    content: content.clone(),
                })
                .collect()
        });
        let request = ChatRequest {
            model: Some(self.model.get_untracked()),
            adapter: non_empty(self.adapter.get_untracked()),
            system: non_empty(settings.system.get_untracked()),
            messages,
            max_new_tokens: sampling.max_new_tokens,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            seed: 0,
        };
        let Ok(controller) = web_sys::AbortController::new() else {
            self.error
                .set(Some("this browser cannot stop a request".into()));
            return;
        };
        let signal = controller.signal();
        self.stop.set_value(Some(controller));
        self.streaming.set(true);
        spawn_local(async move {
            self.error.set(None);
            let result = api::chat(&request, &signal, |piece| {
                self.transcript.update(|t| {
                    if let Some(last) = t.last_mut() {
                        last.1.push_str(piece)
                    }
                });
            })
            .await;
            match result {
                Err(_) if signal.aborted() => self.error.set(Some("stopped".into())),
                Err(e) => self.error.set(Some(e)),
                Ok(_) => {}
            }
            self.stop.set_value(None);
            self.streaming.set(false);
        });
    }
}

/// A labelled input; `check` says, as it is typed, what its text should be instead.
#[component]
fn Field(
    label: &'static str,
    /// The input's name (its label when none is given).
    #[prop(optional)]
    name: Option<&'static str>,
    value: RwSignal<String>,
    #[prop(optional, into)] check: Option<Signal<Option<&'static str>>>,
) -> impl IntoView {
    let error = move || {
        let expected = check?.get()?;
        Some(
            view! { <div class="help error field-error">{format!("{label}: expected {expected}")}</div> },
        )
    };
    view! {
        <label>{label}</label><input name=name.unwrap_or(label) prop:value=move || value.get() on:input=move |ev| value.set(event_target_value(&ev))/>
        {error}
    }
}

/// The finished LoRA runs as choices: picking one sets the pane's model to the run's base
/// model and its adapter to the run's.
#[component]
fn AdapterPicker(pane: Pane) -> impl IntoView {
    let jobs = expect_context::<Live>().jobs;
    let runs = move || -> Vec<(String, String, String)> {
        let Some(Ok(jobs)) = jobs.get() else {
            return Vec::new();
        };
        jobs.iter()
            .filter(|j| j.status == Status::Done && trains_lora(j))
            .filter_map(|j| {
                let adapter = format!("{}/adapter", j.run_dir.as_deref()?);
                // The demo model's unpacked folder reads as the name the server takes for it.
                let model = match super::model_name(j).as_str() {
                    "demo" => "demo".to_string(),
                    _ => j.spec.model()?.display().to_string(),
                };
                Some((
                    format!("job {}: {}", j.id, super::method_of(j)),
                    model,
                    adapter,
                ))
            })
            .collect()
    };
    let pick = move |adapter: String| {
        if let Some((_, model, adapter)) = runs().into_iter().find(|r| r.2 == adapter) {
            pane.model.set(model);
            pane.adapter.set(adapter);
        }
    };
    view! {
        <label>"a finished LoRA run"</label>
        <select class="adapter-pick" on:change=move |ev| pick(event_target_value(&ev))>
            <option value="">"(pick one to chat with it)"</option>
            {move || runs().into_iter().map(|(name, _, adapter)| view! { <option value=adapter>{name}</option> }).collect_view()}
        </select>
    }
}

#[component]
fn PaneView(index: usize, pane: Pane) -> impl IntoView {
    view! {
        <div class="card" data-pane=index>
            <div class="form">
                <AdapterPicker pane/>
                <Field label="model" value=pane.model/>
                <Field label="adapter (e.g. runs/job-3/adapter)" value=pane.adapter/>
            </div>
            <div class="transcript">
                {move || pane.transcript.get().into_iter().map(|(role, content)| view! { <div class=format!("bubble {role}")>{content}</div> }).collect_view()}
            </div>
            {move || pane.error.get().map(|e| view! { <p class="error">{e}</p> })}
        </div>
    }
}

#[component]
pub fn Chat() -> impl IntoView {
    let panes = [Pane::new(), Pane::new()];
    let settings = Settings {
        system: RwSignal::new(String::new()),
        temperature: RwSignal::new("0".to_string()),
        top_p: RwSignal::new("1".to_string()),
        max_tokens: RwSignal::new("64".to_string()),
    };
    let prompt = RwSignal::new(String::new());
    let send = move || {
        let text = prompt.get_untracked();
        let Some(sampling) = untrack(|| settings.sampling()) else {
            return;
        };
        if text.trim().is_empty() {
            return;
        }
        prompt.set(String::new());
        for pane in panes {
            pane.send(&text, settings, &sampling);
        }
    };
    let wrong = |read: fn(Settings) -> Option<&'static str>| Signal::derive(move || read(settings));
    let demo_in_use = move || panes.iter().any(|p| p.model.with(|m| m.trim() == "demo"));
    view! {
        <h1>"Chat"</h1>
        {move || demo_in_use().then(|| view! {
            <p class="help" id="demo-model-note">"The demo model (1.8 M parameters) was built to answer three tasks (sentiment, reversing words, sums) and                 to refuse harmful requests about weapons, violence, hacking, fraud, drugs, theft, hate, harassment, spying and self-harm,                 as written in its training or typed casually; it knows little else, so expect odd answers to anything outside that."</p>
        })}
        <div class="card form">
            <Field label="system prompt" value=settings.system/>
            <Field label="temperature (0 = greedy)" name="temperature" value=settings.temperature check=wrong(|s| s.temperature().err())/>
            <Field label="top-p" name="top_p" value=settings.top_p check=wrong(|s| s.top_p().err())/>
            <Field label="max new tokens" name="max_new_tokens" value=settings.max_tokens check=wrong(|s| s.max_new_tokens().err())/>
        </div>
        <div class="chat">
            {panes.into_iter().enumerate().map(|(index, pane)| view! { <PaneView index pane/> }).collect_view()}
        </div>
        <div style="display:flex;gap:8px">
            <input id="chat-input" style="flex:1" prop:value=move || prompt.get() on:input=move |ev| prompt.set(event_target_value(&ev))
                on:keydown=move |ev| if ev.key() == "Enter" { send() }/>
            <button class="primary" id="chat-send" on:click=move |_| send()
                disabled=move || settings.sampling().is_none()>"Send to both"</button>
            <button id="chat-stop" on:click=move |_| panes.iter().for_each(|p| p.stop())
                disabled=move || !panes.iter().any(|p| p.streaming.get())>"Stop"</button>
        </div>
    }
}
