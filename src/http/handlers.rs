//! Route handlers: extract, call the core, shape the answer. No policy, no
//! crypto and no storage here.

use super::apidoc::{self, Health, PublicKey, PurposeHeaders, RequestIdHeader};
use super::extract::{Anonymous, BatchBody, Caller, JsonBody};
use super::problem::{problem_json, status_of, ApiError};
use super::AppState;
use crate::error::VaultError;
use crate::tokens::{TokenDescription, TokenList, TokenRecord};
use crate::vault::{BatchItem, GrantRequest, IssueRequest, Released, ReleasedValue};
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::ToSchema;
use zeroize::Zeroizing;

type S = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, v: &T) -> Response {
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
        match value {
            ReleasedValue::Stored(json) => buf.extend_from_slice(json.expose()),
            ReleasedValue::Formed(v) => serde_json::to_writer(&mut *buf, v).expect("json"),
        }
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

/// Liveness check
///
/// Capability: none (public).
#[utoipa::path(
    get,
    path = "/v1/health",
    operation_id = "health",
    tag = "meta",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "Always `{\"status\": \"ok\"}` while the server runs.", body = Health)
    ),
    security(()),
)]
pub async fn health() -> Response {
    json_response(StatusCode::OK, &Health { status: "ok" })
}

/// This OpenAPI 3.1 document
///
/// Capability: none (public). Generated from the handlers and types of this build.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "getOpenApi",
    tag = "meta",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object)
    ),
    security(()),
)]
pub async fn openapi() -> Response {
    let mut r = (StatusCode::OK, super::openapi_document()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The error reference: every problem code, its cause and what to do
///
/// Capability: none (public). Each problem's `type` (`/v1/errors#<code>`) points at its entry here:
/// docs/errors.md, as HTML.
#[utoipa::path(
    get,
    path = "/v1/errors",
    operation_id = "getErrors",
    tag = "meta",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The error reference, one entry per `code` (`#<code>`).", content_type = "text/html", body = String)
    ),
    security(()),
)]
pub async fn errors_page() -> Response {
    let mut r = (StatusCode::OK, super::errors::page()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    r
}

/// Public key that verifies erasure receipts
///
/// Capability: none (public).
///
/// The Ed25519 public key of the receipt signing key.
#[utoipa::path(
    get,
    path = "/v1/receipts/public-key",
    operation_id = "getReceiptPublicKey",
    tag = "erasure",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The key.", body = PublicKey)
    ),
    security(()),
)]
pub async fn public_key(State(st): S) -> Response {
    use base64::Engine;
    let pk = base64::engine::general_purpose::STANDARD.encode(st.vault.public_key());
    json_response(
        StatusCode::OK,
        &PublicKey {
            alg: "Ed25519".into(),
            public_key: pk,
        },
    )
}

/// The body of a create: the subject's fields.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"fields": {"surname": "Сейткали", "given_name": "Айгерим", "phone": "+7 701 123 45 67",
    "email": "aigerim@Example.KZ", "address": {"city": "Almaty", "street": "Abay ave.", "building": "10"}}}))]
pub struct FieldsBody {
    #[schema(value_type = apidoc::SubjectFields)]
    fields: Map<String, Value>,
}

impl Drop for FieldsBody {
    fn drop(&mut self) {
        self.fields.values_mut().for_each(crate::vault::wipe_value);
    }
}

