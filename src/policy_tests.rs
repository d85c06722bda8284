//! The decision as a table: every row of API.md's purpose table, and every
//! refusal code in the order API.md gives.

use super::*;
use crate::config::{Config, Overrides};
use ReleaseForm::*;

fn policy() -> Policy {
    Config::from_toml(include_str!("../config/pdvault.toml"), &Overrides::default())
        .unwrap()
        .policy
}

const ALL: [&str; 6] = ["address", "email", "given_name", "patronymic", "phone", "surname"];
const NOW: u64 = 1_000;

struct Tok {
    purposes: Vec<String>,
    caps: Vec<Capability>,
    expires_at: u64,
    revoked: bool,
    uses: u64,
    grant: Option<GrantScope>,
}

impl Tok {
    fn new(purposes: &[&str], caps: &[Capability]) -> Tok {
        Tok {
            purposes: purposes.iter().map(|s| s.to_string()).collect(),
            caps: caps.to_vec(),
            expires_at: NOW + 100,
            revoked: false,
            uses: 0,
            grant: None,
        }
    }
    fn view(&self) -> TokenView<'_> {
        TokenView {
            purposes: &self.purposes,
            capabilities: &self.caps,
            expires_at: self.expires_at,
            revoked: self.revoked,
            uses: self.uses,
            grant: self.grant.as_ref(),
        }
    }
}

fn req<'a>(purpose: &'a str, action: Action, subject: SubjectState, fields: FieldsAsked<'a>) -> Request<'a> {
    Request {
        purpose: Some(purpose),
        action,
        subject_id: Some("s1"),
        subject,
        fields,
        justification: None,
        now: NOW,
    }
}

const LIVE: SubjectState = SubjectState::Live { consent: None };

/// API.md's purpose table: purpose -> (field, form) released by default.
type Row = (&'static str, Vec<(&'static str, ReleaseForm)>, bool);

fn table() -> Vec<Row> {
    let names = |f: ReleaseForm| vec![("given_name", f), ("patronymic", f), ("surname", f)];
    let all = |f: ReleaseForm| ALL.iter().map(|n| (*n, f)).collect::<Vec<_>>();
    let mut payment = names(Plain);
    payment.extend([("email", Plain), ("phone", Plain)]);
    let mut delivery = names(Plain);
    delivery.extend([("address", Plain), ("phone", Plain)]);
    let mut support = names(Plain);
    support.extend([("email", Masked), ("phone", Masked)]);
    vec![
        ("order", all(Plain), true),
        ("payment", payment, false),
        ("delivery", delivery, false),
        ("support", support, false),
        (
            "personalization",
            vec![("address", Generalized), ("given_name", Plain)],
            false,
        ),
        (
            "notifications",
            vec![("email", Plain), ("given_name", Plain), ("phone", Plain)],
            false,
        ),
        ("service_improvement", all(Pseudonym), false),
        (
            "marketing",
            vec![("email", Plain), ("given_name", Plain), ("phone", Plain)],
            false,
        ),
        ("statistics", vec![("address", Generalized)], false),
        ("subject_access", all(Plain), true),
        ("legal_request", all(Plain), false),
        ("erasure", vec![], false),
    ]
}

#[test]
fn every_purpose_row_releases_exactly_its_fields_in_its_forms() {
    let p = policy();
    assert_eq!(p.purposes.len(), 12);
    for (purpose, expected, writes) in table() {
        let t = Tok::new(&[purpose], &[Capability::Read, Capability::Write, Capability::Erase]);
        let mut r = req(
            purpose,
            Action::Read,
            SubjectState::Live { consent: Some(true) },
            FieldsAsked::Default,
        );
        r.justification = Some("court order 12/2026");
        let got = p.decide(&t.view(), &r);
        if expected.is_empty() {
            assert_eq!(
                got.unwrap_err().code(),
                "purpose_not_allowed",
                "{purpose} releases nothing"
            );
        } else {
            let got = got.unwrap_or_else(|e| panic!("{purpose}: {e}"));
            let got: Vec<(&str, ReleaseForm)> = got.fields.iter().map(|(n, f)| (n.as_str(), *f)).collect();
            let mut expected = expected;
            expected.sort_by_key(|(n, _)| *n);
            assert_eq!(got, expected, "{purpose}");
        }
        // may write?
        let names: Vec<String> = vec!["surname".into()];
        let w = p.decide(
            &t.view(),
            &req(purpose, Action::Write, LIVE, FieldsAsked::Named(&names)),
        );
        assert_eq!(w.is_ok(), writes, "{purpose} write");
        // may erase? only `erasure`
        let e = p.decide(&t.view(), &req(purpose, Action::Erase, LIVE, FieldsAsked::Named(&[])));
        assert_eq!(e.is_ok(), purpose == "erasure", "{purpose} erase");
    }
}

