//! The one TOML configuration file. `config/tsa.example.toml` is the commented example.
//!
//! Relative paths are taken relative to the directory of the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use const_oid::ObjectIdentifier;
use serde::Deserialize;

use crate::alg::{oid, DigestAlgorithm};
use crate::protocol::Precision;
use crate::signer::software::RsaPadding;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub signer: SignerConfig,
    /// A planned change of signing key at a given time (`[rollover]`).
    #[serde(default)]
    pub rollover: Option<RolloverConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    #[serde(default)]
    pub auth: AuthConfig,
}

/// Where the archive keeps its data.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveBackend {
    /// An embedded SQLite database (`database`).
    #[default]
    Sqlite,
    /// A PostgreSQL database (`postgres_url`), shared by the instances of a fleet.
    Postgres,
}

/// The durable token archive and structured serial numbers (see `src/archive/LAYOUT.md`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Record every token before it is sent, with structured serials; otherwise serials are
    /// random and nothing is recorded.
    pub enabled: bool,
    pub backend: ArchiveBackend,
    /// The SQLite database.
    pub database: PathBuf,
    /// Where a new SQLite archive keeps its token records: `log` (the default), append-only
    /// files beside the database (`archive.tokens/`), or `rows` of the database, which cost
    /// the writer about twice the CPU. An archive keeps the layout it was made with.
    pub layout: crate::archive::sqlite::Layout,
    /// The token log's segments close at this size (MiB, 1 to 1024): pruning removes whole
    /// segments.
    pub log_segment_mib: u64,
    /// The state file (highest reserved serial counter, last genTime); `<file>.lock` beside it.
    pub state_file: PathBuf,
    /// This instance's id, in the serials' high octets; unique among instances.
    pub instance_id: u32,
    /// Serial counters reserved by one durable write.
    pub serial_block: u64,
    /// How often the chain head is signed (and the state file written, and pruning run).
    pub checkpoint_interval_s: u64,
    /// Records older than this are pruned (the chain keeps an anchor); 0 keeps everything.
    pub retention_days: u64,
    /// The most records one commit takes (at most [`MAX_COMMIT_RECORDS`]).
    pub max_batch: usize,
    /// Under load, how long a record may wait for others to share its commit (its fsync);
    /// unset, it depends on the server's cores ([`ArchiveConfig::commit_delay`]).
    pub commit_delay_us: Option<u64>,
    /// How long a write waits for a database locked by another process before failing.
    pub busy_timeout_ms: u64,
    /// PostgreSQL (`backend = "postgres"`): a key=value connection string or a
    /// `postgresql://` URL, without a password.
    pub postgres_url: String,
    /// PostgreSQL's password, in a file of its own (else `TSA_POSTGRES_PASSWORD`, if set).
    pub postgres_password_file: Option<PathBuf>,
    /// PostgreSQL over TLS: the CA certificates (PEM files) that the server's certificate
    /// must chain to; its name is checked against the host (libpq's `verify-full`). Makes
    /// TLS mandatory (see `src/archive/postgres/tls.rs`).
    pub postgres_ca: Vec<PathBuf>,
    /// PostgreSQL: a client certificate chain (PEM) for certificate authentication.
    pub postgres_client_certificate: Option<PathBuf>,
    /// PostgreSQL: the client certificate's private key (PEM), mode 0600, or 0640 with the
    /// service's group.
    pub postgres_client_key: Option<PathBuf>,
    /// PostgreSQL: allow `sslmode=require` without `postgres_ca`, which encrypts without
    /// authenticating the server.
    pub postgres_tls_insecure: bool,
    /// PostgreSQL: how long the instance id's lease outlives its last renewal.
    pub lease_ttl_s: u64,
}

impl ArchiveConfig {
    /// The commit delay, unless configured, of a server on one or two cores, and of one whose
    /// archive is in PostgreSQL.
    pub const BATCHING_COMMIT_DELAY: Duration = Duration::from_millis(1);

    /// How long, under load, a record may wait for others to share its commit, on a server
    /// that may run on `cores` cores: `commit_delay_us` when set; else
    /// [`Self::BATCHING_COMMIT_DELAY`] on one or two cores, or with PostgreSQL, and no wait on
    /// more cores with SQLite.
    ///
    /// The wait saves the writer's cost per commit (the fsync's system calls and wake-ups),
    /// which on few cores is taken from the signatures. On more, the writer runs beside them,
    /// and waiting for a batch only idles them: the requests it waits for are answered
    /// together, so they come back, sign and wait together again. Measured on a 16-core
    /// machine (docs/performance.md, "Scaling with cores"): with the wait, one core gave a
    /// third more tokens/s and more, two cores up to 8 % more at 256 connections; without it,
    /// four cores gave up to 6 % more and eight 4–15 % (256 connections) and 26–46 % (64)
    /// more. With PostgreSQL each commit is a round trip to a database that a fleet shares,
    /// and those figures are SQLite's: there the wait stays.
    ///
    /// `cores` are those the process may run on, not `server.workers`: the writer is a thread
    /// of its own, which competes with the signatures for the cores, not for the workers.
    pub fn commit_delay(&self, cores: usize) -> Duration {
        match self.commit_delay_us {
            Some(us) => Duration::from_micros(us),
            None if cores <= 2 || self.backend == ArchiveBackend::Postgres => {
                Self::BATCHING_COMMIT_DELAY
            }
            None => Duration::ZERO,
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            backend: ArchiveBackend::Sqlite,
            database: "archive.sqlite".into(),
            layout: Default::default(),
            log_segment_mib: 64,
            state_file: "archive.state".into(),
            instance_id: 0,
            serial_block: 10_000,
            checkpoint_interval_s: 300,
            retention_days: 0,
            max_batch: 1024,
            commit_delay_us: None,
            busy_timeout_ms: 5_000,
            postgres_url: String::new(),
            postgres_password_file: None,
            postgres_ca: Vec::new(),
            postgres_client_certificate: None,
            postgres_client_key: None,
            postgres_tls_insecure: false,
            lease_ttl_s: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The public listener for RFC 3161 requests.
    pub listen: SocketAddr,
    /// The path that takes `POST application/timestamp-query`.
    pub path: String,
    /// The admin listener (health; later metrics, status, archive look-ups).
    pub admin_listen: SocketAddr,
    /// The largest request body accepted; larger ones get 413.
    pub max_request_bytes: usize,
    /// The largest batch body (`application/timestamp-query-batch`, `docs/batch.md`) accepted;
    /// larger ones get 413.
    pub max_batch_bytes: usize,
    /// The most requests one batch may hold; more get 413.
    pub max_batch_items: usize,
    /// Batches whose bodies are read or answered at once (each holds up to
    /// `max_batch_bytes`); past it a batch gets 503 with `Retry-After` before its body is read.
    pub max_batches_in_flight: usize,
    /// Time allowed for a request's headers and then for its body.
    pub read_timeout_ms: u64,
    /// How long a write to a client may make no progress (the client reads nothing) before
    /// the connection is closed.
    pub write_timeout_ms: u64,
    /// Worker threads of the async runtime; 0 means one per core.
    pub workers: usize,
    /// Time-stamp requests admitted and not yet answered (a batch: one per chunk of 64
    /// items); past it a request waits for a place (`queue_wait_ms`).
    pub max_queue: usize,
    /// How long a request past `max_queue` waits for a place, first come first served,
    /// before it gets 503 with `Retry-After` and a DER systemFailure; 0: at once.
    pub queue_wait_ms: u64,
    /// Open connections (both listeners' public sides together); past it a new connection
    /// gets a fixed 503 and is closed.
    pub max_connections: usize,
    /// Open public connections (HTTP and HTTPS together) from one client address; past it a
    /// new connection from that address gets the same fixed 503 as past `max_connections`.
    /// While set, an address's batches in flight are held to half of `max_batches_in_flight`
    /// (at least 1) too. An IPv4-mapped IPv6 address counts as its IPv4 address, and any other
    /// IPv6 address as its /64 (one subnet, which one host or home usually owns whole). So one
    /// client cannot take every place with idle or slow connections and lock the others out.
    /// A client with many addresses is not held by it (a botnet; a host whose provider gives
    /// it a /56 or /48 has 256 or 65,536 /64s, and two /64s can hold every batch place): limits
    /// per source network belong to the firewall or balancer in front.
    /// 0 (the default): no limit. Behind a load balancer or reverse proxy every connection
    /// comes from the balancer's address, and any limit would refuse the balancer itself; set
    /// it where clients connect directly, well above what one client needs (it counts a whole
    /// NAT, or an office's /64, as one client).
    pub max_connections_per_address: usize,
    /// New public connections (HTTP and HTTPS together) one client address may open per
    /// second, after a burst of `new_connections_per_address_burst`; past it a new connection
    /// from that address gets the same fixed 503 as past `max_connections` (over TLS it is
    /// closed before the handshake). A TLS handshake costs the server seven to eight tokens' CPU,
    /// and a client can make it do one by sending a recorded ClientHello, which costs the
    /// client nothing: `max_connections_per_address` bounds the connections an address holds,
    /// this how fast it may open and drop them. Addresses are counted as there (an IPv6 /64 is
    /// one), and so, many addresses are not held by it either. 0 (the default): no limit, as a
    /// balancer in front needs; set it where clients connect directly, above what a client
    /// that opens a connection per request needs.
    pub new_connections_per_address_per_s: f64,
    /// New connections an address may open at once before the rate holds it; 0: one second's
    /// worth (at least 1); at most [`MAX_NEW_CONNECTIONS_BURST`].
    pub new_connections_per_address_burst: u32,
    /// Failed authentications (a wrong or malformed API key) one client address may make per
    /// second, after a burst of `auth_failures_per_address_burst`; past it, requests from that
    /// address that carry an `Authorization` header are answered 429 with `Retry-After`,
    /// their key not looked at, until the address has regained a failure. A key made by `tsa
    /// client new-key` (256 random bits) cannot be guessed anyway; a hash of a weaker one,
    /// configured by hand, could be guessed online without this. Addresses are counted as
    /// there (an IPv6 /64 is one). 0 (the default): no limit, as a balancer in front needs
    /// (every client's failures would count against the balancer's address, and one client
    /// with a wrong key would lock the others out).
    pub auth_failures_per_address_per_s: f64,
    /// Failed authentications an address may make at once before the rate holds it; 0: one
    /// second's worth (at least 1); at most [`MAX_NEW_CONNECTIONS_BURST`]; never taken below
    /// the worker threads plus one (each request with a key takes a failure while its key is
    /// looked at).
    pub auth_failures_per_address_burst: u32,
    /// Open connections of the admin listener, counted apart from `max_connections`; past it
    /// a new one gets the same fixed 503. Its descriptors come from those kept beside
    /// `max_connections`, hence at most [`MAX_ADMIN_CONNECTIONS`].
    pub admin_max_connections: usize,
    /// Host names the admin listener answers under, besides IP addresses and `localhost`
    /// (a request naming another host gets 403: a web page whose name was rebound to the
    /// listener's address cannot read it from the operator's browser).
    pub admin_hosts: Vec<String>,
    /// Requests served on one keep-alive connection before it is closed; 0: no limit.
    pub max_requests_per_connection: u64,
    /// The largest request head (request line and headers); larger ones get 431. 1 KiB to
    /// 1 MiB: it bounds each connection's read buffer too.
    pub max_header_bytes: usize,
    /// The HTTPS listener (the same routes as `listen`, over TLS; mutual TLS with
    /// `tls.client_ca`); none without it.
    pub https_listen: Option<SocketAddr>,
    /// The HTTPS listener's certificate, key and client certificate verification.
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:3180".parse().expect("static"),
            path: "/".into(),
            admin_listen: "127.0.0.1:3181".parse().expect("static"),
            max_request_bytes: 8 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_items: 10_000,
            max_batches_in_flight: 8,
            read_timeout_ms: 10_000,
            write_timeout_ms: 5_000,
            workers: 0,
            max_queue: 256,
            queue_wait_ms: 1_000,
            max_connections: 4096,
            max_connections_per_address: 0,
            new_connections_per_address_per_s: 0.0,
            new_connections_per_address_burst: 0,
            auth_failures_per_address_per_s: 0.0,
            auth_failures_per_address_burst: 0,
            admin_max_connections: 16,
            admin_hosts: Vec::new(),
            max_requests_per_connection: 10_000,
            max_header_bytes: 8 * 1024,
            https_listen: None,
            tls: TlsConfig::default(),
        }
    }
}

