//! End-to-end load benchmark (issue #6): the real release binary, real TLS,
//! real disks. Run: `cargo bench --bench load`.
//!
//! The bench starts `pdvault serve --dev` on loopback with a fresh temporary
//! data and keys directory (config: a copy of `config/pdvault.toml`), loads
//! subjects through `:batchCreate`, and drives closed-loop HTTPS load from this
//! process with its own small client (hyper 1 HTTP/1.1 over tokio-rustls, one
//! keep-alive connection per worker, trusting the dev certificate):
//!
//! - `read_delivery`, `read_order_all`, `batch_get_100`, `create`,
//!   `batch_create_1000` at 16 and 64 connections;
//! - `baseline_tls`: the hidden `pdvault bench-baseline` command, the same
//!   rustls config and accept loop answering a fixed body of a read_delivery
//!   answer's size with no vault behind it;
//! - scale: `read_delivery_scale` at 64 connections with 10,000 and with
//!   `PDVAULT_LOAD_MAX_SUBJECTS` (default 1,000,000) subjects, the load timed
//!   and the disk bytes per subject measured;
//! - audit: `read_delivery_audit_unflushed` at 64 connections against a server
//!   whose config copy sets `[audit] fsync = false`;
//! - postgres: `postgres_1node_read_delivery` and `postgres_1node_create` at 16
//!   and 64 connections on a private cluster (`scripts/pg-cluster`, started and
//!   stopped here), then the same with two nodes on the same databases
//!   (`postgres_2node_*`, connections alternating between them), each reported
//!   as a ratio to the sled figures of the same run.
//!
//! Every result is one JSON line on standard output and in
//! `target/load-report.jsonl` (rewritten per run).
//!
//! Environment:
//! - `PDVAULT_LOAD_SECS` measured seconds per scenario (default 10);
//! - `PDVAULT_LOAD_QUICK=1` 2 s per scenario and small loads (CI smoke);
//! - `PDVAULT_LOAD_MAX_SUBJECTS` the largest scale point (default 1000000);
//! - `PDVAULT_LOAD_CLIENT_THREADS` client runtime threads (default: all CPUs);
//! - `PDVAULT_LOAD_SERVER_LOG` the servers' `PDVAULT_LOG` (default `warn`: the
//!   per-request info line is not written, for the vault and baseline alike);
//! - `PDVAULT_LOAD_POSTGRES=0` leaves the postgres backend out;
//! - `PDVAULT_LOAD_BIN` the server binary to start (default: this build's);
//! - `PDVAULT_LOAD_ONLY` a comma list of the parts to run (scenario names,
//!   `read_delivery_audit_unflushed`, `read_delivery_beside_batches`,
//!   `baseline_tls`, `scale`, `postgres`);
//!   unset runs everything. For a quick before/after of one path, e.g.
//!   `PDVAULT_LOAD_ONLY=create,baseline_tls`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

const BIN: &str = env!("CARGO_BIN_EXE_pdvault");

/// The server binary: this build's, or `PDVAULT_LOAD_BIN` (another build, to
/// compare two in one session: `benches/ab_load.py`).
fn bin() -> String {
    std::env::var("PDVAULT_LOAD_BIN").unwrap_or_else(|_| BIN.to_owned())
}
/// Subjects per `:batchCreate` request while loading, and connections loading.
const LOAD_BATCH: usize = 1000;
const LOAD_CONNS: usize = 8;
const CONNS: [usize; 2] = [16, 64];

type Res<T = ()> = Result<T, String>;

// ----- options and report ---------------------------------------------------------

struct Opts {
    secs: f64,
    warmup: f64,
    quick: bool,
    /// Subjects loaded before the main scenarios (and the audit comparison).
    main_subjects: usize,
    /// Scale points for `read_delivery_scale`.
    scale: Vec<usize>,
    server_log: String,
    /// `PDVAULT_LOAD_POSTGRES=0` leaves the postgres backend out.
    postgres: bool,
    /// `PDVAULT_LOAD_ONLY`: the parts to run; `None` runs all.
    only: Option<Vec<String>>,
}

impl Opts {
    fn from_env() -> Opts {
        let quick = std::env::var("PDVAULT_LOAD_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let secs = std::env::var("PDVAULT_LOAD_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(if quick { 2.0 } else { 10.0 });
        let max = std::env::var("PDVAULT_LOAD_MAX_SUBJECTS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(1_000_000);
        let mut scale = vec![10_000.min(max), max];
        scale.dedup();
        Opts {
            secs,
            warmup: (secs * 0.1).clamp(0.2, 1.0),
            quick,
            main_subjects: if quick { 2_000 } else { 10_000 }.min(max),
            scale,
            server_log: std::env::var("PDVAULT_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            postgres: std::env::var("PDVAULT_LOAD_POSTGRES").map_or(true, |v| v != "0"),
            only: std::env::var("PDVAULT_LOAD_ONLY")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect()),
        }
    }

    /// Whether the part named `part` is to run.
    fn runs(&self, part: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|p| p == part))
    }
}

struct Report {
    file: std::fs::File,
    path: PathBuf,
}

