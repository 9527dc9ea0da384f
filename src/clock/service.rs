//! The disciplined clock as a running service: source tasks feed samples to one discipline
//! task, which updates on a fixed tick and publishes a snapshot that the issuing path reads
//! without taking any lock.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::discipline::{Discipline, DisciplineConfig, Event, Selection, Snapshot, SourceSpec};
use super::gps::{self, GpsdSource};
use super::local::{self, suspended_between, LocalClock, WallClockWatch};
use super::nmea::{self, NmeaSource};
use super::ntp::{self, NtpServer};
use super::Change;
use super::{fmt_ns, ClockEvent, ClockViews, EventLevel, Reading, SyncState, TimeSource};

/// Events kept for the status page.
const RECENT_EVENTS: usize = 200;

/// What the discipline task publishes for the issuing path.
struct Published {
    snapshot: Snapshot,
    /// The host's suspended time when the discipline (re)started: a reading that grew past it
    /// means the local clock stood still since, and the snapshot is void.
    suspended_ns: u64,
}

/// What a source task tells the discipline.
#[derive(Debug)]
pub enum SourceMessage {
    Sample(usize, super::discipline::Sample),
    Missed(usize),
    /// The source refuses us (an NTP server's kiss-o'-death DENY or RSTR): unreachable now;
    /// its task asks again after its backoff.
    Gone(usize),
}

#[derive(Clone, Debug)]
pub struct DisciplinedConfig {
    pub ntp: Vec<NtpServer>,
    /// A GPS receiver through gpsd: an independent reference.
    pub gpsd: Option<GpsdSource>,
    /// A GPS receiver read as NMEA from a serial device: an independent reference.
    pub nmea: Option<NmeaSource>,
    pub discipline: DisciplineConfig,
    /// How often the discipline updates (one "round" for step confirmation).
    pub update_interval: Duration,
}

pub struct DisciplinedClock {
    local: LocalClock,
    published: ArcSwap<Published>,
    /// How long the host has been suspended ([`local::suspended_ns`]; tests give their own).
    suspended: Box<dyn Fn() -> u64 + Send + Sync>,
    /// The operator's view, refreshed at each update: text and data.
    status: Mutex<(String, ClockViews)>,
    /// The last [`RECENT_EVENTS`] events, oldest first; written only when something happens.
    events: Mutex<VecDeque<ClockEvent>>,
    /// Local time of the discipline task's last update, and how often it updates: the task is
    /// alive while the one is recent in terms of the other.
    last_update: AtomicU64,
    update_interval: Duration,
    /// After a resume, how long samples are still taken as measured before it: the longest
    /// NTP exchange (its timeout) and a receiver's buffered lines ([`RESUME_GRACE`]).
    resume_grace: Duration,
}

/// After a resume, how long a receiver's serial lines (one a second) or gpsd's reports are
/// taken as from before it.
const RESUME_GRACE: Duration = Duration::from_secs(2);

impl DisciplinedClock {
    /// Starts the source tasks and the discipline task on the current tokio runtime.
    pub fn start(config: DisciplinedConfig) -> Arc<Self> {
        let local = LocalClock::new();
        let mut specs: Vec<SourceSpec> = config
            .ntp
            .iter()
            .map(|s| SourceSpec {
                name: format!("ntp {}", s.addr),
                independent: false,
            })
            .collect();
        let gps_specs = config
            .gpsd
            .iter()
            .map(|g| format!("gpsd {}", g.addr))
            .chain(
                config
                    .nmea
                    .iter()
                    .map(|n| format!("nmea {}", n.device.display())),
            );
        specs.extend(gps_specs.map(|name| SourceSpec {
            name,
            independent: true,
        }));
        let discipline = Discipline::new(config.discipline.clone(), specs);
        let longest_exchange = config.ntp.iter().map(|s| s.timeout).max();
        let clock = Arc::new(Self::new(
            local,
            config.update_interval,
            RESUME_GRACE + longest_exchange.unwrap_or_default(),
            Box::new(local::suspended_ns),
        ));
        let (tx, rx) = mpsc::channel(1024);
        let mut id = 0;
        for server in config.ntp {
            tokio::spawn(ntp::poll(id, server, local, tx.clone()));
            id += 1;
        }
        if let Some(source) = config.gpsd {
            tokio::spawn(gps::run(id, source, local, tx.clone()));
            id += 1;
        }
        if let Some(source) = config.nmea {
            tokio::spawn(nmea::run(id, source, local, tx.clone()));
        }
        tokio::spawn(run(discipline, rx, clock.clone(), config.update_interval));
        clock
    }
}

