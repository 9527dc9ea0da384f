use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::appender::Appender;
use super::segments::{self, dir_for, instance_dir, Segment};
use super::*;
use crate::archive::record::tests_support::{event, sample};
use crate::archive::record::{Anchor, ChainHead, EventRecord, TokenRecord, ZERO_HASH};
use crate::archive::sqlite::{Layout, SqliteStore};

/// Small segments, so that a few records span several.
const LIMIT: u64 = 2 << 10;

struct Log {
    _dir: tempfile::TempDir,
    database: PathBuf,
    head: ChainHead,
    records: Vec<StoredRecord>,
    /// genTime between one record and the next.
    gen_step_ns: u64,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("archive.sqlite");
        Self {
            _dir: dir,
            database,
            head: ChainHead::EMPTY,
            records: Vec::new(),
            gen_step_ns: 1_000,
        }
    }

    fn dir(&self) -> PathBuf {
        instance_dir(&dir_for(&self.database), 0)
    }

    /// `n` new records after the head, counters 10 × position (genTimes rising the same way).
    fn chain(&mut self, n: usize) -> Vec<StoredRecord> {
        self.chain_with(n, |_, _| {})
    }

    /// [`Log::chain`], each record changed by `adjust(position, record)` before it is chained.
    fn chain_with(
        &mut self,
        n: usize,
        mut adjust: impl FnMut(u64, &mut TokenRecord),
    ) -> Vec<StoredRecord> {
        (0..n)
            .map(|_| {
                let seq = self.head.seq + 1;
                let mut r = sample(700);
                r.serial = layout::encode(0, 10 * seq, [7; 7]).to_vec();
                r.gen_time_ns += seq * self.gen_step_ns;
                r.imprint = vec![seq as u8; 32];
                r.token[0] = seq as u8;
                adjust(seq, &mut r);
                let stored = StoredRecord::chain(0, seq, 10 * seq, r, self.head.hash);
                self.head = ChainHead {
                    seq,
                    hash: stored.hash,
                };
                self.records.push(stored.clone());
                stored
            })
            .collect()
    }

    /// A checkpoint at the head (pruning stops at the last one).
    fn checkpoint(&self) -> crate::archive::record::Checkpoint {
        crate::archive::record::Checkpoint {
            instance_id: 0,
            seq: self.head.seq,
            head_hash: self.head.hash,
            time_ns: 1,
            algorithm: vec![],
            signature: vec![1],
            certificate: vec![],
            events: None,
            anchor_seq: 0,
        }
    }

    /// The writer's store over the log, segments of [`LIMIT`].
    fn store(&self) -> LogStore {
        let db = SqliteStore::open(&self.database, Duration::from_secs(1)).unwrap();
        LogStore::open(db).with_segment_limit(LIMIT)
    }

    /// [`Log::store`] of a new archive, its layout settled as the log.
    fn new_store(&self) -> LogStore {
        let mut db = SqliteStore::open(&self.database, Duration::from_secs(1)).unwrap();
        assert_eq!(db.settle_layout(Layout::Log).unwrap(), Layout::Log);
        LogStore::open(db).with_segment_limit(LIMIT)
    }

    /// Every record of instance 0 from position `from` on, read back.
    fn reader_records(&self, from: u64) -> Vec<StoredRecord> {
        let mut reader =
            LogStore::open_read_only(SqliteStore::open_read_only(&self.database).unwrap());
        let mut all = Vec::new();
        reader
            .for_each_record(0, from, &mut |r| {
                all.push(r);
                Ok(true)
            })
            .unwrap();
        all
    }

    fn reader(&self) -> LogReader {
        LogReader::new(&self.database)
    }

    fn all(&self) -> Vec<StoredRecord> {
        let mut all = Vec::new();
        self.reader()
            .for_each_from(0, 1, &mut |r| {
                all.push(r);
                Ok(true)
            })
            .unwrap();
        all
    }
}

fn open(dir: &Path) -> (Appender, Option<StoredRecord>) {
    Appender::open(dir, LIMIT).unwrap()
}

/// Where the good frames of `segment` end (the room written ahead follows).
fn frames_end(segment: &Segment) -> u64 {
    segments::scan(segment).unwrap().end
}

/// Every one of `records` is found by its imprint, alone (the imprints are distinct).
fn each_found_by_its_imprint(store: &mut LogStore, records: &[StoredRecord]) {
    for r in records {
        let found = store.records_by_imprint(&r.record.imprint, 10).unwrap();
        assert_eq!(
            found.records.as_slice(),
            std::slice::from_ref(r),
            "record {}",
            r.seq
        );
        assert_eq!(found.total, 1, "record {}", r.seq);
    }
}

fn segment_files(dir: &Path) -> Vec<Segment> {
    segments::segments(dir).unwrap()
}

#[test]
fn records_read_back_by_position_counter_and_time_across_segments() {
    let mut log = Log::new();
    let (mut appender, last) = open(&log.dir());
    assert!(last.is_none(), "a new log is empty");
    for n in [3, 1, 4, 2, 5] {
        let commit = log.chain(n);
        appender.append(&commit).unwrap();
    }
    assert!(segment_files(&log.dir()).len() > 2, "the segments rolled");
    assert_eq!(log.all(), log.records);

    let reader = log.reader();
    assert_eq!(reader.head(0).unwrap().as_ref(), log.records.last());
    assert_eq!(reader.instances().unwrap(), [0]);
    for r in &log.records {
        assert_eq!(reader.record_at(0, r.seq).unwrap().as_ref(), Some(r));
        assert_eq!(reader.by_counter(0, r.counter).unwrap().as_ref(), Some(r));
    }
    assert_eq!(reader.by_counter(0, 11).unwrap(), None, "no such counter");
    assert_eq!(reader.record_at(0, 16).unwrap(), None, "past the head");
    assert_eq!(reader.record_at(1, 1).unwrap(), None, "another instance");

    let from_7: Vec<u64> = {
        let mut seqs = Vec::new();
        reader
            .for_each_from(0, 7, &mut |r| {
                seqs.push(r.seq);
                Ok(true)
            })
            .unwrap();
        seqs
    };
    assert_eq!(from_7, (7..=15).collect::<Vec<_>>());

    let (max_counter, max_gen) = reader.maxima(0).unwrap();
    assert_eq!(max_counter, Some(150));
    assert_eq!(max_gen, Some(log.records[14].record.gen_time_ns));

    let (from, to) = (
        log.records[4].record.gen_time_ns,
        log.records[9].record.gen_time_ns,
    );
    let mut in_time = Vec::new();
    reader
        .in_time(from, to, &HashMap::new(), &mut |r| {
            in_time.push(r.seq);
            Ok(true)
        })
        .unwrap();
    assert_eq!(
        in_time,
        [5, 6, 7, 8, 9],
        "genTime from inclusive, to exclusive"
    );
}

#[test]
fn a_torn_commit_is_cut_off_and_the_chain_goes_on() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(2)).unwrap();
    appender.make_room();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let good_len = frames_end(&segment);
    assert!(
        fs::metadata(&segment.path).unwrap().len() > good_len,
        "room written ahead"
    );
    // A power cut inside the next commit: part of its frame reached the disk (the rest of
    // the room stays zeros).
    let torn = log.chain(1);
    let mut frame = Vec::new();
    segments::encode_frame(&torn[0], &mut frame);
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    file.write_all_at(&frame[..frame.len() / 2], good_len)
        .unwrap();
    drop(appender);
    log.records.pop();
    log.head = ChainHead {
        seq: 2,
        hash: log.records[1].hash,
    };

    let (appender, last) = open(&log.dir());
    assert_eq!(
        last.as_ref(),
        log.records.last(),
        "the head before the torn commit"
    );
    assert_eq!(
        fs::metadata(&segment.path).unwrap().len(),
        good_len,
        "cut off, with the room"
    );
    // What was cut is kept beside the segment, without the room's zeros after it.
    let kept = segment.path.with_file_name(format!(
        "{}.torn-{good_len}",
        segment.path.file_name().unwrap().to_str().unwrap()
    ));
    let torn_octets = &frame[..frame.len() / 2];
    let kept_octets = fs::read(&kept).unwrap();
    let last_nonzero = torn_octets.iter().rposition(|&b| b != 0).unwrap();
    assert_eq!(kept_octets, torn_octets[..=last_nonzero]);
    // Torn again at the same place (a crash loop): the earlier copy stays, the new one goes
    // beside it.
    drop(appender);
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    file.write_all_at(&frame[..frame.len() / 3], good_len)
        .unwrap();
    let (mut appender, _) = open(&log.dir());
    assert_eq!(
        fs::read(&kept).unwrap(),
        kept_octets,
        "the first copy as it was"
    );
    let second = kept.with_file_name(format!("{}.1", kept.file_name().unwrap().to_str().unwrap()));
    let third = &frame[..frame.len() / 3];
    let last_nonzero = third.iter().rposition(|&b| b != 0).unwrap();
    assert_eq!(fs::read(second).unwrap(), third[..=last_nonzero]);
    appender.append(&log.chain(3)).unwrap();
    assert_eq!(log.all(), log.records, "the chain goes on from the head");
}

/// A commit's frames go to disk in parts of whole frames of at most `max` octets (a frame
/// larger alone), in order, where they belong.
#[test]
fn a_large_commit_is_written_in_parts_of_whole_frames() {
    let dir = tempfile::tempdir().unwrap();
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(dir.path().join("segment"))
        .unwrap();
    let sizes = [10usize, 10, 25, 5, 40, 3];
    let frames: Vec<u8> = sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as u8 + 1, n))
        .collect();
    let ends: Vec<usize> = sizes
        .iter()
        .scan(0, |end, n| {
            *end += n;
            Some(*end)
        })
        .collect();
    let starts = super::appender::write_in_parts(&file, 7, &frames, &ends, 30).unwrap();
    assert_eq!(starts, [0, 20, 50, 90]);
    let mut back = vec![0; 7 + frames.len()];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[7..], frames.as_slice());
    // Within the bound: one write.
    let starts = super::appender::write_in_parts(&file, 0, &frames, &ends, 93).unwrap();
    assert_eq!(starts, [0]);
}

