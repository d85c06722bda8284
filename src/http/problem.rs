//! The one place where vault errors become HTTP answers: status codes and
//! `application/problem+json` bodies (RFC 9457) with a stable `code`.
//! Internal details are logged (they hold no personal value) and not sent.

use crate::error::VaultError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub struct ApiError(pub VaultError);

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        ApiError(e)
    }
}

pub fn status_of(e: &VaultError) -> StatusCode {
    use VaultError::*;
    match e {
        TokenInvalid | TokenExpired | CertificateMismatch => StatusCode::UNAUTHORIZED,
        PurposeNotAllowed(_) | CapabilityMissing(_) | FieldNotAllowed(_) | ConsentRequired(_) | GrantTooWide(_) => {
            StatusCode::FORBIDDEN
        }
        JustificationRequired(_) | BadRequest(_) => StatusCode::BAD_REQUEST,
        SubjectNotFound | NotFound(_) => StatusCode::NOT_FOUND,
        SubjectErased => StatusCode::GONE,
        InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        VersionConflict { .. } => StatusCode::PRECONDITION_FAILED,
        PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        AuditUnavailable | StorageUnavailable | InUse(_) => StatusCode::SERVICE_UNAVAILABLE,
        DataKeyUnavailable | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The `title` of a problem code.
pub fn title_for(code: &str) -> &'static str {
    match code {
        "token_invalid" => "Token invalid",
        "token_expired" => "Token expired",
        "purpose_not_allowed" => "Purpose not allowed",
        "capability_missing" => "Capability missing",
        "field_not_allowed" => "Field not allowed",
        "consent_required" => "Consent required",
        "justification_required" => "Justification required",
        "subject_not_found" => "Subject not found",
        "subject_erased" => "Subject erased",
        "invalid_field" => "Invalid field",
        "version_conflict" => "Version conflict",
        "payload_too_large" => "Payload too large",
        "bad_request" => "Bad request",
        "not_found" => "Not found",
        "method_not_allowed" => "Method not allowed",
        "grant_too_wide" => "Grant too wide",
        "rate_limited" => "Too many requests",
        "audit_unavailable" => "Audit unavailable",
        "storage_unavailable" => "Storage unavailable",
        "uri_too_long" => "URI too long",
        "headers_too_large" => "Request header fields too large",
        "data_key_unavailable" => "Data key unavailable",
        _ => "Internal error",
    }
}

/// The problem object of an error (also used inside batch answers).
pub fn problem_json(e: &VaultError) -> serde_json::Value {
    let code = e.code();
    let status = status_of(e);
    let detail = match e {
        // Their text names files: the log has it, the caller does not.
        VaultError::Internal(msg) | VaultError::InUse(msg) => {
            tracing::error!(error = %msg, code, "internal error");
            "internal error; the server log has the details".to_owned()
        }
        other => other.to_string(),
    };
    let mut p = json!({
        "type": format!("/v1/errors#{code}"),
        "title": title_for(code),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let VaultError::InvalidField { field, reason } = e {
        p["field"] = json!(field);
        p["reason"] = json!(reason);
    }
    if let VaultError::VersionConflict { current } = e {
        p["current_version"] = json!(current);
    }
    p
}

pub fn problem_response(status: StatusCode, body: serde_json::Value) -> Response {
    let code = body["code"].as_str().map(|c| super::ProblemCode(c.to_owned()));
    let mut r = (status, serde_json::to_vec(&body).expect("json")).into_response();
    if let Some(c) = code {
        r.extensions_mut().insert(c);
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        let mut r = problem_response(status, problem_json(&self.0));
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pdvault\""),
            );
        }
        if let VaultError::RateLimited { retry_after_secs } = self.0 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        r
    }
}

/// A problem for a code that has no `VaultError` (routing).
pub fn routing_problem(status: StatusCode, code: &str, detail: &str) -> Response {
    problem_response(
        status,
        json!({
            "type": format!("/v1/errors#{code}"),
            "title": title_for(code),
            "status": status.as_u16(),
            "detail": detail,
            "code": code,
        }),
    )
}
