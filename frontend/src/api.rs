//! Talking to the server: JSON calls with the access token, the live event stream, and
//! streamed chat (Server-Sent Events over a POST response).

use gloo_net::http::{Request, Response};
use serde_json::Value;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

const TOKEN_KEY: &str = "safeprobe-token";

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok()?
}

/// The access token: taken from `?token=` once (then remembered), or from storage.
pub fn token() -> Option<String> {
    let window = web_sys::window()?;
    let search = window.location().search().ok().unwrap_or_default();
    if let Some(t) = search.trim_start_matches('?').split('&').find_map(|kv| kv.strip_prefix("token=")) {
        if let Some(s) = storage() {
            let _ = s.set_item(TOKEN_KEY, t);
        }
        return Some(t.to_string());
    }
    storage()?.get_item(TOKEN_KEY).ok()?
}

fn auth(request: gloo_net::http::RequestBuilder) -> gloo_net::http::RequestBuilder {
    match token() {
        Some(t) => request.header("Authorization", &format!("Bearer {t}")),
        None => request,
    }
}

async fn read(response: Result<Response, gloo_net::Error>) -> Result<Value, String> {
    let response = response.map_err(|e| format!("network: {e}"))?;
    let ok = response.ok();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if ok {
        Ok(body)
    } else {
        Err(body["error"].as_str().unwrap_or("request failed").to_string())
    }
}

pub async fn get(path: &str) -> Result<Value, String> {
    read(auth(Request::get(path)).send().await).await
}

pub async fn post(path: &str, body: &Value) -> Result<Value, String> {
    let request = auth(Request::post(path)).json(body).map_err(|e| e.to_string())?;
    read(request.send().await).await
}

pub async fn delete(path: &str) -> Result<Value, String> {
    read(auth(Request::delete(path)).send().await).await
}

/// All events of a job as (sequence number, body), following the pages.
pub async fn all_events(id: i64) -> Result<Vec<(i64, Value)>, String> {
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let page = get(&format!("/api/jobs/{id}/metrics?after={after}&limit=10000")).await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return Ok(out);
        }
        after = page["next_after"].as_i64().unwrap_or(after);
        out.extend(events.into_iter().map(|e| (e["seq"].as_i64().unwrap_or(0), e["body"].clone())));
    }
}

/// Subscribes to the live stream; `on_event` gets {"job", "seq", "body"}. The browser
/// reconnects by itself after a server restart.
pub fn subscribe(on_event: impl Fn(Value) + 'static) -> Option<web_sys::EventSource> {
    let url = match token() {
        Some(t) => format!("/api/events?token={t}"),
        None => "/api/events".to_string(),
    };
    let source = web_sys::EventSource::new(&url).ok()?;
    let callback = Closure::<dyn Fn(web_sys::MessageEvent)>::new(move |e: web_sys::MessageEvent| {
        if let Some(text) = e.data().as_string()
            && let Ok(value) = serde_json::from_str(&text)
        {
            on_event(value);
        }
    });
    source.set_onmessage(Some(callback.as_ref().unchecked_ref()));
    callback.forget();
    Some(source)
}

/// POSTs a chat request and calls `on_text` with each streamed piece; returns the whole reply.
pub async fn chat(body: &Value, mut on_text: impl FnMut(&str)) -> Result<String, String> {
    let request = auth(Request::post("/api/chat")).json(body).map_err(|e| e.to_string())?;
    let response = request.send().await.map_err(|e| format!("network: {e}"))?;
    if !response.ok() {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        return Err(body["error"].as_str().unwrap_or("chat failed").to_string());
    }
    let stream = response.body().ok_or("empty response")?;
    let reader: web_sys::ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
    let mut buffer: Vec<u8> = Vec::new();
    let mut whole = String::new();
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(|e| format!("{e:?}"))?;
        let done = js_sys::Reflect::get(&chunk, &"done".into()).ok().and_then(|d| d.as_bool()).unwrap_or(true);
        if let Ok(value) = js_sys::Reflect::get(&chunk, &"value".into())
            && !value.is_undefined()
        {
            buffer.extend(js_sys::Uint8Array::new(&value).to_vec());
        }
        // Complete SSE messages end with a blank line.
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let message: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&message);
            let mut kind = "message";
            let mut data = String::new();
            for line in text.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = if k == "token" { "token" } else if k == "done" { "done" } else if k == "error" { "error" } else { "other" };
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            match kind {
                "token" => {
                    let piece = value["text"].as_str().unwrap_or_default();
                    whole.push_str(piece);
                    on_text(piece);
                }
                "done" => return Ok(whole),
                "error" => return Err(value["error"].as_str().unwrap_or("chat failed").to_string()),
                _ => {}
            }
        }
        if done {
            return Ok(whole);
        }
    }
}