/// Create a subject
///
/// Capability: `write`.
///
/// Creates a subject from `{"fields": {...}}` under a purpose that may write (default `order`, `subject_access`). Every field named must be covered by the purpose.
#[utoipa::path(
    post,
    path = "/v1/subjects",
    operation_id = "createSubject",
    tag = "subjects",
    params(PurposeHeaders),
    request_body = FieldsBody,
    responses(
        (status = 201, description = "Created.", body = apidoc::SubjectVersion, headers(("ETag" = String, description = "The subject's version, quoted (`\"3\"`); send it back in If-Match."), ("Location" = String, description = "`/v1/subjects/{id}` of the new subject.")),
            links(
                ("GetSubject" = (operation_id = "getSubject", parameters(("id" = "$response.body#/id")))),
                ("PatchSubject" = (operation_id = "patchSubject", parameters(("id" = "$response.body#/id")))),
                ("EraseSubject" = (operation_id = "eraseSubject", parameters(("id" = "$response.body#/id")))),
                ("GetConsents" = (operation_id = "getConsents", parameters(("id" = "$response.body#/id")))),
                ("SetConsent" = (operation_id = "setConsent", parameters(("id" = "$response.body#/id")))),
                ("GetAccessLog" = (operation_id = "getAccessLog", parameters(("id" = "$response.body#/id")))),
                ("CreateSelfServiceLink" = (operation_id = "createSelfServiceLink", parameters(("id" = "$response.body#/id"))))
            )),
        apidoc::Refused,
        (status = 413, response = apidoc::PayloadTooLarge),
        (status = 422, response = apidoc::UnprocessableEntity),
        apidoc::NotServed
    ),
)]
pub async fn create(State(st): S, c: Caller, JsonBody(b): JsonBody<FieldsBody>) -> ApiResult {
    let (id, version) = st.vault.create(&c.ctx, &c.auth, &b.fields).await?;
    let body = apidoc::SubjectVersion {
        id: id.clone(),
        version,
    };
    let mut r = json_response(StatusCode::CREATED, &body);
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

/// Release a subject's fields
///
/// Capability: `read`.
///
/// Releases the fields named in `?fields=` (default: all the purpose covers), each in the form the purpose releases it (plain, masked, pseudonym or generalized). Purposes that need consent answer `403 consent_required` without a `granted` consent; purposes that need a justification want X-Justification.
#[utoipa::path(
    get,
    path = "/v1/subjects/{id}",
    operation_id = "getSubject",
    tag = "subjects",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders, apidoc::FieldsQuery),
    responses(
        (status = 200, description = "The released fields.", body = apidoc::ReleasedSubject, headers(("ETag" = String, description = "The subject's version, quoted (`\"3\"`); send it back in If-Match."), ("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token."))),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        apidoc::NotServed
    ),
)]
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

/// Change a subject's fields
///
/// Capability: `write`.
///
/// Sets the fields given; `null` removes one. With If-Match, a version other than the current one answers `412 version_conflict`.
#[utoipa::path(
    patch,
    path = "/v1/subjects/{id}",
    operation_id = "patchSubject",
    tag = "subjects",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders, apidoc::IfMatchHeader),
    request_body = apidoc::FieldsPatchBody,
    responses(
        (status = 200, description = "Changed.", body = apidoc::SubjectVersion, headers(("ETag" = String, description = "The subject's version, quoted (`\"3\"`); send it back in If-Match."))),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        (status = 412, response = apidoc::PreconditionFailed),
        (status = 413, response = apidoc::PayloadTooLarge),
        (status = 422, response = apidoc::UnprocessableEntity),
        apidoc::NotServed
    ),
)]
pub async fn patch(
    State(st): S,
    c: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<FieldsBody>,
) -> ApiResult {
    let if_match = parse_if_match(&headers)?;
    let (id, version) = st.vault.patch(&c.ctx, &c.auth, &id, &b.fields, if_match).await?;
    let mut r = json_response(StatusCode::OK, &apidoc::SubjectVersion { id, version });
    r.headers_mut().insert(header::ETAG, etag(version));
    Ok(r)
}

/// Erase a subject (crypto-shred)
///
/// Capability: `erase`.
///
/// Destroys every version of the subject's data key, then its ciphertexts and blind-index entries, and answers a signed erasure receipt (purpose `erasure`). Repeating it answers `200` with the same receipt: the one call on an erased subject that is not `410`. The signature is Ed25519 over the canonical JSON of `receipt` (keys sorted, no white space, UTF-8).
#[utoipa::path(
    delete,
    path = "/v1/subjects/{id}",
    operation_id = "eraseSubject",
    tag = "erasure",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders),
    responses(
        (status = 200, description = "The erasure receipt.", body = apidoc::ErasureReceipt),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        apidoc::NotServed
    ),
)]
pub async fn erase(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let e = st.vault.erase(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(StatusCode::OK, &e.to_json()))
}

/// Up to 1000 subject ids, and the fields to release of each.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchGetBody {
    #[schema(max_items = 1000)]
    ids: Vec<String>,
    /// Fields to release; default: all the purpose covers.
    fields: Option<Vec<String>>,
}

fn item_error(id: Option<&str>, e: &VaultError) -> Value {
    json!({"id": id, "status": status_of(e).as_u16(), "error": problem_json(e)})
}

