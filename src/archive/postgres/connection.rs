//! How the archive reaches PostgreSQL: `postgres_url` (a key=value string or a
//! `postgresql://` URL, never with a password), the password from `postgres_password_file`
//! or `TSA_POSTGRES_PASSWORD`, bounded connect and TCP user timeouts, and TLS by `sslmode`
//! and the `postgres_ca`, client certificate and `postgres_tls_insecure` settings
//! ([`super::tls`]).

use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, NoTls};

use super::tls::{certificate_hint, tls_settings, MakeRustls};
use crate::archive::store::StoreError;
use crate::config::ArchiveConfig;

/// How to connect, checked and loaded once (files read, the TLS configuration built) and
/// kept for reconnections.
#[derive(Clone)]
pub struct Connection {
    pg: postgres::Config,
    /// None: plain connections (`sslmode=disable`).
    tls: Option<MakeRustls>,
    /// `postgres_ca`, for the error when the server's certificate is refused.
    ca: Vec<std::path::PathBuf>,
    /// Each session's settings ([`connect`]).
    session: String,
}

/// `connect_timeout` when `postgres_url` sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `tcp_user_timeout` (unacknowledged data on an open connection) when `postgres_url` sets none.
const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `connect_timeout` or `tcp_user_timeout` accepted.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// TCP keepalive (idle time, then probes apart, and how many unanswered end the connection)
/// when `postgres_url` sets none, on this side and asked of the server for its side: a host
/// that stopped answering while nothing was left unacknowledged (a COMMIT the network took,
/// then no reply) is found within seconds, not after the system's two hours idle.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(5), Duration::from_secs(2), 3);
/// tokio-postgres's own `keepalives_idle`, which the URL did not change where it is this.
const KEEPALIVE_IDLE_UNSET: Duration = Duration::from_secs(2 * 60 * 60);

/// The connection settings: `postgres_url` (a key=value string or a `postgresql://` URL,
/// without a password), the password from `postgres_password_file` or the
/// `TSA_POSTGRES_PASSWORD` environment variable, and TLS by `sslmode` and the `postgres_ca`,
/// `postgres_client_certificate`/`_key` and `postgres_tls_insecure` settings
/// ([`super::tls`]).
pub fn connection(config: &ArchiveConfig) -> Result<Connection, StoreError> {
    let mut pg: postgres::Config = config.postgres_url.parse().map_err(|e| {
        let hint = if config.postgres_url.contains("sslmode=verify") {
            " (sslmode takes disable, prefer or require here: use sslmode=require with \
             archive.postgres_ca, which verifies the server as verify-full does)"
        } else {
            ""
        };
        StoreError(format!("archive.postgres_url: {e}{hint}"))
    })?;
    if pg.get_password().is_some() {
        return Err(StoreError(
            "archive.postgres_url must not hold a password: use postgres_password_file or \
             TSA_POSTGRES_PASSWORD"
                .into(),
        ));
    }
    if let Some(file) = &config.postgres_password_file {
        // A secret as the keys and the PIN are: refused where other users may read it.
        let read = || -> anyhow::Result<String> {
            let mut opened = std::fs::File::open(file)?;
            crate::files::ensure_private(&opened, &file.display())?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut opened, &mut text)?;
            Ok(text)
        };
        let text =
            read().map_err(|e| StoreError(format!("cannot use {}: {e:#}", file.display())))?;
        pg.password(text.trim_end_matches(['\n', '\r']));
    } else if let Ok(password) = std::env::var("TSA_POSTGRES_PASSWORD") {
        pg.password(password);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("tsa");
    }
    // A database host that vanishes without closing the connection must not hold requests
    // until the operating system's TCP timeout (minutes): bounded defaults, unless the URL
    // sets its own.
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
    }
    if pg.get_keepalives_idle() == KEEPALIVE_IDLE_UNSET {
        pg.keepalives_idle(KEEPALIVE.0);
    }
    if pg.get_keepalives_interval().is_none() {
        pg.keepalives_interval(KEEPALIVE.1);
    }
    if pg.get_keepalives_retries().is_none() {
        pg.keepalives_retries(KEEPALIVE.2);
    }
    // Seconds here, where libpq reads tcp_user_timeout in milliseconds: a value copied from a
    // libpq setting would hold requests for hours.
    for (name, timeout) in [
        ("connect_timeout", pg.get_connect_timeout()),
        ("tcp_user_timeout", pg.get_tcp_user_timeout()),
    ] {
        if timeout.is_some_and(|t| *t > MAX_TIMEOUT) {
            return Err(StoreError(format!(
                "archive.postgres_url: {name} is in seconds here (libpq takes tcp_user_timeout \
                 in milliseconds), at most {}",
                MAX_TIMEOUT.as_secs()
            )));
        }
    }
    let tls = tls_settings(config, &mut pg)?;
    Ok(Connection {
        pg,
        tls,
        ca: config.postgres_ca.clone(),
        session: session_settings(config),
    })
}

/// What each session sets on the server. Read committed, which the lease's fence and take
/// rely on (the row re-checked after a wait), whatever the database's default. A lock waits
/// `busy_timeout_ms` at most (a session of this instance's that the server still holds, and
/// its locks with it, after the network dropped it; a prune's signature), and such a session
/// is ended by the server within half the lease's time, before another process may take
/// the lease. The server's side of TCP keepalive as this side's.
fn session_settings(config: &ArchiveConfig) -> String {
    let idle_in_transaction_ms = (config.lease_ttl_s * 1000 / 2).max(5_000);
    format!(
        "SET synchronous_commit = on; SET client_min_messages = warning; \
         SET default_transaction_isolation = 'read committed'; \
         SET lock_timeout = {}; SET idle_in_transaction_session_timeout = {idle_in_transaction_ms}; \
         SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
         SET tcp_keepalives_count = {}",
        config.busy_timeout_ms.max(1),
        KEEPALIVE.0.as_secs(),
        KEEPALIVE.1.as_secs(),
        KEEPALIVE.2
    )
}

