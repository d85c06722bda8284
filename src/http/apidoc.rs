//! The OpenAPI 3.1 document of the API, generated from the code: the root
//! (info, tags, security, shared problem answers) is here, each operation is
//! the `#[utoipa::path]` of its handler, and each body is a type that derives
//! `ToSchema`: the request bodies are the very types the handlers deserialize,
//! the simple answers the types they serialize. The router (`super::router`)
//! is built only through `utoipa_axum::routes!`, which does not compile for a
//! handler without its `#[utoipa::path]`, so no route exists undocumented.

use crate::policy::Capability;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{response::Response, Ref, RefOr};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToResponse, ToSchema};

/// The description of the whole API (the document's `info.description`).
const API_DESCRIPTION: &str = "pdvault keeps personal data encrypted under a per-subject data key and \
releases it only purpose-bound: every call names a purpose (X-Purpose) from the privacy policy, and only \
the fields that purpose covers are released, in its form (plain, masked, pseudonym or generalized), after \
the token, capability, consent and justification checks. Every decision is audited before the answer is \
sent. Erasure is crypto-shredding: the subject's data keys are destroyed and a signed Ed25519 receipt is \
returned.\n\nErrors are `application/problem+json` (RFC 9457) with a stable `code`; each problem's `type` \
is `/v1/errors#<code>`, the entry of that code on the error page this vault serves. Every response carries \
`X-Request-Id`. An unknown path answers `404 not_found`; a known path with another method \
`405 method_not_allowed`.";

