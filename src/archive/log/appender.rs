//! Appending to one instance's token log: one `write` of a commit's frames and one
//! `fdatasync` of the segment, then the index entries (not synced). The `fdatasync` and what
//! follows it run on a thread of their own while the writer prepares the next commit
//! (`syncer.rs`); the next commit is written only once this one is durable.
//!
//! The open segment keeps some room past its frames: zeros, usually the whole segment's,
//! written ahead by a thread of its own before the segment was opened (`spare.rs`), or
//! else written and synced in `ROOM` steps after a commit ([`Appender::make_room`], once the
//! commit's requests are answered). A commit then overwrites blocks the file already has, so its
//! `fdatasync` writes the data alone: a commit that extends the file also changes its size and
//! its extents, and waits for the filesystem's journal to commit them. Readers stop at the
//! zeros as at the end (a frame of length 0 does not check); a closed segment is cut to its
//! frames.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::segments::{
    encode_frame, imprint_entries, imprint_key, open_index, read_at, scan, segments,
    write_imprints, Entry, Segment, ENTRY_LEN, FRAME_OVERHEAD, MAX_BODY,
};
use super::spare::Spare;
use super::syncer::{Job, Syncer};
use crate::archive::record::{ChainHead, StoredRecord, RECORD_DOMAIN};
use crate::archive::store::{Durable, StoreError, UnreadTail};

/// A torn commit is cut off at start; past this many octets that are not zeros after the last
/// good frame, the damage is no torn commit (a commit of a thousand tokens is some megabytes)
/// and the start stops for the operator instead. A commit larger than this is written in parts
/// of at most this many octets, each synced before the next (`Appender::append_then`).
const MAX_TORN: u64 = 32 << 20;

/// A disk writes a sector whole or not at all; one that did not reach it reads as it was
/// before: zeros, past the last synced frame (the room, or the file's end).
const SECTOR: u64 = 512;

/// Zeros written ahead at a time; more once less than half of it is left.
const ROOM: u64 = 1 << 20;

/// The segment being appended to.
struct Open {
    segment: Segment,
    file: Arc<File>,
    index: Arc<File>,
    /// Where the next frame goes (the end of the good frames).
    len: u64,
    /// The file's length: zeros from `len` to it.
    room: u64,
    /// No zeros are written ahead before the frames reach this length (after a write of
    /// them failed: a full disk, say).
    no_room_before: u64,
    /// Where the next index entry goes; `None` once an index write failed (readers then read
    /// the segment's frames past the index).
    index_len: Option<u64>,
}

pub struct Appender {
    dir: PathBuf,
    open: Option<Open>,
    /// The position the next record must have, once a segment is open.
    next_seq: u64,
    /// The last record's position and hash.
    last: Option<ChainHead>,
    /// A failed commit's frames could not be cut off: cut before the next commit.
    dirty: bool,
    /// Segments close at this length.
    segment_limit: u64,
    frames: Vec<u8>,
    /// Where each of `frames` ends in it.
    frame_ends: Vec<usize>,
    entries: Vec<u8>,
    /// The open segment's imprint entries, written sorted when it closes.
    imprints: Vec<(u64, u64)>,
    /// `ROOM` zeros, allocated on first use.
    zeros: Vec<u8>,
    /// The next segment, written ahead while a segment is open (`None` before the first, and
    /// where its thread could not be started; taken or failed, started again at the next roll).
    spare: Option<Spare>,
    /// Makes commits durable (started with the first).
    syncer: Option<Syncer>,
    /// The commit the syncer has: where the log stood before it, to go back to if it fails.
    in_flight: Option<Before>,
    /// A commit that did not become durable, found while waiting for it on behalf of another
    /// call: the error for the next [`Appender::settle`] or append.
    failed: Option<io::Error>,
    /// The next commit's sync is reported as failed (for tests).
    #[cfg(test)]
    fail_next_sync: bool,
}

/// The log's end before a commit that is not durable yet.
#[derive(Clone, Copy)]
struct Before {
    len: u64,
    next_seq: u64,
    last: Option<ChainHead>,
    imprints: usize,
    index_len: Option<u64>,
}

/// Tells `durable` of `result` and returns it.
fn answer(durable: Durable, result: io::Result<()>) -> io::Result<()> {
    match &result {
        Ok(()) => durable(Ok(())),
        Err(e) => durable(Err(&StoreError::new(e))),
    }
    result
}

