//! Checkpoints of the SQLite archive's write-ahead log, on a thread of their own so that no
//! commit waits for one.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that
//! commit copies the whole log into the database and fsyncs the database before it returns,
//! and every token waiting for the next commit waits as well. On a slow disk that was the
//! latency tail under load (tens of milliseconds, once every thousand pages of log).
//!
//! Here a connection of its own runs passive checkpoints every [`INTERVAL`]: they copy what
//! the log holds into the database without taking the writer's lock, so commits go on
//! meanwhile. A passive checkpoint alone never lets the log start over while tokens keep
//! coming (a commit always lands during it), so the writer keeps its automatic checkpoint, at
//! [`WRITER_PAGES`]: by the time the log is that long nearly all of it is copied, that
//! checkpoint has little left to do, and the log starts over at the next commit.

use std::path::Path;
use std::time::Duration;

use super::background::Background;
use super::sqlite::{connect, Access};
use super::store::StoreError;

/// How often the checkpointer copies the log into the database.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The writer's own automatic checkpoint, in pages of log (64 MiB at 4 KiB pages) instead of
/// SQLite's 1,000, while the checkpointer runs.
pub const WRITER_PAGES: u32 = 16_384;

/// The thread that checkpoints the archive's log.
pub struct Checkpointer {
    thread: Background,
}

impl Checkpointer {
    /// Starts checkpointing the archive `database` (in WAL mode, opened by its writer).
    pub fn start(database: &Path) -> Result<Self, StoreError> {
        let conn = connect(database, Access::Write, Duration::from_secs(5))?;
        // The database is synced after each checkpoint, before the log may start over.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut failing = false;
        let thread = Background::spawn("tsa-checkpoint", 0, move || {
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("archive checkpoints work again");
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            error = %e,
                            "cannot checkpoint the archive's log (the writer does it meanwhile)"
                        );
                    }
                }
            }
            Some(INTERVAL)
        })?;
        Ok(Self { thread })
    }

    /// Stops the thread (after the checkpoint it is in).
    pub fn stop(&self) {
        self.thread.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::{tests_support::sample, StoredRecord, ZERO_HASH};
    use crate::archive::serial::layout;
    use crate::archive::sqlite::SqliteStore;
    use crate::archive::store::ArchiveStore;

    const INSTANCE: u32 = 1;

    /// With the writer's threshold raised, commits leave the log alone, and the
    /// checkpointer, not a commit, copies it into the database.
    #[test]
    fn the_checkpointer_copies_the_log_that_commits_leave_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.sqlite");
        let mut store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        store.set_autocheckpoint(WRITER_PAGES).unwrap();
        let database_size = || std::fs::metadata(&path).unwrap().len();
        let before = database_size();
        // 4,000 records of over 1 KB: well past SQLite's default threshold (1,000 pages),
        // well below the writer's.
        let mut head = (0, ZERO_HASH);
        for _ in 0..40 {
            let records: Vec<StoredRecord> = (0..100)
                .map(|_| {
                    let seq = head.0 + 1;
                    let mut record = sample(1_100);
                    record.serial = layout::encode(INSTANCE, seq, [1; 7]).to_vec();
                    let stored = StoredRecord::chain(INSTANCE, seq, seq, record, head.1);
                    head = (stored.seq, stored.hash);
                    stored
                })
                .collect();
            store.append(INSTANCE, &records, &[]).unwrap();
        }
        assert_eq!(database_size(), before, "a commit checkpointed the log");

        let checkpointer = Checkpointer::start(&path).unwrap();
        let start = std::time::Instant::now();
        while database_size() < before + 4_000 * 1_100 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the log did not reach the database: {} octets",
                database_size()
            );
            std::thread::sleep(INTERVAL);
        }
        checkpointer.stop();
        let count: u64 = store
            .connection()
            .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 4_000);
    }
}
