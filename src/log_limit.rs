//! Log lines of refused requests (and of other lines a flood repeats), one a second per kind.
//!
//! Every refusal is counted in the metrics and answered with its reason; the log keeps the
//! first of each second with the number left out since the last line. A flood of bad,
//! unauthenticated or over-quota requests (or requests while the clock or the HSM is out,
//! whose own events are logged once) then costs the log a line a second, not a line a
//! request: no write per request on the path that refuses, and no disk filled by an attacker.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of refusal's log budget; a `static` at the place that logs it.
pub(crate) struct LogLimit {
    /// The Unix second of the last line, plus one (0: never).
    last_s: AtomicU64,
    /// Refusals not logged since that line.
    left_out: AtomicU64,
}

impl LogLimit {
    pub(crate) const fn new() -> Self {
        Self {
            last_s: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// Whether to log this refusal now (`Some` with how many were left out since the last
    /// line), or only count it.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(crate::clock::system_unix_ns() / 1_000_000_000)
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let last = self.last_s.load(Ordering::Relaxed);
        if last != second + 1
            && self
                .last_s
                .compare_exchange(last, second + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::LogLimit;

    #[test]
    fn one_line_a_second_with_the_count_left_out() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow_at(100), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow_at(100), None);
        }
        assert_eq!(limit.allow_at(101), Some(5));
        assert_eq!(limit.allow_at(101), None);
        // A quiet spell: the next line comes at once and says what the last second left out.
        assert_eq!(limit.allow_at(250), Some(1));
        // The wall clock went back: a new second all the same.
        assert_eq!(limit.allow_at(249), Some(0));
    }

    #[test]
    fn threads_share_one_line_a_second() {
        let limit = LogLimit::new();
        let logged: u64 = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter(|_| limit.allow_at(7).is_some()).count()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap() as u64).sum()
        });
        assert_eq!(logged, 1);
        assert_eq!(limit.allow_at(8), Some(3999));
    }
}
