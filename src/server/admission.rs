//! Overload control: how many time-stamp requests may wait for the issuing path at once, and
//! how many connections may be open.
//!
//! At most `server.max_queue` requests are admitted and not yet answered. A request past it
//! waits for a place, first come first served, up to `server.queue_wait_ms`; if none frees in
//! that time it is answered 503 with `Retry-After: 1` and a DER `systemFailure`. So under
//! overload the server spends its time signing what it admitted, latency stays bounded by
//! `max_queue / throughput + queue_wait_ms`, and memory by `max_connections`.
//!
//! Why wait at all: a refusal still costs the server about 13 µs of HTTP and kernel work (a
//! whole P-256 token costs about 31 µs on one core), and a client that ignores `Retry-After`
//! asks again at once. Refused at once, a client that keeps 1,024 connections
//! busy at three times the capacity takes a quarter of the core for refusals; waiting, each
//! connection is refused at most once per `queue_wait_ms`, and every request that a place
//! reaches in time is served instead of asked again. A balancer that retries a 503 on another
//! instance wants it at once: `queue_wait_ms = 0`.
//!
//! A batch takes one place per chunk of [`super::issue::BATCH_CHUNK`] items, the unit in which
//! it queues for the signing lane beside single requests; a batch with more chunks than the
//! whole queue takes all of it, so it runs alone. A batch that finds too few places free
//! first looks for them, every [`BATCH_LOOK_EVERY`], for half its wait, holding none: a
//! waiter in the queue takes each place as it frees, so a batch queued at once would hold
//! the free places idle and every single request behind it until it had them all (up to
//! `queue_wait_ms`, where a request is otherwise admitted at once). For the second half it
//! queues, first come first served, so that a stream of single requests cannot keep it out
//! for good; then the requests behind it wait for it, as behind any request. Past
//! `server.max_connections`, a new connection gets a fixed 503 and is closed (what it sent is
//! read and discarded briefly first, so that its client reads the 503, not a reset).
//!
//! Per client address ([`Addresses`], `server.max_connections_per_address`): past it a new
//! connection from that address gets the same fixed 503, and a batch from an address that
//! already has half of `max_batches_in_flight` in flight gets the batch's 503, so that one
//! client's idle or slow connections and uploads cannot take the places every client shares.
//! Per client ([`ClientBatches`], while `[auth]` names clients): a batch from a client, or
//! from the anonymous callers together, that already has half of `max_batches_in_flight` in
//! flight gets the batch's 503 too, whatever its address (behind a balancer, all are one).
//! And per client address and second ([`ConnectionRate`],
//! `server.new_connections_per_address_per_s`): past its burst, a new connection from an
//! address that opens them faster gets a 503 too (over TLS it is closed before the handshake).
//!
//! Why the yield in [`Admission::enter`] matters: a software signer signs on the async worker,
//! so without it a request would run from its first byte to its response in one poll and
//! the backlog would never become visible here (it would wait, uncounted, in the sockets).
//! Yielding once after admission lets the worker read the other ready connections first, so
//! the count is the real queue and what exceeds it waits here, or is refused.

use std::collections::hash_map::{Entry, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};

/// The answer to a connection over the limit: written before the connection is closed.
pub const CONNECTIONS_EXCEEDED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Retry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\
    Connection: close\r\n\r\ntoo many connections\n";

/// How often a batch that found too few places looks for them again while it does not queue
/// (see the module's documentation).
pub const BATCH_LOOK_EVERY: Duration = Duration::from_millis(2);

/// The queue's places, and the requests waiting for one.
#[derive(Debug)]
pub struct Admission {
    max_queue: usize,
    /// One permit per free place; its waiters are served in order.
    places: Arc<Semaphore>,
    wait: Duration,
    waiting: AtomicUsize,
}