#[test]
fn refusal_codes_in_api_order() {
    let p = policy();
    let surname = vec!["surname".to_string()];
    let email = vec!["email".to_string()];
    let named = FieldsAsked::Named(&surname);
    let read_only = Tok::new(&["delivery"], &[Capability::Read]);

    // 1. token: revoked / used up -> token_invalid; expired -> token_expired
    let mut t = Tok::new(&["delivery"], &[Capability::Read]);
    t.revoked = true;
    t.expires_at = 0;
    assert_eq!(
        p.decide(&t.view(), &req("marketing", Action::Write, LIVE, named))
            .unwrap_err()
            .code(),
        "token_invalid"
    );
    let mut t = Tok::new(&["delivery"], &[Capability::Read]);
    t.expires_at = NOW;
    assert_eq!(
        p.decide(&t.view(), &req("marketing", Action::Write, LIVE, named))
            .unwrap_err()
            .code(),
        "token_expired"
    );
    let mut t = Tok::new(&["delivery"], &[Capability::Read]);
    t.grant = Some(GrantScope {
        subjects: vec!["s1".into()],
        fields: surname.clone(),
        max_uses: Some(2),
        self_service: false,
    });
    t.uses = 2;
    assert_eq!(
        p.decide(&t.view(), &req("delivery", Action::Read, LIVE, named))
            .unwrap_err()
            .code(),
        "token_invalid"
    );

    // 2. purpose before capability and fields
    let d = p.decide(
        &read_only.view(),
        &req("marketing", Action::Write, LIVE, FieldsAsked::Named(&email)),
    );
    assert_eq!(d.unwrap_err().code(), "purpose_not_allowed");
    let unknown = p.decide(&read_only.view(), &req("no_such_purpose", Action::Read, LIVE, named));
    assert_eq!(unknown.unwrap_err().code(), "purpose_not_allowed");
    let none = Request {
        purpose: None,
        ..req("delivery", Action::Read, LIVE, named)
    };
    assert_eq!(
        p.decide(&read_only.view(), &none).unwrap_err().code(),
        "purpose_not_allowed"
    );

    // 3. capability before fields
    let t = Tok::new(&["delivery"], &[Capability::Write]);
    let d = p.decide(
        &t.view(),
        &req("delivery", Action::Read, LIVE, FieldsAsked::Named(&email)),
    );
    assert_eq!(d.unwrap_err().code(), "capability_missing");

    // 4. fields: never a silent drop
    let d = p.decide(
        &read_only.view(),
        &req("delivery", Action::Read, LIVE, FieldsAsked::Named(&email)),
    );
    assert_eq!(d.unwrap_err().code(), "field_not_allowed");
    let bogus = vec!["surname".to_string(), "passport".to_string()];
    let d = p.decide(
        &read_only.view(),
        &req("delivery", Action::Read, LIVE, FieldsAsked::Named(&bogus)),
    );
    assert_eq!(d.unwrap_err().code(), "field_not_allowed");

    // 5. consent (opt-in: no record is no consent), before justification
    let t = Tok::new(&["marketing"], &[Capability::Read]);
    for consent in [None, Some(false)] {
        let d = p.decide(
            &t.view(),
            &req(
                "marketing",
                Action::Read,
                SubjectState::Live { consent },
                FieldsAsked::Default,
            ),
        );
        assert_eq!(d.unwrap_err().code(), "consent_required");
    }
    assert!(p
        .decide(
            &t.view(),
            &req(
                "marketing",
                Action::Read,
                SubjectState::Live { consent: Some(true) },
                FieldsAsked::Default
            )
        )
        .is_ok());

    // 6. justification
    let t = Tok::new(&["legal_request"], &[Capability::Read]);
    let d = p.decide(
        &t.view(),
        &req("legal_request", Action::Read, LIVE, FieldsAsked::Default),
    );
    assert_eq!(d.unwrap_err().code(), "justification_required");
    let mut r = req("legal_request", Action::Read, LIVE, FieldsAsked::Default);
    r.justification = Some("   ");
    assert_eq!(p.decide(&t.view(), &r).unwrap_err().code(), "justification_required");
    r.justification = Some("prosecutor request 77");
    assert!(p.decide(&t.view(), &r).is_ok());

    // 7. a grant sees only its subjects: any other id looks like no subject
    let mut t = Tok::new(&["delivery"], &[Capability::Read]);
    t.grant = Some(GrantScope {
        subjects: vec!["s1".into()],
        fields: vec!["address".into()],
        max_uses: None,
        self_service: false,
    });
    let mut other = req("delivery", Action::Read, LIVE, FieldsAsked::Default);
    other.subject_id = Some("s2");
    let hidden = p.decide(&t.view(), &other).unwrap_err();
    let mut missing = req("delivery", Action::Read, SubjectState::NotFound, FieldsAsked::Default);
    missing.subject_id = Some("s3");
    let absent = p.decide(&read_only.view(), &missing).unwrap_err();
    assert_eq!(
        (hidden.code(), absent.code()),
        ("subject_not_found", "subject_not_found")
    );
    assert_eq!(hidden.to_string(), absent.to_string());
    // a grant cannot see erased subjects it does not name either
    other.subject = SubjectState::Erased;
    assert_eq!(p.decide(&t.view(), &other).unwrap_err().code(), "subject_not_found");
    // ... and releases only its own fields
    let ok = p
        .decide(&t.view(), &req("delivery", Action::Read, LIVE, FieldsAsked::Default))
        .unwrap();
    assert_eq!(ok.fields, vec![("address".to_string(), Plain)]);
    let d = p.decide(&t.view(), &req("delivery", Action::Read, LIVE, named));
    assert_eq!(d.unwrap_err().code(), "field_not_allowed");
}

