//! A GPS receiver read directly as NMEA 0183 from a serial device, for sites without gpsd.
//!
//! - **Sentences.** `$GPRMC`/`$GNRMC` (recommended minimum: UTC time, date, status) and
//!   `$GPZDA`/`$GNZDA` (UTC time and date). Every sentence must carry a checksum and it must
//!   match; anything else is ignored.
//! - **Trust.** After three consecutive valid fixes: RMC with status `A`, a mode indicator (NMEA
//!   2.3 and later) other than `N` (not valid), `E` (dead reckoning), `M` (manual) or `S`
//!   (simulator), a valid time and date, each later than the one before. An RMC that is not a
//!   valid fix, or no RMC for three seconds, starts the count again. A ZDA is used only while
//!   trusted and within two seconds of the last fix.
//! - **Samples.** One per sentence time (the first sentence of a fix, the one nearest the
//!   second). A receiver sends its sentences some tens to hundreds of milliseconds after the
//!   second they name, never before: with `m` the sentence's UTC minus the local time its line
//!   arrived, UTC − local lies in `[m, m + nmea_precision_ms]`, and that is the interval the
//!   sample claims (centred half the lag after `m`, see `serial_sample`).
//! - **Reachability.** While untrusted, each RMC counts as a missed poll; with no RMC for three
//!   seconds, or the device gone, a miss once per second. The device is opened again with a
//!   backoff of 1 s doubling to 30 s.
//!
//! The device is switched to raw mode (no echo, no line editing) but its speed is left as it is:
//! set it with `stty -F /dev/ttyS0 9600` (or a udev rule) to the receiver's.
//!
//! NMEA carries no leap-second warning in these sentences: samples carry
//! [`Leap::Unknown`](super::discipline::Leap::Unknown),
//! abstaining from the discipline's leap vote.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::discipline::Sample;
use super::gps::{
    send, serial_sample, wait_reporting, Lines, Liveness, Output, Stopped, EARLIEST_UTC_NS,
    MAX_BACKOFF, MIN_BACKOFF, TRUST_AFTER,
};
use super::local::LocalClock;
use super::service::SourceMessage;

const NS_PER_S: i64 = 1_000_000_000;
/// A ZDA further than this from the last fix is not used.
const ZDA_WINDOW_NS: i64 = 2 * NS_PER_S;

/// A sentence this reader uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sentence {
    /// `utc`: Unix nanoseconds when time and date are valid. `fix`: a valid fix.
    Rmc {
        utc: Option<i64>,
        fix: bool,
    },
    Zda {
        utc: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not `$…*hh`.
    Framing,
    BadChecksum,
    /// A well-formed sentence of another type.
    Unsupported,
    /// A supported type with unusable fields.
    Malformed,
}

/// The body between `$` and `*` when the checksum matches.
pub fn checked_body(line: &str) -> Result<&str, ParseError> {
    let line = line.trim();
    let rest = line.strip_prefix('$').ok_or(ParseError::Framing)?;
    let (body, sum) = rest.rsplit_once('*').ok_or(ParseError::Framing)?;
    if sum.len() != 2 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::Framing);
    }
    let expected = u8::from_str_radix(sum, 16).map_err(|_| ParseError::Framing)?;
    if body.bytes().fold(0u8, |acc, b| acc ^ b) != expected {
        return Err(ParseError::BadChecksum);
    }
    Ok(body)
}

/// Parses one line.
pub fn parse(line: &str) -> Result<Sentence, ParseError> {
    let body = checked_body(line)?;
    let fields: Vec<&str> = body.split(',').collect();
    match fields[0] {
        "GPRMC" | "GNRMC" => {
            if fields.len() < 10 {
                return Err(ParseError::Malformed);
            }
            let utc = match (hms(fields[1]), ddmmyy(fields[9])) {
                (Some(time), Some(date)) => utc_ns(date, time),
                _ => None,
            };
            let mode_ok = fields
                .get(12)
                .and_then(|m| m.chars().next())
                .is_none_or(|m| !matches!(m, 'N' | 'E' | 'M' | 'S'));
            Ok(Sentence::Rmc {
                utc,
                fix: fields[2] == "A" && mode_ok && utc.is_some(),
            })
        }
        "GPZDA" | "GNZDA" => {
            if fields.len() < 5 {
                return Err(ParseError::Malformed);
            }
            let date = (
                number(fields[4], 4),
                number(fields[3], 2),
                number(fields[2], 2),
            );
            let (Some(year), Some(month), Some(day)) = date else {
                return Err(ParseError::Malformed);
            };
            let time = hms(fields[1]).ok_or(ParseError::Malformed)?;
            utc_ns((year as i32, month, day), time)
                .map(|utc| Sentence::Zda { utc })
                .ok_or(ParseError::Malformed)
        }
        _ => Err(ParseError::Unsupported),
    }
}

