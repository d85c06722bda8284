//! A typed client of the vault's HTTP API, for the services that call it and
//! for the operator CLI (and the black-box test kit) that are built on it:
//! one method per operation, the purpose a required argument wherever the
//! API needs one, TLS that trusts only the CA it is given (optionally with a
//! client certificate for tokens bound to one), and errors that carry the
//! problem `code`.
//!
//! The order service reads what a delivery label needs:
//!
//! ```no_run
//! # async fn order() -> Result<(), pdvault::client::ClientError> {
//! use pdvault::client::Client;
//! let vault = Client::builder("https://vault.internal:8443")
//!     .ca_file("/etc/pdvault/tls-cert.pem")?
//!     .token(std::env::var("PDVAULT_TOKEN").unwrap_or_default())
//!     .build()?;
//! let s = vault.read("delivery", "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a", Some(&["given_name", "phone", "address"])).await?;
//! println!("version {}: {} fields", s.version, s.fields.len());
//! # Ok(()) }
//! ```
//!
//! and hands the courier a grant for that one parcel:
//!
//! ```no_run
//! # async fn courier(vault: pdvault::client::Client, id: String) -> Result<(), pdvault::client::ClientError> {
//! use pdvault::client::GrantRequest;
//! let g = vault
//!     .grant("delivery", &GrantRequest::new("courier-kazpost", vec![id], 3600).max_uses(5))
//!     .await?;
//! // g.token goes to the courier, once; it reads with Client::builder(..).token(g.token).
//! # Ok(()) }
//! ```
//!
//! A refusal is `ClientError::Problem`, whose `code` is the stable problem
//! code (`field_not_allowed`, `subject_erased`, ...): branch on it, as on
//! [`ClientError::code`].

use crate::audit::AccessLogPage;
use crate::events::EventList;
use crate::http::apidoc;
use crate::tokens::{TokenDescription, TokenList};
use crate::vault::{ConsentRecord, Consents, Status};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use zeroize::Zeroizing;

pub use apidoc::{
    EventRetry, LookupResult, PublicKey, Rotation, SelfServiceLink, SelfSession, SubjectVersion, TokenIssued,
};

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The vault answered with a problem (RFC 9457).
    #[error("{status} {code}: {detail}")]
    Problem {
        status: u16,
        /// The stable problem code (`token_invalid`, `field_not_allowed`, ...).
        code: String,
        detail: String,
        /// The answer's `X-Request-Id`: the audit entry and the server log carry it too.
        request_id: Option<String>,
        /// The whole problem object (`field`, `reason`, `current_version`, ...).
        problem: Value,
    },
    /// The request did not get an answer (connection, TLS, time-out), with its causes.
    #[error("request to {base}: {cause}")]
    Transport { base: String, cause: String },
    /// The answer was not what the API documents.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// The client could not be set up (CA file, client certificate).
    #[error("{0}")]
    Setup(String),
}

impl ClientError {
    /// The problem code, for a problem answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Problem { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A subject's fields as released under a purpose.
#[derive(Deserialize)]
pub struct Released {
    pub id: String,
    pub version: u64,
    /// Field name to value, each in the form the purpose releases it.
    pub fields: Map<String, Value>,
}

impl Drop for Released {
    fn drop(&mut self) {
        self.fields.values_mut().for_each(crate::vault::wipe_value);
    }
}

/// A delegated grant to mint (`POST /v1/grants`).
#[derive(Serialize, Clone)]
pub struct GrantRequest {
    pub caller: String,
    pub subjects: Vec<String>,
    pub ttl_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_subject: Option<String>,
}

impl GrantRequest {
    /// A grant for `caller` to read `subjects` for `ttl_seconds`, under the
    /// purpose of the call, with every field that purpose covers.
    pub fn new(caller: impl Into<String>, subjects: Vec<String>, ttl_seconds: u64) -> Self {
        GrantRequest {
            caller: caller.into(),
            subjects,
            ttl_seconds,
            purpose: None,
            fields: None,
            max_uses: None,
            cert_subject: None,
        }
    }
    pub fn fields(mut self, fields: &[&str]) -> Self {
        self.fields = Some(fields.iter().map(|f| f.to_string()).collect());
        self
    }
    pub fn max_uses(mut self, n: u64) -> Self {
        self.max_uses = Some(n);
        self
    }
    pub fn cert_subject(mut self, dn: impl Into<String>) -> Self {
        self.cert_subject = Some(dn.into());
        self
    }
}

/// A token to issue (`POST /v1/admin/tokens`, admin).
#[derive(Serialize, Clone)]
pub struct IssueRequest {
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<String>,
    pub ttl_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_subject: Option<String>,
}

/// Which deliveries `list_events` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventState {
    Pending,
    Dead,
    All,
}

