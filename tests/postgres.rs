//! The postgres backend with several nodes, and what its database holds.
//!
//! Runs when `PDVAULT_TEST_POSTGRES` names a cluster (`scripts/pg-cluster`;
//! `.ci/run` always sets it); without one each test says so and passes
//! nothing off as checked. Two `pdvault serve` processes share one pair of
//! databases and one copy of the keys directory each, as an operator would
//! run them, and are called over TLS like any other caller.

mod common;
use common::*;

use pdvault::client::GrantRequest;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn skipped(test: &str) -> bool {
    if !on_postgres() {
        eprintln!("{test}: PDVAULT_TEST_POSTGRES is not set; nothing checked");
    }
    !on_postgres()
}

/// A second node beside `a`: the same configuration and databases, its own
/// copy of `a`'s keys directory, its own data directory (its audit log).
async fn second_node(a: &Server) -> Server {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&a.keys_dir(), &dir.path().join("keys"));
    let config = dir.path().join("pdvault.toml");
    std::fs::copy(&a.config, &config).unwrap();
    Server::start_in(dir, config, a.env.clone()).await
}

fn subject(tag: &str) -> Value {
    json!({
        "surname": format!("Nurlanova-{tag}"),
        "given_name": "Aigerim",
        "phone": "+77011234567",
        "email": format!("{tag}@example.kz"),
        "address": {"country": "KZ", "city": "Almaty", "street": format!("Abay {tag}"), "postal_code": "050000"}
    })
}

#[tokio::test]
async fn two_nodes_see_each_others_writes_erasures_and_revocations_at_once() {
    if skipped("two_nodes_see_each_others_writes_erasures_and_revocations_at_once") {
        return;
    }
    let a = Server::start().await;
    let b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let er = a.token("deletion-workflow", &["erasure"], &["erase"]).await;

    // Created on A, read on B.
    let id = a.create(&w, subject("n1")).await;
    let r = b.api_as(&w).read("order", &id, None).await.unwrap();
    assert_eq!(r.fields["surname"], "Nurlanova-n1");
    // Edited on B, read on A at the new version.
    let v = b
        .api_as(&w)
        .patch("order", &id, &json!({"given_name": "Dana"}), Some(1))
        .await
        .unwrap();
    assert_eq!(v.version, 2);
    let r = a.api_as(&w).read("order", &id, None).await.unwrap();
    assert_eq!((r.version, r.fields["given_name"].as_str()), (2, Some("Dana")));
    // A stale If-Match on A after B's edit: refused with B's version.
    let e = a
        .api_as(&w)
        .patch("order", &id, &json!({"given_name": "Old"}), Some(1))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some("version_conflict"));

    // Erased on B: A answers 410 on the very next call.
    b.api_as(&er).erase("erasure", &id).await.unwrap();
    let e = a.api_as(&w).read("order", &id, None).await.err().unwrap();
    assert_eq!(e.code(), Some("subject_erased"), "{e}");

    // A token B has already served (so a cache would hold it), revoked on A:
    // B refuses it on its very next call.
    let (t, tid) = a.token_with_id("payment-service", &["payment"], &["read"]).await;
    let other = a.create(&w, subject("n2")).await;
    b.api_as(&t).read("payment", &other, None).await.unwrap();
    a.api().revoke_token(&tid).await.unwrap();
    let e = b.api_as(&t).read("payment", &other, None).await.err().unwrap();
    assert_eq!(e.code(), Some("token_invalid"), "{e}");
}

#[tokio::test]
async fn a_grant_max_uses_holds_exactly_over_two_nodes() {
    if skipped("a_grant_max_uses_holds_exactly_over_two_nodes") {
        return;
    }
    let a = Server::start().await;
    let b = second_node(&a).await;
    let w = a
        .token("order-service", &["order", "delivery"], &["read", "write", "grant"])
        .await;
    let id = a.create(&w, subject("g1")).await;
    let g = a
        .api_as(&w)
        .grant(
            "delivery",
            &GrantRequest::new("courier-kazpost", vec![id.clone()], 600)
                .fields(&["address"])
                .max_uses(5),
        )
        .await
        .unwrap();
    let (ca, cb) = (a.api_as(&g.token), b.api_as(&g.token));
    let reads = (0..20).map(|i| {
        let (c, id) = (if i % 2 == 0 { ca.clone() } else { cb.clone() }, id.clone());
        tokio::spawn(async move { c.read("delivery", &id, None).await })
    });
    let mut released = 0;
    for h in reads {
        match h.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.fields.keys().collect::<Vec<_>>(), ["address"]);
                released += 1;
            }
            Err(e) => assert_eq!(e.code(), Some("token_invalid"), "{e}"),
        }
    }
    assert_eq!(released, 5, "20 concurrent reads over two nodes of a 5-use grant");
}

