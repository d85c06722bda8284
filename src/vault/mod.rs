//! The vault core: every operation on subject data, token and key, with the
//! policy decision and the audit record around it. Knows nothing of HTTP; the
//! HTTP adapter and the CLI both call it.
//!
//! Request path: token -> decision -> load subject -> audit (durable) ->
//! unwrap data key -> open fields -> release transform -> answer -> wipe.
//! Write path: decision -> checks -> audit -> new data key (key store, flushed)
//! -> sealed fields (data store, flushed) -> old key version removed.
//!
//! This file holds the types, opening, the decision and audit plumbing and the
//! key/field helpers; `subjects` (create, read, edit, lookup, access log),
//! `consents`, `erasure` (shred, retention, ledger replay, restore) and `admin`
//! (tokens, grants, rotation, backup) and `selfservice` (links and sessions
//! of the subject's own page) add the operations.

use crate::audit::{AuditLog, Draft};
use crate::config::Config;
use crate::crypto::{Aead256, DataKey, Plaintext};
use crate::error::{Result, VaultError};
use crate::events::{EventType, NewEvent};
use crate::fields::{normalize, FieldType};
use crate::fsutil::{now_secs, rfc3339};
use crate::keyring::Keyring;
use crate::ledger::{Kind as LedgerKind, Ledger, LedgerEntry};
use crate::metrics::{DecisionLabels, Metrics};
use crate::policy::{Action, Allowed, Capability, FieldsAsked, GrantScope, Request, SubjectState};
use crate::release::{release, ReleaseForm};
use crate::storage::{Commit, KeyStore, Space, Store, SubjectRecord, WrappedKey};
use crate::tokens::{new_token_id, Authenticated, NewToken, TokenRecord, TokenSecret, Tokens};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use zeroize::Zeroize;

/// Who is calling and how, as far as the core cares.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub request_id: String,
    pub purpose: Option<String>,
    pub justification: Option<String>,
    /// Subject DN of the client certificate, when mTLS is on.
    pub cert_subject: Option<String>,
}

/// Released field values. Wiped when dropped.
pub struct Released {
    pub id: String,
    pub version: u64,
    pub fields: Vec<(String, ReleasedValue)>,
}

/// One released field.
pub enum ReleasedValue {
    /// Released as stored (form `plain`): the field's normalised JSON, as
    /// it was sealed, passed on without being parsed again.
    Stored(Plaintext),
    /// What the purpose's form made of it (masked, pseudonym, generalised).
    Formed(Value),
}

impl Drop for Released {
    fn drop(&mut self) {
        for (_, v) in self.fields.iter_mut() {
            if let ReleasedValue::Formed(v) = v {
                wipe_value(v);
            }
        }
    }
}

/// Overwrites every string inside a JSON value.
pub fn wipe_value(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe_value),
        Value::Object(m) => m.values_mut().for_each(wipe_value),
        _ => {}
    }
}

/// The answer to a batch item: its own status and body or problem.
pub enum BatchItem {
    Ok(Released),
    Created { id: String, version: u64 },
    Err { id: Option<String>, error: VaultError },
}

/// A signed erasure receipt.
#[derive(Debug, Clone)]
pub struct Erasure {
    pub receipt: Value,
    pub signature: String,
}

impl Erasure {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.receipt["id"],
            "erased_at": self.receipt["erased_at"],
            "receipt": self.receipt,
            "signature": self.signature,
        })
    }
}

pub struct IssueRequest {
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<String>,
    pub ttl_seconds: u64,
    pub cert_subject: Option<String>,
}

pub struct GrantRequest {
    pub subjects: Vec<String>,
    pub purpose: Option<String>,
    pub fields: Option<Vec<String>>,
    pub ttl_seconds: u64,
    pub max_uses: Option<u64>,
    pub caller: String,
    pub cert_subject: Option<String>,
}

const STRIPES: usize = 256;
/// Longest token lifetime an admin may issue (5 years).
const MAX_TOKEN_TTL: u64 = 5 * 365 * 86400;
pub const MAX_BATCH: usize = 1000;

