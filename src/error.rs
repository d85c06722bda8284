//! The vault's error vocabulary: one enum, one stable machine-readable code per
//! variant. Owns nothing else; the HTTP status mapping lives in `http::problem`.
//!
//! No variant carries a personal value, a key or a token: the `detail` strings
//! name fields, purposes and reasons only.

use thiserror::Error;

/// Every way a vault call can fail, as the caller sees it.
#[derive(Debug, Error)]
pub enum VaultError {
    #[error("the token is unknown, revoked or used up")]
    TokenInvalid,
    #[error("the token has expired")]
    TokenExpired,
    #[error("{0}")]
    PurposeNotAllowed(String),
    #[error("{0}")]
    CapabilityMissing(String),
    #[error("{0}")]
    FieldNotAllowed(String),
    #[error("the subject has not consented to purpose {0}")]
    ConsentRequired(String),
    #[error("purpose {0} needs an X-Justification header")]
    JustificationRequired(String),
    #[error("no such subject")]
    SubjectNotFound,
    #[error("the subject has been erased")]
    SubjectErased,
    #[error("field {field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("the subject is at version {current}, not the one in If-Match")]
    VersionConflict { current: u64 },
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    GrantTooWide(String),
    #[error("too many failed authentications from this peer; retry later")]
    RateLimited { retry_after_secs: u64 },
    #[error("the audit record could not be made durable; nothing was released")]
    AuditUnavailable,
    #[error("the store cannot write (out of space or failing); nothing was changed or released, retry later")]
    StorageUnavailable,
    #[error("the client certificate does not match the token's binding")]
    CertificateMismatch,
    #[error("the subject's data key of this version no longer exists")]
    DataKeyUnavailable,
    /// The store is held by another process (a server or a command on the
    /// same directory): an ordinary condition, said as it is.
    #[error("{0}")]
    InUse(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl VaultError {
    /// The stable code of API.md; callers branch on it.
    pub fn code(&self) -> &'static str {
        use VaultError::*;
        match self {
            TokenInvalid => "token_invalid",
            TokenExpired => "token_expired",
            PurposeNotAllowed(_) => "purpose_not_allowed",
            CapabilityMissing(_) => "capability_missing",
            FieldNotAllowed(_) => "field_not_allowed",
            ConsentRequired(_) => "consent_required",
            JustificationRequired(_) => "justification_required",
            SubjectNotFound => "subject_not_found",
            SubjectErased => "subject_erased",
            InvalidField { .. } => "invalid_field",
            VersionConflict { .. } => "version_conflict",
            PayloadTooLarge { .. } => "payload_too_large",
            BadRequest(_) => "bad_request",
            NotFound(_) => "not_found",
            GrantTooWide(_) => "grant_too_wide",
            RateLimited { .. } => "rate_limited",
            AuditUnavailable => "audit_unavailable",
            StorageUnavailable | InUse(_) => "storage_unavailable",
            CertificateMismatch => "token_invalid",
            DataKeyUnavailable => "data_key_unavailable",
            Internal(_) => "internal",
        }
    }

    /// Whether this is a policy refusal (recorded as `refused` in the audit log)
    /// rather than an internal failure.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            VaultError::Internal(_)
                | VaultError::AuditUnavailable
                | VaultError::StorageUnavailable
                | VaultError::InUse(_)
                | VaultError::DataKeyUnavailable
        )
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        VaultError::Internal(what.to_string())
    }
}

impl From<std::io::Error> for VaultError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            // A full disk (or quota) is the caller's 503, not our 500.
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => VaultError::StorageUnavailable,
            _ => VaultError::Internal(format!("io: {e}")),
        }
    }
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;