impl Appender {
    /// Opens the log in `dir` (an instance's folder) for appending. The newest segment's frames
    /// past its index are read and checked, and synced; a torn commit at its end (frames cut short or not
    /// checking, from a crash or a power cut inside a commit, whose requests were never
    /// answered: see `tail`) is cut off and the cut synced, a copy of it kept beside; its index is completed. A newest
    /// segment left without a good frame is removed. Anything else after the last good frame,
    /// or an index that lists records past it, is damage: an `InvalidData` error naming the
    /// segment and the offset, and nothing is changed. Returns the appender and the chain's
    /// last record.
    pub fn open(dir: &Path, segment_limit: u64) -> io::Result<(Self, Option<StoredRecord>)> {
        Self::open_reaching(dir, segment_limit, None)
    }

    /// [`Appender::open`] for a chain that must reach `signed` (the instance's last signed
    /// checkpoint: its position, and its head hash there). A checkpoint signs only frames
    /// that were synced, so good frames that end below it (or at it with another hash) are
    /// damage even where the tail past them looks like a torn commit (a disk that lost a
    /// sector of acknowledged frames): an `InvalidData` error naming the segment and the
    /// positions, before anything is cut, copied or removed.
    pub fn open_reaching(
        dir: &Path,
        segment_limit: u64,
        signed: Option<ChainHead>,
    ) -> io::Result<(Self, Option<StoredRecord>)> {
        let mut appender = Self {
            dir: dir.to_owned(),
            open: None,
            next_seq: 0,
            last: None,
            dirty: false,
            segment_limit,
            frames: Vec::new(),
            frame_ends: Vec::new(),
            entries: Vec::new(),
            imprints: Vec::new(),
            zeros: Vec::new(),
            spare: None,
            syncer: None,
            in_flight: None,
            failed: None,
            #[cfg(test)]
            fail_next_sync: false,
        };
        let mut all = segments(dir)?;
        while let Some(segment) = all.pop() {
            let scanned = scan(&segment)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&segment.path)?;
            let len = file.metadata()?.len();
            if scanned.entries.len() < scanned.claimed {
                return Err(damaged(
                    &segment,
                    scanned.end,
                    &format!(
                        "its index lists {} records, only {} good frames are there: the \
                         segment was cut short or altered, or its index copied after it",
                        scanned.claimed,
                        scanned.entries.len()
                    ),
                ));
            }
            if let Some(signed) = signed {
                // The good frames end here; without one, the chain ends before this segment.
                let reach = scanned
                    .last
                    .as_ref()
                    .map_or(segment.first_seq.saturating_sub(1), |l| l.seq);
                let other_head = scanned
                    .last
                    .as_ref()
                    .is_some_and(|l| l.seq == signed.seq && l.hash != signed.hash);
                if reach < signed.seq || other_head {
                    return Err(damaged(
                        &segment,
                        scanned.end,
                        &format!(
                            "its good frames end at record {reach}{}, but the last signed \
                             checkpoint covers {} records (head hash {}): records that were \
                             committed and answered are missing or were altered",
                            if other_head { " with another hash" } else { "" },
                            signed.seq,
                            crate::archive::record::hex(&signed.hash)
                        ),
                    ));
                }
            }
            let room = match tail(&file, scanned.end, len)? {
                // The room written ahead, not a torn commit. The frames before it may still
                // be a killed process's commit that was written and not yet synced (its
                // requests unanswered): whole in the page cache, so taken as records, but
                // a power cut before the kernel writes them back would lose them after a
                // checkpoint signed them (or a write-back error would leave a hole that
                // later commits chain across). Synced now, they are records like any other;
                // a write-back that failed stops the start here.
                Tail::Zeros => {
                    file.sync_data()?;
                    len
                }
                Tail::Torn { written } => {
                    let kept = match keep_torn(&file, &segment, scanned.end, written) {
                        Ok(path) => path.display().to_string(),
                        Err(e) => format!("no copy: {e}"),
                    };
                    tracing::warn!(
                        event = "archive_log_torn_tail",
                        segment = %segment.path.display(),
                        offset = scanned.end,
                        octets = written - scanned.end,
                        kept,
                        "cutting off a commit that did not complete (its requests were not \
                         answered); its octets are kept beside the segment where they can be"
                    );
                    cut_back(&file, scanned.end)?;
                    scanned.end
                }
                Tail::Damaged(why) => return Err(damaged(&segment, scanned.end, &why)),
            };
            let Some(last) = scanned.last else {
                drop(file);
                remove_segment(&segment)?;
                crate::files::sync_directory(dir)?;
                continue;
            };
            let index = open_index(&segment)?;
            let mut entries = Vec::new();
            for entry in &scanned.entries[scanned.indexed..] {
                entry.encode(&mut entries);
            }
            let indexed = (scanned.indexed * ENTRY_LEN) as u64;
            // The index and the imprint files are derived data: one that cannot be written (a
            // full disk) leaves readers to read the frames, and stops no start.
            let index_len = match index
                .set_len(indexed)
                .and_then(|()| index.write_all_at(&entries, indexed))
            {
                Ok(()) => Some(indexed + entries.len() as u64),
                Err(e) => {
                    tracing::warn!(
                        index = %segment.index_path().display(),
                        error = %e,
                        "the token log's index cannot be completed; readers read the frames"
                    );
                    None
                }
            };
            // Closed segments whose imprint file is missing (a crash as one closed) get it now.
            for closed in &all {
                if !closed.imprints_path().exists() {
                    let written = write_imprints(closed, imprint_entries(&scan(closed)?.entries));
                    if let Err(e) = written {
                        tracing::warn!(
                            segment = %closed.path.display(),
                            error = %e,
                            "the closed segment's imprint file cannot be written"
                        );
                    }
                }
            }
            // A segment that was closed and is open again (the one after it held no good
            // frame) takes records its imprint file lacks: without the file, look-ups read its
            // index entries, and the file is written again when it closes.
            match std::fs::remove_file(segment.imprints_path()) {
                Ok(()) => crate::files::sync_directory(dir)?,
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            appender.imprints = imprint_entries(&scanned.entries);
            appender.next_seq = last.seq.checked_add(1).ok_or_else(|| {
                damaged(
                    &segment,
                    scanned.end,
                    "its last record is at the last position",
                )
            })?;
            appender.last = Some(ChainHead {
                seq: last.seq,
                hash: last.hash,
            });
            appender.open = Some(Open {
                segment,
                file: Arc::new(file),
                index: Arc::new(index),
                len: scanned.end,
                room,
                no_room_before: 0,
                index_len,
            });
            appender.start_spare();
            return Ok((appender, Some(last)));
        }
        Ok((appender, None))
    }

