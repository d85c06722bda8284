//! Erasure (DESIGN guarantee 4): crypto-shredding, signed receipts, the shred
//! ledger replayed on restore, key epochs destroyed after rotation, re-keying
//! on edit, a crash in the middle of a rotation, and the retention sweeper.
//!
//! The forensic tests copy the data and keys directories raw, then try every
//! key the vault still holds against every wrapped data key found anywhere
//! (the key store of the copy, the live key store, and a byte scan of every
//! file), with the library crate.

mod common;
use common::*;

use base64::Engine;
use pdvault::crypto::Aead256;
use pdvault::keyring::Keyring;
use pdvault::storage::{SubjectRecord, WrappedKey};
use pdvault::vault::{dek_aad, field_aad};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SURNAME: &str = "Zhumabekova-FORENSIC-7731";
const GIVEN: &str = "Әлихан-Forensic";
const EMAIL: &str = "forensic7731@example.kz";
const PHONE_IN: &str = "8 701 773 17 73";
const PHONE: &str = "+77017731773";
const STREET: &str = "Forensic Street 7731";

fn forensic_subject() -> Value {
    json!({
        "surname": SURNAME,
        "given_name": GIVEN,
        "patronymic": "Serikovna",
        "phone": PHONE_IN,
        "email": EMAIL,
        "address": {"country": "KZ", "region": "Almaty Region", "city": "Almaty", "street": STREET,
                     "building": "77", "apartment": "31", "postal_code": "050031"}
    })
}

fn other_subject(tag: &str) -> Value {
    json!({
        "surname": format!("Other-{tag}"),
        "given_name": "Dana",
        "phone": "+77015550199",
        "email": format!("other.{tag}@example.kz"),
        "address": {"country": "KZ", "city": "Astana", "street": format!("Kept Street {tag}")}
    })
}

/// A string in the forms it may take on disk: UTF-8, and JSON-escaped
/// (`\uXXXX` for non-ASCII, lower and upper hex).
fn forms(s: &str) -> Vec<Vec<u8>> {
    let mut out = vec![s.as_bytes().to_vec(), serde_json::to_string(s).unwrap().into_bytes()];
    if !s.is_ascii() {
        let esc = |upper: bool| {
            let mut o = String::new();
            for c in s.chars() {
                if c.is_ascii() {
                    o.push(c);
                } else {
                    let mut b = [0u16; 2];
                    for u in c.encode_utf16(&mut b) {
                        if upper {
                            o.push_str(&format!("\\u{:04X}", u));
                        } else {
                            o.push_str(&format!("\\u{:04x}", u));
                        }
                    }
                }
            }
            o.into_bytes()
        };
        out.push(esc(false));
        out.push(esc(true));
    }
    out
}

fn needles() -> Vec<(String, Vec<u8>)> {
    let mut n = vec![];
    for v in [
        SURNAME,
        GIVEN,
        EMAIL,
        PHONE,
        "77017731773",
        "7017731773",
        STREET,
        "forensic7731",
    ] {
        for f in forms(v) {
            n.push((v.to_string(), f));
        }
    }
    n
}