impl Report {
    fn create() -> Report {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        std::fs::create_dir_all(&target).expect("target dir");
        let path = target.join("load-report.jsonl");
        let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Report { file, path }
    }

    fn emit(&mut self, v: &Value) {
        let line = serde_json::to_string(v).expect("json");
        println!("{line}");
        let _ = std::io::stdout().flush();
        writeln!(self.file, "{line}").expect("write report");
        self.file.flush().expect("flush report");
    }
}

fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "mem_total_mib": mem_kib / 1024,
        "loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

// ----- the servers ----------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A pdvault process (vault or baseline) over a temp directory.
struct Server {
    /// Keeps the directory (data, keys, config, logs) alive; shared with the baseline.
    dir: Arc<tempfile::TempDir>,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    tls: TlsConnector,
    admin: String,
}

fn client_tls(cert_pem: &[u8]) -> Res<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert_pem) {
        roots
            .add(c.map_err(|e| format!("tls-cert.pem: {e}"))?)
            .map_err(|e| format!("tls-cert.pem: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(cfg)))
}

impl Server {
    /// `serve --dev` over a fresh directory; `edit` changes the config copy.
    async fn vault(opts: &Opts, edit: impl Fn(String) -> String) -> Res<Server> {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("pdvault-load-")
                .tempdir()
                .map_err(|e| e.to_string())?,
        );
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pdvault.toml"))
            .map_err(|e| format!("config/pdvault.toml: {e}"))?;
        let config = dir.path().join("pdvault.toml");
        std::fs::write(&config, edit(shipped)).map_err(|e| e.to_string())?;
        let port = free_port();
        let log = dir.path().join(format!("server-{port}.log"));
        let mut s = Server {
            dir,
            config,
            port,
            child: None,
            log,
            tls: client_tls(b"")?,
            admin: String::new(),
        };
        s.spawn(opts, &["serve", "--dev"])?;
        s.wait_ready("/v1/health").await?;
        s.admin = std::fs::read_to_string(s.keys_dir().join("admin.token")).map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// Another `serve --dev` beside `of`: the same config, a copy of its keys
    /// directory, its own data directory (a second node on a shared store).
    async fn node_beside(opts: &Opts, of: &Server) -> Res<Server> {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("pdvault-load-")
                .tempdir()
                .map_err(|e| e.to_string())?,
        );
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys).map_err(|e| e.to_string())?;
        for e in std::fs::read_dir(of.keys_dir()).map_err(|e| e.to_string())? {
            let e = e.map_err(|e| e.to_string())?;
            if e.file_type().map_err(|e| e.to_string())?.is_file() {
                std::fs::copy(e.path(), keys.join(e.file_name())).map_err(|e| e.to_string())?;
            }
        }
        let config = dir.path().join("pdvault.toml");
        std::fs::copy(&of.config, &config).map_err(|e| e.to_string())?;
        let port = free_port();
        let log = dir.path().join(format!("server-{port}.log"));
        let mut s = Server {
            dir,
            config,
            port,
            child: None,
            log,
            tls: client_tls(b"")?,
            admin: of.admin.clone(),
        };
        s.spawn(opts, &["serve", "--dev"])?;
        s.wait_ready("/v1/health").await?;
        Ok(s)
    }

    /// `bench-baseline` with the config and TLS material of `of` (which made them).
    async fn baseline(opts: &Opts, of: &Server, body_bytes: usize) -> Res<Server> {
        let port = free_port();
        let mut s = Server {
            dir: of.dir.clone(),
            config: of.config.clone(),
            port,
            child: None,
            log: of.dir.path().join(format!("baseline-{port}.log")),
            tls: of.tls.clone(),
            admin: String::new(),
        };
        s.spawn(opts, &["bench-baseline", "--body-bytes", &body_bytes.to_string()])?;
        s.wait_ready("/v1/subjects/ready").await?;
        Ok(s)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }
    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn spawn(&mut self, opts: &Opts, args: &[&str]) -> Res {
        let log = std::fs::File::create(&self.log).map_err(|e| e.to_string())?;
        let child = Command::new(bin())
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--keys-dir")
            .arg(self.keys_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(args)
            .env_remove("PDVAULT_PASSPHRASE")
            .env_remove("PDVAULT_TOKEN")
            .env("PDVAULT_LOG", &opts.server_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin()))?;
        self.child = Some(child);
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&mut self, probe: &str) -> Res {
        let deadline = Instant::now() + Duration::from_secs(180);
        let cert = self.keys_dir().join("tls-cert.pem");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("pdvault exited early ({status}); log:\n{}", self.log_text()));
            }
            if let Ok(pem) = std::fs::read(&cert) {
                if let Ok(tls) = client_tls(&pem) {
                    if let Ok(mut c) = connect(self.addr(), &tls).await {
                        let rq = Request::get(probe)
                            .header(HOST, "127.0.0.1")
                            .body(Full::new(Bytes::new()))
                            .expect("request");
                        if let Ok((StatusCode::OK, _)) = send(&mut c, rq).await {
                            self.tls = tls;
                            return Ok(());
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("server did not become ready; log:\n{}", self.log_text()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// VmHWM of the server process, in MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(round(kib / 1024.0, 1))
    }

    /// Resets VmHWM to the current RSS, so the next reading is this scenario's peak.
    fn reset_peak_rss(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }

    /// SIGTERM, then wait (kill after 60 s).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ----- the client -----------------------------------------------------------------

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, tls: &TlsConnector) -> Res<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(c: &mut Sender, rq: Request<Full<Bytes>>) -> Res<(StatusCode, Bytes)> {
    c.ready().await.map_err(|e| e.to_string())?;
    let resp = c.send_request(rq).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// What one scenario sends: method, path, purpose, body.
struct Call {
    method: Method,
    path: String,
    body: Bytes,
}

type MakeCall = Arc<dyn Fn(&mut StdRng) -> Call + Send + Sync>;

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// A second node: odd-numbered connections go there.
    also: Option<SocketAddr>,
    tls: TlsConnector,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    purpose: Option<HeaderValue>,
}

impl Target {
    fn new(s: &Server, token: Option<&str>, purpose: Option<&str>) -> Target {
        Target {
            addr: s.addr(),
            also: None,
            tls: s.tls.clone(),
            host: HeaderValue::from_str(&format!("127.0.0.1:{}", s.port)).expect("host"),
            auth: token.map(|t| HeaderValue::from_str(&format!("Bearer {}", t.trim())).expect("token")),
            purpose: purpose.map(|p| HeaderValue::from_str(p).expect("purpose")),
        }
    }

    fn request(&self, call: Call) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(call.method)
            .uri(call.path)
            .header(HOST, self.host.clone());
        if let Some(a) = &self.auth {
            b = b.header(AUTHORIZATION, a.clone());
        }
        if let Some(p) = &self.purpose {
            b = b.header("x-purpose", p.clone());
        }
        if !call.body.is_empty() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(call.body)).expect("request")
    }
}

/// How an answer is judged.
#[derive(Clone, Copy)]
struct Expect {
    status: StatusCode,
    /// A batch answer: every item must have succeeded.
    batch: bool,
    /// Items per successful request (subjects per second).
    items: u64,
}

fn batch_item_failed(body: &[u8]) -> bool {
    // Items are {"status":200|201,...} or {"status":4xx|5xx,"error":{...}}.
    body.windows(10).any(|w| w == b"\"status\":4" || w == b"\"status\":5")
}

#[derive(Default)]
struct WorkerOut {
    lat_us: Vec<u32>,
    ok: u64,
    /// Items of every successful request, in the window or not.
    items_all: u64,
    errors: u64,
    first_error: Option<String>,
}

struct Times {
    start: Instant,
    end: Instant,
}

struct Outcome {
    requests: u64,
    errors: u64,
    rps: f64,
    items_per_s: f64,
    items_all: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    first_error: Option<String>,
}

fn pct_ms(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(round(sorted[i] as f64 / 1000.0, 3))
}

/// Closed loop: `conns` keep-alive connections, each sending its next request
/// when the previous answer is in. Requests completing during the measured
/// window (after the warm-up) count.
async fn drive(target: &Target, make: MakeCall, expect: Expect, conns: usize, opts: &Opts) -> Outcome {
    let connected = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let go = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let times: Arc<OnceLock<Times>> = Arc::new(OnceLock::new());
    let mut handles = Vec::with_capacity(conns);
    for w in 0..conns {
        let (target, make, connected, go, times) = (
            target.clone(),
            make.clone(),
            connected.clone(),
            go.clone(),
            times.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut out = WorkerOut::default();
            let mut rng = StdRng::seed_from_u64(0x5eed_0000 + w as u64);
            let addr = match target.also {
                Some(b) if w % 2 == 1 => b,
                _ => target.addr,
            };
            let mut conn = connect(addr, &target.tls).await;
            connected.wait().await;
            go.wait().await;
            let t = times.get().expect("times set");
            loop {
                if Instant::now() >= t.end {
                    break;
                }
                let c = match &mut conn {
                    Ok(c) => c,
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("connect: {e}"));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        conn = connect(addr, &target.tls).await;
                        continue;
                    }
                };
                let rq = target.request(make(&mut rng));
                let sent = Instant::now();
                let r = send(c, rq).await;
                let done = Instant::now();
                let counted = done >= t.start && done <= t.end;
                match r {
                    Ok((status, body)) if status == expect.status && !(expect.batch && batch_item_failed(&body)) => {
                        out.items_all += expect.items;
                        if counted {
                            out.ok += 1;
                            out.lat_us.push((done - sent).as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Ok((status, body)) => {
                        if counted {
                            out.errors += 1;
                        }
                        out.first_error.get_or_insert_with(|| {
                            format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]))
                        });
                    }
                    Err(e) => {
                        if counted {
                            out.errors += 1;
                        }
                        out.first_error.get_or_insert_with(|| e.clone());
                        conn = connect(addr, &target.tls).await;
                    }
                }
            }
            out
        }));
    }
    connected.wait().await;
    let start = Instant::now() + Duration::from_secs_f64(opts.warmup);
    let _ = times.set(Times {
        start,
        end: start + Duration::from_secs_f64(opts.secs),
    });
    go.wait().await;
    let mut lat = Vec::new();
    let (mut ok, mut errors, mut items_all, mut first_error) = (0, 0, 0, None);
    for h in handles {
        let o = h.await.expect("worker");
        lat.extend_from_slice(&o.lat_us);
        ok += o.ok;
        items_all += o.items_all;
        errors += o.errors;
        first_error = first_error.or(o.first_error);
    }
    lat.sort_unstable();
    Outcome {
        requests: ok,
        errors,
        rps: round(ok as f64 / opts.secs, 1),
        items_per_s: round((ok * expect.items) as f64 / opts.secs, 1),
        items_all,
        p50: pct_ms(&lat, 0.50),
        p99: pct_ms(&lat, 0.99),
        p999: pct_ms(&lat, 0.999),
        first_error,
    }
}

