//! The token log's files: each instance's records in append-only segments of self-checking
//! frames, and beside each segment an index of where its frames start and, once it is closed,
//! its records' imprint keys in order.
//!
//! ```text
//! archive.tokens/<instance_id>/<first_seq, 20 digits>.log   frames, synced at every commit
//! archive.tokens/<instance_id>/<first_seq, 20 digits>.idx   entries, written after the sync
//! archive.tokens/<instance_id>/<first_seq, 20 digits>.imp   imprint keys, when it closes
//! archive.tokens/<instance_id>/next-segment.zeros            the next segment, written ahead
//! ```
//!
//! A frame is a 4-octet big-endian length, the record's canonical chain encoding
//! (`record::canonical`) and the record's 32-octet hash: the hash is recomputed when the frame
//! is read, so a torn or altered frame is told apart without a checksum of its own. An index
//! entry is five big-endian u64: the record's position, its frame's offset, its counter, its
//! genTime and its imprint's first 8 octets. The index is derived data: it is written after
//! the segment's sync and never synced itself (except when its segment is closed), so a reader
//! takes its entries only while they agree with the positions, and reads the frames past them
//! from the segment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::archive::record::{canonical_into, sha256, CanonicalRef, Hash, StoredRecord};

/// A segment takes no new commit once it is this long.
pub const SEGMENT_LIMIT: u64 = 64 << 20;

/// A frame's body is never longer (a token with a long certificate chain is some kilobytes).
pub const MAX_BODY: usize = 16 << 20;

/// Offsets past this are no frame's (the kernel refuses offsets past `i64::MAX`, and a frame
/// there would end past it).
const MAX_OFFSET: u64 = i64::MAX as u64 - (MAX_BODY + FRAME_OVERHEAD) as u64;

/// Octets of a frame around its body: the length and the hash.
pub const FRAME_OVERHEAD: usize = 4 + 32;

/// Octets of an index entry.
pub const ENTRY_LEN: usize = 40;

/// The log beside the SQLite database `database`: `archive.tokens` for `archive.sqlite`.
pub fn dir_for(database: &Path) -> PathBuf {
    database.with_extension("tokens")
}

/// The folder of one instance's segments.
pub fn instance_dir(root: &Path, instance_id: u32) -> PathBuf {
    root.join(instance_id.to_string())
}

/// The instances that have a folder in the log, in order.
pub fn instances(root: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    match fs::read_dir(root) {
        Ok(dir) => {
            for entry in dir {
                if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
                    ids.push(id);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    ids.sort_unstable();
    Ok(ids)
}

/// One segment: its first position and its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
}

impl Segment {
    pub fn new(dir: &Path, first_seq: u64) -> Self {
        Self {
            first_seq,
            path: dir.join(format!("{first_seq:020}.log")),
        }
    }

    pub fn index_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }
}

/// The segments in `dir` (an instance's folder), by first position; none when it is missing.
pub fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut found = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let name = entry?.file_name();
                let first = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse().ok());
                if let Some(first_seq) = first {
                    found.push(Segment::new(dir, first_seq));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    found.sort_unstable_by_key(|s| s.first_seq);
    Ok(found)
}

/// Where a record's frame is, with what look-ups by counter and time need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub offset: u64,
    pub counter: u64,
    pub gen_time_ns: u64,
    /// The record's [`imprint_key`].
    pub imprint_key: u64,
}