/// Release fields of many subjects
///
/// Capability: `read`.
///
/// Up to 1000 ids. Each item is decided, audited and answered on its own (in the request's order) with the status it alone would have had; refusals (403, 404, 410, ...) are items, not the answer's status.
#[utoipa::path(
    post,
    path = "/v1/subjects:batchGet",
    operation_id = "batchGetSubjects",
    tag = "subjects",
    params(PurposeHeaders),
    request_body = BatchGetBody,
    responses(
        (status = 200, description = "One item per id, in order.", body = apidoc::BatchResults, headers(("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token."))),
        (status = 400, response = apidoc::BadRequest),
        (status = 401, response = apidoc::Unauthorized),
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
)]
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

/// Up to 1000 subjects to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchCreateBody {
    #[schema(max_items = 1000)]
    subjects: Vec<FieldsBody>,
}

/// Create many subjects
///
/// Capability: `write`.
///
/// Up to 1000 subjects. Each item succeeds (`201`, with `id` and `version`) or fails (`403`, `422`, ... with `error` and a null `id`) on its own, in the request's order.
#[utoipa::path(
    post,
    path = "/v1/subjects:batchCreate",
    operation_id = "batchCreateSubjects",
    tag = "subjects",
    params(PurposeHeaders),
    request_body = BatchCreateBody,
    responses(
        (status = 200, description = "One item per subject, in order.", body = apidoc::BatchResults),
        (status = 400, response = apidoc::BadRequest),
        (status = 401, response = apidoc::Unauthorized),
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
)]
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

/// What to look up.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupBody {
    /// `email` or `phone` (or a config field of those types).
    #[schema(example = "email")]
    field: String,
    /// Normalised as on write before the blind-index look-up.
    #[schema(value_type = String, example = "aigerim@example.kz")]
    value: Value,
}

/// Find a subject by e-mail or phone
///
/// Capability: `read`.
///
/// Looks the normalised value up in the blind index (a keyed hash; the vault keeps no plaintext index). The purpose must cover the looked-up field. `404 subject_not_found` if none.
#[utoipa::path(
    post,
    path = "/v1/lookup",
    operation_id = "lookupSubject",
    tag = "subjects",
    params(PurposeHeaders),
    request_body = LookupBody,
    responses(
        (status = 200, description = "The subject found.", body = apidoc::LookupResult),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 413, response = apidoc::PayloadTooLarge),
        (status = 422, response = apidoc::UnprocessableEntity),
        apidoc::NotServed
    ),
)]
pub async fn lookup(State(st): S, c: Caller, JsonBody(mut b): JsonBody<LookupBody>) -> ApiResult {
    let r = st.vault.lookup(&c.ctx, &c.auth, &b.field, &b.value).await;
    crate::vault::wipe_value(&mut b.value);
    Ok(json_response(StatusCode::OK, &apidoc::LookupResult { id: r? }))
}

/// A subject's consents
///
/// Capability: `read`.
///
/// The latest consent per purpose and the full history. Sent under a purpose that may write (`subject_access` or `order`).
#[utoipa::path(
    get,
    path = "/v1/subjects/{id}/consents",
    operation_id = "getConsents",
    tag = "consents",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders),
    responses(
        (status = 200, description = "The consents.", body = crate::vault::Consents),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        apidoc::NotServed
    ),
)]
pub async fn consents(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        &st.vault.consents(&c.ctx, &c.auth, &id).await?,
    ))
}

/// A consent given or withdrawn.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentBody {
    granted: bool,
}

/// Grant or withdraw consent for a purpose
///
/// Capability: `write`.
///
/// Records `{"granted": true|false}` for the purpose in the path. Sent under `subject_access` or `order`. Consent is opt-in: no record means no consent.
#[utoipa::path(
    put,
    path = "/v1/subjects/{id}/consents/{purpose}",
    operation_id = "setConsent",
    tag = "consents",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), ("purpose" = String, Path, description = "The purpose the consent is about (e.g. `marketing`); unknown: `404 not_found`."), PurposeHeaders),
    request_body = ConsentBody,
    responses(
        (status = 200, description = "The record made.", body = crate::vault::ConsentRecord),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
)]
pub async fn set_consent(
    State(st): S,
    c: Caller,
    Path((id, purpose)): Path<(String, String)>,
    JsonBody(b): JsonBody<ConsentBody>,
) -> ApiResult {
    let rec = st.vault.set_consent(&c.ctx, &c.auth, &id, &purpose, b.granted).await?;
    Ok(json_response(StatusCode::OK, &rec))
}