#[derive(OpenApi)]
#[openapi(
    info(title = "pdvault", version = "1", description = API_DESCRIPTION),
    servers((url = "https://127.0.0.1:8443", description = "Default listener (HTTPS only).")),
    security(("bearerAuth" = [])),
    tags(
        (name = "subjects", description = "Subject data: create, release, change, look up."),
        (name = "erasure", description = "Crypto-shredding and its receipts."),
        (name = "consents", description = "Consent records."),
        (name = "audit", description = "Access log."),
        (name = "tokens", description = "Delegated grants."),
        (name = "admin", description = "Operator calls (admin capability)."),
        (name = "self-service", description = "The subject's own page and its sign-in."),
        (name = "meta", description = "Health, this document and the error reference."),
    ),
    components(
        responses(
            BadRequest, Unauthorized, Forbidden, NotFound, Gone, PreconditionFailed, PayloadTooLarge,
            UnprocessableEntity, TooManyRequests, InternalError, ServiceUnavailable
        ),
        schemas(Problem, ProblemCode, Capability, EventStateFilter)
    ),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer pdv_...`: a token issued by `pdvault token issue`, a grant, or a \
                         self-service session.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The finished document: what the router collected, with axum's wildcard
/// segments (`{*path}`) written as OpenAPI path templates (`{path}`), and
/// `X-Request-Id` on every answer.
pub fn finish(mut doc: utoipa::openapi::OpenApi) -> String {
    let paths = std::mem::take(&mut doc.paths.paths);
    for (path, item) in paths {
        doc.paths.paths.insert(path.replace("{*", "{"), item);
    }
    request_id_on_every_answer(&mut doc);
    serde_json::to_string(&doc).expect("the OpenAPI document serialises")
}

/// The server's middleware sets `X-Request-Id` on every response, so the
/// document says so once, here, for every answer it describes.
fn request_id_on_every_answer(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{header::HeaderBuilder, Object, Type};
    let add = |r: &mut RefOr<Response>| {
        if let RefOr::T(r) = r {
            r.headers.entry("X-Request-Id".into()).or_insert_with(|| {
                HeaderBuilder::new()
                    .schema(Some(Object::with_type(Type::String)))
                    .description(Some("The request's id, also in the audit entry."))
                    .build()
                    .into()
            });
        }
    };
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            op.responses.responses.values_mut().for_each(add);
        }
    }
    if let Some(c) = doc.components.as_mut() {
        c.responses.values_mut().for_each(add);
    }
}

// ---------------------------------------------------------------------------
// Headers and parameters shared by operations.

/// The headers of a call that touches subject data.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct PurposeHeaders {
    /// The purpose the call acts under (from the privacy policy, e.g. `order`, `delivery`, `support`,
    /// `subject_access`, `legal_request`, `erasure`). Needed by every call that touches subject data;
    /// calls made with the `audit` or `admin` capability alone need none. Missing or not one of the
    /// token's purposes: `403 purpose_not_allowed`.
    #[param(rename = "X-Purpose", required = false, example = "delivery")]
    x_purpose: String,
    /// Why the data is needed (UTF-8, at most 500 characters, recorded in the audit log). Required by
    /// purposes that need a justification (by default `legal_request`): `400 justification_required`
    /// without it.
    #[param(rename = "X-Justification", required = false, max_length = 500)]
    x_justification: String,
    /// The caller's request id, echoed in the answer and written to the audit entry; otherwise a new
    /// one is made.
    #[param(rename = "X-Request-Id", required = false, pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    x_request_id: String,
}

/// The one header every call may send.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct RequestIdHeader {
    /// The caller's request id, echoed in the answer and written to the audit entry; otherwise a new
    /// one is made.
    #[param(rename = "X-Request-Id", required = false, pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    x_request_id: String,
}

/// The headers of a change to a subject.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IfMatchHeader {
    /// The subject version the change is based on (`3`, `"3"` or `W/"3"`); a mismatch answers
    /// `412 version_conflict`, a non-number `400 bad_request`.
    #[param(rename = "If-Match", required = false)]
    if_match: String,
}

/// `?fields=` of a read.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FieldsQuery {
    /// Comma-separated field names to release (`fields=given_name,phone`; it may also repeat);
    /// default: all the purpose covers. A field the purpose does not cover: `403 field_not_allowed`.
    #[param(style = Form, explode = false, required = false)]
    fields: String,
}

/// The paging of the access log.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AccessLogQuery {
    /// Cursor: the `next` of the previous page (also accepted as `?next=`). Default 0, the start.
    #[param(pattern = "^[0-9]+(\\.[0-9a-f-]{1,64})?$", required = false)]
    after: String,
    /// Entries per page, 1 to 1000 (clamped); default 100.
    #[param(minimum = 1, maximum = 1000, default = 100, required = false)]
    limit: u32,
}

/// The filter of the event list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventsQuery {
    /// `pending`, `dead` or `all` (the default): keep only those deliveries. Anything else:
    /// `400 bad_request`.
    #[param(required = false)]
    state: EventStateFilter,
}

#[derive(Serialize, ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum EventStateFilter {
    Pending,
    Dead,
    All,
}

// ---------------------------------------------------------------------------
// Problems (RFC 9457) and the shared error answers.

/// An error (RFC 9457, media type application/problem+json). `code` is stable and machine-readable; no
/// error message ever contains a field value. The same object is the `error` of a failed batch item.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"type": "/v1/errors#consent_required", "title": "Consent required", "status": 403,
    "detail": "purpose marketing needs the subject's consent", "code": "consent_required"}))]
pub struct Problem {
    /// `/v1/errors#<code>`: the entry of this code in the error reference (`GET /v1/errors`).
    #[serde(rename = "type")]
    #[schema(example = "/v1/errors#consent_required")]
    pub type_: String,
    #[schema(example = "Consent required")]
    pub title: String,
    /// The HTTP status of this problem.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    pub detail: String,
    pub code: ProblemCode,
    /// Only with `invalid_field`: the field that failed its check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Only with `invalid_field`: why (never the value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Only with `version_conflict`: the subject's current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub current_version: Option<u64>,
}

/// Stable error codes; `GET /v1/errors` (and docs/errors.md) says for each what causes it and what a
/// caller should do.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ProblemCode {
    TokenInvalid,
    TokenExpired,
    PurposeNotAllowed,
    CapabilityMissing,
    FieldNotAllowed,
    ConsentRequired,
    GrantTooWide,
    JustificationRequired,
    BadRequest,
    SubjectNotFound,
    NotFound,
    MethodNotAllowed,
    SubjectErased,
    VersionConflict,
    PayloadTooLarge,
    UriTooLong,
    InvalidField,
    RateLimited,
    HeadersTooLarge,
    DataKeyUnavailable,
    Internal,
    AuditUnavailable,
    StorageUnavailable,
}

