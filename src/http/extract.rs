//! Typed extractors: turn headers and bodies into what the core needs before a
//! handler runs. `Caller` authenticates (with the per-peer rate limiter) and
//! carries the purpose and justification; `JsonBody` reads a capped body and
//! parses it without ever echoing a value in an error.

use super::problem::ApiError;
use super::AppState;
use crate::error::VaultError;
use crate::tokens::Authenticated;
use crate::vault::Ctx;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use zeroize::{Zeroize, Zeroizing};

/// What the TLS layer learned about the connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: IpAddr,
    /// Subject DN of the verified client certificate (mTLS).
    pub cert_subject: Option<String>,
}

/// The request id (the caller's, or a new one).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

pub const MAX_JUSTIFICATION: usize = 500;

fn header_str<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, ApiError> {
    match parts.headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError(VaultError::BadRequest(format!("header {name} is not visible ASCII")))),
    }
}

/// Request context without authentication (purpose, justification, ids).
pub fn context(parts: &Parts) -> Result<Ctx, ApiError> {
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let purpose = header_str(parts, "x-purpose")?
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let justification = match parts.headers.get("x-justification") {
        None => None,
        Some(v) => {
            let s = String::from_utf8(v.as_bytes().to_vec())
                .map_err(|_| ApiError(VaultError::BadRequest("X-Justification must be UTF-8".into())))?;
            let s = s.trim().to_owned();
            (!s.is_empty()).then_some(s)
        }
    };
    let cert_subject = parts.extensions.get::<ConnInfo>().and_then(|c| c.cert_subject.clone());
    Ok(Ctx {
        request_id,
        purpose,
        justification,
        cert_subject,
    })
}

/// An authenticated caller.
pub struct Caller {
    pub ctx: Ctx,
    pub auth: Authenticated,
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnInfo>().map(|c| c.peer);
        // The lockout slows and then refuses unknown tokens only: a caller
        // with a valid token is never refused for another caller's failures
        // behind the same address.
        let locked = peer.and_then(|p| state.limiter.locked(p));
        let ctx = context(parts)?;
        let bearer = header_str(parts, "authorization")?.and_then(|h| {
            let (scheme, rest) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        let result = state.vault.authenticate(&ctx, bearer, locked).await;
        let had_bearer = bearer.is_some();
        // The header held the token's text: drop it now, so no later layer
        // keeps a copy (its bytes are hyper's read buffer, reused by the next read).
        parts.headers.remove(axum::http::header::AUTHORIZATION);
        match result {
            Ok(auth) => {
                if let Some(p) = peer {
                    state.limiter.success(p);
                }
                if let Some(slot) = parts.extensions.get::<super::LogSlot>() {
                    let known = |p: &&str| state.vault.cfg.policy.purposes.contains_key(*p);
                    slot.set(&auth.record.caller, ctx.purpose.as_deref().filter(known));
                }
                // Checked after authentication, so an unauthenticated caller
                // learns nothing but 401.
                if ctx
                    .justification
                    .as_ref()
                    .is_some_and(|j| j.chars().count() > MAX_JUSTIFICATION)
                {
                    return Err(ApiError(VaultError::BadRequest(format!(
                        "X-Justification is limited to {MAX_JUSTIFICATION} characters"
                    ))));
                }
                Ok(Caller { ctx, auth })
            }
            Err(e) => {
                if matches!(e, VaultError::RateLimited { .. }) {
                    state.vault.metrics.rate_limited.inc();
                }
                if let (Some(p), VaultError::TokenInvalid, true) = (peer, &e, had_bearer) {
                    slow_down_failure(state, p).await;
                }
                Err(ApiError(e))
            }
        }
    }
}

/// The most of an unwanted body read (and dropped) before an answer, so that
/// the client reads the answer instead of a reset connection.
pub const DRAIN_MAX: usize = 16 << 20;

/// Reads at most `limit` bytes; past it, drains (bounded) and answers 413 so
/// that the client reads the answer instead of a reset connection.
pub async fn read_capped(body: Body, limit: usize) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let mut body = body;
    // The body holds personal values: our copy is wiped when dropped.
    // Sized from Content-Length (up to the cap) so that it never grows: a
    // growing Vec leaves its old block behind (the zeroizing allocator wipes
    // it, but one copy is better than two).
    let hint = axum::body::HttpBody::size_hint(&body).lower().min(limit as u64) as usize;
    let mut buf = Zeroizing::new(Vec::with_capacity(hint));
    let mut total = 0usize;
    let too_large = ApiError(VaultError::PayloadTooLarge { limit });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(_))) => {
                return Err(ApiError(VaultError::BadRequest(
                    "the request body could not be read".into(),
                )))
            }
            Ok(None) => break,
            Err(_) if total > limit => return Err(too_large),
            Err(_) => {
                return Err(ApiError(VaultError::BadRequest(
                    "the request body arrived too slowly".into(),
                )))
            }
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= limit {
                buf.extend_from_slice(&data);
            } else {
                buf.zeroize();
                buf.clear();
                if total > DRAIN_MAX {
                    return Err(too_large);
                }
            }
        }
    }
    if total > limit {
        return Err(too_large);
    }
    Ok(buf)
}

/// Parses JSON without letting serde's messages (which may quote a value)
/// reach the caller.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError(VaultError::BadRequest(format!(
            "the request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )))
    })?;
    serde_json::from_value(v).map_err(|e| {
        let m = e.to_string();
        let safe = (m.starts_with("missing field") || m.starts_with("unknown field")) && !m.contains('"');
        let detail = if safe {
            format!(
                "the request body does not match the expected shape: {}",
                m.split(", expected").next().unwrap_or(&m)
            )
        } else {
            "the request body does not match the expected shape (a value has the wrong type)".to_owned()
        };
        ApiError(VaultError::BadRequest(detail))
    })
}

/// A JSON body capped at the normal limit.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.vault.cfg.server.body_limit;
        let bytes = read_capped(req.into_body(), limit).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body capped at the batch limit.
pub struct BatchBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for BatchBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.vault.cfg.server.batch_body_limit;
        let bytes = read_capped(req.into_body(), limit).await?;
        parse_json(&bytes).map(BatchBody)
    }
}

/// Counts a failed credential from `peer` and waits as the limiter says
/// (at most 2 s): unknown tokens and unknown self-service codes alike.
pub async fn slow_down_failure(state: &AppState, peer: IpAddr) {
    let delay = state.limiter.failure(peer);
    if !delay.is_zero() {
        tokio::time::sleep(delay.min(Duration::from_secs(2))).await;
    }
}

/// A call that carries no token (the self-service code exchange): its
/// context, and the peer for the failure limiter.
pub struct Anonymous {
    pub ctx: Ctx,
    pub peer: Option<IpAddr>,
}

impl FromRequestParts<Arc<AppState>> for Anonymous {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        Ok(Anonymous {
            ctx: context(parts)?,
            peer: parts.extensions.get::<ConnInfo>().map(|c| c.peer),
        })
    }
}
