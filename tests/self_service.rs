//! Self-service links and sessions (policy 4.2.1), black-box over TLS: who
//! may make a link, a code's single use and expiry, what a session reaches
//! and what it cannot do, and the headers of every `/self/` answer.

mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A token for the shop's backend: it signs users in and asks for links.
async fn shop(s: &Server, ttl: u64) -> String {
    let r = s
        .issue(
            "shop-backend",
            &["subject_access", "order"],
            &["grant", "read", "write"],
            ttl,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["token"].as_str().unwrap().to_string()
}

async fn link(s: &Server, tok: &str, id: &str) -> common::Resp {
    s.post(
        &format!("/v1/subjects/{id}/self-service-links"),
        tok,
        Some("subject_access"),
        json!({}),
    )
    .await
}

async fn session(s: &Server, code: &str) -> common::Resp {
    s.post("/v1/self/session", "", None, json!({ "code": code })).await
}

/// A session token for `id`, through a fresh link.
async fn open_session(s: &Server, tok: &str, id: &str) -> String {
    let l = link(s, tok, id).await;
    assert_eq!(l.status, 201, "{}", l.text);
    let r = session(s, l.body["code"].as_str().unwrap()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_needs_grant_under_subject_access_and_a_live_subject() {
    let s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["write", "read"]).await;
    let id = s.create(&writer, full_subject()).await;

    // Right capability, wrong purpose.
    let r = s
        .post(
            &format!("/v1/subjects/{id}/self-service-links"),
            &shop(&s, 3600).await,
            Some("order"),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (403, Some("purpose_not_allowed")),
        "{}",
        r.text
    );
    // Right purpose, no grant capability.
    let reader = s.token("self-page", &["subject_access"], &["read", "write"]).await;
    let r = link(&s, &reader, &id).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (403, Some("capability_missing")),
        "{}",
        r.text
    );
    // No token at all.
    let r = link(&s, "", &id).await;
    assert_eq!(r.status, 401);
    // No such subject.
    let tok = shop(&s, 3600).await;
    let r = link(&s, &tok, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (404, Some("subject_not_found")),
        "{}",
        r.text
    );

    // Without X-Purpose, a link is made under subject_access.
    let r = s
        .post(&format!("/v1/subjects/{id}/self-service-links"), &tok, None, json!({}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = link(&s, &tok, &id).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let code = r.body["code"].as_str().unwrap();
    assert!(code.len() >= 32, "a code is unguessable");
    assert_eq!(r.body["url"], format!("https://127.0.0.1:{}/self/#code={code}", s.port));
    let exp = humantime::parse_rfc3339(r.body["expires_at"].as_str().unwrap()).unwrap();
    let left = exp.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    assert!((14 * 60..=15 * 60).contains(&left), "{left} s");
    assert_eq!(r.headers["cache-control"], "no-store");

    // An erased subject has no page.
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/subjects/{id}"),
            &er,
            Some("erasure"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = link(&s, &tok, &id).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (410, Some("subject_erased")),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_opens_one_session_once_and_unknown_or_expired_codes_are_refused() {
    let s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["write", "read"]).await;
    let id = s.create(&writer, full_subject()).await;
    let tok = shop(&s, 3600).await;
    let code = link(&s, &tok, &id).await.body["code"].as_str().unwrap().to_string();

    let r = session(&s, &code).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["subject"], id.as_str());
    let exp = humantime::parse_rfc3339(r.body["expires_at"].as_str().unwrap()).unwrap();
    let left = exp.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    assert!((29 * 60..=30 * 60).contains(&left), "{left} s");

    // Used once: never again, also not after a restart.
    let again = session(&s, &code).await;
    assert_eq!(
        (again.status.as_u16(), again.body["code"].as_str()),
        (401, Some("token_invalid"))
    );
    let mut s = s;
    s.kill9();
    s.restart().await;
    let again = session(&s, &code).await;
    assert_eq!(
        (again.status.as_u16(), again.body["code"].as_str()),
        (401, Some("token_invalid"))
    );

    for bad in ["", "not-a-code", &"x".repeat(500)] {
        let r = session(&s, bad).await;
        assert_eq!(
            (r.status.as_u16(), r.body["code"].as_str()),
            (401, Some("token_invalid")),
            "{bad:.20}"
        );
    }
    let r = s
        .post("/v1/self/session", "", None, json!({"code": code, "extra": 1}))
        .await;
    assert_eq!(r.status, 400);

    // A code lives no longer than the token that made it: here 2 s.
    let short = shop(&s, 2).await;
    let code = link(&s, &short, &id).await.body["code"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let r = session(&s, &code).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (401, Some("token_invalid")),
        "{}",
        r.text
    );

    // Concurrent exchanges of one code: exactly one session.
    let code = link(&s, &tok, &id).await.body["code"].as_str().unwrap().to_string();
    let s = std::sync::Arc::new(s);
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let (s, code) = (s.clone(), code.clone());
            tokio::spawn(async move { session(&s, &code).await.status.as_u16() })
        })
        .collect();
    let mut won = 0;
    for t in tries {
        if t.await.unwrap() == 201 {
            won += 1;
        }
    }
    assert_eq!(won, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reaches_its_own_subject_only_and_mints_nothing() {
    let s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["write", "read"]).await;
    let id = s.create(&writer, full_subject()).await;
    let other = s.create(&writer, full_subject()).await;
    let (tok, tok_id) = {
        let r = s
            .issue("shop-backend", &["subject_access"], &["grant", "read"], 3600)
            .await;
        (
            r.body["token"].as_str().unwrap().to_string(),
            r.body["id"].as_str().unwrap().to_string(),
        )
    };
    let me = open_session(&s, &tok, &id).await;
    let sa = Some("subject_access");

    let r = s.get(&format!("/v1/subjects/{id}"), &me, sa).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Ivanova");
    assert_eq!(r.body["fields"]["address"]["city"], "Almaty");

    // Another subject looks like none at all, on every route.
    for (m, path) in [
        (Method::GET, format!("/v1/subjects/{other}")),
        (Method::GET, format!("/v1/subjects/{other}/consents")),
        (Method::GET, format!("/v1/subjects/{other}/access-log")),
        (Method::DELETE, format!("/v1/subjects/{other}")),
    ] {
        let r = s.call(m.clone(), &path, &me, sa, None).await;
        assert_eq!(
            (r.status.as_u16(), r.body["code"].as_str()),
            (404, Some("subject_not_found")),
            "{m} {path}"
        );
    }
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{other}"),
            &me,
            sa,
            Some(json!({"fields": {"surname": "X"}})),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = s
        .post("/v1/subjects:batchGet", &me, sa, json!({"ids": [id, other]}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["results"][0]["status"], 200);
    assert_eq!(r.body["results"][1]["status"], 404);

    // It mints nothing, creates nothing, looks nothing up.
    let r = s
        .post(
            "/v1/grants",
            &me,
            sa,
            json!({"subjects": [id], "purpose": "subject_access", "ttl_seconds": 60, "caller": "x"}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (403, Some("capability_missing")),
        "{}",
        r.text
    );
    let r = link(&s, &me, &id).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .post("/v1/subjects", &me, sa, json!({"fields": {"surname": "New"}}))
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .post(
            "/v1/lookup",
            &me,
            sa,
            json!({"field": "email", "value": "aigerim.k@example.kz"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s.get("/v1/admin/tokens", &me, None).await;
    assert_eq!(r.status, 403);
    // Only under subject_access.
    let r = s.get(&format!("/v1/subjects/{id}"), &me, Some("order")).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (403, Some("purpose_not_allowed"))
    );

    // It edits, sees consents and the access log, and erases its subject.
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{id}"),
            &me,
            sa,
            Some(json!({"fields": {"phone": "+77015550000"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .call(
            Method::PUT,
            &format!("/v1/subjects/{id}/consents/marketing"),
            &me,
            sa,
            Some(json!({"granted": false})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{id}/access-log"), &me, sa).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .call(Method::DELETE, &format!("/v1/subjects/{id}"), &me, sa, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["signature"].is_string());
    let r = s.get(&format!("/v1/subjects/{id}"), &writer, Some("order")).await;
    assert_eq!(r.status, 410);

    // Revoking the shop's token ends the sessions it opened.
    let id2 = s.create(&writer, full_subject()).await;
    let me2 = open_session(&s, &tok, &id2).await;
    let r = s.revoke(&tok_id).await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{id2}"), &me2, sa).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (401, Some("token_invalid"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_with_the_token_that_opened_it() {
    let s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["write", "read"]).await;
    let id = s.create(&writer, full_subject()).await;
    let short = shop(&s, 3).await;
    let me = open_session(&s, &short, &id).await;
    assert_eq!(
        s.get(&format!("/v1/subjects/{id}"), &me, Some("subject_access"))
            .await
            .status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let r = s.get(&format!("/v1/subjects/{id}"), &me, Some("subject_access")).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (401, Some("token_expired")),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_self_answer_carries_the_page_headers() {
    let s = Server::start().await;
    for (path, status, ctype) in [
        ("/self/", 200, "text/html"),
        ("/self/app.js", 200, "text/javascript"),
        ("/self/app.css", 200, "text/css"),
        ("/self/i18n/ru.json", 200, "application/json"),
        ("/self/i18n/kk.json", 200, "application/json"),
        ("/self/i18n/en.json", 200, "application/json"),
        ("/self/nothing-here", 404, "text/plain"),
    ] {
        let r = s.client.get(format!("{}{path}", s.base())).send().await.unwrap();
        let h = r.headers().clone();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for d in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(d), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        if !ctype.is_empty() {
            assert!(h["content-type"].to_str().unwrap().starts_with(ctype), "{path}");
        }
    }
    // And the API answers the page calls carry the same no-sniff, no-referrer, no-store.
    let r = s.post("/v1/self/session", "", None, json!({"code": "nope"})).await;
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
    assert_eq!(r.headers["cache-control"], "no-store");
    let _: Value = r.body;
}

async fn read_as(s: &Server, id: &str, token: &str) -> common::Resp {
    s.get(&format!("/v1/subjects/{id}"), token, Some("subject_access"))
        .await
}

/// Sign-out ends the session in the vault, not only in the page: the token
/// is revoked for good (a restart does not bring it back), only a session
/// can end itself, and both decisions are in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_revokes_the_session_for_good() {
    let mut s = Server::start().await;
    let writer = s.token("order-service", &["order"], &["write", "read"]).await;
    let id = s.create(&writer, full_subject()).await;
    let shop_tok = shop(&s, 3600).await;
    let me = open_session(&s, &shop_tok, &id).await;
    assert_eq!(read_as(&s, &id, &me).await.status, 200);

    // Another token cannot end anything, and is not ended itself.
    let r = s.call(Method::DELETE, "/v1/self/session", &shop_tok, None, None).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (403, Some("capability_missing")),
        "{}",
        r.text
    );
    assert_eq!(read_as(&s, &id, &me).await.status, 200);

    let r = s.call(Method::DELETE, "/v1/self/session", &me, None, None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty(), "{}", r.text);
    let gone = read_as(&s, &id, &me).await;
    assert_eq!(
        (gone.status.as_u16(), gone.body["code"].as_str()),
        (401, Some("token_invalid")),
        "{}",
        gone.text
    );
    let r = s.call(Method::DELETE, "/v1/self/session", &me, None, None).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // The typed client ends a session the same way.
    let me2 = open_session(&s, &shop_tok, &id).await;
    s.api_as(&me2).end_self_session().await.expect("sign-out");
    assert_eq!(read_as(&s, &id, &me2).await.status, 401);

    s.restart().await;
    assert_eq!(
        read_as(&s, &id, &me).await.status,
        401,
        "a restart brought the session back"
    );
    assert_eq!(read_as(&s, &id, &shop_tok).await.status, 200);

    let ends: Vec<Value> = s
        .audit_entries()
        .into_iter()
        .filter(|e| e["action"] == "self_session_end")
        .collect();
    let outcomes: Vec<(&str, &str)> = ends
        .iter()
        .map(|e| (e["outcome"].as_str().unwrap(), e["caller"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("refused", "shop-backend"),
            ("allowed", "self-service"),
            ("refused", "self-service"),
            ("allowed", "self-service")
        ],
        "{ends:?}"
    );
    assert_eq!(ends[1]["subject"], id.as_str(), "{ends:?}");
}
