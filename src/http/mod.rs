//! The HTTP adapter: routes of API.md over the vault core. Owns routing, the
//! request-id middleware, and the mapping of errors to problem+json (in
//! `problem`). TLS and connection handling live in `server`.

pub mod apidoc;
pub mod errors;
pub mod extract;
pub mod handlers;
pub mod problem;
pub mod selfpage;
pub mod server;

use crate::ratelimit::RateLimiter;
use crate::vault::Vault;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use extract::RequestId;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

pub struct AppState {
    pub vault: Arc<Vault>,
    pub limiter: RateLimiter,
}

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// What the request log learns from inside a request: the authenticated
/// caller and the purpose it declared (a configured purpose name, never the
/// header's raw text), set by the `Caller` extractor.
#[derive(Clone, Default)]
pub struct LogSlot(Arc<std::sync::Mutex<LogFields>>);

#[derive(Default)]
pub struct LogFields {
    pub caller: Option<String>,
    pub purpose: Option<String>,
}

impl LogSlot {
    pub fn set(&self, caller: &str, purpose: Option<&str>) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.caller = Some(caller.to_owned());
        f.purpose = purpose.map(str::to_owned);
    }
}

/// The request body, shared between the handler and the middleware, so that
/// what a handler left unread (a refusal decided before the body: a bad
/// token, a missing header) can be drained after it answered. Otherwise the
/// connection is closed under a client still sending, which it sees as a
/// reset instead of the answer.
struct SharedBody(Arc<std::sync::Mutex<Option<axum::body::Body>>>);

impl axum::body::HttpBody for SharedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(body) = inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let r = std::pin::Pin::new(body).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) {
            *inner = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| hyper::body::SizeHint::with_exact(0))
    }
}

/// Reads and drops what is left of a body, up to `extract::DRAIN_MAX` bytes
/// and for at most 5 seconds; past either the connection is closed.
async fn drain(mut body: axum::body::Body) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut total = 0usize;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total > extract::DRAIN_MAX {
                break;
            }
        }
    }
}

/// The problem `code` of an error answer, for the request log.
#[derive(Clone)]
pub struct ProblemCode(pub String);

/// The action a route performs, named as the audit log names it.
fn action_of(method: &axum::http::Method, route: &str) -> &'static str {
    match (method.as_str(), route) {
        ("GET", "/v1/health") => "health",
        ("GET", "/v1/openapi.json") => "openapi",
        ("GET", "/v1/receipts/public-key") => "public_key",
        ("POST", "/v1/subjects") => "create",
        ("POST", "/v1/subjects:batchGet") => "batch_get",
        ("POST", "/v1/subjects:batchCreate") => "batch_create",
        ("GET", "/v1/subjects/{id}") => "read",
        ("PATCH", "/v1/subjects/{id}") => "write",
        ("DELETE", "/v1/subjects/{id}") => "erase",
        ("GET", "/v1/subjects/{id}/consents") => "consent_read",
        ("PUT", "/v1/subjects/{id}/consents/{purpose}") => "consent_write",
        ("GET", "/v1/subjects/{id}/access-log") => "access_log",
        ("POST", "/v1/lookup") => "lookup",
        ("POST", "/v1/grants") => "grant",
        ("POST", "/v1/admin/tokens") => "token_issue",
        ("GET", "/v1/admin/tokens") => "token_list",
        ("DELETE", "/v1/admin/tokens/{id}") => "token_revoke",
        ("POST", "/v1/admin/rotate-kek") => "rotate_kek",
        ("GET", "/v1/admin/events") => "events_list",
        ("POST", "/v1/admin/events/{id}/retry") => "events_retry",
        ("GET", "/v1/admin/backup") => "backup",
        ("GET", "/v1/admin/status") => "status",
        ("POST", "/v1/subjects/{id}/self-service-links") => "self_service_link",
        ("POST", "/v1/self/session") => "self_session",
        ("DELETE", "/v1/self/session") => "self_session_end",
        ("GET", "/self" | "/self/" | "/self/{*path}") => "self_page",
        ("GET", "/metrics") => "metrics",
        _ => "unrouted",
    }
}

/// `allowed` (2xx, 3xx), `denied` (401, 403, 429), `rejected` (other 4xx),
/// `error` (5xx).
fn outcome_of(status: axum::http::StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 403 | 429 => "denied",
        400..=499 => "rejected",
        500.. => "error",
        _ => "allowed",
    }
}

