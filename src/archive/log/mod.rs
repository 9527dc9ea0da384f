//! The token log: an SQLite archive's token records in append-only files beside the
//! database (`archive.layout = "log"`, the default for new archives), so that a commit costs
//! one `write` and one `fdatasync` instead of B-tree work and a write-ahead log
//! (`docs/design/token-log.md`).
//!
//! Everything but the token records stays in the database: reservations, events,
//! checkpoints, chain anchors. The files and their recovery are in [`segments`] and
//! [`appender`]; [`LogStore`] puts both behind [`ArchiveStore`], so the writer, look-ups,
//! export, verification and pruning use the log as they use rows.

pub mod appender;
pub mod migrate;
pub mod segments;
mod spare;
mod syncer;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use self::appender::{remove_segment, Appender};
use self::segments::{
    dir_for, frame_fields, instance_dir, read_at, read_frame_into, scan, Frames, PositionReader,
    Segment,
};
use super::record::{Anchor, AnchorSignature, ChainHead, Checkpoint, EventRecord, StoredRecord};
use super::serial::layout;
use super::sqlite::SqliteStore;
use super::store::{
    ArchiveStore, Durable, ImprintMatches, InstanceState, Newest, Rank, SignAnchor, StoreError,
    UnreadTail, Visit,
};

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::new(e)
    }
}

/// How far a record's genTime may be from its neighbours' in the log: a request's genTime is
/// read before it is signed and archived, and a slow signer or a long commit delay it by
/// seconds; ten minutes is far past any of them.
const TIME_SLACK_NS: u64 = 600_000_000_000;

/// How far back [`LogReader::maxima`] looks, in octets of records: more than the records of
/// the largest batch (10,000 tokens of a few KB with their certificates split off).
const MAXIMA_SPAN: u64 = 64 << 20;

/// Segments a read in genTime order keeps open at once (the least recently opened closes),
/// and at least two for each instance.
const OPEN_SEGMENTS: usize = 8;

/// Segments one call of `prune` removes at most (some milliseconds each: their index is read
/// and their next segment's first frame).
const PRUNE_STEP: usize = 64;

/// Reads the token log of an archive (the writer's segments, while it writes).
pub struct LogReader {
    root: PathBuf,
    /// The lowest and highest counter of closed segments (instance, first position), read
    /// once: a closed segment does not change.
    counters: Mutex<CounterRanges>,
    /// Per segment file, how many of its index entries a look-up that missed found to agree
    /// with their frames: see [`LogReader::counter_in_frames`].
    agreeing: Mutex<HashMap<PathBuf, usize>>,
}

/// Per closed segment (instance, first position): its lowest and highest counter, if any.
type CounterRanges = HashMap<(u32, u64), Option<(u64, u64)>>;

impl LogReader {
    /// The log beside the SQLite database `database`.
    pub fn new(database: &Path) -> Self {
        Self {
            root: dir_for(database),
            counters: Mutex::new(HashMap::new()),
            agreeing: Mutex::new(HashMap::new()),
        }
    }

    pub fn instances(&self) -> io::Result<Vec<u32>> {
        segments::instances(&self.root)
    }

    fn segments(&self, instance_id: u32) -> io::Result<Vec<Segment>> {
        segments::segments(&instance_dir(&self.root, instance_id))
    }

    /// The instance's last record.
    pub fn head(&self, instance_id: u32) -> io::Result<Option<StoredRecord>> {
        for segment in self.segments(instance_id)?.iter().rev() {
            if let Some(last) = segments::last_record(segment)? {
                return Ok(Some(last));
            }
        }
        Ok(None)
    }

    /// The highest counter and genTime of the instance's recent records: those of its last
    /// segments, at least two and at least `MAXIMA_SPAN` octets of them. Both rise with the
    /// position, except among requests in flight together: a batch takes its serials and
    /// genTimes as it issues, and its records (up to `max_batch_bytes` of requests' tokens)
    /// follow those of requests that came after it. Older segments are pruned behind an anchor
    /// that keeps their maxima.
    pub fn maxima(&self, instance_id: u32) -> io::Result<(Option<u64>, Option<u64>)> {
        let all = self.segments(instance_id)?;
        let (mut counter, mut gen_time) = (None, None);
        let mut spanned = 0u64;
        for (i, segment) in all.iter().rev().enumerate() {
            if i >= 2 && spanned >= MAXIMA_SPAN {
                break;
            }
            // The index entries that set them are checked against their frames (a garbled
            // one would be a floor that no later start undoes, the index removed or not).
            let scanned = segments::scan_checked(segment)?;
            spanned = spanned.saturating_add(scanned.end);
            for e in scanned.entries {
                counter = counter.max(Some(e.counter));
                gen_time = gen_time.max(Some(e.gen_time_ns));
            }
        }
        Ok((counter, gen_time))
    }

