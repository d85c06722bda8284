//! Black-box tests of the HTTP contract (API.md): every purpose row, every
//! refusal code, the field checks, versions, lookups, batches, restarts, the
//! wrong passphrase, plain HTTP, request ids, the CLI, openapi and health.
//! Each test starts the real binary (`serve --dev`) and talks HTTPS to it.

mod common;
use common::*;

use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

// ----- helpers -------------------------------------------------------------------

fn header<'a>(r: &'a Resp, name: &str) -> &'a str {
    r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// An RFC 9457 problem with the given status and code.
#[track_caller]
fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "expected {status} {code}, got: {}", r.text);
    let ct = header(r, "content-type");
    assert!(
        ct.starts_with("application/problem+json"),
        "error content-type is {ct:?} ({})",
        r.text
    );
    assert_eq!(r.body["code"], code, "{}", r.text);
    assert_eq!(r.body["status"], status, "{}", r.text);
    for k in ["type", "title", "detail"] {
        assert!(r.body.get(k).is_some(), "problem lacks {k}: {}", r.text);
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn is_pseudonym(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 35
            && s.starts_with("pn_")
            && s[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

async fn lookup(s: &Server, token: &str, purpose: &str, field: &str, value: &str) -> Resp {
    s.post(
        "/v1/lookup",
        token,
        Some(purpose),
        json!({"field": field, "value": value}),
    )
    .await
}

/// Runs a CLI command to completion off the async workers, with a deadline.
async fn run_cli(mut cmd: std::process::Command, timeout: Duration) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pdvault");
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "pdvault command did not finish in {timeout:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

const ALL_FIELDS: [&str; 6] = ["surname", "given_name", "patronymic", "phone", "email", "address"];

// ----- 1 and 2: purposes and pseudonyms ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_purpose_releases_what_its_row_says() {
    let s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["read", "write"]).await;

    let mut subject = full_subject();
    // Domain lower-cased, local part kept.
    subject["email"] = json!("aigerim.k@Example.KZ");
    let id = s.create(&writer, subject).await;

    let plain_address = json!({"country": "KZ", "region": "Almaty Region", "city": "Almaty",
        "street": "Abai Ave", "building": "10", "apartment": "5", "postal_code": "050000"});
    let general_address = json!({"country": "KZ", "region": "Almaty Region", "city": "Almaty"});
    let plain = json!({
        "surname": "Ivanova", "given_name": "Aigerim", "patronymic": "Serikovna",
        "phone": "+77015550177", "email": "aigerim.k@example.kz", "address": plain_address,
    });
    let pick = |names: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for n in names {
            m.insert(n.to_string(), plain[*n].clone());
        }
        Value::Object(m)
    };

    let read = |purpose: &'static str, token: String, extra: Vec<(&'static str, &'static str)>| {
        let s = &s;
        let id = id.clone();
        async move {
            s.call_with(
                Method::GET,
                &format!("/v1/subjects/{id}"),
                &token,
                Some(purpose),
                &extra,
                None,
            )
            .await
        }
    };
    let tok = |p: &'static str| {
        let s = &s;
        async move { s.token(&format!("reader-{p}"), &[p], &["read"]).await }
    };

    // Rows whose answer is plain fields.
    let plain_rows: [(&str, Vec<&str>); 5] = [
        ("order", ALL_FIELDS.to_vec()),
        ("payment", vec!["surname", "given_name", "patronymic", "email", "phone"]),
        (
            "delivery",
            vec!["surname", "given_name", "patronymic", "phone", "address"],
        ),
        ("notifications", vec!["given_name", "email", "phone"]),
        ("subject_access", ALL_FIELDS.to_vec()),
    ];
    for (purpose, names) in plain_rows {
        let r = read(purpose, tok(purpose).await, vec![]).await;
        assert_eq!(r.status, 200, "{purpose}: {}", r.text);
        assert_eq!(r.body["id"], id.as_str(), "{purpose}");
        assert_eq!(r.body["version"], 1, "{purpose}");
        assert_eq!(r.body["fields"], pick(&names), "{purpose}: exactly these fields, plain");
        assert!(header(&r, "content-type").starts_with("application/json"), "{purpose}");
    }

    // support: names plain, email and phone masked.
    let r = read("support", tok("support").await, vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["fields"],
        json!({"surname": "Ivanova", "given_name": "Aigerim", "patronymic": "Serikovna",
               "email": "a***@example.kz", "phone": "+7 *** *** 01 77"})
    );

    // personalization: given name plain, address generalized.
    let r = read("personalization", tok("personalization").await, vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["fields"],
        json!({"given_name": "Aigerim", "address": general_address})
    );

    // statistics: generalized address only.
    let r = read("statistics", tok("statistics").await, vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"], json!({"address": general_address}));

    // service_improvement: every field as a pseudonym, none equal to a value.
    let si = tok("service_improvement").await;
    let r = read("service_improvement", si.clone(), vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(keys(&r.body["fields"]), set(&ALL_FIELDS));
    for f in ALL_FIELDS {
        assert!(is_pseudonym(&r.body["fields"][f]), "{f}: {}", r.body["fields"][f]);
    }
    for needle in ["Ivanova", "Aigerim", "7015550177", "example.kz", "Almaty"] {
        assert!(
            !r.text.contains(needle),
            "pseudonymised read leaks {needle}: {}",
            r.text
        );
    }

    // marketing: opt-in consent; none recorded -> 403 consent_required.
    let mk = tok("marketing").await;
    let r = read("marketing", mk.clone(), vec![]).await;
    assert_problem(&r, 403, "consent_required");
    assert!(!r.text.contains("Aigerim"), "{}", r.text);
    let r = s
        .call_with(
            Method::PUT,
            &format!("/v1/subjects/{id}/consents/marketing"),
            &writer,
            Some("order"),
            &[],
            Some(json!({"granted": true})),
        )
        .await;
    assert_eq!(r.status, 200, "consent grant: {}", r.text);
    let r = read("marketing", mk.clone(), vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"], pick(&["given_name", "email", "phone"]));
    // Withdrawn again: refused again.
    let r = s
        .call_with(
            Method::PUT,
            &format!("/v1/subjects/{id}/consents/marketing"),
            &writer,
            Some("order"),
            &[],
            Some(json!({"granted": false})),
        )
        .await;
    assert_eq!(r.status, 200, "consent withdraw: {}", r.text);
    assert_problem(&read("marketing", mk, vec![]).await, 403, "consent_required");

    // legal_request: needs a justification.
    let lr = tok("legal_request").await;
    let r = read("legal_request", lr.clone(), vec![]).await;
    assert_problem(&r, 400, "justification_required");
    assert!(!r.text.contains("Aigerim"), "{}", r.text);
    let r = read("legal_request", lr, vec![("X-Justification", "court order 2-123/2024")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"], plain);

    // erasure: covers no field; a read under it is not allowed.
    let r = read(
        "erasure",
        s.token("eraser", &["erasure"], &["read", "erase"]).await,
        vec![],
    )
    .await;
    assert_problem(&r, 403, "purpose_not_allowed");

    // Writes: order and subject_access may write; delivery may not.
    let sa = s.token("self-service", &["subject_access"], &["read", "write"]).await;
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{id}"),
            &sa,
            Some("subject_access"),
            Some(json!({"fields": {"given_name": "Aika"}})),
        )
        .await;
    assert_eq!(r.status, 200, "subject_access write: {}", r.text);
    assert_eq!(r.body["version"], 2);
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{id}"),
            &writer,
            Some("order"),
            Some(json!({"fields": {"given_name": "Aigerim"}})),
        )
        .await;
    assert_eq!(r.status, 200, "order write: {}", r.text);
    assert_eq!(r.body["version"], 3);
    let dw = s.token("courier", &["delivery"], &["read", "write"]).await;
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{id}"),
            &dw,
            Some("delivery"),
            Some(json!({"fields": {"phone": "+77015550000"}})),
        )
        .await;
    assert_problem(&r, 403, "purpose_not_allowed");
    let r = s
        .post(
            "/v1/subjects",
            &dw,
            Some("delivery"),
            json!({"fields": {"phone": "+77015550000"}}),
        )
        .await;
    assert_problem(&r, 403, "purpose_not_allowed");
    // The refused write changed nothing.
    let r = s.get(&format!("/v1/subjects/{id}"), &writer, Some("order")).await;
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.body["fields"], plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonyms_are_stable_and_distinct() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["write"]).await;
    let si = s.token("analytics", &["service_improvement"], &["read"]).await;

    let a = s.create(&w, full_subject()).await;
    // Same e-mail, everything else different; surname and given name equal.
    let b = s
        .create(
            &w,
            json!({"surname": "Same", "given_name": "Same", "phone": "+77015550188",
                           "email": "aigerim.k@example.kz"}),
        )
        .await;
    // Same e-mail spelled with another domain case: same stored value.
    let c = s
        .create(&w, json!({"email": "aigerim.k@EXAMPLE.KZ", "phone": "8 701 555 01 77"}))
        .await;
    let d = s.create(&w, json!({"email": "other.person@example.kz"})).await;

    let read = |id: String| {
        let s = &s;
        let si = si.clone();
        async move {
            let r = s
                .get(&format!("/v1/subjects/{id}"), &si, Some("service_improvement"))
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.body["fields"].clone()
        }
    };
    let fa = read(a.clone()).await;
    let fa2 = read(a.clone()).await;
    let fb = read(b.clone()).await;
    let fc = read(c.clone()).await;
    let fd = read(d.clone()).await;

    for f in [&fa, &fb, &fc, &fd] {
        for (_, v) in f.as_object().unwrap() {
            assert!(is_pseudonym(v), "{v}");
        }
    }
    assert_eq!(fa, fa2, "the same subject read twice gives the same pseudonyms");
    assert_eq!(fa["email"], fb["email"], "same e-mail, same purpose: same pseudonym");
    assert_eq!(fa["email"], fc["email"], "normalised e-mail: same pseudonym");
    assert_eq!(
        fa["phone"], fc["phone"],
        "same phone in another spelling: same pseudonym"
    );
    assert_ne!(fa["phone"], fb["phone"], "different phones differ");
    assert_ne!(fa["email"], fd["email"], "different e-mails differ");
    assert_ne!(fa["surname"], fb["surname"], "different surnames differ");
    assert_ne!(fb["surname"], fb["given_name"], "same value in another field differs");
    assert_ne!(fa["email"], fa["phone"]);
    assert_eq!(
        keys(&fb),
        set(&["surname", "given_name", "phone", "email"]),
        "absent fields are absent"
    );
}