/// A commit larger than a start takes as one torn commit (32 MiB; 2,048 tokens of 20 KB with
/// their certificates are 40 MiB) is written in synced parts: a power cut inside its last part
/// leaves the parts before it, and the start cuts the torn part off (the whole commit after
/// the last good frame was "more than a commit that did not complete", a server that did
/// not start again).
#[test]
fn a_commit_past_the_torn_limit_tears_only_in_its_last_part() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(1)).unwrap();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let good_len = frames_end(&segment);
    let index_len = fs::metadata(segment.index_path()).unwrap().len();
    let big = log.chain_with(40, |seq, r| r.token = vec![seq as u8; 1 << 20]);
    appender.append(&big).unwrap();
    drop(appender);
    // The index entries come after the commit's sync: none yet at the power cut.
    OpenOptions::new()
        .write(true)
        .open(segment.index_path())
        .unwrap()
        .set_len(index_len)
        .unwrap();
    // Where the last part begins: the whole frames within 32 MiB.
    let mut at = 0usize;
    let mut in_first = 0;
    for r in &big {
        let mut frame = Vec::new();
        segments::encode_frame(r, &mut frame);
        if at + frame.len() > 32 << 20 {
            break;
        }
        at += frame.len();
        in_first += 1;
    }
    assert!((1..big.len()).contains(&in_first), "{in_first}");
    // Of the last part only its first sector reached the disk.
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    let from = good_len + at as u64;
    let sector = from.div_ceil(512) * 512 + 512;
    let end = fs::metadata(&segment.path).unwrap().len();
    file.write_all_at(&vec![0; (end - sector) as usize], sector)
        .unwrap();
    drop(file);
    let (_, last) = open(&log.dir());
    let kept = 1 + in_first;
    // (Positions only: a record's Debug is its megabyte.)
    assert_eq!(last.map(|r| r.seq), Some(kept as u64), "the parts before");
    let back = log.all();
    assert_eq!(back.len(), kept);
    assert!(back == log.records[..kept], "read back");
}

/// A record larger than the log's readers take as a frame (16 MiB) is refused before anything
/// is written (it was written, synced and answered, and then cut off as a torn tail at the
/// next start); the log goes on.
#[test]
fn a_record_larger_than_a_frame_may_be_is_refused_and_leaves_nothing() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(1)).unwrap();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let good_len = frames_end(&segment);
    let big = log.chain_with(1, |_, r| r.token = vec![1; 17 << 20]);
    let e = appender.append(&big).unwrap_err();
    assert!(e.to_string().contains("more than a frame may"), "{e}");
    assert_eq!(frames_end(&segment), good_len);
    log.records.pop();
    log.head = ChainHead {
        seq: 1,
        hash: log.records[0].hash,
    };
    appender.append(&log.chain(2)).unwrap();
    drop(appender);
    let (_, last) = open(&log.dir());
    assert_eq!(last.map(|r| r.seq), Some(3));
    assert!(log.all() == log.records, "read back");
}

/// Two records appended, then a commit refused after its frame was written, whose cut failed:
/// its frame stays past the good ones and the appender knows it (dirty). The segment and
/// where its good frames end; `log` keeps the two records.
fn frames_of_a_refused_commit_left(log: &mut Log, appender: &mut Appender) -> (Segment, u64) {
    appender.append(&log.chain(2)).unwrap();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let good_len = frames_end(&segment);
    let refused = log.chain(1);
    log.records.pop();
    log.head = ChainHead {
        seq: 2,
        hash: log.records[1].hash,
    };
    let mut frame = Vec::new();
    segments::encode_frame(&refused[0], &mut frame);
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    file.write_all_at(&frame, good_len).unwrap();
    appender.set_dirty();
    (segment, good_len)
}

#[test]
fn frames_a_failed_cut_left_are_cut_before_any_append_even_one_without_records() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    let (segment, good_len) = frames_of_a_refused_commit_left(&mut log, &mut appender);
    // The writer's probe appends no record: the cut comes first.
    appender.append(&[]).unwrap();
    assert_eq!(fs::metadata(&segment.path).unwrap().len(), good_len);
    assert_eq!(log.all(), log.records, "the refused record is not found");
    appender.append(&log.chain(1)).unwrap();
    assert_eq!(log.all(), log.records);
}

/// At a graceful stop too: the next start does not take the refused frames as records.
#[test]
fn frames_a_failed_cut_left_are_cut_when_the_appender_closes() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    let (segment, good_len) = frames_of_a_refused_commit_left(&mut log, &mut appender);
    drop(appender);
    assert_eq!(fs::metadata(&segment.path).unwrap().len(), good_len);
    let (_, last) = open(&log.dir());
    assert_eq!(last.map(|r| r.seq), Some(2), "the refused record was taken");
    assert_eq!(log.all(), log.records);
}

#[test]
fn commits_overwrite_zeros_written_ahead_and_closed_segments_are_cut_to_their_frames() {
    let mut log = Log::new();
    let limit = 3 << 20;
    let (mut appender, _) = Appender::open(&log.dir(), limit).unwrap();
    let room = |segment: &Segment| {
        let octets = fs::read(&segment.path).unwrap();
        let end = frames_end(segment) as usize;
        assert!(
            octets[end..].iter().all(|&b| b == 0),
            "only zeros past the frames"
        );
        octets.len() - end
    };
    // (frames, room) of the open segment after each commit.
    let mut rooms = Vec::new();
    while segment_files(&log.dir()).len() < 2 {
        appender.append(&log.chain(40)).unwrap();
        appender.make_room();
        let segments = segment_files(&log.dir());
        let open_segment = segments.last().unwrap();
        rooms.push((frames_end(open_segment), room(open_segment)));
        // A closed segment ends with its last frame, and its room is gone.
        for closed in &segments[..segments.len() - 1] {
            assert_eq!(room(closed), 0);
        }
    }
    // The room was kept between half a step and a step and a half ahead, renewed as commits
    // used it, and not written past the segment's limit (its last commit went past it).
    let (first_segment, second) = rooms.split_at(rooms.len() - 1);
    let (last, before_last) = first_segment.split_last().unwrap();
    assert!(last.0 >= limit && last.1 == 0, "{last:?}");
    assert!(
        before_last.iter().all(|&(frames, room)| room > 0
            && room <= 3 << 19
            && (room >= 1 << 19 || frames + room as u64 == limit)),
        "{first_segment:?}"
    );
    assert!(
        before_last.windows(2).filter(|w| w[1].1 > w[0].1).count() >= 2,
        "renewed: {first_segment:?}"
    );
    assert!(second[0].1 > 0, "{second:?}");

    // The start takes the zeros for room, not for a torn commit: nothing is cut.
    drop(appender);
    let open_segment = segment_files(&log.dir()).pop().unwrap();
    let len = fs::metadata(&open_segment.path).unwrap().len();
    let (mut appender, last) = Appender::open(&log.dir(), limit).unwrap();
    assert_eq!(last.as_ref(), log.records.last());
    assert_eq!(fs::metadata(&open_segment.path).unwrap().len(), len);
    appender.append(&log.chain(3)).unwrap();
    appender.make_room();
    assert_eq!(
        fs::metadata(&open_segment.path).unwrap().len(),
        len,
        "the commit went into the room"
    );
    assert_eq!(log.all(), log.records);
    let reader = log.reader();
    for r in &log.records {
        assert_eq!(reader.record_at(0, r.seq).unwrap().as_ref(), Some(r));
    }
    assert_eq!(reader.head(0).unwrap().as_ref(), log.records.last());
    // The open segment's time bounds are known through its room.
    assert!(segments::time_bounds(&open_segment).unwrap().is_some());
}

#[test]
fn the_next_segment_is_written_ahead_and_a_roll_takes_it_whole() {
    let mut log = Log::new();
    let limit = 2 << 20;
    let spare = log.dir().join(super::spare::NAME);
    let (mut appender, _) = Appender::open(&log.dir(), limit).unwrap();
    // The first segment is made by its roll; the next is written ahead from then on.
    appender.append(&log.chain(40)).unwrap();
    appender.wait_for_spare();
    let octets = fs::read(&spare).unwrap();
    assert_eq!(octets.len() as u64, limit);
    assert!(octets.iter().all(|&b| b == 0), "zeros only");
    assert_eq!(
        segment_files(&log.dir()).len(),
        1,
        "the spare is no segment"
    );

    while segment_files(&log.dir()).len() < 2 {
        appender.append(&log.chain(40)).unwrap();
        appender.make_room();
    }
    // The roll renamed the spare: the new segment's first commit went into its zeros, and
    // the segment after it is being written ahead again.
    let second = segment_files(&log.dir()).pop().unwrap();
    assert_eq!(fs::metadata(&second.path).unwrap().len(), limit);
    assert!(frames_end(&second) > 0);
    appender.wait_for_spare();
    assert_eq!(fs::metadata(&spare).unwrap().len(), limit);
    let first = &segment_files(&log.dir())[0];
    assert_eq!(
        fs::metadata(&first.path).unwrap().len(),
        frames_end(first),
        "the closed segment is cut to its frames"
    );

    // The start takes the zeros for room and writes the spare again.
    drop(appender);
    let (mut appender, last) = Appender::open(&log.dir(), limit).unwrap();
    assert_eq!(last.as_ref(), log.records.last());
    appender.append(&log.chain(3)).unwrap();
    assert_eq!(fs::metadata(&second.path).unwrap().len(), limit);
    appender.wait_for_spare();
    assert_eq!(fs::metadata(&spare).unwrap().len(), limit);
    assert_eq!(log.all(), log.records);
    let reader = log.reader();
    for r in &log.records {
        assert_eq!(reader.record_at(0, r.seq).unwrap().as_ref(), Some(r));
    }
}

#[test]
fn a_new_segment_whose_first_commit_tore_is_removed() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(1)).unwrap();
    let before = segment_files(&log.dir());
    // The next segment was made; its first commit wrote nothing that checks.
    let empty = Segment::new(&log.dir(), 2);
    fs::write(&empty.path, [0u8; 10]).unwrap();
    drop(appender);
    let (_, last) = open(&log.dir());
    assert_eq!(last.as_ref(), log.records.last());
    assert_eq!(segment_files(&log.dir()), before);
}

#[test]
fn damage_to_committed_frames_stops_the_start_and_verification_sees_it() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(1)).unwrap();
    appender.append(&log.chain(1)).unwrap();
    drop(appender);
    let segment = segment_files(&log.dir()).pop().unwrap();
    // One octet of the last record's token changes: the index lists its frame, so it was
    // committed, and this is no torn commit to cut off.
    let len = frames_end(&segment);
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    file.write_all_at(&[0xee], len - 100).unwrap();

    let error = Appender::open(&log.dir(), LIMIT).err().expect("refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("damaged"), "{error}");
    // Readers take the frame as it decodes: its hash no longer matches its fields.
    let all = log.all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], log.records[0]);
    assert_ne!(all[1].computed_hash(), all[1].hash);
}

