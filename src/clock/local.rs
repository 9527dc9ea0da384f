//! The local clock the discipline works on: Linux's `CLOCK_MONOTONIC_RAW`, anchored once to
//! the Unix epoch. It never steps, whatever happens to the wall clock, and it runs at the rate
//! of the hardware oscillator: unlike `CLOCK_MONOTONIC` (what `std::time::Instant` reads), it
//! is not slewed by `adjtimex` (frequency, offset or tick adjustments, which an NTP daemon or
//! anyone with `CAP_SYS_TIME` can make, up to ±10 % with `ADJ_TICK`). The discipline measures
//! and bounds the oscillator's own frequency error; nothing outside the process changes it.

use super::system_unix_ns;

#[derive(Clone, Copy, Debug)]
pub struct LocalClock {
    epoch_ns: u64,
    /// `CLOCK_MONOTONIC_RAW` when `epoch_ns` was read.
    start_raw: u64,
}

/// `clock` (a constant Linux supports) in nanoseconds.
fn read_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the callers pass constant clock ids.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC_RAW` in nanoseconds (since an unspecified point, usually the boot).
fn raw_ns() -> u64 {
    read_ns(libc::CLOCK_MONOTONIC_RAW)
}

/// `CLOCK_BOOTTIME` in nanoseconds: monotonic time that goes on while the host is suspended,
/// for measuring how long something took in the world's time (a signature that a suspend
/// interrupted took the suspend's length, which `std::time::Instant` does not count).
pub fn boot_ns() -> u64 {
    read_ns(libc::CLOCK_BOOTTIME)
}

/// How long the host has been suspended (or hibernated) since it booted, in nanoseconds.
///
/// The local clock stands still during a suspend while UTC goes on, which no sample or bound
/// shows until the next poll: after an hour asleep, the model would answer an hour in the
/// past with a bound of milliseconds. `CLOCK_BOOTTIME` counts the suspend and
/// `CLOCK_MONOTONIC` does not; both are slewed alike, so their difference moves only across a
/// suspend, by its length. (A virtual machine paused by its host is not a suspend of the
/// guest: no clock tells it, and only the next samples do.) Read between two monotonic
/// readings less than 0.1 ms apart where the scheduler allows, so that the result is good to
/// well under [`SUSPEND_TOLERANCE_NS`].
pub fn suspended_ns() -> u64 {
    // (spread, reading): the reading between the closest pair of monotonic readings.
    let mut best = (u64::MAX, 0);
    for _ in 0..8 {
        let before = read_ns(libc::CLOCK_MONOTONIC);
        let boot = read_ns(libc::CLOCK_BOOTTIME);
        let after = read_ns(libc::CLOCK_MONOTONIC);
        let spread = after - before;
        if spread < best.0 {
            best = (spread, boot.saturating_sub(before + spread / 2));
        }
        if spread < 100_000 {
            break;
        }
    }
    best.1
}

/// A growth of [`suspended_ns`] beyond this is a suspend (no suspend and resume takes under
/// a second; the reading's own error is far below).
pub const SUSPEND_TOLERANCE_NS: u64 = 1_000_000;

/// Whether the host was suspended between two readings of [`suspended_ns`].
pub fn suspended_between(before_ns: u64, after_ns: u64) -> bool {
    after_ns > before_ns.saturating_add(SUSPEND_TOLERANCE_NS)
}

/// The earliest instant the local clock starts at (2020-01-01T00:00:00Z), whatever the wall
/// clock says at start (a host whose clock was reset to 1970): the offsets the discipline
/// measures from it then stay below 2^31 s until 2088, where NTP's 32.32 arithmetic (sntpc
/// takes the timestamps' differences modulo 2^32 s) would fold a larger one into a wrong
/// offset of the other sign that every server agreed on.
const EARLIEST_START_NS: u64 = 1_577_836_800 * 1_000_000_000;

/// Where the local clock starts, the wall clock reading `wall_ns` at start.
fn start_at(wall_ns: u64) -> u64 {
    wall_ns.max(EARLIEST_START_NS)
}

impl LocalClock {
    pub fn new() -> Self {
        Self {
            start_raw: raw_ns(),
            epoch_ns: start_at(system_unix_ns()),
        }
    }

    /// Local nanoseconds: the wall clock at start plus raw monotonic time since.
    pub fn now(&self) -> u64 {
        self.epoch_ns + raw_ns().saturating_sub(self.start_raw)
    }

    /// The wall clock minus the local clock. It moves slowly while something slews the wall
    /// clock and jumps when the wall clock is stepped.
    pub fn wall_offset(&self) -> i64 {
        let local = self.now();
        system_unix_ns() as i64 - local as i64
    }
}

impl Default for LocalClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Watches the wall clock against the local clock and reports steps: the kernel clock as a
/// cross-check. A step moves nothing in the TSA's time; it is an event for the operator.
///
/// The local clock is the raw oscillator, which no daemon slews, so a daemon's slew of the
/// wall clock shows up here in full: chrony slews at up to 83,333 ppm (its `maxslewrate`, with
/// `ADJ_TICK`) on top of its frequency correction (up to 500 ppm). A change faster than that
/// is a step; a slower one is not told apart from a slew, so the watch is fed often (every
/// second, where a step of about 90 ms or more is told). A slew faster than chrony's (the
/// kernel's PLL with a short time constant, or a hand-set `ADJ_TICK` near its ±10 %) can be
/// reported as a step: the report is for the operator and moves nothing.
pub struct WallClockWatch {
    last: Option<(u64, i64)>,
}

/// The fastest a wall clock is slewed: chrony's 83,333 ppm plus a frequency of 500 ppm.
pub(super) const MAX_SLEW_RATE: f64 = 83_333e-6 + 500e-6;
/// A wall-clock change faster than [`MAX_SLEW_RATE`] plus this is a step.
const STEP_TOLERANCE_NS: u64 = 5_000_000;

impl WallClockWatch {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Feed (local time, wall offset); returns the step in nanoseconds when one happened.
    pub fn observe(&mut self, local: u64, wall_offset: i64) -> Option<i64> {
        let step = self.last.and_then(|(at, offset)| {
            let change = wall_offset - offset;
            let slew_limit = (local.saturating_sub(at) as f64 * MAX_SLEW_RATE) as u64;
            (change.unsigned_abs() > slew_limit + STEP_TOLERANCE_NS).then_some(change)
        });
        self.last = Some((local, wall_offset));
        step
    }
}

impl Default for WallClockWatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_clock_is_monotonic_and_near_the_wall_clock() {
        let clock = LocalClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        assert!(clock.wall_offset().unsigned_abs() < 1_000_000_000);
    }

    /// A wall clock reset to 1970 at start: the local clock starts in 2020 (offsets to UTC
    /// stay below NTP's 68-year fold); a wall clock after that is taken as it is.
    #[test]
    fn the_local_clock_never_starts_before_2020() {
        assert_eq!(start_at(0), EARLIEST_START_NS);
        assert_eq!(start_at(86_400_000_000_000), EARLIEST_START_NS);
        let now = system_unix_ns();
        assert_eq!(start_at(now), now);
        assert!(LocalClock::new().now() >= now);
    }

    #[test]
    fn local_clock_runs_on_the_raw_oscillator() {
        // CLOCK_MONOTONIC and CLOCK_MONOTONIC_RAW part as soon as anything slews the kernel
        // clock (any NTP daemon does); the local clock must read the raw one.
        let read = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            assert_eq!(unsafe { libc::clock_gettime(id, &mut ts) }, 0);
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        };
        let before = read(libc::CLOCK_MONOTONIC_RAW);
        let clock = LocalClock::new();
        let after = read(libc::CLOCK_MONOTONIC_RAW);
        assert!(
            (before..=after).contains(&clock.start_raw),
            "start {} not within [{before}, {after}]",
            clock.start_raw
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before = read(libc::CLOCK_MONOTONIC_RAW) - clock.start_raw;
        let elapsed = clock.now() - clock.epoch_ns;
        let after = read(libc::CLOCK_MONOTONIC_RAW) - clock.start_raw;
        assert!((before..=after).contains(&elapsed));
    }

    #[test]
    fn the_suspended_time_holds_still_while_the_host_runs() {
        let first = suspended_ns();
        let mut last = first;
        let end = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < end {
            let now = suspended_ns();
            assert!(now.abs_diff(last) < SUSPEND_TOLERANCE_NS, "{last} -> {now}");
            last = now;
        }
    }

    #[test]
    fn wall_clock_steps_are_told_from_slews() {
        let mut watch = WallClockWatch::new();
        let s = 1_000_000_000u64;
        assert_eq!(watch.observe(0, 0), None);
        // A slew of 400 ppm over 10 s: 4 ms, not a step.
        assert_eq!(watch.observe(10 * s, 4_000_000), None);
        // A jump of 2 s within a second: a step.
        assert_eq!(watch.observe(11 * s, 2_004_000_000), Some(2_000_000_000));
        // Back by 1 s: a step the other way.
        assert_eq!(watch.observe(12 * s, 1_004_000_000), Some(-1_000_000_000));
    }

    #[test]
    fn the_fastest_slew_of_an_ntp_daemon_is_not_a_step() {
        // chrony slews the wall clock at up to 83,333 ppm (ADJ_TICK), against the raw clock
        // that nothing slews: over 16 s, 1.33 s, in either direction.
        let mut watch = WallClockWatch::new();
        let s = 1_000_000_000u64;
        assert_eq!(watch.observe(0, 0), None);
        assert_eq!(watch.observe(16 * s, 1_333_333_328), None);
        assert_eq!(watch.observe(32 * s, 0), None);
        assert_eq!(watch.observe(33 * s, -83_333_333), None);
        // Faster than chrony ever slews: a step.
        assert!(watch.observe(34 * s, 200_000_000).is_some());
    }
}
