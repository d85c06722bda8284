//! Configuration: `config/pdvault.toml` read with unknown keys refused, then
//! the command line's overrides (`--listen`, `--data-dir`, `--keys-dir`).
//!
//! Owns parsing, defaults and validation of every setting, including the
//! field schema and the purposes (turned into a `policy::Policy`). Relative
//! paths are resolved against the working directory.

use crate::fields::FieldType;
use crate::policy::{Policy, Purpose};
use crate::release::{form_applies, ReleaseForm};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// Parses `30s`, `10m`, `24h`, `30d`, `0` (and anything humantime reads).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    match s.as_deref().map(str::trim) {
        None | Some("off") | Some("") => Ok(None),
        Some(s) => parse_duration(s).map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Defaults to `<keys dir>/tls-cert.pem`.
    pub tls_cert: Option<PathBuf>,
    /// Defaults to `<keys dir>/tls-key.pem`.
    pub tls_key: Option<PathBuf>,
    /// When set, every client must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
    pub body_limit: usize,
    pub batch_body_limit: usize,
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// After the handshake, a request's headers must arrive within this.
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Open connections allowed from one address; past it, new ones are closed.
    pub max_connections_per_ip: usize,
    /// The address users' browsers reach the vault at, for self-service
    /// links (`https://host:port`); default: the Host the link was asked at.
    pub public_url: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8443".into(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            body_limit: 64 * 1024,
            batch_body_limit: 4 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_ip: 256,
            public_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: "data".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    pub dir: PathBuf,
    /// How long a retired key epoch is kept (so older backups stay restorable).
    #[serde(deserialize_with = "de_duration")]
    pub epoch_retention: Duration,
    /// How often the background task rotates the key-encryption key.
    #[serde(deserialize_with = "de_duration")]
    pub rotate_every: Duration,
    /// Argon2id memory cost in KiB (at least RFC 9106's 64 MiB).
    pub argon2_m_kib: u32,
    pub argon2_t: u32,
    pub argon2_p: u32,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            dir: "keys".into(),
            epoch_retention: Duration::from_secs(30 * 86400),
            rotate_every: Duration::from_secs(86400),
            argon2_m_kib: 64 * 1024,
            argon2_t: 3,
            argon2_p: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the head of the audit chain is signed into a checkpoint.
    #[serde(deserialize_with = "de_duration")]
    pub checkpoint_every: Duration,
    /// Make every audit append durable (fdatasync, group-committed) before the
    /// response. `false` is for benchmarks only: entries are still written but
    /// may be lost in a crash, which API.md does not allow in production.
    pub fsync: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_every: Duration::from_secs(300),
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Erase subjects with no write for this long; off when absent.
    #[serde(deserialize_with = "de_opt_duration")]
    pub inactive_after: Option<Duration>,
    #[serde(deserialize_with = "de_duration")]
    pub sweep_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            inactive_after: None,
            sweep_every: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    #[serde(deserialize_with = "de_duration")]
    pub max_ttl: Duration,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            max_ttl: Duration::from_secs(7 * 86400),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Unknown tokens a peer may present in a row before it is slowed down.
    pub auth_failures_free: u32,
    /// Unknown tokens in a row after which the peer is refused with 429.
    pub auth_failures_lockout: u32,
    #[serde(deserialize_with = "de_duration")]
    pub lockout: Duration,
    /// Extra delay per failure beyond the free ones.
    #[serde(deserialize_with = "de_duration")]
    pub slowdown_step: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            auth_failures_free: 5,
            auth_failures_lockout: 20,
            lockout: Duration::from_secs(60),
            slowdown_step: Duration::from_millis(25),
        }
    }
}

/// One system told of erasures, corrections and consent changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    pub name: String,
    /// HTTPS only.
    pub url: String,
    /// The Standard Webhooks signing secret (`whsec_` + base64), read at start.
    pub secret_file: PathBuf,
    /// Event types this subscriber receives.
    pub events: Vec<String>,
    /// Trust anchors for this subscriber's certificate; else the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Token callers that belong to this subscriber's system: whose releases
    /// mean "this system holds a copy", and whose revoked grants it hears of.
    /// Default: the subscriber's name.
    #[serde(default)]
    pub callers: Option<Vec<String>>,
}

