//! The one writer: group commit of token records and events, serial block reservations,
//! signed checkpoints, the state file and pruning, on a thread of its own.
//!
//! Requests queue their records ([`super::queue`]). The writer takes a batch (up to
//! `max_batch` records), chains the records, appends them with the pending events in one
//! transaction (one fsync of the write-ahead log), and only then answers each request. While
//! it commits, the next batch queues up, so the batch grows with the load. The token log
//! makes a commit durable and answers its requests on a thread of its own
//! ([`super::store::ArchiveStore::append_then`]), so there the writer takes and chains the
//! next batch meanwhile, on a head that is not durable yet (and once that commit is durable,
//! adds the records that came during its sync): if the commit fails after all, the next one
//! is refused too, and the outage's recovery reads the head back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::events::Captured;
use super::queue::Queue;
use super::record::{hex, ChainHead, Checkpoint, EventRecord, StoredRecord, TokenRecord};
use super::serial::{layout, BlockSerials};
use super::state::{SavedState, StateFile};
use super::store::{ArchiveStore, Durable};
use super::{ArchiveError, CheckpointSigner};

/// Where the writer answers a request: Ok once its record is committed.
pub(crate) type Reply = oneshot::Sender<Result<(), ArchiveError>>;

pub(crate) enum Msg {
    Record(Box<TokenRecord>, Reply),
    Event(Captured),
    /// Reserve counters up to (excluding) this one.
    Reserve(u64),
    /// Sign a checkpoint now (if the head or the events moved) and answer.
    Checkpoint(std::sync::mpsc::Sender<Result<(), ArchiveError>>),
    /// The certificate of later checkpoints: of the first key (`false`) or of a planned
    /// rollover's (`true`).
    Certificate(Vec<u8>, bool),
    /// The key (and certificate) of later checkpoints, after a planned rollover.
    Signer(Box<CheckpointSigner>),
    /// A planned rollover's key and its instant: it signs the checkpoints from the first
    /// one after a record whose genTime is at or past the instant (its token was signed by
    /// that key), unless [`Msg::Signer`] handed it over before.
    Planned(u64, Box<CheckpointSigner>),
    /// A final checkpoint and state file, then stop.
    Close(std::sync::mpsc::Sender<()>),
}

/// What one pass of the writer takes from the queue.
#[derive(Default)]
struct Batch {
    records: Vec<(Box<TokenRecord>, Reply)>,
    events: Vec<Captured>,
    reserve: Option<u64>,
    control: Vec<Msg>,
}

impl Batch {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Record(r, reply) => self.records.push((r, reply)),
            Msg::Event(e) => self.events.push(e),
            Msg::Reserve(until) => self.reserve = self.reserve.max(Some(until)),
            other => self.control.push(other),
        }
    }
}

pub(super) struct Writer {
    pub store: Box<dyn ArchiveStore>,
    pub instance_id: u32,
    pub head: ChainHead,
    /// The last event stored (or handed to the store): the next one chains to it.
    pub last_event: ChainHead,
    pub max_gen_time_ns: u64,
    pub reserved_until: u64,
    pub serials: BlockSerials,
    pub state: StateFile,
    pub signer: CheckpointSigner,
    /// A planned rollover's instant and key ([`Msg::Planned`]).
    pub planned: Option<(u64, CheckpointSigner)>,
    /// `signer` is a planned rollover's key (handed over, or in force at start).
    pub signer_is_rollover: bool,
    pub last_checkpoint_seq: u64,
    /// The events' position this writer's last checkpoint signed (0 before its first).
    pub signed_events_seq: u64,
    /// The certificate of the last checkpoint stored (this writer's, or the one it found).
    pub last_checkpoint_certificate: Option<Vec<u8>>,
    /// The last event stored that is not a checkpoint's own (`archive_checkpoint`): past
    /// `signed_events_seq`, the events moved since the last checkpoint.
    pub events_to_sign: u64,
    pub checkpoint_interval: Duration,
    pub retention: Option<Duration>,
    pub max_batch: usize,
    pub healthy: Arc<AtomicBool>,
    /// Set by the request side when a token waited too long for its commit or found the
    /// queue full (a disk or database that hangs); cleared by the next durable commit.
    pub stalled: Arc<AtomicBool>,
    pub stats: Arc<super::CommitStats>,
    /// Woken when a commit fails after the writer went on (so that it sees the outage).
    pub queue: Arc<Queue>,
    /// Records refused since the writer last counted them into its outage.
    pub refused: Arc<AtomicUsize>,
    /// The last head the store made durable (`head` may be past it while a commit is in
    /// flight): where the chain may be taken back to after a commit failed.
    pub durable: Arc<Mutex<ChainHead>>,
    /// Since the last write failed (None while writes succeed).
    pub outage: Option<Outage>,
    /// Clock and key events that could not be stored yet (an outage), oldest first; stored
    /// first when the archive can be written again. At most [`MAX_PENDING_EVENTS`].
    pub pending_events: Vec<Captured>,
    /// When retention's next pruning step is due, while the last one removed records (each
    /// step is bounded, and commits go on between steps).
    pub prune_again: Option<Instant>,
}

/// The kind of a checkpoint's own event, which follows it.
const CHECKPOINT_EVENT: &str = "archive_checkpoint";

