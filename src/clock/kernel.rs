//! The kernel clock, trusted only while the kernel says it is synchronized.
//!
//! `adjtimex(2)` with no modes reads the kernel's NTP state: `STA_UNSYNC` (or the return value
//! `TIME_ERROR`) means nothing disciplines the clock, and `maxerror` is the time daemon's
//! bound on its error when it last updated the clock, which the kernel grows by 500 ppm while
//! no daemon updates it (500 µs once a second, so a reading can be up to 500 µs behind: it is
//! added). The bound taken is that plus the offset the kernel's PLL still has to
//! slew (`offset`, which ntpd and systemd-timesyncd hand to the kernel and `maxerror` leaves
//! out), plus what an `adjtime(3)` call has still to slew (the kernel's `time_adjust`, read
//! with `ADJ_OFFSET_SS_READ`: a daemon that slews with `adjtime`, as ntpd with its kernel
//! discipline off does, leaves it out of `maxerror` too). chronyd slews the clock itself and writes `maxerror` as its root distance alone,
//! leaving out the offset it has still to slew: usually well below the root distance, but after
//! a disturbance found at an update (a virtual machine paused or migrated, the network back
//! after an outage) whatever chronyd found, for the minutes its slew takes. So where chronyd is
//! the daemon, its correction still to slew is read from its command port
//! (`clock.chronyd_command`, [`super::chronyd`]) and added; a reading that finds chronyd has
//! touched the clock since waits for it to be read again, and once chronyd has not answered
//! for 2 s every reading is refused. What the kernel cannot tell, and so neither can this
//! source:
//! - systemd-timesyncd writes `maxerror` 0 at each update (it keeps no error estimate), and so
//!   does OpenNTPD (whose Linux port names its processes `ntpd` too, told apart by the titles
//!   of its engines, `ntpd: ntp engine`), so there is no bound at all: where either runs, this
//!   source refuses (see [`time_daemons`]), and
//!   so it does where it sees no daemon that keeps one (chronyd, ntpd): a container that
//!   cannot see the host's processes, a unit with `ProtectProc=invisible`;
//! - a leap second that the daemon slews (chrony's `leapsecmode slew`, smearing servers) never
//!   shows in the kernel's flags.
//!
//! For a bound of its own, use the disciplined clock (`clock.source = "disciplined"`).
//!
//! Leap seconds: while the kernel inserts one (`TIME_OOP`) it replays 23:59:59, so the clock
//! is refused then, and from 23:59:59 to 00:00:01 UTC whenever a leap is pending or just
//! happened (the disciplined clock refuses on until an update confirms the leap; the kernel's
//! flags offer nothing to confirm it by) (`TIME_INS`, `TIME_DEL`, `TIME_WAIT`, or
//! `STA_INS`/`STA_DEL` set). A suspend of the host: the kernel sets the clock on resume from
//! what measured the sleep, and where that was a clock that ran through it (a TSC that does
//! not stop) it keeps its NTP state, so `maxerror` says nothing of the sleep; the source
//! refuses from the resume until the daemon has updated the clock twice (`Resume`). (Where
//! the RTC measured it, to a second, the kernel also marks itself unsynchronized.)
//! The adapter is thin: the decisions are [`KernelClock::judge`] and `Resume::check`, which
//! tests reach through injected readings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::chronyd::Correction;
use super::local::{self, suspended_between};
use super::{system_unix_ns, Reading, SyncState, TimeSource};

/// What the kernel said, at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelState {
    pub unix_ns: u64,
    /// What `adjtimex` returned: the clock state (`TIME_OK`, `TIME_INS`, `TIME_DEL`,
    /// `TIME_OOP`, `TIME_WAIT`, `TIME_ERROR`), or −1; [`UNPAIRED`] where its time never
    /// paired with the clock read after it.
    pub rc: i32,
    /// `timex.status` (`STA_UNSYNC`, `STA_INS`, `STA_DEL`, …).
    pub status: i32,
    /// The kernel's maximum error, in microseconds.
    pub max_error_us: i64,
    /// The daemon's estimated error, in microseconds: written at each update, unchanged by
    /// the kernel between them.
    pub est_error_us: i64,
    /// `timex.freq` and `timex.tick`: what a daemon that slews by the frequency (chronyd)
    /// sets, at each update and as a slew starts or ends.
    pub frequency: (i64, i64),
    /// The offset the kernel's PLL has still to slew, in nanoseconds.
    pub offset_ns: i64,
    /// What an `adjtime(3)` call has still to slew (`time_adjust`), in nanoseconds.
    pub adjtime_ns: i64,
}

impl KernelState {
    /// Whether the kernel counts its clock unsynchronized (`STA_UNSYNC`, `TIME_ERROR`, or
    /// `adjtimex` failed).
    pub fn unsynchronized(&self) -> bool {
        self.rc < 0 || self.rc == libc::TIME_ERROR || self.status & libc::STA_UNSYNC != 0
    }
}

