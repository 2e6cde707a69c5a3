//! Talking to the server: typed JSON calls with the access token, the live event stream, and
//! streamed chat (Server-Sent Events over a POST response). Every body is one of
//! safeprobe-wire's types, so the UI and the server cannot disagree on a field name silently.

use gloo_net::http::{Request, RequestBuilder, Response};
use safeprobe_wire::{
    ChatDone, ChatRequest, ChatToken, ErrorBody, EventPage, LiveMessage, StoredEvent, Uploaded,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
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
    if let Some(t) = search
        .trim_start_matches('?')
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
    {
        // The link carries it URL-encoded.
        let t = js_sys::decode_uri_component(t)
            .ok()
            .and_then(|t| t.as_string())
            .unwrap_or_else(|| t.to_string());
        if let Some(s) = storage() {
            let _ = s.set_item(TOKEN_KEY, &t);
        }
        return Some(t);
    }
    storage()?.get_item(TOKEN_KEY).ok()?
}

fn auth(request: RequestBuilder) -> RequestBuilder {
    match token() {
        Some(t) => request.header("Authorization", &format!("Bearer {t}")),
        None => request,
    }
}

/// What an error response says (its `ErrorBody`), or `fallback` when it says nothing readable.
async fn refusal(response: Response, fallback: &str) -> ErrorBody {
    match response.json::<ErrorBody>().await {
        Ok(body) => body,
        Err(_) => unspecific(format!("{fallback} ({})", response.status())),
    }
}

fn unspecific(error: String) -> ErrorBody {
    ErrorBody { error, field: None }
}

async fn error_of(response: Response, fallback: &str) -> String {
    refusal(response, fallback).await.error
}

async fn read<T: DeserializeOwned>(
    response: Result<Response, gloo_net::Error>,
) -> Result<T, String> {
    read_refusal(response).await.map_err(|e| e.error)
}

/// The response as a `T`, or what the server refused, with the field at fault where it names
/// one.
async fn read_refusal<T: DeserializeOwned>(
    response: Result<Response, gloo_net::Error>,
) -> Result<T, ErrorBody> {
    let response = response.map_err(|e| unspecific(format!("network: {e}")))?;
    if !response.ok() {
        return Err(refusal(response, "request failed").await);
    }
    // A body that does not match the type is a bug on one side: say which URL.
    let url = response.url();
    response
        .json::<T>()
        .await
        .map_err(|e| unspecific(format!("{url}: unexpected response: {e}")))
}

// Paths are taken by value, so that a resource's future can own the one it formats.

pub async fn get<T: DeserializeOwned>(path: impl Into<String>) -> Result<T, String> {
    read(auth(Request::get(&path.into())).send().await).await
}

pub async fn post<B: Serialize, T: DeserializeOwned>(
    path: impl Into<String>,
    body: &B,
) -> Result<T, String> {
    post_form(path, body).await.map_err(|refusal| refusal.error)
}

/// `post` for a form: a refusal keeps the field it names, to be shown at that field.
pub async fn post_form<B: Serialize, T: DeserializeOwned>(
    path: impl Into<String>,
    body: &B,
) -> Result<T, ErrorBody> {
    let request = auth(Request::post(&path.into()))
        .json(body)
        .map_err(|e| unspecific(e.to_string()))?;
    read_refusal(request.send().await).await
}

pub async fn delete<T: DeserializeOwned>(path: impl Into<String>) -> Result<T, String> {
    read(auth(Request::delete(&path.into())).send().await).await
}

/// Uploads one data file as a multipart form. The browser writes the form's Content-Type
/// (with its boundary) itself, so none is set here.
pub async fn upload(file: &web_sys::File, replace: bool) -> Result<Uploaded, String> {
    let form = web_sys::FormData::new().map_err(|e| format!("{e:?}"))?;
    form.append_with_blob_and_filename("file", file, &file.name())
        .map_err(|e| format!("{e:?}"))?;
    let request = auth(Request::post(crate::files::upload_url(replace)))
        .body(form)
        .map_err(|e| e.to_string())?;
    read(request.send().await).await
}

