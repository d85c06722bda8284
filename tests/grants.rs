//! Black-box tests of consent, justification, delegated grants, mutual TLS
//! with certificate-bound tokens, and the online-guessing limit.

mod common;
use common::*;

use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const POLICY_VERSION: &str = "2024-06-01";

fn field_names(r: &Resp) -> Vec<String> {
    let mut v: Vec<String> = r.body["fields"]
        .as_object()
        .unwrap_or_else(|| panic!("no fields in {}", r.text))
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    assert_eq!(r.body["code"], code, "{}", r.text);
}

/// A GET with extra headers.
async fn get_with(s: &Server, path: &str, token: &str, purpose: &str, headers: &[(&str, &str)]) -> Resp {
    let mut rq = s
        .client
        .get(format!("{}{}", s.base(), path))
        .bearer_auth(token)
        .header("X-Purpose", purpose);
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    send(rq).await
}

async fn put_consent(s: &Server, token: &str, purpose: &str, id: &str, granted: bool) -> Resp {
    s.call(
        Method::PUT,
        &format!("/v1/subjects/{id}/consents/marketing"),
        token,
        Some(purpose),
        Some(json!({ "granted": granted })),
    )
    .await
}

// ---------------------------------------------------------------------------
// 1. consent
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_needs_consent_and_withdrawal_ends_it() {
    let s = Server::start().await;
    let order = s
        .token("order-service", &["order", "delivery"], &["read", "write"])
        .await;
    let marketing = s.token("promo-service", &["marketing"], &["read"]).await;
    let id = s.create(&order, full_subject()).await;
    let path = format!("/v1/subjects/{id}");

    // Opt-in: no record means no consent.
    let r = get_with(
        &s,
        &path,
        &marketing,
        "marketing",
        &[("X-Request-Id", "mkt-before-consent")],
    )
    .await;
    assert_problem(&r, 403, "consent_required");
    assert!(
        !r.text.contains("Aigerim") && !r.text.contains("example.kz"),
        "{}",
        r.text
    );

    // The marketing token cannot change consents itself (no write, purpose does not write).
    let r = put_consent(&s, &marketing, "marketing", &id, true).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // Granted through the shop (purpose order, write capability).
    let r = put_consent(&s, &order, "order", &id, true).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["granted"], true, "{}", r.text);
    assert_eq!(r.body["policy_version"], POLICY_VERSION, "{}", r.text);

    let r = s.get(&path, &marketing, Some("marketing")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(field_names(&r), ["email", "given_name", "phone"], "{}", r.text);
    assert_eq!(r.body["fields"]["given_name"], "Aigerim");
    assert_eq!(r.body["fields"]["email"], "aigerim.k@example.kz");
    assert_eq!(r.body["fields"]["phone"], "+77015550177");

    // Withdrawn: refused again.
    let r = put_consent(&s, &order, "order", &id, false).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = get_with(
        &s,
        &path,
        &marketing,
        "marketing",
        &[("X-Request-Id", "mkt-after-withdrawal")],
    )
    .await;
    assert_problem(&r, 403, "consent_required");
    assert_eq!(
        r.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("mkt-after-withdrawal")
    );

    // The current state and the history of changes.
    let r = s
        .get(&format!("/v1/subjects/{id}/consents"), &order, Some("order"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cur = &r.body["consents"]["marketing"];
    assert_eq!(cur["granted"], false, "{}", r.text);
    assert_eq!(cur["policy_version"], POLICY_VERSION, "{}", r.text);
    assert!(cur["at"].is_string(), "{}", r.text);
    let hist = r.body["history"].as_array().expect("history");
    let mkt: Vec<&Value> = hist.iter().filter(|h| h["purpose"] == "marketing").collect();
    assert_eq!(mkt.len(), 2, "{}", r.text);
    assert_eq!(mkt[0]["granted"], true, "{}", r.text);
    assert_eq!(mkt[1]["granted"], false, "{}", r.text);
    for h in &mkt {
        assert_eq!(h["policy_version"], POLICY_VERSION, "{}", r.text);
        assert!(h["at"].is_string(), "{}", r.text);
    }

    // Each refusal (and the release) is in the audit log.
    let audit = s.audit_entries();
    let reads: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "read" && e["subject"] == id.as_str() && e["purpose"] == "marketing")
        .collect();
    let refused: Vec<&&Value> = reads
        .iter()
        .filter(|e| e["outcome"] == "refused" && e["code"] == "consent_required")
        .collect();
    assert_eq!(refused.len(), 2, "audit: {reads:#?}");
    let rids: Vec<&str> = refused.iter().map(|e| e["request_id"].as_str().unwrap()).collect();
    assert_eq!(rids, ["mkt-before-consent", "mkt-after-withdrawal"]);
    for e in &refused {
        assert_eq!(e["caller"], "promo-service");
    }
    let allowed: Vec<&&Value> = reads.iter().filter(|e| e["outcome"] == "allowed").collect();
    assert_eq!(allowed.len(), 1, "audit: {reads:#?}");
    let mut f: Vec<String> = serde_json::from_value(allowed[0]["fields"].clone()).unwrap();
    f.sort();
    assert_eq!(f, ["email", "given_name", "phone"]);
    // No value in the log.
    let raw = s.audit_text();
    assert!(raw.contains("promo-service"), "the log as read holds the entries");
    assert!(!raw.contains("Aigerim") && !raw.contains("aigerim"));
}

// ---------------------------------------------------------------------------
// 2. justification
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legal_request_needs_a_justification() {
    let s = Server::start().await;
    let order = s.token("order-service", &["order"], &["write"]).await;
    let legal = s.token("prosecutor-gateway", &["legal_request"], &["read"]).await;
    let id = s.create(&order, full_subject()).await;
    let path = format!("/v1/subjects/{id}");

    let r = s.get(&path, &legal, Some("legal_request")).await;
    assert_problem(&r, 400, "justification_required");
    assert!(!r.text.contains("Ivanova"), "{}", r.text);

    // Blank counts as missing.
    let r = get_with(&s, &path, &legal, "legal_request", &[("X-Justification", "   ")]).await;
    assert_problem(&r, 400, "justification_required");

    let why = "Prosecutor request 12/2026";
    let r = get_with(
        &s,
        &path,
        &legal,
        "legal_request",
        &[("X-Justification", why), ("X-Request-Id", "legal-ok")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Ivanova");
    assert_eq!(field_names(&r).len(), 6, "{}", r.text);

    let long = "x".repeat(501);
    let r = get_with(&s, &path, &legal, "legal_request", &[("X-Justification", &long)]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(!r.text.contains("Ivanova"), "{}", r.text);
    // Exactly 500 is accepted.
    let max = "y".repeat(500);
    let r = get_with(&s, &path, &legal, "legal_request", &[("X-Justification", &max)]).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A justification in Kazakh/Russian (UTF-8 in the header), limited in
    // characters, not bytes: 500 Cyrillic letters (1000 bytes) pass.
    let ru = "Запрос прокурора № 12/2026";
    let rq = s
        .client
        .get(format!("{}{}", s.base(), path))
        .bearer_auth(&legal)
        .header("X-Purpose", "legal_request")
        .header("X-Request-Id", "legal-utf8")
        .header(
            "X-Justification",
            reqwest::header::HeaderValue::from_bytes(ru.as_bytes()).unwrap(),
        );
    let r = send(rq).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cyr = "ж".repeat(500);
    let rq = s
        .client
        .get(format!("{}{}", s.base(), path))
        .bearer_auth(&legal)
        .header("X-Purpose", "legal_request")
        .header(
            "X-Justification",
            reqwest::header::HeaderValue::from_bytes(cyr.as_bytes()).unwrap(),
        );
    let r = send(rq).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let audit = s.audit_entries();
    let utf8: Vec<&Value> = audit.iter().filter(|e| e["request_id"] == "legal-utf8").collect();
    assert_eq!(utf8.len(), 1, "{audit:#?}");
    assert_eq!(utf8[0]["justification"], ru);
    let ok: Vec<&Value> = audit.iter().filter(|e| e["request_id"] == "legal-ok").collect();
    assert_eq!(ok.len(), 1, "{audit:#?}");
    assert_eq!(ok[0]["action"], "read");
    assert_eq!(ok[0]["outcome"], "allowed");
    assert_eq!(ok[0]["purpose"], "legal_request");
    assert_eq!(ok[0]["justification"], why);
    assert_eq!(ok[0]["subject"], id.as_str());
    let refused = audit
        .iter()
        .filter(|e| e["action"] == "read" && e["outcome"] == "refused" && e["code"] == "justification_required")
        .count();
    assert_eq!(refused, 2, "{audit:#?}");
}

// ---------------------------------------------------------------------------
// 3. grants
// ---------------------------------------------------------------------------

async fn mint(s: &Server, parent: &str, x_purpose: &str, body: Value) -> Resp {
    s.post("/v1/grants", parent, Some(x_purpose), body).await
}

/// The order service's token (an hour, may mint grants): its text and id.
async fn order_service(s: &Server) -> (String, String) {
    let issued = s
        .issue(
            "order-service",
            &["order", "delivery"],
            &["read", "write", "grant"],
            3600,
        )
        .await;
    assert_eq!(issued.status, 201, "{}", issued.text);
    let text = issued.body["token"].as_str().unwrap().to_string();
    (text, issued.body["id"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_narrow_counted_and_die_with_their_parent() {
    let s = Server::start().await;
    let (order, order_id) = order_service(&s).await;

    let a = s.create(&order, full_subject()).await;
    let mut other = full_subject();
    other["given_name"] = json!("Dana");
    other["email"] = json!("dana@example.kz");
    let b = s.create(&order, other).await;

    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["address"], "ttl_seconds": 600, "max_uses": 3, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for k in ["id", "token", "expires_at"] {
        assert!(r.body[k].is_string(), "{k} missing: {}", r.text);
    }
    assert_ne!(r.body["id"], order_id.as_str());
    let grant = r.body["token"].as_str().unwrap().to_string();

    // Only the granted field. (use 1 of 3)
    let r = s.get(&format!("/v1/subjects/{a}"), &grant, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(field_names(&r), ["address"], "{}", r.text);
    assert_eq!(r.body["fields"]["address"]["city"], "Almaty");

    // Another (existing) subject looks exactly like one that does not exist.
    let rb = s.get(&format!("/v1/subjects/{b}"), &grant, Some("delivery")).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let ru = s
        .get(&format!("/v1/subjects/{unknown}"), &grant, Some("delivery"))
        .await;
    assert_problem(&rb, 404, "subject_not_found");
    assert_problem(&ru, 404, "subject_not_found");
    assert_eq!(rb.body, ru.body, "B: {} / unknown: {}", rb.text, ru.text);
    assert_eq!(rb.headers.get("content-type"), ru.headers.get("content-type"));
    assert!(!rb.text.contains(&b) && !rb.text.contains("Dana"), "{}", rb.text);
    // ... also with a field list and under a purpose filter.
    let rb = s
        .get(&format!("/v1/subjects/{b}?fields=address"), &grant, Some("delivery"))
        .await;
    let ru = s
        .get(
            &format!("/v1/subjects/{unknown}?fields=address"),
            &grant,
            Some("delivery"),
        )
        .await;
    assert_eq!((rb.status, &rb.body), (ru.status, &ru.body));

    // Fields outside the grant: refused, never silently dropped.
    let r = s
        .get(&format!("/v1/subjects/{a}?fields=email"), &grant, Some("delivery"))
        .await;
    assert_problem(&r, 403, "field_not_allowed");
    let r = s
        .get(&format!("/v1/subjects/{a}?fields=phone"), &grant, Some("delivery"))
        .await;
    assert_problem(&r, 403, "field_not_allowed");
    let r = s
        .get(
            &format!("/v1/subjects/{a}?fields=address,phone"),
            &grant,
            Some("delivery"),
        )
        .await;
    assert_problem(&r, 403, "field_not_allowed");

    // Another purpose, even one the parent holds.
    let r = s.get(&format!("/v1/subjects/{a}"), &grant, Some("order")).await;
    assert_problem(&r, 403, "purpose_not_allowed");

    // A grant cannot write or mint grants.
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{a}"),
            &grant,
            Some("delivery"),
            Some(json!({"fields": {"phone": "+77015550000"}})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = mint(
        &s,
        &grant,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["address"], "ttl_seconds": 60, "caller": "sub-courier"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.body["code"] == "capability_missing" || r.body["code"] == "grant_too_wide",
        "{}",
        r.text
    );
    assert!(r.body["token"].is_null());

    // Uses 2 and 3, then the grant is used up.
    let r = s.get(&format!("/v1/subjects/{a}"), &grant, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .get(&format!("/v1/subjects/{a}?fields=address"), &grant, Some("delivery"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{a}"), &grant, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
    assert!(!r.text.contains("Almaty"), "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{b}"), &grant, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");

    // Expiry.
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 2, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let short = r.body["token"].as_str().unwrap().to_string();
    let r = s.get(&format!("/v1/subjects/{a}"), &short, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Default fields: what delivery covers.
    assert_eq!(
        field_names(&r),
        ["address", "given_name", "patronymic", "phone", "surname"],
        "{}",
        r.text
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = s.get(&format!("/v1/subjects/{a}"), &short, Some("delivery")).await;
    assert_problem(&r, 401, "token_expired");

    // Widening attempts.
    // A purpose the parent lacks.
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "marketing", "ttl_seconds": 60, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 403, "grant_too_wide");
    let r = mint(
        &s,
        &order,
        "marketing",
        json!({"subjects": [a], "purpose": "marketing", "ttl_seconds": 60, "caller": "x"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // A field outside the purpose.
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["email"], "ttl_seconds": 60, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 403, "grant_too_wide");
    let r = mint(&s, &order, "delivery", json!({"subjects": [a], "purpose": "delivery", "fields": ["address", "email"], "ttl_seconds": 60, "caller": "x"})).await;
    assert_problem(&r, 403, "grant_too_wide");
    // Longer than the parent has left (3600 s).
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 7200, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 403, "grant_too_wide");
    // Beyond grants.max_ttl (7 days), from a parent that lives 30 days.
    let long_parent = s
        .issue("order-long", &["delivery"], &["read", "grant"], 30 * 86400)
        .await;
    assert_eq!(long_parent.status, 201, "{}", long_parent.text);
    let long_parent = long_parent.body["token"].as_str().unwrap().to_string();
    let r = mint(
        &s,
        &long_parent,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 7 * 86400 + 1, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 403, "grant_too_wide");
    let r = mint(
        &s,
        &long_parent,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 7 * 86400, "caller": "x"}),
    )
    .await;
    assert_eq!(r.status, 201, "exactly max_ttl is allowed: {}", r.text);
    // A parent without the grant capability.
    let no_grant = s
        .token("order-nogrant", &["order", "delivery"], &["read", "write"])
        .await;
    let r = mint(
        &s,
        &no_grant,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 60, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 403, "capability_missing");
    // None of the refused mints left a token behind.
    let list = s.get("/v1/admin/tokens", &s.admin, None).await;
    assert_eq!(list.status, 200, "{}", list.text);
    let grants = list.body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "grant")
        .count();
    assert_eq!(grants, 3, "{}", list.text);

    // Revoking the parent ends its grants, fresh or not.
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a, b], "purpose": "delivery", "fields": ["address", "phone"], "ttl_seconds": 600, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let fresh = r.body["token"].as_str().unwrap().to_string();
    let r = s.get(&format!("/v1/subjects/{b}"), &fresh, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(field_names(&r), ["address", "phone"], "{}", r.text);
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{order_id}"),
            &s.admin,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{a}"), &fresh, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
    let r = s.get(&format!("/v1/subjects/{a}"), &order, Some("delivery")).await;
    assert_problem(&r, 401, "token_invalid");
    // The list says so too: every grant of the revoked parent shows revoked.
    let list = s.get("/v1/admin/tokens", &s.admin, None).await;
    let children: Vec<&Value> = list.body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["parent"] == order_id.as_str())
        .collect();
    assert!(!children.is_empty());
    for t in children {
        assert_eq!(t["revoked"], true, "a grant of a revoked token is listed as live: {t}");
        assert!(t["revoked_at"].is_string(), "{t}");
    }
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 60, "caller": "x"}),
    )
    .await;
    assert_problem(&r, 401, "token_invalid");

    // Grant decisions are audited under the grant's own token id.
    let audit = s.audit_entries();
    assert!(audit
        .iter()
        .any(|e| e["action"] == "grant" && e["outcome"] == "refused" && e["code"] == "grant_too_wide"));
    assert!(audit
        .iter()
        .any(|e| e["action"] == "read" && e["caller"] == "courier-kazpost" && e["code"] == "subject_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_cannot_tell_an_erased_subject_from_an_unknown_one() {
    let s = Server::start().await;
    let order = s
        .token("order-service", &["order", "delivery"], &["read", "write", "grant"])
        .await;
    let a = s.create(&order, full_subject()).await;
    let c = s.create(&order, json!({"given_name": "Temp"})).await;
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/subjects/{c}"),
            &s.admin,
            Some("erasure"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The parent sees the erasure.
    let r = s.get(&format!("/v1/subjects/{c}"), &order, Some("delivery")).await;
    assert_problem(&r, 410, "subject_erased");

    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "ttl_seconds": 600, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let grant = r.body["token"].as_str().unwrap().to_string();
    let rc = s.get(&format!("/v1/subjects/{c}"), &grant, Some("delivery")).await;
    let ru = s
        .get(
            &format!("/v1/subjects/{}", uuid::Uuid::new_v4()),
            &grant,
            Some("delivery"),
        )
        .await;
    assert_problem(&rc, 404, "subject_not_found");
    assert_eq!(rc.body, ru.body);
    // max_uses holds under concurrency: 12 parallel reads, 3 uses.
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["phone"], "ttl_seconds": 600, "max_uses": 3, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let limited = r.body["token"].as_str().unwrap().to_string();
    let path = format!("/v1/subjects/{a}");
    let mut set = Vec::new();
    for _ in 0..12 {
        set.push(s.get(&path, &limited, Some("delivery")));
    }
    let results = futures_join_all(set).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    let used_up = results
        .iter()
        .filter(|r| r.status == 401 && r.body["code"] == "token_invalid")
        .count();
    assert_eq!(
        (ok, used_up),
        (3, 9),
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );

    // Consents of another subject are hidden the same way.
    let rc = s
        .get(&format!("/v1/subjects/{c}/consents"), &grant, Some("delivery"))
        .await;
    assert_ne!(rc.status, 200, "{}", rc.text);
}

/// Runs futures concurrently (no `futures` crate in the dependency set).
async fn futures_join_all<F: std::future::Future<Output = Resp>>(fs: Vec<F>) -> Vec<Resp> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<Resp>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => out[i] = Some(r),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

// ---------------------------------------------------------------------------
// 4. mutual TLS and certificate-bound tokens
// ---------------------------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn make_ca(name: &str) -> Ca {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A client certificate and key, PEM, concatenated (for reqwest's Identity).
fn client_identity(ca: &Ca, cn: &str) -> reqwest::Identity {
    client_identity_dn(ca, &[(rcgen::DnType::CommonName, cn)])
}

/// A client certificate (CN only) and its key, as PEM files in `dir`.
fn client_cert_files(ca: &Ca, cn: &str, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = client_cert_pem(ca, &[(rcgen::DnType::CommonName, cn)]);
    let (c, k) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A client certificate with the given subject attributes, in this order.
fn client_identity_dn(ca: &Ca, dn: &[(rcgen::DnType, &str)]) -> reqwest::Identity {
    let (cert, key) = client_cert_pem(ca, dn);
    reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap()
}

/// A client certificate signed by `ca` with these subject attributes, and
/// its key: (certificate PEM, key PEM).
fn client_cert_pem(ca: &Ca, dn: &[(rcgen::DnType, &str)]) -> (String, String) {
    use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    for (t, v) in dn {
        p.distinguished_name.push(t.clone(), *v);
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_and_binds_tokens_to_it() {
    // First a plain dev server: it makes the keys and TLS certificate, and
    // issues the tokens (tokens survive restarts).
    let mut s = Server::start().await;
    let order = s
        .token("order-service", &["order", "delivery"], &["read", "write", "grant"])
        .await;
    let id = s.create(&order, full_subject()).await;
    let bind = |caller: &'static str, subject: &'static str| {
        let s = &s;
        async move {
            let r = s
                .post(
                    "/v1/admin/tokens",
                    &s.admin,
                    None,
                    json!({"caller": caller, "purposes": ["delivery"], "capabilities": ["read"], "ttl_seconds": 3600, "cert_subject": subject}),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            r.body["token"].as_str().unwrap().to_string()
        }
    };
    let bound_dn = bind("courier-kazpost", "CN=courier-kazpost").await;
    let bound_cn = bind("courier-kazpost", "courier-kazpost").await;
    s.stop();

    let ca = make_ca("pdvault test client CA");
    let rogue = make_ca("pdvault test client CA"); // same name, other key
    let ca_path = s.dir.path().join("client-ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    assert!(text.contains("[server]\n"));
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nclient_ca = {:?}\n", ca_path.to_str().unwrap()),
        1,
    );
    std::fs::write(&s.config, text).unwrap();

    let server_pem = std::fs::read(s.keys_dir().join("tls-cert.pem")).unwrap();
    let courier = client_trusting(&server_pem, Some(client_identity(&ca, "courier-kazpost")));
    let other = client_trusting(&server_pem, Some(client_identity(&ca, "other")));
    let bare = client_trusting(&server_pem, None);
    let foreign = client_trusting(&server_pem, Some(client_identity(&rogue, "courier-kazpost")));
    // CN=other, with another attribute whose value spells ", CN=courier-kazpost".
    let sneaky = client_trusting(
        &server_pem,
        Some(client_identity_dn(
            &ca,
            &[
                (rcgen::DnType::OrganizationName, "Evil, CN=courier-kazpost"),
                (rcgen::DnType::CommonName, "other"),
            ],
        )),
    );

    s.launch("server-mtls.log");
    let base = s.base();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "pdvault exited ({st}): {}",
                std::fs::read_to_string(s.dir.path().join("server-mtls.log")).unwrap_or_default()
            );
        }
        if let Ok(r) = courier.get(format!("{base}/v1/health")).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "mTLS server did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No certificate, or one from another CA: no HTTP answer at all.
    let r = bare.get(format!("{base}/v1/health")).send().await;
    assert!(r.is_err(), "no client certificate, yet: {:?}", r.map(|r| r.status()));
    let r = foreign.get(format!("{base}/v1/health")).send().await;
    assert!(
        r.is_err(),
        "foreign client certificate, yet: {:?}",
        r.map(|r| r.status())
    );
    let r = bare
        .get(format!("{base}/v1/subjects/{id}"))
        .bearer_auth(&bound_dn)
        .header("X-Purpose", "delivery")
        .send()
        .await;
    assert!(r.is_err());

    let read = |c: &reqwest::Client, token: &str| {
        send(
            c.get(format!("{base}/v1/subjects/{id}"))
                .bearer_auth(token.to_string())
                .header("X-Purpose", "delivery"),
        )
    };

    // The bound token over the wrong certificate.
    let r = read(&other, &bound_dn).await;
    assert_problem(&r, 401, "token_invalid");
    assert!(!r.text.contains("Almaty"), "{}", r.text);
    let r = read(&other, &bound_cn).await;
    assert_problem(&r, 401, "token_invalid");

    // A subject with a comma in a value, and one with two CNs.
    let with_comma = client_trusting(
        &server_pem,
        Some(client_identity_dn(
            &ca,
            &[
                (rcgen::DnType::OrganizationName, "Kazpost, JSC"),
                (rcgen::DnType::CommonName, "courier-kazpost"),
            ],
        )),
    );
    let two_cns = client_trusting(
        &server_pem,
        Some(client_identity_dn(
            &ca,
            &[
                (rcgen::DnType::CommonName, "courier-kazpost"),
                (rcgen::DnType::CommonName, "other"),
            ],
        )),
    );
    let r = read(&with_comma, &bound_cn).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = read(&with_comma, &bound_dn).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = read(&two_cns, &bound_cn).await;
    assert_problem(&r, 401, "token_invalid");

    // An attribute value that looks like a CN does not impersonate.
    let r = read(&sneaky, &bound_dn).await;
    assert_problem(&r, 401, "token_invalid");
    let r = read(&sneaky, &bound_cn).await;
    assert_problem(&r, 401, "token_invalid");

    // ... and over the right one (full DN and bare CN bindings).
    let r = send(courier.get(format!("{base}/v1/health"))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = read(&courier, &bound_dn).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["address"]["city"], "Almaty");
    let r = read(&courier, &bound_cn).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // An unbound token works over any accepted certificate.
    let r = read(&other, &order).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The typed client, as a courier integration sets it up: the vault's CA
    // file and its own certificate files.
    let typed = |cn: &str, token: &str| {
        let (c, k) = client_cert_files(&ca, cn, s.dir.path());
        pdvault::client::Client::builder(&base)
            .ca_file(s.keys_dir().join("tls-cert.pem"))
            .unwrap()
            .client_cert_files(c, k)
            .unwrap()
            .token(token)
            .build()
            .unwrap()
    };
    let got = typed("courier-kazpost", &bound_dn)
        .read("delivery", &id, Some(&["address"]))
        .await
        .unwrap();
    assert_eq!(got.fields["address"]["city"], "Almaty");
    let e = typed("other", &bound_dn)
        .read("delivery", &id, None)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some("token_invalid"), "{e}");
    let no_cert = pdvault::client::Client::builder(&base)
        .ca_file(s.keys_dir().join("tls-cert.pem"))
        .unwrap()
        .token(bound_dn.as_str())
        .build()
        .unwrap();
    let e = no_cert.health().await.err().unwrap();
    assert!(matches!(e, pdvault::client::ClientError::Transport { .. }), "{e}");

    // A grant can be bound too.
    let r = send(
        other
            .post(format!("{base}/v1/grants"))
            .bearer_auth(&order)
            .header("X-Purpose", "delivery")
            .json(&json!({"subjects": [id], "purpose": "delivery", "fields": ["address"], "ttl_seconds": 600, "caller": "courier-kazpost", "cert_subject": "CN=courier-kazpost"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let grant = r.body["token"].as_str().unwrap().to_string();
    let r = read(&other, &grant).await;
    assert_problem(&r, 401, "token_invalid");
    let r = read(&courier, &grant).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(field_names(&r), ["address"]);

    // The mismatches were audited as refusals.
    let audit = s.audit_entries();
    let refusals = audit
        .iter()
        .filter(|e| e["action"] == "authenticate" && e["outcome"] == "refused")
        .count();
    assert!(refusals >= 3, "{audit:#?}");
}

// ---------------------------------------------------------------------------
// 5. online guessing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_tokens_ends_in_429() {
    // Its own server: this locks the loopback peer out for 60 s.
    let s = Server::start().await;
    let mut statuses = vec![];
    let mut last = None;
    let started = Instant::now();
    for _ in 0..100 {
        let guess = format!("pdv_{}", uuid::Uuid::new_v4().simple());
        let r = s.get("/v1/admin/tokens", &guess, None).await;
        statuses.push(r.status.as_u16());
        last = Some(r);
    }
    let elapsed = started.elapsed();
    // The first ones are plain refusals, then the peer is locked out.
    assert!(statuses[..5].iter().all(|&c| c == 401), "{statuses:?}");
    let first_429 = statuses.iter().position(|&c| c == 429).expect("no 429 at all");
    assert!(first_429 <= 20, "first 429 at {first_429}: {statuses:?}");
    assert!(statuses[first_429..].iter().all(|&c| c == 429), "{statuses:?}");
    let last = last.unwrap();
    assert_problem(&last, 429, "rate_limited");
    let retry: u64 = last
        .headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(elapsed < Duration::from_secs(30), "guessing took {elapsed:?}");

    // While the guesser is locked out, a good token from the same address is
    // still served (a valid caller is never refused for another's failures),
    // and the guesses go on being refused.
    let r = s.get("/v1/admin/tokens", &s.admin, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.get("/v1/admin/tokens", "pdv_another_guess", None).await;
    assert_problem(&r, 429, "rate_limited");
    assert!(r.headers.get("retry-after").is_some());
    // Health needs no token and still answers.
    let r = s.get("/v1/health", "", None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The failed authentications are in the audit log.
    let audit = s.audit_entries();
    let n = audit
        .iter()
        .filter(|e| e["action"] == "authenticate" && e["code"] == "token_invalid")
        .count();
    assert!(n >= 5, "{n} authenticate refusals audited");
}

/// A server that sweeps every second what expired more than a second ago.
fn sweep_each_second(t: String) -> String {
    t.replace("sweep_every = \"1h\"", "sweep_every = \"1s\"").replace(
        "expired_credentials_kept = \"30d\"",
        "expired_credentials_kept = \"1s\"",
    )
}

/// A grant per parcel and a session per visit of the user's own page each
/// leave a token record. Once expired for longer than
/// `retention.expired_credentials_kept`, the sweep drops it: it leaves the token
/// list (where it first shows as expired) and its text stays refused. A
/// token that has not expired stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_of_long_expired_grants_are_dropped() {
    let s = Server::start_with(Some(&sweep_each_second), vec![]).await;
    let (order, order_id) = order_service(&s).await;
    let a = s.create(&order, full_subject()).await;
    let r = mint(
        &s,
        &order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["address"], "ttl_seconds": 1, "max_uses": 3, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (grant, grant_id) = (r.body["token"].as_str().unwrap().to_string(), r.body["id"].clone());
    let listed = |r: &Resp, id: &Value| r.body["tokens"].as_array().unwrap().iter().any(|t| &t["id"] == id);
    let r = s.get("/v1/admin/tokens", &s.admin.clone(), None).await;
    assert!(listed(&r, &grant_id), "{}", r.text);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = s.get("/v1/admin/tokens", &s.admin.clone(), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if !listed(&r, &grant_id) {
            assert!(listed(&r, &json!(order_id)), "a live token was dropped: {}", r.text);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expired grant is still listed: {}",
            r.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = s.get(&format!("/v1/subjects/{a}"), &grant, Some("delivery")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{a}"), &order, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Each revocation (a sign-out of the user's page too) adds an entry to the
/// revocation ledger. Once its token has expired for longer than
/// `retention.expired_credentials_kept`, the sweep drops the entry (the
/// status counts them); the entries of tokens still live stay, hold across
/// a restart (the compacted ledger's chain is checked at start), and new
/// ones follow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocations_of_long_expired_tokens_leave_the_ledger() {
    let mut s = Server::start_with(Some(&sweep_each_second), vec![]).await;
    let (order, _) = order_service(&s).await;
    let a = s.create(&order, full_subject()).await;
    let before = revocations(&s).await;
    let _short = revoked_grant(&s, &order, &a, 1).await;
    let long = revoked_grant(&s, &order, &a, 600).await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while revocations(&s).await != before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired grant's revocation is still on record"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let later = revoked_grant(&s, &order, &a, 600).await;
    assert_eq!(revocations(&s).await, before + 2);

    s.restart().await;
    assert_eq!(revocations(&s).await, before + 2);
    for revoked in [&long, &later] {
        let r = s.get(&format!("/v1/subjects/{a}"), revoked, Some("delivery")).await;
        assert_problem(&r, 401, "token_invalid");
    }
    let r = s.get(&format!("/v1/subjects/{a}"), &order, Some("delivery")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The revocation ledger's entries, as the status counts them.
async fn revocations(s: &Server) -> u64 {
    let r = s.get("/v1/admin/status", &s.admin, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["revocations"].as_u64().expect("revocations counted")
}

/// A grant of `ttl` seconds on subject `a`, minted and revoked: its text.
async fn revoked_grant(s: &Server, order: &str, a: &str, ttl: u64) -> String {
    let r = mint(
        s,
        order,
        "delivery",
        json!({"subjects": [a], "purpose": "delivery", "fields": ["address"], "ttl_seconds": ttl, "caller": "courier-kazpost"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (text, id) = (r.body["token"].as_str().unwrap(), r.body["id"].as_str().unwrap());
    let r = s
        .call(Method::DELETE, &format!("/v1/admin/tokens/{id}"), &s.admin, None, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    text.to_string()
}
