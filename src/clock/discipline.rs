//! The clock discipline: reference samples in, an estimate of UTC with an error bound out.
//!
//! Pure and sans-IO, in the manner of ntpd-rs's `ntp-proto`: the caller owns sockets, timers
//! and the local clock, and passes every time in as a value. Times are *local* nanoseconds: a
//! clock that never steps and that nothing slews (the adapters use `CLOCK_MONOTONIC_RAW`
//! anchored once to the Unix epoch, see `local.rs`). The discipline never changes that clock; it models UTC on top of it:
//!
//! ```text
//! UTC(t) = t + offset(t),   offset(t) = offset_u + freq · (t − t_u),
//! bound(t) = bound_u + (PHI + δfreq) · (t − t_u)   (t_u: the last accepted update,
//!                                                   δfreq: the frequency's uncertainty)
//! ```
//!
//! `ALGORITHM.md` beside this file describes the steps and how they differ from chrony and
//! ntpd-rs; the tests at the end feed it simulated references.

use std::collections::VecDeque;

use chrono::{DateTime, Datelike, NaiveDate};

use super::{Change, SyncState};

const NS_PER_S: u64 = 1_000_000_000;

/// A leap second announced by a reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leap {
    /// The reference says no leap second is pending.
    None,
    /// The reference carries no leap-second information (GPS through gpsd, NMEA): it abstains
    /// from the vote.
    Unknown,
    /// The last minute of the month has 61 seconds.
    Insert,
    /// The last minute of the month has 59 seconds.
    Delete,
}

/// One measurement of a reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Local time of the measurement (for NTP, the midpoint of the exchange).
    pub at: u64,
    /// Reference UTC minus local time, in nanoseconds.
    pub offset: i64,
    /// Round-trip delay of the exchange (0 for a local reference such as PPS).
    pub delay: u64,
    /// The reference's own distance to UTC: root delay and root dispersion (NTP).
    pub root_delay: u64,
    pub root_dispersion: u64,
    /// The reference's reading resolution, or the precision configured for it.
    pub precision: u64,
    pub leap: Leap,
    /// Where an NTP server's time comes from (none for a local reference).
    pub lineage: Lineage,
}

/// Where an NTP server's time comes from, as its reply tells: sources that take their time
/// from one server are not independent of each other, and count once towards a majority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    /// The server's IPv4 address, as queried: a server synchronized to it names it as its
    /// reference ID.
    pub address: Option<[u8; 4]>,
    /// The reference ID of a server synchronized to another (stratum 2 and up): that server's
    /// IPv4 address, or the first octets of a hash of its IPv6 address.
    pub upstream: Option<[u8; 4]>,
}

/// Whether a reference ID can name an upstream server: not a reference clock's name (capital
/// letters and digits, padded with zeros: `GPS`, `PPS`, `LOCL`, `PHC0`, which some servers
/// report at stratum 2 and up), nor in `0.0.0.0/8` or a loopback address (chrony's `local`
/// reports 127.127.1.1, ntpd's orphan mode a loopback address).
fn names_a_server(id: [u8; 4]) -> bool {
    let len = id.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let clock_name = len > 0
        && id[0].is_ascii_uppercase()
        && id[..len]
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    !(clock_name || id[0] == 0 || id[0] == 127)
}

/// What a refusal's reason adds where `sources` are fewer `votes` (some take their time from
/// the same server as another).
fn dependents_note(sources: usize, votes: usize) -> String {
    match sources - votes {
        0 => String::new(),
        n => format!(" ({n} more take their time from the same server as another)"),
    }
}

/// Whether a reference ID is an address of a private network (RFC 1918, shared address space,
/// link-local), which unrelated operators' internal servers share.
fn private(id: [u8; 4]) -> bool {
    matches!(id, [10, ..] | [192, 168, ..] | [169, 254, ..])
        || (id[0] == 172 && (16..32).contains(&id[1]))
        || (id[0] == 100 && (64..128).contains(&id[1]))
}

/// The largest offset a sample may claim: about 73 years, small enough that the difference
/// of two offsets never overflows. (NTP's arithmetic folds offsets beyond 2^31 s, 68 years,
/// into the other sign: the local clock never starts before 2020, `local::start_at`, so
/// that none is that large before 2088.)
pub const MAX_OFFSET_NS: u64 = 1 << 61;
/// The largest distance a sample may claim before ageing: RFC 5905's MAXDISP (16 s). A sample
/// that vouches for nothing better than that says nothing about a clock that must hold 1 s.
pub const MAX_DISTANCE_NS: u64 = 16 * NS_PER_S;

impl Sample {
    /// `(delay + root delay)/2 + root dispersion + precision`, saturating.
    pub fn static_distance(&self) -> u64 {
        (self.delay.saturating_add(self.root_delay) / 2)
            .saturating_add(self.root_dispersion)
            .saturating_add(self.precision)
    }

    /// Whether the sample is a measurement at all: an offset and a distance within
    /// [`MAX_OFFSET_NS`] and [`MAX_DISTANCE_NS`]. Adapters drop other samples (a hostile
    /// server's precision of 2^40 s, a PPS report dated in the year 2262) and the discipline
    /// counts them as missed polls.
    pub fn is_plausible(&self) -> bool {
        self.offset.unsigned_abs() <= MAX_OFFSET_NS
            && self.static_distance() <= MAX_DISTANCE_NS
            && self.at <= i64::MAX as u64
    }
}

#[derive(Clone, Debug)]
pub struct DisciplineConfig {
    /// Agreeing sources needed to synchronize (besides a strict majority of the configured
    /// sources).
    pub min_agreeing: usize,
    /// The drift rate the bound grows at between updates (PHI), in parts per million.
    pub max_drift_ppm: f64,
    /// Rounds a step of the selected sources must persist before it is followed, unless an
    /// independent reference agrees at once.
    pub step_confirm_rounds: u32,
    /// Samples older than this do not count: their source is unusable.
    pub max_sample_age_ns: u64,
    /// Samples kept per source for the minimum-delay filter.
    pub filter_len: usize,
    /// The accuracy the TSA declares: the bound crossing it (issuing stops or resumes) is an
    /// event. `None`: no such events.
    pub declared_accuracy_ns: Option<u64>,
}

impl Default for DisciplineConfig {
    fn default() -> Self {
        Self {
            min_agreeing: 3,
            max_drift_ppm: 15.0,
            step_confirm_rounds: 4,
            max_sample_age_ns: 300 * NS_PER_S,
            filter_len: 8,
            declared_accuracy_ns: None,
        }
    }
}

/// A configured reference.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    /// A reference independent of the network (GPS): its agreement confirms a step at once,
    /// its disagreement keeps a step from being confirmed by rounds alone, and its interval
    /// missing the selected sources' combined one for a second update stops issuance.
    pub independent: bool,
}