impl DisciplinedClock {
    fn new(
        local: LocalClock,
        update_interval: Duration,
        resume_grace: Duration,
        suspended: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Self {
            local,
            published: ArcSwap::from_pointee(Published {
                snapshot: Snapshot::initial(),
                suspended_ns: suspended(),
            }),
            suspended,
            status: Mutex::new(("no update yet\n".into(), ClockViews::default())),
            events: Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
            last_update: AtomicU64::new(local.now()),
            update_interval,
            resume_grace,
        }
    }

    fn publish(&self, snapshot: Snapshot, suspended_ns: u64) {
        self.published.store(Arc::new(Published {
            snapshot,
            suspended_ns,
        }));
    }

    /// When the host was suspended since the discipline (re)started (`base` its suspended
    /// time then): the discipline starts again, as [`Discipline::restart`] says why, and the
    /// new base is returned. Samples measured up to [`DisciplinedClock::resume_grace`] after
    /// now are void too: an NTP exchange that spanned the suspend is dated about when it
    /// ended (the local clock stood still), and a receiver's lines from before it wait in
    /// the serial port's buffer. The issuing path refuses from the resume on by itself
    /// ([`TimeSource::read`]); this makes the discipline wait for new samples.
    fn after_suspend(&self, discipline: &mut Discipline, base: u64) -> Option<u64> {
        // The lower of two readings: a restart costs minutes of sync, a reading that the
        // scheduler stretched must not cause one.
        let suspended = (self.suspended)().min((self.suspended)());
        if !suspended_between(base, suspended) {
            return None;
        }
        let now = self.local.now();
        let asleep = fmt_ns(suspended - base);
        discipline.restart(
            now + self.resume_grace.as_nanos() as u64,
            format!("the host was suspended for {asleep}: the local clock stood still, so the model and its samples are void"),
        );
        discipline.observe(now);
        self.publish(discipline.snapshot(), suspended);
        let utc = discipline.estimate(now).utc_ns;
        let text = format!(
            "the host was suspended for {asleep}; the disciplined clock starts again from new samples"
        );
        tracing::warn!(
            event = "host_suspended",
            suspended_ns = suspended - base,
            "{text}"
        );
        self.record(ClockEvent {
            utc_ns: utc,
            kind: "host_suspended",
            level: EventLevel::Warning,
            text,
        });
        Some(suspended)
    }

    fn record(&self, event: ClockEvent) {
        keep(
            &mut self.events.lock().unwrap_or_else(|p| p.into_inner()),
            event,
        );
    }
}

/// Appends `event`, dropping the oldest beyond [`RECENT_EVENTS`].
fn keep(events: &mut VecDeque<ClockEvent>, event: ClockEvent) {
    if events.len() == RECENT_EVENTS {
        events.pop_front();
    }
    events.push_back(event);
}

/// Why a reading after a suspend is refused; shared, so that a reading allocates nothing.
fn suspended_reason() -> Arc<str> {
    static REASON: OnceLock<Arc<str>> = OnceLock::new();
    REASON
        .get_or_init(|| "the host was suspended: waiting for new samples".into())
        .clone()
}

impl TimeSource for DisciplinedClock {
    fn logs_its_changes(&self) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "disciplined"
    }

    fn read(&self) -> Reading {
        let published = self.published.load();
        let mut estimate = published.snapshot.estimate(self.local.now());
        if suspended_between(published.suspended_ns, (self.suspended)()) {
            estimate.state = SyncState::Unsynchronized;
            estimate.bound_ns = u64::MAX;
            estimate.reason = suspended_reason();
        }
        Reading {
            unix_ns: estimate.utc_ns,
            bound_ns: estimate.bound_ns,
            state: estimate.state,
            reason: estimate.reason,
        }
    }

    fn report(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn views(&self) -> Option<ClockViews> {
        Some(
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        )
    }

    fn recent_events(&self) -> Vec<ClockEvent> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.iter().cloned().collect()
    }

    /// The discipline task updated within three intervals (and a second of slack).
    fn alive(&self) -> bool {
        let since = self
            .local
            .now()
            .saturating_sub(self.last_update.load(Ordering::Relaxed));
        since < 3 * self.update_interval.as_nanos() as u64 + 1_000_000_000
    }
}

