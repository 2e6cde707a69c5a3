//! safeprobe's control panel: runs, a new-run form, run details with live charts, the
//! SFT-vs-SAP comparison, evaluation, side-by-side chat and the device. Pages live in the URL
//! hash, so reloads land where they were; the live stream re-attaches to running jobs.

mod api;
mod charts;
mod pages;
// Used by the pages from the next commit on.
#[allow(dead_code)]
mod series;

use leptos::prelude::*;
use serde_json::Value;

/// Where the app is: `#/runs`, `#/run/7`, `#/new`, `#/compare`, `#/eval`, `#/chat`, `#/device`.
#[derive(Clone, Debug, PartialEq)]
pub enum Page {
    Runs,
    Run(i64),
    New,
    Compare,
    Eval,
    Chat,
    Device,
}

impl Page {
    fn from_hash(hash: &str) -> Self {
        let parts: Vec<&str> = hash.trim_start_matches('#').trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["run", id] => id.parse().map(Page::Run).unwrap_or(Page::Runs),
            ["new"] => Page::New,
            ["compare"] => Page::Compare,
            ["eval"] => Page::Eval,
            ["chat"] => Page::Chat,
            ["device"] => Page::Device,
            _ => Page::Runs,
        }
    }
    pub fn hash(&self) -> String {
        match self {
            Page::Runs => "#/runs".into(),
            Page::Run(id) => format!("#/run/{id}"),
            Page::New => "#/new".into(),
            Page::Compare => "#/compare".into(),
            Page::Eval => "#/eval".into(),
            Page::Chat => "#/chat".into(),
            Page::Device => "#/device".into(),
        }
    }
}

pub fn go(page: Page) {
    if let Some(w) = web_sys::window() {
        let _ = w.location().set_hash(&page.hash());
    }
}

/// State shared by every page: the job list and each job's events, kept current by the
/// live stream.
#[derive(Clone, Copy)]
pub struct Live {
    pub jobs: RwSignal<Vec<Value>>,
    /// Events in arrival order; pages filter what they need.
    pub events: RwSignal<Vec<LiveEvent>>,
    pub connected: RwSignal<bool>,
}

/// One message of the live stream.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveEvent {
    pub job: i64,
    /// The event's number within its job: numbers grow and are never reused, so an event
    /// numbered at most what a page already read from the server is one it has.
    pub seq: i64,
    pub body: Value,
}

pub async fn refresh_jobs(live: Live) {
    if let Ok(Value::Array(jobs)) = api::get("/api/jobs").await {
        live.jobs.set(jobs);
    }
}

#[component]
fn App() -> impl IntoView {
    let current = || web_sys::window().and_then(|w| w.location().hash().ok()).unwrap_or_default();
    let page = RwSignal::new(Page::from_hash(&current()));
    let on_hash = wasm_bindgen::closure::Closure::<dyn Fn()>::new(move || page.set(Page::from_hash(&current())));
    if let Some(w) = web_sys::window() {
        w.set_onhashchange(Some(wasm_bindgen::JsCast::unchecked_ref(on_hash.as_ref())));
    }
    on_hash.forget();

    let live = Live {
        jobs: RwSignal::new(Vec::new()),
        events: RwSignal::new(Vec::new()),
        connected: RwSignal::new(false),
    };
    provide_context(live);
    leptos::task::spawn_local(refresh_jobs(live));
    let source = api::subscribe(move |message: Value| {
        live.connected.set(true);
        let event = LiveEvent {
            job: message["job"].as_i64().unwrap_or(0),
            seq: message["seq"].as_i64().unwrap_or(0),
            body: message["body"].clone(),
        };
        let is_status = event.body["event"] == "status";
        live.events.update(|e| e.push(event));
        if is_status {
            leptos::task::spawn_local(refresh_jobs(live));
        }
    });
    if let Some(source) = &source {
        let on_open = wasm_bindgen::closure::Closure::<dyn Fn()>::new(move || {
            live.connected.set(true);
            // After a server restart: reload what happened while we were away.
            leptos::task::spawn_local(refresh_jobs(live));
        });
        source.set_onopen(Some(wasm_bindgen::JsCast::unchecked_ref(on_open.as_ref())));
        on_open.forget();
        let on_error = wasm_bindgen::closure::Closure::<dyn Fn()>::new(move || live.connected.set(false));
        source.set_onerror(Some(wasm_bindgen::JsCast::unchecked_ref(on_error.as_ref())));
        on_error.forget();
    }

    let link = move |target: Page, label: &'static str| {
        let t = target.clone();
        view! {
            <a href=target.hash() class=move || {
                let p = page.get();
                let same = p == t || matches!((&p, &t), (Page::Run(_), Page::Runs));
                if same { "active" } else { "" }
            }>{label}</a>
        }
    };
    view! {
        <nav>
            <span class="brand">"safeprobe"</span>
            {link(Page::Runs, "Runs")}
            {link(Page::New, "New run")}
            {link(Page::Compare, "Compare")}
            {link(Page::Eval, "Evaluate")}
            {link(Page::Chat, "Chat")}
            {link(Page::Device, "Device")}
            <span style="margin-left:auto;color:#cfd8ef" id="live-status">
                {move || if live.connected.get() { "● live" } else { "○ connecting…" }}
            </span>
        </nav>
        <main>
            {move || match page.get() {
                Page::Runs => pages::runs().into_any(),
                Page::Run(id) => pages::run_detail(id).into_any(),
                Page::New => pages::new_run().into_any(),
                Page::Compare => pages::compare().into_any(),
                Page::Eval => pages::evaluate().into_any(),
                Page::Chat => pages::chat().into_any(),
                Page::Device => pages::device().into_any(),
            }}
        </main>
    }
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