/// What the last selection made of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Selection {
    /// No fresh sample.
    Unusable,
    /// Its root distance exceeds the declared accuracy: kept out of the selection, whose
    /// bound it would widen past what tokens may state (it still counts among the
    /// configured sources, so a majority is as hard to reach).
    TooFar,
    /// Usable, but no majority could be formed.
    Unselected,
    /// Outside the majority's intersection.
    Falseticker,
    /// Part of the majority; combined into the system offset.
    Selected,
}

impl Selection {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unusable => "unusable",
            Self::TooFar => "too_far",
            Self::Unselected => "unselected",
            Self::Falseticker => "falseticker",
            Self::Selected => "selected",
        }
    }
}

/// Something worth a log line (ETSI EN 319 421 asks for every sync, loss of sync and leap).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A change of whether tokens can be issued: the state the issuing path sees, or the bound
    /// against the declared accuracy.
    Changed(Change),
    SourceSelected {
        source: usize,
    },
    SourceRejected {
        source: usize,
        selection: Selection,
    },
    SourceReachable {
        source: usize,
    },
    SourceUnreachable {
        source: usize,
    },
    StepDetected {
        step_ns: i64,
        rounds: u32,
    },
    StepAccepted {
        step_ns: i64,
        confirmed_by: &'static str,
    },
    StepAbandoned {
        step_ns: i64,
    },
    /// An independent reference kept disagreeing with the selected sources (its interval does
    /// not meet their combined one): no stamps until they agree again.
    IndependentDisagrees {
        source: usize,
        offset_ns: i64,
    },
    LeapScheduled {
        kind: Leap,
        utc_ns: u64,
    },
    /// Applied at the first update after the leap: `utc_ns` is the leap's instant.
    LeapApplied {
        kind: Leap,
        utc_ns: u64,
    },
    /// A leap scheduled and not applied yet, which a majority of the sources no longer
    /// announces.
    LeapWithdrawn {
        kind: Leap,
        utc_ns: u64,
    },
    /// The sources the source takes its time from one server with changed: they count once
    /// towards a majority (`with` empty: it is independent of the others).
    SourceDependent {
        source: usize,
        with: Vec<usize>,
    },
}

/// The estimate at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub utc_ns: u64,
    pub bound_ns: u64,
    pub state: SyncState,
    pub reason: std::sync::Arc<str>,
}

/// A source's view for operators (like `chronyc sources`).
#[derive(Clone, Debug, PartialEq)]
pub struct SourceView {
    pub name: String,
    pub independent: bool,
    /// The last eight polls, newest in the lowest bit (NTP's reach register).
    pub reach: u8,
    pub selection: Selection,
    /// Filtered offset, delay and root distance, when a fresh sample exists.
    pub offset_ns: Option<i64>,
    pub delay_ns: Option<u64>,
    pub distance_ns: Option<u64>,
    pub last_sample_age_ns: Option<u64>,
}

/// The system's view (like `chronyc tracking`).
#[derive(Clone, Debug, PartialEq)]
pub struct SystemView {
    pub state: SyncState,
    pub reason: String,
    pub offset_ns: Option<i64>,
    pub frequency_ppm: Option<f64>,
    pub bound_ns: Option<u64>,
    pub since_update_ns: Option<u64>,
    pub pending_step_ns: Option<i64>,
    pub leap: Option<(Leap, u64)>,
}

struct Source {
    spec: SourceSpec,
    samples: VecDeque<Sample>,
    reach: u8,
    selection: Selection,
    /// Where its time comes from, as its last sample told.
    lineage: Lineage,
    /// The other sources that take their time from the same server (see
    /// [`Discipline::group_by_lineage`]); it counts once with them towards a majority.
    peers: Vec<usize>,
}

/// One source's interval at the time of an update.
#[derive(Clone, Copy, Debug)]
struct Interval {
    source: usize,
    offset: i64,
    distance: u64,
    leap: Leap,
    /// When the source's newest sample was measured (local time): whether it answered since
    /// a step's last confirmation round.
    newest_at: u64,
    /// Its distance exceeds the declared accuracy ([`Selection::TooFar`]): left out of the
    /// selection, the combination and the leap vote, still heard as a contradiction or an
    /// independent reference's veto.
    too_far: bool,
}

impl Interval {
    fn reach(&self) -> i64 {
        i64::try_from(self.distance).unwrap_or(i64::MAX)
    }
    fn low(&self) -> i64 {
        self.offset.saturating_sub(self.reach())
    }
    fn high(&self) -> i64 {
        self.offset.saturating_add(self.reach())
    }
}

/// The last accepted update.
#[derive(Clone, Copy, Debug)]
struct Model {
    at: u64,
    offset: i64,
    /// Rate of the offset (UTC runs faster than the local clock by this fraction).
    freq: f64,
    /// How far the true rate (averaged over the fit) can be from `freq`: see
    /// [`fit_frequency`].
    freq_unc: f64,
    bound: u64,
}

#[derive(Clone, Copy)]
struct PendingStep {
    offset: i64,
    bound: u64,
    at: u64,
    step: i64,
    rounds: u32,
}

#[derive(Clone, Copy, Debug)]
struct ScheduledLeap {
    kind: Leap,
    /// UTC of the leap: the midnight that ends the month.
    utc_ns: u64,
    applied: bool,
    /// Whether an update after the leap was accepted: the sources took it as the model did
    /// (or a step that undid it was confirmed). Until then the model's shift (the
    /// prediction's before the leap is applied, the model's after) rests on the announcement
    /// alone, and no stamp is given past the leap (not even in holdover).
    confirmed: bool,
}

/// Offsets of the last accepted updates, for the frequency estimate.
const HISTORY: usize = 16;
/// What an oscillator can plausibly do (NTP's MAXFREQ): before any fit, the frequency is
/// taken as 0 ± this.
pub(crate) const MAX_FREQ: f64 = 500e-6;

pub struct Discipline {
    config: DisciplineConfig,
    sources: Vec<Source>,
    model: Option<Model>,
    /// Accepted updates: local time, offset and bound.
    history: VecDeque<(u64, i64, u64)>,
    pending: Option<PendingStep>,
    state: SyncState,
    reason: String,
    leap: Option<ScheduledLeap>,
    /// The midnight (UTC) for which the sources disagree whether a leap comes.
    leap_uncertain: Option<u64>,
    /// The uncertain leap's midnight once the samples from before it were dropped
    /// ([`Discipline::past_uncertain_leap`]): only an update after that settles it.
    uncertain_cut: Option<u64>,
    /// Consecutive updates in which a reachable independent reference disagreed with the
    /// selected sources; see [`Discipline::independent_dissent`].
    dissent: u32,
    events: Vec<Event>,
    /// The state (as [`Discipline::estimate`] gives it) and whether the bound was within the
    /// declared accuracy, as last told by an event.
    announced: (SyncState, bool),
    /// Samples measured before this local time are void ([`Discipline::restart`]).
    not_before: u64,
}

