//! The embedded backend: one SQLite database in the state directory, in WAL mode with
//! `synchronous=FULL`, so that a committed transaction survives a crash and a power loss
//! (`NORMAL` may lose the last commits on power loss).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use super::imprints::{Found, ImprintIndex};
use super::record::{
    Anchor, AnchorSignature, ChainHead, Checkpoint, ClockAtIssue, EventRecord, Hash, StoredRecord,
    TokenRecord,
};
use super::serial::layout;
use super::store::{
    checkpoint_columns, event_columns, events_read_start, migrate_from_1, migrated_from_1,
    prune_events, prune_signed_unlocked, same_cut, schema, ArchiveStore, CertificateSets,
    ImprintMatches, InstanceState, Newest, Pruned, Rank, SignAnchor, StoreError, Visit, PRUNE_ROWS,
    RECORD_COLUMNS, RESIGN_CHECKPOINT, SCHEMA_VERSION, SCHEMA_VERSION_1,
};

pub struct SqliteStore {
    conn: Connection,
    /// The database's file, whose imprint index ([`super::imprints`]) is beside it.
    path: PathBuf,
    /// That index, once a look-up found it (kept for the next ones).
    imprints: Option<ImprintIndex>,
    certificate_sets: CertificateSets,
    /// Schema 2: events carry their hashes and checkpoints their events' head. A schema-1
    /// archive opened to be read shows neither.
    chained: bool,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::new(e)
    }
}

impl SqliteStore {
    /// Opens (creating it and its schema when missing) the database for reading and writing.
    /// A write that finds the database locked by another connection waits `busy_timeout`
    /// and then fails.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        let conn = connect(path, Access::Write, busy_timeout)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError(format!(
                "{} cannot use the write-ahead log (journal_mode {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        // 4 MiB of page cache: appends touch the right edges of the B-trees; the imprint index,
        // whose pages are random, has a database of its own (`super::imprints`).
        conn.pragma_update(None, "cache_size", -4_096)?;
        let mut store = Self {
            conn,
            path: path.to_owned(),
            imprints: None,
            certificate_sets: CertificateSets::default(),
            chained: true,
        };
        store.create_schema()?;
        store.drop_imprint_index()?;
        Ok(store)
    }

    /// Opens an existing database for look-ups, export and verification.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError(format!("{} does not exist", path.display())));
        }
        let conn = connect(path, Access::Read, Duration::from_secs(5))?;
        let mut store = Self {
            conn,
            path: path.to_owned(),
            imprints: None,
            certificate_sets: CertificateSets::default(),
            chained: true,
        };
        store.chained = store.check_version()? == SCHEMA_VERSION;
        Ok(store)
    }

    fn create_schema(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(&schema("BLOB"))?;
        tx.execute(
            "INSERT INTO archive_meta (name, value) VALUES ('schema', ?1) \
             ON CONFLICT (name) DO NOTHING",
            [SCHEMA_VERSION],
        )?;
        let migrate = version(&tx)?.as_deref() == Some(SCHEMA_VERSION_1);
        if migrate {
            tx.execute_batch(&migrate_from_1("BLOB"))?;
        }
        tx.commit()?;
        if migrate {
            migrated_from_1();
        }
        match self.check_version()?.as_str() {
            SCHEMA_VERSION => Ok(()),
            other => Err(StoreError(format!(
                "the archive's schema is version {other}: opened to be written, it must be \
                 {SCHEMA_VERSION}"
            ))),
        }
    }

    /// Archives written before the imprint index moved to a database of its own have it on
    /// `tokens`: it goes, so that commits no longer pay for it.
    fn drop_imprint_index(&mut self) -> Result<(), StoreError> {
        let exists: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' \
             AND name = 'tokens_imprint')",
            [],
            |r| r.get(0),
        )?;
        if exists {
            tracing::info!(
                event = "archive_imprint_index_moved",
                index = %super::imprints::path_for(&self.path).display(),
                "dropping the imprint index inside the archive; its own database replaces it"
            );
            self.conn.execute_batch("DROP INDEX tokens_imprint")?;
        }
        Ok(())
    }

    /// What the imprint index holds for `imprint`; nothing when there is no index (yet).
    fn imprint_lookup(&mut self, imprint: &[u8]) -> Result<Found, StoreError> {
        if self.imprints.is_none() {
            self.imprints = ImprintIndex::open_read_only(&super::imprints::path_for(&self.path))?;
        }
        match &mut self.imprints {
            Some(index) => index.lookup(imprint),
            None => Ok(Found::default()),
        }
    }

    /// The schema's version, one this build reads ([`SCHEMA_VERSION`] or the one before).
    fn check_version(&self) -> Result<String, StoreError> {
        match version(&self.conn)? {
            Some(v) if v == SCHEMA_VERSION || v == SCHEMA_VERSION_1 => Ok(v),
            other => Err(StoreError(format!(
                "unknown archive schema version {other:?} (this build knows {SCHEMA_VERSION})"
            ))),
        }
    }

    /// The log length, in pages, at which a commit checkpoints it itself (SQLite's automatic
    /// checkpoint; 1,000 unless set).
    pub fn set_autocheckpoint(&self, pages: u32) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", pages)?;
        Ok(())
    }

    /// The connection, for tests and tools that inspect the database.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn query_records(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(sql)?;
        let mut rows = stmt.query(params)?;
        while let Some(row) = rows.next()? {
            let (record, certificates) = read_record(row)?;
            let record = expand(&self.conn, &mut self.certificate_sets, record, certificates)?;
            if !visit(record)? {
                break;
            }
        }
        Ok(())
    }
}

