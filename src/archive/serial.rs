//! Serial numbers behind an allocator that can fail: random ones ([`RandomSerials`], without
//! the archive) and structured, durable ones ([`BlockSerials`], with it; see [`layout`]).

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::protocol::Serial;

#[derive(Debug, thiserror::Error)]
#[error("no serial number can be allocated: {0}")]
pub struct SerialError(pub String);

/// Hands out serial numbers that are never reused.
pub trait SerialAllocator: Send + Sync + 'static {
    fn next(&self) -> Result<Serial, SerialError>;

    /// Whether `next` would wait now (for a durable reservation), so that the caller calls it
    /// where blocking a thread is allowed.
    fn may_wait(&self) -> bool {
        false
    }

    /// `next`, or `None` where it would wait (the check of [`SerialAllocator::may_wait`] and
    /// the draw in one step: between the two, other threads can take the last reserved one).
    fn next_without_waiting(&self) -> Option<Result<Serial, SerialError>> {
        Some(self.next())
    }
}

/// Random octets for serials from the CSPRNG (aws-lc's), drawn 4 KiB at a time by each
/// thread: one call into the generator, which mixes fresh CPU entropy into every call, per
/// 200 serials (a call per serial took 1.5 % of a P-256 token's CPU on the request path). A
/// serial's random octets are published in its token, so holding them in memory beforehand
/// reveals nothing. The server never forks, so no two processes share a pool.
fn random_octets<const N: usize>() -> Result<[u8; N], SerialError> {
    const POOL: usize = 4096;
    thread_local! {
        /// Octets not handed out yet: `octets[used..]`.
        static POOL_OF_THREAD: RefCell<([u8; POOL], usize)> = const { RefCell::new(([0; POOL], POOL)) };
    }
    POOL_OF_THREAD.with_borrow_mut(|(octets, used)| {
        if POOL - *used < N {
            aws_lc_rs::rand::fill(octets)
                .map_err(|_| SerialError("the system random generator failed".into()))?;
            *used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&octets[*used..*used + N]);
        *used += N;
        Ok(out)
    })
}

/// 20-octet positive serials from the system CSPRNG: 159 random bits, so that two serials
/// collide with probability about n²/2¹⁶⁰ — unique without any state. (The archive replaces
/// these with structured, durable ones.)
pub struct RandomSerials(());

impl RandomSerials {
    pub fn new() -> Self {
        Self(())
    }
}

impl Default for RandomSerials {
    fn default() -> Self {
        Self::new()
    }
}

impl SerialAllocator for RandomSerials {
    fn next(&self) -> Result<Serial, SerialError> {
        let mut bytes = random_octets::<20>()?;
        // Positive and exactly 20 octets: high bit clear, first octet non-zero.
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Serial::from_unsigned(&bytes).ok_or_else(|| SerialError("invalid serial".into()))
    }
}

/// The structured serial: 20 octets, so that byte order is numeric order.
///
/// ```text
/// octet  0      0x01: the layout's version; keeps the INTEGER positive at exactly 20 octets
/// octets 1..5   the instance id (u32, big-endian): serials of two instances never collide
/// octets 5..13  the counter (u64 < 2^63, big-endian): never reused by an instance
/// octets 13..20 7 random octets: the issued volume cannot be read off the serials
/// ```
pub mod layout {
    pub const LEN: usize = 20;
    pub const VERSION: u8 = 0x01;
    /// Counters stay below 2^63 so that they fit a signed 64-bit column.
    pub const MAX_COUNTER: u64 = i64::MAX as u64;

    pub fn encode(instance_id: u32, counter: u64, random: [u8; 7]) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[0] = VERSION;
        out[1..5].copy_from_slice(&instance_id.to_be_bytes());
        out[5..13].copy_from_slice(&counter.to_be_bytes());
        out[13..].copy_from_slice(&random);
        out
    }

    /// (instance id, counter) of a structured serial's content octets.
    pub fn decode(serial: &[u8]) -> Option<(u32, u64)> {
        if serial.len() != LEN || serial[0] != VERSION {
            return None;
        }
        let instance = u32::from_be_bytes(serial[1..5].try_into().ok()?);
        let counter = u64::from_be_bytes(serial[5..13].try_into().ok()?);
        (counter <= MAX_COUNTER).then_some((instance, counter))
    }
}

/// Serials of one instance from counters reserved durably in blocks.
///
/// Counters below `limit` have been reserved (written durably by the archive); they are handed
/// out from memory. When fewer than half a block is left, the allocator asks for the next
/// block through `request` (the archive's writer reserves it, off the request path, and calls
/// [`BlockSerials::extend`]); only if the block runs out before that does `next` wait.
#[derive(Clone)]
pub struct BlockSerials(Arc<Inner>);

struct Inner {
    instance_id: u32,
    block: u64,
    counters: Mutex<Counters>,
    extended: Condvar,
    request: Box<dyn Fn(u64) + Send + Sync>,
}

