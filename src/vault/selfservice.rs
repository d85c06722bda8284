//! The subject's own page (policy 4.2.1): single-use sign-in links that the
//! shop's backend asks for, and the short sessions they open.
//!
//! A link's code is stored only as a keyed hash, MACed, and taken out at its
//! first use; the session it opens is a grant of that one subject under
//! `subject_access` with `read` and `write` (and, as a self-service session,
//! the erasure of that subject), a child of the token that made the link.

use super::*;
use crate::tokens::SelfCode;

/// How long a link's code lives.
pub const LINK_TTL: u64 = 15 * 60;
/// How long a session lives.
pub const SESSION_TTL: u64 = 30 * 60;
/// The caller name sessions carry in the audit log.
pub const SESSION_CALLER: &str = "self-service";
const SUBJECT_ACCESS: &str = "subject_access";

/// A new link: the code's text is shown once, here.
pub struct SelfLink {
    pub code: TokenSecret,
    pub expires_at: u64,
}

impl Vault {
    /// `POST /v1/subjects/{id}/self-service-links`: needs `grant` under
    /// `subject_access`, on a live subject.
    /// A call without X-Purpose acts under `subject_access`, the one purpose
    /// a link can be made under; any other purpose is refused.
    pub async fn self_service_link(&self, ctx: &Ctx, auth: &Authenticated, id: &str) -> Result<SelfLink> {
        let mut ctx = ctx.clone();
        ctx.purpose.get_or_insert_with(|| SUBJECT_ACCESS.into());
        let ctx = &ctx;
        let (state, _) = self.subject_state(id, ctx.purpose.as_deref())?;
        if ctx.purpose.as_deref() != Some(SUBJECT_ACCESS) {
            let e = VaultError::PurposeNotAllowed("self-service links are made under subject_access".into());
            return Err(self.refuse(ctx, auth, "self_service_link", Some(id), vec![], e).await);
        }
        self.decide(
            ctx,
            auth,
            Action::MintGrant,
            "self_service_link",
            Some(id),
            state,
            FieldsAsked::Named(&[]),
        )
        .await?;
        self.record(vec![self.draft(
            ctx,
            Some(auth),
            "self_service_link",
            Some(id),
            vec![],
            None,
        )])
        .await?;
        let now = now_secs();
        let code = TokenSecret::generate();
        let expires_at = (now + LINK_TTL).min(auth.expires_at);
        let rec = SelfCode {
            subject: id.to_owned(),
            expires_at,
            parent: auth.record.id.clone(),
        };
        self.tokens.put_code(&self.store, code.expose(), &rec)?;
        self.store.flusher.sync().await?;
        Ok(SelfLink { code, expires_at })
    }

    /// `POST /v1/self/session`: the code is the credential. A used, expired
    /// or unknown code is `401 token_invalid` (recorded, with no caller).
    pub async fn self_service_session(&self, ctx: &Ctx, code: &str) -> Result<(TokenRecord, TokenSecret)> {
        let now = now_secs();
        let taken = if code.is_empty() || code.len() > 128 {
            None
        } else {
            self.tokens.take_code(&self.store, code, now)?
        };
        let Some(link) = taken else {
            let e = VaultError::TokenInvalid;
            self.record(vec![self.draft(ctx, None, "self_session", None, vec![], Some(&e))])
                .await?;
            return Err(e);
        };
        // The removal is durable before the session exists: a crash cannot
        // hand the same code out twice.
        self.store.flusher.sync().await?;
        let fields: Vec<String> = self
            .cfg
            .policy
            .purposes
            .get(SUBJECT_ACCESS)
            .map(|p| p.fields.keys().cloned().collect())
            .unwrap_or_default();
        let id = new_token_id();
        let mut sctx = ctx.clone();
        sctx.purpose = Some(SUBJECT_ACCESS.into());
        let mut draft = self.draft(&sctx, None, "self_session", Some(&link.subject), vec![], None);
        draft.target_token_id = Some(id.clone());
        self.record(vec![draft]).await?;
        let _g = self.gate.read().await;
        let out = self.tokens.issue(
            &self.store,
            id,
            NewToken {
                caller: SESSION_CALLER.into(),
                purposes: vec![SUBJECT_ACCESS.into()],
                capabilities: vec![Capability::Read, Capability::Write],
                ttl_secs: SESSION_TTL,
                cert_subject: None,
                parent: Some(link.parent),
                grant: Some(GrantScope {
                    subjects: vec![link.subject],
                    fields,
                    max_uses: None,
                    self_service: true,
                }),
            },
            now,
        )?;
        self.store.flusher.sync().await?;
        Ok(out)
    }

    /// `DELETE /v1/self/session`: the page's sign-out. The session's own
    /// token ends it, revoked as any token is (the revocation ledger: no
    /// restart or restored backup brings it back); any other token is
    /// `403 capability_missing`.
    pub async fn end_self_session(&self, ctx: &Ctx, auth: &Authenticated) -> Result<()> {
        self.decide(
            ctx,
            auth,
            Action::EndSession,
            "self_session_end",
            None,
            SubjectState::NoSubject,
            FieldsAsked::Named(&[]),
        )
        .await?;
        let id = auth.record.id.clone();
        let subject = auth.record.grant.as_ref().and_then(|g| g.subjects.first().cloned());
        self.revoke_durably(&id).await?;
        let mut draft = self.draft(ctx, Some(auth), "self_session_end", subject.as_deref(), vec![], None);
        draft.target_token_id = Some(id);
        self.record(vec![draft]).await
    }

    /// Drops the codes of links never used (the scheduler, every tick).
    pub fn sweep_self_codes(&self, now: u64) -> Result<usize> {
        self.tokens.sweep_codes(&self.store, now)
    }
}
