//! The vault core: every operation on subject data, token and key, with the
//! policy decision and the audit record around it. Knows nothing of HTTP; the
//! HTTP adapter and the CLI both call it.
//!
//! Request path: token -> decision -> load subject -> audit (durable) ->
//! unwrap data key -> open fields -> release transform -> answer -> wipe.
//! Write path: decision -> checks -> audit -> new data key (key store, flushed)
//! -> sealed fields (data store, flushed) -> old key version removed.

use crate::audit::{AuditLog, Draft};
use crate::config::Config;
use crate::crypto::{hmac_parts, Aead256, DataKey, Plaintext};
use crate::error::{Result, VaultError};
use crate::fields::{normalize, FieldType};
use crate::fsutil::{now_secs, rfc3339};
use crate::keyring::Keyring;
use crate::ledger::{Ledger, LedgerEntry};
use crate::metrics::{DecisionLabels, Metrics};
use crate::policy::{Action, Allowed, Capability, FieldsAsked, GrantScope, Request, SubjectState};
use crate::release::{release, ReleaseForm};
use crate::storage::{dek_key, parse_dek_key, KeyStore, Store, SubjectRecord, WrappedKey};
use crate::tokens::{Authenticated, NewToken, TokenRecord, TokenSecret, Tokens};
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
    pub fields: Vec<(String, Value)>,
}

