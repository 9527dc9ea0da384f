//! HTTP routing and limits; the answers themselves come from [`Tsa`].
//!
//! Public listener:
//!
//! | request                                             | answer |
//! |-----------------------------------------------------|--------|
//! | `POST {path}`, `application/timestamp-query`        | 200, `application/timestamp-reply`: a granted or rejected `TimeStampResp` (RFC 3161 sets no HTTP codes; clients read the PKIStatus) |
//! | `POST {path}`, `application/timestamp-query-batch`  | 200, `application/timestamp-reply-batch`: one `TimeStampResp` per item, in order (`docs/batch.md`); a batch that is not one DER `SEQUENCE OF` SEQUENCEs, or empty: 400 + one DER rejection `badDataFormat`; over `max_batch_items` or `max_batch_bytes`: 413 likewise |
//! | `POST {path}` with another media type               | 415 + DER rejection `badDataFormat` |
//! | `POST {path}` with a body over the limit            | 413 + DER rejection `badDataFormat` |
//! | `POST {path}` whose body does not arrive in time    | 408 + DER rejection `badDataFormat` |
//! | `POST {path}` with a transfer coding besides `chunked` (`gzip, chunked`) | 501 + DER rejection `badRequest`, connection closed |
//! | `Content-Length` together with `chunked`            | read as chunked, then the connection closed (hyper) |
//! | any other method on `{path}`                        | 405, `Allow: POST` + DER rejection `badRequest` |
//! | `POST {path}` without credentials, `[auth] anonymous = false` | 401, `WWW-Authenticate: Bearer realm="tsa"` and `Basic realm="tsa", charset="UTF-8"` + DER rejection `badRequest` |
//! | `POST {path}` with a wrong API key, or a client certificate of no configured client (or one that the TLS configuration reloaded since its connection's handshake refuses) | 401 (also when anonymous access is on) + DER rejection `badRequest` |
//! | `POST {path}` with an `Authorization` header, from an address that made `auth_failures_per_address_burst` failed authentications faster than `auth_failures_per_address_per_s` | 429, `Retry-After` (until it may fail once more) + DER rejection `systemFailure`, the key not looked at (0, the default: no limit) |
//! | `POST {path}` over the client's quota               | 429, `Retry-After` (seconds) + DER rejection `systemFailure` |
//! | an anonymous batch of more items than their burst (`auth.anonymous_burst`, or one second of `anonymous_rate_per_s` where it is 0) | 413 + DER rejection `badRequest` |
//! | `POST {path}` while `max_queue` requests are admitted, and no place frees within `queue_wait_ms` | 503, `Retry-After: 1` + DER rejection `systemFailure` ([`super::admission`]) |
//! | a batch while `max_batches_in_flight` batches are read, answered or sent | 503, `Retry-After: 1` + DER rejection `systemFailure`, before its body is read |
//! | a request head over `max_header_bytes` or 100 headers | 431, connection closed (hyper) |
//! | a new connection while `max_connections` are open   | a fixed 503 `text/plain`, then closed; what the client sent is read and discarded briefly first, so that it reads the 503 rather than a reset |
//! | a new connection from an address with `max_connections_per_address` open (IPv6: per /64) | the same fixed 503, then closed (0, the default: no limit) |
//! | a new connection from an address that opened `new_connections_per_address_burst` faster than `new_connections_per_address_per_s` | a fixed 503 whose `Retry-After` is the rate's interval, then closed (0, the default: no limit) |
//! | a batch from an address with half of `max_batches_in_flight` in flight, while `max_connections_per_address` is set | 503, `Retry-After: 1` + DER rejection `systemFailure`, before its body is read |
//! | a batch from a client with half of `max_batches_in_flight` in flight (the anonymous callers together are one client), while `[auth]` names clients | 503, `Retry-After: 1` + DER rejection `systemFailure`, before its body is read |
//! | unparsable HTTP                                     | 400, connection closed (hyper) |
//! | `GET /certs`                                        | 200, the certificate chain as PEM |
//! | anything else                                       | 404 |
//!
//! The HTTPS listener (`server.https_listen`, [`super::tls`]) serves the same routes; its
//! verified client certificate is a credential besides the `Authorization` header
//! ([`super::auth`]). A request of another media type is answered 415 first (it costs no
//! token); then authentication, then the quota (a batch: its places, one token before its
//! body, its n tokens once its items are counted), then the other checks above, then
//! admission. Idle keep-alive connections close after `read_timeout_ms`, busy ones after
//! `max_requests_per_connection` requests (the last reply says `Connection: close`), and a
//! connection whose client reads none of its answers for `write_timeout_ms` is closed
//! ([`super::write_timeout`]), so that it cannot hold its place under `max_connections`.
//! Over TLS the refusal of a connection past `max_connections`, its address's
//! `max_connections_per_address` or its rate is no plain-text 503: the connection is closed
//! at once, before the handshake.
//!
//! Admin listener (loopback by default): `GET /health/live`, `GET /health/ready` (503 with the
//! reason while the clock is not trusted or the signer failed), `GET /clock` (the clock's
//! state and sources in words, as `tsa clock` prints them), `GET /metrics` (Prometheus),
//! `GET /status` (the operator's HTML status page, [`super::status`]). With the archive:
//! `GET /archive/serial/<hex>` and `GET /archive/imprint/<hex>[?alg=<digest>]` answer the
//! archived token as its granted `TimeStampResp` (for an imprint, the latest of
//! `X-Archive-Matches` tokens, of the digest `alg` names where it is given), 404
//! when unknown, 503 with `Retry-After` while [`MAX_LOOKUPS`] look-ups run. A request whose
//! `Host` is not an IP address, `localhost` or one of `admin_hosts` gets 403 (DNS rebinding:
//! a web page in the operator's browser must not read the listener). Its connections are counted apart from the public ones: past
//! `admin_max_connections` (16) a new one gets the same fixed 503 and is closed, so that a
//! client of the admin listener cannot take the descriptors the public listener needs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;

use super::admission::{self, AddressKey, AddressSlot, ConnectionSlot};
use rustls::pki_types::UnixTime;

use super::auth::{Link, PeerCertificate, Refusal, Taken};
use super::reply::{BatchBody, ReplyBody};
use super::write_timeout::{SendBy, WriteTimeout};
use super::{metrics, Client, Outcome, Tsa};
use crate::config::ServerConfig;
use crate::log_limit::LogLimit;
use crate::protocol::{batch, FailInfo, Rejection};