async fn run(
    mut discipline: Discipline,
    mut rx: mpsc::Receiver<SourceMessage>,
    clock: Arc<DisciplinedClock>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The wall clock is compared with the local clock each second, so that a step is told
    // from the fastest slew (see `WallClockWatch`) down to about a tenth of a second.
    let mut wall = WallClockWatch::new();
    let mut wall_tick = tokio::time::interval(Duration::from_secs(1));
    wall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let names: Vec<String> = discipline
        .source_views(0)
        .into_iter()
        .map(|v| v.name)
        .collect();
    let mut sources_running = true;
    let mut suspended = clock.published.load().suspended_ns;
    let mut synchronizations = Synchronizations::default();
    loop {
        // Changes that come without an update (silence, the bound passing the declared
        // accuracy, a leap second's window) are observed when they are due.
        let now = clock.local.now();
        let change = discipline
            .next_change(now)
            .map(|t| Duration::from_nanos(t - now));
        tokio::select! {
            _ = tokio::time::sleep(change.unwrap_or(every)), if change.is_some() => {
                resumed(&clock, &mut discipline, &mut suspended, &mut wall, &names);
                let now = clock.local.now();
                discipline.observe(now);
                let utc = discipline.estimate(now).utc_ns;
                tell(&clock, &mut discipline, &names, utc);
            }
            message = rx.recv(), if sources_running => {
                resumed(&clock, &mut discipline, &mut suspended, &mut wall, &names);
                match message {
                    Some(SourceMessage::Sample(id, sample)) => discipline.sample(id, sample),
                    Some(SourceMessage::Missed(id)) => discipline.missed(id),
                    Some(SourceMessage::Gone(id)) => discipline.gone(id),
                    // Every source's task ended: the updates go on without samples, so that
                    // the loss of sync is observed and logged.
                    None => sources_running = false,
                }
                // A source reachable again, or unreachable, is told when it happens, not at
                // the next update (up to a poll interval later, and dated then).
                if discipline.has_events() {
                    let utc = discipline.estimate(clock.local.now()).utc_ns;
                    tell(&clock, &mut discipline, &names, utc);
                }
            }
            _ = tick.tick() => {
                resumed(&clock, &mut discipline, &mut suspended, &mut wall, &names);
                let now = clock.local.now();
                discipline.update(now);
                clock.last_update.store(now, Ordering::Relaxed);
                let snapshot = discipline.snapshot();
                let utc = snapshot.estimate(now).utc_ns;
                clock.publish(snapshot, suspended);
                tell(&clock, &mut discipline, &names, utc);
                let views = ClockViews {
                    system: Some(discipline.system_view(now)),
                    sources: discipline.source_views(now),
                };
                synchronizations.after_update(now, utc, &views);
                *clock.status.lock().unwrap_or_else(|p| p.into_inner()) = (render(&discipline, now), views);
            }
            _ = wall_tick.tick() => {
                resumed(&clock, &mut discipline, &mut suspended, &mut wall, &names);
                let now = clock.local.now();
                if let Some(step) = wall.observe(now, clock.local.wall_offset()) {
                    let utc = discipline.estimate(now).utc_ns;
                    tracing::warn!(event = "wall_clock_step", step_ns = step, utc_ns = utc,
                        "the system wall clock was stepped by {:+.6} s; the TSA's time is not affected",
                        step as f64 / 1e9);
                    clock.record(ClockEvent {
                        utc_ns: utc,
                        kind: "wall_clock_step",
                        level: EventLevel::Warning,
                        text: format!(
                            "the system wall clock was stepped by {:+.6} s; the TSA's time is not affected",
                            step as f64 / 1e9
                        ),
                    });
                }
            }
        }
    }
}

