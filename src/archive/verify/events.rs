//! Verification of an instance's events: each event's hash against its fields (a pruned
//! event's against the body hash it keeps), each chained to the one before with none missing,
//! pruning only where it may prune, and the events' head that each checkpoint signs there (and
//! each head an auditor kept elsewhere, `--expect-events`).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::super::record::{body_hash, ChainHead, Checkpoint, EventRecord, Hash, ZERO_HASH};
use super::super::store::{ArchiveStore, StoreError};

/// Events read per call.
const PAGE: usize = 1_000;

/// What verification found of an instance's events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventsReport {
    /// Events read.
    pub events: u64,
    /// The last one's position.
    pub last_seq: u64,
    /// Of those, events stored before events were chained (schema 1): nothing vouches for
    /// them, and pruning removed some.
    pub unchained: u64,
    /// Of those, events pruning emptied (their message and fields).
    pub pruned: u64,
    /// Events after the last checkpoint's events head: no checkpoint signs them yet (a
    /// checkpoint's own `archive_checkpoint` event always follows it).
    pub unsigned: u64,
    /// The first event that breaks the chain: its position and what is wrong.
    pub first_break: Option<(u64, String)>,
}

/// Who vouches for the event at a position.
#[derive(Clone, Copy, Debug)]
enum Voucher {
    /// The checkpoint at this record position signs it as the events' head.
    Checkpoint(u64),
    /// An events' head kept elsewhere (`--expect-events`): a checkpoint signed again with
    /// later events replaces the one before, so an archive rolled back to an older one
    /// (events removed from the end with it) shows only against such a head.
    Expected,
}

impl Voucher {
    /// The start of a sentence that goes on with a position.
    fn says(self) -> String {
        match self {
            Voucher::Checkpoint(at) => format!("the checkpoint at {at} signs the event at"),
            Voucher::Expected => {
                "the events' head expected (--expect-events) is the event at".into()
            }
        }
    }
}

/// Verifies the events of `instance_id` against `checkpoints` (their signatures are checked
/// with the records') and the events' heads `expected` kept elsewhere. Pruning empties events
/// older than the oldest record kept, but the last of each kind before it: `kept_from` reads
/// that record's genTime (`None`: none is kept) once the events are read, as pruning beside
/// the verification (the server's retention) only raises it, and what any pass emptied lies
/// below what it reads then.
pub fn verify_events(
    store: &mut dyn ArchiveStore,
    instance_id: u32,
    checkpoints: &[Checkpoint],
    expected: &[ChainHead],
    kept_from: impl FnOnce(&mut dyn ArchiveStore) -> Result<Option<u64>, StoreError>,
) -> Result<EventsReport, StoreError> {
    // The events' heads the checkpoints sign, by position, and those expected.
    let mut vouched: BTreeMap<u64, Vec<(Hash, Voucher)>> = BTreeMap::new();
    for c in checkpoints {
        if let Some(e) = c.events.filter(|e| e.seq > 0) {
            vouched
                .entry(e.seq)
                .or_default()
                .push((e.hash, Voucher::Checkpoint(c.seq)));
        }
    }
    // The last a checkpoint signs: what comes after it is unsigned.
    let last_signed = vouched.keys().next_back().copied().unwrap_or(0);
    for e in expected {
        vouched
            .entry(e.seq)
            .or_default()
            .push((e.hash, Voucher::Expected));
    }
    let mut report = EventsReport::default();
    let mut seen_vouched = HashSet::new();
    let mut pruning = Pruning::default();
    // The last chained event read.
    let mut prev: Option<ChainHead> = None;
    let mut from = 0;
    'pages: loop {
        let page = store.events_from(instance_id, from, PAGE)?;
        let Some(last) = page.last() else {
            break;
        };
        from = last.seq.saturating_add(1);
        for e in page {
            report.events += 1;
            if e.seq > last_signed {
                report.unsigned += 1;
            }
            let mut wrong = check_event(&e, prev, report.last_seq);
            if let Some(vouchers) = vouched.get(&e.seq) {
                seen_vouched.insert(e.seq);
                if let Some((_, by)) = vouchers.iter().find(|(hash, _)| e.hash != Some(*hash)) {
                    wrong = wrong.or_else(|| {
                        Some(format!(
                            "{} {} with another hash: this one was changed and its hash \
                             recomputed, or put in its place",
                            by.says(),
                            e.seq
                        ))
                    });
                }
            }
            if let Some(what) = wrong {
                report.first_break = Some((e.seq, what));
                break 'pages;
            }
            if e.pruned() {
                report.pruned += 1;
            }
            pruning.note(&e);
            match e.hash {
                Some(hash) => prev = Some(ChainHead { seq: e.seq, hash }),
                None => report.unchained += 1,
            }
            report.last_seq = e.seq;
        }
    }
    if report.first_break.is_some() {
        return Ok(report);
    }
    // The heads the checkpoints sign, and those expected, must be there.
    report.first_break = vouched
        .iter()
        .find(|(seq, _)| !seen_vouched.contains(*seq))
        .map(|(&seq, vouchers)| {
            let says = vouchers[0].1.says();
            let what = match seq > report.last_seq {
                true => format!(
                    "events are missing at the end: {says} {seq}, the last one stored is {} \
                     (rolled back?)",
                    report.last_seq
                ),
                false => format!("{says} {seq}, which is missing"),
            };
            (seq, what)
        });
    if report.first_break.is_none() {
        report.first_break = pruning.wrong(kept_from(store)?);
    }
    Ok(report)
}

