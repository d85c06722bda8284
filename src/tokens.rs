//! Bearer tokens: issue, look up, revoke, and delegated grants.
//!
//! Owns the token record and where it lives (`tokens`, `token_hashes` in the
//! data store; grant use counters in the key store; the revocation ledger in
//! the keys directory). A token's text is 256 random bits, shown once; the
//! store keeps only HMAC-SHA256(token key, text).
//!
//! Every stored record is authenticated (DESIGN 9): `mac || json`, the MAC
//! under a key derived from the root secret, over the JSON, which names the
//! token hash it belongs to. Whoever can write the data directory or a backup
//! can therefore neither widen a token nor point a known token's hash at
//! another token's record: a record that fails its MAC is refused and logged.
//!
//! Revocation is checked against the set of revoked ids read from the
//! revocation ledger (kept with the keys, replayed at start), on every lookup,
//! for the token and each of its ancestors; so a stale cache entry, a restored
//! backup or an old copy of the data cannot bring a revoked token back.

use crate::crypto::{ct_eq, random_bytes, MacKey, RecordMac, SecretKey};
use crate::error::{Result, VaultError};
use crate::ledger::Ledger;
use crate::policy::{Capability, GrantScope, TokenView};
use crate::storage::{Commit, KeyStore, Space, Store};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

/// The text of a token. Shown once, never stored, never printed by accident.
pub struct TokenSecret(Zeroizing<String>);

impl TokenSecret {
    pub fn generate() -> Self {
        TokenSecret(Zeroizing::new(format!("pdv_{}", B64URL.encode(random_bytes::<32>()))))
    }
    pub fn from_text(s: &str) -> Self {
        TokenSecret(Zeroizing::new(s.to_owned()))
    }
    /// The only way out: for showing it once to whoever asked for it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<Capability>,
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
    pub cert_subject: Option<String>,
    /// The token that minted this grant.
    pub parent: Option<String>,
    pub grant: Option<GrantScope>,
    /// Hex of the keyed hash of the token's text: binds the record to it.
    #[serde(default)]
    pub hash: String,
}

impl TokenRecord {
    /// The public description (never the text or its hash).
    pub fn describe(&self) -> TokenDescription {
        let grant = self.grant.as_ref();
        TokenDescription {
            id: self.id.clone(),
            caller: self.caller.clone(),
            purposes: self.purposes.clone(),
            capabilities: self.capabilities.clone(),
            created_at: crate::fsutil::rfc3339(self.created_at),
            expires_at: crate::fsutil::rfc3339(self.expires_at),
            revoked: self.revoked_at.is_some(),
            revoked_at: self.revoked_at.map(crate::fsutil::rfc3339),
            cert_subject: self.cert_subject.clone(),
            kind: if grant.is_some() {
                TokenKind::Grant
            } else {
                TokenKind::Token
            },
            parent: self.parent.clone(),
            subjects: grant.map(|g| g.subjects.clone()),
            fields: grant.map(|g| g.fields.clone()),
            max_uses: grant.and_then(|g| g.max_uses),
        }
    }
}

/// The kind of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Token,
    Grant,
}

/// A token as stored (never its text).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenDescription {
    pub id: String,
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<Capability>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub revoked: bool,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
    pub cert_subject: Option<String>,
    pub kind: TokenKind,
    /// For a grant: the token that minted it.
    pub parent: Option<String>,
    pub subjects: Option<Vec<String>>,
    pub fields: Option<Vec<String>>,
    pub max_uses: Option<u64>,
}

/// Every token and grant.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenDescription>,
}

/// An authenticated token, with what the decision needs.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub record: Arc<TokenRecord>,
    /// Revoked itself or through any ancestor.
    pub revoked: bool,
    /// The earliest expiry along the parent chain.
    pub expires_at: u64,
    pub uses: u64,
}

impl Authenticated {
    pub fn view(&self) -> TokenView<'_> {
        TokenView {
            purposes: &self.record.purposes,
            capabilities: &self.record.capabilities,
            expires_at: self.expires_at,
            revoked: self.revoked,
            uses: self.uses,
            grant: self.record.grant.as_ref(),
        }
    }

    /// The grant's use limit, if it has one.
    pub fn max_uses(&self) -> Option<u64> {
        self.record.grant.as_ref().and_then(|g| g.max_uses)
    }
}

