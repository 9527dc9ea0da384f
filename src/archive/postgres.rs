//! The PostgreSQL backend (`[archive] backend = "postgres"`): the same schema as SQLite
//! (`store::schema("BYTEA")`), `synchronous_commit = on`, and a lease on the instance id so
//! that two processes never run with the same one (the SQLite backend's state-directory lock
//! cannot see other hosts).
//!
//! The synchronous `postgres` crate runs a small tokio runtime of its own and must not be
//! called from a thread inside another runtime: the writer and the lease keeper are plain
//! threads, and a call made from inside a runtime (start-up in `tsa serve`, admin look-ups)
//! runs on a scoped thread of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::config::SslMode;

use postgres::{Client, NoTls, Row};

use super::postgres_tls::{certificate_hint, tls_settings, MakeRustls};

use super::record::{
    Anchor, ChainHead, Checkpoint, ClockAtIssue, EventRecord, Hash, StoredRecord, TokenRecord,
};
use super::serial::layout;
use super::store::{
    schema, ArchiveStore, CertificateSets, InstanceState, StoreError, Visit, RECORD_COLUMNS,
    SCHEMA_VERSION,
};
use crate::config::ArchiveConfig;

/// Records fetched per round trip when visiting.
const PAGE: i64 = 500;

/// The lease table: one row per instance id that a live process holds.
const LEASE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS instance_leases (
    instance_id BIGINT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);";

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::new(e)
    }
}

/// Runs `f` where the `postgres` crate may block: here, or on a scoped thread when this
/// thread is inside a tokio runtime.
fn off_runtime<T: Send, R: Send>(value: &mut T, f: impl FnOnce(&mut T) -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f(value);
    }
    std::thread::scope(|s| match s.spawn(|| f(value)).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// How to connect, checked and loaded once (files read, the TLS configuration built) and
/// kept for reconnections.
#[derive(Clone)]
pub struct Connection {
    pg: postgres::Config,
    /// None: plain connections (`sslmode=disable`).
    tls: Option<MakeRustls>,
    /// `postgres_ca`, for the error when the server's certificate is refused.
    ca: Vec<std::path::PathBuf>,
}

/// The connection settings: `postgres_url` (a key=value string or a `postgresql://` URL,
/// without a password), the password from `postgres_password_file` or the
/// `TSA_POSTGRES_PASSWORD` environment variable, and TLS by `sslmode` and the `postgres_ca`,
/// `postgres_client_certificate`/`_key` and `postgres_tls_insecure` settings
/// (`postgres_tls.rs`).
/// `connect_timeout` when `postgres_url` sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `tcp_user_timeout` (unacknowledged data on an open connection) when `postgres_url` sets none.
const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `connect_timeout` or `tcp_user_timeout` accepted.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

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
        let text = std::fs::read_to_string(file)
            .map_err(|e| StoreError(format!("cannot read {}: {e}", file.display())))?;
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
    })
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
    // How the connection is protected, as `postgres_tls::tls_settings` decides it.
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

fn connect(connection: &Connection) -> Result<Client, StoreError> {
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
    // No NOTICE per "CREATE … IF NOT EXISTS" of the schema in the logs at every start.
    client.batch_execute("SET synchronous_commit = on; SET client_min_messages = warning")?;
    Ok(client)
}

struct Inner {
    client: Client,
    /// To connect again after the connection broke (a database restart).
    pg: Connection,
    certificate_sets: CertificateSets,
    /// The writer's store: the lease that each append checks in its own transaction.
    fence: Option<Fence>,
}

pub struct PostgresStore {
    /// Always `Some` but in `drop`.
    inner: Option<Inner>,
}

impl Drop for PostgresStore {
    /// Closing the connection blocks on the crate's runtime: off any other runtime too.
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            off_runtime(&mut Some(inner), |i| drop(i.take()));
        }
    }
}

