//! Configuration in layers, seen from outside: the environment
//! (`PDVAULT_<SECTION>__<KEY>`) over the file, the command line over both,
//! unknown variables refused by name before anything is touched,
//! `pdvault config show`, and `PDVAULT_ADDR` for the operator CLI.

mod common;

use common::*;
use serde_json::json;
use std::process::Output;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_environment_configures_the_server_and_flags_win_over_it() {
    // body_limit comes only from the environment; listen is set there too,
    // but the kit's --listen flag must win (the kit reaches the server on it).
    let s = Server::start_with(
        None,
        vec![
            ("PDVAULT_SERVER__BODY_LIMIT", "2048"),
            ("PDVAULT_SERVER__LISTEN", "127.0.0.1:1"),
        ],
    )
    .await;
    let w = s.token("shop", &["order"], &["write"]).await;
    let small = json!({"fields": {"surname": "Small"}});
    assert_eq!(s.post("/v1/subjects", &w, Some("order"), small).await.status, 201);
    let big = json!({"fields": {"surname": "Big", "address": {"city": "Almaty", "comment": "x".repeat(3000)}}});
    let r = s.post("/v1/subjects", &w, Some("order"), big).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.body["code"], "payload_too_large");
}

#[tokio::test]
async fn an_unknown_variable_stops_the_start_by_name_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("PDVAULT_SERVER__LISTN", "127.0.0.1:8443"),
        ("PDVAULT_NOSUCH__KEY", "1"),
        ("PDVAULT_AUDIT__FSYNC", "sometimes"),
    ] {
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(config_path())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--keys-dir")
            .arg(dir.path().join("keys"))
            .args(["serve", "--dev"])
            .env(var, value)
            .output()
            .unwrap();
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{var}: started anyway");
        assert!(err.contains(var), "{var}: the error does not name it: {err}");
        let file = config_path().display().to_string();
        assert!(!err.contains(&file), "{var}: the error blames the file: {err}");
        assert!(!dir.path().join("data").exists() && !dir.path().join("keys").exists());
    }
}

#[tokio::test]
async fn config_show_prints_every_layer_with_secrets_redacted() {
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(config_path())
        .args(["--listen", "127.0.0.1:4443", "config", "show"])
        .env("PDVAULT_SERVER__LISTEN", "127.0.0.1:9999")
        .env("PDVAULT_SERVER__PUBLIC_URL", "https://vault.example.kz")
        .env(
            "PDVAULT_STORAGE__URL",
            "postgresql://pdvault:s3cr3t-pw@db.internal:5432/pdvault",
        )
        .env(
            "PDVAULT_STORAGE__KEYS_URL",
            "postgresql://pdvault:s3cr3t-pw@db.internal:5432/pdvault_keys",
        )
        .env("PDVAULT_KEYS__ROTATE_EVERY", "12h")
        .env("PDVAULT_STORAGE__BACKEND", "postgres")
        .output()
        .unwrap();
    let (show, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(show.contains("listen = \"127.0.0.1:4443\""), "{show}");
    assert!(show.contains("public_url = \"https://vault.example.kz\""), "{show}");
    assert!(show.contains("rotate_every = \"12h\""), "{show}");
    assert!(show.contains("[purposes.delivery]"), "{show}");
    assert!(show.contains("backend = \"postgres\""), "{show}");
    assert!(!show.contains("s3cr3t-pw"), "a password was printed: {show}");
    assert!(show.contains("pdvault:REDACTED@db.internal"), "{show}");
    // A bad layer is refused by show too, naming it.
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(config_path())
        .args(["config", "show"])
        .env("PDVAULT_SERVER__NOPE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("PDVAULT_SERVER__NOPE"));
}

#[tokio::test]
async fn pdvault_addr_points_the_cli_at_the_server() {
    let s = Server::start().await;
    let dead = free_port();
    let cli = |addr: &str| {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&s.config)
            .arg("--data-dir")
            .arg(s.data_dir())
            .arg("--keys-dir")
            .arg(s.keys_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{dead}"))
            .args(["token", "list"])
            .env("PDVAULT_TOKEN", s.admin.trim())
            .env("PDVAULT_ADDR", addr)
            .output()
            .unwrap()
    };
    // The configured address has no server; PDVAULT_ADDR has one.
    let out = cli(&format!("https://127.0.0.1:{}", s.port));
    let (list, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(list.contains("admin"), "{list}");
    // Set but unanswered: an error, never a silent fall back to the data directory.
    let out = cli(&format!("127.0.0.1:{dead}"));
    assert!(!out.status.success());
    assert!(text(&out).1.contains("PDVAULT_ADDR"), "{}", text(&out).1);
}

#[tokio::test]
async fn json_logs_carry_one_object_per_request_and_no_value_or_token() {
    let s = Server::start_with(None, vec![("PDVAULT_LOG__FORMAT", "json")]).await;
    let w = s.token("shop", &["order", "delivery"], &["read", "write"]).await;
    let id = s.create(&w, full_subject()).await;
    let ok = s
        .get(&format!("/v1/subjects/{id}?fields=surname"), &w, Some("delivery"))
        .await;
    assert_eq!(ok.status, 200);
    let denied = s
        .get(&format!("/v1/subjects/{id}?fields=email"), &w, Some("delivery"))
        .await;
    assert_eq!(denied.status, 403);
    let bad = s
        .get(&format!("/v1/subjects/{id}"), "pdv_not-a-token", Some("not a purpose"))
        .await;
    assert_eq!(bad.status, 401);

    let log = s.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = |rid: &str| {
        lines
            .iter()
            .find(|l| l["message"] == "request" && l["request_id"] == rid)
            .unwrap_or_else(|| panic!("no request line for {rid}:\n{log}"))
            .clone()
    };
    let rid = |r: &Resp| r.headers["x-request-id"].to_str().unwrap().to_owned();
    let l = request(&rid(&ok));
    assert!(l["timestamp"].is_string(), "{l}");
    assert_eq!(
        (
            &l["caller"],
            &l["purpose"],
            &l["action"],
            &l["outcome"],
            &l["code"],
            &l["status"]
        ),
        (
            &json!("shop"),
            &json!("delivery"),
            &json!("read"),
            &json!("allowed"),
            &json!(""),
            &json!(200)
        )
    );
    assert!(l["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{l}");
    assert_eq!(l["route"], "/v1/subjects/{id}");
    let l = request(&rid(&denied));
    assert_eq!(
        (&l["outcome"], &l["code"], &l["status"]),
        (&json!("denied"), &json!("field_not_allowed"), &json!(403))
    );
    let l = request(&rid(&bad));
    assert_eq!(
        (&l["outcome"], &l["code"], &l["caller"]),
        (&json!("denied"), &json!("token_invalid"), &json!(""))
    );
    // An unknown purpose header is not echoed into the log.
    assert!(!log.contains("not a purpose"), "{log}");
    for secret in [
        "Ivanova",
        "Aigerim",
        "Serikovna",
        "+77015550177",
        "aigerim.k",
        "Abai",
        w.as_str(),
        s.admin.trim(),
        "pdv_not-a-token",
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
}

#[tokio::test]
async fn a_tls_failure_in_the_cli_says_why() {
    let s = Server::start().await;
    // A keys directory without the server's certificate: nothing to trust it by.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&s.config)
        .arg("--keys-dir")
        .arg(empty.path())
        .args(["token", "list"])
        .env("PDVAULT_TOKEN", s.admin.trim())
        .env("PDVAULT_ADDR", format!("https://127.0.0.1:{}", s.port))
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("UnknownIssuer"), "the cause is not named: {err}");
}
