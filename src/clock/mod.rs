//! What time it is, how wrong that might be, and whether the TSA may stamp with it.
//!
//! A [`TimeSource`] answers with a [`Reading`]: UTC, an error bound, a state and the reason for
//! that state. [`IssuingClock`] is the gate in front of the issuing path: it hands out a time
//! only while the source is synchronized and its bound is within the declared accuracy, and it
//! makes genTime strictly increasing without ever running ahead of the clock.
//!
//! The sources: the disciplined clock ([`service`], [`discipline`]) that the TSA keeps itself
//! from NTP servers ([`ntp`]) and GPS receivers ([`gps`], [`nmea`]); the kernel clock
//! ([`kernel`]), trusted only while the kernel says it is synchronized; and an explicit
//! development clock ([`development`]).

pub mod chronyd;
pub mod development;
pub mod discipline;
pub mod gps;
pub mod kernel;
pub mod local;
pub mod nmea;
pub mod ntp;
pub mod service;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The state of a time source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// The source follows its references and vouches for its bound.
    Synchronized,
    /// References are lost; the bound is growing from the last good update.
    Holdover,
    /// The source cannot say what time it is.
    Unsynchronized,
}

impl SyncState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Synchronized => "synchronized",
            Self::Holdover => "holdover",
            Self::Unsynchronized => "unsynchronized",
        }
    }
}

/// One answer of a time source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    /// UTC, in nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    /// The true UTC lies within `unix_ns ± bound_ns`.
    pub bound_ns: u64,
    pub state: SyncState,
    /// Why the source is in this state, in words for the operator (shared, so that a reading
    /// costs no allocation).
    pub reason: Arc<str>,
}

/// Anything that can tell the time with a bound.
pub trait TimeSource: Send + Sync + 'static {
    /// A short name for logs and the status page.
    fn name(&self) -> &'static str;
    fn read(&self) -> Reading;

    /// The discipline's data (system and sources), for metrics; `None` for simple sources.
    fn views(&self) -> Option<ClockViews> {
        None
    }

    /// Whether the machinery behind the source runs (a background task that stopped
    /// updating is a fault the service manager's watchdog should see). Not whether it is
    /// synchronized: a restart does not bring lost references back.
    fn alive(&self) -> bool {
        true
    }

    /// The latest events of the source's machinery (sync acquired or lost, steps, source
    /// selection, leap seconds, holdover), oldest first, for the status page; none for simple
    /// sources.
    fn recent_events(&self) -> Vec<ClockEvent> {
        Vec::new()
    }

    /// Whether the source logs its own changes of state (the disciplined clock's events);
    /// otherwise the server watches its readings ([`Watch`]).
    fn logs_its_changes(&self) -> bool {
        false
    }

    /// The source's state in words for the operator (`tsa clock`, the admin listener).
    fn report(&self) -> String {
        let r = self.read();
        format!(
            "Source      : {}\nState       : {} ({})\nError bound : {}\n",
            self.name(),
            r.state.name(),
            r.reason,
            if r.bound_ns == u64::MAX {
                "-".into()
            } else {
                fmt_ns(r.bound_ns)
            }
        )
    }
}

/// What the disciplined clock knows, as data: the system (`chronyc tracking`) and each source
/// (`chronyc sources`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClockViews {
    pub system: Option<discipline::SystemView>,
    pub sources: Vec<discipline::SourceView>,
}

/// How much an event matters to the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventLevel {
    Info,
    Warning,
    Error,
}

impl EventLevel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
        }
    }
}

/// One event of a time source, as logged, for the status page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockEvent {
    /// UTC of the event, as the source estimated it then (ns since the Unix epoch).
    pub utc_ns: u64,
    /// The log's `event` field: `sync_acquired`, `source_rejected`, `step_detected`, …
    pub kind: &'static str,
    pub level: EventLevel,
    /// The event in words.
    pub text: String,
}

