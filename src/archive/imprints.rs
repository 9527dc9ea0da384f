//! The SQLite archive's index of records by imprint, kept out of the commit path.
//!
//! Each token's imprint is random, so an index on `tokens.imprint` inside the archive makes
//! every record dirty a B-tree page of its own, which the commit writes to the log and the
//! checkpoint writes again: the writer's cost per record was 4.3 × what it is without that
//! index (`benches/archive.rs`). So the index is a database of its own beside the archive
//! (`archive.imprints.sqlite` for `archive.sqlite`), filled by a thread of its own
//! ([`Indexer`]) from what the archive has committed:
//!
//! - it is derived data, made from `tokens` alone: rebuilt when it is missing, unreadable, or
//!   not of this archive (the record at its watermark has another hash, or the archive ends
//!   before it, as after a restore from an older backup);
//! - its commits are not synced (`synchronous=NORMAL` in WAL mode: a crash may lose its last
//!   transactions, never its consistency), and each instance's watermark is written in the
//!   transaction of the entries it covers, so after a crash it goes on from what survived;
//! - a look-up ([`ImprintIndex::lookup`]) reads the entries and the watermarks in one read
//!   transaction; the store then reads the records above the watermarks from `tokens` itself
//!   (a range of its primary key), so a look-up finds every committed record however far the
//!   index is behind;
//! - records pruned from the archive (everything up to an instance's chain anchor) are
//!   dropped from the index too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::store::StoreError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS imprints (
    imprint BLOB NOT NULL,
    instance_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (imprint, instance_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS imprints_position ON imprints (instance_id, seq);
CREATE TABLE IF NOT EXISTS watermarks (
    instance_id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    pruned_seq INTEGER NOT NULL
);
";

/// Records indexed per transaction.
const STEP: usize = 8_192;
/// Entries of pruned records dropped per transaction.
const PRUNE_STEP: u64 = 100_000;
/// How long the indexer waits when it has caught up.
const IDLE: Duration = Duration::from_millis(250);
/// How long it waits after a failure before it tries again.
const RETRY: Duration = Duration::from_secs(1);

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

/// What the index knows of one imprint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The indexed records with the imprint, as (instance, position).
    pub positions: Vec<(u32, u64)>,
    /// Per instance, the last position indexed: records above it are not in the index yet
    /// (an instance missing here has none indexed).
    pub watermarks: HashMap<u32, u64>,
}

pub struct ImprintIndex {
    conn: Connection,
}

