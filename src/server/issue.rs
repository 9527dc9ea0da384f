//! The request path, top to bottom: parse → read the clock → build → sign → assemble.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::archive::serial::SerialAllocator;
use crate::clock::{IssuingClock, Refusal, RefusalKind};
use crate::protocol::{self, FailInfo, Rejection, RequestRules, Stamp, TokenTemplate};
use crate::signer::{certificate::TsuCertificate, SignError, Signer};

/// How one request ended, for logs and (later) metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Rejected(FailInfo),
}

/// Everything the issuing path needs, built once at start-up.
pub struct Tsa {
    pub(super) rules: RequestRules,
    pub(super) template: TokenTemplate,
    pub(super) clock: IssuingClock,
    pub(super) signer: Arc<dyn Signer>,
    pub(super) serials: Box<dyn SerialAllocator>,
    pub(super) certificate: TsuCertificate,
    /// Whether the last signature succeeded (readiness).
    pub(super) signer_ok: AtomicBool,
    /// Issuances of a blocking signer in flight at once.
    pub(super) blocking_lane: Arc<tokio::sync::Semaphore>,
    pub(super) metrics: super::metrics::Metrics,
}

impl Tsa {
    /// Answers one request body with a DER `TimeStampResp`.
    ///
    /// A signer that may block (an HSM, RSA) gets the blocking pool, at most `blocking_lane`
    /// issuances at a time so that a burst queues here instead of spawning hundreds of threads;
    /// a fast one signs on the async worker. Either way the clock is read inside `issue`, after
    /// any queueing, as late as possible before the signature.
    pub async fn respond(self: &Arc<Self>, body: Bytes) -> (Vec<u8>, Outcome) {
        let result = if self.signer.may_block() {
            let permit = Arc::clone(&self.blocking_lane).acquire_owned().await;
            let tsa = Arc::clone(self);
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                tsa.issue(&body)
            })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "the issuing task failed");
                Err(Rejection::new(FailInfo::SystemFailure, "internal error"))
            })
        } else {
            self.issue(&body)
        };
        match result {
            Ok(der) => (der, Outcome::Granted),
            Err(rejection) => {
                if rejection.fail_info == FailInfo::SystemFailure {
                    tracing::error!(reason = %rejection.reason, "request failed");
                } else {
                    tracing::debug!(fail_info = %rejection.fail_info, reason = %rejection.reason, "request rejected");
                }
                (rejection.to_der(), Outcome::Rejected(rejection.fail_info))
            }
        }
    }

    /// The issuing path, synchronous. Returns the granted response or the rejection.
    pub fn issue(&self, body: &[u8]) -> Result<Vec<u8>, Rejection> {
        let request = protocol::parse_request(body, &self.rules)?;

        let serial = self
            .serials
            .next()
            .map_err(|e| Rejection::new(FailInfo::SystemFailure, e.to_string()))?;

        let time = self
            .clock
            .now()
            .map_err(|refusal| Rejection::new(FailInfo::TimeNotAvailable, refusal.reason))?;
        let stamp = Stamp::new(
            time.unix_ns,
            time.bound_ns,
            self.template.precision(),
            serial,
        );
        if stamp.accuracy.as_ns() > self.clock.max_bound().as_nanos() as u64 {
            let refusal = Refusal {
                kind: RefusalKind::BoundExceeded,
                reason: "the clock's bound and genTime's precision together exceed the declared accuracy".into(),
            };
            self.clock.count_refusal(&refusal);
            return Err(Rejection::new(FailInfo::TimeNotAvailable, refusal.reason));
        }

        let tbs = self.template.to_be_signed(&request, &stamp)?;
        let signing = std::time::Instant::now();
        let signature = self.signer.sign(tbs.message());
        self.metrics.signature(signing.elapsed(), signature.is_ok());
        let signature = signature.map_err(|e| {
            // An unavailable key is the signer's health to report (and to recover).
            if matches!(e, SignError::Failed(_)) {
                self.signer_ok.store(false, Ordering::Relaxed);
            }
            Rejection::new(FailInfo::SystemFailure, e.to_string())
        })?;
        self.signer_ok.store(true, Ordering::Relaxed);

        Ok(self.template.assemble(&tbs, &signature))
    }

    /// Ready to issue: the clock is trusted, the signer is healthy and its last signature
    /// did not fail.
    pub fn readiness(&self) -> Result<(), String> {
        self.clock.check().map_err(|r| r.reason.into_owned())?;
        self.signer.health()?;
        if !self.signer_ok.load(Ordering::Relaxed) {
            return Err("the signer's last signature failed".into());
        }
        Ok(())
    }

    pub fn certificate(&self) -> &TsuCertificate {
        &self.certificate
    }

    pub fn clock(&self) -> &IssuingClock {
        &self.clock
    }
}