struct Counters {
    next: u64,
    limit: u64,
    /// A reservation asked for and not yet answered.
    requested: bool,
    /// Why the last reservation failed, while no later one succeeded.
    failure: Option<String>,
    /// A draw waited `RESERVATION_WAIT` for the reservation asked for, in vain: later draws
    /// fail at once until it is answered (a writer that hangs would otherwise hold each of
    /// them, a batch's 64 items one after the other, for the whole wait).
    unanswered: bool,
}

/// How long `next` waits for a reservation when the block ran out.
#[cfg(not(test))]
const RESERVATION_WAIT: Duration = Duration::from_secs(5);
#[cfg(test)]
const RESERVATION_WAIT: Duration = Duration::from_millis(300);

impl BlockSerials {
    /// Counters `next..limit` are reserved; `request(until)` asks for a reservation up to
    /// `until` (exclusive).
    pub fn new(
        instance_id: u32,
        next: u64,
        limit: u64,
        block: u64,
        request: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Self {
        Self(Arc::new(Inner {
            instance_id,
            block: block.max(2),
            counters: Mutex::new(Counters {
                next,
                limit,
                requested: false,
                failure: None,
                unanswered: false,
            }),
            extended: Condvar::new(),
            request,
        }))
    }

    pub fn instance_id(&self) -> u32 {
        self.0.instance_id
    }

    /// Counters below `until` are now reserved durably.
    pub fn extend(&self, until: u64) {
        let mut c = self.lock();
        c.limit = c.limit.max(until);
        c.requested = false;
        c.failure = None;
        c.unanswered = false;
        self.0.extended.notify_all();
    }

    /// The reservation asked for failed; the next call to `next` asks again.
    pub fn reservation_failed(&self, reason: String) {
        let mut c = self.lock();
        c.requested = false;
        c.failure = Some(reason);
        c.unanswered = false;
        self.0.extended.notify_all();
    }

    /// (next counter, reserved limit).
    pub fn position(&self) -> (u64, u64) {
        let c = self.lock();
        (c.next, c.limit)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.0.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A counter if one is reserved (`None` if not), the next block asked for once half of
    /// this one is used.
    fn take_reserved(&self, c: &mut Counters) -> Result<Option<u64>, SerialError> {
        let inner = &self.0;
        if !c.requested && c.limit - c.next <= inner.block / 2 {
            let until = c.limit.max(c.next).saturating_add(inner.block);
            if until > layout::MAX_COUNTER {
                return Err(SerialError("the serial counter is exhausted".into()));
            }
            c.requested = true;
            (inner.request)(until);
        }
        Ok((c.next < c.limit).then(|| {
            c.next += 1;
            c.next - 1
        }))
    }

    fn next_counter(&self) -> Result<u64, SerialError> {
        let inner = &self.0;
        let mut c = self.lock();
        let mut waited = false;
        loop {
            if let Some(counter) = self.take_reserved(&mut c)? {
                return Ok(counter);
            }
            if waited || (c.requested && c.unanswered) {
                let reason = match &c.failure {
                    Some(reason) => reason.clone(),
                    None => format!(
                        "no answer in {} s (the archive's writer hangs?)",
                        RESERVATION_WAIT.as_secs_f64()
                    ),
                };
                return Err(SerialError(format!(
                    "no serial block could be reserved: {reason}"
                )));
            }
            let (guard, timeout) = inner
                .extended
                .wait_timeout_while(c, RESERVATION_WAIT, |c| c.next >= c.limit && c.requested)
                .unwrap_or_else(|p| p.into_inner());
            c = guard;
            if timeout.timed_out() && c.requested {
                c.unanswered = true;
            }
            waited = timeout.timed_out() || c.next >= c.limit;
        }
    }
}

impl BlockSerials {
    fn serial(&self, counter: u64) -> Result<Serial, SerialError> {
        let bytes = layout::encode(self.0.instance_id, counter, random_octets::<7>()?);
        Serial::from_unsigned(&bytes).ok_or_else(|| SerialError("invalid serial".into()))
    }
}

impl SerialAllocator for BlockSerials {
    fn next(&self) -> Result<Serial, SerialError> {
        self.serial(self.next_counter()?)
    }

    fn next_without_waiting(&self) -> Option<Result<Serial, SerialError>> {
        let taken = self.take_reserved(&mut self.lock());
        taken.transpose().map(|counter| self.serial(counter?))
    }

    /// The block ran out (the writer has not answered the reservation asked for half a block
    /// ago): `next` would wait.
    fn may_wait(&self) -> bool {
        let c = self.lock();
        c.next >= c.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_twenty_octets_and_distinct() {
        let alloc = RandomSerials::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = alloc.next().unwrap();
            assert_eq!(s.as_bytes().len(), 20);
            assert!(s.as_bytes()[0] & 0x80 == 0 && s.as_bytes()[0] != 0);
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn threads_draw_serials_from_pools_of_their_own() {
        let serials: Vec<Serial> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let alloc = RandomSerials::new();
                        (0..1_000)
                            .map(|_| alloc.next().unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = serials.iter().collect();
        assert_eq!(
            distinct.len(),
            4_000,
            "two threads handed out the same octets"
        );
    }

    #[test]
    fn structured_serials_keep_their_layout() {
        let bytes = layout::encode(0xdead_beef, 0x0102_0304_0506_0708, [7; 7]);
        let serial = Serial::from_unsigned(&bytes).unwrap();
        assert_eq!(serial.as_bytes(), &bytes[..]);
        assert_eq!(
            layout::decode(serial.as_bytes()),
            Some((0xdead_beef, 0x0102_0304_0506_0708))
        );
        assert_eq!(layout::decode(&bytes[1..]), None);
        let mut other = bytes;
        other[0] = 2;
        assert_eq!(layout::decode(&other), None);
    }

    #[test]
    fn block_serials_ask_ahead_and_wait_only_when_the_block_ran_out() {
        use std::sync::mpsc;
        let (tx, rx) = mpsc::channel::<u64>();
        let tx = Mutex::new(tx);
        let serials = BlockSerials::new(
            3,
            100,
            110,
            10,
            Box::new(move |until| tx.lock().unwrap().send(until).unwrap()),
        );
        let mut counters = Vec::new();
        for _ in 0..5 {
            counters.push(layout::decode(serials.next().unwrap().as_bytes()).unwrap());
        }
        assert_eq!(counters, (100..105).map(|c| (3, c)).collect::<Vec<_>>());
        assert!(rx.try_recv().is_err());
        // Half the block is used: the next block is asked for, once.
        serials.next().unwrap();
        let until = rx.try_recv().unwrap();
        assert_eq!(until, 120);
        for _ in 106..110 {
            assert!(!serials.may_wait());
            serials.next().unwrap();
        }
        // The block ran out: `next` waits until the reservation arrives.
        assert!(serials.may_wait());
        let s2 = serials.clone();
        let waiter = std::thread::spawn(move || s2.next().map(|s| s.as_bytes().to_vec()));
        std::thread::sleep(Duration::from_millis(50));
        serials.extend(until);
        let bytes = waiter.join().unwrap().unwrap();
        assert_eq!(layout::decode(&bytes), Some((3, 110)));
        assert_eq!(serials.position(), (111, 120));
        assert!(!serials.may_wait());
    }

    #[test]
    fn a_draw_without_waiting_takes_what_is_reserved_and_nothing_more() {
        // Instance 2, counters 10..13 reserved, blocks of 4; the reservation goes unanswered.
        let asked = Arc::new(Mutex::new(Vec::new()));
        let serials = BlockSerials::new(2, 10, 13, 4, {
            let asked = Arc::clone(&asked);
            Box::new(move |until| asked.lock().unwrap().push(until))
        });
        let mut drawn = Vec::new();
        while let Some(serial) = serials.next_without_waiting() {
            drawn.push(layout::decode(serial.unwrap().as_bytes()).unwrap().1);
        }
        assert_eq!(drawn, [10, 11, 12]);
        assert_eq!(
            *asked.lock().unwrap(),
            [17],
            "the next block was asked for once"
        );
        assert!(serials.may_wait());
        serials.extend(17);
        let next = serials
            .next_without_waiting()
            .expect("reserved again")
            .unwrap();
        assert_eq!(layout::decode(next.as_bytes()).unwrap(), (2, 13));
    }

    #[test]
    fn a_failed_reservation_is_an_error_not_a_reused_counter() {
        let serials = BlockSerials::new(1, 5, 6, 4, Box::new(|_| {}));
        serials.next().unwrap();
        let s2 = serials.clone();
        let waiter = std::thread::spawn(move || s2.next());
        std::thread::sleep(Duration::from_millis(50));
        serials.reservation_failed("disk full".into());
        let err = waiter.join().unwrap().unwrap_err();
        assert!(err.0.contains("disk full"), "{err}");
        assert_eq!(serials.position(), (6, 6));
    }

    /// A reservation never answered (a writer that hangs): one draw waits for it, the next
    /// ones fail at once, until it is answered.
    #[test]
    fn after_one_wait_in_vain_draws_fail_at_once_until_the_reservation_comes() {
        let serials = BlockSerials::new(1, 5, 6, 4, Box::new(|_| {}));
        serials.next().unwrap();
        let started = std::time::Instant::now();
        let err = serials.next().unwrap_err();
        assert!(started.elapsed() >= RESERVATION_WAIT, "{err}");
        assert!(err.0.contains("no answer"), "{err}");
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert!(serials.next().is_err());
        }
        assert!(
            started.elapsed() < RESERVATION_WAIT,
            "{:?}",
            started.elapsed()
        );
        serials.extend(20);
        assert_eq!(
            layout::decode(serials.next().unwrap().as_bytes()).unwrap(),
            (1, 6)
        );
    }
}