/// Every response carries `X-Request-Id`: the caller's, or a new one. Every
/// request is logged once, when it is answered: route template (never a
/// query), caller, purpose, action, outcome, problem code, status, latency.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_request_id(s))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let slot = LogSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "(unmatched)".into());
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let unread = Arc::new(std::sync::Mutex::new(Some(body)));
    let req = Request::from_parts(parts, axum::body::Body::new(SharedBody(unread.clone())));
    let mut resp = match oversized(&req) {
        Some(r) => r,
        None => next.run(req).await,
    };
    let left = unread.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(body) = left.filter(|b| !axum::body::HttpBody::is_end_stream(b)) {
        drain(body).await;
    }
    resp.headers_mut()
        .insert("x-request-id", HeaderValue::from_str(&id).expect("validated ascii"));
    // No answer is to be sniffed into another type or to leak its URL.
    resp.headers_mut()
        .insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    resp.headers_mut()
        .insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    // Nothing the vault answers may be kept by a cache (most answers carry
    // personal data, a token or a decision): the rule is written once, here.
    if !resp.headers().contains_key(axum::http::header::CACHE_CONTROL) {
        resp.headers_mut()
            .insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let fields = std::mem::take(&mut *slot.0.lock().unwrap_or_else(|p| p.into_inner()));
    let code = resp
        .extensions()
        .get::<ProblemCode>()
        .map(|c| c.0.as_str())
        .unwrap_or("");
    tracing::info!(
        request_id = %id,
        %method,
        route,
        caller = fields.caller.as_deref().unwrap_or(""),
        purpose = fields.purpose.as_deref().unwrap_or(""),
        action = action_of(&method, &route),
        outcome = outcome_of(resp.status()),
        code,
        status = resp.status().as_u16(),
        // whole microseconds: a float tail such as `0.8213050000000001` is
        // noise to a reader
        latency_ms = started.elapsed().as_micros() as f64 / 1000.0,
        "request"
    );
    resp
}

/// Longest request target answered; past it, `414` (problem+json).
pub const MAX_URI: usize = 8 * 1024;
/// Most header bytes and headers answered; past them, `431` (problem+json).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 100;

/// The length of the request target as sent, counted without writing it
/// out: the scheme and authority of an absolute form, then path and query.
fn uri_len(u: &axum::http::Uri) -> usize {
    u.scheme_str().map_or(0, |s| s.len() + "://".len())
        + u.authority().map_or(0, |a| a.as_str().len())
        + u.path().len()
        + u.query().map_or(0, |q| 1 + q.len())
}

/// The `414`/`431` answers, as problem+json like every other error.
fn oversized(req: &Request) -> Option<Response> {
    use axum::http::StatusCode;
    if uri_len(req.uri()) > MAX_URI {
        return Some(problem::routing_problem(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            &format!("the request target exceeds {MAX_URI} bytes"),
        ));
    }
    let h = req.headers();
    let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if h.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Some(problem::routing_problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            &format!("the request headers exceed {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes"),
        ));
    }
    None
}

/// The routes and, from the same `routes!` calls, the OpenAPI document.
fn documented() -> OpenApiRouter<Arc<AppState>> {
    use handlers::*;
    OpenApiRouter::with_openapi(apidoc::ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(openapi))
        .routes(routes!(errors_page))
        .routes(routes!(public_key))
        .routes(routes!(create))
        .routes(routes!(batch_get))
        .routes(routes!(batch_create))
        .routes(routes!(read, patch, erase))
        .routes(routes!(consents))
        .routes(routes!(set_consent))
        .routes(routes!(access_log))
        .routes(routes!(lookup))
        .routes(routes!(mint_grant))
        .routes(routes!(issue_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(rotate_kek))
        .routes(routes!(list_events))
        .routes(routes!(retry_event))
        .routes(routes!(backup))
        .routes(routes!(status))
        .routes(routes!(self_service_link))
        .routes(routes!(self_session, end_self_session))
        .routes(routes!(selfpage::redirect))
        .routes(routes!(selfpage::index))
        .routes(routes!(selfpage::asset))
        .routes(routes!(metrics))
}

static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The OpenAPI 3.1 document of this API, as served at `/v1/openapi.json`:
/// the one `router` collected (or, without a router, built here).
pub fn openapi_document() -> &'static str {
    DOC.get_or_init(|| apidoc::finish(documented().into_openapi()))
}