/// Who released what of this subject
///
/// Capability: `audit`, or `read` under `subject_access`.
///
/// Releases of this subject's data: who, when, for which purpose, which fields (never values), oldest first, paged by `?after=` and `?limit=`. With the `audit` capability no X-Purpose is needed.
#[utoipa::path(
    get,
    path = "/v1/subjects/{id}/access-log",
    operation_id = "getAccessLog",
    tag = "audit",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders, apidoc::AccessLogQuery),
    responses(
        (status = 200, description = "A page of releases.", body = crate::audit::AccessLogPage),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        apidoc::NotServed
    ),
)]
pub async fn access_log(
    State(st): S,
    c: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let after: crate::audit::AccessCursor = match q.get("after").or(q.get("next")) {
        Some(s) => s.parse()?,
        None => Default::default(),
    };
    let limit = match q.get("limit") {
        Some(s) => s
            .parse()
            .map_err(|_| ApiError(VaultError::BadRequest("limit must be a number".into())))?,
        None => 100,
    };
    Ok(json_response(
        StatusCode::OK,
        &st.vault.access_log(&c.ctx, &c.auth, &id, &after, limit).await?,
    ))
}

/// A delegated grant to mint.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// The subjects the grant may read (subject ids).
    #[schema(min_items = 1, max_items = 1000)]
    subjects: Vec<String>,
    /// The purpose granted; default: the X-Purpose of the call.
    purpose: Option<String>,
    /// Default: every field the purpose covers.
    fields: Option<Vec<String>>,
    /// At most grants.max_ttl, and not past the parent token's expiry.
    #[schema(minimum = 1)]
    ttl_seconds: u64,
    #[schema(minimum = 1)]
    max_uses: Option<u64>,
    /// The caller's name, 1-100 characters of [A-Za-z0-9-_.@:].
    #[schema(pattern = "^[A-Za-z0-9_.@:-]{1,100}$", example = "courier-kazpost")]
    caller: String,
    /// Bind the grant to this client-certificate subject (mTLS).
    cert_subject: Option<String>,
}

fn token_answer(rec: &crate::tokens::TokenRecord, secret: &crate::tokens::TokenSecret) -> Response {
    let body = apidoc::TokenIssued {
        id: rec.id.clone(),
        token: secret.expose().to_owned(),
        expires_at: crate::fsutil::rfc3339(rec.expires_at),
        caller: rec.caller.clone(),
        purposes: rec.purposes.clone(),
        capabilities: rec.capabilities.clone(),
    };
    let mut r = json_response(StatusCode::CREATED, &body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A single-use sign-in link to the subject's own page
///
/// Capability: `grant`, under `subject_access` (X-Purpose).
///
/// The shop's backend, after signing its user in, redirects the user to `url`. The code is single-use, lives at most 15 minutes (and never longer than the calling token), and travels in the URL fragment, so it never reaches a server log.
#[utoipa::path(
    post,
    path = "/v1/subjects/{id}/self-service-links",
    operation_id = "createSelfServiceLink",
    tag = "self-service",
    params(("id" = String, Path, description = "The subject id.", example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"), PurposeHeaders),
    responses(
        (status = 201, description = "The link.", body = apidoc::SelfServiceLink, headers(("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token."))),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        (status = 410, response = apidoc::Gone),
        apidoc::NotServed
    ),
)]
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
    let body = apidoc::SelfServiceLink {
        url: format!("{base}/self/#code={code}"),
        code: code.to_owned(),
        expires_at: crate::fsutil::rfc3339(link.expires_at),
    };
    Ok(json_response(StatusCode::CREATED, &body))
}

/// The code of a self-service link.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    code: String,
}

/// Exchange a link's code for a session of that one subject
///
/// No token: the code is the credential. Answers a token for that one subject, purpose `subject_access`, capabilities `read` and `write` (and the erasure of that subject), alive at most 30 minutes. A used, expired or unknown code answers `401 token_invalid`.
#[utoipa::path(
    post,
    path = "/v1/self/session",
    operation_id = "openSelfServiceSession",
    tag = "self-service",
    params(RequestIdHeader),
    request_body = SessionBody,
    responses(
        (status = 201, description = "The session; `token` is shown this once.", body = apidoc::SelfSession, headers(("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token."))),
        (status = 400, response = apidoc::BadRequest),
        (status = 401, response = apidoc::Unauthorized),
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
    security(()),
)]
pub async fn self_session(State(st): S, a: Anonymous, JsonBody(b): JsonBody<SessionBody>) -> ApiResult {
    match st.vault.self_service_session(&a.ctx, &b.code).await {
        Ok((rec, secret)) => {
            if let Some(p) = a.peer {
                st.limiter.success(p);
            }
            let subject = rec.grant.as_ref().and_then(|g| g.subjects.first()).cloned();
            let body = apidoc::SelfSession {
                token: secret.expose().to_owned(),
                expires_at: crate::fsutil::rfc3339(rec.expires_at),
                subject,
            };
            Ok(json_response(StatusCode::CREATED, &body))
        }
        Err(e) => {
            if let (Some(p), VaultError::TokenInvalid) = (a.peer, &e) {
                super::extract::slow_down_failure(&st, p).await;
            }
            Err(ApiError(e))
        }
    }
}

