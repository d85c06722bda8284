//! The defects an outside review and attack found (races, crashes, a full
//! disk, a hostile disk and hostile clients), one test each, against the real
//! server over TLS. Each fails on the code before its fix.
//!
//! Fault points (`src/faults.rs`) are armed through the environment of the
//! debug binary the tests run; they do nothing in a release build.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const READ_WRITE: &[&str] = &["read", "write"];

async fn order_token(s: &Server) -> String {
    s.token(
        "order-service",
        &["order", "delivery", "erasure"],
        &["read", "write", "erase", "grant"],
    )
    .await
}

async fn patch(s: &Server, tok: &str, id: &str, fields: Value) -> Resp {
    s.call(
        Method::PATCH,
        &format!("/v1/subjects/{id}"),
        tok,
        Some("order"),
        Some(json!({ "fields": fields })),
    )
    .await
}

async fn grant(s: &Server, parent: &str, id: &str, fields: &[&str], max_uses: u64) -> String {
    let r = s
        .post(
            "/v1/grants",
            parent,
            Some("delivery"),
            json!({"subjects": [id], "purpose": "delivery", "fields": fields,
                   "ttl_seconds": 1800, "max_uses": max_uses, "caller": "courier-kazpost"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["token"].as_str().unwrap().to_string()
}

/// `pdvault audit verify` on `data` with `keys`: (exit code, stdout, stderr).
fn verify(s: &Server, data: &Path, keys: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .arg("--data-dir")
        .arg(data)
        .arg("--keys-dir")
        .arg(keys)
        .args(["audit", "verify"])
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .env_remove("PDVAULT_PASSPHRASE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ----- 1. a read racing an edit (or an erasure) never fails ------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_edits_and_erasures_see_one_whole_version() {
    let s = Arc::new(Server::start().await);
    let tok = Arc::new(order_token(&s).await);
    let id = s
        .create(
            &tok,
            json!({"surname": "V0", "given_name": "V0", "phone": "87015550000"}),
        )
        .await;

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (s, tok, id, done) = (s.clone(), tok.clone(), id.clone(), done.clone());
        tokio::spawn(async move {
            for n in 1..=120 {
                let v = format!("V{n}");
                let r = patch(&s, &tok, &id, json!({"surname": v, "given_name": v})).await;
                assert_eq!(r.status, 200, "{}", r.text);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut readers = vec![];
    for k in 0..4 {
        let (s, tok, id, done) = (s.clone(), tok.clone(), id.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let (mut reads, mut bad) = (0, vec![]);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let r = if k % 2 == 0 {
                    s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await
                } else {
                    let b = s
                        .post("/v1/subjects:batchGet", &tok, Some("order"), json!({"ids": [id, id]}))
                        .await;
                    assert_eq!(b.status, 200, "{}", b.text);
                    let item = b.body["results"][1].clone();
                    Resp {
                        status: reqwest::StatusCode::from_u16(item["status"].as_u64().unwrap() as u16).unwrap(),
                        headers: b.headers,
                        text: item.to_string(),
                        body: item,
                    }
                };
                reads += 1;
                if r.status != 200 {
                    bad.push(format!("{} {}", r.status, r.text));
                } else if r.body["fields"]["surname"] != r.body["fields"]["given_name"] {
                    bad.push(format!("a torn version: {}", r.text));
                }
            }
            (reads, bad)
        }));
    }
    writer.await.unwrap();
    let mut total = 0;
    for r in readers {
        let (reads, bad) = r.await.unwrap();
        total += reads;
        assert!(
            bad.is_empty(),
            "{} of {reads} reads failed during edits: {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }
    assert!(total > 20, "the readers ran only {total} reads");

    // A read racing an erasure answers the data or 410, never a 500.
    let mut ids = vec![];
    for _ in 0..12 {
        ids.push(
            s.create(&tok, json!({"surname": "Erase", "phone": "87015550001"}))
                .await,
        );
    }
    for id in ids {
        let reads: Vec<_> = (0..3)
            .map(|_| {
                let (s, tok, id) = (s.clone(), tok.clone(), id.clone());
                tokio::spawn(async move { s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await })
            })
            .collect();
        let del = s
            .call(
                Method::DELETE,
                &format!("/v1/subjects/{id}"),
                &tok,
                Some("erasure"),
                None,
            )
            .await;
        assert_eq!(del.status, 200, "{}", del.text);
        for r in reads {
            let r = r.await.unwrap();
            assert!(
                r.status == 200 || r.status == 410,
                "a read racing an erasure: {} {}",
                r.status,
                r.text
            );
        }
    }
}

// ----- 1b. acknowledged writes survive kill -9, in the order they were made --------------

/// Creates and edits run concurrently, the server is killed right after the
/// last answer, and the next start must show every acknowledged write, each
/// subject at its last acknowledged edit. On sled the writes are then in the
/// store's write-ahead log (sled's own files are flushed only at its
/// checkpoints), so this is the log's replay at work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9_in_order() {
    let mut s = Server::start().await;
    let tok = order_token(&s).await;
    let ids: Vec<String> = futures_util::future::join_all(
        (0..24).map(|i| s.create(&tok, json!({"surname": format!("Created{i}"), "phone": "87015550177"}))),
    )
    .await;
    futures_util::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let (s, tok) = (&s, &tok);
        async move {
            for n in 0..4 {
                let r = patch(s, tok, id, json!({"surname": format!("Edit{i}x{n}")})).await;
                assert_eq!(r.status, 200, "{}", r.text);
            }
        }
    }))
    .await;
    s.kill9();
    if !on_postgres() {
        let wal = s.data_dir().join("db.wal");
        let logged: u64 = std::fs::read_dir(&wal)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            logged > 0,
            "nothing in the write-ahead log after a kill: the test would not replay"
        );
    }
    s.spawn().await;
    for (i, id) in ids.iter().enumerate() {
        let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;
        assert_eq!(r.status, 200, "an acknowledged create was lost: {}", r.text);
        assert_eq!(
            r.body["fields"]["surname"],
            json!(format!("Edit{i}x3")),
            "subject {i} is not at its last acknowledged edit"
        );
    }
}

// ----- 2. and 3. grant uses: durable, and counted per release -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_uses_survive_kill9() {
    let mut s = Server::start().await;
    let tok = order_token(&s).await;
    let id = s
        .create(&tok, json!({"given_name": "Aigerim", "phone": "87015550177"}))
        .await;
    let g = grant(&s, &tok, &id, &["phone"], 2).await;
    let path = format!("/v1/subjects/{id}");
    assert_eq!(s.get(&path, &g, Some("delivery")).await.status, 200);
    assert_eq!(s.get(&path, &g, Some("delivery")).await.status, 200);
    assert_eq!(s.get(&path, &g, Some("delivery")).await.status, 401);
    s.kill9();
    s.spawn().await;
    let r = s.get(&path, &g, Some("delivery")).await;
    assert_eq!(r.status, 401, "a used-up grant came back after kill -9: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_use_is_one_release_of_one_subject() {
    let s = Server::start().await;
    let tok = order_token(&s).await;
    let id = s
        .create(&tok, json!({"given_name": "Aigerim", "phone": "87015550177"}))
        .await;
    let g = grant(&s, &tok, &id, &["phone"], 3).await;
    let ids: Vec<&str> = std::iter::repeat_n(id.as_str(), 50).collect();
    let r = s
        .post("/v1/subjects:batchGet", &g, Some("delivery"), json!({"ids": ids}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 50);
    let released = results.iter().filter(|i| i["status"] == 200).count();
    let refused = results.iter().filter(|i| i["status"] == 401).count();
    assert_eq!((released, refused), (3, 47), "{}", r.text);
    assert!(results[3..].iter().all(|i| i.get("fields").is_none()));
    // Nothing is left for a single read either.
    assert_eq!(
        s.get(&format!("/v1/subjects/{id}"), &g, Some("delivery")).await.status,
        401
    );
}

// ----- 4. a revocation is never lost to a concurrent cache fill ------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_wins_over_a_concurrent_cache_fill() {
    // The lookup of caller `slow-fill` pauses between loading the token record
    // and caching it; the revocation lands inside that pause.
    let s = Arc::new(Server::start_with(None, vec![("PDVAULT_FAULT_TOKEN_FILL_PAUSE", "slow-fill:1500")]).await);
    let admin = s.admin.clone();
    let (tok, tok_id) = s.token_with_id("slow-fill", &["order"], READ_WRITE).await;
    let first = {
        let (s, tok) = (s.clone(), tok.clone());
        tokio::spawn(async move {
            s.get("/v1/subjects/00000000-0000-4000-8000-000000000000", &tok, Some("order"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rv = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{tok_id}"),
            &admin,
            None,
            None,
        )
        .await;
    assert_eq!(rv.status, 200, "{}", rv.text);
    first.await.unwrap();
    for _ in 0..3 {
        let r = s
            .get("/v1/subjects/00000000-0000-4000-8000-000000000000", &tok, Some("order"))
            .await;
        assert_eq!(r.status, 401, "a revoked token was accepted: {}", r.text);
    }
}

// ----- 5. a restore brings back neither a revoked token nor spent uses -----------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_replays_revocations_and_keeps_uses() {
    let mut s = Server::start().await;
    let tok = order_token(&s).await;
    let (shop, shop_id) = s.token_with_id("shop", &["order"], READ_WRITE).await;
    let id = s
        .create(&tok, json!({"given_name": "Aigerim", "phone": "87015550177"}))
        .await;
    let g = grant(&s, &tok, &id, &["phone"], 2).await;
    let path = format!("/v1/subjects/{id}");
    assert_eq!(s.get(&path, &g, Some("delivery")).await.status, 200);
    assert_eq!(s.get(&path, &shop, Some("order")).await.status, 200);

    let backup = s.dir.path().join("vault.backup");
    let out = s.cmd().arg("backup").arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let rv = s
        .call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{shop_id}"),
            &s.admin,
            None,
            None,
        )
        .await;
    assert_eq!(rv.status, 200);
    assert_eq!(s.get(&path, &g, Some("delivery")).await.status, 200);

    s.stop();
    s.move_data_away("data-before-restore");
    let out = s.cmd().arg("restore").arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.spawn().await;

    let r = s.get(&path, &shop, Some("order")).await;
    assert_eq!(r.status, 401, "a revoked token came back with the backup: {}", r.text);
    let r = s.get(&path, &g, Some("delivery")).await;
    assert_eq!(r.status, 401, "the restore reset the grant's uses: {}", r.text);
    let list = s.get("/v1/admin/tokens", &s.admin, None).await;
    let shop_rec = list.body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == shop_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(shop_rec["revoked"], true, "{shop_rec}");
}

// ----- 6. key rotation persists before it publishes --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rotation_write_leaves_no_key_unrecorded() {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("keyring-write-fails");
    let fault_s = fault.to_str().unwrap().to_string();
    let mut s = Server::start_with(None, vec![("PDVAULT_FAULT_KEYRING_WRITE_FILE", fault_s.as_str())]).await;
    let tok = order_token(&s).await;
    let a = s.create(&tok, json!({"surname": "Before"})).await;
    std::fs::write(&fault, b"").unwrap();
    let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
    assert!(
        r.status.is_server_error(),
        "the rotation should fail: {} {}",
        r.status,
        r.text
    );
    // Wrapped under whatever epoch is current now: it must be one on disk.
    let b = s.create(&tok, json!({"surname": "After"})).await;
    std::fs::remove_file(&fault).unwrap();
    s.kill9();
    s.spawn().await;
    for id in [a, b] {
        let r = s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;
        assert_eq!(
            r.status, 200,
            "a subject written after a failed rotation is unreadable: {}",
            r.text
        );
    }
    // And a rotation that can write works.
    let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

// ----- 7. checkpoints: at start, on schedule, at shutdown --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_at_start_on_schedule_and_at_shutdown() {
    let hourly = |c: String| c.replace("checkpoint_every = \"5m\"", "checkpoint_every = \"1h\"");
    let mut s = Server::start_with(Some(&hourly), vec![]).await;
    let tok = order_token(&s).await;
    let id = s.create(&tok, json!({"surname": "Ivanova"})).await;
    s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;

    // Shutdown signs the final head.
    s.stop();
    let last = s.audit_entries().last().unwrap()["seq"].as_u64().unwrap();
    let cps = s.audit_checkpoints().await;
    assert_eq!(cps.last().unwrap()["seq"].as_u64(), Some(last), "{cps:?}");

    // A crash signs nothing; the next start signs the recovered head.
    s.spawn().await;
    s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;
    s.kill9();
    let last = s.audit_entries().last().unwrap()["seq"].as_u64().unwrap();
    s.spawn().await;
    let cps = s.audit_checkpoints().await;
    assert_eq!(cps.last().unwrap()["seq"].as_u64(), Some(last), "{cps:?}");
    s.stop();

    // On schedule: `checkpoint_every` is honoured while the server runs.
    let every_second = |c: String| c.replace("checkpoint_every = \"5m\"", "checkpoint_every = \"1s\"");
    let s = Server::start_with(Some(&every_second), vec![]).await;
    let tok = order_token(&s).await;
    s.create(&tok, json!({"surname": "Ivanova"})).await;
    let seq = s.audit_entries().last().unwrap()["seq"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .audit_checkpoints()
        .await
        .iter()
        .any(|c| c["seq"].as_u64() >= Some(seq))
    {
        assert!(Instant::now() < deadline, "no scheduled checkpoint within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----- 8. audit verify: every tampering is found ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_fails_on_every_tampering() {
    if audit_files_only("audit_verify_fails_on_every_tampering") {
        return;
    }
    let mut s = Server::start().await;
    let tok = order_token(&s).await;
    let id = s.create(&tok, json!({"surname": "Ivanova"})).await;
    for _ in 0..3 {
        s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;
    }
    s.stop();
    let scratch = tempfile::tempdir().unwrap();
    let keys = s.keys_dir();
    let fresh = |name: &str| -> PathBuf {
        let d = scratch.path().join(name);
        copy_dir(&s.data_dir().join("audit"), &d.join("audit"));
        d
    };
    let (code, out, err) = verify(&s, &s.data_dir(), &keys);
    assert_eq!(code, 0, "{out}{err}");

    // The checkpoint file deleted.
    let d = fresh("no-checkpoints");
    std::fs::remove_file(d.join("audit/checkpoints.jsonl")).unwrap();
    let (code, out, err) = verify(&s, &d, &keys);
    assert_ne!(code, 0, "verify passed without checkpoints: {out}");
    assert!(err.contains("checkpoint"), "{err}");

    // The tail cut off, and the checkpoints that named it removed too.
    let d = fresh("cut-tail");
    let log = std::fs::read_to_string(d.join("audit/audit.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let keep = lines.len() - 2;
    std::fs::write(d.join("audit/audit.log"), lines[..keep].join("\n") + "\n").unwrap();
    let cp_text = std::fs::read_to_string(d.join("audit/checkpoints.jsonl")).unwrap();
    let kept_cps: Vec<&str> = cp_text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap() <= keep as u64)
        .collect();
    std::fs::write(d.join("audit/checkpoints.jsonl"), kept_cps.join("\n") + "\n").unwrap();
    let (code, out, err) = verify(&s, &d, &keys);
    assert_ne!(code, 0, "verify passed a cut tail: {out}{err}");

    // Without the receipt key nothing can be checked: a failure, not "intact".
    let nokey = scratch.path().join("keys-without-receipt-key");
    copy_dir(&keys, &nokey);
    std::fs::remove_file(nokey.join("receipt.key")).unwrap();
    let (code, out, err) = verify(&s, &s.data_dir(), &nokey);
    assert_ne!(code, 0, "verify passed without the receipt key: {out}");
    assert!(err.contains("receipt key"), "{err}");

    // A torn last line (a crash mid-append) is a torn tail, not a broken chain.
    let d = fresh("torn");
    let mut log = std::fs::read(d.join("audit/audit.log")).unwrap();
    log.extend_from_slice(b"{\"seq\":99,\"at\":\"2026-");
    std::fs::write(d.join("audit/audit.log"), log).unwrap();
    let (code, out, err) = verify(&s, &d, &keys);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("torn tail"), "{out}");

    // The base of a restored log (base.json) edited.
    s.spawn().await;
    let backup = s.dir.path().join("b.backup");
    assert!(s.cmd().arg("backup").arg(&backup).status().unwrap().success());
    s.stop();
    s.move_data_away("data-old");
    assert!(s.cmd().arg("restore").arg(&backup).output().unwrap().status.success());
    s.spawn().await;
    s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await;
    s.stop();
    let (code, out, err) = verify(&s, &s.data_dir(), &keys);
    assert_eq!(code, 0, "a restored log should verify: {out}{err}");
    let base_path = s.data_dir().join("audit/base.json");
    let mut base: Value = serde_json::from_slice(&std::fs::read(&base_path).unwrap()).unwrap();
    base["backup_created_at"] = json!("2020-01-01T00:00:00Z");
    std::fs::write(&base_path, serde_json::to_vec(&base).unwrap()).unwrap();
    let (code, out, err) = verify(&s, &s.data_dir(), &keys);
    assert_ne!(code, 0, "verify passed an edited base.json: {out}");
    assert!(err.contains("base"), "{err}");
}

// ----- 9. records that grant power are authenticated on disk -----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_and_consents_on_disk_are_refused() {
    if sled_only("forged_tokens_and_consents_on_disk_are_refused") {
        return;
    }
    let mut s = Server::start().await;
    let tok = order_token(&s).await;
    let (courier, courier_id) = s.token_with_id("courier", &["delivery"], &["read"]).await;
    let r = s.issue("marketing-svc", &["marketing"], &["read"], 3600).await;
    let marketing = r.body["token"].as_str().unwrap().to_string();
    let a = s
        .create(&tok, json!({"given_name": "A", "email": "a@example.kz"}))
        .await;
    let b = s
        .create(&tok, json!({"given_name": "B", "email": "b@example.kz"}))
        .await;
    let granted = s
        .call(
            Method::PUT,
            &format!("/v1/subjects/{a}/consents/marketing"),
            &tok,
            Some("order"),
            Some(json!({"granted": true})),
        )
        .await;
    assert_eq!(granted.status, 200, "{}", granted.text);
    assert_eq!(
        s.get(&format!("/v1/subjects/{a}"), &marketing, Some("marketing"))
            .await
            .status,
        200
    );
    assert_eq!(
        s.get(&format!("/v1/subjects/{b}"), &marketing, Some("marketing"))
            .await
            .status,
        403
    );
    s.stop();

    {
        // Written through the store as the vault opens it (its write-ahead
        // log included), so the edits are what the next start finds.
        use pdvault::storage::Space;
        let db = pdvault::storage::Store::open(&s.data_dir()).unwrap();
        // Widen the courier's token: every purpose and capability, as JSON edits
        // that keep the stored MAC in front of it.
        let stored = db.get(Space::Tokens, courier_id.as_bytes()).unwrap().unwrap();
        let at = 32; // the record's MAC comes first
        let mut rec: Value = serde_json::from_slice(&stored[at..]).unwrap();
        rec["purposes"] = json!(["order", "delivery", "erasure"]);
        rec["capabilities"] = json!(["read", "write", "erase", "admin", "audit", "grant"]);
        let mut forged = stored[..at].to_vec();
        forged.extend_from_slice(&serde_json::to_vec(&rec).unwrap());
        db.insert(Space::Tokens, courier_id.as_bytes(), forged).unwrap();
        // Forge B's consent: copy A's (validly authenticated) record under B's key.
        let (ka, va) = db.scan(Space::Consents, a.as_bytes()).next().unwrap().unwrap();
        let mut kb = b.as_bytes().to_vec();
        kb.extend_from_slice(&ka[a.len()..]);
        db.insert(Space::Consents, kb, va).unwrap();
        db.flusher.sync_blocking().unwrap();
    }
    s.spawn().await;
    let r = s.get("/v1/admin/tokens", &courier, None).await;
    assert_eq!(r.status, 401, "a widened token record was trusted: {}", r.text);
    let r = s.get(&format!("/v1/subjects/{a}"), &courier, Some("order")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{b}"), &marketing, Some("marketing")).await;
    assert_eq!(r.status, 403, "a forged consent released data: {}", r.text);
    assert_eq!(r.body["code"], "consent_required");
    assert_eq!(
        s.get(&format!("/v1/subjects/{a}"), &marketing, Some("marketing"))
            .await
            .status,
        200
    );
    assert!(
        s.log().contains("fails its MAC"),
        "the refusal was not reported:\n{}",
        s.log()
    );
}

// ----- 10. token entries name the token concerned -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issue_revoke_and_grant_entries_name_the_token() {
    let s = Server::start().await;
    let (tok, tok_id) = s
        .token_with_id("order-service", &["order", "delivery"], &["read", "write", "grant"])
        .await;
    let id = s.create(&tok, json!({"phone": "87015550177"})).await;
    let gr = s
        .post(
            "/v1/grants",
            &tok,
            Some("delivery"),
            json!({"subjects": [id], "purpose": "delivery", "fields": ["phone"], "ttl_seconds": 60, "caller": "c"}),
        )
        .await;
    let grant_id = gr.body["id"].as_str().unwrap().to_string();
    let rv = s.revoke(&tok_id).await;
    assert_eq!(rv.status, 200);
    let lines = s.audit_entries();
    let find = |action: &str| {
        lines
            .iter()
            .find(|e| e["action"] == action && e["outcome"] == "allowed")
            .unwrap_or_else(|| panic!("no {action} entry"))
            .clone()
    };
    assert_eq!(find("token_issue")["target_token_id"], tok_id.as_str());
    assert_eq!(find("grant")["target_token_id"], grant_id.as_str());
    assert_eq!(find("token_revoke")["target_token_id"], tok_id.as_str());
}

// ----- 11. every field named in the query is checked --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_fields_parameter_is_never_narrowed() {
    let s = Server::start().await;
    let tok = order_token(&s).await;
    let id = s.create(&tok, full_subject()).await;
    let d = s.token("courier", &["delivery"], &["read"]).await;
    for q in [
        "fields=email&fields=phone",
        "fields=phone&fields=email",
        "fields=phone,surname&fields=email",
    ] {
        let r = s.get(&format!("/v1/subjects/{id}?{q}"), &d, Some("delivery")).await;
        assert_eq!(r.status, 403, "{q}: {}", r.text);
        assert_eq!(r.body["code"], "field_not_allowed", "{q}");
        assert!(!r.text.contains("+7701"), "{q}");
    }
    let r = s
        .get(
            &format!("/v1/subjects/{id}?fields=phone&fields=surname"),
            &d,
            Some("delivery"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut names: Vec<&String> = r.body["fields"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["phone", "surname"]);
}

// ----- 12. a full disk is 503, releases nothing, and passes ------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_and_the_vault_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("disk-full");
    let full_s = full.to_str().unwrap().to_string();
    let s = Server::start_with(None, vec![("PDVAULT_FAULT_ENOSPC_FILE", full_s.as_str())]).await;
    let tok = order_token(&s).await;
    let id = s.create(&tok, full_subject()).await;
    let path = format!("/v1/subjects/{id}");

    std::fs::write(&full, b"").unwrap();
    let reads = [
        s.get(&path, &tok, Some("order")).await,
        s.post(
            "/v1/subjects",
            &tok,
            Some("order"),
            json!({"fields": {"surname": "New"}}),
        )
        .await,
        patch(&s, &tok, &id, json!({"surname": "Changed"})).await,
    ];
    for r in &reads {
        assert_eq!(r.status, 503, "{}", r.text);
        let code = r.body["code"].as_str().unwrap_or_default();
        assert!(
            code == "audit_unavailable" || code == "storage_unavailable",
            "{}",
            r.text
        );
        assert!(!r.text.contains("Ivanova") && !r.text.contains("+7701"), "{}", r.text);
    }
    std::fs::remove_file(&full).unwrap();

    let r = s.get(&path, &tok, Some("order")).await;
    assert_eq!(
        r.status, 200,
        "the vault did not recover once space was back: {}",
        r.text
    );
    assert_eq!(
        r.body["fields"]["surname"], "Ivanova",
        "the refused edit changed the subject"
    );
    let r = s
        .post(
            "/v1/subjects",
            &tok,
            Some("order"),
            json!({"fields": {"surname": "New"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (code, out, err) = verify(&s, &s.data_dir(), &s.keys_dir());
    assert_eq!(code, 0, "the log broke on a full disk: {out}{err}");
}

// ----- 13. idle connections are closed, and one address cannot hold them all ------------

async fn tls_connect(s: &Server) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(s.keys_dir().join("tls-cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // A connection the server refuses is closed before its handshake ends.
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_capped_per_address() {
    use tokio::io::AsyncReadExt;
    let edit = |c: String| {
        c.replace("header_read_timeout = \"10s\"", "header_read_timeout = \"1s\"")
            .replace("idle_timeout = \"60s\"", "idle_timeout = \"2s\"")
    };
    let s = Server::start_with(Some(&edit), vec![]).await;
    // 30 connections that never send a request.
    let mut conns = vec![];
    for _ in 0..30 {
        conns.push(tls_connect(&s).await.expect("connect"));
    }
    let started = Instant::now();
    for mut c in conns {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection stayed open for {:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // One address holds at most 40 connections; the 41st is closed at once,
    // and once they are gone the address is served again.
    let capped = |c: String| c.replace("max_connections_per_ip = 256", "max_connections_per_ip = 40");
    let s = Server::start_with(Some(&capped), vec![]).await;
    // The kit's own clients keep their connections to the server: the typed
    // one from the readiness check, and the raw one here. Count both.
    assert_eq!(s.get("/v1/health", "", None).await.status, 200);
    let mut held = vec![];
    let mut refused = 0;
    for _ in 0..45 {
        match tls_connect(&s).await {
            Ok(c) => held.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (38, 7));
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.get("/v1/health", "", None).await.status, 200);
}

/// Reads one HTTP/1.1 answer with no body framing tricks (health is small).
async fn read_answer(c: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"status\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .expect("an answer")
            .expect("read");
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_lives_for_the_idle_timeout_and_slow_headers_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let edit = |c: String| {
        c.replace("header_read_timeout = \"10s\"", "header_read_timeout = \"1s\"")
            .replace("idle_timeout = \"60s\"", "idle_timeout = \"5s\"")
    };
    let s = Server::start_with(Some(&edit), vec![]).await;
    const GET: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // A pooled connection, quiet between two requests for longer than the
    // header deadline but less than the idle timeout, is still served (the
    // deadline counts from a request's first byte, not from the last answer).
    let mut c = tls_connect(&s).await.unwrap();
    c.write_all(GET).await.unwrap();
    assert!(read_answer(&mut c).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.write_all(GET).await.unwrap();
    assert!(
        read_answer(&mut c).await.starts_with("HTTP/1.1 200"),
        "the idle keep-alive connection was cut"
    );

    // Slow headers: a byte every 200 ms keeps the connection from being idle,
    // yet the head must be whole within header_read_timeout.
    let mut c = tls_connect(&s).await.unwrap();
    let started = Instant::now();
    c.write_all(b"GET /v1/health HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(4) {
        if c.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(
        closed,
        "trickled headers kept a connection open for {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "cut only after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_refused_before_it_is_read_is_drained_and_the_answer_arrives() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start().await;
    // A 3 MiB batch under a wrong token: refused (401) before the body is
    // read. The client still sends all of it, then reads the answer, then
    // uses the same connection again.
    let body = format!(
        r#"{{"subjects":[{{"fields":{{"surname":"{}"}}}}]}}"#,
        "x".repeat(3 << 20)
    );
    let head = format!(
        "POST /v1/subjects:batchCreate HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer pdv_wrong\r\n\
         X-Purpose: order\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut c = tls_connect(&s).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(body.as_bytes())
        .await
        .expect("the server reset the connection under the body");
    let answer = read_answer(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("token_invalid"), "{answer}");
    c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer(&mut c).await.starts_with("HTTP/1.1 200"));
}

// ----- 14. one caller's wrong tokens never lock out another -------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_cannot_lock_out_a_valid_caller_on_the_same_address() {
    let s = Server::start().await;
    let tok = order_token(&s).await;
    for i in 0..25 {
        s.get("/v1/admin/tokens", &format!("pdv_wrong_{i}"), None).await;
    }
    let r = s
        .get("/v1/subjects/00000000-0000-4000-8000-000000000000", &tok, Some("order"))
        .await;
    assert_eq!(
        r.status, 404,
        "a valid token was refused for another caller's failures: {}",
        r.text
    );
    let r = s.get("/v1/admin/tokens", "pdv_still_wrong", None).await;
    assert_eq!(r.status, 429, "the guesser is no longer held off: {}", r.text);
    assert_eq!(r.body["code"], "rate_limited");
}

// ----- 15. smaller things ------------------------------------------------------------------

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_problem_json_private_files_and_a_valid_dev_certificate() {
    let s = Server::start().await;
    let tok = order_token(&s).await;
    s.create(&tok, full_subject()).await;
    let r = s
        .post(
            "/v1/lookup",
            &tok,
            Some("order"),
            json!({"field": "email", "value": "aigerim.k@example.kz"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");

    let long = format!("/v1/subjects/{}", "a".repeat(10_000));
    let r = s.get(&long, &tok, Some("order")).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.body["status"], 414);
    let big = "x".repeat(20_000);
    let r = s
        .call_with(Method::GET, "/v1/health", "", None, &[("x-padding", &big)], None)
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.body["status"], 431);

    #[cfg(unix)]
    {
        if !on_postgres() {
            assert_eq!(mode(&s.data_dir().join("db")), 0o700);
            assert_eq!(mode(&s.data_dir().join("audit/audit.log")), 0o600);
        }
        for (p, _) in s.all_bytes() {
            assert_eq!(mode(&p) & 0o077, 0, "{} is readable by others", p.display());
        }
    }

    // The server writes no core dump (its memory holds keys).
    #[cfg(target_os = "linux")]
    {
        let pid = s.child.as_ref().unwrap().id();
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
        let nums: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
        assert_eq!(nums, ["0", "0"], "{core}");

        // Item 17: the keyring's keys live on pages that even a root `gcore`
        // leaves out (VmFlags `dd`): the unseal key, four derived keys, the
        // record-MAC key, the receipt key and the first epoch's KEK.
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
        let dontdump = smaps
            .lines()
            .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "dd"))
            .count();
        assert!(dontdump >= 1, "no page of the server is excluded from core dumps");
        let dd_bytes: usize = smaps
            .split("\nVmFlags:")
            .zip(smaps.lines().filter(|l| l.starts_with("VmFlags:")))
            .filter(|(_, flags)| flags.split_whitespace().any(|f| f == "dd"))
            .map(|(block, _)| {
                let size = block.lines().find(|l| l.starts_with("Size:")).unwrap();
                size.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap()
            })
            .sum();
        assert!(
            dd_bytes >= 8 * 4,
            "only {dd_bytes} KiB of key pages excluded from dumps"
        );
    }

    let pem = std::fs::read(s.keys_dir().join("tls-cert.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).expect("strict DER");
    assert!(cert.basic_constraints().unwrap().is_none(), "no explicit cA=FALSE");
    let v = cert.validity();
    let days = (v.not_after.timestamp() - v.not_before.timestamp()) / 86400;
    assert!((360..=370).contains(&days), "valid for {days} days");
}

// ----- the answer waits for the audit entry's fdatasync -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_of_an_answer_leaves_before_its_audit_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold-audit-sync");
    let hold_s = hold.to_str().unwrap().to_string();
    let s = Arc::new(Server::start_with(None, vec![("PDVAULT_FAULT_AUDIT_SYNC_HOLD_FILE", hold_s.as_str())]).await);
    let tok = order_token(&s).await;
    let id = s.create(&tok, full_subject()).await;
    std::fs::write(&hold, b"").unwrap();
    let read = {
        let (s, tok, id) = (s.clone(), tok.clone(), id.clone());
        tokio::spawn(async move { s.get(&format!("/v1/subjects/{id}"), &tok, Some("order")).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !read.is_finished(),
        "the answer left while its audit entry's fdatasync was held"
    );
    std::fs::remove_file(&hold).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
}