/// What the events show of pruning, to be judged against the oldest record kept once they
/// are read ([`Pruning::wrong`]).
#[derive(Default)]
struct Pruning {
    /// The emptied event with the latest time: (time, position).
    latest_emptied: Option<(u64, u64)>,
    /// Per kind, its last emptied event's position and time, and the earliest time of an
    /// event of the kind after it not emptied (which, old enough, is the later one pruning
    /// kept of the kind).
    kinds: HashMap<String, (u64, u64, Option<u64>)>,
}

impl Pruning {
    fn note(&mut self, e: &EventRecord) {
        if e.pruned() {
            if self.latest_emptied.is_none_or(|(t, _)| e.time_ns > t) {
                self.latest_emptied = Some((e.time_ns, e.seq));
            }
            match self.kinds.get_mut(&e.kind) {
                Some(kind) => *kind = (e.seq, e.time_ns, None),
                None => {
                    self.kinds.insert(e.kind.clone(), (e.seq, e.time_ns, None));
                }
            }
        } else if let Some((_, _, after)) = self.kinds.get_mut(&e.kind) {
            *after = Some(after.map_or(e.time_ns, |t| t.min(e.time_ns)));
        }
    }

    /// What is wrong with the events emptied, the oldest record kept at `kept_from` (`None`:
    /// none is kept): one not older than it, or the last of its kind before it.
    fn wrong(&self, kept_from: Option<u64>) -> Option<(u64, String)> {
        let older = |t: u64| kept_from.is_none_or(|kept| t < kept);
        if let Some((_, seq)) = self.latest_emptied.filter(|(t, _)| !older(*t)) {
            return Some((
                seq,
                "the latest event emptied (as pruning empties events) is not older than the \
                 oldest record kept: pruning keeps such events"
                    .to_string(),
            ));
        }
        self.kinds
            .iter()
            .filter(|(_, (_, _, after))| !after.is_some_and(older))
            .map(|(kind, (seq, _, _))| (*seq, kind))
            .min()
            .map(|(seq, kind)| {
                (
                    seq,
                    format!(
                        "the last {kind} event before the oldest record kept was emptied: \
                         pruning keeps it (the records kept were issued under it)"
                    ),
                )
            })
    }
}

