//! The self-service page's files (`/self/`), embedded in the binary, and the
//! headers that guard them: a strict Content-Security-Policy (no inline
//! script or style, nothing from another origin, no framing), `nosniff`,
//! no referrer, no caching. The page itself talks to the API like any
//! caller, with the session token it holds in memory.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// (path under `/self/`, content type, body)
const FILES: &[(&str, &str, &str)] = &[
    ("", "text/html; charset=utf-8", include_str!("selfservice/index.html")),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("selfservice/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("selfservice/app.css"),
    ),
    (
        "i18n/ru.json",
        "application/json",
        include_str!("selfservice/i18n/ru.json"),
    ),
    (
        "i18n/kk.json",
        "application/json",
        include_str!("selfservice/i18n/kk.json"),
    ),
    (
        "i18n/en.json",
        "application/json",
        include_str!("selfservice/i18n/en.json"),
    ),
];

/// The headers of every `/self/` answer (the files and their 404s).
pub fn guard(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
}

fn file(rel: &str) -> Response {
    let mut resp = match FILES.iter().find(|(p, _, _)| *p == rel) {
        Some((_, ctype, body)) => ([(header::CONTENT_TYPE, *ctype)], *body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found\n",
        )
            .into_response(),
    };
    guard(&mut resp);
    resp
}

/// The self-service page
///
/// HTML, with a strict Content-Security-Policy; its script, style and catalogues are under `/self/`.
/// No token: the page signs in with the code of a self-service link in its URL fragment.
#[utoipa::path(
    get,
    path = "/self/",
    operation_id = "selfServicePage",
    tag = "self-service",
    responses((status = 200, description = "The page.", content_type = "text/html", body = String)),
    security(()),
)]
pub async fn index() -> Response {
    file("")
}

/// A file of the self-service page
///
/// `app.js`, `app.css` and the message catalogues `i18n/ru.json`, `i18n/kk.json`, `i18n/en.json`.
#[utoipa::path(
    get,
    path = "/self/{*path}",
    operation_id = "selfServiceAsset",
    tag = "self-service",
    params(("path" = String, Path, description = "The file under `/self/`.", example = "app.js")),
    responses(
        (status = 200, description = "The file, typed by its extension.", content(
            (String = "text/javascript"), (String = "text/css"), (serde_json::Value = "application/json")
        )),
        (status = 404, description = "No such file.", content_type = "text/plain", body = String),
    ),
    security(()),
)]
pub async fn asset(Path(rel): Path<String>) -> Response {
    file(&rel)
}

/// `/self` without the slash: to `/self/`
///
/// The page's relative links need the slash.
#[utoipa::path(
    get,
    path = "/self",
    operation_id = "selfServiceRedirect",
    tag = "self-service",
    responses((status = 308, description = "To `/self/`.", headers(("Location" = String, description = "`/self/`.")))),
    security(()),
)]
pub async fn redirect() -> Response {
    let mut resp = (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/self/")]).into_response();
    guard(&mut resp);
    resp
}