impl Discipline {
    pub fn new(config: DisciplineConfig, sources: Vec<SourceSpec>) -> Self {
        Self {
            config,
            sources: sources
                .into_iter()
                .map(|spec| Source {
                    spec,
                    samples: VecDeque::new(),
                    reach: 0,
                    selection: Selection::Unusable,
                    lineage: Lineage::default(),
                    peers: Vec::new(),
                })
                .collect(),
            model: None,
            history: VecDeque::new(),
            pending: None,
            state: SyncState::Unsynchronized,
            reason: "no update yet".into(),
            leap: None,
            leap_uncertain: None,
            uncertain_cut: None,
            dissent: 0,
            events: Vec::new(),
            announced: (SyncState::Unsynchronized, true),
            not_before: 0,
        }
    }

    /// Starts again as at start, with `reason` as the state's: for when the local clock stood
    /// still while UTC went on (the host was suspended), which voids the model, every sample,
    /// the frequency history and a step in progress, and any sample still to come that was
    /// measured before the local time `not_before`. What was announced is kept, so that the
    /// next [`Discipline::observe`] tells the loss of sync as any other change.
    pub fn restart(&mut self, not_before: u64, reason: String) {
        let specs = self.sources.iter().map(|s| s.spec.clone()).collect();
        let mut fresh = Self::new(self.config.clone(), specs);
        fresh.reason = reason;
        fresh.announced = self.announced;
        fresh.events = std::mem::take(&mut self.events);
        fresh.not_before = not_before;
        *self = fresh;
    }

    pub fn config(&self) -> &DisciplineConfig {
        &self.config
    }

    fn phi(&self) -> f64 {
        self.config.max_drift_ppm * 1e-6
    }

    /// Whether events wait to be drained ([`Discipline::drain_events`]).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// A poll of `source` answered with `sample`. An implausible sample (see
    /// [`Sample::is_plausible`]) counts as a missed poll.
    pub fn sample(&mut self, source: usize, sample: Sample) {
        if sample.at < self.not_before {
            return;
        }
        if !sample.is_plausible() {
            self.missed(source);
            return;
        }
        let src = &mut self.sources[source];
        if src.reach == 0 {
            self.events.push(Event::SourceReachable { source });
        }
        src.reach = (src.reach << 1) | 1;
        src.lineage = sample.lineage;
        src.samples.push_back(sample);
        while src.samples.len() > self.config.filter_len {
            src.samples.pop_front();
        }
    }

    /// A poll of `source` got no usable answer.
    pub fn missed(&mut self, source: usize) {
        let src = &mut self.sources[source];
        let was = src.reach;
        src.reach <<= 1;
        if was != 0 && src.reach == 0 {
            self.events.push(Event::SourceUnreachable { source });
        }
    }

    /// `source` will not answer for a long while (an NTP server's kiss-o'-death DENY or RSTR,
    /// after which it is asked again only hours later): unreachable
    /// now rather than after its reach register empties, so that its samples leave the
    /// selection at the next update (as an unreachable source's do).
    pub fn gone(&mut self, source: usize) {
        let src = &mut self.sources[source];
        let was = src.reach;
        src.reach = 0;
        if was != 0 {
            self.events.push(Event::SourceUnreachable { source });
        }
    }

    /// Takes the events since the last call.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Runs filter, selection, combination and the step guard at local time `now`; call it
    /// after each round of polls.
    pub fn update(&mut self, now: u64) {
        self.update_model(now);
        self.observe(now);
    }

    /// Emits one event for each change since the last one of the state that
    /// [`Discipline::estimate`] gives at `now` (synchronized, holdover, unsynchronized), and of
    /// whether the bound is within the declared accuracy while the state lets tokens be
    /// issued. [`Discipline::update`] calls it; between updates, call it at the times
    /// [`Discipline::next_change`] names, so that changes that need no update (silence, the
    /// bound growing, a leap second's window) are told when they happen.
    pub fn observe(&mut self, now: u64) {
        let estimate = self.estimate(now);
        let (was, was_within) = self.announced;
        let within = self
            .config
            .declared_accuracy_ns
            .is_none_or(|a| estimate.bound_ns <= a);
        if estimate.state != was {
            self.events.push(Event::Changed(match estimate.state {
                SyncState::Synchronized => Change::Synchronized {
                    offset_ns: Some(estimate.utc_ns as i64 - now as i64),
                    bound_ns: estimate.bound_ns,
                },
                SyncState::Holdover => Change::Holdover {
                    reason: estimate.reason.clone(),
                },
                SyncState::Unsynchronized => Change::Unsynchronized {
                    reason: estimate.reason.clone(),
                },
            }));
        }
        if let Some(accuracy_ns) = self.config.declared_accuracy_ns {
            // A state event that lets tokens be issued again implies the bound is within,
            // unless said otherwise.
            let was_within = was_within || was == SyncState::Unsynchronized;
            if estimate.state != SyncState::Unsynchronized && within != was_within {
                let bound_ns = estimate.bound_ns;
                self.events.push(Event::Changed(if within {
                    Change::AccuracyRegained {
                        bound_ns,
                        accuracy_ns,
                    }
                } else {
                    Change::AccuracyExceeded {
                        bound_ns,
                        accuracy_ns,
                    }
                }));
            }
        }
        self.announced = (estimate.state, within);
    }

    /// The next local time after `now` at which the estimate's state or the bound's standing
    /// against the declared accuracy can change without an update: the silence limit, the
    /// bound reaching the accuracy, the edges of a leap second's window. `None` when no such
    /// change is due.
    pub fn next_change(&self, now: u64) -> Option<u64> {
        let model = self.model?;
        let mut times = Vec::new();
        if self.state == SyncState::Synchronized {
            times.push(model.at + self.config.max_sample_age_ns + 1);
        }
        if let Some(accuracy) = self.config.declared_accuracy_ns {
            let rate = self.phi() + model.freq_unc;
            let elapsed = (accuracy.saturating_sub(model.bound) as f64 / rate) as u64;
            // Years away, or never: nothing to wake for.
            if model.bound <= accuracy && rate > 0.0 && elapsed < 1 << 58 {
                let mut t = model.at.saturating_add(elapsed);
                while self.predict(&model, t).1 <= accuracy {
                    t += 1 + ((t - model.at) >> 20);
                }
                times.push(t);
            }
        }
        let (offset, _) = self.predict(&model, now);
        let to_local = |utc: u64| utc.saturating_add_signed(-offset);
        let midnights = self
            .leap
            .filter(|l| !l.applied)
            .map(|l| (l.utc_ns, leap_shift(l.kind)))
            .into_iter()
            .chain(self.leap_uncertain.map(|m| (m, 0)));
        for (midnight, shift) in midnights {
            times.push(to_local(midnight - NS_PER_S));
            times.push(to_local(midnight + NS_PER_S));
            times.push(to_local(midnight + NS_PER_S).saturating_add_signed(-shift));
        }
        times.into_iter().filter(|&t| t > now).min()
    }