#[tokio::test]
async fn concurrent_edits_on_two_nodes_let_one_win_and_keep_the_subject_readable() {
    if skipped("concurrent_edits_on_two_nodes_let_one_win_and_keep_the_subject_readable") {
        return;
    }
    let a = Server::start().await;
    let b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    for round in 0..3u64 {
        let id = a.create(&w, subject(&format!("race{round}"))).await;
        // Connections open and warm first, then all edits at once.
        let mut clients = vec![];
        for i in 0..16 {
            let c = if i % 2 == 0 { a.api_as(&w) } else { b.api_as(&w) };
            c.read("order", &id, None).await.unwrap();
            clients.push(c);
        }
        let go = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let edits: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (id, go) = (id.clone(), go.clone());
                tokio::spawn(async move {
                    go.wait().await;
                    c.patch("order", &id, &json!({"given_name": format!("Name{i}")}), Some(1))
                        .await
                })
            })
            .collect();
        let mut won = vec![];
        for h in edits {
            match h.await.unwrap() {
                Ok(v) => won.push(v.version),
                Err(e) => assert_eq!(e.code(), Some("version_conflict"), "{e}"),
            }
        }
        assert_eq!(won, [2], "16 edits of version 1 over two nodes: exactly one wins");
        for node in [&a, &b] {
            let r = node.api_as(&w).read("order", &id, None).await.unwrap();
            assert_eq!(r.version, 2);
        }
    }
}

#[tokio::test]
async fn kill_9_of_one_node_under_load_loses_no_acknowledged_write() {
    if skipped("kill_9_of_one_node_under_load_loses_no_acknowledged_write") {
        return;
    }
    let mut a = Server::start().await;
    let b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = vec![];
    for n in 0..8 {
        let c = if n % 2 == 0 { a.api_as(&w) } else { b.api_as(&w) };
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let Ok(v) = c.create("order", &subject(&format!("k{n}x{i}"))).await else {
                    continue;
                };
                acked.lock().unwrap().insert(v.id.clone(), 1);
                if let Ok(p) = c.patch("order", &v.id, &json!({"given_name": "Saule"}), Some(1)).await {
                    acked.lock().unwrap().insert(v.id, p.version);
                }
            }
        }));
    }
    // Kill A once both nodes have acknowledged writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 40 {
        assert!(Instant::now() < deadline, "no write load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for h in writers {
        h.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40);
    let reader = b.api_as(&w);
    for (id, version) in &acked {
        let r = reader
            .read("order", id, None)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(
            r.version >= *version,
            "{id}: acknowledged v{version}, reads v{}",
            r.version
        );
    }
}

/// `PDVAULT_TEST_POSTGRES_DIR`: the cluster's directory (`scripts/pg-cluster`),
/// whose data files the raw scan reads.
fn cluster_dir() -> Option<PathBuf> {
    std::env::var_os("PDVAULT_TEST_POSTGRES_DIR").map(PathBuf::from)
}

fn pg_dump(url: &str) -> Vec<u8> {
    dump(url, &["--data-only"])
}

fn dump(url: &str, args: &[&str]) -> Vec<u8> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin/pg_dump")).max())
        .unwrap_or_else(|| PathBuf::from("pg_dump"));
    let out = std::process::Command::new(bin)
        .args(args)
        .args(["--format=plain", url])
        .output()
        .expect("pg_dump runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The env value the kit gave the server.
fn setting<'a>(s: &'a Server, key: &str) -> &'a str {
    &s.env.iter().find(|(k, _)| k == key).unwrap().1
}