/// A time the TSA may put into a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedTime {
    pub unix_ns: u64,
    pub bound_ns: u64,
    /// Synchronized or in holdover (recorded in the archive).
    pub state: SyncState,
}

/// Why no time can be given now; the client gets `timeNotAvailable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: Cow<'static, str>,
}

/// Refusals by kind, a bounded set (for counters and metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The source is unsynchronized (never synchronized, disagreeing sources, a step awaiting
    /// confirmation, a leap second).
    Unsynchronized,
    /// The error bound (with genTime's truncation) exceeds the declared accuracy.
    BoundExceeded,
    /// The source went back behind the last genTime.
    SteppedBack,
    /// The signature came back so late after the reading that the token would be made
    /// outside the declared accuracy of its genTime (a signer that stalled, not the clock).
    SignedLate,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 4] = [
        Self::Unsynchronized,
        Self::BoundExceeded,
        Self::SteppedBack,
        Self::SignedLate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unsynchronized => "unsynchronized",
            Self::BoundExceeded => "bound_exceeded",
            Self::SteppedBack => "stepped_back",
            Self::SignedLate => "signed_late",
        }
    }

    /// What a client is told (the statusString of its `timeNotAvailable`). The refusal's own
    /// reason names the clock's sources (NTP servers' addresses, a receiver's device) and
    /// their offsets: the operator's, in the log, the status page and readiness.
    pub fn public_reason(self) -> &'static str {
        match self {
            Self::Unsynchronized => "the TSA's clock is not synchronized",
            Self::BoundExceeded => "the TSA's clock error bound exceeds its declared accuracy",
            Self::SteppedBack => "the TSA's clock went back behind its last token",
            Self::SignedLate => {
                "the signature came back too late: genTime would be outside the declared \
                 accuracy of the token's making"
            }
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A backward step of the source that is waited out instead of refused. A reading at or before
/// the last genTime (two threads a few nanoseconds apart, or a tiny slew) is read again until
/// the clock passes it; a larger step back is a fault that is refused until the clock catches up.
const MAX_WAIT_BACKWARDS: Duration = Duration::from_millis(2);

/// The gate between a time source and the issuing path.
pub struct IssuingClock {
    source: Box<dyn TimeSource>,
    max_bound_ns: u64,
    /// The resolution at which handed-out times strictly increase (a reload of genTime's
    /// precision sets it again).
    tick_ns: AtomicU64,
    /// The last time handed out, truncated to the tick; the next is in a later tick.
    last_ns: Mutex<u64>,
    refusals: [AtomicU64; RefusalKind::ALL.len()],
    /// For a source that does not log its own changes (the kernel's), what a [`Watch`] sees
    /// of the readings the tokens take (and the sampler's, once a second while none come):
    /// a change that lasted less than a second between two samples, with tokens issued in
    /// it, is logged too. Observed under `last_ns`, so in the readings' order.
    watch: Option<Mutex<Watch>>,
    /// What the watch saw last ([`watch_key`]): a reading like it is passed at the cost of
    /// one load, without the watch's lock.
    watched: std::sync::atomic::AtomicU8,
}

/// Changes of the source's state that a reading showed: logged when dropped, after the
/// issuing lock (a log that waits for its writer must not hold up every token), holding the
/// watch's lock until then so that changes are logged in the readings' order.
struct Unlogged<'a> {
    _in_order: std::sync::MutexGuard<'a, Watch>,
    changes: Vec<Change>,
    source: &'static str,
    utc_ns: u64,
}

impl Drop for Unlogged<'_> {
    fn drop(&mut self) {
        for change in &self.changes {
            change.log(self.source, self.utc_ns);
        }
    }
}

/// A reading as a [`Watch`] tells it apart: its state, and whether its bound is within the
/// declared accuracy.
fn watch_key(reading: &Reading, max_bound_ns: u64) -> u8 {
    (reading.state as u8) << 1 | u8::from(reading.bound_ns <= max_bound_ns)
}