/// Every problem code, in the order of `ProblemCode` (and of docs/errors.md).
pub const PROBLEM_CODES: &[&str] = &[
    "token_invalid",
    "token_expired",
    "purpose_not_allowed",
    "capability_missing",
    "field_not_allowed",
    "consent_required",
    "grant_too_wide",
    "justification_required",
    "bad_request",
    "subject_not_found",
    "not_found",
    "method_not_allowed",
    "subject_erased",
    "version_conflict",
    "payload_too_large",
    "uri_too_long",
    "invalid_field",
    "rate_limited",
    "headers_too_large",
    "data_key_unavailable",
    "internal",
    "audit_unavailable",
    "storage_unavailable",
];

macro_rules! problem_response {
    ($name:ident, $desc:literal) => {
        #[doc = $desc]
        #[derive(ToResponse)]
        #[response(content_type = "application/problem+json")]
        #[allow(dead_code)]
        pub struct $name(Problem);
    };
}

problem_response!(
    BadRequest,
    "`bad_request` (malformed JSON or shape, unknown key in a body, a header that is not visible ASCII, \
     X-Justification over 500 characters, a bad query or If-Match) or `justification_required`."
);
problem_response!(
    Unauthorized,
    "`token_invalid` (unknown, revoked, used-up grant, or presented over a connection with another client \
     certificate) or `token_expired`. Carries `WWW-Authenticate: Bearer realm=\"pdvault\"`."
);
problem_response!(
    Forbidden,
    "`purpose_not_allowed`, `capability_missing`, `field_not_allowed` (never a silent drop), \
     `consent_required` or, for POST /v1/grants, `grant_too_wide`."
);
problem_response!(
    NotFound,
    "`subject_not_found` (a grant cannot tell whether subjects outside it exist), or `not_found`."
);
problem_response!(Gone, "`subject_erased`: the subject was crypto-shredded.");
problem_response!(
    PreconditionFailed,
    "`version_conflict`: If-Match does not name the current version (`current_version`)."
);
problem_response!(
    PayloadTooLarge,
    "`payload_too_large`: the body exceeds the cap (default 64 KiB; batch endpoints 4 MiB)."
);
problem_response!(
    UnprocessableEntity,
    "`invalid_field`: a value failed its check (`field` and `reason` say which and why); nothing of the \
     request was stored."
);
problem_response!(
    TooManyRequests,
    "`rate_limited`: too many failed authentications from this peer. Carries `Retry-After`."
);
problem_response!(InternalError, "`internal` or `data_key_unavailable`.");
problem_response!(
    ServiceUnavailable,
    "`audit_unavailable`: the audit record could not be made durable, so nothing was released; or \
     `storage_unavailable`."
);

/// The problems most operations share, each written once: in an operation's
/// `responses(...)` these stand for their status lines, in status order.
fn problems(list: [(&str, &str); 3]) -> BTreeMap<String, RefOr<Response>> {
    list.into_iter()
        .map(|(status, name)| (status.to_owned(), RefOr::Ref(Ref::from_response_name(name))))
        .collect()
}

/// `400`, `401` and `403`: the request, its token or what the token may do
/// refused.
pub struct Refused;

impl IntoResponses for Refused {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems([
            ("400", BadRequest::response().0),
            ("401", Unauthorized::response().0),
            ("403", Forbidden::response().0),
        ])
    }
}

/// `429`, `500` and `503`: what any operation with a token may answer
/// whatever it asks (a throttled peer, an internal failure, the audit log or
/// the store unavailable).
pub struct NotServed;

impl IntoResponses for NotServed {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems([
            ("429", TooManyRequests::response().0),
            ("500", InternalError::response().0),
            ("503", ServiceUnavailable::response().0),
        ])
    }
}

// ---------------------------------------------------------------------------
// Field values.

