//! The PostgreSQL backend: each store is one database (`storage.url` for
//! the data, `storage.keys_url` for the wrapped data keys and grant uses),
//! each space a range of one table `pdvault_kv (space, k, v)`. The only
//! module that names tokio-postgres.
//!
//! - A unit of work is one transaction; it is durable when `COMMIT` returns
//!   (every session runs with `synchronous_commit = on`, whatever the
//!   server's default), so `flush` has nothing to do.
//! - A read-modify-write (`update`: counters, grant uses, single-use codes)
//!   runs under a transaction-scoped advisory lock on its key, so it is exact
//!   across every node on the database.
//! - The schema is migrated at open, under a session advisory lock, so
//!   several nodes may start at once; `pdvault migrate` does only that.
//! - The core calls its store synchronously; this module drives its pool on
//!   a small runtime of its own and blocks the caller's thread (outside the
//!   caller's executor, through `block_in_place`) until the database answers.

use super::{Backend, Commit, EachEntry, Entries, Entry, Space, Swap, Update};
use crate::config::StorageConfig;
use crate::error::{Result, VaultError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::str::FromStr;
use tokio_postgres::config::Host;

/// The schema, in order. A migration is applied once, in a transaction,
/// and recorded in `pdvault_schema`. Append; never edit a released one.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "key spaces",
    "CREATE TABLE pdvault_kv (
        space smallint NOT NULL,
        k bytea NOT NULL,
        v bytea NOT NULL,
        PRIMARY KEY (space, k)
    )",
)];

/// The session advisory lock held while migrating ("pdvault" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_6476_6175_6c74;
/// Rows fetched per round trip of a scan.
const PAGE: i64 = 512;

pub(super) struct Engine {
    pool: Pool,
    rt: Option<tokio::runtime::Runtime>,
}

fn db_error(e: impl std::fmt::Display) -> VaultError {
    // The driver's messages name tables and states, never row values; the
    // connection string is not part of them.
    VaultError::Internal(format!("postgres: {e}"))
}

/// Whether a connection string may go without TLS: loopback or a unix socket.
fn local_only(c: &tokio_postgres::Config) -> bool {
    c.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
    })
}

fn parse(url: &str, which: &str) -> std::result::Result<tokio_postgres::Config, String> {
    // The error is the driver's; the URL (which may hold a password) is
    // never echoed.
    tokio_postgres::Config::from_str(url).map_err(|e| format!("storage.{which} is not a PostgreSQL URL: {e}"))
}

/// Start-up checks of `[storage]` for this backend (named in the error).
pub(super) fn check(s: &StorageConfig) -> std::result::Result<(), String> {
    let (Some(url), Some(keys_url)) = (&s.url, &s.keys_url) else {
        return Err("storage.backend = \"postgres\" needs storage.url and storage.keys_url".into());
    };
    let (data, keys) = (parse(url, "url")?, parse(keys_url, "keys_url")?);
    let target = |c: &tokio_postgres::Config| {
        (
            format!("{:?}", c.get_hosts()),
            c.get_ports().to_vec(),
            c.get_dbname().map(str::to_owned),
        )
    };
    if target(&data) == target(&keys) {
        return Err(
            "storage.url and storage.keys_url name the same database: the keys must be in another one, so that a dump of the data holds no data key"
                .into(),
        );
    }
    if s.pool_size == 0 {
        return Err("storage.pool_size must be at least 1".into());
    }
    match s.tls.as_str() {
        "disable" if !(local_only(&data) && local_only(&keys)) => {
            Err("storage.tls = \"disable\" is allowed only for a database on loopback or a unix socket".into())
        }
        "verify-full" if s.ca_file.is_none() => Err("storage.tls = \"verify-full\" needs storage.ca_file".into()),
        _ => Ok(()),
    }
}