/// Where an SQLite archive keeps its token records (`archive_meta` name `layout`, fixed when
/// the archive is made): the token log beside the database ([`super::log`]), with everything
/// else in the database (the default for new archives), or rows of `tokens` (every archive
/// made before the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Rows,
    #[default]
    Log,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Rows => "rows",
            Layout::Log => "log",
        }
    }
}

/// The layout of the archive open on `conn` (rows when it names none).
pub fn layout_of(conn: &Connection) -> Result<Layout, StoreError> {
    let name: Option<String> = conn
        .query_row(
            "SELECT value FROM archive_meta WHERE name = 'layout'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match name.as_deref() {
        None | Some("rows") => Ok(Layout::Rows),
        Some("log") => Ok(Layout::Log),
        Some(other) => Err(StoreError(format!(
            "unknown archive layout {other:?} (this build knows rows and log)"
        ))),
    }
}

impl SqliteStore {
    /// The archive's layout; for one that names none yet, `wanted` when it is new (no token,
    /// instance, anchor or checkpoint), else rows (made before layouts), written down.
    pub fn settle_layout(&mut self, wanted: Layout) -> Result<Layout, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let named: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM archive_meta WHERE name = 'layout')",
            [],
            |r| r.get(0),
        )?;
        if !named {
            let used: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM tokens) OR EXISTS (SELECT 1 FROM instances) \
                 OR EXISTS (SELECT 1 FROM chain_anchors) OR EXISTS (SELECT 1 FROM checkpoints)",
                [],
                |r| r.get(0),
            )?;
            let layout = if used { Layout::Rows } else { wanted };
            tx.execute(
                "INSERT INTO archive_meta (name, value) VALUES ('layout', ?1)",
                [layout.name()],
            )?;
        }
        let layout = layout_of(&tx)?;
        tx.commit()?;
        Ok(layout)
    }

    /// Names the layout `log` and deletes the token rows, in one transaction: the last step
    /// of a migration, once the token log holds them ([`super::log::migrate`]).
    pub(super) fn switch_to_log(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO archive_meta (name, value) VALUES ('layout', 'log') \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [],
        )?;
        tx.execute("DELETE FROM tokens", [])?;
        tx.commit()?;
        Ok(())
    }

    /// Each instance's chain anchor position.
    pub(super) fn anchor_positions(
        &self,
    ) -> Result<std::collections::HashMap<u32, u64>, StoreError> {
        super::imprints::anchors(&self.conn)
    }

    /// Stores `anchor` as its instance's chain anchor (replacing the last one), durably.
    pub(super) fn set_anchor(
        &mut self,
        anchor: &Anchor,
        signature: Option<&AnchorSignature>,
    ) -> Result<(), StoreError> {
        write_anchor(&self.conn, anchor, signature)
    }

    /// The archive's database file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `anchor` as the instance's, with its signature.
