//! Test kit: each test starts the real `pdvault` binary (`serve --dev`) on its
//! own loopback port with fresh data and keys directories, and talks to it
//! over real TLS, trusting the dev certificate the server made: through the
//! typed client `pdvault::client` (what services use) for the kit's own
//! steps (readiness, tokens, subjects), and through raw reqwest where a test
//! sends what no well-behaved client would.
#![allow(dead_code)]

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pdvault");

pub fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pdvault.toml")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    pub client: reqwest::Client,
    /// The typed client with the admin token (set once the server is ready).
    pub typed: Option<pdvault::client::Client>,
    pub admin: String,
    pub config: PathBuf,
    pub env: Vec<(String, String)>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Server {
    /// A fresh dev server with the shipped config.
    pub async fn start() -> Server {
        Self::start_with(None, vec![]).await
    }

    /// A fresh dev server; `extra_toml` is appended to a copy of the shipped
    /// config (so a test can change a section), `env` is passed to the process.
    pub async fn start_with(config_edit: Option<&dyn Fn(String) -> String>, env: Vec<(&str, &str)>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string(config_path()).unwrap();
        let text = match config_edit {
            Some(f) => f(shipped),
            None => shipped,
        };
        let config = dir.path().join("pdvault.toml");
        std::fs::write(&config, text).unwrap();
        let mut env: Vec<(String, String)> = env.into_iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        if let Some(base) = postgres_base() {
            env.extend(postgres_databases(&base).await);
        }
        Self::start_in(dir, config, env).await
    }

    /// A server on a free port over the directory `dir` (its `keys/` and
    /// `data/`), with `config` and `env`, started and ready.
    pub async fn start_in(dir: tempfile::TempDir, config: PathBuf, env: Vec<(String, String)>) -> Server {
        let mut s = Server {
            dir,
            port: free_port(),
            child: None,
            client: reqwest::Client::new(),
            typed: None,
            admin: String::new(),
            config,
            env,
        };
        s.spawn().await;
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }
    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The command line with this server's config and directories.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--keys-dir")
            .arg(self.keys_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env_remove("PDVAULT_PASSPHRASE")
            .env_remove("PDVAULT_TOKEN");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Starts (or restarts) the process and waits until it answers.
    pub async fn spawn(&mut self) {
        self.launch(&format!("server-{}.log", self.port));
        self.wait_ready().await;
    }

    /// Starts the process (`serve --dev`, stderr to `log_name` in the test
    /// dir) without waiting: for servers the kit's own client cannot reach.
    pub fn launch(&mut self, log_name: &str) {
        let log = std::fs::File::create(self.dir.path().join(log_name)).unwrap();
        let child = self
            .cmd()
            .args(["serve", "--dev"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pdvault");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let cert = self.keys_dir().join("tls-cert.pem");
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("pdvault exited early ({status}); log:\n{}", self.log());
                }
            }
            if cert.exists() && self.keys_dir().join("admin.token").exists() {
                let pem = std::fs::read(&cert).unwrap();
                self.client = client_trusting(&pem, None);
                let admin = std::fs::read_to_string(self.keys_dir().join("admin.token")).unwrap();
                let typed = pdvault::client::Client::builder(self.base())
                    .ca_pem(&pem)
                    .unwrap()
                    .token(admin.trim())
                    .build()
                    .unwrap();
                if typed.health().await.is_ok_and(|h| h["status"] == "ok") {
                    self.admin = admin;
                    self.typed = Some(typed);
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not become ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("server-{}.log", self.port))).unwrap_or_default()
    }

    /// SIGTERM and wait (graceful stop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_free_kill(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        purpose: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        self.call_with(method, path, token, purpose, &[], body).await
    }

    /// A call with extra request headers (request id, justification, If-Match...).
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: &str,
        purpose: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Resp {
        let mut rq = self.client.request(method, format!("{}{}", self.base(), path));
        if !token.is_empty() {
            rq = rq.bearer_auth(token);
        }
        if let Some(p) = purpose {
            rq = rq.header("X-Purpose", p);
        }
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        send(rq).await
    }

    pub async fn get(&self, path: &str, token: &str, purpose: Option<&str>) -> Resp {
        self.call(Method::GET, path, token, purpose, None).await
    }
    pub async fn post(&self, path: &str, token: &str, purpose: Option<&str>, body: Value) -> Resp {
        self.call(Method::POST, path, token, purpose, Some(body)).await
    }

    /// The typed client (`pdvault::client`), with the admin token.
    pub fn api(&self) -> &pdvault::client::Client {
        self.typed.as_ref().expect("the server is ready")
    }

    /// The typed client with another token.
    pub fn api_as(&self, token: &str) -> pdvault::client::Client {
        self.api().with_token(token)
    }

    /// Issues a token through the admin API; returns its text.
    pub async fn token(&self, caller: &str, purposes: &[&str], caps: &[&str]) -> String {
        self.token_with_id(caller, purposes, caps).await.0
    }

    /// Issues a token through the admin API (the typed client); returns its text and its id.
    pub async fn token_with_id(&self, caller: &str, purposes: &[&str], caps: &[&str]) -> (String, String) {
        let req = pdvault::client::IssueRequest {
            caller: caller.into(),
            purposes: purposes.iter().map(|p| p.to_string()).collect(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            ttl_seconds: 3600,
            cert_subject: None,
        };
        let t = self
            .api()
            .issue_token(&req)
            .await
            .unwrap_or_else(|e| panic!("token issue: {e}"));
        (t.token, t.id)
    }

    pub async fn issue(&self, caller: &str, purposes: &[&str], caps: &[&str], ttl: u64) -> Resp {
        let body = json!({"caller": caller, "purposes": purposes, "capabilities": caps, "ttl_seconds": ttl});
        self.post("/v1/admin/tokens", &self.admin, None, body).await
    }

    /// Revokes a token through the admin API.
    pub async fn revoke(&self, token_id: &str) -> Resp {
        self.call(
            Method::DELETE,
            &format!("/v1/admin/tokens/{token_id}"),
            &self.admin,
            None,
            None,
        )
        .await
    }

    /// Creates a subject under `order` (the typed client); returns its id.
    pub async fn create(&self, token: &str, fields: Value) -> String {
        let r = self.api_as(token).create("order", &fields).await;
        r.unwrap_or_else(|e| panic!("create: {e}")).id
    }

    /// What an operator does before a restore: the data directory moved to
    /// `to` beside it, and on the postgres backend the data database renamed
    /// the same way, an empty one made under its name. The server is stopped.
    pub fn move_data_away(&self, to: &str) {
        std::fs::rename(self.data_dir(), self.dir.path().join(to)).unwrap();
        if let Some(base) = postgres_base() {
            let url = &self.env.iter().find(|(k, _)| k == "PDVAULT_STORAGE__URL").unwrap().1;
            let db = url.rsplit('/').next().unwrap();
            let old = format!("{db}_{}", to.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            psql(&base, &format!("ALTER DATABASE {db} RENAME TO {old}"));
            psql(&base, &format!("CREATE DATABASE {db}"));
        }
    }

    /// The shred ledger's entries, wherever the backend keeps it: the
    /// keys directory's file (sled), the keys database (postgres).
    pub async fn shred_ledger(&self) -> Vec<Value> {
        let Some(url) = self
            .env
            .iter()
            .find(|(k, _)| k == "PDVAULT_STORAGE__KEYS_URL")
            .map(|(_, v)| v)
        else {
            let text = std::fs::read_to_string(self.keys_dir().join("shred.ledger")).unwrap_or_default();
            return text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        };
        // Space 15 is the shred ledger; its entries' keys start with `e`.
        json_rows(
            url,
            "SELECT v FROM pdvault_kv WHERE space = 15 AND get_byte(k, 0) = 101 ORDER BY k",
            &[],
        )
        .await
    }

    /// Every byte of the data and keys directories.
    pub fn all_bytes(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = vec![];
        for d in [self.data_dir(), self.keys_dir()] {
            walk(&d, &mut out);
        }
        out
    }
}

/// `PDVAULT_TEST_POSTGRES`: the base URL of a PostgreSQL cluster (made by
/// `scripts/pg-cluster`). When set, every server the kit starts runs on the
/// postgres backend, over TLS, with two fresh databases of its own.
pub fn postgres_base() -> Option<String> {
    std::env::var("PDVAULT_TEST_POSTGRES").ok().filter(|s| !s.is_empty())
}

/// Whether this run is on the postgres backend.
pub fn on_postgres() -> bool {
    postgres_base().is_some()
}

/// For a test that reads or alters the sled files themselves: true (and
/// says so) on the postgres backend, where `tests/postgres.rs` makes the
/// same checks on the database's files and dumps.
pub fn sled_only(test: &str) -> bool {
    if on_postgres() {
        eprintln!("{test}: reads the sled files; skipped on the postgres backend");
    }
    on_postgres()
}

/// For a test that reads or alters the audit log's files (`audit/audit.log`,
/// `checkpoints.jsonl`, `base.json`, `keys/audit.anchor`): true (and says
/// so) on the postgres backend, where the chains are rows of the data
/// database and `tests/postgres.rs` alters those instead.
pub fn audit_files_only(test: &str) -> bool {
    if on_postgres() {
        eprintln!("{test}: alters the audit log's files; on the postgres backend see tests/postgres.rs");
    }
    on_postgres()
}

impl Server {
    /// The audit trail as text, as its operator reads it: `audit/audit.log`
    /// read directly on sled (also while the server runs), `pdvault audit
    /// export` on postgres (every node's chain, each entry naming its node).
    pub fn audit_text(&self) -> String {
        if !on_postgres() {
            return std::fs::read_to_string(self.data_dir().join("audit").join("audit.log")).unwrap_or_default();
        }
        let out = self
            .cmd()
            .args(["audit", "export"])
            .output()
            .expect("run pdvault audit export");
        assert!(
            out.status.success(),
            "audit export: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Every audit entry of this server's store, in order (`audit_text`).
    pub fn audit_entries(&self) -> Vec<Value> {
        self.audit_text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }
}

impl Server {
    /// This server's signed audit checkpoints, oldest first:
    /// `audit/checkpoints.jsonl` on sled, its chain's checkpoint rows in the
    /// data database on postgres (space 17, keys `<node id>c<seq>`).
    pub async fn audit_checkpoints(&self) -> Vec<Value> {
        let Some((_, url)) = self.env.iter().find(|(k, _)| k == "PDVAULT_STORAGE__URL") else {
            return std::fs::read_to_string(self.data_dir().join("audit/checkpoints.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        };
        let node = std::fs::read_to_string(self.data_dir().join("node.id")).unwrap_or_default();
        json_rows(
            url,
            "SELECT v FROM pdvault_kv WHERE space = 17 AND substr(k, 1, 36) = convert_to($1, 'UTF8')
             AND get_byte(k, 36) = 99 ORDER BY k",
            &[&node.trim()],
        )
        .await
    }
}

/// The values of a query's rows, each a JSON document (`v` of `pdvault_kv`).
pub async fn json_rows(url: &str, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Vec<Value> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let rows = client.query(sql, params).await.unwrap();
    drop(client);
    let _ = conn.await;
    rows.iter()
        .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).unwrap())
        .collect()
}

/// Runs one SQL statement on the cluster's `postgres` database.
pub fn psql(base: &str, sql: &str) {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin/psql")).max())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let out = Command::new(bin)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", sql, &format!("{base}/postgres")])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes a data and a keys database; returns the settings that point a
/// server at them.
pub async fn postgres_databases(base: &str) -> Vec<(String, String)> {
    let (client, conn) = tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
        .await
        .expect("PDVAULT_TEST_POSTGRES: connect");
    let conn = tokio::spawn(conn);
    let name = format!("t{}", uuid::Uuid::new_v4().simple());
    for db in [name.clone(), format!("{name}_keys")] {
        client.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    }
    drop(client);
    let _ = conn.await;
    vec![
        ("PDVAULT_STORAGE__BACKEND".into(), "postgres".into()),
        ("PDVAULT_STORAGE__URL".into(), format!("{base}/{name}")),
        ("PDVAULT_STORAGE__KEYS_URL".into(), format!("{base}/{name}_keys")),
        ("PDVAULT_STORAGE__TLS".into(), "require".into()),
        ("PDVAULT_STORAGE__POOL_SIZE".into(), "8".into()),
    ]
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn walk(d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(d) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `hay` holds the personal value `value` as a value: where the
/// value starts or ends with a digit, a match inside a longer number or hex
/// string (a latency such as `0.8213050000000001`, a hash, a request id) is
/// chance, not a leak of a postal code or phone number.
pub fn holds_value(hay: &[u8], value: &str) -> bool {
    let v = value.as_bytes();
    let glued = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.');
    let (first_digit, last_digit) = (
        v.first().is_some_and(u8::is_ascii_digit),
        v.last().is_some_and(u8::is_ascii_digit),
    );
    hay.windows(v.len()).enumerate().any(|(i, w)| {
        w == v && !(first_digit && i > 0 && glued(hay.get(i - 1))) && !(last_digit && glued(hay.get(i + v.len())))
    })
}

/// Sends a signal with the `kill` command (no unsafe code in tests).
pub fn unsafe_free_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn client_trusting(pem: &[u8], identity: Option<reqwest::Identity>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap())
        .timeout(Duration::from_secs(60));
    if let Some(id) = identity {
        b = b.identity(id);
    }
    b.build().unwrap()
}

pub async fn send(rq: reqwest::RequestBuilder) -> Resp {
    let r = rq.send().await.expect("request");
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

/// A full subject with distinctive values.
pub fn full_subject() -> Value {
    json!({
        "surname": "Ivanova",
        "given_name": "Aigerim",
        "patronymic": "Serikovna",
        "phone": "8 701 555 01 77",
        "email": "aigerim.k@example.kz",
        "address": {"country": "KZ", "region": "Almaty Region", "city": "Almaty", "street": "Abai Ave", "building": "10", "apartment": "5", "postal_code": "050000"}
    })
}

/// Canonical JSON, written here independently of the crate: object keys
/// sorted by their UTF-8 bytes, no white space, serde_json's escaping of
/// strings and numbers.
pub fn canon(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut ks: Vec<&String> = m.keys().collect();
            ks.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in ks.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                canon(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canon(x, out);
            }
            out.push(']');
        }
        x => out.push_str(&serde_json::to_string(x).unwrap()),
    }
}

pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(pk) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    vk.verify_strict(msg, &sig).is_ok()
}

/// An erasure answer's signature checks out under the vault's public key.
pub async fn receipt_verifies(s: &Server, receipt: &Value, signature: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pk = s.get("/v1/receipts/public-key", "", None).await;
    let pk: [u8; 32] = b64
        .decode(pk.body["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let mut msg = String::new();
    canon(receipt, &mut msg);
    verify(&pk, msg.as_bytes(), &b64.decode(signature).unwrap())
}
