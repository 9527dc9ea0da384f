//! The SQLite archive's index of records by imprint, kept out of the commit path.
//!
//! Each token's imprint is random, so an index on `tokens.imprint` inside the archive makes
//! every record dirty a B-tree page of its own, which the commit writes to the log and the
//! checkpoint writes again: the writer's cost per record was about 4 × what it is without
//! that index (`benches/archive.rs`). So the index is a database of its own beside the archive
//! (`archive.imprints.sqlite` for `archive.sqlite`), filled by a thread of its own
//! ([`Indexer`]) from what the archive has committed.
//!
//! It is a log-structured index, so that each record costs a few sequential writes rather
//! than a random page, however large the archive grows:
//!
//! - each step of the indexer sorts the records above an instance's watermark (at most
//!   [`STEP`]) by imprint and writes them as a new *run*: a table of its own, filled in key
//!   order, with the new watermark in the same transaction;
//! - when a level holds [`FANOUT`] runs, they are merged into one run of the next level, up to
//!   [`TOP_LEVEL`], whose runs stay as they are;
//! - an entry is the imprint's first 8 octets (as a signed integer) with the record's
//!   instance and position, about 20 octets; a look-up asks every run (at most about
//!   `FANOUT` per level) and then compares whole imprints in `tokens`;
//! - a run whose records were all pruned from the archive (up to each instance's chain
//!   anchor) is dropped; entries of pruned records in other runs find no record and are
//!   passed over.
//!
//! It is derived data, made from `tokens` alone: rebuilt when it is missing, unreadable, of
//! another layout, or not of this archive (the record at a watermark has another hash, or the
//! archive ends before it, as after a restore from an older backup). Its commits are not
//! synced (`synchronous=NORMAL` in WAL mode: a crash may lose its last transactions, never its
//! consistency), so after a crash it goes on from the watermarks that survived.
//!
//! A look-up ([`ImprintIndex::lookup`]) reads the entries and the watermarks in one read
//! transaction; the store then reads the records above the watermarks from `tokens` itself (a
//! range of its primary key), so a look-up finds every committed record however far the
//! index is behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::background::Background;
use super::sqlite::{connect, Access};
use super::store::StoreError;

/// The index's own tables; each run is a table `run_<id>` besides ([`create_run`]).
const SCHEMA: &str = "
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    level INTEGER NOT NULL,
    records INTEGER NOT NULL
);
CREATE TABLE run_ranges (
    run INTEGER NOT NULL,
    instance_id INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    PRIMARY KEY (run, instance_id)
) WITHOUT ROWID;
CREATE TABLE watermarks (
    instance_id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
);
";

/// `PRAGMA user_version` of this layout; an index of another is rebuilt.
const LAYOUT: i64 = 2;
/// Records indexed per step (one run of level 0).
pub const STEP: usize = 8_192;
/// Runs of one level merged into one of the next.
pub const FANOUT: usize = 8;
/// Runs of this level are not merged further: about `STEP × FANOUT^TOP_LEVEL` = 4.2 million
/// records each, so that no merge rewrites more than that in one transaction (about 90 MB),
/// and a look-up in an archive of 100 million tokens asks about 45 runs.
pub const TOP_LEVEL: i64 = 3;
/// How long a statement waits for a database another connection has locked.
const BUSY: Duration = Duration::from_secs(5);
/// How long the indexer waits when it has caught up.
const IDLE: Duration = Duration::from_millis(250);
/// How long it waits after a failure before it tries again.
const RETRY: Duration = Duration::from_secs(1);
/// The indexer's scheduling priority, below the request path's.
const NICE: i32 = 10;

/// Where the index of the archive `database` is: `archive.imprints.sqlite` beside
/// `archive.sqlite` (`NAME.imprints` for a name without an extension).
pub fn path_for(database: &Path) -> PathBuf {
    let stem = database.file_stem().unwrap_or_default().to_string_lossy();
    let name = match database.extension() {
        Some(ext) => format!("{stem}.imprints.{}", ext.to_string_lossy()),
        None => format!("{stem}.imprints"),
    };
    database.with_file_name(name)
}

/// An imprint's key in the index: its first 8 octets as a big-endian signed integer (zeros
/// after a shorter one). Look-ups compare the whole imprint in the archive.
pub fn prefix(imprint: &[u8]) -> i64 {
    let mut octets = [0u8; 8];
    let n = imprint.len().min(8);
    octets[..n].copy_from_slice(&imprint[..n]);
    i64::from_be_bytes(octets)
}

fn create_run(tx: &Transaction<'_>, id: i64) -> Result<(), StoreError> {
    tx.execute_batch(&format!(
        "CREATE TABLE run_{id} (prefix INTEGER NOT NULL, instance_id INTEGER NOT NULL, \
         seq INTEGER NOT NULL, PRIMARY KEY (prefix, instance_id, seq)) WITHOUT ROWID"
    ))?;
    Ok(())
}

/// What the index knows of one imprint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The indexed records whose imprint starts as the one asked for, as (instance,
    /// position), in no particular order.
    pub positions: Vec<(u32, u64)>,
    /// Per instance, the last position indexed: records above it are not in the index yet
    /// (an instance missing here has none indexed).
    pub watermarks: HashMap<u32, u64>,
}

