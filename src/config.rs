//! Configuration, in layers: built-in defaults, `config/pdvault.toml`, the
//! environment (`PDVAULT_<SECTION>__<KEY>`), then the command line's
//! overrides (`--listen`, `--data-dir`, `--keys-dir`). figment merges the
//! layers; unknown keys are refused in the file and in the environment, each
//! error naming the key (or the variable) it is about.
//!
//! Owns parsing, defaults and validation of every setting, including the
//! field schema and the purposes (turned into a `policy::Policy`). Relative
//! paths are resolved against the working directory.

use crate::events::EventType;
use crate::fields::FieldType;
use crate::policy::{Policy, Purpose};
use crate::release::{form_applies, ReleaseForm};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
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

/// Writes a duration the way the file reads it: `30s`, `10m`, `24h`, `30d`.
pub fn format_duration(d: Duration) -> String {
    let (s, ms) = (d.as_secs(), d.subsec_millis());
    match () {
        _ if ms != 0 || d.subsec_nanos() % 1_000_000 != 0 => format!("{}ms", d.as_millis()),
        _ if s == 0 => "0".into(),
        _ if s % 86400 == 0 => format!("{}d", s / 86400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// A duration is a string (`"30s"`); a bare number counts seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum DurationText {
    Text(String),
    Seconds(u64),
}

/// `#[serde(with = "dur")]`: durations as `30s`-style strings.
mod dur {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match DurationText::deserialize(d)? {
            DurationText::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
            DurationText::Seconds(n) => Ok(Duration::from_secs(n)),
        }
    }
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }
}

/// `#[serde(with = "opt_dur")]`: like `dur`, where absent, `""` or `"off"` is none.
mod opt_dur {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<DurationText>::deserialize(d)? {
            None => Ok(None),
            Some(DurationText::Text(s)) if matches!(s.trim(), "" | "off") => Ok(None),
            Some(DurationText::Text(s)) => parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
            Some(DurationText::Seconds(n)) => Ok(Some(Duration::from_secs(n))),
        }
    }
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Defaults to `<keys dir>/tls-cert.pem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Defaults to `<keys dir>/tls-key.pem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// When set, every client must present a certificate signed by this CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    pub body_limit: usize,
    pub batch_body_limit: usize,
    #[serde(with = "dur")]
    pub handshake_timeout: Duration,
    #[serde(with = "dur")]
    pub shutdown_grace: Duration,
    /// After the handshake, a request's headers must arrive within this.
    #[serde(with = "dur")]
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
    /// Open connections allowed from one address; past it, new ones are closed.
    pub max_connections_per_ip: usize,
    /// The address users' browsers reach the vault at, for self-service
    /// links (`https://host:port`); default: the Host the link was asked at.
    #[serde(skip_serializing_if = "Option::is_none")]
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

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The embedded default: one node, data in `data_dir`.
    #[default]
    Sled,
    /// Several nodes over one PostgreSQL (`url`, `keys_url`).
    Postgres,
}

/// `[storage]`. Its `Debug` leaves the URLs out (they may hold a password).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub data_dir: PathBuf,
    /// PostgreSQL (backend = "postgres"): the data database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PostgreSQL: the keys database (wrapped data keys, epochs, ledgers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_url: Option<String>,
    pub pool_size: usize,
    /// `disable`, `require` or `verify-full` (with `ca_file`).
    pub tls: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// sled (backend = "sled"): the page cache of each of its two stores
    /// (data, and the keys directory's data keys), in MiB.
    pub cache_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Sled,
            data_dir: "data".into(),
            url: None,
            keys_url: None,
            pool_size: 16,
            tls: "require".into(),
            ca_file: None,
            cache_mib: 128,
        }
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("backend", &self.backend)
            .field("data_dir", &self.data_dir)
            .field("url", &self.url.as_ref().map(|_| "(set)"))
            .field("keys_url", &self.keys_url.as_ref().map(|_| "(set)"))
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("cache_mib", &self.cache_mib)
            .finish()
    }
}

