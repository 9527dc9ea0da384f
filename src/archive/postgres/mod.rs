//! The PostgreSQL backend (`[archive] backend = "postgres"`): the same schema as SQLite
//! (`store::schema("BYTEA")`), `synchronous_commit = on`, and a lease on the instance id so
//! that two processes never run with the same one (the SQLite backend's state-directory lock
//! cannot see other hosts).
//!
//! The synchronous `postgres` crate runs a small tokio runtime of its own and must not be
//! called from a thread inside another runtime: the writer and the lease keeper are plain
//! threads, and a call made from inside a runtime (start-up in `tsa serve`, admin look-ups)
//! runs on a scoped thread of its own.
//!
//! `connection` says how to connect (TLS in `tls`), `lease` holds the instance id; this
//! module is the store.

mod connection;
mod lease;
pub mod tls;

use postgres::{Client, GenericClient, Row};

pub use connection::{connection, describe, Connection};
pub use lease::Lease;

use connection::connect;
use lease::{Fence, LEASE_SCHEMA};

use super::record::{
    Anchor, AnchorSignature, ChainHead, Checkpoint, ClockAtIssue, EventRecord, Hash, StoredRecord,
    TokenRecord,
};
use super::serial::layout;
use super::store::{
    checkpoint_columns, event_columns, events_read_start, migrate_from_1, migrated_from_1,
    prune_events, prune_signed_unlocked, same_cut, schema, ArchiveStore, CertificateSets,
    ImprintMatches, InstanceState, Pruned, SignAnchor, StoreError, Visit, IMPRINT_INDEX,
    IMPRINT_INDEX_CONCURRENTLY, OLD_IMPRINT_INDEX, PRUNE_ROWS, RECORD_COLUMNS, RESIGN_CHECKPOINT,
    SCHEMA_VERSION, SCHEMA_VERSION_1,
};
use crate::config::ArchiveConfig;

/// Records fetched per round trip when visiting.
const PAGE: i64 = 500;

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