/// Where kernel readings come from: the real kernel, or a test.
pub trait KernelApi: Send + Sync + 'static {
    fn state(&self) -> KernelState;
}

/// Linux's `adjtimex(2)`, read-only.
pub struct Adjtimex;

impl KernelApi for Adjtimex {
    /// The state and the time it goes with, taken together: `adjtimex` also gives the kernel's
    /// time at the call (`timex.time`, in microseconds unless the daemon switched the kernel
    /// to nanoseconds), and the clock read right after it must be within
    /// [`PAIRED_WITHIN_NS`] of it, or a step of the clock came between the two (the state of
    /// before the step paired with the time of after it), and the call is made again. Where
    /// that keeps happening the reading is refused ([`UNPAIRED`]). In an inserted leap second
    /// (`TIME_OOP`) the kernel gives 23:59:60 as 23:59:59 again, which pairs with nothing: the
    /// leap refuses that reading anyway.
    fn state(&self) -> KernelState {
        let mut state = self.paired_state();
        if state.rc != -1 {
            // Once, whichever try paired: it changes only as a slew goes on.
            match pending_adjtime_ns() {
                Some(ns) => state.adjtime_ns = ns,
                // Not known: no bound either.
                None => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::error!(
                            error = %std::io::Error::last_os_error(),
                            "adjtimex(ADJ_OFFSET_SS_READ) fails here (a sandbox that filters \
                             it?): what adjtime() has still to slew is not known, so the kernel \
                             clock is refused; use the disciplined clock"
                        );
                    });
                    state.rc = -1;
                }
            }
        }
        state
    }
}

impl Adjtimex {
    /// The kernel's state paired with the clock read right after it (see
    /// [`KernelApi::state`] for [`Adjtimex`]).
    fn paired_state(&self) -> KernelState {
        let mut last = None;
        for _ in 0..3 {
            // SAFETY: `timex` is plain data; `modes == 0` makes adjtimex only read the kernel
            // state.
            let mut tx: libc::timex = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::adjtimex(&mut tx) };
            let unix_ns = system_unix_ns();
            let nano = tx.status & libc::STA_NANO != 0;
            let kernel_ns = i128::from(tx.time.tv_sec) * 1_000_000_000
                + i128::from(tx.time.tv_usec) * if nano { 1 } else { 1_000 };
            let state = Self::read(&tx, rc, unix_ns);
            if rc == -1 || rc == libc::TIME_OOP || paired(kernel_ns, unix_ns) {
                return state;
            }
            last = Some(state);
        }
        KernelState {
            rc: UNPAIRED,
            ..last.expect("three tries")
        }
    }
}

/// What an `adjtime(3)` call has still to slew, in nanoseconds (`ADJ_OFFSET_SS_READ`, which
/// needs no privilege and changes nothing); `None` where the kernel does not say.
fn pending_adjtime_ns() -> Option<i64> {
    // SAFETY: `timex` is plain data; ADJ_OFFSET_SS_READ only reads `time_adjust` into
    // `offset` (microseconds).
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = libc::ADJ_OFFSET_SS_READ;
    let rc = unsafe { libc::adjtimex(&mut tx) };
    (rc != -1).then(|| tx.offset.saturating_mul(1_000))
}

/// `KernelState::rc` where `adjtimex`'s time never paired with the clock read after it.
pub const UNPAIRED: i32 = -2;

/// How far the clock read right after `adjtimex` may be from the time it gave: the call's
/// own length, its time's truncation to microseconds, and a preemption between the two.
const PAIRED_WITHIN_NS: i128 = 1_000_000;

/// Whether `read_ns`, read right after `adjtimex` gave `kernel_ns`, is the same clock without a
/// step between them: not before it (less its truncation), and not later than
/// [`PAIRED_WITHIN_NS`].
fn paired(kernel_ns: i128, read_ns: u64) -> bool {
    (-1_000..=PAIRED_WITHIN_NS).contains(&(i128::from(read_ns) - kernel_ns))
}

impl Adjtimex {
    fn read(tx: &libc::timex, rc: i32, unix_ns: u64) -> KernelState {
        KernelState {
            unix_ns,
            rc,
            status: tx.status,
            max_error_us: tx.maxerror,
            est_error_us: tx.esterror,
            frequency: (tx.freq, tx.tick),
            // Microseconds unless the daemon switched the kernel to nanoseconds.
            offset_ns: if tx.status & libc::STA_NANO != 0 {
                tx.offset
            } else {
                micros_offset(tx.offset).saturating_mul(1_000)
            },
            adjtime_ns: 0,
        }
    }
}