/// The first thing wrong with `e` as the event after position `last_seq`, the last chained
/// one read being `prev`.
fn check_event(e: &EventRecord, prev: Option<ChainHead>, last_seq: u64) -> Option<String> {
    if e.seq == 0 {
        return Some("an event at position 0, where none is stored".to_string());
    }
    let (Some(hash), Some(prev_hash), Some(stored_body)) = (e.hash, e.prev_hash, e.body_hash)
    else {
        // Stored before events were chained: only before every chained one.
        return (prev.is_some() || e.hash.is_some() || e.prev_hash.is_some()).then(|| {
            match prev {
                Some(_) => {
                    "the event carries no hash, though events before it do: an earlier \
                            version, or someone by hand, stored it after them"
                }
                None => "the event carries part of its chain only",
            }
            .to_string()
        });
    };
    if e.pruned() {
        if !e.message.is_empty() {
            return Some("the event's fields were emptied but not its message".to_string());
        }
    } else if body_hash(&e.message, &e.fields) != stored_body {
        return Some(
            "the event's message or fields do not match its body hash: they were changed after \
             it was stored"
                .to_string(),
        );
    }
    if e.computed_hash() != Some(hash) {
        return Some(
            "the event's hash does not match its fields: it was changed after it was stored"
                .to_string(),
        );
    }
    match prev {
        Some(p) if e.seq != p.seq + 1 => Some(missing(p.seq, e.seq)),
        Some(p) => (prev_hash != p.hash).then(|| {
            format!(
                "the event does not chain to event {} (its previous hash is not that event's)",
                p.seq
            )
        }),
        // The first chained event: the chain's start, after events stored unchained if any
        // (pruning removed some of those).
        None if prev_hash == ZERO_HASH => None,
        None if e.seq > last_seq + 1 => Some(missing(last_seq, e.seq)),
        None => Some(
            "the event does not start the chain (its previous hash is not zeros), and the \
             event before it carries no hash"
                .to_string(),
        ),
    }
}

