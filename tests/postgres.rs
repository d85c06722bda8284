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
/// copy of `a`'s keys directory, its own data directory (its node id).
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

/// The keys database's record of the epochs, as read once (the test only
/// unwraps with it).
struct EpochsAsRead(Vec<u8>);

impl pdvault::keyring::SharedEpochs for EpochsAsRead {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(Some(self.0.clone()))
    }
    fn replace(&self, _: Option<&[u8]>, _: &[u8]) -> Result<bool, String> {
        Err("read only".into())
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
    let mut kr = pdvault::keyring::Keyring::open(&s.keys_dir(), passphrase.trim_end().as_bytes()).unwrap();
    // The epochs are in the keys database (space 14, `epochs`).
    let epochs: Vec<u8> = keys_db
        .query_one("SELECT v FROM pdvault_kv WHERE space = 14 AND k = 'epochs'::bytea", &[])
        .await
        .unwrap()
        .get(0);
    kr.share_epochs(Box::new(EpochsAsRead(epochs))).unwrap();
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

/// A rotation on one node while the other serves: the other reads every
/// key, old and re-wrapped, and creates under whichever epoch is current,
/// and not one call fails, though each rotation destroys the epoch before
/// (`epoch_retention = 0`). Two rotations asked of both nodes at once never
/// run together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_on_one_node_while_the_other_serves_fails_no_read_or_write() {
    if skipped("rotate_kek_on_one_node_while_the_other_serves_fails_no_read_or_write") {
        return;
    }
    let a = Server::start_with(None, vec![("PDVAULT_KEYS__EPOCH_RETENTION", "0")]).await;
    let b = std::sync::Arc::new(second_node(&a).await);
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let mut ids = vec![];
    for i in 0..40 {
        ids.push(a.create(&w, subject(&format!("r{i}"))).await);
    }
    // The keys directory kept no epoch: they are in the keys database.
    let mf: Value = serde_json::from_slice(&std::fs::read(a.keys_dir().join("master.key")).unwrap()).unwrap();
    assert_eq!(mf["epochs_shared"], true, "{mf}");
    assert_eq!(mf["epochs"], json!([]), "{mf}");

    // B reads every subject and creates new ones until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (b, w, ids, stop) = (b.clone(), w.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut reads, mut created, mut failures) = (0u64, vec![], vec![]);
            let api = b.api_as(&w);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for id in &ids {
                    match api.read("order", id, None).await {
                        Ok(_) => reads += 1,
                        Err(e) => failures.push(format!("read {id}: {e}")),
                    }
                }
                n += 1;
                match api.create("order", &subject(&format!("during{n}"))).await {
                    Ok(c) => created.push(c.id),
                    Err(e) => failures.push(format!("create: {e}")),
                }
            }
            (reads, created, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for expected in [2, 3] {
        let r = a.post("/v1/admin/rotate-kek", &a.admin, None, json!({})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["epoch"], expected, "{}", r.text);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (reads, created, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} calls failed on B: {failures:?}",
        failures.len()
    );
    assert!(
        reads > 80 && !created.is_empty(),
        "{reads} reads, {} creates",
        created.len()
    );
    // Epochs 1 and 2 are destroyed now: what B created during the
    // rotations was wrapped under a live epoch (or re-wrapped), on both nodes.
    let st = a.get("/v1/admin/status", &a.admin, None).await;
    assert_eq!(st.body["key_epoch"], 3, "{}", st.text);
    for id in ids.iter().chain(&created) {
        for node in [&a, &*b] {
            let r = node.api_as(&w).read("order", id, None).await;
            assert!(r.is_ok(), "{id} after the rotations: {:?}", r.err());
        }
    }

    // Both nodes asked at once: one rotation runs; the other waits its turn
    // or is refused as under way on the other node, never a second epoch at once.
    let (ra, rb) = tokio::join!(
        a.post("/v1/admin/rotate-kek", &a.admin, None, json!({})),
        b.post("/v1/admin/rotate-kek", &a.admin, None, json!({}))
    );
    let mut epochs = vec![];
    for r in [&ra, &rb] {
        match r.status.as_u16() {
            200 => epochs.push(r.body["epoch"].as_u64().unwrap()),
            400 => assert!(
                r.body["detail"].as_str().unwrap().contains("under way")
                    || r.body["detail"].as_str().unwrap().contains("another node"),
                "{}",
                r.text
            ),
            _ => panic!("{}", r.text),
        }
    }
    epochs.sort();
    assert!(epochs == [4] || epochs == [4, 5], "{epochs:?}");
    for id in &ids {
        b.api_as(&w).read("order", id, None).await.unwrap();
    }
}

