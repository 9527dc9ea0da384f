//! GPS through gpsd: a client of gpsd's JSON protocol (TCP, port 2947 by default) that turns a
//! receiver's PPS, TOFF or TPV reports into [`Sample`]s for the discipline.
//!
//! A GPS receiver is an *independent* reference (it does not depend on the network), so the
//! discipline lets it confirm or veto a step of the NTP sources, and stops issuance while it
//! persistently disagrees with them; that makes the conditions under which it is trusted
//! matter:
//!
//! - **Trust.** Samples are sent only after three consecutive TPV reports with a 3D fix
//!   (`mode` 3) and a valid leap-second count (`leapseconds` present and at least the current
//!   GPS − UTC of 18 s: a smaller count is a receiver still on a firmware default, whose UTC may
//!   be off by whole seconds). A TPV without them, or no TPV for three seconds, starts the count
//!   again.
//! - **Samples.** A `PPS` report gives the true time of a pulse (`real_*`) and the system clock
//!   when it was seen (`clock_*`): a sample with `gps_precision_ms`. A `TOFF` report is the same
//!   pair for the serial time of a fix, used while no PPS came for three seconds. With neither,
//!   the TPV time against the local time its line arrived. Serial time arrives after the second
//!   it names, never before, by up to `gps_serial_precision_ms`: such a sample claims
//!   `[m, m + lag]` (`m` the time named minus the arrival), not `m ± lag` (`serial_sample`).
//!   System-clock times become local times through [`LocalClock::wall_offset`] taken when the
//!   report arrives.
//! - **The pulse's second.** A PPS report's true time is gpsd's label for the pulse: the
//!   second it takes from the serial time. A label off by a whole second (a receiver sending
//!   its sentence before the pulse it names) would pass for a sample precise to microseconds.
//!   So a pulse is used only where the serial time of the last three seconds (TPV or TOFF,
//!   its interval widened by what the oscillator can drift in between) holds its offset, as
//!   chrony locks a PPS to a serial reference: otherwise it is refused, the serial time speaks
//!   in its place, and the refusal is logged (`gps_pps_refused`; `gps_pps_agrees` when pulses agree
//!   again; once a minute at most, with the changes left untold, where they flip).
//! - **Reachability.** While untrusted, each TPV counts as a missed poll. When the connection
//!   drops, or no TPV/PPS/TOFF arrives for three seconds, a miss is sent once per second, so
//!   that the discipline's reach register empties. The client reconnects with a backoff of 1 s
//!   doubling to 30 s, and after 10 s without any line.
//! - **Leap seconds.** gpsd reports UTC in TPV and does not announce a pending leap second in
//!   its JSON (TPV, PPS and TOFF carry no such field), so samples carry [`Leap::Unknown`]: they
//!   abstain from the discipline's leap vote, and the NTP sources announce leaps.
//!
//! One gpsd is one source: its reports are not told apart by device, so a gpsd serving several
//! receivers should be given to the TSA through one of them only.
//!
//! The parsing and the trust state machine ([`GpsdTracker`]) are pure and fed lines and times;
//! [`run`] is the thin I/O task around them.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::discipline::{Leap, Sample, MAX_FREQ};
use super::local::{LocalClock, MAX_SLEW_RATE};
use super::service::SourceMessage;

const NS_PER_S: u64 = 1_000_000_000;

/// No report for this long: the source is silent (unreachable, untrusted).
pub const SILENCE_NS: u64 = 3 * NS_PER_S;
/// While silent, one miss per this interval.
const MISS_EVERY_NS: u64 = NS_PER_S;
/// Consecutive good fixes before a receiver is trusted.
pub const TRUST_AFTER: u32 = 3;
/// GPS − UTC since 2017-01-01. A receiver reporting less has not read the current count from
/// the satellites yet. (Lower this if a negative leap second is ever announced.)
pub const MIN_LEAP_SECONDS: i64 = 18;
/// Above this the count is garbage.
const MAX_LEAP_SECONDS: i64 = 100;
/// A PPS or TOFF whose system-clock time is further in the past when it arrives, or in the
/// future, is not used (a wall-clock step between the pulse and its report).
const MAX_REPORT_AGE_NS: u64 = 5 * NS_PER_S;
/// PPS preferred over TOFF, TOFF over TPV, while the better one came within this.
const PREFER_NS: u64 = 3 * NS_PER_S;

/// The earliest UTC a receiver may name (2020-01-01T00:00:00Z). A receiver with the GPS
/// week-number rollover bug names dates 1024 weeks (about 19.6 years) back, which would still
/// pass for a measured offset of the local clock: its fixes count as none (this floor catches
/// them until 2039).
pub(crate) const EARLIEST_UTC_NS: i64 = 1_577_836_800 * NS_PER_S as i64;

/// A sample for a time read from a serial line: the time `utc` of a second, whose report
/// arrived at local time `at`. The report comes after the second it names, by up to
/// `max_lag` (10 to 700 ms for serial GPS time), never before, so UTC − local at `at` lies in
/// `[utc − at, utc − at + max_lag]`: the sample is centred there, with half the lag as its
/// precision, and claims nothing on the side the error cannot be. `None` on overflow.
pub(crate) fn serial_sample(utc: i64, at: u64, max_lag: u64) -> Option<Sample> {
    let half = max_lag.div_ceil(2);
    let naive = utc.checked_sub(i64::try_from(at).ok()?)?;
    Some(Sample {
        at,
        offset: naive.checked_add(i64::try_from(half).ok()?)?,
        delay: 0,
        root_delay: 0,
        root_dispersion: 0,
        precision: half,
        leap: Leap::Unknown,
        lineage: Default::default(),
    })
}

/// What the I/O task does after a line or a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Sample(Sample),
    /// Tell the discipline the source has no usable answer.
    Missed,
    Nothing,
}

/// Silence detection: one miss per second once nothing was heard for three seconds.
#[derive(Clone, Debug)]
pub struct Liveness {
    last_heard: Option<u64>,
    last_miss: Option<u64>,
}

