//! chronyd's remaining correction, which the kernel clock ([`super::kernel`]) adds to its bound.
//!
//! chronyd slews the system clock itself and writes the kernel's `maxerror` as its root
//! distance alone, leaving out the offset it has still to slew: small in steady state, but
//! after a disturbance it finds at an update (a virtual machine paused or migrated, the network
//! back after an outage) whatever it found, for the minutes the slew takes. Its command port
//! answers `tracking` to unprivileged clients on loopback (127.0.0.1:323 by default), whose
//! "System time" is that correction. [`Correction`] asks for it on a thread of its own, four
//! times a second, and gives it to a reading only while it still holds: read less than
//! [`MAX_AGE`] ago, and the daemon has not touched the clock since (each update writes the
//! kernel's `esterror`, `maxerror` and frequency anew, and starting or ending a slew the
//! frequency; between them `esterror` and the frequency stay and `maxerror` only grows). A
//! reading that sees such a change asks the thread to read again, waits for it (a loopback
//! round trip, [`REFRESH_WAIT`] at most) and reads the kernel again, rather than refuse; a
//! reading made before the answer it gets (the correction shrinks as chronyd slews) adds what
//! chronyd can have slewed in between. While chronyd does not answer, the last value holds
//! until it expires, and then every reading is refused.
//!
//! The request and reply are chrony's command protocol, version 6 (`candm.h`): a 20-octet
//! request header padded to the reply's length (chronyd answers no request shorter than its
//! reply), and a 28-octet reply header before the tracking report, whose numbers are chrony's
//! 32-bit floats (a 7-bit exponent over a 25-bit coefficient, both signed).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::kernel::KernelState;

/// How long a correction read is trusted at most.
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// How often the thread asks while no reading wakes it.
const POLL: Duration = Duration::from_millis(250);
/// How long an answer is waited for.
const TIMEOUT: Duration = Duration::from_millis(200);
/// How long a reading that found the correction outdated waits for the thread's new one.
pub const REFRESH_WAIT: Duration = Duration::from_millis(20);

/// chrony's command protocol: version, packet types, the tracking command and its reply.
const VERSION: u8 = 6;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;
const REQ_TRACKING: u16 = 33;
const RPY_TRACKING: u16 = 5;
const STATUS_SUCCESS: u16 = 0;
const REQUEST_HEADER: usize = 20;
const REPLY_HEADER: usize = 28;
/// The tracking report: reference id, address (20 octets), stratum, leap status, reference
/// time (12), then nine floats, the first of them the current correction.
const TRACKING_BODY: usize = 4 + 20 + 2 + 2 + 12 + 9 * 4;
const CORRECTION_AT: usize = REPLY_HEADER + 4 + 20 + 2 + 2 + 12;

/// The tracking request with sequence number `sequence`, padded to the reply's length.
fn tracking_request(sequence: u32) -> [u8; REPLY_HEADER + TRACKING_BODY] {
    let mut request = [0; REPLY_HEADER + TRACKING_BODY];
    request[0] = VERSION;
    request[1] = REQUEST;
    request[4..6].copy_from_slice(&REQ_TRACKING.to_be_bytes());
    request[8..12].copy_from_slice(&sequence.to_be_bytes());
    debug_assert!(request.len() >= REQUEST_HEADER);
    request
}