impl Admission {
    pub fn new(max_queue: usize, wait: Duration) -> Self {
        // A place count is a u32 to the semaphore.
        let max_queue = max_queue.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            max_queue,
            places: Arc::new(Semaphore::new(max_queue)),
            wait,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Takes `n` places (a batch's chunks), waiting up to `queue_wait_ms` for them behind the
    /// requests that came first (a batch first without queuing, for half of it), then yields
    /// once (see the module's documentation). `None`: overloaded; the ticket returns the
    /// places when dropped.
    pub async fn enter(&self, n: usize) -> Option<Ticket<'_>> {
        let n = self.places_for(n);
        let permit = match self.places.try_acquire_many(n) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) if !self.wait.is_zero() => {
                let _waiting = Waiting::count(&self.waiting);
                let deadline = tokio::time::Instant::now() + self.wait;
                match self.look_for(n, deadline - self.wait / 2).await? {
                    Some(permit) => permit,
                    None => tokio::time::timeout_at(deadline, self.places.acquire_many(n))
                        .await
                        .ok()?
                        .ok()?,
                }
            }
            Err(_) => return None,
        };
        tokio::task::yield_now().await;
        Some(Ticket { _places: permit })
    }

    /// A batch's `n` places, taken as soon as they are free together before `until`, queuing
    /// for none. `Some(None)`: not found in time (a single place queues at once).
    async fn look_for(
        &self,
        n: u32,
        until: tokio::time::Instant,
    ) -> Option<Option<SemaphorePermit<'_>>> {
        if n == 1 {
            return Some(None);
        }
        while tokio::time::Instant::now() + BATCH_LOOK_EVERY <= until {
            tokio::time::sleep(BATCH_LOOK_EVERY).await;
            match self.places.try_acquire_many(n) {
                Ok(permit) => return Some(Some(permit)),
                Err(TryAcquireError::NoPermits) => {}
                Err(TryAcquireError::Closed) => return None,
            }
        }
        Some(None)
    }

    /// At least one place; a batch larger than the whole queue takes all of it.
    fn places_for(&self, n: usize) -> u32 {
        // max_queue fits a u32 (`new`).
        n.clamp(1, self.max_queue) as u32
    }

    /// Requests admitted and not yet answered.
    pub fn depth(&self) -> usize {
        taken(&self.places, self.max_queue)
    }

    /// [`Admission::depth`], read from elsewhere (the archive's writer).
    pub fn depth_gauge(&self) -> Box<dyn Fn() -> usize + Send + Sync> {
        let (places, max_queue) = (Arc::clone(&self.places), self.max_queue);
        Box::new(move || taken(&places, max_queue))
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
}

/// The places of `max_queue` that are taken: the requests admitted and not yet answered.
fn taken(places: &Semaphore, max_queue: usize) -> usize {
    max_queue - places.available_permits()
}

/// Places in the queue, held until the request is answered.
#[derive(Debug)]
pub struct Ticket<'a> {
    _places: SemaphorePermit<'a>,
}

/// One request counted in [`Admission::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

/// The address a client is counted under ([`Addresses`]): an IPv4 address as it is, an
/// IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client) as its IPv4 address, and
/// any other IPv6 address as its /64. A /64 is one subnet, which a single host or home
/// usually owns whole (SLAAC, a provider's delegated prefix): counted one by one, a host could
/// take a new address of its 2^64 for each connection; grouped, the subnet shares one
/// allowance, as hosts behind one NAT share their IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn of(ip: IpAddr) -> Self {
        Self(match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
            v4 => v4,
        })
    }
}

/// The address, an IPv6 subnet with its `/64`: as it appears in the log.
impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Open public connections and batches in flight per client address
/// (`server.max_connections_per_address`; [`AddressKey`] says what one address is).
///
/// An address has an entry while it has a connection open: made by its first connection,
/// removed with its last (the [`AddressSlot`]'s `Drop`). So the map holds no more entries
/// than connections are open (at most `max_connections`, which are counted first; its table
/// keeps the capacity of its busiest moment, no more than that), and nothing is left behind
/// by clients gone. Its cost: one map operation under a short lock
/// when a connection opens and one when it closes, nothing per request; a batch counts on its
/// address's own counter, without the lock. The map's hasher is keyed at random, so that
/// clients cannot choose addresses that collide.
#[derive(Debug)]
pub struct Addresses {
    /// Connections per address; 0: not counted (nor their batches).
    max_connections: usize,
    /// Batches in flight per address.
    max_batches: usize,
    open: Arc<Mutex<HashMap<AddressKey, Counts>>>,
}

/// One address's open connections, and its batches in flight (shared with its slots).
#[derive(Debug)]
struct Counts {
    connections: usize,
    batches: Arc<AtomicUsize>,
}

impl Addresses {
    /// `max_connections` per address (0: no limit); an address's batches in flight are held
    /// to half of `max_batches_in_flight` (at least 1), so that one address leaves the other
    /// half to everyone else, and a client that uploads two at once still has its two.
    pub fn new(max_connections: usize, max_batches_in_flight: usize) -> Self {
        Self {
            max_connections,
            max_batches: (max_batches_in_flight / 2).max(1),
            open: Arc::default(),
        }
    }

    /// A place for a new connection from `ip`, or (`Err`) the address it is counted under,
    /// which has `max_connections` open. Without a limit, a slot that counts nothing.
    pub fn open(&self, ip: IpAddr) -> Result<AddressSlot, AddressKey> {
        if self.max_connections == 0 {
            return Ok(AddressSlot::uncounted());
        }
        let key = AddressKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let counts = open.entry(key).or_insert_with(|| Counts {
            connections: 0,
            batches: Arc::default(),
        });
        if counts.connections >= self.max_connections {
            // Never a fresh entry: max_connections is at least 1 here.
            return Err(key);
        }
        counts.connections += 1;
        Ok(AddressSlot {
            counted: Some(Counted {
                open: Arc::clone(&self.open),
                key,
                batches: Arc::clone(&counts.batches),
                max_batches: self.max_batches,
            }),
        })
    }