    /// Filter, selection, combination and the step guard.
    fn update_model(&mut self, now: u64) {
        self.apply_due_leap(now);
        self.past_uncertain_leap(now);
        let intervals = self.intervals(now);
        self.group_by_lineage();
        let near: Vec<Interval> = intervals.iter().filter(|i| !i.too_far).copied().collect();
        if self.votes(near.iter().map(|i| i.source)) < self.needed() {
            self.too_few(&intervals, now);
            return;
        }
        let Some(survivors) = self.select(&near) else {
            return;
        };
        let (offset, bound) = combine(&survivors);
        if self.independent_dissent(&intervals, now, offset, bound) {
            return;
        }
        self.vote_leap(&survivors, now, offset);
        self.guard_and_accept(now, offset, bound, &intervals, &survivors);
    }

    /// Per source: the minimum-delay sample among the fresh ones that agree with the newest
    /// sample, and its root distance. The newest sample defines the source's current
    /// timescale: older samples that disagree with it (the source stepped, or came back from
    /// a step) leave the filter, so that a step shows up at once and whole at the system
    /// level instead of as a jitter that widens every interval.
    fn intervals(&mut self, now: u64) -> Vec<Interval> {
        let phi = self.phi();
        let (freq, freq_unc) = self.frequency();
        let max_age = self.config.max_sample_age_ns;
        let declared = self.config.declared_accuracy_ns;
        // A sample carried from its time to `now`: its offset advanced at the model's
        // frequency, its distance grown by what that frequency and PHI can be wrong by.
        let carried = |s: &Sample| {
            let age = now.saturating_sub(s.at) as f64;
            let offset = s.offset.saturating_add((freq * age) as i64);
            let distance = s
                .static_distance()
                .saturating_add(((phi + freq_unc) * age).ceil() as u64);
            (offset, distance)
        };
        let offset = |s: &Sample| carried(s).0;
        let distance = |s: &Sample| carried(s).1;
        let apart = |a: i64, b: i64| (i128::from(a) - i128::from(b)).unsigned_abs();
        let mut intervals = Vec::new();
        let mut left_out = Vec::new();
        for (id, src) in self.sources.iter_mut().enumerate() {
            let newest = src.samples.back().copied();
            let fresh: Vec<&Sample> = match newest {
                Some(newest) if src.reach != 0 => src
                    .samples
                    .iter()
                    .filter(|s| s.at <= now && now - s.at <= max_age)
                    .filter(|s| {
                        apart(offset(s), offset(&newest))
                            <= u128::from(distance(s)) + u128::from(distance(&newest))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            // Minimum delay; among equal delays the newest.
            let Some(best) = fresh.iter().rev().min_by_key(|s| s.delay).copied() else {
                left_out.push((id, Selection::Unusable));
                continue;
            };
            let jitter = (fresh
                .iter()
                .map(|s| (apart(offset(s), offset(best)) as f64).powi(2))
                .sum::<f64>()
                / fresh.len() as f64)
                .sqrt();
            let distance = distance(best).saturating_add(jitter.ceil() as u64);
            // A source that cannot say the time within the declared accuracy (a server whose
            // upstream was lost hours ago, its dispersion grown) would, as a survivor, widen
            // the bound past it and stop every token.
            let too_far = declared.is_some_and(|a| distance > a);
            if too_far {
                left_out.push((id, Selection::TooFar));
            }
            intervals.push(Interval {
                source: id,
                offset: offset(best),
                distance,
                leap: best.leap,
                newest_at: newest.map_or(best.at, |n| n.at),
                too_far,
            });
        }
        for (source, selection) in left_out {
            self.set_selection(source, selection);
        }
        intervals
    }

    /// Sets what the selection made of a source; a change is an event: selected, or rejected
    /// and why (unusable, too far, unselected, falseticker).
    fn set_selection(&mut self, source: usize, selection: Selection) {
        let src = &mut self.sources[source];
        if src.selection != selection {
            src.selection = selection;
            self.events.push(match selection {
                Selection::Selected => Event::SourceSelected { source },
                other => Event::SourceRejected {
                    source,
                    selection: other,
                },
            });
        }
    }

    /// Groups the sources that take their time from one server, from the lineage their last
    /// samples told: one synchronized to another configured server (its reference ID is that
    /// server's address), and those synchronized to the same upstream server (one that is
    /// not on a private network, where unrelated operators' internal servers share
    /// addresses). A group counts once towards a majority: three configured servers of which
    /// two follow the third are one source, and a fault of that one would otherwise carry the
    /// majority (and confirm its step by persisting). Reference IDs that name no server are
    /// never grouped on: a reference clock's (`GPS`, `LOCL`, at any stratum), a loopback
    /// address (chrony's `local`, ntpd's orphan mode), `0.0.0.0`. A change of a source's group
    /// is an event.
    fn group_by_lineage(&mut self) {
        let lineage: Vec<Lineage> = self.sources.iter().map(|s| s.lineage).collect();
        let mut root: Vec<usize> = (0..lineage.len()).collect();
        fn find(root: &mut [usize], mut i: usize) -> usize {
            while root[i] != i {
                root[i] = root[root[i]];
                i = root[i];
            }
            i
        }
        for (i, a) in lineage.iter().enumerate() {
            let Some(upstream) = a.upstream.filter(|u| names_a_server(*u)) else {
                continue;
            };
            for (j, b) in lineage.iter().enumerate() {
                let follows = b.address == Some(upstream);
                let shares = b.upstream == Some(upstream) && !private(upstream);
                if i != j && (follows || shares) {
                    let (ri, rj) = (find(&mut root, i), find(&mut root, j));
                    root[ri.max(rj)] = ri.min(rj);
                }
            }
        }
        let roots: Vec<usize> = (0..lineage.len()).map(|i| find(&mut root, i)).collect();
        for i in 0..self.sources.len() {
            let peers: Vec<usize> = (0..roots.len())
                .filter(|&j| j != i && roots[j] == roots[i])
                .collect();
            if self.sources[i].peers != peers {
                self.sources[i].peers = peers.clone();
                self.events.push(Event::SourceDependent {
                    source: i,
                    with: peers,
                });
            }
        }
    }

    /// The group of a source: the lowest of those that take their time from one server.
    fn group_of(&self, source: usize) -> usize {
        self.sources[source]
            .peers
            .first()
            .map_or(source, |&p| p.min(source))
    }

    /// How many votes `sources` are: those that take their time from one server count once.
    fn votes(&self, sources: impl Iterator<Item = usize>) -> usize {
        let mut groups: Vec<usize> = sources.map(|i| self.group_of(i)).collect();
        groups.sort_unstable();
        groups.dedup();
        groups.len()
    }

    /// Agreeing sources needed to select: at least `min_agreeing` and a strict majority of the
    /// *configured* sources. A majority of those that answer would let an attacker who
    /// silences honest sources (blocks their packets) hand the clock to a minority of liars.
    fn needed(&self) -> usize {
        self.config.min_agreeing.max(self.sources.len() / 2 + 1)
    }

    /// Interval intersection (Marzullo): the largest set of sources that share a common
    /// offset. It must be a strict majority of the configured sources and at least
    /// `min_agreeing`; otherwise the sources dispute the time, nothing is selected and the
    /// state is unsynchronized.
    fn select(&mut self, intervals: &[Interval]) -> Option<Vec<Interval>> {
        let mut edges: Vec<(i64, i32)> = intervals
            .iter()
            .flat_map(|i| [(i.low(), 1), (i.high(), -1)])
            .collect();
        // At equal values, openings before closings: touching intervals agree.
        edges.sort_by_key(|&(value, kind)| (value, -kind));
        let (mut count, mut best, mut region) = (0, 0, (0i64, 0i64));
        for window in 0..edges.len() {
            count += edges[window].1;
            if count > best {
                best = count;
                let next = edges.get(window + 1).map_or(edges[window].0, |e| e.0);
                region = (edges[window].0, next);
            }
        }
        let survivors: Vec<Interval> = intervals
            .iter()
            .filter(|i| i.low() <= region.0 && region.1 <= i.high())
            .copied()
            .collect();
        // Those that take their time from one server count once.
        let agreeing = self.votes(survivors.iter().map(|i| i.source));
        let needed = self.needed();
        if agreeing < needed {
            for i in intervals {
                self.set_selection(i.source, Selection::Unselected);
            }
            let dependent = dependents_note(survivors.len(), agreeing);
            self.set_state(
                SyncState::Unsynchronized,
                format!(
                    "only {agreeing} of {} usable sources agree{dependent}; {needed} needed ({} \
                     configured)",
                    intervals.len(),
                    self.sources.len()
                ),
            );
            return None;
        }
        for i in intervals {
            let selection = if survivors.iter().any(|s| s.source == i.source) {
                Selection::Selected
            } else {
                Selection::Falseticker
            };
            self.set_selection(i.source, selection);
        }
        Some(survivors)
    }

    /// Whether an independent reference (GPS) keeps the combined offset from being used. A
    /// majority of network sources that moves slowly passes the step guard at every update;
    /// an independent reference that is reachable and whose interval does not meet the
    /// combined one (`offset ± bound`) says the majority is wrong, or it is, and the clock
    /// cannot tell which. One such update is tolerated (not taken into the model, the state
    /// kept, unless the offset is a step, which the step guard holds); from the second in a
    /// row the state is unsynchronized, until an update in which the reachable independent
    /// references agree. Updates in which none is reachable neither end nor extend the dissent.
    fn independent_dissent(
        &mut self,
        intervals: &[Interval],
        now: u64,
        offset: i64,
        bound: u64,
    ) -> bool {
        let reach = i64::try_from(bound).unwrap_or(i64::MAX);
        let (low, high) = (offset.saturating_sub(reach), offset.saturating_add(reach));
        let mut independent = intervals
            .iter()
            .filter(|i| self.sources[i.source].spec.independent)
            .peekable();
        if independent.peek().is_none() {
            if self.dissent >= 2 {
                self.set_state(
                    SyncState::Unsynchronized,
                    "an independent reference disagreed with the selected sources and has not \
                     been reachable since"
                        .into(),
                );
                return true;
            }
            return false;
        }
        let Some(dissenter) = independent.find(|i| i.high() < low || i.low() > high) else {
            self.dissent = 0;
            return false;
        };
        let (source, by) = (dissenter.source, dissenter.offset.saturating_sub(offset));
        self.dissent = self.dissent.saturating_add(1);
        let name = &self.sources[source].spec.name;
        if self.dissent >= 2 {
            if self.dissent == 2 {
                self.events.push(Event::IndependentDisagrees {
                    source,
                    offset_ns: by,
                });
            }
            self.set_state(
                SyncState::Unsynchronized,
                format!(
                    "{name}, an independent reference, disagrees with the selected sources by \
                     {:+.6} s beyond both intervals ({} disagreeing updates)",
                    by as f64 / 1e9,
                    self.dissent
                ),
            );
            return true;
        }
        match self.model {
            None => {
                self.set_state(
                    SyncState::Unsynchronized,
                    format!(
                        "{name}, an independent reference, disagrees with the selected sources \
                         by {:+.6} s beyond both intervals",
                        by as f64 / 1e9
                    ),
                );
                true
            }
            // A step: the step guard holds it (an independent reference that contradicts
            // it keeps anything from confirming it).
            Some(model) => !self.is_step(&model, now, offset, bound),
        }
    }

    /// Whether `offset` (with its `bound`) at `now` leaves the model's prediction by more than
    /// the two bounds together.
    fn is_step(&self, model: &Model, now: u64, offset: i64, bound: u64) -> bool {
        let (predicted, predicted_bound) = self.predict(model, now);
        offset.saturating_sub(predicted).unsigned_abs() > predicted_bound.saturating_add(bound)
    }

    /// Accepts the combined offset unless it steps away from the model by more than both
    /// bounds together; a step is followed only once confirmed.
    fn guard_and_accept(
        &mut self,
        now: u64,
        offset: i64,
        bound: u64,
        intervals: &[Interval],
        survivors: &[Interval],
    ) {
        let Some(model) = self.model else {
            self.accept(now, offset, bound, None);
            self.set_state(SyncState::Synchronized, "selected sources agree".into());
            return;
        };
        let (predicted, predicted_bound) = self.predict(&model, now);
        let step = offset.saturating_sub(predicted);
        if step.unsigned_abs() <= predicted_bound.saturating_add(bound) {
            if let Some(p) = self.pending.take() {
                self.events.push(Event::StepAbandoned { step_ns: p.step });
            }
            self.accept(now, offset, bound, Some(model));
            self.set_state(SyncState::Synchronized, "selected sources agree".into());
            return;
        }

        let phi = self.phi();
        // A round counts only where as many of the survivors as a selection needs answered
        // since the last one: the same samples, carried on until they age out, are no
        // persistence (one forged reply from each of a majority, then silence, would
        // otherwise confirm a step by itself).
        let needed = self.needed();
        let answered_since = |t: u64| {
            self.votes(
                survivors
                    .iter()
                    .filter(|s| s.newest_at > t)
                    .map(|s| s.source),
            )
        };
        // A pending step whose last round is older than any usable sample starts over.
        let max_age = self.config.max_sample_age_ns;
        let pending = match self.pending.filter(|p| now.saturating_sub(p.at) <= max_age) {
            Some(p) if answered_since(p.at) < needed => p,
            Some(p) => {
                // The offset moves by the oscillator's frequency between rounds (the raw
                // clock is never corrected): 3.2 ms a 16 s poll at 200 ppm.
                let elapsed = (now - p.at) as f64;
                let expected = p.offset.saturating_add((model.freq * elapsed) as i64);
                let drift = ((phi + model.freq_unc) * elapsed) as u64;
                let same = offset.abs_diff(expected)
                    <= p.bound.saturating_add(bound).saturating_add(drift);
                PendingStep {
                    offset,
                    bound,
                    at: now,
                    step,
                    rounds: if same { p.rounds + 1 } else { 1 },
                }
            }
            None => PendingStep {
                offset,
                bound,
                at: now,
                step,
                rounds: 1,
            },
        };
        let new_round = self.pending.is_none_or(|p| p.at != pending.at);
        let rounds = pending.rounds;
        self.pending = Some(pending);
        let independent = |i: &Interval| self.sources[i.source].spec.independent;
        // A reachable independent reference whose interval does not meet the stepped offset
        // (`offset ± bound`), too far for the selection or not, contradicts the step: nothing
        // confirms it then. One that meets it (it moved too) contradicts nothing.
        let reach = i64::try_from(bound).unwrap_or(i64::MAX);
        let (low, high) = (offset.saturating_sub(reach), offset.saturating_add(reach));
        let contradicted = intervals
            .iter()
            .any(|i| independent(i) && (i.high() < low || i.low() > high));
        let confirmed_by = if contradicted {
            None
        } else if survivors.iter().any(independent) {
            Some("an independent reference")
        } else if new_round && rounds >= self.config.step_confirm_rounds {
            Some("persistence over the confirmation rounds")
        } else {
            None
        };
        match confirmed_by {
            Some(by) => {
                self.pending = None;
                // The oscillator did not change: keep its frequency, restart the history.
                self.history.clear();
                self.accept(now, offset, bound, Some(model));
                self.events.push(Event::StepAccepted {
                    step_ns: step,
                    confirmed_by: by,
                });
                self.set_state(SyncState::Synchronized, "step confirmed".into());
            }
            None => {
                if new_round {
                    self.events.push(Event::StepDetected {
                        step_ns: step,
                        rounds,
                    });
                }
                self.set_state(
                    SyncState::Unsynchronized,
                    format!(
                        "the selected sources stepped by {:+.6} s; not followed until confirmed ({rounds}/{} rounds)",
                        step as f64 / 1e9,
                        self.config.step_confirm_rounds
                    ),
                );
            }
        }
    }

    /// A new model through (`now`, `offset`) with its bound. The frequency is fitted to the
    /// accepted updates; with fewer than two it is the previous model's (after a step) or
    /// 0 ± [`MAX_FREQ`].
    fn accept(&mut self, now: u64, offset: i64, bound: u64, previous: Option<Model>) {
        if let Some(leap) = self.leap.as_mut().filter(|l| l.applied) {
            // Selected from samples after the leap (those before it were dropped with it).
            leap.confirmed = true;
        }
        self.history.push_back((now, offset, bound));
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let (freq, freq_unc) = fit_frequency(&self.history)
            .or(previous.map(|m| (m.freq, m.freq_unc)))
            .unwrap_or((0.0, MAX_FREQ));
        self.model = Some(Model {
            at: now,
            offset,
            freq,
            freq_unc,
            bound,
        });
    }

    /// The model's frequency and its uncertainty; 0 ± [`MAX_FREQ`] before any model.
    fn frequency(&self) -> (f64, f64) {
        self.model.map_or((0.0, MAX_FREQ), |m| (m.freq, m.freq_unc))
    }

    fn predict(&self, model: &Model, now: u64) -> (i64, u64) {
        predict(model, self.phi(), self.leap, now)
    }

    /// Fewer usable sources than [`Discipline::needed`] (`min_agreeing`, and a strict majority
    /// of the configured sources): none can be selected even if they all agreed. That is a loss of sources ([`Discipline::sources_lost`]), unless one of them
    /// contradicts the model the clock would hold over on: then one of the two is wrong and
    /// the clock cannot tell which, so it is unsynchronized.
    fn too_few(&mut self, intervals: &[Interval], now: u64) {
        if intervals.is_empty() {
            self.sources_lost("no source has a fresh sample".into());
            return;
        }
        let near = intervals.iter().filter(|i| !i.too_far);
        for i in near.clone() {
            self.set_selection(i.source, Selection::Unselected);
        }
        let count = near.clone().count();
        let votes = self.votes(near.map(|i| i.source));
        let dependent = dependents_note(count, votes);
        let usable = format!(
            "usable sources: {votes}{dependent}, needed: {} ({} configured)",
            self.needed(),
            self.sources.len()
        );
        match self.contradicting(intervals, now) {
            Some((source, by)) => self.set_state(
                SyncState::Unsynchronized,
                format!(
                    "{} contradicts the clock's model by {:+.6} s beyond both bounds ({usable})",
                    self.sources[source].spec.name,
                    by as f64 / 1e9
                ),
            ),
            None => self.sources_lost(format!("too few {usable}")),
        }
    }

    /// The first of `intervals` that cannot hold UTC if the model's prediction at `now`
    /// does (their intervals do not meet), and by how much the offsets differ.
    fn contradicting(&self, intervals: &[Interval], now: u64) -> Option<(usize, i64)> {
        let model = self.model.as_ref()?;
        let (predicted, bound) = self.predict(model, now);
        let (low, high) = (
            predicted.saturating_sub(bound as i64),
            predicted.saturating_add(bound as i64),
        );
        intervals
            .iter()
            .find(|i| i.high() < low || i.low() > high)
            .map(|i| (i.source, i.offset.saturating_sub(predicted)))
    }

    /// Too few sources left to select from. A clock that was synchronized goes on in
    /// holdover (its model alone, the bound growing); one that was not (never synchronized,
    /// or it stopped over disputing sources, an unconfirmed step or a leap second) stays
    /// unsynchronized until a majority selects again: losing sources never turns a refusal
    /// back into stamps.
    fn sources_lost(&mut self, reason: String) {
        if self.model.is_some() && self.state != SyncState::Unsynchronized {
            self.set_state(SyncState::Holdover, reason);
        } else {
            self.set_state(SyncState::Unsynchronized, reason);
        }
    }

    /// The state the last update left; its events come from [`Discipline::observe`].
    fn set_state(&mut self, state: SyncState, reason: String) {
        self.state = state;
        self.reason = reason;
    }

    /// The leap-second vote of the selected sources. Those without leap information
    /// ([`Leap::Unknown`]) abstain; a strict majority of the others decides. A leap is
    /// accepted only in June or December (leap seconds happen at the end of those months; an
    /// announcement in any other month is an error) and scheduled for the midnight that ends
    /// the month; a majority saying none withdraws one not yet applied; no informing source
    /// changes nothing. Without a majority on the last day of June or December, the leap is
    /// uncertain: the clock does not guess and refuses from 23:59:59 until an update after
    /// midnight has seen which way the sources went.
    fn vote_leap(&mut self, survivors: &[Interval], now: u64, offset: i64) {
        let utc = now.saturating_add_signed(offset);
        // Settled by the sources' time past it, and only once the samples from before it are
        // gone: the model's time can be a little behind theirs, and an update in between would
        // select samples from before midnight.
        if self.leap_uncertain.is_some_and(|midnight| {
            utc >= midnight + NS_PER_S && self.uncertain_cut == Some(midnight)
        }) {
            self.leap_uncertain = None;
        }
        // One vote per group of sources that take their time from one server.
        let mut groups = Vec::new();
        let informing: Vec<Leap> = survivors
            .iter()
            .filter(|i| i.leap != Leap::Unknown)
            .filter(|i| {
                let group = self.group_of(i.source);
                let first = !groups.contains(&group);
                groups.push(group);
                first
            })
            .map(|i| i.leap)
            .collect();
        if informing.is_empty() {
            return;
        }
        let votes = |kind| informing.iter().filter(|l| **l == kind).count();
        let decision = [Leap::None, Leap::Insert, Leap::Delete]
            .into_iter()
            .find(|&k| 2 * votes(k) > informing.len());
        let midnight = end_of_month(utc);
        let leap_month = matches!(DateTime::from_timestamp_nanos(utc as i64).month(), 6 | 12);
        match decision {
            Some(kind @ (Leap::Insert | Leap::Delete)) if leap_month => {
                self.leap_uncertain = None;
                let scheduled = self
                    .leap
                    .is_some_and(|l| l.kind == kind && l.utc_ns == midnight);
                if !scheduled && !self.leap.is_some_and(|l| l.applied) {
                    self.leap = Some(ScheduledLeap {
                        kind,
                        utc_ns: midnight,
                        applied: false,
                        confirmed: false,
                    });
                    self.events.push(Event::LeapScheduled {
                        kind,
                        utc_ns: midnight,
                    });
                }
            }
            Some(Leap::None) => {
                self.leap_uncertain = None;
                if let Some(leap) = self.leap.filter(|l| !l.applied) {
                    // Withdrawn before it happened.
                    self.leap = None;
                    self.events.push(Event::LeapWithdrawn {
                        kind: leap.kind,
                        utc_ns: leap.utc_ns,
                    });
                }
            }
            None if leap_month && midnight - utc <= 86_400 * NS_PER_S => {
                self.leap_uncertain = Some(midnight);
            }
            _ => {}
        }
    }

    /// Once an uncertain leap's midnight and the second after it (which an inserted leap
    /// repeats) have passed on the model's scale, samples taken before then are dropped: they
    /// cannot tell whether the sources took a leap, and, still fresh at the first update after
    /// it, they would agree with the unshifted model and settle the uncertainty (the clock a
    /// second off with a bound of milliseconds). Only samples from after it then decide.
    fn past_uncertain_leap(&mut self, now: u64) {
        let (Some(midnight), Some(model)) = (self.leap_uncertain, self.model) else {
            return;
        };
        let (offset, _) = predict(&model, self.phi(), None, now);
        let after = midnight + NS_PER_S;
        if (now as i64 + offset) as u64 >= after {
            for src in &mut self.sources {
                src.samples
                    .retain(|s| (s.at as i64 + offset) as u64 >= after);
            }
            self.uncertain_cut = Some(midnight);
        }
    }

    /// After the leap instant, the model's offset moves by the leap second, so that UTC
    /// repeats (or skips) it while the local clock runs on.
    fn apply_due_leap(&mut self, now: u64) {
        let (Some(mut leap), Some(mut model)) = (self.leap, self.model) else {
            return;
        };
        if leap.applied {
            // Forget it a day after it was confirmed, so that the next announcement can be
            // scheduled (unconfirmed, it keeps refusing stamps: forgotten, holdover would stamp
            // on the shifted model).
            let utc = (now as i64 + model.offset) as u64;
            if leap.confirmed && utc > leap.utc_ns + 86_400 * NS_PER_S {
                self.leap = None;
            }
            return;
        }
        // On the old scale: the prediction with the leap would already have taken an inserted
        // second off, and not see it due until a second later, after an update in that second
        // could have taken the new scale into the model (the leap then applied twice).
        let (offset, _) = predict(&model, self.phi(), None, now);
        if (now as i64 + offset) as u64 >= leap.utc_ns {
            let shift = leap_shift(leap.kind);
            model.offset += shift;
            for (_, o, _) in &mut self.history {
                *o += shift;
            }
            for src in &mut self.sources {
                // Samples from before the leap are on the old scale.
                src.samples
                    .retain(|s| (s.at as i64 + offset) as u64 >= leap.utc_ns);
            }
            leap.applied = true;
            self.leap = Some(leap);
            self.model = Some(model);
            self.events.push(Event::LeapApplied {
                kind: leap.kind,
                utc_ns: leap.utc_ns,
            });
        }
    }

    /// What the issuing path needs to compute estimates, without the sources: published
    /// after each update so that reading the time takes no lock on the discipline.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            model: self.model,
            phi: self.phi(),
            state: self.state,
            reason: self.reason.as_str().into(),
            leap: self.leap,
            leap_uncertain: self.leap_uncertain,
            max_sample_age_ns: self.config.max_sample_age_ns,
        }
    }

    /// UTC at local time `now`, with its bound and the state; see [`Snapshot::estimate`].
    pub fn estimate(&self, now: u64) -> Estimate {
        self.snapshot().estimate(now)
    }

    pub fn system_view(&self, now: u64) -> SystemView {
        let estimate = self.estimate(now);
        SystemView {
            state: estimate.state,
            reason: estimate.reason.to_string(),
            offset_ns: self.model.map(|m| self.predict(&m, now).0),
            frequency_ppm: self.model.map(|m| m.freq * 1e6),
            bound_ns: self.model.map(|_| estimate.bound_ns),
            since_update_ns: self.model.map(|m| now.saturating_sub(m.at)),
            pending_step_ns: self.pending.as_ref().map(|p| p.step),
            leap: self.leap.filter(|l| !l.applied).map(|l| (l.kind, l.utc_ns)),
        }
    }

    pub fn source_views(&self, now: u64) -> Vec<SourceView> {
        let rate = self.phi() + self.frequency().1;
        self.sources
            .iter()
            .map(|src| {
                let fresh = src
                    .samples
                    .iter()
                    .filter(|s| s.at <= now && now - s.at <= self.config.max_sample_age_ns)
                    .min_by_key(|s| s.delay);
                SourceView {
                    name: src.spec.name.clone(),
                    independent: src.spec.independent,
                    reach: src.reach,
                    selection: src.selection,
                    offset_ns: fresh.map(|s| s.offset),
                    delay_ns: fresh.map(|s| s.delay),
                    distance_ns: fresh.map(|s| {
                        s.static_distance()
                            .saturating_add((rate * (now - s.at) as f64) as u64)
                    }),
                    last_sample_age_ns: src.samples.back().map(|s| now.saturating_sub(s.at)),
                }
            })
            .collect()
    }
}

/// The published state of the discipline.
#[derive(Clone, Debug)]
pub struct Snapshot {
    model: Option<Model>,
    phi: f64,
    state: SyncState,
    reason: std::sync::Arc<str>,
    leap: Option<ScheduledLeap>,
    leap_uncertain: Option<u64>,
    max_sample_age_ns: u64,
}

impl Snapshot {
    /// Before any update: unsynchronized.
    pub fn initial() -> Self {
        Self {
            model: None,
            phi: 0.0,
            state: SyncState::Unsynchronized,
            reason: "no update yet".into(),
            leap: None,
            leap_uncertain: None,
            max_sample_age_ns: 0,
        }
    }

