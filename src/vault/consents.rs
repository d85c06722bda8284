//! Consents (policy 3.2: a purpose that needs consent releases nothing
//! without it): the records a subject's consents are made of, sealed one per
//! change under the subject's prefix in `consents`, and the answers built
//! from them. The latest record of a purpose is the consent in force; no
//! record is no consent.

use super::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

// Also what the store seals, one per change.
/// One consent record.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsentRecord {
    pub purpose: String,
    pub granted: bool,
    #[schema(format = DateTime)]
    pub at: String,
    pub policy_version: String,
    /// Who recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The purpose the change was sent under.
    #[serde(default)]
    pub via: Option<String>,
}

/// The latest consent record of a purpose.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsentState {
    pub granted: bool,
    #[schema(format = DateTime)]
    pub at: String,
    pub policy_version: String,
}

/// A subject's consents: the latest record per purpose and every record, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Consents {
    pub id: String,
    pub consents: BTreeMap<String, ConsentState>,
    pub history: Vec<ConsentRecord>,
}

impl Consents {
    /// The answer made of a subject's records, oldest first.
    fn of(id: &str, history: Vec<ConsentRecord>) -> Consents {
        let consents = history
            .iter()
            .map(|r| {
                let state = ConsentState {
                    granted: r.granted,
                    at: r.at.clone(),
                    policy_version: r.policy_version.clone(),
                };
                (r.purpose.clone(), state)
            })
            .collect();
        Consents {
            id: id.to_owned(),
            consents,
            history,
        }
    }
}

impl Vault {
    /// A subject's consent records, oldest first. A record that fails its
    /// MAC (forged or altered on disk) is left out and reported: absent
    /// consent is no consent.
    fn consent_records(&self, id: &str) -> Result<Vec<ConsentRecord>> {
        let mut out = vec![];
        for kv in self.store.scan(Space::Consents, consent_prefix(id)) {
            let (k, v) = kv?;
            match self
                .records
                .open("consent", &k, &v)
                .and_then(|b| serde_json::from_slice(b).ok())
            {
                Some(r) => out.push(r),
                None => {
                    tracing::error!(subject = %id, "a stored consent record fails its MAC: ignored (the data directory was altered)")
                }
            }
        }
        Ok(out)
    }

    pub(super) fn latest_consent(&self, id: &str, purpose: &str) -> Result<Option<bool>> {
        Ok(self
            .consent_records(id)?
            .iter()
            .rev()
            .find(|r| r.purpose == purpose)
            .map(|r| r.granted))
    }

    pub async fn consents(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<Consents> {
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
        Ok(Consents::of(id, self.consent_records(id)?))
    }

    pub async fn set_consent(
        &self,
        ctx: &Ctx,
        auth: &Authenticated,
        id: &str,
        purpose: &str,
        granted: bool,
    ) -> Result<ConsentRecord> {
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
        let rec = ConsentRecord {
            purpose: purpose.to_owned(),
            granted,
            at: rfc3339(now_secs()),
            policy_version: self.cfg.policy.version.clone(),
            caller: Some(auth.record.caller.clone()),
            via: ctx.purpose.clone(),
        };
        let mut k = consent_prefix(id);
        k.extend_from_slice(&seq.to_be_bytes());
        let sealed = self
            .records
            .seal("consent", &k, &serde_json::to_vec(&rec).expect("json"));
        let mut c = Commit::default();
        c.insert(Space::Consents, k, sealed);
        self.touch(&mut c, id)?;
        let data = json!({"subject": id, "purpose": purpose, "granted": granted});
        self.stage_event(&mut c, NewEvent::about(EventType::ConsentChanged, id, data))?;
        self.store.commit(&c).await?;
        self.committed(&c);
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before this type existed were JSON objects of the
    /// same keys; one without `caller` or `via` still reads, and the latest
    /// record of each purpose is the consent in force.
    #[test]
    fn the_latest_record_of_each_purpose_is_in_force() {
        let old: ConsentRecord = serde_json::from_str(
            r#"{"purpose":"marketing","granted":true,"at":"2026-01-01T00:00:00Z","policy_version":"1"}"#,
        )
        .unwrap();
        let new = ConsentRecord {
            granted: false,
            at: "2026-02-01T00:00:00Z".into(),
            caller: Some("shop".into()),
            ..old.clone()
        };
        let c = Consents::of("s", vec![old, new]);
        assert!(!c.consents["marketing"].granted);
        assert_eq!(c.consents["marketing"].at, "2026-02-01T00:00:00Z");
        assert_eq!(c.history.len(), 2);
        let first = serde_json::to_value(&c.history[0]).unwrap();
        assert!(first.get("caller").is_none() && first["via"].is_null(), "{first}");
    }
}
