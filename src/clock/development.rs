//! The development clock: the system clock, trusted with an accuracy the operator declares.
//!
//! It exists so that a TSA can run on a laptop or in CI, where no synchronized clock is to be
//! had. It is enabled only explicitly, announced loudly at start-up, and the server pairs it
//! with the development policy OID so that its tokens can never pass for production ones.

use std::sync::Arc;
use std::time::Duration;

use super::{system_unix_ns, Reading, SyncState, TimeSource};

pub struct DevelopmentClock {
    declared_bound_ns: u64,
    reason: Arc<str>,
}

impl DevelopmentClock {
    pub fn new(declared_accuracy: Duration) -> Self {
        Self {
            declared_bound_ns: declared_accuracy.as_nanos() as u64,
            reason: "development clock: the system clock with a declared, unverified accuracy"
                .into(),
        }
    }
}

impl TimeSource for DevelopmentClock {
    fn name(&self) -> &'static str {
        "development"
    }

    fn read(&self) -> Reading {
        Reading {
            unix_ns: system_unix_ns(),
            bound_ns: self.declared_bound_ns,
            state: SyncState::Synchronized,
            reason: self.reason.clone(),
        }
    }
}