/// What one step of [`ImprintIndex::catch_up`] left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Whether it did anything (so there may be more to do).
    pub worked: bool,
    /// Archived records not in the index after it.
    pub behind: u64,
}

pub struct ImprintIndex {
    conn: Connection,
    /// [`TOP_LEVEL`], lower in tests.
    top_level: i64,
}

impl ImprintIndex {
    /// Opens the index for writing, creating it when missing. An index of another layout is
    /// an error (the indexer then rebuilds it).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path, Access::Write, BUSY)?;
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // 8 MiB of page cache; pages beyond it come from the kernel's page cache, outside the
        // process's memory.
        conn.pragma_update(None, "cache_size", -8_192)?;
        match layout(&conn)? {
            Some(LAYOUT) => {}
            None => conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {LAYOUT}; COMMIT;"
            ))?,
            Some(other) => {
                return Err(StoreError(format!(
                    "{} has layout {other}, not {LAYOUT}",
                    path.display()
                )))
            }
        }
        Ok(Self {
            conn,
            top_level: TOP_LEVEL,
        })
    }

    /// Opens the index for look-ups; `None` when there is none (yet).
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = connect(path, Access::Read, BUSY)?;
        match layout(&conn)? {
            Some(LAYOUT) => Ok(Some(Self {
                conn,
                top_level: TOP_LEVEL,
            })),
            None => Ok(None),
            Some(other) => Err(StoreError(format!(
                "{} has layout {other}, not {LAYOUT}",
                path.display()
            ))),
        }
    }

    /// The indexed records with `imprint`'s key and the watermarks, from one read
    /// transaction.
    pub fn lookup(&mut self, imprint: &[u8]) -> Result<Found, StoreError> {
        let key = prefix(imprint);
        let tx = self.conn.transaction()?;
        let runs = run_ids(&tx, "SELECT id FROM runs")?;
        let mut positions = Vec::new();
        for id in runs {
            let mut stmt = tx.prepare(&format!(
                "SELECT instance_id, seq FROM run_{id} WHERE prefix = ?1"
            ))?;
            let rows = stmt.query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in rows {
                positions.push(row?);
            }
        }
        let watermarks = tx
            .prepare_cached("SELECT instance_id, seq FROM watermarks")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(Found {
            positions,
            watermarks,
        })
    }

    /// Whether the index belongs to `archive`: each watermark's record is there with the hash
    /// the index noted, or was pruned. An index that does not is emptied (and rebuilt by
    /// [`ImprintIndex::catch_up`]); returns whether that happened.
    pub fn check(&mut self, archive: &Connection) -> Result<bool, StoreError> {
        let marks: Vec<(u32, u64, Vec<u8>)> = self
            .conn
            .prepare("SELECT instance_id, seq, hash FROM watermarks")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let anchors = anchors(archive)?;
        for (instance_id, seq, hash) in marks {
            let stored: Option<Vec<u8>> = archive
                .query_row(
                    "SELECT hash FROM tokens WHERE instance_id = ?1 AND seq = ?2",
                    params![instance_id, seq],
                    |r| r.get(0),
                )
                .optional()?;
            let belongs = match stored {
                Some(stored) => stored == hash,
                None => anchors.get(&instance_id).is_some_and(|a| *a >= seq),
            };
            if !belongs {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                let runs = run_ids(&tx, "SELECT id FROM runs")?;
                drop_runs(&tx, &runs)?;
                tx.execute_batch("DELETE FROM watermarks")?;
                tx.commit()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One step of catching up with `archive`, in one transaction: drops the runs whose
    /// records were all pruned from it; or else merges a level that is full; or else indexes
    /// at most `limit` of an instance's records above its watermark as a new run.
    pub fn catch_up(&mut self, archive: &Connection, limit: usize) -> Result<Progress, StoreError> {
        let anchors = anchors(archive)?;
        let mut progress = Progress {
            worked: self.drop_pruned(&anchors)? || self.merge()?,
            behind: 0,
        };
        for (instance_id, head) in heads(archive)? {
            let mut mark = watermark(&self.conn, instance_id)?;
            if !progress.worked && head.is_some_and(|h| h > mark) {
                mark = self
                    .index(archive, instance_id, mark, limit)?
                    .unwrap_or(mark);
                progress.worked = true;
            }
            // Records up to the anchor are gone, indexed or not.
            let done = mark.max(anchors.get(&instance_id).copied().unwrap_or(0));
            progress.behind += head.unwrap_or(0).saturating_sub(done);
        }
        Ok(progress)
    }

    /// Indexes the instance's records above `mark`, at most `limit`, as a run of level 0;
    /// returns the new watermark.
    fn index(
        &mut self,
        archive: &Connection,
        instance_id: u32,
        mark: u64,
        limit: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut last = None;
        let mut entries: Vec<(i64, u64)> = Vec::with_capacity(limit.min(STEP));
        {
            let mut stmt = archive.prepare_cached(
                "SELECT seq, imprint, hash FROM tokens WHERE instance_id = ?1 AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![instance_id, mark, limit as u64])?;
            while let Some(row) = rows.next()? {
                let seq: u64 = row.get(0)?;
                let imprint = match row.get_ref(1)? {
                    ValueRef::Blob(b) | ValueRef::Text(b) => b,
                    _ => &[],
                };
                entries.push((prefix(imprint), seq));
                last = Some((seq, row.get::<_, Vec<u8>>(2)?));
            }
        }
        let Some((last_seq, last_hash)) = last else {
            return Ok(None);
        };
        // In key order, the run's B-tree is written from left to right.
        entries.sort_unstable();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another server's indexer on the same archive (instances sharing one database) may
        // have indexed them since the watermark was read: its run stands, this one is not
        // written (the same records in two runs would also fail the merge of their level).
        let now = watermark(&tx, instance_id)?;
        if now != mark {
            return Ok(Some(now));
        }
        let id = new_run(&tx, 0, entries.len())?;
        {
            let mut insert = tx.prepare(&format!(
                "INSERT INTO run_{id} (prefix, instance_id, seq) VALUES (?1, ?2, ?3)"
            ))?;
            for (key, seq) in &entries {
                insert.execute(params![key, instance_id, seq])?;
            }
        }
        tx.execute(
            "INSERT INTO run_ranges (run, instance_id, max_seq) VALUES (?1, ?2, ?3)",
            params![id, instance_id, last_seq],
        )?;
        tx.execute(
            "INSERT INTO watermarks (instance_id, seq, hash) VALUES (?1, ?2, ?3) \
             ON CONFLICT (instance_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            params![instance_id, last_seq, last_hash],
        )?;
        tx.commit()?;
        Ok(Some(last_seq))
    }

    /// Merges the oldest [`FANOUT`] runs of the lowest level that has that many (below
    /// the top level) into one run of the next level; returns whether there was one.
    fn merge(&mut self) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let level: Option<i64> = tx
            .query_row(
                "SELECT level FROM runs WHERE level < ?1 GROUP BY level \
                 HAVING COUNT(*) >= ?2 ORDER BY level LIMIT 1",
                params![self.top_level, FANOUT as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(level) = level else {
            return Ok(false);
        };
        let runs = run_ids(
            &tx,
            &format!("SELECT id FROM runs WHERE level = {level} ORDER BY id LIMIT {FANOUT}"),
        )?;
        let list = runs
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let records: i64 = tx.query_row(
            &format!("SELECT SUM(records) FROM runs WHERE id IN ({list})"),
            [],
            |r| r.get(0),
        )?;
        let id = new_run(&tx, level + 1, records as usize)?;
        // Each run is in key order, so SQLite merges them as they are (no sort). A record
        // indexed twice (by two indexers before they checked each other's watermark) is kept
        // once.
        let union = runs
            .iter()
            .map(|r| format!("SELECT prefix, instance_id, seq FROM run_{r}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        tx.execute_batch(&format!(
            "INSERT OR IGNORE INTO run_{id} (prefix, instance_id, seq) {union} ORDER BY 1, 2, 3;
             INSERT INTO run_ranges (run, instance_id, max_seq) \
             SELECT {id}, instance_id, MAX(max_seq) FROM run_ranges WHERE run IN ({list}) \
             GROUP BY instance_id;"
        ))?;
        drop_runs(&tx, &runs)?;
        tx.commit()?;
        Ok(true)
    }

    /// Drops every run whose records are all at or below their instance's anchor (pruned
    /// from the archive); returns whether there was one.
    fn drop_pruned(&mut self, anchors: &HashMap<u32, u64>) -> Result<bool, StoreError> {
        if anchors.is_empty() {
            return Ok(false);
        }
        let ranges: Vec<(i64, u32, u64)> = self
            .conn
            .prepare_cached("SELECT run, instance_id, max_seq FROM run_ranges")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut live: HashMap<i64, bool> = HashMap::new();
        for (run, instance_id, max_seq) in ranges {
            let pruned = anchors.get(&instance_id).is_some_and(|a| *a >= max_seq);
            *live.entry(run).or_default() |= !pruned;
        }
        let gone: Vec<i64> = live
            .into_iter()
            .filter_map(|(run, live)| (!live).then_some(run))
            .collect();
        if gone.is_empty() {
            return Ok(false);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        drop_runs(&tx, &gone)?;
        tx.commit()?;
        Ok(true)
    }
}

/// One line on the index of the archive `database`, for `tsa archive verify`: how far it
/// reaches in each instance's chain and how many runs it has. The index is derived data, so
/// this is information, not part of the verification.
pub fn status(database: &Path) -> String {
    if super::log::is_log_archive(database) {
        return super::log::imprint_status(database);
    }
    let path = path_for(database);
    let describe = || -> Result<String, StoreError> {
        let Some(mut index) = ImprintIndex::open_read_only(&path)? else {
            return Ok("none yet; look-ups by imprint read the archive".into());
        };
        let archive = connect(database, Access::Read, BUSY)?;
        let tx = index.conn.transaction()?;
        let runs = run_ids(&tx, "SELECT id FROM runs")?.len();
        let marks: HashMap<u32, u64> = tx
            .prepare("SELECT instance_id, seq FROM watermarks")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let reach: Vec<String> = heads(&archive)?
            .iter()
            .filter_map(|(id, head)| {
                head.map(|h| {
                    let mark = marks.get(id).copied().unwrap_or(0).min(h);
                    format!("instance {id} up to record {mark} of {h}")
                })
            })
            .collect();
        let reach = if reach.is_empty() {
            "no records".to_string()
        } else {
            reach.join(", ")
        };
        Ok(format!("{reach}; {runs} runs"))
    };
    let line =
        describe().unwrap_or_else(|e| format!("cannot be read ({e}); look-ups read the archive"));
    format!(
        "imprint index {} (derived, rebuilt when needed): {line}",
        path.display()
    )
}

/// The layout of an index database: `None` for a new, empty one.
fn layout(conn: &Connection) -> Result<Option<i64>, StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))?;
    Ok((version != 0 || tables != 0).then_some(version))
}

/// Each instance's last position in the archive (`None` when it has no records).
fn heads(archive: &Connection) -> Result<Vec<(u32, Option<u64>)>, StoreError> {
    Ok(archive
        .prepare_cached(
            "SELECT instance_id, \
             (SELECT MAX(seq) FROM tokens t WHERE t.instance_id = i.instance_id) \
             FROM instances i ORDER BY instance_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

/// Each instance's chain anchor: its records up to it were pruned.
pub(super) fn anchors(archive: &Connection) -> Result<HashMap<u32, u64>, StoreError> {
    Ok(archive
        .prepare_cached("SELECT instance_id, seq FROM chain_anchors")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

fn run_ids(tx: &Transaction<'_>, sql: &str) -> Result<Vec<i64>, StoreError> {
    Ok(tx
        .prepare(sql)?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// Adds a run of `level` with `records` entries and creates its table; returns its id.
/// The instance's watermark: its records up to it are indexed (0: none).
fn watermark(conn: &Connection, instance_id: u32) -> Result<u64, StoreError> {
    Ok(conn
        .query_row(
            "SELECT seq FROM watermarks WHERE instance_id = ?1",
            [instance_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

fn new_run(tx: &Transaction<'_>, level: i64, records: usize) -> Result<i64, StoreError> {
    tx.execute(
        "INSERT INTO runs (level, records) VALUES (?1, ?2)",
        params![level, records as i64],
    )?;
    let id = tx.last_insert_rowid();
    create_run(tx, id)?;
    Ok(id)
}

fn drop_runs(tx: &Transaction<'_>, runs: &[i64]) -> Result<(), StoreError> {
    for id in runs {
        tx.execute_batch(&format!(
            "DROP TABLE run_{id}; DELETE FROM runs WHERE id = {id}; \
             DELETE FROM run_ranges WHERE run = {id};"
        ))?;
    }
    Ok(())
}

/// The thread that keeps the index up with the archive.
pub struct Indexer {
    thread: Background,
    behind: Arc<AtomicU64>,
}

impl Indexer {
    /// Opens (or creates) the index of the archive `database`, empties it if it is not of
    /// this archive, and starts the thread that fills it. The thread runs at a lower
    /// priority than the request path (nice 10): under a load that takes every core it falls
    /// behind, and look-ups read the records it has not reached from the archive directly.
    pub fn start(database: &Path) -> Result<Self, StoreError> {
        let path = path_for(database);
        let archive = connect(database, Access::Read, BUSY)?;
        let mut index = match ImprintIndex::open(&path).and_then(|mut ix| {
            if ix.check(&archive)? {
                tracing::warn!(
                    event = "imprint_index_rebuilt",
                    index = %path.display(),
                    "the imprint index is not of this archive; rebuilding it"
                );
            }
            Ok(ix)
        }) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(
                    event = "imprint_index_rebuilt",
                    index = %path.display(),
                    error = %e,
                    "the imprint index cannot be read; rebuilding it"
                );
                remove_database(&path)?;
                ImprintIndex::open(&path)?
            }
        };
        let behind = Arc::new(AtomicU64::new(0));
        let thread_behind = behind.clone();
        let mut failing = false;
        let thread = Background::spawn("tsa-imprints", NICE, move || {
            step(&mut index, &archive, &path, &thread_behind, &mut failing)
        })?;
        Ok(Self { thread, behind })
    }

    /// Archived records not in the index yet, as of the indexer's last step.
    pub fn behind(&self) -> u64 {
        self.behind.load(Ordering::Relaxed)
    }

    /// Stops the thread (after the step it is in).
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// One step of the indexer: catches up by at most [`STEP`] records; returns the pause before
/// the next step.
fn step(
    index: &mut ImprintIndex,
    archive: &Connection,
    path: &Path,
    behind: &AtomicU64,
    failing: &mut bool,
) -> Option<Duration> {
    match index.catch_up(archive, STEP) {
        Ok(progress) => {
            behind.store(progress.behind, Ordering::Relaxed);
            if std::mem::take(failing) {
                tracing::info!(
                    event = "imprint_index_recovered",
                    "the imprint index is written again"
                );
            }
            (!progress.worked).then_some(IDLE)
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                tracing::warn!(
                    event = "imprint_index_failed",
                    index = %path.display(),
                    error = %e,
                    "cannot update the imprint index (look-ups read the archive directly)"
                );
            }
            Some(RETRY)
        }
    }
}

/// Removes a database and its log and shared-memory files.
pub(super) fn remove_database(path: &Path) -> Result<(), StoreError> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError(format!(
                    "cannot remove {}: {e}",
                    Path::new(&name).display()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::{ClockAtIssue, Hash, StoredRecord, TokenRecord, ZERO_HASH};
    use crate::archive::serial::layout;
    use crate::archive::sqlite::SqliteStore;
    use crate::archive::store::ArchiveStore;

    const INSTANCE: u32 = 3;
    /// The genTime of the records' position 0.
    const GEN_TIME_NS: u64 = 1_800_000_000_000_000_000;

    /// An archive in a temporary directory and the head of its chain.
    struct Archive {
        dir: tempfile::TempDir,
        store: SqliteStore,
        head: (u64, Hash),
    }

    impl Archive {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store =
                SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(5))
                    .unwrap();
            Self {
                dir,
                store,
                head: (0, ZERO_HASH),
            }
        }

        fn database(&self) -> PathBuf {
            self.dir.path().join("archive.sqlite")
        }

        /// Appends records with these imprints; returns their positions.
        fn append(&mut self, imprints: &[[u8; 32]]) -> Vec<u64> {
            self.append_with(imprints, |seq| GEN_TIME_NS + seq)
        }

        /// [`Archive::append`], each record's genTime `gen_time_ns(position)`.
        fn append_with(
            &mut self,
            imprints: &[[u8; 32]],
            gen_time_ns: impl Fn(u64) -> u64,
        ) -> Vec<u64> {
            let records: Vec<StoredRecord> = imprints
                .iter()
                .map(|imprint| {
                    let seq = self.head.0 + 1;
                    let record = TokenRecord {
                        serial: layout::encode(INSTANCE, seq, [1; 7]).to_vec(),
                        gen_time_ns: gen_time_ns(seq),
                        accuracy_ns: 1_000_000,
                        imprint_alg: "2.16.840.1.101.3.4.2.1".into(),
                        imprint: imprint.to_vec(),
                        policy: "1.3.6.1.4.1.32473.1".into(),
                        nonce: None,
                        client: None,
                        clock: ClockAtIssue {
                            source: "test".into(),
                            state: "synchronized".into(),
                            bound_ns: 1,
                            sources: String::new(),
                        },
                        token: vec![0x30, 0x00],
                    };
                    let stored = StoredRecord::chain(INSTANCE, seq, seq, record, self.head.1);
                    self.head = (stored.seq, stored.hash);
                    stored
                })
                .collect();
            self.store.append(INSTANCE, &records, &[]).unwrap();
            records.iter().map(|r| r.seq).collect()
        }

        /// A checkpoint at the head (pruning stops at the last one).
        fn sign_head(&mut self) {
            self.store
                .add_checkpoint(&crate::archive::record::Checkpoint {
                    instance_id: INSTANCE,
                    seq: self.head.0,
                    head_hash: self.head.1,
                    time_ns: 1,
                    algorithm: vec![],
                    signature: vec![1],
                    certificate: vec![],
                    events: None,
                    anchor_seq: 0,
                })
                .unwrap();
        }

        fn index(&self) -> ImprintIndex {
            ImprintIndex::open(&path_for(&self.database())).unwrap()
        }

        /// Positions of the records the store finds by `imprint`.
        fn found(&mut self, imprint: &[u8; 32]) -> Vec<u64> {
            let mut seqs: Vec<u64> = self
                .store
                .records_by_imprint(imprint, usize::MAX)
                .unwrap()
                .records
                .iter()
                .map(|r| r.seq)
                .collect();
            seqs.sort_unstable();
            seqs
        }
    }

    fn imprint(n: u64) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        out
    }

    /// Catches up completely; returns the steps taken.
    fn catch_up(index: &mut ImprintIndex, archive: &Archive, step: usize) -> usize {
        let mut steps = 0;
        while index
            .catch_up(archive.store.connection(), step)
            .unwrap()
            .worked
        {
            steps += 1;
        }
        steps
    }

    #[test]
    fn the_index_sits_beside_the_archive() {
        assert_eq!(
            path_for(Path::new("/var/lib/tsa/archive.sqlite")),
            Path::new("/var/lib/tsa/archive.imprints.sqlite")
        );
        assert_eq!(
            path_for(Path::new("state/archive")),
            Path::new("state/archive.imprints")
        );
    }

    #[test]
    fn look_ups_find_indexed_and_not_yet_indexed_records_alike() {
        let mut a = Archive::new();
        let twice = imprint(7);
        let first = a.append(&[imprint(1), twice, imprint(2)]);
        // No index at all yet: every record is read from the archive.
        assert_eq!(a.found(&twice), vec![first[1]]);

        let mut index = a.index();
        assert_eq!(catch_up(&mut index, &a, 2), 2, "two steps of two records");
        let found = index.lookup(&twice).unwrap();
        assert_eq!(found.positions, vec![(INSTANCE, first[1])]);
        assert_eq!(found.watermarks.get(&INSTANCE), Some(&first[2]));

        // Records after the watermark come from the archive itself, and nothing twice.
        let later = a.append(&[twice, imprint(3)]);
        let p = index.catch_up(a.store.connection(), 1).unwrap();
        assert_eq!(
            p,
            Progress {
                worked: true,
                behind: 1
            }
        );
        assert_eq!(a.found(&twice), vec![first[1], later[0]]);
        assert!(a.found(&imprint(99)).is_empty());
        // Latest genTime first.
        let found = a.store.records_by_imprint(&twice, 10).unwrap();
        assert_eq!(found.total, 2);
        assert_eq!(found.records[0].seq, later[0]);
        catch_up(&mut index, &a, 100);
        assert_eq!(a.found(&twice), vec![first[1], later[0]]);
        assert_eq!(a.found(&imprint(3)), vec![later[1]]);
        assert_eq!(
            index.catch_up(a.store.connection(), 100).unwrap(),
            Progress {
                worked: false,
                behind: 0
            }
        );
    }

    #[test]
    fn an_index_of_another_archive_is_emptied_and_rebuilt() {
        let mut a = Archive::new();
        a.append(&[imprint(1), imprint(2), imprint(3)]);
        let mut index = a.index();
        catch_up(&mut index, &a, 100);
        assert!(
            !index.check(a.store.connection()).unwrap(),
            "its own archive"
        );

        // The archive restored from an older copy: it ends before the watermark.
        let mut older = Archive::new();
        older.append(&[imprint(1)]);
        drop(index); // its last connection closed: everything in the file itself
        std::fs::copy(path_for(&a.database()), path_for(&older.database())).unwrap();
        let mut index = older.index();
        assert!(index.check(older.store.connection()).unwrap());
        assert!(index.lookup(&imprint(1)).unwrap().positions.is_empty());
        catch_up(&mut index, &older, 100);
        assert_eq!(
            index.lookup(&imprint(1)).unwrap().positions,
            vec![(INSTANCE, 1)]
        );
        assert!(index.lookup(&imprint(3)).unwrap().positions.is_empty());

        // Another archive as long, with other records at the watermark.
        let mut other = Archive::new();
        other.append(&[imprint(4), imprint(5), imprint(6)]);
        let mut index = a.index();
        assert!(index.check(other.store.connection()).unwrap());
        assert!(!index.check(other.store.connection()).unwrap(), "now empty");
    }

    /// The index holds each record (`imprint(k)` at `seqs[k]`) once, and nothing else by its
    /// key.
    fn each_found_once(index: &mut ImprintIndex, seqs: &[u64]) {
        for (k, seq) in seqs.iter().enumerate() {
            let found = index.lookup(&imprint(k as u64)).unwrap();
            assert_eq!(found.positions, vec![(INSTANCE, *seq)], "record {seq}");
        }
    }

    /// (level, records) of every run.
    fn runs(index: &ImprintIndex) -> Vec<(i64, i64)> {
        index
            .conn
            .prepare("SELECT level, records FROM runs ORDER BY level, id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn runs_merge_level_by_level_and_keep_every_entry() {
        let mut a = Archive::new();
        let n = (FANOUT * FANOUT + 3) as u64;
        let seqs = a.append(&(0..n).map(imprint).collect::<Vec<_>>());
        let mut index = a.index();
        // One record per run: 67 runs of level 0 become one run of level 2, none of level 1,
        // and 3 of level 0.
        let steps = catch_up(&mut index, &a, 1);
        assert_eq!(
            steps,
            n as usize + FANOUT + 1,
            "one step per run and per merge"
        );
        assert_eq!(runs(&index), vec![(0, 1), (0, 1), (0, 1), (2, 64)]);
        each_found_once(&mut index, &seqs);
        // No table of a merged run is left behind.
        let total: i64 = index
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name GLOB 'run_[0-9]*'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(total, 4);
    }

    /// Two indexers on one archive (two servers of instances sharing its database): a run
    /// the second would write over records the first indexed since it read the watermark is
    /// not written, and runs that hold a record twice (written so before) merge into one
    /// that holds it once.
    #[test]
    fn two_indexers_on_one_archive_index_each_record_once() {
        let mut a = Archive::new();
        let seqs = a.append(&(0..3).map(imprint).collect::<Vec<_>>());
        let (mut first, mut second) = (a.index(), a.index());
        let conn = a.store.connection();
        assert_eq!(first.index(conn, INSTANCE, 0, 3).unwrap(), Some(3));
        // The second read the watermark (0) before the first moved it.
        assert_eq!(second.index(conn, INSTANCE, 0, 3).unwrap(), Some(3));
        assert_eq!(runs(&first), vec![(0, 3)], "one run");
        each_found_once(&mut first, &seqs);

        // A record in two runs (as an index written before could hold it) merges once.
        let mut b = Archive::new();
        let n = FANOUT as u64 - 1;
        let seqs = b.append(&(0..n).map(imprint).collect::<Vec<_>>());
        let mut index = b.index();
        let conn = b.store.connection();
        for mark in 0..n {
            index.index(conn, INSTANCE, mark, 1).unwrap();
        }
        index
            .conn
            .execute("UPDATE watermarks SET seq = 0", [])
            .unwrap();
        index.index(conn, INSTANCE, 0, 1).unwrap();
        assert_eq!(runs(&index).len(), FANOUT, "the first record twice");
        assert!(index.merge().unwrap());
        assert_eq!(runs(&index), vec![(1, FANOUT as i64)]);
        each_found_once(&mut index, &seqs);
    }

    #[test]
    fn runs_of_the_top_level_stay_as_they_are() {
        let mut a = Archive::new();
        let n = (FANOUT * FANOUT + 1) as u64;
        let seqs = a.append(&(0..n).map(imprint).collect::<Vec<_>>());
        let mut index = a.index();
        index.top_level = 1;
        catch_up(&mut index, &a, 1);
        // 65 runs of one record: 8 of level 1, not merged into one of level 2.
        let mut expected = vec![(0, 1)];
        expected.extend([(1, FANOUT as i64); FANOUT]);
        assert_eq!(runs(&index), expected);
        each_found_once(&mut index, &seqs);
    }

    #[test]
    fn imprints_that_share_their_first_octets_are_told_apart_in_the_archive() {
        let mut a = Archive::new();
        let mut one = [7u8; 32];
        let mut other = [7u8; 32];
        one[31] = 1;
        other[31] = 2;
        let seqs = a.append(&[one, other]);
        let mut index = a.index();
        catch_up(&mut index, &a, 100);
        let mut found = index.lookup(&one).unwrap().positions;
        found.sort_unstable();
        assert_eq!(found, vec![(INSTANCE, seqs[0]), (INSTANCE, seqs[1])]);
        assert_eq!(a.found(&one), vec![seqs[0]]);
        assert_eq!(a.found(&other), vec![seqs[1]]);
    }

    /// One imprint stamped 50 times among imprints that share its first 8 octets, its
    /// records partly indexed and partly above the watermark, genTimes out of position order
    /// in places: a look-up answers the newest `limit` in order and counts every match, the
    /// pruned ones and the look-alikes not.
    #[test]
    fn a_frequent_imprint_gives_its_newest_records_and_counts_them_all() {
        let mut a = Archive::new();
        let frequent = [0x42; 32];
        let mut twin = frequent;
        twin[31] = 0;
        // Every third record the look-alike; every tenth from the second on has the genTime
        // of 13 positions further on (74 for 61: a tie with 74, the later position first).
        let imprints: Vec<[u8; 32]> = (1..=75u64)
            .map(|seq| if seq % 3 == 0 { twin } else { frequent })
            .collect();
        let gen_time_ns = |seq: u64| match seq % 10 {
            1 => GEN_TIME_NS + 1_000 * (seq + 13),
            _ => GEN_TIME_NS + 1_000 * seq,
        };
        a.append_with(&imprints, gen_time_ns);
        let mut index = a.index();
        index.catch_up(a.store.connection(), 40).unwrap();
        assert_eq!(
            index.lookup(&frequent).unwrap().watermarks.get(&INSTANCE),
            Some(&40)
        );
        // The records with the frequent imprint as the look-up orders them.
        let expected = |above: u64| -> Vec<u64> {
            let mut seqs: Vec<u64> = (above + 1..=75).filter(|seq| seq % 3 != 0).collect();
            seqs.sort_by_key(|&seq| std::cmp::Reverse((gen_time_ns(seq), seq)));
            seqs
        };
        assert_eq!(expected(0)[..3], [71, 74, 61]);
        let look_up = |a: &mut Archive, limit: usize| {
            let found = a.store.records_by_imprint(&frequent, limit).unwrap();
            let seqs: Vec<u64> = found.records.iter().map(|r| r.seq).collect();
            assert!(found.records.iter().all(|r| r.record.imprint == frequent));
            (seqs, found.total)
        };
        assert_eq!(look_up(&mut a, 3), (expected(0)[..3].to_vec(), 50));
        assert_eq!(look_up(&mut a, 1), (vec![71], 50));
        assert_eq!(look_up(&mut a, 0), (vec![], 50), "counted, none read");
        assert_eq!(look_up(&mut a, 100), (expected(0), 50));
        assert_eq!(
            a.store.records_by_imprint(&twin, 3).unwrap().total,
            25,
            "the look-alike is told apart"
        );

        // Pruned up to position 10 (the first genTime at or after the cut is position 11's);
        // the run of the index still lists the pruned positions, which no longer count.
        a.sign_head();
        // In bounded steps, until nothing is left to remove.
        let mut anchor = None;
        while let Some(step) = a.store.prune(INSTANCE, gen_time_ns(11)).unwrap() {
            anchor = Some(step);
        }
        assert_eq!(anchor.expect("records pruned").seq, 10);
        assert!(index
            .lookup(&frequent)
            .unwrap()
            .positions
            .contains(&(INSTANCE, 1)));
        let left = expected(10);
        assert_eq!(left.len(), 43);
        assert_eq!(look_up(&mut a, 3), (left[..3].to_vec(), 43));
        assert_eq!(look_up(&mut a, 100), (left, 43));
    }

    #[test]
    fn pruned_records_leave_the_index() {
        let mut a = Archive::new();
        let seqs = a.append(&[imprint(1), imprint(2), imprint(3), imprint(4)]);
        let mut index = a.index();
        // Two runs: records 1 and 2, records 3 and 4.
        catch_up(&mut index, &a, 2);
        assert_eq!(runs(&index), vec![(0, 2), (0, 2)]);
        // Prune the first three (genTimes are 1_800…_000 + seq).
        a.sign_head();
        let anchor = a
            .store
            .prune(INSTANCE, GEN_TIME_NS + seqs[3])
            .unwrap()
            .unwrap();
        assert_eq!(anchor.seq, seqs[2]);
        catch_up(&mut index, &a, 2);
        // The first run went; the second keeps its entry of record 3, which finds nothing.
        assert_eq!(runs(&index), vec![(0, 2)]);
        assert!(index.lookup(&imprint(1)).unwrap().positions.is_empty());
        assert_eq!(
            index.lookup(&imprint(3)).unwrap().positions,
            vec![(INSTANCE, seqs[2])]
        );
        assert!(a.found(&imprint(3)).is_empty());
        assert_eq!(a.found(&imprint(4)), vec![seqs[3]]);
        assert!(!index.check(a.store.connection()).unwrap());

        // Pruned before anything was indexed: the index starts after the anchor.
        let mut b = Archive::new();
        let seqs = b.append(&[imprint(1), imprint(2), imprint(3)]);
        b.sign_head();
        b.store.prune(INSTANCE, GEN_TIME_NS + seqs[2]).unwrap();
        let mut index = b.index();
        catch_up(&mut index, &b, 100);
        assert!(!index.check(b.store.connection()).unwrap());
        assert_eq!(runs(&index), vec![(0, 1)]);
        assert_eq!(
            index.lookup(&imprint(3)).unwrap().positions,
            vec![(INSTANCE, seqs[2])]
        );
        assert!(b.found(&imprint(1)).is_empty());
        assert_eq!(index.catch_up(b.store.connection(), 100).unwrap().behind, 0);
    }

    #[test]
    fn an_archive_with_the_index_on_tokens_loses_it_when_opened_for_writing() {
        let mut a = Archive::new();
        let seqs = a.append(&[imprint(1), imprint(2)]);
        let has_index = |store: &SqliteStore| -> bool {
            store
                .connection()
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'tokens_imprint')",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert!(!has_index(&a.store));
        // As an archive of the earlier layout has it.
        a.store
            .connection()
            .execute_batch("CREATE INDEX tokens_imprint ON tokens (imprint)")
            .unwrap();
        let reader = SqliteStore::open_read_only(&a.database()).unwrap();
        assert!(has_index(&reader), "reading leaves it");
        drop(reader);
        a.store = SqliteStore::open(&a.database(), Duration::from_secs(5)).unwrap();
        assert!(!has_index(&a.store));
        assert_eq!(a.found(&imprint(2)), vec![seqs[1]]);
    }

    #[test]
    fn an_index_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.imprints.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE imprints (imprint BLOB); PRAGMA user_version = 1;")
            .unwrap();
        drop(conn);
        assert!(ImprintIndex::open(&path).is_err());
        assert!(ImprintIndex::open_read_only(&path).is_err());
        // A new, empty file is no index yet.
        let empty = dir.path().join("empty.sqlite");
        Connection::open(&empty).unwrap();
        assert!(ImprintIndex::open_read_only(&empty).unwrap().is_none());
    }

    #[test]
    fn the_indexer_catches_up_and_an_unreadable_index_is_rebuilt() {
        let mut a = Archive::new();
        let imprints: Vec<[u8; 32]> = (0..(STEP as u64 + 10)).map(imprint).collect();
        a.append(&imprints);
        let indexer = Indexer::start(&a.database()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let indexed = || {
            ImprintIndex::open_read_only(&path_for(&a.database()))
                .unwrap()
                .unwrap()
                .lookup(&imprint(STEP as u64 + 9))
                .unwrap()
        };
        while indexed().positions.is_empty() {
            assert!(std::time::Instant::now() < deadline, "not indexed in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(indexer.behind(), 0);
        indexer.stop();

        // Garbage where the index was: the indexer starts over.
        let path = path_for(&a.database());
        remove_database(&path).unwrap();
        std::fs::write(&path, b"not a database, not at all, not even close to one").unwrap();
        let indexer = Indexer::start(&a.database()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while indexed().positions.is_empty() {
            assert!(std::time::Instant::now() < deadline, "not rebuilt in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(indexer);
        assert_eq!(a.found(&imprint(5)), vec![6]);
    }
}