impl PostgresStore {
    /// Connects, creating the schema when missing, and checks its version.
    pub fn open(config: &ArchiveConfig) -> Result<Self, StoreError> {
        Self::connect_then(config, Inner::create_schema)
    }

    /// Connects to an archive that exists (the CLI's look-ups, export and verification).
    pub fn open_existing(config: &ArchiveConfig) -> Result<Self, StoreError> {
        Self::connect_then(config, Inner::check_version)
    }

    /// Connects and runs `first` on the new connection.
    fn connect_then(
        config: &ArchiveConfig,
        first: fn(&mut Inner) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        let pg = connection(config)?;
        let mut inner = off_runtime(&mut (), |_| {
            connect(&pg).map(|client| Inner {
                client,
                pg: pg.clone(),
                certificate_sets: CertificateSets::default(),
                fence: None,
            })
        })?;
        off_runtime(&mut inner, first)?;
        Ok(Self { inner: Some(inner) })
    }

    /// Makes every append of this store check, in its own transaction, that `lease` is still
    /// this process's (and renew it): the writer's store. A commit after another process took
    /// the instance id over fails, so this process stops issuing (see [`Lease`]).
    pub fn fence(&mut self, lease: &Lease) {
        self.inner.as_mut().expect("open").fence = Some(Fence {
            instance_id: lease.instance_id,
            holder: lease.holder.clone(),
            ttl: lease.ttl,
            state: lease.state.clone(),
        });
    }

    /// Runs `f` on the connection, connecting again first when it is known closed. A call
    /// that fails because the connection broke under it (the client learns that only when it
    /// uses it: after a database restart, the first call) runs once more on a new connection.
    /// That is safe for every call here: reads, idempotent writes (reservations, checkpoints,
    /// pruning), and appends, whose unique keys make a repeat fail rather than land twice.
    fn run<R: Send>(
        &mut self,
        f: impl Fn(&mut Inner) -> Result<R, StoreError> + Send + Sync,
    ) -> Result<R, StoreError> {
        off_runtime(self.inner.as_mut().expect("open"), |inner| {
            if inner.client.is_closed() {
                inner.client = connect(&inner.pg)?;
            }
            match f(inner) {
                Err(_) if inner.client.is_closed() => {
                    inner.client = connect(&inner.pg)?;
                    f(inner)
                }
                result => result,
            }
        })
    }
}

impl Inner {
    fn create_schema(&mut self) -> Result<(), StoreError> {
        let mut tx = self.client.transaction()?;
        // Instances of a fleet may start together: one creates the schema at a time.
        tx.batch_execute("SELECT pg_advisory_xact_lock(3161)")?;
        tx.batch_execute(&schema("BYTEA"))?;
        tx.batch_execute(LEASE_SCHEMA)?;
        tx.execute(
            "INSERT INTO archive_meta (name, value) VALUES ('schema', $1) \
             ON CONFLICT (name) DO NOTHING",
            &[&SCHEMA_VERSION],
        )?;
        tx.commit()?;
        self.check_version()
    }

    fn check_version(&mut self) -> Result<(), StoreError> {
        let version: Option<String> = self
            .client
            .query_opt("SELECT value FROM archive_meta WHERE name = 'schema'", &[])
            .map_err(|e| StoreError(format!("not an archive database: {e}")))?
            .map(|r| r.get(0));
        match version.as_deref() {
            Some(SCHEMA_VERSION) => Ok(()),
            other => Err(StoreError(format!(
                "unknown archive schema version {other:?} (this build knows {SCHEMA_VERSION})"
            ))),
        }
    }

