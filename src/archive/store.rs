//! The storage behind the archive, as one trait: SQLite ([`super::sqlite`]) and PostgreSQL
//! ([`super::postgres`]) implement it over the same schema ([`schema`] with `BYTEA` for
//! `BLOB`).
//!
//! The archive calls a store from one writer thread (appends, reservations, checkpoints,
//! pruning) and from readers (look-ups, export, verification), each with its own store value,
//! so a store is `Send` and needs no internal locking. Every method that writes returns only
//! once what it wrote is durable (committed with the write-ahead log synced).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::hash_map::{Entry, HashMap};
use std::collections::BinaryHeap;
use std::path::PathBuf;

use super::record::{
    join_certificates, sha256, split_certificates, Anchor, AnchorSignature, ChainHead, Checkpoint,
    EventRecord, Hash, StoredRecord,
};

#[derive(Debug, thiserror::Error)]
#[error("archive storage: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// What the archive knows of one instance at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceState {
    /// Counters below this may have been handed out (the last durable reservation).
    pub reserved_until: u64,
    /// The highest counter archived (or pruned), if any.
    pub max_counter: Option<u64>,
    /// The latest genTime archived (or pruned, or written with a reservation), 0 if none.
    pub max_gen_time_ns: u64,
    /// The chain's last record (or the anchor when everything was pruned).
    pub head: Option<ChainHead>,
    pub anchor: Option<Anchor>,
    /// The last event's position and hash (zeros for one stored unchained, or none).
    pub last_event: ChainHead,
}

impl InstanceState {
    /// What a backend read, folded the same way for every backend: the maxima over the live
    /// records and over the instance row, and the pruning anchor, which stands for everything
    /// pruned (the chain's head when nothing is left).
    pub fn combine(
        reserved_until: u64,
        max_counters: [Option<u64>; 2],
        max_gen_times_ns: [Option<u64>; 2],
        head: Option<ChainHead>,
        anchor: Option<Anchor>,
        last_event: Option<ChainHead>,
    ) -> Self {
        let max_counter = max_counters
            .into_iter()
            .chain([anchor.map(|a| a.max_counter)])
            .flatten()
            .max();
        let max_gen_time_ns = max_gen_times_ns
            .into_iter()
            .chain([anchor.map(|a| a.max_gen_time_ns)])
            .flatten()
            .max()
            .unwrap_or(0);
        Self {
            reserved_until,
            max_counter,
            max_gen_time_ns,
            head: head.or(anchor.map(|a| ChainHead {
                seq: a.seq,
                hash: a.hash,
            })),
            anchor,
            last_event: last_event.unwrap_or(ChainHead::EMPTY),
        }
    }
}

/// Records a rows or PostgreSQL prune removes at most in one call, one transaction: the
/// instance's commits wait for it (SQLite's write lock, PostgreSQL's instance row), and a
/// first prune over years of records would hold them for minutes. The writer's retention goes
/// on a step a second until nothing is left; `tsa archive prune` step after step.
#[cfg(not(test))]
pub const PRUNE_ROWS: u64 = 20_000;
#[cfg(test)]
pub const PRUNE_ROWS: u64 = 3;

/// What a locked prune found ([`prune_signed_unlocked`]).
pub(super) enum Pruned {
    /// Done, as planned: the anchor stored, if any.
    Done(Option<Anchor>),
    /// Not done: the cut is no longer the one signed (another prune, a checkpoint, records
    /// arrived); this is the anchor it would take now.
    Moved(Option<Anchor>),
}

/// Rounds of [`prune_signed_unlocked`] before it gives up.
const PRUNE_ROUNDS: usize = 4;