#[test]
fn the_index_is_derived_data() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    for _ in 0..4 {
        appender.append(&log.chain(2)).unwrap();
    }
    drop(appender);
    let all = segment_files(&log.dir());
    // One index lost, one garbage, one cut short.
    fs::remove_file(all[0].index_path()).unwrap();
    fs::write(all[1].index_path(), [0x55; 100]).unwrap();
    let last = all.last().unwrap().index_path();
    let len = fs::metadata(&last).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let reader = log.reader();
    for r in &log.records {
        assert_eq!(reader.by_counter(0, r.counter).unwrap().as_ref(), Some(r));
    }
    assert_eq!(log.all(), log.records);
    // The writer completes the open segment's index.
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(1)).unwrap();
    let open_segment = segment_files(&log.dir()).pop().unwrap();
    let scanned = segments::scan(&open_segment).unwrap();
    assert_eq!(
        scanned.indexed,
        scanned.entries.len(),
        "fully indexed again"
    );
}

#[test]
fn a_commit_out_of_order_is_refused_and_leaves_nothing() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(2)).unwrap();
    let mut skipped = Log::new();
    skipped.head = ChainHead {
        seq: 5,
        hash: ZERO_HASH,
    };
    let error = appender.append(&skipped.chain(1)).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    appender.append(&log.chain(1)).unwrap();
    assert_eq!(log.all(), log.records);
}

#[test]
fn the_store_appends_finds_and_prunes_through_the_archive_trait() {
    let mut log = Log::new();
    let mut store = log.new_store();
    assert_eq!(store.instance(0).unwrap().head, None);
    let event = event(1, 5, "sync_acquired");
    store
        .append(0, &log.chain(3), std::slice::from_ref(&event))
        .unwrap();
    for _ in 0..5 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    let state = store.instance(0).unwrap();
    assert_eq!(state.head, Some(log.head));
    assert_eq!(state.max_counter, Some(130));
    assert_eq!(state.last_event.seq, 1);
    assert_eq!(store.events(0, 10).unwrap(), [event]);

    let mut reader = LogStore::open_read_only(SqliteStore::open_read_only(&log.database).unwrap());
    assert_eq!(reader.instance(0).unwrap().head, Some(log.head));
    let r = &log.records[6];
    assert_eq!(
        reader.record_by_serial(&r.record.serial).unwrap().as_ref(),
        Some(r)
    );
    let mut other = r.record.serial.clone();
    other[19] ^= 1;
    assert_eq!(
        reader.record_by_serial(&other).unwrap(),
        None,
        "random octets differ"
    );
    let found = reader.records_by_imprint(&r.record.imprint, 10).unwrap();
    assert_eq!(found.records.as_slice(), std::slice::from_ref(r));
    assert_eq!(found.total, 1);

    // Pruning takes whole segments, never the one being written, anchor first; the CLI's
    // store, beside the writer, prunes without appending.
    let segments_before = segment_files(&log.dir()).len();
    let cut = log.records[8].record.gen_time_ns;
    store.add_checkpoint(&log.checkpoint()).unwrap();
    let mut maintenance =
        LogStore::open_read_only(SqliteStore::open(&log.database, Duration::from_secs(1)).unwrap());
    assert!(maintenance.append(0, &[], &[]).is_err(), "it never appends");
    let anchor = maintenance.prune(0, cut).unwrap().expect("segments pruned");
    assert!(anchor.seq < 9 && anchor.seq >= 1);
    assert_eq!(anchor.hash, log.records[anchor.seq as usize - 1].hash);
    assert!(segment_files(&log.dir()).len() < segments_before);
    let kept = {
        let mut kept = Vec::new();
        reader
            .for_each_record(0, 1, &mut |r| {
                kept.push(r);
                Ok(true)
            })
            .unwrap();
        kept
    };
    assert_eq!(kept, log.records[anchor.seq as usize..]);
    let state = reader.instance(0).unwrap();
    assert_eq!(state.head, Some(log.head), "the head stays");
    assert_eq!(state.anchor, Some(anchor));
    assert_eq!(store.prune(0, cut).unwrap(), None, "nothing more to prune");
    let pruned = &log.records[0];
    assert_eq!(
        reader.record_by_serial(&pruned.record.serial).unwrap(),
        None
    );

    // A new writer goes on after the head.
    drop(store);
    let mut store = log.store();
    assert_eq!(store.instance(0).unwrap().head, Some(log.head));
    store.append(0, &log.chain(1), &[]).unwrap();
    assert_eq!(reader.instance(0).unwrap().head, Some(log.head));
}

#[test]
fn pruning_takes_a_bounded_step_at_a_time_one_process_at_a_time() {
    let mut log = Log::new();
    let mut store = log.new_store();
    while segment_files(&log.dir()).len() < PRUNE_STEP + 10 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    store.add_checkpoint(&log.checkpoint()).unwrap();
    let segments_before = segment_files(&log.dir()).len();
    let cut = u64::MAX;

    // Another process pruning the instance: this one waits for its turn (the next interval).
    let database = log.database.clone();
    {
        let _other = crate::archive::state::Lock::for_pruning(&database, 0).unwrap();
        let refused = store.prune(0, cut).unwrap_err();
        assert!(refused.0.contains("being pruned"), "{refused}");
        assert_eq!(segment_files(&log.dir()).len(), segments_before);
    }

    let files: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(log.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), fs::read(&p).unwrap()))
        .collect();
    let first = store.prune(0, cut).unwrap().expect("a first step");
    assert_eq!(
        segment_files(&log.dir()).len(),
        segments_before - PRUNE_STEP
    );
    // As if that step had stopped after its anchor (a crash, a file that could not be
    // removed): its segments are still there; the next step removes them too.
    for (path, octets) in &files {
        if !path.exists() {
            fs::write(path, octets).unwrap();
        }
    }
    assert_eq!(segment_files(&log.dir()).len(), segments_before);
    let mut last = first;
    while let Some(anchor) = store.prune(0, cut).unwrap() {
        assert!(anchor.seq > last.seq, "the anchor only rises");
        last = anchor;
    }
    assert_eq!(
        segment_files(&log.dir()).len(),
        1,
        "all but the one being written"
    );
    let kept: Vec<StoredRecord> = log.reader_records(last.seq + 1);
    assert_eq!(kept, log.records[last.seq as usize..]);
}

#[test]
fn commits_made_durable_beside_the_writer_are_answered_in_order_and_indexed_like_any() {
    let mut log = Log::new();
    let mut store = log.new_store();
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    // Back to back, several to a segment and across its rolls: each commit is framed while
    // the one before is synced, and written after it.
    while segment_files(&log.dir()).len() < 3 {
        let records = log.chain(1);
        let (told, last) = (told.clone(), records[0].seq);
        let durable: crate::archive::store::Durable = Box::new(move |outcome| {
            told.lock().unwrap().push((last, outcome.is_ok()));
        });
        store.append_then(0, &records, &[], durable).unwrap();
    }
    store.settle().unwrap();
    let told = told.lock().unwrap().clone();
    let expected: Vec<(u64, bool)> = (1..=log.head.seq).map(|seq| (seq, true)).collect();
    assert_eq!(told, expected);
    assert_eq!(store.instance(0).unwrap().head, Some(log.head));
    // The index entries, written by the sync thread at offsets the writer chose, match the
    // frames; every record reads back and is found by its imprint.
    assert_eq!(store.derived_damage(0).unwrap(), Vec::<String>::new());
    assert_eq!(log.all(), log.records);
    each_found_by_its_imprint(&mut store, &log.records);
}

#[test]
fn a_commit_whose_sync_fails_is_cut_off_with_the_one_chained_to_it() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    appender.append(&log.chain(2)).unwrap();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let durable = log.head;
    let kept = log.records.clone();
    let end = frames_end(&segment);
    // Each answer: the commit's last position, whether it is durable, the segment's length
    // then.
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tell = |last: u64| -> crate::archive::store::Durable {
        let (told, path) = (told.clone(), segment.path.clone());
        Box::new(move |outcome| {
            let len = fs::metadata(&path).unwrap().len();
            told.lock().unwrap().push((last, outcome.is_ok(), len));
        })
    };
    // Written and handed to the syncer, whose sync fails: meanwhile the next commit is
    // chained to it, and refused once the failure is known. The failed commit is cut off
    // before its requests are refused.
    appender.fail_next_sync();
    appender.append_then(&log.chain(2), tell(4)).unwrap();
    let error = appender.append_then(&log.chain(2), tell(6)).unwrap_err();
    assert!(error.to_string().contains("a test's"), "{error}");
    assert_eq!(*told.lock().unwrap(), [(4, false, end), (6, false, end)]);
    // Cut back to the durable end: nothing of them is read, and the log goes on from there.
    assert_eq!(appender.head(), Some(durable));
    assert_eq!(fs::metadata(&segment.path).unwrap().len(), end);
    assert_eq!(log.all(), kept);
    // A failure found by another call (the head read for a recovery, here) refuses the next
    // commit with its own error, not as one that does not follow.
    log.head = durable;
    log.records = kept.clone();
    appender.fail_next_sync();
    appender.append_then(&log.chain(1), tell(3)).unwrap();
    assert_eq!(appender.head(), Some(durable));
    let error = appender.append_then(&log.chain(1), tell(4)).unwrap_err();
    assert!(error.to_string().contains("a test's"), "{error}");
    assert_eq!(
        told.lock().unwrap()[2..],
        [(3, false, end), (4, false, end)]
    );
    log.head = durable;
    log.records = kept;
    let again = log.chain_with(2, |_, r| r.token[1] ^= 0xff);
    appender.append_then(&again, tell(4)).unwrap();
    appender.settle().unwrap();
    assert_eq!(told.lock().unwrap().last().map(|t| t.1), Some(true));
    assert_eq!(log.all(), log.records);
    // The index, and the imprint file written as the segment closes, know only the records
    // in it.
    appender.append(&log.chain(1)).unwrap();
    assert_eq!(segment_files(&log.dir()).len(), 2, "the segment closed");
    assert!(segment.imprints_path().exists());
    assert_eq!(
        segments::derived_damage(&segment).unwrap(),
        Vec::<String>::new()
    );
    drop(appender);
    let mut store = log.store();
    each_found_by_its_imprint(&mut store, &log.records);
}