impl IssuingClock {
    /// `max_bound` is the accuracy the policy declares (at most 1 s under ETSI EN 319 421).
    /// Handed-out times strictly increase at `tick` (at least 1 ns): callers pass genTime's
    /// precision, capped at 1 µs, so that genTimes encoded in microseconds or finer are all
    /// distinct while a coarser genTime is never pushed ahead of the clock to stay distinct
    /// (it only never decreases).
    pub fn new(source: Box<dyn TimeSource>, max_bound: Duration, tick: Duration) -> Self {
        Self {
            max_bound_ns: max_bound.as_nanos() as u64,
            tick_ns: AtomicU64::new((tick.as_nanos() as u64).max(1)),
            last_ns: Mutex::new(0),
            refusals: Default::default(),
            watch: (!source.logs_its_changes()).then(|| Mutex::new(Watch::default())),
            watched: std::sync::atomic::AtomicU8::new(u8::MAX),
            source,
        }
    }

    /// Logs what changed since the last reading watched, for a source that does not log its
    /// own changes (see [`IssuingClock::watch`]); called with `last_ns` held.
    /// The changes `reading` shows, to be logged once the issuing lock is let go (see
    /// [`Unlogged`]); `None` where there are none. Never while an earlier one is held.
    fn observe(&self, reading: &Reading) -> Option<Unlogged<'_>> {
        let watch = self.watch.as_ref()?;
        let key = watch_key(reading, self.max_bound_ns);
        if self.watched.load(Ordering::Relaxed) == key {
            return None;
        }
        let mut watch = watch.lock().unwrap_or_else(|p| p.into_inner());
        let changes = watch.observe(reading, self.max_bound_ns);
        self.watched.store(key, Ordering::Relaxed);
        Some(Unlogged {
            _in_order: watch,
            changes,
            source: self.source.name(),
            utc_ns: reading.unix_ns,
        })
    }

    /// The source's reading, watched as the tokens' are (the sampler's, once a second: a
    /// change with no token to see it is logged within the second).
    pub fn watched_reading(&self) -> Reading {
        let unlogged;
        let _last = self.last_ns.lock().unwrap_or_else(|p| p.into_inner());
        let reading = self.source.read();
        unlogged = self.observe(&reading);
        drop((_last, unlogged));
        reading
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    pub fn max_bound(&self) -> Duration {
        Duration::from_nanos(self.max_bound_ns)
    }

    /// After a restart: the last genTime issued before it. Later times are after it; while the
    /// source is more than a moment behind it, `now` refuses (as for a step back).
    pub fn set_floor(&self, unix_ns: u64) {
        let mut last = self.last_ns.lock().unwrap_or_else(|p| p.into_inner());
        *last = (*last).max(unix_ns - unix_ns % self.tick());
    }

    /// Handed-out times strictly increase at `tick` from now on (genTime's precision, capped
    /// at 1 µs, reloaded): from nanoseconds to microseconds, two genTimes of one microsecond
    /// would otherwise be the same.
    pub fn set_tick(&self, tick: Duration) {
        let _last = self.last_ns.lock().unwrap_or_else(|p| p.into_inner());
        self.tick_ns
            .store((tick.as_nanos() as u64).max(1), Ordering::Relaxed);
    }

    fn tick(&self) -> u64 {
        self.tick_ns.load(Ordering::Relaxed)
    }

    /// The resolution at which handed-out times strictly increase now.
    pub fn tick_duration(&self) -> Duration {
        Duration::from_nanos(self.tick())
    }

    /// The source's current reading, for health checks and the status page.
    pub fn reading(&self) -> Reading {
        self.source.read()
    }

    /// Whether the source logs its own changes of state (see [`TimeSource::logs_its_changes`]).
    pub fn logs_its_changes(&self) -> bool {
        self.source.logs_its_changes()
    }

    /// The declared accuracy in nanoseconds.
    pub fn max_bound_ns(&self) -> u64 {
        self.max_bound_ns
    }

    /// The source's data, for metrics.
    pub fn views(&self) -> Option<ClockViews> {
        self.source.views()
    }

    /// The source's latest events, oldest first (see [`TimeSource::recent_events`]).
    pub fn recent_events(&self) -> Vec<ClockEvent> {
        self.source.recent_events()
    }

    /// The source's machinery runs (see [`TimeSource::alive`]).
    pub fn alive(&self) -> bool {
        self.source.alive()
    }

    /// The source's state in words (`tsa clock`), with the refusals so far.
    pub fn report(&self) -> String {
        let mut report = self.source.report();
        let counts: Vec<String> = RefusalKind::ALL
            .iter()
            .map(|k| format!("{} {}", k.name(), self.refusals(*k)))
            .collect();
        report.push_str(&format!("\nRefusals    : {}\n", counts.join(", ")));
        report
    }

    /// Requests refused for this kind of reason since start.
    pub fn refusals(&self, kind: RefusalKind) -> u64 {
        self.refusals[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts a refusal of the issuing path (also one decided after `now`, such as an
    /// accuracy that genTime's truncation pushed over the limit).
    pub fn count_refusal(&self, refusal: &Refusal) {
        self.refusals[refusal.kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a token could be issued now: what [`IssuingClock::now`] would refuse, without
    /// taking a tick; the reading it judged.
    pub fn check(&self) -> Result<Reading, Refusal> {
        // Read under the lock, as `now` does: a reading taken before it could be passed by
        // the tokens issued while this thread waited, and look like a step back.
        // Declared first, so let go last: the changes are logged after the issuing lock.
        let _unlogged;
        let last = self.last_ns.lock().unwrap_or_else(|p| p.into_inner());
        let reading = self.source.read();
        _unlogged = self.observe(&reading);
        self.admit(&reading)?;
        match last.checked_sub(reading.unix_ns) {
            Some(behind) if behind > MAX_WAIT_BACKWARDS.as_nanos() as u64 => {
                Err(stepped_back(behind))
            }
            _ => Ok(reading),
        }
    }

    /// Synchronized, or in holdover, and within the declared accuracy (ETSI EN 319 421: stop
    /// issuing when the clock leaves its declared accuracy).
    fn admit(&self, reading: &Reading) -> Result<(), Refusal> {
        if reading.state == SyncState::Unsynchronized {
            return Err(Refusal {
                kind: RefusalKind::Unsynchronized,
                reason: format!("time source {}: {}", reading.state.name(), reading.reason).into(),
            });
        }
        if reading.bound_ns > self.max_bound_ns {
            return Err(Refusal {
                kind: RefusalKind::BoundExceeded,
                reason: format!(
                    "clock error bound {} exceeds the declared accuracy {}",
                    fmt_ns(reading.bound_ns),
                    fmt_ns(self.max_bound_ns)
                )
                .into(),
            });
        }
        Ok(())
    }

    /// The time for the next token: read now, in a later tick than every earlier one, never
    /// ahead of the source. Call it as late as possible, just before signing.
    pub fn now(&self) -> Result<TrustedTime, Refusal> {
        self.now_in_ticks_of(self.tick_duration())
    }

    /// [`IssuingClock::now`] in a later tick of `tick` than every earlier time (of any tick):
    /// the tick of the token's own precision, where a reload may change it while requests
    /// of the old one are in flight.
    pub fn now_in_ticks_of(&self, tick: Duration) -> Result<TrustedTime, Refusal> {
        let result = self.next_time((tick.as_nanos() as u64).max(1));
        if let Err(refusal) = &result {
            self.count_refusal(refusal);
        }
        result
    }

    fn next_time(&self, tick_ns: u64) -> Result<TrustedTime, Refusal> {
        // Declared first, so let go last: the changes are logged after the issuing lock.
        let mut unlogged = None;
        let mut last = self.last_ns.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let reading = self.source.read();
            // The readings of a wait for the clock to pass the last time are microseconds
            // apart: the first change among them is told.
            if unlogged.is_none() {
                unlogged = self.observe(&reading);
            }
            self.admit(&reading)?;
            let tick = reading.unix_ns - reading.unix_ns % tick_ns;
            if tick > *last {
                *last = tick;
                return Ok(TrustedTime {
                    unix_ns: reading.unix_ns,
                    bound_ns: reading.bound_ns,
                    state: reading.state,
                });
            }
            let behind = *last - tick;
            if behind > MAX_WAIT_BACKWARDS.as_nanos() as u64 {
                // Every request meanwhile is refused: a line a second, not one a request.
                static STEPPED_BACK: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new();
                if let Some(left_out) = STEPPED_BACK.allow() {
                    tracing::error!(
                        event = "clock_step_back",
                        behind_ns = behind,
                        left_out,
                        "time source went back behind the last genTime; refusing until it catches up"
                    );
                }
                return Err(stepped_back(behind));
            }
            std::hint::spin_loop();
        }
    }
}

fn stepped_back(behind_ns: u64) -> Refusal {
    Refusal {
        kind: RefusalKind::SteppedBack,
        reason: format!(
            "clock stepped back {} behind the last token",
            fmt_ns(behind_ns)
        )
        .into(),
    }
}

/// Whether a source's readings allow tokens, watched from outside for a source that does not
/// log its own changes (the kernel's clock, whose state the kernel keeps): ETSI EN 319 421
/// wants every synchronization and loss of it logged. [`IssuingClock`] shows it every
/// reading a token takes, and the sampler's once a second; each change is told once.
#[derive(Debug, Default)]
pub struct Watch {
    /// The last state seen, and whether its bound was within the declared accuracy.
    last: Option<(SyncState, bool)>,
}

/// A change of whether a clock lets tokens be issued: what a [`Watch`] sees of a simple
/// source, and what the disciplined clock tells of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Trusted again (or for the first time), with this bound (and, where the source knows
    /// it, UTC − the local clock).
    Synchronized {
        bound_ns: u64,
        offset_ns: Option<i64>,
    },
    /// In holdover: still trusted while the bound grows.
    Holdover {
        reason: Arc<str>,
    },
    Unsynchronized {
        reason: Arc<str>,
    },
    /// The bound passed the declared accuracy: no tokens.
    AccuracyExceeded {
        bound_ns: u64,
        accuracy_ns: u64,
    },
    AccuracyRegained {
        bound_ns: u64,
        accuracy_ns: u64,
    },
}

impl Change {
    /// Logs the change as an event (the archive keeps these, ETSI EN 319 421), `source`
    /// naming the clock.
    pub fn log(&self, source: &str, utc_ns: u64) {
        match self {
            Change::Synchronized {
                bound_ns,
                offset_ns,
            } => tracing::info!(
                event = "sync_acquired",
                source,
                utc_ns,
                offset_ns,
                bound_ns,
                "clock synchronized"
            ),
            Change::Holdover { reason } => tracing::warn!(
                event = "holdover",
                source,
                utc_ns,
                reason = &**reason,
                "clock in holdover"
            ),
            Change::Unsynchronized { reason } => tracing::warn!(
                event = "sync_lost",
                source,
                utc_ns,
                reason = &**reason,
                "clock unsynchronized: no time-stamps"
            ),
            Change::AccuracyExceeded {
                bound_ns,
                accuracy_ns,
            } => tracing::warn!(
                event = "accuracy_exceeded",
                source,
                utc_ns,
                bound_ns,
                accuracy_ns,
                "clock error bound exceeds the declared accuracy: no time-stamps"
            ),
            Change::AccuracyRegained {
                bound_ns,
                accuracy_ns,
            } => tracing::info!(
                event = "accuracy_regained",
                source,
                utc_ns,
                bound_ns,
                accuracy_ns,
                "clock error bound within the declared accuracy again"
            ),
        }
    }
}

impl Watch {
    /// The changes since the last reading (the first reading tells its state).
    pub fn observe(&mut self, reading: &Reading, max_bound_ns: u64) -> Vec<Change> {
        let within = reading.bound_ns <= max_bound_ns;
        let mut changes = Vec::new();
        let (was, was_within) = match self.last {
            Some(last) => last,
            // Before the first reading: nothing was trusted, so a trusted first reading is a
            // synchronization, and its bound is judged on its own.
            None => (SyncState::Unsynchronized, true),
        };
        if self.last.is_none() || reading.state != was {
            changes.push(match reading.state {
                SyncState::Synchronized => Change::Synchronized {
                    bound_ns: reading.bound_ns,
                    offset_ns: None,
                },
                SyncState::Holdover => Change::Holdover {
                    reason: reading.reason.clone(),
                },
                SyncState::Unsynchronized => Change::Unsynchronized {
                    reason: reading.reason.clone(),
                },
            });
        }
        // The bound of an unsynchronized source says nothing: its state was told.
        if reading.state != SyncState::Unsynchronized {
            let was_within = was_within || was == SyncState::Unsynchronized;
            if within != was_within {
                let (bound_ns, accuracy_ns) = (reading.bound_ns, max_bound_ns);
                changes.push(if within {
                    Change::AccuracyRegained {
                        bound_ns,
                        accuracy_ns,
                    }
                } else {
                    Change::AccuracyExceeded {
                        bound_ns,
                        accuracy_ns,
                    }
                });
            }
        }
        self.last = Some((reading.state, within));
        changes
    }
}

/// The system's real-time clock in nanoseconds since the Unix epoch.
pub fn system_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.1} s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_watch_tells_each_change_once() {
        let reading = |state, bound_ns| Reading {
            unix_ns: 1,
            bound_ns,
            state,
            reason: "why".into(),
        };
        use Change as C;
        use SyncState as S;
        let max = 1_000;
        let mut watch = Watch::default();
        let mut see = |state, bound| watch.observe(&reading(state, bound), max);
        assert_eq!(
            see(S::Synchronized, 10),
            [C::Synchronized {
                bound_ns: 10,
                offset_ns: None
            }]
        );
        assert_eq!(see(S::Synchronized, 20), []);
        assert_eq!(
            see(S::Synchronized, 2_000),
            [C::AccuracyExceeded {
                bound_ns: 2_000,
                accuracy_ns: max
            }]
        );
        assert_eq!(see(S::Synchronized, 3_000), []);
        assert_eq!(
            see(S::Synchronized, 900),
            [C::AccuracyRegained {
                bound_ns: 900,
                accuracy_ns: max
            }]
        );
        assert_eq!(
            see(S::Holdover, 950),
            [C::Holdover {
                reason: "why".into()
            }]
        );
        assert_eq!(
            see(S::Unsynchronized, u64::MAX),
            [C::Unsynchronized {
                reason: "why".into()
            }]
        );
        assert_eq!(see(S::Unsynchronized, u64::MAX), []);
        // Back, but beyond the accuracy: both are told.
        assert_eq!(
            see(S::Synchronized, 5_000),
            [
                C::Synchronized {
                    bound_ns: 5_000,
                    offset_ns: None
                },
                C::AccuracyExceeded {
                    bound_ns: 5_000,
                    accuracy_ns: max
                }
            ]
        );
        // The first reading is told whatever it is.
        let mut watch = Watch::default();
        assert_eq!(
            watch.observe(&reading(S::Unsynchronized, u64::MAX), max),
            [C::Unsynchronized {
                reason: "why".into()
            }]
        );
    }

    use super::*;
    /// A source that returns scripted readings.
    struct Scripted {
        now: Arc<AtomicU64>,
        state: SyncState,
        bound_ns: u64,
    }

    impl TimeSource for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn read(&self) -> Reading {
            Reading {
                unix_ns: self.now.fetch_add(1, Ordering::SeqCst),
                bound_ns: self.bound_ns,
                state: self.state,
                reason: Arc::from("scripted"),
            }
        }
    }

    fn clock(state: SyncState, bound_ns: u64) -> (IssuingClock, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000_000_000));
        let source = Scripted {
            now: now.clone(),
            state,
            bound_ns,
        };
        (
            IssuingClock::new(
                Box::new(source),
                Duration::from_secs(1),
                Duration::from_nanos(1),
            ),
            now,
        )
    }

    #[test]
    fn refuses_unless_synchronized_within_bound() {
        assert!(clock(SyncState::Synchronized, 1_000).0.now().is_ok());
        assert!(clock(SyncState::Holdover, 1_000).0.now().is_ok());
        assert!(clock(SyncState::Unsynchronized, 1_000).0.now().is_err());
        let err = clock(SyncState::Synchronized, 1_000_000_001)
            .0
            .now()
            .unwrap_err();
        assert!(
            err.reason.contains("exceeds the declared accuracy"),
            "{err}"
        );
    }

    #[test]
    fn strictly_increasing_and_waits_out_small_steps_back() {
        let (clock, now) = clock(SyncState::Synchronized, 1_000);
        let a = clock.now().unwrap().unix_ns;
        // A step back of 1 ms: waited out (the scripted clock advances 1 ns a read).
        now.fetch_sub(1_000, Ordering::SeqCst);
        let b = clock.now().unwrap().unix_ns;
        assert!(b > a);
        assert!(clock.check().is_ok());
        // A step back of 1 s: refused, and readiness says so.
        now.fetch_sub(1_000_000_000, Ordering::SeqCst);
        assert!(clock.now().unwrap_err().reason.contains("stepped back"));
        assert_eq!(clock.check().unwrap_err().kind, RefusalKind::SteppedBack);
    }

    #[test]
    fn a_floor_from_before_a_restart_is_never_undercut() {
        let (clock, now) = clock(SyncState::Synchronized, 1_000);
        let start = now.load(Ordering::SeqCst);
        // The last genTime before the restart is 1 s ahead of this clock: refused.
        clock.set_floor(start + 1_000_000_000);
        assert_eq!(clock.now().unwrap_err().kind, RefusalKind::SteppedBack);
        // Once the clock passes it, times are after it.
        now.store(start + 1_000_000_001, Ordering::SeqCst);
        assert!(clock.now().unwrap().unix_ns > start + 1_000_000_000);
        // A floor in the past changes nothing.
        clock.set_floor(start);
        assert!(clock.now().is_ok());
    }

    /// A source whose state the test sets, one nanosecond further at each reading; it logs
    /// its own changes where `logs` says so.
    struct Flipping {
        now: AtomicU64,
        synchronized: Arc<std::sync::atomic::AtomicBool>,
        logs: bool,
    }

    /// An issuing clock over a [`Flipping`] source.
    fn flipping(synchronized: &Arc<std::sync::atomic::AtomicBool>, logs: bool) -> IssuingClock {
        let source = Flipping {
            now: AtomicU64::new(1_000_000_000),
            synchronized: Arc::clone(synchronized),
            logs,
        };
        IssuingClock::new(
            Box::new(source),
            Duration::from_secs(1),
            Duration::from_nanos(1),
        )
    }

    impl TimeSource for Flipping {
        fn name(&self) -> &'static str {
            "flipping"
        }
        fn logs_its_changes(&self) -> bool {
            self.logs
        }
        fn read(&self) -> Reading {
            let synchronized = self.synchronized.load(Ordering::SeqCst);
            Reading {
                unix_ns: self.now.fetch_add(1, Ordering::SeqCst),
                bound_ns: if synchronized { 1_000 } else { u64::MAX },
                state: match synchronized {
                    true => SyncState::Synchronized,
                    false => SyncState::Unsynchronized,
                },
                reason: Arc::from("flipping"),
            }
        }
    }

    /// The events a closure logs, one line each.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter_map(|l| l.split("event=").nth(1))
            .map(|e| {
                e.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            })
            .collect()
    }

    /// A source that does not log its own changes is watched through the readings the tokens
    /// take: a loss of synchronization and its return between two of the sampler's readings,
    /// tokens refused and issued in it, are logged (the sampler alone saw neither), each
    /// change once.
    #[test]
    fn the_tokens_readings_log_the_changes_of_a_source_that_does_not() {
        let synchronized = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let clock = flipping(&synchronized, false);
        let events = logged(|| {
            clock.watched_reading();
            for synchronized_now in [true, false, false, true, true] {
                synchronized.store(synchronized_now, Ordering::SeqCst);
                assert_eq!(clock.now().is_ok(), synchronized_now);
            }
            clock.watched_reading();
        });
        assert_eq!(events, ["sync_acquired", "sync_lost", "sync_acquired"]);

        // One that logs its own: not watched.
        let clock = flipping(&synchronized, true);
        let events = logged(|| {
            for synchronized_now in [true, false, true] {
                synchronized.store(synchronized_now, Ordering::SeqCst);
                let _ = clock.now();
            }
        });
        assert!(events.is_empty(), "{events:?}");
    }

    /// A synchronized clock over a source one nanosecond further at each reading, handing
    /// out times that strictly increase at `tick`.
    fn ticking_at(tick: Duration) -> (IssuingClock, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000_000_000));
        let source = Scripted {
            now: now.clone(),
            state: SyncState::Synchronized,
            bound_ns: 1,
        };
        let clock = IssuingClock::new(Box::new(source), Duration::from_secs(1), tick);
        (clock, now)
    }

    #[test]
    fn strictly_increasing_at_the_tick() {
        let (clock, now) = ticking_at(Duration::from_micros(1));
        let mut last = 0;
        for _ in 0..100 {
            let t = clock.now().unwrap().unix_ns / 1_000;
            assert!(t > last, "{t} after {last}");
            last = t;
        }
        // Never ahead of the source: the reading itself is handed out.
        assert!(clock.now().unwrap().unix_ns < now.load(Ordering::SeqCst));
    }

    #[test]
    fn a_tick_set_again_holds_from_then_on() {
        let (clock, now) = ticking_at(Duration::from_nanos(1));
        let first = clock.now().unwrap().unix_ns;
        assert_eq!(
            clock.now().unwrap().unix_ns,
            first + 1,
            "a nanosecond apart"
        );
        // Microseconds from now on: the next time is in a later microsecond.
        clock.set_tick(Duration::from_micros(1));
        let next = clock.now().unwrap().unix_ns;
        assert!(next / 1_000 > (first + 1) / 1_000, "{next} after {first}");
        assert!(next <= now.load(Ordering::SeqCst));
    }

    /// Times taken in ticks of their own (a reload changing genTime's precision while
    /// requests of the old one are in flight): each is in a later tick of its own than every
    /// earlier time, whatever tick the clock is set to.
    #[test]
    fn times_in_ticks_of_their_own_stay_distinct_in_them() {
        let (clock, _) = ticking_at(Duration::from_nanos(1));
        let micro = Duration::from_micros(1);
        let mut last = clock.now().unwrap().unix_ns;
        for i in 0..20 {
            let t = match i % 2 {
                0 => clock.now_in_ticks_of(micro).unwrap().unix_ns,
                _ => clock.now().unwrap().unix_ns,
            };
            assert!(t > last, "{t} after {last}");
            if i % 2 == 0 {
                assert!(
                    t / 1_000 > last / 1_000,
                    "a later microsecond: {t} after {last}"
                );
            }
            last = t;
        }
    }

    #[test]
    fn increasing_across_threads() {
        let (clock, _) = clock(SyncState::Synchronized, 1_000);
        let clock = Arc::new(clock);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| clock.now().unwrap().unix_ns)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "two tokens got the same time");
    }
}