/// 1-200 characters after trimming and Unicode NFC normalisation; control characters are refused.
#[derive(Serialize, ToSchema)]
#[schema(value_type = String, min_length = 1, max_length = 200, example = "Айгерим")]
#[allow(dead_code)]
pub struct NameText(String);

/// A phone number, stored in E.164; a national number defaults to Kazakhstan (+7).
#[derive(Serialize, ToSchema)]
#[schema(value_type = String, min_length = 1, example = "+77011234567")]
#[allow(dead_code)]
pub struct Phone(String);

/// An e-mail address: syntax checked, domain lower-cased.
#[derive(Serialize, ToSchema)]
#[schema(value_type = String, min_length = 3, max_length = 254, example = "aigerim@example.kz")]
#[allow(dead_code)]
pub struct Email(String);

/// A postal address. Unknown keys are refused (422 invalid_field); `null` means absent. At least one of
/// `region`, `city`, `street` or `postal_code` is needed. Every part is trimmed and NFC-normalised;
/// control characters are refused.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Address {
    /// ISO 3166-1 alpha-2 (upper-cased on write); default `KZ`.
    #[schema(min_length = 2, max_length = 2, example = "KZ")]
    country: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    region: Option<String>,
    #[schema(min_length = 1, max_length = 200, example = "Almaty")]
    city: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    street: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    building: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    apartment: Option<String>,
    /// 3 to 10 letters, digits, spaces or hyphens.
    #[schema(min_length = 3, max_length = 10, pattern = "^[A-Za-z0-9 -]*$")]
    postal_code: Option<String>,
    #[schema(min_length = 1, max_length = 1000)]
    comment: Option<String>,
}

/// Field values to write (policy clause 2.2). More fields can be declared in config (clause 2.3), hence
/// additional keys; a name that is neither is answered `422 invalid_field` (or `403 field_not_allowed`
/// when the purpose does not cover it). A value that fails its check is answered `422 invalid_field`
/// and nothing of the request is stored.
#[derive(Serialize, ToSchema)]
#[schema(min_properties = 1)]
#[allow(dead_code)]
pub struct SubjectFields {
    #[serde(default)]
    surname: NameText,
    #[serde(default)]
    given_name: NameText,
    #[serde(default)]
    patronymic: NameText,
    #[serde(default)]
    phone: Phone,
    #[serde(default)]
    email: Email,
    #[serde(default)]
    address: Address,
    /// Fields declared in config (clause 2.3).
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

/// As SubjectFields, but `null` removes a field.
#[derive(Serialize, ToSchema)]
#[schema(min_properties = 1)]
#[allow(dead_code)]
pub struct SubjectFieldsPatch {
    #[serde(default)]
    surname: Option<NameText>,
    #[serde(default)]
    given_name: Option<NameText>,
    #[serde(default)]
    patronymic: Option<NameText>,
    #[serde(default)]
    phone: Option<Phone>,
    #[serde(default)]
    email: Option<Email>,
    #[serde(default)]
    address: Option<Address>,
    /// Fields declared in config (clause 2.3).
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

/// The body of PATCH: the fields to change, `null` to remove one.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"fields": {"phone": "+77017654321", "patronymic": null}}))]
#[allow(dead_code)]
pub struct FieldsPatchBody {
    fields: SubjectFieldsPatch,
}

/// An address as released: whole (`plain`), cut to country, region and city (`generalized` or
/// `masked`), or a pseudonym.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ReleasedAddress {
    Parts(BTreeMap<String, String>),
    /// A pseudonym: `pn_` and 32 hex characters.
    Pseudonym(Pseudonym),
}

/// A pseudonym: `pn_` and 32 hex characters, stable per purpose, never reversible.
#[derive(Serialize, ToSchema)]
#[schema(value_type = String, pattern = "^pn_[0-9a-f]{32}$", example = "pn_3f1c0e7d2a9b4c6e8f0a1b2c3d4e5f60")]
#[allow(dead_code)]
pub struct Pseudonym(String);

/// Field values as released under the call's purpose: `plain`, `masked` (`+7 *** *** 45 67`,
/// `a***@example.kz`), `pseudonym` (`pn_` + 32 hex characters, stable per purpose, never reversible) or
/// `generalized` (an address cut to country, region and city). A field the subject does not have is
/// absent.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ReleasedFields {
    #[serde(default)]
    surname: String,
    #[serde(default)]
    given_name: String,
    #[serde(default)]
    patronymic: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    address: ReleasedAddress,
    /// Fields declared in config (clause 2.3).
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

// ---------------------------------------------------------------------------
// Answers.

/// A subject id and its version after a write.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SubjectVersion {
    /// A subject id: a lower-case hyphenated UUID.
    #[schema(example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a")]
    pub id: String,
    #[schema(minimum = 1)]
    pub version: u64,
}

