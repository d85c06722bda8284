//! The purpose policy and the one pure function that decides every call.
//!
//! Owns: the `Policy` model (schema + purposes from config), capabilities, and
//! `decide`, which maps (token, purpose, action, subject state, fields asked)
//! to the fields released or to the first refusal, in the order of API.md:
//! token, purpose, capability, fields, consent, justification, grant scope.
//! It does no I/O and reads no clock: `now` is an argument.

use crate::error::VaultError;
use crate::fields::FieldType;
use crate::release::ReleaseForm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Purpose {
    pub name: String,
    pub clause: String,
    pub description: String,
    pub fields: BTreeMap<String, ReleaseForm>,
    pub write: bool,
    pub erase: bool,
    pub needs_consent: bool,
    /// Opt-out purposes count "no record" as consent.
    pub consent_by_default: bool,
    pub needs_justification: bool,
    pub access_log: bool,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub version: String,
    pub fields: BTreeMap<String, FieldType>,
    pub purposes: BTreeMap<String, Purpose>,
}

// `ToSchema`: the API document's `Capability` is this enum, not a copy of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Read,
    Write,
    Erase,
    Grant,
    Audit,
    Admin,
}

impl Capability {
    pub fn parse(s: &str) -> Option<Capability> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::Erase => "erase",
            Capability::Grant => "grant",
            Capability::Audit => "audit",
            Capability::Admin => "admin",
        }
    }
}

/// What a call does to subject data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Lookup,
    Create,
    Write,
    Erase,
    ConsentRead,
    ConsentWrite,
    AccessLog,
    MintGrant,
    /// Token administration, key rotation, backup, metrics: `admin` alone.
    Admin,
    /// A self-service session ends itself (sign-out): the session alone,
    /// no purpose, no capability.
    EndSession,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Lookup => "lookup",
            Action::Create => "create",
            Action::Write => "write",
            Action::Erase => "erase",
            Action::ConsentRead => "consent_read",
            Action::ConsentWrite => "consent_write",
            Action::AccessLog => "access_log",
            Action::MintGrant => "grant",
            Action::Admin => "admin",
            Action::EndSession => "end_session",
        }
    }
}

/// A delegated token's limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantScope {
    pub subjects: Vec<String>,
    pub fields: Vec<String>,
    pub max_uses: Option<u64>,
    /// A self-service session (the subject's own page): may also erase its
    /// subject, and do nothing that is not about that subject.
    #[serde(default)]
    pub self_service: bool,
}

/// The token as the decision sees it.
#[derive(Debug, Clone)]
pub struct TokenView<'a> {
    pub purposes: &'a [String],
    pub capabilities: &'a [Capability],
    pub expires_at: u64,
    /// Revoked itself, or through its parent.
    pub revoked: bool,
    pub uses: u64,
    pub grant: Option<&'a GrantScope>,
}

/// The subject as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectState {
    /// The call names no existing subject (create, mint a grant).
    NoSubject,
    NotFound,
    Erased,
    /// `consent` is the latest consent record for the call's purpose, if any.
    Live {
        consent: Option<bool>,
    },
}

/// Which fields a call names.
#[derive(Debug, Clone, Copy)]
pub enum FieldsAsked<'a> {
    /// Everything the purpose (or grant) covers.
    Default,
    Named(&'a [String]),
}

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub purpose: Option<&'a str>,
    pub action: Action,
    pub subject_id: Option<&'a str>,
    pub subject: SubjectState,
    pub fields: FieldsAsked<'a>,
    pub justification: Option<&'a str>,
    pub now: u64,
}

/// An allowed call: the fields it touches and the form each is released in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub fields: Vec<(String, ReleaseForm)>,
}

fn capability_for(action: Action) -> Capability {
    match action {
        Action::Read | Action::Lookup | Action::ConsentRead | Action::AccessLog => Capability::Read,
        Action::Create | Action::Write | Action::ConsentWrite => Capability::Write,
        Action::Erase => Capability::Erase,
        Action::MintGrant => Capability::Grant,
        // `EndSession` is decided before any capability is asked for.
        Action::Admin | Action::EndSession => Capability::Admin,
    }
}

/// Whether a purpose permits an action at all.
fn purpose_permits(p: &Purpose, action: Action) -> bool {
    match action {
        Action::Read | Action::Lookup | Action::MintGrant => !p.fields.is_empty(),
        Action::Create | Action::Write | Action::ConsentWrite => p.write,
        // A purpose that depends on consent may see the consent state.
        Action::ConsentRead => p.write || p.needs_consent,
        Action::Erase => p.erase,
        Action::AccessLog => p.access_log,
        Action::Admin | Action::EndSession => true,
    }
}