fn write_anchor(
    conn: &Connection,
    anchor: &Anchor,
    signature: Option<&AnchorSignature>,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
         pruned_at_ns, algorithm, signature, certificate) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (instance_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, \
         max_counter = excluded.max_counter, max_gen_time_ns = excluded.max_gen_time_ns, \
         pruned_at_ns = excluded.pruned_at_ns, algorithm = excluded.algorithm, \
         signature = excluded.signature, certificate = excluded.certificate",
        params![
            anchor.instance_id,
            anchor.seq,
            &anchor.hash[..],
            anchor.max_counter,
            anchor.max_gen_time_ns,
            anchor.pruned_at_ns,
            signature.map(|s| &s.algorithm),
            signature.map(|s| &s.signature),
            signature.map(|s| &s.certificate),
        ],
    )?;
    Ok(())
}

/// How a connection opens its database.
#[derive(Clone, Copy)]
pub(super) enum Access {
    Read,
    /// Reading and writing, creating the database when missing.
    Write,
}

/// A connection to the database at `path` (the archive or its imprint index), used by one
/// thread at a time; a statement that finds it locked waits `busy_timeout`, then fails.
pub(super) fn connect(
    path: &Path,
    access: Access,
    busy_timeout: Duration,
) -> Result<Connection, StoreError> {
    let flags = match access {
        Access::Read => OpenFlags::SQLITE_OPEN_READ_ONLY,
        Access::Write => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    };
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

/// The whole token again when its certificates were stored apart. A set that is missing
/// or does not match its hash leaves the token as stored: verification then reports the
/// record.
/// `record`'s whole token, its certificate set read from `conn` the first time.
fn expand(
    conn: &Connection,
    sets: &mut CertificateSets,
    record: StoredRecord,
    certificates: Option<Vec<u8>>,
) -> Result<StoredRecord, StoreError> {
    sets.expand(record, certificates, |key| {
        Ok(conn
            .query_row(
                "SELECT der FROM certificate_sets WHERE hash = ?1",
                [&key[..]],
                |r| octets(r, 0),
            )
            .optional()?)
    })
}

fn hash_of(v: Vec<u8>) -> Result<Hash, rusqlite::Error> {
    Hash::try_from(v.as_slice()).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "a hash is not 32 octets".into(),
        )
    })
}

/// An octet-string column; a value someone wrote as text (`x'00' || …` yields text in
/// SQLite) is read as its octets, so that verification reports it instead of failing.
fn octets(row: &Row<'_>, idx: usize) -> Result<Vec<u8>, rusqlite::Error> {
    use rusqlite::types::ValueRef;
    match row.get_ref(idx)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Ok(b.to_vec()),
        ValueRef::Integer(i) => Ok(i.to_be_bytes().to_vec()),
        ValueRef::Real(f) => Ok(f.to_be_bytes().to_vec()),
        ValueRef::Null => Err(rusqlite::Error::InvalidColumnType(
            idx,
            "NULL".into(),
            rusqlite::types::Type::Null,
        )),
    }
}

fn optional_octets(row: &Row<'_>, idx: usize) -> Result<Option<Vec<u8>>, rusqlite::Error> {
    match row.get_ref(idx)? {
        rusqlite::types::ValueRef::Null => Ok(None),
        _ => octets(row, idx).map(Some),
    }
}

/// A record as stored (the token maybe without its certificates) and its certificate set's
/// hash.
type Stored = (StoredRecord, Option<Vec<u8>>);

fn read_record(row: &Row<'_>) -> Result<Stored, rusqlite::Error> {
    let record = StoredRecord {
        instance_id: row.get(0)?,
        seq: row.get(1)?,
        counter: row.get(3)?,
        record: TokenRecord {
            serial: octets(row, 2)?,
            gen_time_ns: row.get(4)?,
            accuracy_ns: row.get(5)?,
            imprint_alg: row.get(6)?,
            imprint: octets(row, 7)?,
            policy: row.get(8)?,
            nonce: optional_octets(row, 9)?,
            client: row.get(10)?,
            clock: ClockAtIssue {
                source: row.get(11)?,
                state: row.get(12)?,
                bound_ns: row.get(13)?,
                sources: row.get(14)?,
            },
            token: octets(row, 15)?,
        },
        prev_hash: hash_of(octets(row, 16)?)?,
        hash: hash_of(octets(row, 17)?)?,
    };
    Ok((record, optional_octets(row, 18)?))
}