impl ServerConfig {
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub fn queue_wait(&self) -> Duration {
        Duration::from_millis(self.queue_wait_ms)
    }
}

/// The most records `archive.max_batch` lets one commit take. (The token log writes a commit
/// of more than 32 MiB, what its start takes for one torn commit, in synced parts.)
pub const MAX_COMMIT_RECORDS: usize = 2048;

/// The most `server.admin_max_connections` may be: their descriptors are part of those the
/// server keeps beside `max_connections`.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// The largest `server.new_connections_per_address_burst`.
pub const MAX_NEW_CONNECTIONS_BURST: u32 = 100_000;

/// `[server.tls]`: the HTTPS listener (`server.https_listen`).
#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM, leaf first).
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM, PKCS#8; PKCS#1 and SEC1 are read too), readable by the service
    /// alone (mode 0600, or 0640 with its group).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM files) that issue client certificates; when set, the server asks
    /// for a client certificate and verifies it against them.
    pub client_ca: Vec<PathBuf>,
    /// Refuse the TLS handshake without a valid client certificate (needs `client_ca`).
    pub require_client_certificate: bool,
    /// Certificate revocation lists (PEM or DER files) of the client CAs: a client certificate
    /// they revoke is refused in the handshake, and so is one whose revocation status none of
    /// them gives (each CA that issues client certificates, or intermediates, needs its CRL
    /// here). Read again on reload (SIGHUP). Needs `client_ca`.
    pub client_crl: Vec<PathBuf>,
}

/// `[auth]`: who may ask for tokens, and how many.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Requests without credentials are served (as the anonymous client); false: every
    /// request must authenticate (API key or client certificate).
    pub anonymous: bool,
    /// Tokens per second for all anonymous callers together (one shared bucket); 0: no limit.
    pub anonymous_rate_per_s: f64,
    /// The anonymous bucket's size; 0: one second's worth (at least 1).
    pub anonymous_burst: u32,
    /// Refuse (401) an API key that arrives on the plain HTTP listener: it has crossed the
    /// network in clear. Leave it off behind a balancer that terminates TLS.
    pub keys_over_https_only: bool,
    /// The configured clients.
    pub client: Vec<ClientConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            anonymous: true,
            anonymous_rate_per_s: 0.0,
            anonymous_burst: 0,
            keys_over_https_only: false,
            client: vec![],
        }
    }
}

/// `[[auth.client]]`: one client, known by an API key and/or a TLS client certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The name recorded in the archive with the client's tokens.
    pub name: String,
    /// Hex SHA-256 of the API key (`tsa client new-key` makes one).
    #[serde(default)]
    pub api_key_sha256: Option<String>,
    /// Hex SHA-256 of the client certificate (DER), as `tsa client cert-id` prints it.
    #[serde(default)]
    pub certificate_sha256: Option<String>,
    /// The client certificate's subject in RFC 4514 form (`CN=…,O=…,C=…`, as
    /// `openssl x509 -noout -subject -nameopt RFC2253` or `tsa client cert-id` prints it),
    /// compared by attributes and values ([`crate::server::auth::NameKey`]); only with
    /// `certificate_issuer`.
    #[serde(default)]
    pub certificate_subject: Option<String>,
    /// The subject of the CA that issues the client certificate (its issuer, as
    /// `openssl x509 -noout -issuer -nameopt RFC2253` prints it): a certificate is taken by
    /// its subject only when this CA signed it, never when another CA of
    /// `server.tls.client_ca` issued one with the same subject.
    #[serde(default)]
    pub certificate_issuer: Option<String>,
    /// Tokens per second; 0: no limit.
    #[serde(default)]
    pub rate_per_s: f64,
    /// Tokens that may be taken at once after a pause; 0: one second's worth (at least 1).
    #[serde(default)]
    pub burst: u32,
}