pub const QUERY_TYPE: &str = "application/timestamp-query";
pub const REPLY_TYPE: &str = "application/timestamp-reply";

struct Limits {
    path: String,
    max_body: usize,
    /// A batch's body and items (`docs/batch.md`).
    max_batch_body: usize,
    max_batch_items: usize,
    read_timeout: Duration,
    /// How long a write to the client may make no progress ([`WriteTimeout`]).
    write_timeout: Duration,
    /// Requests on one connection before it is closed; 0: no limit.
    max_requests_per_connection: u64,
}

/// One public connection: its place under `max_connections` and under its address's
/// `max_connections_per_address` (which its batches count on too), its request count and, on
/// the HTTPS listener, the client certificate its handshake verified.
struct Connection {
    _slot: ConnectionSlot,
    address: AddressSlot,
    /// The client's address (`None` for a stream without one): its failed authentications
    /// are counted under it.
    ip: Option<std::net::IpAddr>,
    served: AtomicU64,
    /// Shared with the connection's [`WriteTimeout`]: set while a batch's reply is sent.
    send_by: SendBy,
    /// The client certificate's identity; its subject mapping dropped where a reload's
    /// client CAs no longer issued it directly.
    peer: arc_swap::ArcSwapOption<PeerCertificate>,
    /// The second of the last verification of its chain that was due, shifted left one, and
    /// whether it refused the chain (the low bit): at most one a second.
    rechecked: AtomicU64,
    /// On the HTTPS listener (`None` on the plain one): the TLS configuration that last
    /// accepted the connection and `peer` (its handshake's, then a reloaded one that verified
    /// it again).
    tls: Option<std::sync::Mutex<(Arc<super::tls::Tls>, bool)>>,
}

/// Whether a connection's chain is to be verified again at `now_s` for its CA certificates'
/// ends (`cas_not_after_s`), given its last verification (`rechecked`: its second shifted
/// left one, and whether it refused): where one of them ended since then, or while it was
/// refused. An expired certificate sent beside the chain it is verified on is so asked about
/// once, not at every request (each verification is a path search).
fn recheck_due(cas_not_after_s: &[u64], rechecked: u64, now_s: u64) -> bool {
    let (last_s, last_refused) = (rechecked >> 1, rechecked & 1 == 1);
    last_refused
        || cas_not_after_s
            .iter()
            .any(|&end| end >= last_s && end <= now_s)
}

impl Connection {
    /// What the connection authenticates with now: its client certificate's identity (on the
    /// HTTPS listener), and whether the TLS configuration in force refuses that certificate
    /// (or its lack of one) as a new handshake would.
    fn client_certificate(&self, tsa: &Tsa) -> (Option<Arc<PeerCertificate>>, bool) {
        let Some(under) = &self.tls else {
            return (None, false);
        };
        let peer = self.peer.load_full();
        let refused = self.certificate_refused(tsa, under, &peer);
        // A reload may have dropped its subject mapping meanwhile.
        (self.peer.load_full(), refused)
    }

    /// Whether the TLS configuration in force refuses `peer`, the connection's client
    /// certificate (or its lack of one), now: after a reload (asked once per reload, its
    /// answer kept: a refused chain is not searched again at each request, which could cost
    /// a handshake's signatures each), once after each end of a CA certificate the client presented
    /// ([`recheck_due`]), while refused, and while a client CRL is past its nextUpdate (at
    /// most once a second). A certificate still accepted
    /// after a reload keeps its subject mapping only while a client CA of the reloaded
    /// configuration issued it directly (otherwise only its SHA-256 maps it).
    fn certificate_refused(
        &self,
        tsa: &Tsa,
        under: &std::sync::Mutex<(Arc<super::tls::Tls>, bool)>,
        peer: &Option<Arc<PeerCertificate>>,
    ) -> bool {
        let Some(current) = tsa.tls.load_full() else {
            return true;
        };
        if let Some(peer) = peer {
            let now_s = UnixTime::now().as_secs();
            let last = self.rechecked.load(Ordering::Relaxed);
            let due =
                recheck_due(&peer.cas_not_after_s, last, now_s) || current.crls_outdated(now_s);
            // At most one verification a second.
            let refused = due
                && match last >> 1 == now_s {
                    true => last & 1 == 1,
                    false => {
                        let refused = !current.still_accepts(&peer.chain);
                        self.rechecked
                            .store(now_s << 1 | u64::from(refused), Ordering::Relaxed);
                        refused
                    }
                };
            if refused {
                return true;
            }
        }
        let mut under = under.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&under.0, &current) {
            return under.1;
        }
        let accepted = match peer {
            Some(peer) => current.still_accepts(&peer.chain),
            None => !current.requires_certificate(),
        };
        if !accepted {
            *under = (current, true);
            return true;
        }
        if let Some(peer) = peer.as_ref().filter(|p| p.names.is_some()) {
            if !peer.chain.first().is_some_and(|leaf| current.issued(leaf)) {
                self.peer.store(Some(Arc::new(PeerCertificate {
                    names: None,
                    ..(**peer).clone()
                })));
            }
        }
        *under = (current, false);
        false
    }
}

type Reply = Response<ReplyBody>;

impl Limits {
    fn new(config: &ServerConfig) -> Self {
        Self {
            path: config.path.clone(),
            max_body: config.max_request_bytes,
            max_batch_body: config.max_batch_bytes,
            max_batch_items: config.max_batch_items.max(1),
            read_timeout: config.read_timeout(),
            write_timeout: config.write_timeout(),
            max_requests_per_connection: config.max_requests_per_connection,
        }
    }
}

/// Archive look-ups (`GET /archive/…` on the admin listener) running or waiting for the
/// archive's reader at once; one more gets 503 with `Retry-After`.
pub(super) const MAX_LOOKUPS: usize = 4;

/// The most a connection's read buffer holds (more when `max_header_bytes` needs it).
const READ_BUFFER: usize = 32 * 1024;

fn http1_builder(config: &ServerConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Also the idle time allowed between requests on a keep-alive connection.
        .header_read_timeout(config.read_timeout())
        .max_header_size(config.max_header_bytes)
        // The read buffer grows while reads fill it, to 400 KiB by default: a client that
        // pipelines requests and reads no answers left that much on every connection (150 KiB
        // on average measured, 200 connections). A request head must fit; bodies stream.
        .max_buf_size(
            config
                .max_header_bytes
                .saturating_add(8 * 1024)
                .max(READ_BUFFER),
        )
        // One write of head and body (a small response copied once) measured 3-5 % more
        // tokens/s on loopback than hyper's vectored writes.
        .writev(false)
        .keep_alive(true);
    builder
}