fn check_storage(s: &StorageConfig) -> Result<(), ConfigError> {
    if !matches!(s.tls.as_str(), "disable" | "require" | "verify-full") {
        return Err(ConfigError::Invalid(format!(
            "storage.tls: {:?} is none of disable, require, verify-full",
            s.tls
        )));
    }
    crate::storage::check_config(s).map_err(ConfigError::Invalid)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    pub dir: PathBuf,
    /// How long a retired key epoch is kept (so older backups stay restorable).
    #[serde(with = "dur")]
    pub epoch_retention: Duration,
    /// How often the background task rotates the key-encryption key.
    #[serde(with = "dur")]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the head of the audit chain is signed into a checkpoint.
    #[serde(with = "dur")]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Erase subjects with no write for this long; off when absent.
    #[serde(with = "opt_dur")]
    pub inactive_after: Option<Duration>,
    #[serde(with = "dur")]
    pub sweep_every: Duration,
    /// How long a token's record is kept after it expired (listed, as
    /// expired) before the sweep drops it, with its revocation ledger entry.
    // Named without "token": `config show` masks every such key's value.
    #[serde(with = "dur")]
    pub expired_credentials_kept: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            inactive_after: None,
            sweep_every: Duration::from_secs(3600),
            expired_credentials_kept: Duration::from_secs(30 * 86400),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    #[serde(with = "dur")]
    pub max_ttl: Duration,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            max_ttl: Duration::from_secs(7 * 86400),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Unknown tokens a peer may present in a row before it is slowed down.
    pub auth_failures_free: u32,
    /// Unknown tokens in a row after which the peer is refused with 429.
    pub auth_failures_lockout: u32,
    #[serde(with = "dur")]
    pub lockout: Duration,
    /// Extra delay per failure beyond the free ones.
    #[serde(with = "dur")]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Token callers that belong to this subscriber's system: whose releases
    /// mean "this system holds a copy", and whose revoked grants it hears of.
    /// Default: the subscriber's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub subscribers: Vec<SubscriberConfig>,
    /// An event still undelivered this long after it was recorded (or
    /// retried) is marked dead.
    #[serde(with = "dur")]
    pub dead_after: Duration,
    /// First retry delay; doubled on each failure up to `retry_max`, with jitter.
    #[serde(with = "dur")]
    pub retry_min: Duration,
    #[serde(with = "dur")]
    pub retry_max: Duration,
    /// One delivery attempt's limit (connect, TLS, answer).
    #[serde(with = "dur")]
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

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

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
            if !EventType::ALL.iter().any(|k| k.name() == t) {
                return bad(format!(
                    "events.subscribers.{}: unknown event type {t:?} (known: {})",
                    s.name,
                    EventType::ALL.map(EventType::name).join(", ")
                ));
            }
        }
    }
    if e.dead_after.is_zero() || e.retry_min.is_zero() || e.retry_min > e.retry_max || e.timeout.is_zero() {
        return bad("events: dead_after, retry_min, timeout must be set, retry_min <= retry_max".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMeta {
    /// Version of the privacy policy, recorded with every consent change.
    pub version: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDecl {
    #[serde(rename = "type")]
    pub ty: FieldType,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    #[default]
    OptIn,
    OptOut,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeDecl {
    pub clause: String,
    #[serde(default)]
    pub description: String,
    /// Field name to release form.
    #[serde(default)]
    pub fields: BTreeMap<String, ReleaseForm>,
    /// Shorthand: every field of the schema, in this form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    #[serde(default)]
    log: LogConfig,
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
    pub storage: StorageConfig,
    pub keys: KeysConfig,
    pub audit: AuditConfig,
    pub retention: RetentionConfig,
    pub grants: GrantsConfig,
    pub limits: LimitsConfig,
    pub events: EventsConfig,
    pub log: LogConfig,
    pub policy: Policy,
}

/// The environment layer: every `PDVAULT_<SECTION>__<KEY>` variable (the
/// `__` marks it; `PDVAULT_TOKEN`, `PDVAULT_LOG`, ... have none and keep
/// their own meaning). Values stay strings, read as numbers or booleans where
/// the key wants one; a value starting with `[` or `{` is an inline array or
/// table. Errors name the variable.
struct EnvLayer(Vec<(String, String)>);

const ENV_PREFIX: &str = "PDVAULT_";

impl EnvLayer {
    fn from_process() -> EnvLayer {
        EnvLayer(
            std::env::vars()
                .filter(|(k, _)| k.strip_prefix(ENV_PREFIX).is_some_and(|r| r.contains("__")))
                .collect(),
        )
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    let (head, rest) = path.split_first().expect("non-empty path");
    if rest.is_empty() {
        dict.insert(head.clone(), value);
        return;
    }
    let slot = dict.entry(head.clone()).or_insert_with(|| Value::from(Dict::new()));
    if !matches!(slot, Value::Dict(..)) {
        *slot = Value::from(Dict::new());
    }
    if let Value::Dict(_, inner) = slot {
        insert_path(inner, rest, value);
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_, keys| format!("{ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, raw) in &self.0 {
            let rest = &name[ENV_PREFIX.len()..];
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(figment::Error::from(format!("{name}: names no configuration key")));
            }
            let value = if raw.trim_start().starts_with(['[', '{']) {
                raw.parse::<Value>().expect("infallible")
            } else {
                Value::from(raw.clone())
            };
            insert_path(&mut dict, &path, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

impl FileConfig {
    /// Defaults (serde's), then the file, then the environment, then the
    /// command line.
    fn layered(text: &str, env: EnvLayer, ov: &Overrides) -> Result<FileConfig, ConfigError> {
        let parse = |message: String| ConfigError::Parse {
            path: PathBuf::new(),
            message,
        };
        let vars: Vec<String> = env.0.iter().map(|(k, _)| k.clone()).collect();
        let mut file: FileConfig = Figment::new()
            .merge(figment::providers::Data::<figment::providers::Toml>::string(text))
            .merge(env)
            .extract_lossy()
            .map_err(|e| {
                // An error about a key the environment set names the
                // variables that set it (figment names the key's parent
                // when the section itself is unknown).
                let under = format!("{ENV_PREFIX}{}", e.path.join("__").to_ascii_uppercase());
                let from_env = e.metadata.as_ref().is_some_and(|m| m.name == "environment variable");
                let named: Vec<&str> = vars
                    .iter()
                    .filter(|v| from_env && (**v == under || v.starts_with(&format!("{under}__"))))
                    .map(String::as_str)
                    .collect();
                match named.is_empty() {
                    true => parse(e.to_string()),
                    // Not the file's fault: no file path in front of it.
                    false => ConfigError::Invalid(format!("environment: {e} (set by {})", named.join(", "))),
                }
            })?;
        if let Some(l) = &ov.listen {
            file.server.listen = l.clone();
        }
        if let Some(k) = &ov.keys_dir {
            file.keys.dir = k.clone();
        }
        if let Some(d) = &ov.data_dir {
            file.storage.data_dir = d.clone();
        }
        Ok(file)
    }
}

impl Config {
    /// The file at `path`, under the process environment and `ov`.
    pub fn load(path: &Path, ov: &Overrides) -> Result<Config, ConfigError> {
        let file = Self::layers_at(path, ov)?;
        Self::resolve(file).map_err(|e| at_path(e, path))
    }

    /// What `pdvault config show` prints: the effective configuration as
    /// TOML, every layer applied and checked, secrets redacted.
    pub fn show(path: &Path, ov: &Overrides) -> Result<String, ConfigError> {
        let file = Self::layers_at(path, ov)?;
        Self::resolve(file.clone()).map_err(|e| at_path(e, path))?;
        let mut v = toml::Value::try_from(&file).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        redact(&mut v, "");
        toml::to_string(&v).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    fn layers_at(path: &Path, ov: &Overrides) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        FileConfig::layered(&text, EnvLayer::from_process(), ov).map_err(|e| at_path(e, path))
    }

    /// A TOML text and `ov`, without the environment (tests, benches).
    pub fn from_toml(text: &str, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::resolve(FileConfig::layered(text, EnvLayer(vec![]), ov)?)
    }

    fn resolve(file: FileConfig) -> Result<Config, ConfigError> {
        let server = file.server;
        let keys = file.keys;
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
        check_storage(&file.storage)?;
        check_events(&file.events)?;
        let policy = build_policy(file.policy, file.fields, file.purposes)?;
        Ok(Config {
            server,
            data_dir: file.storage.data_dir.clone(),
            storage: file.storage,
            keys,
            audit: file.audit,
            retention: file.retention,
            grants: file.grants,
            limits: file.limits,
            events: file.events,
            log: file.log,
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

fn at_path(e: ConfigError, path: &Path) -> ConfigError {
    match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.to_owned(),
            message,
        },
        other => other,
    }
}

/// Blanks what `config show` must not print: a password inside a URL, and
/// any key named like a secret that holds the secret itself (a `*_file` key
/// holds only a path and stays).
fn redact(v: &mut toml::Value, key: &str) {
    const MASK: &str = "REDACTED";
    match v {
        toml::Value::Table(t) => t.iter_mut().for_each(|(k, v)| redact(v, k)),
        toml::Value::Array(a) => a.iter_mut().for_each(|v| redact(v, key)),
        toml::Value::String(s) => {
            let secretish = ["password", "secret", "token", "passphrase"]
                .iter()
                .any(|w| key.contains(w));
            if secretish && !key.ends_with("_file") {
                *s = MASK.into();
            } else if let Ok(mut u) = reqwest::Url::parse(s) {
                if u.password().is_some() && u.set_password(Some(MASK)).is_ok() {
                    *s = u.to_string();
                }
            }
        }
        _ => {}
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
    fn the_store_cache_is_bounded_in_config() {
        let c = Config::from_toml(SHIPPED, &Overrides::default()).unwrap();
        assert_eq!(c.storage.cache_mib, 128);
        let small = SHIPPED.replace("cache_mib = 128", "cache_mib = 64");
        assert_eq!(
            Config::from_toml(&small, &Overrides::default())
                .unwrap()
                .storage
                .cache_mib,
            64
        );
        let tiny = SHIPPED.replace("cache_mib = 128", "cache_mib = 8");
        let e = Config::from_toml(&tiny, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("storage.cache_mib"), "{e}");
    }

    #[test]
    fn audit_fsync_defaults_on_and_can_be_turned_off() {
        let c = Config::from_toml(SHIPPED, &Overrides::default()).unwrap();
        assert!(c.audit.fsync);
        let off = SHIPPED.replace("fsync = true", "fsync = false");
        assert_ne!(off, SHIPPED);
        assert!(!Config::from_toml(&off, &Overrides::default()).unwrap().audit.fsync);
    }

    fn env(vars: &[(&str, &str)]) -> EnvLayer {
        EnvLayer(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn with_env(vars: &[(&str, &str)], ov: &Overrides) -> Result<Config, ConfigError> {
        Config::resolve(FileConfig::layered(SHIPPED, env(vars), ov)?)
    }

    #[test]
    fn the_environment_sits_between_the_file_and_the_command_line() {
        let c = with_env(
            &[
                ("PDVAULT_SERVER__LISTEN", "127.0.0.1:9999"),
                ("PDVAULT_SERVER__BODY_LIMIT", "1000"),
                ("PDVAULT_AUDIT__FSYNC", "false"),
                ("PDVAULT_KEYS__ROTATE_EVERY", "12h"),
                ("PDVAULT_POLICY__VERSION", "2"),
                ("PDVAULT_PURPOSES__DELIVERY__CLAUSE", "4.3.2-bis"),
            ],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert_eq!(c.server.body_limit, 1000);
        assert!(!c.audit.fsync);
        assert_eq!(c.keys.rotate_every, Duration::from_secs(12 * 3600));
        assert_eq!(c.policy.version, "2");
        assert_eq!(c.policy.purposes["delivery"].clause, "4.3.2-bis");
        // The rest of the purpose still comes from the file.
        assert!(!c.policy.purposes["delivery"].fields.is_empty());
        let ov = Overrides {
            listen: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let c = with_env(&[("PDVAULT_SERVER__LISTEN", "127.0.0.1:9999")], &ov).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:1");
    }

    #[test]
    fn an_unknown_variable_is_refused_by_its_name() {
        for var in [
            "PDVAULT_SERVER__LISTN",
            "PDVAULT_NOSUCH__KEY",
            "PDVAULT_SERVER__LISTEN__X",
        ] {
            let e = with_env(&[(var, "1")], &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains(var), "{var}: {e}");
        }
        let e = with_env(&[("PDVAULT_SERVER__BODY_LIMIT", "lots")], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("PDVAULT_SERVER__BODY_LIMIT"), "{e}");
        // Variables without `__` are not configuration keys.
        let only = EnvLayer(vec![]);
        assert!(only.0.is_empty());
    }

    #[test]
    fn an_unknown_file_key_is_refused_by_its_name() {
        let bad = SHIPPED.replace("[server]\n", "[server]\nlistn = \"x\"\n");
        assert_ne!(bad, SHIPPED);
        let e = Config::from_toml(&bad, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
    }

    #[test]
    fn show_prints_what_runs_and_redacts_secrets() {
        let file = FileConfig::layered(
            SHIPPED,
            env(&[
                ("PDVAULT_SERVER__LISTEN", "127.0.0.1:7777"),
                ("PDVAULT_STORAGE__URL", "postgresql://pdvault:hunter2@db:5432/pdvault"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        let mut v = toml::Value::try_from(&file).unwrap();
        redact(&mut v, "");
        let text = toml::to_string(&v).unwrap();
        assert!(text.contains("listen = \"127.0.0.1:7777\""), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("REDACTED@db"), "{text}");
        assert!(text.contains("rotate_every = \"1d\""), "{text}");
        // A duration is shown, not masked (its key names no secret).
        assert!(text.contains("expired_credentials_kept = \"30d\""), "{text}");
        // What it prints reads back as the same configuration.
        let again = Config::from_toml(&text, &Overrides::default()).unwrap();
        assert_eq!(again.server.listen, "127.0.0.1:7777");
        assert_eq!(again.policy.purposes.len(), 12);
    }

    #[test]
    fn postgres_settings_are_checked_at_start() {
        let pg = |extra: &[(&str, &str)]| {
            let mut vars = vec![
                ("PDVAULT_STORAGE__BACKEND", "postgres"),
                (
                    "PDVAULT_STORAGE__URL",
                    "postgresql://pdvault:hunter2@db.internal/pdvault",
                ),
                (
                    "PDVAULT_STORAGE__KEYS_URL",
                    "postgresql://pdvault:hunter2@db.internal/pdvault_keys",
                ),
            ];
            vars.extend_from_slice(extra);
            with_env(&vars, &Overrides::default())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        pg(&[]).unwrap();
        let e = pg(&[(
            "PDVAULT_STORAGE__KEYS_URL",
            "postgresql://pdvault:hunter2@db.internal/pdvault",
        )])
        .unwrap_err();
        assert!(e.contains("same database"), "{e}");
        let e = pg(&[("PDVAULT_STORAGE__TLS", "disable")]).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let e = pg(&[("PDVAULT_STORAGE__TLS", "verify-full")]).unwrap_err();
        assert!(e.contains("ca_file"), "{e}");
        let e = pg(&[("PDVAULT_STORAGE__URL", "mysql://x")]).unwrap_err();
        assert!(e.contains("storage.url") && !e.contains("hunter2"), "{e}");
        let e = with_env(&[("PDVAULT_STORAGE__BACKEND", "postgres")], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("storage.keys_url"), "{e}");
        let local = [
            ("PDVAULT_STORAGE__URL", "postgresql://pdvault@127.0.0.1:5433/a"),
            ("PDVAULT_STORAGE__KEYS_URL", "postgresql://pdvault@localhost:5433/b"),
            ("PDVAULT_STORAGE__TLS", "disable"),
        ];
        pg(&local).unwrap();
        let e = with_env(&[("PDVAULT_STORAGE__TLS", "maybe")], &Overrides::default());
        assert!(e.unwrap_err().to_string().contains("storage.tls"));
        with_env(&[("PDVAULT_STORAGE__BACKEND", "sled")], &Overrides::default()).unwrap();
        let c = with_env(
            &[("PDVAULT_STORAGE__URL", "postgresql://u:hunter2@h/d")],
            &Overrides::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
        for d in ["30s", "10m", "24h", "30d", "0", "1500ms", "90s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d.replace("24h", "1d"));
        }
    }
}