/// Fetches a file that needs the access token (so a plain link cannot) and hands it to the
/// browser as a download named `file_name`, through a Blob URL and a temporary link.
pub async fn download(path: &str, file_name: &str) -> Result<u64, String> {
    let response = auth(Request::get(path))
        .send()
        .await
        .map_err(|e| format!("network: {e}"))?;
    if !response.ok() {
        return Err(error_of(response, "download failed").await);
    }
    let blob = web_sys::Response::from(response)
        .blob()
        .map_err(|e| format!("{e:?}"))?;
    let blob: web_sys::Blob = JsFuture::from(blob)
        .await
        .map_err(|e| format!("{e:?}"))?
        .unchecked_into();
    let url = web_sys::Url::create_object_url_with_blob(&blob).map_err(|e| format!("{e:?}"))?;
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or("no document")?;
    let link: web_sys::HtmlAnchorElement = document
        .create_element("a")
        .map_err(|e| format!("{e:?}"))?
        .unchecked_into();
    link.set_href(&url);
    link.set_download(file_name);
    link.click();
    // Chrome reads the blob after the click returns, so the URL is freed a minute later.
    let free = Closure::once_into_js(move || {
        let _ = web_sys::Url::revoke_object_url(&url);
    });
    if let Some(window) = web_sys::window() {
        let _ = window
            .set_timeout_with_callback_and_timeout_and_arguments_0(free.unchecked_ref(), 60_000);
    }
    Ok(blob.size() as u64)
}

/// All stored events of a job, following the pages.
pub async fn all_events(id: i64) -> Result<Vec<StoredEvent>, String> {
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let page: EventPage =
            get(format!("/api/jobs/{id}/metrics?after={after}&limit=10000")).await?;
        match page.next_after {
            Some(next) if !page.events.is_empty() => {
                after = next;
                out.extend(page.events);
            }
            _ => return Ok(out),
        }
    }
}

/// Subscribes to the live stream. The browser reconnects by itself after a server restart.
/// A message that does not read as a `LiveMessage` is logged and skipped.
pub fn subscribe(on_message: impl Fn(LiveMessage) + 'static) -> Option<web_sys::EventSource> {
    let url = match token() {
        Some(t) => format!("/api/events?token={}", js_sys::encode_uri_component(&t)),
        None => "/api/events".to_string(),
    };
    let source = web_sys::EventSource::new(&url).ok()?;
    let callback =
        Closure::<dyn Fn(web_sys::MessageEvent)>::new(move |e: web_sys::MessageEvent| {
            let Some(text) = e.data().as_string() else {
                return;
            };
            match serde_json::from_str::<LiveMessage>(&text) {
                Ok(message) => on_message(message),
                Err(error) => leptos::logging::warn!("live stream: {error}: {text}"),
            }
        });
    source.set_onmessage(Some(callback.as_ref().unchecked_ref()));
    callback.forget();
    Some(source)
}

/// One message of the chat stream.
enum ChatEvent {
    Token(ChatToken),
    Done(ChatDone),
    Error(ErrorBody),
    /// Comments, keep-alives and kinds this UI does not know.
    Other,
}

/// Reads one complete SSE message (`event:` and `data:` lines).
fn chat_event(message: &str) -> Result<ChatEvent, String> {
    let mut kind = "message";
    let mut data = String::new();
    for line in message.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k;
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        }
    }
    let parse_error = |e: serde_json::Error| format!("chat stream: {kind}: {e}");
    Ok(match kind {
        "token" => ChatEvent::Token(serde_json::from_str(&data).map_err(parse_error)?),
        "done" => ChatEvent::Done(serde_json::from_str(&data).map_err(parse_error)?),
        "error" => ChatEvent::Error(serde_json::from_str(&data).map_err(parse_error)?),
        _ => ChatEvent::Other,
    })
}

/// POSTs a chat request and calls `on_text` with each streamed piece; returns the whole reply.
/// Aborting `stop` ends the stream (the server stops generating when the connection closes).
pub async fn chat(
    body: &ChatRequest,
    stop: &web_sys::AbortSignal,
    mut on_text: impl FnMut(&str),
) -> Result<String, String> {
    let request = auth(Request::post("/api/chat"))
        .abort_signal(Some(stop))
        .json(body)
        .map_err(|e| e.to_string())?;
    let response = request.send().await.map_err(|e| format!("network: {e}"))?;
    if !response.ok() {
        return Err(error_of(response, "chat failed").await);
    }
    let stream = response.body().ok_or("empty response")?;
    let reader: web_sys::ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
    let mut buffer: Vec<u8> = Vec::new();
    let mut whole = String::new();
    loop {
        let chunk = JsFuture::from(reader.read())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let done = js_sys::Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if let Ok(value) = js_sys::Reflect::get(&chunk, &"value".into())
            && !value.is_undefined()
        {
            buffer.extend(js_sys::Uint8Array::new(&value).to_vec());
        }
        // Complete SSE messages end with a blank line; a chunk may hold several or part of one.
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let message: Vec<u8> = buffer.drain(..end + 2).collect();
            match chat_event(&String::from_utf8_lossy(&message))? {
                ChatEvent::Token(token) => {
                    whole.push_str(&token.text);
                    on_text(&token.text);
                }
                // The server's own account of the reply wins over the pieces put together.
                ChatEvent::Done(done) => return Ok(done.text),
                ChatEvent::Error(error) => return Err(error.error),
                ChatEvent::Other => {}
            }
        }
        if done {
            return Ok(whole);
        }
    }
}