/// The PLL's offset as a kernel reports it in microseconds: Linux divides it as an unsigned
/// 32-bit number of nanoseconds, so a negative offset reads as about 2^32 / 1000 less its
/// magnitude. The kernel keeps the offset within `MAXPHASE` (0.5 s), so a reading above that
/// is such a negative one (taken here at a magnitude no smaller than the true one).
fn micros_offset(reported: i64) -> i64 {
    const MAX_PHASE_US: i64 = 500_000;
    const WRAP_US: i64 = 4_294_968; // 2^32 / 1000, rounded up
    if reported > MAX_PHASE_US {
        reported - WRAP_US
    } else {
        reported
    }
}

pub struct KernelClock<A: KernelApi = Adjtimex> {
    api: A,
    /// How long the host has been suspended ([`local::suspended_ns`]; tests give their own).
    suspended: Box<dyn Fn() -> u64 + Send + Sync>,
    resume: Resume,
    /// Whether a daemon that keeps a bound is seen (see [`DaemonWatch`]).
    daemons: Arc<DaemonWatch>,
    /// chronyd's remaining correction, added to the bound while chronyd is seen (none for an
    /// injected kernel).
    chronyd: Option<Correction>,
}

/// The time daemons as last seen, looked for again every [`LOOK_AGAIN`]: while none that keeps
/// a bound is seen (it may start after the TSA, or be restarted by an upgrade) every reading is
/// refused, and a daemon that goes away is missed within that time.
struct DaemonWatch {
    /// 0: a daemon that keeps a bound is seen; else the refusal's `Verdict` + 1. Stored after
    /// `chronyd` (release), so that a reading that sees it sees which daemon too.
    refusal: AtomicU8,
    /// Whether chronyd is among the daemons seen: its correction counts then.
    chronyd: AtomicBool,
    look: Box<dyn Fn() -> Vec<&'static str> + Send + Sync>,
}

/// How often the processes are looked through again.
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_secs(10);

impl DaemonWatch {
    fn new(look: Box<dyn Fn() -> Vec<&'static str> + Send + Sync>) -> Self {
        let watch = Self {
            refusal: AtomicU8::new(0),
            chronyd: AtomicBool::new(false),
            look,
        };
        watch.look_now(true);
        watch
    }

    /// No refusal, and no looking: for readings of an injected kernel (tests).
    fn trusting() -> Self {
        Self {
            refusal: AtomicU8::new(0),
            chronyd: AtomicBool::new(false),
            look: Box::new(Vec::new),
        }
    }

    /// Looks through the processes and logs what changed (everything, at start).
    fn look_now(&self, start: bool) {
        let daemons = (self.look)();
        self.chronyd
            .store(daemons.contains(&"chronyd"), Ordering::Relaxed);
        let refusal = verdict_without(&daemons);
        let code = refusal.map_or(0, |v| v as u8 + 1);
        let was = self.refusal.swap(code, Ordering::AcqRel);
        if !start && was == code {
            return;
        }
        match refusal {
            Some(verdict) => tracing::error!(
                event = "clock_without_bound",
                "{}: the kernel clock refuses every stamp",
                reason(verdict)
            ),
            None => {
                tracing::info!(daemons = ?daemons, "the kernel clock, disciplined by {daemons:?}")
            }
        }
    }

    /// Looks again every [`LOOK_AGAIN`] on a thread of its own (not on the request path: a
    /// host's `/proc` can hold thousands of processes), while refusing (a daemon started
    /// later) and while trusting (a daemon stopped, or one that keeps no bound taking over:
    /// removing chrony enables systemd-timesyncd again on some distributions); until the
    /// watch is gone.
    fn keep_looking(watch: &Arc<Self>) {
        let watch = Arc::downgrade(watch);
        std::thread::Builder::new()
            .name("time-daemons".into())
            .spawn(move || loop {
                std::thread::sleep(LOOK_AGAIN);
                match watch.upgrade() {
                    Some(watch) => watch.look_now(false),
                    None => return,
                }
            })
            .expect("a thread to look for the time daemons");
    }

    /// The refusal in force.
    fn refusal(&self) -> Option<Verdict> {
        match self.refusal.load(Ordering::Acquire) {
            0 => None,
            code if code == Verdict::NoBound as u8 + 1 => Some(Verdict::NoBound),
            _ => Some(Verdict::NoDaemon),
        }
    }
}

/// Why the kernel source refuses under `daemons`: none that keeps a bound.
fn verdict_without(daemons: &[&str]) -> Option<Verdict> {
    if daemons.contains(&"systemd-timesyncd") || daemons.contains(&"openntpd") {
        Some(Verdict::NoBound)
    } else if daemons.is_empty() {
        // The kernel's maxerror is whatever its last writer left, grown by 500 ppm.
        Some(Verdict::NoDaemon)
    } else {
        None
    }
}