struct Inner {
    client: Client,
    /// To connect again after the connection broke (a database restart).
    pg: Connection,
    certificate_sets: CertificateSets,
    /// The writer's store: the lease that each append checks in its own transaction.
    fence: Option<Fence>,
    /// Schema 2: events carry their hashes and checkpoints their events' head. A schema-1
    /// archive opened to be read shows neither.
    chained: bool,
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
                chained: true,
            })
        })?;
        off_runtime(&mut inner, first)?;
        Ok(Self { inner: Some(inner) })
    }

    /// Builds the imprint index in the look-ups' order ([`IMPRINT_INDEX`]) on an archive made
    /// before it, beside running servers (`CREATE INDEX CONCURRENTLY`: their inserts go on
    /// meanwhile), then drops the older index by imprint alone the same way. An index that a
    /// failed build left invalid is dropped and built again. Whether it built one (false:
    /// it was there).
    pub fn build_imprint_index(&mut self) -> Result<bool, StoreError> {
        self.run(|inner| {
            let client = &mut inner.client;
            // One build at a time (a second `migrate`, or a retry after a broken connection,
            // would drop the index the first is building), and none cut short by a
            // `statement_timeout` of the role or database.
            let alone: bool = client
                .query_one("SELECT pg_try_advisory_lock(3162)", &[])?
                .try_get(0)?;
            if !alone {
                return Err(StoreError(
                    "another `tsa archive migrate` is building the imprint index: wait for it"
                        .into(),
                ));
            }
            let built = Self::build_imprint_index_locked(client);
            let _ = client.batch_execute("SELECT pg_advisory_unlock(3162)");
            built
        })
    }

    fn build_imprint_index_locked(client: &mut Client) -> Result<bool, StoreError> {
        client.batch_execute("SET statement_timeout = 0")?;
        let valid = imprint_index_state(client)?;
        if valid == Some(false) {
            // Invalid: a build that failed, or one still running in a session that lost its
            // client (the server goes on with it): only the first may be dropped.
            let running: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index \
                     WHERE relid = 'tokens'::regclass)",
                    &[],
                )?
                .try_get(0)?;
            if running {
                return Err(StoreError(
                    "an index on tokens is being built (pg_stat_progress_create_index): run \
                     `tsa archive migrate` again when it has ended"
                        .into(),
                ));
            }
            client.batch_execute("DROP INDEX CONCURRENTLY tokens_imprint_newest")?;
        }
        if valid != Some(true) {
            client.batch_execute(IMPRINT_INDEX_CONCURRENTLY)?;
        }
        client.batch_execute("DROP INDEX CONCURRENTLY IF EXISTS tokens_imprint")?;
        Ok(valid != Some(true))
    }

    /// Makes every append of this store check, in its own transaction, that `lease` is still
    /// this process's (and renew it): the writer's store. A commit after another process took
    /// the instance id over fails, so this process stops issuing (see [`Lease`]).
    pub fn fence(&mut self, lease: &Lease) {
        self.inner.as_mut().expect("open").fence = Some(lease.fence());
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

/// Whether the imprint index in the look-ups' order (`tokens_imprint_newest`) is there:
/// `None` without it, `Some(false)` while it is invalid (being built, or a build failed).
fn imprint_index_state(client: &mut impl GenericClient) -> Result<Option<bool>, StoreError> {
    Ok(client
        .query_opt(
            "SELECT indisvalid FROM pg_index \
             WHERE indexrelid = to_regclass('tokens_imprint_newest')",
            &[],
        )?
        .map(|r| r.try_get(0))
        .transpose()?)
}

impl Inner {
    fn create_schema(&mut self) -> Result<(), StoreError> {
        let mut tx = self.client.transaction()?;
        // Instances of a fleet may start together: one creates the schema at a time.
        tx.batch_execute("SELECT pg_advisory_xact_lock(3161)")?;
        // Only what is missing: `CREATE INDEX IF NOT EXISTS` locks the table before it looks,
        // and waits for an index being built beside the servers (`tsa archive migrate`), while
        // every server's inserts queue behind it. The schema's statements run in one
        // transaction, so its last index says whether all of it is there.
        let exists = |tx: &mut postgres::Transaction<'_>, name: &str| -> Result<bool, StoreError> {
            Ok(tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])?
                .try_get(0)?)
        };
        if !exists(&mut tx, "events_time")? {
            tx.batch_execute(&schema("BYTEA"))?;
        }
        // The imprint index is made with the table. On a table that holds tokens already,
        // building it here would hold every instance's inserts until it is built: the
        // operator builds it beside them, and look-ups use the older index meanwhile.
        let newest = imprint_index_state(&mut tx)?;
        let empty: bool = tx
            .query_one("SELECT NOT EXISTS (SELECT 1 FROM tokens)", &[])?
            .try_get(0)?;
        match newest {
            Some(true) => {}
            None if empty => tx.batch_execute(IMPRINT_INDEX)?,
            _ => {
                if !exists(&mut tx, "tokens_imprint")? {
                    tx.batch_execute(OLD_IMPRINT_INDEX)?;
                }
                let what = match newest {
                    Some(false) => "is being built, or a build of it failed",
                    _ => "is missing",
                };
                tracing::warn!(
                    "the archive's index by imprint and genTime {what}, and look-ups of an \
                     imprint stamped many times sort all of its tokens meanwhile: build it \
                     beside the running servers with `tsa archive migrate` (CREATE INDEX \
                     CONCURRENTLY tokens_imprint_newest ON tokens (imprint, gen_time_ns DESC, \
                     instance_id, seq DESC); then DROP INDEX CONCURRENTLY tokens_imprint;), \
                     once no build of it runs"
                );
            }
        }
        tx.batch_execute(LEASE_SCHEMA)?;
        tx.execute(
            "INSERT INTO archive_meta (name, value) VALUES ('schema', $1) \
             ON CONFLICT (name) DO NOTHING",
            &[&SCHEMA_VERSION],
        )?;
        let version: Option<String> = tx
            .query_opt("SELECT value FROM archive_meta WHERE name = 'schema'", &[])?
            .map(|r| r.try_get(0))
            .transpose()?;
        let migrate = version.as_deref() == Some(SCHEMA_VERSION_1);
        if migrate {
            // Behind a long transaction on the tables the lock would queue every instance's
            // inserts behind it: fail the start instead (the next one tries again).
            tx.batch_execute("SET LOCAL lock_timeout = '2s'")?;
            tx.batch_execute(&migrate_from_1("BYTEA"))?;
        }
        tx.commit()?;
        if migrate {
            migrated_from_1();
        }
        self.check_version()?;
        match self.chained {
            true => Ok(()),
            false => Err(StoreError(format!(
                "the archive's schema is version {SCHEMA_VERSION_1}: opened to be written, it \
                 must be {SCHEMA_VERSION}"
            ))),
        }
    }

    /// Reads the schema's version: one this build reads ([`SCHEMA_VERSION`] or the one
    /// before, which is read without the events' chain).
    fn check_version(&mut self) -> Result<(), StoreError> {
        let version: Option<String> = self
            .client
            .query_opt("SELECT value FROM archive_meta WHERE name = 'schema'", &[])
            .map_err(|e| StoreError(format!("not an archive database: {e}")))?
            .map(|r| r.try_get(0))
            .transpose()?;
        match version.as_deref() {
            Some(SCHEMA_VERSION) => {
                self.chained = true;
                Ok(())
            }
            Some(SCHEMA_VERSION_1) => {
                self.chained = false;
                Ok(())
            }
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
                .map(|r| r.try_get(0))
                .transpose()?)
        })
    }
}