#[test]
fn damaged_index_and_imprint_files_are_reported_against_the_frames() {
    let mut log = Log::new();
    let mut store = log.new_store();
    while segment_files(&log.dir()).len() < 4 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    store.add_checkpoint(&log.checkpoint()).unwrap();
    assert_eq!(store.derived_damage(0).unwrap(), Vec::<String>::new());
    let report = crate::archive::verify::verify(&mut store, &[], &[], &[], None).unwrap();
    assert!(
        report.warnings().iter().all(|w| !w.contains("look-ups")),
        "{report}"
    );

    let closed = &segment_files(&log.dir())[1];
    // A counter in the first index entry: a look-up by serial would miss that record.
    let index = closed.index_path();
    let good = fs::read(&index).unwrap();
    let mut bad = good.clone();
    bad[23] ^= 1;
    fs::write(&index, &bad).unwrap();
    let damage = store.derived_damage(0).unwrap();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(
        damage[0].contains(&index.display().to_string()),
        "{damage:?}"
    );
    // (The sample tokens do not decode, so the report has its break anyway.)
    let report = crate::archive::verify::verify(&mut store, &[], &[], &[], None).unwrap();
    assert!(
        report
            .warnings()
            .iter()
            .any(|w| w.contains("look-ups may miss records")),
        "{report}"
    );
    fs::write(&index, &good).unwrap();

    // An imprint file of another segment's keys.
    let imprints = closed.imprints_path();
    let other = fs::read(segment_files(&log.dir())[0].imprints_path()).unwrap();
    fs::write(&imprints, other).unwrap();
    let damage = store.derived_damage(0).unwrap();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(damage[0].contains(".imp"), "{damage:?}");
    // The remedy it names: without the file, look-ups read the frames, and nothing is wrong.
    fs::remove_file(&imprints).unwrap();
    assert_eq!(store.derived_damage(0).unwrap(), Vec::<String>::new());
}

#[test]
fn an_archive_with_rows_keeps_them() {
    let log = Log::new();
    let mut db = SqliteStore::open(&log.database, Duration::from_secs(1)).unwrap();
    let mut record = Log::new();
    db.append(0, &record.chain(1), &[]).unwrap();
    assert_eq!(db.settle_layout(Layout::Log).unwrap(), Layout::Rows);
    assert_eq!(
        db.settle_layout(Layout::Log).unwrap(),
        Layout::Rows,
        "written down"
    );
    // One made before layouts that holds no token (never stamped, or all pruned) but has
    // its instance: rows too.
    let used = Log::new();
    let mut db = SqliteStore::open(&used.database, Duration::from_secs(1)).unwrap();
    db.reserve(0, 100, 0).unwrap();
    assert_eq!(db.settle_layout(Layout::Log).unwrap(), Layout::Rows);
    let new = Log::new();
    let mut db = SqliteStore::open(&new.database, Duration::from_secs(1)).unwrap();
    assert_eq!(db.settle_layout(Layout::Log).unwrap(), Layout::Log);
    assert_eq!(
        db.settle_layout(Layout::Rows).unwrap(),
        Layout::Log,
        "fixed once made"
    );
}

#[test]
fn closed_segments_get_sorted_imprint_files_that_look_ups_search() {
    let mut log = Log::new();
    let mut store = log.store();
    for _ in 0..6 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    // Two records whose imprints share their first 8 octets (the files' key), not the rest.
    let shared = {
        let mut twins = Log::new();
        twins.head = log.head;
        let mut a = twins.chain(2);
        a[0].record.imprint = [[0x66; 8], [1; 8], [1; 8], [1; 8]].concat();
        a[1].record.imprint = [[0x66; 8], [2; 8], [2; 8], [2; 8]].concat();
        // Chained again with the imprints they now have.
        let mut head = log.head;
        a.into_iter()
            .map(|r| {
                let s = StoredRecord::chain(0, r.seq, r.counter, r.record, head.hash);
                head = ChainHead {
                    seq: s.seq,
                    hash: s.hash,
                };
                s
            })
            .collect::<Vec<_>>()
    };
    store.append(0, &shared, &[]).unwrap();
    log.head = ChainHead {
        seq: shared[1].seq,
        hash: shared[1].hash,
    };
    log.records.extend(shared.iter().cloned());
    for _ in 0..4 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }

    let all = segment_files(&log.dir());
    let (open, closed) = all.split_last().unwrap();
    assert!(closed.len() >= 3);
    assert!(closed.iter().all(|s| s.imprints_path().exists()));
    assert!(
        !open.imprints_path().exists(),
        "the open segment has none yet"
    );
    let check = |store: &mut LogStore| {
        each_found_by_its_imprint(store, &log.records);
        assert_eq!(
            store.records_by_imprint(&[0x66; 32], 10).unwrap(),
            ImprintMatches::default()
        );
    };
    check(&mut store);

    // A lost imprint file: look-ups read that segment; the next writer writes it again.
    fs::remove_file(closed[1].imprints_path()).unwrap();
    check(&mut store);
    drop(store);
    let mut store = log.store();
    store.instance(0).unwrap();
    assert!(closed[1].imprints_path().exists(), "written again at open");
    check(&mut store);
}

/// One imprint stamped 50 times over many segments (closed ones with their imprint files,
/// one without, the open one), among records whose imprints share its key (first 8 octets),
/// with genTimes out of position order in places: a look-up answers the newest `limit` in
/// order and counts every match; the look-alikes, and records at or below the anchor (left
/// by a pruning cut short before their segments went), do not count.
#[test]
fn a_frequent_imprint_gives_its_newest_records_and_counts_them_all() {
    let mut log = Log::new();
    let mut store = log.store();
    let frequent = vec![0x42; 32];
    let mut twin = frequent.clone();
    twin[31] = 0;
    // Every third record the look-alike; every tenth from the second on has the genTime of 13
    // positions further on (74 for 61: a tie with 74, the later position first).
    let step = log.gen_step_ns;
    let base = sample(700).gen_time_ns;
    let gen_time_ns = |seq: u64| match seq % 10 {
        1 => base + step * (seq + 13),
        _ => base + step * seq,
    };
    for _ in 0..25 {
        let records = log.chain_with(3, |seq, r| {
            r.imprint = (if seq % 3 == 0 { &twin } else { &frequent }).clone();
            r.gen_time_ns = gen_time_ns(seq);
        });
        store.append(0, &records, &[]).unwrap();
    }
    let all = segment_files(&log.dir());
    assert!(all.len() > 10, "{} segments", all.len());
    fs::remove_file(all[3].imprints_path()).unwrap();

    // The records with the frequent imprint as the look-up orders them.
    let expected = |above: u64| -> Vec<StoredRecord> {
        let mut found: Vec<StoredRecord> = log
            .records
            .iter()
            .filter(|r| r.seq > above && r.record.imprint == frequent)
            .cloned()
            .collect();
        found.sort_by_key(|r| std::cmp::Reverse((r.record.gen_time_ns, r.seq)));
        found
    };
    let seqs: Vec<u64> = expected(0)[..3].iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [71, 74, 61]);
    let look_up = |store: &mut LogStore, limit: usize| {
        let found = store.records_by_imprint(&frequent, limit).unwrap();
        (found.records, found.total)
    };
    assert_eq!(look_up(&mut store, 3), (expected(0)[..3].to_vec(), 50));
    assert_eq!(look_up(&mut store, 0), (vec![], 50), "counted, none kept");
    assert_eq!(look_up(&mut store, 100), (expected(0), 50));
    assert_eq!(store.records_by_imprint(&twin, 3).unwrap().total, 25);

    // The anchor stored, the segments before it not removed yet: readers pass over them.
    let at = &log.records[39];
    store
        .db
        .set_anchor(
            &Anchor {
                instance_id: 0,
                seq: at.seq,
                hash: at.hash,
                max_counter: at.counter,
                max_gen_time_ns: gen_time_ns(31),
                pruned_at_ns: 1,
            },
            None,
        )
        .unwrap();
    let left = expected(40);
    assert_eq!(left.len(), 23);
    let mut reader = LogStore::open_read_only(SqliteStore::open_read_only(&log.database).unwrap());
    for store in [&mut store, &mut reader] {
        assert_eq!(look_up(store, 3), (left[..3].to_vec(), 23));
        assert_eq!(look_up(store, 100), (left.clone(), 23));
    }
}

/// An imprint stamped 60 times, one commit of 4 per segment, and a frame in the middle of
/// three segments altered (an octet of its token, so that it still parses but its hash does
/// not check): of a closed segment found through its imprint file, of one whose imprint file
/// is lost, and of the open one, where it is among the newest. A look-up neither counts nor
/// returns them, and counts and returns every other match, in order.
#[test]
fn a_damaged_frame_among_many_matches_is_neither_counted_nor_returned() {
    let mut log = Log::new();
    let mut store = log.store();
    let frequent = vec![0x42; 32];
    for _ in 0..15 {
        let records = log.chain_with(4, |_, r| r.imprint.clone_from(&frequent));
        store.append(0, &records, &[]).unwrap();
    }
    let all = segment_files(&log.dir());
    assert_eq!(all.len(), 15, "one commit per segment");
    fs::remove_file(all[6].imprints_path()).unwrap();
    let damaged: Vec<u64> = [3, 6, 14]
        .into_iter()
        .map(|i| {
            let segment = &all[i];
            let seq = segment.first_seq + 2;
            let token = &log.records[seq as usize - 1].record.token;
            let offset = segments::offset_of(segment, seq).unwrap().unwrap();
            let octets = fs::read(&segment.path).unwrap();
            let at = offset as usize
                + octets[offset as usize..]
                    .windows(token.len())
                    .position(|w| w == token.as_slice())
                    .unwrap()
                + 10;
            let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
            file.write_all_at(&[octets[at] ^ 0x04], at as u64).unwrap();
            seq
        })
        .collect();
    assert_eq!(damaged, [15, 27, 59]);

    let mut expected: Vec<StoredRecord> = log
        .records
        .iter()
        .filter(|r| !damaged.contains(&r.seq))
        .cloned()
        .collect();
    expected.sort_by_key(|r| std::cmp::Reverse((r.record.gen_time_ns, r.seq)));
    assert_eq!(
        expected[..3].iter().map(|r| r.seq).collect::<Vec<_>>(),
        [60, 58, 57],
        "the damaged one would be the second newest"
    );
    let mut reader = LogStore::open_read_only(SqliteStore::open_read_only(&log.database).unwrap());
    for store in [&mut store, &mut reader] {
        for limit in [1, 3, 100] {
            let found = store.records_by_imprint(&frequent, limit).unwrap();
            let kept = limit.min(expected.len());
            assert_eq!(found.records, expected[..kept], "limit {limit}");
            assert_eq!(found.total, 57, "limit {limit}");
        }
    }
}