/// Whether an event of `kind` calls for a checkpoint to sign it: any but a checkpoint's own,
/// which would otherwise call for the next one.
fn to_sign(kind: &str) -> bool {
    kind != CHECKPOINT_EVENT
}

/// The pause between two pruning steps of the retention while records are left to remove.
const PRUNE_PAUSE: Duration = Duration::from_secs(1);

/// Events kept through an outage; later ones are dropped (and counted in the
/// `archive_recovered` event; the log has them all).
const MAX_PENDING_EVENTS: usize = 10_000;

/// The archive cannot be written: since when, how many records were refused, and when to try
/// again without waiting for a request (readiness fails meanwhile, so a load balancer sends
/// none).
pub(super) struct Outage {
    since_ns: u64,
    refused: usize,
    /// Events that did not fit in [`Writer::pending_events`].
    dropped_events: usize,
    /// A block of serials that could not be reserved: reserved again before the archive
    /// counts as recovered (without serials every request is refused).
    reservation: Option<u64>,
    next_probe: Instant,
}

/// At shutdown, how many more checkpoints sign records that came after the last (the server
/// has stopped taking requests by then; what comes later still is committed unsigned).
const LATE_CHECKPOINTS: usize = 3;

/// How often the writer tries the store again while it cannot write.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Room a local store's filesystem must have before an outage counts as over: the log of some
/// thousands of tokens (1,000 pages of 4 KiB, SQLite's default checkpoint threshold). On a
/// disk that is still full, a probe of a few hundred octets can fit where a commit of tokens
/// cannot; without this the archive would turn healthy and fail again at every probe, and
/// readiness would flap.
pub const ROOM_TO_RECOVER: u64 = 4 << 20;

/// Should the writer's thread panic (a bug): readiness fails and the queue closes, so that
/// requests are refused at once (their replies dropped) instead of each waiting out its
/// commit, and a shutdown does not wait for a writer that is gone.
struct PanicGuard {
    healthy: Arc<AtomicBool>,
    queue: Arc<Queue>,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.healthy.store(false, Ordering::Relaxed);
            drop(self.queue.close());
        }
    }
}