/// Serves one connection over any byte stream as the public listener serves a plain one
/// (routes, limits, admission, the connection's request count), until it ends: the entry of
/// the HTTP fuzz target (`fuzz/checks/http_connection.rs`). A connection over
/// `max_connections` is closed at once; a stream has no address to count under
/// `max_connections_per_address`.
pub async fn serve_stream<S>(tsa: Arc<Tsa>, config: ServerConfig, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(slot) = tsa.connections.open() else {
        return;
    };
    let send_by = SendBy::default();
    let connection = Connection {
        _slot: slot,
        address: AddressSlot::uncounted(),
        ip: None,
        served: AtomicU64::new(0),
        send_by: send_by.clone(),
        peer: Default::default(),
        rechecked: AtomicU64::new(0),
        tls: None,
    };
    let limits = Arc::new(Limits::new(&config));
    let graceful = GracefulShutdown::new();
    let served = serve_public(
        &http1_builder(&config),
        graceful.watcher(),
        TokioIo::new(WriteTimeout::new(stream, limits.write_timeout, send_by)),
        tsa,
        limits.clone(),
        connection,
    );
    if let Err(e) = served.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

pub(super) async fn run(
    tsa: Arc<Tsa>,
    config: &ServerConfig,
    public: TcpListener,
    admin: TcpListener,
    https: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = Arc::new(Limits::new(config));
    let builder = http1_builder(config);
    let graceful = GracefulShutdown::new();
    let admin_connections = admission::Connections::new(config.admin_max_connections);
    let admin_hosts: Arc<[String]> = config.admin_hosts.clone().into();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = public.accept() => {
                let Some((stream, from)) = accepted_stream(accepted).await else { continue };
                if let Err(key) = tsa.connection_rate.admit(from.ip()) {
                    log_rate_refused(key);
                    refuse_connection(&tsa, stream, metrics::Overload::NewConnectionsPerAddress);
                    continue;
                }
                let Some(slot) = tsa.connections.open() else {
                    refuse_connection(&tsa, stream, metrics::Overload::Connections);
                    continue;
                };
                let address = match tsa.addresses.open(from.ip()) {
                    Ok(address) => address,
                    Err(key) => {
                        log_address_refused(key);
                        refuse_connection(&tsa, stream, metrics::Overload::ConnectionsPerAddress);
                        continue;
                    }
                };
                let send_by = SendBy::default();
                let connection = Connection { _slot: slot, address, ip: Some(from.ip()), served: AtomicU64::new(0), send_by: send_by.clone(), peer: Default::default(), rechecked: AtomicU64::new(0), tls: None };
                let (tsa, limits) = (tsa.clone(), limits.clone());
                let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout, send_by));
                spawn(serve_public(&builder, graceful.watcher(), io, tsa, limits, connection));
            }
            accepted = accept_on(https.as_ref()) => {
                let Some((stream, from)) = accepted_stream(accepted).await else { continue };
                // No plain-text 503 inside TLS: a connection refused is just closed, before
                // the handshake it would cost.
                if let Err(key) = tsa.connection_rate.admit(from.ip()) {
                    log_rate_refused(key);
                    tsa.metrics.overloaded(metrics::Overload::NewConnectionsPerAddress);
                    continue;
                }
                let Some(slot) = tsa.connections.open() else {
                    tsa.metrics.overloaded(metrics::Overload::Connections);
                    continue;
                };
                let address = match tsa.addresses.open(from.ip()) {
                    Ok(address) => address,
                    Err(key) => {
                        log_address_refused(key);
                        tsa.metrics.overloaded(metrics::Overload::ConnectionsPerAddress);
                        continue;
                    }
                };
                // The certificate in force now (a reload may replace it).
                let Some(tls) = tsa.tls.load_full() else { continue };
                let (tsa, limits, builder, watcher) = (tsa.clone(), limits.clone(), builder.clone(), graceful.watcher());
                // The handshake runs in the connection's task, within the read timeout.
                spawn(async move {
                    // Under TLS, so that the handshake's and the records' writes are held to it too.
                    let send_by = SendBy::default();
                    let stream = WriteTimeout::new(stream, limits.write_timeout, send_by.clone());
                    let Some((stream, peer)) = super::tls::handshake(&tls, stream, limits.read_timeout).await else {
                        return Ok(());
                    };
                    let tls = Some(std::sync::Mutex::new((tls, false)));
                    let connection = Connection { _slot: slot, address, ip: Some(from.ip()), served: AtomicU64::new(0), send_by, peer: arc_swap::ArcSwapOption::new(peer), rechecked: AtomicU64::new(0), tls };
                    serve_public(&builder, watcher, TokioIo::new(stream), tsa, limits, connection).await
                });
            }
            accepted = admin.accept() => {
                let Some((stream, _)) = accepted_stream(accepted).await else { continue };
                let Some(slot) = admin_connections.open() else {
                    refuse_connection(&tsa, stream, metrics::Overload::AdminConnections);
                    continue;
                };
                let (tsa, hosts) = (tsa.clone(), admin_hosts.clone());
                let service = service_fn(move |req| {
                    let (tsa, hosts) = (tsa.clone(), hosts.clone());
                    async move {
                        if !admin_host_allowed(req.headers().get(header::HOST), &hosts) {
                            return Ok::<_, Infallible>(response(
                                StatusCode::FORBIDDEN,
                                "text/plain",
                                "this host name is not served here (server.admin_hosts)\n".into(),
                            ));
                        }
                        let mut reply = admin_route(req, &tsa).await;
                        admin_headers(reply.headers_mut());
                        Ok::<_, Infallible>(reply)
                    }
                });
                let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout, SendBy::default()));
                let served = graceful.watch(builder.serve_connection(io, service));
                spawn(async move {
                    let _slot = slot;
                    served.await
                });
            }
            () = &mut shutdown => break,
        }
    }

    // Closed now, not when the drain ends: a connection that came meanwhile would wait in the
    // backlog and then be reset; refused at once, its client (or balancer) goes elsewhere.
    drop((public, admin, https));
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("requests still in flight after 10 s; closing anyway");
        }
    }
    Ok(())
}