pub struct Vault {
    pub cfg: Config,
    keyring: Keyring,
    keystore: KeyStore,
    store: Store,
    audit: AuditLog,
    ledger: Ledger,
    tokens: Tokens,
    /// Authenticates stored consents (tokens authenticate their own records).
    records: crate::crypto::RecordMac,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Writers share it; a backup takes it alone, so its snapshot is consistent.
    gate: tokio::sync::RwLock<()>,
    rotation: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    /// Bumped after each durable commit that recorded events: wakes the sender.
    events_wake: tokio::sync::watch::Sender<u64>,
    /// This process, among the nodes of a shared store (`nodes`).
    node_id: String,
    /// The serial of the key epochs this node last announced (`nodes`).
    announced_serial: std::sync::atomic::AtomicU64,
}

fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| 4 + p.len()).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Associated data of a wrapped data key: subject, key version and epoch.
pub fn dek_aad(id: &str, version: u64, epoch: u32) -> Vec<u8> {
    frame(&[
        b"pdvault/dek/v1",
        id.as_bytes(),
        &version.to_be_bytes(),
        &epoch.to_be_bytes(),
    ])
}

/// Associated data of a field ciphertext: subject, field and key version.
pub fn field_aad(id: &str, field: &str, version: u64) -> Vec<u8> {
    frame(&[
        b"pdvault/field/v1",
        id.as_bytes(),
        field.as_bytes(),
        &version.to_be_bytes(),
    ])
}

/// Subject ids are canonical lower-case UUIDs; anything else cannot exist.
pub fn valid_subject_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

