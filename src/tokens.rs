//! Bearer tokens: issue, look up, revoke, and delegated grants.
//!
//! Owns the token record and where it lives (`tokens`, `token_hashes`,
//! `grant_uses` trees). A token's text is 256 random bits, shown once; the
//! store keeps only HMAC-SHA256(token key, text). Lookups go through a small
//! in-memory cache that revocation updates at once.

use crate::crypto::{hmac_parts, random_bytes, SecretKey};
use crate::error::{Result, VaultError};
use crate::policy::{Capability, GrantScope, TokenView};
use crate::storage::Store;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

/// The text of a token. Shown once, never stored, never printed by accident.
pub struct TokenSecret(Zeroizing<String>);

impl TokenSecret {
    fn generate() -> Self {
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
}

impl TokenRecord {
    /// The public description (never the text or its hash).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "caller": self.caller,
            "purposes": self.purposes,
            "capabilities": self.capabilities,
            "created_at": crate::fsutil::rfc3339(self.created_at),
            "expires_at": crate::fsutil::rfc3339(self.expires_at),
            "revoked": self.revoked_at.is_some(),
            "revoked_at": self.revoked_at.map(crate::fsutil::rfc3339),
            "cert_subject": self.cert_subject,
            "kind": if self.grant.is_some() { "grant" } else { "token" },
            "parent": self.parent,
            "subjects": self.grant.as_ref().map(|g| &g.subjects),
            "fields": self.grant.as_ref().map(|g| &g.fields),
            "max_uses": self.grant.as_ref().and_then(|g| g.max_uses),
        })
    }
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
}

pub struct Tokens {
    key: SecretKey,
    cache: RwLock<HashMap<[u8; 32], Arc<TokenRecord>>>,
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

impl Tokens {
    pub fn new(key: &SecretKey) -> Tokens {
        Tokens {
            key: SecretKey::from_bytes(key.expose_secret()).expect("32 bytes"),
            cache: RwLock::new(HashMap::new()),
        }
    }

    fn hash(&self, text: &str) -> [u8; 32] {
        hmac_parts(self.key.expose_secret(), &[b"pdvault-token-v1", text.as_bytes()])
    }

    /// Creates and stores a token; the caller flushes.
    pub fn issue(&self, store: &Store, t: NewToken, now: u64) -> Result<(TokenRecord, TokenSecret)> {
        let secret = TokenSecret::generate();
        self.register(store, t, now, &secret).map(|r| (r, secret))
    }

    /// Stores a token with a given text (dev mode re-registers `admin.token`).
    pub fn register(&self, store: &Store, t: NewToken, now: u64, secret: &TokenSecret) -> Result<TokenRecord> {
        let rec = TokenRecord {
            id: format!("tok_{}", hex::encode(random_bytes::<8>())),
            caller: t.caller,
            purposes: t.purposes,
            capabilities: t.capabilities,
            created_at: now,
            expires_at: now.saturating_add(t.ttl_secs),
            revoked_at: None,
            cert_subject: t.cert_subject,
            parent: t.parent,
            grant: t.grant,
        };
        let h = self.hash(secret.expose());
        store
            .tokens
            .insert(rec.id.as_bytes(), serde_json::to_vec(&rec).expect("json"))?;
        store.token_hashes.insert(h, rec.id.as_bytes())?;
        Ok(rec)
    }

    fn load(&self, store: &Store, id: &str) -> Result<Option<TokenRecord>> {
        Ok(match store.tokens.get(id.as_bytes())? {
            Some(b) => Some(serde_json::from_slice(&b).map_err(|_| VaultError::internal("corrupt token record"))?),
            None => None,
        })
    }

    /// Finds the token behind a bearer text. `None` when unknown.
    pub fn lookup(&self, store: &Store, text: &str) -> Result<Option<Authenticated>> {
        let h = self.hash(text);
        let cached = self.cache.read().expect("token cache").get(&h).cloned();
        let rec = match cached {
            Some(r) => r,
            None => {
                let Some(id) = store.token_hashes.get(h)? else {
                    return Ok(None);
                };
                let id = String::from_utf8_lossy(&id).into_owned();
                let Some(r) = self.load(store, &id)? else {
                    return Ok(None);
                };
                let r = Arc::new(r);
                self.cache.write().expect("token cache").insert(h, r.clone());
                r
            }
        };
        // Walk the parent chain: a revoked or expired parent ends its grants.
        let (mut revoked, mut expires_at) = (rec.revoked_at.is_some(), rec.expires_at);
        let mut parent = rec.parent.clone();
        let mut depth = 0;
        while let Some(pid) = parent {
            depth += 1;
            match self.load(store, &pid)? {
                Some(p) if depth < 8 => {
                    revoked |= p.revoked_at.is_some();
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
            store
                .grant_uses
                .get(rec.id.as_bytes())?
                .map(|b| u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
                .unwrap_or(0)
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

    /// Takes one use of a limited grant, atomically; false when none is left.
    pub fn consume_use(&self, store: &Store, a: &Authenticated) -> Result<bool> {
        let Some(max) = a.record.grant.as_ref().and_then(|g| g.max_uses) else {
            return Ok(true);
        };
        let mut took = false;
        store.grant_uses.fetch_and_update(a.record.id.as_bytes(), |old| {
            let n = old
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(0);
            took = n < max;
            Some((if took { n + 1 } else { n }).to_be_bytes().to_vec())
        })?;
        Ok(took)
    }

    pub fn list(&self, store: &Store) -> Result<Vec<TokenRecord>> {
        let mut out = vec![];
        for v in store.tokens.iter().values() {
            out.push(serde_json::from_slice(&v?).map_err(|_| VaultError::internal("corrupt token record"))?);
        }
        Ok(out)
    }

    pub fn get(&self, store: &Store, id: &str) -> Result<Option<TokenRecord>> {
        self.load(store, id)
    }

    /// Revokes at once: the cache entry is replaced before this returns.
    pub fn revoke(&self, store: &Store, id: &str, now: u64) -> Result<Option<TokenRecord>> {
        let Some(mut rec) = self.load(store, id)? else {
            return Ok(None);
        };
        if rec.revoked_at.is_none() {
            rec.revoked_at = Some(now);
            store
                .tokens
                .insert(id.as_bytes(), serde_json::to_vec(&rec).expect("json"))?;
        }
        let mut cache = self.cache.write().expect("token cache");
        for v in cache.values_mut() {
            if v.id == id {
                *v = Arc::new(rec.clone());
            }
        }
        Ok(Some(rec))
    }

    /// Whether a token text is known and usable (dev-mode start-up check).
    pub fn is_usable(&self, store: &Store, text: &str, now: u64) -> Result<bool> {
        Ok(self
            .lookup(store, text)?
            .is_some_and(|a| !a.revoked && a.expires_at > now))
    }
}
