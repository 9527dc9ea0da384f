//! Moving a rows archive into the token log (`tsa archive migrate`), with the server stopped.
//!
//! Every instance's records are copied, in chain order and as stored (positions, hashes and
//! all), into segments beside the database; the copy is read back and compared with the rows;
//! then one transaction names the layout `log` and deletes the rows. A migration that stops
//! half way leaves the layout `rows`, which the server keeps using; the next migration
//! moves the partial log aside (a copy of the rows' records, kept for a look) and starts
//! over. A log that holds records the rows do not (a database restored from a backup taken
//! before an earlier migration says `rows` too, beside a log that holds every token since)
//! stops the migration.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::appender::Appender;
use super::segments::{dir_for, instance_dir};
use super::LogReader;
use crate::archive::imprints;
use crate::archive::record::{sha256, ChainHead, StoredRecord, ZERO_HASH};
use crate::archive::sqlite::{layout_of, Layout, SqliteStore};
use crate::archive::store::{ArchiveStore, StoreError};

/// Records per commit of the copy (each commit one `fdatasync`).
const BATCH: usize = 4_096;

/// What a migration copied: each instance and its records.
pub type Migrated = Vec<(u32, u64)>;

/// Migrates the rows archive at `database` into a token log beside it, in segments of
/// `segment_limit` octets. The caller keeps every server off the archive (the state
/// directory's lock).
pub fn migrate(
    database: &Path,
    busy_timeout: Duration,
    segment_limit: u64,
) -> Result<Migrated, StoreError> {
    let mut db = SqliteStore::open(database, busy_timeout)?;
    if layout_of(db.connection())? == Layout::Log {
        return Err(StoreError(format!(
            "{} keeps its tokens in a token log already",
            database.display()
        )));
    }
    let root = dir_for(database);
    if root.exists() {
        // Left by a migration that stopped before the switch, its records a copy of the
        // rows': moved aside (kept for a look). Anything else, such as the log of a migration
        // that did switch beside a database restored from an older backup, holding every
        // token issued since, stops the migration.
        let reader = LogReader::new(database);
        for instance_id in super::segments::instances(&root)? {
            let Some(head) = reader.head(instance_id)? else {
                continue;
            };
            let mut in_rows = None;
            db.for_each_record(instance_id, head.seq, &mut |r| {
                in_rows = Some(r);
                Ok(false)
            })?;
            if in_rows.is_none_or(|r| r.seq != head.seq || r.hash != head.hash) {
                return Err(StoreError(format!(
                    "{} holds records of instance {instance_id} up to {} that the rows do not \
                     (a database restored from a backup older than an earlier migration?): \
                     nothing was changed; look at it, and move it away yourself if the rows \
                     are to replace it",
                    root.display(),
                    head.seq
                )));
            }
        }
        let mut aside = root.as_os_str().to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        aside.push(format!(".before-migration-{now}"));
        fs::rename(&root, &aside)?;
        crate::files::sync_directory(crate::files::directory_of(&root))?;
        tracing::warn!(
            log = %root.display(),
            kept = %Path::new(&aside).display(),
            "a token log was there already (a migration that stopped, or a database restored \
             from a backup older than a migration): moved aside, not deleted; look at it before \
             removing it"
        );
    }
    let mut migrated = Vec::new();
    for instance_id in db.instances()? {
        let anchored = db.instance(instance_id)?.anchor;
        let anchor = anchored.as_ref().map_or(0, |a| a.seq);
        let (mut appender, _) = Appender::open(&instance_dir(&root, instance_id), segment_limit)?;
        let (mut batch, mut rows) = (Vec::with_capacity(BATCH), Digest::default());
        // The chain from the anchor on, each record after the one before: a missing position
        // or a broken link is left in the rows, for `tsa archive verify` to say where.
        let mut head = ChainHead {
            seq: anchor,
            hash: anchored.map_or(ZERO_HASH, |a| a.hash),
        };
        db.for_each_record(instance_id, anchor + 1, &mut |r| {
            if r.seq != head.seq + 1 || r.prev_hash != head.hash {
                return Err(StoreError(format!(
                    "instance {instance_id}: record {} does not follow {} (a missing position \
                     or a broken chain): nothing was changed; `tsa archive verify` says where",
                    r.seq, head.seq
                )));
            }
            head = ChainHead {
                seq: r.seq,
                hash: r.hash,
            };
            rows.add(&r);
            batch.push(r);
            if batch.len() == BATCH {
                appender.append(&batch)?;
                batch.clear();
            }
            Ok(true)
        })?;
        appender.append(&batch)?;
        // The copy, read back, against the rows.
        let mut copy = Digest::default();
        LogReader::new(database).for_each_from(instance_id, anchor + 1, &mut |r| {
            copy.add(&r);
            Ok(true)
        })?;
        if copy != rows {
            return Err(StoreError(format!(
                "instance {instance_id}: the token log read back holds {} records, the \
                 archive {}, or they differ; the archive is unchanged",
                copy.records, rows.records
            )));
        }
        migrated.push((instance_id, rows.records));
    }
    db.switch_to_log()?;
    // The imprint database indexed the rows; the log keeps imprint files of its own.
    imprints::remove_database(&imprints::path_for(database))?;
    Ok(migrated)
}

/// A running digest of records: their count and a hash over each one's position, stored hash
/// and the hash its fields give (so a copy that changed a field differs).
#[derive(Default, PartialEq, Eq)]
struct Digest {
    records: u64,
    hash: [u8; 32],
}

impl Digest {
    fn add(&mut self, r: &StoredRecord) {
        let mut octets = Vec::with_capacity(104);
        octets.extend_from_slice(&self.hash);
        octets.extend_from_slice(&r.seq.to_be_bytes());
        octets.extend_from_slice(&r.hash);
        octets.extend_from_slice(&r.computed_hash());
        self.hash = sha256(&octets);
        self.records += 1;
    }
}