#[test]
fn a_read_by_time_merges_instances_segment_by_segment_in_gentime_order() {
    let log = Log::new();
    let root = dir_for(&log.database);
    let minute = 60_000_000_000u64;
    let start = 1_800_000_000_000_000_000u64;
    // Two instances, a few records to a segment: genTimes rise with the position but for
    // some that lie minutes (within the slack) below those before them.
    let genes = |instance: u64, k: u64| match instance {
        0 => start + k * minute - if k % 5 == 4 { 4 * minute } else { 0 },
        _ => start + k * 45_000_000_000 + 7_000_000_000 - if k % 7 == 6 { 9 * minute } else { 0 },
    };
    let mut all = Vec::new();
    for instance in [0u32, 1] {
        let (mut appender, _) = Appender::open(&instance_dir(&root, instance), LIMIT).unwrap();
        let mut prev = ZERO_HASH;
        let records: Vec<StoredRecord> = (1..=40u64)
            .map(|seq| {
                let mut r = sample(300);
                r.serial = layout::encode(instance, seq, [7; 7]).to_vec();
                r.gen_time_ns = genes(u64::from(instance), seq);
                r.imprint = vec![seq as u8; 32];
                let stored = StoredRecord::chain(instance, seq, seq, r, prev);
                prev = stored.hash;
                stored
            })
            .collect();
        for commit in records.chunks(3) {
            appender.append(commit).unwrap();
        }
        assert!(segment_files(&instance_dir(&root, instance)).len() > 5);
        all.extend(records);
    }
    let anchors = HashMap::from([(1, 3)]);
    let reader = log.reader();
    for (from, to) in [(0, u64::MAX), (start + 5 * minute, start + 30 * minute)] {
        let mut read = Vec::new();
        reader
            .in_time(from, to, &anchors, &mut |r| {
                read.push((r.record.gen_time_ns, r.instance_id, r.seq));
                Ok(true)
            })
            .unwrap();
        let mut expected: Vec<(u64, u32, u64)> = all
            .iter()
            .filter(|r| r.record.gen_time_ns >= from && r.record.gen_time_ns < to)
            .filter(|r| r.instance_id != 1 || r.seq > 3)
            .map(|r| (r.record.gen_time_ns, r.instance_id, r.seq))
            .collect();
        expected.sort_unstable();
        assert!(expected.len() > 20);
        assert_eq!(read, expected, "[{from}, {to})");
    }
    // A visitor that stops is not called again.
    let mut calls = 0;
    reader
        .in_time(0, u64::MAX, &anchors, &mut |_| {
            calls += 1;
            Ok(calls < 5)
        })
        .unwrap();
    assert_eq!(calls, 5);
}

#[test]
fn a_time_range_passes_over_segments_far_from_it_and_misses_nothing() {
    let mut log = Log::new();
    // 20 minutes between records, two or three records per segment: most segments lie far
    // outside any one-hour range.
    log.gen_step_ns = 1_200_000_000_000;
    let (mut appender, _) = open(&log.dir());
    for _ in 0..12 {
        appender.append(&log.chain(1)).unwrap();
    }
    assert!(segment_files(&log.dir()).len() >= 4);
    let reader = log.reader();
    let in_time = |from: u64, to: u64| in_time_seqs(&reader, from, to);
    let gen = |seq: usize| log.records[seq - 1].record.gen_time_ns;
    for (from, to) in [(4, 7), (1, 2), (11, 13), (5, 6), (2, 12)] {
        let expected: Vec<u64> = (from as u64..to as u64).filter(|&s| s <= 12).collect();
        let to_ns = if to > 12 { u64::MAX } else { gen(to) };
        assert_eq!(in_time(gen(from), to_ns), expected, "[{from}, {to})");
        // Just past a record's genTime leaves it out; just before the next takes it in.
        assert_eq!(in_time(gen(from) + 1, gen(from + 1)), Vec::<u64>::new());
        assert_eq!(in_time(gen(from) - 1, gen(from) + 1), [from as u64]);
    }
    // A segment removed while the read goes on (pruning beside an export) is left out, and
    // the read goes on.
    let last = segment_files(&log.dir()).pop().unwrap();
    let mut seqs = Vec::new();
    reader
        .in_time(0, u64::MAX, &HashMap::new(), &mut |r| {
            if seqs.is_empty() {
                super::appender::remove_segment(&last).unwrap();
            }
            seqs.push(r.seq);
            Ok(true)
        })
        .unwrap();
    let expected: Vec<u64> = (1..last.first_seq).collect();
    assert_eq!(seqs, expected);

    // A frame its index lists that no longer checks (an altered octet) is no record to leave
    // out in silence: the others are visited, and the read ends with an error saying so.
    let first = segment_files(&log.dir()).remove(0);
    let file = OpenOptions::new().write(true).open(&first.path).unwrap();
    file.write_all_at(&[0xff], 40).unwrap();
    let mut seqs = Vec::new();
    let error = reader
        .in_time(0, u64::MAX, &HashMap::new(), &mut |r| {
            seqs.push(r.seq);
            Ok(true)
        })
        .unwrap_err();
    assert!(error.to_string().contains("1 records"), "{error}");
    let expected: Vec<u64> = (2..last.first_seq).collect();
    assert_eq!(seqs, expected);
}

#[test]
fn a_closed_segment_open_again_is_searched_by_its_index_until_it_closes_again() {
    let mut log = Log::new();
    let mut store = log.store();
    // Until the first segment closes: its imprint file is written as the second one starts.
    while segment_files(&log.dir()).len() < 2 {
        store.append(0, &log.chain(1), &[]).unwrap();
    }
    drop(store);
    let [first, second] = <[Segment; 2]>::try_from(segment_files(&log.dir())).unwrap();
    assert!(first.imprints_path().exists());
    // The second segment's only commit tore: it goes, and the first is the open one again.
    // (its index entries are written after the sync: there are none)
    fs::write(&second.path, [0x42; 300]).unwrap();
    fs::write(second.index_path(), []).unwrap();
    let last = log.records.pop().unwrap();
    log.head = ChainHead {
        seq: last.seq - 1,
        hash: last.prev_hash,
    };
    let db = SqliteStore::open(&log.database, Duration::from_secs(1)).unwrap();
    let mut store = LogStore::open(db).with_segment_limit(1 << 20);
    assert_eq!(store.instance(0).unwrap().head, Some(log.head));
    assert_eq!(segment_files(&log.dir()), std::slice::from_ref(&first));
    assert!(
        !first.imprints_path().exists(),
        "its imprint file lacks what comes next"
    );
    store.append(0, &log.chain(2), &[]).unwrap();
    each_found_by_its_imprint(&mut store, &log.records);
}

/// A small deterministic generator for the damage below.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn damaged_files_give_errors_or_a_sound_head_never_a_panic() {
    let mut rng = XorShift(0x7e57_10c5);
    let (mut started, mut refused) = (0, 0);
    for round in 0..300 {
        let mut log = Log::new();
        let (mut appender, _) = open(&log.dir());
        for _ in 0..1 + rng.below(4) {
            appender
                .append(&log.chain(1 + rng.below(3) as usize))
                .unwrap();
            appender.make_room();
        }
        drop(appender);
        let segment = segment_files(&log.dir()).pop().unwrap();
        let target = if rng.below(3) == 0 {
            segment.index_path()
        } else {
            segment.path.clone()
        };
        let mut octets = fs::read(&target).unwrap();
        // The damage falls on the frames (the room past them is zeros), which keep their room
        // in some rounds.
        let room = if target == segment.path {
            let room = octets.split_off(frames_end(&segment) as usize);
            assert!(room.iter().all(|&b| b == 0), "round {round}");
            Some(room).filter(|_| rng.below(2) == 0)
        } else {
            None
        };
        match rng.below(4) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(octets.len() as u64) as usize;
                    if let Some(b) = octets.get_mut(at) {
                        *b ^= 1 << rng.below(8);
                    }
                }
            }
            1 => octets.truncate(rng.below(octets.len() as u64 + 1) as usize),
            2 => octets.extend((0..rng.below(200)).map(|_| rng.below(256) as u8)),
            _ => {
                let at = rng.below(octets.len() as u64) as usize;
                octets.splice(at..at, (0..1 + rng.below(40)).map(|_| rng.below(256) as u8));
            }
        }
        octets.extend(room.unwrap_or_default());
        fs::write(&target, &octets).unwrap();

        // Readers answer, with records or errors.
        let reader = log.reader();
        let _ = reader.head(0);
        let _ = reader.maxima(0);
        let _ = reader.by_counter(0, 10 * (1 + rng.below(12)));
        let _ = reader.record_at(0, 1 + rng.below(12));
        let _ = reader.in_time(0, u64::MAX, &HashMap::new(), &mut |_| Ok(true));
        let _ = reader.for_each_from(0, 1, &mut |_| Ok(true));

        // The writer starts on a head that checks, or refuses to start.
        let Ok((mut appender, last)) = Appender::open(&log.dir(), LIMIT) else {
            refused += 1;
            continue;
        };
        started += 1;
        if let Some(last) = &last {
            assert_eq!(last.computed_hash(), last.hash, "round {round}");
            assert_eq!(
                reader.head(0).unwrap().as_ref(),
                Some(last),
                "round {round}"
            );
        }
        log.head = last.map_or(ChainHead::EMPTY, |l| ChainHead {
            seq: l.seq,
            hash: l.hash,
        });
        let next = log.chain(1);
        appender.append(&next).unwrap();
        assert_eq!(
            reader.head(0).unwrap().as_ref(),
            next.last(),
            "round {round}"
        );
    }
    assert!(
        started > 100 && refused > 10,
        "{started} started, {refused} refused"
    );
}