    /// Visits the instance's records from position `from_seq` on, in order, until `visit`
    /// returns `false`. A record is read as stored (its hash is not checked here:
    /// verification recomputes it); a frame that is cut short or does not decode ends its
    /// segment. Frames before `from_seq` are passed over only until the first one visited:
    /// one of a lower position after it (a frame put in among the others) is visited as it
    /// is, for verification to find out of place.
    pub fn for_each_from(
        &self,
        instance_id: u32,
        from_seq: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let all = self.segments(instance_id)?;
        let start = all
            .partition_point(|s| s.first_seq <= from_seq)
            .saturating_sub(1);
        let mut started = false;
        // A segment pruned since it was listed (retention, beside a verification) ends the
        // walk there: what follows is no longer what it went on from, and a verification
        // that finds the chain short of its checkpoints reads it again from the new anchor.
        let pruned = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        for (i, segment) in all.iter().enumerate().skip(start) {
            let offset = if i == start && from_seq > segment.first_seq {
                match segments::offset_of(segment, from_seq) {
                    Ok(Some(offset)) => offset,
                    Ok(None) => continue,
                    Err(e) if pruned(&e) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            } else {
                0
            };
            let mut frames = match Frames::open(segment, offset) {
                Ok(frames) => frames.unchecked(),
                Err(e) if pruned(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            while let Some((_, fields, hash)) = frames.next_ref()? {
                if !started && fields.seq < from_seq {
                    continue;
                }
                started = true;
                if !visit(fields.to_record(hash))? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The instance's record at position `seq`.
    pub fn record_at(&self, instance_id: u32, seq: u64) -> io::Result<Option<StoredRecord>> {
        let all = self.segments(instance_id)?;
        match all[..all.partition_point(|s| s.first_seq <= seq)].last() {
            Some(segment) => Self::record_in(segment, seq),
            None => Ok(None),
        }
    }

    /// The record at position `seq` of `segment`.
    fn record_in(segment: &Segment, seq: u64) -> io::Result<Option<StoredRecord>> {
        Ok(segments::record_of(segment, seq)?.map(|(_, r)| r))
    }

    /// The instance's record with `counter`. Counters rise with the position except among
    /// requests in flight together, so it is nearly always in the last segment whose first
    /// counter is not above it (a binary search: the first frames of log2(segments) segments
    /// are read), or next to that one. A counter taken early and recorded late (a batch, a
    /// slow signature) may lie further on, and first counters may then be out of order: when
    /// those segments do not hold it, every other segment whose lowest and highest counters
    /// (read once for a closed segment, checked against their frames) span it is searched.
    pub fn by_counter(&self, instance_id: u32, counter: u64) -> io::Result<Option<StoredRecord>> {
        let all = self.segments(instance_id)?;
        let (mut low, mut high) = (0, all.len());
        while low < high {
            let middle = low + (high - low) / 2;
            if segments::first_counter(&all[middle])?.is_some_and(|c| c <= counter) {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let at = low.saturating_sub(1);
        let candidates: Vec<usize> = [Some(at), at.checked_add(1), at.checked_sub(1)]
            .into_iter()
            .flatten()
            .filter(|&i| i < all.len())
            .collect();
        // Segments whose entries span the counter without holding it (one garbled?).
        let mut spanning = Vec::new();
        for &i in &candidates {
            if let Some(found) = self.counter_in(&all[i], counter, &mut spanning)? {
                return Ok(Some(found));
            }
        }
        for (i, segment) in all.iter().enumerate() {
            if candidates.contains(&i) {
                continue;
            }
            let closed = i + 1 < all.len();
            if closed {
                let key = (instance_id, segment.first_seq);
                let cached = self.lock_counters().get(&key).copied();
                let range = match cached {
                    Some(range) => range,
                    None => {
                        let entries = segments::scan_checked_for_look_ups(segment)?.entries;
                        let range = entries
                            .iter()
                            .map(|e| e.counter)
                            .min()
                            .zip(entries.iter().map(|e| e.counter).max());
                        self.lock_counters().insert(key, range);
                        range
                    }
                };
                if !range.is_some_and(|(low, high)| low <= counter && counter <= high) {
                    continue;
                }
            }
            if let Some(found) = self.counter_in(segment, counter, &mut spanning)? {
                return Ok(Some(found));
            }
        }
        for (segment, scanned) in spanning {
            if let Some(found) = self.counter_in_frames(&segment, counter, &scanned)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    fn lock_counters(&self) -> std::sync::MutexGuard<'_, CounterRanges> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record with `counter` in `segment`, through its entries, checked
    /// ([`segments::scan_checked_for_look_ups`]: a garbled counter at either end of the
    /// segment's is told). An entry whose frame is another record voids the index: the frames
    /// are read instead. (One whose frame does not check names a damaged record.) Where the
    /// entries span the counter without holding it, the segment and its entries go to
    /// `spanning`, for [`LogReader::counter_in_frames`] once no segment's entries hold it.
    fn counter_in(
        &self,
        segment: &Segment,
        counter: u64,
        spanning: &mut Vec<(Segment, segments::Scanned)>,
    ) -> io::Result<Option<StoredRecord>> {
        let scanned = match segments::scan_checked_for_look_ups(segment) {
            Ok(scanned) => scanned,
            // Pruned since it was listed: the counter is not there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let entries = &scanned.entries;
        let Some(e) = entries.iter().find(|e| e.counter == counter) else {
            let low = entries.iter().map(|e| e.counter).min();
            let high = entries.iter().map(|e| e.counter).max();
            if low.is_some_and(|l| l <= counter) && high.is_some_and(|h| counter <= h) {
                spanning.push((segment.clone(), scanned));
            }
            return Ok(None);
        };
        let file = File::open(&segment.path)?;
        let found = read_at(&file, e.offset)?.map(|(record, _)| record);
        if let Some(record) = found.filter(|r| r.seq == e.seq && r.counter == counter) {
            return Ok(Some(record));
        }
        // Another record there, or none that checks (a garbled offset).
        let entries = segments::frames_instead(segment, e.seq)?.entries;
        match entries.iter().find(|e| e.counter == counter) {
            Some(e) => Ok(read_at(&file, e.offset)?.map(|(r, _)| r)),
            None => Ok(None),
        }
    }

    /// A counter that `segment`'s entries (`scanned`) do not hold, though their lowest and
    /// highest counters span it. Only those two are checked against their frames, so an entry
    /// between them with a garbled counter would hide its record ("no such token" of a token
    /// the log holds): the entries are compared with the frames, those not compared before
    /// (a closed segment's once; the open one's as its index grows: the frames past its
    /// index, a commit in flight that may yet be cut, are compared each time), and where they
    /// differ the frames are searched.
    fn counter_in_frames(
        &self,
        segment: &Segment,
        counter: u64,
        scanned: &segments::Scanned,
    ) -> io::Result<Option<StoredRecord>> {
        let entries = &scanned.entries;
        let agreeing = || self.agreeing.lock().unwrap_or_else(|p| p.into_inner());
        let compared = agreeing().get(&segment.path).copied().unwrap_or(0);
        let Some(first) = entries.get(compared) else {
            return Ok(None);
        };
        let mut frames = Frames::open(segment, first.offset)?;
        let mut differs = None;
        for entry in &entries[compared..] {
            let frame = frames.next_frame()?;
            if frame.is_none_or(|(at, record)| segments::Entry::of(&record, at) != *entry) {
                differs = Some(entry.seq);
                break;
            }
        }
        let Some(seq) = differs else {
            agreeing().insert(segment.path.clone(), scanned.indexed.min(entries.len()));
            return Ok(None);
        };
        let frames = segments::frames_instead(segment, seq)?.entries;
        match frames.iter().find(|e| e.counter == counter) {
            Some(e) => Ok(read_at(&File::open(&segment.path)?, e.offset)?.map(|(r, _)| r)),
            None => Ok(None),
        }
    }

    /// Records of every instance with `from_ns <= genTime < to_ns` and a position above the
    /// instance's anchor, by genTime (then instance and position).
    ///
    /// A merge of the instances' logs, read a segment at a time: genTimes rise with the
    /// position but for requests in flight together, never more than `TIME_SLACK_NS` below
    /// a genTime before them, so a record read is visited once no unread segment can hold an
    /// earlier one. What is held at once is the entries of about that slack's tokens, not
    /// those of the whole range (40 octets each: 4 GB for a year of 100 million).
    pub fn in_time(
        &self,
        from_ns: u64,
        to_ns: u64,
        anchors: &HashMap<u32, u64>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let instances = self.instances()?;
        // Instances writing at once interleave their records in genTime order.
        let keep_open = OPEN_SEGMENTS.max(2 * instances.len());
        let mut logs = Vec::with_capacity(instances.len());
        for instance_id in instances {
            let mut unread = VecDeque::new();
            for segment in self.segments(instance_id)? {
                // A segment whose first and last genTimes are far outside the range is passed
                // over.
                let bounds = segments::time_bounds(&segment)?;
                if let Some((first, last)) = bounds {
                    if last.saturating_add(TIME_SLACK_NS) < from_ns
                        || first >= to_ns.saturating_add(TIME_SLACK_NS)
                    {
                        continue;
                    }
                }
                unread.push_back((segment, bounds.map(|(first, _)| first)));
            }
            logs.push(InTime {
                instance_id,
                anchor: anchors.get(&instance_id).copied().unwrap_or(0),
                unread,
                latest: None,
            });
        }
        // (genTime, instance, position, file, offset) of the records read, not yet visited.
        let mut pending = BinaryHeap::new();
        let mut files = SegmentFiles::new(keep_open);
        let mut visited_up_to = 0;
        let (mut out_of_order, mut pruned, mut unreadable) = (0u64, 0u64, 0u64);
        let mut misindexed = 0u64;
        loop {
            let next = (0..logs.len())
                .filter_map(|i| logs[i].floor().map(|floor| (floor, i)))
                .min();
            // Every record below the least genTime an unread segment may hold.
            while let Some(Reverse((gen_time_ns, _, seq, file, offset, listed))) =
                pending.peek().copied()
            {
                if next.is_some_and(|(floor, _)| gen_time_ns >= floor) {
                    break;
                }
                pending.pop();
                if gen_time_ns < visited_up_to {
                    out_of_order += 1;
                }
                visited_up_to = visited_up_to.max(gen_time_ns);
                let Some(segment) = files.open(file)? else {
                    // Pruned since it was scanned: the record is no longer archived.
                    pruned += 1;
                    continue;
                };
                let read = read_at(segment, offset)?.filter(|(r, _)| r.seq == seq);
                let Some((record, _)) = read else {
                    // Listed, and not there whole: damaged (or the index is). Unlisted: a
                    // frame past the newest segment's index, read whole before its sync, and
                    // cut off since (the sync failed: its requests were refused).
                    if listed {
                        unreadable += 1;
                    }
                    continue;
                };
                // The frame decides: its index entry put it in the range (a garbled genTime).
                if !(from_ns..to_ns).contains(&record.record.gen_time_ns) {
                    misindexed += 1;
                    continue;
                }
                if !visit(record)? {
                    return Ok(());
                }
            }
            let Some((_, i)) = next else {
                break;
            };
            let log = &mut logs[i];
            let (segment, _) = log
                .unread
                .pop_front()
                .expect("a floor comes from a segment");
            // The records a closed segment holds, and those the newest one's index lists, are
            // durable; frames past that index may be a commit whose sync is still to come.
            let newest = log.unread.is_empty();
            // Checked: a garbled genTime at either end of the segment's would leave records
            // out of the range, or take others in.
            let (entries, indexed) = match segments::scan_checked_for_look_ups(&segment) {
                Ok(scanned) => (scanned.entries, scanned.indexed),
                // Pruned since it was listed (retention, beside a long export).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(
                        segment = %segment.path.display(),
                        "a segment was pruned while the read went on: its records are left out"
                    );
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let file = files.add(segment.path);
            for (i, e) in entries.iter().enumerate() {
                log.latest = log.latest.max(Some(e.gen_time_ns));
                let mut gen_time_ns = e.gen_time_ns;
                let in_range = |t: u64| (from_ns..to_ns).contains(&t);
                // An entry garbled between the segment's extremes (which alone were checked)
                // would hide its record from the range, or take it out of order: where its
                // genTime is further from each neighbour's than records in flight together
                // are, or out of the range while its neighbours' span reaches into it, its
                // frame decides. (Sparse traffic reads a few frames more.)
                if e.seq > log.anchor && suspect(&entries, i, from_ns..to_ns) {
                    // (A frame that is not there is left to the read below, which tells it.)
                    let frame = match files.open(file)? {
                        Some(segment) => read_at(segment, e.offset)?,
                        None => None,
                    };
                    if let Some((r, _)) = frame.filter(|(r, _)| r.seq == e.seq) {
                        if r.record.gen_time_ns != gen_time_ns {
                            misindexed += 1;
                            gen_time_ns = r.record.gen_time_ns;
                        }
                    }
                }
                if e.seq > log.anchor && in_range(gen_time_ns) {
                    pending.push(Reverse((
                        gen_time_ns,
                        log.instance_id,
                        e.seq,
                        file,
                        e.offset,
                        !newest || i < indexed,
                    )));
                }
            }
        }
        if pruned > 0 {
            tracing::warn!(
                records = pruned,
                "records of segments pruned while the read went on are left out"
            );
        }
        if out_of_order > 0 {
            tracing::warn!(
                records = out_of_order,
                slack_s = TIME_SLACK_NS / 1_000_000_000,
                "records visited out of genTime order: their genTimes lie further below earlier \
                 records' than the slack a read in genTime order allows for"
            );
        }
        if misindexed > 0 {
            tracing::warn!(
                records = misindexed,
                "records whose index entries give another genTime than their frames are read \
                 by their frames: an index disagrees with its frames (see tsa archive verify; \
                 remove the index to have it written again)"
            );
        }
        if unreadable > 0 {
            return Err(StoreError(format!(
                "{unreadable} records the segments' indexes list in the range could not be read \
                 (their frames do not check, or the index is wrong): they are left out; see \
                 tsa archive verify"
            )));
        }
        Ok(())
    }
}

/// Whether `entries[i]`'s genTime may be garbled, as a read of `range` tells: it lies further
/// than `TIME_SLACK_NS` from each of its neighbours' (records in flight together lie closer);
/// or it is out of the range while the span of its neighbours' reaches into it, or it is the
/// segment's first or last (one neighbour says less). What is left: an entry garbled out of
/// the range, between neighbours out of it too, of a record in flight beside them whose
/// genTime is in it (`tsa archive verify` reports every entry that differs from its frame).
fn suspect(entries: &[segments::Entry], i: usize, range: std::ops::Range<u64>) -> bool {
    let t = entries[i].gen_time_ns;
    let neighbours = [i.checked_sub(1), i.checked_add(1)]
        .map(|n| n.and_then(|n| entries.get(n)).map(|e| e.gen_time_ns));
    let known = || neighbours.iter().flatten();
    let stray = known().all(|n| t.abs_diff(*n) > TIME_SLACK_NS);
    let reaches = match (known().min(), known().max()) {
        (Some(&low), Some(&high)) => low < range.end && high >= range.start,
        _ => false,
    };
    let end = neighbours.iter().any(Option::is_none);
    stray || (!range.contains(&t) && (reaches || end))
}

/// The segments a read by genTime has scanned, by number, a few of them open: in genTime
/// order the segments come one after the other, so not one is open for every segment of the
/// range (thousands, past the open-file limit).
struct SegmentFiles {
    paths: Vec<PathBuf>,
    /// The most recently opened last.
    open: Vec<(usize, File)>,
    keep_open: usize,
}

impl SegmentFiles {
    fn new(keep_open: usize) -> Self {
        Self {
            paths: Vec::new(),
            open: Vec::with_capacity(keep_open),
            keep_open,
        }
    }

    /// Numbers a scanned segment.
    fn add(&mut self, path: PathBuf) -> usize {
        self.paths.push(path);
        self.paths.len() - 1
    }

    /// Segment `file`, opened if it is not (closing the one opened first past `keep_open`);
    /// `None` once it was removed (pruned).
    fn open(&mut self, file: usize) -> io::Result<Option<&File>> {
        let at = match self.open.iter().position(|(f, _)| *f == file) {
            Some(at) => at,
            None => {
                let opened = match File::open(&self.paths[file]) {
                    Ok(opened) => opened,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                if self.open.len() == self.keep_open {
                    self.open.remove(0);
                }
                self.open.push((file, opened));
                self.open.len() - 1
            }
        };
        Ok(Some(&self.open[at].1))
    }
}

/// One instance's log in a read by genTime ([`LogReader::in_time`]).
struct InTime {
    instance_id: u32,
    anchor: u64,
    /// The segments not read yet, in order, each with its first record's genTime (from its
    /// frame) where its index covers the segment.
    unread: VecDeque<(Segment, Option<u64>)>,
    /// The latest genTime read so far.
    latest: Option<u64>,
}

impl InTime {
    /// The least genTime a record of the unread segments may have (`None`: all are read).
    fn floor(&self) -> Option<u64> {
        let (_, first) = self.unread.front()?;
        let below = |t: u64| t.saturating_sub(TIME_SLACK_NS);
        Some(first.map_or(0, below).max(self.latest.map_or(0, below)))
    }
}

/// Whether every record of `all[i]` (a segment, listed in order) is at or below the position
/// `anchor`: pruned, its files not removed yet. The last segment never is.
fn below_anchor(all: &[Segment], i: usize, anchor: u64) -> bool {
    all.get(i + 1)
        .is_some_and(|next| next.first_seq <= anchor.saturating_add(1))
}

/// Whether every record of a segment (`scanned`, checked against its frames) is older than
/// `before_ns` and at or below `signed` (the last signed checkpoint's position): pruning to
/// `before_ns` removes it.
fn prunable(scanned: &segments::Scanned, before_ns: u64, signed: u64) -> bool {
    let keeps = scanned
        .entries
        .iter()
        .any(|e| e.gen_time_ns >= before_ns || e.seq > signed)
        || scanned
            .last
            .as_ref()
            .is_some_and(|l| l.record.gen_time_ns >= before_ns);
    !keeps
}

/// Whether `leftovers`, the segments that by their names lie wholly at or below `anchor`, are
/// what a prune that stored it and stopped before removing them leaves: each is whole (every
/// frame checks from the position its name says to its end, as pruning found it), the last
/// ends with the anchor's record (its position and hash), none holds a record past the anchor,
/// and every record is one that this pruning removes too (older than `before_ns`, at or
/// below `signed`).
/// Names and anchors are no proof (an anchor row written by hand at a segment's end, a segment
/// renamed): what is not such a leftover is kept, and said (the first that is not, and why),
/// for the operator to look at.
fn not_left_by_a_prune(
    leftovers: &[Segment],
    anchor: &Anchor,
    before_ns: u64,
    signed: u64,
) -> io::Result<Option<String>> {
    for (i, segment) in leftovers.iter().enumerate() {
        let scanned = segments::scan_checked(segment)?;
        let last = scanned.last.as_ref();
        let len = std::fs::metadata(&segment.path)?.len();
        let why = if scanned.end != len || scanned.entries.len() < scanned.claimed {
            "not every frame checks from the position its name says to its end"
        } else if !prunable(&scanned, before_ns, signed) {
            "it holds records this pruning keeps (not older than its cut, or not signed by a \
             checkpoint)"
        } else if last.is_some_and(|l| l.seq > anchor.seq) {
            "it holds records past the anchor"
        } else if i + 1 == leftovers.len()
            && last.is_none_or(|l| l.seq != anchor.seq || l.hash != anchor.hash)
        {
            "its last record is not the anchor's (position and hash)"
        } else {
            continue;
        };
        return Ok(Some(format!("{}: {why}", segment.path.display())));
    }
    Ok(None)
}

/// An SQLite archive whose token records are in the log.
pub struct LogStore {
    db: SqliteStore,
    log: LogReader,
    /// The instance the writer appends to, and its appender (opened, and so recovered, when
    /// the store is first asked about that instance, or appends to it).
    appender: Option<(u32, Appender)>,
    /// Whether this is the writer's store. Only the writer appends, and only it opens an
    /// appender, whose recovery may cut a torn commit off a segment.
    appends: bool,
    segment_limit: u64,
    /// Events of commits whose records went in while the events could not be stored (the
    /// database locked or unwritable), oldest first: stored before the next commit's.
    kept_events: Vec<EventRecord>,
}

/// Events kept for the next commit at most: past them, a commit's records are not written
/// until the events are stored (the writer has chained every event it hands over, so none may
/// be dropped: the events' chain would break there).
const MAX_KEPT_EVENTS: usize = 10_000;

impl LogStore {
    /// The writer's store over the archive `db` (whose layout is the log).
    pub fn open(db: SqliteStore) -> Self {
        let log = LogReader::new(db.path());
        Self {
            db,
            log,
            appender: None,
            appends: true,
            segment_limit: segments::SEGMENT_LIMIT,
            kept_events: Vec::new(),
        }
    }

    /// Segments close at `limit` octets instead of [`segments::SEGMENT_LIMIT`]
    /// (`archive.log_segment_mib`).
    pub fn with_segment_limit(mut self, limit: u64) -> Self {
        self.segment_limit = limit;
        self
    }

    /// Opens an existing archive for look-ups, export, verification and pruning, without
    /// appending (so without the writer's recovery).
    pub fn open_read_only(db: SqliteStore) -> Self {
        let mut store = Self::open(db);
        store.appends = false;
        store
    }

    fn appender(&mut self, instance_id: u32) -> Result<&mut Appender, StoreError> {
        if self
            .appender
            .as_ref()
            .is_none_or(|(id, _)| *id != instance_id)
        {
            let dir = instance_dir(&self.log.root, instance_id);
            // The frames must reach the last signed checkpoint (unless pruning went past it
            // with the rows, before a migration): the appender refuses before it cuts a tail
            // that holds signed records.
            let anchor = self.anchor_of(instance_id)?;
            let signed = super::sqlite::last_checkpoint(self.db.connection(), instance_id)?
                .filter(|c| c.seq > anchor);
            let (appender, _) = Appender::open_reaching(&dir, self.segment_limit, signed)?;
            self.appender = Some((instance_id, appender));
        }
        Ok(&mut self.appender.as_mut().expect("opened above").1)
    }

    /// The appender of the writer's store for `records` of `instance_id`.
    fn appender_for(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
    ) -> Result<&mut Appender, StoreError> {
        if !self.appends {
            return Err(StoreError(
                "only the server's writer appends to the token log".into(),
            ));
        }
        if records.iter().any(|r| r.instance_id != instance_id) {
            return Err(StoreError("a record of another instance".into()));
        }
        self.appender(instance_id)
    }

    /// Removes `segments` of the instance, their removal synced into its folder.
    fn remove_segments(&self, instance_id: u32, segments: &[Segment]) -> Result<(), StoreError> {
        for segment in segments {
            remove_segment(segment)?;
        }
        crate::files::sync_directory(&instance_dir(&self.log.root, instance_id))?;
        Ok(())
    }

    fn anchor_of(&self, instance_id: u32) -> Result<u64, StoreError> {
        Ok(self
            .db
            .anchor_positions()?
            .get(&instance_id)
            .copied()
            .unwrap_or(0))
    }

    /// Stores `events` (after those kept from earlier commits) in the database beside the
    /// records of the same commit: see [`LogStore::append_then`].
    fn store_events(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
    ) -> Result<(), StoreError> {
        if events.is_empty() && self.kept_events.is_empty() {
            return Ok(());
        }
        let kept = self.kept_events.len();
        self.kept_events.extend_from_slice(events);
        match self.db.append(instance_id, &[], &self.kept_events) {
            Ok(()) => {
                self.kept_events.clear();
                Ok(())
            }
            Err(e) if records.is_empty() => {
                self.kept_events.truncate(kept);
                Err(e)
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    records = records.len(),
                    kept_events = self.kept_events.len(),
                    "the archive's events cannot be stored; the records are written, the \
                     events are kept for the next commit"
                );
                Ok(())
            }
        }
    }
}

impl ArchiveStore for LogStore {
    /// The log prunes whole segments and anchors at the last record of the last one removed
    /// (the anchor first, the files after: segments wholly at or below the anchor are what an
    /// interrupted prune leaves, for the next one to remove). So the segment that reads by
    /// position take for the anchor's next position begins there, by its first frame: one that
    /// begins below holds the anchor's position and the one after it, which no prune leaves
    /// (an anchor written by hand in its middle, which would hide every record below it from
    /// verification). Its name is no proof of where it begins (a segment renamed after such an
    /// anchor would pass), and the newest segment is no exception (pruning never removes it,
    /// so it never anchors inside it) but where it ends with the anchor's record: a prune that
    /// stopped before removing its last segment, which a start then reopened as the newest
    /// (the one after it was empty), until the next roll.
    fn kept_below_anchor(
        &mut self,
        instance_id: u32,
        anchor_seq: u64,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let segments = self.log.segments(instance_id)?;
        let after = anchor_seq.saturating_add(1);
        let Some(i) = segments.iter().rposition(|s| s.first_seq <= after) else {
            return Ok(None);
        };
        let first = match segments::first_record(&segments[i]) {
            Ok(first) => first.filter(|first| first.seq <= anchor_seq),
            // Pruned since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if first.is_some() && i + 1 == segments.len() {
            let last = segments::scan_checked(&segments[i])?.last;
            if last.is_some_and(|l| l.seq == anchor_seq) {
                return Ok(None);
            }
        }
        Ok(first)
    }

    /// Reads go by the segments' names (by position, serial, time, imprint): a segment whose
    /// first frame is at another position than its name says (renamed) has its records looked
    /// for where they are not, or taken for others'.
    /// Only a first frame that checks (its hash) counts: a damaged one is the chain's break
    /// where the walk reaches it. Segments below the anchor, which no read looks into, are
    /// passed over.
    fn misplaced_record(
        &mut self,
        instance_id: u32,
    ) -> Result<Option<(StoredRecord, String)>, StoreError> {
        let anchor = self.db.instance(instance_id)?.anchor.map_or(0, |a| a.seq);
        let all = self.log.segments(instance_id)?;
        for (i, segment) in all.iter().enumerate() {
            if below_anchor(&all, i, anchor) {
                continue;
            }
            let first = match segments::first_record(segment) {
                Ok(first) => first,
                // Pruned since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let checks = |r: &StoredRecord| r.computed_hash() == r.hash;
            if let Some(first) = first.filter(|r| r.seq != segment.first_seq && checks(r)) {
                let what = format!(
                    "the token log's segment {} begins with this record, but its name says it \
                     begins at {}: reads look for a segment's records by its name (was it \
                     renamed?)",
                    segment.path.display(),
                    segment.first_seq
                );
                return Ok(Some((first, what)));
            }
        }
        Ok(None)
    }

    fn instance(&mut self, instance_id: u32) -> Result<InstanceState, StoreError> {
        let mut state = self.db.instance(instance_id)?;
        let head = if self.appends {
            self.appender(instance_id)?.head()
        } else {
            self.log.head(instance_id)?.map(|r| ChainHead {
                seq: r.seq,
                hash: r.hash,
            })
        };
        if let Some(head) = head.filter(|h| state.head.is_none_or(|s| h.seq > s.seq)) {
            state.head = Some(head);
        }
        let (counter, gen_time) = self.log.maxima(instance_id)?;
        state.max_counter = state.max_counter.max(counter);
        state.max_gen_time_ns = state.max_gen_time_ns.max(gen_time.unwrap_or(0));
        Ok(state)
    }

    fn instances(&mut self) -> Result<Vec<u32>, StoreError> {
        let mut ids = self.db.instances()?;
        ids.extend(self.log.instances()?);
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn reserve(
        &mut self,
        instance_id: u32,
        until: u64,
        gen_time_floor_ns: u64,
    ) -> Result<(), StoreError> {
        self.db.reserve(instance_id, until, gen_time_floor_ns)
    }

    fn append(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
    ) -> Result<(), StoreError> {
        self.append_then(instance_id, records, events, Box::new(|_| {}))?;
        self.settle()
    }

    /// The records go to the log (made durable beside the caller, see
    /// [`Appender::append_then`]), then the events to the database. Once the records are
    /// written the commit goes on: events that cannot be stored then are kept, in order, and
    /// stored before the next commit's; with `MAX_KEPT_EVENTS` kept, a commit whose events
    /// would pass it fails, no record written, while they cannot be stored. A commit of events alone
    /// fails when they cannot be stored (the writer keeps them). Counters are not looked up:
    /// each comes from a block reserved durably beforehand, so none is handed out twice.
    fn append_then(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
        durable: Durable,
    ) -> Result<(), StoreError> {
        // More events than it keeps: those kept are stored first, or no record is written.
        if !self.kept_events.is_empty() && self.kept_events.len() + events.len() > MAX_KEPT_EVENTS {
            if let Err(e) = self.store_events(instance_id, &[], &[]) {
                let e = StoreError(format!(
                    "{} events kept from earlier commits cannot be stored ({e}): no record is \
                     written until they are",
                    self.kept_events.len()
                ));
                durable(Err(&e));
                return Err(e);
            }
        }
        let appender = match self.appender_for(instance_id, records) {
            Ok(appender) => appender,
            Err(e) => {
                durable(Err(&e));
                return Err(e);
            }
        };
        if records.is_empty() {
            // Events alone (the writer's probe): told once they are stored, or not.
            let stored = appender
                .append_then(records, Box::new(|_| {}))
                .map_err(StoreError::from)
                .and_then(|()| self.store_events(instance_id, records, events));
            durable(stored.as_ref().map(|_| ()));
            return stored;
        }
        appender.append_then(records, durable)?;
        self.store_events(instance_id, records, events)
    }

    /// The recovery's events go to the database: the token log's segment is written and
    /// synced too (a disk that reported one writeback error may keep failing: the error is
    /// reported once, so the cut of the failed commit may have synced without fault).
    fn probe(&mut self, instance_id: u32) -> Result<(), StoreError> {
        Ok(self.appender(instance_id)?.probe()?)
    }

    fn settle(&mut self) -> Result<(), StoreError> {
        match self.appender.as_mut() {
            Some((_, appender)) => Ok(appender.settle()?),
            None => Ok(()),
        }
    }

    fn after_append(&mut self) {
        if let Some((_, appender)) = self.appender.as_mut() {
            appender.make_room();
        }
    }

    /// The events kept from commits whose events could not be stored go first: the
    /// checkpoint signs the writer's last event, which must be there.
    fn add_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.store_events(checkpoint.instance_id, &[], &[])?;
        self.db.add_checkpoint(checkpoint)
    }

    fn checkpoints(&mut self, instance_id: u32) -> Result<Vec<Checkpoint>, StoreError> {
        self.db.checkpoints(instance_id)
    }

    fn record_by_serial(&mut self, serial: &[u8]) -> Result<Option<StoredRecord>, StoreError> {
        let Some((instance_id, counter)) = layout::decode(serial) else {
            return Ok(None);
        };
        let anchor = self.anchor_of(instance_id)?;
        Ok(self
            .log
            .by_counter(instance_id, counter)?
            .filter(|r| r.record.serial == serial && r.seq > anchor))
    }

    /// Each closed segment's imprint file (a binary search), and the index entries of the open
    /// one (and of any segment without its file). Both hold only the imprint's first 8 octets,
    /// so each candidate above the anchor is read to compare the whole imprint. A position
    /// counts in the segment whose range holds it (below the next segment's first position),
    /// so no record counts twice.
    ///
    /// An imprint may match millions of times, so a candidate costs little: each segment's
    /// files are opened once, its candidates read in position order (file order) into one
    /// buffer, and a frame counts when its hash checks (as a frame any reader reads) and its
    /// fields, read in place, are of that position and have the imprint. The newest `limit`
    /// keep their frames (the buffer goes into [`Newest`], which hands back the one it
    /// displaces), and only those become records at the end: the frames are kept rather than
    /// read again by offset, since a segment may go (pruning) before the end.
    fn records_by_imprint_of(
        &mut self,
        alg: Option<&str>,
        imprint: &[u8],
        limit: usize,
    ) -> Result<ImprintMatches, StoreError> {
        let anchors = self.db.anchor_positions()?;
        let mut newest = Newest::new(limit);
        let mut offer = |frame: &mut Vec<u8>, seq: u64| {
            let rank = match frame_fields(frame) {
                Some((r, _))
                    if r.seq == seq
                        && r.imprint == imprint
                        && alg.is_none_or(|alg| alg == r.imprint_alg) =>
                {
                    Rank::new(r.gen_time_ns, r.instance_id, r.seq)
                }
                _ => return,
            };
            if let Some(spare) = newest.offer(rank, std::mem::take(frame)) {
                *frame = spare;
            }
        };
        let mut frame = Vec::new();
        let key = segments::imprint_key(imprint);
        for instance_id in self.instances()? {
            let anchor = anchors.get(&instance_id).copied().unwrap_or(0);
            let all = self.log.segments(instance_id)?;
            for (i, segment) in all.iter().enumerate() {
                let end = all.get(i + 1).map_or(u64::MAX, |next| next.first_seq);
                let counts = |seq: u64| seq > anchor && seq < end;
                let mut read = || -> io::Result<()> {
                    if let Some(positions) = segments::positions_by_imprint(segment, imprint)? {
                        let positions: Vec<u64> =
                            positions.into_iter().filter(|&s| counts(s)).collect();
                        // Most look-ups find no candidate in most segments: their files stay
                        // shut.
                        if positions.is_empty() {
                            return Ok(());
                        }
                        let mut reader = PositionReader::open(segment)?;
                        for seq in positions {
                            if reader.read(seq, &mut frame)?.is_some() {
                                offer(&mut frame, seq);
                            }
                        }
                        return Ok(());
                    }
                    // The open segment: its index entries carry the key.
                    let file = File::open(&segment.path)?;
                    for e in scan(segment)?.entries {
                        if e.imprint_key == key
                            && counts(e.seq)
                            && read_frame_into(&file, e.offset, &mut frame)?
                        {
                            offer(&mut frame, e.seq);
                        }
                    }
                    Ok(())
                };
                match read() {
                    // Pruned since it was listed (retention, beside the look-up): its
                    // records are gone, the others are still found.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
        }
        let (frames, total) = newest.finish();
        let records = frames
            .iter()
            .map(|frame| {
                let (fields, hash) = frame_fields(frame).expect("a kept frame was read whole");
                fields.to_record(hash)
            })
            .collect();
        Ok(ImprintMatches { records, total })
    }

    fn for_each_record(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let from_seq = from_seq.max(self.anchor_of(instance_id)? + 1);
        self.log.for_each_from(instance_id, from_seq, visit)
    }

    fn for_each_in_time(
        &mut self,
        from_ns: u64,
        to_ns: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let anchors = self.db.anchor_positions()?;
        self.log.in_time(from_ns, to_ns, &anchors, visit)
    }

    fn events(&mut self, from_ns: u64, to_ns: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.db.events(from_ns, to_ns)
    }

    fn events_from(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.db.events_from(instance_id, from_seq, limit)
    }

    fn signed_anchor(
        &mut self,
        instance_id: u32,
    ) -> Result<Option<(Anchor, Option<AnchorSignature>)>, StoreError> {
        self.db.signed_anchor(instance_id)
    }

    /// Removes whole segments, oldest first, while every record of one is older than
    /// `before_ns`; the segment being written stays, and a damaged one stops the pruning with
    /// an error before anything is removed, events included (its anchor would break the
    /// chain). The anchor is stored (synced) before the
    /// files go, so a crash between the two leaves segments that readers pass over and the
    /// next pruning removes, once their frames show them to be such ([`not_left_by_a_prune`]).
    /// At most `PRUNE_STEP` segments a call (the writer prunes between commits: a first
    /// retention pass over years of segments must not hold them for minutes); the anchor only
    /// rises, one process at a time ([`crate::archive::state::Lock::for_pruning`]).
    fn prune_signed(
        &mut self,
        instance_id: u32,
        before_ns: u64,
        sign: &SignAnchor<'_>,
    ) -> Result<Option<Anchor>, StoreError> {
        let _pruning = crate::archive::state::Lock::for_pruning(self.db.path(), instance_id)
            .map_err(|e| StoreError(format!("{e:#}")))?;
        let all = self.log.segments(instance_id)?;
        let previous = self.db.instance(instance_id)?.anchor;
        // Never past the last signed checkpoint (none: no segment goes), so that a signed
        // head reaches the anchor through the chain.
        let signed =
            super::sqlite::last_checkpoint_seq(self.db.connection(), instance_id)?.unwrap_or(0);
        let mut last = None;
        let (mut max_counter, mut max_gen) =
            previous.map_or((0, 0), |a| (a.max_counter, a.max_gen_time_ns));
        let anchored = previous.map_or(0, |a| a.seq);
        // Every record at or below the anchor by the segments' names: left by a prune that
        // stopped after storing it (a crash, a file that could not be removed). Removed now,
        // outside the step, where their frames show them to be such; else this pass removes
        // nothing.
        let closed = all.len().saturating_sub(1);
        let below = (0..closed)
            .take_while(|&i| below_anchor(&all, i, anchored))
            .count();
        if below > 0 {
            let refused = match &previous {
                Some(anchor) => not_left_by_a_prune(&all[..below], anchor, before_ns, signed)?,
                None => Some("no anchor stands for them".to_string()),
            };
            if let Some(why) = refused {
                // Every pass, said (the server's retention logs it; the command fails), until
                // the operator has looked: a cut that keeps them says so too.
                return Err(StoreError(format!(
                    "instance {instance_id}: pruning stops at segments that lie below the \
                     chain's anchor ({anchored}) by their names but are not what a prune to it \
                     leaves: {why}; nothing is removed until they are looked at (tsa archive \
                     verify; a backup's copy)"
                )));
            }
        }
        let (leftovers, step) = (below, PRUNE_STEP);
        let mut removing = leftovers;
        for (i, segment) in all
            .iter()
            .enumerate()
            .take(closed)
            .skip(leftovers)
            .take(step)
        {
            // Its latest genTime (and the highest counter the anchor keeps) checked against
            // the frames; and the last record's, read from its frame.
            let scanned = segments::scan_checked(segment)?;
            if !prunable(&scanned, before_ns, signed) {
                break;
            }
            // A closed segment ends with its last good frame, which the next segment's first
            // record chains to: else the anchor would not be the hash the chain goes on from.
            let len = std::fs::metadata(&segment.path)?.len();
            let follows = match (&scanned.last, all.get(i + 1)) {
                (Some(last), Some(next)) => {
                    segments::record_of(next, next.first_seq)?.is_none_or(|(_, first)| {
                        last.seq.checked_add(1) == Some(first.seq) && first.prev_hash == last.hash
                    })
                }
                _ => true,
            };
            if scanned.end != len || scanned.entries.len() < scanned.claimed || !follows {
                return Err(StoreError(format!(
                    "the token log {} is damaged at offset {} (not every frame checks, or the \
                     next segment does not chain to its last): it is not pruned; see \
                     `tsa archive verify`",
                    segment.path.display(),
                    scanned.end
                )));
            }
            for e in &scanned.entries {
                max_counter = max_counter.max(e.counter);
                max_gen = max_gen.max(e.gen_time_ns);
            }
            last = scanned.last.or(last);
            removing += 1;
        }
        // Every segment to remove checked: the anchor, then the events before the cut (the
        // database holds no token rows in this layout), then the segments. Events are pruned
        // only where no record kept is as old: those explain the records (a sync lost, a key
        // event) that stay unpruned past their checkpoint. After the anchor, so that no
        // event is pruned that the oldest record kept by the anchor before does not allow
        // (a crash between the two would leave verification a break).
        let oldest_kept = match all.get(removing) {
            Some(kept) => segments::scan_checked(kept)?
                .entries
                .iter()
                .map(|e| e.gen_time_ns)
                .min(),
            None => None,
        };
        let events_before = oldest_kept.map_or(before_ns, |t| t.min(before_ns));
        let Some(last) = last.filter(|l| previous.is_none_or(|p| l.seq > p.seq)) else {
            self.db.prune(instance_id, events_before)?;
            if leftovers > 0 {
                self.remove_segments(instance_id, &all[..leftovers])?;
            }
            return Ok(None);
        };
        let anchor = Anchor {
            instance_id,
            seq: last.seq,
            hash: last.hash,
            max_counter,
            max_gen_time_ns: max_gen,
            pruned_at_ns: crate::clock::system_unix_ns(),
        };
        let signature = sign(&anchor).map_err(StoreError)?;
        self.db.set_anchor(&anchor, signature.as_ref())?;
        self.db.prune(instance_id, events_before)?;
        self.remove_segments(instance_id, &all[..removing])?;
        Ok(Some(anchor))
    }

    /// Every segment after the anchor's, checked against its frames.
    fn derived_damage(&mut self, instance_id: u32) -> Result<Vec<String>, StoreError> {
        let anchor = self.anchor_of(instance_id)?;
        let all = self.log.segments(instance_id)?;
        let mut damage = Vec::new();
        for (i, segment) in all.iter().enumerate() {
            if below_anchor(&all, i, anchor) {
                continue;
            }
            match segments::derived_damage(segment) {
                Ok(found) => damage.extend(found),
                // Pruned since it was listed (retention, beside the verification).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(damage)
    }

    fn torn_copies(&mut self, instance_id: u32) -> Result<Vec<(PathBuf, u64)>, StoreError> {
        let dir = instance_dir(&self.log.root, instance_id);
        let mut copies = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(copies),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            if appender::is_torn_copy(&entry.file_name().to_string_lossy()) {
                copies.push((entry.path(), entry.metadata()?.len()));
            }
        }
        copies.sort();
        Ok(copies)
    }

    fn unread_tail(&mut self, instance_id: u32) -> Result<Option<UnreadTail>, StoreError> {
        match self.log.segments(instance_id)?.last() {
            Some(newest) => Ok(appender::judge_tail(newest)?),
            None => Ok(None),
        }
    }

    fn free_space(&self) -> Option<u64> {
        self.db.free_space()
    }
}

impl Drop for LogStore {
    /// Events still kept are stored, if the database takes them now.
    fn drop(&mut self) {
        let Some(instance_id) = self.kept_events.first().map(|e| e.instance_id) else {
            return;
        };
        if let Err(e) = self.db.append(instance_id, &[], &self.kept_events) {
            tracing::error!(
                error = %e,
                events = self.kept_events.len(),
                "the archive's events kept for the next commit are lost"
            );
        }
    }
}

/// Whether the SQLite archive at `database` keeps its records in the log.
pub fn is_log_archive(database: &Path) -> bool {
    SqliteStore::open_read_only(database)
        .and_then(|db| super::sqlite::layout_of(db.connection()))
        .is_ok_and(|layout| layout == super::sqlite::Layout::Log)
}

/// One line on the log's imprint files, for `tsa archive verify`: how many closed segments
/// have theirs (a look-up reads the frames of the others, and of the open one).
pub fn imprint_status(database: &Path) -> String {
    let log = LogReader::new(database);
    let (mut closed, mut with_file) = (0, 0);
    for instance_id in log.instances().unwrap_or_default() {
        let all = log.segments(instance_id).unwrap_or_default();
        for segment in all.iter().take(all.len().saturating_sub(1)) {
            closed += 1;
            with_file += usize::from(segment.imprints_path().exists());
        }
    }
    format!(
        "imprint files of the token log (derived, written as each segment closes): \
         {with_file} of {closed} closed segments; look-ups read the open segments' index entries"
    )
}

/// Opens the SQLite archive at `database` for maintenance beside a server that may be
/// running (the CLI's prune), in its layout. A log archive is opened without its appender:
/// only the server's writer appends, and only it cuts a torn commit off; pruning removes
/// closed segments only.
pub fn open_for_maintenance(
    database: &Path,
    busy_timeout: Duration,
) -> Result<Box<dyn ArchiveStore>, StoreError> {
    let db = SqliteStore::open(database, busy_timeout)?;
    Ok(match super::sqlite::layout_of(db.connection())? {
        super::sqlite::Layout::Rows => Box::new(db),
        super::sqlite::Layout::Log => Box::new(LogStore::open_read_only(db)),
    })
}