impl AuthConfig {
    fn validate(&self) -> anyhow::Result<()> {
        // 0 (no limit), or a rate whose refill time for the burst fits the buckets' clock
        // (nanoseconds in 64 bits): a rate so small that it does not would be no limit at all.
        let quota_ok = |rate: f64, burst: u32| {
            rate == 0.0
                || (rate.is_finite()
                    && rate >= MIN_RATE_PER_S
                    && 1e9 / rate * f64::from(burst.max(1)) < 1e18)
        };
        if !quota_ok(self.anonymous_rate_per_s, self.anonymous_burst) {
            bail!(
                "auth.anonymous_rate_per_s must be 0 (no limit) or from {MIN_RATE_PER_S} tokens \
                 per second, with anonymous_burst filled within 30 years"
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        let mut certificates = std::collections::HashSet::new();
        let mut subjects = std::collections::HashSet::new();
        for c in &self.client {
            let name = &c.name;
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                bail!("auth.client name '{name}': 1 to 128 octets of UTF-8, no control characters");
            }
            if !names.insert(name) {
                bail!("auth.client '{name}' is configured twice");
            }
            if c.api_key_sha256.is_none()
                && c.certificate_sha256.is_none()
                && c.certificate_subject.is_none()
            {
                bail!("auth.client '{name}' needs api_key_sha256, certificate_sha256 or certificate_subject");
            }
            if let Some(hash) = &c.api_key_sha256 {
                let hash = sha256_hex(hash)
                    .with_context(|| format!("auth.client '{name}': api_key_sha256"))?;
                if !keys.insert(hash) {
                    bail!("auth.client '{name}': another client has the same API key");
                }
            }
            if let Some(hash) = &c.certificate_sha256 {
                let hash = sha256_hex(hash)
                    .with_context(|| format!("auth.client '{name}': certificate_sha256"))?;
                if !certificates.insert(hash) {
                    bail!("auth.client '{name}': another client has the same certificate");
                }
            }
            match (&c.certificate_subject, &c.certificate_issuer) {
                (Some(subject), Some(issuer)) => {
                    if subject.is_empty() || issuer.is_empty() {
                        bail!("auth.client '{name}': certificate_subject or certificate_issuer empty");
                    }
                    if !subjects.insert((issuer, subject)) {
                        bail!(
                            "auth.client '{name}': another client has the same certificate_subject \
                             and certificate_issuer"
                        );
                    }
                }
                (Some(_), None) => bail!(
                    "auth.client '{name}': certificate_subject needs certificate_issuer, the subject \
                     of the CA that issues the certificate (any CA of server.tls.client_ca could \
                     issue a certificate with that subject)"
                ),
                (None, Some(_)) => {
                    bail!("auth.client '{name}': certificate_issuer without certificate_subject")
                }
                (None, None) => {}
            }
            if !quota_ok(c.rate_per_s, c.burst) {
                bail!(
                    "auth.client '{name}': rate_per_s must be 0 (no limit) or from \
                     {MIN_RATE_PER_S} tokens per second, with burst filled within 30 years"
                );
            }
        }
        Ok(())
    }
}

/// The smallest quota rate (tokens per second) other than 0, which is no limit: about one
/// token in 12 days.
pub const MIN_RATE_PER_S: f64 = 1e-6;

/// A TOML or schema error by line and column, without the source line that `toml` quotes
/// and with the quoted values of its message left out: the line may hold a secret pasted in
/// the wrong place (an API key where its hash goes), and a reload's refusal goes to the log
/// and into the archive's signed events.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let mut message = String::new();
    let mut quoted = false;
    for c in error.message().chars() {
        match (c, quoted) {
            ('"', false) => {
                message.push_str("\"…");
                quoted = true;
            }
            ('"', true) => {
                message.push('"');
                quoted = false;
            }
            (_, true) => {}
            (c, false) => message.push(c),
        }
    }
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", message.trim_end())
        }
        None => message.trim_end().to_string(),
    }
}

/// A SHA-256 value written as 64 hex digits (colons allowed, as `openssl x509 -fingerprint`
/// prints them).
pub fn sha256_hex(text: &str) -> anyhow::Result<[u8; 32]> {
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    let mut out = [0u8; 32];
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        // The value is not echoed: it may be a secret pasted in the wrong place (the API
        // key itself), and this message goes to the log and, as a reload's event, into the
        // archive's signed events.
        if text.starts_with("tsa_") {
            bail!(
                "this looks like the API key itself, not its SHA-256: configure the hash that \
                 `tsa client new-key` printed (the key is now in the configuration file: \
                 make a new one if others may read it)"
            );
        }
        bail!(
            "expected a SHA-256 as 64 hex digits, got {} characters",
            text.chars().count()
        );
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let pair = std::str::from_utf8(pair).expect("ASCII hex digits");
        *byte = u8::from_str_radix(pair, 16).expect("hex digits");
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum SignerConfig {
    /// A PKCS#8 key file used through aws-lc-rs.
    Software {
        key: PathBuf,
        certificate: PathBuf,
        /// Further certificates sent when a request sets certReq (intermediates, root).
        #[serde(default)]
        chain: Vec<PathBuf>,
        #[serde(default)]
        rsa_padding: RsaPadding,
    },
    /// A key in an HSM, used through PKCS#11 (see `hsm/README.md`).
    Pkcs11(Box<crate::signer::pkcs11::Pkcs11Config>),
}

impl SignerConfig {
    /// The RSA padding configured (`None` where the kind has no such setting); the key may
    /// still turn out not to be RSA.
    pub fn rsa_padding(&self) -> Option<crate::signer::software::RsaPadding> {
        match self {
            SignerConfig::Software { rsa_padding, .. } => Some(*rsa_padding),
            SignerConfig::Pkcs11(pkcs11) => Some(pkcs11.rsa_padding),
        }
    }
}

/// A planned key rollover: tokens whose genTime is at or after `at` are signed by `signer`
/// (with its certificate) instead of `[signer]`. Both keys are loaded and checked at start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverConfig {
    /// The instant of the change, RFC 3339 (`2027-06-01T00:00:00Z`).
    pub at: String,
    pub signer: SignerConfig,
}

impl RolloverConfig {
    /// `at` as nanoseconds since the Unix epoch.
    pub fn at_unix_ns(&self) -> anyhow::Result<u64> {
        let at = chrono::DateTime::parse_from_rfc3339(&self.at)
            .with_context(|| format!("rollover.at '{}' is not an RFC 3339 time", self.at))?;
        at.timestamp_nanos_opt()
            .and_then(|ns| u64::try_from(ns).ok())
            .with_context(|| format!("rollover.at '{}' is out of range", self.at))
    }
}

impl SignerConfig {
    /// This signer's key settings with `other`'s certificate and chain: what a reload uses,
    /// which reads certificates again but keeps the keys loaded at start.
    pub fn with_certificates_of(&self, other: &SignerConfig) -> SignerConfig {
        let (certificate, chain) = other.certificates();
        let mut kept = self.clone();
        let (to, to_chain) = match &mut kept {
            SignerConfig::Software {
                certificate, chain, ..
            } => (certificate, chain),
            SignerConfig::Pkcs11(pkcs11) => (&mut pkcs11.certificate, &mut pkcs11.chain),
        };
        *to = certificate.clone();
        *to_chain = chain.to_vec();
        kept
    }