#[test]
fn a_migration_starts_over_after_a_stop_and_leaves_a_broken_chain_as_it_was() {
    let mut log = Log::new();
    let mut db = SqliteStore::open(&log.database, Duration::from_secs(1)).unwrap();
    db.append(0, &log.chain(5), &[]).unwrap();
    drop(db);
    // What a migration that stopped half way left.
    let partial = log
        .dir()
        .join(Segment::new(&log.dir(), 1).path.file_name().unwrap());
    fs::create_dir_all(log.dir()).unwrap();
    fs::write(&partial, [0x17; 100]).unwrap();
    let migrated = super::migrate::migrate(&log.database, Duration::from_secs(1), LIMIT).unwrap();
    assert_eq!(migrated, [(0, 5)]);
    assert_eq!(log.all(), log.records);
    // The log that was there is moved aside, not deleted (it could hold tokens the rows lack).
    let root = log.dir().parent().unwrap().to_path_buf();
    let aside: Vec<_> = fs::read_dir(root.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".before-migration-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = aside[0].join(partial.strip_prefix(&root).unwrap());
    assert_eq!(fs::read(kept).unwrap(), [0x17; 100]);

    // A log that holds records the rows do not (the database restored from a backup older
    // than the migration, which says rows again): the migration stops, nothing is moved.
    let mut restored = Log::new();
    let mut db = SqliteStore::open(&restored.database, Duration::from_secs(1)).unwrap();
    let records = restored.chain(7);
    db.append(0, &records[..5], &[]).unwrap();
    drop(db);
    let (mut appender, _) = open(&restored.dir());
    appender.append(&records).unwrap();
    drop(appender);
    let error =
        super::migrate::migrate(&restored.database, Duration::from_secs(1), LIMIT).unwrap_err();
    assert!(
        error.to_string().contains("up to 7 that the rows do not"),
        "{error}"
    );
    assert_eq!(restored.all(), records, "the log is where it was");
    let db = SqliteStore::open_read_only(&log.database).unwrap();
    assert_eq!(
        crate::archive::sqlite::layout_of(db.connection()).unwrap(),
        Layout::Log
    );

    // A chain with a gap (record 3 missing) cannot be copied: nothing changes.
    let mut gap = Log::new();
    let mut db = SqliteStore::open(&gap.database, Duration::from_secs(1)).unwrap();
    let records = gap.chain(4);
    db.append(
        0,
        &[records[0].clone(), records[1].clone(), records[3].clone()],
        &[],
    )
    .unwrap();
    drop(db);
    let error = super::migrate::migrate(&gap.database, Duration::from_secs(1), LIMIT).unwrap_err();
    assert!(error.to_string().contains("does not follow"), "{error}");
    let db = SqliteStore::open_read_only(&gap.database).unwrap();
    assert_eq!(
        crate::archive::sqlite::layout_of(db.connection()).unwrap(),
        Layout::Rows
    );
    let rows: u64 = db
        .connection()
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3, "the rows stay");

    // Nor one whose first record is missing (the chain starts past the anchor, here none: 0).
    let mut late = Log::new();
    let mut db = SqliteStore::open(&late.database, Duration::from_secs(1)).unwrap();
    let records = late.chain(3);
    db.append(0, &records[1..], &[]).unwrap();
    drop(db);
    let error = super::migrate::migrate(&late.database, Duration::from_secs(1), LIMIT).unwrap_err();
    assert!(
        error.to_string().contains("record 2 does not follow 0"),
        "{error}"
    );
    let db = SqliteStore::open_read_only(&late.database).unwrap();
    assert_eq!(
        crate::archive::sqlite::layout_of(db.connection()).unwrap(),
        Layout::Rows
    );
}

/// Three commits of one record each in one segment, with the room the writer keeps, and the
/// segment's octets.
fn three_commits(log: &mut Log) -> (Segment, Vec<u8>) {
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    for _ in 0..3 {
        appender.append(&log.chain(1)).unwrap();
        appender.make_room();
    }
    drop(appender);
    let segment = segment_files(&log.dir()).pop().unwrap();
    let octets = fs::read(&segment.path).unwrap();
    (segment, octets)
}

/// Where record `seq`'s token starts in `octets`.
fn token_at(log: &Log, octets: &[u8], seq: usize) -> usize {
    let offset = segments::offset_of(
        &segment_files(&log.dir()).pop().unwrap(),
        log.records[seq - 1].seq,
    )
    .unwrap()
    .unwrap() as usize;
    let token = &log.records[seq - 1].record.token;
    offset
        + octets[offset..]
            .windows(token.len())
            .position(|w| w == token.as_slice())
            .unwrap()
}

#[test]
fn an_altered_frame_followed_by_good_ones_is_damage_even_without_the_index() {
    let mut log = Log::new();
    let (segment, mut octets) = three_commits(&mut log);
    let at = token_at(&log, &octets, 2) + 10;
    fs::remove_file(segment.index_path()).unwrap();
    octets[at] ^= 0x04;
    fs::write(&segment.path, &octets).unwrap();

    let error = Appender::open(&log.dir(), 1 << 20).err().expect("refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert!(
        error
            .to_string()
            .contains(&segment.path.display().to_string()),
        "{error}"
    );
    assert_eq!(fs::read(&segment.path).unwrap(), octets, "nothing cut off");
}

#[test]
fn an_altered_last_frame_is_damage_even_without_the_index() {
    let mut log = Log::new();
    let (segment, mut octets) = three_commits(&mut log);
    let at = token_at(&log, &octets, 3) + 100;
    fs::remove_file(segment.index_path()).unwrap();
    octets[at] ^= 0x04;
    fs::write(&segment.path, &octets).unwrap();

    let error = Appender::open(&log.dir(), 1 << 20).err().expect("refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert_eq!(fs::read(&segment.path).unwrap(), octets, "nothing cut off");
}

#[test]
fn a_segment_cut_at_a_frame_its_index_lists_is_damage() {
    let mut log = Log::new();
    let (segment, _) = three_commits(&mut log);
    let third = segments::offset_of(&segment, 3).unwrap().unwrap();
    OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .unwrap()
        .set_len(third)
        .unwrap();

    let error = Appender::open(&log.dir(), 1 << 20).err().expect("refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert_eq!(fs::metadata(&segment.path).unwrap().len(), third);
}

#[test]
fn a_torn_commit_whose_sector_in_the_middle_did_not_land_is_cut_off() {
    let mut log = Log::new();
    let (segment, _) = three_commits(&mut log);
    let good_len = frames_end(&segment);
    // The next commit's frame reached the disk but for one sector inside it (zeros, as the
    // room was), its hash included: not one frame of it checks.
    let torn = log.chain(1);
    let mut frame = Vec::new();
    segments::encode_frame(&torn[0], &mut frame);
    let sector = (good_len / 512 + 1) * 512;
    let lost = (sector - good_len) as usize..(sector - good_len + 512) as usize;
    assert!(lost.end < frame.len());
    frame[lost].fill(0);
    let file = OpenOptions::new().write(true).open(&segment.path).unwrap();
    file.write_all_at(&frame, good_len).unwrap();
    fs::remove_file(segment.index_path()).unwrap();
    log.records.pop();

    let (_, last) = Appender::open(&log.dir(), 1 << 20).unwrap();
    assert_eq!(last.as_ref(), log.records.last());
    assert_eq!(fs::metadata(&segment.path).unwrap().len(), good_len);
}

#[test]
fn a_counter_recorded_segments_after_later_ones_is_found() {
    let mut log = Log::new();
    // One record per segment, counters 10, 20, 30, 40.
    let (mut appender, _) = Appender::open(&log.dir(), 1).unwrap();
    for _ in 0..4 {
        appender.append(&log.chain(1)).unwrap();
    }
    // Counter 5 was taken first (a batch, a slow signature) and recorded last.
    let mut late = sample(700);
    late.serial = layout::encode(0, 5, [7; 7]).to_vec();
    let late = StoredRecord::chain(0, 5, 5, late, log.head.hash);
    appender.append(std::slice::from_ref(&late)).unwrap();
    // And counter 1 in a segment that closes behind it.
    let mut later = sample(700);
    later.serial = layout::encode(0, 1, [7; 7]).to_vec();
    let later = StoredRecord::chain(0, 6, 1, later, late.hash);
    appender.append(std::slice::from_ref(&later)).unwrap();
    assert_eq!(segment_files(&log.dir()).len(), 6);

    let reader = log.reader();
    assert_eq!(reader.by_counter(0, 5).unwrap().as_ref(), Some(&late));
    assert_eq!(reader.by_counter(0, 1).unwrap().as_ref(), Some(&later));
    for r in &log.records {
        assert_eq!(reader.by_counter(0, r.counter).unwrap().as_ref(), Some(r));
    }
    assert_eq!(reader.by_counter(0, 15).unwrap(), None);
    assert_eq!(reader.by_counter(0, 50).unwrap(), None);
    // The highest counter and genTime at a start are those of record 4, three segments back.
    let newest = &log.records[3];
    assert_eq!(
        reader.maxima(0).unwrap(),
        (Some(40), Some(newest.record.gen_time_ns))
    );
}

#[test]
fn a_segment_roll_that_failed_is_tried_again() {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    while segment_files(&log.dir()).len() < 2 {
        appender.append(&log.chain(1)).unwrap();
        appender.make_room();
    }
    // Fill the second segment, up to its limit.
    let dir = log.dir();
    while frames_end(&segment_files(&dir).pop().unwrap()) < LIMIT {
        appender.append(&log.chain(1)).unwrap();
        appender.make_room();
    }
    // The next segment's index cannot be made.
    let next = Segment::new(&log.dir(), log.head.seq + 1);
    fs::create_dir(next.index_path()).unwrap();
    let refused = log.chain(1);
    appender.append(&refused).unwrap_err();
    // An append without records (the writer's probe) fails too while it does.
    appender.append(&[]).unwrap_err();
    log.records.pop();
    log.head = ChainHead {
        seq: refused[0].seq - 1,
        hash: refused[0].prev_hash,
    };

    fs::remove_dir(next.index_path()).unwrap();
    appender.append(&log.chain(2)).unwrap();
    assert_eq!(log.all(), log.records);
    let reader = log.reader();
    assert_eq!(reader.head(0).unwrap().as_ref(), log.records.last());
    drop(appender);
    let (_, last) = open(&log.dir());
    assert_eq!(last.as_ref(), log.records.last());
}

#[test]
fn a_segment_file_left_behind_is_taken_again_while_it_holds_zeros_only() {
    let mut log = Log::new();
    let dir = log.dir();
    let (mut appender, _) = open(&dir);
    appender.append(&log.chain(1)).unwrap();
    while frames_end(&segment_files(&dir).pop().unwrap()) < LIMIT {
        appender.append(&log.chain(1)).unwrap();
    }
    // The spare written ahead is taken by the roll below, which fails: what is at the next
    // segment's name is no leftover of a roll (a zero in a frame's length, then data).
    appender.wait_for_spare();
    let next = Segment::new(&dir, log.head.seq + 1);
    fs::write(&next.path, [0, 0, 0, 0, 9]).unwrap();
    let refused = log.chain(1);
    let e = appender.append(&refused).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        fs::read(&next.path).unwrap(),
        [0, 0, 0, 0, 9],
        "left as it was"
    );
    log.records.pop();
    log.head = ChainHead {
        seq: refused[0].seq - 1,
        hash: refused[0].prev_hash,
    };

    // Zeros only (a roll that failed after it renamed a spare, and could not remove it): the
    // next roll takes the file, its zeros as the new segment's room.
    fs::write(&next.path, vec![0; 3000]).unwrap();
    appender.append(&log.chain(2)).unwrap();
    assert_eq!(segment_files(&dir).last(), Some(&next));
    assert_eq!(fs::metadata(&next.path).unwrap().len(), 3000);

    // With a spare written ahead, the roll renames it over such a file.
    while frames_end(&segment_files(&dir).pop().unwrap()) < LIMIT {
        appender.append(&log.chain(1)).unwrap();
    }
    appender.wait_for_spare();
    let after = Segment::new(&dir, log.head.seq + 1);
    fs::write(&after.path, vec![0; 1000]).unwrap();
    appender.append(&log.chain(1)).unwrap();
    assert_eq!(segment_files(&dir).last(), Some(&after));
    assert_eq!(fs::metadata(&after.path).unwrap().len(), LIMIT, "the spare");
    assert_eq!(log.all(), log.records);
    drop(appender);
    let (_, last) = open(&dir);
    assert_eq!(last.as_ref(), log.records.last());
}

#[test]
fn events_that_cannot_be_stored_do_not_fail_records_already_durable() {
    let mut log = Log::new();
    let mut db = SqliteStore::open(&log.database, Duration::from_millis(50)).unwrap();
    assert_eq!(db.settle_layout(Layout::Log).unwrap(), Layout::Log);
    let mut store = LogStore::open(db).with_segment_limit(LIMIT);
    let event = |seq: u64| event(seq, seq, "sync_acquired");
    store.append(0, &log.chain(1), &[event(1)]).unwrap();

    // Another process holds the database's write lock past the busy timeout.
    let locker = rusqlite::Connection::open(&log.database).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    store
        .append(0, &log.chain(2), &[event(2), event(3)])
        .expect("the records are durable: they are not refused for their events");
    assert_eq!(log.all(), log.records, "and chained and found");
    locker.execute_batch("ROLLBACK").unwrap();

    // The events kept go in with the next commit, in their order.
    store.append(0, &log.chain(1), &[event(4)]).unwrap();
    assert_eq!(
        store.events(0, 10).unwrap(),
        [event(1), event(2), event(3), event(4)]
    );
    assert_eq!(store.instance(0).unwrap().last_event.seq, 4);
    assert_eq!(log.all(), log.records);

    // As many events kept as it keeps, while they cannot be stored: the next commit fails,
    // its record unwritten, rather than drop events the writer has chained.
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let many: Vec<EventRecord> = (5..5 + super::MAX_KEPT_EVENTS as u64).map(event).collect();
    store.append(0, &log.chain(1), &many).unwrap();
    let next = 5 + super::MAX_KEPT_EVENTS as u64;
    let refused = log.chain(1);
    assert!(store.append(0, &refused, &[event(next)]).is_err());
    assert_eq!(log.all(), log.records[..log.records.len() - 1]);
    locker.execute_batch("ROLLBACK").unwrap();
    // Once they can be, they are (the writer hands the refused commit's events again).
    store.append(0, &[], &[event(next)]).unwrap();
    assert_eq!(store.instance(0).unwrap().last_event.seq, next);
}

#[test]
fn a_reader_ends_where_the_writer_cut_the_segment_short() {
    let mut log = Log::new();
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(1)).unwrap();
    appender.make_room();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let end = frames_end(&segment);
    assert!(fs::metadata(&segment.path).unwrap().len() > end, "room");
    let mut frames = segments::Frames::open(&segment, 0).unwrap();
    // The writer cuts the room off (the segment closes, or a failed commit is cut).
    OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .unwrap()
        .set_len(end)
        .unwrap();
    assert_eq!(frames.next_frame().unwrap().unwrap().1, log.records[0]);
    assert!(frames.next_frame().unwrap().is_none());
}

