//! Verification of an instance's events: each event's hash against its fields, each one
//! chained to the one before, none missing but where pruning removed them, and the events'
//! head that each checkpoint signs still there.

use std::collections::{BTreeMap, HashSet};

use super::super::record::{Anchor, ChainHead, Checkpoint, EventRecord, Hash, ZERO_HASH};
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
    /// them.
    pub unchained: u64,
    /// Events after the last checkpoint's events head: no checkpoint signs them yet (a
    /// checkpoint's own `archive_checkpoint` event always follows it).
    pub unsigned: u64,
    /// The first event that breaks the chain: its position and what is wrong.
    pub first_break: Option<(u64, String)>,
}

/// Verifies the events of `instance_id` against `checkpoints` (their signatures are checked
/// with the records'). Pruning removes only the chained events that a checkpoint at or below
/// the anchor signed (and keeps the last of each kind among them): a gap in the chain is
/// pruning's only there.
pub fn verify_events(
    store: &mut dyn ArchiveStore,
    instance_id: u32,
    checkpoints: &[Checkpoint],
    anchor: Option<&Anchor>,
) -> Result<EventsReport, StoreError> {
    let prunable = anchor.map_or(0, |a| {
        checkpoints
            .iter()
            .filter(|c| c.seq <= a.seq)
            .filter_map(|c| c.events)
            .map(|e| e.seq)
            .max()
            .unwrap_or(0)
    });
    // The events' heads the checkpoints sign, by position: (hash, the checkpoint's position).
    let signed: BTreeMap<u64, (Hash, u64)> = checkpoints
        .iter()
        .filter_map(|c| {
            c.events
                .filter(|e| e.seq > 0)
                .map(|e| (e.seq, (e.hash, c.seq)))
        })
        .collect();
    let last_signed = signed.keys().next_back().copied().unwrap_or(0);
    let mut report = EventsReport::default();
    let mut seen_signed = HashSet::new();
    // The last chained event read.
    let mut prev: Option<ChainHead> = None;
    loop {
        let page = store.events_after(instance_id, report.last_seq, PAGE)?;
        if page.is_empty() {
            break;
        }
        for e in page {
            report.events += 1;
            if e.seq > last_signed {
                report.unsigned += 1;
            }
            let mut wrong = check_event(&e, prev, report.last_seq, prunable);
            if let Some((hash, at)) = signed.get(&e.seq) {
                seen_signed.insert(e.seq);
                if wrong.is_none() && e.hash != Some(*hash) {
                    wrong = Some(format!(
                        "the checkpoint at {at} signs another event here: this one was changed \
                         and its hash recomputed, or put in its place"
                    ));
                }
            }
            if let Some(what) = wrong {
                report.first_break = Some((e.seq, what));
                return Ok(report);
            }
            match e.hash {
                Some(hash) => {
                    prev = Some(ChainHead { seq: e.seq, hash });
                }
                None => report.unchained += 1,
            }
            report.last_seq = e.seq;
        }
    }
    // The heads the checkpoints sign must be there, but where pruning removed them.
    report.first_break = signed
        .iter()
        .find(|(seq, _)| **seq > prunable && !seen_signed.contains(*seq))
        .map(|(&seq, &(_, at))| {
            let what = match seq > report.last_seq {
                true => format!(
                    "events are missing at the end: the checkpoint at {at} signs events up to \
                     {seq}, the last one stored is {}",
                    report.last_seq
                ),
                false => format!("the event that the checkpoint at {at} signs is missing"),
            };
            (seq, what)
        });
    Ok(report)
}

