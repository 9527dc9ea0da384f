//! What the status page plots: the clock and the request counters, sampled by a small task
//! into two bounded rings (every second for the last minutes, every ten seconds for the last
//! hours). Nothing here is on the request path: the sampler reads the counters the request
//! path already keeps, and the page copies the rings out under a short lock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Tsa;
use crate::clock::SyncState;

/// How often the sampler runs; the fine ring keeps every sample.
pub const FINE_INTERVAL: Duration = Duration::from_secs(1);
/// 10 minutes at one point a second.
pub const FINE_LEN: usize = 600;
/// Every tenth sample goes to the coarse ring: one point every 10 s…
pub const COARSE_EVERY: u64 = 10;
/// …for 6 hours.
pub const COARSE_LEN: usize = 6 * 360;

/// One sample of the clock and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    /// UTC as the TSA's clock read it (ns since the Unix epoch).
    pub unix_ns: u64,
    pub state: SyncState,
    /// UTC minus the local clock as the discipline estimates it (disciplined clock only).
    pub offset_ns: Option<i64>,
    /// The error bound; `None` while the clock has none.
    pub bound_ns: Option<u64>,
    /// Tokens issued and requests rejected since start (cumulative).
    pub tokens: u64,
    pub rejections: u64,
}

#[derive(Default)]
struct Rings {
    fine: VecDeque<Point>,
    coarse: VecDeque<Point>,
    samples: u64,
}

/// The two rings, oldest point first.
#[derive(Default)]
pub struct History {
    rings: Mutex<Rings>,
}

fn push(ring: &mut VecDeque<Point>, point: Point, len: usize) {
    if ring.len() == len {
        ring.pop_front();
    }
    ring.push_back(point);
}

impl History {
    pub fn record(&self, point: Point) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        push(&mut rings.fine, point, FINE_LEN);
        if rings.samples % COARSE_EVERY == 0 {
            push(&mut rings.coarse, point, COARSE_LEN);
        }
        rings.samples += 1;
    }

    /// Copies of the fine (last minutes) and coarse (last hours) rings.
    pub fn points(&self) -> (Vec<Point>, Vec<Point>) {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        (
            rings.fine.iter().copied().collect(),
            rings.coarse.iter().copied().collect(),
        )
    }
}

/// One sample of `tsa` now, from `reading` of its clock.
fn sample(tsa: &Tsa, reading: &crate::clock::Reading) -> Point {
    let clock = tsa.clock();
    let offset_ns = clock
        .views()
        .and_then(|v| v.system)
        .and_then(|s| s.offset_ns);
    let (tokens, rejections) = tsa.metrics.totals();
    Point {
        unix_ns: reading.unix_ns,
        state: reading.state,
        offset_ns,
        bound_ns: (reading.bound_ns != u64::MAX).then_some(reading.bound_ns),
        tokens,
        rejections,
    }
}

/// The sampler; runs for the life of the server. For a clock that does not log its own
/// changes (the kernel's), its reading is watched as the tokens' are
/// ([`crate::clock::IssuingClock::watched_reading`]): a change is logged within the second
/// where no token sees it first.
pub(super) async fn run(tsa: Arc<Tsa>) {
    let mut tick = tokio::time::interval(FINE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reading = tsa.clock().watched_reading();
        tsa.metrics.history.record(sample(&tsa, &reading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: u64) -> Point {
        Point {
            unix_ns: i * 1_000_000_000,
            state: SyncState::Synchronized,
            offset_ns: Some(i as i64),
            bound_ns: Some(1_000),
            tokens: i,
            rejections: 0,
        }
    }

    #[test]
    fn rings_are_bounded_and_the_coarse_one_keeps_every_tenth() {
        let history = History::default();
        for i in 0..(FINE_LEN as u64 + 25) {
            history.record(point(i));
        }
        let (fine, coarse) = history.points();
        assert_eq!(fine.len(), FINE_LEN);
        assert_eq!(fine.first().unwrap().tokens, 25);
        assert_eq!(fine.last().unwrap().tokens, FINE_LEN as u64 + 24);
        assert_eq!(coarse.len(), 63);
        assert!(coarse.iter().all(|p| p.tokens % 10 == 0));

        let history = History::default();
        for i in 0..(COARSE_LEN as u64 * COARSE_EVERY + 5 * COARSE_EVERY) {
            history.record(point(i));
        }
        let (_, coarse) = history.points();
        assert_eq!(coarse.len(), COARSE_LEN);
        assert_eq!(coarse[0].tokens, 5 * COARSE_EVERY);
    }
}