/// The record of routine synchronizations (ETSI EN 319 421 asks for the normal ones too, not
/// only the changes of state): after an update that set the model from a selection, one
/// `clock_sync` event (so archived) at most every [`Synchronizations::EVERY`], with what the
/// update found.
#[derive(Default)]
struct Synchronizations {
    /// Local time of the last record.
    last: Option<u64>,
}

impl Synchronizations {
    const EVERY: Duration = Duration::from_secs(60);

    fn after_update(&mut self, now: u64, utc_ns: u64, views: &ClockViews) {
        let Some(system) = &views.system else {
            return;
        };
        let synchronized_now =
            system.state == super::SyncState::Synchronized && system.since_update_ns == Some(0);
        let due = self
            .last
            .is_none_or(|last| now.saturating_sub(last) >= Self::EVERY.as_nanos() as u64);
        if !(synchronized_now && due) {
            return;
        }
        self.last = Some(now);
        let selected: Vec<&str> = views
            .sources
            .iter()
            .filter(|s| s.selection == Selection::Selected)
            .map(|s| s.name.as_str())
            .collect();
        tracing::info!(
            event = "clock_sync",
            utc_ns,
            offset_ns = system.offset_ns,
            frequency_ppm = system.frequency_ppm,
            bound_ns = system.bound_ns,
            selected = ?selected,
            "clock synchronized to the selected sources"
        );
    }
}

/// What the discipline task does first whenever it wakes: when the host was suspended since
/// `suspended` (see [`DisciplinedClock::after_suspend`]), the discipline starts again, the
/// new base is kept, its events are logged, and the wall-clock watch forgets the jump (the
/// wall clock moved on across the suspend while the local clock stood still: not a step).
fn resumed(
    clock: &DisciplinedClock,
    discipline: &mut Discipline,
    suspended: &mut u64,
    wall: &mut WallClockWatch,
    names: &[String],
) {
    let Some(now_suspended) = clock.after_suspend(discipline, *suspended) else {
        return;
    };
    *suspended = now_suspended;
    *wall = WallClockWatch::new();
    let utc = discipline.estimate(clock.local.now()).utc_ns;
    tell(clock, discipline, names, utc);
}

/// Logs the discipline's events since the last call and keeps them for the status page.
fn tell(clock: &DisciplinedClock, discipline: &mut Discipline, names: &[String], utc_ns: u64) {
    for event in discipline.drain_events() {
        log_event(&event, names, utc_ns);
        clock.record(describe(&event, names, utc_ns));
    }
}

/// The name the disciplined clock's events carry as their source.
const SOURCE: &str = "disciplined";

fn log_event(event: &Event, names: &[String], utc_ns: u64) {
    let name = |id: &usize| names.get(*id).map(String::as_str).unwrap_or("?");
    match event {
        Event::Changed(change) => change.log(SOURCE, utc_ns),
        Event::SourceSelected { source } => tracing::info!(
            event = "source_selected",
            utc_ns,
            source = name(source),
            "source selected"
        ),
        Event::SourceRejected { source, selection } => tracing::warn!(
            event = "source_rejected",
            utc_ns,
            source = name(source),
            selection = selection.name(),
            "source rejected"
        ),
        Event::SourceReachable { source } => tracing::info!(
            event = "source_reachable",
            utc_ns,
            source = name(source),
            "source reachable"
        ),
        Event::SourceUnreachable { source } => tracing::warn!(
            event = "source_unreachable",
            utc_ns,
            source = name(source),
            "source unreachable"
        ),
        Event::StepDetected { step_ns, rounds } => tracing::error!(
            event = "step_detected",
            utc_ns,
            step_ns,
            rounds,
            "the selected sources stepped; not followed until confirmed"
        ),
        Event::StepAccepted {
            step_ns,
            confirmed_by,
        } => tracing::warn!(
            event = "step_accepted",
            utc_ns,
            step_ns,
            confirmed_by,
            "step followed"
        ),
        Event::StepAbandoned { step_ns } => tracing::warn!(
            event = "step_abandoned",
            utc_ns,
            step_ns,
            "step abandoned: the sources came back"
        ),
        Event::IndependentDisagrees { source, offset_ns } => tracing::error!(
            event = "independent_disagrees",
            utc_ns,
            source = name(source),
            offset_ns,
            "an independent reference disagrees with the selected sources; no time-stamps"
        ),
        Event::LeapScheduled { kind, utc_ns: at } => {
            tracing::warn!(event = "leap_scheduled", utc_ns, leap = ?kind, at_ns = at, "leap second scheduled")
        }
        Event::LeapApplied { kind, utc_ns: at } => {
            tracing::warn!(event = "leap_applied", utc_ns, leap = ?kind, at_ns = at, "leap second applied")
        }
        Event::LeapWithdrawn { kind, utc_ns: at } => {
            tracing::warn!(event = "leap_withdrawn", utc_ns, leap = ?kind, at_ns = at, "leap second withdrawn")
        }
        Event::SourceDependent { source, with } => match with.as_slice() {
            [] => tracing::info!(
                event = "source_dependent",
                utc_ns,
                source = name(source),
                "source independent of the others"
            ),
            with => tracing::warn!(
                event = "source_dependent",
                utc_ns,
                source = name(source),
                with = %with.iter().map(name).collect::<Vec<_>>().join(", "),
                "source takes its time from the same server as others: they count once"
            ),
        },
    }
}