/// The accepted connection and its client's address; after a failed accept, `None` once a
/// short pause is over.
async fn accepted_stream(
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match accepted {
        Ok((stream, from)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, from))
        }
        Err(e) => {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Refused connections being drained at once ([`refuse_connection`]); past it one is closed
/// at once. Each holds a file descriptor for at most [`DRAIN_TIME`]: they fit in the
/// descriptors kept beside the connections ([`super::fd_limit::RESERVE`]).
const MAX_DRAINING: usize = 64;
/// How long a refused connection's request is read and discarded, at most.
const DRAIN_TIME: Duration = Duration::from_millis(500);
/// How much of it, at most.
const DRAIN_BYTES: usize = 64 * 1024;

/// Over `max_connections` (or its address's `max_connections_per_address` or rate, or the admin
/// listener's `admin_max_connections`): a fixed 503 written into the fresh socket's empty send
/// buffer and the sending side shut (FIN). What the client sent is then read and discarded,
/// briefly ([`DRAIN_TIME`], [`DRAIN_BYTES`]), before the socket is closed: a socket closed
/// with unread data sends a reset, which would make the client drop the 503 unread.
///
/// Connections refused for their address's limit drain in a quarter of the places of their
/// own, so that one address that floods cannot take the drain from clients refused because
/// the server is full.
fn refuse_connection(tsa: &Tsa, stream: tokio::net::TcpStream, limit: metrics::Overload) {
    static DRAINING: AtomicUsize = AtomicUsize::new(0);
    static DRAINING_PER_ADDRESS: AtomicUsize = AtomicUsize::new(0);
    let (draining, max) = match limit {
        metrics::Overload::ConnectionsPerAddress | metrics::Overload::NewConnectionsPerAddress => {
            (&DRAINING_PER_ADDRESS, MAX_DRAINING / 4)
        }
        _ => (&DRAINING, MAX_DRAINING - MAX_DRAINING / 4),
    };
    tsa.metrics.overloaded(limit);
    let answer = match limit {
        metrics::Overload::NewConnectionsPerAddress => tsa.connection_rate.refusal(),
        _ => admission::CONNECTIONS_EXCEEDED,
    };
    let _ = stream.try_write(answer);
    if draining.fetch_add(1, Ordering::AcqRel) >= max {
        draining.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    tokio::spawn(async move {
        drain(stream).await;
        draining.fetch_sub(1, Ordering::AcqRel);
    });
}

async fn drain(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut chunk = [0u8; 4096];
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// A connection refused because its address has `max_connections_per_address` open: logged
/// at most once a second (the metric counts them all), with the address it is counted under.
fn log_address_refused(key: AddressKey) {
    static LOG: LogLimit = LogLimit::new();
    log_refusal_of(
        &LOG,
        key,
        "connection refused: its address has max_connections_per_address open",
    );
}

/// A connection refused because its address opens them faster than
/// `new_connections_per_address_per_s`: logged at most once a second, as above.
fn log_rate_refused(key: AddressKey) {
    static LOG: LogLimit = LogLimit::new();
    log_refusal_of(
        &LOG,
        key,
        "connection refused: its address opens connections faster than new_connections_per_address_per_s",
    );
}

/// A refusal of `key`'s connection or batch, logged at most once a second by `log`.
fn log_refusal_of(log: &LogLimit, key: AddressKey, what: &'static str) {
    if let Some(left_out) = log.allow() {
        tracing::info!(address = %key, left_out, "{what}");
    }
}

/// The next connection on the HTTPS listener; never, without one.
async fn accept_on(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves one public connection, plain or TLS: each request through [`public_route`], and
/// `Connection: close` on the last one `max_requests_per_connection` allows.
fn serve_public<I>(
    builder: &http1::Builder,
    watcher: Watcher,
    io: I,
    tsa: Arc<Tsa>,
    limits: Arc<Limits>,
    connection: Connection,
) -> impl Future<Output = hyper::Result<()>> + Send + 'static
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = Arc::new(connection);
    let service = service_fn(move |req| {
        let (tsa, limits, connection) = (tsa.clone(), limits.clone(), connection.clone());
        async move {
            // Read before the request's credentials are judged: a reload from here on is seen
            // by the check after its body ([`Credentials::still_name`]).
            let reloads = tsa.credential_reloads.load(Ordering::SeqCst);
            let (peer, certificate_refused) = connection.client_certificate(&tsa);
            let link = Link {
                tls: connection.tls.is_some(),
                certificate: peer.as_deref(),
                certificate_refused,
            };
            let mut reply = public_route(req, &tsa, &limits, link, &connection, reloads).await;
            let served = connection.served.fetch_add(1, Ordering::Relaxed) + 1;
            // A certificate the configuration in force refuses stays refused on this
            // connection; a new handshake is judged afresh (without a certificate where
            // none is asked for any more).
            if served == limits.max_requests_per_connection || certificate_refused {
                reply
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(reply)
        }
    });
    watcher.watch(builder.serve_connection(io, service))
}

fn spawn(conn: impl Future<Output = hyper::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

async fn public_route(
    req: Request<Incoming>,
    tsa: &Arc<Tsa>,
    limits: &Limits,
    link: Link<'_>,
    connection: &Connection,
    reloads: u64,
) -> Reply {
    if req.uri().path() == limits.path {
        let start = Instant::now();
        let (reply, outcome) = match *req.method() {
            Method::POST if has_media_type(&req, batch::QUERY_MEDIA_TYPE) => {
                // Counts its items' outcomes itself.
                let credentials = Credentials::of(req.headers(), reloads);
                return timestamp_batch(req, tsa, limits, link, connection, credentials, start)
                    .await;
            }
            // Before anything is charged: a request of another type costs no token.
            Method::POST if !has_media_type(&req, QUERY_TYPE) => rejection(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                FailInfo::BadDataFormat,
                "the request media type must be application/timestamp-query",
            ),
            Method::POST => match authenticate(req.headers(), tsa, link, connection.ip)
                .and_then(|client| Ok((charge(tsa, &client, 1)?, client)))
            {
                Ok((taken, client)) => {
                    let credentials = Credentials::of(req.headers(), reloads);
                    timestamp(req, tsa, limits, connection, &client, taken, credentials).await
                }
                Err(denied) => denied.answer(),
            },
            _ => {
                let (mut reply, outcome) = rejection(
                    StatusCode::METHOD_NOT_ALLOWED,
                    FailInfo::BadRequest,
                    "time-stamp requests are POSTed",
                );
                reply
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                (reply, outcome)
            }
        };
        tsa.metrics.request(outcome, start.elapsed());
        return reply;
    }
    // HEAD too, as wherever GET is served (RFC 9110 9.3.2): hyper sends its headers alone.
    if req.uri().path() == "/certs" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return response(
            StatusCode::OK,
            "application/pem-certificate-chain",
            tsa.certificate().chain_pem().into(),
        );
    }
    response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// A request refused by authentication (401) or by its client's quota (429), counted and
/// logged; [`Denied::answer`] is its reply.
#[derive(Debug)]
enum Denied {
    Credentials(Refusal),
    /// How long until the quota holds the request.
    Quota(Duration),
    /// How long until the address may fail to authenticate once more
    /// (`server.auth_failures_per_address_per_s`).
    AddressFailures(Duration),
}

impl Denied {
    /// 401 with `WWW-Authenticate` and a DER `badRequest`, or 429 with `Retry-After` (whole
    /// seconds, at least 1) and a DER `systemFailure`.
    fn answer(self) -> (Reply, Outcome) {
        let (status, fail_info, reason, header, value) = match self {
            Denied::Credentials(Refusal::Unauthenticated) => (
                StatusCode::UNAUTHORIZED,
                FailInfo::BadRequest,
                "authentication required",
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="tsa""#),
            ),
            Denied::Credentials(Refusal::InvalidCredentials(_)) => (
                StatusCode::UNAUTHORIZED,
                FailInfo::BadRequest,
                "invalid credentials",
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="tsa", error="invalid_token""#),
            ),
            Denied::Quota(wait) | Denied::AddressFailures(wait) => {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    FailInfo::SystemFailure,
                    match self {
                        Denied::Quota(_) => "request quota exceeded",
                        _ => "too many failed authentications from this address",
                    },
                    header::RETRY_AFTER,
                    HeaderValue::from(seconds.max(1)),
                )
            }
        };
        let (mut reply, outcome) = rejection(status, fail_info, reason);
        reply.headers_mut().insert(header, value);
        if status == StatusCode::UNAUTHORIZED {
            // Basic is taken too (`curl -u :KEY`): clients that send credentials only when
            // challenged for their scheme are told so.
            reply.headers_mut().append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="tsa", charset="UTF-8""#),
            );
        }
        (reply, outcome)
    }
}

/// The request's client ([`super::auth`]): from its `Authorization` header and the
/// connection's verified client certificate.
fn authenticate(
    headers: &hyper::HeaderMap,
    tsa: &Tsa,
    link: Link<'_>,
    ip: Option<std::net::IpAddr>,
) -> Result<Client, Denied> {
    let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
    let (first, second) = (authorization.next(), authorization.next());
    authenticate_with(first, second.is_some(), tsa, link, ip)
}

/// [`authenticate`] with the request's `Authorization` header (the first, and whether there
/// were more). A request with one, from an address that has made its failed
/// authentications (`server.auth_failures_per_address_per_s`; `ip`), is refused before its
/// key is looked at; one whose header is refused counts as a failure of its address.
fn authenticate_with(
    authorization: Option<&HeaderValue>,
    more: bool,
    tsa: &Tsa,
    link: Link<'_>,
    ip: Option<std::net::IpAddr>,
) -> Result<Client, Denied> {
    // A failure is taken from the address before its credentials are looked at, and given
    // back where they are right: concurrent guesses cannot all pass a check made before any
    // of them failed.
    let failures = ip.filter(|_| authorization.is_some());
    if let Some(Err(_)) = failures.map(|ip| tsa.auth_failures.admit(ip)) {
        let ip = ip.expect("an address");
        let wait = tsa
            .auth_failures
            .exhausted(ip)
            .unwrap_or(Duration::from_secs(1));
        static LOG: LogLimit = LogLimit::new();
        if let Some(left_out) = LOG.allow() {
            tracing::info!(
                address = %admission::AddressKey::of(ip),
                left_out,
                "request refused: its address made too many failed authentications \
                 (server.auth_failures_per_address_per_s)"
            );
        }
        tsa.metrics
            .auth_refused(metrics::AuthRefusal::AddressFailures);
        return Err(Denied::AddressFailures(wait));
    }
    let authenticated = match more {
        // A proxy in front may have read the other one: who the client is must not depend
        // on which of them a reader takes.
        true => Err(Refusal::InvalidCredentials(
            "more than one Authorization header",
        )),
        false => tsa
            .auth
            .load()
            .authenticate(link, authorization.map(HeaderValue::as_bytes)),
    };
    if let (Ok(_), Some(ip)) = (&authenticated, failures) {
        tsa.auth_failures.give_back(ip);
    }
    authenticated.map_err(|refusal| {
        let metric = match refusal {
            Refusal::Unauthenticated => metrics::AuthRefusal::Unauthenticated,
            Refusal::InvalidCredentials(why) => {
                static LOG: LogLimit = LogLimit::new();
                if let Some(left_out) = LOG.allow() {
                    tracing::info!(
                        reason = why,
                        left_out,
                        "request refused: invalid credentials"
                    );
                }
                metrics::AuthRefusal::InvalidCredentials
            }
        };
        tsa.metrics.auth_refused(metric);
        Denied::Credentials(refusal)
    })
}

/// A request's credentials as they were when it was authenticated, before its body came
/// (which can take `read_timeout_ms`): a reload meanwhile may have removed its client,
/// rotated its key or revoked its certificate.
struct Credentials {
    /// Its `Authorization` header (a request with more than one is refused before).
    authorization: Option<HeaderValue>,
    /// `Tsa::credential_reloads` before it was authenticated (and its connection's
    /// certificate judged): a reload after that reading, even one before the request was
    /// charged, is seen.
    reloads: u64,
}

impl Credentials {
    fn of(headers: &hyper::HeaderMap, reloads: u64) -> Self {
        Self {
            authorization: headers.get(header::AUTHORIZATION).cloned(),
            reloads,
        }
    }

    /// `Ok` when they still name `client` under the configurations in force: at once where
    /// neither was reloaded since (a reload counts once in force, so one that authenticated
    /// this request under the old configuration is always seen); otherwise authenticated
    /// again.
    fn still_name(
        &self,
        client: &Client,
        tsa: &Tsa,
        connection: &Connection,
    ) -> Result<(), Denied> {
        if tsa.credential_reloads.load(Ordering::SeqCst) == self.reloads {
            return Ok(());
        }
        let (peer, certificate_refused) = connection.client_certificate(tsa);
        let link = Link {
            tls: connection.tls.is_some(),
            certificate: peer.as_deref(),
            certificate_refused,
        };
        // Authenticated and charged already: its address's failures are not asked again.
        match authenticate_with(self.authorization.as_ref(), false, tsa, link, None)? {
            again if again.name == client.name => Ok(()),
            _ => {
                static LOG: LogLimit = LogLimit::new();
                if let Some(left_out) = LOG.allow() {
                    tracing::info!(
                        left_out,
                        "request refused: its credentials name another client since a reload"
                    );
                }
                tsa.metrics
                    .auth_refused(metrics::AuthRefusal::InvalidCredentials);
                Err(Denied::Credentials(Refusal::InvalidCredentials(
                    "its credentials name another client since a reload",
                )))
            }
        }
    }
}

/// Takes `n` tokens from `client`'s quota (a batch of n requests takes n).
fn charge(tsa: &Tsa, client: &Client, n: u32) -> Result<Taken, Denied> {
    tsa.auth
        .load()
        .take(client, n)
        .map_err(|wait| quota_refused(tsa, client, n, wait))
}

/// `client` has not `n` tokens left for `wait`: counted, logged (a line a second) and 429.
fn quota_refused(tsa: &Tsa, client: &Client, n: u32, wait: Duration) -> Denied {
    tsa.metrics.auth_refused(metrics::AuthRefusal::Quota);
    static LOG: LogLimit = LogLimit::new();
    if let Some(left_out) = LOG.allow() {
        tracing::info!(
            client = client.name.as_deref().unwrap_or("anonymous"),
            tokens = n,
            retry_after_ms = wait.as_millis() as u64,
            left_out,
            "request refused: quota exceeded"
        );
    }
    Denied::Quota(wait)
}

async fn timestamp(
    req: Request<Incoming>,
    tsa: &Arc<Tsa>,
    limits: &Limits,
    connection: &Connection,
    client: &Client,
    taken: Taken,
    // Checked again after its body, should a reload have come since they were judged.
    credentials: Credentials,
) -> (Reply, Outcome) {
    let body = match read_body(req, limits.max_body, limits.read_timeout).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if let Err(denied) = credentials.still_name(client, tsa, connection) {
        return denied.answer();
    }
    let Some(_admitted) = tsa.admission.enter(1).await else {
        tsa.auth.load().give_back(client, taken);
        return overloaded(tsa, metrics::Overload::Queue);
    };
    let (der, outcome) = tsa.respond(body, client).await;
    (response(StatusCode::OK, REPLY_TYPE, der.into()), outcome)
}

/// `POST {path}` with `application/timestamp-query-batch` (`docs/batch.md`): authentication,
/// a batch place of its address's share and one of all, the body under the batch limits, its
/// outer `SEQUENCE OF` (400 when malformed, 413 over `max_batch_items`), the quota and the
/// admission for as many tokens as it has items; then every item answered on its own by
/// [`Tsa::respond_batch`], in one `SEQUENCE OF TimeStampResp` sent as a [`BatchBody`] (which
/// holds the places until it is out) with `Connection: close`. Counts the metrics itself:
/// each item's outcome, or the one refusal of a batch refused as a whole.
async fn timestamp_batch(
    req: Request<Incoming>,
    tsa: &Arc<Tsa>,
    limits: &Limits,
    link: Link<'_>,
    connection: &Connection,
    credentials: Credentials,
    start: Instant,
) -> Reply {
    let refused = |(reply, outcome): (Reply, Outcome)| {
        tsa.metrics.request(outcome, start.elapsed());
        reply
    };
    let client = match authenticate(req.headers(), tsa, link, connection.ip) {
        Ok(client) => client,
        Err(denied) => return refused(denied.answer()),
    };
    // All taken before the body is read, so that the batch bodies held at once are bounded,
    // and one client's and one address's share of them too. The shares first: a client or
    // address that has its share is refused as such (and logged), whether or not the others
    // are full.
    let shares = tsa.auth.load().has_named_clients();
    let Some(client_place) = tsa.client_batches.take(&client, shares) else {
        static LOG: LogLimit = LogLimit::new();
        if let Some(left_out) = LOG.allow() {
            tracing::info!(
                client = client.name.as_deref().unwrap_or("anonymous"),
                left_out,
                "batch refused: its client has its share of max_batches_in_flight"
            );
        }
        return refused(overloaded(tsa, metrics::Overload::BatchesPerClient));
    };
    let address_place = match connection.address.batch() {
        Ok(place) => place,
        Err(key) => {
            static LOG: LogLimit = LogLimit::new();
            log_refusal_of(
                &LOG,
                key,
                "batch refused: its address has its share of max_batches_in_flight",
            );
            return refused(overloaded(tsa, metrics::Overload::BatchesPerAddress));
        }
    };
    let Ok(place) = Arc::clone(&tsa.batches).try_acquire_owned() else {
        return refused(overloaded(tsa, metrics::Overload::Batches));
    };
    // One token once it holds its places, before its body comes, as a single request pays:
    // a batch refused before its items are taken (its body too slow, too large or not a
    // batch, over the anonymous burst or the quota) costs that one, so that a client without
    // tokens cannot hold batch places for nothing (refused here, it lets them go at once).
    // Charged for every item once they are counted.
    let held = match charge(tsa, &client, 1) {
        Ok(taken) => taken,
        Err(denied) => return refused(denied.answer()),
    };
    let body = match read_body(req, limits.max_batch_body, limits.read_timeout).await {
        Ok(body) => body,
        Err(refusal) => return refused(refusal),
    };
    // The items are slices of the body: it is freed once they are answered.
    let items: Vec<Bytes> = match batch::decode(&body, limits.max_batch_items) {
        Ok(items) => items.into_iter().map(|item| body.slice_ref(item)).collect(),
        Err(e) => {
            static LOG: LogLimit = LogLimit::new();
            if let Some(left_out) = LOG.allow() {
                tracing::info!(reason = %e, left_out, "batch refused");
            }
            let status = match e {
                batch::BatchError::TooMany { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            let rejection = e.rejection();
            let der = rejection.to_der();
            return refused((
                response(status, REPLY_TYPE, der.into()),
                Outcome::Rejected(rejection.fail_info),
            ));
        }
    };
    let count = items.len();
    let tokens = u32::try_from(count).unwrap_or(u32::MAX);
    if let Some(burst) = tsa.auth.load().over_shared_burst(&client, tokens) {
        static LOG: LogLimit = LogLimit::new();
        if let Some(left_out) = LOG.allow() {
            tracing::info!(
                items = count,
                burst,
                left_out,
                "batch refused: over the anonymous burst"
            );
        }
        return refused(rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            FailInfo::BadRequest,
            "the batch has more items than anonymous callers' burst (auth.anonymous_burst, or \
             when 0 one second of auth.anonymous_rate_per_s)",
        ));
    }
    // The one token back and every item's taken: more than the burst is taken only from a
    // full bucket, which the one held would keep from being full. Refused, the batch still
    // pays the one.
    let auth = tsa.auth.load();
    auth.give_back(&client, held);
    let taken = match charge(tsa, &client, tokens) {
        Ok(taken) => taken,
        Err(denied) => {
            let _ = auth.take(&client, 1);
            return refused(denied.answer());
        }
    };
    drop(auth);
    // After the charge: a reload that removed the client before it would have let the
    // charge find no bucket, and the batch go unpaid.
    if let Err(denied) = credentials.still_name(&client, tsa, connection) {
        let auth = tsa.auth.load();
        auth.give_back(&client, taken);
        let _ = auth.take(&client, 1);
        return refused(denied.answer());
    }
    // A batch waits for the lane in chunks (`Tsa::respond_batch`); each is one place.
    let places = count.div_ceil(super::issue::BATCH_CHUNK);
    let Some(_admitted) = tsa.admission.enter(places).await else {
        tsa.auth.load().give_back(&client, taken);
        return refused(overloaded(tsa, metrics::Overload::Queue));
    };
    drop(body);
    let answers = tsa.respond_batch(items, &client).await;
    let elapsed = start.elapsed();
    let mut servers_faults = 0u32;
    let ders: Vec<Vec<u8>> = answers
        .into_iter()
        .map(|(der, outcome)| {
            tsa.metrics.request(outcome, elapsed);
            servers_faults += u32::from(outcome.servers_fault());
            der
        })
        .collect();
    if servers_faults > 0 {
        tsa.auth
            .load()
            .forgive_debt(&client, taken.part(servers_faults));
    }
    let body = BatchBody::new(
        ders,
        connection.send_by.clone(),
        limits.write_timeout,
        Box::new((client_place, address_place, place)),
    );
    let mut reply = Response::new(ReplyBody::Right(body));
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(batch::REPLY_MEDIA_TYPE),
    );
    // A batch client is done: its connection's buffers, grown for the body and the reply,
    // go with it.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
}

/// Reads a request body of at most `max` octets within `timeout`; otherwise the refusal:
/// 413, 408 or 400 with a DER `badDataFormat`.
async fn read_body(
    req: Request<Incoming>,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, (Reply, Outcome)> {
    let too_large = || {
        rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            FailInfo::BadDataFormat,
            "the request is larger than this TSA accepts",
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    // hyper frames a body by its final `chunked` and hands the octets over as they came: any
    // other transfer coding (gzip, …) would reach the DER parser still encoded.
    let codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    let only_chunked = codings
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .all(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    if !only_chunked {
        let (mut reply, outcome) = rejection(
            StatusCode::NOT_IMPLEMENTED,
            FailInfo::BadRequest,
            "no transfer coding but chunked is supported",
        );
        // The body is left unread: the connection cannot carry another request.
        reply
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err((reply, outcome));
    }
    let body = collect(req.into_body(), max, declared);
    match tokio::time::timeout(timeout, body).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(BodyError::TooLarge)) => Err(too_large()),
        Ok(Err(BodyError::Failed)) => Err(rejection(
            StatusCode::BAD_REQUEST,
            FailInfo::BadDataFormat,
            "the request body could not be read",
        )),
        Err(_) => Err(rejection(
            StatusCode::REQUEST_TIMEOUT,
            FailInfo::BadDataFormat,
            "the request body did not arrive in time",
        )),
    }
}

enum BodyError {
    TooLarge,
    Failed,
}

/// The body's data, at most `max` octets: a body that came in one piece as it came, else
/// copied once into one buffer (sized by its `Content-Length`) as its pieces arrive, so that
/// no more than about one copy of it is held at any time.
async fn collect(
    mut body: Incoming,
    max: usize,
    declared: Option<u64>,
) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Failed)?.into_data() else {
            continue; // trailers
        };
        let held = first.as_ref().map_or(0, Bytes::len) + joined.as_ref().map_or(0, BytesMut::len);
        if data.len() > max - held {
            return Err(BodyError::TooLarge);
        }
        if let Some(buffer) = joined.as_mut() {
            append_within(buffer, &data, max);
        } else if let Some(head) = first.take() {
            let size = declared
                .map_or(0, |n| n as usize)
                .clamp(held + data.len(), max);
            let mut buffer = BytesMut::with_capacity(size);
            buffer.extend_from_slice(&head);
            buffer.extend_from_slice(&data);
            joined = Some(buffer);
        } else {
            first = Some(data);
        }
    }
    Ok(match joined {
        Some(buffer) => buffer.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// Appends `data` to `buffer`, whose length with it is at most `max`, growing it by doubling
/// but never past `max`: a body that declared no length would otherwise take up to twice its
/// limit (the allocator's doubling past it).
fn append_within(buffer: &mut BytesMut, data: &[u8], max: usize) {
    let needed = buffer.len() + data.len();
    if needed > buffer.capacity() {
        let mut grown =
            BytesMut::with_capacity((buffer.capacity() * 2).clamp(needed, max.max(needed)));
        grown.extend_from_slice(buffer);
        *buffer = grown;
    }
    buffer.extend_from_slice(data);
}

/// Whether the admin listener answers a request that names `host` (its `Host` header): an IP
/// address, `localhost` or one of `allowed` (`server.admin_hosts`), with any port. None is
/// answered too: browsers always send one, HTTP/1.0 clients need not.
fn admin_host_allowed(host: Option<&HeaderValue>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split_once(']').is_some_and(|(address, port)| {
            address.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty() || port.starts_with(':'))
        });
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _port)| name);
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// What every admin answer carries: the status page, metrics and archived tokens are the
/// operator's, read as served and never kept by a cache on the way (a browser's included).
fn admin_headers(headers: &mut hyper::HeaderMap) {
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn admin_route(req: Request<Incoming>, tsa: &Arc<Tsa>) -> Reply {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health/live") => response(StatusCode::OK, "text/plain", "live\n".into()),
        (&Method::GET, "/metrics") => response(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::encode(tsa).into(),
        ),
        (&Method::GET, "/status") => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            super::status::render(&super::status::gather(tsa)).into(),
        ),
        (&Method::GET, "/clock") => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            tsa.clock().report().into(),
        ),
        (&Method::GET, "/health/ready") => match tsa.readiness() {
            Ok(()) => response(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(reason) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n").into(),
            ),
        },
        (&Method::GET, path) if path.starts_with("/archive/") => {
            // A look-up reads the archive, and an imprint stamped many times has many records
            // to go through: on the blocking pool, not on a worker of the public listener. At
            // most MAX_LOOKUPS at once (they take the archive's reader in turn): a client that
            // asks and goes away leaves its look-up running, and must not be able to fill the
            // pool the signatures use.
            let Ok(place) = Arc::clone(&tsa.lookups).try_acquire_owned() else {
                let mut busy = response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "archive look-ups are all busy; retry later\n".into(),
                );
                busy.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return busy;
            };
            let (tsa, path) = (Arc::clone(tsa), path["/archive/".len()..].to_owned());
            let query = req.uri().query().map(str::to_owned);
            tokio::task::spawn_blocking(move || {
                let _place = place;
                archive_lookup(&tsa, &path, query.as_deref())
            })
            .await
            .unwrap_or_else(|_| {
                response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "the look-up failed\n".into(),
                )
            })
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn archive_lookup(tsa: &Tsa, path: &str, query: Option<&str>) -> Reply {
    use crate::archive::Lookup;
    let text = |status, body: String| response(status, "text/plain", body.into());
    let Some(archive) = tsa.archive() else {
        return text(StatusCode::NOT_FOUND, "the archive is not enabled\n".into());
    };
    match archive.lookup_path(path, query) {
        Lookup::Found(der, matches) => {
            let mut reply = response(StatusCode::OK, REPLY_TYPE, der.into());
            reply
                .headers_mut()
                .insert("x-archive-matches", HeaderValue::from(matches));
            reply
        }
        Lookup::NotFound => text(StatusCode::NOT_FOUND, "not found\n".into()),
        Lookup::BadRequest(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        Lookup::Failed(why) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")),
    }
}

/// Compares the media type, ignoring parameters and case (RFC 9110 8.3.1).
fn has_media_type(req: &Request<Incoming>, expected: &str) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(expected))
}