    /// Addresses with a connection open.
    pub fn count(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One connection's place under its address's limit; dropping it closes the place, and its
/// address's entry with the last one.
#[derive(Debug)]
pub struct AddressSlot {
    /// `None`: not counted (no limit set, or a stream without an address).
    counted: Option<Counted>,
}

#[derive(Debug)]
struct Counted {
    open: Arc<Mutex<HashMap<AddressKey, Counts>>>,
    key: AddressKey,
    batches: Arc<AtomicUsize>,
    max_batches: usize,
}

impl AddressSlot {
    /// A slot under no limit.
    pub fn uncounted() -> Self {
        Self { counted: None }
    }

    /// A batch place of this connection's address, returned when dropped; or (`Err`) the
    /// address, which has its share of batches in flight ([`Addresses::new`]).
    pub fn batch(&self) -> Result<AddressBatch, AddressKey> {
        let Some(counted) = &self.counted else {
            return Ok(AddressBatch(None));
        };
        let max = counted.max_batches;
        counted
            .batches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| AddressBatch(Some(Arc::clone(&counted.batches))))
            .map_err(|_| counted.key)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Entry::Occupied(mut counts) = open.entry(self.key) {
            counts.get_mut().connections -= 1;
            if counts.get().connections == 0 {
                counts.remove();
            }
        }
    }
}

/// One batch in flight counted under its address; dropping it returns the place (held until
/// the batch's reply is sent).
#[derive(Debug)]
pub struct AddressBatch(Option<Arc<AtomicUsize>>);

impl Drop for AddressBatch {
    fn drop(&mut self) {
        if let Some(batches) = &self.0 {
            batches.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Batches in flight per client, while `[auth]` names clients: each named client, and the
/// anonymous callers together, hold at most half of `max_batches_in_flight` (at least 1).
/// Behind a balancer every connection has the balancer's address, so the address's share
/// cannot tell an e-invoice platform from a flood of anonymous uploads that the client
/// names can: neither the anonymous callers nor any one client can take every place. With
/// no named clients there is one client only, and no share.
///
/// A client has an entry while it has a batch in flight, so the map holds at most as many
/// entries as batches are being taken or held; its names are the configuration's (a
/// client's own bytes never make a key).
#[derive(Debug)]
pub struct ClientBatches {
    max: usize,
    held: BatchesByClient,
}

/// Batches in flight by client name (`None`: the anonymous callers).
type BatchesByClient = Arc<Mutex<HashMap<Option<Arc<str>>, usize>>>;

impl ClientBatches {
    pub fn new(max_batches_in_flight: usize) -> Self {
        Self {
            max: (max_batches_in_flight / 2).max(1),
            held: Arc::default(),
        }
    }

    /// A batch place of `client`'s share, returned when dropped; `None` while it holds its
    /// share. `shared`: whether shares apply (`[auth]` names clients).
    pub fn take(&self, client: &super::Client, shared: bool) -> Option<ClientBatch> {
        if !shared {
            return Some(ClientBatch(None));
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(client.name.clone()).or_insert(0);
        if *count >= self.max {
            // Never a fresh entry: max is at least 1.
            return None;
        }
        *count += 1;
        Some(ClientBatch(Some((
            Arc::clone(&self.held),
            client.name.clone(),
        ))))
    }
}

/// One batch in flight counted under its client; dropping it returns the place (held until
/// the batch's reply is sent), and the client's entry with its last.
#[derive(Debug)]
pub struct ClientBatch(Option<(BatchesByClient, Option<Arc<str>>)>);

impl Drop for ClientBatch {
    fn drop(&mut self) {
        let Some((held, name)) = self.0.take() else {
            return;
        };
        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
        if let Entry::Occupied(mut count) = held.entry(name) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// New public connections per client address and second
/// (`server.new_connections_per_address_per_s`, [`AddressKey`] says what one address is): a
/// token bucket of `burst` connections per address, refilled at the rate.
///
/// Each accepted TLS connection costs the server a handshake (a key exchange and a signature:
/// seven to eight tokens' CPU), and a client can make it do one by sending a recorded
/// ClientHello, with no cryptography of its own; `max_connections_per_address` bounds the
/// connections an address holds, not how fast it opens and drops them.
///
/// The bucket is kept as the instant it is full again (the generic cell rate algorithm): an
/// address's entry is one key and one number, and it can go once that instant has passed, at
/// most `burst / rate` seconds after the address's last connection. Entries that can go are
/// swept when the table has doubled since the last sweep (at most every [`SWEEP_PAUSE`]), so
/// it holds about the addresses that connected within the last `burst / rate` seconds:
/// amortized one map operation per new connection, under a short lock. It holds at most
/// [`MAX_ADDRESSES`]: past that (many addresses at once, which a per-address limit does not
/// hold anyway) a new address goes uncounted, as it would with no limit, and the server says
/// so in its log.
#[derive(Debug)]
pub struct ConnectionRate {
    /// Nanoseconds between connections at the rate; 0: no limit.
    interval_ns: u64,
    /// How far an address's schedule may run ahead of now: `burst - 1` intervals.
    tolerance_ns: u64,
    epoch: Instant,
    table: Mutex<RateTable>,
    /// The fixed answer to a connection refused on the plain listener: a 503 whose
    /// `Retry-After` is the rate's interval, in whole seconds.
    refusal: Vec<u8>,
}

#[derive(Debug)]
struct RateTable {
    /// Per address, the instant (since the epoch, ns) at which its bucket is full again.
    full_at: HashMap<AddressKey, u64>,
    /// The table's size that starts the next sweep.
    sweep_at: usize,
    /// No sweep before this instant (ns since the epoch).
    quiet_until: u64,
}

/// A configured burst: 0 is one second's worth of `per_s`, at least 1.
fn default_burst(per_s: f64, burst: u32) -> u64 {
    match burst {
        0 => per_s.ceil().max(1.0) as u64,
        n => u64::from(n),
    }
}

/// The smallest table that is swept.
const MIN_SWEEP: usize = 1024;
/// The most addresses the table holds (about 5 MB).
pub const MAX_ADDRESSES: usize = 100_000;
/// The least time between two sweeps: a table full of addresses that all still refill is not
/// gone through again for each new address.
const SWEEP_PAUSE: Duration = Duration::from_millis(100);

impl ConnectionRate {
    /// Failed authentications: `per_s` a second per address (0: no limit), `burst` at once
    /// (as [`ConnectionRate::new`]), but never fewer than `checking + 1`. Each request with a
    /// key takes a failure while its key is looked at and gives it back where the key is
    /// right, and `checking` requests (the worker threads) may be looked at together: a
    /// smaller burst would refuse an address's right keys sent at once.
    pub fn for_failures(per_s: f64, burst: u32, checking: usize) -> Self {
        let floor = u64::try_from(checking)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        Self::with_burst(per_s, default_burst(per_s, burst).max(floor))
    }

    /// `per_s` new connections a second per address (0: no limit), `burst` at once (0: one
    /// second's worth; at least 1).
    pub fn new(per_s: f64, burst: u32) -> Self {
        Self::with_burst(per_s, default_burst(per_s, burst))
    }

    /// `per_s` a second per address (0: no limit), `burst` (at least 1) at once.
    fn with_burst(per_s: f64, burst: u64) -> Self {
        let interval_ns = if per_s > 0.0 {
            (1e9 / per_s).clamp(1.0, u64::MAX as f64) as u64
        } else {
            0
        };
        let retry_after = interval_ns.div_ceil(1_000_000_000).max(1);
        let body = "too many new connections\n";
        let refusal = format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        Self {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst - 1),
            epoch: Instant::now(),
            table: Mutex::new(RateTable {
                full_at: HashMap::new(),
                sweep_at: MIN_SWEEP,
                quiet_until: 0,
            }),
            refusal: refusal.into_bytes(),
        }
    }

    /// Whether a new connection from `ip` may open now; `Err`: the address it is counted
    /// under, which has opened its burst faster than the rate.
    pub fn admit(&self, ip: IpAddr) -> Result<(), AddressKey> {
        if self.interval_ns == 0 {
            return Ok(());
        }
        self.admit_at(ip, self.epoch.elapsed())
    }

    fn admit_at(&self, ip: IpAddr, now: Duration) -> Result<(), AddressKey> {
        if self.interval_ns == 0 {
            return Ok(());
        }
        let now = nanos(now);
        let key = AddressKey::of(ip);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(full_at) = table.full_at.get_mut(&key) {
            let start = (*full_at).max(now);
            if start - now > self.tolerance_ns {
                return Err(key);
            }
            *full_at = start.saturating_add(self.interval_ns);
            return Ok(());
        }
        // A new address (or one whose bucket was full again and swept): its bucket is full.
        if table.full_at.len() >= table.sweep_at && now >= table.quiet_until {
            table.sweep(now);
        }
        if table.full_at.len() >= MAX_ADDRESSES {
            drop(table);
            static LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new();
            if let Some(left_out) = LOG.allow() {
                tracing::warn!(
                    addresses = MAX_ADDRESSES,
                    left_out,
                    "new_connections_per_address_per_s: the table of addresses is full; \
                     connections from addresses not in it are not held to the rate"
                );
            }
            return Ok(());
        }
        table
            .full_at
            .insert(key, now.saturating_add(self.interval_ns));
        Ok(())
    }

    /// Gives back one taken by [`ConnectionRate::admit`] (a request with credentials that
    /// turned out right: its failure was taken before they were looked at).
    pub fn give_back(&self, ip: IpAddr) {
        if self.interval_ns == 0 {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(full_at) = table.full_at.get_mut(&AddressKey::of(ip)) {
            *full_at = full_at.saturating_sub(self.interval_ns);
        }
    }

    /// How long until `ip` may take one more from its bucket, where it may not now; nothing
    /// is taken. (The same table counts failed authentications per address:
    /// `server.auth_failures_per_address_per_s`, where [`ConnectionRate::admit`] takes a
    /// failure and this tells whether the address has failures left.)
    pub fn exhausted(&self, ip: IpAddr) -> Option<Duration> {
        self.exhausted_at(ip, self.epoch.elapsed())
    }

    fn exhausted_at(&self, ip: IpAddr, now: Duration) -> Option<Duration> {
        if self.interval_ns == 0 {
            return None;
        }
        let now = nanos(now);
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let full_at = *table.full_at.get(&AddressKey::of(ip))?;
        let ahead = full_at.saturating_sub(now);
        (ahead > self.tolerance_ns).then(|| Duration::from_nanos(ahead - self.tolerance_ns))
    }

    /// The answer to a connection refused on the plain listener.
    pub fn refusal(&self) -> &[u8] {
        &self.refusal
    }

    /// Addresses whose bucket is refilling (the gauge); those full again are swept first,
    /// unless a sweep ran in the last `SWEEP_PAUSE`.
    pub fn count(&self) -> usize {
        self.count_at(self.epoch.elapsed())
    }

    fn count_at(&self, now: Duration) -> usize {
        let now = nanos(now);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if now >= table.quiet_until {
            // What a sweep leaves is refilling.
            table.sweep(now);
            return table.full_at.len();
        }
        table
            .full_at
            .values()
            .filter(|&&full_at| full_at > now)
            .count()
    }
}

impl RateTable {
    /// Drops the addresses whose bucket is full again, and most of the room they held.
    fn sweep(&mut self, now: u64) {
        self.full_at.retain(|_, full_at| *full_at > now);
        let len = self.full_at.len();
        if self.full_at.capacity() > 4 * len.max(MIN_SWEEP) {
            self.full_at.shrink_to(2 * len.max(MIN_SWEEP));
        }
        self.sweep_at = (2 * len).clamp(MIN_SWEEP, MAX_ADDRESSES);
        self.quiet_until = now.saturating_add(nanos(SWEEP_PAUSE));
    }
}

/// `d` in nanoseconds, the rate table's unit (saturating: some 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a runtime like the server's (timers on), one thread.
    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn the_queue_admits_up_to_its_depth_and_frees_room_on_drop() {
        run(async {
            let admission = Admission::new(3, Duration::ZERO);
            let a = admission.enter(1).await.expect("room");
            let b = admission.enter(2).await.expect("room");
            assert_eq!(admission.depth(), 3);
            assert!(admission.enter(1).await.is_none(), "the queue is full");
            assert_eq!(admission.depth(), 3, "a refusal leaves no trace");
            drop(a);
            let c = admission.enter(1).await.expect("room again");
            drop((b, c));
            assert_eq!(admission.depth(), 0);
        });
    }

    #[test]
    fn a_batch_larger_than_the_queue_runs_alone() {
        run(async {
            let admission = Admission::new(4, Duration::ZERO);
            let big = admission
                .enter(10)
                .await
                .expect("admitted when nothing waits");
            assert_eq!(admission.depth(), 4, "it takes the whole queue");
            assert!(admission.enter(1).await.is_none());
            drop(big);
            let one = admission.enter(1).await.expect("room");
            assert!(
                admission.enter(10).await.is_none(),
                "not beside another request"
            );
            drop(one);
        });
    }

    #[test]
    fn past_the_queue_a_request_waits_for_a_place_in_arrival_order() {
        run(async {
            let admission = Arc::new(Admission::new(1, Duration::from_secs(30)));
            let held = admission.enter(1).await.expect("room");
            let order = Arc::new(std::sync::Mutex::new(Vec::new()));
            let waiters: Vec<_> = (0..3)
                .map(|i| {
                    let (admission, order) = (admission.clone(), order.clone());
                    tokio::spawn(async move {
                        let ticket = admission.enter(1).await.expect("a place in time");
                        order.lock().unwrap().push(i);
                        // Hand the place on after a moment, as an answered request does.
                        tokio::task::yield_now().await;
                        drop(ticket);
                    })
                })
                .collect();
            // Let all three start waiting, in the order they were spawned.
            while admission.waiting() < 3 {
                tokio::task::yield_now().await;
            }
            assert!(order.lock().unwrap().is_empty(), "nobody passed the queue");
            drop(held);
            for waiter in waiters {
                waiter.await.expect("the waiter");
            }
            assert_eq!(
                *order.lock().unwrap(),
                [0, 1, 2],
                "first come, first served"
            );
            assert_eq!((admission.waiting(), admission.depth()), (0, 0));
        });
    }

    /// A batch that finds too few places does not hold the free ones while it looks for the
    /// rest: single requests are admitted beside it at once, and it gets its places when they
    /// free together. For the second half of its wait it queues: then single requests wait
    /// behind it.
    #[test]
    fn a_waiting_batch_leaves_the_free_places_to_single_requests_for_half_its_wait() {
        run(async {
            let wait = Duration::from_millis(400);
            let admission = Arc::new(Admission::new(10, wait));
            let held = admission.enter(6).await.expect("room");
            let batch = {
                let admission = admission.clone();
                tokio::spawn(async move { admission.enter(8).await.map(|_t| ()) })
            };
            while admission.waiting() < 1 {
                tokio::task::yield_now().await;
            }
            let started = tokio::time::Instant::now();
            let single = admission.enter(1).await.expect("a free place");
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "admitted at once"
            );
            drop(single);
            drop(held);
            assert_eq!(batch.await.unwrap(), Some(()), "the batch found its places");
            assert_eq!((admission.waiting(), admission.depth()), (0, 0));

            // Past half its wait the batch queues: the free places go to it.
            let held = admission.enter(6).await.expect("room");
            let batch = {
                let admission = admission.clone();
                tokio::spawn(async move { admission.enter(8).await.map(|_t| ()) })
            };
            tokio::time::sleep(wait / 2).await;
            // Queued from half its wait on: it takes the free places as it waits.
            let queued = tokio::time::Instant::now();
            while admission.depth() < 10 && queued.elapsed() < wait / 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                admission.depth(),
                10,
                "the queued batch holds the free places"
            );
            let started = tokio::time::Instant::now();
            let single = {
                let admission = admission.clone();
                tokio::spawn(async move { admission.enter(1).await.map(|_t| ()) })
            };
            drop(held);
            assert_eq!(batch.await.unwrap(), Some(()));
            assert_eq!(single.await.unwrap(), Some(()), "admitted after the batch");
            assert!(started.elapsed() < wait);
        });
    }

    #[test]
    fn a_request_that_finds_no_place_in_time_is_refused() {
        run(async {
            let wait = Duration::from_millis(50);
            let admission = Admission::new(2, wait);
            let _held = admission.enter(2).await.expect("room");
            let started = tokio::time::Instant::now();
            assert!(admission.enter(1).await.is_none(), "still no room");
            assert!(
                started.elapsed() >= wait,
                "refused before its wait was over"
            );
            assert_eq!(admission.waiting(), 0, "a refused request no longer waits");
            assert_eq!(admission.depth(), 2);
        });
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

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn an_address_is_counted_as_ipv4_or_as_its_ipv6_64() {
        let key = |text| AddressKey::of(ip(text));
        assert_eq!(key("192.0.2.7"), AddressKey(ip("192.0.2.7")));
        // A dual-stack listener's IPv4 client is its IPv4 address.
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        // One /64, whatever the interface identifier; the next /64 is another address.
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:a:b:c:d"));
        assert_eq!(
            key("2001:db8:1:2:a:b:c:d"),
            AddressKey(ip("2001:db8:1:2::"))
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        // Only the mapped form is IPv4: an ordinary IPv6 address ending in the same octets
        // is not.
        assert_ne!(key("::c000:207"), key("192.0.2.7"));
        assert_eq!(key("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn connections_are_counted_per_address_until_the_last_closes() {
        let addresses = Addresses::new(2, 8);
        let a = addresses.open(ip("192.0.2.1")).expect("first");
        let b = addresses
            .open(ip("::ffff:192.0.2.1"))
            .expect("second, the same address");
        assert!(addresses.open(ip("192.0.2.1")).is_err(), "a third");
        assert_eq!(addresses.count(), 1, "a refusal leaves no entry");
        let other = addresses.open(ip("192.0.2.2")).expect("another address");
        let v6 = addresses.open(ip("2001:db8::1")).expect("an IPv6 host");
        let _v6 = addresses.open(ip("2001:db8::2")).expect("its /64 again");
        let refused = addresses
            .open(ip("2001:db8::3"))
            .expect_err("the /64 is full");
        assert_eq!(refused.to_string(), "2001:db8::/64");
        assert_eq!(addresses.count(), 3);
        drop(a);
        let c = addresses.open(ip("192.0.2.1")).expect("a place again");
        drop((b, c, other, v6, _v6));
        assert_eq!(
            addresses.count(),
            0,
            "no entry outlives its last connection"
        );
    }

    #[test]
    fn without_a_limit_nothing_is_counted() {
        let addresses = Addresses::new(0, 1);
        let slots: Vec<_> = (0..100)
            .map(|_| addresses.open(ip("192.0.2.1")).expect("no limit"))
            .collect();
        assert_eq!(addresses.count(), 0);
        let batches: Vec<_> = slots.iter().map(|s| s.batch().expect("no limit")).collect();
        assert_eq!(batches.len(), 100);
    }

    #[test]
    fn a_client_has_half_the_batch_places_while_clients_are_named() {
        use crate::server::Client;
        let clients = ClientBatches::new(5);
        let alice = Client::named("alice");
        let held: Vec<_> = (0..2)
            .map(|_| clients.take(&alice, true).expect("two of five"))
            .collect();
        assert!(clients.take(&alice, true).is_none(), "her half is taken");
        // The anonymous callers are one client of their own, and another name has its own.
        let anonymous: Vec<_> = (0..2)
            .map(|_| clients.take(&Client::ANONYMOUS, true).expect("theirs"))
            .collect();
        assert!(clients.take(&Client::ANONYMOUS, true).is_none());
        let bob = clients.take(&Client::named("bob"), true).expect("his");
        drop(held);
        let again = clients.take(&alice, true).expect("her places returned");
        drop((anonymous, bob, again));
        assert!(
            clients.held.lock().unwrap().is_empty(),
            "no entry left behind"
        );
        // With no client named there is no share; and at least one place otherwise.
        let unshared: Vec<_> = (0..10)
            .map(|_| clients.take(&Client::ANONYMOUS, false).expect("no share"))
            .collect();
        assert!(clients.held.lock().unwrap().is_empty());
        drop(unshared);
        let one = ClientBatches::new(1);
        let only = one.take(&alice, true).expect("one");
        assert!(one.take(&alice, true).is_none());
        drop(only);
    }

    #[test]
    fn an_address_has_half_the_batch_places() {
        let addresses = Addresses::new(10, 5);
        let (a, b) = (
            addresses.open(ip("192.0.2.1")).expect("a"),
            addresses.open(ip("192.0.2.1")).expect("b"),
        );
        let first = a.batch().expect("one of two");
        let second = b.batch().expect("two of two, on another connection");
        assert!(
            a.batch().is_err() && b.batch().is_err(),
            "its half is taken"
        );
        let other = addresses.open(ip("192.0.2.2")).expect("another address");
        let theirs = other.batch().expect("another address's own share");
        drop(first);
        let again = b.batch().expect("a place returned");
        drop((second, theirs, again));
        // At least one, however small max_batches_in_flight.
        let one = Addresses::new(10, 1).open(ip("192.0.2.1")).expect("a");
        let held = one.batch().expect("one");
        assert!(one.batch().is_err());
        drop(held);
    }

    #[test]
    fn an_address_opens_its_burst_then_one_connection_per_interval() {
        // Two a second, bursts of three.
        let rate = ConnectionRate::new(2.0, 3);
        let at = |ms: u64| Duration::from_millis(ms);
        for n in 0..3 {
            assert!(rate.admit_at(ip("192.0.2.1"), at(0)).is_ok(), "burst {n}");
        }
        let refused = rate.admit_at(ip("::ffff:192.0.2.1"), at(10)).unwrap_err();
        assert_eq!(refused.to_string(), "192.0.2.1");
        assert!(
            rate.admit_at(ip("192.0.2.2"), at(10)).is_ok(),
            "another address"
        );
        // One more each half second; a refusal spends nothing.
        assert!(rate.admit_at(ip("192.0.2.1"), at(499)).is_err());
        assert!(rate.admit_at(ip("192.0.2.1"), at(500)).is_ok());
        assert!(rate.admit_at(ip("192.0.2.1"), at(600)).is_err());
        assert!(rate.admit_at(ip("192.0.2.1"), at(1000)).is_ok());
        // Idle for the burst's time, the bucket is full again: three at once.
        for n in 0..3 {
            assert!(rate.admit_at(ip("192.0.2.1"), at(2500)).is_ok(), "{n}");
        }
        assert!(rate.admit_at(ip("192.0.2.1"), at(2500)).is_err());
        // An IPv6 /64 is one address.
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::3"] {
            assert!(rate.admit_at(ip(host), at(0)).is_ok());
        }
        assert!(rate.admit_at(ip("2001:db8::4"), at(0)).is_err());
    }

    /// Right keys sent together from one address each take a failure while they are looked
    /// at: the burst is never below the requests looked at together, plus one.
    #[test]
    fn the_failure_burst_holds_the_keys_looked_at_together() {
        let ip = ip("192.0.2.9");
        for (burst, checking, room) in [(0, 4, 5), (1, 2, 3), (20, 4, 20)] {
            let failures = ConnectionRate::for_failures(0.1, burst, checking);
            for i in 0..room {
                assert!(failures.admit(ip).is_ok(), "{burst} {checking}: {i}");
            }
            assert!(failures.admit(ip).is_err(), "{burst} {checking}");
        }
    }

    #[test]
    fn exhausted_tells_the_wait_for_one_more_and_takes_nothing() {
        // One every two seconds (failed authentications), three at once.
        let rate = ConnectionRate::new(0.5, 3);
        let at = |ms: u64| Duration::from_millis(ms);
        let a = ip("192.0.2.1");
        assert_eq!(rate.exhausted_at(a, at(0)), None, "never seen");
        for n in 0..3 {
            assert_eq!(rate.exhausted_at(a, at(0)), None, "{n}");
            assert!(rate.admit_at(a, at(0)).is_ok(), "{n}");
        }
        assert_eq!(rate.exhausted_at(a, at(500)), Some(at(1500)));
        assert_eq!(
            rate.exhausted_at(a, at(500)),
            Some(at(1500)),
            "nothing taken"
        );
        assert_eq!(rate.exhausted_at(ip("192.0.2.2"), at(500)), None);
        assert_eq!(rate.exhausted_at(a, at(2000)), None);
        assert!(rate.admit_at(a, at(2000)).is_ok());
        assert_eq!(rate.exhausted_at(a, at(2000)), Some(at(2000)));
        // One given back (credentials that were right) is there again.
        rate.give_back(a);
        assert_eq!(rate.exhausted_at(a, at(2000)), None);
        assert!(rate.admit_at(a, at(2000)).is_ok());
        assert_eq!(ConnectionRate::new(0.0, 0).exhausted_at(a, at(0)), None);
    }

    #[test]
    fn one_second_of_the_rate_is_the_default_burst_and_zero_no_limit() {
        let rate = ConnectionRate::new(4.0, 0);
        let now = Duration::from_secs(1);
        assert_eq!(
            (0..10)
                .filter(|_| rate.admit_at(ip("192.0.2.1"), now).is_ok())
                .count(),
            4
        );
        let slow = ConnectionRate::new(0.1, 0);
        assert!(slow.admit_at(ip("192.0.2.1"), now).is_ok(), "at least one");
        assert!(slow.admit_at(ip("192.0.2.1"), now).is_err());
        let none = ConnectionRate::new(0.0, 0);
        assert!((0..1000).all(|_| none.admit_at(ip("192.0.2.1"), now).is_ok()));
        assert_eq!(none.count_at(now), 0, "nothing kept without a limit");
    }

    #[test]
    fn addresses_whose_bucket_is_full_again_are_swept() {
        let rate = ConnectionRate::new(10.0, 10);
        let host = |n: u32| IpAddr::V4(std::net::Ipv4Addr::from_bits(0x0a00_0000 + n));
        // 5,000 addresses at once: every one has a bucket to refill, the table keeps them
        // (and the next sweep waits for twice as many).
        for n in 0..5_000 {
            rate.admit_at(host(n), Duration::ZERO)
                .expect("a first connection");
        }
        assert_eq!(rate.count_at(Duration::ZERO), 5_000);
        // A second later (each bucket refills in a second) they can go: when the table has
        // doubled, at 8,192, the sweep takes all of them and none of the newcomers.
        for n in 5_000..8_200 {
            rate.admit_at(host(n), Duration::from_secs(2))
                .expect("a first connection");
        }
        assert_eq!(rate.count_at(Duration::from_secs(2)), 3_200);
        // What was swept had a full bucket: the address gets its whole burst.
        let later = Duration::from_secs(3);
        assert_eq!(
            (0..20)
                .filter(|_| rate.admit_at(host(1), later).is_ok())
                .count(),
            10
        );
    }

    #[test]
    fn the_gauge_counts_the_buckets_still_refilling() {
        let rate = ConnectionRate::new(10.0, 10);
        let at = Duration::from_secs(1);
        for host in ["192.0.2.1", "192.0.2.2", "2001:db8::1"] {
            rate.admit_at(ip(host), at).expect("a first connection");
        }
        assert_eq!(rate.count_at(at), 3);
        // Each bucket refills in 0.1 s: a second later none is counted, and the table is empty.
        assert_eq!(rate.count_at(at + Duration::from_secs(1)), 0);
        assert!(rate.table.lock().unwrap().full_at.is_empty());
    }

    #[test]
    fn the_table_holds_at_most_max_addresses_and_lets_the_rest_through() {
        let rate = ConnectionRate::new(1.0, 1);
        let host = |n: u32| IpAddr::V4(std::net::Ipv4Addr::from_bits(0x0a00_0000 + n));
        let now = Duration::from_secs(1);
        for n in 0..MAX_ADDRESSES as u32 + 10 {
            rate.admit_at(host(n), now).expect("a first connection");
        }
        assert_eq!(rate.count_at(now), MAX_ADDRESSES);
        // Those in it are held to the rate; those past it go uncounted.
        assert!(rate.admit_at(host(0), now).is_err());
        assert!(rate.admit_at(host(MAX_ADDRESSES as u32 + 5), now).is_ok());
        assert!(rate.admit_at(host(MAX_ADDRESSES as u32 + 5), now).is_ok());
        // Once their buckets are full again, the sweep makes room.
        let later = now + Duration::from_secs(2);
        assert!(rate.admit_at(host(u32::MAX >> 8), later).is_ok());
        assert_eq!(rate.count_at(later), 1);
        assert!(rate.admit_at(host(u32::MAX >> 8), later).is_err());
    }

    #[test]
    fn a_refused_connection_is_told_when_to_come_back() {
        let answer = |rate: ConnectionRate| String::from_utf8(rate.refusal().to_vec()).unwrap();
        assert!(answer(ConnectionRate::new(200.0, 0)).contains("Retry-After: 1\r\n"));
        assert!(answer(ConnectionRate::new(0.1, 3)).contains("Retry-After: 10\r\n"));
        let text = answer(ConnectionRate::new(0.3, 0));
        assert!(text.contains("Retry-After: 4\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
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