/// Where the archive is, for logs and the `archive_opened` event: hosts, ports, database and
/// user of `postgres_url`, never a password.
pub fn describe(config: &ArchiveConfig) -> String {
    let Ok(pg) = config.postgres_url.parse::<postgres::Config>() else {
        return "postgres_url does not parse".into();
    };
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    let mut out = format!("host={}", hosts.join(","));
    if !ports.is_empty() {
        out.push_str(&format!(" port={}", ports.join(",")));
    }
    if let Some(db) = pg.get_dbname() {
        out.push_str(&format!(" dbname={db}"));
    }
    if let Some(user) = pg.get_user() {
        out.push_str(&format!(" user={user}"));
    }
    // How the connection is protected, as `tls::tls_settings` decides it.
    let tls = if !config.postgres_ca.is_empty() {
        "verified"
    } else if pg.get_ssl_mode() == SslMode::Disable {
        "off"
    } else if config.postgres_tls_insecure {
        "unverified"
    } else {
        "if-offered,unverified"
    };
    out.push_str(&format!(" tls={tls}"));
    out
}

pub(super) fn connect(connection: &Connection) -> Result<Client, StoreError> {
    let pg = &connection.pg;
    let client = match &connection.tls {
        None => pg.connect(NoTls),
        Some(tls) => pg.connect(tls.clone()),
    };
    let mut client = client.map_err(|e| {
        // The crate's error says only "db error" or "error performing TLS handshake": the
        // server's message or rustls's reason is in its sources.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        let hint = certificate_hint(&e, &connection.ca);
        StoreError(format!("cannot connect to PostgreSQL: {text}{hint}"))
    })?;
    // (client_min_messages: no NOTICE per "CREATE … IF NOT EXISTS" of the schema in the logs
    // at every start.)
    client.batch_execute(&connection.session)?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_time_out_unless_the_url_says_otherwise() {
        let config = |url: &str| ArchiveConfig {
            postgres_url: url.into(),
            ..ArchiveConfig::default()
        };
        let plain = connection(&config("host=127.0.0.1 user=tsa sslmode=disable")).unwrap();
        assert_eq!(
            plain.pg.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );
        assert_eq!(
            plain.pg.get_tcp_user_timeout(),
            Some(&DEFAULT_TCP_USER_TIMEOUT)
        );
        assert_eq!(plain.pg.get_keepalives_idle(), KEEPALIVE.0);
        assert_eq!(plain.pg.get_keepalives_interval(), Some(KEEPALIVE.1));
        assert_eq!(plain.pg.get_keepalives_retries(), Some(KEEPALIVE.2));
        let own = connection(&config(
            "host=127.0.0.1 user=tsa sslmode=disable connect_timeout=2 tcp_user_timeout=3 \
             keepalives_idle=30 keepalives_interval=7 keepalives_retries=9",
        ))
        .unwrap();
        assert_eq!(own.pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(own.pg.get_tcp_user_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(own.pg.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            own.pg.get_keepalives_interval(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(own.pg.get_keepalives_retries(), Some(9));
        // The server's side: locks wait busy_timeout_ms, a session left in a transaction
        // ends within half the lease.
        assert!(
            plain.session.contains("SET lock_timeout = 5000;"),
            "{}",
            plain.session
        );
        assert!(
            plain
                .session
                .contains("SET idle_in_transaction_session_timeout = 15000;"),
            "{}",
            plain.session
        );
        for url in [
            "host=127.0.0.1 user=tsa tcp_user_timeout=10000",
            "host=127.0.0.1 user=tsa connect_timeout=3600",
        ] {
            let e = connection(&config(url)).err().expect(url).0;
            assert!(
                e.contains("in seconds here") && e.contains("at most 600"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_password_file_other_users_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "correct horse\n").unwrap();
        let config = ArchiveConfig {
            postgres_url: "host=127.0.0.1 user=tsa sslmode=disable".into(),
            postgres_password_file: Some(file.clone()),
            ..ArchiveConfig::default()
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = connection(&config)
            .err()
            .expect("a readable password file")
            .0;
        assert!(e.contains("open to other users"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ok = connection(&config).unwrap();
        assert_eq!(ok.pg.get_password(), Some(&b"correct horse"[..]));
    }

    #[test]
    fn the_location_in_the_logs_never_holds_a_password() {
        let mut config = ArchiveConfig {
            postgres_url: "postgresql://tsa:secret@db.example.org:5433/archive".into(),
            ..ArchiveConfig::default()
        };
        assert_eq!(
            describe(&config),
            "host=db.example.org port=5433 dbname=archive user=tsa tls=if-offered,unverified"
        );
        config.postgres_url = "host=10.0.0.7 user=tsa password=secret dbname=tsa".into();
        let text = describe(&config);
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.starts_with("host=10.0.0.7") && text.contains("dbname=tsa"),
            "{text}"
        );
        config.postgres_ca = vec!["ca.pem".into()];
        assert!(describe(&config).ends_with(" tls=verified"));
        config.postgres_ca.clear();
        config.postgres_url.push_str(" sslmode=disable");
        assert!(describe(&config).ends_with(" tls=off"));
    }
}