/// Accepts any server certificate, still checking the handshake's
/// signatures: libpq's `sslmode=require` (encrypted, not authenticated).
#[derive(Debug)]
struct AnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(s: &StorageConfig) -> Result<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(db_error)?;
    Ok(match s.tls.as_str() {
        "verify-full" => {
            let path = s.ca_file.as_ref().expect("checked at start");
            let pem = std::fs::read(path)
                .map_err(|e| VaultError::Internal(format!("storage.ca_file {}: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls_pki_types::CertificateDer<'static> =
                    cert.map_err(|e| VaultError::Internal(format!("storage.ca_file {}: {e}", path.display())))?;
                roots.add(cert).map_err(db_error)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyServerCert(provider)))
            .with_no_client_auth(),
    })
}

impl Engine {
    /// Connects a pool to one of the two databases and migrates its schema.
    pub(super) fn open(s: &StorageConfig, keys: bool) -> Result<Engine> {
        check(s).map_err(VaultError::Internal)?;
        let which = if keys { "keys_url" } else { "url" };
        let url = if keys { &s.keys_url } else { &s.url };
        let mut pg = parse(url.as_deref().unwrap_or_default(), which).map_err(VaultError::Internal)?;
        // The durability of every acknowledged write rests on this.
        pg.options("-c synchronous_commit=on -c client_min_messages=warning");
        pg.application_name("pdvault");
        pg.connect_timeout(std::time::Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(if keys { "pg-keys" } else { "pg-data" })
            .enable_all()
            .build()?;
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if s.tls == "disable" {
            Manager::from_config(pg, tokio_postgres::NoTls, mc)
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(s)?);
            Manager::from_config(pg, tls, mc)
        };
        let pool = Pool::builder(manager)
            .max_size(s.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(db_error)?;
        let engine = Engine { pool, rt: Some(rt) };
        engine
            .block(migrate(&engine.pool))
            .map_err(|e| VaultError::Internal(format!("storage.{which}: {e}")))?;
        Ok(engine)
    }

    /// The schema version the database is at.
    pub(super) fn schema_version(&self) -> Result<i32> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT coalesce(max(version), 0) FROM pdvault_schema", &[])
                .await
                .map_err(db_error)?;
            Ok(row.get(0))
        })
    }

    /// Runs a database future to its end from any thread: on a worker of the
    /// caller's multi-threaded runtime through `block_in_place`, from a
    /// single-threaded one on a helper thread, elsewhere directly.
    fn block<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().expect("runtime lives as long as the engine");
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => {
                std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join().expect("database call"))
            }
            Ok(_) => tokio::task::block_in_place(|| rt.block_on(f)),
            Err(_) => rt.block_on(f),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => db_error(e),
            e => VaultError::Internal(format!("postgres pool: {e}")),
        })
    }

    fn page(&self, s: Space, lower: Vec<u8>, inclusive: bool, upper: Option<&[u8]>) -> Result<Vec<Entry>> {
        self.block(async { page_on(&self.client().await?, s, lower, inclusive, upper).await })
    }
}

/// One page of a space's entries from `lower` (up to `upper`), on the
/// connection `c` (inside its transaction, if one is open).
async fn page_on(
    c: &deadpool_postgres::Object,
    s: Space,
    lower: Vec<u8>,
    inclusive: bool,
    upper: Option<&[u8]>,
) -> Result<Vec<Entry>> {
    let op = if inclusive { ">=" } else { ">" };
    let sql = match upper {
        Some(_) => {
            format!("SELECT k, v FROM pdvault_kv WHERE space = $1 AND k {op} $2 AND k < $3 ORDER BY k LIMIT {PAGE}")
        }
        None => format!("SELECT k, v FROM pdvault_kv WHERE space = $1 AND k {op} $2 ORDER BY k LIMIT {PAGE}"),
    };
    let st = c.prepare_cached(&sql).await.map_err(db_error)?;
    let id = s as i16;
    let rows = match upper {
        Some(u) => c.query(&st, &[&id, &lower, &u]).await,
        None => c.query(&st, &[&id, &lower]).await,
    }
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime may not block inside another one.
            rt.shutdown_background();
        }
    }
}