/// A suspend of the host, as the kernel source sees it: refused from the resume on until the
/// time daemon has written `maxerror` twice. Between updates the kernel only grows `maxerror`,
/// so a reading below the one before is the daemon's (missed when the daemon writes more than
/// the kernel's growth since the last reading, and then taken at its next update). Twice,
/// because chronyd slews what the resume left (up to a second where the RTC measured the
/// sleep) from its first update on, at up to 83 ms a second, and its `maxerror` never shows
/// that slew; its next update comes a poll interval later (64 s or more). Off the common path:
/// readings take the lock only while a resume is waited on or has just been seen.
struct Resume {
    /// The host's suspended time when last trusted.
    base: AtomicU64,
    /// Daemon updates still to see before the source is trusted again (0: none).
    updates_needed: AtomicU32,
    /// While waiting: the last `maxerror` read (inside the lock, so in time order).
    last_max_error_us: Mutex<i64>,
}

/// The daemon's updates a resume waits for (see [`Resume`]).
const UPDATES_AFTER_RESUME: u32 = 2;

impl Resume {
    fn new(suspended_ns: u64) -> Self {
        Self {
            base: AtomicU64::new(suspended_ns),
            updates_needed: AtomicU32::new(0),
            last_max_error_us: Mutex::new(0),
        }
    }

    /// A reading of the kernel (`read`) and whether it is refused for a resume not yet
    /// followed by the daemon's update; `suspended` reads the host's suspended time.
    fn check(
        &self,
        read: impl Fn() -> KernelState,
        suspended: impl Fn() -> u64,
    ) -> (KernelState, bool) {
        let state = read();
        // Read after the kernel, so that a suspend before that reading is seen.
        let asleep = suspended();
        // The base before the count: a resume stores the count before the base, so a reader
        // that sees the new base sees the count too, and one that sees the old base sees the
        // suspend.
        let base = self.base.load(Ordering::Acquire);
        if self.updates_needed.load(Ordering::Acquire) == 0 && !suspended_between(base, asleep) {
            return (state, false);
        }
        let mut last = self
            .last_max_error_us
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let state = read();
        let asleep = suspended();
        if suspended_between(self.base.load(Ordering::Acquire), asleep) {
            self.updates_needed
                .store(UPDATES_AFTER_RESUME, Ordering::Release);
            self.base.store(asleep, Ordering::Release);
            *last = state.max_error_us;
            return (state, true);
        }
        let needed = self.updates_needed.load(Ordering::Acquire);
        if needed == 0 {
            return (state, false);
        }
        let updated = state.max_error_us < *last;
        *last = state.max_error_us;
        if updated {
            self.updates_needed.store(needed - 1, Ordering::Release);
            return (state, needed > 1);
        }
        (state, true)
    }
}

/// The time daemons running on this host, by the names of the processes this one can see in
/// `/proc` (`chronyd`, `ntpd`, `openntpd`, `systemd-timesyncd`).
pub fn time_daemons() -> Vec<&'static str> {
    let mut found = Vec::new();
    for (_, name) in time_daemon_processes() {
        if !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

/// The processes of [`time_daemons`]: (process id, daemon).
fn time_daemon_processes() -> Vec<(u32, &'static str)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            let cmdline = || std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            Some((pid, daemon_of(comm.trim_end(), cmdline)?))
        })
        .collect()
}

/// The time daemon a process named `comm` is, `cmdline` read where the name is not enough:
/// OpenNTPD's Linux port names its processes `ntpd` as the reference ntpd (and ntpsec) does,
/// and titles its engines `ntpd: ntp engine` and `ntpd: dns engine`.
fn daemon_of(comm: &str, cmdline: impl FnOnce() -> Vec<u8>) -> Option<&'static str> {
    match comm {
        "chronyd" => Some("chronyd"),
        "openntpd" => Some("openntpd"),
        "ntpd" => {
            let title = cmdline();
            let engine = |name: &[u8]| title.windows(name.len()).any(|w| w == name);
            match engine(b"ntp engine") || engine(b"dns engine") {
                true => Some("openntpd"),
                false => Some("ntpd"),
            }
        }
        // The kernel keeps 15 octets of a process's name.
        "systemd-timesyn" => Some("systemd-timesyncd"),
        _ => None,
    }
}

/// Why the kernel clock is (not) trusted; shared, so that a reading allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Synchronized,
    Unsynchronized,
    Leap,
    Resumed,
    NoBound,
    NoDaemon,
    CorrectionUnknown,
    Unpaired,
}