impl Writer {
    pub fn run(mut self) {
        let queue = self.queue.clone();
        let _guard = PanicGuard {
            healthy: self.healthy.clone(),
            queue: queue.clone(),
        };
        let mut next_periodic = Instant::now() + self.checkpoint_interval;
        loop {
            let wake = match &self.outage {
                Some(o) => o.next_probe.min(next_periodic),
                None => next_periodic,
            };
            let wake = self.prune_again.map_or(wake, |at| at.min(wake));
            let msgs = queue.next_batch(wake, self.max_batch);
            if self
                .outage
                .as_ref()
                .is_some_and(|o| Instant::now() >= o.next_probe)
            {
                let _ = self.recover();
            }
            if Instant::now() >= next_periodic {
                self.periodic();
                next_periodic = Instant::now() + self.checkpoint_interval;
            } else if self.prune_again.is_some_and(|at| Instant::now() >= at) {
                self.prune_step();
            }
            if msgs.is_empty() {
                // Woken by a commit that failed after all, or by a timer.
                self.settle();
                continue;
            }
            let mut batch = Batch::default();
            for msg in msgs {
                batch.take(msg);
            }
            // Under load the next batch is due when as many records as this one held arrived
            // (or the commit delay passed); a record alone is committed at once.
            queue.set_target(batch.records.len());
            let Batch {
                records,
                events,
                reserve,
                control,
            } = batch;
            if let Some(until) = reserve {
                self.reserve(until);
            }
            if !records.is_empty() || !events.is_empty() {
                self.commit(records, events);
            }
            for msg in control {
                match msg {
                    Msg::Checkpoint(reply) => {
                        let _ = reply.send(self.checkpoint());
                    }
                    Msg::Certificate(der, rollover) => self.renew_certificate(der, rollover),
                    Msg::Signer(signer) => self.hand_over(*signer),
                    Msg::Planned(at_ns, signer) => self.planned = Some((at_ns, *signer)),
                    Msg::Close(done) => {
                        // Whatever is still queued goes in before the last checkpoint; then
                        // the events that came since, the checkpoint's own among them (and
                        // another checkpoint, should a record or another event have come too).
                        self.drain(queue.take_all());
                        self.close();
                        for _ in 0..LATE_CHECKPOINTS {
                            let late = queue.take_all();
                            let to_sign = late.iter().any(|m| match m {
                                Msg::Record(..) => true,
                                Msg::Event(e) => to_sign(&e.kind),
                                _ => false,
                            });
                            self.drain(late);
                            if !to_sign {
                                break;
                            }
                            self.close();
                        }
                        self.drain(queue.close());
                        let _ = done.send(());
                        return;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Commits what was still queued (at shutdown, after the server stopped taking requests).
    fn drain(&mut self, msgs: Vec<Msg>) {
        let (mut records, mut events) = (Vec::new(), Vec::new());
        for msg in msgs {
            match msg {
                Msg::Record(r, reply) => records.push((r, reply)),
                Msg::Event(e) => events.push(e),
                Msg::Reserve(_) => {}
                Msg::Certificate(der, rollover) => self.renew_certificate(der, rollover),
                Msg::Signer(signer) => self.hand_over(*signer),
                Msg::Planned(at_ns, signer) => self.planned = Some((at_ns, *signer)),
                Msg::Checkpoint(reply) => {
                    let _ = reply.send(Err(ArchiveError("the archive is closing".into())));
                }
                Msg::Close(done) => {
                    let _ = done.send(());
                }
            }
        }
        if !records.is_empty() || !events.is_empty() {
            self.commit(records, events);
        }
    }

    /// Chains `records` after the head, appends them (with the records that came meanwhile)
    /// and `events` in one transaction; every request is answered once its record is durable,
    /// or is not ([`Writer::answer`]).
    fn commit(&mut self, records: Vec<(Box<TokenRecord>, Reply)>, events: Vec<Captured>) {
        // After a failure, first learn where the chain really ends (and store the events
        // kept meanwhile), once a probe interval has passed: until then the batch is refused
        // at once (a failing disk can take seconds to fail each write and sync).
        if let Some(outage) = &self.outage {
            let recovered = if Instant::now() >= outage.next_probe {
                self.recover()
            } else {
                Err(ArchiveError(
                    "the archive cannot be written (it is tried again every second)".into(),
                ))
            };
            if let Err(e) = recovered {
                let replies = records.into_iter().map(|(_, reply)| reply).collect();
                self.refuse(replies, events, &e.to_string());
                return;
            }
        }
        let mut head = self.head;
        let mut chained = Vec::with_capacity(records.len());
        let mut replies = Vec::with_capacity(records.len());
        self.chain(records, &mut head, &mut chained, &mut replies);
        // The commit in flight (the token log's) must be durable before this one is written;
        // the records that came while it was synced join this one rather than wait for
        // another sync.
        self.settle();
        if self.outage.is_some() {
            // It was not: these records were chained to it.
            self.refuse(replies, events, "the commit before it failed");
            return;
        }
        let more = self
            .queue
            .take_records(self.max_batch.saturating_sub(chained.len()));
        if !more.is_empty() {
            self.chain(more, &mut head, &mut chained, &mut replies);
            // The next batch is due at this commit's size (see `queue`).
            self.queue.set_target(chained.len());
        }
        let captured = events;
        let events = self.event_records(&captured, self.last_event);
        let records = chained.len();
        let durable = self.answer(replies, head);
        let appended = self
            .store
            .append_then(self.instance_id, &chained, &events, durable);
        match appended {
            Ok(()) => {
                self.head = head;
                self.stored_events(&events);
                if let Some(max) = chained.iter().map(|r| r.record.gen_time_ns).max() {
                    self.max_gen_time_ns = self.max_gen_time_ns.max(max);
                }
                self.store.after_append();
            }
            Err(e) => {
                self.failed(0);
                self.keep_events(captured);
                tracing::error!(
                    error = %e,
                    records,
                    events = events.len(),
                    "the archive cannot be written: the tokens are withheld"
                );
            }
        }
    }

    /// Refuses a batch that is not appended (`why`), counting it into the outage, and keeps
    /// its events for the recovery.
    fn refuse(&mut self, replies: Vec<Reply>, events: Vec<Captured>, why: &str) {
        let error = ArchiveError(format!("the token could not be archived: {why}"));
        self.failed(replies.len());
        self.keep_events(events);
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// What answers a commit's requests once it is durable (and notes `head`, the commit's
    /// last record, as durable), or is not: then readiness fails at once, the records are
    /// counted as refused and the writer is woken to begin the outage (if the failure came
    /// after it went on). Commit statistics are taken here too, from the append to the end.
    fn answer(&self, replies: Vec<Reply>, head: ChainHead) -> Durable {
        let (healthy, stalled, queue, refused, stats, durable) = (
            self.healthy.clone(),
            self.stalled.clone(),
            self.queue.clone(),
            self.refused.clone(),
            self.stats.clone(),
            self.durable.clone(),
        );
        let started = Instant::now();
        Box::new(move |outcome| {
            stats.duration.observe(started.elapsed().as_secs_f64());
            stats.records.observe(replies.len() as f64);
            if outcome.is_ok() {
                let mut durable = durable.lock().unwrap_or_else(|p| p.into_inner());
                if head.seq >= durable.seq {
                    *durable = head;
                }
                if stalled.load(Ordering::Relaxed) {
                    stalled.store(false, Ordering::Relaxed);
                }
            }
            let outcome = outcome.map_err(|e| {
                healthy.store(false, Ordering::Relaxed);
                refused.fetch_add(replies.len(), Ordering::Relaxed);
                ArchiveError(format!("the token could not be archived: {e}"))
            });
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
            if outcome.is_err() {
                queue.wake();
            }
        })
    }

    /// The last head the store made durable.
    fn durable_head(&self) -> ChainHead {
        *self.durable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the commit in flight, if any; one that failed begins an outage.
    fn settle(&mut self) {
        if let Err(e) = self.store.settle() {
            tracing::error!(
                error = %e,
                "the archive cannot be written: the tokens are withheld"
            );
            self.failed(0);
        }
    }

    /// Chains `records` after `head` (which moves to the last) into `chained`, their replies
    /// into `replies`; one whose serial is not of this instance is refused.
    fn chain(
        &self,
        records: Vec<(Box<TokenRecord>, Reply)>,
        head: &mut ChainHead,
        chained: &mut Vec<StoredRecord>,
        replies: &mut Vec<Reply>,
    ) {
        for (record, reply) in records {
            let counter = match layout::decode(&record.serial) {
                Some((instance, counter)) if instance == self.instance_id => counter,
                _ => {
                    let _ = reply.send(Err(ArchiveError(
                        "the serial is not one of this instance".into(),
                    )));
                    continue;
                }
            };
            let stored =
                StoredRecord::chain(self.instance_id, head.seq + 1, counter, *record, head.hash);
            *head = ChainHead {
                seq: stored.seq,
                hash: stored.hash,
            };
            chained.push(stored);
            replies.push(reply);
        }
    }

    /// `events` at the positions after `last`, each chained to the one before.
    fn event_records(&self, events: &[Captured], last: ChainHead) -> Vec<EventRecord> {
        let mut prev = last;
        events
            .iter()
            .map(|e| {
                let event = EventRecord {
                    instance_id: self.instance_id,
                    seq: prev.seq + 1,
                    time_ns: e.time_ns,
                    level: e.level.clone(),
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                    fields: e.fields.clone(),
                    prev_hash: None,
                    body_hash: None,
                    hash: None,
                }
                .chained(prev.hash);
                prev = event.head();
                event
            })
            .collect()
    }

    /// `events` were stored (or handed to the store): the next one chains to the last, and a
    /// checkpoint signs them unless they are a checkpoint's own.
    fn stored_events(&mut self, events: &[EventRecord]) {
        if let Some(last) = events.last() {
            self.last_event = last.head();
        }
        if let Some(e) = events.iter().rev().find(|e| to_sign(&e.kind)) {
            self.events_to_sign = e.seq;
        }
    }

    /// Keeps events that could not be stored, after those already kept, up to
    /// [`MAX_PENDING_EVENTS`]; the rest are counted as dropped.
    fn keep_events(&mut self, events: Vec<Captured>) {
        let room = MAX_PENDING_EVENTS.saturating_sub(self.pending_events.len());
        let dropped = events.len().saturating_sub(room);
        self.pending_events.extend(events.into_iter().take(room));
        if dropped > 0 {
            if let Some(outage) = self.outage.as_mut() {
                outage.dropped_events += dropped;
            }
        }
    }

    /// A write failed: readiness fails until [`Writer::recover`] succeeds. Returns the
    /// outage (begun now, or going on).
    fn failed(&mut self, refused: usize) -> &mut Outage {
        self.healthy.store(false, Ordering::Relaxed);
        let refused = refused + self.refused.swap(0, Ordering::Relaxed);
        // The first try comes a probe interval after the failure; later failures (batches
        // refused meanwhile) do not put it off.
        let outage = self.outage.get_or_insert_with(|| Outage {
            since_ns: crate::clock::system_unix_ns(),
            refused: 0,
            dropped_events: 0,
            reservation: None,
            next_probe: Instant::now() + PROBE_INTERVAL,
        });
        outage.refused += refused;
        outage
    }

    /// After a failed write: waits for room on a local store's disk, reads the instance's
    /// chain head back (a commit whose answer was lost with the connection may have gone in:
    /// the chain goes on after it, its tokens were refused all the same), reserves the block
    /// of serials that could not be reserved, if any, then writes an `archive_recovered`
    /// event. Only when all of it works is the archive healthy again; without this, an
    /// instance that readiness took out of a load balancer would wait for a request that
    /// never comes. A try that fails puts the next one a probe interval after its end (a
    /// failing disk, or a database locked by another process, can take seconds to fail).
    fn recover(&mut self) -> Result<(), ArchiveError> {
        let recovered = self.try_recover();
        if recovered.is_err() {
            if let Some(outage) = self.outage.as_mut() {
                outage.next_probe = Instant::now() + PROBE_INTERVAL;
            }
        }
        recovered
    }

    fn try_recover(&mut self) -> Result<(), ArchiveError> {
        // A commit still in flight is durable first, or refused too (an outage, if none yet).
        self.settle();
        let Some(outage) = self.outage.as_mut() else {
            return Ok(());
        };
        outage.refused += self.refused.swap(0, Ordering::Relaxed);
        let (since_ns, refused, dropped) = (outage.since_ns, outage.refused, outage.dropped_events);
        let reservation = outage.reservation;
        if let Some(free) = self.store.free_space().filter(|&f| f < ROOM_TO_RECOVER) {
            return Err(ArchiveError(format!(
                "{free} octets free on the archive's filesystem; waiting for {ROOM_TO_RECOVER}"
            )));
        }
        self.store
            .probe(self.instance_id)
            .map_err(|e| ArchiveError(e.to_string()))?;
        let db = self
            .store
            .instance(self.instance_id)
            .map_err(|e| ArchiveError(e.to_string()))?;
        // The chain goes on from the store's head: past the writer's where a commit reported
        // as failed had gone in after all; before it where commits that the writer chained
        // on did not become durable (the token log's), but never below what was durable.
        let head = db.head.unwrap_or(ChainHead::EMPTY);
        let durable = self.durable_head();
        if head.seq < durable.seq {
            // Records the store had made durable, and whose tokens were answered, are gone
            // (a file removed or cut under the running server, a database put back): the
            // chain can go on neither from the store's head (records would take the lost
            // ones' positions) nor past the lost ones (the store would refuse every commit
            // that does not follow its head, while readiness came back between them). The
            // outage stays, for an operator.
            tracing::error!(
                instance = self.instance_id,
                store_seq = head.seq,
                durable_seq = durable.seq,
                "the archive lost records it had committed: tokens stay refused until an \
                 operator looks (`tsa archive verify`) and restarts the server"
            );
            return Err(ArchiveError(format!(
                "the archive's head {} is below records it committed (up to {})",
                head.seq, durable.seq
            )));
        }
        if head.seq > self.head.seq {
            tracing::warn!(
                instance = self.instance_id,
                from_seq = self.head.seq,
                to_seq = head.seq,
                "a commit reported as failed had gone in: the chain continues after it"
            );
            self.head = head;
        } else if head.seq < self.head.seq {
            tracing::warn!(
                instance = self.instance_id,
                from_seq = self.head.seq,
                to_seq = head.seq,
                "commits that did not become durable were cut off: the chain continues before them"
            );
            self.head = head;
        }
        *self.durable.lock().unwrap_or_else(|p| p.into_inner()) = self.head;
        if db.last_event.seq > self.last_event.seq {
            self.last_event = db.last_event;
        }
        self.max_gen_time_ns = self.max_gen_time_ns.max(db.max_gen_time_ns);
        if let Some(until) = reservation {
            self.persist_reservation(until)?;
            self.reserved_until = self.reserved_until.max(until);
            self.serials.extend(until);
        }
        let now_ns = crate::clock::system_unix_ns();
        // What happened during the outage first, then the recovery itself.
        let recovered = Captured {
            time_ns: now_ns,
            level: "info".into(),
            kind: "archive_recovered".into(),
            message: "the archive can be written again".into(),
            fields: serde_json::json!({
                "failed_since_ns": since_ns,
                "refused_records": refused,
                "kept_events": self.pending_events.len(),
                "dropped_events": dropped,
            })
            .to_string(),
        };
        let mut captured = self.pending_events.clone();
        captured.push(recovered);
        let events = self.event_records(&captured, self.last_event);
        self.store
            .append(self.instance_id, &[], &events)
            .map_err(|e| ArchiveError(e.to_string()))?;
        self.stored_events(&events);
        self.pending_events.clear();
        self.outage = None;
        self.healthy.store(true, Ordering::Relaxed);
        // A write went through: whatever hung before has ended.
        self.stalled.store(false, Ordering::Relaxed);
        // No `event` field: this is stored above already, not through the events layer.
        tracing::info!(
            instance = self.instance_id,
            refused_records = refused,
            down_ms = now_ns.saturating_sub(since_ns) / 1_000_000,
            "the archive can be written again"
        );
        Ok(())
    }

    fn reserve(&mut self, until: u64) {
        if until <= self.reserved_until {
            self.serials.extend(self.reserved_until);
            return;
        }
        match self.persist_reservation(until) {
            Ok(()) => {
                self.reserved_until = until;
                self.serials.extend(until);
                // A block that failed before is reserved with this one: the probe has none
                // left to reserve.
                if let Some(outage) = self.outage.as_mut() {
                    if outage.reservation.is_some_and(|failed| failed <= until) {
                        outage.reservation = None;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reserve the next block of serial numbers");
                self.serials.reservation_failed(e.to_string());
                // An outage like a failed commit: readiness fails (the requests would all
                // be refused once the block runs out), and the probe reserves it again.
                let outage = self.failed(0);
                outage.reservation = outage.reservation.max(Some(until));
            }
        }
    }

    /// The reservation, in the database and in the state file, both durable. Never below
    /// what was reserved already: the database keeps the higher of the two, and so does the
    /// state file (a block that failed and is reserved again by the recovery may be below one
    /// reserved since).
    fn persist_reservation(&mut self, until: u64) -> Result<(), ArchiveError> {
        let until = until.max(self.reserved_until);
        self.store
            .reserve(self.instance_id, until, self.max_gen_time_ns)
            .map_err(|e| ArchiveError(e.to_string()))?;
        self.write_state(until)
    }

    fn write_state(&self, reserved_until: u64) -> Result<(), ArchiveError> {
        self.state
            .write(&SavedState {
                instance_id: self.instance_id,
                reserved_until,
                gen_time_ns: self.max_gen_time_ns,
            })
            .map_err(|e| {
                ArchiveError(format!(
                    "cannot write the state file {}: {e}",
                    self.state.path().display()
                ))
            })
    }

    /// The checkpoint interval passed: checkpoint, state file, pruning (which never goes past
    /// the last stored checkpoint, so a checkpoint that failed here leaves the records after
    /// the one before in place).
    fn periodic(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "archive checkpoint failed; trying again later");
        }
        if let Err(e) = self.write_state(self.reserved_until) {
            tracing::warn!(error = %e, "archive state file not written");
        }
        self.prune_step();
    }

    /// A reloaded certificate for the checkpoints, of the first key or of the rollover's
    /// (`rollover`): taken by that key (in force, or planned) where it certifies it. The first
    /// key's, once the rollover's has taken over, is left.
    fn renew_certificate(&mut self, der: Vec<u8>, rollover: bool) {
        let taken = match (rollover == self.signer_is_rollover, &mut self.planned) {
            (true, _) => self.signer.renew_certificate(der),
            (false, Some((_, planned))) if rollover => planned.renew_certificate(der),
            _ => return,
        };
        if !taken {
            tracing::warn!(
                instance = self.instance_id,
                rollover,
                "a reloaded certificate does not certify its key: the archive's checkpoints \
                 keep the certificate they had"
            );
        }
    }

    /// The key of the checkpoints from now on (a planned rollover's, handed over).
    fn hand_over(&mut self, signer: CheckpointSigner) {
        self.signer = signer;
        self.signer_is_rollover = true;
        self.planned = None;
    }

    /// One bounded step of the retention's pruning; another one is due [`PRUNE_PAUSE`] later
    /// while this one removed records (commits go on in between).
    fn prune_step(&mut self) {
        self.prune_again = None;
        let Some(retention) = self.retention else {
            return;
        };
        // From the latest genTime archived too, not the system clock alone (which this
        // process does not discipline): a step forward of it must not prune records the
        // retention keeps.
        let now = crate::clock::system_unix_ns().min(self.max_gen_time_ns);
        let before = now.saturating_sub(retention.as_nanos() as u64);
        // The anchor signed before the prune locks the instance: a signature that fails (an
        // HSM busy) prunes nothing, and the next step tries again.
        let sign = super::anchor_signer(&self.signer);
        match self.store.prune_signed(self.instance_id, before, &sign) {
            // An archive event too: records leaving the archive is one to keep.
            Ok(Some(anchor)) => {
                tracing::info!(
                    event = "archive_pruned",
                    instance = self.instance_id,
                    anchor_seq = anchor.seq,
                    anchor_hash = %hex(&anchor.hash),
                    before_ns = before,
                    "archive pruned: records up to the anchor removed"
                );
                self.prune_again = Some(Instant::now() + PRUNE_PAUSE);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "archive pruning failed"),
        }
    }

    /// Signs the chain head and the events' head and stores the checkpoint, unless neither
    /// moved since the last. Where only events came (an idle server: routine syncs, a sync
    /// lost, a key event), the checkpoint at the same position is signed again with the
    /// events' new head (the store replaces it), so that they do not wait for the next token
    /// to be signed. The checkpoint's own event alone does not count, or each checkpoint
    /// would call for the next. Only with the certificate that signed the checkpoint there:
    /// verify asks a checkpoint's key to have signed the token at its position (or at a later
    /// checkpoint of its own), so after a key rollover or a certificate reloaded the events
    /// wait for the next token, whose checkpoint the new key signs over its own token. An
    /// instance that has issued no token yet signs its events at position 0.
    fn checkpoint(&mut self) -> Result<(), ArchiveError> {
        // Only a durable head is signed: after a commit that failed, the one the recovery
        // reads back, or while it cannot, the last one known durable.
        self.settle();
        // Once a token of the planned key is archived, that key signs: the old one must not
        // sign a head that the new one signed (verification could tie it to no token of its
        // own), whatever the system clock, by which the server hands the key over, says.
        if let Some((at_ns, _)) = &self.planned {
            if self.max_gen_time_ns >= *at_ns {
                let (_, planned) = self.planned.take().expect("planned");
                self.hand_over(planned);
            }
        }
        if self.head != self.durable_head() {
            if let Err(e) = self.recover() {
                tracing::warn!(error = %e, "the archive is not recovered: the checkpoint signs its last durable head");
            }
        }
        let head = self.durable_head();
        let events_moved = self.events_to_sign > self.signed_events_seq;
        let due = match head.seq.cmp(&self.last_checkpoint_seq) {
            std::cmp::Ordering::Greater => true,
            // The first checkpoint of an instance that has issued no token yet is at position
            // 0 (the empty chain), so that its events are signed too; there no token ties it
            // to a certificate, so a new key signs it again as well.
            std::cmp::Ordering::Equal => {
                events_moved
                    && (head.seq == 0
                        || self.last_checkpoint_certificate.as_ref()
                            == Some(&self.signer.certificate))
            }
            std::cmp::Ordering::Less => false,
        };
        if !due {
            return Ok(());
        }
        let time_ns = crate::clock::system_unix_ns();
        let mut checkpoint = Checkpoint {
            instance_id: self.instance_id,
            seq: head.seq,
            head_hash: head.hash,
            time_ns,
            algorithm: self.signer.algorithm.clone(),
            signature: Vec::new(),
            certificate: self.signer.certificate.clone(),
            events: Some(self.last_event),
            // As stored now (`tsa archive prune` may have moved it beside this writer).
            anchor_seq: self
                .store
                .signed_anchor(self.instance_id)
                .map_err(|e| ArchiveError(e.to_string()))?
                .map_or(0, |(anchor, _)| anchor.seq),
        };
        let checkpoint_events = self.last_event;
        checkpoint.signature = (self.signer.sign)(&checkpoint.message())
            .map_err(|e| ArchiveError(format!("the checkpoint cannot be signed: {e}")))?;
        self.store
            .add_checkpoint(&checkpoint)
            .map_err(|e| ArchiveError(e.to_string()))?;
        self.last_checkpoint_seq = head.seq;
        self.signed_events_seq = checkpoint_events.seq;
        self.last_checkpoint_certificate = Some(checkpoint.certificate);
        // The head in the log too, which is kept elsewhere: `tsa archive verify --expect`
        // takes it back, against a rollback of the archive to an earlier checkpoint.
        tracing::info!(
            event = CHECKPOINT_EVENT,
            instance = self.instance_id,
            seq = head.seq,
            head = %format!("{}:{}:{}", self.instance_id, head.seq, hex(&head.hash)),
            events = %format!(
                "{}:{}:{}",
                self.instance_id,
                checkpoint_events.seq,
                hex(&checkpoint_events.hash)
            ),
            "archive head signed"
        );
        Ok(())
    }

    fn close(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "no archive checkpoint at shutdown");
        }
        if let Err(e) = self.write_state(self.reserved_until) {
            tracing::warn!(error = %e, "archive state file not written at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::archive::sqlite::{Layout, SqliteStore};

    /// A writer of instance 0 over a new rows archive in `dir` (writes that find the database
    /// locked fail after `busy_timeout`), counters reserved below 10.
    fn writer(dir: &Path, busy_timeout: Duration) -> Writer {
        let mut db = SqliteStore::open(&dir.join("archive.sqlite"), busy_timeout).unwrap();
        db.settle_layout(Layout::Rows).unwrap();
        Writer {
            store: Box::new(db),
            instance_id: 0,
            head: ChainHead::EMPTY,
            last_event: ChainHead::EMPTY,
            max_gen_time_ns: 0,
            reserved_until: 10,
            serials: BlockSerials::new(0, 1, 10, 10, Box::new(|_| {})),
            state: StateFile::new(&dir.join("archive.state")),
            signer: crate::archive::tests::signer(),
            planned: None,
            signer_is_rollover: false,
            last_checkpoint_seq: 0,
            signed_events_seq: 0,
            last_checkpoint_certificate: None,
            events_to_sign: 0,
            checkpoint_interval: Duration::from_secs(3600),
            retention: None,
            max_batch: 16,
            healthy: Arc::new(AtomicBool::new(true)),
            stalled: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            queue: Arc::new(Queue::new(Duration::ZERO, 16)),
            refused: Default::default(),
            durable: Arc::new(Mutex::new(ChainHead::EMPTY)),
            outage: None,
            pending_events: Vec::new(),
            prune_again: None,
        }
    }

    /// The retention counts back from the latest genTime archived where the system clock is
    /// past it (a step forward of a clock this process does not discipline).
    #[test]
    fn retention_counts_back_from_the_latest_gen_time_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_secs(1));
        writer.retention = Some(Duration::from_secs(86_400));
        // Records issued at 1 to 10 s after the epoch, all signed: the system clock is
        // decades past them.
        let records = crate::archive::tests::records_a_second_apart(10);
        writer.store.append(0, &records, &[]).unwrap();
        let checkpoint = crate::archive::tests::checkpoint_of(&records[9]);
        writer.store.add_checkpoint(&checkpoint).unwrap();
        writer.max_gen_time_ns = 10_000_000_000;
        writer.prune_step();
        assert_eq!(writer.store.instance(0).unwrap().anchor, None, "pruned");
        // A day and 3 s later by the records' own time: those before 3 s go.
        writer.max_gen_time_ns = 86_403_000_000_000;
        writer.prune_step();
        let anchor = writer.store.instance(0).unwrap().anchor.expect("an anchor");
        assert_eq!(anchor.seq, 2);
        // Signed with the checkpoints' key (here one that signs everything [1]).
        let signed = |writer: &mut Writer| writer.store.signed_anchor(0).unwrap().unwrap();
        assert_eq!(signed(&mut writer).1.expect("signed").signature, [1]);
        // A signature that fails prunes nothing; the next step does.
        writer.signer.sign = Box::new(|_| Err("the HSM is busy".into()));
        writer.max_gen_time_ns += 1_000_000_000;
        writer.prune_step();
        assert_eq!(signed(&mut writer).0.seq, 2, "nothing pruned");
        writer.signer.sign = Box::new(|_| Ok(vec![2]));
        writer.prune_step();
        let (anchor, signature) = signed(&mut writer);
        assert_eq!(anchor.seq, 3);
        assert_eq!(signature.expect("signed").signature, [2]);
    }

    /// A captured event of `kind`.
    fn event(kind: &str) -> Captured {
        Captured {
            time_ns: 1,
            level: "info".into(),
            kind: kind.into(),
            message: kind.into(),
            fields: "{}".into(),
        }
    }

    /// Events that come while no token does (an idle server) are signed at the next interval:
    /// the checkpoint at the same position is signed again with their head. The checkpoint's
    /// own event alone signs nothing more.
    #[test]
    fn events_without_tokens_are_signed_again_at_the_same_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_secs(1));
        let records = crate::archive::tests::records_a_second_apart(3);
        writer.store.append(0, &records, &[]).unwrap();
        let head = ChainHead {
            seq: 3,
            hash: records[2].hash,
        };
        writer.head = head;
        *writer.durable.lock().unwrap() = head;
        let signed = |writer: &mut Writer| {
            let all = writer.store.checkpoints(0).unwrap();
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].seq, 3);
            all[0].events.expect("an events' head").seq
        };
        writer.commit(Vec::new(), vec![event("sync_acquired")]);
        writer.checkpoint().unwrap();
        assert_eq!(signed(&mut writer), 1);
        // Its own event, stored after it: nothing new to sign.
        writer.commit(Vec::new(), vec![event(CHECKPOINT_EVENT)]);
        writer.checkpoint().unwrap();
        assert_eq!(signed(&mut writer), 1, "signed again for its own event");
        // A sync lost, then the next checkpoint's own event: both signed, at the same place.
        writer.commit(
            Vec::new(),
            vec![event("sync_lost"), event(CHECKPOINT_EVENT)],
        );
        writer.checkpoint().unwrap();
        assert_eq!(signed(&mut writer), 4);
        assert_eq!(writer.last_event.seq, 4);
        // After a key rollover (or a certificate reloaded), not over the old key's token:
        // the events wait for the next token.
        writer.signer.certificate = vec![0x30, 0x03, 0x02, 0x01, 0x07];
        writer.commit(Vec::new(), vec![event("key_rollover")]);
        writer.checkpoint().unwrap();
        assert_eq!(
            signed(&mut writer),
            4,
            "signed again by another certificate"
        );
    }

    /// A planned rollover's key signs the first checkpoint after a record at or past its
    /// instant (whose token it signed), before the server hands it over by the system clock;
    /// the old key signs while every record is before the instant.
    #[test]
    fn the_planned_key_signs_checkpoints_once_a_token_of_its_gen_time_is_archived() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_secs(1));
        let records = crate::archive::tests::records_a_second_apart(3);
        writer.store.append(0, &records, &[]).unwrap();
        let head = |seq: usize| ChainHead {
            seq: seq as u64,
            hash: records[seq - 1].hash,
        };
        let new_certificate = vec![0x30, 0x03, 0x02, 0x01, 0x07];
        let planned = |at_s: u64| {
            let mut signer = crate::archive::tests::signer();
            signer.certificate = new_certificate.clone();
            Some((at_s * 1_000_000_000, signer))
        };
        let last = |writer: &mut Writer| writer.store.checkpoints(0).unwrap().pop().unwrap();
        // Up to the second record (genTime 2 s), the instant at 3 s: the old key.
        (writer.head, writer.max_gen_time_ns) = (head(2), 2_000_000_000);
        *writer.durable.lock().unwrap() = head(2);
        writer.planned = planned(3);
        writer.checkpoint().unwrap();
        assert_eq!(last(&mut writer).certificate, [0x30, 0x00]);
        assert!(writer.planned.is_some());
        // The third (3 s): the new key, from now on.
        (writer.head, writer.max_gen_time_ns) = (head(3), 3_000_000_000);
        *writer.durable.lock().unwrap() = head(3);
        writer.checkpoint().unwrap();
        let checkpoint = last(&mut writer);
        assert_eq!(
            (checkpoint.seq, checkpoint.certificate),
            (3, new_certificate)
        );
        assert!(writer.planned.is_none());
    }