/// Exactly `digits` ASCII digits.
fn number(s: &str, digits: usize) -> Option<u32> {
    (s.len() == digits && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// `hhmmss` with optional fraction: (hour, minute, second, nanoseconds). Second 60 is a leap
/// second.
fn hms(s: &str) -> Option<(u32, u32, u32, u32)> {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    let (h, m, sec) = (
        number(whole.get(0..2)?, 2)?,
        number(whole.get(2..4)?, 2)?,
        number(whole.get(4..)?, 2)?,
    );
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
            f.parse::<u32>().ok()? * 10u32.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
    };
    Some((h, m, sec, nanos))
}

/// `ddmmyy`, years 2000 to 2099.
fn ddmmyy(s: &str) -> Option<(i32, u32, u32)> {
    if s.len() != 6 {
        return None;
    }
    let (d, m, y) = (
        number(s.get(0..2)?, 2)?,
        number(s.get(2..4)?, 2)?,
        number(s.get(4..6)?, 2)?,
    );
    Some((2000 + y as i32, m, d))
}

fn utc_ns((y, mo, d): (i32, u32, u32), (h, mi, s, ns): (u32, u32, u32, u32)) -> Option<i64> {
    let midnight = NaiveDate::from_ymd_opt(y, mo, d)?
        .and_hms_opt(0, 0, 0)?
        .and_utc()
        .timestamp();
    let secs = midnight + i64::from(h * 3600 + mi * 60 + s);
    // Past 2262 nanoseconds since 1970 overflow an i64: such a date is no time to take.
    secs.checked_mul(NS_PER_S)?
        .checked_add(i64::from(ns))
        .filter(|_| secs >= 0)
}

/// The trust state machine of one NMEA receiver, fed lines and local times.
#[derive(Clone, Debug)]
pub struct NmeaTracker {
    precision: u64,
    fixes: u32,
    last_fix_utc: Option<i64>,
    last_sample_utc: Option<i64>,
    liveness: Liveness,
}

impl NmeaTracker {
    /// `precision` in nanoseconds; `now`: local time at start.
    pub fn new(precision: u64, now: u64) -> Self {
        Self {
            precision,
            fixes: 0,
            last_fix_utc: None,
            last_sample_utc: None,
            liveness: Liveness::new(now),
        }
    }

    pub fn trusted(&self) -> bool {
        self.fixes >= TRUST_AFTER
    }

    /// Nanoseconds since the last RMC; `None` after the device was lost.
    pub fn quiet_for(&self, now: u64) -> Option<u64> {
        self.liveness.quiet_for(now)
    }

    /// One line, received at local time `now`.
    pub fn line(&mut self, line: &str, now: u64) -> Output {
        match parse(line) {
            // A date before any this code can run at: the GPS week-number rollover bug
            // (`EARLIEST_UTC_NS`), no fix.
            Ok(Sentence::Rmc {
                utc: Some(utc),
                fix: true,
            }) if utc >= EARLIEST_UTC_NS => {
                self.liveness.heard(now);
                if self.last_fix_utc.is_some_and(|last| utc <= last) {
                    // A receiver whose time repeats or goes back starts again, and its
                    // samples from its new time on (not only once past the old one).
                    self.fixes = 0;
                    self.last_sample_utc = None;
                }
                self.fixes = self.fixes.saturating_add(1);
                self.last_fix_utc = Some(utc);
                if self.trusted() {
                    self.sample(utc, now)
                } else {
                    Output::Missed
                }
            }
            Ok(Sentence::Rmc { .. }) => {
                self.liveness.heard(now);
                self.fixes = 0;
                Output::Missed
            }
            Ok(Sentence::Zda { utc }) => {
                let near_fix = self
                    .last_fix_utc
                    .is_some_and(|fix| utc.abs_diff(fix) <= ZDA_WINDOW_NS as u64);
                if self.trusted() && near_fix {
                    self.sample(utc, now)
                } else {
                    Output::Nothing
                }
            }
            Err(_) => Output::Nothing,
        }
    }

    fn sample(&mut self, utc: i64, now: u64) -> Output {
        if self.last_sample_utc.is_some_and(|last| utc <= last) {
            return Output::Nothing;
        }
        // A trusted receiver's time that is no measurement: a miss, not silence.
        let Some(sample) = serial_sample(utc, now, self.precision).filter(Sample::is_plausible)
        else {
            return Output::Missed;
        };
        self.last_sample_utc = Some(utc);
        Output::Sample(sample)
    }

    /// A timer tick at local time `now`: the untrusting and the misses of silence.
    pub fn tick(&mut self, now: u64) -> Output {
        if self.liveness.silent(now) {
            self.fixes = 0;
        }
        if self.liveness.miss_due(now) {
            Output::Missed
        } else {
            Output::Nothing
        }
    }

    /// The device is gone: untrusted, and silent from now on.
    pub fn disconnected(&mut self) {
        self.fixes = 0;
        self.last_fix_utc = None;
        self.last_sample_utc = None;
        self.liveness.lost();
    }
}

/// One configured NMEA receiver.
#[derive(Clone, Debug)]
pub struct NmeaSource {
    pub device: PathBuf,
    /// Claimed for its samples.
    pub precision: Duration,
}

const MAX_LINE: usize = 1024;
const TICK: Duration = Duration::from_millis(250);
/// Without any byte for this long, the device is opened again.
const REOPEN_AFTER_NS: u64 = 10 * NS_PER_S as u64;

/// Reads the receiver at `source` forever, sending samples (or misses) for source `id`.
pub async fn run(
    id: usize,
    source: NmeaSource,
    clock: LocalClock,
    tx: mpsc::Sender<SourceMessage>,
) {
    let mut tracker = NmeaTracker::new(source.precision.as_nanos() as u64, clock.now());
    let mut backoff = MIN_BACKOFF;
    // Whether the device's failure to open was told since it last opened.
    let mut told = false;
    loop {
        match read_device(id, &source, clock, &tx, &mut tracker, &mut told).await {
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

/// Opens the device without blocking and without making it the controlling terminal, in raw
/// mode when it is a terminal.
fn open(path: &Path) -> std::io::Result<AsyncFd<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is open for the duration of these calls and `termios` is plain data that
    // tcgetattr fills before it is read.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            t.c_cflag |= libc::CLOCAL | libc::CREAD;
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                tracing::warn!(device = %path.display(), error = %std::io::Error::last_os_error(), "cannot switch the NMEA device to raw mode");
            }
            // What waited in the device's buffer before it was opened is old: stamped with
            // the time of its read, it would look fresh.
            libc::tcflush(fd, libc::TCIFLUSH);
        }
    }
    // SAFETY: the `File` owns its descriptor, which stays open and the same until the
    // `AsyncFd` (its only owner) drops it.
    let fd = unsafe { AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE) }?;
    Ok(fd)
}