fn reason(verdict: Verdict) -> Arc<str> {
    static REASONS: [OnceLock<Arc<str>>; 8] = [const { OnceLock::new() }; 8];
    REASONS[verdict as usize]
        .get_or_init(|| {
            match verdict {
                Verdict::Synchronized => "the kernel reports its clock synchronized",
                Verdict::Unsynchronized => {
                    "the kernel reports its clock unsynchronized (STA_UNSYNC)"
                }
                Verdict::Leap => {
                    "leap second in the kernel: no stamps from 23:59:59 to 00:00:01 UTC"
                }
                Verdict::Resumed => {
                    "the host was suspended: waiting for the time daemon to update the clock"
                }
                Verdict::NoBound => {
                    "systemd-timesyncd or OpenNTPD disciplines the clock and keeps no error \
                     bound (it writes maxerror 0): run chronyd or ntpd, or use the disciplined \
                     clock"
                }
                Verdict::NoDaemon => {
                    "no time daemon that keeps an error bound (chronyd, ntpd) is seen among \
                     this host's processes, so the kernel's maxerror is no bound: run one where \
                     the TSA can see it, or use the disciplined clock"
                }
                Verdict::CorrectionUnknown => {
                    "chronyd's correction still to slew (chronyc tracking's System time) is not \
                     known: its command port (clock.chronyd_command) does not answer, or it has \
                     just updated the clock"
                }
                Verdict::Unpaired => {
                    "the kernel's time (adjtimex) and the clock read right after it differ by \
                     more than a millisecond, three times in a row: the clock is being stepped"
                }
            }
            .into()
        })
        .clone()
}

const NS_PER_S: u64 = 1_000_000_000;

/// How far `maxerror` can be behind: the kernel grows it by 500 µs once a second.
const MAX_ERROR_LAG_US: u64 = 500;

/// Within a second of a UTC midnight: from 23:59:59 to 00:00:01.
fn near_midnight(unix_ns: u64) -> bool {
    let into_day = unix_ns % (86_400 * NS_PER_S);
    !(NS_PER_S..86_399 * NS_PER_S).contains(&into_day)
}

impl KernelClock<Adjtimex> {
    /// The kernel's clock, as the time daemons running now leave it (see [`time_daemons`]),
    /// with chronyd's remaining correction read from its command port `chronyd` where chronyd
    /// is the daemon.
    pub fn new(chronyd: SocketAddr) -> Self {
        let mut clock = Self::under(Box::new(time_daemons));
        let daemons = Arc::clone(&clock.daemons);
        clock.chronyd = Some(Correction::watch(
            chronyd,
            || Adjtimex.state(),
            move || daemons.chronyd.load(Ordering::Relaxed),
        ));
        clock
    }

    /// The kernel's clock under the daemons `look` finds.
    fn under(look: Box<dyn Fn() -> Vec<&'static str> + Send + Sync>) -> Self {
        let mut clock = Self::with_api(Adjtimex);
        clock.daemons = Arc::new(DaemonWatch::new(look));
        DaemonWatch::keep_looking(&clock.daemons);
        clock
    }
}

impl<A: KernelApi> KernelClock<A> {
    pub fn with_api(api: A) -> Self {
        Self::with_suspend(api, Box::new(local::suspended_ns))
    }

    /// With `suspended` telling how long the host has been suspended.
    pub fn with_suspend(api: A, suspended: Box<dyn Fn() -> u64 + Send + Sync>) -> Self {
        Self {
            api,
            resume: Resume::new(suspended()),
            suspended,
            // Readings of an injected kernel (tests) are not held to a daemon.
            daemons: Arc::new(DaemonWatch::trusting()),
            chronyd: None,
        }
    }

    /// The kernel's state now, and what it, the daemons seen and a resume say of it.
    fn state_and_verdict(&self) -> (KernelState, Verdict) {
        let (state, resumed) = self.resume.check(|| self.api.state(), &self.suspended);
        let verdict = self
            .daemons
            .refusal()
            .or(resumed.then_some(Verdict::Resumed))
            .unwrap_or_else(|| Self::verdict_of(&state));
        (state, verdict)
    }

    /// Turns what the kernel said into a reading.
    pub fn judge(state: KernelState) -> Reading {
        Self::reading(&state, Self::verdict_of(&state), 0)
    }

    /// What the kernel's own state says.
    fn verdict_of(state: &KernelState) -> Verdict {
        if state.rc == UNPAIRED {
            return Verdict::Unpaired;
        }
        let unsynchronized = state.unsynchronized();
        let leap_pending = matches!(state.rc, libc::TIME_INS | libc::TIME_DEL | libc::TIME_WAIT)
            || state.status & (libc::STA_INS | libc::STA_DEL) != 0;
        if unsynchronized || state.max_error_us < 0 {
            Verdict::Unsynchronized
        } else if state.rc == libc::TIME_OOP || (leap_pending && near_midnight(state.unix_ns)) {
            Verdict::Leap
        } else {
            Verdict::Synchronized
        }
    }