    /// The certificate file and chain files of this signer.
    pub fn certificates(&self) -> (&PathBuf, &[PathBuf]) {
        match self {
            SignerConfig::Software {
                certificate, chain, ..
            } => (certificate, chain),
            SignerConfig::Pkcs11(pkcs11) => (&pkcs11.certificate, &pkcs11.chain),
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            SignerConfig::Software {
                key,
                certificate,
                chain,
                ..
            } => {
                resolve(key);
                resolve(certificate);
                chain.iter_mut().for_each(resolve);
            }
            SignerConfig::Pkcs11(pkcs11) => pkcs11.resolve_paths(base),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        match self {
            SignerConfig::Pkcs11(pkcs11) => pkcs11.validate(),
            SignerConfig::Software { .. } => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy of tokens whose request names none.
    pub default: String,
    /// Further policies a request may ask for.
    pub accepted: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default: oid::ETSI_BASELINE_POLICY.to_string(),
            accepted: vec![],
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClockSource {
    /// The kernel clock, trusted only while the kernel reports it synchronized.
    Kernel,
    /// The system clock with a declared accuracy; development only.
    Development,
    /// The TSA's own clock, disciplined from several NTP servers (see `src/clock/ALGORITHM.md`).
    Disciplined,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    pub source: ClockSource,
    /// The accuracy the TSA declares; it refuses to stamp when its clock cannot meet it.
    /// ETSI EN 319 421 asks for 1 s or better.
    pub max_accuracy_ms: u64,
    /// The accuracy the development clock claims for the system clock.
    pub development_accuracy_ms: u64,
    /// chronyd's command port, asked for its correction still to slew by the kernel clock
    /// where chronyd disciplines it (`src/clock/chronyd.rs`).
    pub chronyd_command: SocketAddr,
    /// NTP servers (`host:port`) of the disciplined clock; independent operators.
    pub ntp_servers: Vec<String>,
    /// How often each NTP server is polled, and how often the discipline updates.
    pub poll_interval_ms: u64,
    /// How long to wait for an NTP reply.
    pub ntp_timeout_ms: u64,
    /// Agreeing sources needed (besides a strict majority of the configured ones).
    pub min_agreeing: usize,
    /// The drift rate the error bound grows at between updates; at least 15 ppm.
    pub max_drift_ppm: f64,
    /// Updates a step of the selected sources must persist before it is followed.
    pub step_confirm_rounds: u32,
    /// Samples older than this do not count; 0 means four poll intervals.
    pub max_sample_age_ms: u64,
    /// gpsd (`host:port`, e.g. "127.0.0.1:2947") serving a GPS receiver: an independent
    /// reference (see `src/clock/gps.rs`).
    pub gpsd: Option<String>,
    /// The precision claimed for gpsd's PPS samples.
    pub gps_precision_ms: u64,
    /// The longest gpsd's serial time (TOFF, or TPV without PPS and TOFF) can lag behind the
    /// second it names: such a sample claims UTC within that much after its naive offset.
    pub gps_serial_precision_ms: u64,
    /// A GPS receiver's serial device read as NMEA, for sites without gpsd
    /// (see `src/clock/nmea.rs`).
    pub nmea_device: Option<PathBuf>,
    /// The longest the NMEA receiver's sentences can lag behind the second they name: a
    /// sample claims UTC within that much after its naive offset.
    pub nmea_precision_ms: u64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            source: ClockSource::Kernel,
            max_accuracy_ms: 1_000,
            development_accuracy_ms: 100,
            chronyd_command: "127.0.0.1:323".parse().expect("static"),
            ntp_servers: vec![],
            poll_interval_ms: 16_000,
            ntp_timeout_ms: 1_000,
            min_agreeing: 3,
            max_drift_ppm: 15.0,
            step_confirm_rounds: 4,
            max_sample_age_ms: 0,
            gpsd: None,
            gps_precision_ms: 1,
            gps_serial_precision_ms: 700,
            nmea_device: None,
            nmea_precision_ms: 700,
        }
    }
}

impl ClockConfig {
    /// The disciplined clock's settings, with server names resolved.
    pub fn disciplined(&self) -> anyhow::Result<crate::clock::service::DisciplinedConfig> {
        use std::net::ToSocketAddrs;
        let poll = Duration::from_millis(self.poll_interval_ms);
        // Each name is polled at its first address, as resolved (an IPv6 scope kept). One
        // server under two names (127.0.0.1 and [::ffff:127.0.0.1], a name and its address,
        // localhost and 127.0.0.1) would count as two agreeing sources: a name whose polled
        // address is among another's addresses (IPv4-mapped ones compared as IPv4) is refused.
        let same = |a: &std::net::SocketAddr, b: &std::net::SocketAddr| {
            a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
        };
        let mut addresses: Vec<Vec<std::net::SocketAddr>> = Vec::new();
        for name in &self.ntp_servers {
            let all: Vec<std::net::SocketAddr> = name
                .to_socket_addrs()
                .with_context(|| format!("clock.ntp_servers: cannot resolve '{name}'"))?
                .collect();
            let Some(polled) = all.first() else {
                bail!("clock.ntp_servers: '{name}' has no address");
            };
            let twin = addresses.iter().position(|other| {
                other.iter().any(|a| same(a, polled)) || all.iter().any(|a| same(a, &other[0]))
            });
            if let Some(j) = twin {
                bail!(
                    "clock.ntp_servers: '{}' and '{name}' are the same server {polled}: each \
                     source must be another server",
                    self.ntp_servers[j]
                );
            }
            addresses.push(all);
        }
        let ntp = addresses
            .iter()
            .map(|all| crate::clock::ntp::NtpServer {
                addr: all[0],
                poll,
                timeout: Duration::from_millis(self.ntp_timeout_ms),
            })
            .collect::<Vec<_>>();
        let max_age = match self.max_sample_age_ms {
            0 => poll * 4,
            ms => Duration::from_millis(ms),
        };
        let gpsd = self
            .gpsd
            .as_ref()
            .map(|addr| crate::clock::gps::GpsdSource {
                addr: addr.clone(),
                pps_precision: Duration::from_millis(self.gps_precision_ms),
                serial_precision: Duration::from_millis(self.gps_serial_precision_ms),
            });
        let nmea = self
            .nmea_device
            .as_ref()
            .map(|device| crate::clock::nmea::NmeaSource {
                device: device.clone(),
                precision: Duration::from_millis(self.nmea_precision_ms),
            });
        Ok(crate::clock::service::DisciplinedConfig {
            ntp,
            gpsd,
            nmea,
            discipline: crate::clock::discipline::DisciplineConfig {
                min_agreeing: self.min_agreeing,
                max_drift_ppm: self.max_drift_ppm,
                step_confirm_rounds: self.step_confirm_rounds,
                max_sample_age_ns: max_age.as_nanos() as u64,
                declared_accuracy_ns: Some(self.max_accuracy_ms * 1_000_000),
                ..Default::default()
            },
            update_interval: poll,
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Fractional digits of genTime: seconds, millis, micros or nanos.
    pub precision: Precision,
    /// Put the signer's subject in TSTInfo's `tsa` field.
    pub include_tsa_name: bool,
    /// Add the legacy SHA-1 ESSCertID beside ESSCertIDv2.
    pub ess_cert_id_v1: bool,
    /// Message imprint algorithms accepted in requests.
    pub accepted_digests: Vec<String>,
    /// Stop issuing (systemFailure) this many days before the signing certificate expires,
    /// so that tokens stay verifiable for a while; 0: until notAfter.
    pub min_certificate_validity_days: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            precision: Precision::Micros,
            include_tsa_name: false,
            ess_cert_id_v1: false,
            accepted_digests: DigestAlgorithm::DEFAULT_ACCEPTED
                .iter()
                .map(|d| d.name().to_string())
                .collect(),
            min_certificate_validity_days: 0,
        }
    }
}

/// Marks, as an error's context, a start refused for the configuration or a file it names
/// (a signing certificate expired or of another key, a key file that does not load): started
/// again, the TSA would meet it again. `tsa` then exits with [`Misconfigured::EXIT_STATUS`],
/// which the systemd units do not restart on (they tried every 2 s for good). Not for what may
/// pass by itself: an HSM not there yet, an archive database that does not answer, a port in
/// use.
#[derive(Debug)]
pub struct Misconfigured;

impl Misconfigured {
    /// `EX_CONFIG` (sysexits.h): listed in the units' `RestartPreventExitStatus`.
    pub const EXIT_STATUS: u8 = 78;
}

impl std::fmt::Display for Misconfigured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("configuration")
    }
}

impl Config {
    /// The PKCS#11 signers, by section: `[signer]`, `[rollover.signer]`.
    pub fn pkcs11_signers(&self) -> Vec<(&'static str, &crate::signer::pkcs11::Pkcs11Config)> {
        let rollover = self
            .rollover
            .as_ref()
            .map(|r| ("rollover.signer", &r.signer));
        [("signer", &self.signer)]
            .into_iter()
            .chain(rollover)
            .filter_map(|(section, signer)| match signer {
                SignerConfig::Pkcs11(pkcs11) => Some((section, &**pkcs11)),
                _ => None,
            })
            .collect()
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration {}: {}",
                path.display(),
                syntax_error(&text, &e)
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.signer.resolve_paths(base);
        if let Some(rollover) = &mut self.rollover {
            rollover.signer.resolve_paths(base);
        }
        self.clock.nmea_device.iter_mut().for_each(resolve);
        resolve(&mut self.archive.database);
        resolve(&mut self.archive.state_file);
        if let Some(file) = &mut self.archive.postgres_password_file {
            resolve(file);
        }
        let archive = &mut self.archive;
        archive.postgres_ca.iter_mut().for_each(resolve);
        archive
            .postgres_client_certificate
            .iter_mut()
            .for_each(resolve);
        archive.postgres_client_key.iter_mut().for_each(resolve);
        let tls = &mut self.server.tls;
        tls.certificate.iter_mut().for_each(resolve);
        tls.key.iter_mut().for_each(resolve);
        tls.client_ca.iter_mut().for_each(resolve);
        tls.client_crl.iter_mut().for_each(resolve);
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if !self.server.path.starts_with('/') {
            bail!("server.path must start with '/'");
        }
        if self.server.path == "/certs" {
            bail!("server.path cannot be /certs, where the certificate chain is served");
        }
        // The smallest request a TSA grants, a SHA-256 imprint alone, takes 56 octets.
        if self.server.max_request_bytes < 64 {
            bail!(
                "server.max_request_bytes = {} is below 64: every request would be refused",
                self.server.max_request_bytes
            );
        }
        if self.server.max_batches_in_flight == 0 {
            bail!("server.max_batches_in_flight must be positive");
        }
        // Each of these at 0 refuses everything it counts.
        for (setting, value) in [
            ("max_connections", self.server.max_connections),
            ("max_queue", self.server.max_queue),
            ("max_batch_items", self.server.max_batch_items),
        ] {
            if value == 0 {
                bail!("server.{setting} must be positive: at 0 every one would be refused");
            }
        }
        if self.server.max_batch_bytes < 64 {
            bail!(
                "server.max_batch_bytes = {} is below 64: every batch would be refused",
                self.server.max_batch_bytes
            );
        }
        if self.server.read_timeout_ms == 0 {
            bail!("server.read_timeout_ms must be positive: every request would time out at once");
        }
        // It also bounds each connection's read buffer (pipelined requests included).
        if !(1024..=1 << 20).contains(&self.server.max_header_bytes) {
            bail!(
                "server.max_header_bytes = {} is outside 1024 to 1048576: below, ordinary \
                 requests get 431; above, each connection's read buffer grows with what a \
                 client pipelines",
                self.server.max_header_bytes
            );
        }
        if self.server.write_timeout_ms == 0 {
            bail!("server.write_timeout_ms must be positive: a client that reads nothing would hold its connection for good");
        }
        if self.archive.lease_ttl_s == 0 {
            bail!("archive.lease_ttl_s must be positive");
        }
        let a = &self.archive;
        if a.serial_block < 2 || a.max_batch == 0 || a.checkpoint_interval_s == 0 {
            bail!("archive.serial_block must be at least 2, max_batch and checkpoint_interval_s positive");
        }
        if a.max_batch > MAX_COMMIT_RECORDS {
            bail!("archive.max_batch must be at most {MAX_COMMIT_RECORDS}");
        }
        if !(1..=1024).contains(&a.log_segment_mib) {
            bail!("archive.log_segment_mib must be from 1 to 1024");
        }
        if a.enabled && a.backend == ArchiveBackend::Postgres && a.postgres_url.is_empty() {
            bail!("archive.backend = \"postgres\" needs archive.postgres_url");
        }
        const DAY_MS: u64 = 86_400_000;
        if !(1..=DAY_MS).contains(&self.clock.max_accuracy_ms) {
            bail!("clock.max_accuracy_ms must be from 1 to {DAY_MS} (a day)");
        }
        // genTime's truncation counts in each token's accuracy: a unit longer than the
        // declared accuracy refuses most requests (every one truncated by more than that).
        let unit_ns = self.token.precision.unit_ns();
        if unit_ns > self.clock.max_accuracy_ms.saturating_mul(1_000_000) {
            bail!(
                "token.precision {:?} truncates genTime by up to {} ms, more than \
                 clock.max_accuracy_ms = {}: most requests would be refused",
                self.token.precision,
                unit_ns / 1_000_000,
                self.clock.max_accuracy_ms
            );
        }
        if self.token.min_certificate_validity_days > 36_500 {
            bail!("token.min_certificate_validity_days must be at most 36500 (100 years)");
        }
        // 0 would claim the development clock exact.
        if !(1..=DAY_MS).contains(&self.clock.development_accuracy_ms) {
            bail!("clock.development_accuracy_ms must be from 1 to {DAY_MS} (a day)");
        }
        if a.retention_days > 36_500 || a.checkpoint_interval_s > 7 * 86_400 {
            bail!(
                "archive.retention_days must be at most 36500 (100 years) and \
                 checkpoint_interval_s at most 604800 (a week)"
            );
        }
        // Under load every reply may wait for it.
        if a.commit_delay_us.is_some_and(|us| us > 1_000_000) {
            bail!("archive.commit_delay_us must be at most 1000000 (a second)");
        }
        if a.busy_timeout_ms > 3_600_000 {
            bail!("archive.busy_timeout_ms must be at most 3600000 (an hour)");
        }
        if self.clock.source == ClockSource::Disciplined {
            let c = &self.clock;
            // Also refuses NaN (which would freeze the bound) and infinity.
            if !(c.max_drift_ppm.is_finite() && c.max_drift_ppm >= 15.0) {
                bail!("clock.max_drift_ppm must be a number of at least 15 (RFC 5905's PHI)");
            }
            if c.poll_interval_ms > DAY_MS || c.max_sample_age_ms > DAY_MS {
                bail!(
                    "clock.poll_interval_ms and max_sample_age_ms must be at most {DAY_MS} (a day)"
                );
            }
            let mut named = std::collections::HashSet::new();
            if let Some(twice) = c.ntp_servers.iter().find(|n| !named.insert(n.trim())) {
                bail!(
                    "clock.ntp_servers lists '{twice}' twice: each source must be another server"
                );
            }
            let sources = c.ntp_servers.len()
                + usize::from(c.gpsd.is_some())
                + usize::from(c.nmea_device.is_some());
            if c.min_agreeing == 0 || sources < c.min_agreeing {
                bail!(
                    "clock.ntp_servers, gpsd and nmea_device give {sources} sources; at least clock.min_agreeing = {} are needed",
                    c.min_agreeing
                );
            }
            if sources == 1 && c.nmea_device.is_some() {
                bail!(
                    "clock.nmea_device cannot be the clock's only source: NMEA does not say \
                     whether the receiver knows the GPS-UTC offset (after a cold start a \
                     receiver can give UTC whole seconds off until its almanac arrives, 12.5 \
                     minutes); add NTP servers, or read the receiver through gpsd (clock.gpsd), \
                     which does say"
                );
            }
            if let Some(gpsd) = &c.gpsd {
                let port = gpsd
                    .rsplit_once(':')
                    .map(|(host, port)| (host, port.parse::<u16>()));
                if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                    bail!("clock.gpsd must be host:port, such as \"127.0.0.1:2947\"; got '{gpsd}'");
                }
            }
            let precisions = [
                c.gps_precision_ms,
                c.gps_serial_precision_ms,
                c.nmea_precision_ms,
            ];
            if precisions.iter().any(|p| !(1..=16_000).contains(p)) {
                bail!("clock.gps_precision_ms, gps_serial_precision_ms and nmea_precision_ms must be from 1 to 16000 (RFC 5905's largest distance)");
            }
            if c.poll_interval_ms == 0 || c.ntp_timeout_ms == 0 {
                bail!("clock.poll_interval_ms and ntp_timeout_ms must be positive");
            }
            // One round would follow any step the majority makes at once: no confirmation.
            if c.step_confirm_rounds < 2 {
                bail!("clock.step_confirm_rounds must be at least 2");
            }
            // NTP servers answer once a poll, within their timeout (GPS receivers report every
            // second).
            let between_samples = c.poll_interval_ms.saturating_add(c.ntp_timeout_ms);
            if !c.ntp_servers.is_empty()
                && c.max_sample_age_ms != 0
                && c.max_sample_age_ms <= between_samples
            {
                bail!(
                    "clock.max_sample_age_ms = {} is not above poll_interval_ms + ntp_timeout_ms \
                     = {between_samples}: the NTP servers' samples would be too old before their \
                     next one",
                    c.max_sample_age_ms,
                );
            }
        }
        self.signer.validate()?;
        if let Some(rollover) = &self.rollover {
            rollover.signer.validate()?;
            rollover.at_unix_ns()?;
        }
        if self.server.max_connections_per_address > self.server.max_connections {
            bail!(
                "server.max_connections_per_address must be at most max_connections ({}); 0: no limit",
                self.server.max_connections
            );
        }
        let rate = self.server.new_connections_per_address_per_s;
        if !(rate == 0.0 || (rate.is_finite() && rate >= 0.01)) {
            bail!(
                "server.new_connections_per_address_per_s must be 0 (no limit) or at least 0.01 \
                 (one connection in 100 s)"
            );
        }
        if rate == 0.0 && self.server.new_connections_per_address_burst > 0 {
            bail!(
                "server.new_connections_per_address_burst is set, but new_connections_per_address_per_s \
                 is 0 (no limit): set the rate too, or remove the burst"
            );
        }
        let failures = self.server.auth_failures_per_address_per_s;
        if !(failures == 0.0 || (failures.is_finite() && failures >= 0.001)) {
            bail!(
                "server.auth_failures_per_address_per_s must be 0 (no limit) or at least 0.001 \
                 (one failure in 1000 s)"
            );
        }
        if failures == 0.0 && self.server.auth_failures_per_address_burst > 0 {
            bail!(
                "server.auth_failures_per_address_burst is set, but \
                 auth_failures_per_address_per_s is 0 (no limit): set the rate too, or remove \
                 the burst"
            );
        }
        if self.server.auth_failures_per_address_burst > MAX_NEW_CONNECTIONS_BURST {
            bail!(
                "server.auth_failures_per_address_burst must be at most \
                 {MAX_NEW_CONNECTIONS_BURST} (0: one second's worth)"
            );
        }
        if self.server.new_connections_per_address_burst > MAX_NEW_CONNECTIONS_BURST {
            bail!(
                "server.new_connections_per_address_burst must be at most \
                 {MAX_NEW_CONNECTIONS_BURST} (0: one second's worth)"
            );
        }
        if !(1..=MAX_ADMIN_CONNECTIONS).contains(&self.server.admin_max_connections) {
            bail!("server.admin_max_connections must be 1 to {MAX_ADMIN_CONNECTIONS}");
        }
        // Compared with a request's Host without its port and trailing dot, whatever the case.
        if let Some(name) = self.server.admin_hosts.iter().find(|name| {
            name.is_empty()
                || name.ends_with('.')
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        }) {
            bail!(
                "server.admin_hosts: {name:?} is not a host name (letters, digits, '-' and '.'; \
                 no port, no trailing dot)"
            );
        }
        let tls = &self.server.tls;
        if self.server.https_listen.is_some() && (tls.certificate.is_none() || tls.key.is_none()) {
            bail!("server.https_listen needs server.tls.certificate and server.tls.key");
        }
        if tls.require_client_certificate && tls.client_ca.is_empty() {
            bail!("server.tls.require_client_certificate needs server.tls.client_ca");
        }
        if !tls.client_crl.is_empty() && tls.client_ca.is_empty() {
            bail!("server.tls.client_crl needs server.tls.client_ca");
        }
        self.auth.validate()?;
        let by_certificate = self
            .auth
            .client
            .iter()
            .find(|c| c.certificate_sha256.is_some() || c.certificate_subject.is_some());
        if let (Some(client), true) = (by_certificate, tls.client_ca.is_empty()) {
            bail!(
                "auth.client '{}' is known by its certificate, which needs server.tls.client_ca",
                client.name
            );
        }
        let digests = self.digests()?;
        let (default, accepted) = self.policies()?;
        // ETSI EN 319 421 and EN 319 422: tokens under the baseline policy declare an accuracy
        // of 1 s or better. (The development clock's tokens carry the development policy.)
        let etsi = self.clock.source != ClockSource::Development
            && std::iter::once(default)
                .chain(accepted)
                .any(|p| p == oid::ETSI_BASELINE_POLICY);
        if etsi && self.clock.max_accuracy_ms > 1_000 {
            bail!(
                "clock.max_accuracy_ms = {} is over 1000: tokens under the ETSI baseline policy \
                 ({}) must declare an accuracy of 1 s or better",
                self.clock.max_accuracy_ms,
                oid::ETSI_BASELINE_POLICY
            );
        }
        // A stamp of an MD5 or SHA-1 imprint binds no single document (collisions with a
        // chosen prefix are made): ETSI TS 119 312 keeps neither for new signatures.
        if let Some(broken) = digests.iter().find(|d| d.is_broken()).filter(|_| etsi) {
            bail!(
                "token.accepted_digests lists {}, whose collisions can be made: tokens under the \
                 ETSI baseline policy ({}) do not stamp it (ETSI TS 119 312); accept it under a \
                 policy of your own only",
                broken.name(),
                oid::ETSI_BASELINE_POLICY
            );
        }
        Ok(())
    }