    /// The last durable record's position and hash (once the commit in flight, if any, is
    /// durable or cut off).
    pub fn head(&mut self) -> Option<ChainHead> {
        self.wait();
        self.last
    }

    /// As after a refused commit whose frames could not be cut off (for tests).
    #[cfg(test)]
    pub fn set_dirty(&mut self) {
        self.dirty = true;
    }

    /// The next commit's sync is reported as failed, after it ran (for tests).
    #[cfg(test)]
    pub fn fail_next_sync(&mut self) {
        self.fail_next_sync = true;
    }

    /// Appends `records` (chained, from the next position on) durably: one write of their
    /// frames and one `fdatasync`. On failure nothing of them stays in the segment. Without
    /// records, a full segment is closed and the next one made (so that the writer's probe,
    /// which appends events alone, fails while the next segment cannot be made).
    pub fn append(&mut self, records: &[StoredRecord]) -> io::Result<()> {
        self.append_then(records, Box::new(|_| {}))?;
        self.settle()
    }

    /// [`Appender::append`], returning once the frames are written: the syncer makes them
    /// durable, writes their index entries and then tells `durable`, while the caller goes
    /// on with the next commit. That one is written only after this one is durable; if this
    /// one fails, it is cut off and the next is refused (it was chained to it). Every error
    /// is told to `durable` too.
    pub fn append_then(&mut self, records: &[StoredRecord], durable: Durable) -> io::Result<()> {
        // A commit found not durable meanwhile (the records were chained to it).
        if let Some(e) = self.failed.take() {
            return answer(durable, Err(e));
        }
        let Some(first) = records.first() else {
            let made = self
                .settle()
                .and_then(|()| self.cut_dirty())
                .and_then(|()| {
                    if self
                        .open
                        .as_ref()
                        .is_some_and(|o| o.len >= self.segment_limit)
                    {
                        self.roll(self.next_seq)?;
                    }
                    Ok(())
                });
            return answer(durable, made);
        };
        if self.open.is_some() && first.seq != self.next_seq {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record {} does not follow the log's last record {}",
                    first.seq,
                    self.next_seq.saturating_sub(1)
                ),
            );
            return answer(durable, Err(e));
        }
        // Positions are the index's key: a segment's records are consecutive.
        if let Some(pair) = records
            .windows(2)
            .find(|w| w[0].seq.checked_add(1) != Some(w[1].seq))
        {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record {} does not follow record {}",
                    pair[1].seq, pair[0].seq
                ),
            );
            return answer(durable, Err(e));
        }
        if self
            .open
            .as_ref()
            .is_none_or(|o| o.len >= self.segment_limit)
        {
            if let Err(e) = self.settle().and_then(|()| self.roll(first.seq)) {
                return answer(durable, Err(e));
            }
        }
        let open = self.open.as_ref().expect("a segment is open");
        self.frames.clear();
        self.frame_ends.clear();
        self.entries.clear();
        for record in records {
            Entry::of(record, open.len + self.frames.len() as u64).encode(&mut self.entries);
            let at = self.frames.len();
            encode_frame(record, &mut self.frames);
            // One the log's readers would refuse is not written (and its token answered).
            if self.frames.len() - at > MAX_BODY + FRAME_OVERHEAD {
                let e = io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "record {} takes {} octets, more than a frame may ({MAX_BODY})",
                        record.seq,
                        self.frames.len() - at - FRAME_OVERHEAD
                    ),
                );
                return answer(durable, Err(e));
            }
            self.frame_ends.push(self.frames.len());
        }
        // The commit before must be durable before this one is written: a torn commit is
        // always the last one (`tail`).
        if let Err(e) = self.settle().and_then(|()| self.cut_dirty()) {
            return answer(durable, Err(e));
        }
        let open = self.open.as_mut().expect("a segment is open");
        let parts = write_in_parts(
            &open.file,
            open.len,
            &self.frames,
            &self.frame_ends,
            MAX_TORN,
        );
        if let Err(e) = parts {
            // Nothing of the records may stay to be found, or chained to.
            cut(open, &mut self.dirty);
            return answer(durable, Err(e));
        }
        let start = open.len;
        self.in_flight = Some(Before {
            len: start,
            next_seq: self.next_seq,
            last: self.last,
            imprints: self.imprints.len(),
            index_len: open.index_len,
        });
        let index = open.index_len.map(|at| (open.index.clone(), at));
        open.len += self.frames.len() as u64;
        open.room = open.room.max(open.len);
        open.index_len = open.index_len.map(|at| at + self.entries.len() as u64);
        self.imprints.extend(
            records
                .iter()
                .map(|r| (imprint_key(&r.record.imprint), r.seq)),
        );
        let last = &records[records.len() - 1];
        self.next_seq = last.seq.saturating_add(1);
        self.last = Some(ChainHead {
            seq: last.seq,
            hash: last.hash,
        });
        let job = Job {
            segment: open.file.clone(),
            cut_to: start,
            index,
            entries: std::mem::take(&mut self.entries),
            durable,
            #[cfg(test)]
            fail: std::mem::take(&mut self.fail_next_sync),
        };
        self.syncer.get_or_insert_with(Syncer::start).send(job);
        Ok(())
    }

    /// Writes a sector of zeros past the open segment's frames (room, which it already
    /// holds or which it extends) and syncs it: whether the segment takes durable writes
    /// again, after a failure.
    pub fn probe(&mut self) -> io::Result<()> {
        self.settle()?;
        self.cut_dirty()?;
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        open.file
            .write_all_at(&[0; SECTOR as usize], open.len)
            .and_then(|()| open.file.sync_data())?;
        open.room = open.room.max(open.len + SECTOR);
        Ok(())
    }

    /// Waits for the commit in flight, if any; an error when it, or one found earlier by
    /// `Appender::wait`, did not become durable (its frames are cut off).
    pub fn settle(&mut self) -> io::Result<()> {
        self.wait();
        self.failed.take().map_or(Ok(()), Err)
    }

    /// Waits for the commit in flight, if any. If it did not become durable, its frames are
    /// cut off, the log's end is set back to where it was before it, and the error kept for
    /// the next [`Appender::settle`].
    fn wait(&mut self) {
        let Some(before) = self.in_flight.take() else {
            return;
        };
        let done = self
            .syncer
            .as_mut()
            .expect("a commit in flight has a syncer")
            .wait();
        let open = self
            .open
            .as_mut()
            .expect("a commit in flight has a segment");
        if let Some(e) = done.index_failed {
            tracing::warn!(
                index = %open.segment.index_path().display(),
                error = %e,
                "the token log's index cannot be written; readers read the frames"
            );
            open.index_len = None;
        }
        if let Err(e) = done.synced {
            tracing::error!(
                segment = %open.segment.path.display(),
                error = %e,
                cut_off = done.cut,
                "a commit of the token log did not become durable: its requests are refused"
            );
            open.len = before.len;
            if done.cut {
                open.room = open.len;
            } else {
                cut(open, &mut self.dirty);
            }
            open.index_len = before.index_len;
            self.next_seq = before.next_seq;
            self.last = before.last;
            self.imprints.truncate(before.imprints);
            self.failed = Some(e);
        }
    }

    /// Cuts off frames that a refused commit left (a cut that failed), before anything else
    /// is written: until they are, readers could find them.
    fn cut_dirty(&mut self) -> io::Result<()> {
        if self.dirty {
            let open = self.open.as_mut().expect("dirty only with a segment open");
            cut_back(&open.file, open.len)?;
            open.room = open.len;
            self.dirty = false;
        }
        Ok(())
    }

    /// Writes `ROOM` zeros past the open segment's end (up to its limit) and syncs them,
    /// once less than half of that is left. When that fails, commits extend the file instead
    /// for the next `ROOM` octets of frames, and then it is tried again.
    pub fn make_room(&mut self) {
        let due = |open: &Open, limit: u64| {
            let zeros = ROOM.min(limit.saturating_sub(open.room));
            let due =
                open.len >= open.no_room_before && zeros > 0 && open.room < open.len + ROOM / 2;
            due.then_some(zeros)
        };
        if self
            .open
            .as_ref()
            .and_then(|o| due(o, self.segment_limit))
            .is_none()
        {
            return;
        }
        // One sync of the segment at a time (see `syncer`); a failure is kept for the next
        // append, and the room is made after the frames as they are then. Not after a failed
        // commit: where its frames could not be cut off (`dirty`), zeros synced over part of
        // them would leave good frames behind a hole for the next start to find.
        self.wait();
        if self.dirty || self.failed.is_some() {
            return;
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let Some(zeros) = due(open, self.segment_limit) else {
            return;
        };
        if self.zeros.is_empty() {
            self.zeros = vec![0; ROOM as usize];
        }
        let written = open
            .file
            .write_all_at(&self.zeros[..zeros as usize], open.room)
            .and_then(|()| open.file.sync_data());
        match written {
            Ok(()) => open.room += zeros,
            Err(e) => {
                // Zeros that went in stay: readers and the start take them for room.
                tracing::warn!(
                    segment = %open.segment.path.display(),
                    error = %e,
                    "no room can be written ahead in the token log; commits extend it instead"
                );
                open.no_room_before = open.len + ROOM;
            }
        }
    }

    /// Closes the open segment (its index synced: closed segments are not checked again at
    /// start) and starts a new one at `first_seq`, its name synced into the folder. On failure
    /// the open segment stays open (what of the new one was made is removed, or left holding
    /// zeros only, to be taken again), so the next commit tries again.
    fn roll(&mut self, first_seq: u64) -> io::Result<()> {
        if let Some(old) = self.open.as_mut() {
            if old.room > old.len {
                old.file.set_len(old.len)?;
                old.file.sync_data()?;
                old.room = old.len;
            }
            if old.index_len.is_some() {
                old.index.sync_all()?;
            }
        }
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                crate::files::sync_directory(parent)?;
                if let Some(root) = parent.parent() {
                    crate::files::sync_directory(root)?;
                }
            }
        }
        let segment = Segment::new(&self.dir, first_seq);
        let spare = self.spare.as_mut().and_then(Spare::take);
        let (file, index, room) = make_segment(&segment, &self.dir, spare)?;
        if let Some(old) = self.open.take() {
            let imprints = std::mem::take(&mut self.imprints);
            if let Err(e) = write_imprints(&old.segment, imprints) {
                // Look-ups by imprint read this segment's frames instead.
                tracing::warn!(
                    segment = %old.segment.path.display(),
                    error = %e,
                    "the closed segment's imprint file cannot be written"
                );
            }
        }
        self.next_seq = first_seq;
        self.open = Some(Open {
            segment,
            file: Arc::new(file),
            index: Arc::new(index),
            len: 0,
            room,
            no_room_before: 0,
            index_len: Some(0),
        });
        self.start_spare();
        Ok(())
    }

    /// Starts writing the segment after the open one ahead, unless one is pending.
    fn start_spare(&mut self) {
        if self.spare.as_ref().is_some_and(Spare::is_pending) {
            return;
        }
        self.spare = match Spare::start(&self.dir, self.segment_limit, ROOM) {
            Ok(spare) => Some(spare),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the next segment cannot be written ahead; segments make their room as they fill"
                );
                None
            }
        };
    }

    /// Waits until the next segment is written ahead, or has failed (for tests).
    #[cfg(test)]
    pub fn wait_for_spare(&self) {
        if let Some(spare) = &self.spare {
            spare.wait();
        }
    }
}