    /// Before any token, the events are signed by a checkpoint at position 0.
    #[test]
    fn events_before_the_first_token_are_signed_at_position_0() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_secs(1));
        writer.commit(Vec::new(), vec![event("sync_lost")]);
        writer.checkpoint().unwrap();
        let all = writer.store.checkpoints(0).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].seq, all[0].head_hash),
            (0, crate::archive::record::ZERO_HASH)
        );
        assert_eq!(all[0].events.map(|e| e.seq), Some(1));
        // No token ties it to a certificate: a new key (a rollover) signs it again too.
        writer.signer.certificate = vec![0x30, 0x03, 0x02, 0x01, 0x07];
        writer.commit(Vec::new(), vec![event("key_rollover")]);
        writer.checkpoint().unwrap();
        let all = writer.store.checkpoints(0).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].events.map(|e| e.seq), Some(2));
        assert_eq!(all[0].certificate, writer.signer.certificate);
    }

    /// A block that failed to be reserved and was reserved by a later request, followed by a
    /// higher one, is not written again by the recovery: the state file keeps the highest.
    #[test]
    fn a_recovered_reservation_never_lowers_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_millis(100));
        let saved = |writer: &Writer| writer.state.read().unwrap().unwrap().reserved_until;
        // Another process holds the database: the reservation up to 20 fails.
        let locker = rusqlite::Connection::open(dir.path().join("archive.sqlite")).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        writer.reserve(20);
        assert!(writer.outage.is_some(), "the reservation did not fail");
        locker.execute_batch("ROLLBACK").unwrap();
        // Later requests reserve it, then the next block, before the writer's probe.
        writer.reserve(20);
        writer.reserve(30);
        assert_eq!(saved(&writer), 30);
        writer.recover().unwrap();
        assert!(writer.outage.is_none());
        assert_eq!(writer.reserved_until, 30);
        assert_eq!(
            saved(&writer),
            30,
            "the state file went back below a reservation"
        );
    }

    /// Records committed (durable, answered) and then gone from the store keep the outage
    /// open: the writer neither forks the chain over them nor declares a recovery after which
    /// every commit is refused.
    #[test]
    fn records_the_store_lost_keep_the_outage_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path(), Duration::from_millis(100));
        let locker = rusqlite::Connection::open(dir.path().join("archive.sqlite")).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        writer.reserve(20);
        assert!(writer.outage.is_some(), "the reservation did not fail");
        locker.execute_batch("ROLLBACK").unwrap();
        // Five records were durable; the store holds none.
        let lost = ChainHead {
            seq: 5,
            hash: [5; 32],
        };
        *writer.durable.lock().unwrap() = lost;
        writer.head = lost;
        let e = writer.recover().unwrap_err();
        assert!(e.to_string().contains("below records it committed"), "{e}");
        assert!(writer.outage.is_some(), "recovered over lost records");
        assert!(!writer.healthy.load(Ordering::SeqCst));
    }
}
