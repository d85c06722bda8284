//! Route handlers: extract, call the core, shape the answer. No policy, no
//! crypto and no storage here.

use super::extract::{Anonymous, BatchBody, Caller, JsonBody};
use super::problem::{problem_json, status_of, ApiError};
use super::AppState;
use crate::error::VaultError;
use crate::vault::{BatchItem, GrantRequest, IssueRequest, Released};
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use zeroize::Zeroizing;

type S = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, serde_json::to_vec(v).expect("json")).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("ascii")
}

/// Serialises released fields into a buffer that is wiped once sent.
fn released_body(items: &[&Released]) -> Zeroizing<Vec<u8>> {
    // Sized for the usual subject up front, so that growing seldom copies
    // plaintext (and where it does, the zeroizing allocator wipes the block
    // left behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(64 + 768 * items.len()));
    for r in items {
        write_released(&mut buf, r);
    }
    buf
}

fn write_released(buf: &mut Vec<u8>, r: &Released) {
    buf.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *buf, &r.id).expect("json");
    buf.extend_from_slice(format!(",\"version\":{},\"fields\":{{", r.version).as_bytes());
    for (i, (name, value)) in r.fields.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        serde_json::to_writer(&mut *buf, name).expect("json");
        buf.push(b':');
        serde_json::to_writer(&mut *buf, value).expect("json");
    }
    buf.extend_from_slice(b"}}");
}