fn version(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM archive_meta WHERE name = 'schema'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

fn read_checkpoint(row: &Row<'_>) -> Result<Checkpoint, rusqlite::Error> {
    let events_seq: Option<u64> = row.get(7)?;
    Ok(Checkpoint {
        instance_id: row.get(0)?,
        seq: row.get(1)?,
        head_hash: hash_of(row.get(2)?)?,
        time_ns: row.get(3)?,
        algorithm: row.get(4)?,
        signature: row.get(5)?,
        certificate: row.get(6)?,
        events: match events_seq {
            Some(seq) => Some(ChainHead {
                seq,
                hash: hash_of(octets(row, 8)?)?,
            }),
            None => None,
        },
        anchor_seq: row.get::<_, Option<u64>>(9)?.unwrap_or(0),
    })
}

/// An event from [`event_columns`].
fn read_event(r: &Row<'_>) -> Result<EventRecord, rusqlite::Error> {
    let seq: i64 = r.get(1)?;
    let seq = u64::try_from(seq).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Integer,
            format!("an event at position {seq}").into(),
        )
    })?;
    Ok(EventRecord {
        instance_id: r.get(0)?,
        seq,
        time_ns: r.get(2)?,
        level: r.get(3)?,
        kind: r.get(4)?,
        message: r.get(5)?,
        fields: r.get(6)?,
        prev_hash: optional_octets(r, 7)?.map(hash_of).transpose()?,
        body_hash: optional_octets(r, 8)?.map(hash_of).transpose()?,
        hash: optional_octets(r, 9)?.map(hash_of).transpose()?,
    })
}

pub(super) fn read_anchor(row: &Row<'_>) -> Result<Anchor, rusqlite::Error> {
    Ok(Anchor {
        instance_id: row.get(0)?,
        seq: row.get(1)?,
        hash: hash_of(row.get(2)?)?,
        max_counter: row.get(3)?,
        max_gen_time_ns: row.get(4)?,
        pruned_at_ns: row.get(5)?,
    })
}

fn now_ns() -> u64 {
    crate::clock::system_unix_ns()
}

impl ArchiveStore for SqliteStore {
    fn instance(&mut self, instance_id: u32) -> Result<InstanceState, StoreError> {
        let c = &self.conn;
        let (reserved_until, inst_max_counter, inst_max_gen): (u64, Option<u64>, u64) = c
            .query_row(
                "SELECT reserved_until, max_counter, max_gen_time_ns FROM instances \
                 WHERE instance_id = ?1",
                [instance_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .unwrap_or((0, None, 0));
        let anchor = anchor_of(c, instance_id)?;
        // The head is the record with the highest position; the counter index answers the
        // highest counter; the genTimes of the last records (commit order and genTime order
        // differ only among requests in flight together) and the instance row the rest.
        let head = c
            .query_row(
                "SELECT seq, hash FROM tokens WHERE instance_id = ?1 ORDER BY seq DESC LIMIT 1",
                [instance_id],
                |r| {
                    Ok(ChainHead {
                        seq: r.get(0)?,
                        hash: hash_of(r.get(1)?)?,
                    })
                },
            )
            .optional()?;
        let max_counter: Option<u64> = c.query_row(
            "SELECT MAX(counter) FROM tokens WHERE instance_id = ?1",
            [instance_id],
            |r| r.get(0),
        )?;
        let recent_gen: Option<u64> = c.query_row(
            "SELECT MAX(gen_time_ns) FROM (SELECT gen_time_ns FROM tokens \
             WHERE instance_id = ?1 ORDER BY seq DESC LIMIT 100000)",
            [instance_id],
            |r| r.get(0),
        )?;
        let last_event = c
            .query_row(
                &format!(
                    "SELECT {} FROM events WHERE instance_id = ?1 ORDER BY seq DESC LIMIT 1",
                    event_columns(self.chained, "BLOB")
                ),
                [instance_id],
                read_event,
            )
            .optional()?
            .map(|e| e.head());
        Ok(InstanceState::combine(
            reserved_until,
            [max_counter, inst_max_counter],
            [recent_gen, Some(inst_max_gen)],
            head,
            anchor,
            last_event,
        ))
    }

    fn instances(&mut self) -> Result<Vec<u32>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT instance_id FROM instances UNION SELECT DISTINCT instance_id FROM tokens \
             UNION SELECT instance_id FROM chain_anchors \
             UNION SELECT DISTINCT instance_id FROM checkpoints \
             UNION SELECT DISTINCT instance_id FROM events ORDER BY 1",
        )?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(ids)
    }