impl Drop for Released {
    fn drop(&mut self) {
        for (_, v) in self.fields.iter_mut() {
            wipe_value(v);
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
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Writers share it; a backup takes it alone, so its snapshot is consistent.
    gate: tokio::sync::RwLock<()>,
    rotation: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
}

fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
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

impl Vault {
    /// Opens the vault: keys first (a wrong passphrase changes nothing), then
    /// the stores, then the shred ledger is replayed before anything is served.
    pub fn open(cfg: Config, passphrase: &[u8]) -> anyhow_like::Result<Vault> {
        let keyring = Keyring::open(&cfg.keys.dir, passphrase).map_err(|e| e.to_string())?;
        Self::open_with(cfg, keyring)
    }

    pub fn open_with(cfg: Config, keyring: Keyring) -> anyhow_like::Result<Vault> {
        let store = Store::open(&cfg.data_dir).map_err(|e| e.to_string())?;
        let keystore = KeyStore::open(&cfg.keys.dir).map_err(|e| e.to_string())?;
        let (ledger, entries) = Ledger::open(&cfg.keys.dir).map_err(|e| e.to_string())?;
        replay_ledger(&store, &keystore, &entries).map_err(|e| e.to_string())?;
        let audit = AuditLog::open(&cfg.data_dir, store.access.clone(), &store.meta, cfg.audit.fsync)
            .map_err(|e| e.to_string())?;
        let tokens = Tokens::new(keyring.token_key());
        Ok(Vault {
            cfg,
            keyring,
            keystore,
            store,
            audit,
            ledger,
            tokens,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            gate: tokio::sync::RwLock::new(()),
            rotation: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
        })
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
            }),
            revoked: false,
            expires_at: u64::MAX,
            uses: 0,
        }
    }

    /// Finds the token behind a bearer text and checks its certificate
    /// binding. Unknown tokens are recorded as refusals.
    pub async fn authenticate(&self, ctx: &Ctx, bearer: Option<&str>) -> Result<Authenticated> {
        let found = match bearer {
            Some(t) if !t.is_empty() && t.len() <= 256 => self.tokens.lookup(&self.store, t)?,
            _ => None,
        };
        let err = match found {
            Some(a) => match &a.record.cert_subject {
                Some(bound) if !cert_matches(bound, ctx.cert_subject.as_deref()) => VaultError::CertificateMismatch,
                _ => return Ok(a),
            },
            None => VaultError::TokenInvalid,
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
        if self.tokens.consume_use(&self.store, auth)? {
            Ok(())
        } else {
            Err(self
                .refuse(ctx, auth, action, subject, vec![], VaultError::TokenInvalid)
                .await)
        }
    }

    fn subject_state(&self, id: &str, purpose: Option<&str>) -> Result<(SubjectState, Option<SubjectRecord>)> {
        if !valid_subject_id(id) {
            return Ok((SubjectState::NotFound, None));
        }
        if self.store.erased.contains_key(id.as_bytes())? {
            return Ok((SubjectState::Erased, None));
        }
        let Some(bytes) = self.store.subjects.get(id.as_bytes())? else {
            return Ok((SubjectState::NotFound, None));
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
        opened: Normalized,
        forms: &[(String, ReleaseForm)],
    ) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::with_capacity(forms.len());
        for (name, form) in forms {
            let Some((_, pt)) = opened.iter().find(|(n, _)| n == name) else {
                continue;
            };
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
            out.push((name.clone(), released));
        }
        Ok(out)
    }

    fn index_key(&self, field: &str, normalized_json: &[u8]) -> Vec<u8> {
        hmac_parts(
            self.keyring.index_key().expose_secret(),
            &[b"pdvault-index-v1", field.as_bytes(), normalized_json],
        )
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

    /// Stores new subjects (or new versions): keys first, flushed, then data,
    /// flushed. A crash in between leaves an unused key, never unreadable data.
    async fn store_subjects(
        &self,
        items: Vec<(String, WrappedKey, SubjectRecord, Option<SubjectRecord>)>,
    ) -> Result<()> {
        let mut kb = sled::Batch::default();
        for (id, w, rec, _) in &items {
            kb.insert(dek_key(id, rec.version), postcard::to_stdvec(w).expect("postcard"));
        }
        self.keystore.keys.apply_batch(kb)?;
        self.keystore.flusher.sync().await?;
        let (mut sb, mut ib, mut ab) = (sled::Batch::default(), sled::Batch::default(), sled::Batch::default());
        for (id, _, rec, old) in &items {
            if let Some(old) = old {
                for ix in &old.index {
                    ib.remove(Self::index_entry_key(ix, id));
                }
                ab.remove(activity_key(old.updated_at, id));
            }
            let stamp = self.store.next_counter("index_stamp")?;
            for ix in &rec.index {
                ib.insert(Self::index_entry_key(ix, id), &stamp.to_be_bytes());
            }
            ab.insert(activity_key(rec.updated_at, id), &[]);
            sb.insert(id.as_bytes(), rec.encode());
        }
        self.store.index.apply_batch(ib)?;
        self.store.activity.apply_batch(ab)?;
        self.store.subjects.apply_batch(sb)?;
        self.store.flusher.sync().await?;
        // The previous version's key is no longer needed: an old value left in
        // sled's files dies with it.
        let mut removed = false;
        for (id, _, _, old) in &items {
            if let Some(old) = old {
                self.keystore.keys.remove(dek_key(id, old.version))?;
                removed = true;
            }
        }
        if removed {
            self.keystore.flusher.sync().await?;
        }
        Ok(())
    }

    // ----- subject operations -----------------------------------------------

    fn check_create(&self, fields: &Map<String, Value>) -> Result<Normalized> {
        if fields.is_empty() {
            return Err(VaultError::BadRequest("fields must name at least one field".into()));
        }
        Ok(self
            .normalize_fields(fields, false)?
            .into_iter()
            .map(|(n, p)| (n, p.expect("no nulls")))
            .collect())
    }

    pub async fn create(&self, ctx: &Ctx, auth: &Authenticated, fields: &Map<String, Value>) -> Result<(String, u64)> {
        let names: Vec<String> = fields.keys().cloned().collect();
        self.decide(
            ctx,
            auth,
            Action::Create,
            "create",
            None,
            SubjectState::NoSubject,
            FieldsAsked::Named(&names),
        )
        .await?;
        let normalized = match self.check_create(fields) {
            Ok(n) => n,
            Err(e) => return Err(self.refuse(ctx, auth, "create", None, names, e).await),
        };
        self.take_use(ctx, auth, "create", None).await?;
        let id = uuid::Uuid::new_v4().to_string();
        self.record(vec![self.draft(ctx, Some(auth), "create", Some(&id), names, None)])
            .await?;
        let _g = self.gate.read().await;
        let now = now_secs();
        let (w, rec, _) = self.seal_subject(&id, 1, &normalized, now, now);
        self.store_subjects(vec![(id.clone(), w, rec, None)]).await?;
        Ok((id, 1))
    }

    pub async fn batch_create(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        subjects: &[Map<String, Value>],
    ) -> Result<Vec<BatchItem>> {
        if subjects.len() > MAX_BATCH {
            return Err(VaultError::BadRequest(format!(
                "at most {MAX_BATCH} subjects per batch"
            )));
        }
        let now = now_secs();
        let mut drafts = Vec::with_capacity(subjects.len());
        let mut results: Vec<BatchItem> = Vec::with_capacity(subjects.len());
        let mut pending = Vec::new();
        for fields in subjects {
            let names: Vec<String> = fields.keys().cloned().collect();
            let req = Request {
                purpose: ctx.purpose.as_deref(),
                action: Action::Create,
                subject_id: None,
                subject: SubjectState::NoSubject,
                fields: FieldsAsked::Named(&names),
                justification: ctx.justification.as_deref(),
                now,
            };
            let checked = self
                .cfg
                .policy
                .decide(&auth.view(), &req)
                .and_then(|_| self.check_create(fields));
            match checked {
                Ok(n) => {
                    let id = uuid::Uuid::new_v4().to_string();
                    drafts.push(self.draft(ctx, Some(auth), "create", Some(&id), names, None));
                    results.push(BatchItem::Created {
                        id: id.clone(),
                        version: 1,
                    });
                    pending.push((id, n));
                }
                Err(e) => {
                    drafts.push(self.draft(ctx, Some(auth), "create", None, names, Some(&e)));
                    results.push(BatchItem::Err { id: None, error: e });
                }
            }
        }
        if !pending.is_empty() {
            self.take_use(ctx, auth, "batch_create", None).await?;
        }
        self.record(drafts).await?;
        let _g = self.gate.read().await;
        let items = pending
            .into_iter()
            .map(|(id, n)| {
                let (w, rec, _) = self.seal_subject(&id, 1, &n, now, now);
                (id, w, rec, None)
            })
            .collect();
        self.store_subjects(items).await?;
        Ok(results)
    }

    pub async fn read(&self, ctx: &Ctx, auth: &Authenticated, id: &str, fields: Option<&[String]>) -> Result<Released> {
        let asked = fields.map(FieldsAsked::Named).unwrap_or(FieldsAsked::Default);
        let (state, rec) = self.subject_state(id, ctx.purpose.as_deref())?;
        let allowed = self
            .decide(ctx, auth, Action::Read, "read", Some(id), state, asked)
            .await?;
        self.take_use(ctx, auth, "read", Some(id)).await?;
        let rec = rec.ok_or(VaultError::SubjectNotFound)?;
        let names = allowed.fields.iter().map(|(n, _)| n.clone()).collect();
        self.record(vec![self.draft(ctx, Some(auth), "read", Some(id), names, None)])
            .await?;
        self.release_record(ctx, id, &rec, &allowed)
    }

    fn release_record(&self, ctx: &Ctx, id: &str, rec: &SubjectRecord, allowed: &Allowed) -> Result<Released> {
        let opened = self.open_fields(id, rec, Some(&allowed.fields))?;
        let fields = self.transform(ctx.purpose.as_deref().unwrap_or(""), opened, &allowed.fields)?;
        Ok(Released {
            id: id.to_owned(),
            version: rec.version,
            fields,
        })
    }

    pub async fn batch_get(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> Result<Vec<BatchItem>> {
        if ids.len() > MAX_BATCH {
            return Err(VaultError::BadRequest(format!("at most {MAX_BATCH} ids per batch")));
        }
        let asked = fields.map(FieldsAsked::Named).unwrap_or(FieldsAsked::Default);
        let now = now_secs();
        let mut drafts = Vec::with_capacity(ids.len());
        let mut staged = Vec::with_capacity(ids.len());
        for id in ids {
            let (state, rec) = self.subject_state(id, ctx.purpose.as_deref())?;
            let req = Request {
                purpose: ctx.purpose.as_deref(),
                action: Action::Read,
                subject_id: Some(id),
                subject: state,
                fields: asked,
                justification: ctx.justification.as_deref(),
                now,
            };
            match self.cfg.policy.decide(&auth.view(), &req) {
                Ok(a) => {
                    let names = a.fields.iter().map(|(n, _)| n.clone()).collect();
                    drafts.push(self.draft(ctx, Some(auth), "batch_get", Some(id), names, None));
                    staged.push(Ok((id.clone(), rec.expect("live subject has a record"), a)));
                }
                Err(e) => {
                    drafts.push(self.draft(ctx, Some(auth), "batch_get", Some(id), asked_names(asked), Some(&e)));
                    staged.push(Err((id.clone(), e)));
                }
            }
        }
        if staged.iter().any(|s| s.is_ok()) {
            self.take_use(ctx, auth, "batch_get", None).await?;
        }
        self.record(drafts).await?;
        let mut out = Vec::with_capacity(staged.len());
        for s in staged {
            out.push(match s {
                Ok((id, rec, a)) => match self.release_record(ctx, &id, &rec, &a) {
                    Ok(r) => BatchItem::Ok(r),
                    Err(e) => BatchItem::Err { id: Some(id), error: e },
                },
                Err((id, e)) => BatchItem::Err { id: Some(id), error: e },
            });
        }
        Ok(out)
    }

    pub async fn patch(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        id: &str,
        fields: &Map<String, Value>,
        if_match: Option<u64>,
    ) -> Result<(String, u64)> {
        let names: Vec<String> = fields.keys().cloned().collect();
        let _lock = self.stripe(id).lock().await;
        let (state, rec) = self.subject_state(id, ctx.purpose.as_deref())?;
        self.decide(
            ctx,
            auth,
            Action::Write,
            "write",
            Some(id),
            state,
            FieldsAsked::Named(&names),
        )
        .await?;
        let rec = rec.ok_or(VaultError::SubjectNotFound)?;
        let checked = if fields.is_empty() {
            Err(VaultError::BadRequest("fields must name at least one field".into()))
        } else {
            self.normalize_fields(fields, true)
        };
        let changes = match checked {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(ctx, auth, "write", Some(id), names, e).await),
        };
        if let Some(v) = if_match {
            if v != rec.version {
                let e = VaultError::VersionConflict { current: rec.version };
                return Err(self.refuse(ctx, auth, "write", Some(id), names, e).await);
            }
        }
        self.take_use(ctx, auth, "write", Some(id)).await?;
        self.record(vec![self.draft(ctx, Some(auth), "write", Some(id), names, None)])
            .await?;
        let _g = self.gate.read().await;
        // Re-key: open everything under the old key, seal under a new one.
        let mut current = self.open_fields(id, &rec, None)?;
        for (name, value) in changes {
            current.retain(|(n, _)| *n != name);
            if let Some(v) = value {
                current.push((name, v));
            }
        }
        current.sort_by(|a, b| a.0.cmp(&b.0));
        let now = now_secs();
        let version = rec.version + 1;
        let (w, new_rec, _) = self.seal_subject(id, version, &current, rec.created_at, now);
        self.store_subjects(vec![(id.to_owned(), w, new_rec, Some(rec))])
            .await?;
        Ok((id.to_owned(), version))
    }

    pub async fn lookup(&self, ctx: &Ctx, auth: &Authenticated, field: &str, value: &Value) -> Result<String> {
        let names = vec![field.to_owned()];
        // Steps 1-4 first, so that nothing is looked up for a caller who may not.
        self.decide(
            ctx,
            auth,
            Action::Lookup,
            "lookup",
            None,
            SubjectState::NoSubject,
            FieldsAsked::Named(&names),
        )
        .await?;
        let probe = if !self.indexed(field) {
            Err(VaultError::BadRequest(
                "lookup works on email and phone fields only".into(),
            ))
        } else {
            let mut m = Map::new();
            m.insert(field.to_owned(), value.clone());
            self.normalize_fields(&m, false)
        };
        let normalized = match probe {
            Ok(mut n) => n.pop().and_then(|(_, p)| p).expect("one field"),
            Err(e) => return Err(self.refuse(ctx, auth, "lookup", None, names, e).await),
        };
        let ix = self.index_key(field, normalized.expose());
        let scope = auth.record.grant.as_ref().map(|g| &g.subjects);
        let mut best: Option<(u64, String)> = None;
        for kv in self.store.index.scan_prefix(&ix) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[ix.len()..]).into_owned();
            if scope.is_some_and(|s| !s.contains(&id)) {
                continue;
            }
            let stamp = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
            if best.as_ref().is_none_or(|(s, _)| stamp > *s) {
                best = Some((stamp, id));
            }
        }
        let id = best.map(|(_, id)| id);
        let (state, _) = match &id {
            Some(id) => self.subject_state(id, ctx.purpose.as_deref())?,
            None => (SubjectState::NotFound, None),
        };
        let subject = id.as_deref();
        self.decide(
            ctx,
            auth,
            Action::Lookup,
            "lookup",
            subject,
            state,
            FieldsAsked::Named(&names),
        )
        .await?;
        let id = id.ok_or(VaultError::SubjectNotFound)?;
        self.take_use(ctx, auth, "lookup", Some(&id)).await?;
        self.record(vec![self.draft(ctx, Some(auth), "lookup", Some(&id), names, None)])
            .await?;
        Ok(id)
    }

    // ----- consents -----------------------------------------------------------

    fn latest_consent(&self, id: &str, purpose: &str) -> Result<Option<bool>> {
        let mut latest = None;
        for v in self.store.consents.scan_prefix(consent_prefix(id)).values() {
            let r: Value = serde_json::from_slice(&v?).map_err(|_| VaultError::internal("corrupt consent"))?;
            if r["purpose"] == purpose {
                latest = r["granted"].as_bool();
            }
        }
        Ok(latest)
    }

    pub async fn consents(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<Value> {
        let (state, _) = self.subject_state(id, ctx.purpose.as_deref())?;
        self.decide(
            ctx,
            auth,
            Action::ConsentRead,
            "consent_read",
            Some(id),
            state,
            FieldsAsked::Named(&[]),
        )
        .await?;
        self.take_use(ctx, auth, "consent_read", Some(id)).await?;
        self.record(vec![self.draft(
            ctx,
            Some(auth),
            "consent_read",
            Some(id),
            vec![],
            None,
        )])
        .await?;
        let mut history = vec![];
        let mut current = Map::new();
        for v in self.store.consents.scan_prefix(consent_prefix(id)).values() {
            let r: Value = serde_json::from_slice(&v?).map_err(|_| VaultError::internal("corrupt consent"))?;
            let p = r["purpose"].as_str().unwrap_or_default().to_owned();
            current.insert(
                p,
                json!({"granted": r["granted"], "at": r["at"], "policy_version": r["policy_version"]}),
            );
            history.push(r);
        }
        Ok(json!({"id": id, "consents": current, "history": history}))
    }

    pub async fn set_consent(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        id: &str,
        purpose: &str,
        granted: bool,
    ) -> Result<Value> {
        let _lock = self.stripe(id).lock().await;
        let (state, _) = self.subject_state(id, ctx.purpose.as_deref())?;
        self.decide(
            ctx,
            auth,
            Action::ConsentWrite,
            "consent_write",
            Some(id),
            state,
            FieldsAsked::Named(&[]),
        )
        .await?;
        if !self.cfg.policy.purposes.contains_key(purpose) {
            let e = VaultError::NotFound("no such purpose".into());
            return Err(self.refuse(ctx, auth, "consent_write", Some(id), vec![], e).await);
        }
        self.take_use(ctx, auth, "consent_write", Some(id)).await?;
        self.record(vec![self.draft(
            ctx,
            Some(auth),
            "consent_write",
            Some(id),
            vec![],
            None,
        )])
        .await?;
        let _g = self.gate.read().await;
        let seq = self.store.next_counter("consent_seq")?;
        let rec = json!({
            "purpose": purpose,
            "granted": granted,
            "at": rfc3339(now_secs()),
            "policy_version": self.cfg.policy.version,
            "caller": auth.record.caller,
            "via": ctx.purpose,
        });
        let mut k = consent_prefix(id);
        k.extend_from_slice(&seq.to_be_bytes());
        self.store.consents.insert(k, serde_json::to_vec(&rec).expect("json"))?;
        self.touch(id)?;
        self.store.flusher.sync().await?;
        Ok(rec)
    }

    /// Marks a write as activity (for the retention sweeper).
    fn touch(&self, id: &str) -> Result<()> {
        if let Some(b) = self.store.subjects.get(id.as_bytes())? {
            let mut rec = SubjectRecord::decode(&b)?;
            let now = now_secs();
            self.store.activity.remove(activity_key(rec.updated_at, id))?;
            rec.updated_at = now;
            self.store.activity.insert(activity_key(now, id), &[])?;
            self.store.subjects.insert(id.as_bytes(), rec.encode())?;
        }
        Ok(())
    }

    // ----- access log -------------------------------------------------------------

    pub async fn access_log(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Value> {
        let (state, _) = self.subject_state(id, ctx.purpose.as_deref())?;
        self.decide(
            ctx,
            auth,
            Action::AccessLog,
            "access_log",
            Some(id),
            state,
            FieldsAsked::Named(&[]),
        )
        .await?;
        self.record(vec![self.draft(ctx, Some(auth), "access_log", Some(id), vec![], None)])
            .await?;
        let (entries, next) = crate::audit::access_page(&self.store.access, id, after, limit.clamp(1, 1000))?;
        Ok(json!({"id": id, "entries": entries, "next": next.map(|n| n.to_string())}))
    }

    // ----- erasure --------------------------------------------------------------------

    /// When the last key that could open a copy of today's data is destroyed:
    /// the current epoch retires at the next scheduled rotation and is
    /// destroyed `epoch_retention` later (plus the scheduler's tick).
    pub fn final_by(&self, now: u64) -> u64 {
        let next_rotation = if self.keyring.rotation().is_some() {
            now
        } else {
            (self.keyring.last_rotation_at() + self.cfg.keys.rotate_every.as_secs()).max(now)
        };
        next_rotation + self.cfg.keys.epoch_retention.as_secs() + crate::scheduler::TICK.as_secs()
    }

    pub async fn erase(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<Erasure> {
        let _lock = self.stripe(id).lock().await;
        let (state, rec) = self.subject_state(id, ctx.purpose.as_deref())?;
        // A repeated erasure answers the same receipt: decide as if live.
        let as_seen = if state == SubjectState::Erased {
            SubjectState::Live { consent: None }
        } else {
            state
        };
        self.decide(
            ctx,
            auth,
            Action::Erase,
            "erase",
            Some(id),
            as_seen,
            FieldsAsked::Named(&[]),
        )
        .await?;
        if state == SubjectState::Erased {
            self.record(vec![self.draft(ctx, Some(auth), "erase", Some(id), vec![], None)])
                .await?;
            return self
                .stored_receipt(id)?
                .ok_or_else(|| VaultError::internal("erased subject without receipt"));
        }
        let rec = rec.ok_or(VaultError::SubjectNotFound)?;
        self.take_use(ctx, auth, "erase", Some(id)).await?;
        self.record(vec![self.draft(ctx, Some(auth), "erase", Some(id), vec![], None)])
            .await?;
        self.shred(id, &rec, "request", &auth.record.caller).await
    }

    fn stored_receipt(&self, id: &str) -> Result<Option<Erasure>> {
        Ok(match self.store.erased.get(id.as_bytes())? {
            Some(b) => {
                let v: Value = serde_json::from_slice(&b).map_err(|_| VaultError::internal("corrupt receipt"))?;
                Some(Erasure {
                    receipt: v["receipt"].clone(),
                    signature: v["signature"].as_str().unwrap_or_default().to_owned(),
                })
            }
            None => None,
        })
    }

    /// Crypto-shreds a subject: ledger entry (durable) first, then every
    /// version of its data key, then its ciphertexts and index entries.
    async fn shred(&self, id: &str, rec: &SubjectRecord, reason: &str, by: &str) -> Result<Erasure> {
        let _g = self.gate.read().await;
        let now = now_secs();
        let epoch = self
            .keystore
            .get(id, rec.version)?
            .map(|w| w.epoch)
            .unwrap_or_else(|| self.keyring.current_epoch());
        let receipt = json!({
            "id": id,
            "erased_at": rfc3339(now),
            "key_epoch": epoch,
            "final_by": rfc3339(self.final_by(now)),
            "reason": reason,
            "requested_by": by,
            "alg": "Ed25519",
        });
        let signature = crate::receipt::sign(self.keyring.receipt_key(), &receipt);
        let entry = self.ledger.append(id, &receipt, &signature)?;
        self.keystore.remove_all(id)?;
        self.keystore.flusher.sync().await?;
        purge_subject(&self.store, &entry)?;
        self.store.flusher.sync().await?;
        Ok(Erasure { receipt, signature })
    }

    /// The retention sweeper: erases subjects with no write since `cutoff`.
    pub async fn sweep_inactive(&self, cutoff: u64, why: &str) -> Result<usize> {
        let end = activity_key(cutoff, "");
        let ids: Vec<String> = self
            .store
            .activity
            .range(..end)
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k[8..]).into_owned())
            .collect();
        let mut n = 0;
        for id in ids {
            let _lock = self.stripe(&id).lock().await;
            let Some(b) = self.store.subjects.get(id.as_bytes())? else {
                continue;
            };
            let rec = SubjectRecord::decode(&b)?;
            if rec.updated_at >= cutoff {
                continue;
            }
            let ctx = Ctx {
                request_id: format!("retention-{}", uuid::Uuid::new_v4()),
                purpose: Some("erasure".into()),
                justification: Some(why.to_owned()),
                cert_subject: None,
            };
            let d = Draft {
                request_id: ctx.request_id.clone(),
                caller: Some("retention-sweeper".into()),
                token_id: None,
                purpose: ctx.purpose.clone(),
                action: "erase".into(),
                subject: Some(id.clone()),
                fields: vec![],
                code: None,
                justification: ctx.justification.clone(),
            };
            self.record(vec![d]).await?;
            self.shred(&id, &rec, "retention", "retention-sweeper").await?;
            n += 1;
        }
        Ok(n)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.keyring.receipt_key().public_key()
    }

    // ----- tokens and grants -----------------------------------------------------------

    async fn admin(&self, ctx: &Ctx, auth: &Authenticated, action: &str) -> Result<()> {
        self.decide(
            ctx,
            auth,
            Action::Admin,
            action,
            None,
            SubjectState::NoSubject,
            FieldsAsked::Named(&[]),
        )
        .await
        .map(|_| ())
    }

    fn check_issue(&self, req: &IssueRequest) -> Result<Vec<Capability>> {
        check_caller_name(&req.caller)?;
        for p in &req.purposes {
            if !self.cfg.policy.purposes.contains_key(p) {
                return Err(VaultError::BadRequest("unknown purpose in purposes".into()));
            }
        }
        let mut caps = vec![];
        for c in &req.capabilities {
            caps.push(
                Capability::parse(c)
                    .ok_or_else(|| VaultError::BadRequest("unknown capability in capabilities".into()))?,
            );
        }
        if req.ttl_seconds == 0 || req.ttl_seconds > MAX_TOKEN_TTL {
            return Err(VaultError::BadRequest(format!(
                "ttl_seconds must be 1 to {MAX_TOKEN_TTL}"
            )));
        }
        Ok(caps)
    }

    pub async fn issue_token(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        req: IssueRequest,
    ) -> Result<(TokenRecord, TokenSecret)> {
        self.admin(ctx, auth, "token_issue").await?;
        let caps = match self.check_issue(&req) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(ctx, auth, "token_issue", None, vec![], e).await),
        };
        self.record(vec![self.draft(ctx, Some(auth), "token_issue", None, vec![], None)])
            .await?;
        let _g = self.gate.read().await;
        let out = self.tokens.issue(
            &self.store,
            NewToken {
                caller: req.caller,
                purposes: req.purposes,
                capabilities: caps,
                ttl_secs: req.ttl_seconds,
                cert_subject: req.cert_subject,
                parent: None,
                grant: None,
            },
            now_secs(),
        )?;
        self.store.flusher.sync().await?;
        Ok(out)
    }

    pub async fn list_tokens(&self, ctx: &Ctx, auth: &Authenticated) -> Result<Vec<TokenRecord>> {
        self.admin(ctx, auth, "token_list").await?;
        self.record(vec![self.draft(ctx, Some(auth), "token_list", None, vec![], None)])
            .await?;
        self.tokens.list(&self.store)
    }

    pub async fn revoke_token(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<TokenRecord> {
        self.admin(ctx, auth, "token_revoke").await?;
        let _g = self.gate.read().await;
        match self.tokens.revoke(&self.store, id, now_secs())? {
            Some(r) => {
                self.store.flusher.sync().await?;
                self.record(vec![self.draft(ctx, Some(auth), "token_revoke", None, vec![], None)])
                    .await?;
                Ok(r)
            }
            None => {
                let e = VaultError::NotFound("no such token".into());
                Err(self.refuse(ctx, auth, "token_revoke", None, vec![], e).await)
            }
        }
    }

    /// Dev mode: make sure the token text in `admin.token` works here.
    pub fn ensure_dev_admin(&self, text: &str) -> Result<bool> {
        let now = now_secs();
        if self.tokens.is_usable(&self.store, text, now)? {
            return Ok(false);
        }
        self.tokens
            .register(&self.store, first_admin_token(), now, &TokenSecret::from_text(text))?;
        self.store.flusher.sync_blocking()?;
        Ok(true)
    }

    /// `pdvault init`: the first admin token.
    pub fn issue_first_admin(&self) -> Result<TokenSecret> {
        let (_, secret) = self.tokens.issue(&self.store, first_admin_token(), now_secs())?;
        self.store.flusher.sync_blocking()?;
        Ok(secret)
    }

    pub async fn mint_grant(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        g: GrantRequest,
    ) -> Result<(TokenRecord, TokenSecret)> {
        let mut ctx = ctx.clone();
        if ctx.purpose.is_none() {
            ctx.purpose = g.purpose.clone();
        }
        let ctx = &ctx;
        let names = g.fields.clone().unwrap_or_default();
        let asked = g
            .fields
            .as_deref()
            .map(FieldsAsked::Named)
            .unwrap_or(FieldsAsked::Default);
        let audit_subject = if g.subjects.len() == 1 {
            Some(g.subjects[0].as_str())
        } else {
            None
        };
        self.decide(
            ctx,
            auth,
            Action::MintGrant,
            "grant",
            audit_subject,
            SubjectState::NoSubject,
            FieldsAsked::Named(&[]),
        )
        .await?;
        let granted_purpose = g.purpose.clone().or_else(|| ctx.purpose.clone()).unwrap_or_default();
        let widening = self.check_grant(auth, &g, &granted_purpose, asked);
        let fields = match widening {
            Ok(f) => f,
            Err(e) => return Err(self.refuse(ctx, auth, "grant", audit_subject, names, e).await),
        };
        self.record(vec![self.draft(
            ctx,
            Some(auth),
            "grant",
            audit_subject,
            fields.clone(),
            None,
        )])
        .await?;
        let _g = self.gate.read().await;
        let out = self.tokens.issue(
            &self.store,
            NewToken {
                caller: g.caller,
                purposes: vec![granted_purpose],
                capabilities: vec![Capability::Read],
                ttl_secs: g.ttl_seconds,
                cert_subject: g.cert_subject,
                parent: Some(auth.record.id.clone()),
                grant: Some(GrantScope {
                    subjects: g.subjects,
                    fields,
                    max_uses: g.max_uses,
                }),
            },
            now_secs(),
        )?;
        self.store.flusher.sync().await?;
        Ok(out)
    }

    /// A grant may never be wider than its parent. Returns the granted fields.
    fn check_grant(
        &self,
        auth: &Authenticated,
        g: &GrantRequest,
        purpose: &str,
        asked: FieldsAsked<'_>,
    ) -> Result<Vec<String>> {
        let wide = |m: &str| Err(VaultError::GrantTooWide(m.to_owned()));
        if g.subjects.is_empty() || g.subjects.len() > MAX_BATCH {
            return Err(VaultError::BadRequest(format!(
                "subjects must list 1 to {MAX_BATCH} ids"
            )));
        }
        if g.subjects.iter().any(|s| !valid_subject_id(s)) {
            return Err(VaultError::BadRequest("subjects must be subject ids".into()));
        }
        check_caller_name(&g.caller)?;
        if !auth.record.purposes.iter().any(|p| p == purpose) {
            return wide("the parent token does not hold this purpose");
        }
        let Some(p) = self.cfg.policy.purposes.get(purpose) else {
            return wide("unknown purpose");
        };
        if !auth.record.capabilities.contains(&Capability::Read) {
            return wide("the parent token cannot read, so it cannot grant reading");
        }
        if auth.record.grant.is_some() {
            return wide("a grant cannot mint grants");
        }
        let fields: Vec<String> = match asked {
            FieldsAsked::Default => p.fields.keys().cloned().collect(),
            FieldsAsked::Named(n) => n.to_vec(),
        };
        if fields.is_empty() {
            return Err(VaultError::BadRequest("a grant must cover at least one field".into()));
        }
        if fields.iter().any(|f| !p.fields.contains_key(f)) {
            return wide("a field is not covered by the purpose");
        }
        let now = now_secs();
        if g.ttl_seconds == 0 {
            return Err(VaultError::BadRequest("ttl_seconds must be positive".into()));
        }
        if g.ttl_seconds > self.cfg.grants.max_ttl.as_secs() {
            return wide("ttl_seconds exceeds grants.max_ttl");
        }
        if now.saturating_add(g.ttl_seconds) > auth.expires_at {
            return wide("the grant would outlive its parent token");
        }
        if g.max_uses == Some(0) {
            return Err(VaultError::BadRequest("max_uses must be positive".into()));
        }
        Ok(fields)
    }

    // ----- keys: rotation, backup -------------------------------------------------------

    /// Rotates the key-encryption key: a new epoch, every live data key
    /// re-wrapped under it, then retired epochs past retention destroyed.
    /// Resumable: an interrupted rotation is finished by the next call.
    pub async fn rotate_kek(&self) -> Result<(u32, u64)> {
        let _r = self.rotation.lock().await;
        let now = now_secs();
        // Writers wrap data keys under the current epoch while holding the
        // gate: let those in flight land before the new epoch becomes current,
        // so the re-wrap pass below sees every key left under an old epoch
        // (else a key stored after the pass is lost when its epoch is destroyed).
        let rot = {
            let _g = self.gate.write().await;
            self.keyring
                .begin_rotation(now)
                .map_err(|e| VaultError::Internal(e.to_string()))?
        };
        let target_kek = self
            .keyring
            .kek(rot.target)
            .ok_or_else(|| VaultError::internal("target epoch missing"))?;
        let abort_after = crate::faults::rotate_abort_after();
        let mut rewrapped = 0u64;
        let mut since_flush = 0;
        for kv in self.keystore.keys.iter() {
            let (k, v) = kv?;
            let w: WrappedKey = postcard::from_bytes(&v).map_err(|_| VaultError::internal("corrupt wrapped key"))?;
            if w.epoch >= rot.target {
                continue;
            }
            let Some((id, version)) = parse_dek_key(&k) else {
                continue;
            };
            let Some(old) = self.keyring.kek(w.epoch) else {
                tracing::warn!(
                    epoch = w.epoch,
                    "a data key is wrapped under a destroyed epoch; it cannot be re-wrapped"
                );
                continue;
            };
            let Ok(raw) = old.open(&w.sealed, &dek_aad(id, version, w.epoch)) else {
                tracing::warn!("a wrapped data key does not open; left as it is");
                continue;
            };
            let nw = WrappedKey {
                epoch: rot.target,
                sealed: target_kek.seal(raw.expose(), &dek_aad(id, version, rot.target)),
            };
            // Compare-and-swap: a concurrent edit or erasure wins.
            let _ =
                self.keystore
                    .keys
                    .compare_and_swap(&k, Some(&v), Some(postcard::to_stdvec(&nw).expect("postcard")))?;
            rewrapped += 1;
            since_flush += 1;
            if since_flush >= 10_000 {
                self.keystore.flusher.sync().await?;
                since_flush = 0;
            }
            if abort_after.is_some_and(|n| rewrapped >= n) {
                self.keystore.flusher.sync().await?;
                tracing::error!("fault point: aborting in the middle of a rotation");
                std::process::abort();
            }
        }
        self.keystore.flusher.sync().await?;
        self.keyring
            .finish_rotation(now_secs())
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        self.destroy_expired_epochs()?;
        Ok((rot.target, rewrapped))
    }

    pub fn destroy_expired_epochs(&self) -> Result<Vec<u32>> {
        let gone = self
            .keyring
            .destroy_expired(now_secs(), self.cfg.keys.epoch_retention)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        if !gone.is_empty() {
            tracing::info!(epochs = ?gone, "destroyed retired key epochs");
        }
        Ok(gone)
    }

    /// `/metrics` needs `admin`; scrapes are not audited, refusals are.
    pub async fn admin_metrics(&self, ctx: &Ctx, auth: &Authenticated) -> Result<()> {
        self.admin(ctx, auth, "metrics").await
    }

    pub async fn admin_rotate(&self, ctx: &Ctx, auth: &Authenticated) -> Result<(u32, u64)> {
        self.admin(ctx, auth, "rotate_kek").await?;
        self.record(vec![self.draft(ctx, Some(auth), "rotate_kek", None, vec![], None)])
            .await?;
        self.rotate_kek().await
    }

    /// Writes a consistent snapshot of the data directory's trees to `out`.
    /// Holds every writer off while it copies (to local disk, not the network).
    pub async fn backup(&self, ctx: &Ctx, auth: &Authenticated, out: &mut (dyn std::io::Write + Send)) -> Result<u64> {
        self.admin(ctx, auth, "backup").await?;
        self.record(vec![self.draft(ctx, Some(auth), "backup", None, vec![], None)])
            .await?;
        let _g = self.gate.write().await;
        let (seq, head) = self.audit.head();
        let header = json!({
            "format": 1,
            "created_at": rfc3339(now_secs()),
            "key_epoch": self.keyring.current_epoch(),
            "audit_head": {"seq": seq, "hash": head},
            "ledger_head": self.ledger.head().0,
            "note": "ciphertexts, blind-index HMACs and token hashes only; data keys stay in the keys directory",
        });
        tokio::task::block_in_place(|| self.store.write_backup(out, &header))
    }

    /// Signs the audit chain's head (scheduler).
    pub fn audit_checkpoint(&self) -> Result<()> {
        self.audit.checkpoint(self.keyring.receipt_key()).map(|_| ())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// A caller name (token or grant holder): 1-100 characters of `[A-Za-z0-9-_.@:]`.
fn check_caller_name(name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 100 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(VaultError::BadRequest(
            "caller must be 1-100 characters of [A-Za-z0-9-_.@:]".into(),
        ))
    }
}

fn asked_names(f: FieldsAsked<'_>) -> Vec<String> {
    match f {
        FieldsAsked::Named(n) => n.to_vec(),
        FieldsAsked::Default => vec![],
    }
}

fn first_admin_token() -> NewToken {
    NewToken {
        caller: "admin".into(),
        purposes: vec!["erasure".into()],
        capabilities: vec![Capability::Admin, Capability::Audit, Capability::Erase],
        ttl_secs: 365 * 86400,
        cert_subject: None,
        parent: None,
        grant: None,
    }
}

/// Whether a certificate subject satisfies a token's binding: either the full
/// DN (RFC 4514, as x509-parser prints it) or its common name.
pub fn cert_matches(bound: &str, presented: Option<&str>) -> bool {
    let Some(p) = presented else { return false };
    let norm = |s: &str| split_dn(s).into_iter().map(str::trim).collect::<Vec<_>>().join(",");
    if norm(bound) == norm(p) {
        return true;
    }
    // The common name form: only for a subject with exactly one CN.
    let mut cns = split_dn(p)
        .into_iter()
        .map(str::trim)
        .filter_map(|x| x.strip_prefix("CN="));
    let cn = match (cns.next(), cns.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    };
    !bound.contains('=') && cn == Some(bound) || bound.strip_prefix("CN=").is_some_and(|b| cn == Some(b))
}

/// Splits a DN at its RDN separators: commas not escaped with a backslash.
fn split_dn(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Removes an erased subject's data and records its receipt. Idempotent;
/// needs no key, so `restore` and every start can run it.
fn purge_subject(store: &Store, e: &LedgerEntry) -> Result<()> {
    let id = e.id.as_str();
    if let Some(b) = store.subjects.get(id.as_bytes())? {
        if let Ok(rec) = SubjectRecord::decode(&b) {
            for ix in &rec.index {
                store.index.remove(Vault::index_entry_key(ix, id))?;
            }
            store.activity.remove(activity_key(rec.updated_at, id))?;
        }
        store.subjects.remove(id.as_bytes())?;
    }
    for k in store.consents.scan_prefix(consent_prefix(id)).keys() {
        store.consents.remove(k?)?;
    }
    crate::audit::forget_subject(&store.access, id)?;
    if !store.erased.contains_key(id.as_bytes())? {
        let v = json!({"receipt": e.receipt, "signature": e.signature, "ledger_seq": e.seq});
        store
            .erased
            .insert(id.as_bytes(), serde_json::to_vec(&v).expect("json"))?;
    }
    Ok(())
}

/// Applies the shred ledger to a data directory (and the key store): every
/// subject it names is removed and marked erased. Skips what an earlier
/// replay already did, unless this data directory has not seen it.
pub fn replay_ledger(store: &Store, keystore: &KeyStore, entries: &[LedgerEntry]) -> Result<usize> {
    let applied = store
        .meta
        .get("ledger_applied")?
        .and_then(|b| serde_json::from_slice::<(u64, String)>(&b).ok());
    let start = match applied {
        Some((seq, hash)) if seq >= 1 && entries.get(seq as usize - 1).is_some_and(|e| e.hash == hash) => seq as usize,
        _ => 0,
    };
    let mut n = 0;
    for e in &entries[start.min(entries.len())..] {
        purge_subject(store, e)?;
        keystore.remove_all(&e.id)?;
        n += 1;
    }
    if let Some(last) = entries.last() {
        store.meta.insert(
            "ledger_applied",
            serde_json::to_vec(&(last.seq, &last.hash)).expect("json"),
        )?;
    }
    keystore.flusher.sync_blocking()?;
    store.flusher.sync_blocking()?;
    Ok(n)
}

/// `pdvault restore`: loads a backup into an empty data directory, replays
/// the ledger, and drops subjects whose data key no longer exists (edited
/// after the backup: re-keying destroyed the key of the old version).
pub fn restore(cfg: &Config, input: &mut dyn std::io::Read) -> Result<Value> {
    let dir = &cfg.data_dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(VaultError::BadRequest(format!(
            "{} is not empty: restore needs an empty data directory",
            dir.display()
        )));
    }
    let store = Store::open(dir)?;
    let (header, records) = match store.read_backup(input) {
        Ok(x) => x,
        Err(e) => {
            drop(store);
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    if let (Some(seq), Some(hash)) = (
        header["audit_head"]["seq"].as_u64(),
        header["audit_head"]["hash"].as_str(),
    ) {
        let base = crate::audit::ChainBase {
            seq,
            hash: hash.to_owned(),
            backup_created_at: header["created_at"].as_str().unwrap_or_default().to_owned(),
        };
        crate::audit::write_base(dir, &base)?;
    }
    let keystore = KeyStore::open(&cfg.keys.dir)?;
    let (_, entries) = Ledger::open(&cfg.keys.dir)?;
    store.meta.remove("ledger_applied")?;
    let replayed = replay_ledger(&store, &keystore, &entries)?;
    let mut unrecoverable = vec![];
    for kv in store.subjects.iter() {
        let (k, v) = kv?;
        let id = String::from_utf8_lossy(&k).into_owned();
        let rec = SubjectRecord::decode(&v)?;
        if keystore.get(&id, rec.version)?.is_none() {
            unrecoverable.push((id, rec));
        }
    }
    for (id, rec) in &unrecoverable {
        for ix in &rec.index {
            store.index.remove(Vault::index_entry_key(ix, id))?;
        }
        store.activity.remove(activity_key(rec.updated_at, id))?;
        store.subjects.remove(id.as_bytes())?;
    }
    store.flusher.sync_blocking()?;
    Ok(json!({
        "records": records,
        "backup": header,
        "ledger_entries_replayed": replayed,
        "subjects": store.subjects.len(),
        "unrecoverable": unrecoverable.iter().map(|(id, _)| id).collect::<Vec<_>>(),
    }))
}

/// Error type for opening: a message fit for the operator.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, String>;
}