pub struct Tokens {
    /// Hashes token texts and link codes.
    key: MacKey,
    mac: RecordMac,
    cache: RwLock<HashMap<[u8; 32], Arc<TokenRecord>>>,
    /// The store is shared with other nodes: no record is served from this
    /// process's cache, so a revocation on any node holds on the next call.
    shared: bool,
    /// Ids named by the revocation ledger, with the token's expiry where
    /// the entry's note gives it.
    revoked: RwLock<HashMap<String, Option<u64>>>,
    ledger: Ledger,
}

pub struct NewToken {
    pub caller: String,
    pub purposes: Vec<String>,
    pub capabilities: Vec<Capability>,
    pub ttl_secs: u64,
    pub cert_subject: Option<String>,
    pub parent: Option<String>,
    pub grant: Option<GrantScope>,
}

/// A fresh token id (chosen before issuing, so the audit entry can name it).
pub fn new_token_id() -> String {
    format!("tok_{}", hex::encode(random_bytes::<8>()))
}

impl Tokens {
    /// `ledger` is the revocation ledger; `entries` are its entries, whose
    /// ids are revoked.
    pub fn new(
        key: &SecretKey,
        mac_key: &SecretKey,
        ledger: Ledger,
        entries: impl IntoIterator<Item = crate::ledger::LedgerEntry>,
    ) -> Tokens {
        Tokens {
            key: MacKey::new(key),
            mac: RecordMac::new(SecretKey::from_bytes(mac_key.expose_secret()).expect("32 bytes")),
            cache: RwLock::new(HashMap::new()),
            shared: false,
            revoked: RwLock::new(
                entries
                    .into_iter()
                    .map(|e| {
                        let at = expiry_noted(&e);
                        (e.id, at)
                    })
                    .collect(),
            ),
            ledger,
        }
    }

    /// For a store that other nodes write too: every lookup reads the
    /// token's records from the store.
    pub fn on_shared_store(mut self) -> Tokens {
        self.shared = true;
        self
    }

    fn hash(&self, text: &str) -> [u8; 32] {
        self.key.parts(&[b"pdvault-token-v1", text.as_bytes()])
    }

    fn encode(&self, rec: &TokenRecord) -> Vec<u8> {
        let json = serde_json::to_vec(rec).expect("json");
        self.mac.seal("token", rec.id.as_bytes(), &json)
    }

    /// Checks the MAC; a record that fails it is refused (and reported).
    fn decode(&self, id: &str, bytes: &[u8]) -> Result<TokenRecord> {
        let tampered = || {
            tracing::error!(token_id = %id, "a stored token record fails its MAC: refused (the data directory was altered)");
            VaultError::TokenInvalid
        };
        let json = self.mac.open("token", id.as_bytes(), bytes).ok_or_else(tampered)?;
        let rec: TokenRecord = serde_json::from_slice(json).map_err(|_| tampered())?;
        if rec.id != id {
            return Err(tampered());
        }
        Ok(rec)
    }

    /// Creates and stores a token; the caller flushes.
    pub fn issue(&self, store: &Store, id: String, t: NewToken, now: u64) -> Result<(TokenRecord, TokenSecret)> {
        let secret = TokenSecret::generate();
        self.register(store, id, t, now, &secret).map(|r| (r, secret))
    }

    /// Stores a token with a given text (dev mode re-registers `admin.token`).
    pub fn register(
        &self,
        store: &Store,
        id: String,
        t: NewToken,
        now: u64,
        secret: &TokenSecret,
    ) -> Result<TokenRecord> {
        let h = self.hash(secret.expose());
        let rec = TokenRecord {
            id,
            caller: t.caller,
            purposes: t.purposes,
            capabilities: t.capabilities,
            created_at: now,
            expires_at: now.saturating_add(t.ttl_secs),
            revoked_at: None,
            cert_subject: t.cert_subject,
            parent: t.parent,
            grant: t.grant,
            hash: hex::encode(h),
        };
        let mut c = Commit::default();
        c.insert(Space::Tokens, &rec.id, self.encode(&rec));
        c.insert(Space::TokenHashes, h, &rec.id);
        store.apply(&c)?;
        Ok(rec)
    }