/// End a self-service session (sign out)
///
/// The session's own token only. Audited as `self_session_end`.
///
/// Revokes the session's token at once, on every node and for good (the revocation ledger, as `DELETE /v1/admin/tokens/{id}` does): the page's sign-out. Any other token: `403 capability_missing`.
#[utoipa::path(
    delete,
    path = "/v1/self/session",
    operation_id = "endSelfServiceSession",
    tag = "self-service",
    params(RequestIdHeader),
    responses(
        (status = 204, description = "The session is over: its token is refused from now on."),
        (status = 401, response = apidoc::Unauthorized),
        (status = 403, response = apidoc::Forbidden),
        apidoc::NotServed
    ),
)]
pub async fn end_self_session(State(st): S, c: Caller) -> ApiResult {
    st.vault.end_self_session(&c.ctx, &c.auth).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Mint a delegated grant token
///
/// Capability: `grant`.
///
/// A read-only token for the named subjects, one purpose and some fields, for at most `ttl_seconds` and optionally `max_uses` calls. Minted under the purpose it grants (X-Purpose, or `purpose` in the body). Never wider than its parent token: `403 grant_too_wide`.
#[utoipa::path(
    post,
    path = "/v1/grants",
    operation_id = "mintGrant",
    tag = "tokens",
    params(PurposeHeaders),
    request_body = GrantBody,
    responses(
        (status = 201, description = "The grant; `token` is shown this once.", body = apidoc::TokenIssued, headers(("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token."))),
        apidoc::Refused,
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
)]
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

/// A token to issue.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// The caller's name, 1-100 characters of [A-Za-z0-9-_.@:].
    #[schema(pattern = "^[A-Za-z0-9_.@:-]{1,100}$", example = "order-service")]
    caller: String,
    /// Purposes from the configured policy.
    purposes: Vec<String>,
    #[schema(value_type = Vec<crate::policy::Capability>)]
    capabilities: Vec<String>,
    #[schema(minimum = 1, maximum = 157680000)]
    ttl_seconds: u64,
    /// Bind the token to this client-certificate subject (mTLS).
    cert_subject: Option<String>,
}

/// Issue a token
///
/// Capability: `admin`.
///
/// Issues a token for a caller with purposes, capabilities and a lifetime; optionally bound to a client-certificate subject. The vault keeps only a keyed hash of it.
#[utoipa::path(
    post,
    path = "/v1/admin/tokens",
    operation_id = "issueToken",
    tag = "admin",
    params(RequestIdHeader),
    request_body = IssueBody,
    responses(
        (status = 201, description = "The token; `token` is shown this once.", body = apidoc::TokenIssued, headers(("Cache-Control" = String, description = "`no-store`: the answer carries personal data or a token.")),
            links(("RevokeToken" = (operation_id = "revokeToken", parameters(("id" = "$response.body#/id")))))),
        apidoc::Refused,
        (status = 413, response = apidoc::PayloadTooLarge),
        apidoc::NotServed
    ),
)]
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

/// List tokens
///
/// Capability: `admin`.
///
/// Every token and grant (never their text).
#[utoipa::path(
    get,
    path = "/v1/admin/tokens",
    operation_id = "listTokens",
    tag = "admin",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The tokens.", body = TokenList),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
pub async fn list_tokens(State(st): S, c: Caller) -> ApiResult {
    let list = st.vault.list_tokens(&c.ctx, &c.auth).await?;
    let tokens = list.iter().map(TokenRecord::describe).collect();
    Ok(json_response(StatusCode::OK, &TokenList { tokens }))
}

/// Revoke a token
///
/// Capability: `admin`.
///
/// Revokes the token and, with it, every grant it minted. Unknown id: `404 not_found`.
#[utoipa::path(
    delete,
    path = "/v1/admin/tokens/{id}",
    operation_id = "revokeToken",
    tag = "admin",
    params(("id" = String, Path, description = "The token id (`tok_...`)."), RequestIdHeader),
    responses(
        (status = 200, description = "The token, revoked.", body = TokenDescription),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        apidoc::NotServed
    ),
)]
pub async fn revoke_token(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let rec = st.vault.revoke_token(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(StatusCode::OK, &rec.describe()))
}