/// Reads the device until it fails or stays quiet; `Ok(true)` when it delivered any line.
async fn read_device(
    id: usize,
    source: &NmeaSource,
    clock: LocalClock,
    tx: &mpsc::Sender<SourceMessage>,
    tracker: &mut NmeaTracker,
    told: &mut bool,
) -> Result<bool, Stopped> {
    let device = source.device.display();
    let fd = match open(&source.device) {
        Ok(fd) => fd,
        Err(e) => {
            // The operator's to see once (a device missing, or hidden by the service's
            // sandbox: systemd's PrivateDevices), not at every try.
            if std::mem::replace(told, true) {
                tracing::debug!(device = %device, error = %e, "cannot open the NMEA device");
            } else {
                tracing::warn!(device = %device, error = %e, "cannot open the NMEA device; trying again");
            }
            return Ok(false);
        }
    };
    *told = false;
    tracing::info!(event = "nmea_opened", device = %device, "reading NMEA");
    let mut lines = Lines::new(MAX_LINE);
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = false;
    let mut last_byte = clock.now();
    let mut trusted = tracker.trusted();
    let reason = loop {
        tokio::select! {
            guard = fd.readable() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(e) => break e.to_string(),
                };
                let read = guard.try_io(|inner| {
                    let mut file: &File = inner.get_ref();
                    file.read(&mut buf)
                });
                let n = match read {
                    Ok(Ok(0)) => break "end of file".to_string(),
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => break e.to_string(),
                    Err(_would_block) => continue,
                };
                let now = clock.now();
                last_byte = now;
                for line in lines.push(&buf[..n]) {
                    heard = true;
                    send(tx, id, tracker.line(&line, now)).await?;
                }
            }
            _ = tick.tick() => {
                let now = clock.now();
                send(tx, id, tracker.tick(now)).await?;
                if now.saturating_sub(last_byte) >= REOPEN_AFTER_NS {
                    break "nothing read for 10 s".to_string();
                }
            }
        }
        if tracker.trusted() != trusted {
            trusted = tracker.trusted();
            if trusted {
                tracing::info!(event = "gps_trusted", device = %device, "NMEA receiver trusted: three valid fixes");
            } else {
                tracing::warn!(event = "gps_untrusted", device = %device, "NMEA receiver no longer trusted (fix lost or silent)");
            }
        }
    };
    tracing::warn!(event = "nmea_lost", device = %device, reason, "lost the NMEA device; opening it again");
    Ok(heard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::discipline::Leap;

    const S: u64 = NS_PER_S as u64;
    /// 2024-05-01T12:00:00Z.
    const T0: u64 = 1_714_564_800 * S;

    /// A sentence with its checksum.
    fn nmea(body: &str) -> String {
        let sum = body.bytes().fold(0u8, |a, b| a ^ b);
        format!("${body}*{sum:02X}\r\n")
    }

    fn rmc(utc: u64, status: &str) -> String {
        let t = chrono::DateTime::from_timestamp_nanos(utc as i64);
        nmea(&format!(
            "GPRMC,{},{status},4807.038,N,01131.000,E,022.4,084.4,{},003.1,W,A",
            t.format("%H%M%S%.3f"),
            t.format("%d%m%y")
        ))
    }

    fn zda(utc: u64) -> String {
        let t = chrono::DateTime::from_timestamp_nanos(utc as i64);
        nmea(&format!(
            "GNZDA,{}.{:02},{},00,00",
            t.format("%H%M%S"),
            utc % S / 10_000_000,
            t.format("%d,%m,%Y")
        ))
    }

    #[test]
    fn parses_rmc_and_zda() {
        // The classic example (two-digit years are taken as 20yy).
        assert!(matches!(
            parse("$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"),
            Ok(Sentence::Rmc {
                utc: Some(_),
                fix: true
            })
        ));
        assert_eq!(
            parse(&zda(T0 + 250_000_000)),
            Ok(Sentence::Zda {
                utc: (T0 + 250_000_000) as i64
            })
        );
        assert_eq!(
            parse(&rmc(T0 + 500_000_000, "A")),
            Ok(Sentence::Rmc {
                utc: Some((T0 + 500_000_000) as i64),
                fix: true
            })
        );
        assert_eq!(
            parse(&rmc(T0, "V")),
            Ok(Sentence::Rmc {
                utc: Some(T0 as i64),
                fix: false
            })
        );
        // NMEA 2.3 mode indicator N: not a fix even with status A.
        assert_eq!(
            parse(&nmea(
                "GNRMC,120000.00,A,4807.038,N,01131.000,E,0,0,010524,,,N"
            )),
            Ok(Sentence::Rmc {
                utc: Some(T0 as i64),
                fix: false
            })
        );
        // A leap second.
        assert_eq!(
            parse(&nmea("GPZDA,235960.00,31,12,2016,00,00")),
            Ok(Sentence::Zda {
                utc: 1_483_228_800 * NS_PER_S
            })
        );
    }

    #[test]
    fn bad_checksums_and_garbage_are_refused_without_panic() {
        let good = rmc(T0, "A");
        let bad = good.replace("*", "0*");
        assert_eq!(parse(&bad), Err(ParseError::BadChecksum));
        let lower = good.to_lowercase().replace("$gprmc", "$GPRMC");
        assert!(parse(&lower).is_err());
        for line in [
            "",
            "$",
            "*",
            "$*",
            "$*00",
            "GPRMC,120000,A,,,,,,,010524,,*00",
            "$GPRMC,120000,A,,,,,,,010524,,",
            "$GPRMC,120000,A,,,,,,,010524,,*0",
            "$GPRMC,120000,A,,,,,,,010524,,*ZZ",
            "$GPRMC,120000,A,,,,,,,010524,,*€€",
            "$€*00",
            "$GPRMC*",
            "\u{0}\u{fffd}$$$***",
        ] {
            assert!(parse(line).is_err(), "{line:?}");
        }
        assert_eq!(
            parse(&nmea("GPGGA,120000,4807.038,N")),
            Err(ParseError::Unsupported)
        );
        assert_eq!(parse(&nmea("")), Err(ParseError::Unsupported));
        assert_eq!(parse(&nmea("GPRMC,120000,A")), Err(ParseError::Malformed));
        assert_eq!(
            parse(&nmea("GPZDA,120000,01,05")),
            Err(ParseError::Malformed)
        );
        for body in [
            "GPZDA,12000,01,05,2024,00,00",
            "GPZDA,120000,32,05,2024,00,00",
            "GPZDA,120000,01,13,2024,00,00",
            "GPZDA,250000,01,05,2024,00,00",
            "GPZDA,120000.,01,05,2024,00,00",
            "GPZDA,120000.1234567890,01,05,2024,00,00",
            "GPZDA,12€000,01,05,2024,00,00",
            "GPZDA,120000,01,05,-024,00,00",
            // Past what nanoseconds since 1970 hold (2262): refused, not overflowed.
            "GPZDA,120000,01,05,2300,00,00",
            "GPZDA,235959.999999999,31,12,9999,00,00",
        ] {
            assert_eq!(parse(&nmea(body)), Err(ParseError::Malformed), "{body}");
        }
        // RMC with garbage time or date: not a fix.
        for body in [
            "GPRMC,1200xx,A,4807.038,N,01131.000,E,0,0,010524,,",
            "GPRMC,120000,A,4807.038,N,01131.000,E,0,0,310224,,",
            "GPRMC,120000,A,4807.038,N,01131.000,E,0,0,,,",
        ] {
            assert!(
                matches!(parse(&nmea(body)), Ok(Sentence::Rmc { fix: false, .. })),
                "{body}"
            );
        }
    }

    /// A receiver with the GPS week-number rollover bug names dates 1024 weeks back: valid
    /// sentences, a time that rises, and never trusted (its offset of 19.6 years would pass
    /// for a measurement, and veto every other source).
    #[test]
    fn dates_of_the_week_number_rollover_are_no_fix() {
        const ROLLOVER: u64 = 1024 * 7 * 86_400 * S;
        let mut t = NmeaTracker::new(500_000_000, T0);
        for i in 0..10 {
            let local = T0 + i * S;
            let named = local - ROLLOVER;
            assert_eq!(
                t.line(&rmc(named, "A"), local + 100_000_000),
                Output::Missed
            );
            assert!(!t.trusted(), "fix {i}");
        }
        // The same receiver once it names today's date: trusted after three fixes.
        for i in 0..3 {
            let utc = T0 + (20 + i) * S;
            t.line(&rmc(utc, "A"), utc + 100_000_000);
        }
        assert!(t.trusted());
    }

    #[test]
    fn three_valid_fixes_make_the_receiver_trusted() {
        let mut t = NmeaTracker::new(500_000_000, T0);
        for i in 0..2 {
            let utc = T0 + i * S;
            assert_eq!(t.line(&rmc(utc, "A"), utc + 100_000_000), Output::Missed);
            // ZDA is not used before trust.
            assert_eq!(t.line(&zda(utc), utc + 110_000_000), Output::Nothing);
        }
        let utc = T0 + 2 * S;
        let Output::Sample(s) = t.line(&rmc(utc, "A"), utc + 100_000_000) else {
            panic!("no sample after three fixes")
        };
        // 100 ms after its second, with up to 500 ms of lag: UTC − local in [-100, 400] ms.
        assert_eq!(s.offset, 150_000_000);
        assert_eq!(s.at, utc + 100_000_000);
        assert_eq!(s.precision, 250_000_000);
        assert_eq!(s.leap, Leap::Unknown);
        // The ZDA of the same second adds nothing; the next second's ZDA is a sample.
        assert_eq!(t.line(&zda(utc), utc + 120_000_000), Output::Nothing);
        let utc = utc + S;
        assert!(matches!(
            t.line(&zda(utc), utc + 50_000_000),
            Output::Sample(s) if s.offset == 200_000_000
        ));
        // A ZDA far from the last fix is not used.
        let far = utc + 10 * S;
        assert_eq!(t.line(&zda(far), utc + 60_000_000), Output::Nothing);
    }

    #[test]
    fn a_sentence_arriving_late_gives_an_interval_that_holds_the_truth() {
        // The local clock is on UTC. A receiver sends each sentence 10 to 700 ms after the
        // second it names, so UTC − local lies between the sentence's time minus the arrival
        // (m) and m plus the lag: never below m. With the configured default, every lag up to
        // 700 ms is covered.
        let precision = crate::config::ClockConfig::default().nmea_precision_ms * 1_000_000;
        let mut t = NmeaTracker::new(precision, T0);
        for i in 0..2 {
            t.line(&rmc(T0 + i * S, "A"), T0 + i * S + 10_000_000);
        }
        for (i, lag) in [10, 100, 600, 700].into_iter().enumerate() {
            let utc = T0 + (2 + i as u64) * S;
            let lag = lag * 1_000_000;
            let Output::Sample(s) = t.line(&rmc(utc, "A"), utc + lag) else {
                panic!("no sample at lag {lag}")
            };
            let (low, high) = (
                s.offset - s.static_distance() as i64,
                s.offset + s.static_distance() as i64,
            );
            let m = -(lag as i64);
            assert!(low <= 0 && 0 <= high, "lag {lag}: [{low}, {high}] misses 0");
            assert!(low >= m, "lag {lag}: [{low}, {high}] reaches below {m}");
        }
    }

    #[test]
    fn an_invalid_fix_or_a_bad_checksum_line_does_not_count() {
        fn feed(t: &mut NmeaTracker, utc: &mut u64, status: &str) -> Output {
            *utc += S;
            t.line(&rmc(*utc, status), *utc)
        }
        let mut t = NmeaTracker::new(500_000_000, T0);
        let mut utc = T0;
        for status in ["A", "A", "V", "A", "A"] {
            assert_eq!(feed(&mut t, &mut utc, status), Output::Missed);
        }
        // A corrupted fix neither counts nor resets.
        let corrupt = rmc(utc + S, "A").replace("4807", "4806");
        assert_eq!(t.line(&corrupt, utc + S), Output::Nothing);
        assert!(!t.trusted());
        assert!(matches!(feed(&mut t, &mut utc, "A"), Output::Sample(_)));
        assert!(t.trusted());
        assert_eq!(feed(&mut t, &mut utc, "V"), Output::Missed);
        assert!(!t.trusted());
    }

    #[test]
    fn time_going_back_restarts_the_count() {
        let mut t = NmeaTracker::new(500_000_000, T0);
        for utc in [T0, T0 + S, T0 + S, T0 + 2 * S] {
            assert_eq!(t.line(&rmc(utc, "A"), utc), Output::Missed);
        }
        assert!(matches!(
            t.line(&rmc(T0 + 3 * S, "A"), T0 + 3 * S),
            Output::Sample(_)
        ));
        // Its time corrected a minute back (a leap-second count learnt after a cold start):
        // trusted again after three fixes, and sampled from then on, not silent until its
        // time passes the old one.
        let local = T0 + 4 * S;
        for i in 0..2 {
            let out = t.line(&rmc(T0 - 60 * S + i * S, "A"), local + i * S);
            assert_eq!(out, Output::Missed, "fix {i}");
        }
        let out = t.line(&rmc(T0 - 58 * S, "A"), local + 2 * S);
        assert!(
            matches!(out, Output::Sample(s) if s.offset < -60 * S as i64),
            "{out:?}"
        );
    }

    #[test]
    fn silence_untrusts_and_misses_once_a_second() {
        let mut t = NmeaTracker::new(500_000_000, T0);
        for i in 0..3 {
            t.line(&rmc(T0 + i * S, "A"), T0 + i * S);
        }
        assert!(t.trusted());
        let last = T0 + 2 * S;
        assert_eq!(t.tick(last + S), Output::Nothing);
        // Only ZDA keeps coming: silence all the same.
        let mut misses = 0;
        for q in 1..=20 {
            let now = last + q * S / 4;
            t.line(&zda(now), now);
            if t.tick(now) == Output::Missed {
                misses += 1;
            }
        }
        assert_eq!(misses, 3, "silent from +3 s to +5 s");
        assert!(!t.trusted());
        t.disconnected();
        assert_eq!(t.tick(last + 6 * S), Output::Missed);
        assert_eq!(t.quiet_for(last + 6 * S), None);
    }
}