impl ImprintIndex {
    /// Opens the index for writing, creating it when missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "cache_size", -32_768)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// Opens the index for look-ups; `None` when there is none (yet).
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Some(Self { conn }))
    }

    /// The indexed records with `imprint` and the watermarks, from one read transaction.
    pub fn lookup(&mut self, imprint: &[u8]) -> Result<Found, StoreError> {
        let tx = self.conn.transaction()?;
        let positions = tx
            .prepare_cached("SELECT instance_id, seq FROM imprints WHERE imprint = ?1")?
            .query_map([imprint], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let watermarks = tx
            .prepare_cached("SELECT instance_id, seq FROM watermarks")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<HashMap<_, _>, _>>()?;
        drop(tx);
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
        for (instance_id, seq, hash) in marks {
            let stored: Option<Vec<u8>> = archive
                .query_row(
                    "SELECT hash FROM tokens WHERE instance_id = ?1 AND seq = ?2",
                    params![instance_id, seq],
                    |r| r.get(0),
                )
                .optional()?;
            let pruned = || -> Result<bool, StoreError> {
                let anchor: Option<u64> = archive
                    .query_row(
                        "SELECT seq FROM chain_anchors WHERE instance_id = ?1",
                        [instance_id],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(anchor.is_some_and(|a| a >= seq))
            };
            let belongs = match stored {
                Some(stored) => stored == hash,
                None => pruned()?,
            };
            if !belongs {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute_batch("DELETE FROM imprints; DELETE FROM watermarks;")?;
                tx.commit()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One step of catching up with `archive`, in one transaction: drops up to
    /// [`PRUNE_STEP`] entries of records pruned from it, or else indexes at most `limit` of
    /// an instance's records above its watermark.
    pub fn catch_up(&mut self, archive: &Connection, limit: usize) -> Result<Progress, StoreError> {
        // Each instance's chain anchor (everything up to it was pruned) and last position.
        let instances: Vec<(u32, Option<u64>, Option<u64>)> = archive
            .prepare_cached(
                "SELECT i.instance_id, a.seq, \
                 (SELECT MAX(seq) FROM tokens t WHERE t.instance_id = i.instance_id) \
                 FROM instances i LEFT JOIN chain_anchors a ON a.instance_id = i.instance_id \
                 ORDER BY i.instance_id",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut progress = Progress::default();
        for (instance_id, anchor, head) in instances {
            let (mut mark, pruned_seq) = self
                .conn
                .query_row(
                    "SELECT seq, pruned_seq FROM watermarks WHERE instance_id = ?1",
                    [instance_id],
                    |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)),
                )
                .optional()?
                .unwrap_or((0, 0));
            if !progress.worked {
                if let Some(anchor) = anchor.filter(|a| *a > pruned_seq) {
                    self.drop_pruned(
                        instance_id,
                        anchor.min(pruned_seq.saturating_add(PRUNE_STEP)),
                    )?;
                    progress.worked = true;
                } else if head.is_some_and(|h| h > mark) {
                    mark = self
                        .index(archive, instance_id, mark, limit)?
                        .unwrap_or(mark);
                    progress.worked = true;
                }
            }
            // Records up to the anchor are gone, indexed or not.
            let done = mark.max(anchor.unwrap_or(0));
            progress.behind += head.unwrap_or(0).saturating_sub(done);
        }
        Ok(progress)
    }

    /// Indexes the instance's records above `mark`, at most `limit`; returns the new
    /// watermark.
    fn index(
        &mut self,
        archive: &Connection,
        instance_id: u32,
        mark: u64,
        limit: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut rows: Vec<(u64, Vec<u8>, Vec<u8>)> = archive
            .prepare_cached(
                "SELECT seq, imprint, hash FROM tokens WHERE instance_id = ?1 AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?
            .query_map(params![instance_id, mark, limit as u64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let Some((last_seq, _, last_hash)) = rows.last().cloned() else {
            return Ok(None);
        };
        // In imprint order, the inserts walk the B-tree once from left to right.
        rows.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO imprints (imprint, instance_id, seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )?;
            for (seq, imprint, _) in &rows {
                insert.execute(params![imprint, instance_id, seq])?;
            }
            tx.execute(
                "INSERT INTO watermarks (instance_id, seq, hash, pruned_seq) \
                 VALUES (?1, ?2, ?3, 0) ON CONFLICT (instance_id) DO UPDATE SET \
                 seq = excluded.seq, hash = excluded.hash",
                params![instance_id, last_seq, last_hash],
            )?;
        }
        tx.commit()?;
        Ok(Some(last_seq))
    }

    /// Drops the entries of the instance's records up to `up_to` (pruned from the archive).
    fn drop_pruned(&mut self, instance_id: u32, up_to: u64) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM imprints WHERE instance_id = ?1 AND seq <= ?2",
            params![instance_id, up_to],
        )?;
        // An instance pruned before anything of it was indexed gets a watermark at 0 (whose
        // record [`ImprintIndex::check`] does not look for: it was pruned).
        tx.execute(
            "INSERT INTO watermarks (instance_id, seq, hash, pruned_seq) \
             VALUES (?1, 0, x'', ?2) ON CONFLICT (instance_id) DO UPDATE SET \
             pruned_seq = excluded.pruned_seq",
            params![instance_id, up_to],
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// What one step of [`ImprintIndex::catch_up`] left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Whether it did anything (so there may be more to do).
    pub worked: bool,
    /// Archived records not in the index after it.
    pub behind: u64,
}

/// The thread that keeps the index up with the archive.
pub struct Indexer {
    stop: Arc<Stop>,
    behind: Arc<AtomicU64>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cond: Condvar,
}

impl Indexer {
    /// Opens (or creates) the index of the archive `database`, empties it if it is not of
    /// this archive, and starts the thread that fills it. The thread runs at a lower
    /// priority than the request path (nice 10): under a load that takes every core it falls
    /// behind, and look-ups read the records it has not reached from the archive directly.
    pub fn start(database: &Path) -> Result<Self, StoreError> {
        let path = path_for(database);
        let archive = Connection::open_with_flags(
            database,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError(format!("cannot open {}: {e}", database.display())))?;
        archive.busy_timeout(Duration::from_secs(5))?;
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
        let stop = Arc::new(Stop::default());
        let behind = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_behind) = (stop.clone(), behind.clone());
        let handle = std::thread::Builder::new()
            .name("tsa-imprints".into())
            .spawn(move || {
                lower_priority();
                run(&mut index, &archive, &path, &thread_stop, &thread_behind)
            })
            .map_err(|e| StoreError(format!("cannot start the imprint indexer: {e}")))?;
        Ok(Self {
            stop,
            behind,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Archived records not in the index yet, as of the indexer's last step.
    pub fn behind(&self) -> u64 {
        self.behind.load(Ordering::Relaxed)
    }

    /// Stops the thread (after the step it is in).
    pub fn stop(&self) {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            *self.stop.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.stop.cond.notify_one();
            let _ = handle.join();
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    index: &mut ImprintIndex,
    archive: &Connection,
    path: &Path,
    stop: &Stop,
    behind: &AtomicU64,
) {
    let mut failing = false;
    loop {
        let pause = match index.catch_up(archive, STEP) {
            Ok(progress) => {
                behind.store(progress.behind, Ordering::Relaxed);
                if failing {
                    failing = false;
                    tracing::info!(
                        event = "imprint_index_recovered",
                        "the imprint index is written again"
                    );
                }
                (!progress.worked).then_some(IDLE)
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(
                        event = "imprint_index_failed",
                        index = %path.display(),
                        error = %e,
                        "cannot update the imprint index (look-ups read the archive directly)"
                    );
                }
                Some(RETRY)
            }
        };
        let mut stopped = stop.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pause) = pause.filter(|_| !*stopped) {
            stopped = stop
                .cond
                .wait_timeout(stopped, pause)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if *stopped {
            return;
        }
    }
}

/// Removes a database and its log and shared-memory files.
fn remove_database(path: &Path) -> Result<(), StoreError> {
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

/// Lowers the calling thread's scheduling priority (nice 10) below the request path's.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
        if rc != 0 {
            tracing::debug!("cannot lower the imprint indexer's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::{ClockAtIssue, Hash, StoredRecord, TokenRecord, ZERO_HASH};
    use crate::archive::serial::layout;
    use crate::archive::sqlite::SqliteStore;
    use crate::archive::store::ArchiveStore;

    const INSTANCE: u32 = 3;

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
            let records: Vec<StoredRecord> = imprints
                .iter()
                .map(|imprint| {
                    let seq = self.head.0 + 1;
                    let record = TokenRecord {
                        serial: layout::encode(INSTANCE, seq, [1; 7]).to_vec(),
                        gen_time_ns: 1_800_000_000_000_000_000 + seq,
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

        fn index(&self) -> ImprintIndex {
            ImprintIndex::open(&path_for(&self.database())).unwrap()
        }

        /// Positions of the records the store finds by `imprint`.
        fn found(&mut self, imprint: &[u8; 32]) -> Vec<u64> {
            let mut seqs: Vec<u64> = self
                .store
                .records_by_imprint(imprint)
                .unwrap()
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
        let records = a.store.records_by_imprint(&twice).unwrap();
        assert_eq!(records[0].seq, later[0]);
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

    #[test]
    fn pruned_records_leave_the_index() {
        let mut a = Archive::new();
        let seqs = a.append(&[imprint(1), imprint(2), imprint(3), imprint(4)]);
        let mut index = a.index();
        catch_up(&mut index, &a, 100);
        // Prune the first two (genTimes are 1_800…_000 + seq).
        let anchor = a
            .store
            .prune(INSTANCE, 1_800_000_000_000_000_000 + seqs[2])
            .unwrap()
            .unwrap();
        assert_eq!(anchor.seq, seqs[1]);
        catch_up(&mut index, &a, 100);
        assert!(index.lookup(&imprint(1)).unwrap().positions.is_empty());
        assert!(index.lookup(&imprint(2)).unwrap().positions.is_empty());
        assert_eq!(
            index.lookup(&imprint(3)).unwrap().positions,
            vec![(INSTANCE, seqs[2])]
        );
        assert!(!index.check(a.store.connection()).unwrap());

        // Pruned before anything was indexed: the index starts after the anchor.
        let mut b = Archive::new();
        let seqs = b.append(&[imprint(1), imprint(2), imprint(3)]);
        b.store
            .prune(INSTANCE, 1_800_000_000_000_000_000 + seqs[2])
            .unwrap();
        let mut index = b.index();
        catch_up(&mut index, &b, 100);
        assert!(!index.check(b.store.connection()).unwrap());
        assert_eq!(
            index.lookup(&imprint(3)).unwrap().positions,
            vec![(INSTANCE, seqs[2])]
        );
        assert_eq!(b.found(&imprint(1)), Vec::<u64>::new());
        assert_eq!(index.catch_up(b.store.connection(), 100).unwrap().behind, 0);
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