impl Liveness {
    /// Starting at local time `now` (silence counts from here).
    pub fn new(now: u64) -> Self {
        Self {
            last_heard: Some(now),
            last_miss: None,
        }
    }

    pub fn heard(&mut self, now: u64) {
        self.last_heard = Some(now);
        self.last_miss = None;
    }

    /// The connection or device is gone: silent from now on.
    pub fn lost(&mut self) {
        self.last_heard = None;
    }

    pub fn silent(&self, now: u64) -> bool {
        self.last_heard
            .is_none_or(|heard| now.saturating_sub(heard) >= SILENCE_NS)
    }

    /// Nanoseconds since the last report, `None` when lost.
    pub fn quiet_for(&self, now: u64) -> Option<u64> {
        self.last_heard.map(|heard| now.saturating_sub(heard))
    }

    /// Whether a miss is due now (silent, and none sent in the last second).
    pub fn miss_due(&mut self, now: u64) -> bool {
        if !self.silent(now) {
            return false;
        }
        if self
            .last_miss
            .is_some_and(|miss| now.saturating_sub(miss) < MISS_EVERY_NS)
        {
            return false;
        }
        self.last_miss = Some(now);
        true
    }
}

/// Splits a byte stream into lines (without `\r\n`). Lines longer than the limit are dropped
/// whole; invalid UTF-8 is replaced, so that the parsers see garbage, never a panic.
#[derive(Debug)]
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    overflow: bool,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            overflow: false,
        }
    }

    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if !self.overflow {
                    let line = String::from_utf8_lossy(&self.buf);
                    lines.push(line.trim_end_matches('\r').to_string());
                }
                self.buf.clear();
                self.overflow = false;
            } else if self.overflow {
            } else if self.buf.len() >= self.max {
                self.overflow = true;
                self.buf.clear();
            } else {
                self.buf.push(b);
            }
        }
        lines
    }

    /// Forgets a partial line (after a reconnection).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }
}

/// The fields of gpsd's JSON reports that matter here; others are ignored.
#[derive(Debug, Deserialize)]
struct Report {
    class: String,
    mode: Option<i64>,
    /// TPV's fix status (gpsd 3.19+): 5 dead reckoning, 6 GNSS with dead reckoning, 8
    /// simulated; absent in older gpsd, where a 3D fix is a GNSS one.
    status: Option<i64>,
    time: Option<String>,
    leapseconds: Option<i64>,
    real_sec: Option<i64>,
    real_nsec: Option<i64>,
    clock_sec: Option<i64>,
    clock_nsec: Option<i64>,
}

/// Seconds and nanoseconds to nanoseconds, when valid.
fn timespec(sec: Option<i64>, nsec: Option<i64>) -> Option<i64> {
    let (sec, nsec) = (sec?, nsec?);
    if sec < 0 || !(0..NS_PER_S as i64).contains(&nsec) {
        return None;
    }
    sec.checked_mul(NS_PER_S as i64)?.checked_add(nsec)
}

/// An ISO 8601 UTC time as gpsd writes it ("2024-05-01T12:00:00.000Z") to Unix nanoseconds.
pub fn parse_iso_time(s: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    t.timestamp_nanos_opt().filter(|&ns| ns >= 0)
}

/// Whether a TPV's leap-second count is one to trust.
fn valid_leap_seconds(count: Option<i64>) -> bool {
    count.is_some_and(|c| (MIN_LEAP_SECONDS..=MAX_LEAP_SECONDS).contains(&c))
}

/// The trust state machine of one gpsd connection, fed report lines and local times.
#[derive(Clone, Debug)]
pub struct GpsdTracker {
    pps_precision: u64,
    serial_precision: u64,
    /// Consecutive TPV with a 3D fix and a valid leap-second count.
    fixes: u32,
    last_tpv: Option<u64>,
    last_pps: Option<u64>,
    last_toff: Option<u64>,
    /// The latest sample of serial time (TPV or TOFF) while trusted, taken whether or not it
    /// was sent: what names a pulse's second.
    serial: Option<Sample>,
    /// The last pulse was refused for naming another second than the serial time.
    pps_refused: bool,
    liveness: Liveness,
    /// The wall clock's offset from the local clock as read with each line and tick (local
    /// time, offset), back over the oldest report taken: a pulse is placed with the offset
    /// of its report's arrival, so a step of the wall clock between the two (not a slew)
    /// would move it by the whole step.
    walls: std::collections::VecDeque<(u64, i64)>,
}

impl GpsdTracker {
    /// Precisions in nanoseconds: PPS, and TOFF/TPV (serial time). `now`: local time at start.
    pub fn new(pps_precision: u64, serial_precision: u64, now: u64) -> Self {
        Self {
            pps_precision,
            serial_precision,
            fixes: 0,
            last_tpv: None,
            last_pps: None,
            last_toff: None,
            serial: None,
            pps_refused: false,
            liveness: Liveness::new(now),
            walls: std::collections::VecDeque::new(),
        }
    }

    /// The wall clock's offset from the local clock at local time `now` (each tick).
    pub fn wall(&mut self, now: u64, wall_offset: i64) {
        self.walls.push_back((now, wall_offset));
        // Back over the oldest report taken, and a tick before it.
        let keep_from = now.saturating_sub(MAX_REPORT_AGE_NS + TICK.as_nanos() as u64);
        while self.walls.len() > 1 && self.walls[1].0 <= keep_from {
            self.walls.pop_front();
        }
    }

    /// Whether the wall clock moved, between local time `at` and `now` (when it is
    /// `wall_offset` ahead), more than a slew can: by the reading at or before `at` (else the
    /// oldest one kept).
    fn stepped_since(&self, at: u64, now: u64, wall_offset: i64) -> bool {
        let base = self
            .walls
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .or(self.walls.front());
        let Some(&(then, offset)) = base else {
            return false;
        };
        let slewed = (now.saturating_sub(then) as f64 * MAX_SLEW_RATE).ceil() as i64;
        (wall_offset - offset).abs() > slewed + 1_000_000
    }