#[test]
fn erased_and_admin_and_audit() {
    let p = policy();
    let t = Tok::new(&["order"], &[Capability::Read]);
    let d = p.decide(
        &t.view(),
        &req("order", Action::Read, SubjectState::Erased, FieldsAsked::Default),
    );
    assert_eq!(d.unwrap_err().code(), "subject_erased");
    let admin = Tok::new(&[], &[Capability::Admin]);
    let r = Request {
        purpose: None,
        ..req("x", Action::Admin, SubjectState::NoSubject, FieldsAsked::Default)
    };
    assert!(p.decide(&admin.view(), &r).is_ok());
    assert_eq!(p.decide(&t.view(), &r).unwrap_err().code(), "capability_missing");
    let auditor = Tok::new(&[], &[Capability::Audit]);
    let r = Request {
        purpose: None,
        ..req("x", Action::AccessLog, LIVE, FieldsAsked::Default)
    };
    assert!(p.decide(&auditor.view(), &r).is_ok());
    let own = Tok::new(&["subject_access"], &[Capability::Read]);
    assert!(p
        .decide(
            &own.view(),
            &req("subject_access", Action::AccessLog, LIVE, FieldsAsked::Default)
        )
        .is_ok());
    // consent state: readable under writing purposes and under the purpose that needs it
    let mk = Tok::new(&["marketing", "delivery"], &[Capability::Read]);
    assert!(p
        .decide(
            &mk.view(),
            &req("marketing", Action::ConsentRead, LIVE, FieldsAsked::Default)
        )
        .is_ok());
    let d = p.decide(
        &mk.view(),
        &req("delivery", Action::ConsentRead, LIVE, FieldsAsked::Default),
    );
    assert_eq!(d.unwrap_err().code(), "purpose_not_allowed");
    let d = p.decide(
        &mk.view(),
        &req("marketing", Action::ConsentWrite, LIVE, FieldsAsked::Default),
    );
    assert_eq!(d.unwrap_err().code(), "purpose_not_allowed");
    let courier = Tok::new(&["delivery"], &[Capability::Read]);
    let d = p.decide(
        &courier.view(),
        &req("delivery", Action::AccessLog, LIVE, FieldsAsked::Default),
    );
    assert_eq!(d.unwrap_err().code(), "purpose_not_allowed");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Deny by default: whatever a token asks, nothing outside its
        /// purpose's fields is ever released, and no refusal is silent.
        #[test]
        fn never_releases_outside_the_purpose(
            pi in 0usize..12, asked in proptest::collection::vec(0usize..6, 0..6),
            caps in proptest::collection::vec(0usize..6, 0..6), consent in proptest::option::of(any::<bool>()),
        ) {
            let p = policy();
            let purposes: Vec<&String> = p.purposes.keys().collect();
            let purpose = purposes[pi].clone();
            let all_caps = [Capability::Read, Capability::Write, Capability::Erase, Capability::Grant, Capability::Audit, Capability::Admin];
            let t = Tok::new(&[&purpose], &caps.iter().map(|i| all_caps[*i]).collect::<Vec<_>>());
            let names: Vec<String> = asked.iter().map(|i| ALL[*i].to_string()).collect();
            let r = req(&purpose, Action::Read, SubjectState::Live { consent }, FieldsAsked::Named(&names));
            if let Ok(a) = p.decide(&t.view(), &r) {
                let covered = &p.purposes[&purpose].fields;
                prop_assert_eq!(a.fields.len(), names.len());
                for (f, form) in &a.fields {
                    prop_assert_eq!(covered.get(f), Some(form));
                }
                prop_assert!(t.caps.contains(&Capability::Read));
            }
        }
    }
}