pub fn router(state: Arc<AppState>) -> Router {
    let (router, doc) = documented().split_for_parts();
    DOC.get_or_init(|| apidoc::finish(doc));
    router
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_str(super::openapi_document()).expect("the document is JSON")
    }

    /// The 414 limit counts the target as `Uri` writes it, whatever form it
    /// came in.
    #[test]
    fn uri_length_is_that_of_the_written_target() {
        for t in [
            "/v1/health",
            "/v1/subjects/abc?fields=phone,email",
            "/?",
            "*",
            "https://vault.example:8443/v1/health?x=1",
            "http://vault.example",
            "vault.example:443",
        ] {
            let u: axum::http::Uri = t.parse().unwrap();
            assert_eq!(super::uri_len(&u), u.to_string().len(), "{t}");
        }
    }

    /// Routes are added only through `routes!`, which does not compile for a
    /// handler without `#[utoipa::path]`; this guards the other door, a plain
    /// `.route(...)` (or a nested router) added to the router by hand.
    #[test]
    fn no_route_is_added_without_its_documentation() {
        let src = include_str!("mod.rs");
        let body = &src
            [src.find("fn documented()").unwrap()..src.find("/// The OpenAPI 3.1 document of this API, as").unwrap()];
        for line in body.lines().map(str::trim).filter(|l| l.starts_with('.')) {
            assert!(line.starts_with(".routes(routes!("), "undocumented route: {line}");
        }
        let after = &src[src.find("pub fn router(").unwrap()..src.find("#[cfg(test)]").unwrap()];
        for door in [".route(", ".route_service(", ".nest(", ".nest_service(", ".merge("] {
            assert!(
                !after.contains(door),
                "router() adds a route outside documented(): {door}"
            );
        }
        let handlers: usize = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".routes(routes!("))
            .map(|l| l.split(',').count())
            .sum();
        let ops: usize = doc()["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(ops, handlers, "every handler in routes! is one documented operation");
    }

    /// Every operation says what it is and answers what API.md promises: an
    /// id, a summary, its path parameters, its problem answers as
    /// problem+json, and a token scheme unless it is public.
    #[test]
    fn every_operation_is_documented_in_full() {
        let d = doc();
        assert_eq!(d["openapi"], "3.1.0");
        let mut ids = std::collections::HashSet::new();
        for (path, item) in d["paths"].as_object().unwrap() {
            assert!(!path.contains('*'), "{path}: not an OpenAPI path template");
            for (method, op) in item.as_object().unwrap() {
                let at = format!("{} {path}", method.to_uppercase());
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}: no operationId"));
                assert!(ids.insert(id.to_owned()), "{at}: operationId {id} twice");
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{at}: no summary"
                );
                assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{at}: no tag");
                let params: Vec<&str> = op["parameters"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
                    .unwrap_or_default();
                for seg in path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                {
                    assert!(params.contains(&seg), "{at}: path parameter {seg} undocumented");
                }
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|k| k.starts_with('2') || k.starts_with('3')),
                    "{at}: no success"
                );
                let public = op["security"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|x| x.as_object().is_some_and(|o| o.is_empty())));
                if !public {
                    assert!(params.contains(&"X-Request-Id"), "{at}: X-Request-Id undocumented");
                    for code in ["401", "429", "500", "503"] {
                        let r = &responses[code];
                        let name = r["$ref"].as_str().unwrap_or_else(|| panic!("{at}: no {code}"));
                        let name = name.rsplit('/').next().unwrap();
                        assert!(
                            d["components"]["responses"][name]["content"]["application/problem+json"].is_object(),
                            "{at}: {code} is not problem+json"
                        );
                    }
                }
                if let Some(body) = op.get("requestBody") {
                    assert!(
                        body["content"]["application/json"]["schema"].is_object(),
                        "{at}: body schema"
                    );
                }
            }
        }
        for h in ["X-Purpose", "X-Justification", "If-Match"] {
            assert!(
                super::openapi_document().contains(&format!("\"name\":\"{h}\"")),
                "{h} undocumented"
            );
        }
        assert!(d["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer");
    }

    /// The problem codes of the document are the codes the vault answers.
    #[test]
    fn the_documented_problem_codes_are_the_answered_ones() {
        let d = doc();
        let codes: Vec<&str> = d["components"]["schemas"]["ProblemCode"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(codes, super::apidoc::PROBLEM_CODES);
        for code in codes {
            assert!(
                code == "internal" || super::problem::title_for(code) != "Internal error",
                "{code} has no title"
            );
        }
    }
}