/// Sets a client up: the vault's address, the CA that signed its
/// certificate, a token, and a client certificate if tokens are bound to one.
pub struct ClientBuilder {
    base: String,
    roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
    token: Zeroizing<String>,
    timeout: std::time::Duration,
}

impl ClientBuilder {
    /// Trust the CA certificates (PEM) in this file, and only those.
    pub fn ca_file(self, path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let pem = std::fs::read(p).map_err(|e| ClientError::Setup(format!("{}: {e}", p.display())))?;
        self.ca_pem(&pem)
            .map_err(|e| ClientError::Setup(format!("{}: {e}", p.display())))
    }

    /// Trust the CA certificates in this PEM text, and only those.
    pub fn ca_pem(mut self, pem: &[u8]) -> Result<Self> {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::Setup(e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientError::Setup("no certificate in the CA file".into()));
        }
        self.roots.extend(certs);
        Ok(self)
    }

    /// Present this client certificate (PEM files of the certificate and its key).
    pub fn client_cert_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| ClientError::Setup(format!("{}: {e}", p.display())));
        let mut pem = Zeroizing::new(read(cert.as_ref())?);
        pem.extend_from_slice(&read(key.as_ref())?);
        self.client_cert_pem(&pem)
    }

    /// Present this client certificate (certificate and key, PEM).
    pub fn client_cert_pem(mut self, pem: &[u8]) -> Result<Self> {
        let id =
            reqwest::Identity::from_pem(pem).map_err(|e| ClientError::Setup(format!("client certificate: {e}")))?;
        self.identity = Some(id);
        Ok(self)
    }

    /// The bearer token of every call (a token, a grant or a session).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Zeroizing::new(token.into());
        self
    }

    /// How long one call may take in all (default 60 s).
    pub fn timeout(mut self, t: std::time::Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn build(self) -> Result<Client> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .timeout(self.timeout);
        for c in self.roots {
            b = b.add_root_certificate(c);
        }
        if let Some(id) = self.identity {
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| ClientError::Setup(with_causes(&e)))?;
        Ok(Client {
            http,
            base: self.base,
            token: self.token,
        })
    }
}

/// A connection pool to one vault, with one token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Zeroizing<String>,
}

