//! HTTPS serving: rustls (TLS 1.2 and 1.3, optional client certificates),
//! our own accept loop so that every handshake runs in its connection's task
//! with a deadline (a stalled client stalls nobody else), and graceful
//! shutdown on SIGTERM or Ctrl-C. There is no plaintext listener.

use super::extract::ConnInfo;
use crate::config::Config;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Builds the TLS configuration; refuses to go on without a certificate and key.
pub fn tls_config(cfg: &Config) -> Result<rustls::ServerConfig, String> {
    let cert_path = cfg.tls_cert_path();
    let key_path = cfg.tls_key_path();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "TLS certificate {}: {e} (the server does not start without one)",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("TLS certificate {}: no certificate in it", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        format!(
            "TLS key {}: {e} (the server does not start without one)",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &cfg.server.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("client CA {}: {e}", ca.display()))? {
                roots
                    .add(c.map_err(|e| format!("client CA {}: {e}", ca.display()))?)
                    .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// The subject DN as RFC 4514 text, with special characters in attribute
/// values escaped, so that a value such as `x, CN=someone` cannot pose as
/// another attribute when the DN is compared with a token's binding.
fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut rdns = Vec::new();
    for rdn in parsed.subject().iter() {
        let mut attrs = Vec::new();
        for a in rdn.iter() {
            let key = oid2abbrev(a.attr_type(), oid_registry())
                .map(str::to_owned)
                .unwrap_or_else(|_| a.attr_type().to_id_string());
            let value = match a.as_str() {
                Ok(s) => escape_dn_value(s),
                Err(_) => format!("#{}", hex::encode(a.as_slice())),
            };
            attrs.push(format!("{key}={value}"));
        }
        rdns.push(attrs.join(" + "));
    }
    Some(rdns.join(", "))
}

fn escape_dn_value(s: &str) -> String {
    let n = s.chars().count();
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i + 1 == n => out.push_str("\\ "),
            c if c.is_control() => {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("\\{byte:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Resolves when the process is asked to stop.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A connection's I/O that notes the time of its last byte read or written,
/// so that a connection silent for `idle_timeout` can be closed.
struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

/// The last I/O of a connection, the requests it has in flight, and since
/// when the head of the next request has been arriving.
struct Activity {
    start: std::time::Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `start` of the first byte read while no request
    /// was in flight (a request's head under way); `NO_HEAD` when none.
    head_since_ms: AtomicU64,
}

const NO_HEAD: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Activity {
            start: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(NO_HEAD),
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// Bytes came in: with no request in flight they begin a request's head.
    fn read_some(&self) {
        self.touch();
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let _ = self
                .head_since_ms
                .compare_exchange(NO_HEAD, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }
    /// The head was read whole: the request is in the service's hands.
    fn request_started(&self) {
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    /// How long the head of the next request has been arriving, if it has.
    fn head_for(&self) -> Option<std::time::Duration> {
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NO_HEAD && self.in_flight.load(Ordering::Relaxed) == 0)
            .then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
    fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Open connections per peer address; a slot is given back when dropped.
#[derive(Clone, Default)]
struct PerIp(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

struct Slot(PerIp, IpAddr);

impl PerIp {
    fn take(&self, ip: IpAddr, cap: usize) -> Option<Slot> {
        let mut m = self.0.lock().expect("per-ip counts");
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().expect("per-ip counts");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish for up to `grace`. Every connection has deadlines: the
/// handshake (`handshake_timeout`), each request's headers
/// (`header_read_timeout`), and silence between requests (`idle_timeout`);
/// and one address holds at most `max_connections_per_ip` of them.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
    cfg: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let handshake_timeout = cfg.server.handshake_timeout;
    let header_timeout = cfg.server.header_read_timeout;
    let idle_timeout = cfg.server.idle_timeout;
    let cap = cfg.server.max_connections_per_ip;
    let per_ip = PerIp::default();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = per_ip.take(peer.ip(), cap) else {
            tracing::debug!(%peer, "connection refused: too many open from this address");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cert_subject = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(subject_of);
            let info = ConnInfo {
                peer: peer.ip(),
                cert_subject,
            };
            let activity = Arc::new(Activity::new());
            let in_svc = activity.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info.clone());
                let app = app.clone();
                let act = in_svc.clone();
                async move {
                    act.request_started();
                    let r = app.oneshot(req.map(axum::body::Body::new)).await;
                    act.in_flight.fetch_sub(1, Ordering::Relaxed);
                    act.touch();
                    r
                }
            });
            // HTTP/2 streams carry their heads in one frame; the head deadline
            // is HTTP/1's (slow headers), checked below from the first byte of
            // each request, so that an idle keep-alive connection lives for
            // `idle_timeout` (hyper's own timer would cut it after
            // `header_read_timeout` of waiting; it stays as a backstop).
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout.max(idle_timeout))
                // Room past our own limit, so that too many headers get our
                // problem+json 431 and not hyper's bare one.
                .max_headers(super::MAX_HEADERS * 2);
            builder
                .http2()
                .max_header_list_size((super::MAX_HEADER_BYTES * 4) as u32);
            let io = IdleIo {
                inner: tls,
                activity: activity.clone(),
            };
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned());
            tokio::pin!(conn);
            let check = (idle_timeout.min(header_timeout) / 4)
                .clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = tokio::time::sleep(check) => {
                        if activity.in_flight.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle_timeout {
                            tracing::debug!(%peer, "connection closed: idle");
                            break;
                        }
                        if !h2 && activity.head_for().is_some_and(|t| t >= header_timeout) {
                            tracing::debug!(%peer, "connection closed: request headers too slow");
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for open ones");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(cfg.server.shutdown_grace) => tracing::warn!("grace period over; closing the rest"),
    }
}
