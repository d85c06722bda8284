//! The operator's questions, asked the way an operator asks them:
//! `pdvault status` (through the server and offline) and the breach
//! question `pdvault audit impact` (with `audit export --token/--caller`).

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn run(s: &Server, args: &[&str]) -> (bool, String, String) {
    let out = s
        .cmd()
        .args(args)
        .env("PDVAULT_TOKEN", s.admin.trim())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(s: &Server, args: &[&str]) -> Value {
    let (ok, out, err) = run(s, args);
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

#[tokio::test]
async fn status_reports_epoch_audit_head_and_counts_online_and_offline() {
    let mut s = Server::start().await;
    let w = s
        .token("shop", &["order", "erasure"], &["read", "write", "erase"])
        .await;
    let a = s.create(&w, full_subject()).await;
    let _b = s.create(&w, full_subject()).await;
    let r = s
        .call(Method::DELETE, &format!("/v1/subjects/{a}"), &w, Some("erasure"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let st = json_of(&s, &["status"]);
    assert_eq!(st["sealed"], false, "{st}");
    assert_eq!((&st["subjects"], &st["erased"]), (&json!(1), &json!(1)), "{st}");
    // The dev admin token and the shop's.
    assert_eq!(st["tokens"], 2, "{st}");
    assert_eq!(st["events_pending"], 0);
    let epoch = st["key_epoch"].as_u64().unwrap();
    assert!(st["audit_head"]["seq"].as_u64().unwrap() > 0);
    assert!(
        st["last_checkpoint"]["seq"].is_u64(),
        "the start signs a checkpoint: {st}"
    );
    assert!(st["next_rotation_at"].as_str().unwrap() > st["last_rotation_at"].as_str().unwrap());

    // The same through the API, for admins only.
    let r = s.get("/v1/admin/status", &s.admin.clone(), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["subjects"], 1);
    let r = s.get("/v1/admin/status", &w, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.body["code"], "capability_missing");

    let (ok, _, err) = run(&s, &["rotate-kek"]);
    assert!(ok, "{err}");
    let st = json_of(&s, &["status"]);
    assert_eq!(st["key_epoch"].as_u64().unwrap(), epoch + 1, "{st}");

    // Offline: no server holds the key, so it says sealed, and still counts.
    s.stop();
    let st = json_of(&s, &["status"]);
    assert_eq!(st["sealed"], true, "{st}");
    assert_eq!((&st["subjects"], &st["erased"]), (&json!(1), &json!(1)), "{st}");
}

#[tokio::test]
async fn audit_impact_answers_which_subjects_and_fields_a_token_or_caller_received() {
    let s = Server::start().await;
    let w = s.token("shop", &["order"], &["write"]).await;
    let (courier, courier_id) = s.token_with_id("courier-a", &["delivery"], &["read"]).await;
    let (courier2, _) = s.token_with_id("courier-a", &["delivery"], &["read"]).await;
    let (other, other_id) = s.token_with_id("courier-b", &["delivery"], &["read"]).await;
    let ids: Vec<String> = futures_util::future::join_all((0..3).map(|_| s.create(&w, full_subject()))).await;

    let s = &s;
    let read = |tok: &str, id: &str, fields: &str| {
        let path = format!("/v1/subjects/{id}?fields={fields}");
        let tok = tok.to_owned();
        async move { s.get(&path, &tok, Some("delivery")).await.status.as_u16() }
    };
    assert_eq!(read(&courier, &ids[0], "surname,phone").await, 200);
    assert_eq!(read(&courier, &ids[0], "address").await, 200);
    assert_eq!(read(&courier, &ids[1], "phone").await, 200);
    // Refused: released nothing, so it is no part of the impact.
    assert_eq!(read(&courier, &ids[2], "email").await, 403);
    assert_eq!(read(&courier2, &ids[2], "given_name").await, 200);
    assert_eq!(read(&other, &ids[2], "address").await, 200);

    let v = json_of(s, &["audit", "impact", "--token", &courier_id, "--format", "json"]);
    assert_eq!(v["releases"], 3, "{v}");
    let subjects = v["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 2, "{v}");
    let first = subjects.iter().find(|x| x["subject"] == ids[0].as_str()).unwrap();
    assert_eq!(first["fields"], json!(["address", "phone", "surname"]));
    assert_eq!(first["releases"], 2);
    assert!(first["first"].as_str().unwrap() <= first["last"].as_str().unwrap());
    assert_eq!(v["fields"], json!({"address": 1, "phone": 2, "surname": 1}));
    assert!(!v.to_string().contains("Ivanova"), "values never appear: {v}");

    // By caller: both of courier-a's tokens, never courier-b's reads.
    let v = json_of(s, &["audit", "impact", "--caller", "courier-a", "--format", "json"]);
    assert_eq!(v["releases"], 4, "{v}");
    assert_eq!(v["subjects"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["fields"]["address"], 1,
        "courier-b's address read is not courier-a's: {v}"
    );

    // A window after everything: nothing.
    let v = json_of(
        s,
        &[
            "audit",
            "impact",
            "--token",
            &other_id,
            "--since",
            "2999-01-01",
            "--format",
            "json",
        ],
    );
    assert_eq!(v["releases"], 0, "{v}");
    let v = json_of(
        s,
        &[
            "audit",
            "impact",
            "--token",
            &other_id,
            "--until",
            "2000-01-01",
            "--format",
            "json",
        ],
    );
    assert_eq!(v["releases"], 0, "{v}");

    // The short table.
    let (ok, table, err) = run(s, &["audit", "impact", "--token", &courier_id, "--format", "table"]);
    assert!(ok, "{err}");
    assert!(table.contains("3 releases of 2 subjects"), "{table}");
    assert!(table.contains("phone") && table.contains("2 subjects"), "{table}");

    // export --token: only that token's entries (its refusal included).
    let (ok, lines, err) = run(s, &["audit", "export", "--token", &courier_id]);
    assert!(ok, "{err}");
    let entries: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries.len(), 4, "{lines}");
    assert!(entries.iter().all(|e| e["token_id"] == courier_id.as_str()));
    let (ok, lines, _) = run(s, &["audit", "export", "--caller", "courier-b", "--released"]);
    assert!(ok);
    assert_eq!(lines.lines().count(), 1, "{lines}");

    // A token that minted a grant: the grant's releases are part of its impact.
    let (shop, shop_id) = s
        .token_with_id("order-service", &["delivery"], &["read", "grant"])
        .await;
    let r = s
        .post(
            "/v1/grants",
            &shop,
            Some("delivery"),
            json!({"subjects": [ids[1]], "purpose": "delivery", "fields": ["address"], "ttl_seconds": 600, "caller": "courier-c"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let grant_id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(read(r.body["token"].as_str().unwrap(), &ids[1], "address").await, 200);
    let v = json_of(s, &["audit", "impact", "--token", &shop_id, "--format", "json"]);
    assert_eq!(
        v["releases"], 1,
        "the grant's read counts for the token that minted it: {v}"
    );
    assert_eq!(v["subjects"][0]["subject"], ids[1].as_str());
    assert_eq!(
        v["tokens"],
        json!([grant_id.clone(), shop_id.clone()]
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>())
    );

    // Neither --token nor --caller: refused by the parser.
    let (ok, _, err) = run(s, &["audit", "impact"]);
    assert!(!ok && err.contains("--token"), "{err}");
}

#[tokio::test]
async fn long_commands_draw_a_bar_on_a_terminal_and_plain_lines_otherwise() {
    let mut s = Server::start().await;
    let w = s.token("shop", &["order"], &["write"]).await;
    for _ in 0..3 {
        s.create(&w, full_subject()).await;
    }
    let backup = s.dir.path().join("b.backup");
    let (ok, _, err) = run(&s, &["backup", backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        err.contains("pdvault: backup: started") && err.contains("pdvault: backup: written to"),
        "{err}"
    );
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "no bar drawing off a terminal: {err:?}"
    );
    s.stop();

    // Offline, on a terminal (a pseudo-terminal made by util-linux `script`).
    let mut cmd = s.cmd();
    cmd.args(["rotate-kek"]);
    let args: Vec<String> = std::iter::once(BIN.to_string())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .map(|a| format!("'{a}'"))
        .collect();
    let mut script = std::process::Command::new("script");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let out = script
        .args(["-qec", &args.join(" "), "/dev/null"])
        .env_remove("PDVAULT_TOKEN")
        .output()
        .expect("util-linux `script` (Debian's bsdutils, an essential package) runs the pty test");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("rotate-kek [") && tty.contains("data keys"),
        "no bar on a terminal: {tty:?}"
    );
    assert!(tty.contains("pdvault: rotate-kek: epoch"), "{tty:?}");

    // Restore and verify, off a terminal: one line at the start, one at the end.
    let fresh = s.dir.path().join("restored");
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .arg("--data-dir")
        .arg(&fresh)
        .arg("--keys-dir")
        .arg(s.keys_dir())
        .args(["restore", backup.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("pdvault: restore: started") && err.contains("pdvault: restore: "),
        "{err}"
    );
    let (ok, _, err) = run(&s, &["audit", "verify"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("pdvault: audit verify: started") && err.contains("pdvault: audit verify: checked"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_restore_leaves_nothing_behind_and_the_retry_works() {
    if sled_only("a_failed_restore_leaves_nothing_behind_and_the_retry_works") {
        return;
    }
    let mut s = Server::start().await;
    let w = s.token("shop", &["order"], &["write"]).await;
    s.create(&w, full_subject()).await;
    let backup = s.dir.path().join("b.backup");
    let (ok, _, err) = run(&s, &["backup", backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    let config = s.config.clone();
    let restore = |data: &std::path::Path, keys: &std::path::Path| {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(data)
            .arg("--keys-dir")
            .arg(keys)
            .args(["restore", backup.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let fresh = s.dir.path().join("restored");
    // The running server holds the keys: refused, and the directory is left as it was.
    let out = restore(&fresh, &s.keys_dir());
    assert!(!out.status.success());
    assert!(!fresh.exists(), "a failed restore left {fresh:?} behind");
    // A keys directory without the master key: refused before anything is made.
    let empty_keys = s.dir.path().join("no-keys");
    let out = restore(&fresh, &empty_keys);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("no keys in"), "{err}");
    assert!(!fresh.exists() && !empty_keys.exists());
    // Once the server is gone, the same command works.
    s.stop();
    let out = restore(&fresh, &s.keys_dir());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["subjects"], 1, "{report}");
}

/// `pdvault passphrase change`: refused while a server runs; afterwards the
/// old passphrase opens nothing and the new one everything (data, receipts);
/// a change stopped by a crash on either side of its commit point leaves
/// the keys opening under exactly one passphrase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passphrase_changes_offline_and_a_crash_leaves_one_that_opens() {
    let mut s = Server::start().await;
    let w = s.token("shop", &["order"], &["read", "write"]).await;
    let id = s.create(&w, full_subject()).await;
    let pk = s.api().receipt_public_key().await.unwrap().public_key;
    let keys = s.keys_dir();
    let old = std::fs::read_to_string(keys.join("dev-passphrase")).unwrap();
    let change = |s: &Server, new: &str, env: &[(&str, &str)]| {
        let mut c = s.cmd();
        c.args(["passphrase", "change"]).env("PDVAULT_NEW_PASSPHRASE", new);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Opens the keys offline with an explicit passphrase (not the dev file).
    let opens_with = |s: &Server, pass: &str| {
        let out = s
            .cmd()
            .args(["token", "list"])
            .env("PDVAULT_PASSPHRASE", pass)
            .output()
            .unwrap();
        out.status.success()
    };

    let (ok, err) = change(&s, "a new passphrase, long enough", &[]);
    assert!(!ok && err.contains("stop it first"), "{err}");
    s.stop();
    assert!(opens_with(&s, &old));

    // A crash before master.key is rewritten: the old passphrase still opens,
    // and the half-made receipt.key.next is dropped on the next open.
    let fault = s.dir.path().join("fault");
    std::fs::write(&fault, b"").unwrap();
    let f = fault.to_str().unwrap();
    let (ok, err) = change(
        &s,
        "first new passphrase",
        &[("PDVAULT_FAULT_PASSPHRASE_BEFORE_COMMIT_FILE", f)],
    );
    assert!(!ok, "{err}");
    assert!(keys.join("receipt.key.next").exists());
    assert!(!opens_with(&s, "first new passphrase"));
    assert!(opens_with(&s, &old));
    assert!(!keys.join("receipt.key.next").exists());

    // A crash after the commit: the new passphrase opens (and finishes the
    // move of receipt.key), the old one no more.
    let (ok, err) = change(
        &s,
        "second new passphrase",
        &[("PDVAULT_FAULT_PASSPHRASE_AFTER_COMMIT_FILE", f)],
    );
    assert!(!ok, "{err}");
    assert!(!opens_with(&s, &old));
    assert!(opens_with(&s, "second new passphrase"));
    assert!(!keys.join("receipt.key.next").exists());

    // A clean change; the dev server, which reads its passphrase file, serves
    // the same data with the same receipt key.
    std::fs::write(keys.join("dev-passphrase"), "second new passphrase").unwrap();
    let (ok, err) = change(&s, "third new passphrase", &[]);
    assert!(ok, "{err}");
    assert!(!opens_with(&s, "second new passphrase"));
    assert!(opens_with(&s, "third new passphrase"));
    let (ok, err) = change(&s, "short", &[]);
    assert!(!ok && err.contains("shorter than 12"), "{err}");
    s.restart().await;
    assert_eq!(s.api().receipt_public_key().await.unwrap().public_key, pk);
    let got = s.api_as(&w).read("order", &id, Some(&["surname"])).await.unwrap();
    assert_eq!(got.fields["surname"], "Ivanova");
}

/// Every path under `dir`, itself included.
fn tree(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(dir.to_path_buf());
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            tree(&e.unwrap().path(), out);
        }
    }
}

/// An operator who runs an offline command as root on the service's
/// directories would leave root's files there (the store's log, sled's
/// files), and the service, running as its own user, could not start. The
/// command is refused, naming the user to run it as, and makes nothing.
#[tokio::test]
async fn root_is_refused_on_the_directories_of_another_user() {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("checked nothing: this test needs root (CI runs as root)");
        return;
    }
    let mut s = Server::start().await;
    s.stop();
    const NOBODY: u32 = 65534;
    let mut before = vec![];
    for d in [s.keys_dir(), s.data_dir()] {
        tree(&d, &mut before);
    }
    for p in &before {
        std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    for args in [&["token", "list"][..], &["status"], &["rotate-kek"]] {
        let (ok, _, err) = run(&s, args);
        assert!(!ok, "{args:?} ran as root on another user's directories");
        assert!(err.contains("belongs to uid 65534"), "{args:?}: {err}");
    }
    let mut after = vec![];
    for d in [s.keys_dir(), s.data_dir()] {
        tree(&d, &mut after);
    }
    assert_eq!(before, after, "a refused command changed the directories");
    for p in &after {
        assert_eq!(
            std::fs::symlink_metadata(p).unwrap().uid(),
            NOBODY,
            "{} is root's",
            p.display()
        );
    }
}

/// A second process on a directory a server holds is an ordinary
/// condition: it is refused in those words, not as an internal error.
#[tokio::test]
async fn a_second_server_on_the_same_directory_is_told_it_is_in_use() {
    if sled_only("a_second_server_on_the_same_directory_is_told_it_is_in_use") {
        return;
    }
    let s = Server::start().await;
    // The same address too: the store is opened before the port is bound.
    let out = s.cmd().args(["serve", "--dev"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second server started on the same directory");
    assert!(err.contains("is in use by another pdvault process"), "{err}");
    assert!(!err.contains("internal error"), "{err}");
}