#[test]
fn verification_beside_the_writer_does_not_take_a_frame_being_written() {
    let mut log = Log::new();
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(2)).unwrap();
    appender.make_room();
    let segment = segment_files(&log.dir()).pop().unwrap();
    let end = frames_end(&segment);
    // The next commit's frame, all but its hash in so far.
    let next = log.chain(1);
    let mut frame = Vec::new();
    segments::encode_frame(&next[0], &mut frame);
    OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .unwrap()
        .write_all_at(&frame[..frame.len() - 32], end)
        .unwrap();
    log.records.pop();
    assert_eq!(log.all(), log.records);
}

#[test]
fn a_damaged_segment_is_not_pruned() {
    let mut log = Log::new();
    let mut store = log.store();
    let event = event(1, 5, "sync_acquired");
    store
        .append(0, &log.chain(2), std::slice::from_ref(&event))
        .unwrap();
    for _ in 0..5 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    let before = segment_files(&log.dir());
    assert!(before.len() >= 3);
    // One octet of the first segment's last record changes.
    let first = &before[0];
    let last = segments::scan(first)
        .unwrap()
        .entries
        .last()
        .copied()
        .unwrap();
    let mut octets = fs::read(&first.path).unwrap();
    octets[last.offset as usize + 200] ^= 0x10;
    fs::write(&first.path, &octets).unwrap();

    let cut = log.records.last().unwrap().record.gen_time_ns + 1;
    store.add_checkpoint(&log.checkpoint()).unwrap();
    let error = store.prune(0, cut).unwrap_err();
    assert!(error.to_string().contains("damaged"), "{error}");
    assert_eq!(segment_files(&log.dir()), before, "nothing removed");
    assert_eq!(store.instance(0).unwrap().anchor, None, "no anchor");
    assert_eq!(
        store.events(0, u64::MAX).unwrap(),
        [event],
        "nor the events before the cut"
    );
}

#[test]
fn offsets_and_positions_from_disk_are_bounded() {
    let mut log = Log::new();
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(2)).unwrap();
    drop(appender);
    let segment = segment_files(&log.dir()).pop().unwrap();
    // The second index entry points far past the file (its position right).
    let mut index = fs::read(segment.index_path()).unwrap();
    index[ENTRY + 8..ENTRY + 16].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    fs::write(segment.index_path(), &index).unwrap();
    let reader = log.reader();
    assert_eq!(
        reader.record_at(0, 2).unwrap().as_ref(),
        Some(&log.records[1])
    );
    assert_eq!(reader.record_at(0, u64::MAX).unwrap(), None);
    assert_eq!(reader.head(0).unwrap().as_ref(), Some(&log.records[1]));

    // A segment whose record is at the last position there is: no next one.
    let end = Log::new();
    let mut r = sample(100);
    r.serial = layout::encode(0, 1, [7; 7]).to_vec();
    let last = StoredRecord::chain(0, u64::MAX, 1, r, ZERO_HASH);
    let mut frame = Vec::new();
    segments::encode_frame(&last, &mut frame);
    fs::create_dir_all(end.dir()).unwrap();
    fs::write(Segment::new(&end.dir(), u64::MAX).path, &frame).unwrap();
    let error = Appender::open(&end.dir(), 1 << 20).err().expect("refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
}

const ENTRY: usize = segments::ENTRY_LEN;

#[test]
fn an_anchor_inside_a_segment_is_found_and_one_at_a_segments_end_is_not() {
    let log = twelve_commits_of_one();
    let segments = segment_files(&log.dir());
    assert!(segments.len() >= 3, "{segments:?}");
    let mut store = log.store();
    // At a segment's last record (what pruning writes): nothing.
    let last_of_first = segments[1].first_seq - 1;
    assert_eq!(store.kept_below_anchor(0, last_of_first).unwrap(), None);
    // Inside a segment: its first record, which pruning to there would have removed.
    let inside = segments[1].first_seq;
    assert!(
        inside < segments[2].first_seq - 1,
        "a segment of two records at least"
    );
    let found = store
        .kept_below_anchor(0, inside)
        .unwrap()
        .expect("a record");
    assert_eq!(found.seq, segments[1].first_seq);
    // Inside the newest segment, while records follow the anchor: pruning never removes the
    // newest segment, so never anchors in it.
    let newest = segments.last().unwrap().first_seq;
    let found = store
        .kept_below_anchor(0, newest)
        .unwrap()
        .expect("a record");
    assert_eq!(found.seq, newest);
    // At its last record (the head): what a start leaves of a prune that stopped before
    // removing its last segment, the one after it empty (reopened as the newest until the
    // next roll).
    assert_eq!(store.kept_below_anchor(0, 12).unwrap(), None);
}

/// Writes `value` over field `field` (0 position, 1 offset, 2 counter, 3 genTime, 4 imprint
/// key) of entry `i` in `segment`'s index.
fn garble_entry(segment: &Segment, i: usize, field: usize, value: u64) {
    OpenOptions::new()
        .write(true)
        .open(segment.index_path())
        .unwrap()
        .write_all_at(&value.to_be_bytes(), (i * ENTRY + field * 8) as u64)
        .unwrap();
}

/// Twelve records appended one a commit, in segments of a few records each.
fn twelve_commits_of_one() -> Log {
    let mut log = Log::new();
    let (mut appender, _) = open(&log.dir());
    for _ in 0..12 {
        appender.append(&log.chain(1)).unwrap();
    }
    log
}

/// The positions `reader` visits in `[from, to)`, by genTime.
fn in_time_seqs(reader: &LogReader, from: u64, to: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    reader
        .in_time(from, to, &HashMap::new(), &mut |r| {
            seqs.push(r.seq);
            Ok(true)
        })
        .unwrap();
    seqs
}

#[test]
fn a_garbled_index_leaves_no_record_out_of_a_time_range_nor_takes_one_in() {
    let log = twelve_commits_of_one();
    let first = segment_files(&log.dir()).remove(0);
    let last_i = segments::scan(&first).unwrap().entries.len() - 1;
    // The first and last genTimes of the first segment's index, far in the future: its
    // bounds would pass it over, its entries leave its records out.
    for i in [0, last_i] {
        garble_entry(&first, i, 3, u64::MAX / 2);
    }
    let reader = log.reader();
    let gen = |seq: usize| log.records[seq - 1].record.gen_time_ns;
    let all: Vec<u64> = (1..=12).collect();
    assert_eq!(in_time_seqs(&reader, gen(1), gen(12) + 1), all);
    fs::remove_file(first.index_path()).unwrap();

    // A record past the range whose entry puts it inside, between its segment's extremes: the
    // frame's genTime leaves it out.
    let mut log = Log::new();
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(6)).unwrap();
    drop(appender);
    let segment = segment_files(&log.dir()).remove(0);
    let gen = |seq: usize| log.records[seq - 1].record.gen_time_ns;
    garble_entry(&segment, 4, 3, gen(2));
    assert_eq!(in_time_seqs(&log.reader(), gen(2), gen(3)), [2]);

    // Records an hour apart, the third's entry saying 4.5 hours (between the extremes, far
    // from both neighbours): a read of the third hour still has it, by its frame.
    let mut log = Log::new();
    log.gen_step_ns = 3_600_000_000_000;
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(6)).unwrap();
    drop(appender);
    let segment = segment_files(&log.dir()).remove(0);
    let gen = |seq: usize| log.records[seq - 1].record.gen_time_ns;
    garble_entry(&segment, 2, 3, gen(5) - 1_800_000_000_000);
    assert_eq!(in_time_seqs(&log.reader(), gen(3), gen(4)), [3]);
    assert_eq!(
        in_time_seqs(&log.reader(), gen(1), gen(6) + 1),
        [1, 2, 3, 4, 5, 6]
    );
    // Garbled near a neighbour (2 hours and a second, within the slack of the second's): a
    // read of the third hour still has it, its neighbours' span reaching into the range.
    garble_entry(&segment, 2, 3, gen(2) + 1_000_000_000);
    assert_eq!(
        in_time_seqs(&log.reader(), gen(3) - 1_800_000_000_000, gen(3) + 1),
        [3]
    );
    garble_entry(&segment, 2, 3, gen(5) - 1_800_000_000_000);
    // Nor does its entry take it into the range it names.
    assert_eq!(
        in_time_seqs(&log.reader(), gen(5) - 1_800_000_000_000, gen(5)),
        Vec::<u64>::new()
    );
}