fn secret_response(status: StatusCode, buf: Zeroizing<Vec<u8>>, version: Option<u64>) -> Response {
    let mut r = Response::new(Body::from(bytes::Bytes::from_owner(buf)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = version {
        r.headers_mut().insert(header::ETAG, etag(v));
    }
    r
}

pub async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub async fn openapi() -> Response {
    let mut r = (StatusCode::OK, super::OPENAPI).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub async fn public_key(State(st): S) -> Response {
    use base64::Engine;
    let pk = base64::engine::general_purpose::STANDARD.encode(st.vault.public_key());
    json_response(StatusCode::OK, &json!({"alg": "Ed25519", "public_key": pk}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsBody {
    fields: Map<String, Value>,
}

impl Drop for FieldsBody {
    fn drop(&mut self) {
        self.fields.values_mut().for_each(crate::vault::wipe_value);
    }
}

pub async fn create(State(st): S, c: Caller, JsonBody(b): JsonBody<FieldsBody>) -> ApiResult {
    let (id, version) = st.vault.create(&c.ctx, &c.auth, &b.fields).await?;
    let mut r = json_response(StatusCode::CREATED, &json!({"id": id, "version": version}));
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/v1/subjects/{id}")).expect("ascii"),
    );
    r.headers_mut().insert(header::ETAG, etag(version));
    Ok(r)
}

/// Every field named in the query: `fields` may repeat and each value may
/// list several (`?fields=a,b&fields=c`). All of them are checked; none is
/// dropped, whatever the spelling.
fn parse_field_list(query: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|_| ApiError(VaultError::BadRequest("the query string is malformed".into())))?;
    let v: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "fields")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((!v.is_empty()).then_some(v))
}

pub async fn read(State(st): S, c: Caller, Path(id): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let fields = parse_field_list(q.as_deref())?;
    let r = st.vault.read(&c.ctx, &c.auth, &id, fields.as_deref()).await?;
    let version = r.version;
    Ok(secret_response(StatusCode::OK, released_body(&[&r]), Some(version)))
}

fn parse_if_match(h: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = h.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError(VaultError::BadRequest("If-Match must be a subject version".into())))
}

pub async fn patch(
    State(st): S,
    c: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<FieldsBody>,
) -> ApiResult {
    let if_match = parse_if_match(&headers)?;
    let (id, version) = st.vault.patch(&c.ctx, &c.auth, &id, &b.fields, if_match).await?;
    let mut r = json_response(StatusCode::OK, &json!({"id": id, "version": version}));
    r.headers_mut().insert(header::ETAG, etag(version));
    Ok(r)
}

pub async fn erase(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let e = st.vault.erase(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(StatusCode::OK, &e.to_json()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchGetBody {
    ids: Vec<String>,
    fields: Option<Vec<String>>,
}

fn item_error(id: Option<&str>, e: &VaultError) -> Value {
    json!({"id": id, "status": status_of(e).as_u16(), "error": problem_json(e)})
}

pub async fn batch_get(State(st): S, c: Caller, BatchBody(b): BatchBody<BatchGetBody>) -> ApiResult {
    let items = st.vault.batch_get(&c.ctx, &c.auth, &b.ids, b.fields.as_deref()).await?;
    let mut buf = Zeroizing::new(Vec::with_capacity(items.len() * 200));
    buf.extend_from_slice(b"{\"results\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        match item {
            BatchItem::Ok(r) => {
                // {"id","status","version","fields"}
                let mut one = Zeroizing::new(Vec::new());
                write_released(&mut one, r);
                buf.extend_from_slice(b"{\"status\":200,");
                buf.extend_from_slice(&one[1..]);
            }
            BatchItem::Err { id, error } => {
                serde_json::to_writer(&mut *buf, &item_error(id.as_deref(), error)).expect("json")
            }
            BatchItem::Created { .. } => unreachable!("batch_get creates nothing"),
        }
    }
    buf.extend_from_slice(b"]}");
    Ok(secret_response(StatusCode::OK, buf, None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCreateBody {
    subjects: Vec<FieldsBody>,
}

pub async fn batch_create(State(st): S, c: Caller, BatchBody(b): BatchBody<BatchCreateBody>) -> ApiResult {
    let mut subjects: Vec<Map<String, Value>> = b
        .subjects
        .into_iter()
        .map(|mut s| std::mem::take(&mut s.fields))
        .collect();
    let items = st.vault.batch_create(&c.ctx, &c.auth, &subjects).await;
    subjects
        .iter_mut()
        .flat_map(|m| m.values_mut())
        .for_each(crate::vault::wipe_value);
    let items = items?;
    let results: Vec<Value> = items
        .iter()
        .map(|i| match i {
            BatchItem::Created { id, version } => json!({"id": id, "status": 201, "version": version}),
            BatchItem::Err { id, error } => item_error(id.as_deref(), error),
            BatchItem::Ok(_) => unreachable!("batch_create releases nothing"),
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"results": results})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupBody {
    field: String,
    value: Value,
}

pub async fn lookup(State(st): S, c: Caller, JsonBody(mut b): JsonBody<LookupBody>) -> ApiResult {
    let r = st.vault.lookup(&c.ctx, &c.auth, &b.field, &b.value).await;
    crate::vault::wipe_value(&mut b.value);
    Ok(json_response(StatusCode::OK, &json!({"id": r?})))
}

pub async fn consents(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        &st.vault.consents(&c.ctx, &c.auth, &id).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentBody {
    granted: bool,
}

pub async fn set_consent(
    State(st): S,
    c: Caller,
    Path((id, purpose)): Path<(String, String)>,
    JsonBody(b): JsonBody<ConsentBody>,
) -> ApiResult {
    let rec = st.vault.set_consent(&c.ctx, &c.auth, &id, &purpose, b.granted).await?;
    Ok(json_response(StatusCode::OK, &rec))
}

pub async fn access_log(
    State(st): S,
    c: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let after = match q.get("after").or(q.get("next")) {
        Some(s) => s
            .parse()
            .map_err(|_| ApiError(VaultError::BadRequest("after must be a cursor from next".into())))?,
        None => 0,
    };
    let limit = match q.get("limit") {
        Some(s) => s
            .parse()
            .map_err(|_| ApiError(VaultError::BadRequest("limit must be a number".into())))?,
        None => 100,
    };
    Ok(json_response(
        StatusCode::OK,
        &st.vault.access_log(&c.ctx, &c.auth, &id, after, limit).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    subjects: Vec<String>,
    purpose: Option<String>,
    fields: Option<Vec<String>>,
    ttl_seconds: u64,
    max_uses: Option<u64>,
    caller: String,
    cert_subject: Option<String>,
}

fn token_answer(rec: &crate::tokens::TokenRecord, secret: &crate::tokens::TokenSecret) -> Response {
    let mut r = json_response(
        StatusCode::CREATED,
        &json!({
            "id": rec.id,
            "token": secret.expose(),
            "expires_at": crate::fsutil::rfc3339(rec.expires_at),
            "caller": rec.caller,
            "purposes": rec.purposes,
            "capabilities": rec.capabilities,
        }),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /v1/subjects/{id}/self-service-links`: the shop's backend, after
/// signing its user in, asks for a link to the vault's own page.
pub async fn self_service_link(State(st): S, c: Caller, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let link = st.vault.self_service_link(&c.ctx, &c.auth, &id).await?;
    let base = match &st.vault.cfg.server.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
                .map(str::to_owned)
                .unwrap_or_else(|| st.vault.cfg.server.listen.clone());
            format!("https://{host}")
        }
    };
    let code = link.code.expose();
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "url": format!("{base}/self/#code={code}"),
            "code": code,
            "expires_at": crate::fsutil::rfc3339(link.expires_at),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    code: String,
}

/// `POST /v1/self/session`: the page exchanges the link's code for a
/// session token of that one subject.
pub async fn self_session(State(st): S, a: Anonymous, JsonBody(b): JsonBody<SessionBody>) -> ApiResult {
    match st.vault.self_service_session(&a.ctx, &b.code).await {
        Ok((rec, secret)) => {
            if let Some(p) = a.peer {
                st.limiter.success(p);
            }
            let subject = rec.grant.as_ref().and_then(|g| g.subjects.first()).cloned();
            Ok(json_response(
                StatusCode::CREATED,
                &json!({
                    "token": secret.expose(),
                    "expires_at": crate::fsutil::rfc3339(rec.expires_at),
                    "subject": subject,
                }),
            ))
        }
        Err(e) => {
            if let (Some(p), VaultError::TokenInvalid) = (a.peer, &e) {
                super::extract::slow_down_failure(&st, p).await;
            }
            Err(ApiError(e))
        }
    }
}

pub async fn mint_grant(State(st): S, c: Caller, JsonBody(b): JsonBody<GrantBody>) -> ApiResult {
    let g = GrantRequest {
        subjects: b.subjects,
        purpose: b.purpose,
        fields: b.fields,
        ttl_seconds: b.ttl_seconds,
        max_uses: b.max_uses,
        caller: b.caller,
        cert_subject: b.cert_subject,
    };
    let (rec, secret) = st.vault.mint_grant(&c.ctx, &c.auth, g).await?;
    Ok(token_answer(&rec, &secret))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    caller: String,
    purposes: Vec<String>,
    capabilities: Vec<String>,
    ttl_seconds: u64,
    cert_subject: Option<String>,
}

pub async fn issue_token(State(st): S, c: Caller, JsonBody(b): JsonBody<IssueBody>) -> ApiResult {
    let req = IssueRequest {
        caller: b.caller,
        purposes: b.purposes,
        capabilities: b.capabilities,
        ttl_seconds: b.ttl_seconds,
        cert_subject: b.cert_subject,
    };
    let (rec, secret) = st.vault.issue_token(&c.ctx, &c.auth, req).await?;
    Ok(token_answer(&rec, &secret))
}

pub async fn list_tokens(State(st): S, c: Caller) -> ApiResult {
    let list = st.vault.list_tokens(&c.ctx, &c.auth).await?;
    let tokens: Vec<Value> = list.iter().map(|t| t.describe()).collect();
    Ok(json_response(StatusCode::OK, &json!({"tokens": tokens})))
}

pub async fn revoke_token(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let rec = st.vault.revoke_token(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(StatusCode::OK, &rec.describe()))
}

pub async fn list_events(State(st): S, c: Caller, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let filter = crate::events::Filter::parse(q.get("state").map(String::as_str))
        .ok_or_else(|| ApiError(VaultError::BadRequest("state must be pending, dead or all".into())))?;
    let events = st.vault.list_events(&c.ctx, &c.auth, filter).await?;
    Ok(json_response(StatusCode::OK, &json!({ "events": events })))
}

pub async fn retry_event(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let requeued = st.vault.retry_event(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(StatusCode::OK, &json!({"id": id, "requeued": requeued})))
}

pub async fn status(State(st): S, c: Caller) -> ApiResult {
    let status = st.vault.admin_status(&c.ctx, &c.auth).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(status).expect("json"),
    ))
}

pub async fn rotate_kek(State(st): S, c: Caller) -> ApiResult {
    let (epoch, rewrapped) = st.vault.admin_rotate(&c.ctx, &c.auth).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"epoch": epoch, "rewrapped": rewrapped}),
    ))
}

/// Snapshots to a private temporary file under the data directory (fast,
/// local), then streams that file, so a slow client never holds writers up.
pub async fn backup(State(st): S, c: Caller) -> ApiResult {
    let dir = st.vault.cfg.data_dir.join("backup-tmp");
    crate::fsutil::create_private_dir(&dir).map_err(VaultError::from)?;
    let path = dir.join(format!("{}.pdvbak", uuid::Uuid::new_v4()));
    let mut file = std::io::BufWriter::new(crate::fsutil::create_private(&path).map_err(VaultError::from)?);
    let res = st.vault.backup(&c.ctx, &c.auth, &mut file).await;
    let res = res.and_then(|n| {
        use std::io::Write;
        file.flush().map_err(VaultError::from)?;
        Ok(n)
    });
    drop(file);
    if let Err(e) = res {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    let f = tokio::fs::File::open(&path).await.map_err(VaultError::from)?;
    // Unlinked at once: the open handle keeps it readable until streamed.
    let _ = std::fs::remove_file(&path);
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 64 * 1024);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"pdvault.pdvbak\""),
    );
    Ok(r)
}

pub async fn metrics(State(st): S, c: Caller) -> ApiResult {
    st.vault.admin_metrics(&c.ctx, &c.auth).await?;
    let mut r = (StatusCode::OK, st.vault.metrics.render()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

pub async fn not_found() -> Response {
    super::problem::routing_problem(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> Response {
    super::problem::routing_problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}
