//! The queue between the request path and the writer, built for group commit.
//!
//! A plain channel wakes the writer for every record: two context switches per token, which
//! on a loaded core cost as much as a third of an ECDSA issuance. Here a sender wakes the
//! writer only when a batch is due: at once for a record when the writer is idle (no load: no
//! added latency), otherwise when as many records as the last commit held have arrived, or
//! `commit_delay` after the first one; control messages (reservations, checkpoints, close)
//! wake it at once.
//!
//! A commit holds what arrives during the last one: the issuing rate times an fsync. On a
//! saturated core that stays about the same at any number of connections, and so does each
//! token's share of the commit's fixed cost (the fsync's system calls, waits and context
//! switches: about half the writer's CPU at 26 records a commit). So when the server holds at
//! least twice as many requests as the last commit took ([`Queue::set_load`]), the writer waits
//! up to `LOAD_WAIT` × `commit_delay` for half of them: those requests wait for the core
//! anyway (the core stays busy with the other half), and each fsync serves more tokens. With
//! fewer requests in flight (where the core waits for the clients, not the other way round)
//! nothing changes.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::record::TokenRecord;
use super::writer::{Msg, Reply};

/// Under load the writer waits up to this many times `commit_delay` for its batch. With 1
/// (the wait below saturation), commits at 128 connections on one core held 34–40 records;
/// with 4, 49–53, and the writer took a sixth less CPU per token.
const LOAD_WAIT: u32 = 4;

/// Events queued beyond a full queue of records: while the writer hangs, events (one per
/// refusal of some kinds) must not grow the queue without bound either.
pub(crate) const EVENT_ROOM: usize = 10_000;

/// How many requests the server holds (admitted and not answered yet).
pub type Load = Box<dyn Fn() -> usize + Send + Sync>;

pub(crate) struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    commit_delay: Duration,
    /// Token records queued at most; later ones are refused (see [`Queue::send`]).
    max_records: usize,
    load: OnceLock<Load>,
}

struct State {
    msgs: VecDeque<Msg>,
    /// Records (and events) queued.
    records: usize,
    /// When the oldest queued record arrived.
    first_at: Option<Instant>,
    /// Records that make a batch due (the last commit's size; 1 when idle).
    target: usize,
    /// Records that make the batch the writer waits for due: `target`, or more under load.
    goal: usize,
    /// A control message is queued.
    urgent: bool,
    /// The writer sleeps on `ready`.
    waiting: bool,
    closed: bool,
}

impl Queue {
    pub fn new(commit_delay: Duration, max_records: usize) -> Self {
        Self {
            state: Mutex::new(State {
                msgs: VecDeque::new(),
                records: 0,
                first_at: None,
                target: 1,
                goal: 1,
                urgent: false,
                waiting: false,
                closed: false,
            }),
            ready: Condvar::new(),
            commit_delay,
            max_records: max_records.max(1),
            load: OnceLock::new(),
        }
    }