#[test]
fn a_garbled_index_hides_no_record_from_a_look_up_by_serial() {
    let log = twelve_commits_of_one();
    let all = segment_files(&log.dir());
    assert!(all.len() >= 4, "{all:?}");
    // The first counter of each closed segment's index zeroed.
    for segment in &all[1..all.len() - 1] {
        garble_entry(segment, 0, 2, 0);
        let first = &log.records[segment.first_seq as usize - 1];
        assert_eq!(
            segments::first_counter(segment).unwrap(),
            Some(first.counter),
            "from the frame"
        );
    }
    let reader = log.reader();
    for r in &log.records {
        assert_eq!(reader.by_counter(0, r.counter).unwrap().as_ref(), Some(r));
    }

    // In one segment of six records, the entry of counter 20 says 40 (neither extreme): the
    // look-up of 40 gets record 4 (counter 40), not record 2.
    let mut log = Log::new();
    let (mut appender, _) = Appender::open(&log.dir(), 1 << 20).unwrap();
    appender.append(&log.chain(6)).unwrap();
    drop(appender);
    let segment = segment_files(&log.dir()).remove(0);
    garble_entry(&segment, 1, 2, 40);
    assert_eq!(
        log.reader().by_counter(0, 40).unwrap().as_ref(),
        Some(&log.records[3])
    );
    // The entry of counter 30 says 0 (the lowest, with the genTime of neither end).
    garble_entry(&segment, 1, 2, 20);
    garble_entry(&segment, 2, 2, 0);
    assert_eq!(
        log.reader().by_counter(0, 30).unwrap().as_ref(),
        Some(&log.records[2])
    );
    // The entry of counter 30 right again, its offset one octet on (inside its frame, where
    // no frame begins): the frames are read instead.
    garble_entry(&segment, 2, 2, 30);
    let offset = segments::offset_of(&segment, 3)
        .unwrap()
        .expect("record 3's frame");
    garble_entry(&segment, 2, 1, offset + 1);
    assert_eq!(
        log.reader().by_counter(0, 30).unwrap().as_ref(),
        Some(&log.records[2])
    );
    // The offset right again, and the entry of counter 20 saying 50 (between the extremes,
    // where the entry of 50 leads to record 5): counter 20 is in no entry, but the frames
    // have it. A counter between them that no record has misses, the frames read once.
    garble_entry(&segment, 2, 1, offset);
    garble_entry(&segment, 1, 2, 50);
    let reader = log.reader();
    assert_eq!(
        reader.by_counter(0, 20).unwrap().as_ref(),
        Some(&log.records[1])
    );
    garble_entry(&segment, 1, 2, 20);
    assert_eq!(reader.by_counter(0, 25).unwrap(), None);
    assert_eq!(reader.agreeing.lock().unwrap().len(), 1, "the index agrees");
    assert_eq!(reader.by_counter(0, 25).unwrap(), None);
}

#[test]
fn derived_files_longer_than_their_segment_justifies_are_damage_not_read() {
    let mut log = Log::new();
    let mut store = log.new_store();
    while segment_files(&log.dir()).len() < 3 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    let closed = &segment_files(&log.dir())[0];
    // Sparse: thousands of times what a segment of LIMIT octets can have entries for.
    for path in [closed.index_path(), closed.imprints_path()] {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(16 << 20).unwrap();
    }
    let damage = store.derived_damage(0).unwrap();
    assert_eq!(damage.len(), 2, "{damage:?}");
    for (line, extension) in damage.iter().zip([".idx", ".imp"]) {
        assert!(
            line.contains(extension) && line.contains("longer than the segment's frames"),
            "{damage:?}"
        );
    }
}

/// Renames `segment`'s files (its frames, index and imprint file) as if it began at `first`.
fn rename_segment(segment: &Segment, first: u64) -> Segment {
    let renamed = Segment::new(segment.path.parent().unwrap(), first);
    fs::rename(&segment.path, &renamed.path).unwrap();
    fs::rename(segment.index_path(), renamed.index_path()).unwrap();
    if segment.imprints_path().exists() {
        fs::rename(segment.imprints_path(), renamed.imprints_path()).unwrap();
    }
    renamed
}

#[test]
fn a_segment_is_where_its_first_frame_says_whatever_its_name() {
    let log = twelve_commits_of_one();
    let segments = segment_files(&log.dir());
    assert!(segments.len() >= 4, "{segments:?}");
    let mut store = log.store();
    assert_eq!(store.misplaced_record(0).unwrap(), None);

    // An anchor in the middle of a segment, which is renamed to begin after it.
    let inside = segments[1].first_seq;
    let renamed = rename_segment(&segments[1], inside + 1);
    let found = store
        .kept_below_anchor(0, inside)
        .unwrap()
        .expect("a record");
    assert_eq!(found, log.records[inside as usize - 1]);
    // Verification says so, without an anchor too.
    let (misplaced, what) = store.misplaced_record(0).unwrap().expect("misplaced");
    assert_eq!(misplaced, log.records[inside as usize - 1]);
    assert!(what.contains(&renamed.path.display().to_string()), "{what}");
    let report = crate::archive::verify::verify(&mut store, &[], &[], &[], None).unwrap();
    let broken = report.instances[0].first_break.clone().expect("a break");
    assert_eq!((broken.seq, broken.what), (inside, what));
}

/// A frame put in among a closed segment's others, at a position below where the walk
/// starts (0 here, without an anchor; its hash made anew, its index and imprint files
/// removed as derived data): the walk verification makes visits it, and the chain breaks
/// there; it passed over every frame of a lower position than its start wherever it was.
#[test]
fn a_frame_of_a_lower_position_put_in_among_the_others_breaks_the_chain() {
    let log = twelve_commits_of_one();
    let segments = segment_files(&log.dir());
    assert!(segments.len() >= 3, "{segments:?}");
    let segment = &segments[1];
    let inside = segment.first_seq + 1;
    let mut forged = log.records[inside as usize - 1].clone();
    forged.seq = 0;
    forged.record.clock.state = "holdover".into();
    forged.hash = forged.computed_hash();
    let mut frame = Vec::new();
    segments::encode_frame(&forged, &mut frame);
    let at = segments::offset_of(segment, inside)
        .unwrap()
        .expect("the frame") as usize;
    let mut octets = fs::read(&segment.path).unwrap();
    octets.splice(at..at, frame);
    fs::write(&segment.path, octets).unwrap();
    for derived in [segment.index_path(), segment.imprints_path()] {
        let _ = fs::remove_file(derived);
    }
    // The walk verification makes (its records are no real tokens here, which it would
    // break on first): the frame put in is visited in its place, where the chain breaks.
    let mut store = log.store();
    let mut seqs = Vec::new();
    store
        .for_each_record(0, 1, &mut |r| {
            seqs.push(r.seq);
            Ok(true)
        })
        .unwrap();
    let expected: Vec<u64> = (1..inside)
        .chain([0])
        .chain(inside..=log.records.len() as u64)
        .collect();
    assert_eq!(seqs, expected);
}

#[test]
fn pruning_removes_only_the_leftovers_a_prune_to_its_anchor_leaves() {
    let mut log = Log::new();
    let mut store = log.new_store();
    while segment_files(&log.dir()).len() < 5 {
        store.append(0, &log.chain(2), &[]).unwrap();
    }
    store.add_checkpoint(&log.checkpoint()).unwrap();
    let before = segment_files(&log.dir());
    let end_of_first = log.records[before[1].first_seq as usize - 2].clone();
    let anchor = |hash| Anchor {
        instance_id: 0,
        seq: end_of_first.seq,
        hash,
        max_counter: end_of_first.counter,
        max_gen_time_ns: end_of_first.record.gen_time_ns,
        pruned_at_ns: 1,
    };
    // An anchor row written by hand at the first segment's end, with its record's hash: a
    // cut before every record removes nothing.
    store
        .db
        .set_anchor(&anchor(end_of_first.hash), None)
        .unwrap();
    let first_gen = log.records[0].record.gen_time_ns;
    // Refused, and said, until someone has looked.
    let refused = |store: &mut LogStore, cut: u64| -> String {
        let why = store.prune(0, cut).expect_err("refused").0;
        assert!(why.contains("nothing is removed until"), "{why}");
        why
    };
    let why = refused(&mut store, first_gen);
    assert!(why.contains("holds records this pruning keeps"), "{why}");
    assert_eq!(segment_files(&log.dir()), before);
    // With another hash, not even a cut past every record.
    store.db.set_anchor(&anchor([9; 32]), None).unwrap();
    let why = refused(&mut store, u64::MAX);
    assert!(why.contains("is not the anchor's"), "{why}");
    assert_eq!(segment_files(&log.dir()), before);
    // A later segment renamed to come first: below the anchor by its name, not by its frames.
    store
        .db
        .set_anchor(&anchor(end_of_first.hash), None)
        .unwrap();
    let renamed = rename_segment(&before[3], 0);
    refused(&mut store, u64::MAX);
    assert_eq!(segment_files(&log.dir()).len(), before.len());
    rename_segment(&renamed, before[3].first_seq);
    // The first segment with the second's frames after its own, and the anchor's record alone
    // in a segment of its own name after it: the last one below the anchor ends with it, the
    // first holds records past it.
    let original = fs::read(&before[0].path).unwrap();
    let mut longer = original.clone();
    longer.extend(fs::read(&before[1].path).unwrap());
    fs::write(&before[0].path, longer).unwrap();
    let alone = Segment::new(&log.dir(), end_of_first.seq);
    let mut frame = Vec::new();
    segments::encode_frame(&end_of_first, &mut frame);
    fs::write(&alone.path, frame).unwrap();
    refused(&mut store, u64::MAX);
    assert_eq!(segment_files(&log.dir()).len(), before.len() + 1);
    fs::write(&before[0].path, original).unwrap();
    fs::remove_file(&alone.path).unwrap();

    // What a prune to that anchor left: its cut removes it, and the pruning goes on.
    let cut = log.records[before[2].first_seq as usize - 1]
        .record
        .gen_time_ns;
    let pruned = store.prune(0, cut).unwrap().expect("the second segment");
    assert_eq!(pruned.seq, before[2].first_seq - 1);
    assert_eq!(segment_files(&log.dir()), before[2..]);
}