/// A subject's fields as released.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ReleasedSubject {
    /// A subject id: a lower-case hyphenated UUID.
    #[schema(example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a")]
    id: String,
    #[schema(minimum = 1)]
    version: u64,
    fields: ReleasedFields,
}

/// The signed statement. Verifiers must sign-check it exactly as received (further keys may be added
/// within v1).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ReceiptBody {
    id: String,
    #[schema(format = DateTime)]
    erased_at: String,
    /// The key epoch the subject's data key was wrapped under.
    key_epoch: u64,
    /// When the last key that could open any copy (backups included) of the subject's data is destroyed.
    #[schema(format = DateTime)]
    final_by: String,
    /// `request` (DELETE) or `retention` (the inactivity sweeper).
    #[schema(example = "request")]
    reason: Option<String>,
    /// The caller that asked for the erasure.
    requested_by: Option<String>,
    #[schema(example = "Ed25519")]
    alg: Option<String>,
}

/// The signed receipt of a crypto-shredding. `signature` is the base64 Ed25519 signature over the
/// canonical JSON of `receipt` (object keys sorted, no white space, UTF-8); verify it with
/// GET /v1/receipts/public-key.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ErasureReceipt {
    id: String,
    #[schema(format = DateTime)]
    erased_at: String,
    receipt: ReceiptBody,
    /// base64 Ed25519 signature over the canonical JSON of `receipt`.
    #[schema(content_encoding = "base64")]
    signature: String,
}

/// One item of a batch answer, in the request's order. `status` is the HTTP status this item alone would
/// have had; `fields` and `version` come with a success, `error` (a Problem) with a failure. `id` is null
/// for a subject that failed to be created.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BatchItem {
    id: Option<String>,
    #[schema(example = 200)]
    status: u16,
    #[schema(minimum = 1)]
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<ReleasedFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Problem>,
}

/// The answer of a batch call.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BatchResults {
    results: Vec<BatchItem>,
}

/// The subject a look-up found.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LookupResult {
    /// A subject id: a lower-case hyphenated UUID.
    #[schema(example = "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a")]
    pub id: String,
}

/// A new token or grant. `token` is its text, shown this once only.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenIssued {
    #[schema(pattern = "^tok_[0-9a-f]{16}$")]
    pub id: String,
    #[schema(pattern = "^pdv_[A-Za-z0-9_-]{43}$")]
    pub token: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<Capability>,
}

/// The end of a key rotation.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Rotation {
    /// The new key epoch.
    pub epoch: u32,
    /// How many live data keys were re-wrapped.
    pub rewrapped: u64,
}

/// The key that verifies erasure receipts.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    #[schema(example = "Ed25519")]
    pub alg: String,
    /// The raw 32-byte Ed25519 public key, base64.
    #[schema(content_encoding = "base64")]
    pub public_key: String,
}

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The end of a retry.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct EventRetry {
    pub id: String,
    /// Dead deliveries sent again.
    pub requeued: u64,
}

/// A single-use sign-in link to the subject's own page.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SelfServiceLink {
    #[schema(example = "https://vault.example.kz/self/#code=3q2-7w")]
    pub url: String,
    pub code: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
}

/// A self-service session; `token` is shown this once.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SelfSession {
    pub token: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub subject: Option<String>,
}