/// The event in words, as the status page lists it (the log line carries the same facts).
fn describe(event: &Event, names: &[String], utc_ns: u64) -> ClockEvent {
    let name = |id: &usize| names.get(*id).map(String::as_str).unwrap_or("?");
    let secs = |ns: &i64| format!("{:+.6} s", *ns as f64 / 1e9);
    let (kind, level, text) = match event {
        Event::Changed(Change::Synchronized {
            offset_ns,
            bound_ns,
        }) => (
            "sync_acquired",
            EventLevel::Info,
            match offset_ns {
                Some(offset) => format!(
                    "clock synchronized: offset {}, bound {}",
                    secs(offset),
                    fmt_ns(*bound_ns)
                ),
                None => format!("clock synchronized: bound {}", fmt_ns(*bound_ns)),
            },
        ),
        Event::Changed(Change::Unsynchronized { reason }) => (
            "sync_lost",
            EventLevel::Error,
            format!("clock unsynchronized, no time-stamps: {reason}"),
        ),
        Event::Changed(Change::Holdover { reason }) => (
            "holdover",
            EventLevel::Warning,
            format!("clock in holdover: {reason}"),
        ),
        Event::SourceSelected { source } => (
            "source_selected",
            EventLevel::Info,
            format!("{} selected", name(source)),
        ),
        Event::SourceRejected { source, selection } => (
            "source_rejected",
            EventLevel::Warning,
            format!("{} rejected: {}", name(source), selection.name()),
        ),
        Event::SourceReachable { source } => (
            "source_reachable",
            EventLevel::Info,
            format!("{} reachable", name(source)),
        ),
        Event::SourceUnreachable { source } => (
            "source_unreachable",
            EventLevel::Warning,
            format!("{} unreachable", name(source)),
        ),
        Event::StepDetected { step_ns, rounds } => (
            "step_detected",
            EventLevel::Error,
            format!(
                "the selected sources stepped {}; not followed until confirmed ({rounds} rounds)",
                secs(step_ns)
            ),
        ),
        Event::StepAccepted {
            step_ns,
            confirmed_by,
        } => (
            "step_accepted",
            EventLevel::Warning,
            format!(
                "step of {} followed (confirmed by {confirmed_by})",
                secs(step_ns)
            ),
        ),
        Event::StepAbandoned { step_ns } => (
            "step_abandoned",
            EventLevel::Warning,
            format!("step of {} abandoned: the sources came back", secs(step_ns)),
        ),
        Event::IndependentDisagrees { source, offset_ns } => (
            "independent_disagrees",
            EventLevel::Error,
            format!(
                "{}, an independent reference, disagrees with the selected sources by {}: no time-stamps until they agree",
                name(source),
                secs(offset_ns)
            ),
        ),
        Event::LeapScheduled { kind, utc_ns: at } => (
            "leap_scheduled",
            EventLevel::Warning,
            format!(
                "leap second ({kind:?}) scheduled at {}",
                crate::protocol::GenTime::from_unix_ns(*at)
            ),
        ),
        Event::LeapApplied { kind, utc_ns: at } => (
            "leap_applied",
            EventLevel::Warning,
            format!(
                "leap second ({kind:?}) at {} applied",
                crate::protocol::GenTime::from_unix_ns(*at)
            ),
        ),
        Event::LeapWithdrawn { kind, utc_ns: at } => (
            "leap_withdrawn",
            EventLevel::Warning,
            format!(
                "leap second ({kind:?}) at {} withdrawn: the sources no longer announce it",
                crate::protocol::GenTime::from_unix_ns(*at)
            ),
        ),
        Event::SourceDependent { source, with } => match with.as_slice() {
            [] => (
                "source_dependent",
                EventLevel::Info,
                format!("{} is independent of the other sources", name(source)),
            ),
            with => (
                "source_dependent",
                EventLevel::Warning,
                format!(
                    "{} takes its time from the same server as {} (or from it, or it from \
                     them): they count once towards a majority",
                    name(source),
                    with.iter().map(name).collect::<Vec<_>>().join(", ")
                ),
            ),
        },
        Event::Changed(Change::AccuracyExceeded {
            bound_ns,
            accuracy_ns,
        }) => (
            "accuracy_exceeded",
            EventLevel::Error,
            format!(
                "error bound {} exceeds the declared accuracy {}: no time-stamps",
                fmt_ns(*bound_ns),
                fmt_ns(*accuracy_ns)
            ),
        ),
        Event::Changed(Change::AccuracyRegained {
            bound_ns,
            accuracy_ns,
        }) => (
            "accuracy_regained",
            EventLevel::Info,
            format!(
                "error bound {} within the declared accuracy {} again",
                fmt_ns(*bound_ns),
                fmt_ns(*accuracy_ns)
            ),
        ),
    };
    ClockEvent {
        utc_ns,
        kind,
        level,
        text,
    }
}

