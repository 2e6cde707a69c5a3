//! The web UI, embedded in the binary at build time from `frontend/dist` (built by trunk), so
//! the binary alone serves the app. Paths that are not files get index.html (client-side
//! routing).

use axum::http::{StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../../frontend/dist"]
#[allow_missing = true]
struct Dist;

pub async fn serve(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let file = Dist::get(path)
        .map(|f| (path.to_string(), f))
        .or_else(|| Dist::get("index.html").map(|f| ("index.html".to_string(), f)));
    match file {
        Some((name, file)) => {
            let mime = mime_for(&name);
            ([(header::CONTENT_TYPE, mime)], file.data.into_owned()).into_response()
        }
        None => (
            StatusCode::OK,
            Html("<!doctype html><title>safeprobe</title><p>The web UI was not built into this binary. \
                  Build it with <code>trunk build --release</code> in <code>frontend/</code>, then rebuild the server. \
                  The JSON API is at <code>/api/</code>.</p>"),
        )
            .into_response(),
    }
}

fn mime_for(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}