/// No place in `max_queue` within `queue_wait_ms`, or no batch place (of all, or of its
/// address's share): 503, `Retry-After` and a DER systemFailure. The body is encoded once:
/// under overload most answers are this one, and each should cost as little as possible
/// beside the requests being signed.
fn overloaded(tsa: &Tsa, limit: metrics::Overload) -> (Reply, Outcome) {
    static BODY: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
        Rejection::new(
            FailInfo::SystemFailure,
            "the TSA is overloaded; retry later",
        )
        .to_der()
        .into()
    });
    tsa.metrics.overloaded(limit);
    let mut reply = response(StatusCode::SERVICE_UNAVAILABLE, REPLY_TYPE, BODY.clone());
    reply
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    (reply, Outcome::Rejected(FailInfo::SystemFailure))
}

/// A refusal at the HTTP level, still answered with a DER `TimeStampResp`.
fn rejection(status: StatusCode, fail_info: FailInfo, reason: &'static str) -> (Reply, Outcome) {
    let der = Rejection::new(fail_info, reason).to_der();
    (
        response(status, REPLY_TYPE, der.into()),
        Outcome::Rejected(fail_info),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut reply = Response::new(ReplyBody::Left(Full::new(body)));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

#[cfg(test)]
mod tests {
    /// A body without a length, in pieces: its buffer never takes more than the limit, where
    /// doubling alone would reach nearly twice it.
    #[test]
    fn a_body_in_pieces_is_held_within_its_limit() {
        let max = 1000;
        for piece in [1, 7, 100, 333] {
            let mut buffer = bytes::BytesMut::with_capacity(2);
            let mut fed = 0;
            while fed + piece <= max {
                super::append_within(&mut buffer, &vec![fed as u8; piece], max);
                fed += piece;
                assert!(buffer.capacity() <= max, "{piece}: {}", buffer.capacity());
            }
            assert_eq!(buffer.len(), fed);
            assert!(buffer
                .chunks(piece)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == (i * piece) as u8)));
        }
    }

    use super::*;

    /// A CA certificate's end calls for one verification after it; an accepting one ends
    /// that (the certificate was not on the verified path), a refusing one does not.
    #[test]
    fn an_expired_certificate_beside_the_chain_is_verified_again_once() {
        let ends = [1_000, 5_000];
        let checked = |second: u64, refused: bool| second << 1 | u64::from(refused);
        // Never verified again since the handshake: the end passed before it is asked once.
        assert!(recheck_due(&ends, 0, 2_000));
        // Verified after it, accepted: not again until the next end.
        assert!(!recheck_due(&ends, checked(2_000, false), 2_001));
        assert!(!recheck_due(&ends, checked(2_000, false), 4_999));
        assert!(recheck_due(&ends, checked(2_000, false), 5_000));
        // Verified in its last second: asked once more after it.
        assert!(recheck_due(&ends, checked(5_000, false), 5_001));
        assert!(!recheck_due(&ends, checked(5_001, false), 9_000));
        // Refused: asked again (a reload may accept it).
        assert!(recheck_due(&ends, checked(2_000, true), 2_001));
        assert!(!recheck_due(&[], 0, 2_000));
    }

    #[test]
    fn the_admin_listener_answers_ip_addresses_localhost_and_the_names_configured() {
        let allowed = ["metrics.internal".to_string()];
        let answers =
            |host: &str| admin_host_allowed(Some(&HeaderValue::from_str(host).unwrap()), &allowed);
        for host in [
            "127.0.0.1:3181",
            "127.0.0.1",
            "10.0.0.11:3181",
            "[::1]:3181",
            "[::1]",
            "localhost:3181",
            "LOCALHOST",
            "localhost.:3181",
            "metrics.internal:3181",
        ] {
            assert!(answers(host), "{host}");
        }
        // A rebound name, a name that merely starts like an allowed one, broken brackets.
        for host in [
            "attacker.example:3181",
            "attacker.example",
            "localhost.attacker.example",
            "metrics.internal.attacker.example",
            "[::1",
            "[not-an-address]:3181",
            "[::1]junk",
        ] {
            assert!(!answers(host), "{host}");
        }
        assert!(admin_host_allowed(None, &allowed), "HTTP/1.0 without Host");
    }
}