// ----- subjects -------------------------------------------------------------------

const SURNAMES: &[&str] = &[
    "Ivanova",
    "Akhmetov",
    "Nurlanova",
    "Petrov",
    "Seitkali",
    "Omarova",
    "Kim",
    "Zhakupov",
];
const GIVEN: &[&str] = &[
    "Aigerim", "Daniyar", "Aruzhan", "Yerlan", "Madina", "Timur", "Dana", "Askar",
];
const PATRONYMIC: &[&str] = &["Serikovna", "Bolatuly", "Maratovna", "Nurlanovich", "Kairatovna"];
const CITIES: &[(&str, &str)] = &[
    ("Almaty Region", "Almaty"),
    ("Astana", "Astana"),
    ("Karaganda Region", "Karaganda"),
    ("Turkistan Region", "Shymkent"),
];
const STREETS: &[&str] = &["Abai Ave", "Tole Bi St", "Dostyk Ave", "Satpayev St", "Furmanov St"];

/// A full registration form (all six fields); `n` makes email and phone unique.
fn subject_json(n: u64, out: &mut String) {
    use std::fmt::Write as _;
    let pick = |list: &[&'static str], k: u64| list[(k % list.len() as u64) as usize];
    let (region, city) = CITIES[(n % CITIES.len() as u64) as usize];
    let _ = write!(
        out,
        concat!(
            r#"{{"surname":"{}","given_name":"{}","patronymic":"{}","phone":"+7701{:07}","#,
            r#""email":"user{}@example.kz","address":{{"country":"KZ","region":"{}","city":"{}","#,
            r#""street":"{}","building":"{}","apartment":"{}","postal_code":"0500{:02}"}}}}"#
        ),
        pick(SURNAMES, n),
        pick(GIVEN, n / 7),
        pick(PATRONYMIC, n / 3),
        n % 10_000_000,
        n,
        region,
        city,
        pick(STREETS, n / 11),
        1 + n % 200,
        1 + n % 150,
        n % 100,
    );
}

fn batch_create_body(first: u64, count: usize) -> Bytes {
    let mut s = String::with_capacity(count * 330 + 16);
    s.push_str(r#"{"subjects":["#);
    for i in 0..count {
        if i > 0 {
            s.push(',');
        }
        s.push_str(r#"{"fields":"#);
        subject_json(first + i as u64, &mut s);
        s.push('}');
    }
    s.push_str("]}");
    Bytes::from(s)
}

/// A vault under test, with the ids it holds.
struct Vault {
    server: Server,
    token: String,
    ids: Arc<Vec<String>>,
    /// Subjects created so far (the loads and the write scenarios).
    subjects: u64,
    /// Source of unique emails and phones.
    next: Arc<AtomicU64>,
}

impl Vault {
    async fn start(opts: &Opts, edit: impl Fn(String) -> String) -> Res<Vault> {
        let server = Server::vault(opts, edit).await?;
        let admin = Target::new(&server, Some(&server.admin), None);
        let mut c = connect(admin.addr, &admin.tls).await?;
        let body = json!({
            "caller": "load-bench", "purposes": ["order", "delivery"],
            "capabilities": ["read", "write"], "ttl_seconds": 86400,
        });
        let (status, body) = send(
            &mut c,
            admin.request(Call {
                method: Method::POST,
                path: "/v1/admin/tokens".into(),
                body: Bytes::from(body.to_string()),
            }),
        )
        .await?;
        if status != StatusCode::CREATED {
            return Err(format!("token issue: {status} {}", String::from_utf8_lossy(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let token = v["token"].as_str().ok_or("token issue: no token")?.to_owned();
        Ok(Vault {
            server,
            token,
            ids: Arc::new(Vec::new()),
            subjects: 0,
            next: Arc::new(AtomicU64::new(1)),
        })
    }

    fn target(&self, purpose: &str) -> Target {
        Target::new(&self.server, Some(&self.token), Some(purpose))
    }

    /// Times `POST /v1/admin/rotate-kek`: every live data key re-wrapped.
    async fn rotate(&self, report: &mut Report) -> Res {
        let admin = Target::new(&self.server, Some(&self.server.admin), None);
        let mut c = connect(admin.addr, &admin.tls).await?;
        let started = std::time::Instant::now();
        let (status, body) = send(
            &mut c,
            admin.request(Call {
                method: Method::POST,
                path: "/v1/admin/rotate-kek".into(),
                body: Bytes::new(),
            }),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if status != StatusCode::OK {
            return Err(format!("rotate-kek: {status} {}", String::from_utf8_lossy(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        report.emit(&json!({
            "phase": "rotate_kek", "subjects_loaded": self.subjects, "rewrapped": v["rewrapped"],
            "epoch": v["epoch"], "seconds": round(secs, 2),
            "subjects_per_s": round(v["rewrapped"].as_f64().unwrap_or(0.0) / secs.max(1e-9), 1),
        }));
        Ok(())
    }

    /// Brings the vault to `total` subjects with `:batchCreate` of 1000 over
    /// 8 connections; reports the load's rate.
    async fn load_to(&mut self, total: usize, report: &mut Report) -> Res {
        let want = total.saturating_sub(self.ids.len());
        if want == 0 {
            return Ok(());
        }
        let batches = want.div_ceil(LOAD_BATCH);
        let taken = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let target = self.target("order");
        self.server.reset_peak_rss();
        let started = Instant::now();
        let mut handles = vec![];
        for _ in 0..LOAD_CONNS.min(batches) {
            let (target, taken, errors, first_error, next) = (
                target.clone(),
                taken.clone(),
                errors.clone(),
                first_error.clone(),
                self.next.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                let mut conn = connect(target.addr, &target.tls).await;
                loop {
                    let b = taken.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        break;
                    }
                    let count = LOAD_BATCH.min(want - b * LOAD_BATCH);
                    let first = next.fetch_add(count as u64, Ordering::Relaxed);
                    let rq = target.request(Call {
                        method: Method::POST,
                        path: "/v1/subjects:batchCreate".into(),
                        body: batch_create_body(first, count),
                    });
                    let r = match &mut conn {
                        Ok(c) => send(c, rq).await,
                        Err(e) => Err(e.clone()),
                    };
                    let fail = |msg: String| {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(msg);
                    };
                    match r {
                        Ok((StatusCode::OK, body)) => {
                            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                            for item in v["results"].as_array().into_iter().flatten() {
                                match (item["status"].as_u64(), item["id"].as_str()) {
                                    (Some(201), Some(id)) => ids.push(id.to_owned()),
                                    _ => fail(item.to_string()),
                                }
                            }
                        }
                        Ok((status, body)) => fail(format!("{status}: {}", String::from_utf8_lossy(&body))),
                        Err(e) => {
                            fail(e);
                            conn = connect(target.addr, &target.tls).await;
                        }
                    }
                }
                ids
            }));
        }
        let ids = Arc::make_mut(&mut self.ids);
        let before = ids.len();
        for h in handles {
            ids.extend(h.await.map_err(|e| e.to_string())?);
        }
        let secs = started.elapsed().as_secs_f64();
        let created = (ids.len() - before) as u64;
        self.subjects += created;
        let errors = errors.load(Ordering::Relaxed);
        report.emit(&json!({
            "phase": "load",
            "connections": LOAD_CONNS,
            "batch": LOAD_BATCH,
            "subjects_created": created,
            "subjects_loaded": self.subjects,
            "duration_s": round(secs, 3),
            "subjects_per_s": round(created as f64 / secs, 1),
            "errors": errors,
            "server_peak_rss_mib": self.server.peak_rss_mib(),
        }));
        if let Some(e) = first_error.lock().unwrap().take() {
            eprintln!("load: first error: {e}");
        }
        if (created as usize) < want / 2 || ids.is_empty() {
            return Err(format!("load failed: {created} of {want} subjects created"));
        }
        Ok(())
    }

    /// Bytes of the data directory and keys/datakeys.
    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.server.data_dir()) + dir_bytes(&self.server.keys_dir().join("datakeys"))
    }

    /// Bytes of the data directory (with and without the audit log) and of
    /// keys/datakeys, per subject. The audit log and the access-log index grow
    /// with every request, not with subjects: `load_added_bytes_per_subject`
    /// (set by the caller) is what one load added per subject it created.
    fn disk(&self) -> Value {
        let data = dir_bytes(&self.server.data_dir());
        let audit = dir_bytes(&self.server.data_dir().join("audit"));
        let datakeys = dir_bytes(&self.server.keys_dir().join("datakeys"));
        let n = self.subjects.max(1) as f64;
        json!({
            "phase": "disk",
            "subjects_loaded": self.subjects,
            "data_dir_bytes": data,
            "audit_bytes": audit,
            "datakeys_bytes": datakeys,
            "bytes_per_subject": round((data + datakeys) as f64 / n, 1),
            "bytes_per_subject_without_audit": round((data - audit + datakeys) as f64 / n, 1),
        })
    }

    /// The size of a read_delivery answer body, averaged over a few subjects.
    async fn delivery_body_bytes(&self) -> Res<usize> {
        let t = self.target("delivery");
        let mut c = connect(t.addr, &t.tls).await?;
        let mut rng = StdRng::seed_from_u64(7);
        let mut total = 0;
        let n = 50;
        for _ in 0..n {
            let id = &self.ids[rng.gen_range(0..self.ids.len())];
            let (status, body) = send(&mut c, t.request(get_subject(id))).await?;
            if status != StatusCode::OK {
                return Err(format!(
                    "read_delivery probe: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            total += body.len();
        }
        Ok(total / n)
    }
}

fn dir_bytes(d: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(d) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn get_subject(id: &str) -> Call {
    Call {
        method: Method::GET,
        path: format!("/v1/subjects/{id}"),
        body: Bytes::new(),
    }
}

// ----- scenarios ------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    ReadDelivery,
    ReadOrderAll,
    BatchGet100,
    Create,
    BatchCreate1000,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::ReadDelivery => "read_delivery",
            Scenario::ReadOrderAll => "read_order_all",
            Scenario::BatchGet100 => "batch_get_100",
            Scenario::Create => "create",
            Scenario::BatchCreate1000 => "batch_create_1000",
        }
    }

    fn purpose(self) -> &'static str {
        match self {
            Scenario::ReadDelivery | Scenario::BatchGet100 => "delivery",
            _ => "order",
        }
    }

    fn plan(self, v: &Vault) -> (MakeCall, Expect) {
        let ids = v.ids.clone();
        let next = v.next.clone();
        let expect = |status, batch, items| Expect { status, batch, items };
        match self {
            Scenario::ReadDelivery | Scenario::ReadOrderAll => (
                Arc::new(move |rng: &mut StdRng| get_subject(&ids[rng.gen_range(0..ids.len())])),
                expect(StatusCode::OK, false, 1),
            ),
            Scenario::BatchGet100 => (
                Arc::new(move |rng: &mut StdRng| {
                    let pick: Vec<&str> = (0..100).map(|_| ids[rng.gen_range(0..ids.len())].as_str()).collect();
                    Call {
                        method: Method::POST,
                        path: "/v1/subjects:batchGet".into(),
                        body: Bytes::from(json!({ "ids": pick }).to_string()),
                    }
                }),
                expect(StatusCode::OK, true, 100),
            ),
            Scenario::Create => (
                Arc::new(move |_: &mut StdRng| {
                    let mut s = String::from(r#"{"fields":"#);
                    subject_json(next.fetch_add(1, Ordering::Relaxed), &mut s);
                    s.push('}');
                    Call {
                        method: Method::POST,
                        path: "/v1/subjects".into(),
                        body: Bytes::from(s),
                    }
                }),
                expect(StatusCode::CREATED, false, 1),
            ),
            Scenario::BatchCreate1000 => (
                Arc::new(move |_: &mut StdRng| Call {
                    method: Method::POST,
                    path: "/v1/subjects:batchCreate".into(),
                    body: batch_create_body(next.fetch_add(1000, Ordering::Relaxed), 1000),
                }),
                expect(StatusCode::OK, true, 1000),
            ),
        }
    }
}

/// A scenario's report line: its rate, latency and errors.
fn outcome_line(name: &str, conns: usize, subjects_loaded: u64, o: &Outcome, server: &Server, opts: &Opts) -> Value {
    json!({
        "scenario": name,
        "connections": conns,
        "subjects_loaded": subjects_loaded,
        "duration_s": opts.secs,
        "requests": o.requests,
        "rps": o.rps,
        "p50_ms": o.p50,
        "p99_ms": o.p99,
        "p999_ms": o.p999,
        "errors": o.errors,
        "server_peak_rss_mib": server.peak_rss_mib(),
    })
}

/// Runs one scenario and reports its line; returns the requests per second.
#[allow(clippy::too_many_arguments)]
async fn run_scenario(
    name: &str,
    server: &Server,
    target: &Target,
    plan: (MakeCall, Expect),
    conns: usize,
    subjects_loaded: u64,
    opts: &Opts,
    report: &mut Report,
) -> Outcome {
    let (make, expect) = plan;
    server.reset_peak_rss();
    let o = drive(target, make, expect, conns, opts).await;
    let mut line = outcome_line(name, conns, subjects_loaded, &o, server, opts);
    if expect.items > 1 {
        line["items_per_s"] = json!(o.items_per_s);
    }
    if expect.items == 1000 {
        line["subjects_per_s"] = json!(o.items_per_s);
    }
    report.emit(&line);
    if let Some(e) = &o.first_error {
        eprintln!("{name}/{conns}: first error: {e}");
    }
    o
}

async fn vault_scenario(v: &mut Vault, s: Scenario, conns: usize, opts: &Opts, report: &mut Report) -> Outcome {
    let target = v.target(s.purpose());
    let o = run_scenario(s.name(), &v.server, &target, s.plan(v), conns, v.subjects, opts, report).await;
    if matches!(s, Scenario::Create | Scenario::BatchCreate1000) {
        // Writes in the warm-up and the drain created subjects too.
        v.subjects += o.items_all;
    }
    o
}

/// `a / b`, or nothing when either was not measured (a part left out by
/// `PDVAULT_LOAD_ONLY`).
fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| round(a / b, 3))
}

/// `read_delivery` at 64 connections against a vault whose config copy sets
/// `[audit] fsync = false`, run right after the flushed measurement.
async fn audit_unflushed(opts: &Opts, flushed_rps: f64, report: &mut Report) -> Res {
    let mut u = Vault::start(opts, |c| {
        if c.contains("fsync = true") {
            c.replacen("fsync = true", "fsync = false", 1)
        } else {
            c.replacen("[audit]\n", "[audit]\nfsync = false\n", 1)
        }
    })
    .await?;
    if !u.server.log_text().contains("benchmark-only") {
        return Err("the fsync = false server did not warn: is the config key applied?".into());
    }
    u.load_to(opts.main_subjects, report).await?;
    let (target, plan) = (u.target("delivery"), Scenario::ReadDelivery.plan(&u));
    let name = "read_delivery_audit_unflushed";
    let o = run_scenario(name, &u.server, &target, plan, 64, u.subjects, opts, report).await;
    u.server.stop();
    report.emit(&json!({
        "audit_ratio_read_delivery_flushed_over_unflushed": ratio(flushed_rps, o.rps),
        "connections": 64,
        "flushed_rps": flushed_rps,
        "unflushed_rps": o.rps,
    }));
    Ok(())
}

/// `read_delivery` at 16 connections while one more connection sends
/// `batch_create_1000` back to back, as an import beside the day's reads:
/// what the reads' latency shows of each batch's unit being applied (the
/// engine holds its readers while it applies a unit). Compare with
/// `read_delivery` at 16 connections alone, run earlier on the same vault.
async fn reads_beside_batches(v: &mut Vault, alone: f64, opts: &Opts, report: &mut Report) {
    let (reads, batches) = (v.target("delivery"), v.target("order"));
    let ((rmake, rexpect), (bmake, bexpect)) = (Scenario::ReadDelivery.plan(v), Scenario::BatchCreate1000.plan(v));
    v.server.reset_peak_rss();
    let (r, b) = tokio::join!(
        drive(&reads, rmake, rexpect, 16, opts),
        drive(&batches, bmake, bexpect, 1, opts)
    );
    v.subjects += b.items_all;
    let mut line = outcome_line("read_delivery_beside_batches", 16, v.subjects, &r, &v.server, opts);
    line["errors"] = json!(r.errors + b.errors);
    line["batch_connections"] = json!(1);
    line["batch_subjects_per_s"] = json!(b.items_per_s);
    line["rps_ratio_to_alone"] = json!(ratio(r.rps, alone));
    report.emit(&line);
    if let Some(e) = r.first_error.or(b.first_error) {
        eprintln!("read_delivery_beside_batches: first error: {e}");
    }
}

async fn run(opts: Opts) -> Res {
    let mut report = Report::create();
    eprintln!("load bench: results also in {}", report.path.display());
    report.emit(&json!({
        "machine": machine(),
        "binary": bin(),
        "command": "cargo bench --bench load",
        "quick": opts.quick,
        "duration_s_per_scenario": opts.secs,
        "warmup_s": opts.warmup,
        "main_subjects": opts.main_subjects,
        "scale_points": opts.scale,
        "server_log": opts.server_log,
        "only": opts.only,
        "started_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }));

    // 1. The main scenarios against a vault with `main_subjects` subjects; the
    //    audit comparison right after the (flushed) read_delivery.
    let mut v = Vault::start(&opts, |c| c).await?;
    v.load_to(opts.main_subjects, &mut report).await?;
    let body_bytes = v.delivery_body_bytes().await?;
    let (mut delivery, mut create) = ([0.0; 2], [0.0; 2]);
    for s in [
        Scenario::ReadDelivery,
        Scenario::ReadOrderAll,
        Scenario::BatchGet100,
        Scenario::Create,
        Scenario::BatchCreate1000,
    ] {
        let conns_run = if opts.runs(s.name()) { &CONNS[..] } else { &[] };
        for (i, &conns) in conns_run.iter().enumerate() {
            let o = vault_scenario(&mut v, s, conns, &opts, &mut report).await;
            match s {
                Scenario::ReadDelivery => delivery[i] = o.rps,
                Scenario::Create => create[i] = o.rps,
                _ => {}
            }
        }
        if s == Scenario::ReadDelivery && opts.runs("read_delivery_audit_unflushed") {
            audit_unflushed(&opts, delivery[1], &mut report).await?;
        }
    }
    // Last, since its batches add subjects to this vault.
    if opts.runs("read_delivery_beside_batches") {
        reads_beside_batches(&mut v, delivery[0], &opts, &mut report).await;
    }
    v.server.stop();

    // 2. The baseline: same TLS stack and accept loop, fixed body of the same size.
    let mut base = [0.0; 2];
    if opts.runs("baseline_tls") {
        let mut b = Server::baseline(&opts, &v.server, body_bytes).await?;
        report.emit(&json!({"baseline_tls_body_bytes": body_bytes, "same_as": "mean read_delivery answer body"}));
        let target = Target::new(&b, None, None);
        for (i, conns) in CONNS.into_iter().enumerate() {
            let make: MakeCall = Arc::new(|rng: &mut StdRng| get_subject(&format!("{:032x}", rng.gen::<u128>())));
            let expect = Expect {
                status: StatusCode::OK,
                batch: false,
                items: 1,
            };
            let o = run_scenario(
                "baseline_tls",
                &b,
                &target,
                (make, expect),
                conns,
                0,
                &opts,
                &mut report,
            )
            .await;
            base[i] = o.rps;
        }
        b.stop();
    }
    drop(v);

    // 3. Scale: read_delivery with 10,000 and with PDVAULT_LOAD_MAX_SUBJECTS loaded.
    if opts.runs("scale") {
        let mut s = Vault::start(&opts, |c| c).await?;
        for &n in &opts.scale {
            let before = s.disk_bytes();
            let created_before = s.subjects;
            s.load_to(n, &mut report).await?;
            let mut disk = s.disk();
            let added = s.subjects - created_before;
            disk["load_added_bytes_per_subject"] = json!(round(
                (s.disk_bytes() - before.min(s.disk_bytes())) as f64 / added.max(1) as f64,
                1
            ));
            report.emit(&disk);
            let target = s.target("delivery");
            let plan = Scenario::ReadDelivery.plan(&s);
            run_scenario(
                "read_delivery_scale",
                &s.server,
                &target,
                plan,
                64,
                s.subjects,
                &opts,
                &mut report,
            )
            .await;
            s.rotate(&mut report).await?;
        }
        s.server.stop();
    }

    report.emit(&json!({
        "ratio_read_delivery_over_baseline_tls_64": ratio(delivery[1], base[1]),
        "ratio_read_delivery_over_baseline_tls_16": ratio(delivery[0], base[0]),
    }));

    // 4. The postgres backend, one node then two, against the sled figures of 1.
    if opts.postgres && opts.runs("postgres") {
        postgres_section(&opts, (&delivery, &create), &mut report).await?;
    }
    Ok(())
}

/// A private cluster (`scripts/pg-cluster`), stopped when dropped.
struct Cluster {
    dir: PathBuf,
    base: String,
}

impl Cluster {
    fn start() -> Res<Cluster> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/pg-bench");
        let out = Command::new(root.join("scripts/pg-cluster"))
            .arg("start")
            .arg(&dir)
            .output()
            .map_err(|e| format!("scripts/pg-cluster: {e}"))?;
        if !out.status.success() {
            return Err(format!("scripts/pg-cluster: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let base = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Cluster { dir, base })
    }

    /// Two fresh databases; the config edit that points a vault at them.
    async fn databases(&self, n: usize) -> Res<impl Fn(String) -> String> {
        let (client, conn) = tokio_postgres::connect(&format!("{}/postgres", self.base), tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let name = format!("bench{n}_{}", std::process::id());
        // One statement per call: several in one string run in one implicit
        // transaction, where CREATE DATABASE is refused.
        for db in [name.clone(), format!("{name}_keys")] {
            for sql in [format!("DROP DATABASE IF EXISTS {db}"), format!("CREATE DATABASE {db}")] {
                client.batch_execute(&sql).await.map_err(|e| format!("{sql}: {e:?}"))?;
            }
        }
        drop(client);
        let _ = conn.await;
        let section = format!(
            "backend = \"postgres\"\nurl = \"{b}/{name}\"\nkeys_url = \"{b}/{name}_keys\"\ntls = \"require\"\npool_size = 32\n",
            b = self.base
        );
        Ok(move |c: String| c.replacen("backend = \"sled\"", &section, 1))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(root.join("scripts/pg-cluster"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

async fn postgres_section(opts: &Opts, sled: (&[f64; 2], &[f64; 2]), report: &mut Report) -> Res {
    let cluster = Cluster::start()?;
    report
        .emit(&json!({"postgres": "private cluster from scripts/pg-cluster, TLS (require), synchronous_commit = on"}));
    for nodes in [1, 2] {
        let mut v = Vault::start(opts, cluster.databases(nodes).await?).await?;
        let second = match nodes {
            2 => Some(Server::node_beside(opts, &v.server).await?),
            _ => None,
        };
        v.load_to(opts.main_subjects, report).await?;
        let mut got = [[0.0; 2]; 2];
        for (j, s) in [Scenario::ReadDelivery, Scenario::Create].into_iter().enumerate() {
            for (i, conns) in CONNS.into_iter().enumerate() {
                let mut target = v.target(s.purpose());
                target.also = second.as_ref().map(|b| b.addr());
                let name = format!("postgres_{nodes}node_{}", s.name());
                let o = run_scenario(&name, &v.server, &target, s.plan(&v), conns, v.subjects, opts, report).await;
                if s == Scenario::Create {
                    v.subjects += o.items_all;
                }
                got[j][i] = o.rps;
            }
        }
        report.emit(&json!({
            "backend": "postgres",
            "nodes": nodes,
            "ratio_read_delivery_over_sled_16": ratio(got[0][0], sled.0[0]),
            "ratio_read_delivery_over_sled_64": ratio(got[0][1], sled.0[1]),
            "ratio_create_over_sled_16": ratio(got[1][0], sled.1[0]),
            "ratio_create_over_sled_64": ratio(got[1][1], sled.1[1]),
        }));
        if let Some(mut b) = second {
            b.stop();
        }
        v.server.stop();
    }
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench` (and maybe a filter): there is one run, whatever they say.
    let opts = Opts::from_env();
    let threads = std::env::var("PDVAULT_LOAD_CLIENT_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(opts)) {
        eprintln!("load bench failed: {e}");
        std::process::exit(1);
    }
}
