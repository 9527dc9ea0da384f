//! The local clock the discipline works on: the monotonic clock, anchored once to the Unix
//! epoch. It never steps, whatever happens to the wall clock.

use std::time::Instant;

use super::system_unix_ns;

#[derive(Clone, Copy, Debug)]
pub struct LocalClock {
    epoch_ns: u64,
    start: Instant,
}

impl LocalClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            epoch_ns: system_unix_ns(),
        }
    }

    /// Local nanoseconds: the wall clock at start plus monotonic time since.
    pub fn now(&self) -> u64 {
        self.epoch_ns + self.start.elapsed().as_nanos() as u64
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
pub struct WallClockWatch {
    last: Option<(u64, i64)>,
}

/// A wall-clock change faster than any slew (500 ppm) plus this is a step.
const STEP_TOLERANCE_NS: u64 = 5_000_000;

impl WallClockWatch {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Feed (local time, wall offset); returns the step in nanoseconds when one happened.
    pub fn observe(&mut self, local: u64, wall_offset: i64) -> Option<i64> {
        let step = self.last.and_then(|(at, offset)| {
            let change = wall_offset - offset;
            let slew_limit = (local.saturating_sub(at) as f64 * 500e-6) as u64;
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
}