    fn reserve(
        &mut self,
        instance_id: u32,
        until: u64,
        gen_time_floor_ns: u64,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO instances (instance_id, reserved_until, max_counter, max_gen_time_ns, \
             updated_ns) VALUES (?1, ?2, NULL, ?3, ?4) \
             ON CONFLICT (instance_id) DO UPDATE SET \
             reserved_until = MAX(instances.reserved_until, excluded.reserved_until), \
             max_gen_time_ns = MAX(instances.max_gen_time_ns, excluded.max_gen_time_ns), \
             updated_ns = excluded.updated_ns",
            params![instance_id, until, gen_time_floor_ns, now_ns()],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn append(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
    ) -> Result<(), StoreError> {
        let mut new_sets: Vec<(Hash, Vec<u8>)> = Vec::new();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT INTO tokens ({RECORD_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18, ?19)"
            ))?;
            let mut insert_set = tx.prepare_cached(
                "INSERT INTO certificate_sets (hash, der) VALUES (?1, ?2) \
                 ON CONFLICT (hash) DO NOTHING",
            )?;
            for s in records {
                let r = &s.record;
                let (token, certificates) =
                    self.certificate_sets
                        .compact(&r.token, &mut new_sets, |key, set| {
                            insert_set.execute(params![&key[..], set])?;
                            Ok(())
                        })?;
                insert.execute(params![
                    s.instance_id,
                    s.seq,
                    r.serial,
                    s.counter,
                    r.gen_time_ns,
                    r.accuracy_ns,
                    r.imprint_alg,
                    r.imprint,
                    r.policy,
                    r.nonce,
                    r.client,
                    r.clock.source,
                    r.clock.state,
                    r.clock.bound_ns,
                    r.clock.sources,
                    &*token,
                    &s.prev_hash[..],
                    &s.hash[..],
                    certificates.as_ref().map(|k| &k[..]),
                ])?;
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (instance_id, seq, time_ns, level, kind, message, fields, \
                 prev_hash, body_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for e in events {
                insert.execute(params![
                    e.instance_id,
                    e.seq,
                    e.time_ns,
                    e.level,
                    e.kind,
                    e.message,
                    e.fields,
                    e.prev_hash.as_ref().map(|h| &h[..]),
                    e.body_hash.as_ref().map(|h| &h[..]),
                    e.hash.as_ref().map(|h| &h[..]),
                ])?;
            }
            if let (Some(max_counter), Some(max_gen)) = (
                records.iter().map(|r| r.counter).max(),
                records.iter().map(|r| r.record.gen_time_ns).max(),
            ) {
                let mut update = tx.prepare_cached(
                    "INSERT INTO instances (instance_id, reserved_until, max_counter, \
                     max_gen_time_ns, updated_ns) VALUES (?1, ?2, ?2, ?3, ?4) \
                     ON CONFLICT (instance_id) DO UPDATE SET \
                     max_counter = MAX(COALESCE(instances.max_counter, 0), excluded.max_counter), \
                     max_gen_time_ns = MAX(instances.max_gen_time_ns, excluded.max_gen_time_ns), \
                     updated_ns = excluded.updated_ns",
                )?;
                update.execute(params![instance_id, max_counter, max_gen, now_ns()])?;
            }
        }
        tx.commit()?;
        self.certificate_sets.committed(new_sets);
        Ok(())
    }

    /// One checkpoint per position: one that signs the same head there with a later events'
    /// head replaces it, a repeat is a no-op, and one that signs another head is refused (the
    /// chain was rewritten below a signed head).
    fn add_checkpoint(&mut self, c: &Checkpoint) -> Result<(), StoreError> {
        let added = self.conn.execute(
            &format!(
                "INSERT INTO checkpoints (instance_id, seq, head_hash, time_ns, algorithm, \
                 signature, certificate, events_seq, events_hash, anchor_seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) {RESIGN_CHECKPOINT}"
            ),
            params![
                c.instance_id,
                c.seq,
                &c.head_hash[..],
                c.time_ns,
                c.algorithm,
                c.signature,
                c.certificate,
                c.events.map(|e| e.seq),
                c.events.as_ref().map(|e| &e.hash[..]),
                c.events.map(|_| c.anchor_seq),
            ],
        )?;
        if added == 0 {
            let signed: Vec<u8> = self.conn.query_row(
                "SELECT head_hash FROM checkpoints WHERE instance_id = ?1 AND seq = ?2",
                params![c.instance_id, c.seq],
                |r| r.get(0),
            )?;
            if signed != c.head_hash {
                return Err(StoreError(format!(
                    "instance {}: a checkpoint at position {} signs another head already: the \
                     chain was rewritten below a signed head",
                    c.instance_id, c.seq
                )));
            }
        }
        Ok(())
    }

    fn checkpoints(&mut self, instance_id: u32) -> Result<Vec<Checkpoint>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM checkpoints WHERE instance_id = ?1 ORDER BY seq",
            checkpoint_columns(self.chained, "BLOB")
        ))?;
        let all = stmt
            .query_map([instance_id], read_checkpoint)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(all)
    }

    fn record_by_serial(&mut self, serial: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        let Some((instance_id, counter)) = layout::decode(serial) else {
            return Ok(None);
        };
        let found = self
            .conn
            .query_row(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM tokens WHERE instance_id = ?1 AND counter = ?2"
                ),
                params![instance_id, counter],
                read_record,
            )
            .optional()?;
        match found {
            Some((record, certificates)) if record.record.serial == serial => {
                expand(&self.conn, &mut self.certificate_sets, record, certificates).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The positions the imprint index ([`super::imprints`]) holds, then the records it has
    /// not reached yet, read from `tokens` above each instance's watermark (all of them when
    /// there is no index, or it cannot be read), in one read transaction. The matches are
    /// counted and ranked by their genTimes, their tokens left on disk; then the newest `limit`
    /// are read whole.
    fn records_by_imprint_of(
        &mut self,
        alg: Option<&str>,
        imprint: &[u8],
        limit: usize,
    ) -> Result<ImprintMatches, StoreError> {
        let mut found = match self.imprint_lookup(imprint) {
            Ok(found) => found,
            Err(e) => {
                // Opened again at the next look-up.
                self.imprints = None;
                tracing::warn!(
                    index = %super::imprints::path_for(&self.path).display(),
                    error = %e,
                    "cannot read the imprint index; reading the archive instead"
                );
                Found::default()
            }
        };
        // Each record counts once, however the index lists it.
        found.positions.sort_unstable();
        found.positions.dedup();
        let mark = |instance_id: u32| found.watermarks.get(&instance_id).copied().unwrap_or(0);
        let tx = self.conn.unchecked_transaction()?;
        let instances: Vec<u32> = tx
            .prepare("SELECT instance_id FROM instances")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut newest = Newest::new(limit);
        {
            let mut indexed = tx.prepare(
                "SELECT gen_time_ns FROM tokens WHERE instance_id = ?1 AND seq = ?2 \
                 AND imprint = ?3 AND (?4 IS NULL OR imprint_alg = ?4)",
            )?;
            for &(instance_id, seq) in &found.positions {
                // One above its watermark is among those read next.
                if seq > mark(instance_id) && instances.contains(&instance_id) {
                    continue;
                }
                let gen_time_ns: Option<u64> = indexed
                    .query_row(params![instance_id, seq, imprint, alg], |r| r.get(0))
                    .optional()?;
                if let Some(gen_time_ns) = gen_time_ns {
                    newest.offer(Rank::new(gen_time_ns, instance_id, seq), (instance_id, seq));
                }
            }
            let mut above = tx.prepare(
                "SELECT seq, gen_time_ns FROM tokens WHERE instance_id = ?1 AND seq > ?2 \
                 AND imprint = ?3 AND (?4 IS NULL OR imprint_alg = ?4)",
            )?;
            for &instance_id in &instances {
                let mut rows =
                    above.query(params![instance_id, mark(instance_id), imprint, alg])?;
                while let Some(row) = rows.next()? {
                    let (seq, gen_time_ns) = (row.get(0)?, row.get(1)?);
                    newest.offer(Rank::new(gen_time_ns, instance_id, seq), (instance_id, seq));
                }
            }
        }
        let (kept, total) = newest.finish();
        let mut records = Vec::with_capacity(kept.len());
        for (instance_id, seq) in kept {
            let stored = tx
                .query_row(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM tokens WHERE instance_id = ?1 AND seq = ?2"
                    ),
                    params![instance_id, seq],
                    read_record,
                )
                .optional()?;
            if let Some((record, certificates)) = stored {
                records.push(expand(
                    &tx,
                    &mut self.certificate_sets,
                    record,
                    certificates,
                )?);
            }
        }
        tx.commit()?;
        Ok(ImprintMatches { records, total })
    }

    fn for_each_record(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        self.query_records(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM tokens WHERE instance_id = ?1 AND seq >= ?2 \
                 ORDER BY seq"
            ),
            params![instance_id, from_seq],
            visit,
        )
    }

    fn for_each_in_time(
        &mut self,
        from_ns: u64,
        to_ns: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        self.query_records(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM tokens WHERE gen_time_ns >= ?1 AND gen_time_ns < ?2 \
                 ORDER BY gen_time_ns, instance_id, seq"
            ),
            params![from_ns.min(i64::MAX as u64), to_ns.min(i64::MAX as u64)],
            visit,
        )
    }

    fn events(&mut self, from_ns: u64, to_ns: u64) -> Result<Vec<EventRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM events WHERE time_ns >= ?1 AND time_ns < ?2 \
             ORDER BY time_ns, instance_id, seq",
            event_columns(self.chained, "BLOB")
        ))?;
        let all = stmt
            .query_map(
                params![from_ns.min(i64::MAX as u64), to_ns.min(i64::MAX as u64)],
                read_event,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(all)
    }

    fn signed_anchor(
        &mut self,
        instance_id: u32,
    ) -> Result<Option<(Anchor, Option<AnchorSignature>)>, StoreError> {
        let signature = match self.chained {
            true => "algorithm, signature, certificate",
            false => "NULL, NULL, NULL",
        };
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT instance_id, seq, hash, max_counter, max_gen_time_ns, pruned_at_ns, \
                     {signature} FROM chain_anchors WHERE instance_id = ?1"
                ),
                [instance_id],
                |r| {
                    let signed = match optional_octets(r, 7)? {
                        Some(signature) => Some(AnchorSignature {
                            algorithm: octets(r, 6)?,
                            signature,
                            certificate: octets(r, 8)?,
                        }),
                        None => None,
                    };
                    Ok((read_anchor(r)?, signed))
                },
            )
            .optional()?)
    }

    fn events_from(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM events WHERE instance_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
            event_columns(self.chained, "BLOB")
        ))?;
        let all = stmt
            .query_map(
                params![
                    instance_id,
                    events_read_start(from_seq),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                read_event,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(all)
    }

    fn prune_signed(
        &mut self,
        instance_id: u32,
        before_ns: u64,
        sign: &SignAnchor<'_>,
    ) -> Result<Option<Anchor>, StoreError> {
        let before_ns = before_ns.min(i64::MAX as u64);
        prune_signed_unlocked(
            self,
            sign,
            // Read in one snapshot, which holds no lock (WAL).
            |store| {
                let snapshot = store.conn.transaction()?;
                Ok(prune_plan(&snapshot, instance_id, before_ns)?.0)
            },
            |store, signed| {
                let tx = store
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                let (found, events_before) = prune_plan(&tx, instance_id, before_ns)?;
                if !same_cut(found.as_ref(), signed.map(|(anchor, _)| anchor)) {
                    return Ok(Pruned::Moved(found));
                }
                for sql in prune_events(|n| format!("?{n}")) {
                    tx.execute(&sql, params![instance_id, events_before])?;
                }
                if let Some((anchor, signature)) = signed {
                    write_anchor(&tx, anchor, signature.as_ref())?;
                    tx.execute(
                        "DELETE FROM tokens WHERE instance_id = ?1 AND seq <= ?2",
                        params![instance_id, anchor.seq],
                    )?;
                }
                tx.commit()?;
                Ok(Pruned::Done(signed.map(|(anchor, _)| *anchor)))
            },
        )
    }

    fn free_space(&self) -> Option<u64> {
        crate::files::free_space(crate::files::directory_of(&self.path))
    }
}