    /// The reading `verdict` gives of `state`: its bound only when synchronized, with
    /// `correction_ns` still to slew besides the kernel's own.
    fn reading(state: &KernelState, verdict: Verdict, correction_ns: u64) -> Reading {
        Reading {
            unix_ns: state.unix_ns,
            bound_ns: match verdict {
                Verdict::Synchronized => (state.max_error_us as u64)
                    .saturating_add(MAX_ERROR_LAG_US)
                    .saturating_mul(1_000)
                    .saturating_add(state.offset_ns.unsigned_abs())
                    .saturating_add(state.adjtime_ns.unsigned_abs())
                    .saturating_add(correction_ns),
                _ => u64::MAX,
            },
            state: match verdict {
                Verdict::Synchronized => SyncState::Synchronized,
                _ => SyncState::Unsynchronized,
            },
            reason: reason(verdict),
        }
    }
}

impl<A: KernelApi> TimeSource for KernelClock<A> {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn read(&self) -> Reading {
        let (state, verdict) = self.state_and_verdict();
        // chronyd's correction still to slew, where chronyd keeps the clock.
        let chronyd = self
            .chronyd
            .as_ref()
            .filter(|_| self.daemons.chronyd.load(Ordering::Relaxed));
        let Some(chronyd) = chronyd.filter(|_| verdict == Verdict::Synchronized) else {
            return Self::reading(&state, verdict, 0);
        };
        if let Some(ns) = chronyd.current(&state) {
            return Self::reading(&state, verdict, ns);
        }
        // chronyd touched the clock since its correction was read: both read again.
        if chronyd.refresh() {
            let (state, verdict) = self.state_and_verdict();
            match (verdict, chronyd.current(&state)) {
                (Verdict::Synchronized, Some(ns)) => return Self::reading(&state, verdict, ns),
                (Verdict::Synchronized, None) => {}
                _ => return Self::reading(&state, verdict, 0),
            }
        }
        Self::reading(&state, Verdict::CorrectionUnknown, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(unix_ns: u64, rc: i32, status: i32) -> KernelState {
        KernelState {
            unix_ns,
            rc,
            status,
            max_error_us: 1_500,
            est_error_us: 100,
            frequency: (0, 10_000),
            offset_ns: 0,
            adjtime_ns: 0,
        }
    }

    /// A kernel whose state the test sets.
    struct Fake(Arc<Mutex<KernelState>>);
    impl KernelApi for Fake {
        fn state(&self) -> KernelState {
            *self.0.lock().unwrap()
        }
    }

    /// What an adjtime() call has still to slew is outside maxerror too: in the bound,
    /// whichever way it goes.
    #[test]
    fn the_bound_holds_what_adjtime_has_still_to_slew() {
        for adjtime_ns in [4_000_000, -4_000_000] {
            let r = KernelClock::<Adjtimex>::judge(KernelState {
                adjtime_ns,
                offset_ns: 250_000,
                ..state(5, libc::TIME_OK, libc::STA_PLL)
            });
            // maxerror 1.5 ms, the 0.5 ms it may lag, the PLL's offset, adjtime's.
            assert_eq!(r.bound_ns, 6_250_000);
        }
        // The kernel here says what is pending (a daemon on the host may be slewing).
        assert!(pending_adjtime_ns().is_some());
    }

    /// OpenNTPD keeps no bound (maxerror 0 at each update) and names its processes as ntpd
    /// does: told apart by its engines' titles, it refuses as systemd-timesyncd does.
    #[test]
    fn openntpd_is_told_from_ntpd_and_refused() {
        let title = |t: &str| t.as_bytes().to_vec();
        assert_eq!(
            daemon_of("ntpd", || title("/usr/sbin/ntpd\0-p\0/run/ntpd.pid\0-g\0")),
            Some("ntpd")
        );
        assert_eq!(
            daemon_of("ntpd", || title("ntpd: ntp engine")),
            Some("openntpd")
        );
        assert_eq!(
            daemon_of("ntpd", || title("ntpd: dns engine")),
            Some("openntpd")
        );
        assert_eq!(daemon_of("openntpd", || unreachable!()), Some("openntpd"));
        assert_eq!(daemon_of("chronyd", || unreachable!()), Some("chronyd"));
        assert_eq!(
            daemon_of("systemd-timesyn", || unreachable!()),
            Some("systemd-timesyncd")
        );
        assert_eq!(daemon_of("sshd", || unreachable!()), None);
        // The privileged parent (untitled) and its engines: OpenNTPD, whatever ntpd says.
        assert_eq!(
            verdict_without(&["ntpd", "openntpd"]),
            Some(Verdict::NoBound)
        );
        assert_eq!(
            verdict_without(&["chronyd", "openntpd"]),
            Some(Verdict::NoBound)
        );
        assert_eq!(verdict_without(&["ntpd"]), None);
    }

    #[test]
    fn the_bound_holds_the_offset_the_kernel_has_still_to_slew() {
        for offset_ns in [250_000, -250_000] {
            let r = KernelClock::<Adjtimex>::judge(KernelState {
                offset_ns,
                ..state(5, libc::TIME_OK, libc::STA_PLL)
            });
            assert_eq!(r.state, SyncState::Synchronized);
            // maxerror 1.5 ms, the 0.5 ms it may lag, the offset.
            assert_eq!(r.bound_ns, 2_250_000);
        }
    }

    #[test]
    fn after_a_suspend_the_clock_waits_for_the_daemon_to_update_it() {
        const S: u64 = 1_000_000_000;
        let kernel = Arc::new(Mutex::new(state(1_795_000_000 * S, libc::TIME_OK, 0)));
        let asleep = Arc::new(AtomicU64::new(7 * S));
        let clock = KernelClock::with_suspend(Fake(kernel.clone()), {
            let asleep = asleep.clone();
            Box::new(move || asleep.load(Ordering::Relaxed))
        });
        let set_max_error = |us: i64| kernel.lock().unwrap().max_error_us = us;
        assert_eq!(clock.read().state, SyncState::Synchronized);
        // An hour asleep; the kernel's NTP state is as it was.
        asleep.fetch_add(3_600 * S, Ordering::Relaxed);
        let r = clock.read();
        assert_eq!((r.state, r.bound_ns), (SyncState::Unsynchronized, u64::MAX));
        assert!(r.reason.contains("suspended"), "{}", r.reason);
        // The kernel grows maxerror: still refused.
        for us in [1_500, 2_000, 2_500] {
            set_max_error(us);
            assert_eq!(clock.read().state, SyncState::Unsynchronized, "{us}");
        }
        // The daemon updates the clock (a smaller maxerror), the kernel grows it, the daemon
        // updates again: trusted again, with its bound.
        for us in [800, 1_300] {
            set_max_error(us);
            assert_eq!(clock.read().state, SyncState::Unsynchronized, "{us}");
        }
        set_max_error(900);
        let r = clock.read();
        assert_eq!((r.state, r.bound_ns), (SyncState::Synchronized, 1_400_000));
        set_max_error(1_400);
        assert_eq!(clock.read().state, SyncState::Synchronized);
    }

    #[test]
    fn under_systemd_timesyncd_or_no_daemon_seen_every_reading_is_refused() {
        let fixed = |daemons: &'static [&'static str]| {
            KernelClock::under(Box::new(move || daemons.to_vec()))
        };
        for (daemons, why) in [
            (&["systemd-timesyncd"][..], "timesyncd"),
            (&[][..], "no time daemon"),
        ] {
            let r = fixed(daemons).read();
            assert_eq!(r.state, SyncState::Unsynchronized);
            assert!(r.reason.contains(why), "{}", r.reason);
        }
        for daemons in [&["chronyd"][..], &["ntpd"][..]] {
            assert!(!fixed(daemons).read().reason.contains("daemon"));
        }
    }

