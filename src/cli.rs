//! The command line: `pdvault` is both the server and its operator's client.
//!
//! Owns argument parsing, passphrase and token discovery, and the choice
//! between talking to a running server (HTTPS, with the admin token) and
//! opening the data directory directly when no server runs. Every command
//! ends in the same `Vault` core.

use crate::client::{self, Client};
use crate::config::{parse_duration, Config, Overrides};
use crate::devkeys::{self, ADMIN_TOKEN, DEV_PASSPHRASE};
use crate::fsutil::read_secret_file;
use crate::http::{self, AppState};
use crate::keyring::{KdfParams, Keyring};
use crate::progress::{Progress, Unit};
use crate::ratelimit::RateLimiter;
use crate::tokens::{TokenList, TokenRecord};
use crate::vault::{Ctx, IssueRequest, Vault};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

#[derive(Parser, Debug)]
#[command(
    name = "pdvault",
    version,
    about = "Encrypted personal-data vault: purpose-bound release, crypto-shredding"
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// Configuration file.
    #[arg(long, global = true, default_value = "config/pdvault.toml")]
    config: PathBuf,
    /// Listen address (overrides server.listen).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Data directory (overrides storage.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Keys directory (overrides keys.dir; default keys/).
    #[arg(long, global = true)]
    keys_dir: Option<PathBuf>,
    /// File holding the passphrase (else PDVAULT_PASSPHRASE; in dev, keys/dev-passphrase).
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the sealed master key, the receipt key and the first admin token (printed once).
    Init,
    /// Run the HTTPS server.
    Serve {
        /// Create missing dev material under the keys directory first.
        #[arg(long)]
        dev: bool,
    },
    /// Issue, list or revoke tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Crypto-shred a subject; prints the signed receipt.
    Shred { id: String },
    /// Events to subscribers: list what is undelivered, send a dead one again.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Audit log: verify the hash chain, or export JSON lines.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// New key epoch; every live data key re-wrapped.
    RotateKek,
    /// The passphrase that unseals the keys directory.
    #[command(subcommand)]
    Passphrase(PassphraseCmd),
    /// Write a consistent backup of the data (through the running server).
    Backup { file: PathBuf },
    /// Restore a backup into an empty data directory (offline); replays the shred ledger.
    Restore { file: PathBuf },
    /// Create or migrate the database schema (postgres backend) without serving.
    Migrate,
    /// The configuration in effect.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Sealed or serving, key epoch and next rotation, audit head and last
    /// checkpoint, subjects, tokens and pending events (JSON).
    Status,
    /// Load-benchmark baseline (`cargo bench --bench load`): the same TLS stack and
    /// accept loop answering `GET /v1/subjects/{id}` with a fixed JSON body; no
    /// token check, storage, crypto or audit. Needs an existing TLS cert and key.
    #[command(hide = true)]
    BenchBaseline {
        /// Size of the fixed JSON body in bytes.
        #[arg(long, default_value_t = 220)]
        body_bytes: usize,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Prints the new token alone on standard output.
    Issue {
        #[arg(long)]
        caller: String,
        #[arg(long = "purpose")]
        purposes: Vec<String>,
        #[arg(long = "cap")]
        caps: Vec<String>,
        /// Lifetime: 30s, 10m, 24h, 30d.
        #[arg(long)]
        ttl: String,
        /// Bind the token to a client-certificate subject (mTLS).
        #[arg(long)]
        cert_subject: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum PassphraseCmd {
    /// Re-seal the keys under a new passphrase (offline: the server must be
    /// stopped). The current one comes as usual (`--passphrase-file`,
    /// `PDVAULT_PASSPHRASE`); the new one from `--new-passphrase-file` or
    /// `PDVAULT_NEW_PASSPHRASE`.
    Change {
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the effective configuration (defaults, file, environment, flags) as TOML, secrets redacted.
    Show,
}

#[derive(Subcommand, Debug)]
enum EventsCmd {
    /// Undelivered events, oldest first, with each subscriber's delivery state.
    List {
        /// Only deliveries still being tried.
        #[arg(long, conflicts_with = "dead")]
        pending: bool,
        /// Only deliveries given up on (undelivered past events.dead_after).
        #[arg(long)]
        dead: bool,
    },
    /// Send an event's dead deliveries again (ID as `events list` shows it).
    Retry { id: String },
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check the whole chain; names the first broken entry.
    Verify,
    /// JSON lines on standard output.
    Export {
        /// RFC 3339 time, a date (2026-11-01), or an age (30d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// Only entries naming this field (e.g. address).
        #[arg(long)]
        field: Option<String>,
        /// Only releases: allowed reads, batch reads and lookups.
        #[arg(long)]
        released: bool,
        /// Only entries made with this token (its id, as `token list` shows it).
        #[arg(long)]
        token: Option<String>,
        /// Only entries made by this caller.
        #[arg(long)]
        caller: Option<String>,
        /// Only entries before this time (RFC 3339, a date, or an age).
        #[arg(long)]
        until: Option<String>,
    },
    /// The breach question: which subjects and fields a token or caller received.
    Impact {
        /// The token's id.
        #[arg(long, required_unless_present = "caller", conflicts_with = "caller")]
        token: Option<String>,
        /// The caller's name (all its tokens and grants).
        #[arg(long)]
        caller: Option<String>,
        /// RFC 3339 time, a date (2026-11-01), or an age (30d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// `json`, or `table` (a short summary); default: table on a terminal, else JSON.
        #[arg(long)]
        format: Option<String>,
    },
}

type CliResult<T = ()> = Result<T, String>;

pub fn main() -> std::process::ExitCode {
    std::panic::set_hook(Box::new(|info| {
        // The payload is not printed: it could hold anything.
        let loc = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("pdvault: internal error (panic at {loc})");
    }));
    let cli = Cli::parse();
    crate::fsutil::private_umask();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("pdvault: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn overrides(g: &Global) -> Overrides {
    Overrides {
        listen: g.listen.clone(),
        data_dir: g.data_dir.clone(),
        keys_dir: g.keys_dir.clone(),
    }
}

fn load_config(g: &Global) -> CliResult<Config> {
    Config::load(&g.config, &overrides(g)).map_err(|e| e.to_string())
}

/// The passphrase: `--passphrase-file`, else `PDVAULT_PASSPHRASE`, else (dev)
/// `keys/dev-passphrase`. Never a command-line argument.
fn passphrase(g: &Global, keys_dir: &Path) -> CliResult<Option<Zeroizing<String>>> {
    if let Some(f) = &g.passphrase_file {
        return read_secret_file(f)
            .map(Some)
            .map_err(|e| format!("passphrase file {}: {e}", f.display()));
    }
    if let Ok(p) = std::env::var("PDVAULT_PASSPHRASE") {
        return Ok(Some(Zeroizing::new(p)));
    }
    let dev = keys_dir.join(DEV_PASSPHRASE);
    if dev.exists() {
        return read_secret_file(&dev)
            .map(Some)
            .map_err(|e| format!("{}: {e}", dev.display()));
    }
    Ok(None)
}

fn need_passphrase(g: &Global, keys_dir: &Path) -> CliResult<Zeroizing<String>> {
    passphrase(g, keys_dir)?
        .ok_or_else(|| "no passphrase: set PDVAULT_PASSPHRASE or pass --passphrase-file".to_string())
}

fn kdf(cfg: &Config) -> KdfParams {
    KdfParams {
        m_kib: cfg.keys.argon2_m_kib,
        t: cfg.keys.argon2_t,
        p: cfg.keys.argon2_p,
    }
}

/// Log lines go to standard error, at `PDVAULT_LOG`'s level (default
/// `info`), as text or, with `[log] format = "json"`, one JSON object each.
fn init_logging(log: &crate::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PDVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log.format {
        crate::config::LogFormat::Text => fmt.init(),
        crate::config::LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

async fn run(cli: Cli) -> CliResult {
    let g = cli.global;
    if let Command::Config(ConfigCmd::Show) = cli.cmd {
        print!(
            "{}",
            Config::show(&g.config, &overrides(&g)).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let cfg = load_config(&g)?;
    init_logging(&cfg.log);
    match cli.cmd {
        Command::Init => init(&g, cfg),
        Command::Serve { dev } => serve(&g, cfg, dev).await,
        Command::Token(t) => token(&g, cfg, t).await,
        Command::Shred { id } => shred(&g, cfg, &id).await,
        Command::Events(e) => events(&g, cfg, e).await,
        Command::RotateKek => rotate(&g, cfg).await,
        Command::Passphrase(PassphraseCmd::Change { new_passphrase_file }) => {
            change_passphrase(&g, cfg, new_passphrase_file.as_deref()).await
        }
        Command::Audit(a) => audit(cfg, a),
        Command::Backup { file } => backup(cfg, &file).await,
        Command::Restore { file } => restore(cfg, &file),
        Command::Migrate => {
            check_owner(&cfg)?;
            println!("{}", crate::storage::migrate(&cfg).map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::BenchBaseline { body_bytes } => bench_baseline(cfg, body_bytes).await,
        Command::Status => status(&g, cfg).await,
        Command::Config(ConfigCmd::Show) => unreachable!("answered before the config is resolved"),
    }
}

fn init(g: &Global, cfg: Config) -> CliResult {
    check_owner(&cfg)?;
    let pass = need_passphrase(g, &cfg.keys.dir)?;
    let keyring = Keyring::create(&cfg.keys.dir, pass.as_bytes(), kdf(&cfg)).map_err(|e| e.to_string())?;
    let vault = Vault::open_with(cfg, keyring)?;
    let token = vault.issue_first_admin().map_err(|e| e.to_string())?;
    println!("{}", token.expose());
    eprintln!("pdvault: keys created; the admin token above is shown once");
    Ok(())
}

/// `pdvault passphrase change`: offline, because a running server keeps the
/// old sealing in memory and would write it back on its next rotation. The
/// data directory stays open (its lock held) while the keys are re-sealed,
/// so no server can start meanwhile. On PostgreSQL it changes this node's
/// passphrase only; the other nodes serve on (the epochs in the keys
/// database are sealed under the root secret's key from the first change).
async fn change_passphrase(g: &Global, cfg: Config, new_file: Option<&Path>) -> CliResult {
    if remote(&cfg).await?.is_some() {
        return Err(format!(
            "a server answers at {}: stop it first (the passphrase is changed offline)",
            server_addr(&cfg)?.0
        ));
    }
    let new =
        match new_file {
            Some(f) => read_secret_file(f).map_err(|e| format!("new passphrase file {}: {e}", f.display()))?,
            None => Zeroizing::new(std::env::var("PDVAULT_NEW_PASSPHRASE").map_err(|_| {
                "no new passphrase: pass --new-passphrase-file or set PDVAULT_NEW_PASSPHRASE".to_string()
            })?),
        };
    if new.trim().len() < 12 {
        return Err("the new passphrase is shorter than 12 characters".into());
    }
    let dir = cfg.keys.dir.clone();
    let held = local(g, cfg.clone())?;
    let mut keys = open_keys(g, &cfg, false)?;
    if let Some(home) = held.shared_epochs() {
        keys.share_epochs(home).map_err(|e| e.to_string())?;
    }
    keys.change_passphrase(new.as_bytes()).map_err(|e| e.to_string())?;
    // Dev keys keep their passphrase beside them: it follows the change.
    let dev = dir.join(DEV_PASSPHRASE);
    if dev.exists() {
        crate::fsutil::write_atomic(&dev, new.as_bytes()).map_err(|e| format!("{}: {e}", dev.display()))?;
    }
    drop(held);
    eprintln!(
        "pdvault: the keys in {} are sealed under the new passphrase; the old one opens them no more",
        dir.display()
    );
    Ok(())
}

/// Refuses to act on the directories as root when they belong to another
/// user (the service's): files made here (the store's log, sled's files,
/// re-sealed keys) would be root's, and the service could not open them at
/// its next start. Called before any command opens the directories itself.
fn check_owner(cfg: &Config) -> CliResult {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    for dir in [&cfg.keys.dir, &cfg.data_dir] {
        let Ok(uid) = std::fs::metadata(dir).map(|m| m.uid()) else {
            continue;
        };
        if uid != 0 {
            return Err(format!(
                "{} belongs to uid {uid}, and this command runs as root: files it made there would be root's, \
                 and the service could not open them. Run it as that user (for example `sudo -u '#{uid}' pdvault ...`)",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Opens the keys (creating dev material first when asked). A wrong
/// passphrase ends here, before any file is touched.
fn open_keys(g: &Global, cfg: &Config, dev: bool) -> CliResult<Keyring> {
    check_owner(cfg)?;
    let dir = &cfg.keys.dir;
    if Keyring::exists(dir) {
        let pass = need_passphrase(g, dir)?;
        return Keyring::open(dir, pass.as_bytes()).map_err(|e| e.to_string());
    }
    if !dev {
        return Err(format!(
            "no keys in {}: run `pdvault init` (or `pdvault serve --dev`)",
            dir.display()
        ));
    }
    crate::fsutil::create_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pass = match passphrase(g, dir)? {
        Some(p) => p,
        None => Zeroizing::new(devkeys::random_passphrase()),
    };
    let dev_file = dir.join(DEV_PASSPHRASE);
    if !dev_file.exists() {
        devkeys::write_secret(&dev_file, &pass).map_err(|e| format!("{}: {e}", dev_file.display()))?;
    }
    tracing::info!(dir = %dir.display(), "dev: created the sealed master key and the receipt key");
    Keyring::create(dir, pass.as_bytes(), kdf(cfg)).map_err(|e| e.to_string())
}

async fn serve(g: &Global, cfg: Config, dev: bool) -> CliResult {
    if let Err(e) = crate::fsutil::forbid_core_dumps() {
        tracing::warn!(error = %e, "could not turn core dumps off");
    }
    let keyring = open_keys(g, &cfg, dev)?;
    if dev && devkeys::ensure_tls(&cfg.tls_cert_path(), &cfg.tls_key_path())? {
        tracing::info!(cert = %cfg.tls_cert_path().display(), "dev: created a self-signed certificate for localhost and 127.0.0.1");
    }
    let tls = http::server::tls_config(&cfg)?;
    // Every subscriber's secret and trust anchors are read before anything
    // else is opened: a missing one stops the start, naming it.
    let subscribers = crate::events::sender::load(&cfg.events)?;
    let vault = Arc::new(Vault::open_with(cfg.clone(), keyring)?);
    if dev {
        let path = cfg.keys.dir.join(ADMIN_TOKEN);
        if path.exists() {
            let text = read_secret_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if vault.ensure_dev_admin(&text).map_err(|e| e.to_string())? {
                tracing::info!(file = %path.display(), "dev: registered the admin token with this data directory");
            }
        } else {
            let t = vault.issue_first_admin().map_err(|e| e.to_string())?;
            devkeys::write_secret(&path, t.expose()).map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(file = %path.display(), "dev: wrote the first admin token");
        }
    }
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.server.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // The recovered head is signed before anything is served.
    vault.audit_checkpoint().map_err(|e| format!("audit checkpoint: {e}"))?;
    let tick = crate::scheduler::TICK
        .min(cfg.retention.sweep_every)
        .min(cfg.keys.rotate_every)
        .min(cfg.audit.checkpoint_every)
        .max(std::time::Duration::from_secs(1));
    if vault.on_shared_store() {
        // Announced before the first answer: a rotation on another node
        // started from now on sees this one (and its epochs are taken up).
        vault.heartbeat().await.map_err(|e| e.to_string())?;
    }
    let heartbeat = crate::scheduler::spawn_heartbeat(vault.clone());
    let sched = crate::scheduler::spawn(vault.clone(), tick);
    let senders = crate::events::sender::spawn(vault.clone(), subscribers);
    let state = Arc::new(AppState {
        vault: vault.clone(),
        limiter: RateLimiter::new(cfg.limits.clone()),
    });
    let app = http::router(state);
    tracing::info!("pdvault listening on https://{addr}");
    if cfg.log.format == crate::config::LogFormat::Text {
        eprintln!("pdvault: listening on https://{addr}");
    }
    http::server::serve(listener, tls, app, &cfg, http::server::shutdown_signal()).await;
    sched.abort();
    if let Some(h) = heartbeat {
        h.abort();
        // Stopped on purpose: no longer counted as serving.
        if let Err(e) = vault.leave() {
            tracing::error!(error = %e, "could not withdraw this node's announcement");
        }
    }
    senders.iter().for_each(|s| s.abort());
    vault.store().flusher.sync().await.map_err(|e| e.to_string())?;
    // The final head is signed at shutdown.
    vault.audit_checkpoint().map_err(|e| format!("audit checkpoint: {e}"))?;
    vault
        .checkpoint_stores()
        .map_err(|e| format!("store checkpoint: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

/// A JSON object of exactly `n` bytes (at least `{}`).
fn baseline_body(n: usize) -> bytes::Bytes {
    const HEAD: &str = "{\"pad\":\"";
    const TAIL: &str = "\"}";
    let mut s = String::with_capacity(n.max(2));
    if n >= HEAD.len() + TAIL.len() {
        s.push_str(HEAD);
        s.extend(std::iter::repeat_n('x', n - HEAD.len() - TAIL.len()));
        s.push_str(TAIL);
    } else {
        s.push_str("{}");
        s.extend(std::iter::repeat_n(' ', n.saturating_sub(2)));
    }
    bytes::Bytes::from(s)
}

/// The load benchmark's baseline server (hidden command): the serving stack of
/// `serve` (rustls config, accept loop, hyper) with none of the vault behind it.
async fn bench_baseline(cfg: Config, body_bytes: usize) -> CliResult {
    let tls = http::server::tls_config(&cfg)?;
    let body = baseline_body(body_bytes);
    let app = axum::Router::new().route(
        "/v1/subjects/{id}",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.server.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::warn!("bench-baseline: a benchmark stand-in, not the vault: it answers every read with a fixed body");
    eprintln!("pdvault: bench baseline listening on https://{addr}");
    http::server::serve(listener, tls, app, &cfg, http::server::shutdown_signal()).await;
    Ok(())
}

// ----- talking to a running server -------------------------------------------------

/// The server the CLI talks to: `PDVAULT_ADDR` (`https://host:port` or
/// `host:port`) when set, else the configured listen address.
fn server_addr(cfg: &Config) -> CliResult<(String, bool)> {
    match std::env::var("PDVAULT_ADDR") {
        Ok(a) if !a.trim().is_empty() => {
            let a = a.trim().trim_end_matches('/');
            if a.starts_with("http://") {
                return Err("PDVAULT_ADDR: the vault speaks HTTPS only".into());
            }
            Ok((a.strip_prefix("https://").unwrap_or(a).to_string(), true))
        }
        _ => Ok((cfg.server.listen.replace("0.0.0.0", "127.0.0.1"), false)),
    }
}

/// A running server at the configured address, if one answers there. With
/// `PDVAULT_ADDR` set, a server that does not answer is an error, not a
/// reason to open the data directory.
async fn remote(cfg: &Config) -> CliResult<Option<Client>> {
    let (addr, explicit) = server_addr(cfg)?;
    let reachable = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !reachable {
        return match explicit {
            true => Err(format!("PDVAULT_ADDR: no server answers at {addr}")),
            false => Ok(None),
        };
    }
    let token = match std::env::var("PDVAULT_TOKEN") {
        Ok(t) => Zeroizing::new(t),
        Err(_) => {
            let p = cfg.keys.dir.join(ADMIN_TOKEN);
            read_secret_file(&p).map_err(|_| {
                format!(
                    "a server runs at {addr}: set PDVAULT_TOKEN to an admin token (or keep one in {})",
                    p.display()
                )
            })?
        }
    };
    // Trusts only the vault's own certificate (or the CA in that file).
    let mut b = Client::builder(format!("https://{addr}")).token(token.as_str());
    let cert = cfg.tls_cert_path();
    if cert.exists() {
        b = b.ca_file(&cert).map_err(|e| e.to_string())?;
    }
    if let (Ok(c), Ok(k)) = (
        std::env::var("PDVAULT_CLIENT_CERT"),
        std::env::var("PDVAULT_CLIENT_KEY"),
    ) {
        b = b.client_cert_files(c, k).map_err(|e| e.to_string())?;
    }
    Ok(Some(b.build().map_err(|e| e.to_string())?))
}

/// Opens the data directory directly (no server running).
fn local(g: &Global, cfg: Config) -> CliResult<Vault> {
    let keys = open_keys(g, &cfg, false)?;
    Vault::open_with(cfg, keys)
}

fn local_ctx(purpose: Option<&str>) -> Ctx {
    Ctx {
        request_id: format!("cli-{}", uuid::Uuid::new_v4()),
        purpose: purpose.map(str::to_owned),
        ..Default::default()
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

async fn token(g: &Global, cfg: Config, cmd: TokenCmd) -> CliResult {
    let remote = remote(&cfg).await?;
    match cmd {
        TokenCmd::Issue {
            caller,
            purposes,
            caps,
            ttl,
            cert_subject,
        } => {
            let ttl_seconds = parse_duration(&ttl)?.as_secs();
            let token = match remote {
                Some(r) => {
                    let req = client::IssueRequest {
                        caller,
                        purposes,
                        capabilities: caps,
                        ttl_seconds,
                        cert_subject,
                    };
                    r.issue_token(&req).await.map_err(|e| e.to_string())?.token
                }
                None => {
                    let v = local(g, cfg)?;
                    let req = IssueRequest {
                        caller,
                        purposes,
                        capabilities: caps,
                        ttl_seconds,
                        cert_subject,
                    };
                    let (_, secret) = v
                        .issue_token(&local_ctx(None), &Vault::local_operator(), req)
                        .await
                        .map_err(|e| e.to_string())?;
                    secret.expose().to_owned()
                }
            };
            println!("{token}");
        }
        TokenCmd::List => match remote {
            Some(r) => print_json(&r.list_tokens().await.map_err(|e| e.to_string())?),
            None => {
                let v = local(g, cfg)?;
                let list = v
                    .list_tokens(&local_ctx(None), &Vault::local_operator())
                    .await
                    .map_err(|e| e.to_string())?;
                let tokens = list.iter().map(TokenRecord::describe).collect();
                print_json(&TokenList { tokens });
            }
        },
        TokenCmd::Revoke { id } => match remote {
            Some(r) => print_json(&r.revoke_token(&id).await.map_err(|e| e.to_string())?),
            None => {
                let v = local(g, cfg)?;
                let rec = v
                    .revoke_token(&local_ctx(None), &Vault::local_operator(), &id)
                    .await
                    .map_err(|e| e.to_string())?;
                print_json(&rec.describe());
            }
        },
    }
    Ok(())
}

/// Through the running server when one answers; otherwise from the data
/// directory, unsealed here only to count, and reported as `sealed` (no
/// server holds the master key).
async fn status(g: &Global, cfg: Config) -> CliResult {
    let st = match remote(&cfg).await? {
        Some(r) => r.status().await.map_err(|e| e.to_string())?,
        None => {
            let mut st = local(g, cfg)?.status().map_err(|e| e.to_string())?;
            st.sealed = true;
            st
        }
    };
    print_json(&st);
    Ok(())
}

async fn events(g: &Global, cfg: Config, cmd: EventsCmd) -> CliResult {
    let remote = remote(&cfg).await?;
    let v = match cmd {
        EventsCmd::List { pending, dead } => {
            let state = if pending {
                "pending"
            } else if dead {
                "dead"
            } else {
                "all"
            };
            match remote {
                Some(r) => {
                    let state = match state {
                        "pending" => client::EventState::Pending,
                        "dead" => client::EventState::Dead,
                        _ => client::EventState::All,
                    };
                    let list = r.list_events(state).await.map_err(|e| e.to_string())?;
                    serde_json::to_value(list).map_err(|e| e.to_string())?
                }
                None => {
                    let v = local(g, cfg)?;
                    let filter = crate::events::Filter::parse(Some(state)).expect("known state");
                    let list = v
                        .list_events(&local_ctx(None), &Vault::local_operator(), filter)
                        .await
                        .map_err(|e| e.to_string())?;
                    serde_json::to_value(crate::events::EventList { events: list }).map_err(|e| e.to_string())?
                }
            }
        }
        EventsCmd::Retry { id } => match remote {
            Some(r) => {
                let done = r.retry_event(&id).await.map_err(|e| e.to_string())?;
                serde_json::to_value(done).map_err(|e| e.to_string())?
            }
            None => {
                let v = local(g, cfg)?;
                let n = v
                    .retry_event(&local_ctx(None), &Vault::local_operator(), &id)
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::json!({"id": id, "requeued": n})
            }
        },
    };
    print_json(&v);
    Ok(())
}

async fn shred(g: &Global, cfg: Config, id: &str) -> CliResult {
    let v = match remote(&cfg).await? {
        Some(r) => r.erase("erasure", id).await.map_err(|e| e.to_string())?,
        None => {
            let v = local(g, cfg)?;
            v.erase(&local_ctx(Some("erasure")), &Vault::local_operator(), id)
                .await
                .map_err(|e| e.to_string())?
                .to_json()
        }
    };
    print_json(&v);
    Ok(())
}

async fn rotate(g: &Global, cfg: Config) -> CliResult {
    let v = match remote(&cfg).await? {
        Some(r) => {
            // The server does the work: a spinner while it runs.
            let bar = Progress::start("rotate-kek (on the server)", None, Unit::Keys);
            let done = r.rotate_kek().await.map_err(|e| e.to_string())?;
            bar.finish(&format!(
                "epoch {}, {} data keys re-wrapped",
                done.epoch, done.rewrapped
            ));
            serde_json::to_value(done).map_err(|e| e.to_string())?
        }
        None => {
            let v = local(g, cfg)?;
            let bar = Progress::start("rotate-kek", Some(0), Unit::Keys);
            let report = |done, total| {
                bar.set_total(total);
                bar.set(done);
            };
            let (epoch, rewrapped) = v
                .admin_rotate_reporting(&local_ctx(None), &Vault::local_operator(), &report)
                .await
                .map_err(|e| e.to_string())?;
            bar.finish(&format!("epoch {epoch}, {rewrapped} data keys re-wrapped"));
            serde_json::json!({"epoch": epoch, "rewrapped": rewrapped})
        }
    };
    print_json(&v);
    Ok(())
}

fn parse_since(s: &str) -> CliResult<u64> {
    if let Some(t) = crate::fsutil::parse_rfc3339(s) {
        return Ok(t);
    }
    if let Some(t) = crate::fsutil::parse_rfc3339(&format!("{s}T00:00:00Z")) {
        return Ok(t);
    }
    let d =
        parse_duration(s).map_err(|_| format!("--since {s:?}: give an RFC 3339 time, a date or an age like 30d"))?;
    Ok(crate::fsutil::now_secs().saturating_sub(d.as_secs()))
}

fn audit(cfg: Config, cmd: AuditCmd) -> CliResult {
    match cmd {
        AuditCmd::Impact {
            token,
            caller,
            since,
            until,
            format,
        } => {
            let filter = crate::audit::ExportFilter {
                since: since.map(|s| parse_since(&s)).transpose()?,
                until: until.map(|s| parse_since(&s)).transpose()?,
                token: token.clone(),
                caller: caller.clone(),
                ..Default::default()
            };
            let place = crate::audit::Place::of(&cfg).map_err(|e| e.to_string())?;
            let impact = crate::audit::impact(&place, &filter).map_err(|e| e.to_string())?;
            use std::io::IsTerminal;
            let table = match format.as_deref() {
                Some("table") => true,
                Some("json") => false,
                None => std::io::stdout().is_terminal(),
                Some(other) => return Err(format!("--format {other:?}: json or table")),
            };
            if !table {
                let who = json!({"token": token, "caller": caller});
                let mut v = serde_json::to_value(&impact).map_err(|e| e.to_string())?;
                v["query"] = who;
                print_json(&v);
                return Ok(());
            }
            let who = token
                .map(|t| format!("token {t}"))
                .or(caller.map(|c| format!("caller {c}")));
            println!(
                "{}: {} releases of {} subjects, {} to {}",
                who.unwrap_or_default(),
                impact.releases,
                impact.subjects.len(),
                impact.first.as_deref().unwrap_or("-"),
                impact.last.as_deref().unwrap_or("-")
            );
            for (field, n) in &impact.fields {
                println!("  {field:<14} {n} subjects");
            }
            Ok(())
        }
        AuditCmd::Verify => {
            // Without the public key no signature can be checked: that is a
            // failure, never "intact".
            let pk = Keyring::read_public_key(&cfg.keys.dir).map_err(|e| {
                format!("cannot check the audit log's signatures: the receipt key cannot be read ({e})")
            })?;
            let place = crate::audit::Place::of(&cfg).map_err(|e| e.to_string())?;
            // The size of the log file where there is one (else the bar counts bytes read).
            let len = std::fs::metadata(crate::audit::log_path(&cfg.data_dir)).map(|m| m.len());
            let bar = Progress::start("audit verify", len.ok(), Unit::Bytes);
            let verdict = crate::audit::verify(&place, &pk, &mut |n| bar.add(n));
            bar.finish("checked");
            match verdict.map_err(|e| e.to_string())? {
                crate::audit::Verdict::Intact {
                    entries,
                    checkpoints,
                    chains,
                    torn_tail,
                } => {
                    let nodes = match place {
                        crate::audit::Place::Files { .. } => String::new(),
                        crate::audit::Place::Shared { .. } => format!(" in the chains of {chains} node(s)"),
                    };
                    println!("audit log intact: {entries} entries{nodes}, {checkpoints} signed checkpoints");
                    if torn_tail {
                        println!(
                            "torn tail: the last line is incomplete (a crash or a full disk mid-append); it was never acknowledged and the server drops it at its next start"
                        );
                    }
                    Ok(())
                }
                crate::audit::Verdict::Broken { line, seq, why } => Err(format!(
                    "audit log broken at line {line}{}: {why}",
                    seq.map(|s| format!(" (seq {s})")).unwrap_or_default()
                )),
            }
        }
        AuditCmd::Export {
            since,
            subject,
            field,
            released,
            token,
            caller,
            until,
        } => {
            let filter = crate::audit::ExportFilter {
                since: since.map(|s| parse_since(&s)).transpose()?,
                until: until.map(|s| parse_since(&s)).transpose()?,
                subject,
                field,
                released,
                token,
                caller,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let place = crate::audit::Place::of(&cfg).map_err(|e| e.to_string())?;
            crate::audit::export(&place, &filter, &mut out).map_err(|e| e.to_string())?;
            use std::io::Write;
            out.flush().map_err(|e| e.to_string())
        }
    }
}

async fn backup(cfg: Config, file: &Path) -> CliResult {
    let r = remote(&cfg).await?.ok_or_else(|| {
        format!(
            "no server answers at {}: backup goes through the running server",
            cfg.server.listen
        )
    })?;
    let mut resp = r.backup().await.map_err(|e| e.to_string())?;
    let tmp = file.with_extension("partial");
    let mut f = crate::fsutil::create_private(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut n = 0u64;
    use std::io::Write;
    let bar = Progress::start("backup", resp.content_length(), Unit::Bytes);
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        f.write_all(&chunk).map_err(|e| e.to_string())?;
        n += chunk.len() as u64;
        bar.add(chunk.len() as u64);
    }
    f.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, file).map_err(|e| e.to_string())?;
    bar.finish(&format!("written to {} ({n} bytes)", file.display()));
    Ok(())
}

fn restore(cfg: Config, file: &Path) -> CliResult {
    check_owner(&cfg)?;
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let len = f.metadata().map(|m| m.len()).ok();
    let bar = Progress::start("restore", len, Unit::Bytes);
    let mut f = std::io::BufReader::new(ReadCounted { inner: f, bar: &bar });
    let report = crate::vault::restore(&cfg, &mut f).map_err(|e| e.to_string())?;
    bar.finish(&format!("{} read", file.display()));
    print_json(&report);
    Ok(())
}

/// A reader that moves a progress bar by the bytes it reads.
struct ReadCounted<'a, R> {
    inner: R,
    bar: &'a Progress,
}

impl<R: std::io::Read> std::io::Read for ReadCounted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.add(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn baseline_body_has_the_asked_size_and_is_json() {
        for n in [0, 1, 2, 5, 11, 12, 220, 4096] {
            let b = super::baseline_body(n);
            assert_eq!(b.len(), n.max(2), "n = {n}");
            assert!(serde_json::from_slice::<serde_json::Value>(&b).unwrap().is_object());
        }
    }
}