    /// UTC at local time `now`, with its bound and the state. Between updates the bound grows
    /// at PHI plus the frequency's uncertainty; with no update for longer than the sample age
    /// limit the state is holdover; from 23:59:59 before a scheduled leap until an update
    /// after it confirms it, and from 23:59:59 on before an uncertain one, the state is
    /// unsynchronized.
    pub fn estimate(&self, now: u64) -> Estimate {
        let Some(model) = self.model else {
            return Estimate {
                utc_ns: now,
                bound_ns: u64::MAX,
                state: SyncState::Unsynchronized,
                reason: self.reason.clone(),
            };
        };
        let (offset, bound) = predict(&model, self.phi, self.leap, now);
        let utc_ns = (now as i64 + offset) as u64;
        let mut estimate = Estimate {
            utc_ns,
            bound_ns: bound,
            state: self.state,
            reason: self.reason.clone(),
        };
        let silent = now.saturating_sub(model.at);
        if estimate.state == SyncState::Synchronized && silent > self.max_sample_age_ns {
            estimate.state = SyncState::Holdover;
            estimate.reason = format!("no update for {} s", silent / NS_PER_S).into();
        }
        if let Some(leap) = self.leap {
            if leap_window(leap.utc_ns, utc_ns) {
                estimate.state = SyncState::Unsynchronized;
                estimate.reason = "leap second: no stamps from 23:59:59 UTC until an update \
                                   after it confirms it"
                    .into();
            } else if !leap.confirmed && utc_ns >= leap.utc_ns {
                // Past the leap the model is shifted (by the prediction until the next update
                // applies it) on the announcement alone.
                estimate.state = SyncState::Unsynchronized;
                estimate.reason = "leap second: no stamps after it until an update confirms \
                                   that the sources took it"
                    .into();
            }
        }
        if let Some(midnight) = self.leap_uncertain {
            if utc_ns + NS_PER_S >= midnight {
                estimate.state = SyncState::Unsynchronized;
                estimate.reason = "leap second uncertain (the sources disagree): no stamps from \
                                   23:59:59 UTC until an update after midnight"
                    .into();
            }
        }
        estimate
    }
}

/// Offset and bound of `model` at `now`, a scheduled leap applied once due.
fn predict(model: &Model, phi: f64, leap: Option<ScheduledLeap>, now: u64) -> (i64, u64) {
    let elapsed = now.saturating_sub(model.at);
    let mut offset = model.offset + (model.freq * elapsed as f64) as i64;
    let bound = model
        .bound
        .saturating_add(((phi + model.freq_unc) * elapsed as f64).ceil() as u64);
    if let Some(leap) = leap {
        if !leap.applied && (now as i64 + offset) as u64 >= leap.utc_ns {
            offset += leap_shift(leap.kind);
        }
    }
    (offset, bound)
}

/// The survivors' offsets weighted by the inverse of their distance; the bound reaches the far
/// end of every survivor's interval, so it holds the truth if any one survivor is right.
fn combine(survivors: &[Interval]) -> (i64, u64) {
    let weight = |i: &Interval| 1.0 / (i.distance.max(1) as f64);
    let total: f64 = survivors.iter().map(weight).sum();
    let offset = survivors
        .iter()
        .map(|i| i.offset as f64 * weight(i))
        .sum::<f64>()
        / total;
    let offset = offset.round() as i64;
    let bound = survivors
        .iter()
        .map(|i| offset.abs_diff(i.offset).saturating_add(i.distance))
        .max()
        .unwrap_or(0);
    (offset, bound)
}

/// How much faster UTC runs than the local clock, and how wrong that can be: the
/// least-squares slope of the accepted offsets over local time, with an uncertainty that
/// holds whenever the bounds of the two ends of the fit held. The true offsets at the ends lie
/// within `o₀ ± b₀` and `oₙ ± bₙ`, so the true rate averaged over the fit lies within
/// `(oₙ − o₀)/span ± (b₀ + bₙ)/span`; the slope is off that centre by its own distance to it.
/// The result is then narrowed to what an oscillator can do (±[`MAX_FREQ`]) when the two
/// agree. `None` with fewer than two updates apart in time.
fn fit_frequency(history: &VecDeque<(u64, i64, u64)>) -> Option<(f64, f64)> {
    let (&(t0, o0, b0), &(tn, on, bn)) = (history.front()?, history.back()?);
    if tn <= t0 {
        return None;
    }
    let n = history.len() as f64;
    let points: Vec<(f64, f64)> = history
        .iter()
        .map(|&(t, o, _)| ((t - t0) as f64, (o as i128 - o0 as i128) as f64))
        .collect();
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_o = points.iter().map(|p| p.1).sum::<f64>() / n;
    let var_t: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_o)).sum();
    let span = (tn - t0) as f64;
    let ends = (on as i128 - o0 as i128) as f64 / span;
    let slope = cov / var_t;
    let unc = (b0 as f64 + bn as f64) / span + (slope - ends).abs();
    let (low, high) = ((slope - unc).max(-MAX_FREQ), (slope + unc).min(MAX_FREQ));
    if low <= high {
        Some(((low + high) / 2.0, (high - low) / 2.0))
    } else {
        // The measurements put the rate beyond what was assumed plausible: they win.
        Some((slope, unc))
    }
}

fn leap_shift(kind: Leap) -> i64 {
    match kind {
        Leap::Insert => -(NS_PER_S as i64),
        Leap::Delete => NS_PER_S as i64,
        Leap::None | Leap::Unknown => 0,
    }
}

/// From 23:59:59 before the leap to 00:00:01 after it.
fn leap_window(leap_utc_ns: u64, utc_ns: u64) -> bool {
    utc_ns + NS_PER_S >= leap_utc_ns && utc_ns < leap_utc_ns + NS_PER_S
}

/// UTC nanoseconds of the midnight that ends the month containing `utc_ns`.
pub fn end_of_month(utc_ns: u64) -> u64 {
    let date = DateTime::from_timestamp_nanos(utc_ns as i64).date_naive();
    let (year, month) = if date.month() == 12 {
        (date.year() + 1, 1)
    } else {
        (date.year(), date.month() + 1)
    };
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid date");
    first
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp() as u64
        * NS_PER_S
}

#[cfg(test)]
mod tests;