fn assert_absent(files: &[(PathBuf, Vec<u8>)], needles: &[(String, Vec<u8>)], what: &str) {
    for (p, bytes) in files {
        for (label, nd) in needles {
            assert!(
                !contains(bytes, nd),
                "{what}: {label:?} (as {:?}) found in {}",
                String::from_utf8_lossy(nd),
                p.display()
            );
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn dir_bytes(d: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    walk(d, &mut out);
    out
}

fn passphrase(keys: &Path) -> String {
    std::fs::read_to_string(keys.join("dev-passphrase"))
        .unwrap()
        .trim_end_matches(['\r', '\n'])
        .to_string()
}

fn open_keyring(keys: &Path) -> Keyring {
    Keyring::open(keys, passphrase(keys).as_bytes()).expect("keyring opens")
}

fn keks(kr: &Keyring) -> Vec<(u32, Arc<Aead256>)> {
    kr.live_epochs()
        .iter()
        .map(|e| (e.epoch, kr.kek(e.epoch).expect("live epoch has a key")))
        .collect()
}

/// Wrapped keys of `id` in the key store of a COPIED keys directory:
/// (version, wrapped key).
fn stored_wrapped(keys_copy: &Path, id: &str) -> Vec<(u64, WrappedKey)> {
    all_stored_wrapped(keys_copy)
        .into_iter()
        .filter(|(kid, _, _)| kid == id)
        .map(|(_, ver, w)| (ver, w))
        .collect()
}

/// Every wrapped key in a COPIED keys directory, as the vault finds it when
/// it opens that copy (its write-ahead log applied).
fn all_stored_wrapped(keys_copy: &Path) -> Vec<(String, u64, WrappedKey)> {
    let ks = pdvault::storage::KeyStore::open(keys_copy).expect("open copied key store");
    ks.all().map(|r| r.unwrap()).collect()
}

/// The subject record in a COPIED data directory.
fn stored_record(data_copy: &Path, id: &str) -> Option<SubjectRecord> {
    let store = pdvault::storage::Store::open(data_copy).expect("open copied data store");
    store
        .get(pdvault::storage::Space::Subjects, id)
        .unwrap()
        .map(|b| SubjectRecord::decode(&b).unwrap())
}

/// Every byte window that looks like a postcard `WrappedKey` (epoch varint,
/// length 60, then nonce || sealed 32-byte key || tag), in any file.
fn scan_wrapped(files: &[(PathBuf, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    for (_, b) in files {
        if b.len() < 62 {
            continue;
        }
        for i in 0..b.len() - 61 {
            if (1..=16).contains(&b[i]) && b[i + 1] == 60 {
                out.push(b[i + 2..i + 62].to_vec());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Tries to unwrap `sealed` as a data key of `id` (versions and epochs up to
/// 8 in the associated data) with each KEK. Returns the raw key if one opens.
fn try_unwrap(keks: &[(u32, Arc<Aead256>)], id: &str, versions: &[u64], sealed: &[u8]) -> Option<[u8; 32]> {
    for (_, kek) in keks {
        for &v in versions {
            for e in 1..=8u32 {
                if let Ok(pt) = kek.open(sealed, &dek_aad(id, v, e)) {
                    return Some(pt.expose().try_into().expect("a data key is 32 bytes"));
                }
            }
        }
    }
    None
}

fn open_field(dek: &[u8; 32], id: &str, rec: &SubjectRecord, field: &str) -> Option<Value> {
    let aead = Aead256::new(dek);
    let (_, ct) = rec.fields.iter().find(|(n, _)| n == field)?;
    let pt = aead.open(ct, &field_aad(id, field, rec.version)).ok()?;
    Some(serde_json::from_slice(pt.expose()).unwrap())
}

/// Every candidate wrapped key of `id`: the key store of each keys copy and
/// a byte scan of each file given.
fn candidates(id: &str, keys_copies: &[&Path], files: &[(PathBuf, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = vec![];
    for k in keys_copies {
        c.extend(stored_wrapped(k, id).into_iter().map(|(_, w)| w.sealed));
    }
    c.extend(scan_wrapped(files));
    c.sort();
    c.dedup();
    c
}

async fn backup_via_cli(s: &Server, file: &Path) {
    let out = s.cmd().arg("backup").arg(file).output().unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(file.exists());
}

fn restore_cmd(s: &Server, data: &Path, file: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .arg("--data-dir")
        .arg(data)
        .arg("--keys-dir")
        .arg(s.keys_dir())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", s.port))
        .env_remove("PDVAULT_PASSPHRASE")
        .env_remove("PDVAULT_TOKEN")
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .arg("restore")
        .arg(file)
        .output()
        .unwrap()
}

/// Stops the server, moves its data directory away and restores `file` into
/// the (now missing, hence new and empty) data directory.
fn restore_into_fresh_data(s: &mut Server, file: &Path, moved_to: &str) -> Value {
    s.stop();
    s.move_data_away(moved_to);
    let out = restore_cmd(s, &s.data_dir(), file);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

async fn delete(s: &Server, token: &str, id: &str) -> Resp {
    s.call(
        Method::DELETE,
        &format!("/v1/subjects/{id}"),
        token,
        Some("erasure"),
        None,
    )
    .await
}

fn retention_zero(c: String) -> String {
    assert!(c.contains("epoch_retention = \"30d\""));
    c.replace("epoch_retention = \"30d\"", "epoch_retention = \"0\"")
}

fn ts(s: &Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(s.as_str().expect("a timestamp string")).expect("RFC 3339")
}

// ----- 1. no plaintext at rest ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forensic_scan_finds_no_value_token_or_passphrase() {
    if sled_only("forensic_scan_finds_no_value_token_or_passphrase") {
        return;
    }
    let mut s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&w, forensic_subject()).await;
    // Normalised forms come back as expected (so the needles are the stored forms).
    let r = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["phone"], PHONE);
    assert_eq!(r.body["fields"]["email"], EMAIL);
    assert_eq!(r.body["fields"]["surname"], SURNAME);
    assert_eq!(r.body["fields"]["given_name"], GIVEN);
    assert_eq!(r.body["fields"]["address"]["street"], STREET);
    // An edit (re-key) and a lookup leave no plaintext either.
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{id}"),
            &w,
            Some("order"),
            Some(json!({"fields": {"patronymic": "Forensicovna"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .post(
            "/v1/lookup",
            &w,
            Some("order"),
            json!({"field": "email", "value": EMAIL}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], id.as_str());
    let backup = s.dir.path().join("vault.backup");
    backup_via_cli(&s, &backup).await;
    s.stop();

    let mut ns = needles();
    ns.extend(
        forms("Forensicovna")
            .into_iter()
            .map(|f| ("Forensicovna".to_string(), f)),
    );
    let files = s.all_bytes();
    assert!(
        files.iter().any(|(p, _)| p.ends_with("audit.log")),
        "the scan reads the audit log"
    );
    assert_absent(&files, &ns, "data/keys dirs");
    assert_absent(&[(backup.clone(), std::fs::read(&backup).unwrap())], &ns, "backup");
    let logp = s.dir.path().join(format!("server-{}.log", s.port));
    let log = std::fs::read(&logp).unwrap_or_default();
    assert_absent(&[(logp.clone(), log.clone())], &ns, "server log");

    // Secrets: the admin token, an issued token and the passphrase are
    // nowhere in the data directory (nor in the backup, nor the log); in the
    // keys directory only in the two dev files that hold them.
    let pass = passphrase(&s.keys_dir());
    assert!(pass.len() >= 16);
    let secrets: Vec<(String, Vec<u8>)> = vec![
        ("admin token".into(), s.admin.trim().as_bytes().to_vec()),
        ("order token".into(), w.as_bytes().to_vec()),
        ("dev passphrase".into(), pass.as_bytes().to_vec()),
    ];
    assert_absent(&dir_bytes(&s.data_dir()), &secrets, "data dir");
    assert_absent(&[(backup.clone(), std::fs::read(&backup).unwrap())], &secrets, "backup");
    assert_absent(&[(logp, log)], &secrets, "server log");
    let keys: Vec<_> = dir_bytes(&s.keys_dir())
        .into_iter()
        .filter(|(p, _)| !p.ends_with("admin.token") && !p.ends_with("dev-passphrase"))
        .collect();
    assert_absent(&keys, &secrets, "keys dir (outside admin.token/dev-passphrase)");
}

// ----- 2. DELETE and what follows ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_answers_receipt_then_every_call_is_410() {
    let mut s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let auditor = s.token("dpo", &[], &["audit"]).await;
    let a = s.create(&w, forensic_subject()).await;
    let b = s.create(&w, other_subject("b2")).await;

    // A read-only order token may not erase; the erasure token needs its purpose.
    let r = s
        .call(Method::DELETE, &format!("/v1/subjects/{a}"), &w, Some("order"), None)
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .call(Method::DELETE, &format!("/v1/subjects/{a}"), &er, None, None)
        .await;
    assert!(
        r.status.is_client_error(),
        "erase without X-Purpose: {} {}",
        r.status,
        r.text
    );
    assert_eq!(s.get(&format!("/v1/subjects/{a}"), &w, Some("order")).await.status, 200);

    let r = delete(&s, &er, &a).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rc = &r.body["receipt"];
    assert_eq!(r.body["id"], a.as_str());
    assert_eq!(rc["id"], a.as_str());
    assert_eq!(r.body["erased_at"], rc["erased_at"]);
    assert!(rc["key_epoch"].as_u64().is_some_and(|e| e >= 1), "{}", r.text);
    ts(&rc["erased_at"]);
    ts(&rc["final_by"]);
    assert!(r.body["signature"].as_str().is_some_and(|x| !x.is_empty()));
    assert!(!r.text.contains(SURNAME) && !r.text.contains(EMAIL));

    let again = delete(&s, &er, &a).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body, r.body, "a repeated erasure answers the same receipt");

    async fn all_410(s: &Server, w: &str, auditor: &str, a: &str, b: &str) {
        let expect_410 = |r: &Resp, what: &str| {
            assert_eq!(r.status, 410, "{what}: {}", r.text);
            assert_eq!(r.body["code"], "subject_erased", "{what}: {}", r.text);
        };
        let r = s.get(&format!("/v1/subjects/{a}"), w, Some("order")).await;
        expect_410(&r, "GET");
        let r = s
            .call(
                Method::PATCH,
                &format!("/v1/subjects/{a}"),
                w,
                Some("order"),
                Some(json!({"fields": {"surname": "Back"}})),
            )
            .await;
        expect_410(&r, "PATCH");
        let r = s.get(&format!("/v1/subjects/{a}/consents"), w, Some("order")).await;
        expect_410(&r, "consents");
        let r = s
            .call(
                Method::PUT,
                &format!("/v1/subjects/{a}/consents/marketing"),
                w,
                Some("order"),
                Some(json!({"granted": true})),
            )
            .await;
        expect_410(&r, "consent PUT");
        let r = s.get(&format!("/v1/subjects/{a}/access-log"), auditor, None).await;
        expect_410(&r, "access-log");
        let r = s
            .post("/v1/subjects:batchGet", w, Some("order"), json!({"ids": [a, b]}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let res = r.body["results"].as_array().unwrap();
        assert_eq!(res[0]["status"], 410, "{}", r.text);
        assert_eq!(res[0]["error"]["code"], "subject_erased", "{}", r.text);
        assert_eq!(res[1]["status"], 200, "{}", r.text);
        assert_eq!(res[1]["fields"]["surname"], "Other-b2");
        for (field, value) in [("email", EMAIL), ("phone", PHONE)] {
            let r = s
                .post("/v1/lookup", w, Some("order"), json!({"field": field, "value": value}))
                .await;
            assert_eq!(r.status, 404, "lookup {field} of an erased subject: {}", r.text);
        }
        // The other subject is untouched.
        let r = s.get(&format!("/v1/subjects/{b}"), w, Some("order")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    all_410(&s, &w, &auditor, &a, &b).await;

    // After a restart: still erased, still the same receipt.
    s.restart().await;
    all_410(&s, &w, &auditor, &a, &b).await;
    let again = delete(&s, &er, &a).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body, r.body, "the receipt survives a restart");

    // Erasing an unknown subject is a 404, not a receipt.
    let r = delete(&s, &er, "00000000-0000-4000-8000-000000000000").await;
    assert_eq!(r.status, 404, "{}", r.text);
}

// ----- 3. receipt signature ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_verifies_with_public_key_alone() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let a = s.create(&w, forensic_subject()).await;
    let r = delete(&s, &er, &a).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The public key needs no token.
    let pk = s.get("/v1/receipts/public-key", "", None).await;
    assert_eq!(pk.status, 200, "{}", pk.text);
    assert_eq!(pk.body["alg"], "Ed25519");
    let b64 = base64::engine::general_purpose::STANDARD;
    let pk: [u8; 32] = b64
        .decode(pk.body["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .expect("32-byte Ed25519 key");
    let sig = b64.decode(r.body["signature"].as_str().unwrap()).unwrap();
    assert_eq!(sig.len(), 64);

    let receipt = &r.body["receipt"];
    for k in ["id", "erased_at", "key_epoch", "final_by"] {
        assert!(receipt.get(k).is_some(), "receipt lacks {k}: {}", r.text);
    }
    let mut msg = String::new();
    canon(receipt, &mut msg);
    assert!(
        verify(&pk, msg.as_bytes(), &sig),
        "receipt signature does not verify over {msg}"
    );
    // Matches the crate's own canonical form too.
    assert_eq!(msg, pdvault::receipt::canonical_json(receipt));

    // One changed byte anywhere in the message does not verify.
    let bytes = msg.as_bytes();
    for i in [0, bytes.len() / 3, bytes.len() / 2, bytes.len() - 2] {
        let mut m = bytes.to_vec();
        m[i] ^= 0x01;
        assert!(!verify(&pk, &m, &sig), "changed byte {i} still verifies");
    }
    // A changed receipt field does not verify either.
    let mut changed = receipt.clone();
    // (a different last character: the id's own could already be '0')
    let last = if a.ends_with('0') { '1' } else { '0' };
    changed["id"] = json!(format!("{}{last}", &a[..35]));
    let mut m2 = String::new();
    canon(&changed, &mut m2);
    assert!(!verify(&pk, m2.as_bytes(), &sig));
    // A changed signature byte does not verify.
    let mut sig2 = sig.clone();
    sig2[10] ^= 0x80;
    assert!(!verify(&pk, msg.as_bytes(), &sig2));

    // final_by is after erased_at, and bounded by rotate_every (1d) plus
    // epoch_retention (30d) plus the scheduler tick of the shipped config.
    let erased = ts(&receipt["erased_at"]);
    let final_by = ts(&receipt["final_by"]);
    assert!(
        final_by > erased,
        "final_by {} not after erased_at {}",
        receipt["final_by"],
        receipt["erased_at"]
    );
    let gap = final_by.duration_since(erased).unwrap();
    assert!(
        gap >= Duration::from_secs(30 * 86400),
        "final_by too early for 30d retention: {gap:?}"
    );
    assert!(
        gap <= Duration::from_secs(31 * 86400 + 120),
        "final_by later than the config allows: {gap:?}"
    );
}

// ----- 4. CLI shred --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_shred_prints_receipt_and_subject_is_gone() {
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let a = s.create(&w, forensic_subject()).await;
    let out = s.cmd().args(["shred", &a]).output().unwrap();
    assert!(
        out.status.success(),
        "shred failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("shred prints JSON");
    assert_eq!(v["id"], a.as_str(), "{v}");
    assert_eq!(v["receipt"]["id"], a.as_str(), "{v}");
    assert!(v["signature"].as_str().is_some_and(|x| !x.is_empty()), "{v}");
    assert!(v["receipt"]["final_by"].is_string(), "{v}");
    let r = s.get(&format!("/v1/subjects/{a}"), &w, Some("order")).await;
    assert_eq!(r.status, 410, "{}", r.text);
    assert_eq!(r.body["code"], "subject_erased");
    // Shredding again through the CLI prints the same receipt.
    let out2 = s.cmd().args(["shred", &a]).output().unwrap();
    assert!(out2.status.success(), "{}", String::from_utf8_lossy(&out2.stderr));
    let v2: Value = serde_json::from_slice(&out2.stdout).unwrap();
    assert_eq!(v2, v);
}

// ----- 5. restore replays the ledger ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_replays_shred_ledger_and_refuses_non_empty_dir() {
    let mut s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let a = s.create(&w, forensic_subject()).await;
    let b = s.create(&w, other_subject("b5")).await;
    let backup = s.dir.path().join("before-erasure.backup");
    backup_via_cli(&s, &backup).await;
    // Also a raw copy of the data directory, taken before the erasure.
    s.stop();
    let raw = s.dir.path().join("raw-data");
    copy_dir(&s.data_dir(), &raw);
    s.spawn().await;

    let r = delete(&s, &er, &a).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let receipt = r.body.clone();

    let report = restore_into_fresh_data(&mut s, &backup, "data-after-erasure");
    assert!(
        report["ledger_entries_replayed"].as_u64().is_some_and(|n| n >= 1),
        "restore report: {report}"
    );
    // Restoring again into the (now non-empty) data directory is refused and
    // changes nothing.
    let before = dir_bytes(&s.data_dir()).len();
    let out = restore_cmd(&s, &s.data_dir(), &backup);
    assert!(!out.status.success(), "restore into a non-empty dir succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dir_bytes(&s.data_dir()).len(), before);

    s.spawn().await;
    let r = s.get(&format!("/v1/subjects/{a}"), &w, Some("order")).await;
    assert_eq!(r.status, 410, "erased subject came back from the backup: {}", r.text);
    assert_eq!(r.body["code"], "subject_erased");
    let r = s
        .post(
            "/v1/lookup",
            &w,
            Some("order"),
            json!({"field": "email", "value": EMAIL}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = s.get(&format!("/v1/subjects/{b}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Other-b5");
    assert_eq!(r.body["fields"]["address"]["street"], "Kept Street b5");
    assert_eq!(
        delete(&s, &er, &a).await.body,
        receipt,
        "the restored dir holds the same receipt"
    );
    // The restored store's audit log continues the backup's chain: its
    // first entry follows the backup's head, and the whole log verifies.
    let entries = s.audit_entries();
    let first = entries.first().expect("entries after the restore");
    let head = &report["backup"]["audit_head"];
    assert_eq!(
        first["seq"].as_u64().unwrap(),
        head["seq"].as_u64().unwrap() + 1,
        "{first} after {report}"
    );
    assert_eq!(first["prev"], head["hash"], "{first} after {report}");
    // On sled the base is the file `audit/base.json`, beside the log.
    if !audit_files_only("restore_replays_shred_ledger_and_refuses_non_empty_dir: audit/base.json") {
        let log = std::fs::read_to_string(s.data_dir().join("audit/audit.log")).unwrap();
        let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        let base: Value =
            serde_json::from_slice(&std::fs::read(s.data_dir().join("audit/base.json")).unwrap()).unwrap();
        assert_eq!(first["seq"].as_u64().unwrap(), base["seq"].as_u64().unwrap() + 1);
        assert_eq!(first["prev"], base["hash"]);
        assert_eq!(base["seq"], head["seq"]);
        assert_eq!(base["hash"], head["hash"]);
    }
    let out = s.cmd().args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An old raw copy of the data directory, put back in place: the ledger
    // replay at start keeps A erased. (The postgres backend's equivalent, an
    // old dump of the data database, is in tests/postgres.rs.)
    if on_postgres() {
        return;
    }
    s.stop();
    s.move_data_away("data-restored");
    copy_dir(&raw, &s.data_dir());
    s.spawn().await;
    let r = s.get(&format!("/v1/subjects/{a}"), &w, Some("order")).await;
    assert_eq!(
        r.status, 410,
        "erased subject came back from an old data copy: {}",
        r.text
    );
    let r = s.get(&format!("/v1/subjects/{b}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Other-b5");
    // Its raw files still hold A's old ciphertexts (sled keeps them), but the
    // subject record is gone from the store.
    s.stop();
    let copy = s.dir.path().join("probe");
    copy_dir(&s.data_dir(), &copy);
    assert!(stored_record(&copy, &a).is_none());
}

// ----- 6. the heart: no key left that opens a shredded subject -------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_rotation_no_live_key_opens_an_erased_subject_anywhere() {
    if sled_only("after_rotation_no_live_key_opens_an_erased_subject_anywhere") {
        return;
    }
    let mut s = Server::start_with(Some(&retention_zero), vec![]).await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let a = s.create(&w, forensic_subject()).await;
    let b = s.create(&w, other_subject("b6")).await;
    let backup = s.dir.path().join("before-erasure.backup");
    backup_via_cli(&s, &backup).await;
    s.stop();
    let raw = s.dir.path().join("raw");
    copy_dir(&s.data_dir(), &raw.join("data"));
    copy_dir(&s.keys_dir(), &raw.join("keys"));
    s.spawn().await;

    let r = delete(&s, &er, &a).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let receipt = r.body["receipt"].clone();
    assert_eq!(receipt["key_epoch"], 1);
    // final_by with retention 0: the next rotation (rotate_every = 1d) plus the tick.
    let gap = ts(&receipt["final_by"])
        .duration_since(ts(&receipt["erased_at"]))
        .unwrap();
    assert!(gap <= Duration::from_secs(86400 + 120), "final_by: {gap:?}");
    let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["epoch"], 2, "{}", r.text);
    assert_eq!(r.body["rewrapped"], 1, "only B's key is live: {}", r.text);
    let r = s.get(&format!("/v1/subjects/{b}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop();

    let live = s.dir.path().join("live");
    copy_dir(&s.data_dir(), &live.join("data"));
    copy_dir(&s.keys_dir(), &live.join("keys"));
    // Every file: raw copies, the live directories and the backup.
    let mut files = dir_bytes(&raw);
    files.extend(dir_bytes(&s.data_dir()));
    files.extend(dir_bytes(&s.keys_dir()));
    files.push((backup.clone(), std::fs::read(&backup).unwrap()));

    let live_kr = open_keyring(&s.keys_dir());
    let live_keks = keks(&live_kr);
    assert_eq!(
        live_keks.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        vec![2],
        "with epoch_retention 0 the retired epoch must be gone"
    );
    let master = std::fs::read_to_string(s.keys_dir().join("master.key")).unwrap();
    let m: Value = serde_json::from_str(&master).unwrap();
    assert!(m["rotation"].is_null(), "{master}");
    assert!(
        m["destroyed"].as_array().unwrap().iter().any(|d| d["epoch"] == 1),
        "{master}"
    );

    // Positive controls: the raw copy's own (old) keys do open A, and the byte
    // scan finds A's wrapped key, so the checks below would see a leak.
    let old_kr = open_keyring(&raw.join("keys"));
    let old_keks = keks(&old_kr);
    let raw_rec = stored_record(&raw.join("data"), &a).expect("A's record in the raw copy");
    let a_stored = stored_wrapped(&raw.join("keys"), &a);
    assert_eq!(a_stored.len(), 1);
    let dek = try_unwrap(&old_keks, &a, &[1], &a_stored[0].1.sealed).expect("control: old KEK unwraps A");
    assert_eq!(
        open_field(&dek, &a, &raw_rec, "surname"),
        Some(json!(SURNAME)),
        "control"
    );
    assert!(
        scan_wrapped(&dir_bytes(&raw.join("keys")))
            .iter()
            .any(|c| try_unwrap(&old_keks, &a, &[1], c).is_some()),
        "control: the byte scan finds A's wrapped key in the raw keys copy"
    );
    // And the live KEK does open B (the live keyring is the right one).
    let b_live = stored_wrapped(&live.join("keys"), &b);
    assert_eq!(b_live.len(), 1);
    assert_eq!(b_live[0].1.epoch, 2);
    let bdek = try_unwrap(&live_keks, &b, &[1], &b_live[0].1.sealed).expect("live KEK opens B");
    let b_raw = stored_record(&raw.join("data"), &b).unwrap();
    assert_eq!(open_field(&bdek, &b, &b_raw, "surname"), Some(json!("Other-b6")));

    // The test: nothing that the vault still holds opens A.
    assert!(
        stored_wrapped(&live.join("keys"), &a).is_empty(),
        "A's key is still in the live key store"
    );
    assert!(
        stored_record(&live.join("data"), &a).is_none(),
        "A's record is still in the live data store"
    );
    let cands = candidates(&a, &[&raw.join("keys"), &live.join("keys")], &files);
    assert!(cands.len() > 2);
    for c in &cands {
        if let Some(dek) = try_unwrap(&live_keks, &a, &[1, 2, 3], c) {
            let leaked = open_field(&dek, &a, &raw_rec, "surname");
            panic!("a live KEK unwraps a data key of the erased subject (opens surname: {leaked:?})");
        }
    }
    drop((old_kr, live_kr));

    // B still comes back from the same (pre-erasure) backup, A does not.
    let _ = restore_into_fresh_data(&mut s, &backup, "data-live");
    s.spawn().await;
    let r = s.get(&format!("/v1/subjects/{b}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["surname"], "Other-b6");
    assert_eq!(r.body["fields"]["email"], "other.b6@example.kz");
    assert_eq!(r.body["fields"]["address"]["street"], "Kept Street b6");
    let r = s.get(&format!("/v1/subjects/{a}"), &w, Some("order")).await;
    assert_eq!(r.status, 410, "{}", r.text);
}

// ----- 7. an edit re-keys: the old value dies with the old key -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_then_rotation_leaves_old_value_unopenable() {
    if sled_only("edit_then_rotation_leaves_old_value_unopenable") {
        return;
    }
    let mut s = Server::start_with(Some(&retention_zero), vec![]).await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let c = s.create(&w, forensic_subject()).await;
    s.stop();
    let raw = s.dir.path().join("raw");
    copy_dir(&s.data_dir(), &raw.join("data"));
    copy_dir(&s.keys_dir(), &raw.join("keys"));
    s.spawn().await;

    let new_addr = json!({"country": "KZ", "city": "Shymkent", "street": "New Street 2", "building": "2"});
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/subjects/{c}"),
            &w,
            Some("order"),
            Some(json!({"fields": {"address": new_addr}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["version"], 2);
    let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["epoch"], 2);
    let r = s.get(&format!("/v1/subjects/{c}"), &w, Some("order")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["fields"]["address"]["street"], "New Street 2");
    assert_eq!(r.body["fields"]["address"]["city"], "Shymkent");
    assert_eq!(
        r.body["fields"]["surname"], SURNAME,
        "unchanged fields survive the re-key"
    );
    s.stop();

    let live = s.dir.path().join("live");
    copy_dir(&s.data_dir(), &live.join("data"));
    copy_dir(&s.keys_dir(), &live.join("keys"));
    let mut files = dir_bytes(&raw);
    files.extend(dir_bytes(&s.data_dir()));
    files.extend(dir_bytes(&s.keys_dir()));
    let live_kr = open_keyring(&s.keys_dir());
    let live_keks = keks(&live_kr);
    assert_eq!(live_keks.iter().map(|(e, _)| *e).collect::<Vec<_>>(), vec![2]);

    // Control: the old key (from the raw copy, with its own old KEK) opens the old address.
    let old_kr = open_keyring(&raw.join("keys"));
    let old_rec = stored_record(&raw.join("data"), &c).unwrap();
    assert_eq!(old_rec.version, 1);
    let old_w = stored_wrapped(&raw.join("keys"), &c);
    let old_dek = try_unwrap(&keks(&old_kr), &c, &[1], &old_w[0].1.sealed).expect("control");
    assert_eq!(open_field(&old_dek, &c, &old_rec, "address").unwrap()["street"], STREET);

    // Only version 2 is in the live key store, under epoch 2.
    let now = stored_wrapped(&live.join("keys"), &c);
    assert_eq!(now.iter().map(|(v, w)| (*v, w.epoch)).collect::<Vec<_>>(), vec![(2, 2)]);
    let new_rec = stored_record(&live.join("data"), &c).unwrap();
    let new_dek = try_unwrap(&live_keks, &c, &[2], &now[0].1.sealed).expect("live key opens v2");
    assert_eq!(
        open_field(&new_dek, &c, &new_rec, "address").unwrap()["street"],
        "New Street 2"
    );
    assert_ne!(new_dek, old_dek, "an edit must re-key");
    // The new key does not open the old ciphertexts.
    assert!(open_field(&new_dek, &c, &old_rec, "address").is_none());

    // No live KEK unwraps any copy of the version-1 key.
    let cands = candidates(&c, &[&raw.join("keys"), &live.join("keys")], &files);
    for cand in &cands {
        if let Some(dek) = try_unwrap(&live_keks, &c, &[1], cand) {
            let leaked = open_field(&dek, &c, &old_rec, "address").map(|a| a["street"].clone());
            panic!("a live KEK unwraps C's version-1 data key (old street: {leaked:?})");
        }
    }
}

// ----- 8. crash in the middle of a rotation --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_rotation_loses_nothing_and_rotation_completes() {
    if sled_only("crash_mid_rotation_loses_nothing_and_rotation_completes") {
        return;
    }
    let mut s = Server::start_with(None, vec![("PDVAULT_FAULT_ROTATE_ABORT_AFTER", "10")]).await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let subjects: Vec<Value> = (0..30).map(|i| other_subject(&format!("r{i}"))).collect();
    let body = json!({"subjects": subjects.iter().map(|f| json!({"fields": f})).collect::<Vec<_>>()});
    let r = s.post("/v1/subjects:batchCreate", &w, Some("order"), body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ids: Vec<String> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            assert_eq!(x["status"], 201, "{x}");
            x["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 30);

    let res = s
        .client
        .post(format!("{}/v1/admin/rotate-kek", s.base()))
        .bearer_auth(&s.admin)
        .json(&json!({}))
        .send()
        .await;
    assert!(
        res.is_err(),
        "the rotation should have crashed the server, got {:?}",
        res.map(|r| r.status())
    );
    let mut child = s.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "server still running after the fault point");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    // The interrupted rotation is recorded: epoch 2 exists, rotation in progress.
    let m: Value = serde_json::from_slice(&std::fs::read(s.keys_dir().join("master.key")).unwrap()).unwrap();
    let target = m["rotation"]["target"].as_u64().expect("rotation in progress recorded");
    assert_eq!(target, 2);
    {
        let copy = s.dir.path().join("crashed-keys");
        copy_dir(&s.keys_dir(), &copy);
        let all = all_stored_wrapped(&copy);
        assert_eq!(all.len(), 30);
        let moved = all.iter().filter(|(_, _, w)| w.epoch == 2).count();
        assert!((10..30).contains(&moved), "{moved} keys re-wrapped before the crash");
    }

    s.env.clear();
    s.spawn().await;
    for (i, id) in ids.iter().enumerate() {
        let r = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
        assert_eq!(r.status, 200, "subject {i} after the crash: {}", r.text);
        assert_eq!(r.body["fields"]["surname"], format!("Other-r{i}"));
    }
    let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let epoch = r.body["epoch"].as_u64().unwrap();
    // Either it finished the interrupted rotation (target 2) or the scheduler
    // had already finished it at start and this is a new one (3).
    assert!(epoch == target || epoch == target + 1, "{}", r.text);
    for id in &ids {
        let r = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    s.stop();
    let m: Value = serde_json::from_slice(&std::fs::read(s.keys_dir().join("master.key")).unwrap()).unwrap();
    assert!(m["rotation"].is_null(), "{m}");
    assert_eq!(m["current"].as_u64(), Some(epoch));
    let copy = s.dir.path().join("final-keys");
    copy_dir(&s.keys_dir(), &copy);
    let all = all_stored_wrapped(&copy);
    assert_eq!(all.len(), 30);
    assert!(
        all.iter().all(|(_, _, w)| w.epoch as u64 == epoch),
        "every live key is wrapped under the final epoch: {:?}",
        all.iter().map(|(_, _, w)| w.epoch).collect::<Vec<_>>()
    );
}

// ----- 9. retention sweeper -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sweeper_erases_inactive_subjects() {
    let edit = |c: String| {
        assert!(c.contains("sweep_every = \"1h\""));
        c.replace("sweep_every = \"1h\"", "inactive_after = \"2s\"\nsweep_every = \"1s\"")
    };
    let s = Server::start_with(Some(&edit), vec![]).await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&w, forensic_subject()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = s.get(&format!("/v1/subjects/{id}"), &w, Some("order")).await;
        if last.status == 410 || Instant::now() > deadline {
            break;
        }
    }
    assert_eq!(last.status, 410, "not swept after 15s: {}", last.text);
    assert_eq!(last.body["code"], "subject_erased");
    let r = s
        .post(
            "/v1/lookup",
            &w,
            Some("order"),
            json!({"field": "email", "value": EMAIL}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);

    let log = s.audit_entries();
    let entry = log
        .iter()
        .find(|e| e["action"] == "erase" && e["subject"] == id.as_str())
        .unwrap_or_else(|| panic!("no erase entry for the subject in the audit log:\n{log:#?}"));
    assert_eq!(entry["caller"], "retention-sweeper", "{entry}");
    assert_eq!(entry["outcome"], "allowed", "{entry}");
    assert!(
        entry["justification"].as_str().is_some_and(|j| j.contains("retention")),
        "{entry}"
    );
    // The shred ledger holds the receipt, with reason retention.
    let ledger = s.shred_ledger().await;
    let le = ledger.last().expect("a shred ledger entry");
    assert_eq!(le["id"], id.as_str());
    assert_eq!(le["receipt"]["reason"], "retention", "{le}");
}

// ----- 10. writes racing a rotation ------------------------------------------------------------

/// With `epoch_retention = 0` the retired epoch is destroyed as soon as a
/// rotation ends, so a data key wrapped under the old epoch but stored after
/// the rotation passed it would be lost for good. Creates race rotations
/// here; every acknowledged subject must still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_racing_rotations_lose_no_subject() {
    let s = Arc::new(Server::start_with(Some(&retention_zero), vec![]).await);
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let writer = {
        let s = s.clone();
        let w = w.clone();
        tokio::spawn(async move {
            let mut ids = vec![];
            for round in 0..6 {
                let subjects: Vec<Value> = (0..500)
                    .map(|i| json!({"fields": other_subject(&format!("x{round}-{i}"))}))
                    .collect();
                let r = s
                    .post(
                        "/v1/subjects:batchCreate",
                        &w,
                        Some("order"),
                        json!({"subjects": subjects}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                for x in r.body["results"].as_array().unwrap() {
                    assert_eq!(x["status"], 201, "{x}");
                    ids.push(x["id"].as_str().unwrap().to_string());
                }
            }
            ids
        })
    };
    let rotator = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..40 {
                let r = s.post("/v1/admin/rotate-kek", &s.admin, None, json!({})).await;
                assert_eq!(r.status, 200, "{}", r.text);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let ids = writer.await.unwrap();
    rotator.await.unwrap();
    let mut lost = vec![];
    for chunk in ids.chunks(1000) {
        let r = s
            .post(
                "/v1/subjects:batchGet",
                &w,
                Some("order"),
                json!({"ids": chunk, "fields": ["surname"]}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        for x in r.body["results"].as_array().unwrap() {
            if x["status"] != 200 {
                lost.push(x.clone());
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged subjects no longer read after rotations; first: {}",
        lost.len(),
        ids.len(),
        lost[0]
    );
}