/// The current correction, in seconds, of a tracking reply to the request `sequence`.
fn tracking_correction(reply: &[u8], sequence: u32) -> Result<f64, String> {
    let u16_at = |at: usize| u16::from_be_bytes([reply[at], reply[at + 1]]);
    if reply.len() < REPLY_HEADER + TRACKING_BODY {
        return Err(format!("a reply of {} octets", reply.len()));
    }
    if reply[0] != VERSION || reply[1] != REPLY {
        return Err(format!(
            "protocol version {} packet type {}",
            reply[0], reply[1]
        ));
    }
    if u32::from_be_bytes(reply[16..20].try_into().expect("4 octets")) != sequence {
        return Err("a reply to another request".into());
    }
    let (command, kind, status) = (u16_at(4), u16_at(6), u16_at(8));
    if status != STATUS_SUCCESS {
        return Err(format!("status {status}"));
    }
    if command != REQ_TRACKING || kind != RPY_TRACKING {
        return Err(format!("reply {kind} to command {command}"));
    }
    let float = u32::from_be_bytes(
        reply[CORRECTION_AT..CORRECTION_AT + 4]
            .try_into()
            .expect("4 octets"),
    );
    Ok(chrony_float(float))
}

/// chrony's 32-bit float: a signed 7-bit exponent over a signed 25-bit coefficient.
fn chrony_float(x: u32) -> f64 {
    const COEFFICIENT_BITS: u32 = 25;
    let exponent = (x as i32) >> COEFFICIENT_BITS; // arithmetic: keeps the sign
    let coefficient = ((x << 7) as i32) >> 7;
    f64::from(coefficient) * 2f64.powi(exponent - COEFFICIENT_BITS as i32)
}

/// Asks chronyd at `server` for its current correction (seconds, signed).
pub fn query(server: SocketAddr) -> std::io::Result<f64> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut sequence = [0; 4];
    aws_lc_rs::rand::fill(&mut sequence)
        .map_err(|_| std::io::Error::other("no random sequence number"))?;
    let sequence = u32::from_ne_bytes(sequence);
    socket.send(&tracking_request(sequence))?;
    let mut reply = [0; 512];
    let len = socket.recv(&mut reply)?;
    tracking_correction(&reply[..len], sequence).map_err(std::io::Error::other)
}

/// The correction as last read, and the kernel's state around the question.
#[derive(Clone, Copy, Debug)]
struct Known {
    correction_ns: u64,
    est_error_us: i64,
    /// `maxerror` before the question (it only grows until the daemon's next update).
    max_error_us: i64,
    frequency: (i64, i64),
    /// The time after the answer: the correction was measured at or before it.
    read_at_ns: u64,
}

impl Known {
    /// The correction that holds for a reading of the kernel in `state`, if any: the daemon
    /// has not touched the clock since, and it was read less than [`MAX_AGE`] ago. A reading
    /// made before the answer (the correction shrinks while chronyd slews) gets what chronyd
    /// can have slewed in between added.
    fn for_state(&self, state: &KernelState) -> Option<u64> {
        let unchanged = self.est_error_us == state.est_error_us
            && self.frequency == state.frequency
            && state.max_error_us >= self.max_error_us;
        let age_ns = state.unix_ns.saturating_sub(self.read_at_ns);
        let before_ns = self.read_at_ns.saturating_sub(state.unix_ns);
        (unchanged && age_ns < MAX_AGE.as_nanos() as u64).then(|| {
            self.correction_ns
                .saturating_add(before_ns.saturating_mul(MAX_SLEW_PPM) / 1_000_000)
        })
    }
}

/// chrony's fastest slew (`maxslewrate`, 83,333 ppm by default), rounded up.
const MAX_SLEW_PPM: u64 = 83_334;

struct Shared {
    /// `None` until read. A failed read leaves the last value, which expires by itself.
    known: ArcSwapOption<Known>,
    /// Whether the last question went unanswered: readings then do not wait for the next.
    failing: AtomicBool,
    /// Set to wake the thread before its next poll.
    wake: Mutex<bool>,
    woken: Condvar,
    /// Questions done (answered or not), for readings waiting for the next one.
    reads: Mutex<u64>,
    read: Condvar,
}

/// chronyd's remaining correction, kept fresh by a thread of its own (see the module).
pub struct Correction {
    shared: Arc<Shared>,
}