/// Like `chronyc tracking` followed by `chronyc sources`.
fn render(discipline: &Discipline, now: u64) -> String {
    let system = discipline.system_view(now);
    let mut s = String::new();
    let secs = |ns: i64| format!("{:+.9} s", ns as f64 / 1e9);
    let _ = writeln!(
        s,
        "State       : {} ({})",
        system.state.name(),
        system.reason
    );
    let _ = writeln!(
        s,
        "Offset      : {} (UTC − local clock)",
        system.offset_ns.map(secs).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "Frequency   : {}",
        system
            .frequency_ppm
            .map(|f| format!("{f:+.3} ppm"))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "Error bound : {}",
        system.bound_ns.map(fmt_ns).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        s,
        "Last update : {}",
        system
            .since_update_ns
            .map(|n| format!("{} ago", fmt_ns(n)))
            .unwrap_or_else(|| "never".into())
    );
    let _ = writeln!(
        s,
        "Pending step: {}",
        system
            .pending_step_ns
            .map(secs)
            .unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        s,
        "Leap        : {}",
        system
            .leap
            .map(|(k, at)| format!("{k:?} at {}", crate::protocol::GenTime::from_unix_ns(at)))
            .unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        s,
        "\n{:<28} {:>5} {:<12} {:>16} {:>12} {:>12} {:>8}",
        "Source", "Reach", "Selection", "Offset", "Delay", "Distance", "Age"
    );
    for v in discipline.source_views(now) {
        let _ = writeln!(
            s,
            "{:<28} {:>5o} {:<12} {:>16} {:>12} {:>12} {:>8}",
            v.name,
            v.reach,
            v.selection.name(),
            v.offset_ns.map(secs).unwrap_or_else(|| "-".into()),
            v.delay_ns.map(fmt_ns).unwrap_or_else(|| "-".into()),
            v.distance_ns.map(fmt_ns).unwrap_or_else(|| "-".into()),
            v.last_sample_age_ns
                .map(|a| format!("{} s", a / 1_000_000_000))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::discipline::{Leap, Sample, Selection};

    #[test]
    fn a_suspend_refuses_at_once_and_starts_the_discipline_again() {
        let asleep = Arc::new(AtomicU64::new(5_000_000_000));
        let local = LocalClock::new();
        let clock = DisciplinedClock::new(local, Duration::from_secs(1), Duration::from_secs(3), {
            let asleep = asleep.clone();
            Box::new(move || asleep.load(Ordering::Relaxed))
        });
        let specs = (0..3)
            .map(|i| SourceSpec {
                name: format!("ntp 127.0.0.{i}:123"),
                independent: false,
            })
            .collect();
        let mut discipline = Discipline::new(DisciplineConfig::default(), specs);
        let sample = |at| Sample {
            at,
            offset: 0,
            delay: 400_000,
            root_delay: 0,
            root_dispersion: 600_000,
            precision: 1_000,
            leap: Leap::None,
            lineage: Default::default(),
        };
        let now = local.now();
        for source in 0..3 {
            discipline.sample(source, sample(now - 1_000_000));
        }
        discipline.update(now);
        discipline.drain_events();
        let base = 5_000_000_000;
        clock.publish(discipline.snapshot(), base);
        assert_eq!(clock.read().state, SyncState::Synchronized);
        assert_eq!(clock.after_suspend(&mut discipline, base), None);

        // An hour asleep: the snapshot is void from the resume on, before the discipline task
        // has run.
        asleep.fetch_add(3_600_000_000_000, Ordering::Relaxed);
        let reading = clock.read();
        assert_eq!(reading.state, SyncState::Unsynchronized);
        assert_eq!(reading.bound_ns, u64::MAX);
        assert!(reading.reason.contains("suspended"), "{}", reading.reason);

        // The discipline task starts the discipline again and tells the loss of sync.
        assert_eq!(
            clock.after_suspend(&mut discipline, base),
            Some(3_605_000_000_000)
        );
        let events = discipline.drain_events();
        assert!(
            matches!(&events[..], [Event::Changed(Change::Unsynchronized { reason })]
                if reason.contains("suspended for 3600.0 s")),
            "{events:?}"
        );
        let reading = clock.read();
        assert_eq!(reading.state, SyncState::Unsynchronized);
        assert!(reading.reason.contains("suspended"), "{}", reading.reason);
        // Samples dated within the grace after the resume are taken as from before it.
        let now = local.now();
        for source in 0..3 {
            discipline.sample(source, sample(now + 1_000_000_000));
        }
        discipline.update(now + 1_000_000_000);
        assert_eq!(
            discipline.estimate(now).state,
            SyncState::Unsynchronized,
            "synchronized on samples from within the grace"
        );
        assert!(clock
            .recent_events()
            .iter()
            .any(|e| e.kind == "host_suspended" && e.text.contains("3600.0 s")));
        // Nothing more until the next suspend.
        assert_eq!(
            clock.after_suspend(&mut discipline, 3_605_000_000_000),
            None
        );
    }

    #[test]
    fn events_are_described_and_the_ring_is_bounded() {
        let names = vec![
            "ntp 127.0.0.1:123".to_string(),
            "gpsd 127.0.0.1:2947".into(),
        ];
        let e = describe(
            &Event::SourceRejected {
                source: 0,
                selection: Selection::Falseticker,
            },
            &names,
            42,
        );
        assert_eq!(
            (e.utc_ns, e.kind, e.level),
            (42, "source_rejected", EventLevel::Warning)
        );
        assert_eq!(e.text, "ntp 127.0.0.1:123 rejected: falseticker");
        let e = describe(
            &Event::StepDetected {
                step_ns: -1_500_000_000,
                rounds: 4,
            },
            &names,
            1,
        );
        assert_eq!(e.level, EventLevel::Error);
        assert!(e.text.contains("-1.500000 s"), "{}", e.text);
        assert!(describe(&Event::SourceSelected { source: 9 }, &names, 0)
            .text
            .starts_with('?'));

        let mut ring = VecDeque::new();
        for i in 0..(RECENT_EVENTS as u64 + 7) {
            keep(
                &mut ring,
                describe(&Event::SourceSelected { source: 1 }, &names, i),
            );
        }
        assert_eq!(ring.len(), RECENT_EVENTS);
        assert_eq!(ring.front().unwrap().utc_ns, 7);
        assert_eq!(ring.back().unwrap().utc_ns, RECENT_EVENTS as u64 + 6);
    }
}