impl SubscriberConfig {
    pub fn callers(&self) -> Vec<String> {
        self.callers.clone().unwrap_or_else(|| vec![self.name.clone()])
    }
    pub fn wants(&self, event_type: &str) -> bool {
        self.events.iter().any(|e| e == event_type)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub subscribers: Vec<SubscriberConfig>,
    /// An event still undelivered this long after it was recorded (or
    /// retried) is marked dead.
    #[serde(deserialize_with = "de_duration")]
    pub dead_after: Duration,
    /// First retry delay; doubled on each failure up to `retry_max`, with jitter.
    #[serde(deserialize_with = "de_duration")]
    pub retry_min: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub retry_max: Duration,
    /// One delivery attempt's limit (connect, TLS, answer).
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            subscribers: vec![],
            dead_after: Duration::from_secs(3 * 86400),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The event types a subscriber may ask for.
pub const EVENT_TYPES: &[&str] = &[
    "subject.erased",
    "subject.rectified",
    "consent.changed",
    "grant.revoked",
];

fn check_events(e: &EventsConfig) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    let mut seen = std::collections::BTreeSet::new();
    for s in &e.subscribers {
        if !valid_name(&s.name.replace('-', "_")) || !seen.insert(s.name.as_str()) {
            return bad(format!(
                "events.subscribers: name {:?} must be unique and [a-z0-9_-]",
                s.name
            ));
        }
        match reqwest::Url::parse(&s.url) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
            Ok(_) => return bad(format!("events.subscribers.{}: url must be https://", s.name)),
            Err(err) => return bad(format!("events.subscribers.{}: url: {err}", s.name)),
        }
        if s.events.is_empty() {
            return bad(format!("events.subscribers.{}: events is empty", s.name));
        }
        for t in &s.events {
            if !EVENT_TYPES.contains(&t.as_str()) {
                return bad(format!(
                    "events.subscribers.{}: unknown event type {t:?} (known: {})",
                    s.name,
                    EVENT_TYPES.join(", ")
                ));
            }
        }
    }
    if e.dead_after.is_zero() || e.retry_min.is_zero() || e.retry_min > e.retry_max || e.timeout.is_zero() {
        return bad("events: dead_after, retry_min, timeout must be set, retry_min <= retry_max".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMeta {
    /// Version of the privacy policy, recorded with every consent change.
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDecl {
    #[serde(rename = "type")]
    pub ty: FieldType,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    #[default]
    OptIn,
    OptOut,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeDecl {
    pub clause: String,
    #[serde(default)]
    pub description: String,
    /// Field name to release form.
    #[serde(default)]
    pub fields: BTreeMap<String, ReleaseForm>,
    /// Shorthand: every field of the schema, in this form.
    #[serde(default)]
    pub all_fields: Option<ReleaseForm>,
    #[serde(default)]
    pub write: bool,
    #[serde(default)]
    pub erase: bool,
    #[serde(default)]
    pub needs_consent: bool,
    #[serde(default)]
    pub consent_default: ConsentDefault,
    #[serde(default)]
    pub needs_justification: bool,
    /// The subject's own access log may be read under this purpose.
    #[serde(default)]
    pub access_log: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    storage: StorageConfig,
    #[serde(default)]
    keys: KeysConfig,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    retention: RetentionConfig,
    #[serde(default)]
    grants: GrantsConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    events: EventsConfig,
    policy: PolicyMeta,
    fields: BTreeMap<String, FieldDecl>,
    purposes: BTreeMap<String, PurposeDecl>,
}

/// Command-line overrides of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub keys_dir: Option<PathBuf>,
}

/// The resolved configuration the vault runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub data_dir: PathBuf,
    pub keys: KeysConfig,
    pub audit: AuditConfig,
    pub retention: RetentionConfig,
    pub grants: GrantsConfig,
    pub limits: LimitsConfig,
    pub events: EventsConfig,
    pub policy: Policy,
}

impl Config {
    pub fn load(path: &Path, ov: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, ov).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str, ov: &Overrides) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        let mut server = file.server;
        if let Some(l) = &ov.listen {
            server.listen = l.clone();
        }
        let mut keys = file.keys;
        if let Some(k) = &ov.keys_dir {
            keys.dir = k.clone();
        }
        let data_dir = ov.data_dir.clone().unwrap_or(file.storage.data_dir);
        if keys.argon2_m_kib < 64 * 1024 || keys.argon2_t < 3 || keys.argon2_p < 1 {
            return Err(ConfigError::Invalid(
                "keys.argon2_*: below RFC 9106's second recommendation (m = 64 MiB, t = 3)".into(),
            ));
        }
        if keys.rotate_every.is_zero() {
            return Err(ConfigError::Invalid(
                "keys.rotate_every must be set: it bounds when an erasure becomes final".into(),
            ));
        }
        if server.body_limit == 0 || server.batch_body_limit < server.body_limit {
            return Err(ConfigError::Invalid("server body limits are inconsistent".into()));
        }
        check_events(&file.events)?;
        let policy = build_policy(file.policy, file.fields, file.purposes)?;
        Ok(Config {
            server,
            data_dir,
            keys,
            audit: file.audit,
            retention: file.retention,
            grants: file.grants,
            limits: file.limits,
            events: file.events,
            policy,
        })
    }

    pub fn tls_cert_path(&self) -> PathBuf {
        self.server
            .tls_cert
            .clone()
            .unwrap_or_else(|| self.keys.dir.join("tls-cert.pem"))
    }
    pub fn tls_key_path(&self) -> PathBuf {
        self.server
            .tls_key
            .clone()
            .unwrap_or_else(|| self.keys.dir.join("tls-key.pem"))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn build_policy(
    meta: PolicyMeta,
    fields: BTreeMap<String, FieldDecl>,
    purposes: BTreeMap<String, PurposeDecl>,
) -> Result<Policy, ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    if fields.is_empty() {
        return bad("no fields declared".into());
    }
    let schema: BTreeMap<String, FieldType> = fields.into_iter().map(|(k, v)| (k, v.ty)).collect();
    for name in schema.keys() {
        if !valid_name(name) {
            return bad(format!("field name {name:?} must be [a-z0-9_]"));
        }
    }
    let mut out = BTreeMap::new();
    for (name, d) in purposes {
        if !valid_name(&name) {
            return bad(format!("purpose name {name:?} must be [a-z0-9_]"));
        }
        let mut covered = d.fields.clone();
        if let Some(form) = d.all_fields {
            for f in schema.keys() {
                covered.entry(f.clone()).or_insert(form);
            }
        }
        for (f, form) in &covered {
            let Some(ty) = schema.get(f) else {
                return bad(format!("purpose {name}: unknown field {f}"));
            };
            if !form_applies(*form, *ty) {
                return bad(format!(
                    "purpose {name}: release form {form:?} does not apply to field {f}"
                ));
            }
        }
        if d.write && covered.values().any(|f| *f != ReleaseForm::Plain) {
            return bad(format!(
                "purpose {name}: a writing purpose must cover its fields plainly"
            ));
        }
        out.insert(
            name.clone(),
            Purpose {
                name,
                clause: d.clause,
                description: d.description,
                fields: covered,
                write: d.write,
                erase: d.erase,
                needs_consent: d.needs_consent,
                consent_by_default: d.consent_default == ConsentDefault::OptOut,
                needs_justification: d.needs_justification,
                access_log: d.access_log,
            },
        );
    }
    Ok(Policy {
        version: meta.version,
        fields: schema,
        purposes: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SHIPPED: &str = include_str!("../config/pdvault.toml");

    #[test]
    fn shipped_config_parses_with_the_twelve_purposes() {
        let c = Config::from_toml(SHIPPED, &Overrides::default()).unwrap();
        let names: Vec<_> = c.policy.purposes.keys().cloned().collect();
        assert_eq!(
            names,
            [
                "delivery",
                "erasure",
                "legal_request",
                "marketing",
                "notifications",
                "order",
                "payment",
                "personalization",
                "service_improvement",
                "statistics",
                "subject_access",
                "support"
            ]
        );
        assert_eq!(c.policy.fields.len(), 6);
        assert_eq!(c.server.listen, "127.0.0.1:8443");
    }

    #[test]
    fn overrides_win() {
        let ov = Overrides {
            listen: Some("127.0.0.1:1".into()),
            data_dir: Some("/tmp/d".into()),
            keys_dir: Some("/tmp/k".into()),
        };
        let c = Config::from_toml(SHIPPED, &ov).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:1");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(c.tls_cert_path(), PathBuf::from("/tmp/k/tls-cert.pem"));
    }

    #[test]
    fn unknown_keys_and_weak_kdf_are_refused() {
        let bad = format!("{SHIPPED}\n[nonsense]\nx = 1\n");
        assert!(Config::from_toml(&bad, &Overrides::default()).is_err());
        let weak = SHIPPED.replace("argon2_m_kib = 65536", "argon2_m_kib = 1024");
        assert!(Config::from_toml(&weak, &Overrides::default()).is_err());
    }

    #[test]
    fn audit_fsync_defaults_on_and_can_be_turned_off() {
        let c = Config::from_toml(SHIPPED, &Overrides::default()).unwrap();
        assert!(c.audit.fsync);
        let off = SHIPPED.replace("fsync = true", "fsync = false");
        assert_ne!(off, SHIPPED);
        assert!(!Config::from_toml(&off, &Overrides::default()).unwrap().audit.fsync);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
    }
}
