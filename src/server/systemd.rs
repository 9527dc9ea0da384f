//! The service manager's side (`Type=notify`): READY once listening, a STATUS line with the
//! clock's state, and the watchdog fed only while the event loop and the clock's machinery
//! run. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use super::Tsa;
use crate::clock::fmt_ns;

/// Runs for the life of the server.
pub(super) async fn supervise(tsa: Arc<Tsa>) {
    notify(&[NotifyState::Ready, NotifyState::Status(&status(&tsa))]);
    let watchdog = sd_notify::watchdog_enabled();
    // Twice per watchdog period, as sd_watchdog_enabled(3) advises; else a status refresh.
    let period = watchdog.map_or(Duration::from_secs(5), |w| w / 2);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // This task running at all shows the event loop turns; the clock must show its own.
        let alive = tsa.clock().alive();
        let line = status(&tsa);
        if watchdog.is_some() && alive {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
        } else if !alive {
            tracing::error!(
                event = "clock_stalled",
                "the clock's discipline stopped updating; the watchdog is no longer fed"
            );
            notify(&[NotifyState::Status("clock discipline stalled")]);
        } else {
            notify(&[NotifyState::Status(&line)]);
        }
    }
}

fn status(tsa: &Tsa) -> String {
    let reading = tsa.clock().reading();
    let bound = if reading.bound_ns == u64::MAX {
        "-".to_string()
    } else {
        fmt_ns(reading.bound_ns)
    };
    let ready = match tsa.readiness() {
        Ok(()) => "issuing".to_string(),
        Err(reason) => format!("not issuing: {reason}"),
    };
    format!("clock {} (bound {bound}); {ready}", reading.state.name())
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