/// A rows or PostgreSQL prune with its anchor signed while nothing is locked: a signer that is
/// slow or hung (an HSM) must not hold the instance's commits (SQLite's write lock,
/// PostgreSQL's instance row) for as long as it takes. `plan` reads the cut without a lock
/// (the anchor it would store); `commit` locks, reads the cut again and prunes only when it is
/// the one signed (the anchor's time apart), else answers the one it found to be signed in
/// another round.
pub(super) fn prune_signed_unlocked<S: ?Sized>(
    store: &mut S,
    sign: &SignAnchor<'_>,
    plan: impl FnOnce(&mut S) -> Result<Option<Anchor>, StoreError>,
    mut commit: impl FnMut(
        &mut S,
        Option<&(Anchor, Option<AnchorSignature>)>,
    ) -> Result<Pruned, StoreError>,
) -> Result<Option<Anchor>, StoreError> {
    let mut planned = plan(store)?;
    for _ in 0..PRUNE_ROUNDS {
        let signed = match planned {
            Some(anchor) => Some((anchor, sign(&anchor).map_err(StoreError)?)),
            None => None,
        };
        match commit(store, signed.as_ref())? {
            Pruned::Done(anchor) => return Ok(anchor),
            Pruned::Moved(found) => planned = found,
        }
    }
    Err(StoreError(format!(
        "the instance's oldest records moved each time an anchor was signed for them \
         ({PRUNE_ROUNDS} rounds: another prune at work?); nothing was pruned, try again"
    )))
}

/// Whether two planned anchors cut at the same place (their times apart).
pub(super) fn same_cut(a: Option<&Anchor>, b: Option<&Anchor>) -> bool {
    let cut = |a: Option<&Anchor>| a.map(|a| (a.seq, a.hash, a.max_counter, a.max_gen_time_ns));
    cut(a) == cut(b)
}

/// What follows the last record an instance's reads reach ([`ArchiveStore::unread_tail`]).
#[derive(Debug, PartialEq, Eq)]
pub enum UnreadTail {
    /// A commit that did not complete (its requests were never answered), this long: the
    /// next start cuts it off, keeping a copy.
    Torn { octets: u64 },
    /// What no crash leaves, and why: the next start refuses to start on it.
    Damaged(String),
}

/// What a look-up by imprint found: the newest matching records, as many as were asked for
/// at most, and how many match in all. An imprint may have been stamped millions of times
/// (the hash of an empty file), so a look-up never holds every match.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImprintMatches {
    /// In the order of [`Rank`]: the latest genTime first.
    pub records: Vec<StoredRecord>,
    /// Every record with the imprint, those not in `records` too.
    pub total: u64,
}

/// Where a record stands in the order look-ups by imprint answer in: the greater first,
/// that is the later genTime, then the lower instance, then the later position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    gen_time_ns: u64,
    instance_id: Reverse<u32>,
    seq: u64,
}

impl Rank {
    pub fn new(gen_time_ns: u64, instance_id: u32, seq: u64) -> Self {
        Self {
            gen_time_ns,
            instance_id: Reverse(instance_id),
            seq,
        }
    }
}

/// The `limit` greatest [`Rank`]s of the matches a store goes through one at a time, each
/// with what the store needs of it, and how many it went through: a store that cannot order
/// and count its matches in a query holds no more than `limit` of them at once.
pub struct Newest<T> {
    limit: usize,
    /// The oldest kept on top: it goes when a newer one comes and there is no room.
    kept: BinaryHeap<Reverse<Ranked<T>>>,
    total: u64,
}

/// An item ordered by its rank alone.
struct Ranked<T>(Rank, T);

impl<T> PartialEq for Ranked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T> Eq for Ranked<T> {}

impl<T> PartialOrd for Ranked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Ranked<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl<T> Newest<T> {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            kept: BinaryHeap::new(),
            total: 0,
        }
    }

    /// Counts a match, and keeps `item` while `rank` is among the `limit` greatest so far.
    /// Gives back the item it does not keep (this one, or the oldest kept, which this one
    /// displaces), so that a store that keeps buffers can use it again.
    pub fn offer(&mut self, rank: Rank, item: T) -> Option<T> {
        self.total += 1;
        if self.kept.len() < self.limit {
            self.kept.push(Reverse(Ranked(rank, item)));
            None
        } else if self.kept.peek().is_some_and(|oldest| rank > oldest.0 .0) {
            let displaced = self.kept.pop().map(|Reverse(Ranked(_, item))| item);
            self.kept.push(Reverse(Ranked(rank, item)));
            displaced
        } else {
            Some(item)
        }
    }

    /// The items kept, the greatest rank first, and how many matches were offered.
    pub fn finish(self) -> (Vec<T>, u64) {
        let items = self
            .kept
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(Ranked(_, item))| item)
            .collect();
        (items, self.total)
    }
}