    #[test]
    fn a_daemon_that_starts_after_the_tsa_is_found_and_one_that_stops_is_missed() {
        let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = DaemonWatch::new({
            let running = running.clone();
            Box::new(move || match running.load(Ordering::Relaxed) {
                true => vec!["chronyd"],
                false => vec![],
            })
        });
        assert_eq!(watch.refusal(), Some(Verdict::NoDaemon));
        running.store(true, Ordering::Relaxed);
        // Seen at the next look (every LOOK_AGAIN on its thread), not at every reading.
        assert_eq!(watch.refusal(), Some(Verdict::NoDaemon));
        watch.look_now(false);
        assert_eq!(watch.refusal(), None);
        assert!(watch.chronyd.load(Ordering::Relaxed));
        // And missed once it has gone, while trusting too.
        running.store(false, Ordering::Relaxed);
        watch.look_now(false);
        assert_eq!(watch.refusal(), Some(Verdict::NoDaemon));
    }

    /// The clock read after `adjtimex` goes with its state when it is the time the call gave
    /// (truncated to microseconds) plus the call's length; a step between them, either way,
    /// makes the call be made again.
    #[test]
    fn a_step_between_the_kernels_state_and_the_time_read_is_seen() {
        let kernel_ns: i128 = 1_795_000_000_123_456_000;
        let at = |ns: i128| u64::try_from(kernel_ns + ns).unwrap();
        assert!(paired(kernel_ns, at(0)));
        assert!(paired(kernel_ns, at(999)), "within its microsecond");
        assert!(paired(kernel_ns, at(40_000)), "a slow call");
        assert!(!paired(kernel_ns, at(1_000_000_000)), "stepped forward");
        assert!(!paired(kernel_ns, at(-1_000_000)), "stepped back");
        // Three in a row: refused, and said why.
        let r = KernelClock::<Adjtimex>::judge(state(5, UNPAIRED, 0));
        assert_eq!(r.state, SyncState::Unsynchronized);
        assert!(r.reason.contains("being stepped"), "{}", r.reason);
        // The real call, on this machine's clock: paired (no step now).
        let state = Adjtimex.state();
        assert_ne!(
            state.rc, UNPAIRED,
            "the kernel's time and the clock never paired"
        );
        let now = system_unix_ns();
        assert!(now >= state.unix_ns && now - state.unix_ns < 1_000_000_000);
    }