    pub fn trusted(&self) -> bool {
        self.fixes >= TRUST_AFTER
    }

    /// Whether the last pulse was refused for naming another second than the serial time.
    pub fn pps_refused(&self) -> bool {
        self.pps_refused
    }

    /// Nanoseconds since the last TPV/PPS/TOFF; `None` after a disconnection.
    pub fn quiet_for(&self, now: u64) -> Option<u64> {
        self.liveness.quiet_for(now)
    }

    /// One line from gpsd, received at local time `now`, when the wall clock was
    /// `wall_offset` ahead of the local clock.
    pub fn line(&mut self, line: &str, now: u64, wall_offset: i64) -> Output {
        let Ok(report) = serde_json::from_str::<Report>(line) else {
            return Output::Nothing;
        };
        let out = match report.class.as_str() {
            "TPV" => self.tpv(&report, now),
            "PPS" => self.pulse(&report, now, wall_offset, true),
            "TOFF" => self.pulse(&report, now, wall_offset, false),
            _ => Output::Nothing,
        };
        self.wall(now, wall_offset);
        out
    }

    /// A timer tick at local time `now`: the untrusting and the misses of silence.
    pub fn tick(&mut self, now: u64) -> Output {
        if self
            .last_tpv
            .is_none_or(|t| now.saturating_sub(t) >= SILENCE_NS)
        {
            self.fixes = 0;
        }
        if self.liveness.miss_due(now) {
            Output::Missed
        } else {
            Output::Nothing
        }
    }

    /// The connection dropped: untrusted, and silent from now on.
    pub fn disconnected(&mut self) {
        self.fixes = 0;
        self.last_tpv = None;
        self.last_pps = None;
        self.last_toff = None;
        self.serial = None;
        self.liveness.lost();
    }

    fn recent(last: Option<u64>, now: u64) -> bool {
        last.is_some_and(|t| now.saturating_sub(t) < PREFER_NS)
    }

    fn tpv(&mut self, report: &Report, now: u64) -> Output {
        self.liveness.heard(now);
        self.last_tpv = Some(now);
        // A fix of the sky's own: not dead reckoning, not a simulation (gpsfake, a receiver's
        // test mode), as NMEA's modes E and S are refused.
        let from_the_sky = !matches!(report.status, Some(5 | 6 | 8));
        // (A time that does not parse is a miss below, as before: not a rollover's.)
        let rolled_back = report
            .time
            .as_deref()
            .and_then(parse_iso_time)
            .is_some_and(|utc| utc < EARLIEST_UTC_NS);
        if report.mode != Some(3)
            || !from_the_sky
            || rolled_back
            || !valid_leap_seconds(report.leapseconds)
        {
            self.fixes = 0;
            return Output::Missed;
        }
        self.fixes = self.fixes.saturating_add(1);
        if !self.trusted() {
            return Output::Missed;
        }
        let sample = report
            .time
            .as_deref()
            .and_then(parse_iso_time)
            .and_then(|utc| serial_sample(utc, now, self.serial_precision))
            .filter(Sample::is_plausible);
        if let Some(sample) = &sample {
            self.serial = Some(*sample);
        }
        if Self::recent(self.last_pps, now) || Self::recent(self.last_toff, now) {
            return Output::Nothing;
        }
        match sample {
            Some(sample) => Output::Sample(sample),
            None => Output::Missed,
        }
    }

    fn pulse(&mut self, report: &Report, now: u64, wall_offset: i64, pps: bool) -> Output {
        let (Some(real), Some(clock)) = (
            timespec(report.real_sec, report.real_nsec),
            timespec(report.clock_sec, report.clock_nsec),
        ) else {
            return Output::Nothing;
        };
        if real < EARLIEST_UTC_NS {
            return Output::Nothing;
        }
        self.liveness.heard(now);
        // Preferred over the serial time while its reports come (before trust too), but not
        // one refused for its own fault (stale, across a step, implausible): that leaves TOFF
        // and TPV to speak.
        if pps {
            self.last_pps = Some(now);
        } else {
            self.last_toff = Some(now);
        }
        if !self.trusted() {
            return Output::Nothing;
        }
        let sample = self.pulse_sample(real, clock, now, wall_offset, pps);
        let sample = match pps {
            true => {
                if let Some(pulse) = &sample {
                    self.pps_refused = !self.names_its_second(pulse);
                }
                sample.filter(|_| !self.pps_refused)
            }
            false => {
                if let Some(sample) = &sample {
                    self.serial = Some(*sample);
                }
                if Self::recent(self.last_pps, now) {
                    return Output::Nothing;
                }
                sample
            }
        };
        match sample {
            Some(sample) => Output::Sample(sample),
            None => {
                match pps {
                    true => self.last_pps = None,
                    false => self.last_toff = None,
                }
                Output::Nothing
            }
        }
    }

    /// Whether the serial time of the last [`PREFER_NS`] holds `pulse`'s offset: its interval
    /// widened by the pulse's precision and by what the local oscillator can drift (at most
    /// [`MAX_FREQ`]) between the two. No serial time that recent names no second.
    fn names_its_second(&self, pulse: &Sample) -> bool {
        let Some(serial) = &self.serial else {
            return false;
        };
        let apart = pulse.at.abs_diff(serial.at);
        if apart >= PREFER_NS {
            return false;
        }
        let drift = (apart as f64 * MAX_FREQ).ceil() as u64;
        let reach = serial
            .precision
            .saturating_add(pulse.precision)
            .saturating_add(drift);
        pulse.offset.abs_diff(serial.offset) <= reach
    }

