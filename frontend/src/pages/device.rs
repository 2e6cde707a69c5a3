//! The device jobs run on, and every adapter wgpu found.

use leptos::prelude::*;
use safeprobe_wire::{AdapterInfo, DeviceReport};

use super::{load_errors, loading};
use crate::api;

#[component]
pub fn Device() -> impl IntoView {
    let report = LocalResource::new(|| api::get::<DeviceReport>("/api/device"));
    let shown = move || {
        Suspend::new(async move {
            report.await.map(|report| {
                view! {
                    <div class="card"><b>"Jobs run on: "</b><span id="device-selected">{report.selected}</span></div>
                    <h2>"wgpu adapters"</h2>
                    <table>
                        <thead><tr><th>"name"</th><th>"vendor"</th><th>"type"</th><th>"backend"</th><th>"driver"</th></tr></thead>
                        <tbody>{report.adapters.into_iter().map(|adapter| view! { <AdapterRow adapter/> }).collect_view()}</tbody>
                    </table>
                }
            })
        })
    };
    view! {
        <h1>"Device"</h1>
        <Suspense fallback=loading>
            <ErrorBoundary fallback=load_errors>{shown}</ErrorBoundary>
        </Suspense>
    }
}

#[component]
fn AdapterRow(adapter: AdapterInfo) -> impl IntoView {
    view! {
        <tr><td>{adapter.name}</td><td>{adapter.vendor}</td><td>{adapter.device_type}</td><td>{adapter.backend}</td><td>{adapter.driver}</td></tr>
    }
}
