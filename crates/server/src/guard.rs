//! What keeps other websites out of a server on the user's own machine.
//!
//! Any page the user opens can send requests to 127.0.0.1: a cross-site form post needs no
//! CORS preflight, and DNS rebinding points a foreign host name at the loopback address. So:
//! - the Host header must name this server (a loopback name or address, the bound address, or
//!   a name the user allowed with `--allowed-host`), which defeats DNS rebinding;
//! - a state-changing request must not come from another site (its `Origin` must be this
//!   server's own, and `Sec-Fetch-Site` must not say cross-site or same-site);
//! - a state-changing request's body, when it has one, must be JSON, which a plain HTML form
//!   cannot send;
//! - the access token is compared in time that does not depend on the guess.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;
use crate::error::ApiError;

/// The host names and addresses requests may be addressed to.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    bind: SocketAddr,
    /// Extra names (lower case, without port) the user allowed.
    allowed: Vec<String>,
}

impl HostPolicy {
    pub fn new(bind: SocketAddr, allowed: &[String]) -> Self {
        Self {
            bind,
            allowed: allowed
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a Host header value (`name[:port]`, `[v6]:port`) names this server.
    pub fn allows(&self, host_header: &str) -> bool {
        let Some(name) = host_name(host_header) else {
            return false;
        };
        if name == "localhost" || name.ends_with(".localhost") || self.allowed.contains(&name) {
            return true;
        }
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => ip.is_loopback() || ip == self.bind.ip() || self.bind.ip().is_unspecified(),
            Err(_) => false,
        }
    }
}

/// The lower-case host name of a Host header value, without its port; None when malformed.
fn host_name(value: &str) -> Option<String> {
    let value = value.trim().to_ascii_lowercase();
    if value.is_empty() || value.contains(['/', '@', ' ', '\\']) {
        return None;
    }
    let name = if value.starts_with('[') {
        // [v6]:port or [v6]
        let end = value.find(']')?;
        let rest = &value[end + 1..];
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        value[..=end].to_string()
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name.to_string(),
            Some(_) => return None,
            None => value,
        }
    };
    (!name.is_empty()).then_some(name)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

fn header<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses requests addressed to a host that is not this server (403).
pub async fn check_host(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match header(request.headers(), &header::HOST) {
        Some(host) if state.hosts.allows(host) => Ok(next.run(request).await),
        Some(host) => Err(ApiError::Forbidden(format!(
            "Host {host:?} is not this server's name; if you reach it under that name, start it with \
             --allowed-host {}",
            host_name(host).unwrap_or_default()
        ))),
        None => Err(ApiError::Forbidden("a Host header is required".into())),
    }
}

/// Refuses state-changing requests from other sites (403) and bodies that are not JSON
/// (415), except a file upload to the datasets endpoint (still same-origin only).
pub async fn check_origin(request: Request, next: Next) -> Result<Response, ApiError> {
    if changes_state(request.method()) {
        let headers = request.headers();
        if let Some(site) = header(headers, &header::HeaderName::from_static("sec-fetch-site"))
            && !matches!(site, "same-origin" | "none")
        {
            return Err(ApiError::Forbidden(format!(
                "cross-site request refused (Sec-Fetch-Site: {site})"
            )));
        }
        if let Some(origin) = header(headers, &header::ORIGIN) {
            let own = header(headers, &header::HOST).unwrap_or_default();
            if !same_origin(origin, own) {
                return Err(ApiError::Forbidden(format!(
                    "cross-site request refused (Origin {origin:?} is not this server)"
                )));
            }
        }
        if let Some(kind) = header(headers, &header::CONTENT_TYPE)
            && !is_json(kind)
            && !(is_multipart(kind) && takes_uploads(request.uri().path()))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type {kind:?}: this endpoint takes application/json"
            )));
        }
    }
    Ok(next.run(request).await)
}