    /// The sample of a pulse whose true time is `real` and whose wall-clock stamp is `clock`,
    /// reported at local time `now`; `None` where it cannot be placed.
    fn pulse_sample(
        &self,
        real: i64,
        clock: i64,
        now: u64,
        wall_offset: i64,
        pps: bool,
    ) -> Option<Sample> {
        let at = clock.checked_sub(wall_offset)?;
        // Stepped since the pulse (chronyd's makestep, `date -s`): its place is unknown.
        if self.stepped_since(at.max(0) as u64, now, wall_offset) {
            return None;
        }
        let now = now as i64;
        // A pulse seen "after" its report by less than a millisecond is the rounding of the
        // two clock readings behind `wall_offset`: it is dated now.
        if at > now + 1_000_000 || now - at > MAX_REPORT_AGE_NS as i64 {
            return None;
        }
        let mut sample = if pps {
            // The pulse marks the second itself: a symmetric interval of its precision.
            Sample {
                at: at.min(now) as u64,
                offset: real.checked_sub(at)?,
                delay: 0,
                root_delay: 0,
                root_dispersion: 0,
                precision: self.pps_precision,
                leap: Leap::Unknown,
                lineage: Default::default(),
            }
        } else {
            // TOFF: the second of a fix against the arrival of its first sentence.
            Sample {
                at: at.min(now) as u64,
                ..serial_sample(real, at as u64, self.serial_precision)?
            }
        };
        // `at` is the pulse's wall-clock stamp moved by the wall clock's offset *now*: a daemon
        // slewing the wall clock since (at most `MAX_SLEW_RATE`) moved it by up to the report's
        // age times that, which the interval must hold.
        let age = now.saturating_sub(at).max(0) as f64;
        sample.precision = sample
            .precision
            .saturating_add((age * MAX_SLEW_RATE).ceil() as u64);
        // A pulse dated decades away from the local clock is garbage, not a measurement.
        sample.is_plausible().then_some(sample)
    }
}

/// One configured gpsd.
#[derive(Clone, Debug)]
pub struct GpsdSource {
    /// `host:port`, resolved at each connection.
    pub addr: String,
    /// Claimed for PPS samples.
    pub pps_precision: Duration,
    /// Claimed for TOFF and TPV samples (the serial time of a fix).
    pub serial_precision: Duration,
}

/// What the TSA asks gpsd for: JSON reports, PPS and TOFF included.
pub const WATCH: &[u8] = b"?WATCH={\"enable\":true,\"json\":true,\"pps\":true}\n";
/// gpsd's longest reports (SKY with many satellites) stay well below this.
const MAX_LINE: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Without any line for this long, the connection is given up and made again.
const RECONNECT_AFTER_NS: u64 = 10 * NS_PER_S;
pub(crate) const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A state told at most once per `every`: [`Told::tell`], fed the state as it is, says when
/// to tell it (where it is not the one told last), with how many changes went untold since.
struct Told {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    told: bool,
    seen: bool,
    untold: u64,
}

impl Told {
    fn every(every: std::time::Duration, state: bool) -> Self {
        Self {
            every,
            last: None,
            told: state,
            seen: state,
            untold: 0,
        }
    }

    fn tell(&mut self, now: std::time::Instant, state: bool) -> Option<(bool, u64)> {
        if state != self.seen {
            self.seen = state;
            self.untold += 1;
        }
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= self.every);
        if state == self.told || !due {
            return None;
        }
        self.last = Some(now);
        self.told = state;
        // The change told is not among the untold.
        Some((state, std::mem::take(&mut self.untold) - 1))
    }
}

/// The discipline went away: the task ends.
pub(crate) struct Stopped;

pub(crate) async fn send(
    tx: &mpsc::Sender<SourceMessage>,
    id: usize,
    output: Output,
) -> Result<(), Stopped> {
    let message = match output {
        Output::Sample(sample) => SourceMessage::Sample(id, sample),
        Output::Missed => SourceMessage::Missed(id),
        Output::Nothing => return Ok(()),
    };
    tx.send(message).await.map_err(|_| Stopped)
}

/// Waits out `backoff` after a lost connection or device, telling the discipline every tick
/// what `tick` makes of the silence (misses, once it lasts).
pub(crate) async fn wait_reporting(
    tx: &mpsc::Sender<SourceMessage>,
    id: usize,
    clock: LocalClock,
    backoff: Duration,
    mut tick: impl FnMut(u64) -> Output,
) -> Result<(), Stopped> {
    let until = tokio::time::Instant::now() + backoff;
    loop {
        send(tx, id, tick(clock.now())).await?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(TICK)).await;
    }
}