impl Drop for Appender {
    /// The commit in flight is answered, and cut off if it did not become durable; the frames
    /// of a refused commit whose cut failed (`dirty`) are cut off once more, or the next start
    /// would take them as records (frames that may not even be on the disk).
    fn drop(&mut self) {
        self.wait();
        if !self.dirty || self.open.is_none() {
            return;
        }
        if let Err(e) = self.cut_dirty() {
            tracing::error!(
                error = %e,
                "the frames of a refused commit cannot be cut off the token log: the next \
                 start takes them as records (archived and chained, their tokens never sent)"
            );
        }
    }
}

/// Cuts the open segment back to its frames' end and syncs the cut; where that fails, the
/// appender is left `dirty`, to cut before anything else.
fn cut(open: &mut Open, dirty: &mut bool) {
    if cut_back(&open.file, open.len).is_err() {
        *dirty = true;
    }
    open.room = open.len;
}

/// Writes a commit's `frames` (ending at `ends`) at `at`: at once where they take at most
/// [`MAX_TORN`] octets, else in parts of whole frames of at most that, each but the last synced
/// before the next is written, so that after a power cut only the last part can be torn (a
/// start takes no more as a torn commit). The records of parts synced are durable, and found
/// at the next start, though none is answered before the whole commit is.
/// Returns where the parts begin in `frames`.
pub(super) fn write_in_parts(
    file: &File,
    at: u64,
    frames: &[u8],
    ends: &[usize],
    max: u64,
) -> io::Result<Vec<usize>> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut starts = vec![0];
    let mut from = 0;
    while frames.len() - from > max {
        // The whole frames that fit; a frame larger than `max` alone (with MAX_TORN, none
        // is). The last frame ends past `from + max`, so `ends[fit]` is one.
        let fit = ends.partition_point(|&end| end <= from + max);
        let to = match ends[..fit].last() {
            Some(&end) if end > from => end,
            _ => ends[fit],
        };
        file.write_all_at(&frames[from..to], at + from as u64)?;
        file.sync_data()?;
        from = to;
        starts.push(from);
    }
    file.write_all_at(&frames[from..], at + from as u64)?;
    Ok(starts)
}

