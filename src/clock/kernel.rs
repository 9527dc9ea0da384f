//! The kernel clock, trusted only while the kernel says it is synchronized.
//!
//! `adjtimex(2)` with no modes reads the kernel's NTP state: `STA_UNSYNC` (or the return value
//! `TIME_ERROR`) means nothing disciplines the clock, and `maxerror` is the kernel's bound on
//! its error, which grows by 500 ppm while no daemon updates it. Leap seconds: while the kernel
//! inserts one (`TIME_OOP`) it replays 23:59:59, so the clock is refused then, and, as the
//! disciplined clock does, from 23:59:59 to 00:00:01 UTC whenever a leap is pending or just
//! happened (`TIME_INS`, `TIME_DEL`, `TIME_WAIT`, or `STA_INS`/`STA_DEL` set). The adapter is thin: the
//! decision is [`KernelClock::judge`], which tests reach through an injected reading.

use std::sync::{Arc, OnceLock};

use super::{system_unix_ns, Reading, SyncState, TimeSource};

/// What the kernel said, at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelState {
    pub unix_ns: u64,
    /// What `adjtimex` returned: the clock state (`TIME_OK`, `TIME_INS`, `TIME_DEL`,
    /// `TIME_OOP`, `TIME_WAIT`, `TIME_ERROR`), or −1.
    pub rc: i32,
    /// `timex.status` (`STA_UNSYNC`, `STA_INS`, `STA_DEL`, …).
    pub status: i32,
    /// The kernel's maximum error, in microseconds.
    pub max_error_us: i64,
}

/// Where kernel readings come from: the real kernel, or a test.
pub trait KernelApi: Send + Sync + 'static {
    fn state(&self) -> KernelState;
}

/// Linux's `adjtimex(2)`, read-only.
pub struct Adjtimex;

impl KernelApi for Adjtimex {
    fn state(&self) -> KernelState {
        // SAFETY: `timex` is plain data; `modes == 0` makes adjtimex only read the kernel state.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::adjtimex(&mut tx) };
        let unix_ns = system_unix_ns();
        KernelState {
            unix_ns,
            rc,
            status: tx.status,
            max_error_us: tx.maxerror,
        }
    }
}

pub struct KernelClock<A: KernelApi = Adjtimex> {
    api: A,
}

/// Why the kernel clock is (not) trusted; shared, so that a reading allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Synchronized,
    Unsynchronized,
    Leap,
}

fn reason(verdict: Verdict) -> Arc<str> {
    static REASONS: [OnceLock<Arc<str>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
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
            }
            .into()
        })
        .clone()
}

const NS_PER_S: u64 = 1_000_000_000;

/// Within a second of a UTC midnight: from 23:59:59 to 00:00:01.
fn near_midnight(unix_ns: u64) -> bool {
    let into_day = unix_ns % (86_400 * NS_PER_S);
    !(NS_PER_S..86_399 * NS_PER_S).contains(&into_day)
}

impl KernelClock<Adjtimex> {
    pub fn new() -> Self {
        Self { api: Adjtimex }
    }
}

impl Default for KernelClock<Adjtimex> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: KernelApi> KernelClock<A> {
    pub fn with_api(api: A) -> Self {
        Self { api }
    }

    /// Turns what the kernel said into a reading.
    pub fn judge(state: KernelState) -> Reading {
        let unsynchronized =
            state.rc < 0 || state.rc == libc::TIME_ERROR || state.status & libc::STA_UNSYNC != 0;
        let leap_pending = matches!(state.rc, libc::TIME_INS | libc::TIME_DEL | libc::TIME_WAIT)
            || state.status & (libc::STA_INS | libc::STA_DEL) != 0;
        let verdict = if unsynchronized || state.max_error_us < 0 {
            Verdict::Unsynchronized
        } else if state.rc == libc::TIME_OOP || (leap_pending && near_midnight(state.unix_ns)) {
            Verdict::Leap
        } else {
            Verdict::Synchronized
        };
        Reading {
            unix_ns: state.unix_ns,
            bound_ns: match verdict {
                Verdict::Synchronized => state.max_error_us as u64 * 1_000,
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
        Self::judge(self.api.state())
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
        }
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
    fn synchronized_kernel_gives_its_max_error() {
        let r = KernelClock::<Adjtimex>::judge(state(5, libc::TIME_OK, 0));
        assert_eq!(r.state, SyncState::Synchronized);
        assert_eq!(r.bound_ns, 1_500_000);
    }

    #[test]
    fn the_real_kernel_answers() {
        let state = Adjtimex.state();
        let now = system_unix_ns();
        assert!(state.unix_ns <= now && now - state.unix_ns < 1_000_000_000);
    }
}