// ----- 3 and 12: refusals and request ids ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&w, full_subject()).await;
    let path = format!("/v1/subjects/{id}");
    let courier = s.token("courier", &["delivery"], &["read"]).await;

    // 1. token missing / unknown.
    let r = s.get(&path, "", Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
    assert!(
        !header(&r, "www-authenticate").is_empty(),
        "401 without WWW-Authenticate"
    );
    assert!(!header(&r, "x-request-id").is_empty(), "401 without X-Request-Id");
    let r = s
        .get(&path, "pdv_not-a-real-token-0000000000000000", Some("delivery"))
        .await;
    assert_problem(&r, 401, "token_invalid");
    assert!(header(&r, "www-authenticate")
        .to_ascii_lowercase()
        .starts_with("bearer"));
    assert!(!r.text.contains("Ivanova"));
    // Not a bearer scheme at all.
    let r = s
        .call_with(
            Method::GET,
            &path,
            "",
            Some("delivery"),
            &[("Authorization", "Basic dXNlcjpwYXNz")],
            None,
        )
        .await;
    assert_problem(&r, 401, "token_invalid");
    // A good token resets the per-peer failure count.
    assert_eq!(s.get(&path, &courier, Some("delivery")).await.status, 200);

    // 1. expired.
    let short = s.issue("short-lived", &["delivery"], &["read"], 1).await;
    assert_eq!(short.status, 201, "{}", short.text);
    let short = short.body["token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = s.get(&path, &short, Some("delivery")).await;
    assert_problem(&r, 401, "token_expired");
    assert!(!header(&r, "www-authenticate").is_empty());

    // 2. purpose not in the token (and no purpose at all).
    assert_problem(&s.get(&path, &courier, Some("order")).await, 403, "purpose_not_allowed");
    assert_problem(&s.get(&path, &courier, None).await, 403, "purpose_not_allowed");
    assert_problem(
        &s.get(&path, &courier, Some("no_such_purpose")).await,
        403,
        "purpose_not_allowed",
    );

    // 3. capability missing.
    let read_only = s.token("reader", &["order"], &["read"]).await;
    let r = s
        .post(
            "/v1/subjects",
            &read_only,
            Some("order"),
            json!({"fields": {"surname": "X"}}),
        )
        .await;
    assert_problem(&r, 403, "capability_missing");
    let r = s
        .call(
            Method::PATCH,
            &path,
            &read_only,
            Some("order"),
            Some(json!({"fields": {"surname": "X"}})),
        )
        .await;
    assert_problem(&r, 403, "capability_missing");
    let write_only = s.token("writer", &["order"], &["write"]).await;
    assert_problem(
        &s.get(&path, &write_only, Some("order")).await,
        403,
        "capability_missing",
    );

    // 4. fields not covered: refused, never silently dropped.
    let r = s.get(&format!("{path}?fields=email"), &courier, Some("delivery")).await;
    assert_problem(&r, 403, "field_not_allowed");
    assert!(!r.text.contains("example.kz"), "{}", r.text);
    let r = s
        .get(&format!("{path}?fields=phone,email"), &courier, Some("delivery"))
        .await;
    assert_problem(&r, 403, "field_not_allowed");
    assert!(!r.text.contains("7015550177"), "{}", r.text);
    let r = s
        .get(&format!("{path}?fields=shoe_size"), &courier, Some("delivery"))
        .await;
    assert_problem(&r, 403, "field_not_allowed");
    // A covered subset is fine and exact.
    let r = s.get(&format!("{path}?fields=phone"), &courier, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"], json!({"phone": "+77015550177"}));

    // Unknown subject (well-formed and malformed ids).
    let r = s
        .get(
            "/v1/subjects/00000000-0000-4000-8000-000000000000",
            &courier,
            Some("delivery"),
        )
        .await;
    assert_problem(&r, 404, "subject_not_found");
    assert!(!header(&r, "x-request-id").is_empty(), "404 without X-Request-Id");
    let r = s.get("/v1/subjects/not-an-id", &courier, Some("delivery")).await;
    assert_problem(&r, 404, "subject_not_found");

    // Revocation is immediate.
    let rv = s.issue("to-revoke", &["delivery"], &["read"], 3600).await;
    assert_eq!(rv.status, 201, "{}", rv.text);
    let (rv_id, rv_tok) = (
        rv.body["id"].as_str().unwrap().to_string(),
        rv.body["token"].as_str().unwrap().to_string(),
    );
    assert_eq!(s.get(&path, &rv_tok, Some("delivery")).await.status, 200);
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{rv_id}"),
            &s.admin,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "revoke: {}", r.text);
    let r = s.get(&path, &rv_tok, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
    assert!(!r.text.contains("Ivanova"));
    // Revoking an unknown token id.
    let r = s
        .call(Method::DELETE, "/v1/admin/tokens/no-such-token", &s.admin, None, None)
        .await;
    assert_eq!(r.status, 404, "{}", r.text);

    // Admin endpoints need admin.
    assert_problem(&s.get("/v1/admin/tokens", &w, None).await, 403, "capability_missing");
    assert_problem(
        &s.get("/v1/admin/tokens", &w, Some("order")).await,
        403,
        "capability_missing",
    );
    let r = s
        .post(
            "/v1/admin/tokens",
            &w,
            None,
            json!({"caller": "x", "purposes": ["order"], "capabilities": ["admin"], "ttl_seconds": 60}),
        )
        .await;
    assert_problem(&r, 403, "capability_missing");
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{rv_id}"),
            &courier,
            None,
            None,
        )
        .await;
    assert_problem(&r, 403, "capability_missing");
    assert_eq!(s.get("/v1/admin/tokens", &s.admin, None).await.status, 200);

    // ----- 12: X-Request-Id on every response -----
    let r = s
        .call_with(
            Method::GET,
            &path,
            &courier,
            Some("delivery"),
            &[("X-Request-Id", "req-123")],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "x-request-id"), "req-123");
    let r = s
        .call_with(
            Method::GET,
            &path,
            "",
            Some("delivery"),
            &[("X-Request-Id", "req-123")],
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(header(&r, "x-request-id"), "req-123", "echoed on 401 too");
    let r = s
        .call_with(
            Method::GET,
            "/v1/health",
            "",
            None,
            &[("X-Request-Id", "req-123")],
            None,
        )
        .await;
    assert_eq!(header(&r, "x-request-id"), "req-123");
    let mut seen = BTreeSet::new();
    for r in [
        s.get(&path, &courier, Some("delivery")).await,
        s.get("/v1/health", "", None).await,
        s.get("/v1/no/such/endpoint", &courier, None).await,
        s.get(
            "/v1/subjects/00000000-0000-4000-8000-000000000000",
            &courier,
            Some("delivery"),
        )
        .await,
        s.get(&path, "", Some("delivery")).await,
        s.get(&path, &courier, Some("order")).await,
    ] {
        let rid = header(&r, "x-request-id").to_string();
        assert!(!rid.is_empty(), "status {} without X-Request-Id", r.status);
        assert_ne!(rid, "req-123");
        assert!(seen.insert(rid), "request ids repeat");
    }
    assert_problem(&s.get("/v1/no/such/endpoint", &courier, None).await, 404, "not_found");
}

// ----- 4 to 8: field checks, limits, versions, lookups, batches -----------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_checks_refuse_and_store_nothing() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;

    let long = "Ж".repeat(201);
    // (field, bad value, needle that must not appear in the answer)
    let cases: Vec<(&str, Value, Option<String>)> = vec![
        ("surname", json!(""), None),
        ("surname", json!("   "), Some("   ".into())),
        ("surname", json!(long), Some("ЖЖЖЖЖЖ".into())),
        ("surname", json!("Iva\u{0007}nova"), Some("Iva".into())),
        ("phone", json!("abc"), Some("abc".into())),
        ("phone", json!("12345"), Some("12345".into())),
        ("phone", json!("+7 701 555"), Some("701 555".into())),
        ("email", json!("not-an-email"), Some("not-an-email".into())),
        ("email", json!("a@"), Some("a@".into())),
        ("email", json!("a b@c.kz"), Some("a b@c".into())),
        (
            "address",
            json!({"city": "Almaty", "floor": "floor-nine-secret"}),
            Some("floor-nine-secret".into()),
        ),
        (
            "address",
            json!({"country": "XX", "city": "Qyzylorda-secret"}),
            Some("Qyzylorda".into()),
        ),
        ("address", json!("Almaty, Abai Ave 10-secret"), Some("Abai".into())),
    ];
    for (i, (field, bad, needle)) in cases.into_iter().enumerate() {
        // Good e-mail and phone in the same request (unless they are the bad field).
        let good_email = format!("probe{i}@example.kz");
        let good_phone = format!("+7701444{i:04}");
        let mut fields = json!({"surname": "Probe", "email": good_email, "phone": good_phone});
        fields[field] = bad.clone();
        let r = s
            .post("/v1/subjects", &w, Some("order"), json!({ "fields": fields }))
            .await;
        assert_problem(&r, 422, "invalid_field");
        assert_eq!(r.body["field"], field, "case {i} ({field} = {bad}): {}", r.text);
        if let Some(n) = &needle {
            assert!(
                !r.text.contains(n.as_str()),
                "case {i}: the answer echoes the value: {}",
                r.text
            );
        }
        assert!(
            !r.text.contains('\u{0007}') && !r.text.contains("\\u0007"),
            "{}",
            r.text
        );
        // Nothing of the request was stored.
        if field != "email" {
            assert_problem(
                &lookup(&s, &w, "order", "email", &good_email).await,
                404,
                "subject_not_found",
            );
        }
        if field != "phone" {
            assert_problem(
                &lookup(&s, &w, "order", "phone", &good_phone).await,
                404,
                "subject_not_found",
            );
        }
    }
    // Unknown field name in a write.
    let r = s
        .post(
            "/v1/subjects",
            &w,
            Some("order"),
            json!({"fields": {"shoe_size": "42", "email": "shoe@example.kz"}}),
        )
        .await;
    assert_problem(&r, 403, "field_not_allowed");
    assert_problem(
        &lookup(&s, &w, "order", "email", "shoe@example.kz").await,
        404,
        "subject_not_found",
    );

    // Good normalisation: trimmed, NFC.
    let id = s
        .create(
            &w,
            json!({"surname": "  Иванова  ", "given_name": "Rene\u{0301}e", "email": "x@example.kz"}),
        )
        .await;
    let r = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Иванова");
    assert_eq!(r.body["fields"]["given_name"], "Ren\u{00e9}e");
    assert_eq!(r.body["fields"]["given_name"].as_str().unwrap().chars().count(), 5);
    // Exactly 200 characters is fine.
    let id200 = s.create(&w, json!({"surname": "Ж".repeat(200)})).await;
    let r = s
        .get(&format!("/v1/subjects/{id200}?fields=surname"), &w, Some("order"))
        .await;
    assert_eq!(r.body["fields"]["surname"].as_str().unwrap().chars().count(), 200);
    // Address: country defaults to KZ.
    let ida = s
        .create(&w, json!({"address": {"city": "Astana", "street": "Mangilik El"}}))
        .await;
    let r = s
        .get(&format!("/v1/subjects/{ida}?fields=address"), &w, Some("order"))
        .await;
    assert_eq!(
        r.body["fields"]["address"],
        json!({"country": "KZ", "city": "Astana", "street": "Mangilik El"})
    );

    // ----- 5: body limits -----
    let big = json!({"fields": {"surname": "Big", "address": {"city": "Almaty", "comment": "x".repeat(70 * 1024)}}});
    let r = s.post("/v1/subjects", &w, Some("order"), big).await;
    assert_problem(&r, 413, "payload_too_large");
    // A raw oversized body, not even JSON.
    let r = send(
        s.client
            .post(format!("{}/v1/subjects", s.base()))
            .bearer_auth(&w)
            .header("X-Purpose", "order")
            .header("Content-Type", "application/json")
            .body(vec![b'{'; 65 * 1024 + 1]),
    )
    .await;
    assert_problem(&r, 413, "payload_too_large");
    // A 100 KiB batch is under the 4 MiB batch cap.
    let subjects: Vec<Value> = (0..100)
        .map(|i| json!({"fields": {"surname": format!("Batch{i}"), "address": {"city": "Almaty", "comment": "c".repeat(1000)}}}))
        .collect();
    let body = json!({ "subjects": subjects });
    assert!(serde_json::to_vec(&body).unwrap().len() > 100 * 1024);
    let r = s.post("/v1/subjects:batchCreate", &w, Some("order"), body).await;
    assert_eq!(r.status, 200, "{}", &r.text[..r.text.len().min(500)]);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    assert!(
        results.iter().all(|x| x["status"] == 201),
        "{}",
        &r.text[..r.text.len().min(500)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_lookups_and_batches() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&w, full_subject()).await;
    let path = format!("/v1/subjects/{id}");

    // ----- 6: PATCH and versions -----
    let patch = |fields: Value, if_match: Option<&'static str>| {
        let s = &s;
        let w = w.clone();
        let path = path.clone();
        async move {
            let h: Vec<(&str, &str)> = if_match.map(|v| vec![("If-Match", v)]).unwrap_or_default();
            s.call_with(
                Method::PATCH,
                &path,
                &w,
                Some("order"),
                &h,
                Some(json!({ "fields": fields })),
            )
            .await
        }
    };
    let r = s.get(&path, &w, Some("order")).await;
    assert_eq!(r.body["version"], 1);
    assert_eq!(header(&r, "etag"), "\"1\"");
    let r = patch(json!({"given_name": "Aika"}), Some("\"1\"")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"id": id, "version": 2}));
    let r = patch(json!({"given_name": "Stale"}), Some("\"1\"")).await;
    assert_problem(&r, 412, "version_conflict");
    let r = s.get(&path, &w, Some("order")).await;
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["fields"]["given_name"], "Aika", "a stale write changed nothing");
    // null removes a field.
    let r = patch(json!({"patronymic": null}), Some("\"2\"")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["version"], 3);
    let r = s.get(&path, &w, Some("order")).await;
    assert!(r.body["fields"].get("patronymic").is_none(), "{}", r.text);
    assert_eq!(
        keys(&r.body["fields"]),
        set(&["surname", "given_name", "phone", "email", "address"])
    );
    // A bad phone: 422, nothing changes.
    let r = patch(json!({"phone": "abc", "surname": "Changed"}), None).await;
    assert_problem(&r, 422, "invalid_field");
    assert_eq!(r.body["field"], "phone");
    let r = s.get(&path, &w, Some("order")).await;
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.body["fields"]["phone"], "+77015550177");
    assert_eq!(r.body["fields"]["surname"], "Ivanova");
    // Without If-Match a write just applies.
    let r = patch(json!({"patronymic": "Serikovna"}), None).await;
    assert_eq!(r.body["version"], 4, "{}", r.text);

    // ----- 7: lookups -----
    for spelling in ["8 701 555 01 77", "+7 (701) 555-01-77", "7015550177", "+77015550177"] {
        let r = lookup(&s, &w, "order", "phone", spelling).await;
        assert_eq!(r.status, 200, "{spelling}: {}", r.text);
        assert_eq!(r.body["id"], id.as_str(), "{spelling}");
    }
    let r = lookup(&s, &w, "order", "email", "aigerim.k@EXAMPLE.Kz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], id.as_str());
    let courier = s.token("courier", &["delivery"], &["read"]).await;
    let r = lookup(&s, &courier, "delivery", "email", "aigerim.k@example.kz").await;
    assert_problem(&r, 403, "field_not_allowed");
    assert!(!r.text.contains(id.as_str()), "a refused lookup reveals the id");
    let r = lookup(&s, &courier, "delivery", "phone", "+77015550177").await;
    assert_eq!(r.body["id"], id.as_str(), "{}", r.text);
    assert_problem(
        &lookup(&s, &w, "order", "email", "nobody@example.kz").await,
        404,
        "subject_not_found",
    );
    assert_problem(
        &lookup(&s, &w, "order", "phone", "+77019999999").await,
        404,
        "subject_not_found",
    );
    // A changed phone is found by its new value only.
    let r = patch(json!({"phone": "+77015550199"}), None).await;
    assert_eq!(r.status, 200);
    assert_problem(
        &lookup(&s, &w, "order", "phone", "+77015550177").await,
        404,
        "subject_not_found",
    );
    assert_eq!(
        lookup(&s, &w, "order", "phone", "87015550199").await.body["id"],
        id.as_str()
    );

    // ----- 8: batches -----
    let unknown = "00000000-0000-4000-8000-000000000000";
    let malformed = "not-a-subject-id";
    let r = s
        .post(
            "/v1/subjects:batchGet",
            &courier,
            Some("delivery"),
            json!({"ids": [unknown, id, malformed, id]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let res = r.body["results"].as_array().unwrap();
    assert_eq!(res.len(), 4);
    assert_eq!(res[0]["id"], unknown);
    assert_eq!(res[0]["status"], 404);
    assert_eq!(res[0]["error"]["code"], "subject_not_found");
    assert_eq!(res[1]["id"], id.as_str());
    assert_eq!(res[1]["status"], 200);
    assert_eq!(
        keys(&res[1]["fields"]),
        set(&["surname", "given_name", "patronymic", "phone", "address"])
    );
    assert_eq!(res[1]["fields"]["phone"], "+77015550199");
    assert_eq!(res[2]["id"], malformed);
    let alone = s
        .get(&format!("/v1/subjects/{malformed}"), &courier, Some("delivery"))
        .await;
    assert_eq!(
        res[2]["status"],
        alone.status.as_u16(),
        "the status the item alone would have had"
    );
    assert_eq!(res[2]["error"]["code"], alone.body["code"]);
    assert_eq!(res[3]["id"], id.as_str());
    assert_eq!(res[3]["status"], 200);
    // Fields named in a batch are checked like a single read.
    let r = s
        .post(
            "/v1/subjects:batchGet",
            &courier,
            Some("delivery"),
            json!({"ids": [id], "fields": ["email"]}),
        )
        .await;
    let refused = r.status.as_u16() == 403 || r.body["results"][0]["status"] == 403;
    assert!(refused, "batchGet of an uncovered field: {}", r.text);
    assert!(!r.text.contains("example.kz"), "{}", r.text);

    let r = s
        .post(
            "/v1/subjects:batchCreate",
            &w,
            Some("order"),
            json!({"subjects": [
                {"fields": {"surname": "First", "email": "first@example.kz"}},
                {"fields": {"surname": "Middle", "email": "middle@example.kz", "phone": "abc"}},
                {"fields": {"surname": "Last", "phone": "+77015550166"}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let res = r.body["results"].as_array().unwrap().clone();
    let statuses: Vec<u64> = res.iter().map(|x| x["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![201, 422, 201], "{}", r.text);
    assert_eq!(res[1]["error"]["code"], "invalid_field");
    assert_eq!(res[1]["error"]["field"], "phone");
    assert!(!r.text.contains("middle@"), "{}", r.text);
    for (i, want) in [(0, "First"), (2, "Last")] {
        let nid = res[i]["id"].as_str().unwrap();
        let g = s.get(&format!("/v1/subjects/{nid}"), &w, Some("order")).await;
        assert_eq!(g.status, 200, "{}", g.text);
        assert_eq!(g.body["fields"]["surname"], want);
    }
    assert_problem(
        &lookup(&s, &w, "order", "email", "middle@example.kz").await,
        404,
        "subject_not_found",
    );
    assert_eq!(
        lookup(&s, &w, "order", "email", "first@example.kz").await.body["id"],
        res[0]["id"]
    );

    let many: Vec<String> = (0..1001).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect();
    let r = s
        .post("/v1/subjects:batchGet", &w, Some("order"), json!({ "ids": many }))
        .await;
    assert_problem(&r, 400, "bad_request");
    let many: Vec<String> = (0..1000).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect();
    let r = s
        .post("/v1/subjects:batchGet", &w, Some("order"), json!({ "ids": many }))
        .await;
    assert_eq!(r.status, 200, "1000 ids are allowed");
    assert_eq!(r.body["results"].as_array().unwrap().len(), 1000);
}

// ----- 9 and 10: restarts and the wrong passphrase --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_tokens_and_wrong_passphrase_changes_nothing() {
    let mut s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&w, full_subject()).await;
    let rv = s.issue("to-revoke", &["order"], &["read"], 3600).await;
    let (rv_id, rv_tok) = (
        rv.body["id"].as_str().unwrap().to_string(),
        rv.body["token"].as_str().unwrap().to_string(),
    );
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{rv_id}"),
            &s.admin,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
    assert_eq!(before.status, 200);

    s.restart().await;

    let after = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
    assert_eq!(after.status, 200, "token or data lost on restart: {}", after.text);
    assert_eq!(after.body, before.body);
    assert_eq!(
        lookup(&s, &w, "order", "phone", "+77015550177").await.body["id"],
        id.as_str()
    );
    assert_problem(
        &s.get(&format!("/v1/subjects/{id}"), &rv_tok, Some("order")).await,
        401,
        "token_invalid",
    );
    let list = s.get("/v1/admin/tokens", &s.admin, None).await;
    let revoked = list.body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == rv_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(revoked["revoked"], true);

    // ----- 10: a wrong passphrase stops the start and changes nothing -----
    s.stop();
    let snapshot = s.all_bytes();
    assert!(!snapshot.is_empty());
    let mut cmd = s.cmd();
    cmd.args(["serve"]).env("PDVAULT_PASSPHRASE", "wrong");
    let out = run_cli(cmd, Duration::from_secs(60)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve with a wrong passphrase exited 0; stderr:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("passphrase"),
        "stderr does not name the passphrase:\n{stderr}"
    );
    let after: BTreeMap<_, _> = s.all_bytes().into_iter().collect();
    let snapshot: BTreeMap<_, _> = snapshot.into_iter().collect();
    assert_eq!(
        snapshot.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files were created or removed"
    );
    for (p, a) in &snapshot {
        assert!(after[p] == *a, "{} changed", p.display());
    }
    // And the right one (the dev passphrase) still opens everything.
    s.spawn().await;
    assert_eq!(
        s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await.body,
        before.body
    );
}

// ----- the generated OpenAPI document and the error reference ---------------------

/// Every operation the document lists is served (the router and the document
/// come from the same `routes!` calls), and what the vault answers outside it
/// is the routing problem; every problem's `type` leads to its entry on the
/// error reference the vault serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_what_is_served_and_problem_types_lead_to_their_entry() {
    let s = Server::start().await;
    let doc = s.get("/v1/openapi.json", "", None).await.body;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        // Path parameters filled with a value that names nothing.
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in item.as_object().unwrap() {
            ops += 1;
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = s.call(m, &concrete, "", None, None).await;
            let code = r.body["code"].as_str().unwrap_or("");
            assert!(
                code != "method_not_allowed" && !(code == "not_found" && r.body["detail"] == "no such endpoint"),
                "{method} {path} is documented but not served: {} {}",
                r.status,
                r.text
            );
            // Every answer carries X-Request-Id, and the document says so
            // of each one it describes (shared answers are checked below).
            assert!(r.headers.contains_key("x-request-id"), "{method} {path}");
            for (status, answer) in op["responses"].as_object().unwrap() {
                assert!(
                    answer.get("$ref").is_some() || answer["headers"].get("X-Request-Id").is_some(),
                    "{method} {path} {status}: no X-Request-Id in the document"
                );
            }
        }
    }
    assert!(ops >= 28, "{ops} operations");
    for (name, answer) in doc["components"]["responses"].as_object().unwrap() {
        assert!(
            answer["headers"].get("X-Request-Id").is_some(),
            "{name}: no X-Request-Id in the document"
        );
    }
    let r = s.call(Method::PUT, "/v1/health", "", None, None).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // A refusal's type is the entry of its code on /v1/errors.
    let r = s.get("/v1/subjects/x", "pdv_nonsense", Some("order")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["type"], "/v1/errors#token_invalid");
    let page = s.get("/v1/errors", "", None).await;
    assert_eq!(page.status, 200);
    assert!(header(&page, "content-type").starts_with("text/html"));
    for code in doc["components"]["schemas"]["ProblemCode"]["enum"].as_array().unwrap() {
        let code = code.as_str().unwrap();
        assert!(page.text.contains(&format!("id=\"{code}\"")), "no entry for {code}");
    }
}

// ----- 11, 13, 14: plain HTTP, CLI, openapi, health ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_cli_openapi_and_health() {
    let s = Server::start().await;

    // 14. health without a token; openapi 3.1.
    let r = s.get("/v1/health", "", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"status": "ok"}));
    let r = s.get("/v1/openapi.json", "", None).await;
    assert_eq!(r.status, 200);
    assert!(header(&r, "content-type").starts_with("application/json"));
    assert!(
        r.body["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        &r.text[..200.min(r.text.len())]
    );
    assert!(r.body["paths"].is_object());

    // 11. plain HTTP gets no HTTP answer.
    let port = s.port;
    let got = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match c.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
            if buf.len() > 64 * 1024 {
                break;
            }
        }
        buf
    })
    .await
    .unwrap();
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(!contains(&got, b"\"status\""), "plain HTTP got data back");
    // The server still serves TLS afterwards.
    assert_eq!(s.get("/v1/health", "", None).await.status, 200);

    // 13. CLI against the running server.
    let w = s.token("order-service", &["order"], &["write"]).await;
    let id = s.create(&w, full_subject()).await;
    let mut cmd = s.cmd();
    cmd.args([
        "token",
        "issue",
        "--caller",
        "c",
        "--purpose",
        "delivery",
        "--cap",
        "read",
        "--ttl",
        "1h",
    ]);
    let out = run_cli(cmd, Duration::from_secs(60)).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "token issue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "token issue prints the token alone: {stdout:?}");
    let tok = lines[0].trim();
    assert!(!tok.is_empty() && !tok.contains(' '), "{stdout:?}");
    let r = s.get(&format!("/v1/subjects/{id}"), tok, Some("delivery")).await;
    assert_eq!(r.status, 200, "the CLI token does not work: {}", r.text);
    assert_eq!(
        keys(&r.body["fields"]),
        set(&["surname", "given_name", "patronymic", "phone", "address"])
    );

    let mut cmd = s.cmd();
    cmd.args(["token", "list"]);
    let out = run_cli(cmd, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "token list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(list.contains("\"c\""), "token list lacks the caller: {list}");
    assert!(!list.contains(tok), "token list shows a token's text");
    let v: Value = serde_json::from_str(&list).expect("token list is JSON");
    let ids: Vec<String> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["caller"] == "c")
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{list}");

    let mut cmd = s.cmd();
    cmd.args(["token", "revoke", &ids[0]]);
    let out = run_cli(cmd, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "token revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = s.get(&format!("/v1/subjects/{id}"), tok, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
}