/// The instance's chain anchor, if it has one.
fn anchor_of(conn: &Connection, instance_id: u32) -> Result<Option<Anchor>, rusqlite::Error> {
    conn.query_row(
        "SELECT instance_id, seq, hash, max_counter, max_gen_time_ns, pruned_at_ns \
         FROM chain_anchors WHERE instance_id = ?1",
        [instance_id],
        read_anchor,
    )
    .optional()
}

/// Where a prune of the instance's records before `before_ns` would cut: the anchor it would
/// store (`None`: no record goes) and the time before which events go.
///
/// The records before the first one that is not old enough (so the anchor is always the
/// record right before the oldest one kept), a bounded step (`PRUNE_ROWS`) from the oldest
/// there, and never past the last signed checkpoint: the anchor's hash is then one that a
/// signed head reaches through the chain. Without a checkpoint nothing is pruned. Events go
/// only where no record kept is as old: those explain the records (a sync lost, a key event)
/// that stay unpruned past their checkpoint.
fn prune_plan(
    conn: &Connection,
    instance_id: u32,
    before_ns: u64,
) -> Result<(Option<Anchor>, u64), StoreError> {
    let first_kept: Option<u64> = conn.query_row(
        "SELECT MIN(seq) FROM tokens WHERE instance_id = ?1 AND gen_time_ns >= ?2",
        params![instance_id, before_ns],
        |r| r.get(0),
    )?;
    let signed = last_checkpoint_seq(conn, instance_id)?;
    let lowest: Option<u64> = conn.query_row(
        "SELECT MIN(seq) FROM tokens WHERE instance_id = ?1",
        [instance_id],
        |r| r.get(0),
    )?;
    let step_end = lowest.map_or(0, |l| l.saturating_sub(1).saturating_add(PRUNE_ROWS));
    let last: Option<(u64, Vec<u8>)> = match signed {
        Some(signed) => conn
            .query_row(
                "SELECT seq, hash FROM tokens WHERE instance_id = ?1 AND seq < ?2 \
                 AND seq <= ?3 ORDER BY seq DESC LIMIT 1",
                params![
                    instance_id,
                    first_kept.unwrap_or(i64::MAX as u64),
                    signed.min(step_end).min(i64::MAX as u64)
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?,
        None => None,
    };
    let kept_from = last.as_ref().map_or(0, |(seq, _)| *seq);
    let oldest_kept: Option<u64> = conn.query_row(
        "SELECT MIN(gen_time_ns) FROM tokens WHERE instance_id = ?1 AND seq > ?2",
        params![instance_id, kept_from],
        |r| r.get(0),
    )?;
    let events_before = oldest_kept.map_or(before_ns, |t| t.min(before_ns));
    let Some((seq, hash)) = last else {
        return Ok((None, events_before));
    };
    let (max_counter, max_gen): (u64, u64) = conn.query_row(
        "SELECT MAX(counter), MAX(gen_time_ns) FROM tokens WHERE instance_id = ?1 AND seq <= ?2",
        params![instance_id, seq],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let previous = anchor_of(conn, instance_id)?;
    let anchor = Anchor {
        instance_id,
        seq,
        hash: hash_of(hash)?,
        max_counter: max_counter.max(previous.map_or(0, |a| a.max_counter)),
        max_gen_time_ns: max_gen.max(previous.map_or(0, |a| a.max_gen_time_ns)),
        pruned_at_ns: now_ns(),
    };
    Ok((Some(anchor), events_before))
}

/// The position of the instance's last signed checkpoint, if it has one: pruning never goes
/// past it.
pub(super) fn last_checkpoint_seq(
    conn: &Connection,
    instance_id: u32,
) -> Result<Option<u64>, StoreError> {
    Ok(conn.query_row(
        "SELECT MAX(seq) FROM checkpoints WHERE instance_id = ?1",
        [instance_id],
        |r| r.get(0),
    )?)
}

/// The position and head hash of the instance's last signed checkpoint, if it has one: the
/// chain must reach it.
pub(super) fn last_checkpoint(
    conn: &Connection,
    instance_id: u32,
) -> Result<Option<ChainHead>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT seq, head_hash FROM checkpoints WHERE instance_id = ?1 \
             ORDER BY seq DESC LIMIT 1",
            [instance_id],
            |r| {
                Ok(ChainHead {
                    seq: r.get(0)?,
                    hash: hash_of(r.get(1)?)?,
                })
            },
        )
        .optional()?)
}