    /// Where the writer learns how many requests the server holds (see the module's
    /// documentation); without it, batches are the last commit's size.
    pub fn set_load(&self, load: Load) {
        let _ = self.load.set(load);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and events queued.
    pub fn depth(&self) -> usize {
        self.lock().records
    }

    /// Queues `msg`; gives it back when the writer has stopped, when it is a token record and
    /// `max_records` are queued already, or an event and [`EVENT_ROOM`] more are. The server admits fewer than that, but a request
    /// whose client left stops counting there while its record stays here: while the writer
    /// is slow, clients that leave and ask again would otherwise grow the queue without bound.
    pub fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut s = self.lock();
        let full = match msg {
            Msg::Record(..) => s.records >= self.max_records,
            Msg::Event(_) => s.records >= self.max_records + EVENT_ROOM,
            _ => false,
        };
        if s.closed || full {
            return Err(msg);
        }
        match msg {
            Msg::Record(..) | Msg::Event(_) => {
                s.records += 1;
                if s.first_at.is_none() {
                    s.first_at = Some(Instant::now());
                }
            }
            _ => s.urgent = true,
        }
        s.msgs.push_back(msg);
        // The first record wakes a waiting writer so that it can time the batch; the rest
        // only when the batch is due.
        let wake = s.waiting && (s.urgent || s.records == 1 || s.records >= s.goal);
        drop(s);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next batch (at most `max_records` records, and every control message queued before
    /// the last of them), once it is due; empty when `idle_until` passed with nothing due.
    pub fn next_batch(&self, idle_until: Instant, max_records: usize) -> Vec<Msg> {
        let mut s = self.lock();
        let grown = self.grown(&s, max_records);
        let entered = Instant::now();
        loop {
            let now = Instant::now();
            let (goal, due_at) = match grown {
                // Due after the wait only once something is queued: with nothing (a signer
                // that stalls while requests are held), an empty batch at once would have the
                // writer spin through this for as long as the load lasts.
                Some(goal) => (
                    goal,
                    s.first_at
                        .map(|first| first.max(entered) + self.commit_delay * LOAD_WAIT),
                ),
                None => (
                    s.target.min(max_records),
                    s.first_at.map(|t| t + self.commit_delay),
                ),
            };
            if s.urgent || s.records >= goal || due_at.is_some_and(|t| now >= t) {
                break;
            }
            let until = due_at.map_or(idle_until, |t| t.min(idle_until));
            if now >= until {
                return Vec::new();
            }
            s.goal = goal;
            s.waiting = true;
            s = self
                .ready
                .wait_timeout(s, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            s.waiting = false;
        }
        let mut out = Vec::new();
        let mut taken = 0;
        while let Some(msg) = s.msgs.front() {
            let is_record = matches!(msg, Msg::Record(..) | Msg::Event(_));
            if is_record && taken == max_records {
                break;
            }
            taken += usize::from(is_record);
            out.push(s.msgs.pop_front().expect("front exists"));
        }
        s.records -= taken;
        s.urgent = s
            .msgs
            .iter()
            .any(|m| !matches!(m, Msg::Record(..) | Msg::Event(_)));
        s.first_at = (s.records > 0).then(Instant::now);
        out
    }

    /// Under load, the batch to wait for instead of the last commit's size: half the requests
    /// the server holds, when they are at least twice that size.
    fn grown(&self, s: &State, max_records: usize) -> Option<usize> {
        let in_flight = (self.load.get()?)();
        (s.target > 1 && in_flight >= 2 * s.target).then(|| (in_flight / 2).min(max_records))
    }

    /// How many records make the next batch due: the size of the last commit under load, 1
    /// (commit at once) when it held one record or none.
    pub fn set_target(&self, records: usize) {
        self.lock().target = records.max(1);
    }

    /// Token records queued now, up to `max`, ahead of any other message: taken without
    /// waiting, to join a batch about to be committed.
    pub fn take_records(&self, max: usize) -> Vec<(Box<TokenRecord>, Reply)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while out.len() < max && matches!(s.msgs.front(), Some(Msg::Record(..))) {
            if let Some(Msg::Record(record, reply)) = s.msgs.pop_front() {
                out.push((record, reply));
            }
        }
        s.records -= out.len();
        s.first_at = s.first_at.filter(|_| s.records > 0);
        out
    }

    /// Wakes the writer now, with or without a batch (a commit failed after it went on).
    pub fn wake(&self) {
        let mut s = self.lock();
        s.urgent = true;
        let waiting = s.waiting;
        drop(s);
        if waiting {
            self.ready.notify_one();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuses later messages and returns what is still queued.
    pub fn close(&self) -> Vec<Msg> {
        let mut s = self.lock();
        s.closed = true;
        s.records = 0;
        s.first_at = None;
        s.msgs.drain(..).collect()
    }

    /// Returns what is queued, taking more later.
    pub fn take_all(&self) -> Vec<Msg> {
        let mut s = self.lock();
        s.records = 0;
        s.first_at = None;
        s.msgs.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::tests_support::sample;

    fn record() -> Msg {
        let (reply, _) = tokio::sync::oneshot::channel();
        Msg::Record(Box::new(sample(10)), reply)
    }

    /// Under load with nothing queued, the writer waits (for a record, or until idle), with
    /// no commit delay too: it spun on empty batches.
    #[test]
    fn under_load_an_empty_queue_is_waited_on() {
        let q = Queue::new(Duration::ZERO, 1_000);
        q.set_load(Box::new(|| 100));
        q.set_target(10);
        let start = Instant::now();
        assert!(q
            .next_batch(start + Duration::from_millis(200), 1_000)
            .is_empty());
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
        // A record queued is taken at once (no commit delay).
        q.send(record()).map_err(|_| ()).unwrap();
        let start = Instant::now();
        assert_eq!(q.next_batch(start + Duration::from_secs(5), 1_000).len(), 1);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn records_taken_to_join_a_commit_stop_at_the_limit_and_at_any_other_message() {
        let q = Queue::new(Duration::from_millis(50), 100);
        for _ in 0..3 {
            q.send(record()).map_err(|_| ()).unwrap();
        }
        q.send(Msg::Reserve(10)).map_err(|_| ()).unwrap();
        q.send(record()).map_err(|_| ()).unwrap();
        assert_eq!(q.take_records(2).len(), 2);
        assert_eq!(q.depth(), 2);
        // Not past the reservation: what comes after a control message waits for the writer's
        // next batch, behind it.
        assert_eq!(q.take_records(10).len(), 1);
        assert_eq!(q.take_records(10).len(), 0);
        assert_eq!(q.depth(), 1);
        let far = Instant::now() + Duration::from_secs(10);
        let next = q.next_batch(far, 100);
        assert!(matches!(next[..], [Msg::Reserve(10), Msg::Record(..)]));
        assert_eq!(q.depth(), 0);
    }

    #[test]
    fn a_batch_is_due_at_its_target_or_after_the_delay() {
        let q = Queue::new(Duration::from_millis(50), 100);
        let far = Instant::now() + Duration::from_secs(10);
        // Idle: one record is a batch.
        q.send(record()).map_err(|_| ()).unwrap();
        assert_eq!(q.next_batch(far, 100).len(), 1);
        // Under load: a batch of three waits for three...
        q.set_target(3);
        for _ in 0..3 {
            q.send(record()).map_err(|_| ()).unwrap();
        }
        assert_eq!(q.next_batch(far, 100).len(), 3);
        // ...or for the delay.
        q.send(record()).map_err(|_| ()).unwrap();
        let start = Instant::now();
        assert_eq!(q.next_batch(far, 100).len(), 1);
        assert!(start.elapsed() >= Duration::from_millis(40));
        // Nothing queued: empty at the idle deadline.
        assert!(q
            .next_batch(Instant::now() + Duration::from_millis(5), 100)
            .is_empty());
        // A control message is due at once; at most `max_records` records go with it.
        for _ in 0..2 {
            q.send(record()).map_err(|_| ()).unwrap();
        }
        q.send(Msg::Reserve(10)).map_err(|_| ()).unwrap();
        assert_eq!(q.next_batch(far, 1).len(), 1);
        assert_eq!(q.next_batch(far, 100).len(), 2);
        // Closed: the rest comes back, later messages are refused.
        q.send(record()).map_err(|_| ()).unwrap();
        assert_eq!(q.close().len(), 1);
        assert!(q.send(record()).is_err());
    }

    #[test]
    fn records_past_the_limit_are_refused_but_events_and_control_messages_are_not() {
        let q = Queue::new(Duration::from_millis(50), 2);
        let far = Instant::now() + Duration::from_secs(10);
        q.send(record()).map_err(|_| ()).unwrap();
        q.send(record()).map_err(|_| ()).unwrap();
        assert!(matches!(q.send(record()), Err(Msg::Record(..))));
        assert!(!q.is_closed());
        let event = || {
            Msg::Event(super::super::events::Captured {
                time_ns: 1,
                level: "INFO".into(),
                kind: "sync_lost".into(),
                message: String::new(),
                fields: "{}".into(),
            })
        };
        q.send(event()).map_err(|_| ()).unwrap();
        q.send(Msg::Reserve(10)).map_err(|_| ()).unwrap();
        // Once the writer took them, records are queued again.
        assert_eq!(q.next_batch(far, 100).len(), 4);
        q.send(record()).map_err(|_| ()).unwrap();
        // Events too have their bound, EVENT_ROOM past a full queue of records.
        q.send(record()).map_err(|_| ()).unwrap();
        for _ in 0..EVENT_ROOM {
            q.send(event()).map_err(|_| ()).unwrap();
        }
        assert!(matches!(q.send(event()), Err(Msg::Event(_))));
        assert!(!q.is_closed());
        q.send(Msg::Reserve(11)).map_err(|_| ()).unwrap();
    }

    #[test]
    fn under_load_a_batch_waits_for_half_the_requests_in_flight() {
        let q = Queue::new(Duration::from_millis(100), 1_000);
        let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(100));
        let gauge = in_flight.clone();
        q.set_load(Box::new(move || {
            gauge.load(std::sync::atomic::Ordering::Relaxed)
        }));
        let far = Instant::now() + Duration::from_secs(10);
        let send = |n: usize| {
            for _ in 0..n {
                q.send(record()).map_err(|_| ()).unwrap();
            }
        };
        // The last commit took 10; 100 requests in flight: the writer waits for 50...
        q.set_target(10);
        send(50);
        let start = Instant::now();
        assert_eq!(q.next_batch(far, 1_000).len(), 50);
        assert!(start.elapsed() < Duration::from_millis(50), "at once");
        // ...at most LOAD_WAIT times the delay, then takes what came.
        q.set_target(10);
        send(30);
        let start = Instant::now();
        assert_eq!(q.next_batch(far, 1_000).len(), 30);
        let waited = start.elapsed();
        let bound = Duration::from_millis(100) * LOAD_WAIT;
        assert!(
            waited >= bound - Duration::from_millis(10) && waited < bound * 3,
            "{waited:?}"
        );
        // Fewer than twice the last commit in flight: the last commit's size, as without load.
        in_flight.store(15, std::sync::atomic::Ordering::Relaxed);
        q.set_target(10);
        send(10);
        let start = Instant::now();
        assert_eq!(q.next_batch(far, 1_000).len(), 10);
        assert!(start.elapsed() < Duration::from_millis(50), "at once");
        // Idle (the last commit held one record): at once, whatever is in flight.
        in_flight.store(100, std::sync::atomic::Ordering::Relaxed);
        q.set_target(1);
        send(1);
        let start = Instant::now();
        assert_eq!(q.next_batch(far, 1_000).len(), 1);
        assert!(start.elapsed() < Duration::from_millis(50), "at once");
    }

    #[test]
    fn a_waiting_writer_is_woken_when_the_batch_is_due() {
        let q = std::sync::Arc::new(Queue::new(Duration::from_secs(5), 1_000));
        q.set_target(2);
        let q2 = q.clone();
        let writer = std::thread::spawn(move || {
            let start = Instant::now();
            let n = q2
                .next_batch(Instant::now() + Duration::from_secs(5), 100)
                .len();
            (n, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(20));
        q.send(record()).map_err(|_| ()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        q.send(record()).map_err(|_| ()).unwrap();
        let (n, took) = writer.join().unwrap();
        assert_eq!(n, 2);
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}