    pub fn digests(&self) -> anyhow::Result<Vec<DigestAlgorithm>> {
        self.token
            .accepted_digests
            .iter()
            .map(|name| {
                DigestAlgorithm::from_name(name)
                    .with_context(|| format!("token.accepted_digests: unknown digest '{name}'"))
            })
            .collect()
    }

    /// The default policy and the further accepted ones.
    pub fn policies(&self) -> anyhow::Result<(ObjectIdentifier, Vec<ObjectIdentifier>)> {
        let parse = |s: &String| {
            ObjectIdentifier::new(s).with_context(|| format!("policy '{s}' is not an OID"))
        };
        let default = parse(&self.policy.default)?;
        let accepted = self
            .policy
            .accepted
            .iter()
            .map(parse)
            .collect::<Result<_, _>>()?;
        Ok((default, accepted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_error_quotes_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsa.toml");
        let secret = "tsa_Zm9vYmFyYmF6cXV4cXV1eHh5enp5eHh4eHh4eHh4eHg";
        for (text, at) in [
            (
                format!("[auth]\n[[auth.client]]\nname = \"a\"\napi_key = \"{secret}\"\n"),
                "line 4",
            ),
            (
                format!("[auth]\n[[auth.client]]\nname = \"a\"\nrate_per_s = \"{secret}\"\n"),
                "line 4",
            ),
            (format!("[auth]\nanonymous = {secret}\n"), "line 2"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let error = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(!error.contains(&secret[4..12]), "{error}");
            assert!(error.contains(at), "{error}");
        }
    }

    #[test]
    fn a_bad_sha256_is_refused_without_echoing_it() {
        let hash = "ab".repeat(32);
        assert_eq!(sha256_hex(&hash).unwrap(), [0xab; 32]);
        let colons = hash
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap());
        assert_eq!(
            sha256_hex(&colons.collect::<Vec<_>>().join(":")).unwrap(),
            [0xab; 32]
        );
        let key = "tsa_Zm9vYmFyYmF6cXV4cXV1eHh5enp5eHh4eHh4eHh4eHg";
        let err = sha256_hex(key).unwrap_err().to_string();
        assert!(err.contains("the API key itself"), "{err}");
        assert!(!err.contains(&key[4..]), "{err}");
        let secret = "not-a-hash-but-a-secret";
        let err = sha256_hex(secret).unwrap_err().to_string();
        assert!(
            err.contains("got 23 characters") && !err.contains(secret),
            "{err}"
        );
    }

    #[test]
    fn zero_timeouts_are_refused_with_the_setting_named() {
        let text = include_str!("../config/tsa.example.toml");
        for (setting, section) in [
            ("read_timeout_ms", "server"),
            ("write_timeout_ms", "server"),
            ("lease_ttl_s", "archive"),
        ] {
            let mut config: toml::Table = text.parse().unwrap();
            config[section]
                .as_table_mut()
                .unwrap()
                .insert(setting.into(), toml::Value::Integer(0));
            let config: Config = config.try_into().unwrap();
            let refused = config.validate().unwrap_err().to_string();
            assert!(
                refused.contains(&format!("{section}.{setting} must be positive")),
                "{refused}"
            );
        }
    }

    #[test]
    fn the_example_configuration_parses_and_matches_the_defaults() {
        let text = include_str!("../config/tsa.example.toml");
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let defaults = ServerConfig::default();
        assert_eq!(config.server.listen, defaults.listen);
        assert_eq!(config.server.max_request_bytes, defaults.max_request_bytes);
        assert_eq!(config.server.max_batch_bytes, defaults.max_batch_bytes);
        assert_eq!(config.server.max_batch_items, defaults.max_batch_items);
        assert_eq!(
            config.server.max_batches_in_flight,
            defaults.max_batches_in_flight
        );
        assert_eq!(config.server.read_timeout_ms, defaults.read_timeout_ms);
        assert_eq!(config.server.write_timeout_ms, defaults.write_timeout_ms);
        assert_eq!(
            config.server.max_connections_per_address,
            defaults.max_connections_per_address
        );
        assert_eq!(
            (
                config.server.new_connections_per_address_per_s,
                config.server.new_connections_per_address_burst
            ),
            (
                defaults.new_connections_per_address_per_s,
                defaults.new_connections_per_address_burst
            )
        );
        assert_eq!(
            config.clock.max_accuracy_ms,
            ClockConfig::default().max_accuracy_ms
        );
        assert_eq!(
            config.token.accepted_digests,
            TokenConfig::default().accepted_digests
        );
        assert_eq!(config.policy.default, PolicyConfig::default().default);
        let (archive, defaults) = (&config.archive, ArchiveConfig::default());
        assert_eq!(
            (
                archive.enabled,
                &archive.database,
                &archive.state_file,
                archive.instance_id,
                archive.serial_block,
                archive.checkpoint_interval_s,
                archive.retention_days,
                archive.max_batch,
                archive.commit_delay_us,
                archive.busy_timeout_ms,
            ),
            (
                defaults.enabled,
                &defaults.database,
                &defaults.state_file,
                defaults.instance_id,
                defaults.serial_block,
                defaults.checkpoint_interval_s,
                defaults.retention_days,
                defaults.max_batch,
                defaults.commit_delay_us,
                defaults.busy_timeout_ms,
            )
        );
        let (auth, defaults) = (&config.auth, AuthConfig::default());
        assert_eq!(
            (
                auth.anonymous,
                auth.anonymous_rate_per_s,
                auth.anonymous_burst,
                auth.client.len()
            ),
            (
                defaults.anonymous,
                defaults.anonymous_rate_per_s,
                defaults.anonymous_burst,
                0
            )
        );
        let tls = &config.server.tls;
        assert_eq!(config.server.https_listen, None);
        assert!(tls.certificate.is_none() && tls.client_ca.is_empty());
        assert!(!tls.require_client_certificate);
    }

    #[test]
    fn gps_sources_count_towards_min_agreeing() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n\
                    [clock]\nsource = \"disciplined\"\nntp_servers = [\"127.0.0.1:123\"]\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).unwrap();
        assert!(parse("min_agreeing = 2\n").validate().is_err());
        // An NMEA receiver alone: it cannot tell whether its UTC has the right leap seconds.
        let nmea_only = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n\
                         [clock]\nsource = \"disciplined\"\nmin_agreeing = 1\n\
                         nmea_device = \"/dev/ttyS0\"\n";
        let error = toml::from_str::<Config>(nmea_only)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("only source"), "{error}");
        let gps =
            parse("min_agreeing = 3\ngpsd = \"127.0.0.1:2947\"\nnmea_device = \"/dev/ttyS0\"\n");
        gps.validate().unwrap();
        let disciplined = gps.clock.disciplined().unwrap();
        let gpsd = disciplined.gpsd.unwrap();
        assert_eq!(gpsd.pps_precision, Duration::from_millis(1));
        // Serial time lags its second by up to 700 ms.
        assert_eq!(gpsd.serial_precision, Duration::from_millis(700));
        assert_eq!(
            disciplined.nmea.unwrap().precision,
            Duration::from_millis(700)
        );
        assert!(parse(
            "min_agreeing = 4\ngpsd = \"127.0.0.1:2947\"\nnmea_device = \"/dev/ttyS0\"\n"
        )
        .validate()
        .is_err());
        for bad in [
            "gpsd = \"localhost\"\n",
            "gpsd = \":2947\"\n",
            "gps_precision_ms = 0\n",
        ] {
            assert!(parse(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_that_would_break_the_clock_or_the_archive_are_refused() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let disciplined = "[clock]\nsource = \"disciplined\"\nmin_agreeing = 1\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).unwrap();
        let servers = "ntp_servers = [\"127.0.0.1:123\", \"127.0.0.2:123\"]\n";
        parse(&format!("{disciplined}{servers}"))
            .validate()
            .unwrap();
        parse("[archive]\nmax_batch = 2048\n").validate().unwrap();
        parse("[archive]\ncommit_delay_us = 1000000\n[clock]\ndevelopment_accuracy_ms = 1\n")
            .validate()
            .unwrap();
        parse("[server]\nmax_connections = 1\nmax_queue = 1\nmax_batch_items = 1\n")
            .validate()
            .unwrap();
        for bad in [
            format!("{disciplined}{servers}max_drift_ppm = nan\n"),
            format!("{disciplined}{servers}max_drift_ppm = inf\n"),
            format!("{disciplined}{servers}poll_interval_ms = 9223372036854775807\n"),
            format!("{disciplined}{servers}max_sample_age_ms = 9223372036854775807\n"),
            format!("{disciplined}ntp_servers = [\"127.0.0.1:123\", \"127.0.0.1:123\"]\n"),
            "[clock]\nmax_accuracy_ms = 18446744073709551\n".into(),
            "[archive]\nretention_days = 213504\n".into(),
            "[archive]\ncheckpoint_interval_s = 9223372036854775807\n".into(),
            "[archive]\nbusy_timeout_ms = 2147483648\n".into(),
            "[clock]\ndevelopment_accuracy_ms = 9223372036854775807\n".into(),
            format!("{disciplined}{servers}gps_serial_precision_ms = 9223372036854775807\n"),
            format!("{disciplined}{servers}nmea_precision_ms = 16001\n"),
            "[archive]\nmax_batch = 2049\n".into(),
            "[clock]\nmax_accuracy_ms = 999\n[token]\nprecision = \"seconds\"\n".into(),
            "[server]\nmax_request_bytes = 0\n".into(),
            "[server]\nmax_connections = 0\n".into(),
            "[server]\nmax_queue = 0\n".into(),
            "[server]\nmax_batch_items = 0\n".into(),
            "[server]\nmax_batch_bytes = 63\n".into(),
            "[archive]\ncommit_delay_us = 1000001\n".into(),
            "[clock]\ndevelopment_accuracy_ms = 0\n".into(),
            "[server]\nmax_header_bytes = 0\n".into(),
            "[server]\nmax_header_bytes = 1048577\n".into(),
            "[server]\npath = \"/certs\"\n".into(),
            format!("{disciplined}{servers}poll_interval_ms = 16000\nmax_sample_age_ms = 16000\n"),
        ] {
            assert!(parse(&bad).validate().is_err(), "{bad}");
        }
        parse("[clock]\nmax_accuracy_ms = 1000\n[token]\nprecision = \"seconds\"\n")
            .validate()
            .unwrap();
        // Two names of one server: found once they are resolved (an IPv4-mapped IPv6
        // address as its IPv4 one).
        for twin in ["127.0.0.1:0123", "[::ffff:127.0.0.1]:123"] {
            let twins = parse(&format!(
                "{disciplined}ntp_servers = [\"127.0.0.1:123\", \"127.0.0.2:123\", \"{twin}\"]\n"
            ));
            twins.validate().unwrap();
            let Err(error) = twins.clock.disciplined() else {
                panic!("two names of one server accepted: {twin}");
            };
            let error = error.to_string();
            assert!(error.contains("the same server"), "{error}");
        }
        // A link-local server keeps its scope: it is polled as resolved.
        let scoped = parse(&format!(
            "{disciplined}ntp_servers = [\"[fe80::1%2]:123\", \"127.0.0.1:123\", \"127.0.0.2:123\"]\n"
        ));
        let resolved = scoped.clock.disciplined().unwrap();
        match resolved.ntp[0].addr {
            std::net::SocketAddr::V6(v6) => assert_eq!(v6.scope_id(), 2),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        assert!(toml::from_str::<Config>(&format!("{base}[server]\nlisten_typo = 1\n")).is_err());
        let bad_digest: Config =
            toml::from_str(&format!("{base}[token]\naccepted_digests = [\"sha999\"]\n")).unwrap();
        assert!(bad_digest.validate().is_err());
        let bad_policy: Config =
            toml::from_str(&format!("{base}[policy]\ndefault = \"x.y\"\n")).unwrap();
        assert!(bad_policy.validate().is_err());
        for admin in ["0", "65"] {
            let config: Config = toml::from_str(&format!(
                "{base}[server]\nadmin_max_connections = {admin}\n"
            ))
            .unwrap();
            assert!(config.validate().is_err(), "admin_max_connections {admin}");
        }
        let admin_hosts = |names: &str| {
            toml::from_str::<Config>(&format!("{base}[server]\nadmin_hosts = [{names}]\n"))
                .unwrap()
                .validate()
        };
        admin_hosts(r#""metrics.internal", "tsa-1""#).unwrap();
        for bad in [
            r#""""#,
            r#""metrics.internal.""#,
            r#""tsa:3181""#,
            r#""a b""#,
        ] {
            let error = admin_hosts(bad).unwrap_err().to_string();
            assert!(error.contains("admin_hosts"), "{bad}: {error}");
        }
        let per_address = |n: usize| {
            toml::from_str::<Config>(&format!(
                "{base}[server]\nmax_connections = 100\nmax_connections_per_address = {n}\n"
            ))
            .unwrap()
            .validate()
        };
        per_address(0).unwrap();
        per_address(100).unwrap();
        let refused = per_address(101).unwrap_err().to_string();
        assert!(refused.contains("max_connections_per_address"), "{refused}");
    }

    #[test]
    fn the_new_connection_rate_is_a_number_at_least_zero() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let rate = |value: &str| {
            toml::from_str::<Config>(&format!(
                "{base}[server]\nnew_connections_per_address_per_s = {value}\n"
            ))
            .unwrap()
            .validate()
        };
        rate("0").unwrap();
        rate("0.25").unwrap();
        rate("200").unwrap();
        rate("0.01").unwrap();
        for wrong in ["-1", "nan", "inf", "0.001"] {
            let refused = rate(wrong).unwrap_err().to_string();
            assert!(
                refused.contains("new_connections_per_address_per_s"),
                "{refused}"
            );
        }
        let burst = |n: u32| {
            toml::from_str::<Config>(&format!(
                "{base}[server]\nnew_connections_per_address_per_s = 1\n\
                 new_connections_per_address_burst = {n}\n"
            ))
            .unwrap()
            .validate()
        };
        burst(MAX_NEW_CONNECTIONS_BURST).unwrap();
        // A burst without a rate would be ignored: refused instead.
        let alone = toml::from_str::<Config>(&format!(
            "{base}[server]\nnew_connections_per_address_burst = 10\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            alone.contains("new_connections_per_address_per_s"),
            "{alone}"
        );
        let refused = burst(MAX_NEW_CONNECTIONS_BURST + 1)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("new_connections_per_address_burst"),
            "{refused}"
        );
    }

    /// A quota whose refill time does not fit the buckets' clock was no limit at all (the
    /// arithmetic saturated): refused, with 0 still meaning no limit.
    #[test]
    fn a_quota_too_small_to_count_is_refused() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let key = "00".repeat(32);
        let client = |rate: &str, burst: u32| {
            toml::from_str::<Config>(&format!(
                "{base}[[auth.client]]\nname = \"a\"\napi_key_sha256 = \"{key}\"\n\
                 rate_per_s = {rate}\nburst = {burst}\n"
            ))
            .unwrap()
            .validate()
        };
        let anonymous = |rate: &str, burst: u32| {
            toml::from_str::<Config>(&format!(
                "{base}[auth]\nanonymous_rate_per_s = {rate}\nanonymous_burst = {burst}\n"
            ))
            .unwrap()
            .validate()
        };
        for (rate, burst) in [("0", 10), ("1e-6", 10), ("50", 100)] {
            client(rate, burst).unwrap();
            anonymous(rate, burst).unwrap();
        }
        for (rate, burst) in [
            ("1e-11", 1),
            ("1e-9", 20),
            ("-1", 1),
            ("nan", 1),
            ("inf", 1),
        ] {
            let refused = client(rate, burst).unwrap_err().to_string();
            assert!(refused.contains("rate_per_s"), "{rate}: {refused}");
            let refused = anonymous(rate, burst).unwrap_err().to_string();
            assert!(
                refused.contains("anonymous_rate_per_s"),
                "{rate}: {refused}"
            );
        }
    }

    #[test]
    fn the_commit_delay_depends_on_the_cores_unless_configured() {
        let archive = |text: &str| toml::from_str::<ArchiveConfig>(text).unwrap();
        let unset = archive("enabled = true\n");
        assert_eq!(unset.commit_delay_us, None);
        for cores in [0, 1, 2] {
            assert_eq!(
                unset.commit_delay(cores),
                ArchiveConfig::BATCHING_COMMIT_DELAY
            );
        }
        assert_eq!(unset.commit_delay(3), Duration::ZERO);
        assert_eq!(unset.commit_delay(16), Duration::ZERO);
        // A configured delay holds on any number of cores, none included.
        for (us, cores) in [(250, 1), (250, 8), (0, 1), (3_000, 4)] {
            let set = archive(&format!("commit_delay_us = {us}\n"));
            assert_eq!(set.commit_delay(cores), Duration::from_micros(us));
        }
        // PostgreSQL keeps the wait on any number of cores.
        let postgres = archive("backend = \"postgres\"\n");
        assert_eq!(
            postgres.commit_delay(16),
            ArchiveConfig::BATCHING_COMMIT_DELAY
        );
    }

    #[test]
    fn the_etsi_policy_needs_an_accuracy_of_one_second_or_better() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).unwrap();
        let etsi = oid::ETSI_BASELINE_POLICY;
        let other = oid::DEVELOPMENT_POLICY;
        parse("[clock]\nmax_accuracy_ms = 1000\n")
            .validate()
            .unwrap();
        // The baseline policy is the default one.
        let error = parse("[clock]\nmax_accuracy_ms = 1001\n")
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("ETSI"), "{error}");
        // ... or one a request may ask for.
        let offered = format!(
            "[clock]\nmax_accuracy_ms = 2000\n[policy]\ndefault = \"{other}\"\naccepted = [\"{etsi}\"]\n"
        );
        assert!(parse(&offered).validate().is_err());
        // Without it, a coarser accuracy is the operator's to declare.
        let own = format!("[clock]\nmax_accuracy_ms = 2000\n[policy]\ndefault = \"{other}\"\n");
        parse(&own).validate().unwrap();
        parse("[clock]\nsource = \"development\"\nmax_accuracy_ms = 2000\n")
            .validate()
            .unwrap();
    }

