//! Subject operations: create, read, edit, lookup, batches and the
//! subject's access log (consents are `consents`).

use super::*;

impl Vault {
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
        self.store_subjects(vec![(id.clone(), w, rec, None)], Commit::default())
            .await?;
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
        for (i, fields) in subjects.iter().enumerate() {
            crate::runtime::pause_every(i).await;
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
        let mut items = Vec::with_capacity(pending.len());
        for (i, (id, n)) in pending.into_iter().enumerate() {
            crate::runtime::pause_every(i).await;
            let (w, rec, _) = self.seal_subject(&id, 1, &n, now, now);
            items.push((id, w, rec, None));
        }
        self.store_subjects(items, Commit::default()).await?;
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
        self.release_current(ctx, id, rec, &allowed).await
    }

    /// Releases a loaded record. If an edit re-keyed the subject (or an
    /// erasure shredded it) since it was loaded, its key is gone: wait for
    /// that write (it holds the subject's lock), load the subject again and
    /// release the version it left. A read sees one version whole, or 410.
    async fn release_current(&self, ctx: &Ctx, id: &str, rec: SubjectRecord, allowed: &Allowed) -> Result<Released> {
        match self.release_record(ctx, id, &rec, allowed) {
            Err(VaultError::DataKeyUnavailable) => {}
            other => return other,
        }
        let _lock = self.stripe(id).lock().await;
        match self.subject_state(id, None)? {
            (SubjectState::Erased, _) => Err(VaultError::SubjectErased),
            (_, Some(now)) => self.release_record(ctx, id, &now, allowed),
            (_, None) => Err(VaultError::SubjectNotFound),
        }
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
            staged.push(match self.cfg.policy.decide(&auth.view(), &req) {
                Ok(a) => Ok((id, rec.expect("live subject has a record"), a)),
                Err(e) => Err((id, e)),
            });
        }
        // A use is one release of one subject: a limited grant releases as
        // many items as it has uses left; the rest are refused one by one.
        let wanted = staged.iter().filter(|s| s.is_ok()).count() as u64;
        let mut uses = if wanted > 0 {
            self.take_uses(ctx, auth, "batch_get", None, wanted).await?
        } else {
            0
        };
        let mut drafts = Vec::with_capacity(staged.len());
        let mut decided = Vec::with_capacity(staged.len());
        for s in staged {
            match s {
                Ok((id, rec, a)) if uses > 0 => {
                    uses -= 1;
                    let names = a.fields.iter().map(|(n, _)| n.clone()).collect();
                    drafts.push(self.draft(ctx, Some(auth), "batch_get", Some(id), names, None));
                    decided.push(Ok((id, rec, a)));
                }
                Ok((id, _, _)) => {
                    let e = VaultError::TokenInvalid;
                    drafts.push(self.draft(ctx, Some(auth), "batch_get", Some(id), asked_names(asked), Some(&e)));
                    decided.push(Err((id, e)));
                }
                Err((id, e)) => {
                    drafts.push(self.draft(ctx, Some(auth), "batch_get", Some(id), asked_names(asked), Some(&e)));
                    decided.push(Err((id, e)));
                }
            }
        }
        self.record(drafts).await?;
        let mut out = Vec::with_capacity(decided.len());
        for s in decided {
            out.push(match s {
                Ok((id, rec, a)) => match self.release_current(ctx, id, rec, &a).await {
                    Ok(r) => BatchItem::Ok(r),
                    Err(e) => BatchItem::Err {
                        id: Some(id.clone()),
                        error: e,
                    },
                },
                Err((id, e)) => BatchItem::Err {
                    id: Some(id.clone()),
                    error: e,
                },
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
        let mut current = match self.open_fields(id, &rec, None) {
            // Another node's write of this subject won since it was loaded,
            // and destroyed the key of the version this edit started from.
            Err(VaultError::DataKeyUnavailable) => {
                return Err(match self.subject_state(id, None)? {
                    (SubjectState::Erased, _) => VaultError::SubjectErased,
                    (_, Some(now)) if now.version != rec.version => {
                        VaultError::VersionConflict { current: now.version }
                    }
                    _ => VaultError::DataKeyUnavailable,
                });
            }
            other => other?,
        };
        let mut changed: Vec<String> = vec![];
        for (name, value) in changes {
            let before = current.iter().find(|(n, _)| *n == name).map(|(_, v)| v.expose());
            if before != value.as_ref().map(|v| v.expose()) && !changed.contains(&name) {
                changed.push(name.clone());
            }
            current.retain(|(n, _)| *n != name);
            if let Some(v) = value {
                current.push((name, v));
            }
        }
        current.sort_by(|a, b| a.0.cmp(&b.0));
        let now = now_secs();
        let version = rec.version + 1;
        let (w, new_rec, _) = self.seal_subject(id, version, &current, rec.created_at, now);
        let mut c = Commit::default();
        changed.sort();
        let data = json!({"subject": id, "fields": changed, "version": version});
        self.stage_event(&mut c, NewEvent::about(EventType::SubjectRectified, id, data))?;
        self.store_subjects(vec![(id.to_owned(), w, new_rec, Some(rec))], c)
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
        for kv in self.store.scan(Space::Index, &ix) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[ix.len()..]).into_owned();
            if scope.is_some_and(|s| !s.contains(&id)) {
                continue;
            }
            let stamp = crate::storage::read_u64(&v);
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

    /// Marks a write as activity (for the retention sweeper).
    pub(super) fn touch(&self, c: &mut Commit, id: &str) -> Result<()> {
        if let Some(b) = self.store.get(Space::Subjects, id)? {
            let mut rec = SubjectRecord::decode(&b)?;
            let now = now_secs();
            c.remove(Space::Activity, activity_key(rec.updated_at, id));
            rec.updated_at = now;
            c.insert(Space::Activity, activity_key(now, id), []);
            c.insert(Space::Subjects, id, rec.encode());
        }
        Ok(())
    }

    // ----- access log -------------------------------------------------------------

    pub async fn access_log(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        id: &str,
        after: &crate::audit::AccessCursor,
        limit: usize,
    ) -> Result<crate::audit::AccessLogPage> {
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
        crate::audit::access_page(&self.store, id, after, limit.clamp(1, 1000))
    }
}
