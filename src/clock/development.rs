//! The development clock: the system clock, trusted with an accuracy the operator declares.
//!
//! It exists so that a TSA can run on a laptop or in CI, where no synchronized clock is to be
//! had. It is enabled only explicitly, announced loudly at start-up, and the server pairs it
//! with the development policy OID so that its tokens can never pass for production ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::kernel::{Adjtimex, KernelApi};
use super::{system_unix_ns, Reading, SyncState, TimeSource};

pub struct DevelopmentClock {
    declared_bound_ns: u64,
    reason: Arc<str>,
    kernel: Box<dyn KernelApi>,
    /// The kernel's own bound on the system clock's error (its `maxerror`, and the 500 µs a
    /// reading may lag it), while it counts the clock synchronized; 0 while it does not.
    kernel_bound_ns: AtomicU64,
    /// The second (Unix) of the last kernel reading: read again at most once a second.
    kernel_read_s: AtomicU64,
}

impl DevelopmentClock {
    pub fn new(declared_accuracy: Duration) -> Self {
        Self::with_kernel(declared_accuracy, Box::new(Adjtimex))
    }

    /// [`DevelopmentClock::new`] over the kernel readings of `kernel` (tests).
    pub fn with_kernel(declared_accuracy: Duration, kernel: Box<dyn KernelApi>) -> Self {
        Self {
            declared_bound_ns: declared_accuracy.as_nanos() as u64,
            reason: "development clock: the system clock with a declared accuracy, or the \
                     kernel's bound where it is larger"
                .into(),
            kernel,
            kernel_bound_ns: AtomicU64::new(0),
            kernel_read_s: AtomicU64::new(u64::MAX),
        }
    }

    /// The kernel's bound at `now_ns`, read again once a second (a system call a token
    /// would otherwise cost).
    fn kernel_bound_ns(&self, now_ns: u64) -> u64 {
        let second = now_ns / 1_000_000_000;
        // Loaded first: a token writes nothing shared unless the second changed.
        if self.kernel_read_s.load(Ordering::Relaxed) != second
            && self.kernel_read_s.swap(second, Ordering::Relaxed) != second
        {
            let state = self.kernel.state();
            let bound = match state.unsynchronized() || state.max_error_us < 0 {
                true => 0,
                false => (state.max_error_us as u64)
                    .saturating_add(500)
                    .saturating_mul(1_000),
            };
            self.kernel_bound_ns.store(bound, Ordering::Relaxed);
        }
        self.kernel_bound_ns.load(Ordering::Relaxed)
    }
}

impl TimeSource for DevelopmentClock {
    fn name(&self) -> &'static str {
        "development"
    }

    /// The system clock, with the declared accuracy as its bound, or the kernel's where the
    /// kernel counts the clock synchronized and bounds it more widely (a time daemon that
    /// lost its sources for a while): honest as far as the kernel can tell. Where the kernel
    /// does not count it synchronized (this is told at start), only the declaration stands.
    fn read(&self) -> Reading {
        let unix_ns = system_unix_ns();
        Reading {
            unix_ns,
            bound_ns: self.declared_bound_ns.max(self.kernel_bound_ns(unix_ns)),
            state: SyncState::Synchronized,
            reason: self.reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::clock::kernel::KernelState;

    /// A kernel whose state the test sets.
    struct Scripted(Arc<Mutex<KernelState>>);

    impl KernelApi for Scripted {
        fn state(&self) -> KernelState {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn the_kernels_bound_stands_where_it_is_wider_than_the_declared_one() {
        let state = Arc::new(Mutex::new(KernelState {
            unix_ns: 0,
            rc: libc::TIME_OK,
            status: 0,
            max_error_us: 250_000,
            est_error_us: 0,
            frequency: (0, 10_000),
            offset_ns: 0,
            adjtime_ns: 0,
        }));
        let clock = DevelopmentClock::with_kernel(
            Duration::from_millis(100),
            Box::new(Scripted(state.clone())),
        );
        // Synchronized, 250 ms of maximum error: that (and the 500 µs of lag) is the bound.
        assert_eq!(clock.read().bound_ns, 250_500_000);
        // Within the same second the reading is kept; from the next one the kernel's new
        // state counts: 20 ms is within the declared 100 ms.
        state.lock().unwrap().max_error_us = 20_000;
        clock.kernel_read_s.store(0, Ordering::Relaxed);
        assert_eq!(clock.read().bound_ns, 100_000_000);
        // Unsynchronized: only the declaration stands (said at start).
        state.lock().unwrap().status = libc::STA_UNSYNC;
        state.lock().unwrap().max_error_us = 16_000_000;
        clock.kernel_read_s.store(0, Ordering::Relaxed);
        assert_eq!(clock.read().bound_ns, 100_000_000);
    }
}