/// The first thing wrong with `e` as the event after `last_seq`, the last chained one read
/// being `prev`; gaps are pruning's at or below `prunable`.
fn check_event(
    e: &EventRecord,
    prev: Option<ChainHead>,
    last_seq: u64,
    prunable: u64,
) -> Option<String> {
    let Some(hash) = e.hash else {
        // Stored before events were chained: only before every chained one.
        return prev.is_some().then(|| {
            "the event carries no hash, though events before it do: an earlier version, or \
             someone by hand, stored it after them"
                .to_string()
        });
    };
    let Some(prev_hash) = e.prev_hash else {
        return Some("the event has a hash but no previous hash".to_string());
    };
    if e.computed_hash() != Some(hash) {
        return Some(
            "the event's hash does not match its fields: it was changed after it was stored"
                .to_string(),
        );
    }
    let gap = e.seq > last_seq + 1;
    let pruned = e.seq.saturating_sub(1) <= prunable;
    match prev {
        Some(p) if !gap => (prev_hash != p.hash).then(|| {
            format!(
                "the event does not chain to event {} (its previous hash is not that event's)",
                p.seq
            )
        }),
        Some(_) if pruned => None,
        Some(_) => Some(missing(last_seq, e.seq, prunable)),
        // The first chained event: the chain's start (after events stored unchained, if any),
        // or one whose predecessors pruning removed.
        None if prev_hash == ZERO_HASH => None,
        None if gap && pruned => None,
        None if gap => Some(missing(last_seq, e.seq, prunable)),
        None => Some(
            "the event does not start the chain (its previous hash is not zeros), and the \
             event before it carries no hash"
                .to_string(),
        ),
    }
}