/// `audit verify` and `audit export` cover every node's chain; an entry of
/// one node's chain altered or removed in the data database is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_and_export_cover_every_node_and_find_tampering() {
    if skipped("audit_verify_and_export_cover_every_node_and_find_tampering") {
        return;
    }
    let mut a = Server::start().await;
    let mut b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let id = a.create(&w, subject("au")).await;
    for _ in 0..3 {
        a.api_as(&w).read("order", &id, None).await.unwrap();
        b.api_as(&w).read("order", &id, None).await.unwrap();
    }
    let node_b = std::fs::read_to_string(b.data_dir().join("node.id")).unwrap();
    let node_a = std::fs::read_to_string(a.data_dir().join("node.id")).unwrap();
    // Stopped: each signs its head at shutdown.
    a.stop();
    b.stop();

    let export = a.cmd().args(["audit", "export"]).output().unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let entries: Vec<Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reads_on = |node: &str| {
        entries
            .iter()
            .filter(|e| e["node"] == node && e["action"] == "read" && e["subject"] == id.as_str())
            .count()
    };
    assert_eq!((reads_on(&node_a), reads_on(&node_b)), (3, 3), "{entries:?}");
    let times: Vec<&str> = entries.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|t| t[0] <= t[1]),
        "export is in time order: {times:?}"
    );

    let verify = |s: &Server| {
        let out = s.cmd().args(["audit", "verify"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = verify(&a);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{} entries in the chains of 2 node(s)", entries.len())),
        "{out}"
    );

    let url = setting(&a, "PDVAULT_STORAGE__URL").to_owned();
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // A's signed checkpoints removed from the data database: its anchor, in
    // the keys database, is no longer among them. (Put back after.)
    let cps = db
        .query(
            "DELETE FROM pdvault_kv WHERE space = 17 AND substr(k, 1, 36) = convert_to($1, 'UTF8')
             AND get_byte(k, 36) = 99 RETURNING k, v",
            &[&node_a],
        )
        .await
        .unwrap();
    assert!(!cps.is_empty());
    let (ok, out, err) = verify(&a);
    assert!(!ok, "removed checkpoints passed: {out}");
    assert!(err.contains(&node_a) && err.contains("checkpoint"), "{err}");
    for r in &cps {
        let (k, v): (Vec<u8>, Vec<u8>) = (r.get(0), r.get(1));
        db.execute("INSERT INTO pdvault_kv (space, k, v) VALUES (17, $1, $2)", &[&k, &v])
            .await
            .unwrap();
    }
    assert!(verify(&a).0, "intact again with the checkpoints back");

    // One of B's entries altered (its caller), then removed, in the database.
    let row = db
        .query_one(
            "SELECT k, convert_from(v, 'UTF8') FROM pdvault_kv WHERE space = 17
             AND substr(k, 1, 36) = convert_to($1, 'UTF8') AND get_byte(k, 36) = 101 ORDER BY k OFFSET 1 LIMIT 1",
            &[&node_b],
        )
        .await
        .unwrap();
    let (k, v): (Vec<u8>, String) = (row.get(0), row.get(1));
    let altered = v.replace("order-service", "someone-else");
    assert_ne!(altered, v);
    db.execute(
        "UPDATE pdvault_kv SET v = convert_to($2, 'UTF8') WHERE space = 17 AND k = $1",
        &[&k, &altered],
    )
    .await
    .unwrap();
    let (ok, out, err) = verify(&a);
    assert!(!ok, "an altered entry passed: {out}");
    assert!(err.contains(&node_b) && err.contains("altered"), "{err}");
    db.execute("DELETE FROM pdvault_kv WHERE space = 17 AND k = $1", &[&k])
        .await
        .unwrap();
    let (ok, out, err) = verify(&a);
    assert!(!ok, "a removed entry passed: {out}");
    assert!(err.contains(&node_b) && err.contains("removed"), "{err}");
}

/// A backup made through one node and restored: every node's audit chain
/// continues from the signed head the backup recorded, and the whole trail
/// verifies once both nodes have started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_continues_every_nodes_audit_chain() {
    if skipped("a_restore_continues_every_nodes_audit_chain") {
        return;
    }
    let mut a = Server::start().await;
    let mut b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let id = a.create(&w, subject("bk")).await;
    b.api_as(&w).read("order", &id, None).await.unwrap();
    let node_a = std::fs::read_to_string(a.data_dir().join("node.id")).unwrap();
    let backup = a.dir.path().join("two-nodes.backup");
    let out = a.cmd().arg("backup").arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    a.stop();
    b.stop();
    a.move_data_away("data-before-restore");
    let out = a.cmd().arg("restore").arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(a.data_dir().join("node.id")).unwrap(),
        node_a,
        "the restored data directory is the node that made the backup"
    );
    a.spawn().await;
    b.spawn().await;
    a.api_as(&w).read("order", &id, None).await.unwrap();
    b.api_as(&w).read("order", &id, None).await.unwrap();
    a.stop();
    b.stop();
    let out = a.cmd().args(["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("in the chains of 2 node(s)"), "{text}");
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

/// Records per space in a backup file (`PDVAULT-BACKUP-1`: magic line,
/// header line, then `1, name(u16), key(u32), value(u32)` records).
fn backup_counts(path: &std::path::Path) -> BTreeMap<String, usize> {
    let b = std::fs::read(path).unwrap();
    let mut at = b.iter().position(|c| *c == b'\n').unwrap() + 1;
    at += b[at..].iter().position(|c| *c == b'\n').unwrap() + 1;
    let mut counts = BTreeMap::new();
    let take = |at: &mut usize, n: usize| {
        let s = &b[*at..*at + n];
        *at += n;
        s
    };
    while take(&mut at, 1)[0] == 1 {
        let n = u16::from_be_bytes(take(&mut at, 2).try_into().unwrap()) as usize;
        let name = String::from_utf8(take(&mut at, n).to_vec()).unwrap();
        for _ in 0..2 {
            let n = u32::from_be_bytes(take(&mut at, 4).try_into().unwrap()) as usize;
            take(&mut at, n);
        }
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// A backup taken on one node while another node writes is one moment of
/// the database: a subject created on the other node after the copy began
/// is not in it, neither its record nor its blind-index entries (paged
/// reads outside one transaction took the entries without the record).
#[tokio::test]
async fn a_backup_is_one_moment_while_another_node_writes() {
    if skipped("a_backup_is_one_moment_while_another_node_writes") {
        return;
    }
    let holds = tempfile::tempdir().unwrap();
    let hold = holds.path().join("backup.hold");
    let a = Server::start_with(None, vec![("PDVAULT_FAULT_BACKUP_HOLD_FILE", hold.to_str().unwrap())]).await;
    let b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    for i in 0..3 {
        a.create(&w, subject(&format!("m{i}"))).await;
    }
    let backup = |name: &str| {
        let path = a.dir.path().join(name);
        let mut cmd = a.cmd();
        cmd.arg("backup").arg(&path);
        (path, std::thread::spawn(move || cmd.output().unwrap()))
    };
    let (before, job) = backup("before.backup");
    let out = job.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = backup_counts(&before);
    assert_eq!(before.get("subjects"), Some(&3), "{before:?}");

    std::fs::write(&hold, b"").unwrap();
    let (during, job) = backup("during.backup");
    let held = holds.path().join("backup.hold.held");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held.exists() {
        assert!(Instant::now() < deadline, "the backup never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.create(&w, subject("during")).await;
    std::fs::remove_file(&hold).unwrap();
    let out = job.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let during = backup_counts(&during);
    for space in ["subjects", "index"] {
        assert_eq!(
            during.get(space),
            before.get(space),
            "{space}: {during:?} against {before:?}"
        );
    }

    let (after, job) = backup("after.backup");
    assert!(job.join().unwrap().status.success());
    let after = backup_counts(&after);
    assert_eq!(after.get("subjects"), Some(&4), "{after:?}");
    assert!(after.get("index") > before.get("index"), "{after:?}");
}

/// The revocation ledger is compacted (the entries of long-expired tokens
/// dropped) by whichever node sweeps, while any node may append to it. A
/// compaction that read the ledger before another node appended must not
/// commit its rewrite over that entry: it gives way, and a later sweep
/// drops what it had picked, the new entry kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_compaction_never_drops_what_another_node_appended_meanwhile() {
    if skipped("a_ledger_compaction_never_drops_what_another_node_appended_meanwhile") {
        return;
    }
    let holds = tempfile::tempdir().unwrap();
    let hold = holds.path().join("compact.hold");
    let a = Server::start_with(
        None,
        vec![
            ("PDVAULT_RETENTION__SWEEP_EVERY", "1s"),
            ("PDVAULT_RETENTION__EXPIRED_CREDENTIALS_KEPT", "1s"),
            ("PDVAULT_FAULT_LEDGER_COMPACT_HOLD_FILE", hold.to_str().unwrap()),
        ],
    )
    .await;
    let b = second_node(&a).await;
    let revoked = |s: &Server, ttl: u64| {
        let api = s.api().clone();
        async move {
            let req = pdvault::client::IssueRequest {
                caller: "courier-kazpost".into(),
                purposes: vec!["delivery".into()],
                capabilities: vec!["read".into()],
                ttl_seconds: ttl,
                cert_subject: None,
            };
            let t = api.issue_token(&req).await.unwrap();
            api.revoke_token(&t.id).await.unwrap();
            t.token
        }
    };
    let count = |s: &Server| {
        let api = s.api().clone();
        async move { api.status().await.unwrap().revocations }
    };
    let before = count(&a).await;

    // A compaction holds once it has read the ledger and picked the short
    // token's entry; then B appends.
    std::fs::write(&hold, b"").unwrap();
    let _short = revoked(&a, 1).await;
    let first = revoked(&a, 600).await;
    let held = holds.path().join("compact.hold.held");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held.exists() {
        assert!(Instant::now() < deadline, "no compaction began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = revoked(&b, 600).await;
    std::fs::remove_file(&hold).unwrap();

    // Only the short token's entry goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = count(&b).await;
        if n == before + 2 {
            break;
        }
        assert!(n > before + 1, "a revocation was lost: {n} entries, {before} before");
        assert!(Instant::now() < deadline, "the short token's entry was never dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in [&first, &second] {
        let e = a.api_as(t).status().await.err().unwrap();
        assert_eq!(e.code(), Some("token_invalid"), "{e}");
    }
}

/// On several nodes each node's passphrase is its own: one node's is
/// changed (offline) while the other serves on, writes and rotates the
/// KEK; the changed node then starts under its new passphrase and reads
/// what was written under either epoch, and the other restarts under its
/// old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_changes_its_passphrase_while_the_other_serves_and_rotates() {
    if skipped("one_node_changes_its_passphrase_while_the_other_serves_and_rotates") {
        return;
    }
    let mut a = Server::start().await;
    let mut b = second_node(&a).await;
    let w = a.token("order-service", &["order"], &["read", "write"]).await;
    let first = a.create(&w, subject("p1")).await;
    a.stop();
    let new = "node a's own new passphrase";
    let out = a
        .cmd()
        .args(["passphrase", "change"])
        .env("PDVAULT_NEW_PASSPHRASE", new)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(a.keys_dir().join("dev-passphrase")).unwrap(),
        new
    );
    assert_ne!(
        std::fs::read_to_string(b.keys_dir().join("dev-passphrase")).unwrap(),
        new
    );

    // B serves on under its old passphrase: reads, writes, rotates.
    b.api_as(&w).read("order", &first, None).await.unwrap();
    let second = b.create(&w, subject("p2")).await;
    b.api().rotate_kek().await.unwrap();
    let third = b.create(&w, subject("p3")).await;

    a.spawn().await;
    b.restart().await;
    for id in [&first, &second, &third] {
        for node in [&a, &b] {
            let got = node.api_as(&w).read("order", id, None).await.unwrap();
            assert!(got.fields["surname"].as_str().unwrap().starts_with("Nurlanova-p"));
        }
    }
}
