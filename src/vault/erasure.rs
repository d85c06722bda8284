//! Erasure: crypto-shredding with signed receipts, the retention sweeper, the
//! shred ledger's replay and `restore`.

use super::*;

impl Vault {
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
        Ok(match self.store.get(Space::Erased, id)? {
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
        self.keystore.flusher().sync().await?;
        let c = purge_subject(&self.store, &entry, &self.cfg.events)?;
        self.store.flusher.sync().await?;
        self.committed(&c);
        Ok(Erasure { receipt, signature })
    }

    /// The retention sweeper: erases subjects with no write since `cutoff`.
    pub async fn sweep_inactive(&self, cutoff: u64, why: &str) -> Result<usize> {
        let end = activity_key(cutoff, "");
        let ids: Vec<String> = self
            .store
            .scan(Space::Activity, [])
            .filter_map(|kv| kv.ok())
            .take_while(|(k, _)| k.as_slice() < end.as_slice())
            .map(|(k, _)| String::from_utf8_lossy(&k[8..]).into_owned())
            .collect();
        let mut n = 0;
        for id in ids {
            let _lock = self.stripe(&id).lock().await;
            let Some(b) = self.store.get(Space::Subjects, &id)? else {
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
                target_token_id: None,
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
}

/// Removes an erased subject's data and records its receipt. Idempotent;
/// needs no key, so `restore` and every start can run it.
///
/// The receipt, the `subject.erased` event and the removal of the data land
/// in one commit (who received the data is read from the access index
/// first, since it goes with the data): an erasure interrupted anywhere is
/// finished, and its event staged exactly when the receipt is, by the
/// ledger's replay. No reader ever sees a record beside its receipt, which
/// is what lets `subject_state` look for the record first. Returns the
/// commit.
fn purge_subject(store: &Store, e: &LedgerEntry, events: &crate::config::EventsConfig) -> Result<Commit> {
    let id = e.id.as_str();
    let mut c = Commit::default();
    if !store.contains(Space::Erased, id)? {
        let v = json!({"receipt": e.receipt, "signature": e.signature, "ledger_seq": e.seq});
        c.insert(Space::Erased, id, serde_json::to_vec(&v).expect("json"));
        let received = crate::audit::received_by(store, id)?;
        let per_subscriber = events
            .subscribers
            .iter()
            .map(|s| {
                let (mut got, mut fields) = (false, std::collections::BTreeSet::new());
                for caller in s.callers() {
                    if let Some(f) = received.get(&caller) {
                        got = true;
                        fields.extend(f.iter().cloned());
                    }
                }
                (s.name.clone(), json!({"received": got, "fields_received": fields}))
            })
            .collect();
        let data = json!({"subject": id, "receipt": e.receipt, "signature": e.signature});
        let ev = NewEvent {
            per_subscriber,
            id: Some(crate::events::fixed_event_id(EventType::SubjectErased, id)),
            ..NewEvent::about(EventType::SubjectErased, id, data)
        };
        crate::events::stage(store, events, &mut c, ev)?;
    }
    if let Some(b) = store.get(Space::Subjects, id)? {
        if let Ok(rec) = SubjectRecord::decode(&b) {
            remove_subject(&mut c, id, &rec);
        } else {
            c.remove(Space::Subjects, id);
        }
    }
    for k in store.keys(Space::Consents, consent_prefix(id))? {
        c.remove(Space::Consents, k);
    }
    crate::audit::forget_subject(store, &mut c, id)?;
    store.apply(&c)?;
    Ok(c)
}

/// Adds the removal of a subject's record, index entries and activity time.
fn remove_subject(c: &mut Commit, id: &str, rec: &SubjectRecord) {
    for ix in &rec.index {
        c.remove(Space::Index, Vault::index_entry_key(ix, id));
    }
    c.remove(Space::Activity, activity_key(rec.updated_at, id));
    c.remove(Space::Subjects, id);
}

/// Applies the shred ledger to a data directory (and the key store): every
/// subject it names is removed and marked erased. Skips what an earlier
/// replay already did, unless this data directory has not seen it.
pub fn replay_ledger(
    store: &Store,
    keystore: &KeyStore,
    entries: &[LedgerEntry],
    events: &crate::config::EventsConfig,
) -> Result<usize> {
    let applied = store
        .get(Space::Meta, "ledger_applied")?
        .and_then(|b| serde_json::from_slice::<(u64, String)>(&b).ok());
    let start = match applied {
        Some((seq, hash)) if seq >= 1 && entries.get(seq as usize - 1).is_some_and(|e| e.hash == hash) => seq as usize,
        _ => 0,
    };
    let mut n = 0;
    for e in &entries[start.min(entries.len())..] {
        purge_subject(store, e, events)?;
        keystore.remove_all(&e.id)?;
        n += 1;
    }
    if let Some(last) = entries.last() {
        store.insert(
            Space::Meta,
            "ledger_applied",
            serde_json::to_vec(&(last.seq, &last.hash)).expect("json"),
        )?;
    }
    keystore.flusher().sync_blocking()?;
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
    if !crate::keyring::Keyring::exists(&cfg.keys.dir) {
        return Err(VaultError::BadRequest(format!(
            "no keys in {}: restore needs the keys directory the vault ran with (its master.key and data keys)",
            cfg.keys.dir.display()
        )));
    }
    // The keys first: a keys directory a running server holds stops the
    // restore here, before the data directory is touched.
    let keystore = KeyStore::open_with(cfg)?;
    let result = restore_into(cfg, &keystore, input);
    if result.is_err() {
        // It was empty (or missing): a failed restore leaves it so, and the
        // retry is not refused as "not empty".
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn restore_into(cfg: &Config, keystore: &KeyStore, input: &mut dyn std::io::Read) -> Result<Value> {
    let dir = &cfg.data_dir;
    crate::fsutil::create_private_dir(dir)?;
    let store = Store::open_with(cfg)?;
    if !store.is_empty()? {
        return Err(VaultError::BadRequest(
            "the data store is not empty: restore needs an empty data database".into(),
        ));
    }
    let (header, records) = store.read_backup(input)?;
    let base_of = |head: &Value| -> Option<crate::audit::ChainBase> {
        Some(crate::audit::ChainBase {
            seq: head["seq"].as_u64()?,
            hash: head["hash"].as_str()?.to_owned(),
            backup_created_at: header["created_at"].as_str().unwrap_or_default().to_owned(),
            signature: head["signature"].as_str().map(str::to_owned),
        })
    };
    match header["audit_heads"].as_array() {
        // A shared store: every node's chain continues from its head.
        Some(heads) if store.is_shared() => {
            // This data directory is the node that made the backup (its id),
            // unless it is a node already: its chain continues too.
            if let Some(node) = header["node"].as_str().filter(|n| uuid::Uuid::parse_str(n).is_ok()) {
                let path = dir.join(super::nodes::NODE_ID_FILE);
                if !path.exists() {
                    crate::fsutil::write_atomic(&path, node.as_bytes())?;
                }
            }
            for h in heads {
                if let (Some(node), Some(base)) = (h["node"].as_str(), base_of(h)) {
                    crate::audit::write_shared_base(&store, node, &base)?;
                }
            }
        }
        _ => {
            if let Some(base) = base_of(&header["audit_head"]) {
                crate::audit::write_base(dir, &base)?;
            }
        }
    }
    let (_, entries) = crate::ledger::open(cfg, keystore, LedgerKind::Shred)?;
    store.remove(Space::Meta, "ledger_applied")?;
    let replayed = replay_ledger(&store, keystore, &entries, &cfg.events)?;
    // Revocations are replayed against the token records at the next start
    // (which needs the keyring); until then no server runs on this directory,
    // and every lookup checks the revocation ledger in any case.
    let (_, revocations) = crate::ledger::open(cfg, keystore, LedgerKind::Revocation)?;
    let mut unrecoverable = vec![];
    for kv in store.scan(Space::Subjects, []) {
        let (k, v) = kv?;
        let id = String::from_utf8_lossy(&k).into_owned();
        let rec = SubjectRecord::decode(&v)?;
        if keystore.get(&id, rec.version)?.is_none() {
            unrecoverable.push((id, rec));
        }
    }
    let mut c = Commit::default();
    for (id, rec) in &unrecoverable {
        remove_subject(&mut c, id, rec);
    }
    store.commit_blocking(&c)?;
    Ok(json!({
        "records": records,
        "backup": header,
        "ledger_entries_replayed": replayed,
        "revocations_on_record": revocations.len(),
        "subjects": store.count(Space::Subjects)?,
        "unrecoverable": unrecoverable.iter().map(|(id, _)| id).collect::<Vec<_>>(),
    }))
}
