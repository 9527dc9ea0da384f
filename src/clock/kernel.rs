//! The kernel clock, trusted only while the kernel says it is synchronized.
//!
//! `adjtimex(2)` with no modes reads the kernel's NTP state: `STA_UNSYNC` (or the return value
//! `TIME_ERROR`) means nothing disciplines the clock, and `maxerror` is the kernel's bound on
//! its error, which grows by 500 ppm while no daemon updates it. The adapter is thin: the
//! decision is [`KernelClock::judge`], which tests reach through an injected reading.

use std::sync::{Arc, OnceLock};

use super::{system_unix_ns, Reading, SyncState, TimeSource};

/// What the kernel said, at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelState {
    pub unix_ns: u64,
    /// `adjtimex` returned `TIME_ERROR` or reported `STA_UNSYNC`.
    pub unsynchronized: bool,
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
            unsynchronized: rc < 0 || rc == libc::TIME_ERROR || tx.status & libc::STA_UNSYNC != 0,
            max_error_us: tx.maxerror,
        }
    }
}

pub struct KernelClock<A: KernelApi = Adjtimex> {
    api: A,
}

fn reason(synchronized: bool) -> Arc<str> {
    static SYNC: OnceLock<Arc<str>> = OnceLock::new();
    static UNSYNC: OnceLock<Arc<str>> = OnceLock::new();
    if synchronized {
        SYNC.get_or_init(|| "the kernel reports its clock synchronized".into())
            .clone()
    } else {
        UNSYNC
            .get_or_init(|| "the kernel reports its clock unsynchronized (STA_UNSYNC)".into())
            .clone()
    }
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
        if state.unsynchronized || state.max_error_us < 0 {
            return Reading {
                unix_ns: state.unix_ns,
                bound_ns: u64::MAX,
                state: SyncState::Unsynchronized,
                reason: reason(false),
            };
        }
        Reading {
            unix_ns: state.unix_ns,
            bound_ns: state.max_error_us as u64 * 1_000,
            state: SyncState::Synchronized,
            reason: reason(true),
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

    #[test]
    fn unsynchronized_kernel_is_not_trusted() {
        let r = KernelClock::<Adjtimex>::judge(KernelState {
            unix_ns: 5,
            unsynchronized: true,
            max_error_us: 100,
        });
        assert_eq!(r.state, SyncState::Unsynchronized);
    }

    #[test]
    fn synchronized_kernel_gives_its_max_error() {
        let r = KernelClock::<Adjtimex>::judge(KernelState {
            unix_ns: 5,
            unsynchronized: false,
            max_error_us: 1_500,
        });
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