    #[test]
    fn a_negative_offset_a_kernel_reports_in_microseconds_is_unwrapped() {
        // -250.4 µs as such a kernel reports it: (2^32 - 250_400 ns) / 1000, unsigned; read
        // back to within 2 µs, never smaller in magnitude.
        let reported = ((1u64 << 32) - 250_400) as i64 / 1_000;
        assert_eq!(micros_offset(reported), -252);
        assert_eq!(micros_offset(250), 250);
        assert_eq!(micros_offset(500_000), 500_000);
    }

    #[test]
    fn time_daemons_are_found_by_their_process_names() {
        use std::os::unix::process::CommandExt;
        // A copy of sleep named chronyd, beside the test binary (where executing is allowed).
        let deps = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(deps.parent().unwrap()).unwrap();
        let fake = dir.path().join("chronyd");
        std::fs::copy("/bin/sleep", &fake).unwrap();
        // And one named ntpd, titled as OpenNTPD's engine is.
        let engine = dir.path().join("ntpd");
        std::fs::copy("/bin/sleep", &engine).unwrap();
        let mut children = [
            std::process::Command::new(&fake).arg("5").spawn().unwrap(),
            std::process::Command::new(&engine)
                .arg0("ntpd: ntp engine")
                .arg("5")
                .spawn()
                .unwrap(),
        ];
        let found = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let seen = time_daemon_processes();
            seen.contains(&(children[0].id(), "chronyd"))
                && seen.contains(&(children[1].id(), "openntpd"))
        });
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert!(found, "{:?}", time_daemon_processes());
    }

    #[test]
    fn unsynchronized_kernel_is_not_trusted() {
        for (rc, status) in [
            (libc::TIME_ERROR, 0),
            (libc::TIME_OK, libc::STA_UNSYNC),
            (-1, 0),
        ] {
            let r = KernelClock::<Adjtimex>::judge(state(5, rc, status));
            assert_eq!(r.state, SyncState::Unsynchronized, "{rc} {status}");
        }
    }

    #[test]
    fn a_leap_second_in_the_kernel_is_refused_around_midnight() {
        const S: u64 = 1_000_000_000;
        // 2016-12-31 00:00:00 UTC, the day that ended with the last leap second.
        let day = 1_483_142_400 * S;
        let midnight = day + 86_400 * S;
        let judge =
            |unix_ns, rc, status| KernelClock::<Adjtimex>::judge(state(unix_ns, rc, status)).state;
        use SyncState::*;
        // The inserted second itself (the kernel repeats 23:59:59): refused.
        assert_eq!(
            judge(midnight - S / 2, libc::TIME_OOP, libc::STA_INS),
            Unsynchronized
        );
        // A leap pending: refused from 23:59:59 to 00:00:01, issued before and after.
        for (rc, status) in [
            (libc::TIME_INS, libc::STA_INS),
            (libc::TIME_DEL, libc::STA_DEL),
            (libc::TIME_OK, libc::STA_INS),
            (libc::TIME_WAIT, libc::STA_INS),
            (libc::TIME_WAIT, 0),
        ] {
            for (at, expected) in [
                (day + 12 * 3_600 * S, Synchronized),
                (midnight - S - 1, Synchronized),
                (midnight - S, Unsynchronized),
                (midnight - 1, Unsynchronized),
                (midnight, Unsynchronized),
                (midnight + S - 1, Unsynchronized),
                (midnight + S, Synchronized),
            ] {
                assert_eq!(judge(at, rc, status), expected, "{rc} {status:#x} at {at}");
            }
        }
        // No leap pending: midnight is like any other second.
        assert_eq!(judge(midnight - S / 2, libc::TIME_OK, 0), Synchronized);
    }

    #[test]
    fn synchronized_kernel_gives_its_max_error_and_the_half_millisecond_it_may_lag() {
        let r = KernelClock::<Adjtimex>::judge(state(5, libc::TIME_OK, 0));
        assert_eq!(r.state, SyncState::Synchronized);
        assert_eq!(r.bound_ns, 2_000_000);
    }

    #[test]
    fn the_real_kernel_answers() {
        let state = Adjtimex.state();
        let now = system_unix_ns();
        assert!(state.unix_ns <= now && now - state.unix_ns < 1_000_000_000);
    }
}
