//! Black-box tests of the audit log: what is recorded (and what never is), the
//! hash chain under tampering, fail-closed behaviour, durability across a
//! crash, the per-subject access log, the CLI export and the metrics.

mod common;
use common::*;

use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A call with our own request id and, optionally, a justification.
// Mirrors the request's parts one to one; a builder would hide what is sent.
#[allow(clippy::too_many_arguments)]
async fn call_rid(
    s: &Server,
    method: Method,
    path: &str,
    token: &str,
    purpose: Option<&str>,
    rid: &str,
    justification: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let mut headers = vec![("X-Request-Id", rid)];
    headers.extend(justification.map(|j| ("X-Justification", j)));
    let r = s.call_with(method, path, token, purpose, &headers, body).await;
    assert_eq!(
        r.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(rid),
        "the response echoes the request id"
    );
    r
}

/// Issues a token; returns (id, text).
async fn issue(s: &Server, caller: &str, purposes: &[&str], caps: &[&str]) -> (String, String) {
    let r = s.issue(caller, purposes, caps, 3600).await;
    assert_eq!(r.status, 201, "{}", r.text);
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["token"].as_str().unwrap().to_string(),
    )
}

/// The audit log file (sled only: on postgres the chains are rows of the
/// data database); for the tests' files-only parts.
fn audit_log_path(data: &Path) -> PathBuf {
    data.join("audit").join("audit.log")
}

/// The audit log's lines as its operator reads them: the file on sled, the
/// unfiltered `pdvault audit export` on postgres (the same entries, each
/// naming its node).
fn log_text(s: &Server) -> String {
    if on_postgres() {
        let (code, out, err) = export(s, &[]);
        assert_eq!(code, 0, "export: {err}");
        out
    } else {
        std::fs::read_to_string(audit_log_path(&s.data_dir())).unwrap()
    }
}

fn entries_for<'a>(entries: &'a [Value], rid: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["request_id"] == rid).collect()
}

