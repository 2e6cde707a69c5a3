//! safeprobe's control panel: runs, a new-run form, run details with live charts, the
//! SFT-vs-SAP comparison, evaluation, side-by-side chat and the device. Pages live in the URL
//! hash, so reloads land where they were; the live stream re-attaches to running jobs.

mod api;
mod charts;
mod config_form;
mod files;
mod pages;
mod series;

use leptos::prelude::*;
use safeprobe_wire::{Event, Job, LiveMessage};
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;

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
        let parts: Vec<&str> = hash
            .trim_start_matches('#')
            .trim_start_matches('/')
            .split('/')
            .collect();
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

/// The page the URL's hash names, kept current as the hash changes.
fn current_page() -> RwSignal<Page> {
    let hash = || {
        web_sys::window()
            .and_then(|w| w.location().hash().ok())
            .unwrap_or_default()
    };
    let page = RwSignal::new(Page::from_hash(&hash()));
    let on_hash = Closure::<dyn Fn()>::new(move || page.set(Page::from_hash(&hash())));
    if let Some(w) = web_sys::window() {
        w.set_onhashchange(Some(on_hash.as_ref().unchecked_ref()));
    }
    // The app lives as long as the page: the handler is never dropped.
    on_hash.forget();
    page
}

/// State shared by every page: the job list and each job's events, kept current by the
/// live stream.
#[derive(Clone, Copy)]
pub struct Live {
    /// Fetched again on every status change and after a reconnect.
    pub jobs: LocalResource<Result<Vec<Job>, String>>,
    /// Live messages in arrival order; pages filter what they need.
    pub events: RwSignal<Vec<LiveMessage>>,
    pub connected: RwSignal<bool>,
}

impl Live {
    fn new() -> Self {
        Self {
            jobs: LocalResource::new(|| api::get::<Vec<Job>>("/api/jobs")),
            events: RwSignal::new(Vec::new()),
            connected: RwSignal::new(false),
        }
    }

    /// Follows the live stream: every message is kept, and a status change or a reconnect
    /// (after a server restart: what happened while we were away) reloads the job list.
    fn follow(self) {
        let source = api::subscribe(move |message| {
            self.connected.set(true);
            let is_status = matches!(message.body, Event::Status { .. });
            self.events.update(|e| e.push(message));
            if is_status {
                self.jobs.refetch();
            }
        });
        let Some(source) = source else { return };
        let on_open = Closure::<dyn Fn()>::new(move || {
            self.connected.set(true);
            self.jobs.refetch();
        });
        source.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        on_open.forget();
        let on_error = Closure::<dyn Fn()>::new(move || self.connected.set(false));
        source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        on_error.forget();
    }
}

/// A link in the top bar; the current page's is marked (a run's page counts as Runs).
#[component]
fn NavLink(current: RwSignal<Page>, target: Page, label: &'static str) -> impl IntoView {
    let href = target.hash();
    let class = move || {
        let here = current.get();
        let active = here == target || matches!((&here, &target), (Page::Run(_), Page::Runs));
        if active { "active" } else { "" }
    };
    view! { <a href=href class=class>{label}</a> }
}

#[component]
fn App() -> impl IntoView {
    let page = current_page();
    let live = Live::new();
    provide_context(live);
    live.follow();
    view! {
        <nav>
            <span class="brand">"safeprobe"</span>
            <NavLink current=page target=Page::Runs label="Runs"/>
            <NavLink current=page target=Page::New label="New run"/>
            <NavLink current=page target=Page::Compare label="Compare"/>
            <NavLink current=page target=Page::Eval label="Evaluate"/>
            <NavLink current=page target=Page::Chat label="Chat"/>
            <NavLink current=page target=Page::Device label="Device"/>
            <span style="margin-left:auto;color:#cfd8ef" id="live-status">
                {move || if live.connected.get() { "● live" } else { "○ connecting…" }}
            </span>
        </nav>
        <main>
            {move || match page.get() {
                Page::Runs => view! { <pages::runs::Runs/> }.into_any(),
                Page::Run(id) => view! { <pages::run_detail::RunDetail id/> }.into_any(),
                Page::New => view! { <pages::new_run::NewRun/> }.into_any(),
                Page::Compare => view! { <pages::compare::Compare/> }.into_any(),
                Page::Eval => view! { <pages::evaluate::Evaluate/> }.into_any(),
                Page::Chat => view! { <pages::chat::Chat/> }.into_any(),
                Page::Device => view! { <pages::device::Device/> }.into_any(),
            }}
        </main>
    }
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