/// Cuts `file` at `len` and syncs the cut (its size too).
pub(super) fn cut_back(file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)?;
    file.sync_all()
}

/// Makes `segment`'s files in `dir` and syncs their names: the segment is the `spare` written
/// ahead (renamed to it) or a new file, its index emptied. A segment file left by a roll that
/// failed is taken again (or replaced by the spare) while it holds zeros only; one that holds
/// anything else is not. Returns the segment, its index and the segment's length (zeros: its
/// room).
fn make_segment(
    segment: &Segment,
    dir: &Path,
    spare: Option<(PathBuf, File)>,
) -> io::Result<(File, File, u64)> {
    let check_unused = |file: &File| {
        let len = file.metadata()?.len();
        if nonzero_len(file, 0, len)? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} holds data already: it is not taken as a new segment",
                    segment.path.display()
                ),
            ));
        }
        Ok(len)
    };
    let (file, room) = match spare {
        Some((spare_path, spare)) => {
            match File::open(&segment.path) {
                Ok(left) => {
                    check_unused(&left)?;
                }
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            fs::rename(spare_path, &segment.path)?;
            let room = spare.metadata()?.len();
            (spare, room)
        }
        None => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&segment.path)?;
            let room = check_unused(&file)?;
            (file, room)
        }
    };
    let made = open_index(segment).and_then(|index| {
        index.set_len(0)?;
        crate::files::sync_directory(dir)?;
        Ok(index)
    });
    match made {
        Ok(index) => Ok((file, index, room)),
        Err(e) => {
            // Best effort: a segment of zeros left behind is taken again by the next try, and
            // removed at start.
            drop(file);
            let _ = remove_segment(segment);
            Err(e)
        }
    }
}