async fn migrate(pool: &Pool) -> std::result::Result<(), String> {
    let mut c = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => e.to_string(),
        e => e.to_string(),
    })?;
    let e = |e: tokio_postgres::Error| e.to_string();
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(e)?;
    let result = async {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS pdvault_schema (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(e)?;
        let done: Option<i32> = c
            .query_one("SELECT max(version) FROM pdvault_schema", &[])
            .await
            .map_err(e)?
            .get(0);
        let done = done.unwrap_or(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if done > newest {
            return Err(format!(
                "the database's schema is version {done}, newer than this build's {newest}: refusing to run an older pdvault on it"
            ));
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > done) {
            let tx = c.transaction().await.map_err(e)?;
            tx.batch_execute(sql).await.map_err(e)?;
            tx.execute("INSERT INTO pdvault_schema (version, name) VALUES ($1, $2)", &[version, name])
                .await
                .map_err(e)?;
            tx.commit().await.map_err(e)?;
            tracing::info!(version, name, "database schema migrated");
        }
        Ok(())
    }
    .await;
    c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(e)?;
    result
}

/// The smallest key above every key starting with `prefix` (`None`: there
/// is none, the scan runs to the end of the space).
fn upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut u = prefix.to_vec();
    while let Some(last) = u.pop() {
        if last < 0xff {
            u.push(last + 1);
            return Some(u);
        }
    }
    None
}

/// The advisory-lock key of one stored key, taken by every read-modify-write
/// and every precondition on it (both halves of the namespace are ours; a
/// collision only serialises two unrelated writes).
fn lock_key(s: Space, k: &[u8]) -> i64 {
    let h = crate::crypto::sha256(&[&[s as u8][..], k].concat());
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Takes the key's advisory lock for the rest of the transaction, then
/// reads its value: every read-modify-write and precondition goes this way.
async fn locked_read(tx: &deadpool_postgres::Transaction<'_>, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(s, k)])
        .await
        .map_err(db_error)?;
    Ok(tx
        .query_opt(
            "SELECT v FROM pdvault_kv WHERE space = $1 AND k = $2",
            &[&(s as i16), &k],
        )
        .await
        .map_err(db_error)?
        .map(|r| r.get(0)))
}

struct Scan<'a> {
    engine: &'a Engine,
    /// The connection whose transaction every page is read in (a snapshot
    /// scan); `None`: each page from the pool.
    conn: Option<&'a deadpool_postgres::Object>,
    space: Space,
    upper: Option<Vec<u8>>,
    /// Where the next page starts, and whether that key itself is included.
    next: Option<(Vec<u8>, bool)>,
    buf: VecDeque<Entry>,
}