#[test]
fn a_self_service_session_erases_its_own_subject_and_does_nothing_beyond_it() {
    let p = policy();
    let scope = |self_service| GrantScope {
        subjects: vec!["s1".into()],
        fields: ALL.iter().map(|s| s.to_string()).collect(),
        max_uses: None,
        self_service,
    };
    let mut session = Tok::new(&["subject_access"], &[Capability::Read, Capability::Write]);
    session.grant = Some(scope(true));
    let erase = req("subject_access", Action::Erase, LIVE, FieldsAsked::Named(&[]));
    assert!(p.decide(&session.view(), &erase).is_ok());
    // Only its own subject.
    let mut other = req("subject_access", Action::Erase, LIVE, FieldsAsked::Named(&[]));
    other.subject_id = Some("s2");
    assert_eq!(
        p.decide(&session.view(), &other).unwrap_err().code(),
        "subject_not_found"
    );
    // The same grant without the self-service mark may not erase.
    let mut grant = Tok::new(&["subject_access"], &[Capability::Read, Capability::Write]);
    grant.grant = Some(scope(false));
    assert_eq!(
        p.decide(&grant.view(), &erase).unwrap_err().code(),
        "purpose_not_allowed"
    );
    // Nothing that is not about its subject, whatever the capabilities say.
    for action in [Action::Create, Action::Lookup, Action::MintGrant, Action::Admin] {
        let r = req("subject_access", action, LIVE, FieldsAsked::Named(&[]));
        assert_eq!(
            p.decide(&session.view(), &r).unwrap_err().code(),
            "capability_missing",
            "{action:?}"
        );
    }
    for action in [
        Action::Read,
        Action::Write,
        Action::ConsentRead,
        Action::ConsentWrite,
        Action::AccessLog,
    ] {
        let r = req("subject_access", action, LIVE, FieldsAsked::Default);
        assert!(p.decide(&session.view(), &r).is_ok(), "{action:?}");
    }
}

/// Sign-out: a live self-service session may end itself, with or without a
/// purpose; any other token, or a session already revoked or expired, may not.
#[test]
fn only_a_live_session_ends_itself() {
    let p = policy();
    let session = |revoked: bool, expires_at: u64| Tok {
        revoked,
        expires_at,
        grant: Some(GrantScope {
            subjects: vec!["s1".into()],
            fields: vec![],
            max_uses: None,
            self_service: true,
        }),
        ..Tok::new(&["subject_access"], &[Capability::Read, Capability::Write])
    };
    let mut r = req(
        "subject_access",
        Action::EndSession,
        SubjectState::NoSubject,
        FieldsAsked::Named(&[]),
    );
    assert!(p.decide(&session(false, NOW + 1).view(), &r).is_ok());
    r.purpose = None;
    assert!(p.decide(&session(false, NOW + 1).view(), &r).is_ok());
    let admin = Tok::new(&[], &[Capability::Admin]);
    assert!(matches!(
        p.decide(&admin.view(), &r),
        Err(VaultError::CapabilityMissing(_))
    ));
    assert!(matches!(
        p.decide(&session(true, NOW + 1).view(), &r),
        Err(VaultError::TokenInvalid)
    ));
    assert!(matches!(
        p.decide(&session(false, NOW).view(), &r),
        Err(VaultError::TokenExpired)
    ));
}