/// Told whether an append's records became durable ([`ArchiveStore::append_then`]).
pub type Durable = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// Signs an anchor a prune is about to store ([`ArchiveStore::prune_signed`]); `None` leaves
/// it unsigned.
pub type SignAnchor<'a> = dyn Fn(&Anchor) -> Result<Option<AnchorSignature>, String> + Sync + 'a;

/// A visitor over records; returns `false` to stop.
pub type Visit<'a> = dyn FnMut(StoredRecord) -> Result<bool, StoreError> + 'a;

pub trait ArchiveStore: Send {
    /// The instance's state (all zero / `None` for an instance never seen).
    fn instance(&mut self, instance_id: u32) -> Result<InstanceState, StoreError>;

    /// Every instance that has records, an anchor, a reservation, checkpoints or events.
    fn instances(&mut self) -> Result<Vec<u32>, StoreError>;

    /// Records durably that counters below `until` may be handed out (never lowers it), and
    /// raises the instance's genTime floor to `gen_time_floor_ns`.
    fn reserve(
        &mut self,
        instance_id: u32,
        until: u64,
        gen_time_floor_ns: u64,
    ) -> Result<(), StoreError>;

    /// Appends chained records and events in one transaction, all or nothing. A serial, or a
    /// counter of the instance, that is already archived makes the whole append fail.
    fn append(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
    ) -> Result<(), StoreError>;

    /// [`ArchiveStore::append`] that may return before the records are durable: once they
    /// are written after those of earlier appends. `durable` is told, here or later on
    /// another thread, whether they became durable (after the earlier appends' were told,
    /// unless these records are refused at once: they do not follow, say); a failure returned
    /// here was told to it too. Records appended after ones that did not become durable are
    /// refused (they were chained to them): the writer then reads the instance's head again
    /// ([`ArchiveStore::instance`]). The default commits in one step.
    fn append_then(
        &mut self,
        instance_id: u32,
        records: &[StoredRecord],
        events: &[EventRecord],
        durable: Durable,
    ) -> Result<(), StoreError> {
        let appended = self.append(instance_id, records, events);
        durable(appended.as_ref().map(|_| ()));
        appended
    }