impl Correction {
    /// Starts the thread that asks chronyd at `server`, reading the kernel's state with
    /// `kernel` around each question, while `wanted` says chronyd disciplines the clock. It
    /// ends once the `Correction` is dropped.
    pub fn watch(
        server: SocketAddr,
        kernel: impl Fn() -> KernelState + Send + 'static,
        wanted: impl Fn() -> bool + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            known: ArcSwapOption::empty(),
            failing: AtomicBool::new(false),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            reads: Mutex::new(0),
            read: Condvar::new(),
        });
        // The first question before the first reading, so that the start is not refused (at
        // most TIMEOUT).
        let mut failing_since = None;
        if wanted() {
            ask(&shared, server, &kernel, &mut failing_since);
        }
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("chronyd-tracking".into())
            .spawn(move || run(weak, server, kernel, wanted, failing_since))
            .expect("a thread for chronyd's tracking");
        Self { shared }
    }

    /// The correction, in nanoseconds, that holds for a reading of the kernel in `state`;
    /// `None` where none does: chronyd has touched the clock since it was last read (then
    /// [`Correction::refresh`], and a new reading), or it does not answer.
    pub fn current(&self, state: &KernelState) -> Option<u64> {
        self.shared.known.load().as_deref()?.for_state(state)
    }

    /// Asks the thread to read the correction again, and waits for it ([`REFRESH_WAIT`] at
    /// most): whether it was read. Not while chronyd does not answer (the thread asks again
    /// at its polls), nor while a question a reading waited for in vain is still out (up to
    /// the thread's 200 ms timeout): readings then are refused at once rather than one after
    /// another, each holding the issuing clock's lock for the wait.
    pub fn refresh(&self) -> bool {
        if self.shared.failing.load(Ordering::Acquire) {
            return false;
        }
        let reads = self.shared.reads.lock().unwrap_or_else(|p| p.into_inner());
        let seen = *reads;
        *self.shared.wake.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.woken.notify_one();
        let (reads, _) = self
            .shared
            .read
            .wait_timeout_while(reads, REFRESH_WAIT, |reads| *reads == seen)
            .unwrap_or_else(|p| p.into_inner());
        if *reads == seen {
            // Unanswered so far: failing until the question ends (its answer clears it).
            self.shared.failing.store(true, Ordering::Release);
            return false;
        }
        !self.shared.failing.load(Ordering::Acquire)
    }
}

/// Reads the kernel's state, asks chronyd, reads the state again, and stores the answer when
/// the daemon did not touch the clock meanwhile (else the last value stays, and the next
/// question settles it); tells the readings waiting. Logs when chronyd has not answered for
/// [`MAX_AGE`] (`failing_since`: since when it has not; the last value expires then too),
/// and when it answers again.
fn ask(
    shared: &Shared,
    server: SocketAddr,
    kernel: &impl Fn() -> KernelState,
    failing_since: &mut Option<(std::time::Instant, bool)>,
) {
    let before = kernel();
    let answer = query(server);
    let after = kernel();
    // Under the readings' lock, so that a reading that gave up waiting (and marked the
    // question failing) does so before this answer clears it, not after.
    let mut reads = shared.reads.lock().unwrap_or_else(|p| p.into_inner());
    match answer {
        Ok(seconds) => {
            if let Some((_, true)) = failing_since {
                tracing::info!(%server, "chronyd's tracking is read again");
            }
            *failing_since = None;
            shared.failing.store(false, Ordering::Release);
            if before.est_error_us == after.est_error_us && before.frequency == after.frequency {
                shared.known.store(Some(Arc::new(Known {
                    correction_ns: (seconds.abs() * 1e9).ceil() as u64,
                    est_error_us: after.est_error_us,
                    max_error_us: before.max_error_us,
                    frequency: after.frequency,
                    read_at_ns: after.unix_ns,
                })));
            }
        }
        Err(e) => {
            shared.failing.store(true, Ordering::Release);
            let (since, logged) = failing_since.get_or_insert((std::time::Instant::now(), false));
            if !*logged && since.elapsed() >= MAX_AGE {
                tracing::error!(
                    event = "clock_without_bound",
                    %server,
                    error = %e,
                    "chronyd's tracking cannot be read: the kernel clock refuses every stamp \
                     until it can (clock.chronyd_command)"
                );
                *logged = true;
            }
        }
    }
    *reads += 1;
    drop(reads);
    shared.read.notify_all();
}