impl Policy {
    /// The single decision of the vault. Pure: same inputs, same answer.
    pub fn decide(&self, token: &TokenView<'_>, req: &Request<'_>) -> Result<Allowed, VaultError> {
        // 1. the token itself
        let used_up = token.grant.and_then(|g| g.max_uses).is_some_and(|m| token.uses >= m);
        if token.revoked || used_up {
            return Err(VaultError::TokenInvalid);
        }
        if req.now >= token.expires_at {
            return Err(VaultError::TokenExpired);
        }

        // A self-service session acts on its one subject and nothing else
        // (no create, lookup, grant or admin), and may erase that subject
        // (the user's own right, policy 4.2.1) under `subject_access`.
        let session = token.grant.is_some_and(|g| g.self_service);
        let own_subject = matches!(
            req.action,
            Action::Read
                | Action::Write
                | Action::Erase
                | Action::ConsentRead
                | Action::ConsentWrite
                | Action::AccessLog
        );
        if req.action == Action::EndSession {
            return match session {
                true => Ok(Allowed { fields: vec![] }),
                false => Err(VaultError::CapabilityMissing(
                    "only a self-service session can end itself".into(),
                )),
            };
        }
        if session && !own_subject {
            return Err(VaultError::CapabilityMissing(
                "a self-service session acts on its own subject only".into(),
            ));
        }
        let self_erase = session && req.action == Action::Erase;

        // Calls made with `admin` or `audit` alone need no purpose.
        let has = |c: Capability| token.capabilities.contains(&c);
        if req.action == Action::Admin {
            return if has(Capability::Admin) {
                Ok(Allowed { fields: vec![] })
            } else {
                Err(VaultError::CapabilityMissing(
                    "this call needs the admin capability".into(),
                ))
            };
        }
        if req.action == Action::AccessLog && has(Capability::Audit) && req.purpose.is_none() {
            return self.subject_checks(token, req, None, Allowed { fields: vec![] });
        }

        // 2. the purpose
        let Some(pname) = req.purpose else {
            return Err(VaultError::PurposeNotAllowed(
                "this call needs an X-Purpose header".into(),
            ));
        };
        let purpose = match self.purposes.get(pname) {
            Some(p) if token.purposes.iter().any(|t| t == pname) => p,
            _ => {
                return Err(VaultError::PurposeNotAllowed(format!(
                    "the token may not act under purpose {}",
                    printable(pname)
                )))
            }
        };
        if !purpose_permits(purpose, req.action) && !self_erase {
            return Err(VaultError::PurposeNotAllowed(format!(
                "purpose {pname} does not permit {}",
                req.action.as_str()
            )));
        }

        // 3. the capability
        let cap = capability_for(req.action);
        let via_audit = req.action == Action::AccessLog && has(Capability::Audit);
        if !(has(cap) || via_audit || self_erase) {
            return Err(VaultError::CapabilityMissing(format!(
                "this call needs the {} capability",
                cap.as_str()
            )));
        }

        // 4. the fields
        let allowed = self.fields_check(token, purpose, req)?;
        self.subject_checks(token, req, Some(purpose), allowed)
    }

    fn fields_check(&self, token: &TokenView<'_>, purpose: &Purpose, req: &Request<'_>) -> Result<Allowed, VaultError> {
        let grant_fields = token.grant.map(|g| &g.fields);
        let covered = |f: &str| -> Option<ReleaseForm> {
            let form = *purpose.fields.get(f)?;
            match grant_fields {
                Some(gf) if !gf.iter().any(|g| g == f) => None,
                _ => Some(form),
            }
        };
        let fields = match (req.action, req.fields) {
            (
                Action::Read | Action::Lookup | Action::Create | Action::Write | Action::MintGrant,
                FieldsAsked::Named(names),
            ) => {
                let mut out = Vec::with_capacity(names.len());
                for n in names {
                    match covered(n) {
                        Some(form) => out.push((n.clone(), form)),
                        None => {
                            return Err(VaultError::FieldNotAllowed(format!(
                                "purpose {}{} does not cover field {}",
                                purpose.name,
                                if grant_fields.is_some() {
                                    " as granted to this token"
                                } else {
                                    ""
                                },
                                printable(n)
                            )))
                        }
                    }
                }
                out
            }
            (Action::Read, FieldsAsked::Default) => purpose
                .fields
                .keys()
                .filter_map(|f| covered(f).map(|form| (f.clone(), form)))
                .collect(),
            _ => vec![],
        };
        Ok(Allowed { fields })
    }

    /// Steps 5 to 7, which depend on the subject.
    fn subject_checks(
        &self,
        token: &TokenView<'_>,
        req: &Request<'_>,
        purpose: Option<&Purpose>,
        allowed: Allowed,
    ) -> Result<Allowed, VaultError> {
        // A grant sees the subjects it names and nothing else: any other id
        // looks exactly like an id that does not exist.
        let hidden = match (token.grant, req.subject_id) {
            (Some(g), Some(id)) => !g.subjects.iter().any(|s| s == id),
            _ => false,
        };
        let state = if hidden { SubjectState::NotFound } else { req.subject };
        if state == SubjectState::Erased {
            return Err(VaultError::SubjectErased);
        }
        if let Some(p) = purpose {
            // 5. consent
            // Consent governs releases; reading the consent state itself, or
            // withdrawing it, must work without it.
            let releases = matches!(req.action, Action::Read | Action::Lookup);
            if p.needs_consent && releases && state != SubjectState::NoSubject {
                let consent = match state {
                    SubjectState::Live { consent } => consent,
                    _ => None,
                };
                if !consent.unwrap_or(p.consent_by_default) {
                    return Err(VaultError::ConsentRequired(p.name.clone()));
                }
            }
            // 6. justification
            if p.needs_justification && req.justification.is_none_or(|j| j.trim().is_empty()) {
                return Err(VaultError::JustificationRequired(p.name.clone()));
            }
        }
        // 7. grant scope, and existence
        if state == SubjectState::NotFound {
            return Err(VaultError::SubjectNotFound);
        }
        Ok(allowed)
    }
}

/// A purpose or field name from a request, safe to echo: names are
/// `[a-z0-9_]`; anything else is not echoed.
fn printable(s: &str) -> String {
    if s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        s.to_owned()
    } else {
        "(unnamed)".to_owned()
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