    /// Waits until the records of every [`ArchiveStore::append_then`] are durable or known
    /// not to be; an error when some were not, since the last call that returned one.
    fn settle(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Work a commit leaves for after its requests are answered (the token log writes room
    /// ahead for the next commits here). Failures are the store's to log: nothing waits on it.
    fn after_append(&mut self) {}

    /// Stores a checkpoint: one per position, replaced by one that signs the same head with
    /// a later events' head ([`RESIGN_CHECKPOINT`]); one that signs another head there is
    /// refused.
    fn add_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError>;

    /// The instance's checkpoints by position.
    fn checkpoints(&mut self, instance_id: u32) -> Result<Vec<Checkpoint>, StoreError>;

    fn record_by_serial(&mut self, serial: &[u8]) -> Result<Option<StoredRecord>, StoreError>;

    /// The records whose imprint is `imprint` (any algorithm): the `limit` with the latest
    /// genTimes, in the order of [`Rank`], and how many there are in all. However many match,
    /// the store holds at most `limit` tokens at once (counting reads none, or one at a time).
    fn records_by_imprint(
        &mut self,
        imprint: &[u8],
        limit: usize,
    ) -> Result<ImprintMatches, StoreError> {
        self.records_by_imprint_of(None, imprint, limit)
    }

    /// [`ArchiveStore::records_by_imprint`], of the imprint's algorithm `alg` (a dotted OID)
    /// alone where one is given: the same octets under SHA-256 and SHA3-256 are two imprints.
    fn records_by_imprint_of(
        &mut self,
        alg: Option<&str>,
        imprint: &[u8],
        limit: usize,
    ) -> Result<ImprintMatches, StoreError>;

    /// The instance's records in chain order, from position `from_seq` on.
    fn for_each_record(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;

    /// A record at or below `anchor_seq` that pruning to that anchor would have removed: one
    /// there was put back, or the anchor was written over records it does not stand for.
    /// (Rows and PostgreSQL delete them in the anchor's transaction: any one is such.)
    fn kept_below_anchor(
        &mut self,
        instance_id: u32,
        anchor_seq: u64,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let mut found = None;
        // From position 0: one put in there is as out of place as one below the anchor.
        self.for_each_record(instance_id, 0, &mut |r| {
            if r.seq <= anchor_seq {
                found = Some(r);
            }
            Ok(false)
        })?;
        Ok(found)
    }

    /// A record stored where reads do not look for it, and what is wrong (the token log's
    /// segment whose first frame is not at the position its name says), for verification to
    /// report as a break. None elsewhere (rows are found by their own columns).
    fn misplaced_record(
        &mut self,
        _instance_id: u32,
    ) -> Result<Option<(StoredRecord, String)>, StoreError> {
        Ok(None)
    }

    /// Records of every instance with `from_ns <= genTime < to_ns`, by genTime.
    fn for_each_in_time(
        &mut self,
        from_ns: u64,
        to_ns: u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;

    /// Events of every instance with `from_ns <= time < to_ns`, by time.
    fn events(&mut self, from_ns: u64, to_ns: u64) -> Result<Vec<EventRecord>, StoreError>;

    /// The instance's anchor and its signature, read together (none: nothing was pruned).
    fn signed_anchor(
        &mut self,
        instance_id: u32,
    ) -> Result<Option<(Anchor, Option<AnchorSignature>)>, StoreError>;

    /// The instance's events from position `from_seq` on, by position, `limit` at most.
    fn events_from(
        &mut self,
        instance_id: u32,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Removes the instance's oldest records while their genTime is before `before_ns` and
    /// their position is at or below the instance's last signed checkpoint (none: no record
    /// goes), keeping the last removed one's hash as the chain's anchor. Events older than
    /// both `before_ns` and the oldest record kept, but the last of each kind, are emptied
    /// (their message and fields; they keep their place in the events' chain), or removed
    /// where stored unchained (schema 1). The new anchor is stored with its signature by
    /// `sign`, which is asked before the instance is locked (a signature that fails prunes
    /// nothing). Returns the new anchor, `None` when no record was removed.
    fn prune_signed(
        &mut self,
        instance_id: u32,
        before_ns: u64,
        sign: &SignAnchor<'_>,
    ) -> Result<Option<Anchor>, StoreError>;

    /// [`ArchiveStore::prune_signed`], the anchor unsigned (tests).
    fn prune(&mut self, instance_id: u32, before_ns: u64) -> Result<Option<Anchor>, StoreError> {
        self.prune_signed(instance_id, before_ns, &|_| Ok(None))
    }

    /// Damage to data derived from an instance's records that look-ups trust (the token log's
    /// index and imprint files): a line for each, for verification to warn of. None elsewhere
    /// (the rows layout and PostgreSQL index within their databases).
    fn derived_damage(&mut self, _instance_id: u32) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Copies of torn tails the start cut off (the token log's `<segment>.log.torn-<offset>`),
    /// with their lengths, for verification to warn of until the operator has looked at them.
    fn torn_copies(&mut self, _instance_id: u32) -> Result<Vec<(PathBuf, u64)>, StoreError> {
        Ok(Vec::new())
    }

    /// What follows the last record an instance's reads reach, where the next start would cut
    /// it off or refuse to start on it (the token log's newest segment). None elsewhere.
    fn unread_tail(&mut self, _instance_id: u32) -> Result<Option<UnreadTail>, StoreError> {
        Ok(None)
    }

    /// Octets free to the store's files, where the store can tell: a local database's
    /// filesystem. `None` for a database server, whose disk is its own affair.
    fn free_space(&self) -> Option<u64> {
        None
    }

    /// After a failed write, before the writer's recovery counts the store as writable again:
    /// a durable write where the records go, if the recovery's own (its events) goes
    /// elsewhere. The default has none to make.
    fn probe(&mut self, _instance_id: u32) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The position an events read from `from_seq` starts at, as both backends store it: from 0,
/// every position, a negative one too (none is stored honestly, and reading one fails rather
/// than pass it over).
pub fn events_read_start(from_seq: u64) -> i64 {
    match from_seq {
        0 => i64::MIN,
        from => i64::try_from(from).unwrap_or(i64::MAX),
    }
}

/// How a checkpoint stored at a position that has one already goes in (SQLite and
/// PostgreSQL alike): one that signs the same head with a later events' head replaces it (the
/// writer signs its head again where only events came: it vouches for all the earlier one
/// did, the events' chain being linked); anything else leaves the row, for the caller to
/// compare.
pub const RESIGN_CHECKPOINT: &str = "ON CONFLICT (instance_id, seq) DO UPDATE SET \
     time_ns = excluded.time_ns, algorithm = excluded.algorithm, \
     signature = excluded.signature, certificate = excluded.certificate, \
     events_seq = excluded.events_seq, events_hash = excluded.events_hash, \
     anchor_seq = excluded.anchor_seq \
     WHERE checkpoints.head_hash = excluded.head_hash \
     AND excluded.events_seq > COALESCE(checkpoints.events_seq, -1)";

/// The columns of `tokens` in the order both backends write and read a record.
pub const RECORD_COLUMNS: &str = "instance_id, seq, serial, counter, gen_time_ns, accuracy_ns, \
     imprint_alg, imprint, policy, nonce, client, clock_source, clock_state, clock_bound_ns, \
     clock_sources, token, prev_hash, hash, certificates";

/// The schema, for SQLite (`blob` = "BLOB") and PostgreSQL (`blob` = "BYTEA"): only types
/// and statements both understand. Integers are signed 64-bit (counters and nanosecond
/// times stay below 2^63); hashes are 32 octets.
///
/// A serial is found through its instance and counter (unique together; the serial is made
/// of them). `tokens.token` holds the token without its certificates when it carried some:
/// `tokens.certificates` is then the SHA-256 of that field, stored once in
/// `certificate_sets` (see `record::split_certificates`); a store gives records back with the
/// whole token.
pub fn schema(blob: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS archive_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id BIGINT PRIMARY KEY,
    reserved_until BIGINT NOT NULL,
    max_counter BIGINT,
    max_gen_time_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    instance_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    serial {blob} NOT NULL,
    counter BIGINT NOT NULL,
    gen_time_ns BIGINT NOT NULL,
    accuracy_ns BIGINT NOT NULL,
    imprint_alg TEXT NOT NULL,
    imprint {blob} NOT NULL,
    policy TEXT NOT NULL,
    nonce {blob},
    client TEXT,
    clock_source TEXT NOT NULL,
    clock_state TEXT NOT NULL,
    clock_bound_ns BIGINT NOT NULL,
    clock_sources TEXT NOT NULL,
    token {blob} NOT NULL,
    certificates {blob},
    prev_hash {blob} NOT NULL,
    hash {blob} NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_counter ON tokens (instance_id, counter);
CREATE INDEX IF NOT EXISTS tokens_gen_time ON tokens (gen_time_ns);
CREATE TABLE IF NOT EXISTS certificate_sets (
    hash {blob} PRIMARY KEY,
    der {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS chain_anchors (
    instance_id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash {blob} NOT NULL,
    max_counter BIGINT NOT NULL,
    max_gen_time_ns BIGINT NOT NULL,
    pruned_at_ns BIGINT NOT NULL,
    algorithm {blob},
    signature {blob},
    certificate {blob}
);
CREATE TABLE IF NOT EXISTS checkpoints (
    instance_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    head_hash {blob} NOT NULL,
    time_ns BIGINT NOT NULL,
    algorithm {blob} NOT NULL,
    signature {blob} NOT NULL,
    certificate {blob} NOT NULL,
    events_seq BIGINT,
    events_hash {blob},
    anchor_seq BIGINT,
    PRIMARY KEY (instance_id, seq)
);
CREATE TABLE IF NOT EXISTS events (
    instance_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    time_ns BIGINT NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    fields TEXT NOT NULL,
    prev_hash {blob},
    body_hash {blob},
    hash {blob},
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ns);
{EVENTS_UNPRUNED}
"
    )
}

/// `CREATE INDEX {how}` of the imprint index: one definition for both ways of building it.
macro_rules! imprint_index {
    ($how:literal) => {
        concat!(
            "CREATE INDEX ",
            $how,
            " tokens_imprint_newest ON tokens (imprint, gen_time_ns DESC, instance_id, seq DESC);"
        )
    };
}

/// The index of records by imprint, for look-ups of a lost token, in the order look-ups
/// answer in ([`Rank`]): the newest `limit` of an imprint stamped a million times are read
/// from its start, and the others counted in the index alone. PostgreSQL keeps it on `tokens`;
/// SQLite in a database of its own, out of the commit path ([`super::imprints`]).
pub const IMPRINT_INDEX: &str = imprint_index!("IF NOT EXISTS");

/// [`IMPRINT_INDEX`] built beside running servers (PostgreSQL: inserts go on meanwhile; not
/// in a transaction).
pub const IMPRINT_INDEX_CONCURRENTLY: &str = imprint_index!("CONCURRENTLY");

/// The index by imprint alone, of PostgreSQL archives made before [`IMPRINT_INDEX`]: kept
/// where that one is not built yet.
pub const OLD_IMPRINT_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS tokens_imprint ON tokens (imprint);";

/// The schema version in `archive_meta` (name `schema`): 2 since events are chained and
/// checkpoints sign their head.
pub const SCHEMA_VERSION: &str = "2";

/// The events pruning has not emptied, for pruning to read only those: a pass costs what came
/// since the last one, not every event of the retention.
const EVENTS_UNPRUNED: &str =
    "CREATE INDEX IF NOT EXISTS events_unpruned ON events (instance_id, time_ns) WHERE fields <> '';";

/// What pruning does to an instance's events before a time, in the two statements of either
/// backend (`param(n)`: its n-th parameter, `?n` or `$n`; the instance, then the time). A
/// chained event is emptied (its message and fields: its hash covers their hash, so it keeps
/// its place in the events' chain), one stored unchained (schema 1) removed; the last of each
/// kind before the time stays (the records kept were issued under it). Only events not
/// emptied yet are read, through `events_unpruned`: while the time only rises from pass to
/// pass, the last of a kind before it is never one emptied before; where it falls (a
/// `tsa archive prune --before` later than the retention's cut, then the retention's pass),
/// the pass empties nothing the last of the kind among all would have kept.
pub fn prune_events(param: fn(u8) -> String) -> [String; 2] {
    let (id, before) = (param(1), param(2));
    let old = format!("instance_id = {id} AND time_ns < {before} AND fields <> ''");
    let last_of_kind = format!("SELECT MAX(seq) FROM events WHERE {old} GROUP BY kind");
    [
        format!(
            "UPDATE events SET message = '', fields = '' WHERE {old} AND hash IS NOT NULL \
             AND seq NOT IN ({last_of_kind})"
        ),
        format!("DELETE FROM events WHERE {old} AND hash IS NULL AND seq NOT IN ({last_of_kind})"),
    ]
}

/// Logs (and so archives, as its first chained event) a migration from schema 1 that
/// committed.
pub fn migrated_from_1() {
    tracing::info!(
        event = "archive_schema_migrated",
        from = SCHEMA_VERSION_1,
        to = SCHEMA_VERSION,
        "the archive's events are chained from now on, and checkpoints sign them"
    );
}

/// The columns of `events` in the order both backends write and read an event; in a schema-1
/// archive (`chained` false) the chain's three as nulls (`blob` as for [`schema`]).
pub fn event_columns(chained: bool, blob: &str) -> String {
    let chain = match chained {
        true => "prev_hash, body_hash, hash".to_string(),
        false => format!("CAST(NULL AS {blob}), CAST(NULL AS {blob}), CAST(NULL AS {blob})"),
    };
    format!("instance_id, seq, time_ns, level, kind, message, fields, {chain}")
}

/// The columns of `checkpoints` in the order both backends read a checkpoint; in a schema-1
/// archive the events' head as nulls.
pub fn checkpoint_columns(chained: bool, blob: &str) -> String {
    let events = match chained {
        true => "events_seq, events_hash, anchor_seq".to_string(),
        false => format!("CAST(NULL AS BIGINT), CAST(NULL AS {blob}), CAST(NULL AS BIGINT)"),
    };
    format!("instance_id, seq, head_hash, time_ns, algorithm, signature, certificate, {events}")
}

/// The version before: events without hashes, checkpoints without their head. Opened for
/// writing, such an archive is migrated ([`migrate_from_1`]); read, it shows them as `None`.
pub const SCHEMA_VERSION_1: &str = "1";

/// The columns schema 2 adds to schema 1: table, column, and type (`None`: the blob type).
const ADDED_IN_2: [(&str, &str, Option<&str>); 9] = [
    ("events", "prev_hash", None),
    ("events", "body_hash", None),
    ("events", "hash", None),
    ("checkpoints", "events_seq", Some("BIGINT")),
    ("checkpoints", "events_hash", None),
    ("checkpoints", "anchor_seq", Some("BIGINT")),
    ("chain_anchors", "algorithm", None),
    ("chain_anchors", "signature", None),
    ("chain_anchors", "certificate", None),
];

/// The columns that schema 2 adds to schema 1 (`blob` as for [`schema`]): null in the rows
/// written before, which verification takes as written before events were chained.
pub fn migrate_from_1(blob: &str) -> String {
    let mut sql = String::new();
    for (table, column, kind) in ADDED_IN_2 {
        let kind = kind.unwrap_or(blob);
        sql.push_str(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {kind};\n"
        ));
    }
    sql.push_str(EVENTS_UNPRUNED);
    sql.push_str(&format!(
        "\nUPDATE archive_meta SET value = '{SCHEMA_VERSION}' WHERE name = 'schema';\n"
    ));
    sql
}

/// An archive of schema 2 made back into what schema 1 was (its new columns dropped, with
/// what they held), for the migration's tests; never run on an archive.
pub fn back_to_1_for_tests() -> String {
    let mut sql = String::new();
    for (table, column, _) in ADDED_IN_2 {
        sql.push_str(&format!("ALTER TABLE {table} DROP COLUMN {column};\n"));
    }
    sql.push_str(&format!(
        "UPDATE archive_meta SET value = '{SCHEMA_VERSION_1}' WHERE name = 'schema';\n"
    ));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::tests_support::token_with_certificates;

    #[test]
    fn each_certificate_set_is_written_once_and_named_by_its_hash() {
        let (a, b) = (
            token_with_certificates(0x42, 700),
            token_with_certificates(0x43, 700),
        );
        let mut sets = CertificateSets::default();
        let mut adding = Vec::new();
        let mut inserted = Vec::new();
        let mut compact = |sets: &mut CertificateSets, token: &[u8], adding: &mut Vec<_>| {
            let (stored, key) = sets
                .compact(token, adding, |key, set| {
                    inserted.push((*key, set.to_vec()));
                    Ok(())
                })
                .unwrap();
            assert!(
                stored.len() < token.len(),
                "stored without its certificates"
            );
            key.expect("a set's hash")
        };
        let key_a = compact(&mut sets, &a, &mut adding);
        assert_eq!(
            compact(&mut sets, &a, &mut adding),
            key_a,
            "the same set again"
        );
        let key_b = compact(&mut sets, &b, &mut adding);
        assert_ne!(key_a, key_b);
        // Back to the first set, after the second was the last one seen.
        assert_eq!(compact(&mut sets, &a, &mut adding), key_a);
        sets.committed(adding);
        let mut adding = Vec::new();
        assert_eq!(
            compact(&mut sets, &b, &mut adding),
            key_b,
            "known once committed"
        );
        assert!(adding.is_empty(), "nothing new to write");
        let (_, set_a) = split_certificates(&a).unwrap();
        let (_, set_b) = split_certificates(&b).unwrap();
        assert_eq!(
            inserted,
            [(sha256(&set_a), set_a), (sha256(&set_b), set_b)],
            "each set written once, under the SHA-256 of its octets"
        );
    }

    #[test]
    fn a_set_whose_transaction_failed_is_written_again() {
        let token = token_with_certificates(0x42, 300);
        let mut sets = CertificateSets::default();
        let mut writes = 0;
        for _ in 0..2 {
            // Each time a fresh transaction whose sets are never committed.
            let mut adding = Vec::new();
            sets.compact(&token, &mut adding, |_, _| {
                writes += 1;
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(writes, 2, "the rolled-back set must not count as stored");
    }

    #[test]
    fn the_newest_are_kept_in_order_whatever_order_they_come_in() {
        // (genTime, instance, position), as look-ups answer them: the later genTime first,
        // then the lower instance, then the later position.
        let ordered = [
            (7, 1, 4),
            (7, 1, 3),
            (7, 2, 1),
            (6, 0, 100),
            (5, 1, 9),
            (1, 0, 1),
        ];
        let mut orders = vec![ordered.to_vec(), ordered.iter().rev().copied().collect()];
        for shift in 1..ordered.len() {
            let mut turned = ordered.to_vec();
            turned.rotate_left(shift);
            orders.push(turned);
        }
        for order in orders {
            for limit in [0, 1, 3, 6, 10] {
                let mut newest = Newest::new(limit);
                let mut given_back = Vec::new();
                for &(gen_time_ns, instance_id, seq) in &order {
                    given_back.extend(newest.offer(
                        Rank::new(gen_time_ns, instance_id, seq),
                        (gen_time_ns, instance_id, seq),
                    ));
                }
                let kept = &ordered[..limit.min(ordered.len())];
                // Each item is kept or given back, once.
                given_back.sort_unstable_by_key(|&(g, i, s)| Reverse(Rank::new(g, i, s)));
                assert_eq!(given_back, ordered[kept.len()..], "{order:?}, {limit}");
                assert_eq!(newest.finish(), (kept.to_vec(), 6), "{order:?}, {limit}");
            }
        }
    }

    #[test]
    fn the_schema_uses_only_portable_sql() {
        let sql = super::schema("BYTEA");
        for sqlite_only in [
            "AUTOINCREMENT",
            "WITHOUT ROWID",
            "BLOB",
            "PRAGMA",
            "INTEGER ",
        ] {
            assert!(!sql.contains(sqlite_only), "{sqlite_only}");
        }
    }
}

/// The certificate sets of `certificate_sets` a store has seen, by their SHA-256. A token is
/// stored without the certificate set it carries (`record::split_certificates`): the set is
/// written once and joined back in when the token is read.
#[derive(Debug, Default)]
pub struct CertificateSets {
    sets: HashMap<Hash, Vec<u8>>,
    /// The set of the last token compacted: nearly every token carries the same one, and
    /// comparing its octets costs a tenth of hashing them.
    last: Option<Hash>,
}

impl CertificateSets {
    /// `token` as stored: without its certificate set, with the set's hash, when it carries
    /// one. A set this store has not seen, in `known` nor among this transaction's `adding`, is
    /// written with `insert` and added to `adding` (known once the transaction commits:
    /// [`CertificateSets::committed`]).
    pub fn compact<'a>(
        &mut self,
        token: &'a [u8],
        adding: &mut Vec<(Hash, Vec<u8>)>,
        insert: impl FnOnce(&Hash, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(Cow<'a, [u8]>, Option<Hash>), StoreError> {
        let Some((compact, set)) = split_certificates(token) else {
            return Ok((Cow::Borrowed(token), None));
        };
        let seen = |key: &Hash| {
            self.sets
                .get(key)
                .or_else(|| adding.iter().find(|(k, _)| k == key).map(|(_, s)| s))
        };
        let key = match self.last.filter(|last| seen(last) == Some(&set)) {
            Some(last) => last,
            None => {
                let key = sha256(&set);
                if seen(&key).is_none() {
                    insert(&key, &set)?;
                    adding.push((key, set));
                }
                key
            }
        };
        self.last = Some(key);
        Ok((Cow::Owned(compact), Some(key)))
    }

    /// The sets a transaction wrote, once it committed.
    pub fn committed(&mut self, added: Vec<(Hash, Vec<u8>)>) {
        self.sets.extend(added);
    }

    /// `record` with its whole token again: the set named by `certificates` (the hash stored
    /// beside the token) joined back in, read with `fetch` the first time. A missing set, or
    /// one whose hash does not match, leaves the token as stored (verification tells).
    pub fn expand(
        &mut self,
        mut record: StoredRecord,
        certificates: Option<Vec<u8>>,
        fetch: impl FnOnce(&Hash) -> Result<Option<Vec<u8>>, StoreError>,
    ) -> Result<StoredRecord, StoreError> {
        let Some(key) = certificates.and_then(|k| Hash::try_from(k.as_slice()).ok()) else {
            return Ok(record);
        };
        let set = match self.sets.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match fetch(&key)? {
                Some(der) if sha256(&der) == key => e.insert(der),
                _ => return Ok(record),
            },
        };
        if let Some(token) = join_certificates(&record.record.token, set) {
            record.record.token = token;
        }
        Ok(record)
    }
}