fn run(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("run pdvault");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pdvault audit export [args]` against this server's directories.
fn export(s: &Server, args: &[&str]) -> (i32, String, String) {
    let mut c = s.cmd();
    c.args(["audit", "export"]).args(args);
    run(&mut c)
}

/// `pdvault audit verify` of this server's store (every chain, on both
/// backends).
fn verify(s: &Server) -> (i32, String, String) {
    let mut c = s.cmd();
    c.args(["audit", "verify"]);
    run(&mut c)
}

/// `pdvault audit verify` against a copied data directory (files only: on
/// postgres `audit verify` reads the database, whatever `--data-dir` says).
fn verify_copy(s: &Server, data: &Path) -> (i32, String, String) {
    let mut c = std::process::Command::new(BIN);
    c.arg("--config")
        .arg(&s.config)
        .arg("--data-dir")
        .arg(data)
        .arg("--keys-dir")
        .arg(s.keys_dir())
        .args(["audit", "verify"])
        .env_remove("PDVAULT_PASSPHRASE")
        .env_remove("PDVAULT_TOKEN");
    run(&mut c)
}

/// The values of `full_subject()`, raw and normalised, that must never be
/// found in the audit trail. (Short values such as "10" or "5" are left out:
/// they occur by chance in sequence numbers and hashes.)
fn value_needles() -> Vec<&'static str> {
    vec![
        "Ivanova",
        "Aigerim",
        "Serikovna",
        "8 701 555 01 77",
        "+77015550177",
        "77015550177",
        "7015550177",
        "aigerim.k@example.kz",
        "aigerim.k",
        "Almaty Region",
        "Almaty",
        "Abai Ave",
        "050000",
    ]
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

const ALL_FIELDS: [&str; 6] = ["address", "email", "given_name", "patronymic", "phone", "surname"];
const DELIVERY_FIELDS: [&str; 5] = ["address", "given_name", "patronymic", "phone", "surname"];

fn fields_of(e: &Value) -> Vec<String> {
    let mut v: Vec<String> = e["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("fields is an array: {e}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// 1. what is recorded, exactly, and what never is
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_match_the_calls_and_hold_no_values_or_tokens() {
    let s = Server::start().await;
    let (order_id, order_tok) = issue(&s, "order-service", &["order"], &["read", "write"]).await;
    let (cour_id, cour_tok) = issue(&s, "courier-kazpost", &["delivery", "marketing"], &["read"]).await;
    let (legal_id, legal_tok) = issue(&s, "state-body", &["legal_request"], &["read"]).await;

    // create under order
    let r = call_rid(
        &s,
        Method::POST,
        "/v1/subjects",
        &order_tok,
        Some("order"),
        "t1-create",
        None,
        Some(json!({ "fields": full_subject() })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.body["id"].as_str().unwrap().to_string();
    let path = format!("/v1/subjects/{sid}");

    // read under delivery: allowed
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        &cour_tok,
        Some("delivery"),
        "t1-read-delivery",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Ivanova");

    // email under delivery: refused, never a silent drop
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{path}?fields=email"),
        &cour_tok,
        Some("delivery"),
        "t1-read-email",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["code"], "field_not_allowed");

    // marketing without consent
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        &cour_tok,
        Some("marketing"),
        "t1-read-marketing",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["code"], "consent_required");

    // legal request with a justification
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        &legal_tok,
        Some("legal_request"),
        "t1-read-legal",
        Some("court order 5/2026"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["email"], "aigerim.k@example.kz");

    // a bad token
    let bad_tok = "pdv_this-is-not-a-real-token-0123456789abcdef";
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        bad_tok,
        Some("delivery"),
        "t1-bad-token",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["code"], "token_invalid");

    let all = s.audit_entries();
    let rids = [
        "t1-create",
        "t1-read-delivery",
        "t1-read-email",
        "t1-read-marketing",
        "t1-read-legal",
        "t1-bad-token",
    ];
    let mine: Vec<&Value> = all
        .iter()
        .filter(|e| e["request_id"].as_str().is_some_and(|r| r.starts_with("t1-")))
        .collect();
    let got_rids: Vec<&str> = mine.iter().map(|e| e["request_id"].as_str().unwrap()).collect();
    assert_eq!(
        got_rids, rids,
        "exactly one entry per call, in call order; got {mine:#?}"
    );
    // seqs increase in that order
    for w in mine.windows(2) {
        assert!(w[0]["seq"].as_u64().unwrap() < w[1]["seq"].as_u64().unwrap());
    }
    // every entry has exactly the documented keys (plus the chain; on
    // postgres also the node whose chain holds it)
    let mut want_keys = vec![
        "seq",
        "at",
        "request_id",
        "caller",
        "token_id",
        "purpose",
        "action",
        "subject",
        "fields",
        "outcome",
        "code",
        "justification",
        "prev",
        "hash",
    ];
    if on_postgres() {
        want_keys.push("node");
    }
    for e in &mine {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, sorted(&want_keys), "{e}");
        if on_postgres() {
            assert!(
                e["node"].as_str().is_some_and(|n| uuid::Uuid::parse_str(n).is_ok()),
                "{e}"
            );
            assert_eq!(e["node"], mine[0]["node"], "one server, one chain: {e}");
        }
        assert!(
            e["at"].as_str().is_some_and(|a| a.starts_with("20") && a.contains('T')),
            "{e}"
        );
    }

    struct Want<'a> {
        caller: Option<&'a str>,
        token_id: Option<&'a str>,
        purpose: Option<&'a str>,
        action: &'a str,
        subject: Option<&'a str>,
        fields: Vec<String>,
        outcome: &'a str,
        code: Option<&'a str>,
        justification: Option<&'a str>,
    }
    let wants = [
        Want {
            caller: Some("order-service"),
            token_id: Some(&order_id),
            purpose: Some("order"),
            action: "create",
            subject: Some(&sid),
            fields: sorted(&ALL_FIELDS),
            outcome: "allowed",
            code: None,
            justification: None,
        },
        Want {
            caller: Some("courier-kazpost"),
            token_id: Some(&cour_id),
            purpose: Some("delivery"),
            action: "read",
            subject: Some(&sid),
            fields: sorted(&DELIVERY_FIELDS),
            outcome: "allowed",
            code: None,
            justification: None,
        },
        Want {
            caller: Some("courier-kazpost"),
            token_id: Some(&cour_id),
            purpose: Some("delivery"),
            action: "read",
            subject: Some(&sid),
            fields: sorted(&["email"]),
            outcome: "refused",
            code: Some("field_not_allowed"),
            justification: None,
        },
        Want {
            caller: Some("courier-kazpost"),
            token_id: Some(&cour_id),
            purpose: Some("marketing"),
            action: "read",
            subject: Some(&sid),
            fields: vec![],
            outcome: "refused",
            code: Some("consent_required"),
            justification: None,
        },
        Want {
            caller: Some("state-body"),
            token_id: Some(&legal_id),
            purpose: Some("legal_request"),
            action: "read",
            subject: Some(&sid),
            fields: sorted(&ALL_FIELDS),
            outcome: "allowed",
            code: None,
            justification: Some("court order 5/2026"),
        },
        Want {
            caller: None,
            token_id: None,
            purpose: Some("delivery"),
            action: "authenticate",
            subject: None,
            fields: vec![],
            outcome: "refused",
            code: Some("token_invalid"),
            justification: None,
        },
    ];
    let opt = |o: Option<&str>| o.map(|s| Value::String(s.into())).unwrap_or(Value::Null);
    for (e, w) in mine.iter().zip(wants.iter()) {
        let rid = e["request_id"].as_str().unwrap();
        assert_eq!(e["caller"], opt(w.caller), "{rid} caller: {e}");
        assert_eq!(e["token_id"], opt(w.token_id), "{rid} token_id: {e}");
        assert_eq!(e["purpose"], opt(w.purpose), "{rid} purpose: {e}");
        assert_eq!(e["action"], w.action, "{rid} action: {e}");
        // a refused read of an existing subject names it; authenticate names none
        assert_eq!(e["subject"], opt(w.subject), "{rid} subject: {e}");
        assert_eq!(fields_of(e), w.fields, "{rid} fields: {e}");
        assert_eq!(e["outcome"], w.outcome, "{rid} outcome: {e}");
        assert_eq!(e["code"], opt(w.code), "{rid} code: {e}");
        assert_eq!(e["justification"], opt(w.justification), "{rid} justification: {e}");
    }

    // The chain as a whole verifies.
    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "verify on the live log: {out}{err}");

    // Raw byte scan: no value, no token text, anywhere under <data>/audit/
    // (the files: sled) or in the export (both backends; on postgres the
    // database's files are scanned in tests/postgres.rs).
    let mut files = vec![];
    if !audit_files_only("audit_entries_match_the_calls_and_hold_no_values_or_tokens: byte scan of <data>/audit/") {
        walk(&s.data_dir().join("audit"), &mut files);
        assert!(!files.is_empty());
    }
    let (code, exported, err) = export(&s, &[]);
    assert_eq!(code, 0, "export: {err}");
    assert!(exported.contains("t1-read-legal"), "export holds the entries");
    let tokens = [
        s.admin.trim(),
        order_tok.as_str(),
        cour_tok.as_str(),
        legal_tok.as_str(),
        bad_tok,
    ];
    for (p, bytes) in files
        .iter()
        .map(|(p, b)| (p.display().to_string(), b.as_slice()))
        .chain([("audit export".to_string(), exported.as_bytes())])
    {
        for v in value_needles() {
            assert!(!holds_value(bytes, v), "value {v:?} found in {p}");
            assert!(
                !holds_value(&bytes.to_ascii_lowercase(), &v.to_ascii_lowercase()),
                "value {v:?} (any case) found in {p}"
            );
        }
        for t in tokens {
            assert!(!t.is_empty());
            assert!(!contains(bytes, t.as_bytes()), "token text found in {p}");
        }
    }
}

// ---------------------------------------------------------------------------
// 2. tampering is found, and named
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_changed_removed_and_swapped_entries() {
    let mut s = Server::start().await;
    let tok = s
        .token("order-service", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    for _ in 0..3 {
        let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("delivery")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = s
        .get(&format!("/v1/subjects/{id}?fields=email"), &tok, Some("delivery"))
        .await;
    assert_eq!(r.status, 403);
    s.stop();

    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "untouched log verifies: {out}{err}");
    assert!(out.contains("intact"), "{out}");

    let entries = s.audit_entries();
    assert!(entries.len() >= 6, "enough entries to tamper with: {}", entries.len());
    // 1-based positions equal seqs in an intact log (one server: one chain)
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["seq"].as_u64().unwrap(), i as u64 + 1, "{e}");
    }

    // The rest alters copies of the log file (on postgres, where verify reads
    // the database, tests/postgres.rs alters its rows instead).
    if audit_files_only("verify_finds_changed_removed_and_swapped_entries") {
        return;
    }
    let data = s.data_dir();
    let original = std::fs::read_to_string(audit_log_path(&data)).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert_eq!(lines.len(), entries.len());
    let scratch = tempfile::tempdir().unwrap();
    let write_copy = |name: &str, lines: &[String]| -> PathBuf {
        let d = scratch.path().join(name);
        copy_dir(&data, &d);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(audit_log_path(&d), text).unwrap();
        d
    };
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();

    // Copy 1: one entry's caller changed (a read by order-service).
    let k = lines
        .iter()
        .position(|l| l.contains("\"caller\":\"order-service\"") && l.contains("\"action\":\"read\""))
        .expect("a read by order-service");
    let mut c1 = owned.clone();
    c1[k] = c1[k].replace("\"caller\":\"order-service\"", "\"caller\":\"someone-else\"");
    assert_ne!(c1[k], owned[k]);
    let d1 = write_copy("changed", &c1);

    // Copy 2: a middle line removed.
    let m = lines.len() / 2;
    let mut c2 = owned.clone();
    c2.remove(m);
    let d2 = write_copy("removed", &c2);

    // Copy 3: two adjacent lines swapped.
    let a = lines.len() / 2 - 1;
    let mut c3 = owned.clone();
    c3.swap(a, a + 1);
    let d3 = write_copy("swapped", &c3);

    let cases = [
        ("changed", &d1, k as u64 + 1, k as u64 + 1),
        ("removed", &d2, m as u64 + 1, m as u64 + 2),
        ("swapped", &d3, a as u64 + 1, a as u64 + 2),
    ];
    for (name, d, line, seq) in cases {
        let (code, out, err) = verify_copy(&s, d);
        let both = format!("{out}{err}");
        assert_ne!(code, 0, "{name}: verify must fail; said: {both}");
        assert!(
            both.contains(&format!("line {line}")),
            "{name}: output names line {line}: {both}"
        );
        assert!(
            both.contains(&format!("seq {seq}")),
            "{name}: output names seq {seq}: {both}"
        );
        assert!(!both.contains("intact"), "{name}: {both}");
    }

    // The untouched log still verifies (the copies did not touch it).
    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "{out}{err}");
}

// ---------------------------------------------------------------------------
// 3. fail closed when the audit log cannot be written
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_failure_fails_closed() {
    let fault_dir = tempfile::tempdir().unwrap();
    let fault = fault_dir.path().join("fault");
    let fault_s = fault.to_str().unwrap().to_string();
    let s = Server::start_with(None, vec![("PDVAULT_FAULT_AUDIT_FILE", fault_s.as_str())]).await;
    let tok = s
        .token("order-service", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    let path = format!("/v1/subjects/{id}");
    let r = s.get(&path, &tok, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = s.audit_entries();
    // the file's bytes too (sled)
    let before_bytes = (!audit_files_only("audit_failure_fails_closed: the file's bytes"))
        .then(|| std::fs::read(audit_log_path(&s.data_dir())).unwrap());

    std::fs::write(&fault, b"").unwrap();

    let no_values = |what: &str, r: &Resp| {
        for v in value_needles() {
            assert!(
                !holds_value(r.text.as_bytes(), v),
                "{what}: value {v:?} in the body: {}",
                r.text
            );
        }
    };
    // an allowed read
    let r = call_rid(&s, Method::GET, &path, &tok, Some("order"), "t3-read", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["code"], "audit_unavailable", "{}", r.text);
    assert!(r.body.get("fields").is_none(), "{}", r.text);
    no_values("read", &r);
    // a batch get
    let r = call_rid(
        &s,
        Method::POST,
        "/v1/subjects:batchGet",
        &tok,
        Some("order"),
        "t3-batch",
        None,
        Some(json!({"ids": [id]})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["code"], "audit_unavailable", "{}", r.text);
    no_values("batchGet", &r);
    // a lookup must not even say whether the value exists
    let r = call_rid(
        &s,
        Method::POST,
        "/v1/lookup",
        &tok,
        Some("order"),
        "t3-lookup",
        None,
        Some(json!({"field": "email", "value": "aigerim.k@example.kz"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(!r.text.contains(&id), "lookup released the id: {}", r.text);
    // a refusal that cannot be recorded is not answered as a refusal either
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{path}?fields=email"),
        &tok,
        Some("delivery"),
        "t3-refused",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    // a bad token
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        "pdv_not-a-token",
        Some("order"),
        "t3-badtok",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    // a create: nothing stored
    let r = call_rid(
        &s,
        Method::POST,
        "/v1/subjects",
        &tok,
        Some("order"),
        "t3-create",
        None,
        Some(json!({"fields": {"surname": "Zhaksylykov"}})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.body.get("id").is_none(), "{}", r.text);

    // Nothing was added to the log while it failed.
    let during = s.audit_entries();
    assert_eq!(before, during, "no entry appended while the audit log fails");
    if let Some(before_bytes) = before_bytes {
        let during = std::fs::read(audit_log_path(&s.data_dir())).unwrap();
        assert_eq!(
            before_bytes, during,
            "no byte appended to the file while the audit log fails"
        );
    }

    std::fs::remove_file(&fault).unwrap();

    // After the fault is gone: whatever the server answers, it never releases
    // data without a durable entry for that request.
    let r = call_rid(&s, Method::GET, &path, &tok, Some("order"), "t3-after", None, None).await;
    let entries = s.audit_entries();
    if r.status == 200 {
        let e = entries_for(&entries, "t3-after");
        assert_eq!(e.len(), 1, "a 200 after recovery has its entry");
        assert_eq!(e[0]["outcome"], "allowed");
    } else {
        assert_eq!(r.status, 503, "{}", r.text);
        no_values("after", &r);
    }
    for rid in [
        "t3-read",
        "t3-batch",
        "t3-lookup",
        "t3-refused",
        "t3-badtok",
        "t3-create",
    ] {
        assert!(
            entries_for(&entries, rid).is_empty(),
            "{rid} was recorded though it failed"
        );
    }
    // The create that failed stored nothing: no subject with that surname is findable
    // through the export (no create entry) and the chain is whole.
    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("t3: after removing the fault file the read answered {}", r.status);
}

// ---------------------------------------------------------------------------
// 4. an acknowledged entry survives kill -9
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entry_survives_kill9() {
    let mut s = Server::start().await;
    let tok = s
        .token("courier-kazpost", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    let path = format!("/v1/subjects/{id}");
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        &tok,
        Some("delivery"),
        "t4-read-before-crash",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{path}?fields=email"),
        &tok,
        Some("delivery"),
        "t4-refused-before-crash",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    s.kill9();

    // durable (on disk, or in the database), before any restart
    let entries = s.audit_entries();
    assert_eq!(entries_for(&entries, "t4-read-before-crash").len(), 1);
    assert_eq!(entries_for(&entries, "t4-refused-before-crash").len(), 1);

    s.spawn().await;
    let entries = s.audit_entries();
    let e = entries_for(&entries, "t4-read-before-crash");
    assert_eq!(e.len(), 1, "the acknowledged read is in the log after the crash");
    assert_eq!(e[0]["outcome"], "allowed");
    assert_eq!(e[0]["subject"], id.as_str());
    let (code, out, err) = export(&s, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("t4-read-before-crash").count(), 1, "{out}");
    assert_eq!(out.matches("t4-refused-before-crash").count(), 1, "{out}");

    // the chain continues after restart
    let r = call_rid(
        &s,
        Method::GET,
        &path,
        &tok,
        Some("delivery"),
        "t4-read-after",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = s.audit_entries();
    let before = entries_for(&entries, "t4-refused-before-crash")[0]["seq"]
        .as_u64()
        .unwrap();
    let after = entries_for(&entries, "t4-read-after")[0]["seq"].as_u64().unwrap();
    assert!(after > before);
    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "{out}{err}");
    // the access log (derived index) also has the pre-crash read
    let (_, auditor) = issue(&s, "auditor", &[], &["audit"]).await;
    let r = s.get(&format!("{path}/access-log"), &auditor, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rids: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request_id"].as_str().unwrap_or(""))
        .collect();
    assert!(rids.contains(&"t4-read-before-crash"), "{}", r.text);
}

// ---------------------------------------------------------------------------
// 5. the subject's access log
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lists_exactly_the_releases_of_that_subject() {
    let s = Server::start().await;
    let (_, writer) = issue(&s, "signup", &["order"], &["write"]).await;
    let (_, courier) = issue(&s, "courier-kazpost", &["delivery"], &["read"]).await;
    let (_, order) = issue(&s, "order-service", &["order"], &["read"]).await;
    let (_, auditor) = issue(&s, "dpo-auditor", &[], &["audit"]).await;
    let (_, selfsvc) = issue(&s, "self-service", &["subject_access"], &["read"]).await;

    let subj_s = s.create(&writer, full_subject()).await;
    let subj_t = s
        .create(
            &writer,
            json!({"surname": "Tokayev", "given_name": "Nurlan", "phone": "+77020001122"}),
        )
        .await;
    let ps = format!("/v1/subjects/{subj_s}");
    let pt = format!("/v1/subjects/{subj_t}");

    let r = call_rid(
        &s,
        Method::GET,
        &ps,
        &courier,
        Some("delivery"),
        "t5-courier-s",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = call_rid(&s, Method::GET, &ps, &order, Some("order"), "t5-order-s", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = call_rid(
        &s,
        Method::GET,
        &pt,
        &courier,
        Some("delivery"),
        "t5-courier-t",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = call_rid(&s, Method::GET, &pt, &order, Some("order"), "t5-order-t", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // a refused read of S is not a release
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{ps}?fields=email"),
        &courier,
        Some("delivery"),
        "t5-refused-s",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);

    let entries = s.audit_entries();
    let at_of = |rid: &str| entries_for(&entries, rid)[0]["at"].clone();

    let check = |r: &Resp, who: &str| {
        assert_eq!(r.status, 200, "{who}: {}", r.text);
        let list = r.body["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("{who}: entries: {}", r.text));
        assert_eq!(list.len(), 2, "{who}: exactly the two reads of S: {}", r.text);
        let (a, b) = (&list[0], &list[1]);
        assert_eq!(a["caller"], "courier-kazpost", "{who}: {a}");
        assert_eq!(a["purpose"], "delivery", "{who}: {a}");
        assert_eq!(fields_of(a), sorted(&DELIVERY_FIELDS), "{who}: {a}");
        assert_eq!(a["at"], at_of("t5-courier-s"), "{who}: {a}");
        assert_eq!(b["caller"], "order-service", "{who}: {b}");
        assert_eq!(b["purpose"], "order", "{who}: {b}");
        assert_eq!(fields_of(b), sorted(&ALL_FIELDS), "{who}: {b}");
        assert_eq!(b["at"], at_of("t5-order-s"), "{who}: {b}");
        assert!(!r.text.contains(&subj_t), "{who}: mentions T: {}", r.text);
        assert!(
            !r.text.contains("t5-courier-t") && !r.text.contains("t5-order-t"),
            "{who}: {}",
            r.text
        );
        for v in value_needles() {
            assert!(
                !holds_value(r.text.as_bytes(), v),
                "{who}: value {v:?} in the access log: {}",
                r.text
            );
        }
        for t in [&courier, &order, &auditor, &selfsvc] {
            assert!(!r.text.contains(t.as_str()), "{who}: token text in the access log");
        }
        assert!(r.body["next"].is_null(), "{who}: one page: {}", r.text);
    };

    // audit capability, no purpose
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{ps}/access-log"),
        &auditor,
        None,
        "t5-al-audit",
        None,
        None,
    )
    .await;
    check(&r, "audit token");
    // subject_access + read
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{ps}/access-log"),
        &selfsvc,
        Some("subject_access"),
        "t5-al-self",
        None,
        None,
    )
    .await;
    check(&r, "subject_access token");
    // T's log has T's two reads only
    let r = s.get(&format!("{pt}/access-log"), &auditor, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["entries"].as_array().unwrap().len(), 2, "{}", r.text);

    // a delivery token: 403, with and without its purpose
    let r = call_rid(
        &s,
        Method::GET,
        &format!("{ps}/access-log"),
        &courier,
        Some("delivery"),
        "t5-al-courier",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.body.get("entries").is_none());
    let r = s.get(&format!("{ps}/access-log"), &courier, None).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // the access-log calls are themselves audited
    let entries = s.audit_entries();
    let e = entries_for(&entries, "t5-al-audit");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["action"], "access_log");
    assert_eq!(e[0]["outcome"], "allowed");
    assert_eq!(e[0]["subject"], subj_s.as_str());
    let e = entries_for(&entries, "t5-al-courier");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["action"], "access_log");
    assert_eq!(e[0]["outcome"], "refused");

    // paging
    let r = s.get(&format!("{ps}/access-log?limit=1"), &auditor, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = r.body["entries"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", r.text);
    assert_eq!(list[0]["caller"], "courier-kazpost");
    let next = match &r.body["next"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("limit=1 of two entries gives a next cursor, got {other}: {}", r.text),
    };
    let r = s
        .get(&format!("{ps}/access-log?limit=1&after={next}"), &auditor, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = r.body["entries"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", r.text);
    assert_eq!(list[0]["caller"], "order-service");
    assert!(r.body["next"].is_null(), "no third page: {}", r.text);
}

// ---------------------------------------------------------------------------
// 6. export filters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_filters_by_subject_and_time() {
    let s = Server::start().await;
    let tok = s
        .token("order-service", &["order", "delivery"], &["read", "write"])
        .await;
    let a = s.create(&tok, full_subject()).await;
    let b = s
        .create(&tok, json!({"surname": "Tokayev", "phone": "+77020001122"}))
        .await;
    for id in [&a, &b, &a] {
        let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("delivery")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = s
        .get(&format!("/v1/subjects/{a}?fields=email"), &tok, Some("delivery"))
        .await;
    assert_eq!(r.status, 403);

    let (code, out, err) = export(&s, &["--subject", &a]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    // create + two reads + the refused read
    assert_eq!(lines.len(), 4, "{out}");
    for e in &lines {
        assert_eq!(e["subject"], a.as_str(), "{e}");
    }
    let actions: Vec<&str> = lines.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["create", "read", "read", "read"]);
    assert!(!out.contains(&b));
    // exactly the lines of the log for that subject, unchanged
    let log = log_text(&s);
    let want: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("\"subject\":\"{a}\"")))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);

    // a future --since: nothing
    for since in ["2099-01-01", "2099-01-01T00:00:00Z"] {
        let (code, out, err) = export(&s, &["--since", since]);
        assert_eq!(code, 0, "{err}");
        assert!(out.trim().is_empty(), "--since {since} printed: {out}");
    }
    // a past --since: everything
    let (code, out, err) = export(&s, &["--since", "2000-01-01"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), log.lines().count());
    let (code, out, err) = export(&s, &["--since", "30d", "--subject", &b]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "create + read of b: {out}");
    // a subject with no entries
    let (code, out, err) = export(&s, &["--subject", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().is_empty(), "{out}");
    // nonsense --since is refused, not ignored
    let (code, out, _) = export(&s, &["--since", "yesterday-ish"]);
    assert_ne!(code, 0, "{out}");

    // "who saw this subject's address last month": the README's one command
    let (code, out, err) = export(
        &s,
        &["--subject", &a, "--field", "address", "--released", "--since", "30d"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        lines.len(),
        2,
        "the two delivery reads of a, not its creation nor the refusal: {out}"
    );
    for e in &lines {
        assert_eq!(
            (e["action"].as_str(), e["outcome"].as_str()),
            (Some("read"), Some("allowed")),
            "{e}"
        );
        assert_eq!(e["caller"], "order-service");
        assert!(fields_of(e).contains(&"address".to_string()), "{e}");
    }
    let (code, out, err) = export(&s, &["--subject", &a, "--field", "email", "--released"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().is_empty(), "the email of a was never released: {out}");
}

// ---------------------------------------------------------------------------
// 7. metrics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_admin_and_count_decisions() {
    let s = Server::start().await;
    let tok = s
        .token("courier-kazpost", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("delivery")).await;
    assert_eq!(r.status, 200);
    let r = s
        .get(&format!("/v1/subjects/{id}?fields=email"), &tok, Some("delivery"))
        .await;
    assert_eq!(r.status, 403);

    let r = s.get("/metrics", &s.admin, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "content-type {ct}"
    );
    let text = &r.text;
    assert!(text.contains("pdvault_audit_flush_seconds"), "{text}");
    assert!(text.contains("# TYPE pdvault_decisions"), "{text}");
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pdvault_decisions_total{"))
        .collect();
    assert!(!decisions.is_empty(), "{text}");
    let has = |purpose: &str, outcome: &str| {
        decisions.iter().any(|l| {
            l.contains(&format!("purpose=\"{purpose}\""))
                && l.contains("caller=\"courier-kazpost\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
    };
    assert!(has("delivery", "allowed"), "{text}");
    assert!(has("delivery", "refused"), "{text}");
    assert!(has("order", "allowed"), "{text}");
    // the flush histogram has observations
    let count = text
        .lines()
        .find(|l| l.starts_with("pdvault_audit_flush_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(count >= 3.0, "{text}");
    for v in value_needles() {
        assert!(!holds_value(text.as_bytes(), v), "value {v:?} in metrics");
    }

    // not admin: 403; no token: 401
    let r = s.get("/metrics", &tok, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(!r.text.contains("pdvault_decisions"), "{}", r.text);
    let r = s.get("/metrics", &tok, Some("delivery")).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s.get("/metrics", "", None).await;
    assert_eq!(r.status, 401, "{}", r.text);
}

// ---------------------------------------------------------------------------
// 2b. signed checkpoints catch what the chain alone cannot: a cut tail and a
//     chain recomputed after an edit
// ---------------------------------------------------------------------------

/// The chain hash as API.md / audit.rs define it, recomputed by an attacker
/// who can write the file but has no key.
fn rehash(prev: &str, e: &Value) -> String {
    use sha2::Digest;
    let tuple = json!([
        e["seq"],
        e["at"],
        e["request_id"],
        e["caller"],
        e["token_id"],
        e["purpose"],
        e["action"],
        e["subject"],
        e["fields"],
        e["outcome"],
        e["code"],
        e["justification"]
    ]);
    let mut input = prev.as_bytes().to_vec();
    input.push(b'\n');
    input.extend_from_slice(&serde_json::to_vec(&tuple).unwrap());
    // Token issue, revoke and grant entries also chain the token they name.
    if let Some(t) = e["target_token_id"].as_str() {
        input.extend_from_slice(b"\ntarget_token_id\n");
        input.extend_from_slice(t.as_bytes());
    }
    // On a shared store (postgres) every entry also chains its node.
    if let Some(n) = e["node"].as_str() {
        input.extend_from_slice(b"\nnode\n");
        input.extend_from_slice(n.as_bytes());
    }
    hex::encode(sha2::Sha256::digest(&input))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_catch_truncation_and_a_recomputed_chain() {
    let edit = |t: String| {
        t.replace("checkpoint_every = \"5m\"", "checkpoint_every = \"1s\"")
            .replace("sweep_every = \"1h\"", "sweep_every = \"1s\"")
    };
    let mut s = Server::start_with(Some(&edit), vec![]).await;
    let tok = s
        .token("order-service", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    for _ in 0..4 {
        let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("delivery")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let data = s.data_dir();
    let head_seq = s.audit_entries().last().unwrap()["seq"].as_u64().unwrap();
    let cps = data.join("audit").join("checkpoints.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // The checkpoints: their file on sled; on postgres (rows of the data
        // database) the last one as the status names it (a status call is
        // audited itself, so the head moves on: any checkpoint from
        // head_seq on will do there).
        let (signed, text) = if on_postgres() {
            let r = s.get("/v1/admin/status", &s.admin, None).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let seq = r.body["last_checkpoint"]["seq"].as_u64();
            (seq.is_some_and(|q| q >= head_seq), r.text)
        } else {
            let text = std::fs::read_to_string(&cps).unwrap_or_default();
            let signed = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|c| c["seq"] == head_seq);
            (signed, text)
        };
        if signed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of seq {head_seq} was signed: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    s.stop();

    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("intact"), "{out}");

    let entries = s.audit_entries();
    // sanity: our rehash agrees with the implementation on the untouched entries
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            rehash(e["prev"].as_str().unwrap(), e),
            e["hash"].as_str().unwrap(),
            "entry {i}"
        );
    }

    // The rest alters copies of the files (the log, checkpoints.jsonl); on
    // postgres tests/postgres.rs alters the chain's rows instead.
    if audit_files_only("checkpoints_catch_truncation_and_a_recomputed_chain") {
        return;
    }
    let original = std::fs::read_to_string(audit_log_path(&data)).unwrap();
    assert_eq!(original.lines().count(), entries.len());
    let scratch = tempfile::tempdir().unwrap();
    let write_copy = |name: &str, lines: &[String]| -> PathBuf {
        let d = scratch.path().join(name);
        copy_dir(&data, &d);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(audit_log_path(&d), text).unwrap();
        d
    };

    // The tail cut off: every remaining link is sound, but a signed checkpoint
    // names a longer log.
    let cut: Vec<String> = original.lines().take(entries.len() - 2).map(String::from).collect();
    let d = write_copy("truncated", &cut);
    let (code, out, err) = verify_copy(&s, &d);
    assert_ne!(code, 0, "a truncated log must not verify: {out}{err}");
    assert!(err.contains("broken"), "{err}");

    // A caller changed and every later hash recomputed.
    let k = entries
        .iter()
        .position(|e| e["caller"] == "order-service" && e["action"] == "read")
        .unwrap();
    let mut forged = entries.clone();
    forged[k]["caller"] = json!("someone-else");
    let mut prev = if k == 0 {
        audit_genesis()
    } else {
        forged[k - 1]["hash"].as_str().unwrap().to_string()
    };
    for e in forged.iter_mut().skip(k) {
        e["prev"] = json!(prev);
        let h = rehash(&prev, e);
        e["hash"] = json!(h);
        prev = h;
    }
    let lines: Vec<String> = forged.iter().map(|e| serde_json::to_string(e).unwrap()).collect();
    let d = write_copy("rechained", &lines);
    // the links alone are consistent now ...
    let (code, out, err) = verify_copy(&s, &d);
    // ... but the signed checkpoint's head is not this chain's
    assert_ne!(
        code, 0,
        "a recomputed chain must not verify against signed checkpoints: {out}{err}"
    );
    assert!(err.contains("checkpoint"), "{err}");

    // ... and rewriting the checkpoint's head too breaks its signature.
    let cp_text = std::fs::read_to_string(d.join("audit").join("checkpoints.jsonl")).unwrap();
    let new_head = forged.last().unwrap()["hash"].as_str().unwrap().to_string();
    let last_seq = forged.last().unwrap()["seq"].clone();
    let cp_lines: Vec<String> = cp_text
        .lines()
        .map(|l| {
            let mut c: Value = serde_json::from_str(l).unwrap();
            if c["seq"] == last_seq {
                c["head"] = json!(new_head);
            } else if let Some(e) = forged.iter().find(|e| e["seq"] == c["seq"]) {
                c["head"] = e["hash"].clone();
            }
            serde_json::to_string(&c).unwrap()
        })
        .collect();
    std::fs::write(d.join("audit").join("checkpoints.jsonl"), cp_lines.join("\n") + "\n").unwrap();
    let (code, out, err) = verify_copy(&s, &d);
    assert_ne!(code, 0, "forged checkpoint heads must not verify: {out}{err}");
    assert!(err.contains("signature"), "{err}");
}

fn audit_genesis() -> String {
    "0".repeat(64)
}

// ---------------------------------------------------------------------------
// 7b. caller-chosen text (X-Purpose) cannot break or flood /metrics
// ---------------------------------------------------------------------------

/// Parses one sample line of the text exposition format strictly; returns the
/// label names, or why it is not valid.
fn parse_sample(line: &str) -> Result<Vec<String>, String> {
    let open = line.find('{').ok_or("no labels")?;
    let mut rest = &line[open + 1..];
    let mut names = vec![];
    loop {
        let eq = rest.find("=\"").ok_or(format!("no =\" in {rest:?}"))?;
        let name = &rest[..eq];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("bad label name {name:?}"));
        }
        names.push(name.to_string());
        rest = &rest[eq + 2..];
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((_, '\\')) => {
                    if !matches!(chars.next(), Some((_, '\\' | '"' | 'n'))) {
                        return Err("bad escape".into());
                    }
                }
                Some((i, '"')) => break i,
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some(_) => {}
            }
        };
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("} ") {
            r.trim().parse::<f64>().map_err(|_| format!("bad sample value {r:?}"))?;
            let mut sorted = names.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != names.len() {
                return Err(format!("duplicate label names {names:?}"));
            }
            return Ok(names);
        } else {
            return Err(format!("expected , or }} after a label value, got {rest:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_text_cannot_break_or_flood_metrics() {
    let s = Server::start().await;
    let tok = s
        .token("courier-kazpost", &["order", "delivery"], &["read", "write"])
        .await;
    let id = s.create(&tok, full_subject()).await;
    let path = format!("/v1/subjects/{id}");
    let r = s.get(&path, &tok, Some("delivery")).await;
    assert_eq!(r.status, 200);

    // Quotes and braces in X-Purpose: with a valid token (purpose_not_allowed)
    // and with no valid token at all (authenticate).
    let evil = "delivery\",caller=\"admin\",action=\"read\",outcome=\"allowed\",code=\"";
    let r = s.get(&path, &tok, Some(evil)).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s.get(&path, "pdv_not-a-token", Some("x\"} 1e9 #")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    // Many distinct made-up purposes from one authenticated caller.
    for i in 0..25 {
        let r = s.get(&path, &tok, Some(&format!("made-up-purpose-{i}"))).await;
        assert_eq!(r.status, 403, "{}", r.text);
    }
    // The refusals are still in the audit log; caller text that is not a
    // purpose name is recorded as "(malformed)", never verbatim.
    let entries = s.audit_entries();
    assert!(entries
        .iter()
        .any(|e| e["purpose"] == "(malformed)" && e["code"] == "purpose_not_allowed"));
    assert!(!entries.iter().any(|e| e["purpose"] == evil));
    assert!(entries
        .iter()
        .any(|e| e["purpose"] == "made-up-purpose-3" || e["purpose"] == "(malformed)"));

    let r = s.get("/metrics", &s.admin, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let samples: Vec<&str> = r
        .text
        .lines()
        .filter(|l| l.starts_with("pdvault_decisions_total"))
        .collect();
    for l in &samples {
        let names = parse_sample(l).unwrap_or_else(|e| panic!("invalid exposition line ({e}): {l}"));
        let mut names = names;
        names.sort();
        assert_eq!(
            names,
            sorted(&["action", "caller", "code", "outcome", "purpose"]),
            "{l}"
        );
    }
    assert!(
        !r.text.contains("made-up-purpose-"),
        "caller-chosen purposes become label values (unbounded series):\n{}",
        r.text
    );
    assert!(
        samples.len() < 20,
        "series grow with caller-chosen text: {}",
        samples.len()
    );
}

// ---------------------------------------------------------------------------
// 4b. a torn last line (a crash mid-append, never acknowledged) is dropped at
//     the next start and the chain continues intact
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_line_is_dropped_on_restart() {
    let mut s = Server::start().await;
    let tok = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&tok, full_subject()).await;
    s.kill9();
    let acknowledged = s.audit_entries();
    let n = acknowledged.len();
    // The torn line itself is a file's (sled); a database row is never half
    // written, so on postgres this is a crash and a restart without it.
    let log = audit_log_path(&s.data_dir());
    let before = (!audit_files_only("torn_last_line_is_dropped_on_restart: the torn line")).then(|| {
        let before = std::fs::read_to_string(&log).unwrap();
        assert_eq!(before.lines().count(), n);
        let mut torn = before.clone();
        torn.push_str("{\"seq\":999,\"at\":\"2026-01-01T00:00:00.000Z\",\"request_id\":\"torn");
        std::fs::write(&log, torn).unwrap();
        before
    });

    s.spawn().await;
    let r = call_rid(
        &s,
        Method::GET,
        &format!("/v1/subjects/{id}"),
        &tok,
        Some("order"),
        "t4b-after",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    if let Some(before) = before {
        let after = std::fs::read_to_string(&log).unwrap();
        assert!(after.starts_with(&before), "acknowledged entries kept as they were");
        assert!(!after.contains("torn"), "the torn line is gone");
    }
    let entries = s.audit_entries();
    assert!(entries.len() > n);
    assert_eq!(entries[..n], acknowledged[..], "acknowledged entries kept as they were");
    let e = entries_for(&entries, "t4b-after");
    assert_eq!(e.len(), 1);
    let (code, out, err) = verify(&s);
    assert_eq!(code, 0, "{out}{err}");
}
