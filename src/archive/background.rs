//! Threads of the SQLite archive beside its writer (the imprint indexer, the checkpointer):
//! each repeats a step, pausing between steps for as long as the step asks, until it is
//! stopped. Stopping waits for the step in progress.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::store::StoreError;

pub(super) struct Background {
    stop: Arc<Stop>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cond: Condvar,
}

impl Background {
    /// Starts thread `name` at scheduling priority `nice` (0: the request path's; higher is
    /// lower), calling `step` until stopped. `step` returns the pause before the next step,
    /// `None` for none.
    pub fn spawn(
        name: &str,
        nice: i32,
        mut step: impl FnMut() -> Option<Duration> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let stop = Arc::new(Stop::default());
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                set_nice(nice);
                loop {
                    let pause = step();
                    let mut stopped = thread_stop
                        .stopped
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if let Some(pause) = pause.filter(|_| !*stopped) {
                        stopped = thread_stop
                            .cond
                            .wait_timeout(stopped, pause)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    if *stopped {
                        return;
                    }
                }
            })
            .map_err(|e| StoreError(format!("cannot start the thread {name}: {e}")))?;
        Ok(Self {
            stop,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Stops the thread (after the step it is in).
    pub fn stop(&self) {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            *self.stop.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.stop.cond.notify_one();
            let _ = handle.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets the calling thread's scheduling priority (`nice`), where that is not the default.
pub(super) fn set_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice != 0 {
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        let rc =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if rc != 0 {
            tracing::debug!(nice, "cannot change the thread's priority");
        }
    }
}