    fn load(&self, store: &Store, id: &str) -> Result<Option<TokenRecord>> {
        match store.get(Space::Tokens, id)? {
            Some(b) => match self.decode(id, &b) {
                Ok(r) => Ok(Some(r)),
                Err(VaultError::TokenInvalid) => Ok(None),
                Err(e) => Err(e),
            },
            None => Ok(None),
        }
    }

    fn is_revoked(&self, rec: &TokenRecord) -> bool {
        rec.revoked_at.is_some() || self.revoked.read().expect("revoked set").contains_key(&rec.id)
    }

    /// Finds the token behind a bearer text. `None` when unknown.
    pub fn lookup(&self, store: &Store, keystore: &KeyStore, text: &str) -> Result<Option<Authenticated>> {
        let h = self.hash(text);
        let cached = match self.shared {
            true => None,
            false => self.cache.read().expect("token cache").get(&h).cloned(),
        };
        let rec = match cached {
            Some(r) => r,
            None => {
                let Some(id) = store.get(Space::TokenHashes, h)? else {
                    return Ok(None);
                };
                let id = String::from_utf8_lossy(&id).into_owned();
                let Some(r) = self.load(store, &id)? else {
                    return Ok(None);
                };
                if !ct_eq(r.hash.as_bytes(), hex::encode(h).as_bytes()) {
                    tracing::error!(token_id = %id, "a token hash points at another token's record: refused");
                    return Ok(None);
                }
                crate::faults::pause("PDVAULT_FAULT_TOKEN_FILL_PAUSE", &r.caller);
                let r = Arc::new(r);
                if !self.shared {
                    self.cache.write().expect("token cache").insert(h, r.clone());
                }
                r
            }
        };
        // Walk the parent chain: a revoked or expired parent ends its grants.
        let (mut revoked, mut expires_at) = (self.is_revoked(&rec), rec.expires_at);
        let mut parent = rec.parent.clone();
        let mut depth = 0;
        while let Some(pid) = parent {
            depth += 1;
            match self.load(store, &pid)? {
                Some(p) if depth < 8 => {
                    revoked |= self.is_revoked(&p);
                    expires_at = expires_at.min(p.expires_at);
                    parent = p.parent;
                }
                _ => {
                    revoked = true;
                    parent = None;
                }
            }
        }
        let uses = if rec.grant.as_ref().is_some_and(|g| g.max_uses.is_some()) {
            keystore.uses(&rec.id)?
        } else {
            0
        };
        Ok(Some(Authenticated {
            record: rec,
            revoked,
            expires_at,
            uses,
        }))
    }

    /// Takes up to `n` uses of a limited grant, atomically; returns how many
    /// were taken (all `n` for an unlimited token). The caller makes the key
    /// store durable before it releases anything.
    pub fn take_uses(&self, keystore: &KeyStore, a: &Authenticated, n: u64) -> Result<u64> {
        match a.max_uses() {
            None => Ok(n),
            Some(max) => keystore.take_uses(&a.record.id, max, n),
        }
    }

