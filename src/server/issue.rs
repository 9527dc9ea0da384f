//! The request path, top to bottom: parse → read the clock → build → sign → assemble.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use bytes::Bytes;

use crate::archive::record::TokenRecord;
use crate::archive::serial::SerialAllocator;
use crate::archive::Archive;
use crate::clock::{IssuingClock, Refusal, RefusalKind};
use crate::protocol::{self, FailInfo, Rejection, RequestRules, Stamp, TokenTemplate};
use crate::signer::{certificate::TsuCertificate, SignError, Signer};

/// The certificate of one version of [`Issuing`].
pub struct CurrentCertificate(Arc<Issuing>);

impl std::ops::Deref for CurrentCertificate {
    type Target = TsuCertificate;
    fn deref(&self) -> &TsuCertificate {
        &self.0.certificate
    }
}

/// Who sent a request, as the HTTP layer established it: anonymous, or a configured client
/// (an API key or a TLS client certificate). Its name is recorded in the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    pub name: Option<Arc<str>>,
}

impl Client {
    pub const ANONYMOUS: Client = Client { name: None };

    pub fn named(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: Some(name.into()),
        }
    }
}

/// How one request ended, for logs and (later) metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Rejected(FailInfo),
}

/// What a reload replaces as a whole: the request rules, the certificate with its chain and
/// the token template made from them.
pub struct Issuing {
    rules: RequestRules,
    template: TokenTemplate,
    certificate: TsuCertificate,
    /// genTimes outside [not_before, not_after − minimum remaining validity] get systemFailure.
    valid_ns: (u64, u64),
}

impl Issuing {
    pub(super) fn new(
        rules: RequestRules,
        template: TokenTemplate,
        certificate: TsuCertificate,
        min_remaining: Duration,
    ) -> Self {
        let ns = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        let until = certificate
            .not_after()
            .checked_sub(min_remaining)
            .unwrap_or(UNIX_EPOCH);
        Self {
            valid_ns: (ns(certificate.not_before()), ns(until)),
            rules,
            template,
            certificate,
        }
    }

    pub fn certificate(&self) -> &TsuCertificate {
        &self.certificate
    }
}

/// Everything the issuing path needs, built once at start-up.
pub struct Tsa {
    /// Replaced whole by a reload; each request works on one version.
    pub(super) issuing: ArcSwap<Issuing>,
    pub(super) clock: IssuingClock,
    pub(super) signer: Arc<dyn Signer>,
    pub(super) serials: Box<dyn SerialAllocator>,
    /// Records every token before its response is sent (`[archive]`).
    pub(super) archive: Option<Arc<Archive>>,
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
    pub async fn respond(self: &Arc<Self>, body: Bytes, client: &Client) -> (Vec<u8>, Outcome) {
        let result = if self.signer.may_block() {
            let permit = Arc::clone(&self.blocking_lane).acquire_owned().await;
            let (tsa, client) = (Arc::clone(self), client.clone());
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                tsa.issue_unrecorded(&body, &client)
            })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "the issuing task failed");
                Err(Rejection::new(FailInfo::SystemFailure, "internal error"))
            })
        } else {
            self.issue_unrecorded(&body, client)
        };
        // The response leaves only once the archive's commit that holds its token returned.
        let result = match (result, &self.archive) {
            (Ok((der, Some(record))), Some(archive)) => {
                archive.record(record).await.map(|()| der).map_err(archived)
            }
            (result, _) => result.map(|(der, _)| der),
        };
        match result {
            Ok(der) => (der, Outcome::Granted),
            Err(rejection) => {
                if rejection.fail_info == FailInfo::SystemFailure {
                    tracing::error!(reason = %rejection.reason, "request failed");
                } else {
                    tracing::info!(fail_info = %rejection.fail_info, reason = %rejection.reason, "request rejected");
                }
                (rejection.to_der(), Outcome::Rejected(rejection.fail_info))
            }
        }
    }

    /// The issuing path for an anonymous client, synchronous (it waits for the archive's
    /// commit: call it where blocking is allowed). Returns the granted response or the
    /// rejection.
    pub fn issue(&self, body: &[u8]) -> Result<Vec<u8>, Rejection> {
        match (self.issue_unrecorded(body, &Client::ANONYMOUS)?, &self.archive) {
            ((der, Some(record)), Some(archive)) => {
                archive.record_blocking(record).map_err(archived)?;
                Ok(der)
            }
            ((der, _), _) => Ok(der),
        }
    }

    /// The token and, with the archive, its record (not yet recorded).
    fn issue_unrecorded(
        &self,
        body: &[u8],
        client: &Client,
    ) -> Result<(Vec<u8>, Option<TokenRecord>), Rejection> {
        let issuing = self.issuing.load();
        let request = protocol::parse_request(body, &issuing.rules)?;

        let serial = self
            .serials
            .next()
            .map_err(|e| Rejection::new(FailInfo::SystemFailure, e.to_string()))?;

        let time = self
            .clock
            .now()
            .map_err(|refusal| Rejection::new(FailInfo::TimeNotAvailable, refusal.reason))?;
        let (from, until) = issuing.valid_ns;
        if time.unix_ns < from || time.unix_ns > until {
            tracing::error!(
                event = "certificate_out_of_validity",
                "the signing certificate is not valid now (or has less left than the configured minimum)"
            );
            return Err(Rejection::new(
                FailInfo::SystemFailure,
                "the TSA's signing certificate is not valid at this time",
            ));
        }
        let stamp = Stamp::new(
            time.unix_ns,
            time.bound_ns,
            issuing.template.precision(),
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

        let tbs = issuing.template.to_be_signed(&request, &stamp)?;
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

        let der = issuing.template.assemble(&tbs, &signature);
        let record = match &self.archive {
            Some(archive) => Some(
                archive
                    .token_record(&request, &stamp, &time, &self.clock, &der, client)
                    .map_err(archived)?,
            ),
            None => None,
        };
        Ok((der, record))
    }

    /// Ready to issue: the clock is trusted, the signer is healthy and its last signature
    /// did not fail.
    pub fn readiness(&self) -> Result<(), String> {
        self.clock.check().map_err(|r| r.reason.into_owned())?;
        self.signer.health()?;
        if !self.signer_ok.load(Ordering::Relaxed) {
            return Err("the signer's last signature failed".into());
        }
        if let Some(archive) = &self.archive {
            archive.health()?;
        }
        Ok(())
    }

    /// The certificate in force (a reload may replace it).
    pub fn certificate(&self) -> CurrentCertificate {
        CurrentCertificate(self.issuing.load_full())
    }

    /// Replaces the certificate, chain, rules and template with `issuing` (SIGHUP); requests
    /// in flight finish with the version they started with.
    pub fn reload(&self, issuing: Issuing) {
        tracing::info!(
            event = "certificate_reloaded",
            subject = %issuing.certificate.subject(),
            "configuration and certificate chain reloaded"
        );
        if let Some(archive) = &self.archive {
            archive.set_certificate(issuing.certificate.der().to_vec());
        }
        self.issuing.store(Arc::new(issuing));
    }

    /// The token archive, when enabled.
    pub fn archive(&self) -> Option<&Archive> {
        self.archive.as_deref()
    }

    pub fn signer(&self) -> &dyn Signer {
        self.signer.as_ref()
    }

    pub fn clock(&self) -> &IssuingClock {
        &self.clock
    }
}

/// A token that could not be archived is not handed out.
fn archived(e: crate::archive::ArchiveError) -> Rejection {
    Rejection::new(FailInfo::SystemFailure, e.to_string())
}