impl Iterator for Scan<'_> {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            let (lower, inclusive) = self.next.take()?;
            let page = match self.conn {
                Some(c) => self
                    .engine
                    .block(page_on(c, self.space, lower, inclusive, self.upper.as_deref())),
                None => self.engine.page(self.space, lower, inclusive, self.upper.as_deref()),
            };
            match page {
                Ok(rows) => {
                    if rows.len() as i64 == PAGE {
                        self.next = rows.last().map(|(k, _)| (k.clone(), false));
                    }
                    self.buf = rows.into();
                }
                Err(e) => return Some(Err(e)),
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

impl Backend for Engine {
    /// One `REPEATABLE READ` transaction for all of it: the other nodes go
    /// on writing, and a backup must still be one moment of the database.
    fn scan_snapshot(&self, spaces: &[Space], each: &mut EachEntry<'_>) -> Result<()> {
        let c = self.block(self.client())?;
        self.block(c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            .map_err(db_error)?;
        let mut walk = || -> Result<()> {
            for s in spaces {
                let scan = Scan {
                    engine: self,
                    conn: Some(&c),
                    space: *s,
                    upper: None,
                    next: Some((Vec::new(), true)),
                    buf: VecDeque::new(),
                };
                for kv in scan {
                    let (k, v) = kv?;
                    each(*s, &k, &v)?;
                }
            }
            Ok(())
        };
        let walked = walk();
        let end = if walked.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.block(c.batch_execute(end)).map_err(db_error);
        walked.and(ended)
    }

    fn shared(&self) -> bool {
        true
    }

    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.block(async {
            let c = self.client().await?;
            let st = c
                .prepare_cached("SELECT v FROM pdvault_kv WHERE space = $1 AND k = $2")
                .await
                .map_err(db_error)?;
            let row = c.query_opt(&st, &[&(s as i16), &k]).await.map_err(db_error)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn scan<'a>(&'a self, s: Space, prefix: &[u8], from: &[u8]) -> Entries<'a> {
        let start = if from > prefix { from.to_vec() } else { prefix.to_vec() };
        Box::new(Scan {
            engine: self,
            conn: None,
            space: s,
            upper: upper_bound(prefix),
            next: Some((start, true)),
            buf: VecDeque::new(),
        })
    }

    fn count(&self, s: Space) -> Result<u64> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT count(*) FROM pdvault_kv WHERE space = $1", &[&(s as i16)])
                .await
                .map_err(db_error)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    fn apply(&self, commit: &Commit) -> Result<()> {
        // The last change of each key is the one that counts.
        let mut last: BTreeMap<(Space, &[u8]), Option<&[u8]>> = BTreeMap::new();
        for (s, k, v) in commit.ops() {
            last.insert((s, k), v);
        }
        let (mut ds, mut dk) = (Vec::new(), Vec::new());
        let (mut us, mut uk, mut uv) = (Vec::new(), Vec::new(), Vec::new());
        for ((s, k), v) in last {
            match v {
                None => {
                    ds.push(s as i16);
                    dk.push(k);
                }
                Some(v) => {
                    us.push(s as i16);
                    uk.push(k);
                    uv.push(v);
                }
            }
        }
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db_error)?;
            for (s, k, v) in commit.expectations() {
                let cur = locked_read(&tx, s, k).await?;
                if cur.as_deref() != v {
                    return Err(VaultError::VersionConflict { current: 0 });
                }
            }
            if !ds.is_empty() {
                let st = tx
                    .prepare_cached(
                        "DELETE FROM pdvault_kv USING unnest($1::int2[], $2::bytea[]) AS d(s, k)
                         WHERE pdvault_kv.space = d.s AND pdvault_kv.k = d.k",
                    )
                    .await
                    .map_err(db_error)?;
                tx.execute(&st, &[&ds, &dk]).await.map_err(db_error)?;
            }
            if !us.is_empty() {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO pdvault_kv (space, k, v)
                         SELECT * FROM unnest($1::int2[], $2::bytea[], $3::bytea[])
                         ON CONFLICT (space, k) DO UPDATE SET v = EXCLUDED.v",
                    )
                    .await
                    .map_err(db_error)?;
                tx.execute(&st, &[&us, &uk, &uv]).await.map_err(db_error)?;
            }
            tx.commit().await.map_err(db_error)
        })
    }

    fn update(&self, s: Space, k: &[u8], f: Update<'_>) -> Result<Option<Vec<u8>>> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db_error)?;
            let old = locked_read(&tx, s, k).await?;
            let id = s as i16;
            match f(old.as_deref()) {
                Some(v) => {
                    tx.execute(
                        "INSERT INTO pdvault_kv (space, k, v) VALUES ($1, $2, $3)
                         ON CONFLICT (space, k) DO UPDATE SET v = EXCLUDED.v",
                        &[&id, &k, &v],
                    )
                    .await
                }
                None => {
                    tx.execute("DELETE FROM pdvault_kv WHERE space = $1 AND k = $2", &[&id, &k])
                        .await
                }
            }
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            Ok(old)
        })
    }

    fn swap(&self, s: Space, items: &[Swap]) -> Result<u64> {
        let (mut ks, mut olds, mut news) = (vec![], vec![], vec![]);
        for (k, o, n) in items {
            ks.push(k.as_slice());
            olds.push(o.as_slice());
            news.push(n.as_slice());
        }
        self.block(async {
            let c = self.client().await?;
            let st = c
                .prepare_cached(
                    "UPDATE pdvault_kv SET v = x.n FROM unnest($2::bytea[], $3::bytea[], $4::bytea[]) AS x(k, o, n)
                     WHERE pdvault_kv.space = $1 AND pdvault_kv.k = x.k AND pdvault_kv.v = x.o",
                )
                .await
                .map_err(db_error)?;
            c.execute(&st, &[&(s as i16), &ks, &olds, &news])
                .await
                .map_err(db_error)
        })
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