    fn records(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let rows = self.client.query(sql, params)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (record, certificates) = read_record(&row)?;
            out.push(self.expand(record, certificates)?);
        }
        Ok(out)
    }

    /// The whole token again when its certificates were stored apart (as in SQLite: a set
    /// missing or not matching its hash leaves the token as stored, for verify to report).
    /// `record`'s whole token, its certificate set read the first time.
    fn expand(
        &mut self,
        record: StoredRecord,
        certificates: Option<Vec<u8>>,
    ) -> Result<StoredRecord, StoreError> {
        let client = &mut self.client;
        self.certificate_sets.expand(record, certificates, |key| {
            Ok(client
                .query_opt(
                    "SELECT der FROM certificate_sets WHERE hash = $1",
                    &[&&key[..]],
                )?
                .map(|r| r.get(0)))
        })
    }
}

fn u(v: i64) -> u64 {
    v as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn hash_of(v: &[u8]) -> Result<Hash, StoreError> {
    Hash::try_from(v).map_err(|_| StoreError("a hash is not 32 octets".into()))
}

type Stored = (StoredRecord, Option<Vec<u8>>);

fn read_record(row: &Row) -> Result<Stored, StoreError> {
    let record = StoredRecord {
        instance_id: row.try_get::<_, i64>(0)? as u32,
        seq: u(row.try_get(1)?),
        counter: u(row.try_get(3)?),
        record: TokenRecord {
            serial: row.try_get(2)?,
            gen_time_ns: u(row.try_get(4)?),
            accuracy_ns: u(row.try_get(5)?),
            imprint_alg: row.try_get(6)?,
            imprint: row.try_get(7)?,
            policy: row.try_get(8)?,
            nonce: row.try_get(9)?,
            client: row.try_get(10)?,
            clock: ClockAtIssue {
                source: row.try_get(11)?,
                state: row.try_get(12)?,
                bound_ns: u(row.try_get(13)?),
                sources: row.try_get(14)?,
            },
            token: row.try_get(15)?,
        },
        prev_hash: hash_of(row.try_get(16)?)?,
        hash: hash_of(row.try_get(17)?)?,
    };
    Ok((record, row.try_get(18)?))
}

fn read_anchor(row: &Row) -> Result<Anchor, StoreError> {
    Ok(Anchor {
        instance_id: row.try_get::<_, i64>(0)? as u32,
        seq: u(row.try_get(1)?),
        hash: hash_of(row.try_get(2)?)?,
        max_counter: u(row.try_get(3)?),
        max_gen_time_ns: u(row.try_get(4)?),
        pruned_at_ns: u(row.try_get(5)?),
    })
}

fn now_ns() -> i64 {
    i(crate::clock::system_unix_ns())
}

const ANCHOR_SQL: &str = "SELECT instance_id, seq, hash, max_counter, max_gen_time_ns, \
     pruned_at_ns FROM chain_anchors WHERE instance_id = $1";

impl ArchiveStore for PostgresStore {
    fn instance(&mut self, instance_id: u32) -> Result<InstanceState, StoreError> {
        let id = instance_id as i64;
        self.run(move |s| {
            let c = &mut s.client;
            let (reserved_until, inst_max_counter, inst_max_gen) = c
                .query_opt(
                    "SELECT reserved_until, max_counter, max_gen_time_ns FROM instances \
                     WHERE instance_id = $1",
                    &[&id],
                )?
                .map(|r| (u(r.get(0)), r.get::<_, Option<i64>>(1).map(u), u(r.get(2))))
                .unwrap_or((0, None, 0));
            let anchor = match c.query_opt(ANCHOR_SQL, &[&id])? {
                Some(r) => Some(read_anchor(&r)?),
                None => None,
            };
            let head = match c.query_opt(
                "SELECT seq, hash FROM tokens WHERE instance_id = $1 ORDER BY seq DESC LIMIT 1",
                &[&id],
            )? {
                Some(r) => Some(ChainHead {
                    seq: u(r.get(0)),
                    hash: hash_of(r.get(1))?,
                }),
                None => None,
            };
            let row = c.query_one(
                "SELECT (SELECT MAX(counter) FROM tokens WHERE instance_id = $1), \
                 (SELECT MAX(gen_time_ns) FROM (SELECT gen_time_ns FROM tokens \
                  WHERE instance_id = $1 ORDER BY seq DESC LIMIT 100000) AS recent), \
                 (SELECT MAX(seq) FROM events WHERE instance_id = $1)",
                &[&id],
            )?;
            let max_counter: Option<i64> = row.get(0);
            let recent_gen: Option<i64> = row.get(1);
            let last_event_seq: Option<i64> = row.get(2);
            Ok(InstanceState::combine(
                reserved_until,
                [max_counter.map(u), inst_max_counter],
                [recent_gen.map(u), Some(inst_max_gen)],
                head,
                anchor,
                last_event_seq.map(u),
            ))
        })
    }

    fn instances(&mut self) -> Result<Vec<u32>, StoreError> {
        self.run(|s| {
            let rows = s.client.query(
                "SELECT instance_id FROM instances UNION SELECT DISTINCT instance_id FROM tokens \
                 UNION SELECT instance_id FROM chain_anchors \
                 UNION SELECT DISTINCT instance_id FROM checkpoints ORDER BY 1",
                &[],
            )?;
            Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u32).collect())
        })
    }

    fn reserve(
        &mut self,
        instance_id: u32,
        until: u64,
        gen_time_floor_ns: u64,
    ) -> Result<(), StoreError> {
        self.run(move |s| {
            s.client.execute(
                "INSERT INTO instances (instance_id, reserved_until, max_counter, \
                 max_gen_time_ns, updated_ns) VALUES ($1, $2, NULL, $3, $4) \
                 ON CONFLICT (instance_id) DO UPDATE SET \
                 reserved_until = GREATEST(instances.reserved_until, excluded.reserved_until), \
                 max_gen_time_ns = GREATEST(instances.max_gen_time_ns, excluded.max_gen_time_ns), \
                 updated_ns = excluded.updated_ns",
                &[
                    &(instance_id as i64),
                    &i(until),
                    &i(gen_time_floor_ns),
                    &now_ns(),
                ],
            )?;
            Ok(())
        })
    }

    fn append(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
    ) -> Result<(), StoreError> {
        self.run(move |s| {
            let mut new_sets: Vec<(Hash, Vec<u8>)> = Vec::new();
            let mut tx = s.client.transaction()?;
            if let Some(fence) = &s.fence {
                // First, so that the lease row stays locked until the commit: a process
                // taking the id over waits for it, then finds the lease renewed.
                fence.hold(&mut tx, instance_id)?;
            }
            let insert = tx.prepare(&format!(
                "INSERT INTO tokens ({RECORD_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18, $19)"
            ))?;
            let insert_set = tx.prepare(
                "INSERT INTO certificate_sets (hash, der) VALUES ($1, $2) \
                 ON CONFLICT (hash) DO NOTHING",
            )?;
            for rec in records {
                let r = &rec.record;
                let (token, certificates) =
                    s.certificate_sets
                        .compact(&r.token, &mut new_sets, |key, set| {
                            tx.execute(&insert_set, &[&&key[..], &set])?;
                            Ok(())
                        })?;
                tx.execute(
                    &insert,
                    &[
                        &(rec.instance_id as i64),
                        &i(rec.seq),
                        &r.serial,
                        &i(rec.counter),
                        &i(r.gen_time_ns),
                        &i(r.accuracy_ns),
                        &r.imprint_alg,
                        &r.imprint,
                        &r.policy,
                        &r.nonce,
                        &r.client,
                        &r.clock.source,
                        &r.clock.state,
                        &i(r.clock.bound_ns),
                        &r.clock.sources,
                        &&*token,
                        &&rec.prev_hash[..],
                        &&rec.hash[..],
                        &certificates.as_ref().map(|k| &k[..]),
                    ],
                )?;
            }
            let insert = tx.prepare(
                "INSERT INTO events (instance_id, seq, time_ns, level, kind, message, fields) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )?;
            for e in events {
                tx.execute(
                    &insert,
                    &[
                        &(e.instance_id as i64),
                        &i(e.seq),
                        &i(e.time_ns),
                        &e.level,
                        &e.kind,
                        &e.message,
                        &e.fields,
                    ],
                )?;
            }
            if let (Some(max_counter), Some(max_gen)) = (
                records.iter().map(|r| r.counter).max(),
                records.iter().map(|r| r.record.gen_time_ns).max(),
            ) {
                tx.execute(
                    "INSERT INTO instances (instance_id, reserved_until, max_counter, \
                     max_gen_time_ns, updated_ns) VALUES ($1, $2, $2, $3, $4) \
                     ON CONFLICT (instance_id) DO UPDATE SET \
                     max_counter = GREATEST(COALESCE(instances.max_counter, 0), \
                     excluded.max_counter), \
                     max_gen_time_ns = GREATEST(instances.max_gen_time_ns, \
                     excluded.max_gen_time_ns), \
                     updated_ns = excluded.updated_ns",
                    &[
                        &(instance_id as i64),
                        &i(max_counter),
                        &i(max_gen),
                        &now_ns(),
                    ],
                )?;
            }
            tx.commit()?;
            s.certificate_sets.committed(new_sets);
            Ok(())
        })
    }

    fn add_checkpoint(&mut self, c: &Checkpoint) -> Result<(), StoreError> {
        self.run(move |s| {
            s.client.execute(
                "INSERT INTO checkpoints (instance_id, seq, head_hash, time_ns, algorithm, \
                 signature, certificate) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (instance_id, seq) DO NOTHING",
                &[
                    &(c.instance_id as i64),
                    &i(c.seq),
                    &&c.head_hash[..],
                    &i(c.time_ns),
                    &c.algorithm,
                    &c.signature,
                    &c.certificate,
                ],
            )?;
            Ok(())
        })
    }

    fn checkpoints(&mut self, instance_id: u32) -> Result<Vec<Checkpoint>, StoreError> {
        self.run(move |s| {
            s.client
                .query(
                    "SELECT instance_id, seq, head_hash, time_ns, algorithm, signature, \
                     certificate FROM checkpoints WHERE instance_id = $1 ORDER BY seq",
                    &[&(instance_id as i64)],
                )?
                .iter()
                .map(|r| {
                    Ok(Checkpoint {
                        instance_id: r.try_get::<_, i64>(0)? as u32,
                        seq: u(r.try_get(1)?),
                        head_hash: hash_of(r.try_get(2)?)?,
                        time_ns: u(r.try_get(3)?),
                        algorithm: r.try_get(4)?,
                        signature: r.try_get(5)?,
                        certificate: r.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn record_by_serial(&mut self, serial: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        let Some((instance_id, counter)) = layout::decode(serial) else {
            return Ok(None);
        };
        let found = self.run(move |s| {
            s.records(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM tokens WHERE instance_id = $1 AND counter = $2"
                ),
                &[&(instance_id as i64), &i(counter)],
            )
        })?;
        Ok(found.into_iter().find(|r| r.record.serial == serial))
    }

    fn records_by_imprint(&mut self, imprint: &[u8]) -> Result<Vec<StoredRecord>, StoreError> {
        self.run(move |s| {
            s.records(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM tokens WHERE imprint = $1 \
                     ORDER BY gen_time_ns DESC, instance_id, seq DESC"
                ),
                &[&imprint],
            )
        })
    }

    fn for_each_record(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let mut from = i(from_seq);
        loop {
            let page = self.run(move |s| {
                s.records(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM tokens WHERE instance_id = $1 \
                         AND seq >= $2 ORDER BY seq LIMIT $3"
                    ),
                    &[&(instance_id as i64), &from, &PAGE],
                )
            })?;
            let full = page.len() as i64 == PAGE;
            for r in page {
                from = i(r.seq) + 1;
                if !visit(r)? {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn for_each_in_time(
        &mut self,
        from_ns: u64,
        to_ns: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let to = i(to_ns);
        // The position after the last record visited: (genTime, instance, seq).
        let mut after: (i64, i64, i64) = (i(from_ns), -1, -1);
        loop {
            let page = self.run(move |s| {
                s.records(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM tokens \
                         WHERE (gen_time_ns, instance_id, seq) > ($1, $2, $3) \
                         AND gen_time_ns < $4 ORDER BY gen_time_ns, instance_id, seq LIMIT $5"
                    ),
                    &[&after.0, &after.1, &after.2, &to, &PAGE],
                )
            })?;
            let full = page.len() as i64 == PAGE;
            for r in page {
                after = (i(r.record.gen_time_ns), r.instance_id as i64, i(r.seq));
                if !visit(r)? {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn events(&mut self, from_ns: u64, to_ns: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.run(move |s| {
            s.client
                .query(
                    "SELECT instance_id, seq, time_ns, level, kind, message, fields FROM events \
                     WHERE time_ns >= $1 AND time_ns < $2 ORDER BY time_ns, instance_id, seq",
                    &[&i(from_ns), &i(to_ns)],
                )?
                .iter()
                .map(|r| {
                    Ok(EventRecord {
                        instance_id: r.try_get::<_, i64>(0)? as u32,
                        seq: u(r.try_get(1)?),
                        time_ns: u(r.try_get(2)?),
                        level: r.try_get(3)?,
                        kind: r.try_get(4)?,
                        message: r.try_get(5)?,
                        fields: r.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn prune(&mut self, instance_id: u32, before_ns: u64) -> Result<Option<Anchor>, StoreError> {
        let (id, before) = (instance_id as i64, i(before_ns));
        self.run(move |s| {
            let mut tx = s.client.transaction()?;
            // One pruning of an instance at a time (the instance row is the lock).
            tx.execute(
                "SELECT 1 FROM instances WHERE instance_id = $1 FOR UPDATE",
                &[&id],
            )?;
            let first_kept: Option<i64> = tx
                .query_one(
                    "SELECT MIN(seq) FROM tokens WHERE instance_id = $1 AND gen_time_ns >= $2",
                    &[&id, &before],
                )?
                .get(0);
            let last = match first_kept {
                Some(first) => tx.query_opt(
                    "SELECT seq, hash FROM tokens WHERE instance_id = $1 AND seq < $2 \
                     ORDER BY seq DESC LIMIT 1",
                    &[&id, &first],
                )?,
                None => tx.query_opt(
                    "SELECT seq, hash FROM tokens WHERE instance_id = $1 ORDER BY seq DESC LIMIT 1",
                    &[&id],
                )?,
            };
            tx.execute(
                "DELETE FROM events WHERE instance_id = $1 AND time_ns < $2",
                &[&id, &before],
            )?;
            let Some(last) = last else {
                tx.commit()?;
                return Ok(None);
            };
            let seq: i64 = last.get(0);
            let hash = hash_of(last.get(1))?;
            let row = tx.query_one(
                "SELECT MAX(counter), MAX(gen_time_ns) FROM tokens WHERE instance_id = $1 \
                 AND seq <= $2",
                &[&id, &seq],
            )?;
            let (max_counter, max_gen): (i64, i64) = (row.get(0), row.get(1));
            let previous = match tx.query_opt(ANCHOR_SQL, &[&id])? {
                Some(r) => Some(read_anchor(&r)?),
                None => None,
            };
            let anchor = Anchor {
                instance_id,
                seq: u(seq),
                hash,
                max_counter: u(max_counter).max(previous.map_or(0, |a| a.max_counter)),
                max_gen_time_ns: u(max_gen).max(previous.map_or(0, |a| a.max_gen_time_ns)),
                pruned_at_ns: u(now_ns()),
            };
            tx.execute(
                "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, \
                 max_gen_time_ns, pruned_at_ns) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (instance_id) DO UPDATE SET seq = excluded.seq, \
                 hash = excluded.hash, max_counter = excluded.max_counter, \
                 max_gen_time_ns = excluded.max_gen_time_ns, pruned_at_ns = excluded.pruned_at_ns",
                &[
                    &id,
                    &seq,
                    &&anchor.hash[..],
                    &i(anchor.max_counter),
                    &i(anchor.max_gen_time_ns),
                    &i(anchor.pruned_at_ns),
                ],
            )?;
            tx.execute(
                "DELETE FROM tokens WHERE instance_id = $1 AND seq <= $2",
                &[&id, &seq],
            )?;
            tx.commit()?;
            Ok(Some(anchor))
        })
    }
}

/// The lease on this process's instance id: a row (instance_id, holder, expires_at) that a
/// thread of its own renews every third of `lease_ttl_s` on a connection of its own, and
/// deletes when dropped (a process killed leaves it to expire). Start-up is refused while
/// another holder's row has not expired; the database's clock decides.
///
/// The writer's store also renews it inside every append's transaction ([`PostgresStore::fence`]):
/// a commit goes in only while this process holds the row. Once a renewal or an append finds
/// the row gone or held by another process, the lease is lost for good: nothing more is
/// committed, so no token leaves (`systemFailure`), and readiness fails until a restart.
pub struct Lease {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    instance_id: i64,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
}

/// What the keeper thread and the appends found.
#[derive(Default)]
struct LeaseState {
    /// Another process holds the row, or it was deleted: sticky.
    lost: AtomicBool,
    /// The last renewal failed (the database cannot be reached).
    unreachable: AtomicBool,
}

impl LeaseState {
    fn lose(&self, instance_id: i64) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::error!(
                event = "archive_lease_lost",
                instance = instance_id,
                "this instance id's lease is gone or held by another process: this process \
                 stops issuing (restart it once the id is its own again)"
            );
        }
    }
}

/// The lease as the writer's store checks it: see [`PostgresStore::fence`].
struct Fence {
    instance_id: i64,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
}

impl Fence {
    /// Renews the lease inside `tx` (locking its row until the commit), or fails when it is
    /// lost.
    fn hold(&self, tx: &mut postgres::Transaction<'_>, instance_id: u32) -> Result<(), StoreError> {
        let lost = || {
            StoreError(format!(
                "this process no longer holds the lease of archive.instance_id = {}",
                self.instance_id
            ))
        };
        if self.state.lost.load(Ordering::Relaxed) || instance_id as i64 != self.instance_id {
            return Err(lost());
        }
        if tx.execute(
            RENEW,
            &[&self.instance_id, &self.holder, &self.ttl.as_secs_f64()],
        )? == 1
        {
            return Ok(());
        }
        self.state.lose(self.instance_id);
        Err(lost())
    }
}

/// Renews a lease that is still its holder's (even past its expiry: nobody took it then).
const RENEW: &str = "UPDATE instance_leases \
     SET expires_at = clock_timestamp() + make_interval(secs => $3) \
     WHERE instance_id = $1 AND holder = $2";

impl Lease {
    pub fn acquire(config: &ArchiveConfig) -> Result<Lease, StoreError> {
        let pg = connection(config)?;
        if config.postgres_tls_insecure {
            tracing::warn!(
                "archive.postgres_tls_insecure: the PostgreSQL server's certificate is not \
                 verified (set postgres_ca)"
            );
        }
        let instance_id = config.instance_id as i64;
        let ttl = Duration::from_secs(config.lease_ttl_s.max(1));
        let holder = format!(
            "{}:{}:{:016x}",
            hostname(),
            std::process::id(),
            crate::clock::system_unix_ns()
        );
        let (ready_tx, ready) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let state = Arc::new(LeaseState::default());
        let keeper_state = state.clone();
        let keeper_holder = holder.clone();
        let thread = std::thread::Builder::new()
            .name("tsa-archive-lease".into())
            .spawn(move || {
                let (state, holder) = (keeper_state, keeper_holder);
                let mut client = match take(&pg, instance_id, &holder, ttl) {
                    Ok(client) => {
                        let _ = ready_tx.send(Ok(()));
                        client
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(ttl / 3) {
                    if state.lost.load(Ordering::Relaxed) {
                        continue;
                    }
                    match renew(&mut client, instance_id, &holder, ttl) {
                        Ok(true) => {
                            if state.unreachable.swap(false, Ordering::Relaxed) {
                                tracing::info!(
                                    instance = instance_id,
                                    "archive lease renewed again"
                                );
                            }
                        }
                        Ok(false) => state.lose(instance_id),
                        Err(e) => {
                            if !state.unreachable.swap(true, Ordering::Relaxed) {
                                tracing::warn!(event = "archive_lease_renewal_failed", error = %e);
                            }
                            if let Ok(c) = connect(&pg) {
                                client = c;
                            }
                        }
                    }
                }
                let _ = client.execute(
                    "DELETE FROM instance_leases WHERE instance_id = $1 AND holder = $2",
                    &[&instance_id, &holder],
                );
            })
            .map_err(StoreError::new)?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Lease {
                stop: Some(stop),
                thread: Some(thread),
                instance_id,
                holder,
                ttl,
                state,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StoreError("the lease thread stopped".into()))
            }
        }
    }

    /// Whether a renewal or an append found the lease gone or held by another process.
    pub fn lost(&self) -> bool {
        self.state.lost.load(Ordering::Relaxed)
    }

    /// Whether the last renewal failed (the database could not be reached).
    pub fn unreachable(&self) -> bool {
        self.state.unreachable.load(Ordering::Relaxed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn take(
    pg: &Connection,
    instance_id: i64,
    holder: &str,
    ttl: Duration,
) -> Result<Client, StoreError> {
    let mut client = connect(pg)?;
    {
        let mut tx = client.transaction()?;
        tx.batch_execute("SELECT pg_advisory_xact_lock(3161)")?;
        tx.batch_execute(LEASE_SCHEMA)?;
        tx.commit()?;
    }
    let taken = client.execute(
        "INSERT INTO instance_leases (instance_id, holder, expires_at) \
         VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
         ON CONFLICT (instance_id) DO UPDATE SET holder = excluded.holder, \
         expires_at = excluded.expires_at \
         WHERE instance_leases.expires_at < clock_timestamp() \
         OR instance_leases.holder = excluded.holder",
        &[&instance_id, &holder, &ttl.as_secs_f64()],
    )?;
    if taken == 1 {
        return Ok(client);
    }
    let other = client.query_opt(
        "SELECT holder, GREATEST(EXTRACT(EPOCH FROM expires_at - clock_timestamp()), 0)::FLOAT8 \
         FROM instance_leases WHERE instance_id = $1",
        &[&instance_id],
    )?;
    let (who, left) = other.map_or((String::from("?"), 0.0), |r| {
        (r.get::<_, String>(0), r.get::<_, f64>(1))
    });
    Err(StoreError(format!(
        "archive.instance_id = {instance_id} is held by another live instance ({who}; its \
         lease expires in {left:.1} s unless renewed): every instance needs its own id"
    )))
}

fn renew(
    client: &mut Client,
    instance_id: i64,
    holder: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    Ok(client.execute(RENEW, &[&instance_id, &holder, &ttl.as_secs_f64()])? == 1)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
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
        let own = connection(&config(
            "host=127.0.0.1 user=tsa sslmode=disable connect_timeout=2 tcp_user_timeout=3",
        ))
        .unwrap();
        assert_eq!(own.pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(own.pg.get_tcp_user_timeout(), Some(&Duration::from_secs(3)));
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