/// What names a torn tail's copy, after its segment's file name and before the offset.
const TORN_COPY: &str = ".torn-";

/// Whether `name` is a torn tail's copy ([`keep_torn`]).
pub(super) fn is_torn_copy(name: &str) -> bool {
    name.split_once(TORN_COPY)
        .is_some_and(|(segment, _)| segment.ends_with(".log"))
}

/// Copies the octets of `file` from `from` to `to` (a torn tail about to be cut off, up to
/// its last octet that is not zero: at most [`MAX_TORN`]) into a new file beside the segment,
/// `<segment>.torn-<from>` (or `…-<from>.<n>` where that is taken: an earlier start's copy is
/// never written over), synced with its name. A torn commit's requests were never answered,
/// so the copy is not needed; but should a disk that lost a sector of acknowledged frames (or
/// ignored a flush) have made them look torn, the cut would otherwise take their tokens for
/// good. Best effort: a copy that cannot be made (a full disk) is removed again, and the
/// caller cuts all the same (the start must not fail for want of room for an insurance).
fn keep_torn(file: &File, segment: &Segment, from: u64, to: u64) -> io::Result<PathBuf> {
    let mut octets = vec![0; (to - from) as usize];
    file.read_exact_at(&mut octets, from)?;
    let name = segment
        .path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    let mut n = 0;
    let (path, copy) = loop {
        let path = segment.path.with_file_name(match n {
            0 => format!("{name}{TORN_COPY}{from}"),
            n => format!("{name}{TORN_COPY}{from}.{n}"),
        });
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(copy) => break (path, copy),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    };
    let written = copy
        .write_all_at(&octets, 0)
        .and_then(|()| copy.sync_all())
        .and_then(|()| match path.parent() {
            Some(dir) => crate::files::sync_directory(dir),
            None => Ok(()),
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Removes a segment, its index and its imprint file.
pub fn remove_segment(segment: &Segment) -> io::Result<()> {
    fs::remove_file(&segment.path)?;
    for derived in [segment.index_path(), segment.imprints_path()] {
        match fs::remove_file(derived) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// What follows the good frames of `segment` (the newest), as the start judges it: nothing
/// (or the room's zeros), a torn commit it cuts off, or damage it refuses to start on.
///
/// Beside a running server the tail moves: a commit written between the scan and the look
/// at what follows it shows as a whole frame there, which would read as damage. Damage is
/// told only when a second look, a moment later, finds the good frames ending where they did;
/// a tail that keeps moving is a writer at work, not damage (`None`). A frame being written
/// shows as torn at most: a warning.
pub(super) fn judge_tail(segment: &Segment) -> io::Result<Option<UnreadTail>> {
    let mut judged = judge_tail_once(segment)?;
    for _ in 0..5 {
        let Some((end, Some(UnreadTail::Damaged(_)))) = &judged else {
            break;
        };
        let end = *end;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let again = judge_tail_once(segment)?;
        if again.as_ref().is_some_and(|(e, _)| *e == end) {
            return Ok(again.and_then(|(_, tail)| tail));
        }
        judged = again;
    }
    Ok(match judged {
        Some((_, Some(UnreadTail::Damaged(_)))) | None => None,
        Some((_, tail)) => tail,
    })
}

/// [`judge_tail`]'s one look: where the good frames end, and what follows them (`None`: the
/// segment is gone, pruned or closed meanwhile).
fn judge_tail_once(segment: &Segment) -> io::Result<Option<(u64, Option<UnreadTail>)>> {
    let scanned = match scan(segment) {
        Ok(scanned) => scanned,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if scanned.entries.len() < scanned.claimed {
        let why = format!(
            "{}: its index lists {} records, only {} good frames are there",
            segment.path.display(),
            scanned.claimed,
            scanned.entries.len()
        );
        return Ok(Some((scanned.end, Some(UnreadTail::Damaged(why)))));
    }
    let file = File::open(&segment.path)?;
    let len = file.metadata()?.len();
    let tail = match tail(&file, scanned.end, len)? {
        Tail::Zeros => None,
        Tail::Torn { written } => Some(UnreadTail::Torn {
            octets: written - scanned.end,
        }),
        Tail::Damaged(why) => Some(UnreadTail::Damaged(format!(
            "{} at offset {}: {why}",
            segment.path.display(),
            scanned.end
        ))),
    };
    Ok(Some((scanned.end, tail)))
}

/// What follows the last good frame of the newest segment.
enum Tail {
    /// Nothing, or zeros only: the room written ahead.
    Zeros,
    /// The frames of a commit that did not complete, up to `written` (past its last octet
    /// that is not zero).
    Torn { written: u64 },
    /// Anything else, and why.
    Damaged(String),
}

/// Tells the octets from `end` (where the good frames end) to `len` (the file's end) apart.
///
/// Only the last commit can be torn: each commit is one write at the end of the good frames,
/// synced before its requests are answered and before the next commit, into zeros (the room)
/// or past the file's end. So after a power cut every octet from the first frame that does
/// not check on is what that commit wrote, or a zero where a sector of it did not reach the
/// disk; and the frame at `end` failed because a sector of it is missing. Anything else is
/// damage to committed frames, never cut off:
/// - a frame at `end` that checks but does not follow the chain;
/// - more than [`MAX_TORN`] octets that are not zeros;
/// - a frame that checks anywhere after `end` (after a torn commit nothing checks, unless
///   its sectors reached the disk out of order: such a start is refused too, for the
///   operator, rather than a committed record cut off);
/// - a frame at `end` whose length fits, whose octets all lie before the last one that is
///   not zero, and which holds no sector of zeros: written whole, then altered.
fn tail(file: &File, end: u64, len: u64) -> io::Result<Tail> {
    if end >= len {
        return Ok(Tail::Zeros);
    }
    if let Some((record, _)) = read_at(file, end)? {
        return Ok(Tail::Damaged(format!(
            "the frame there, of position {}, checks but does not follow the chain",
            record.seq
        )));
    }
    let written = end + nonzero_len(file, end, len)?;
    if written == end {
        return Ok(Tail::Zeros);
    }
    if written - end > MAX_TORN {
        return Ok(Tail::Damaged(format!(
            "{} octets follow the last good frame, more than a commit that did not complete",
            written - end
        )));
    }
    let mut octets = vec![0u8; (written - end) as usize];
    file.read_exact_at(&mut octets, end)?;
    // Every frame's body starts with the record domain, 4 octets into the frame.
    for i in 5..octets.len().saturating_sub(RECORD_DOMAIN.len() - 1) {
        if octets[i..].starts_with(RECORD_DOMAIN) {
            let at = end + i as u64 - 4;
            if let Some((record, _)) = read_at(file, at)? {
                return Ok(Tail::Damaged(format!(
                    "a good frame, of position {}, follows at offset {at}; after a power cut \
                     this can be the last commit, whose sectors reached the disk out of order \
                     and whose requests were never answered: then, with a copy kept, cutting \
                     the segment at offset {end} (truncate -s {end}) lets the server start",
                    record.seq
                )));
            }
        }
    }
    let body = match octets.get(..4) {
        Some(l) => u64::from(u32::from_be_bytes(l.try_into().expect("4 octets"))),
        None => 0,
    };
    let frame_end = end + 4 + body + 32;
    if body == 0 || body > MAX_BODY as u64 || frame_end > written {
        return Ok(Tail::Torn { written });
    }
    // A sector of the frame that did not reach the disk: zeros from `end` (or its start) on.
    let mut sector = end / SECTOR * SECTOR;
    while sector < frame_end {
        let from = (sector.max(end) - end) as usize;
        let to = ((sector + SECTOR).min(written) - end) as usize;
        if octets[from..to].iter().all(|&b| b == 0) {
            return Ok(Tail::Torn { written });
        }
        sector += SECTOR;
    }
    Ok(Tail::Damaged(
        "a frame written whole does not check: it was altered, not torn".into(),
    ))
}

/// How many octets of `file` from `from` to `to` there are up to the last one that is not
/// zero (0 when all are zeros).
fn nonzero_len(file: &File, from: u64, to: u64) -> io::Result<u64> {
    let mut chunk = vec![0u8; (to - from).min(ROOM) as usize];
    let mut at = to;
    while at > from {
        let n = chunk.len().min((at - from) as usize);
        file.read_exact_at(&mut chunk[..n], at - n as u64)?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b != 0) {
            return Ok(at - n as u64 + i as u64 + 1 - from);
        }
        at -= n as u64;
    }
    Ok(0)
}

fn damaged(segment: &Segment, offset: u64, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the token log {} is damaged at offset {offset} ({why}); nothing was cut off and \
             the server does not start on it: keep a copy of the segment as it is for \
             forensics, see which records `tsa archive verify` reports, and restore the \
             segment from a backup",
            segment.path.display()
        ),
    )
}