impl Entry {
    pub fn of(record: &StoredRecord, offset: u64) -> Self {
        Self {
            seq: record.seq,
            offset,
            counter: record.counter,
            gen_time_ns: record.record.gen_time_ns,
            imprint_key: imprint_key(&record.record.imprint),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.seq,
            self.offset,
            self.counter,
            self.gen_time_ns,
            self.imprint_key,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn decode(b: &[u8]) -> Self {
        let v = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 octets"));
        Self {
            seq: v(0),
            offset: v(1),
            counter: v(2),
            gen_time_ns: v(3),
            imprint_key: v(4),
        }
    }
}

/// Appends `record`'s frame to `out`.
pub fn encode_frame(record: &StoredRecord, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    canonical_into(
        out,
        record.instance_id,
        record.seq,
        record.counter,
        &record.record,
        &record.prev_hash,
    );
    let len = u32::try_from(out.len() - at - 4).expect("a record is far below 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&record.hash);
}

/// Reads the frames of a segment one after the other.
pub struct Frames {
    reader: BufReader<File>,
    offset: u64,
    end: u64,
    body: Vec<u8>,
    /// Whether a frame's hash is checked (else a record is taken as it decodes).
    checked: bool,
}

impl Frames {
    /// The frames of `file` from `offset` on, up to `end` (the length it had when opened).
    pub fn new(file: File, offset: u64) -> io::Result<Self> {
        use std::io::Seek;
        let end = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(256 << 10, file);
        reader.seek(io::SeekFrom::Start(offset))?;
        Ok(Self {
            reader,
            offset,
            end,
            body: Vec::new(),
            checked: true,
        })
    }

    pub fn open(segment: &Segment, offset: u64) -> io::Result<Self> {
        Self::new(File::open(&segment.path)?, offset)
    }

    /// Frames taken as they decode, their hashes not checked: for verification, which
    /// recomputes them and reports a record that was altered. The last frame (followed by
    /// zeros or the end) is checked all the same: beside the writer it may be one being
    /// written, not yet a record.
    pub fn unchecked(self) -> Self {
        Self {
            checked: false,
            ..self
        }
    }

    /// Where the next frame starts (after the last one read).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, borrowed: its offset, its fields and its stored hash; `None` at the
    /// end of the segment or at the first frame that is cut short or does not check (a commit
    /// that never completed).
    pub fn next_ref(&mut self) -> io::Result<Option<(u64, CanonicalRef<'_>, Hash)>> {
        if self.end.saturating_sub(self.offset) < FRAME_OVERHEAD as u64 {
            return Ok(None);
        }
        // The writer may have cut the file since (the room, as a segment closes; a failed
        // commit): its end ends the frames too.
        let mut len = [0u8; 4];
        if !read_or_end(&mut self.reader, &mut len)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(len) as usize;
        let next = self.offset + (len + FRAME_OVERHEAD) as u64;
        if len > MAX_BODY || next > self.end {
            return Ok(None);
        }
        self.body.resize(len + 32, 0);
        if !read_or_end(&mut self.reader, &mut self.body)? {
            return Ok(None);
        }
        let (body, hash) = self.body.split_at(len);
        let hash = Hash::try_from(hash).expect("32 octets");
        if self.checked && sha256(body) != hash {
            return Ok(None);
        }
        // Unchecked, a last frame that shows octets not written yet (zeros at its end, or a
        // sector of zeros) and does not check is one the writer is writing, not a record; an
        // altered one is still taken, for verification to report.
        if !self.checked && (hash[31] == 0 || has_zero_sector(self.offset + 4, &self.body)) {
            let mut after = [0u8; 4];
            let last = match self.reader.get_ref().read_exact_at(&mut after, next) {
                Ok(()) => after == [0; 4],
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
                Err(e) => return Err(e),
            };
            let (body, _) = self.body.split_at(len);
            if last && sha256(body) != hash {
                return Ok(None);
            }
        }
        let (body, _) = self.body.split_at(len);
        let Some(fields) = CanonicalRef::parse(body) else {
            return Ok(None);
        };
        let at = std::mem::replace(&mut self.offset, next);
        Ok(Some((at, fields, hash)))
    }

    /// [`Frames::next_ref`], as an owned record.
    pub fn next_frame(&mut self) -> io::Result<Option<(u64, StoredRecord)>> {
        Ok(self
            .next_ref()?
            .map(|(at, fields, hash)| (at, fields.to_record(hash))))
    }
}

/// Whether `octets`, read from `offset` on, hold a whole 512-octet sector of zeros.
fn has_zero_sector(offset: u64, octets: &[u8]) -> bool {
    let first = (offset.div_ceil(512) * 512 - offset) as usize;
    octets
        .get(first..)
        .is_some_and(|rest| rest.chunks_exact(512).any(|s| s.iter().all(|&b| b == 0)))
}

/// Fills `buf` from `reader`; `false` when the file ends first.
fn read_or_end(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The record whose frame starts at `offset` in `file`, and the frame's length; `None` when no
/// good frame is there.
pub fn read_at(file: &File, offset: u64) -> io::Result<Option<(StoredRecord, u64)>> {
    let mut frame = Vec::new();
    if !read_frame_into(file, offset, &mut frame)? {
        return Ok(None);
    }
    Ok(frame_fields(&frame)
        .map(|(fields, hash)| (fields.to_record(hash), (frame.len() + 4) as u64)))
}

/// Reads the frame that starts at `offset` in `file` into `frame` (its body, then its hash),
/// and checks the hash: `false` when no whole frame is there or it does not check (`frame`
/// then holds whatever was read). `frame` is a buffer the caller keeps, so that reading many
/// frames allocates once.
pub fn read_frame_into(file: &File, offset: u64, frame: &mut Vec<u8>) -> io::Result<bool> {
    // An offset from disk (an index entry) may be anything: no file is that long.
    if offset > MAX_OFFSET {
        return Ok(false);
    }
    let mut len = [0u8; 4];
    if !read_exact_or_end(file, &mut len, offset)? {
        return Ok(false);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_BODY {
        return Ok(false);
    }
    frame.resize(len + 32, 0);
    if !read_exact_or_end(file, frame, offset + 4)? {
        return Ok(false);
    }
    let (body, hash) = frame.split_at(len);
    Ok(sha256(body) == hash)
}

/// The fields and stored hash of a frame [`read_frame_into`] read; `None` when its body is not
/// a canonical encoding.
pub fn frame_fields(frame: &[u8]) -> Option<(CanonicalRef<'_>, Hash)> {
    let (body, hash) = frame.split_at_checked(frame.len().checked_sub(32)?)?;
    Some((CanonicalRef::parse(body)?, Hash::try_from(hash).ok()?))
}

/// Fills `buf` from `file` at `offset`; `false` when the file ends first.
fn read_exact_or_end(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// One more than the frames a segment of `segment_len` octets can hold (each is longer than
/// its overhead): what bounds the entries read from a derived file beside it.
fn most_frames(segment_len: u64) -> u64 {
    segment_len / FRAME_OVERHEAD as u64 + 1
}

/// The entries of the index file beside `segment` while they agree with the positions (the
/// first at `first_seq` and offset 0, each the next, offsets rising), wherever they point;
/// read up to one entry more than a segment of `segment_len` octets can have frames.
fn indexed_entries(segment: &Segment, segment_len: u64) -> io::Result<Vec<Entry>> {
    let file = match File::open(segment.index_path()) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let most = most_frames(segment_len).saturating_mul(ENTRY_LEN as u64);
    let mut octets = Vec::new();
    file.take(most).read_to_end(&mut octets)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(octets.len() / ENTRY_LEN);
    for chunk in octets.chunks_exact(ENTRY_LEN) {
        let entry = Entry::decode(chunk);
        let agrees = match entries.last() {
            None => entry.seq == segment.first_seq && entry.offset == 0,
            Some(last) => last.seq.checked_add(1) == Some(entry.seq) && entry.offset > last.offset,
        };
        if !agrees {
            break;
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// What [`scan`] found in a segment.
pub struct Scanned {
    /// Every good frame's entry, in order.
    pub entries: Vec<Entry>,
    /// How many of them the index file held.
    pub indexed: usize,
    /// How many records the index file lists (more than `entries` when frames it lists do
    /// not check, or lie past the segment's end: damage, not a torn commit, since entries are
    /// written after the sync).
    pub claimed: usize,
    /// The last good frame's record.
    pub last: Option<StoredRecord>,
    /// Where the good frames end.
    pub end: u64,
}

/// The entries of `segment`: its index file's, then those of the frames past them, read and
/// checked (hash, position, chain) up to the first that is cut short or does not check.
pub fn scan(segment: &Segment) -> io::Result<Scanned> {
    scan_with(segment, true)
}

/// [`scan`], where the entries are to decide something lasting (the counter and genTime
/// floors of a start, what pruning removes and the maxima its anchor keeps) or what a look-up
/// leaves out (a serial's segment, a time range's records): the index entries that hold the
/// segment's highest and lowest counter and its earliest and latest genTime are checked
/// against their frames, and where one does not agree (a garbled index: only its positions
/// and offsets are checked otherwise) the index is passed over and the frames read instead.
/// A few frames more are read for a sound index, not the whole segment.
pub fn scan_checked(segment: &Segment) -> io::Result<Scanned> {
    scan_checked_with(segment, true)
}

/// [`scan_checked`] for a look-up, which tells the records it cannot read: an entry whose
/// frame does not check at all leaves the index in use (that record is damaged, and the
/// records after it are still found through the index; frames alone would end at it), one
/// whose frame is another record or holds other values voids it.
pub fn scan_checked_for_look_ups(segment: &Segment) -> io::Result<Scanned> {
    scan_checked_with(segment, false)
}

/// [`scan_checked`]; `damage_voids`: whether an entry whose frame does not check voids the
/// index too.
fn scan_checked_with(segment: &Segment, damage_voids: bool) -> io::Result<Scanned> {
    let scanned = scan(segment)?;
    let indexed = &scanned.entries[..scanned.indexed];
    let extremes = [
        indexed.iter().max_by_key(|e| e.counter),
        indexed.iter().min_by_key(|e| e.counter),
        indexed.iter().max_by_key(|e| e.gen_time_ns),
        indexed.iter().min_by_key(|e| e.gen_time_ns),
    ];
    let file = File::open(&segment.path)?;
    for entry in extremes.into_iter().flatten() {
        let agrees = match read_at(&file, entry.offset)? {
            Some((record, _)) => Entry::of(&record, entry.offset) == *entry,
            None => !damage_voids,
        };
        if !agrees {
            return Ok(Scanned {
                claimed: scanned.claimed,
                ..frames_instead(segment, entry.seq)?
            });
        }
    }
    Ok(scanned)
}

/// [`scan`] of `segment`'s frames alone, its index passed over: an entry of it (position
/// `seq`) was found not to agree with its frame. Logged, with the remedy.
pub fn frames_instead(segment: &Segment, seq: u64) -> io::Result<Scanned> {
    warn_frames_instead(segment, seq);
    frames(segment)
}

/// What [`frames_instead`] logs.
fn warn_frames_instead(segment: &Segment, seq: u64) {
    tracing::warn!(
        index = %segment.index_path().display(),
        seq,
        "an index entry does not agree with its frame: the segment's frames are read \
         instead (remove the index to have it written again)"
    );
}

/// [`scan`] of `segment`'s frames alone, its index passed over.
fn frames(segment: &Segment) -> io::Result<Scanned> {
    scan_with(segment, false)
}

/// [`scan`], with the index file or without it (the frames alone).
fn scan_with(segment: &Segment, use_index: bool) -> io::Result<Scanned> {
    let file = File::open(&segment.path)?;
    let len = file.metadata()?.len();
    let mut entries = if use_index {
        indexed_entries(segment, len)?
    } else {
        Vec::new()
    };
    let claimed = entries.len();
    entries.truncate(entries.partition_point(|e| e.offset < len));
    let indexed = entries.len();
    // The last indexed frame is read again: its length says where the next one starts, its
    // hash what the next one chains to (and a frame that does not check voids the index).
    let (start, mut last) = match entries.last() {
        Some(entry) => match read_at(&file, entry.offset)? {
            Some((record, len)) if record.seq == entry.seq => (entry.offset + len, Some(record)),
            _ => {
                entries.clear();
                (0, None)
            }
        },
        None => (0, None),
    };
    let indexed = indexed.min(entries.len());
    let mut frames = Frames::new(file, start)?;
    while let Some((offset, record)) = frames.next_frame()? {
        let expected = entries
            .last()
            .map_or(Some(segment.first_seq), |e| e.seq.checked_add(1));
        let chained = last.as_ref().is_none_or(|l| record.prev_hash == l.hash);
        if Some(record.seq) != expected || !chained {
            break;
        }
        entries.push(Entry::of(&record, offset));
        last = Some(record);
    }
    Ok(Scanned {
        entries,
        indexed,
        claimed,
        last,
        end: frames.offset(),
    })
}

/// Opens a segment's index for appending entries.
pub fn open_index(segment: &Segment) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(segment.index_path())
}

/// The index file beside `segment`, opened; `None` when it has none.
fn open_index_for_reading(segment: &Segment) -> io::Result<Option<File>> {
    match File::open(segment.index_path()) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The index entry for position `i` of `segment`, when its index has one.
fn indexed_entry(segment: &Segment, i: u64) -> io::Result<Option<Entry>> {
    match open_index_for_reading(segment)? {
        Some(index) => entry_in(&index, i),
        None => Ok(None),
    }
}

/// The entry for position `i` in the index file `index`, when it has one.
fn entry_in(index: &File, i: u64) -> io::Result<Option<Entry>> {
    let Some(at) = i
        .checked_mul(ENTRY_LEN as u64)
        .filter(|&at| at <= MAX_OFFSET)
    else {
        return Ok(None);
    };
    let mut octets = [0u8; ENTRY_LEN];
    Ok(read_exact_or_end(index, &mut octets, at)?.then(|| Entry::decode(&octets)))
}

/// The record of `segment`'s first frame, taken as it decodes (as verification takes frames:
/// its hash is not checked, so that an altered one is still told where it stands).
pub fn first_record(segment: &Segment) -> io::Result<Option<StoredRecord>> {
    Ok(Frames::open(segment, 0)?
        .unchecked()
        .next_frame()?
        .map(|(_, r)| r))
}

/// The counter of `segment`'s first record, from its first frame: not from its index's first
/// entry, whose counter nothing checks (a garbled one sends a look-up by serial to other
/// segments than the record's).
pub fn first_counter(segment: &Segment) -> io::Result<Option<u64>> {
    let file = match File::open(&segment.path) {
        Ok(file) => file,
        // Pruned since it was listed.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(read_at(&file, 0)?.map(|(r, _)| r.counter))
}

/// Where the frame of position `seq` starts in `segment`: from its index entry when that
/// entry and the frame it points at agree, else from a [`scan`].
pub fn offset_of(segment: &Segment, seq: u64) -> io::Result<Option<u64>> {
    Ok(record_of(segment, seq)?.map(|(offset, _)| offset))
}

/// The record at position `seq` of `segment` and its frame's offset, found as
/// [`offset_of`] finds it (its frame read once).
pub fn record_of(segment: &Segment, seq: u64) -> io::Result<Option<(u64, StoredRecord)>> {
    let mut frame = Vec::new();
    let Some(offset) = PositionReader::open(segment)?.read(seq, &mut frame)? else {
        return Ok(None);
    };
    Ok(frame_fields(&frame).map(|(fields, hash)| (offset, fields.to_record(hash))))
}

/// Reads a segment's frames by position, its files opened once: for a reader that takes
/// many of them (the matches of a frequent imprint), which asks for them in position order so
/// that they are read in file order.
pub struct PositionReader<'a> {
    segment: &'a Segment,
    file: File,
    /// The segment's index file; `None` when it has none.
    index: Option<File>,
    /// The segment's entries by [`scan`], taken once a position is not where its index entry
    /// says (a damaged index or frame): a scan is read once per segment, not per position.
    scanned: Option<Vec<Entry>>,
}

impl<'a> PositionReader<'a> {
    /// Opens `segment`'s file and its index file (when it has one).
    pub fn open(segment: &'a Segment) -> io::Result<Self> {
        Ok(Self {
            segment,
            file: File::open(&segment.path)?,
            index: open_index_for_reading(segment)?,
            scanned: None,
        })
    }

    /// Reads the frame of position `seq` into `frame` (as [`read_frame_into`]) and gives its
    /// offset: from the position's index entry when that entry and the frame it points at
    /// agree, else from a [`scan`]. `None` when no good frame of that position is there: a
    /// frame that does not check is no record.
    pub fn read(&mut self, seq: u64, frame: &mut Vec<u8>) -> io::Result<Option<u64>> {
        let Some(i) = seq.checked_sub(self.segment.first_seq) else {
            return Ok(None);
        };
        let indexed = match &self.index {
            Some(index) => entry_in(index, i)?.filter(|e| e.seq == seq),
            None => None,
        };
        if let Some(entry) = indexed {
            if self.frame_of(seq, entry.offset, frame)? {
                return Ok(Some(entry.offset));
            }
        }
        let entries = match &mut self.scanned {
            Some(entries) => entries,
            none => none.insert(scan(self.segment)?.entries),
        };
        let scanned = entries
            .binary_search_by_key(&seq, |e| e.seq)
            .ok()
            .map(|at| entries[at].offset);
        match scanned {
            Some(offset) if self.frame_of(seq, offset, frame)? => Ok(Some(offset)),
            _ => Ok(None),
        }
    }

    /// Whether the frame at `offset` checks and is the record of position `seq`.
    fn frame_of(&self, seq: u64, offset: u64, frame: &mut Vec<u8>) -> io::Result<bool> {
        Ok(read_frame_into(&self.file, offset, frame)?
            && frame_fields(frame).is_some_and(|(fields, _)| fields.seq == seq))
    }
}

/// The last good record of `segment`: from its index's last entry and the frames past it,
/// else from a [`scan`].
pub fn last_record(segment: &Segment) -> io::Result<Option<StoredRecord>> {
    let indexed = match fs::metadata(segment.index_path()) {
        Ok(m) => m.len() / ENTRY_LEN as u64,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if let Some(entry) = match indexed.checked_sub(1) {
        Some(i) => {
            indexed_entry(segment, i)?.filter(|e| segment.first_seq.checked_add(i) == Some(e.seq))
        }
        None => None,
    } {
        let file = File::open(&segment.path)?;
        if let Some((mut last, len)) =
            read_at(&file, entry.offset)?.filter(|(r, _)| r.seq == entry.seq)
        {
            let mut frames = Frames::new(file, entry.offset + len)?;
            while let Some((_, next)) = frames.next_frame()? {
                if last.seq.checked_add(1) != Some(next.seq) || next.prev_hash != last.hash {
                    break;
                }
                last = next;
            }
            return Ok(Some(last));
        }
    }
    Ok(scan(segment)?.last)
}

/// Octets of an imprint entry: the imprint's first 8 octets and the record's position, both
/// big-endian.
const IMPRINT_ENTRY_LEN: u64 = 16;

/// The key an imprint is sorted by: its first 8 octets (fewer, zero-padded, for a shorter one).
pub fn imprint_key(imprint: &[u8]) -> u64 {
    let mut key = [0u8; 8];
    let n = imprint.len().min(8);
    key[..n].copy_from_slice(&imprint[..n]);
    u64::from_be_bytes(key)
}

impl Segment {
    /// The segment's imprint file: its records' [`imprint_key`]s and positions, sorted, written
    /// when the segment closes.
    pub fn imprints_path(&self) -> PathBuf {
        self.path.with_extension("imp")
    }
}

/// The imprint entries (key, position) of `entries`.
pub fn imprint_entries(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.imprint_key, e.seq)).collect()
}

/// Writes a closed segment's imprint file, sorted, atomically and durably (a file that is
/// there is whole: look-ups trust it).
pub fn write_imprints(segment: &Segment, entries: Vec<(u64, u64)>) -> io::Result<()> {
    let octets = encode_imprints(entries);
    crate::files::replace(&segment.imprints_path(), &octets, crate::files::PUBLIC)
}

/// An imprint file's content: `entries` sorted, each key and position as 8 octets big-endian.
fn encode_imprints(mut entries: Vec<(u64, u64)>) -> Vec<u8> {
    entries.sort_unstable();
    let mut octets = Vec::with_capacity(entries.len() * IMPRINT_ENTRY_LEN as usize);
    for (key, seq) in entries {
        octets.extend_from_slice(&key.to_be_bytes());
        octets.extend_from_slice(&seq.to_be_bytes());
    }
    octets
}

/// The positions in `segment` whose imprint has `imprint`'s key, by a binary search of its
/// imprint file; `None` when it has none (the open segment), so the caller reads its frames.
pub fn positions_by_imprint(segment: &Segment, imprint: &[u8]) -> io::Result<Option<Vec<u64>>> {
    let file = match File::open(segment.imprints_path()) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len % IMPRINT_ENTRY_LEN != 0 {
        return Ok(None);
    }
    let entry = |i: u64| -> io::Result<(u64, u64)> {
        let mut octets = [0u8; IMPRINT_ENTRY_LEN as usize];
        file.read_exact_at(&mut octets, i * IMPRINT_ENTRY_LEN)?;
        let (key, seq) = octets.split_at(8);
        Ok((
            u64::from_be_bytes(key.try_into().expect("8 octets")),
            u64::from_be_bytes(seq.try_into().expect("8 octets")),
        ))
    };
    let key = imprint_key(imprint);
    let (mut low, mut high) = (0, len / IMPRINT_ENTRY_LEN);
    while low < high {
        let middle = low + (high - low) / 2;
        if entry(middle)?.0 < key {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    let mut positions = Vec::new();
    for i in low..len / IMPRINT_ENTRY_LEN {
        match entry(i)? {
            (k, seq) if k == key => positions.push(seq),
            _ => break,
        }
    }
    Ok(Some(positions))
}

/// What is wrong with `segment`'s derived files against its frames, which look-ups trust
/// without reading the frames: index entries that do not match the frames they name (a
/// position, offset, counter, genTime or imprint key: a record look-ups would miss), more
/// entries than frames, and an imprint file that is not the sorted keys and positions of the
/// frames. One line each, naming the file; removing it is the remedy (readers then read the
/// frames, and the next start or roll writes it again).
pub fn derived_damage(segment: &Segment) -> io::Result<Vec<String>> {
    let remedy = "remove the file: readers then read the frames, and the next start (or the \
                  segment's closing) writes it again";
    let mut damage = Vec::new();
    // Each file is read up to what the segment's frames can justify (a garbled or sparse file
    // of any length costs no more memory than a sound one), and one longer is damage itself.
    let file = File::open(&segment.path)?;
    let mut read = |path: PathBuf, entry_len: u64| -> io::Result<Option<Vec<u8>>> {
        let limit = |file: &File| -> io::Result<u64> {
            Ok(most_frames(file.metadata()?.len()).saturating_mul(entry_len))
        };
        let mut limit_now = limit(&file)?;
        let mut derived = read_derived(&path, limit_now)?;
        // The newest segment grows beside a writer: its frames (and so the room for entries)
        // as they are once the file was read.
        if matches!(derived, Derived::TooLong) && limit(&file)? > limit_now {
            limit_now = limit(&file)?;
            derived = read_derived(&path, limit_now)?;
        }
        let limit = limit_now;
        Ok(match derived {
            Derived::Missing => None,
            Derived::Octets(octets) => Some(octets),
            Derived::TooLong => {
                damage.push(format!(
                    "{}: longer than the segment's frames can have entries for (over {limit} \
                     octets); {remedy}",
                    path.display()
                ));
                None
            }
        })
    };
    // The index first: entries are written after their frames are synced, so beside a writer
    // every entry read here names a frame read below.
    let octets = read(segment.index_path(), ENTRY_LEN as u64)?.unwrap_or_default();
    let index: Vec<Entry> = octets.chunks_exact(ENTRY_LEN).map(Entry::decode).collect();
    let imprints = read(segment.imprints_path(), IMPRINT_ENTRY_LEN)?;
    let mut frames = Frames::new(file, 0)?.unchecked();
    let mut expected = Vec::new();
    while let Some((offset, fields, _)) = frames.next_ref()? {
        expected.push(Entry {
            seq: fields.seq,
            offset,
            counter: fields.counter,
            gen_time_ns: fields.gen_time_ns,
            imprint_key: imprint_key(fields.imprint),
        });
    }
    if let Some(i) = (0..index.len().min(expected.len())).find(|&i| index[i] != expected[i]) {
        damage.push(format!(
            "{}: entry {i} (position {}) does not match its frame; {remedy}",
            segment.index_path().display(),
            expected[i].seq
        ));
    } else if index.len() > expected.len() {
        damage.push(format!(
            "{}: {} entries for {} frames; {remedy}",
            segment.index_path().display(),
            index.len(),
            expected.len()
        ));
    }
    if let Some(octets) = imprints {
        if octets != encode_imprints(imprint_entries(&expected)) {
            damage.push(format!(
                "{}: not the sorted imprint keys and positions of the segment's frames; {remedy}",
                segment.imprints_path().display()
            ));
        }
    }
    Ok(damage)
}

/// A derived file beside a segment, read up to a limit.
enum Derived {
    Missing,
    /// Longer than the limit (by its length, or grown past it as it was read): not read.
    TooLong,
    Octets(Vec<u8>),
}

/// The file at `path`, read up to `limit` octets.
fn read_derived(path: &Path, limit: u64) -> io::Result<Derived> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Derived::Missing),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() > limit {
        return Ok(Derived::TooLong);
    }
    let mut octets = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut octets)?;
    Ok(if octets.len() as u64 > limit {
        Derived::TooLong
    } else {
        Derived::Octets(octets)
    })
}

/// The genTimes of `segment`'s first and last records, read from their frames, when its index
/// covers the whole segment (no good frame follows its last entry's, which says where the
/// last frame is); `None` otherwise. The index's own genTimes are not taken: a garbled one
/// would have a read by time pass the segment over, its records left out in silence. An entry
/// that does not agree with its frame is logged.
pub fn time_bounds(segment: &Segment) -> io::Result<Option<(u64, u64)>> {
    let indexed = match fs::metadata(segment.index_path()) {
        Ok(m) => m.len() / ENTRY_LEN as u64,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(last_i) = indexed.checked_sub(1) else {
        return Ok(None);
    };
    let Some(last) = indexed_entry(segment, last_i)?
        .filter(|e| segment.first_seq.checked_add(last_i) == Some(e.seq))
    else {
        return Ok(None);
    };
    let file = File::open(&segment.path)?;
    let first_frame = read_at(&file, 0)?.filter(|(r, _)| r.seq == segment.first_seq);
    let last_frame = read_at(&file, last.offset)?.filter(|(r, _)| r.seq == last.seq);
    let (Some((first_record, _)), Some((last_record, frame))) = (first_frame, last_frame) else {
        return Ok(None);
    };
    if read_at(&file, last.offset + frame)?.is_some() {
        return Ok(None);
    }
    let first = indexed_entry(segment, 0)?;
    if first != Some(Entry::of(&first_record, 0)) || last != Entry::of(&last_record, last.offset) {
        tracing::warn!(
            index = %segment.index_path().display(),
            "the index's first or last entry does not agree with its frame: the frames' \
             genTimes are taken (remove the index to have it written again)"
        );
    }
    Ok(Some((
        first_record.record.gen_time_ns,
        last_record.record.gen_time_ns,
    )))
}