fn activity_key(at: u64, id: &str) -> Vec<u8> {
    let mut k = at.to_be_bytes().to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn consent_prefix(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k
}

/// A normalised field value, as canonical JSON bytes, wiped on drop.
type Normalized = Vec<(String, Plaintext)>;

mod admin;
mod consents;
mod erasure;
mod nodes;
mod selfservice;
mod subjects;

pub use admin::{cert_matches, Status, StatusCheckpoint, StatusHead};
pub use consents::{ConsentRecord, ConsentState, Consents};
pub use erasure::{replay_ledger, restore};
use nodes::keyring_error;
pub use nodes::{HEARTBEAT, LIVE_WINDOW};

impl Vault {
    /// Opens the vault: keys first (a wrong passphrase changes nothing), then
    /// the stores, then the shred ledger is replayed before anything is served.
    pub fn open(cfg: Config, passphrase: &[u8]) -> anyhow_like::Result<Vault> {
        let keyring = Keyring::open(&cfg.keys.dir, passphrase).map_err(|e| e.to_string())?;
        Self::open_with(cfg, keyring)
    }

    /// The keys database's record of the key epochs, where the nodes share
    /// one (for a keyring opened beside this vault, as `passphrase change`
    /// does).
    pub fn shared_epochs(&self) -> Option<Box<dyn crate::keyring::SharedEpochs>> {
        match self.cfg.storage.backend {
            crate::config::Backend::Postgres => Some(Box::new(nodes::EpochsInKeyStore(self.keystore.clone()))),
            crate::config::Backend::Sled => None,
        }
    }

    pub fn open_with(cfg: Config, mut keyring: Keyring) -> anyhow_like::Result<Vault> {
        let (store, keystore) = crate::storage::open(&cfg).map_err(|e| e.to_string())?;
        match cfg.storage.backend {
            crate::config::Backend::Postgres => {
                keyring.share_epochs(Box::new(nodes::EpochsInKeyStore(keystore.clone())))
            }
            crate::config::Backend::Sled => keyring.check_epochs_here(),
        }
        .map_err(|e| e.to_string())?;
        let (ledger, entries) = crate::ledger::open(&cfg, &keystore, LedgerKind::Shred).map_err(|e| e.to_string())?;
        replay_ledger(&store, &keystore, &entries, &cfg.events).map_err(|e| e.to_string())?;
        let node_id = nodes::node_id(&cfg.data_dir).map_err(|e| e.to_string())?;
        // On a shared store the nodes' chains index apart, by node id.
        let chain = if store.is_shared() { node_id.as_str() } else { "" };
        let place = crate::audit::Place::with(&cfg, &store, &keystore);
        let audit = AuditLog::open(&place, &store, cfg.audit.fsync, chain).map_err(|e| e.to_string())?;
        let (revocations, revoked) =
            crate::ledger::open(&cfg, &keystore, LedgerKind::Revocation).map_err(|e| e.to_string())?;
        let tokens = Tokens::new(keyring.token_key(), keyring.record_mac_key(), revocations, revoked);
        let tokens = match cfg.storage.backend {
            crate::config::Backend::Sled => tokens,
            crate::config::Backend::Postgres => tokens.on_shared_store(),
        };
        let records = crate::crypto::RecordMac::new(
            crate::crypto::SecretKey::from_bytes(keyring.record_mac_key().expose_secret()).expect("32 bytes"),
        );
        let replayed = tokens
            .replay_revocations(&store, |c, rec| match grant_revoked_event(rec) {
                Some(ev) => crate::events::stage(&store, &cfg.events, c, ev).map(|_| ()),
                None => Ok(()),
            })
            .map_err(|e| e.to_string())?;
        if replayed > 0 {
            store.flusher.sync_blocking().map_err(|e| e.to_string())?;
        }
        Ok(Vault {
            cfg,
            keyring,
            keystore,
            store,
            audit,
            ledger,
            records,
            tokens,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            gate: tokio::sync::RwLock::new(()),
            rotation: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            events_wake: tokio::sync::watch::channel(0).0,
            node_id,
            announced_serial: Default::default(),
        })
    }

    /// A receiver that changes whenever events were recorded.
    pub fn event_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_wake.subscribe()
    }

    /// Stages an event into the commit of the change it reports.
    fn stage_event(&self, c: &mut Commit, ev: NewEvent) -> Result<()> {
        crate::events::stage(&self.store, &self.cfg.events, c, ev)
    }

    /// After a commit is durable: wakes the sender if it recorded events.
    fn committed(&self, c: &Commit) {
        if c.has_events {
            self.events_wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn stripe(&self, id: &str) -> &tokio::sync::Mutex<()> {
        let h = crate::crypto::sha256(id.as_bytes());
        &self.stripes[(h[0] as usize) % STRIPES]
    }

    // ----- authentication and decisions -------------------------------------

    /// The operator at the command line, acting on a local data directory.
    pub fn local_operator() -> Authenticated {
        Authenticated {
            record: Arc::new(TokenRecord {
                id: "local".into(),
                caller: "operator-cli".into(),
                purposes: vec!["erasure".into()],
                capabilities: vec![Capability::Admin, Capability::Audit, Capability::Erase],
                created_at: 0,
                expires_at: u64::MAX,
                revoked_at: None,
                cert_subject: None,
                parent: None,
                grant: None,
                hash: String::new(),
            }),
            revoked: false,
            expires_at: u64::MAX,
            uses: 0,
        }
    }

    /// Finds the token behind a bearer text and checks its certificate
    /// binding. Unknown tokens are recorded as refusals, except while the
    /// peer is locked out (`locked`: seconds left): then they are answered
    /// `429` unrecorded. A known token is never refused for the lockout.
    pub async fn authenticate(&self, ctx: &Ctx, bearer: Option<&str>, locked: Option<u64>) -> Result<Authenticated> {
        let found = match bearer {
            Some(t) if !t.is_empty() && t.len() <= 256 => self.tokens.lookup(&self.store, &self.keystore, t)?,
            _ => None,
        };
        let err = match found {
            Some(a) => match &a.record.cert_subject {
                Some(bound) if !cert_matches(bound, ctx.cert_subject.as_deref()) => VaultError::CertificateMismatch,
                _ => return Ok(a),
            },
            None => match locked {
                Some(secs) => return Err(VaultError::RateLimited { retry_after_secs: secs }),
                None => VaultError::TokenInvalid,
            },
        };
        self.record(vec![self.draft(ctx, None, "authenticate", None, vec![], Some(&err))])
            .await?;
        Err(err)
    }

    fn draft(
        &self,
        ctx: &Ctx,
        auth: Option<&Authenticated>,
        action: &str,
        subject: Option<&str>,
        fields: Vec<String>,
        err: Option<&VaultError>,
    ) -> Draft {
        // Caller-chosen text (a path id, field names, the purpose header) is
        // recorded only when it has the shape of an id or a name: a value
        // pasted where an id belongs never reaches the log.
        let name = |s: &str| {
            if s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                s.to_owned()
            } else {
                "(malformed)".to_owned()
            }
        };
        Draft {
            request_id: ctx.request_id.clone(),
            caller: auth.map(|a| a.record.caller.clone()),
            token_id: auth.map(|a| a.record.id.clone()),
            purpose: ctx.purpose.as_deref().map(name),
            action: action.to_owned(),
            subject: subject.map(|s| {
                if valid_subject_id(s) {
                    s.to_owned()
                } else {
                    "(malformed)".to_owned()
                }
            }),
            fields: fields.iter().map(|f| name(f)).collect(),
            code: err.map(|e| e.code().to_owned()),
            // At most 500 characters are kept (longer ones are refused later).
            justification: ctx.justification.as_ref().map(|j| j.chars().take(500).collect()),
            target_token_id: None,
        }
    }

    /// The draft of a token issue, revocation or grant: names the token concerned.
    fn token_draft(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        action: &str,
        subject: Option<&str>,
        fields: Vec<String>,
        token_id: &str,
    ) -> Draft {
        Draft {
            target_token_id: Some(token_id.to_owned()),
            ..self.draft(ctx, Some(auth), action, subject, fields, None)
        }
    }

    /// Makes entries durable, counting them in the metrics.
    async fn record(&self, drafts: Vec<Draft>) -> Result<()> {
        for d in &drafts {
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    // Only configured purpose names become label values: X-Purpose is
                    // caller text (unescaped quotes would break the exposition, and every
                    // made-up name would be a new series). The audit entry keeps the text.
                    purpose: match d.purpose.as_deref() {
                        Some(p) if self.cfg.policy.purposes.contains_key(p) => p.to_owned(),
                        Some(_) => "(unknown)".to_owned(),
                        None => String::new(),
                    },
                    caller: d.caller.clone().unwrap_or_default(),
                    action: d.action.clone(),
                    outcome: if d.allowed() { "allowed" } else { "refused" }.into(),
                    code: d.code.clone().unwrap_or_default(),
                })
                .inc();
        }
        let t = std::time::Instant::now();
        let r = self.audit.append(drafts).await;
        self.metrics.audit_flush_seconds.observe(t.elapsed().as_secs_f64());
        r.map(|_| ())
    }

    /// Runs the decision; a refusal is recorded before it is returned.
    // The arguments are exactly the decision's inputs plus the audit name.
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        action: Action,
        audit_action: &str,
        subject_id: Option<&str>,
        subject: SubjectState,
        fields: FieldsAsked<'_>,
    ) -> Result<Allowed> {
        let req = Request {
            purpose: ctx.purpose.as_deref(),
            action,
            subject_id,
            subject,
            fields,
            justification: ctx.justification.as_deref(),
            now: now_secs(),
        };
        match self.cfg.policy.decide(&auth.view(), &req) {
            Ok(a) => Ok(a),
            Err(e) => Err(self
                .refuse(ctx, auth, audit_action, subject_id, asked_names(fields), e)
                .await),
        }
    }

    /// Records a refusal and hands the error back (or 503 if it cannot be recorded).
    async fn refuse(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        action: &str,
        subject: Option<&str>,
        fields: Vec<String>,
        e: VaultError,
    ) -> VaultError {
        match self
            .record(vec![self.draft(ctx, Some(auth), action, subject, fields, Some(&e))])
            .await
        {
            Ok(()) => e,
            Err(audit_err) => audit_err,
        }
    }

    /// Takes one use of a limited grant; refused (and recorded) when used up.
    async fn take_use(&self, ctx: &Ctx, auth: &Authenticated, action: &str, subject: Option<&str>) -> Result<()> {
        self.take_uses(ctx, auth, action, subject, 1).await.map(|_| ())
    }

    /// Takes up to `n` uses (a use is one release of one subject) and makes
    /// them durable before anything is released; returns how many it took.
    /// None left is refused (and recorded).
    async fn take_uses(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        action: &str,
        subject: Option<&str>,
        n: u64,
    ) -> Result<u64> {
        let took = self.tokens.take_uses(&self.keystore, auth, n)?;
        if auth.max_uses().is_some() && took > 0 {
            self.keystore.flusher().sync().await?;
        }
        if took == 0 && n > 0 {
            return Err(self
                .refuse(ctx, auth, action, subject, vec![], VaultError::TokenInvalid)
                .await);
        }
        Ok(took)
    }

    fn subject_state(&self, id: &str, purpose: Option<&str>) -> Result<(SubjectState, Option<SubjectRecord>)> {
        if !valid_subject_id(id) {
            return Ok((SubjectState::NotFound, None));
        }
        // A record and its erasure receipt are never both there (the purge
        // swaps one for the other in one commit): the receipt is looked for
        // only when the record is missing, one read fewer on a live subject.
        let Some(bytes) = self.store.get(Space::Subjects, id)? else {
            return Ok((
                match self.store.contains(Space::Erased, id)? {
                    true => SubjectState::Erased,
                    false => SubjectState::NotFound,
                },
                None,
            ));
        };
        let rec = SubjectRecord::decode(&bytes)?;
        let consent = match purpose.and_then(|p| self.cfg.policy.purposes.get(p)) {
            Some(p) if p.needs_consent => self.latest_consent(id, &p.name)?,
            _ => None,
        };
        Ok((SubjectState::Live { consent }, Some(rec)))
    }

    // ----- keys and fields --------------------------------------------------

    fn open_dek(&self, id: &str, version: u64) -> Result<DataKey> {
        let mut w = self.keystore.get(id, version)?.ok_or(VaultError::DataKeyUnavailable)?;
        let mut kek = self.keyring.kek(w.epoch);
        if kek.is_none() {
            // A rotation may have re-wrapped this key and destroyed its old
            // epoch between the two reads: read the key once more.
            w = self.keystore.get(id, version)?.ok_or(VaultError::DataKeyUnavailable)?;
            kek = self.keyring.kek(w.epoch);
        }
        let kek = kek.ok_or(VaultError::DataKeyUnavailable)?;
        let raw = kek
            .open(&w.sealed, &dek_aad(id, version, w.epoch))
            .map_err(|_| VaultError::DataKeyUnavailable)?;
        DataKey::from_bytes(raw.expose()).map_err(|_| VaultError::DataKeyUnavailable)
    }

    /// Opens the stored fields named in `which` (all when `None`).
    fn open_fields(
        &self,
        id: &str,
        rec: &SubjectRecord,
        which: Option<&[(String, ReleaseForm)]>,
    ) -> Result<Normalized> {
        let dek = self.open_dek(id, rec.version)?.aead();
        let mut out = Vec::new();
        for (name, ct) in &rec.fields {
            if which.is_some_and(|w| !w.iter().any(|(n, _)| n == name)) {
                continue;
            }
            let pt = dek
                .open(ct, &field_aad(id, name, rec.version))
                .map_err(|_| VaultError::internal("a field ciphertext does not authenticate"))?;
            out.push((name.clone(), pt));
        }
        Ok(out)
    }

    fn transform(
        &self,
        purpose: &str,
        mut opened: Normalized,
        forms: &[(String, ReleaseForm)],
    ) -> Result<Vec<(String, ReleasedValue)>> {
        let mut out = Vec::with_capacity(forms.len());
        for (name, form) in forms {
            let Some(at) = opened.iter().position(|(n, _)| n == name) else {
                continue;
            };
            if matches!(form, ReleaseForm::Plain) {
                // The stored bytes are the value as released: written by
                // `normalize_fields` as JSON, authenticated on opening.
                let (_, pt) = opened.swap_remove(at);
                out.push((name.clone(), ReleasedValue::Stored(pt)));
                continue;
            }
            let pt = &opened[at].1;
            let mut v: Value =
                serde_json::from_slice(pt.expose()).map_err(|_| VaultError::internal("stored field is not JSON"))?;
            let ty = self.cfg.policy.fields.get(name).copied().unwrap_or(FieldType::Text);
            let released = release(
                *form,
                ty,
                &v,
                self.keyring.pseudonym_key().expose_secret(),
                purpose,
                name,
            );
            wipe_value(&mut v);
            out.push((name.clone(), ReleasedValue::Formed(released)));
        }
        Ok(out)
    }

    fn index_key(&self, field: &str, normalized_json: &[u8]) -> Vec<u8> {
        self.keyring
            .index_mac()
            .parts(&[b"pdvault-index-v1", field.as_bytes(), normalized_json])
            .to_vec()
    }

    fn indexed(&self, field: &str) -> bool {
        matches!(
            self.cfg.policy.fields.get(field),
            Some(FieldType::Email | FieldType::Phone)
        )
    }

    /// Checks and normalises written fields. `null` (removal) passes through
    /// as `None`. Errors name the field and the reason, never the value.
    fn normalize_fields(
        &self,
        fields: &Map<String, Value>,
        allow_null: bool,
    ) -> Result<Vec<(String, Option<Plaintext>)>> {
        let mut out = Vec::with_capacity(fields.len());
        for (name, v) in fields {
            let ty = *self
                .cfg
                .policy
                .fields
                .get(name)
                .ok_or_else(|| VaultError::InvalidField {
                    field: name.clone(),
                    reason: "unknown field".into(),
                })?;
            if v.is_null() {
                if allow_null {
                    out.push((name.clone(), None));
                    continue;
                }
                return Err(VaultError::InvalidField {
                    field: name.clone(),
                    reason: "must not be null".into(),
                });
            }
            let mut n = normalize(ty, v).map_err(|reason| VaultError::InvalidField {
                field: name.clone(),
                reason,
            })?;
            let bytes = serde_json::to_vec(&n).expect("json");
            wipe_value(&mut n);
            out.push((name.clone(), Some(Plaintext::new(bytes))));
        }
        Ok(out)
    }

    /// Seals a subject's fields under a fresh data key. Returns the wrapped
    /// key and the record (with its blind-index keys).
    fn seal_subject(
        &self,
        id: &str,
        version: u64,
        fields: &Normalized,
        created_at: u64,
        now: u64,
    ) -> (WrappedKey, SubjectRecord, Vec<Vec<u8>>) {
        let dek = DataKey::generate();
        let (epoch, kek) = self.keyring.current_kek();
        let wrapped = WrappedKey {
            epoch,
            sealed: kek.seal(dek.expose_secret(), &dek_aad(id, version, epoch)),
        };
        let aead: Aead256 = dek.aead();
        let mut rec = SubjectRecord {
            version,
            created_at,
            updated_at: now,
            fields: Vec::with_capacity(fields.len()),
            index: vec![],
        };
        let mut index = vec![];
        for (name, pt) in fields {
            rec.fields
                .push((name.clone(), aead.seal(pt.expose(), &field_aad(id, name, version))));
            if self.indexed(name) {
                index.push(self.index_key(name, pt.expose()));
            }
        }
        rec.index = index.clone();
        (wrapped, rec, index)
    }

    fn index_entry_key(ix: &[u8], id: &str) -> Vec<u8> {
        let mut k = ix.to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// A write that lost to another node's write of the same subject: the
    /// caller is told the version it now has.
    fn lost_race(
        &self,
        e: VaultError,
        items: &[(String, WrappedKey, SubjectRecord, Option<SubjectRecord>)],
    ) -> VaultError {
        match e {
            VaultError::VersionConflict { .. } => {
                if items
                    .iter()
                    .any(|(id, ..)| self.store.contains(Space::Erased, id).unwrap_or(false))
                {
                    return VaultError::SubjectErased;
                }
                let current = items
                    .iter()
                    .find_map(|(id, ..)| self.store.get(Space::Subjects, id).ok().flatten())
                    .and_then(|b| SubjectRecord::decode(&b).ok())
                    .map_or(0, |r| r.version);
                VaultError::VersionConflict { current }
            }
            e => e,
        }
    }

    /// Stores new subjects (or new versions): keys first, flushed, then data,
    /// flushed. A crash in between leaves an unused key, never unreadable data.
    /// Writes subjects: their keys durable first, then the records, their
    /// indexes and whatever else `c` holds (the events reporting the change)
    /// in one commit.
    async fn store_subjects(
        &self,
        items: Vec<(String, WrappedKey, SubjectRecord, Option<SubjectRecord>)>,
        mut c: Commit,
    ) -> Result<()> {
        // A new version of an existing subject claims its key's slot and
        // expects the record it was made from, and no erasure: so a write
        // racing another node's edit or erasure of the same subject loses
        // whole (409), never leaving a record without its key.
        let mut kc = Commit::default();
        for (id, w, rec, old) in &items {
            KeyStore::stage_put(&mut kc, id, rec.version, w);
            if old.is_some() {
                kc.expect(Space::Wrapped, crate::storage::dek_key(id, rec.version), None);
            }
        }
        // New subjects and nothing else (a create, a batch create): readers
        // need not wait for all of them (README, twelfth pass: a unit of a
        // thousand subjects held every read for 50 ms and more).
        let piecewise = c.is_empty() && items.iter().all(|(.., old)| old.is_none());
        if piecewise {
            kc.set_piecewise();
        }
        for (id, _, _, old) in &items {
            if let Some(old) = old {
                c.expect(Space::Subjects, id, Some(&old.encode()));
                c.expect(Space::Erased, id, None);
            }
        }
        self.keystore
            .store
            .commit(&kc)
            .await
            .map_err(|e| self.lost_race(e, &items))?;
        // One counter reservation for the whole batch (the counter orders
        // duplicate emails/phones: the most recent write wins a lookup).
        let first = self.store.reserve_stamps("index_stamp", items.len() as u64)?;
        for (stamp, (id, _, rec, old)) in (first..).zip(items.iter()) {
            if let Some(old) = old {
                for ix in &old.index {
                    c.remove(Space::Index, Self::index_entry_key(ix, id));
                }
                c.remove(Space::Activity, activity_key(old.updated_at, id));
            }
            for ix in &rec.index {
                c.insert(Space::Index, Self::index_entry_key(ix, id), stamp.to_be_bytes());
            }
            c.insert(Space::Activity, activity_key(rec.updated_at, id), []);
            c.insert(Space::Subjects, id, rec.encode());
        }
        if piecewise {
            c.set_piecewise();
        }
        if let Err(e) = self.store.commit(&c).await {
            if matches!(e, VaultError::VersionConflict { .. }) {
                // Nothing of ours landed: the keys we added open nothing.
                let mut undo = Commit::default();
                for (id, _, rec, _) in &items {
                    undo.remove(Space::Wrapped, crate::storage::dek_key(id, rec.version));
                }
                self.keystore.store.commit(&undo).await?;
            }
            return Err(self.lost_race(e, &items));
        }
        self.committed(&c);
        // The previous version's key is no longer needed: an old value left in
        // the store's files dies with it.
        let mut old_keys = Commit::default();
        for (id, _, _, old) in &items {
            if let Some(old) = old {
                old_keys.remove(Space::Wrapped, crate::storage::dek_key(id, old.version));
            }
        }
        if !old_keys.is_empty() {
            self.keystore.store.commit(&old_keys).await?;
        }
        Ok(())
    }
}

/// What a grant's holder is told when it is revoked; nothing for a
/// self-service session (its holder is the subject's browser) or a token
/// that is not a grant.
fn grant_revoked_event(rec: &TokenRecord) -> Option<NewEvent> {
    let g = rec.grant.as_ref().filter(|g| !g.self_service)?;
    Some(NewEvent {
        kind: EventType::GrantRevoked,
        subject: None,
        data: json!({
            "grant": rec.id,
            "caller": rec.caller,
            "subjects": g.subjects,
            "revoked_at": rec.revoked_at.map(rfc3339),
        }),
        per_subscriber: Default::default(),
        audience: Some(rec.caller.clone()),
        id: Some(crate::events::fixed_event_id(EventType::GrantRevoked, &rec.id)),
    })
}

fn asked_names(f: FieldsAsked<'_>) -> Vec<String> {
    match f {
        FieldsAsked::Named(n) => n.to_vec(),
        FieldsAsked::Default => vec![],
    }
}

/// Error type for opening: a message fit for the operator.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, String>;
}