/// The thread: asks at every poll, or sooner when a reading wakes it, while chronyd is the
/// daemon; ends once the [`Correction`] is gone.
fn run(
    shared: Weak<Shared>,
    server: SocketAddr,
    kernel: impl Fn() -> KernelState,
    wanted: impl Fn() -> bool,
    mut failing_since: Option<(std::time::Instant, bool)>,
) {
    while let Some(shared) = shared.upgrade() {
        if wanted() {
            ask(&shared, server, &kernel, &mut failing_since);
        }
        let wake = shared.wake.lock().unwrap_or_else(|p| p.into_inner());
        let (mut wake, _) = shared
            .woken
            .wait_timeout_while(wake, POLL, |woken| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        *wake = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracking reply as chronyd sends it, with `correction` as its first float.
    fn reply(sequence: u32, correction: u32) -> Vec<u8> {
        let mut reply = vec![0; REPLY_HEADER + TRACKING_BODY];
        reply[0] = VERSION;
        reply[1] = REPLY;
        reply[4..6].copy_from_slice(&REQ_TRACKING.to_be_bytes());
        reply[6..8].copy_from_slice(&RPY_TRACKING.to_be_bytes());
        reply[16..20].copy_from_slice(&sequence.to_be_bytes());
        reply[CORRECTION_AT..CORRECTION_AT + 4].copy_from_slice(&correction.to_be_bytes());
        reply
    }

    /// A chronyd stand-in on loopback that answers tracking with the correction (a chrony
    /// float) `answer` holds, and nothing while it holds 0.
    fn stand_in(answer: Arc<std::sync::atomic::AtomicU32>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut request = [0; 512];
            while let Ok((len, from)) = socket.recv_from(&mut request) {
                let correction = answer.load(std::sync::atomic::Ordering::SeqCst);
                if len == REPLY_HEADER + TRACKING_BODY && correction != 0 {
                    let sequence = u32::from_be_bytes(request[8..12].try_into().unwrap());
                    let _ = socket.send_to(&reply(sequence, correction), from);
                }
            }
        });
        addr
    }

    #[test]
    fn a_correction_holds_until_the_daemon_updates_the_clock_or_it_ages() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        const TWO_SECONDS: u32 = (3 << 25) | (1 << 23);
        let answer = Arc::new(AtomicU32::new(TWO_SECONDS));
        let now = crate::clock::system_unix_ns();
        let kernel = Arc::new(Mutex::new(KernelState {
            unix_ns: now,
            rc: libc::TIME_OK,
            status: 0,
            max_error_us: 1_000,
            est_error_us: 10,
            frequency: (0, 10_000),
            offset_ns: 0,
            adjtime_ns: 0,
        }));
        let read = {
            let kernel = Arc::clone(&kernel);
            move || *kernel.lock().unwrap()
        };
        let correction = Correction::watch(stand_in(Arc::clone(&answer)), read, || true);
        let at = |unix_ns: u64, est_error_us: i64, max_error_us: i64| KernelState {
            unix_ns,
            est_error_us,
            max_error_us,
            ..*kernel.lock().unwrap()
        };
        // Read before the first reading.
        assert_eq!(correction.current(&at(now, 10, 1_000)), Some(2_000_000_000));
        // maxerror grown by the kernel since: the same correction holds.
        assert_eq!(correction.current(&at(now, 10, 1_300)), Some(2_000_000_000));
        // A reading made 1 ms before the answer: what chronyd can slew in 1 ms is added.
        assert_eq!(
            correction.current(&at(now - 1_000_000, 10, 1_000)),
            Some(2_000_000_000 + 83_334)
        );
        // A state the correction was not read in (a new esterror or frequency, a maxerror
        // below the one read, too long ago): none holds.
        assert_eq!(correction.current(&at(now, 11, 1_000)), None);
        assert_eq!(correction.current(&at(now, 10, 999)), None);
        let slewing = KernelState {
            frequency: (65_536, 10_000),
            ..at(now, 10, 1_000)
        };
        assert_eq!(correction.current(&slewing), None);
        assert_eq!(
            correction.current(&at(now + 3_000_000_000, 10, 1_000)),
            None
        );
        // The daemon updates the clock: a refresh reads the new correction in the new state.
        answer.store((1 << 25) | (1 << 23), SeqCst); // 0.5 s
        *kernel.lock().unwrap() = at(now + 1, 11, 900);
        let updated = at(now + 1, 11, 900);
        for _ in 0..500 {
            if correction.refresh() && correction.current(&updated) == Some(500_000_000) {
                break;
            }
        }
        assert_eq!(correction.current(&updated), Some(500_000_000));
        // chronyd stops answering: the last value holds until it is too old, and readings no
        // longer wait for the thread: not even while the question one of them waited for in
        // vain is still out (five more in far less than one wait).
        answer.store(0, SeqCst);
        for _ in 0..500 {
            if !correction.refresh() {
                break;
            }
        }
        let started = std::time::Instant::now();
        for _ in 0..5 {
            assert!(!correction.refresh());
        }
        assert!(started.elapsed() < REFRESH_WAIT, "{:?}", started.elapsed());
        assert_eq!(correction.current(&updated), Some(500_000_000));
        assert_eq!(correction.current(&at(now + 3_000_000_000, 11, 900)), None);
    }

    #[test]
    fn chrony_floats_are_a_signed_exponent_over_a_signed_coefficient() {
        // The coefficient's top bit (bit 24) is its sign: 2^23 × 2^(1 − 25) = 0.5.
        assert_eq!(chrony_float((1 << 25) | (1 << 23)), 0.5);
        assert_eq!(chrony_float((2 << 25) | (1 << 23)), 1.0);
        // Negative coefficients: −2^24 × 2^−25 and −2^23 × 2^−25.
        assert_eq!(chrony_float(1 << 24), -0.5);
        assert_eq!(chrony_float(0x0180_0000), -0.25);
        // Exponent −1 (0b1111111): 2^23 × 2^−26 = 0.125.
        assert_eq!(chrony_float((0x7f << 25) | (1 << 23)), 0.125);
        assert_eq!(chrony_float(0), 0.0);
    }

    #[test]
    fn the_request_is_padded_to_the_reply_and_the_reply_is_checked() {
        let request = tracking_request(0xdead_beef);
        assert_eq!(request.len(), 104, "chronyd answers no shorter request");
        assert_eq!(
            &request[..12],
            &[6, 1, 0, 0, 0, 33, 0, 0, 0xde, 0xad, 0xbe, 0xef]
        );
        assert!(request[12..].iter().all(|&b| b == 0));

        let two_seconds = (3 << 25) | (1 << 23); // 2^23 × 2^(3 − 25) = 2.0
        assert_eq!(tracking_correction(&reply(7, two_seconds), 7), Ok(2.0));
        assert!(tracking_correction(&reply(7, two_seconds), 8).is_err());
        assert!(tracking_correction(&reply(7, two_seconds)[..100], 7).is_err());
        let mut refused = reply(7, two_seconds);
        refused[9] = 3; // STT_UNAUTH
        assert!(tracking_correction(&refused, 7).is_err());
        let mut other = reply(7, two_seconds);
        other[7] = 2; // RPY_N_SOURCES
        assert!(tracking_correction(&other, 7).is_err());
    }
}