fn missing(last_seq: u64, seq: u64) -> String {
    let first = last_seq + 1;
    let which = match first == seq - 1 {
        true => format!("event {first} is missing"),
        false => format!("events {first} to {} are missing", seq - 1),
    };
    format!(
        "{which}: deleted (pruning empties events, it does not remove them), or dropped by the \
         server when its database could not store them (its log says so)"
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::params;

    use super::*;
    use crate::archive::sqlite::SqliteStore;

    /// Events `from..=to` of instance 0, the first chained after `prev`.
    fn events(from: u64, to: u64, prev: Hash) -> Vec<EventRecord> {
        let mut prev = prev;
        (from..=to)
            .map(|seq| {
                let e = unchained(seq).chained(prev);
                prev = e.hash.unwrap();
                e
            })
            .collect()
    }

    /// At `seq` microseconds, sync lost at even positions and acquired at odd ones.
    fn unchained(seq: u64) -> EventRecord {
        let kind = if seq % 2 == 0 {
            "sync_lost"
        } else {
            "sync_acquired"
        };
        crate::archive::record::tests_support::event(seq, seq * 1_000, kind)
    }

    /// A checkpoint at record position `seq` that signed `events` as the events' head (its
    /// signature is checked with the records', not here).
    fn checkpoint(seq: u64, events: &EventRecord) -> Checkpoint {
        Checkpoint {
            instance_id: 0,
            seq,
            head_hash: [seq as u8; 32],
            time_ns: 1,
            algorithm: vec![],
            signature: vec![1],
            certificate: vec![],
            events: Some(events.head()),
            anchor_seq: 0,
        }
    }

    fn store_in(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(1)).unwrap()
    }

    /// Eight chained events, the fourth signed by a checkpoint, then `change` to the database,
    /// then verification with the oldest record kept at `kept_from_ns`.
    fn eight_then(
        kept_from_ns: Option<u64>,
        change: impl FnOnce(&rusqlite::Connection, &[EventRecord]),
    ) -> EventsReport {
        eight_expecting(|_| Vec::new(), kept_from_ns, change)
    }

    /// [`eight_then`], with the events' heads `expected` picks of the eight kept elsewhere.
    fn eight_expecting(
        expected: impl FnOnce(&[EventRecord]) -> Vec<ChainHead>,
        kept_from_ns: Option<u64>,
        change: impl FnOnce(&rusqlite::Connection, &[EventRecord]),
    ) -> EventsReport {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_in(&dir);
        let all = events(1, 8, ZERO_HASH);
        store.append(0, &[], &all).unwrap();
        let signed = checkpoint(1, &all[3]);
        store.add_checkpoint(&signed).unwrap();
        let expected = expected(&all);
        change(store.connection(), &all);
        verify_events(&mut store, 0, &[signed], &expected, |_| Ok(kept_from_ns)).unwrap()
    }

    fn execute(conn: &rusqlite::Connection, sql: &str) {
        conn.execute(sql, []).unwrap();
    }

    /// Writes `e` over the stored event at its position.
    fn rewrite(conn: &rusqlite::Connection, e: &EventRecord) {
        conn.execute(
            "UPDATE events SET kind = ?1, message = ?2, fields = ?3, prev_hash = ?4, \
             body_hash = ?5, hash = ?6 WHERE seq = ?7",
            params![
                e.kind,
                e.message,
                e.fields,
                &e.prev_hash.unwrap()[..],
                &e.body_hash.unwrap()[..],
                &e.hash.unwrap()[..],
                e.seq
            ],
        )
        .unwrap();
    }

    /// The stored events from index `from` of `all` on, each changed by `edit` (given its
    /// index) and chained again to the one before: every hash recomputed, as a forger would.
    fn rechain_from(
        conn: &rusqlite::Connection,
        all: &[EventRecord],
        from: usize,
        edit: impl Fn(usize, &mut EventRecord),
    ) {
        let mut prev = all[from - 1].hash.unwrap();
        for (i, e) in all.iter().enumerate().skip(from) {
            let mut e = e.clone();
            edit(i, &mut e);
            let e = e.chained(prev);
            rewrite(conn, &e);
            prev = e.hash.unwrap();
        }
    }

    fn broken_at(report: EventsReport, seq: u64, what: &str) {
        let (at, found) = report.first_break.expect(what);
        assert_eq!(at, seq, "{found}");
        assert!(found.contains(what), "{found}");
    }

    #[test]
    fn chained_events_verify_and_what_changes_them_breaks_them() {
        let report = eight_then(None, |_, _| {});
        assert_eq!(
            report,
            EventsReport {
                events: 8,
                last_seq: 8,
                unchained: 0,
                pruned: 0,
                unsigned: 4,
                first_break: None,
            }
        );
        let report = eight_then(None, |conn, _| {
            execute(conn, "UPDATE events SET message = 'edited' WHERE seq = 2")
        });
        broken_at(report, 2, "do not match its body hash");
        let report = eight_then(None, |conn, _| {
            execute(conn, "UPDATE events SET level = 'debug' WHERE seq = 2")
        });
        broken_at(report, 2, "hash does not match its fields");
        let report = eight_then(None, |conn, _| {
            execute(conn, "DELETE FROM events WHERE seq = 3")
        });
        broken_at(report, 4, "event 3 is missing: deleted");

        // The signed event changed, its hash recomputed and those after it chained to it
        // again: each event checks, but the checkpoint signed another.
        let report = eight_then(None, |conn, all| {
            rechain_from(conn, all, 3, |i, e| {
                if i == 3 {
                    e.message = "edited".into();
                }
            })
        });
        broken_at(
            report,
            4,
            "the checkpoint at 1 signs the event at 4 with another hash",
        );

        // Events deleted from the end, past what the checkpoint signed: nothing tells.
        let report = eight_then(None, |conn, _| {
            execute(conn, "DELETE FROM events WHERE seq > 4")
        });
        assert_eq!((report.first_break, report.last_seq), (None, 4));
        // Up to the signed one: the checkpoint tells.
        let report = eight_then(None, |conn, _| {
            execute(conn, "DELETE FROM events WHERE seq > 3")
        });
        broken_at(report, 4, "events are missing at the end");

        // Past it, a head kept elsewhere tells (a checkpoint signed again with later events
        // replaced, with those events deleted, by the one before), as it tells one changed.
        let seventh = |all: &[EventRecord]| vec![all[6].head()];
        let report = eight_expecting(seventh, None, |_, _| {});
        assert_eq!(report.first_break, None);
        let report = eight_expecting(seventh, None, |conn, _| {
            execute(conn, "DELETE FROM events WHERE seq > 6")
        });
        broken_at(
            report,
            7,
            "events are missing at the end: the events' head expected (--expect-events) is \
             the event at 7, the last one stored is 6 (rolled back?)",
        );
        let report = eight_expecting(seventh, None, |conn, all| {
            rechain_from(conn, all, 6, |_, e| e.message = "edited".into())
        });
        broken_at(
            report,
            7,
            "expected (--expect-events) is the event at 7 with another hash",
        );
        // The first events deleted and the next one made the chain's start: the checkpoint's
        // event is not there.
        let report = eight_then(None, |conn, all| {
            execute(conn, "DELETE FROM events WHERE seq < 6");
            let mut prev = ZERO_HASH;
            for e in &all[5..] {
                let e = e.clone().chained(prev);
                rewrite(conn, &e);
                prev = e.hash.unwrap();
            }
        });
        broken_at(report, 4, "is missing");
        // An event at position 0 (reads from 0 on see it).
        let report = eight_then(None, |conn, _| {
            execute(
                conn,
                "INSERT INTO events SELECT instance_id, 0, time_ns, level, kind, message, \
                 fields, prev_hash, body_hash, hash FROM events WHERE seq = 1",
            )
        });
        broken_at(report, 0, "position 0");
        // One at a negative position is read too: an error, not passed over.
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_in(&dir);
        store.append(0, &[], &events(1, 2, ZERO_HASH)).unwrap();
        execute(
            store.connection(),
            "INSERT INTO events SELECT instance_id, -1, time_ns, level, kind, message, fields, \
             prev_hash, body_hash, hash FROM events WHERE seq = 1",
        );
        assert!(verify_events(&mut store, 0, &[], &[], |_| Ok(None)).is_err());
    }

    #[test]
    fn pruning_empties_events_older_than_the_records_kept_but_the_last_of_each_kind() {
        // The oldest record kept is at 6.5 µs: events 1 to 6 are old enough, and the last
        // of each kind among them (5 and 6) stays.
        let kept = Some(6_500);
        let prune = |conn: &rusqlite::Connection, seqs: &str| {
            execute(
                conn,
                &format!("UPDATE events SET message = '', fields = '' WHERE seq IN ({seqs})"),
            )
        };
        let report = eight_then(kept, |conn, _| prune(conn, "1, 2, 3, 4"));
        assert_eq!((report.first_break, report.pruned), (None, 4));
        let report = eight_then(kept, |conn, _| prune(conn, "1, 2, 3, 4, 7"));
        broken_at(report, 7, "not older than the oldest record kept");
        let report = eight_then(kept, |conn, _| prune(conn, "1, 2, 3, 4, 6"));
        broken_at(
            report,
            6,
            "the last sync_lost event before the oldest record kept",
        );
        let report = eight_then(kept, |conn, _| {
            prune(conn, "1, 2, 3, 4");
            execute(conn, "UPDATE events SET fields = '' WHERE seq = 5");
        });
        broken_at(report, 5, "emptied but not its message");
        // What pruning emptied still holds its place: one deleted, or changed, shows.
        let report = eight_then(kept, |conn, _| {
            prune(conn, "1, 2, 3, 4");
            execute(conn, "DELETE FROM events WHERE seq = 2");
        });
        broken_at(report, 3, "event 2 is missing");
        let report = eight_then(kept, |conn, _| {
            prune(conn, "1, 2, 3, 4");
            execute(conn, "UPDATE events SET kind = 'key_loaded' WHERE seq = 2");
        });
        broken_at(report, 2, "hash does not match its fields");
    }

    #[test]
    fn events_stored_before_chaining_come_only_before_the_chained_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_in(&dir);
        // An archive of schema 1 migrated: events without hashes (the second pruned), the
        // chain's start after them.
        store.append(0, &[], &[unchained(1), unchained(3)]).unwrap();
        store.append(0, &[], &events(4, 5, ZERO_HASH)).unwrap();
        let report = verify_events(&mut store, 0, &[], &[], |_| Ok(None)).unwrap();
        assert_eq!((report.first_break, report.unchained), (None, 2));

        // An event without a hash after them (an older version writing again).
        store.append(0, &[], &[unchained(6)]).unwrap();
        let report = verify_events(&mut store, 0, &[], &[], |_| Ok(None)).unwrap();
        broken_at(report, 6, "carries no hash");
    }
}