    #[test]
    fn failed_authentications_per_address_are_a_rate_and_a_burst() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).unwrap();
        let server = |lines: &str| parse(&format!("[server]\n{lines}")).validate();
        server("auth_failures_per_address_per_s = 0.1\nauth_failures_per_address_burst = 20\n")
            .unwrap();
        server("auth_failures_per_address_per_s = 0.001\n").unwrap();
        for refused in [
            "auth_failures_per_address_per_s = 0.0005\n",
            "auth_failures_per_address_per_s = -1\n",
            "auth_failures_per_address_per_s = nan\n",
            "auth_failures_per_address_burst = 5\n",
            "auth_failures_per_address_per_s = 1\nauth_failures_per_address_burst = 100001\n",
        ] {
            let error = server(refused).unwrap_err().to_string();
            assert!(
                error.contains("auth_failures_per_address"),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn the_etsi_policy_stamps_no_imprint_whose_collisions_can_be_made() {
        let base = "[signer]\nkind = \"software\"\nkey = \"k\"\ncertificate = \"c\"\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).unwrap();
        let other = oid::DEVELOPMENT_POLICY;
        for broken in ["md5", "sha1"] {
            let digests = format!("[token]\naccepted_digests = [\"sha256\", \"{broken}\"]\n");
            let error = parse(&digests).validate().unwrap_err().to_string();
            assert!(error.contains(broken) && error.contains("ETSI"), "{error}");
            // Under a policy of the operator's own, it is the operator's to accept.
            parse(&format!("{digests}[policy]\ndefault = \"{other}\"\n"))
                .validate()
                .unwrap();
        }
        parse("[token]\naccepted_digests = [\"sha256\", \"sha224\"]\n")
            .validate()
            .unwrap();
    }
}