/// Follows gpsd at `source` forever, sending samples (or misses) for source `id`.
pub async fn run(
    id: usize,
    source: GpsdSource,
    clock: LocalClock,
    tx: mpsc::Sender<SourceMessage>,
) {
    let mut tracker = GpsdTracker::new(
        source.pps_precision.as_nanos() as u64,
        source.serial_precision.as_nanos() as u64,
        clock.now(),
    );
    let mut backoff = MIN_BACKOFF;
    loop {
        match session(id, &source, clock, &tx, &mut tracker).await {
            Err(Stopped) => return,
            Ok(true) => backoff = MIN_BACKOFF,
            Ok(false) => {}
        }
        tracker.disconnected();
        if wait_reporting(&tx, id, clock, backoff, |now| tracker.tick(now))
            .await
            .is_err()
        {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection; `Ok(true)` when it delivered at least one line.
async fn session(
    id: usize,
    source: &GpsdSource,
    clock: LocalClock,
    tx: &mpsc::Sender<SourceMessage>,
    tracker: &mut GpsdTracker,
) -> Result<bool, Stopped> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(source.addr.as_str()));
    let mut stream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(gpsd = %source.addr, error = %e, "cannot connect to gpsd");
            return Ok(false);
        }
        Err(_) => {
            tracing::debug!(gpsd = %source.addr, "connecting to gpsd timed out");
            return Ok(false);
        }
    };
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.write_all(WATCH).await {
        tracing::debug!(gpsd = %source.addr, error = %e, "cannot send WATCH to gpsd");
        return Ok(false);
    }
    tracing::info!(event = "gpsd_connected", gpsd = %source.addr, "connected to gpsd");
    let mut lines = Lines::new(MAX_LINE);
    let mut buf = vec![0u8; 8192];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = false;
    let mut last_line = clock.now();
    let mut trusted = tracker.trusted();
    let mut pps_changes = Told::every(std::time::Duration::from_secs(60), tracker.pps_refused());
    let reason = loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                let n = match read {
                    Ok(0) => break "closed by gpsd".to_string(),
                    Ok(n) => n,
                    Err(e) => break e.to_string(),
                };
                let now = clock.now();
                let wall_offset = clock.wall_offset();
                for line in lines.push(&buf[..n]) {
                    heard = true;
                    last_line = now;
                    send(tx, id, tracker.line(&line, now, wall_offset)).await?;
                }
            }
            _ = tick.tick() => {
                let now = clock.now();
                tracker.wall(now, clock.wall_offset());
                send(tx, id, tracker.tick(now)).await?;
                if now.saturating_sub(last_line) >= RECONNECT_AFTER_NS {
                    break "no report for 10 s".to_string();
                }
            }
        }
        // Pulses at the edge of the serial time's interval may flip every second: the state
        // is told once a minute at most (the one it settles in, within the minute), with how
        // many changes were not.
        let told = pps_changes.tell(std::time::Instant::now(), tracker.pps_refused());
        if let Some((refused, untold)) = told {
            if refused {
                tracing::warn!(
                    event = "gps_pps_refused",
                    gpsd = %source.addr,
                    untold,
                    "gpsd's PPS names another second than the receiver's serial time (or no \
                     serial time came for 3 s): pulses are not used, the serial time is"
                );
            } else {
                tracing::info!(event = "gps_pps_agrees", gpsd = %source.addr, untold, "gpsd's PPS agrees with the serial time again: pulses are used");
            }
        }
        if tracker.trusted() != trusted {
            trusted = tracker.trusted();
            if trusted {
                tracing::info!(event = "gps_trusted", gpsd = %source.addr, "GPS receiver trusted: three 3D fixes with a valid leap-second count");
            } else {
                tracing::warn!(event = "gps_untrusted", gpsd = %source.addr, "GPS receiver no longer trusted (fix lost, leap-second count missing, or silent)");
            }
        }
    };
    tracing::warn!(event = "gpsd_disconnected", gpsd = %source.addr, reason, "lost gpsd; reconnecting");
    Ok(heard)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_S;
    const T0: u64 = 1_700_000_000 * S;

    fn tracker() -> GpsdTracker {
        GpsdTracker::new(1_000_000, 500_000_000, T0)
    }

    fn iso(ns: u64) -> String {
        chrono::DateTime::from_timestamp_nanos(ns as i64)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    }

    fn tpv(mode: u8, utc: u64, leap: Option<i64>) -> String {
        let leap = leap
            .map(|l| format!(",\"leapseconds\":{l}"))
            .unwrap_or_default();
        format!(
            "{{\"class\":\"TPV\",\"device\":\"/dev/ttyS0\",\"mode\":{mode},\"time\":\"{}\"{leap},\"ept\":0.005,\"lat\":48.1}}",
            iso(utc)
        )
    }

    fn pulse(class: &str, real: u64, clock: u64) -> String {
        format!(
            "{{\"class\":\"{class}\",\"device\":\"/dev/ttyS0\",\"real_sec\":{}, \"real_nsec\":{},\"clock_sec\":{},\"clock_nsec\":{},\"precision\":-20}}",
            real / S,
            real % S,
            clock / S,
            clock % S
        )
    }

    /// Three good TPVs, one a second from `T0`; returns the local time after them.
    fn trust(t: &mut GpsdTracker) -> u64 {
        trust_with_wall(t, 0)
    }

    /// [`trust`], the wall clock `wall_offset` ahead of the local clock.
    fn trust_with_wall(t: &mut GpsdTracker, wall_offset: i64) -> u64 {
        trust_ahead(t, wall_offset, 0)
    }

    /// [`trust_with_wall`], UTC `utc_ahead` ahead of the local clock.
    fn trust_ahead(t: &mut GpsdTracker, wall_offset: i64, utc_ahead: u64) -> u64 {
        for i in 0..3 {
            let now = T0 + i * S;
            let out = t.line(&tpv(3, now + utc_ahead, Some(18)), now, wall_offset);
            if i < 2 {
                assert_eq!(out, Output::Missed, "fix {i}");
                assert!(!t.trusted());
            }
        }
        assert!(t.trusted());
        T0 + 2 * S
    }

    #[test]
    fn three_3d_fixes_with_leap_seconds_make_the_receiver_trusted() {
        let mut t = tracker();
        let now = trust(&mut t);
        // The third TPV itself gave a TPV sample (no PPS, no TOFF): UTC 250 ms ahead, and
        // up to the 500 ms of serial lag more.
        let later = now + S;
        match t.line(&tpv(3, later + 250_000_000, Some(18)), later, 0) {
            Output::Sample(s) => {
                assert_eq!(s.offset, 500_000_000);
                assert_eq!(s.at, later);
                assert_eq!(s.precision, 250_000_000);
                assert_eq!(s.delay, 0);
                assert_eq!(s.leap, Leap::Unknown);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_2d_fix_resets_the_count() {
        let mut t = tracker();
        let lines = [(3, true), (3, true), (2, false), (3, true), (3, true)];
        for (i, (mode, _)) in lines.iter().enumerate() {
            let now = T0 + i as u64 * S;
            assert_eq!(t.line(&tpv(*mode, now, Some(18)), now, 0), Output::Missed);
        }
        assert!(!t.trusted());
        let now = T0 + 5 * S;
        assert!(matches!(
            t.line(&tpv(3, now, Some(18)), now, 0),
            Output::Sample(_)
        ));
        // Losing the 3D fix once trusted: untrusted at once.
        let now = now + S;
        assert_eq!(t.line(&tpv(1, now, Some(18)), now, 0), Output::Missed);
        assert!(!t.trusted());
        let pps = pulse("PPS", now, now);
        assert_eq!(t.line(&pps, now, 0), Output::Nothing);
    }

    #[test]
    fn missing_or_implausible_leap_seconds_are_not_trusted() {
        let mut t = tracker();
        for i in 0..10 {
            let now = T0 + i * S;
            let leap = match i % 3 {
                0 => None,
                1 => Some(16),
                _ => Some(1000),
            };
            assert_eq!(t.line(&tpv(3, now, leap), now, 0), Output::Missed);
            assert!(!t.trusted());
        }
    }

    /// A pulse's report placed by the wall clock's offset at its arrival: where the wall
    /// clock was stepped between the pulse and the report, the pulse is not taken (it would
    /// be off by the step, with a bound grown by the report's age only); after the step,
    /// pulses are taken again. A slew within MAX_SLEW_RATE does not count as a step.
    #[test]
    fn a_pulse_reported_across_a_step_of_the_wall_clock_is_not_taken() {
        let mut t = tracker();
        let now = trust(&mut t);
        for k in 1..=4 {
            t.wall(now + k * S / 4, 0);
        }
        // The pulse at now + 1 s (wall time the same: offset 0), reported 200 ms later, after
        // the wall clock was stepped 400 ms forward.
        let pulse_at = now + S;
        t.wall(pulse_at - S / 8, 0);
        let step = 400_000_000i64;
        let report_at = pulse_at + 200_000_000;
        let out = t.line(&pulse("PPS", pulse_at + 5_000, pulse_at), report_at, step);
        assert_eq!(out, Output::Nothing);
        // The next pulse, seen on the stepped wall clock: taken.
        let next = pulse_at + S;
        t.wall(next - S / 8, step);
        let seen = next + step as u64;
        let out = t.line(&pulse("PPS", next + 5_000, seen), next + 10_000_000, step);
        let Output::Sample(s) = out else {
            panic!("{out:?}")
        };
        assert_eq!(s.offset, 5_000);
        // A slew of 1 ms over the next second: within what a daemon slews. (The second's
        // serial time came, as each second's does: it names the pulses' seconds.)
        let later = next + S;
        assert_eq!(
            t.line(&tpv(3, next + 5_000, Some(18)), next + 100_000_000, step),
            Output::Nothing
        );
        t.wall(later - S / 8, step);
        let slewed = step + 1_000_000;
        let seen = later + slewed as u64;
        let out = t.line(&pulse("PPS", later, seen), later + 10_000_000, slewed);
        assert!(matches!(out, Output::Sample(_)), "{out:?}");
    }

    /// Pulses that are refused (here: reported 6 s after the pulse, past MAX_REPORT_AGE_NS)
    /// do not keep TOFF from speaking: PPS is preferred while it gives samples (it silenced
    /// TOFF and TPV for 3 s after each refused one).
    #[test]
    fn refused_pulses_leave_the_serial_time_its_say() {
        let mut t = tracker();
        let now = trust(&mut t) + S;
        let stale = pulse("PPS", now - 6 * S, now - 6 * S);
        assert_eq!(t.line(&stale, now, 0), Output::Nothing);
        let toff = pulse("TOFF", now + S, now + S - 1_000_000);
        let out = t.line(&toff, now + S, 0);
        assert!(matches!(out, Output::Sample(_)), "{out:?}");
    }

    /// A pulse whose label is a whole second off the serial time (gpsd pairing the pulse
    /// with the wrong sentence) is refused, whichever way; the serial time speaks in its
    /// place; pulses that agree are used again.
    #[test]
    fn a_pulse_that_names_another_second_than_the_serial_time_is_refused() {
        for off in [S as i64, -(S as i64)] {
            let mut t = tracker();
            let mut now = trust(&mut t);
            // UTC is the local time: pulses at each whole local second, reported 5 ms later,
            // and each second's TPV 200 ms after its pulse.
            let mut second = |t: &mut GpsdTracker, label: i64| {
                now += S;
                let real = (now as i64 + label) as u64;
                let pps = t.line(&pulse("PPS", real, now), now + 5_000_000, 0);
                let tpv = t.line(&tpv(3, now, Some(18)), now + 200_000_000, 0);
                (pps, tpv)
            };
            let (pps, tpv) = second(&mut t, 0);
            assert!(matches!(pps, Output::Sample(s) if s.offset == 0), "{pps:?}");
            assert_eq!(tpv, Output::Nothing, "PPS preferred");
            assert!(!t.pps_refused());
            for _ in 0..3 {
                let (pps, tpv) = second(&mut t, off);
                assert_eq!(pps, Output::Nothing, "label {off}");
                assert!(t.pps_refused());
                let Output::Sample(s) = tpv else {
                    panic!("the serial time speaks: {tpv:?}")
                };
                assert!(s.offset.abs_diff(0) <= s.precision + 200_000_000, "{s:?}");
            }
            let (pps, _) = second(&mut t, 0);
            assert!(matches!(pps, Output::Sample(s) if s.offset == 0), "{pps:?}");
            assert!(!t.pps_refused());
        }
    }

    /// The serial time's interval, widened by the pulse's precision and by 500 ppm of the
    /// time between them, is what a pulse must fall in; without serial time in the last 3 s
    /// (fixes without a time) no pulse is used.
    #[test]
    fn a_pulse_must_fall_in_the_serial_times_interval() {
        let mut t = tracker();
        let now = trust(&mut t);
        // The third TPV: UTC − local in [0, 500 ms] at `now`. A pulse 2 s later: 1 ms of
        // precision and 1 ms of drift more on each side.
        let at = now + 2 * S;
        let reach = 1_000_000 + 1_000_000;
        for (offset, taken) in [
            (-reach, true),
            (-reach - 1, false),
            (500_000_000 + reach, true),
            (500_000_000 + reach + 1, false),
        ] {
            let real = (at as i64 + offset) as u64;
            let out = t.line(&pulse("PPS", real, at), at, 0);
            assert_eq!(matches!(out, Output::Sample(_)), taken, "{offset}: {out:?}");
            assert_eq!(t.pps_refused(), !taken);
        }
        // 3 s after the serial time: too old to name a second.
        let at = now + 3 * S;
        assert_eq!(t.line(&pulse("PPS", at, at), at, 0), Output::Nothing);
        assert!(t.pps_refused());

        // Fixes that carry no time: trusted, but nothing names the pulses' seconds.
        let mut t = tracker();
        for i in 0..3 {
            let now = T0 + i * S;
            let line = tpv(3, now, Some(18)).replace(&format!(",\"time\":\"{}\"", iso(now)), "");
            assert!(!line.contains("time"), "{line}");
            t.line(&line, now, 0);
        }
        assert!(t.trusted());
        let at = T0 + 3 * S;
        assert_eq!(t.line(&pulse("PPS", at, at), at, 0), Output::Nothing);
        assert!(t.pps_refused());
    }

    /// A state that flips is told once a minute at most, with the changes left untold, and
    /// the one it settles in is told within the minute.
    #[test]
    fn a_flipping_state_is_told_once_a_minute_and_where_it_settles() {
        let start = std::time::Instant::now();
        let at = |s: u64| start + std::time::Duration::from_secs(s);
        let mut told = Told::every(std::time::Duration::from_secs(60), false);
        assert_eq!(told.tell(at(0), false), None, "as it was");
        assert_eq!(told.tell(at(1), true), Some((true, 0)));
        assert_eq!(told.tell(at(2), false), None);
        assert_eq!(told.tell(at(3), true), None);
        assert_eq!(told.tell(at(4), false), None);
        // Settled: told once the minute has passed, with the 2 changes between.
        assert_eq!(told.tell(at(30), false), None);
        assert_eq!(told.tell(at(61), false), Some((false, 2)));
        assert_eq!(told.tell(at(62), false), None);
        assert_eq!(told.tell(at(200), true), Some((true, 0)));
    }

    /// A fix by dead reckoning or a simulation (gpsd's status 5, 6, 8) does not count.
    #[test]
    fn dead_reckoning_and_simulated_fixes_are_not_trusted() {
        for status in [5, 6, 8] {
            let mut t = tracker();
            for i in 0..5 {
                let now = T0 + i * S;
                let line = tpv(3, now, Some(18))
                    .replace("\"mode\":3", &format!("\"mode\":3,\"status\":{status}"));
                assert!(line.contains("status"), "{line}");
                assert_eq!(t.line(&line, now, 0), Output::Missed);
                assert!(!t.trusted(), "status {status}");
            }
        }
        // Nor one dated 1024 weeks back (the week-number rollover bug).
        let mut t = tracker();
        for i in 0..5 {
            let now = T0 + i * S;
            let named = now - 1024 * 7 * 86_400 * S;
            assert_eq!(t.line(&tpv(3, named, Some(18)), now, 0), Output::Missed);
            assert!(!t.trusted());
        }
        // Status 1 (a GPS fix) counts.
        let mut t = tracker();
        for i in 0..3 {
            let now = T0 + i * S;
            let line = tpv(3, now, Some(18)).replace("\"mode\":3", "\"mode\":3,\"status\":1");
            t.line(&line, now, 0);
        }
        assert!(t.trusted());
    }

    #[test]
    fn pps_is_preferred_with_its_precision_and_wall_offset() {
        // The wall clock is 2 s ahead of the local clock; the pulse was seen at wall time W,
        // 10 ms before the report arrived, and its true time is W + 300 ms (the serial time
        // says UTC is 2.3 s ahead of the local clock, as the pulse does).
        let wall_offset = 2 * S as i64;
        let mut t = tracker();
        let now = trust_ahead(&mut t, wall_offset, 2 * S + 300_000_000);
        let now = now + S;
        let seen_wall = now + 2 * S - 10_000_000;
        let out = t.line(
            &pulse("PPS", seen_wall + 300_000_000, seen_wall),
            now,
            wall_offset,
        );
        let Output::Sample(s) = out else {
            panic!("{out:?}")
        };
        assert_eq!(s.at, now - 10_000_000);
        assert_eq!(s.offset, (seen_wall + 300_000_000) as i64 - s.at as i64);
        // 1 ms, and what a slewing wall clock may have moved in the report's 10 ms.
        let slewed = (10_000_000.0 * MAX_SLEW_RATE).ceil() as u64;
        assert_eq!(s.precision, 1_000_000 + slewed);
        // With PPS flowing, TOFF and TPV give no samples.
        let toff = pulse("TOFF", seen_wall + 300_000_000, seen_wall);
        assert_eq!(t.line(&toff, now, wall_offset), Output::Nothing);
        assert_eq!(
            t.line(&tpv(3, now, Some(18)), now, wall_offset),
            Output::Nothing
        );
        // PPS silent for 3 s: TOFF takes over, with the serial precision.
        let later = now + 3 * S;
        let toff = pulse("TOFF", later + 2 * S, later + 2 * S - 1_000_000);
        let Output::Sample(s) = t.line(&toff, later, wall_offset) else {
            panic!()
        };
        let slewed = (1_000_000.0 * MAX_SLEW_RATE).ceil() as u64;
        assert_eq!(s.precision, 250_000_000 + slewed);
        assert_eq!(s.offset, 2 * S as i64 + 1_000_000 + 250_000_000);
    }

    #[test]
    fn serial_time_arriving_late_gives_an_interval_that_holds_the_truth() {
        // The local clock and the wall clock are on UTC. gpsd's TOFF pairs the second of a fix
        // with the system time its first sentence arrived, 10 to 700 ms later; a TPV line
        // comes later still. UTC − local lies between the naive offset m and m plus the lag,
        // never below m; with the configured default, lags up to 700 ms are covered. PPS keeps
        // its symmetric microsecond interval.
        let config = crate::config::ClockConfig::default();
        let serial = config.gps_serial_precision_ms * 1_000_000;
        let check = |s: Sample, lag: u64| {
            let (low, high) = (
                s.offset - s.static_distance() as i64,
                s.offset + s.static_distance() as i64,
            );
            let m = -(lag as i64);
            assert!(low <= 0 && 0 <= high, "lag {lag}: [{low}, {high}] misses 0");
            assert!(low >= m, "lag {lag}: [{low}, {high}] reaches below {m}");
        };
        let mut t = GpsdTracker::new(config.gps_precision_ms * 1_000_000, serial, T0);
        let mut now = trust(&mut t);
        for lag in [10, 300, 600, 700] {
            let lag = lag * 1_000_000;
            // TOFF.
            now += S;
            let second = now - lag;
            let Output::Sample(s) = t.line(&pulse("TOFF", second, now), now, 0) else {
                panic!("no TOFF sample at lag {lag}")
            };
            check(s, lag);
            // TPV, with neither PPS nor TOFF for three seconds.
            now += 4 * S;
            let Output::Sample(s) = t.line(&tpv(3, now - lag, Some(18)), now, 0) else {
                panic!("no TPV sample at lag {lag}")
            };
            check(s, lag);
        }
        now += S;
        let Output::Sample(s) = t.line(&pulse("PPS", now - 2_000, now - 1_000), now, 0) else {
            panic!()
        };
        let slewed = (1_000.0 * MAX_SLEW_RATE).ceil() as u64;
        assert_eq!((s.offset, s.precision), (-1_000, 1_000_000 + slewed));
    }

    #[test]
    fn pps_before_trust_or_out_of_range_is_not_used() {
        let mut t = tracker();
        assert_eq!(t.line(&pulse("PPS", T0, T0), T0, 0), Output::Nothing);
        let now = trust(&mut t) + S;
        // Seen in the future, or 10 s before its report: not used.
        assert_eq!(t.line(&pulse("PPS", now, now + S), now, 0), Output::Nothing);
        // A microsecond after its report: rounding, dated at the report.
        let Output::Sample(s) = t.line(&pulse("PPS", now + 1_000, now + 1_000), now, 0) else {
            panic!()
        };
        assert_eq!((s.at, s.offset), (now, 0));
        assert_eq!(
            t.line(&pulse("PPS", now, now - 10 * S), now, 0),
            Output::Nothing
        );
        assert!(matches!(
            t.line(&pulse("PPS", now, now - S / 2), now, 0),
            Output::Sample(_)
        ));
        // A pulse whose true time is centuries away from the local clock: absurd.
        for real in [i64::MAX as u64 - S, 9_000_000_000 * S] {
            assert_eq!(t.line(&pulse("PPS", real, now), now, 0), Output::Nothing);
        }
    }

    #[test]
    fn garbage_never_panics_and_changes_nothing() {
        let mut t = tracker();
        let now = trust(&mut t);
        for line in [
            "",
            "garbage",
            "{",
            "{}",
            "[1,2,3]",
            "{\"class\":5}",
            "{\"class\":\"TPV\",\"mode\":\"three\"}",
            "{\"class\":\"PPS\",\"real_sec\":-1,\"real_nsec\":0,\"clock_sec\":1,\"clock_nsec\":0}",
            "{\"class\":\"PPS\",\"real_sec\":1,\"real_nsec\":2000000000,\"clock_sec\":1,\"clock_nsec\":0}",
            "{\"class\":\"PPS\",\"real_sec\":9223372036854775807,\"real_nsec\":0,\"clock_sec\":9223372036854775807,\"clock_nsec\":0}",
            "{\"class\":\"TOFF\"}",
            "{\"class\":\"VERSION\",\"release\":\"3.22\"}",
            "{\"class\":\"SKY\",\"satellites\":[]}",
            "\u{0}\u{1}\u{fffd}",
        ] {
            assert_eq!(t.line(line, now, 0), Output::Nothing, "{line:?}");
        }
        assert!(t.trusted());
        // A trusted TPV without a usable time: a miss, not a sample.
        let bad_time = "{\"class\":\"TPV\",\"mode\":3,\"leapseconds\":18,\"time\":\"yesterday\"}";
        assert_eq!(t.line(bad_time, now + S, 0), Output::Missed);
        assert!(t.trusted());
        assert_eq!(
            t.line(&pulse("PPS", 1, i64::MAX as u64), now, i64::MIN),
            Output::Nothing
        );
    }

    #[test]
    fn silence_untrusts_and_misses_once_a_second() {
        let mut t = tracker();
        let now = trust(&mut t);
        assert_eq!(t.tick(now + S), Output::Nothing);
        assert!(t.trusted());
        let mut misses = 0;
        let mut at = now;
        while at < now + 10 * S {
            at += S / 4;
            if t.tick(at) == Output::Missed {
                misses += 1;
            }
        }
        // Silent from now + 3 s to now + 10 s: one miss per second.
        assert_eq!(misses, 8);
        assert!(!t.trusted());
        // Back: trust must be earned again.
        assert_eq!(t.line(&tpv(3, at, Some(18)), at, 0), Output::Missed);
        assert_eq!(t.tick(at + S / 4), Output::Nothing);
    }

    #[test]
    fn a_disconnection_misses_at_once() {
        let mut t = tracker();
        let now = trust(&mut t);
        t.disconnected();
        assert!(!t.trusted());
        assert_eq!(t.tick(now), Output::Missed);
        assert_eq!(t.tick(now + S / 2), Output::Nothing);
        assert_eq!(t.tick(now + S), Output::Missed);
        assert_eq!(t.quiet_for(now), None);
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut lines = Lines::new(16);
        assert!(lines.push(b"abc").is_empty());
        assert_eq!(lines.push(b"def\r\nghi\n"), vec!["abcdef", "ghi"]);
        // Too long: dropped whole, including its tail after the limit.
        assert!(lines.push(&[b'x'; 40]).is_empty());
        assert_eq!(lines.push(b"yy\nok\n"), vec!["ok"]);
        assert_eq!(lines.push(b"\xff\xfe\n"), vec!["\u{fffd}\u{fffd}"]);
        lines.push(b"partial");
        lines.clear();
        assert_eq!(lines.push(b"new\n"), vec!["new"]);
    }

    #[test]
    fn iso_times() {
        assert_eq!(
            parse_iso_time("2024-05-01T12:00:00.250Z"),
            Some(1_714_564_800_250_000_000)
        );
        assert_eq!(parse_iso_time("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_iso_time("2024-13-01T12:00:00Z"), None);
        assert_eq!(parse_iso_time(""), None);
    }
}