    pub fn list(&self, store: &Store) -> Result<Vec<TokenRecord>> {
        let mut out = vec![];
        for kv in store.scan(Space::Tokens, []) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if let Ok(mut r) = self.decode(&id, &v) {
                if r.revoked_at.is_none() && self.is_revoked(&r) {
                    r.revoked_at = Some(r.created_at);
                }
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Drops the records of tokens that expired before `cutoff`: their
    /// record, their hash's entry and a limited grant's use counter. Such a
    /// token is refused whatever its record says (an expired parent ends its
    /// grants too, and a missing one revokes them), so the records only
    /// grew: every grant and self-service session left one, listed by
    /// `GET /v1/admin/tokens` for ever. The revocation ledger's entries go
    /// by `compact_revocations`. Returns how many were dropped; nothing here is flushed (what
    /// a crash undoes, the next sweep does again).
    pub fn sweep_expired(&self, store: &Store, keystore: &KeyStore, cutoff: u64) -> Result<usize> {
        let mut gone = vec![];
        for kv in store.scan(Space::Tokens, []) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            // A record that fails its MAC is refused anyway; it stays for
            // the operator to see.
            match self.decode(&id, &v) {
                Ok(r) if r.expires_at < cutoff => gone.push(r),
                _ => {}
            }
        }
        for part in gone.chunks(256) {
            // The counters first: a crash between the two leaves a record
            // (expired) with no counter, never a counter nothing names.
            let mut uses = Commit::default();
            let mut records = Commit::default();
            for r in part {
                if r.grant.as_ref().is_some_and(|g| g.max_uses.is_some()) {
                    uses.remove(Space::GrantUses, &r.id);
                }
                records.remove(Space::Tokens, &r.id);
                if let Ok(h) = hex::decode(&r.hash) {
                    records.remove(Space::TokenHashes, h);
                }
            }
            if !uses.is_empty() {
                keystore.store.apply(&uses)?;
            }
            store.apply(&records)?;
        }
        if !gone.is_empty() {
            let ids: HashSet<&str> = gone.iter().map(|r| r.id.as_str()).collect();
            self.cache
                .write()
                .expect("token cache")
                .retain(|_, r| !ids.contains(r.id.as_str()));
        }
        Ok(gone.len())
    }

    pub fn get(&self, store: &Store, id: &str) -> Result<Option<TokenRecord>> {
        self.load(store, id)
    }

    /// Revokes at once: the ledger entry is durable and the revoked set holds
    /// the id before this returns, so no lookup after it accepts the token.
    /// The record's change goes into `c` (with `Some(true)` when there was
    /// one); the caller applies and flushes it.
    pub fn revoke(
        &self,
        store: &Store,
        keys: &crate::keyring::Keyring,
        id: &str,
        now: u64,
        c: &mut Commit,
    ) -> Result<Option<(TokenRecord, bool)>> {
        let Some(mut rec) = self.load(store, id)? else {
            return Ok(None);
        };
        if !self.revoked.read().expect("revoked set").contains_key(id) {
            // The token's expiry goes with it: the entry is dropped once
            // the token has expired (`compact_revocations`).
            let note = serde_json::json!({
                "token_id": id,
                "revoked_at": crate::fsutil::rfc3339(now),
                "expires_at": crate::fsutil::rfc3339(rec.expires_at),
            });
            let sig = crate::receipt::sign(keys.receipt_key(), &note);
            self.ledger.append(id, &note, &sig)?;
            self.revoked
                .write()
                .expect("revoked set")
                .insert(id.to_owned(), Some(rec.expires_at));
        }
        let changed = rec.revoked_at.is_none();
        if changed {
            rec.revoked_at = Some(now);
            c.insert(Space::Tokens, id, self.encode(&rec));
        }
        let mut cache = self.cache.write().expect("token cache");
        for v in cache.values_mut() {
            if v.id == id {
                *v = Arc::new(rec.clone());
            }
        }
        Ok(Some((rec, changed)))
    }

    /// Drops from the revocation ledger the entries of tokens that expired
    /// before `cutoff`. An expired token is refused whatever its record
    /// says, and so are its grants (a grant's expiry is its parent's at the
    /// latest), so no restored copy of its record can be used again: only
    /// the ledger grew, by a line a sign-out. The expiry is the note's; an
    /// entry written before notes carried it goes by the token's record,
    /// and stays while that record is gone or unreadable. Returns how many
    /// entries were dropped.
    pub fn compact_revocations(
        &self,
        store: &Store,
        keys: &crate::keyring::Keyring,
        cutoff: u64,
        now: u64,
    ) -> Result<usize> {
        let expired = |e: &crate::ledger::LedgerEntry| {
            let at = match e.receipt.get("expires_at") {
                Some(_) => expiry_noted(e),
                None => self.load(store, &e.id).ok().flatten().map(|r| r.expires_at),
            };
            at.is_some_and(|at| at < cutoff)
        };
        let sign = |note: &serde_json::Value| crate::receipt::sign(keys.receipt_key(), note);
        let gone = self.ledger.compact(&expired, &sign, now)?;
        // The set forgets those ids, and those of tokens whose noted expiry
        // is as old, though another node's compaction dropped their entries.
        let mut revoked = self.revoked.write().expect("revoked set");
        for id in &gone {
            revoked.remove(id);
        }
        revoked.retain(|_, at| at.is_none_or(|at| at >= cutoff));
        Ok(gone.len())
    }

    /// How many entries the revocation ledger holds.
    pub fn revocations(&self) -> Result<u64> {
        self.ledger.count()
    }

    /// Start and restore: marks every token the revocation ledger names as
    /// revoked in the data store, each change committed with what `also`
    /// adds (its event). Returns how many records it changed.
    pub fn replay_revocations(
        &self,
        store: &Store,
        also: impl Fn(&mut Commit, &TokenRecord) -> Result<()>,
    ) -> Result<usize> {
        let ids: Vec<String> = self.revoked.read().expect("revoked set").keys().cloned().collect();
        let now = crate::fsutil::now_secs();
        let mut n = 0;
        for id in ids {
            if let Some(mut rec) = self.load(store, &id)? {
                if rec.revoked_at.is_none() {
                    rec.revoked_at = Some(now);
                    let mut c = Commit::default();
                    c.insert(Space::Tokens, &id, self.encode(&rec));
                    also(&mut c, &rec)?;
                    store.apply(&c)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Whether a token text is known and usable (dev-mode start-up check).
    pub fn is_usable(&self, store: &Store, keystore: &KeyStore, text: &str, now: u64) -> Result<bool> {
        Ok(self
            .lookup(store, keystore, text)?
            .is_some_and(|a| !a.revoked && a.expires_at > now))
    }
}

/// The token's expiry that a revocation entry's note gives (notes written
/// before it was noted give none).
fn expiry_noted(e: &crate::ledger::LedgerEntry) -> Option<u64> {
    e.receipt
        .get("expires_at")
        .and_then(|v| v.as_str())
        .and_then(crate::fsutil::parse_rfc3339)
}

/// A self-service link's code, as stored: single use, short-lived.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfCode {
    pub subject: String,
    pub expires_at: u64,
    /// The token that made the link: the session is its child, so revoking
    /// the shop's token ends the sessions it opened.
    pub parent: String,
}

impl Tokens {
    fn code_key(&self, text: &str) -> [u8; 32] {
        self.key.parts(&[b"pdvault-self-code-v1", text.as_bytes()])
    }

    /// Stores a code under a keyed hash of its text (never the text), MACed
    /// like a token record. The caller flushes.
    pub fn put_code(&self, store: &Store, text: &str, code: &SelfCode) -> Result<()> {
        let key = self.code_key(text);
        let json = serde_json::to_vec(code).expect("json");
        store.insert(Space::SelfCodes, key, self.mac.seal("self-code", &key, &json))?;
        Ok(())
    }

    /// Takes a code out (at most once: the take is atomic), if it is
    /// known, authentic and unexpired. The caller flushes before using it.
    pub fn take_code(&self, store: &Store, text: &str, now: u64) -> Result<Option<SelfCode>> {
        let key = self.code_key(text);
        let Some(stored) = store.take(Space::SelfCodes, key)? else {
            return Ok(None);
        };
        let code = self
            .mac
            .open("self-code", &key, &stored)
            .and_then(|json| serde_json::from_slice::<SelfCode>(json).ok());
        Ok(code.filter(|c| now < c.expires_at))
    }

    /// Drops expired codes (the scheduler's sweep).
    pub fn sweep_codes(&self, store: &Store, now: u64) -> Result<usize> {
        let mut n = 0;
        for kv in store.scan(Space::SelfCodes, []) {
            let (k, v) = kv?;
            let live = <[u8; 32]>::try_from(k.as_ref()).ok().and_then(|key| {
                let json = self.mac.open("self-code", &key, &v)?;
                serde_json::from_slice::<SelfCode>(json).ok()
            });
            if live.is_none_or(|c| now >= c.expires_at) {
                store.remove(Space::SelfCodes, k)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