/// Undelivered events
///
/// Capability: `admin`. Audited as `events_list`.
///
/// Events recorded and not yet delivered to every subscriber, oldest first (at most 1000), with each subscriber's delivery state. `state=pending` or `state=dead` shows only those deliveries.
#[utoipa::path(
    get,
    path = "/v1/admin/events",
    operation_id = "listEvents",
    tag = "admin",
    params(RequestIdHeader, apidoc::EventsQuery),
    responses(
        (status = 200, description = "The events.", body = crate::events::EventList),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
pub async fn list_events(State(st): S, c: Caller, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let filter = crate::events::Filter::parse(q.get("state").map(String::as_str))
        .ok_or_else(|| ApiError(VaultError::BadRequest("state must be pending, dead or all".into())))?;
    let events = st.vault.list_events(&c.ctx, &c.auth, filter).await?;
    Ok(json_response(StatusCode::OK, &crate::events::EventList { events }))
}

/// Send a dead event again
///
/// Capability: `admin`. Audited as `events_retry`.
///
/// Re-queues the event's dead deliveries with a fresh dead clock; pending ones are left as they are. Unknown or already delivered id: `404 not_found`.
#[utoipa::path(
    post,
    path = "/v1/admin/events/{id}/retry",
    operation_id = "retryEvent",
    tag = "admin",
    params(("id" = String, Path, description = "The event id (`msg_...`)."), RequestIdHeader),
    responses(
        (status = 200, description = "Re-queued.", body = apidoc::EventRetry),
        apidoc::Refused,
        (status = 404, response = apidoc::NotFound),
        apidoc::NotServed
    ),
)]
pub async fn retry_event(State(st): S, c: Caller, Path(id): Path<String>) -> ApiResult {
    let requeued = st.vault.retry_event(&c.ctx, &c.auth, &id).await?;
    Ok(json_response(
        StatusCode::OK,
        &apidoc::EventRetry {
            id,
            requeued: requeued as u64,
        },
    ))
}

/// The vault at a glance
///
/// Capability: `admin`. Audited as `status`.
///
/// Whether it is serving unsealed, the current key epoch and the next scheduled rotation, the audit head and its last signed checkpoint, and how many subjects, erasure receipts, tokens and undelivered events it holds. `pdvault status` prints the same.
#[utoipa::path(
    get,
    path = "/v1/admin/status",
    operation_id = "status",
    tag = "admin",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The status.", body = crate::vault::Status),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
pub async fn status(State(st): S, c: Caller) -> ApiResult {
    let status = st.vault.admin_status(&c.ctx, &c.auth).await?;
    Ok(json_response(StatusCode::OK, &status))
}

/// Rotate the key-encryption key
///
/// Capability: `admin`.
///
/// Starts a new key epoch and re-wraps every live data key under it; resumable.
#[utoipa::path(
    post,
    path = "/v1/admin/rotate-kek",
    operation_id = "rotateKek",
    tag = "admin",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "Rotated.", body = apidoc::Rotation),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
pub async fn rotate_kek(State(st): S, c: Caller) -> ApiResult {
    let (epoch, rewrapped) = st.vault.admin_rotate(&c.ctx, &c.auth).await?;
    Ok(json_response(StatusCode::OK, &apidoc::Rotation { epoch, rewrapped }))
}

/// Download a backup
///
/// Capability: `admin`.
///
/// Streams a consistent snapshot of the data (ciphertexts, blind-index HMACs and token hashes only; data keys stay in the keys directory). Restore it offline with `pdvault restore`.
#[utoipa::path(
    get,
    path = "/v1/admin/backup",
    operation_id = "backup",
    tag = "admin",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The snapshot.", content_type = "application/octet-stream", body = Vec<u8>, headers(("Content-Disposition" = String, description = "`attachment; filename=\"pdvault.pdvbak\"`."))),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
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

/// Prometheus metrics
///
/// Capability: `admin`.
///
/// Metrics in the Prometheus text exposition format (`text/plain; version=0.0.4; charset=utf-8`).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "admin",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The metrics.", content_type = "text/plain", body = String),
        apidoc::Refused,
        apidoc::NotServed
    ),
)]
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
