//! Overload control: how many time-stamp requests may wait for the issuing path at once, and
//! how many connections may be open.
//!
//! Past `server.max_queue` requests admitted and not yet answered, a request is answered at
//! once with 503, `Retry-After` and a DER `systemFailure`, at the cost of reading it; so
//! under overload the server spends its time signing what it admitted instead of letting
//! latency and memory grow with the backlog. A batch takes one place per chunk of
//! [`super::issue::BATCH_CHUNK`] items, the unit in which it queues for the signing lane
//! beside single requests. Past `server.max_connections`, a new connection gets a fixed 503 and is closed
//! without being read.
//!
//! Why the yield in [`Admission::enter`] matters: a software signer signs on the async worker,
//! so without it a request would run from its first byte to its response in one poll and
//! the backlog would never become visible here (it would wait, uncounted, in the sockets).
//! Yielding once after admission lets the worker read the other ready connections first, so
//! the count is the real queue and what exceeds it is refused cheaply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The answer to a connection over the limit: written before the connection is closed.
pub const CONNECTIONS_EXCEEDED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Retry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\
    Connection: close\r\n\r\ntoo many connections\n";

/// Counts the requests between admission and their answer.
#[derive(Debug)]
pub struct Admission {
    max_queue: usize,
    queued: AtomicUsize,
}

impl Admission {
    pub fn new(max_queue: usize) -> Self {
        Self {
            max_queue: max_queue.max(1),
            queued: AtomicUsize::new(0),
        }
    }

    /// Takes `n` places (a batch's chunks) if the queue has room for them, then yields once
    /// (see the module's documentation). `None`: overloaded; the ticket returns the room
    /// when dropped.
    pub async fn enter(&self, n: usize) -> Option<Ticket<'_>> {
        let ticket = self.try_enter(n)?;
        tokio::task::yield_now().await;
        Some(ticket)
    }

    /// Takes `n` places without yielding.
    pub fn try_enter(&self, n: usize) -> Option<Ticket<'_>> {
        let n = n.max(1);
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let ticket = Ticket { admission: self, n };
        // A batch larger than the whole queue is admitted alone, when nothing else waits.
        (before == 0 || before + n <= self.max_queue).then_some(ticket)
    }

    /// Requests admitted and not yet answered.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
}

/// Room in the queue, held until the request is answered.
#[derive(Debug)]
pub struct Ticket<'a> {
    admission: &'a Admission,
    n: usize,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Open connections, counted from accept to close.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    open: Arc<AtomicUsize>,
}

/// One open connection; dropping it closes its place.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connections {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    /// A place for a new connection, or `None` when `max` are open.
    pub fn open(&self) -> Option<ConnectionSlot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(Arc::clone(&self.open));
        (before < self.max).then_some(slot)
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_admits_up_to_its_depth_and_frees_room_on_drop() {
        let admission = Admission::new(3);
        let a = admission.try_enter(1).expect("room");
        let b = admission.try_enter(2).expect("room");
        assert_eq!(admission.depth(), 3);
        assert!(admission.try_enter(1).is_none(), "the queue is full");
        assert_eq!(admission.depth(), 3, "a refusal leaves no trace");
        drop(a);
        let c = admission.try_enter(1).expect("room again");
        drop((b, c));
        assert_eq!(admission.depth(), 0);
    }

    #[test]
    fn a_batch_larger_than_the_queue_runs_alone() {
        let admission = Admission::new(4);
        let big = admission
            .try_enter(10)
            .expect("admitted when nothing waits");
        assert!(admission.try_enter(1).is_none());
        drop(big);
        let one = admission.try_enter(1).expect("room");
        assert!(
            admission.try_enter(10).is_none(),
            "not beside another request"
        );
        drop(one);
    }

    #[test]
    fn connections_are_counted_until_closed() {
        let connections = Connections::new(2);
        let a = connections.open().expect("first");
        let b = connections.open().expect("second");
        assert!(connections.open().is_none());
        assert_eq!(connections.count(), 2);
        drop(a);
        let c = connections.open().expect("a place again");
        drop((b, c));
        assert_eq!(connections.count(), 0);
    }

    #[test]
    fn the_canned_answer_is_well_formed() {
        let text = std::str::from_utf8(CONNECTIONS_EXCEEDED).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a length")
            .parse()
            .expect("a number");
        assert_eq!(body.len(), length);
    }
}