fn missing(last_seq: u64, seq: u64, prunable: u64) -> String {
    let first = last_seq + 1;
    let which = match first == seq - 1 {
        true => format!("event {first} is missing"),
        false => format!("events {first} to {} are missing", seq - 1),
    };
    format!(
        "{which}: pruning removes only events that a checkpoint at or below the anchor signed \
         (up to {prunable} here)"
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

    fn unchained(seq: u64) -> EventRecord {
        EventRecord {
            instance_id: 0,
            seq,
            time_ns: seq * 1_000,
            level: "info".into(),
            kind: if seq % 2 == 0 {
                "sync_lost"
            } else {
                "sync_acquired"
            }
            .into(),
            message: format!("event {seq}"),
            fields: "{}".into(),
            prev_hash: None,
            hash: None,
        }
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
        }
    }

    fn anchor(seq: u64) -> Anchor {
        Anchor {
            instance_id: 0,
            seq,
            hash: [9; 32],
            max_counter: seq,
            max_gen_time_ns: 1,
            pruned_at_ns: 1,
        }
    }

    /// Six chained events, the fourth signed by a checkpoint, then `change` to the database,
    /// then verification (without an anchor).
    fn six_then(change: impl FnOnce(&rusqlite::Connection, &[EventRecord])) -> EventsReport {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(1)).unwrap();
        let all = events(1, 6, ZERO_HASH);
        store.append(0, &[], &all).unwrap();
        let signed = checkpoint(1, &all[3]);
        store.add_checkpoint(&signed).unwrap();
        change(store.connection(), &all);
        verify_events(&mut store, 0, &[signed], None).unwrap()
    }

    fn delete(conn: &rusqlite::Connection, seq: u64) {
        conn.execute("DELETE FROM events WHERE seq = ?1", [seq])
            .unwrap();
    }

    /// Writes `e` over the stored event at its position.
    fn rewrite(conn: &rusqlite::Connection, e: &EventRecord) {
        conn.execute(
            "UPDATE events SET message = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            params![
                e.message,
                &e.prev_hash.unwrap()[..],
                &e.hash.unwrap()[..],
                e.seq
            ],
        )
        .unwrap();
    }

    #[test]
    fn chained_events_verify_and_what_changes_them_breaks_them() {
        let report = six_then(|_, _| {});
        assert_eq!(
            report,
            EventsReport {
                events: 6,
                last_seq: 6,
                unchained: 0,
                unsigned: 2,
                first_break: None,
            }
        );

        let report = six_then(|conn, _| {
            conn.execute("UPDATE events SET message = 'edited' WHERE seq = 2", [])
                .unwrap();
        });
        let (seq, what) = report.first_break.unwrap();
        assert_eq!(seq, 2);
        assert!(what.contains("does not match its fields"), "{what}");

        let report = six_then(|conn, _| delete(conn, 3));
        assert_eq!(
            report.first_break.unwrap(),
            (
                4,
                "event 3 is missing: pruning removes only events that a checkpoint at or below \
                 the anchor signed (up to 0 here)"
                    .to_string()
            )
        );

        // The signed event changed, its hash recomputed and the next one chained to it again:
        // each event checks, but the checkpoint signed another.
        let report = six_then(|conn, all| {
            let mut fourth = all[3].clone();
            fourth.message = "edited".into();
            let fourth = fourth.chained(all[2].hash.unwrap());
            let fifth = all[4].clone().chained(fourth.hash.unwrap());
            let sixth = all[5].clone().chained(fifth.hash.unwrap());
            for e in [&fourth, &fifth, &sixth] {
                rewrite(conn, e);
            }
        });
        let (seq, what) = report.first_break.unwrap();
        assert_eq!(seq, 4);
        assert!(what.contains("signs another event here"), "{what}");

        // Events deleted from the end, past what the checkpoint signed: nothing tells.
        let report = six_then(|conn, _| {
            delete(conn, 6);
            delete(conn, 5);
        });
        assert_eq!((report.first_break, report.last_seq), (None, 4));
        // Up to the signed one: the checkpoint tells.
        let report = six_then(|conn, _| {
            for seq in [6, 5, 4] {
                delete(conn, seq);
            }
        });
        let (seq, what) = report.first_break.unwrap();
        assert_eq!(seq, 4);
        assert!(what.contains("events are missing at the end"), "{what}");

        // The first events deleted and the next one made the chain's start: the checkpoint's
        // event is not there.
        let report = six_then(|conn, all| {
            for seq in 1..=5 {
                delete(conn, seq);
            }
            rewrite(conn, &all[5].clone().chained(ZERO_HASH));
        });
        let (seq, what) = report.first_break.unwrap();
        assert_eq!(seq, 4);
        assert!(what.contains("is missing"), "{what}");
    }

    #[test]
    fn gaps_are_pruning_only_at_or_below_what_a_checkpoint_at_the_anchor_signed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(1)).unwrap();
        let all = events(1, 8, ZERO_HASH);
        store.append(0, &[], &all).unwrap();
        // A checkpoint at record 10 signed events up to 3, one at record 20 up to 6.
        let checkpoints = [checkpoint(10, &all[2]), checkpoint(20, &all[5])];
        for c in &checkpoints {
            store.add_checkpoint(c).unwrap();
        }
        let conn = store.connection();
        // Pruned to record 10: events 1 and 3 gone, the second kept (the last of its kind).
        delete(conn, 1);
        delete(conn, 3);
        let report = verify_events(&mut store, 0, &checkpoints, Some(&anchor(10))).unwrap();
        assert_eq!(report.first_break, None);
        assert_eq!((report.events, report.last_seq), (6, 8));
        // Without the anchor, no gap is pruning's.
        let report = verify_events(&mut store, 0, &checkpoints, None).unwrap();
        assert_eq!(report.first_break.unwrap().0, 2);
        // Past what the checkpoint at the anchor signed, a gap is a break.
        delete(store.connection(), 5);
        let report = verify_events(&mut store, 0, &checkpoints, Some(&anchor(10))).unwrap();
        let (seq, what) = report.first_break.unwrap();
        assert_eq!(seq, 6);
        assert!(what.contains("event 5 is missing"), "{what}");
        assert!(what.contains("up to 3 here"), "{what}");
    }

    #[test]
    fn events_stored_before_chaining_come_only_before_the_chained_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(1)).unwrap();
        // An archive of schema 1 migrated: two events without hashes, the chain's start after.
        store.append(0, &[], &[unchained(1), unchained(2)]).unwrap();
        let chained = events(3, 4, ZERO_HASH);
        store.append(0, &[], &chained).unwrap();
        let report = verify_events(&mut store, 0, &[], None).unwrap();
        assert_eq!((report.first_break, report.unchained), (None, 2));

        // An event without a hash after them (an older version writing again).
        store.append(0, &[], &[unchained(5)]).unwrap();
        let (seq, what) = verify_events(&mut store, 0, &[], None)
            .unwrap()
            .first_break
            .unwrap();
        assert_eq!(seq, 5);
        assert!(what.contains("carries no hash"), "{what}");
    }
}