#[tokio::test]
async fn the_database_files_and_dumps_hold_no_value_key_or_token() {
    if skipped("the_database_files_and_dumps_hold_no_value_key_or_token") {
        return;
    }
    let s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let secret = "Zhumabekova-PGSCAN-5521";
    let mut ids = vec![];
    for i in 0..5 {
        let mut v = subject(&format!("scan{i}"));
        v["surname"] = json!(secret);
        v["email"] = json!(format!("pgscan{i}@example.kz"));
        ids.push(s.create(&w, v).await);
    }
    // The vault's data keys, unwrapped with its own keyring: none may be
    // anywhere in the clear.
    let (data_url, keys_url) = (
        setting(&s, "PDVAULT_STORAGE__URL"),
        setting(&s, "PDVAULT_STORAGE__KEYS_URL"),
    );
    let (keys_db, conn) = tokio_postgres::connect(keys_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = keys_db
        .query("SELECT k, v FROM pdvault_kv WHERE space = 12", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5, "one wrapped key per subject");
    let passphrase = std::fs::read_to_string(s.keys_dir().join("dev-passphrase")).unwrap();
    let kr = pdvault::keyring::Keyring::open(&s.keys_dir(), passphrase.trim_end().as_bytes()).unwrap();
    let (mut deks, mut wrapped) = (vec![], vec![]);
    for r in &rows {
        let (k, v): (Vec<u8>, Vec<u8>) = (r.get(0), r.get(1));
        let (id, version) = pdvault::storage::parse_dek_key(&k).unwrap();
        let w: pdvault::storage::WrappedKey = postcard::from_bytes(&v).unwrap();
        let raw = kr
            .kek(w.epoch)
            .unwrap()
            .open(&w.sealed, &pdvault::vault::dek_aad(id, version, w.epoch))
            .expect("control: the keyring unwraps the stored key");
        deks.push(raw.expose().to_vec());
        wrapped.push(w.sealed);
    }
    // Everything on the cluster's disk (heap files and WAL), after a checkpoint.
    let (data_db, conn) = tokio_postgres::connect(data_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    data_db.batch_execute("CHECKPOINT").await.unwrap();
    // This test's two databases, the WAL (every database's) and the shared
    // catalogs: what a copy of the disk would give away of this vault.
    let dir = cluster_dir().expect("PDVAULT_TEST_POSTGRES_DIR names the cluster's directory");
    let mut files = vec![];
    for db in [&data_db, &keys_db] {
        let oid: u32 = db
            .query_one("SELECT oid FROM pg_database WHERE datname = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        walk(&dir.join("data/base").join(oid.to_string()), &mut files);
    }
    walk(&dir.join("data/pg_wal"), &mut files);
    walk(&dir.join("data/global"), &mut files);
    assert!(
        files.iter().map(|(_, b)| b.len()).sum::<usize>() > 1 << 20,
        "the scan reads the cluster"
    );
    assert!(
        files
            .iter()
            .any(|(_, b)| memchr::memmem::find(b, ids[0].as_bytes()).is_some()),
        "control: the scanned files hold the stored rows"
    );
    let data_dump = pg_dump(data_url);
    let keys_dump = pg_dump(keys_url);
    // Positive control: the dump does hold the records (hex-encoded bytea).
    assert!(
        contains(&data_dump, hex::encode(&ids[0]).as_bytes()),
        "control: the data dump holds the subjects"
    );
    assert!(
        contains(&keys_dump, hex::encode(&wrapped[0]).as_bytes()),
        "control: the keys dump holds the wrapped keys"
    );
    files.push(("data dump".into(), data_dump.clone()));
    files.push(("keys dump".into(), keys_dump));
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("a field value".into(), secret.as_bytes().to_vec()),
        ("an email".into(), b"pgscan0@example.kz".to_vec()),
        ("the admin token".into(), s.admin.as_bytes().to_vec()),
        ("a token".into(), w.as_bytes().to_vec()),
    ];
    for d in &deks {
        needles.push(("a data key".into(), d.clone()));
        needles.push(("a data key (hex)".into(), hex::encode(d).into_bytes()));
    }
    for (what, n) in &needles {
        let finder = memchr::memmem::Finder::new(n);
        for (path, bytes) in &files {
            assert!(
                finder.find(bytes).is_none(),
                "{what} in the clear in {}",
                path.display()
            );
        }
    }
    for wk in &wrapped {
        let hexed = hex::encode(wk);
        assert!(
            !contains(&data_dump, hexed.as_bytes()),
            "the data database's dump holds a wrapped data key"
        );
    }
}

#[tokio::test]
async fn an_old_dump_of_the_data_database_restored_keeps_erased_subjects_erased() {
    if skipped("an_old_dump_of_the_data_database_restored_keeps_erased_subjects_erased") {
        return;
    }
    let mut s = Server::start().await;
    let w = s.token("order-service", &["order"], &["read", "write"]).await;
    let er = s.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let (gone, kept) = (s.create(&w, subject("d1")).await, s.create(&w, subject("d2")).await);
    // A dump taken while both live: a valid backup of the data.
    let data_url = setting(&s, "PDVAULT_STORAGE__URL").to_owned();
    let old = dump(&data_url, &[]);
    s.api_as(&er).erase("erasure", &gone).await.unwrap();
    // The dump loaded into an empty data database in place of the live one.
    s.stop();
    s.move_data_away("data-before-dump-restore");
    load_dump(&s, &data_url, &old);
    s.spawn().await;
    // The shred ledger was replayed before anything was served.
    let e = s.api_as(&w).read("order", &gone, None).await.err().unwrap();
    assert_eq!(
        e.code(),
        Some("subject_erased"),
        "an erased subject came back from an old dump: {e}"
    );
    let r = s.api_as(&w).read("order", &kept, None).await.unwrap();
    assert_eq!(r.fields["surname"], "Nurlanova-d2");
}

/// The sequence number of the last release of `id` in its access log.
async fn last_release_seq(s: &Server, auditor: &str, id: &str) -> u64 {
    let r = s.get(&format!("/v1/subjects/{id}/access-log"), auditor, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["entries"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Each node numbers its own audit chain, so two nodes release the same
/// subject under the same sequence number sooner or later; the access log
/// (who received the data, policy 4.2.1) must keep both, and page over both.
#[tokio::test]
async fn releases_on_two_nodes_under_one_sequence_number_are_both_in_the_access_log() {
    if skipped("releases_on_two_nodes_under_one_sequence_number_are_both_in_the_access_log") {
        return;
    }
    let a = Server::start().await;
    let b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let auditor = a.token("auditor", &[], &["audit"]).await;
    let (id, probe) = (a.create(&w, subject("s1")).await, a.create(&w, subject("s2")).await);
    // A releases `id` under its sequence number `at`.
    a.api_as(&w).read("order", &id, None).await.unwrap();
    let at = last_release_seq(&a, &auditor, &id).await;
    // B's chain is brought to just before `at` (refused calls are entries
    // too), then B releases `id` under the same number.
    b.api_as(&w).read("order", &probe, None).await.unwrap();
    let mut seq = last_release_seq(&a, &auditor, &probe).await;
    assert!(seq < at, "B's chain ({seq}) is already past A's ({at})");
    while seq + 1 < at {
        let r = b.get(&format!("/v1/subjects/{probe}"), &w, Some("payment")).await;
        assert_eq!(r.status, 403, "{}", r.text);
        seq += 1;
    }
    b.api_as(&w).read("order", &id, None).await.unwrap();
    let r = a.get(&format!("/v1/subjects/{id}/access-log"), &auditor, None).await;
    let entries = r.body["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2, "a release was lost from the access log: {}", r.text);
    assert!(
        entries.iter().all(|e| e["seq"] == at),
        "the two releases were meant to share sequence number {at}: {}",
        r.text
    );
    // Paged one at a time, the cursor walks over both and ends.
    let p1 = a
        .get(&format!("/v1/subjects/{id}/access-log?limit=1"), &auditor, None)
        .await;
    let next = p1.body["next"].as_str().expect("a next cursor").to_owned();
    let p2 = a
        .get(
            &format!("/v1/subjects/{id}/access-log?limit=1&after={next}"),
            &auditor,
            None,
        )
        .await;
    assert_eq!(p2.status, 200, "{}", p2.text);
    assert_eq!(p2.body["entries"].as_array().unwrap().len(), 1, "{}", p2.text);
    assert_ne!(p1.body["entries"][0]["request_id"], p2.body["entries"][0]["request_id"]);
    assert!(p2.body["next"].is_null(), "{}", p2.text);
}

/// Loads a plain `pg_dump` into the (empty) database at `url`.
fn load_dump(s: &Server, url: &str, dump: &[u8]) {
    let dump_file = s.dir.path().join("old.sql");
    std::fs::write(&dump_file, dump).unwrap();
    let psql = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin/psql")).max())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let out = std::process::Command::new(psql)
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&dump_file)
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The shred and revocation ledgers live in the keys database, shared by
/// the nodes: an old dump of the data restored under the node that neither
/// erased the subject nor revoked the token still has both undone before
/// anything is served.
#[tokio::test]
async fn an_old_dump_restored_on_another_node_replays_what_any_node_erased_or_revoked() {
    if skipped("an_old_dump_restored_on_another_node_replays_what_any_node_erased_or_revoked") {
        return;
    }
    let mut a = Server::start().await;
    let mut b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let er = a.token("deletion-workflow", &["erasure"], &["erase"]).await;
    let (t, tid) = a.token_with_id("payment-service", &["payment"], &["read"]).await;
    let (gone, kept) = (a.create(&w, subject("l1")).await, a.create(&w, subject("l2")).await);
    a.api_as(&t).read("payment", &kept, None).await.unwrap();
    // A dump while the subject lives and the token is good.
    let data_url = setting(&a, "PDVAULT_STORAGE__URL").to_owned();
    let old = dump(&data_url, &[]);
    // Both undone on B, whose keys directory is its own copy.
    b.api_as(&er).erase("erasure", &gone).await.unwrap();
    b.api().revoke_token(&tid).await.unwrap();
    b.stop();
    a.stop();
    // The old dump in place of the live data, served by A.
    a.move_data_away("data-before-dump-restore");
    load_dump(&a, &data_url, &old);
    a.spawn().await;
    let e = a.api_as(&w).read("order", &gone, None).await.err().unwrap();
    assert_eq!(
        e.code(),
        Some("subject_erased"),
        "a subject erased on B came back on A from an old dump: {e}"
    );
    let e = a.api_as(&t).read("payment", &kept, None).await.err().unwrap();
    assert_eq!(
        e.code(),
        Some("token_invalid"),
        "a token revoked on B was honoured again on A after an old dump: {e}"
    );
    let r = a.api_as(&w).read("order", &kept, None).await.unwrap();
    assert_eq!(r.fields["surname"], "Nurlanova-l2");
    // Both ledgers hold B's entries, in the shared keys database.
    let ledger = a.shred_ledger().await;
    assert!(ledger.iter().any(|e| e["id"] == gone.as_str()), "{ledger:?}");
    assert!(!b.keys_dir().join("shred.ledger").exists());
}

#[tokio::test]
async fn a_rotation_is_refused_while_another_node_serves_and_a_stale_keys_dir_cannot_start() {
    if skipped("a_rotation_is_refused_while_another_node_serves_and_a_stale_keys_dir_cannot_start") {
        return;
    }
    let mut a = Server::start().await;
    let stale_keys = a.dir.path().join("keys-before-rotation");
    copy_dir(&a.keys_dir(), &stale_keys);
    let mut b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let id = a.create(&w, subject("rot")).await;

    // Two nodes serve: refused, and nothing changed (B still reads).
    let r = a.post("/v1/admin/rotate-kek", &a.admin, None, json!({})).await;
    assert_eq!(
        (r.status.as_u16(), r.body["code"].as_str()),
        (400, Some("bad_request")),
        "{}",
        r.text
    );
    assert!(r.body["detail"].as_str().unwrap().contains("other node"), "{}", r.text);
    b.api_as(&w).read("order", &id, None).await.unwrap();

    // B stopped and its announcement aged out: A rotates alone.
    b.stop();
    tokio::time::sleep(pdvault::vault::LIVE_WINDOW + Duration::from_secs(1)).await;
    let r = a.post("/v1/admin/rotate-kek", &a.admin, None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["epoch"], 2);

    // B with its keys directory from before the rotation: refused at start,
    // naming what to copy; with A's master.key it starts and reads.
    std::fs::remove_dir_all(b.keys_dir()).unwrap();
    copy_dir(&stale_keys, &b.keys_dir());
    let out = b.cmd().args(["serve", "--dev"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("key epoch 2") && err.contains("master.key"), "{err}");
    std::fs::copy(a.keys_dir().join("master.key"), b.keys_dir().join("master.key")).unwrap();
    b.spawn().await;
    let r = b.api_as(&w).read("order", &id, None).await.unwrap();
    assert_eq!(r.fields["surname"], "Nurlanova-rot");
    a.stop();
}

#[tokio::test]
async fn migrate_brings_both_databases_to_the_schema_without_serving() {
    if skipped("migrate_brings_both_databases_to_the_schema_without_serving") {
        return;
    }
    let s = Server::start().await;
    let out = s.cmd().arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("data database 1, keys database 1"), "{text}");
    // On fresh databases too, before any server ran on them.
    let mut env = postgres_databases(&postgres_base().unwrap()).await;
    env.retain(|(k, _)| k.starts_with("PDVAULT_STORAGE__"));
    let out = s
        .cmd()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("migrate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let url = &env.iter().find(|(k, _)| k == "PDVAULT_STORAGE__URL").unwrap().1;
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let n: i64 = db
        .query_one("SELECT count(*) FROM pdvault_kv", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "migrate made the schema and wrote nothing else");
}