fn u(v: i64) -> u64 {
    v as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// An instance id as read from a BIGINT column: one outside u32 is refused, never truncated
/// into another instance's.
fn instance_of(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| {
        StoreError(format!(
            "a row names instance {v}, which is no instance id (0 to {}): the database holds \
             rows this server did not write",
            u32::MAX
        ))
    })
}

fn hash_of(v: &[u8]) -> Result<Hash, StoreError> {
    Hash::try_from(v).map_err(|_| StoreError("a hash is not 32 octets".into()))
}

type Stored = (StoredRecord, Option<Vec<u8>>);

fn read_record(row: &Row) -> Result<Stored, StoreError> {
    let record = StoredRecord {
        instance_id: instance_of(row.try_get(0)?)?,
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

/// An event from [`event_columns`].
fn read_event(r: &Row) -> Result<EventRecord, StoreError> {
    let hash = |idx: usize| -> Result<Option<Hash>, StoreError> {
        r.try_get::<_, Option<&[u8]>>(idx)?.map(hash_of).transpose()
    };
    let seq: i64 = r.try_get(1)?;
    if seq < 0 {
        return Err(StoreError(format!("an event at position {seq}")));
    }
    Ok(EventRecord {
        instance_id: instance_of(r.try_get(0)?)?,
        seq: u(seq),
        time_ns: u(r.try_get(2)?),
        level: r.try_get(3)?,
        kind: r.try_get(4)?,
        message: r.try_get(5)?,
        fields: r.try_get(6)?,
        prev_hash: hash(7)?,
        body_hash: hash(8)?,
        hash: hash(9)?,
    })
}

fn read_anchor(row: &Row) -> Result<Anchor, StoreError> {
    Ok(Anchor {
        instance_id: instance_of(row.try_get(0)?)?,
        seq: u(row.try_get(1)?),
        hash: hash_of(row.try_get(2)?)?,
        max_counter: u(row.try_get(3)?),
        max_gen_time_ns: u(row.try_get(4)?),
        pruned_at_ns: u(row.try_get(5)?),
    })
}

/// Where a prune of the instance's records before `before` (ns) would cut: the anchor it would
/// store (`None`: no record goes) and the time before which events go.
///
/// The records before the first one that is not old enough (so the anchor is always the
/// record right before the oldest one kept), a bounded step (`PRUNE_ROWS`) from the oldest
/// there, and never past the last signed checkpoint (none: nothing is pruned), so that a
/// signed head reaches the anchor through the chain. Events go only where no record kept is
/// as old: those explain the records (a sync lost, a key event) that stay unpruned past their
/// checkpoint.
fn prune_plan(
    c: &mut impl GenericClient,
    instance_id: u32,
    before: i64,
) -> Result<(Option<Anchor>, i64), StoreError> {
    let id = instance_id as i64;
    let first_kept: Option<i64> = c
        .query_one(
            "SELECT MIN(seq) FROM tokens WHERE instance_id = $1 AND gen_time_ns >= $2",
            &[&id, &before],
        )?
        .try_get(0)?;
    let signed: Option<i64> = c
        .query_one(
            "SELECT MAX(seq) FROM checkpoints WHERE instance_id = $1",
            &[&id],
        )?
        .try_get(0)?;
    let lowest: Option<i64> = c
        .query_one("SELECT MIN(seq) FROM tokens WHERE instance_id = $1", &[&id])?
        .try_get(0)?;
    let step_end = lowest.map_or(0, |l| {
        (l - 1).saturating_add(i64::try_from(PRUNE_ROWS).unwrap_or(i64::MAX))
    });
    let last = match signed {
        Some(signed) => c.query_opt(
            "SELECT seq, hash FROM tokens WHERE instance_id = $1 AND seq < $2 \
             AND seq <= $3 ORDER BY seq DESC LIMIT 1",
            &[&id, &first_kept.unwrap_or(i64::MAX), &signed.min(step_end)],
        )?,
        None => None,
    };
    let kept_from: i64 = match &last {
        Some(l) => l.try_get(0)?,
        None => 0,
    };
    let oldest_kept: Option<i64> = c
        .query_one(
            "SELECT MIN(gen_time_ns) FROM tokens WHERE instance_id = $1 AND seq > $2",
            &[&id, &kept_from],
        )?
        .try_get(0)?;
    let events_before = oldest_kept.map_or(before, |t| t.min(before));
    let Some(last) = last else {
        return Ok((None, events_before));
    };
    let seq: i64 = last.try_get(0)?;
    let hash = hash_of(last.try_get(1)?)?;
    let row = c.query_one(
        "SELECT MAX(counter), MAX(gen_time_ns) FROM tokens WHERE instance_id = $1 \
         AND seq <= $2",
        &[&id, &seq],
    )?;
    let (max_counter, max_gen): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let previous = match c.query_opt(ANCHOR_SQL, &[&id])? {
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
    Ok((Some(anchor), events_before))
}

/// Stores `anchor` as its instance's chain anchor (replacing the last one), with its
/// signature.
fn write_anchor(
    c: &mut impl GenericClient,
    anchor: &Anchor,
    signed: Option<&AnchorSignature>,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, \
         max_gen_time_ns, pruned_at_ns, algorithm, signature, certificate) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (instance_id) DO UPDATE SET seq = excluded.seq, \
         hash = excluded.hash, max_counter = excluded.max_counter, \
         max_gen_time_ns = excluded.max_gen_time_ns, \
         pruned_at_ns = excluded.pruned_at_ns, algorithm = excluded.algorithm, \
         signature = excluded.signature, certificate = excluded.certificate",
        &[
            &(anchor.instance_id as i64),
            &i(anchor.seq),
            &&anchor.hash[..],
            &i(anchor.max_counter),
            &i(anchor.max_gen_time_ns),
            &i(anchor.pruned_at_ns),
            &signed.map(|s| &s.algorithm),
            &signed.map(|s| &s.signature),
            &signed.map(|s| &s.certificate),
        ],
    )?;
    Ok(())
}

/// A read-only transaction whose reads all see one snapshot of the database.
fn snapshot(client: &mut postgres::Client) -> Result<postgres::Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
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
            let event_columns = event_columns(s.chained, "BYTEA");
            // One snapshot: a prune that commits between the anchor's read and the head's
            // would leave neither standing for the records it removed.
            let mut tx = snapshot(&mut s.client)?;
            let c = &mut tx;
            let (reserved_until, inst_max_counter, inst_max_gen) = c
                .query_opt(
                    "SELECT reserved_until, max_counter, max_gen_time_ns FROM instances \
                     WHERE instance_id = $1",
                    &[&id],
                )?
                .map(|r| -> Result<_, postgres::Error> {
                    Ok((
                        u(r.try_get(0)?),
                        r.try_get::<_, Option<i64>>(1)?.map(u),
                        u(r.try_get(2)?),
                    ))
                })
                .transpose()?
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
                    seq: u(r.try_get(0)?),
                    hash: hash_of(r.try_get(1)?)?,
                }),
                None => None,
            };
            let row = c.query_one(
                "SELECT (SELECT MAX(counter) FROM tokens WHERE instance_id = $1), \
                 (SELECT MAX(gen_time_ns) FROM (SELECT gen_time_ns FROM tokens \
                  WHERE instance_id = $1 ORDER BY seq DESC LIMIT 100000) AS recent)",
                &[&id],
            )?;
            let max_counter: Option<i64> = row.try_get(0)?;
            let recent_gen: Option<i64> = row.try_get(1)?;
            let last_event = match c.query_opt(
                &format!(
                    "SELECT {event_columns} FROM events WHERE instance_id = $1 \
                     ORDER BY seq DESC LIMIT 1"
                ),
                &[&id],
            )? {
                Some(r) => Some(read_event(&r)?.head()),
                None => None,
            };
            tx.commit()?;
            Ok(InstanceState::combine(
                reserved_until,
                [max_counter.map(u), inst_max_counter],
                [recent_gen.map(u), Some(inst_max_gen)],
                head,
                anchor,
                last_event,
            ))
        })
    }

    fn instances(&mut self) -> Result<Vec<u32>, StoreError> {
        self.run(|s| {
            let rows = s.client.query(
                "SELECT instance_id FROM instances UNION SELECT DISTINCT instance_id FROM tokens \
                 UNION SELECT instance_id FROM chain_anchors \
                 UNION SELECT DISTINCT instance_id FROM checkpoints \
                 UNION SELECT DISTINCT instance_id FROM events ORDER BY 1",
                &[],
            )?;
            rows.iter().map(|r| instance_of(r.try_get(0)?)).collect()
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
                "INSERT INTO events (instance_id, seq, time_ns, level, kind, message, fields, \
                 prev_hash, body_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
                        &e.prev_hash.as_ref().map(|h| &h[..]),
                        &e.body_hash.as_ref().map(|h| &h[..]),
                        &e.hash.as_ref().map(|h| &h[..]),
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
                &format!(
                    "INSERT INTO checkpoints (instance_id, seq, head_hash, time_ns, algorithm, \
                     signature, certificate, events_seq, events_hash, anchor_seq) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) {RESIGN_CHECKPOINT}"
                ),
                &[
                    &(c.instance_id as i64),
                    &i(c.seq),
                    &&c.head_hash[..],
                    &i(c.time_ns),
                    &c.algorithm,
                    &c.signature,
                    &c.certificate,
                    &c.events.map(|e| i(e.seq)),
                    &c.events.as_ref().map(|e| &e.hash[..]),
                    &c.events.map(|_| i(c.anchor_seq)),
                ],
            )?;
            // Stored again (a repeat, or signed again with later events) is fine; another
            // head at a signed position is not.
            let signed: Vec<u8> = s
                .client
                .query_one(
                    "SELECT head_hash FROM checkpoints WHERE instance_id = $1 AND seq = $2",
                    &[&(c.instance_id as i64), &i(c.seq)],
                )?
                .try_get(0)?;
            if signed != c.head_hash {
                return Err(StoreError(format!(
                    "instance {}: a checkpoint at position {} signs another head already: the \
                     chain was rewritten below a signed head",
                    c.instance_id, c.seq
                )));
            }
            Ok(())
        })
    }

    fn checkpoints(&mut self, instance_id: u32) -> Result<Vec<Checkpoint>, StoreError> {
        self.run(move |s| {
            s.client
                .query(
                    &format!(
                        "SELECT {} FROM checkpoints WHERE instance_id = $1 ORDER BY seq",
                        checkpoint_columns(s.chained, "BYTEA")
                    ),
                    &[&(instance_id as i64)],
                )?
                .iter()
                .map(|r| {
                    Ok(Checkpoint {
                        instance_id: instance_of(r.try_get(0)?)?,
                        seq: u(r.try_get(1)?),
                        head_hash: hash_of(r.try_get(2)?)?,
                        time_ns: u(r.try_get(3)?),
                        algorithm: r.try_get(4)?,
                        signature: r.try_get(5)?,
                        certificate: r.try_get(6)?,
                        events: match r.try_get::<_, Option<i64>>(7)? {
                            Some(seq) => Some(ChainHead {
                                seq: u(seq),
                                hash: hash_of(r.try_get(8)?)?,
                            }),
                            None => None,
                        },
                        anchor_seq: r.try_get::<_, Option<i64>>(9)?.map_or(0, u),
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

    /// A count and the newest `limit` rows (a top-N sort: the server holds no more either),
    /// from one snapshot.
    fn records_by_imprint_of(
        &mut self,
        alg: Option<&str>,
        imprint: &[u8],
        limit: usize,
    ) -> Result<ImprintMatches, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = snapshot(&mut s.client)?;
            let total: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM tokens WHERE imprint = $1 \
                     AND ($2::TEXT IS NULL OR imprint_alg = $2)",
                    &[&imprint, &alg],
                )?
                .try_get(0)?;
            let rows = tx.query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM tokens WHERE imprint = $1 \
                     AND ($3::TEXT IS NULL OR imprint_alg = $3) \
                     ORDER BY gen_time_ns DESC, instance_id, seq DESC LIMIT $2"
                ),
                &[&imprint, &limit, &alg],
            )?;
            tx.commit()?;
            let mut records = Vec::with_capacity(rows.len());
            for row in rows {
                let (record, certificates) = read_record(&row)?;
                records.push(s.expand(record, certificates)?);
            }
            Ok(ImprintMatches {
                records,
                total: u(total),
            })
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
            let sql = format!(
                "SELECT {} FROM events WHERE time_ns >= $1 AND time_ns < $2 \
                 ORDER BY time_ns, instance_id, seq",
                event_columns(s.chained, "BYTEA")
            );
            s.client
                .query(&sql, &[&i(from_ns), &i(to_ns)])?
                .iter()
                .map(read_event)
                .collect()
        })
    }

    fn signed_anchor(
        &mut self,
        instance_id: u32,
    ) -> Result<Option<(Anchor, Option<AnchorSignature>)>, StoreError> {
        self.run(move |s| {
            let signature = match s.chained {
                true => "algorithm, signature, certificate",
                false => "NULL::BYTEA, NULL::BYTEA, NULL::BYTEA",
            };
            let sql = format!(
                "SELECT instance_id, seq, hash, max_counter, max_gen_time_ns, pruned_at_ns, \
                 {signature} FROM chain_anchors WHERE instance_id = $1"
            );
            match s.client.query_opt(&sql, &[&(instance_id as i64)])? {
                Some(r) => {
                    let signed = match r.try_get::<_, Option<Vec<u8>>>(7)? {
                        Some(signature) => Some(AnchorSignature {
                            algorithm: r.try_get(6)?,
                            signature,
                            certificate: r.try_get(8)?,
                        }),
                        None => None,
                    };
                    Ok(Some((read_anchor(&r)?, signed)))
                }
                None => Ok(None),
            }
        })
    }

    fn events_from(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.run(move |s| {
            let sql = format!(
                "SELECT {} FROM events WHERE instance_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                event_columns(s.chained, "BYTEA")
            );
            s.client
                .query(
                    &sql,
                    &[
                        &(instance_id as i64),
                        &events_read_start(from_seq),
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                )?
                .iter()
                .map(read_event)
                .collect()
        })
    }

    fn prune_signed(
        &mut self,
        instance_id: u32,
        before_ns: u64,
        sign: &SignAnchor<'_>,
    ) -> Result<Option<Anchor>, StoreError> {
        let (id, before) = (instance_id as i64, i(before_ns));
        prune_signed_unlocked(
            self,
            sign,
            |store| {
                store.run(move |s| {
                    let mut snapshot = snapshot(&mut s.client)?;
                    Ok(prune_plan(&mut snapshot, instance_id, before)?.0)
                })
            },
            |store, signed| {
                store.run(move |s| {
                    let mut tx = s.client.transaction()?;
                    // One pruning of an instance at a time (the instance row is the lock).
                    tx.execute(
                        "SELECT 1 FROM instances WHERE instance_id = $1 FOR UPDATE",
                        &[&id],
                    )?;
                    let (found, events_before) = prune_plan(&mut tx, instance_id, before)?;
                    if !same_cut(found.as_ref(), signed.map(|(anchor, _)| anchor)) {
                        return Ok(Pruned::Moved(found));
                    }
                    for sql in prune_events(|n| format!("${n}")) {
                        tx.execute(&sql, &[&id, &events_before])?;
                    }
                    if let Some((anchor, signature)) = signed {
                        write_anchor(&mut tx, anchor, signature.as_ref())?;
                        tx.execute(
                            "DELETE FROM tokens WHERE instance_id = $1 AND seq <= $2",
                            &[&id, &i(anchor.seq)],
                        )?;
                    }
                    tx.commit()?;
                    Ok(Pruned::Done(signed.map(|(anchor, _)| *anchor)))
                })
            },
        )
    }
}