impl Client {
    /// `base`: `https://host:port` (a bare `host:port` is taken as HTTPS).
    pub fn builder(base: impl Into<String>) -> ClientBuilder {
        let base = base.into();
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_owned()
        } else {
            format!("https://{base}")
        };
        ClientBuilder {
            base,
            roots: Vec::new(),
            identity: None,
            token: Zeroizing::new(String::new()),
            timeout: std::time::Duration::from_secs(60),
        }
    }

    /// The same vault and TLS set-up with another token (a grant, a session).
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Zeroizing::new(token.into()),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    // ----- subjects -------------------------------------------------------------

    /// `POST /v1/subjects`: a new subject from its fields.
    pub async fn create(&self, purpose: &str, fields: &Value) -> Result<SubjectVersion> {
        let body = json!({ "fields": fields });
        self.json(Method::POST, "/v1/subjects", Some(purpose), Some(&body))
            .await
    }

    /// `GET /v1/subjects/{id}`: the fields named (default: all the purpose covers).
    pub async fn read(&self, purpose: &str, id: &str, fields: Option<&[&str]>) -> Result<Released> {
        let mut path = format!("/v1/subjects/{}", segment(id));
        if let Some(f) = fields {
            path.push_str("?fields=");
            path.push_str(&f.iter().map(|f| segment(f)).collect::<Vec<_>>().join(","));
        }
        self.json(Method::GET, &path, Some(purpose), None).await
    }

    /// `PATCH /v1/subjects/{id}`: set fields (`null` removes one), optionally
    /// only if the subject is still at `if_match`.
    pub async fn patch(
        &self,
        purpose: &str,
        id: &str,
        fields: &Value,
        if_match: Option<u64>,
    ) -> Result<SubjectVersion> {
        let body = json!({ "fields": fields });
        let path = format!("/v1/subjects/{}", segment(id));
        let mut rq = self.request(Method::PATCH, &path, Some(purpose)).json(&body);
        if let Some(v) = if_match {
            rq = rq.header("If-Match", format!("\"{v}\""));
        }
        decode(self.send(rq).await?).await
    }

    /// `DELETE /v1/subjects/{id}`: crypto-shred; answers the signed receipt
    /// (`{"id", "erased_at", "receipt", "signature"}`).
    pub async fn erase(&self, purpose: &str, id: &str) -> Result<Value> {
        let path = format!("/v1/subjects/{}", segment(id));
        self.json(Method::DELETE, &path, Some(purpose), None).await
    }

    /// `POST /v1/subjects:batchGet`: each item on its own (`{"results": [...]}`).
    pub async fn batch_get(&self, purpose: &str, ids: &[String], fields: Option<&[&str]>) -> Result<Value> {
        let body = json!({ "ids": ids, "fields": fields });
        self.json(Method::POST, "/v1/subjects:batchGet", Some(purpose), Some(&body))
            .await
    }

    /// `POST /v1/subjects:batchCreate`: each item on its own (`{"results": [...]}`).
    pub async fn batch_create(&self, purpose: &str, subjects: &[Value]) -> Result<Value> {
        let subjects: Vec<Value> = subjects.iter().map(|f| json!({ "fields": f })).collect();
        let body = json!({ "subjects": subjects });
        self.json(Method::POST, "/v1/subjects:batchCreate", Some(purpose), Some(&body))
            .await
    }

    /// `POST /v1/lookup`: the subject whose `field` (e-mail or phone) is `value`.
    pub async fn lookup(&self, purpose: &str, field: &str, value: &str) -> Result<String> {
        let body = json!({ "field": field, "value": value });
        let r: LookupResult = self
            .json(Method::POST, "/v1/lookup", Some(purpose), Some(&body))
            .await?;
        Ok(r.id)
    }

    /// `GET /v1/subjects/{id}/consents`.
    pub async fn consents(&self, purpose: &str, id: &str) -> Result<Consents> {
        let path = format!("/v1/subjects/{}/consents", segment(id));
        self.json(Method::GET, &path, Some(purpose), None).await
    }

    /// `PUT /v1/subjects/{id}/consents/{consent_purpose}`.
    pub async fn set_consent(
        &self,
        purpose: &str,
        id: &str,
        consent_purpose: &str,
        granted: bool,
    ) -> Result<ConsentRecord> {
        let path = format!("/v1/subjects/{}/consents/{}", segment(id), segment(consent_purpose));
        self.json(Method::PUT, &path, Some(purpose), Some(&json!({ "granted": granted })))
            .await
    }

    /// `GET /v1/subjects/{id}/access-log`: `purpose` is `None` for an audit token.
    pub async fn access_log(
        &self,
        purpose: Option<&str>,
        id: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<AccessLogPage> {
        let mut path = format!("/v1/subjects/{}/access-log?limit={}", segment(id), limit.unwrap_or(100));
        if let Some(a) = after {
            path.push_str(&format!("&after={}", segment(a)));
        }
        self.json(Method::GET, &path, purpose, None).await
    }

    // ----- grants, self-service -----------------------------------------------------

    /// `POST /v1/grants`: a read-only token for some subjects, never wider than this one.
    pub async fn grant(&self, purpose: &str, g: &GrantRequest) -> Result<TokenIssued> {
        let body = serde_json::to_value(g).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(Method::POST, "/v1/grants", Some(purpose), Some(&body)).await
    }

    /// `POST /v1/subjects/{id}/self-service-links` (purpose `subject_access`).
    pub async fn self_service_link(&self, id: &str) -> Result<SelfServiceLink> {
        let path = format!("/v1/subjects/{}/self-service-links", segment(id));
        self.json(Method::POST, &path, Some("subject_access"), None).await
    }

    /// `POST /v1/self/session`: a link's code for a session token (no token needed).
    pub async fn self_session(&self, code: &str) -> Result<SelfSession> {
        self.json(Method::POST, "/v1/self/session", None, Some(&json!({ "code": code })))
            .await
    }

    /// `DELETE /v1/self/session`: ends the session whose token this client
    /// holds (sign-out); the token is refused from then on.
    pub async fn end_self_session(&self) -> Result<()> {
        self.send(self.request(Method::DELETE, "/v1/self/session", None))
            .await
            .map(|_| ())
    }

    // ----- admin ------------------------------------------------------------------

    /// `POST /v1/admin/tokens`.
    pub async fn issue_token(&self, req: &IssueRequest) -> Result<TokenIssued> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(Method::POST, "/v1/admin/tokens", None, Some(&body)).await
    }

    /// `GET /v1/admin/tokens`.
    pub async fn list_tokens(&self) -> Result<TokenList> {
        self.json(Method::GET, "/v1/admin/tokens", None, None).await
    }

    /// `DELETE /v1/admin/tokens/{id}`: the token as revoked.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenDescription> {
        let path = format!("/v1/admin/tokens/{}", segment(id));
        self.json(Method::DELETE, &path, None, None).await
    }

    /// `GET /v1/admin/events?state=...`.
    pub async fn list_events(&self, state: EventState) -> Result<EventList> {
        let s = match state {
            EventState::Pending => "pending",
            EventState::Dead => "dead",
            EventState::All => "all",
        };
        self.json(Method::GET, &format!("/v1/admin/events?state={s}"), None, None)
            .await
    }

    /// `POST /v1/admin/events/{id}/retry`.
    pub async fn retry_event(&self, id: &str) -> Result<EventRetry> {
        let path = format!("/v1/admin/events/{}/retry", segment(id));
        self.json(Method::POST, &path, None, None).await
    }

    /// `POST /v1/admin/rotate-kek`.
    pub async fn rotate_kek(&self) -> Result<Rotation> {
        self.json(Method::POST, "/v1/admin/rotate-kek", None, None).await
    }

    /// `GET /v1/admin/status`.
    pub async fn status(&self) -> Result<Status> {
        self.json(Method::GET, "/v1/admin/status", None, None).await
    }

    /// `GET /v1/admin/backup`: the snapshot, streamed.
    pub async fn backup(&self) -> Result<reqwest::Response> {
        self.send(self.request(Method::GET, "/v1/admin/backup", None)).await
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let r = self.send(self.request(Method::GET, "/metrics", None)).await?;
        r.text().await.map_err(|e| ClientError::Decode(e.to_string()))
    }

    // ----- public -----------------------------------------------------------------

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Value> {
        self.json(Method::GET, "/v1/health", None, None).await
    }

    /// `GET /v1/receipts/public-key`.
    pub async fn receipt_public_key(&self) -> Result<PublicKey> {
        self.json(Method::GET, "/v1/receipts/public-key", None, None).await
    }

    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<Value> {
        self.json(Method::GET, "/v1/openapi.json", None, None).await
    }

    // ----- the one way a call is made ---------------------------------------------

    fn request(&self, method: Method, path: &str, purpose: Option<&str>) -> reqwest::RequestBuilder {
        let mut rq = self.http.request(method, format!("{}{path}", self.base));
        if !self.token.is_empty() {
            rq = rq.bearer_auth(self.token.as_str());
        }
        if let Some(p) = purpose {
            rq = rq.header("X-Purpose", p);
        }
        rq
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        purpose: Option<&str>,
        body: Option<&Value>,
    ) -> Result<T> {
        let mut rq = self.request(method, path, purpose);
        if let Some(b) = body {
            rq = rq.json(b);
        }
        decode(self.send(rq).await?).await
    }

    /// Sends; a non-2xx answer becomes `ClientError::Problem`.
    async fn send(&self, rq: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let r = rq.send().await.map_err(|e| ClientError::Transport {
            base: self.base.clone(),
            cause: with_causes(&e),
        })?;
        if r.status().is_success() {
            return Ok(r);
        }
        Err(problem(r).await)
    }
}

async fn decode<T: DeserializeOwned>(r: reqwest::Response) -> Result<T> {
    let bytes = Zeroizing::new(
        r.bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?
            .to_vec(),
    );
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

async fn problem(r: reqwest::Response) -> ClientError {
    let status = r.status();
    let request_id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let code = v["code"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| fallback_code(status));
    ClientError::Problem {
        status: status.as_u16(),
        code,
        detail: v["detail"].as_str().unwrap_or("").to_owned(),
        request_id,
        problem: v,
    }
}

/// A code for an answer without a problem body (a proxy's error page).
fn fallback_code(status: StatusCode) -> String {
    format!("http_{}", status.as_u16())
}

/// One path segment: unreserved characters as they are, the rest escaped.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error with the chain of its causes: reqwest's own message ("error
/// sending request") hides why, such as an unknown issuer or a name mismatch.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
