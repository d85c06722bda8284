//! Tokens, grants, key rotation and backup: what an operator or a granting
//! service does, and the certificate binding of tokens.

use super::*;

impl Vault {
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
        let id = new_token_id();
        self.record(vec![self.token_draft(ctx, auth, "token_issue", None, vec![], &id)])
            .await?;
        let _g = self.gate.read().await;
        let out = self.tokens.issue(
            &self.store,
            id,
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

    /// Drops the records and revocation ledger entries of tokens expired
    /// for longer than `retention.expired_credentials_kept` (the
    /// scheduler's sweep). Returns how many records were dropped.
    pub fn sweep_expired_tokens(&self, now: u64) -> Result<usize> {
        let cutoff = now.saturating_sub(self.cfg.retention.expired_credentials_kept.as_secs());
        // The ledger first: an entry written before notes carried the
        // token's expiry goes by the record, which the sweep then drops.
        let entries = self
            .tokens
            .compact_revocations(&self.store, &self.keyring, cutoff, now)?;
        if entries > 0 {
            tracing::info!(
                entries,
                "revocation ledger compacted: the entries of long-expired tokens dropped"
            );
        }
        self.tokens.sweep_expired(&self.store, &self.keystore, cutoff)
    }

    pub async fn list_tokens(&self, ctx: &Ctx, auth: &Authenticated) -> Result<Vec<TokenRecord>> {
        self.admin(ctx, auth, "token_list").await?;
        self.record(vec![self.draft(ctx, Some(auth), "token_list", None, vec![], None)])
            .await?;
        let mut list = self.tokens.list(&self.store)?;
        // A token dies with its parent: listed as revoked from the moment the
        // first ancestor was (the lookup refuses it from then on).
        let own: std::collections::HashMap<String, (Option<String>, Option<u64>)> = list
            .iter()
            .map(|t| (t.id.clone(), (t.parent.clone(), t.revoked_at)))
            .collect();
        for t in list.iter_mut().filter(|t| t.revoked_at.is_none()) {
            let (mut parent, mut hops) = (t.parent.clone(), 0);
            while let (Some(p), true) = (parent, hops < 64) {
                let Some((up, at)) = own.get(&p) else { break };
                if at.is_some() {
                    t.revoked_at = *at;
                    break;
                }
                (parent, hops) = (up.clone(), hops + 1);
            }
        }
        Ok(list)
    }

    pub async fn revoke_token(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<TokenRecord> {
        self.admin(ctx, auth, "token_revoke").await?;
        match self.revoke_durably(id).await? {
            Some(r) => {
                self.record(vec![self.token_draft(ctx, auth, "token_revoke", None, vec![], id)])
                    .await?;
                Ok(r)
            }
            None => {
                let e = VaultError::NotFound("no such token".into());
                Err(self.refuse(ctx, auth, "token_revoke", None, vec![], e).await)
            }
        }
    }

    /// Revokes `id` (the ledger first, `Tokens::revoke`), stages its
    /// `grant.revoked` event where it has one, and makes the change durable.
    /// `None`: no such token.
    pub(super) async fn revoke_durably(&self, id: &str) -> Result<Option<TokenRecord>> {
        let _g = self.gate.read().await;
        let mut c = Commit::default();
        let Some((r, changed)) = self.tokens.revoke(&self.store, &self.keyring, id, now_secs(), &mut c)? else {
            return Ok(None);
        };
        if let Some(ev) = grant_revoked_event(&r).filter(|_| changed) {
            self.stage_event(&mut c, ev)?;
        }
        self.store.apply(&c)?;
        self.store.flusher.sync().await?;
        self.committed(&c);
        Ok(Some(r))
    }

    /// Dev mode: make sure the token text in `admin.token` works here.
    pub fn ensure_dev_admin(&self, text: &str) -> Result<bool> {
        let now = now_secs();
        if self.tokens.is_usable(&self.store, &self.keystore, text, now)? {
            return Ok(false);
        }
        self.tokens.register(
            &self.store,
            new_token_id(),
            first_admin_token(),
            now,
            &TokenSecret::from_text(text),
        )?;
        self.store.flusher.sync_blocking()?;
        Ok(true)
    }

    /// `pdvault init`: the first admin token.
    pub fn issue_first_admin(&self) -> Result<TokenSecret> {
        let (_, secret) = self
            .tokens
            .issue(&self.store, new_token_id(), first_admin_token(), now_secs())?;
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
        let id = new_token_id();
        self.record(vec![self.token_draft(
            ctx,
            auth,
            "grant",
            audit_subject,
            fields.clone(),
            &id,
        )])
        .await?;
        let _g = self.gate.read().await;
        let out = self.tokens.issue(
            &self.store,
            id,
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
                    self_service: false,
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
        self.rotate_kek_reporting(&|_, _| {}).await
    }

    /// `rotate_kek`, telling `progress(scanned, total)` how far the re-wrap
    /// pass over the wrapped data keys has come.
    pub async fn rotate_kek_reporting(&self, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<(u32, u64)> {
        let _r = self.rotation.lock().await;
        let now = now_secs();
        // Writers wrap data keys under the current epoch while holding the
        // gate: let those in flight land before the new epoch becomes current,
        // so the re-wrap pass below sees every key left under an old epoch
        // (else a key stored after the pass is lost when its epoch is destroyed).
        let rot = {
            let _g = self.gate.write().await;
            self.keyring
                .begin_rotation(now, self.shared_node_id(), &|id| self.is_serving(id))
                .map_err(keyring_error)?
        };
        // The same for every other node serving the store.
        self.wait_for_take_up(self.keyring.epochs_serial()).await?;
        let rewrapped = self.rewrap_to_current(rot.target, progress).await?;
        self.keyring.finish_rotation(now_secs()).map_err(keyring_error)?;
        self.destroy_expired_epochs().await?;
        Ok((rot.target, rewrapped))
    }

    /// Re-wraps every data key wrapped under an epoch older than `target`
    /// (the current one); returns how many. A concurrent edit or erasure of
    /// a key wins over its re-wrap.
    async fn rewrap_to_current(&self, target: u32, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<u64> {
        let target_kek = self
            .keyring
            .kek(target)
            .ok_or_else(|| VaultError::internal("target epoch missing"))?;
        let abort_after = crate::faults::rotate_abort_after();
        let (mut rewrapped, mut attempted, mut flushed_at) = (0u64, 0u64, 0u64);
        let mut batch = Vec::new();
        let (total, mut scanned) = (self.keystore.count()?, 0u64);
        for kv in self.keystore.store.scan(Space::Wrapped, []) {
            let (k, v) = kv?;
            scanned += 1;
            if scanned % 256 == 0 {
                progress(scanned, total);
            }
            let w: WrappedKey = postcard::from_bytes(&v).map_err(|_| VaultError::internal("corrupt wrapped key"))?;
            if w.epoch >= target {
                continue;
            }
            let Some((id, version)) = crate::storage::parse_dek_key(&k) else {
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
                epoch: target,
                sealed: target_kek.seal(raw.expose(), &dek_aad(id, version, target)),
            };
            // Compare-and-swap, a batch at a time.
            batch.push((k, v, postcard::to_stdvec(&nw).expect("postcard")));
            let abort_now = abort_after.is_some_and(|n| attempted + batch.len() as u64 >= n);
            if batch.len() >= 512 || abort_now {
                attempted += batch.len() as u64;
                rewrapped += self.keystore.store.swap(Space::Wrapped, &std::mem::take(&mut batch))?;
                if rewrapped - flushed_at >= 10_000 {
                    self.keystore.flusher().sync().await?;
                    flushed_at = rewrapped;
                }
            }
            if abort_now {
                self.keystore.flusher().sync().await?;
                tracing::error!("fault point: aborting in the middle of a rotation");
                std::process::abort();
            }
        }
        rewrapped += self.keystore.store.swap(Space::Wrapped, &batch)?;
        progress(scanned, total);
        self.keystore.flusher().sync().await?;
        Ok(rewrapped)
    }

    /// Destroys the retired epochs past `keys.epoch_retention`. Where nodes
    /// share the store, the keys still under those epochs are re-wrapped
    /// first: a node cut off during a rotation may have wrapped some.
    pub async fn destroy_expired_epochs(&self) -> Result<Vec<u32>> {
        let retention = self.cfg.keys.epoch_retention;
        if self.on_shared_store() && self.keyring.any_expired(now_secs(), retention) {
            let stragglers = self.rewrap_to_current(self.keyring.current_epoch(), &|_, _| {}).await?;
            if stragglers > 0 {
                tracing::warn!(
                    rewrapped = stragglers,
                    "data keys were still wrapped under an epoch due for destruction; re-wrapped first"
                );
            }
        }
        let gone = self
            .keyring
            .destroy_expired(now_secs(), retention)
            .map_err(keyring_error)?;
        if !gone.is_empty() {
            tracing::info!(epochs = ?gone, "destroyed retired key epochs");
        }
        Ok(gone)
    }

    /// `/metrics` needs `admin`; scrapes are not audited, refusals are.
    pub async fn admin_metrics(&self, ctx: &Ctx, auth: &Authenticated) -> Result<()> {
        self.admin(ctx, auth, "metrics").await?;
        self.refresh_event_metrics()
    }

    pub async fn admin_rotate(&self, ctx: &Ctx, auth: &Authenticated) -> Result<(u32, u64)> {
        self.admin_rotate_reporting(ctx, auth, &|_, _| {}).await
    }

    pub async fn admin_rotate_reporting(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(u32, u64)> {
        self.admin(ctx, auth, "rotate_kek").await?;
        self.record(vec![self.draft(ctx, Some(auth), "rotate_kek", None, vec![], None)])
            .await?;
        self.rotate_kek_reporting(progress).await
    }

    /// Writes a consistent snapshot of the data directory's trees to `out`.
    /// Holds every writer off while it copies (to local disk, not the network).
    pub async fn backup(&self, ctx: &Ctx, auth: &Authenticated, out: &mut (dyn std::io::Write + Send)) -> Result<u64> {
        self.admin(ctx, auth, "backup").await?;
        self.record(vec![self.draft(ctx, Some(auth), "backup", None, vec![], None)])
            .await?;
        let _g = self.gate.write().await;
        let (seq, head) = self.audit.head();
        let created_at = rfc3339(now_secs());
        let key = self.keyring.receipt_key();
        let base_signature = crate::audit::sign_base(key, seq, &head, &created_at);
        let mut header = json!({
            "format": 1,
            "created_at": created_at,
            "key_epoch": self.keyring.current_epoch(),
            "audit_head": {"seq": seq, "hash": head, "signature": base_signature},
            "ledger_head": self.ledger.head()?.0,
            "note": "ciphertexts, blind-index HMACs and token hashes only; data keys stay in the keys directory",
        });
        if self.on_shared_store() {
            // Every node's chain continues from its head after a restore.
            let mut heads = vec![];
            for (node, h) in crate::audit::chain_heads(&self.store, None)? {
                let (seq, hash) = if node == self.node_id {
                    (seq, head.clone())
                } else {
                    h.unwrap_or((0, crate::audit::GENESIS.to_string()))
                };
                let signature = crate::audit::sign_base(key, seq, &hash, &created_at);
                heads.push(json!({"node": node, "seq": seq, "hash": hash, "signature": signature}));
            }
            header["audit_heads"] = json!(heads);
            header["node"] = json!(self.node_id);
        }
        tokio::task::block_in_place(|| self.store.write_backup(out, &header))
    }

    /// Signs the audit chain's head (at start, on schedule, at shutdown).
    pub fn audit_checkpoint(&self) -> Result<()> {
        self.audit.checkpoint(self.keyring.receipt_key()).map(|_| ())
    }

    /// Moves what the stores' write-ahead logs hold into their engines (at
    /// shutdown), so that the next start has nothing to replay.
    pub fn checkpoint_stores(&self) -> Result<()> {
        self.store.checkpoint()?;
        self.keystore.store.checkpoint()
    }

    /// When the last checkpoint was signed, if ever (the schedule's start).
    pub fn last_checkpoint_at(&self) -> Option<u64> {
        self.audit.last_checkpoint_at()
    }

    /// The outbox as the operator sees it: undelivered events, oldest first.
    pub async fn list_events(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        filter: crate::events::Filter,
    ) -> Result<Vec<crate::events::EventView>> {
        self.admin(ctx, auth, "events_list").await?;
        self.record(vec![self.draft(ctx, Some(auth), "events_list", None, vec![], None)])
            .await?;
        crate::events::list(&self.store, filter, EVENTS_LISTED)
    }

    /// Sends an event's dead deliveries again. Returns how many it re-queued.
    pub async fn retry_event(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<usize> {
        self.admin(ctx, auth, "events_retry").await?;
        let Some(n) = crate::events::retry(&self.store, id)? else {
            let e = VaultError::NotFound("no such undelivered event".into());
            return Err(self.refuse(ctx, auth, "events_retry", None, vec![], e).await);
        };
        self.record(vec![self.draft(ctx, Some(auth), "events_retry", None, vec![], None)])
            .await?;
        self.store.flusher.sync().await?;
        self.events_wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(n)
    }

    /// `pdvault status` / `GET /v1/admin/status` (admin, audited).
    pub async fn admin_status(&self, ctx: &Ctx, auth: &Authenticated) -> Result<Status> {
        self.admin(ctx, auth, "status").await?;
        self.record(vec![self.draft(ctx, Some(auth), "status", None, vec![], None)])
            .await?;
        self.status()
    }

    /// What the operator asks first: is it serving, which key epoch, when the
    /// next rotation is due, the audit head and its last signed checkpoint,
    /// and how much it holds. Counting walks the subject and token trees.
    pub fn status(&self) -> Result<Status> {
        // The epochs as the keys database has them now (another node may
        // have rotated since this one's last heartbeat).
        self.keyring.refresh().map_err(keyring_error)?;
        let (seq, hash) = self.audit.head();
        let last_rotation = self.keyring.last_rotation_at();
        let pending = crate::events::depth(&self.store, &self.cfg.events)?;
        Ok(Status {
            sealed: false,
            key_epoch: self.keyring.current_epoch(),
            rotation_in_progress: self.keyring.rotation().map(|r| r.target),
            last_rotation_at: rfc3339(last_rotation),
            next_rotation_at: rfc3339(last_rotation.saturating_add(self.cfg.keys.rotate_every.as_secs())),
            audit_head: StatusHead { seq, hash },
            last_checkpoint: self
                .audit
                .last_checkpoint()
                .map(|c| StatusCheckpoint { seq: c.seq, at: c.at }),
            subjects: self.store.count(Space::Subjects)?,
            erased: self.store.count(Space::Erased)?,
            tokens: self.store.count(Space::Tokens)?,
            revocations: self.tokens.revocations()?,
            events_pending: pending.iter().map(|(_, n, _)| n).sum(),
        })
    }

    /// Sets the queue gauges (before each scrape).
    pub fn refresh_event_metrics(&self) -> Result<()> {
        let q = crate::events::depth(&self.store, &self.cfg.events)?;
        self.metrics.set_event_queues(&q);
        Ok(())
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

/// At most this many events in one listing (the oldest first).
const EVENTS_LISTED: usize = 1000;

/// The vault at a glance.
// No personal value, no secret: `pdvault status` prints it as it is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Status {
    /// False while a server holds the master key unsealed and serves.
    pub sealed: bool,
    pub key_epoch: u32,
    /// The epoch a rotation under way moves to.
    pub rotation_in_progress: Option<u32>,
    #[schema(format = DateTime)]
    pub last_rotation_at: String,
    /// `last_rotation_at` + `keys.rotate_every`.
    #[schema(format = DateTime)]
    pub next_rotation_at: String,
    pub audit_head: StatusHead,
    pub last_checkpoint: Option<StatusCheckpoint>,
    pub subjects: u64,
    /// Erasure markers kept (receipts on record).
    pub erased: u64,
    /// Tokens on record, revoked and expired ones included.
    pub tokens: u64,
    /// Entries in the revocation ledger: revoked tokens not yet expired for
    /// longer than `retention.expired_credentials_kept`.
    pub revocations: u64,
    /// Deliveries not yet made, over all subscribers.
    pub events_pending: u64,
}

/// The audit chain's head.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = AuditHead)]
pub struct StatusHead {
    pub seq: u64,
    pub hash: String,
}

/// The last signed checkpoint of the audit chain.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = Checkpoint)]
pub struct StatusCheckpoint {
    pub seq: u64,
    #[schema(format = DateTime)]
    pub at: String,
}