/// Refuses a body announced larger than its endpoint takes (413) before any of it is read,
/// so a client is not kept sending what will be refused. (Bodies without a length are still
/// cut off at the same limit as they are read.)
pub async fn check_length(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = if takes_uploads(request.uri().path()) {
        state.max_upload_bytes
    } else {
        crate::BODY_LIMIT
    };
    let announced = header(request.headers(), &header::CONTENT_LENGTH)
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(format!(
            "request body of {} bytes is over this endpoint's limit of {limit}",
            announced.unwrap_or_default()
        )));
    }
    Ok(next.run(request).await)
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of a page served at `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |a: &str| {
        let a = a.to_ascii_lowercase();
        let has_port = a.rsplit_once(':').is_some_and(|(_, p)| is_port(p)) && !a.ends_with(']');
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    !host.is_empty() && with_port(authority) == with_port(host)
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
}

/// The one endpoint that takes a file (multipart) rather than JSON.
fn takes_uploads(path: &str) -> bool {
    path == "/api/datasets"
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Requires the access token, when one is set: `Authorization: Bearer <token>` on every API
/// call, or `?token=` on the event stream alone (an EventSource cannot set headers).
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.token {
        let bearer = header(request.headers(), &header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "));
        let query = is_event_stream(request.uri().path())
            .then(|| {
                request
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("token="))
                    .map(percent_decoded)
            })
            .flatten();
        let given = bearer.map(|b| b.as_bytes().to_vec()).or(query);
        if !given.is_some_and(|g| tokens_match(&g, expected.as_bytes())) {
            return Err(ApiError::Unauthorized(
                "missing or wrong access token (Authorization: Bearer <token>)".into(),
            ));
        }
    }
    Ok(next.run(request).await)
}

/// A query value with its %XX escapes (and + for space) decoded; a malformed escape is kept
/// as it is, so it cannot match a token by accident.
fn percent_decoded(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The event stream's path, inside the /api router or seen from outside it.
fn is_event_stream(path: &str) -> bool {
    path == "/events" || path == "/api/events"
}

/// Compares a guess with the token in time that depends only on the token's length: every
/// byte of the token is visited whatever the guess is, so neither the position of the first
/// wrong byte nor the guess's length shows.
pub fn tokens_match(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = (given.len() != expected.len()) as u8;
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!*e);
        difference |= std::hint::black_box(g ^ e);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_this_server_only() {
        let loopback = HostPolicy::new("127.0.0.1:8080".parse().unwrap(), &["panel.lan".into()]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:8080",
            "127.0.0.2",
            "panel.lan:8080",
        ] {
            assert!(loopback.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "localhost.evil.example",
            "",
            "127.0.0.1:80:80",
            "user@127.0.0.1",
            "[::1]x",
        ] {
            assert!(!loopback.allows(bad), "{bad}");
        }
        let lan = HostPolicy::new("192.168.1.7:8080".parse().unwrap(), &[]);
        assert!(lan.allows("192.168.1.7:8080"));
        assert!(!lan.allows("192.168.1.8:8080"));
        assert!(!lan.allows("evil.example"));
        let any = HostPolicy::new("0.0.0.0:8080".parse().unwrap(), &[]);
        assert!(any.allows("192.168.1.8:8080"));
        assert!(
            !any.allows("evil.example:8080"),
            "names need --allowed-host even on 0.0.0.0"
        );
    }

    #[test]
    fn origins_must_be_this_server() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin("http://LOCALHOST", "localhost:80"));
        assert!(same_origin("http://[::1]:8080", "[::1]:8080"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:9999", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        assert!(!same_origin("file://", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8080", ""));
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        for bad in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            "",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(percent_decoded("a%2Bb%26c+d"), b"a+b&c d");
        assert_eq!(percent_decoded("100%"), b"100%");
        assert_eq!(percent_decoded("%zz"), b"%zz");
        assert_eq!(percent_decoded("%41"), b"A");
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"secret-token", b"secret-token"));
        for bad in [
            &b"secret-tokem"[..],
            b"secret",
            b"secret-token-longer",
            b"",
            b"\x8c",
        ] {
            assert!(!tokens_match(bad, b"secret-token"), "{bad:?}");
        }
    }
}
