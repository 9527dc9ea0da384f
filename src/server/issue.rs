//! The request path, top to bottom: parse → read the clock → build → sign → assemble.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use bytes::Bytes;

use crate::archive::record::TokenRecord;
use crate::archive::serial::SerialAllocator;
use crate::archive::Archive;
use crate::clock::{IssuingClock, Refusal, RefusalKind};
use crate::log_limit::LogLimit;
use crate::protocol::{self, FailInfo, Rejection, RequestRules, Stamp, TokenTemplate};
use crate::signer::{certificate::TsuCertificate, SignError, Signer};

/// The certificate of one version of [`Issuing`].
pub struct CurrentCertificate(Arc<Issuing>);

impl CurrentCertificate {
    /// Until when it issues (Unix ns): its notAfter less `token.min_certificate_validity_days`.
    pub fn issues_until_ns(&self) -> u64 {
        self.0.issues_until_ns()
    }
}

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

impl Outcome {
    /// Refused for a reason of the server's own (its clock, its signer, its archive), not
    /// the request's: a batch's debt for such items is forgiven (`Auth::forgive_debt`).
    pub fn servers_fault(self) -> bool {
        matches!(
            self,
            Outcome::Rejected(FailInfo::SystemFailure | FailInfo::TimeNotAvailable)
        )
    }
}

/// What a reload replaces as a whole: the request rules, the certificate with its chain and
/// the token template made from them.
pub struct Issuing {
    rules: RequestRules,
    template: TokenTemplate,
    certificate: TsuCertificate,
    /// [not_before, not_after − minimum remaining validity], of the certificate's whole path
    /// ([`TsuCertificate::path_validity`]): a token whose window (genTime less its accuracy,
    /// to genTime plus the declared accuracy) leaves it gets systemFailure.
    valid_ns: (u64, u64),
}

impl Issuing {
    /// Until when it issues (Unix ns): its certificate's notAfter less
    /// `token.min_certificate_validity_days`.
    pub(super) fn issues_until_ns(&self) -> u64 {
        self.valid_ns.1
    }

    pub(super) fn new(
        rules: RequestRules,
        template: TokenTemplate,
        certificate: TsuCertificate,
        min_remaining: Duration,
    ) -> Self {
        let ns = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        // The whole path's: an intermediate that expires first ends what verifiers can check.
        let (from, not_after) = certificate.path_validity();
        let until = not_after.checked_sub(min_remaining).unwrap_or(UNIX_EPOCH);
        Self {
            valid_ns: (ns(from), ns(until)),
            rules,
            template,
            certificate,
        }
    }

    pub fn certificate(&self) -> &TsuCertificate {
        &self.certificate
    }
}

/// Why no token can be signed with the certificate in force.
const CERTIFICATE_NOT_VALID: &str = "the TSA's signing certificate is not valid at this time";

/// How long a failed signature keeps readiness failing, unless one succeeds meanwhile. Not
/// for good: a load balancer that readiness took the instance out of sends it no request that
/// could succeed. A failure that lasts shows again in the requests it sends once the instance
/// is back, and a lost HSM in the signer's own health.
const SIGNER_FAILURE_HOLD: Duration = Duration::from_secs(10);

/// An instant that threads mark and read without a lock: none yet, or the last one marked.
pub(super) struct Moment {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch` (at least 1); 0 for none.
    at_ns: AtomicU64,
}

impl Moment {
    pub(super) fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            at_ns: AtomicU64::new(0),
        }
    }

    fn since_epoch_ns(&self, now: std::time::Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn mark(&self) {
        let now = self.since_epoch_ns(std::time::Instant::now());
        self.at_ns.store(now.max(1), Ordering::Relaxed);
    }

    /// Back to none, unless marked again since it was read here. Cheap where it is none: a
    /// load (the request path clears the signer's failure after every signature).
    fn clear(&self) {
        let seen = self.at_ns.load(Ordering::Relaxed);
        if seen != 0 {
            let _ = self
                .at_ns
                .compare_exchange(seen, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// How long before `now` it was marked; `None` if it is none.
    fn age(&self, now: std::time::Instant) -> Option<Duration> {
        let at = self.at_ns.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_nanos(self.since_epoch_ns(now).saturating_sub(at)))
    }

    /// Marked less than `within` before `now`.
    fn is_within(&self, within: Duration, now: std::time::Instant) -> bool {
        self.age(now).is_some_and(|age| age < within)
    }
}

/// Everything the issuing path needs, built once at start-up.
pub struct Tsa {
    /// Replaced whole by a reload; each request works on one version, of it and of the
    /// planned rollover's together ([`Tsa::generation`]).
    pub(super) issuing: ArcSwap<Issuing>,
    /// Odd while a reload stores the first signer's and the rollover's [`Issuing`], bumped
    /// before and after: a request that saw it change (or odd) reads both again.
    pub(super) reloading: AtomicU64,
    pub(super) clock: IssuingClock,
    pub(super) signer: Arc<dyn Signer>,
    pub(super) serials: Box<dyn SerialAllocator>,
    /// Records every token before its response is sent (`[archive]`).
    pub(super) archive: Option<Arc<Archive>>,
    /// When the last signature failed, unless one succeeded since (readiness).
    pub(super) signer_failure: Moment,
    /// When an issuance on the blocking pool last ended: whether its lane moves.
    pub(super) lane_moved: Moment,
    /// Issuances of a blocking signer in flight at once.
    pub(super) blocking_lane: Arc<tokio::sync::Semaphore>,
    /// The places `blocking_lane` was given (it is resized at a planned rollover).
    pub(super) lane_places: std::sync::atomic::AtomicUsize,
    pub(super) metrics: super::metrics::Metrics,
    /// Requests admitted and not yet answered (`server.max_queue`).
    pub(super) admission: super::admission::Admission,
    /// Batches read or answered now (`server.max_batches_in_flight`).
    pub(super) batches: Arc<tokio::sync::Semaphore>,
    /// `batches`' permits in all.
    pub(super) max_batches: usize,
    /// Archive look-ups on the blocking pool at once ([`super::http`]: `GET /archive/…`).
    pub(super) lookups: Arc<tokio::sync::Semaphore>,
    /// Batches in flight per client, while `[auth]` names clients.
    pub(super) client_batches: super::admission::ClientBatches,
    /// Open public connections (`server.max_connections`).
    pub(super) connections: super::admission::Connections,
    /// Open public connections and batches in flight per client address
    /// (`server.max_connections_per_address`).
    pub(super) addresses: super::admission::Addresses,
    /// New public connections per client address and second
    /// (`server.new_connections_per_address_per_s`).
    pub(super) connection_rate: super::admission::ConnectionRate,
    /// Failed authentications per client address (`server.auth_failures_per_address_per_s`).
    pub(super) auth_failures: super::admission::ConnectionRate,
    /// The clients of `[auth]` and their quotas; replaced whole on reload.
    pub(super) auth: ArcSwap<super::auth::Auth>,
    /// A planned change of key (`[rollover]`).
    pub(super) rollover: Option<Rollover>,
    /// The HTTPS listener's TLS configuration, when it has one; replaced by a reload.
    pub(super) tls: arc_swap::ArcSwapOption<super::tls::Tls>,
    /// Reloads of `[auth]` and of the TLS configuration so far, each counted once it is in
    /// force: a request whose body came across one is authenticated again.
    pub(super) credential_reloads: AtomicU64,
}

/// A granted response and, with the archive, its token's record (not yet recorded).
type Granted = (Vec<u8>, Option<TokenRecord>);

/// How the issuing path draws its serial.
#[derive(Clone, Copy)]
enum Draw {
    /// Waiting for the archive's reservation if it must (on the blocking pool).
    Waiting,
    /// Not at all where that would wait (on an async worker).
    WithoutWaiting,
}

/// How long a request that must sign on the blocking pool waits for a place in its lane while
/// no issuance there ends: far beyond any signature, short of a client's patience.
#[cfg(not(test))]
const LANE_WAIT: Duration = Duration::from_secs(10);
#[cfg(test)]
const LANE_WAIT: Duration = Duration::from_millis(100);

/// A serial that took longer than this (it waited for the archive's reservation) has the time
/// read again after it.
const SERIAL_WAIT_REREAD: Duration = Duration::from_millis(1);

/// A planned key rollover: tokens whose genTime is at or after `at_ns` are signed by
/// `signer` with `issuing`'s certificate and template. The choice is made per token from its
/// genTime, so no token straddles the instant.
pub struct Rollover {
    pub(super) at_ns: u64,
    /// `at_ns` in RFC 3339, for the log.
    pub(super) at: String,
    pub(super) signer: Arc<dyn Signer>,
    pub(super) issuing: ArcSwap<Issuing>,
}

impl Rollover {
    pub(super) fn new(at_ns: u64, signer: Arc<dyn Signer>, issuing: Issuing) -> Self {
        let at = chrono::DateTime::<chrono::Utc>::from(UNIX_EPOCH + Duration::from_nanos(at_ns))
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        Self {
            at_ns,
            at,
            signer,
            issuing: ArcSwap::from_pointee(issuing),
        }
    }

    /// The rollover instant, nanoseconds since the Unix epoch.
    pub fn at_unix_ns(&self) -> u64 {
        self.at_ns
    }
}

impl Tsa {
    /// Answers one request body with a DER `TimeStampResp`.
    ///
    /// A signer that may block (an HSM, RSA) gets the blocking pool, at most `blocking_lane`
    /// issuances at a time so that a burst queues here instead of spawning hundreds of threads;
    /// a fast one signs on the async worker. So does an issuance whose serial would wait for the
    /// archive's reservation (the writer is behind): the wait (up to seconds) must not hold the
    /// worker that also serves the health checks. Either way the clock is read inside `issue`,
    /// after any queueing, as late as possible before the signature.
    pub async fn respond(self: &Arc<Self>, body: Bytes, client: &Client) -> (Vec<u8>, Outcome) {
        // In place unless the signer may block; then, or where the serial would wait after
        // all (the check and the draw are apart), on the blocking pool.
        let in_place = if self.may_block() || self.serials.may_wait() {
            None
        } else {
            self.issue_with(&body, client, Draw::WithoutWaiting)
                .transpose()
        };
        let result = match in_place {
            Some(result) => result,
            None => match self.lane_place().await {
                Ok(permit) => {
                    let (tsa, client) = (Arc::clone(self), client.clone());
                    tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        tsa.issue_in_lane(&body, &client)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "the issuing task failed");
                        Err(Rejection::new(FailInfo::SystemFailure, "internal error"))
                    })
                }
                Err(refused) => Err(refused),
            },
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
                log_rejection(&rejection);
                (rejection.to_der(), Outcome::Rejected(rejection.fail_info))
            }
        }
    }

    /// Answers the items of a batch (`protocol::batch`, each item one `TimeStampReq` body),
    /// in their order, each as [`Tsa::respond`] answers a request alone: its own parse and
    /// failInfo, clock reading (so its own strictly increasing genTime), serial, signature and,
    /// with the archive, record. A bad item spoils nothing else.
    ///
    /// The issuing runs on the blocking pool, so that a batch of thousands never holds an
    /// async worker for long, in chunks that each take a permit of the blocking lane: a batch
    /// splits into at most one chunk per core (or per signer session, for an HSM) until its
    /// chunks reach `BATCH_CHUNK` items, and then into more chunks of that size, which queue
    /// for the lane with everyone else's requests. So one batch uses the whole machine, all
    /// batches together use no more threads than the lane has permits, and a request queued
    /// behind a large batch waits for one chunk, not for the whole batch. With the archive the
    /// records of all granted items go to the writer at once (its group commit takes them in a
    /// few transactions) and the answer waits until every one is committed; an item whose
    /// record failed is answered `systemFailure` and its token dropped.
    ///
    /// Dropped before it is done (its client went away, and hyper dropped the request), the
    /// batch signs no more: the chunks already running end with the item they are signing,
    /// so that a client cannot leave the lane busy with batches nobody awaits while their
    /// places, counted until then, are free for more.
    pub async fn respond_batch(
        self: &Arc<Self>,
        items: Vec<Bytes>,
        client: &Client,
    ) -> Vec<(Vec<u8>, Outcome)> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon_when_dropped = SetOnDrop(Arc::clone(&abandoned));
        let count = items.len();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let lanes = self
            .signer()
            .max_in_flight()
            .unwrap_or(cores)
            .clamp(1, cores);
        let chunk = count.div_ceil(lanes).clamp(1, BATCH_CHUNK);

        let mut chunks = Vec::with_capacity(count.div_ceil(chunk));
        let mut items = items.into_iter();
        // After a chunk found no place in time, the rest are refused without waiting.
        let mut no_place: Option<Rejection> = None;
        while items.len() > 0 {
            let part: Vec<Bytes> = items.by_ref().take(chunk).collect();
            let len = part.len();
            let place = match &no_place {
                Some(refused) => Err(refused.clone()),
                None => self.lane_place().await,
            };
            if let Err(refused) = &place {
                no_place = Some(refused.clone());
            }
            let task = place.map(|permit| {
                let (tsa, client) = (Arc::clone(self), client.clone());
                let abandoned = Arc::clone(&abandoned);
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    part.iter()
                        .map(|body| match abandoned.load(Ordering::Relaxed) {
                            false => tsa.issue_in_lane(body, &client),
                            true => Err(Rejection::new(
                                FailInfo::SystemFailure,
                                "the batch's client went away",
                            )),
                        })
                        .collect::<Vec<_>>()
                })
            });
            chunks.push((len, task));
        }
        let mut issued = Vec::with_capacity(count);
        for (len, task) in chunks {
            let task = match task {
                Ok(task) => task,
                Err(refused) => {
                    issued.extend((0..len).map(|_| Err(refused.clone())));
                    continue;
                }
            };
            match task.await {
                Ok(results) => issued.extend(results),
                Err(e) => {
                    tracing::error!(error = %e, "a batch's issuing task failed");
                    issued.extend(
                        (0..len).map(|_| {
                            Err(Rejection::new(FailInfo::SystemFailure, "internal error"))
                        }),
                    );
                }
            }
        }

        // The response leaves only once the commits that hold its tokens returned.
        let answered = match &self.archive {
            Some(archive) => record_all(archive, issued).await,
            None => issued
                .into_iter()
                .map(|result| result.map(|(der, _)| der))
                .collect(),
        };

        // One log line per failInfo that occurred, not one per item.
        let mut refused: Vec<(usize, Rejection)> = Vec::new();
        let answers = answered
            .into_iter()
            .map(|result| match result {
                Ok(der) => (der, Outcome::Granted),
                Err(rejection) => {
                    let answer = (rejection.to_der(), Outcome::Rejected(rejection.fail_info));
                    match refused
                        .iter_mut()
                        .find(|(_, first)| first.fail_info == rejection.fail_info)
                    {
                        Some((n, _)) => *n += 1,
                        None => refused.push((1, rejection)),
                    }
                    answer
                }
            })
            .collect();
        for (n, first) in refused {
            static FAILED: LogLimit = LogLimit::new();
            static REJECTED: LogLimit = LogLimit::new();
            if first.fail_info == FailInfo::SystemFailure {
                if let Some(left_out) = FAILED.allow() {
                    let detail = first.detail.as_deref().unwrap_or("");
                    tracing::error!(items = n, of = count, reason = %first.reason, detail, left_out, "batch items failed");
                }
            } else if let Some(left_out) = REJECTED.allow() {
                let detail = first.detail.as_deref().unwrap_or("");
                tracing::info!(fail_info = %first.fail_info, items = n, of = count, reason = %first.reason, detail, left_out, "batch items rejected");
            }
        }
        answers
    }

    /// The issuing path for an anonymous client, synchronous (it waits for the archive's
    /// commit: call it where blocking is allowed). Returns the granted response or the
    /// rejection.
    pub fn issue(&self, body: &[u8]) -> Result<Vec<u8>, Rejection> {
        match (
            self.issue_unrecorded(body, &Client::ANONYMOUS)?,
            &self.archive,
        ) {
            ((der, Some(record)), Some(archive)) => {
                archive.record_blocking(record).map_err(archived)?;
                Ok(der)
            }
            ((der, _), _) => Ok(der),
        }
    }

    /// A place in the blocking lane, waited for as long as the lane moves: a signer whose
    /// calls hang (an HSM that stopped answering holds every place) must not hold the requests
    /// behind them for good, while a slow one with a long queue (a batch's chunks, each of
    /// many signatures) ends an issuance at least every [`LANE_WAIT`]. `None` inside once the
    /// lane is closed (it never is).
    async fn lane_place(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Rejection> {
        let place = Arc::clone(&self.blocking_lane).acquire_owned();
        tokio::pin!(place);
        loop {
            match tokio::time::timeout(LANE_WAIT, &mut place).await {
                Ok(permit) => return Ok(permit.ok()),
                Err(_)
                    if self
                        .lane_moved
                        .is_within(LANE_WAIT, std::time::Instant::now()) => {}
                Err(_) => {
                    return Err(Rejection::new(
                        FailInfo::SystemFailure,
                        format!("the signer ended no signature for {LANE_WAIT:?}"),
                    ))
                }
            }
        }
    }

    /// [`Tsa::issue_unrecorded`] on the blocking pool, holding a place of its lane: the lane
    /// moved once it ends ([`Tsa::lane_place`]), a fault in it (a panic) too, which answers
    /// its request alone with systemFailure (not every item of a batch's chunk).
    fn issue_in_lane(&self, body: &[u8], client: &Client) -> Issued {
        let issued = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.issue_unrecorded(body, client)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(
                "a request's issuance failed (a fault, the panic above); answered systemFailure"
            );
            Err(Rejection::new(FailInfo::SystemFailure, "internal error"))
        });
        self.lane_moved.mark();
        issued
    }

    /// The token and, with the archive, its record (not yet recorded).
    fn issue_unrecorded(&self, body: &[u8], client: &Client) -> Issued {
        self.issue_with(body, client, Draw::Waiting)?
            .ok_or_else(|| Rejection::new(FailInfo::SystemFailure, "no serial was drawn"))
    }

    /// [`Tsa::issue_unrecorded`], or `None` where the serial was to be drawn without waiting
    /// and would have waited (nothing spent then but a reading of the clock).
    fn issue_with(
        &self,
        body: &[u8],
        client: &Client,
        draw: Draw,
    ) -> Result<Option<Granted>, Rejection> {
        let (issuing, next_issuing) = self.generation();
        let request = protocol::parse_request(body, &issuing.rules)?;

        // The time first: a clock that cannot vouch for it refuses before a serial is spent
        // (with the archive, each serial is a counter reserved durably in blocks). A serial
        // that waited for a reservation (the archive's writer behind; on the blocking pool, see
        // `respond`) has the time read again, so that the signature still follows its genTime
        // closely.
        // In ticks of this generation's precision (capped at 1 µs), whatever a reload sets.
        let tick = Duration::from_nanos(issuing.template.precision().unit_ns().min(1_000));
        let now = || {
            self.clock
                .now_in_ticks_of(tick)
                .map_err(|refusal| Rejection {
                    detail: Some(refusal.reason.into_owned()),
                    ..Rejection::new(FailInfo::TimeNotAvailable, refusal.kind.public_reason())
                })
        };
        // Taken before the reading: the lateness measured from it is never too small. Boot
        // time, so that a suspend of the host between reading and signature counts in full.
        let elapsed_ns = |since: u64| crate::clock::local::boot_ns().saturating_sub(since);
        let mut read_at = crate::clock::local::boot_ns();
        let mut time = now()?;
        let serial = match draw {
            Draw::Waiting => Some(self.serials.next()),
            Draw::WithoutWaiting => self.serials.next_without_waiting(),
        };
        let Some(serial) = serial else {
            return Ok(None);
        };
        let serial = serial.map_err(|e| Rejection::internal("no serial number is available", e))?;
        if elapsed_ns(read_at) > SERIAL_WAIT_REREAD.as_nanos() as u64 {
            read_at = crate::clock::local::boot_ns();
            time = now()?;
        }
        // The key (and certificate) for this genTime: the instant truncated as the token will
        // carry it.
        let gen_time_ns = |issuing: &Issuing| {
            protocol::GenTime::truncated(time.unix_ns, issuing.template.precision()).unix_ns()
        };
        let (issuing, signer) = match (&self.rollover, next_issuing) {
            (Some(next), Some(next_issuing)) if gen_time_ns(&issuing) >= next.at_ns => {
                (next_issuing, &next.signer)
            }
            _ => (issuing, &self.signer),
        };
        let stamp = Stamp::new(
            time.unix_ns,
            time.bound_ns,
            issuing.template.precision(),
            serial,
        );
        let declared_ns = self.clock.max_bound_ns();
        // The certificate is valid over every instant the token may stand for: from genTime
        // less its accuracy (the earliest the reading may truly have been) to genTime plus
        // the declared accuracy (the latest a signature may return and still be sent).
        let (from, until) = issuing.valid_ns;
        let gen_time = stamp.gen_time.unix_ns();
        if gen_time.saturating_sub(stamp.accuracy.as_ns()) < from
            || gen_time.saturating_add(declared_ns) > until
        {
            // Once a second at most: every request would log it (and queue it as an archive
            // event) while it lasts.
            static LOG: LogLimit = LogLimit::new();
            if let Some(left_out) = LOG.allow() {
                tracing::error!(
                    event = "certificate_out_of_validity",
                    left_out,
                    "the signing certificate is not valid now (or has less left than the configured minimum)"
                );
            }
            return Err(Rejection::new(
                FailInfo::SystemFailure,
                CERTIFICATE_NOT_VALID,
            ));
        }
        if stamp.accuracy.as_ns() > declared_ns {
            return Err(self.refuse(
                RefusalKind::BoundExceeded,
                "the clock's bound and genTime's precision together exceed the declared accuracy",
            ));
        }

        let tbs = issuing.template.to_be_signed(&request, &stamp)?;
        // What is left of the declared accuracy: a signer that waits for a session gives up
        // once a signature would come too late anyway, rather than hold the request.
        let budget_ns = declared_ns
            .saturating_sub(stamp.accuracy.as_ns())
            .saturating_sub(elapsed_ns(read_at));
        let signing = std::time::Instant::now();
        let signature = signer.sign_within(tbs.message(), Duration::from_nanos(budget_ns));
        self.metrics.signature(signing.elapsed(), signature.is_ok());
        let signature = signature.map_err(|e| match e {
            // The signer's to answer for only when it had a fair part of the accuracy to begin
            // in: a wait that genTime's truncation cut short says nothing of it.
            SignError::Late(wait) => Rejection {
                detail: Some(e.to_string()),
                ..self.signed_late(
                    left_to_sign(declared_ns, time.bound_ns)
                        .is_some_and(|left| wait.as_nanos() as u64 >= left / 2),
                )
            },
            // An unavailable key is the signer's health to report (and to recover).
            _ => {
                if matches!(e, SignError::Failed(_)) {
                    self.signer_failure.mark();
                }
                Rejection::internal("the token could not be signed", e)
            }
        })?;
        self.signer_failure.clear();
        // genTime ± accuracy holds the reading; the token is made when the signature returns.
        // A signature that came back late (an HSM that stalled, a wait for one of its sessions)
        // must still leave that instant within the declared accuracy of genTime.
        let late_ns = elapsed_ns(read_at);
        if stamp.accuracy.as_ns().saturating_add(late_ns) > declared_ns {
            // The signer's to answer for when late whatever genTime's truncation (which can
            // bring a fast signature close to the limit).
            return Err(self.signed_late(
                left_to_sign(declared_ns, time.bound_ns).is_some_and(|left| late_ns > left),
            ));
        }

        let der = issuing.template.assemble(&tbs, &signature);
        let record = match &self.archive {
            Some(archive) => Some(
                archive
                    .token_record(&request, &stamp, &time, &self.clock, &der, client)
                    .map_err(archived)?,
            ),
            None => None,
        };
        Ok(Some((der, record)))
    }

    /// A signature that came, or would have come, too late for the token's declared accuracy;
    /// `signer_to_blame` marks the signer's failure, so that readiness holds off the requests
    /// a balancer would send into the same wait.
    fn signed_late(&self, signer_to_blame: bool) -> Rejection {
        if signer_to_blame {
            self.signer_failure.mark();
        }
        self.refuse(
            RefusalKind::SignedLate,
            RefusalKind::SignedLate.public_reason(),
        )
    }

    /// A `timeNotAvailable` for a genTime whose error would exceed the declared accuracy,
    /// counted among the clock's refusals.
    fn refuse(&self, kind: RefusalKind, reason: &'static str) -> Rejection {
        let refusal = Refusal {
            kind,
            reason: reason.into(),
        };
        self.clock.count_refusal(&refusal);
        Rejection::new(FailInfo::TimeNotAvailable, refusal.reason)
    }

    /// Ready to issue: the clock is trusted, with room in the declared accuracy for genTime's
    /// truncation (half a unit of its precision: else most requests are refused), the
    /// certificate in force is valid now (with the validity left that
    /// `token.min_certificate_validity_days` asks), the signer is healthy and its last
    /// signature did not fail.
    pub fn readiness(&self) -> Result<(), String> {
        let bound_ns = self
            .clock
            .check()
            .map_err(|r| r.reason.into_owned())?
            .bound_ns;
        let half_unit = self.issuing.load().template.precision().unit_ns() / 2;
        let declared_ns = self.clock.max_bound_ns();
        if bound_ns.saturating_add(half_unit) > declared_ns {
            return Err(format!(
                "the clock's error bound {} leaves less than half of genTime's precision ({}) \
                 of the declared accuracy {}: most requests would be refused",
                crate::clock::fmt_ns(bound_ns),
                crate::clock::fmt_ns(half_unit * 2),
                crate::clock::fmt_ns(declared_ns)
            ));
        }
        let (from, until) = self.certificate().0.valid_ns;
        if !(from..=until).contains(&crate::clock::system_unix_ns()) {
            return Err(CERTIFICATE_NOT_VALID.into());
        }
        self.signer().health()?;
        if self
            .signer_failure
            .is_within(SIGNER_FAILURE_HOLD, std::time::Instant::now())
        {
            return Err("the signer's last signature failed or came back too late".into());
        }
        if let Some(archive) = &self.archive {
            archive.health()?;
        }
        Ok(())
    }

    /// Whether the planned rollover's instant has passed (by the system clock).
    fn rolled_over(&self) -> Option<&Rollover> {
        self.rollover
            .as_ref()
            .filter(|next| crate::clock::system_unix_ns() >= next.at_ns)
    }

    /// The certificate in force now (a reload or the planned rollover may replace it).
    pub fn certificate(&self) -> CurrentCertificate {
        match self.rolled_over() {
            Some(next) => CurrentCertificate(next.issuing.load_full()),
            None => CurrentCertificate(self.issuing.load_full()),
        }
    }

    /// Whether issuing may block (either key of a rollover), and so runs on the blocking pool.
    fn may_block(&self) -> bool {
        self.signer.may_block() || self.rollover.as_ref().is_some_and(|r| r.signer.may_block())
    }

    /// Replaces the certificates, chains, rules and templates (SIGHUP): `first` for the
    /// signer started with, `next` for the planned rollover's. Requests in flight finish with
    /// the version they started with.
    pub fn reload(&self, first: Issuing, next: Option<Issuing>) {
        log_reloaded("first", &self.issuing.load(), &first);
        if let (Some(rollover), Some(next)) = (&self.rollover, &next) {
            log_reloaded("rollover", &rollover.issuing.load(), next);
        }
        // Both stored as one ([`Tsa::generation`]).
        self.reloading.fetch_add(1, Ordering::SeqCst);
        self.issuing.store(Arc::new(first));
        if let (Some(rollover), Some(next)) = (&self.rollover, next) {
            rollover.issuing.store(Arc::new(next));
        }
        self.reloading.fetch_add(1, Ordering::SeqCst);
        // Each to the checkpoints' key it certifies (the one in force, or the rollover's
        // planned one).
        if let Some(archive) = &self.archive {
            archive.set_certificate(self.issuing.load().certificate().der().to_vec(), false);
            if let Some(rollover) = &self.rollover {
                let certificate = rollover.issuing.load().certificate().der().to_vec();
                archive.set_certificate(certificate, true);
            }
        }
    }

    /// The first signer's [`Issuing`] and the planned rollover's, of one reload: a request
    /// that took the rules of one and the template of the other could choose its key by one
    /// precision and stamp genTime with another.
    fn generation(&self) -> (Arc<Issuing>, Option<Arc<Issuing>>) {
        loop {
            let before = self.reloading.load(Ordering::SeqCst);
            let first = self.issuing.load_full();
            let next = self.rollover.as_ref().map(|r| r.issuing.load_full());
            if before % 2 == 0 && self.reloading.load(Ordering::SeqCst) == before {
                return (first, next);
            }
            std::thread::yield_now();
        }
    }

    /// The planned rollover, if one is configured.
    pub fn rollover(&self) -> Option<&Rollover> {
        self.rollover.as_ref()
    }

    /// The token archive, when enabled.
    pub fn archive(&self) -> Option<&Archive> {
        self.archive.as_deref()
    }

    /// The signer in force now.
    pub fn signer(&self) -> &dyn Signer {
        match self.rolled_over() {
            Some(next) => next.signer.as_ref(),
            None => self.signer.as_ref(),
        }
    }

    /// Both keys of a planned rollover (either may be signing: the token's genTime decides,
    /// and the archive's checkpoints change keys apart from the tokens), or the one key.
    pub(super) fn signers(&self) -> impl Iterator<Item = &dyn Signer> {
        std::iter::once(self.signer.as_ref())
            .chain(self.rollover.as_ref().map(|r| r.signer.as_ref()))
    }

    /// The signer the server started with (before any planned rollover).
    pub(super) fn first_signer(&self) -> &dyn Signer {
        self.signer.as_ref()
    }

    pub fn clock(&self) -> &IssuingClock {
        &self.clock
    }
}

/// The most items one blocking task of a batch issues (see [`Tsa::respond_batch`]): about
/// 2 ms of ECDSA P-256, 20 ms of RSA-2048 (one core of the release build), that a request
/// queued behind the batch may wait.
pub const BATCH_CHUNK: usize = 64;

/// One item issued and not yet recorded: the response with its record, or the rejection.
type Issued = Result<Granted, Rejection>;

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A batch's issued items, their records handed to the archive together and awaited together:
/// the granted response, or the rejection (`systemFailure` where the record failed).
async fn record_all(archive: &Archive, issued: Vec<Issued>) -> Vec<Result<Vec<u8>, Rejection>> {
    let mut answers = Vec::with_capacity(issued.len());
    let mut commits = Vec::new();
    for (i, result) in issued.into_iter().enumerate() {
        answers.push(result.map(|(der, record)| {
            if let Some(record) = record {
                commits.push((i, Box::pin(archive.record(record))));
            }
            der
        }));
    }
    // Polling every record once hands them all to the writer before any commit is awaited.
    std::future::poll_fn(|cx| {
        commits.retain_mut(|(i, commit)| match Future::poll(commit.as_mut(), cx) {
            std::task::Poll::Ready(Ok(())) => false,
            std::task::Poll::Ready(Err(e)) => {
                answers[*i] = Err(archived(e));
                false
            }
            std::task::Poll::Pending => true,
        });
        match commits.is_empty() {
            true => std::task::Poll::Ready(()),
            false => std::task::Poll::Pending,
        }
    })
    .await;
    answers
}

/// The log line of a refused request: an error for a systemFailure, else information; at
/// most one a second of each ([`LogLimit`]).
fn log_rejection(rejection: &Rejection) {
    static FAILED: LogLimit = LogLimit::new();
    static REJECTED: LogLimit = LogLimit::new();
    if rejection.fail_info == FailInfo::SystemFailure {
        if let Some(left_out) = FAILED.allow() {
            let detail = rejection.detail.as_deref().unwrap_or("");
            tracing::error!(reason = %rejection.reason, detail, left_out, "request failed");
        }
    } else if let Some(left_out) = REJECTED.allow() {
        // The detail (the clock's own reason for a timeNotAvailable) is the operator's.
        tracing::info!(
            fail_info = %rejection.fail_info,
            reason = %rejection.reason,
            detail = rejection.detail.as_deref().unwrap_or(""),
            left_out,
            "request rejected"
        );
    }
}

/// A key event (EN 319 421) of a reload: the certificate of `signer` ("first", or the
/// planned "rollover" key's) in force from now on, named by its serial and hash (a renewed
/// one keeps its subject), and whether it changed from `was`'s.
fn log_reloaded(signer: &str, was: &Issuing, now: &Issuing) {
    let certificate = &now.certificate;
    let digests: Vec<&str> = now
        .rules
        .accepted_digests
        .iter()
        .map(|d| d.name())
        .collect();
    let policies: Vec<String> = now
        .rules
        .other_policies
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(
        event = "certificate_reloaded",
        signer,
        subject = %certificate.subject(),
        serial = %certificate.serial_hex(),
        certificate_sha256 = %certificate.sha256_hex(),
        changed = was.certificate.der() != certificate.der(),
        // The intermediates served with every token are the key's too.
        chain_changed = was.certificate.chain() != certificate.chain(),
        default_policy = %now.rules.default_policy,
        other_policies = %policies.join(","),
        accepted_digests = %digests.join(","),
        precision = ?now.template.precision(),
        "configuration and certificate chain reloaded"
    );
}

/// What the clock's bound leaves of the declared accuracy for the signature, where it is a
/// fair part of it (a tenth at least): a late signature is the signer's to answer for only
/// then. A bound that nears the accuracy leaves no signer time enough, and its refusals are
/// the clock's (blamed on the signer, readiness would drop the instance for a signer that is
/// well, and take it back, while the bound grew).
fn left_to_sign(declared_ns: u64, bound_ns: u64) -> Option<u64> {
    let left = declared_ns.saturating_sub(bound_ns);
    (left >= declared_ns / 10).then_some(left)
}

/// A token that could not be archived is not handed out.
fn archived(e: crate::archive::ArchiveError) -> Rejection {
    Rejection::internal("the token could not be archived", e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::serial::{RandomSerials, SerialError};
    use crate::clock::{Reading, SyncState, TimeSource};

    /// A time source that has lost its references.
    struct Unsynchronized;

    impl TimeSource for Unsynchronized {
        fn name(&self) -> &'static str {
            "unsynchronized"
        }
        fn read(&self) -> Reading {
            Reading {
                unix_ns: crate::clock::system_unix_ns(),
                bound_ns: 0,
                state: SyncState::Unsynchronized,
                reason: "ntp 10.9.8.7:123 contradicts the model by +0.8 s".into(),
            }
        }
    }

    /// Random serials, counted.
    struct Counted(Arc<AtomicU64>);

    impl SerialAllocator for Counted {
        fn next(&self) -> Result<crate::protocol::Serial, SerialError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            RandomSerials::new().next()
        }
    }

    /// A SHA-256 query (with a nonce, asking for the certificate), DER.
    fn query_der() -> Vec<u8> {
        crate::client::Query::for_data(crate::alg::DigestAlgorithm::Sha256, b"x")
            .unwrap()
            .to_der()
            .unwrap()
    }

    /// A clock that reads now, synchronized to within 1 ms, declaring `accuracy`.
    fn fixed_now(accuracy: Duration) -> IssuingClock {
        IssuingClock::new(
            Box::new(Fixed(crate::clock::system_unix_ns())),
            accuracy,
            Duration::from_micros(1),
        )
    }

    /// A TSA of the development configuration (a fresh P-256 key), built in `dir`.
    fn development_tsa(dir: &std::path::Path) -> Tsa {
        development_tsa_with(dir, "")
    }

    /// [`development_tsa`] with `extra` configuration after the `[clock]` section.
    fn development_tsa_with(dir: &std::path::Path, extra: &str) -> Tsa {
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).expect("a PKI");
        std::fs::write(dir.join("key.pem"), &pki.tsu_key_pem).unwrap();
        let secret = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(dir.join("key.pem"), secret).unwrap();
        std::fs::write(dir.join("cert.pem"), &pki.tsu_cert_pem).unwrap();
        let path = dir.join("tsa.toml");
        std::fs::write(
            &path,
            format!(
                "[signer]\nkind = \"software\"\nkey = \"key.pem\"\ncertificate = \"cert.pem\"\n\
                 [clock]\nsource = \"development\"\n{extra}"
            ),
        )
        .unwrap();
        let config = crate::config::Config::load(&path).expect("the configuration");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { super::super::build(&config) })
            .expect("the TSA")
    }

    #[test]
    fn a_request_refused_for_want_of_time_spends_no_serial() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let taken = Arc::new(AtomicU64::new(0));
        tsa.serials = Box::new(Counted(taken.clone()));
        let query = query_der();
        assert!(
            tsa.issue(&query).is_ok(),
            "the development clock is trusted"
        );
        assert_eq!(taken.load(Ordering::Relaxed), 1);

        tsa.clock = IssuingClock::new(
            Box::new(Unsynchronized),
            Duration::from_secs(1),
            Duration::from_micros(1),
        );
        for _ in 0..3 {
            let refused = tsa.issue(&query).expect_err("no time to stamp with");
            assert_eq!(refused.fail_info, FailInfo::TimeNotAvailable);
            // The client is told why in general terms; the sources' own words (addresses,
            // devices, offsets) go to the log only.
            assert_eq!(refused.reason, RefusalKind::Unsynchronized.public_reason());
            assert!(refused.detail.unwrap().contains("10.9.8.7"));
        }
        assert!(tsa.readiness().unwrap_err().contains("10.9.8.7"));
        assert_eq!(taken.load(Ordering::Relaxed), 1, "refusals spent serials");
        assert_eq!(
            tsa.clock.refusals(RefusalKind::Unsynchronized),
            3,
            "each refusal is counted"
        );
    }

    /// A time source that always reads `unix_ns`, synchronized to within a millisecond.
    struct Fixed(u64);

    /// A synchronized source at the system clock, with a bound of `.0`.
    struct Bounded(u64);

    impl TimeSource for Bounded {
        fn name(&self) -> &'static str {
            "bounded"
        }
        fn read(&self) -> Reading {
            Reading {
                unix_ns: crate::clock::system_unix_ns(),
                bound_ns: self.0,
                state: SyncState::Synchronized,
                reason: "bounded".into(),
            }
        }
    }

    /// A bound that nears the declared accuracy leaves the signer too little: a signature
    /// back past it is refused, and is not the signer's (readiness stays); a bound that leaves
    /// less than half of genTime's precision is not ready.
    #[test]
    fn a_bound_that_nears_the_declared_accuracy_is_the_clocks_not_the_signers() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let inner = Arc::clone(&tsa.signer);
        let query = query_der();
        // 1 ms of bound, 1.05 ms declared: 50 µs left, under a tenth.
        tsa.clock = IssuingClock::new(
            Box::new(Bounded(1_000_000)),
            Duration::from_micros(1_050),
            Duration::from_micros(1),
        );
        tsa.signer = Arc::new(Stalling {
            inner: Arc::clone(&inner),
            stall: Duration::from_millis(1),
        });
        let refused = tsa.issue(&query).expect_err("late");
        assert_eq!(refused.fail_info, FailInfo::TimeNotAvailable);
        assert_eq!(tsa.clock.refusals(RefusalKind::SignedLate), 1);
        assert_eq!(tsa.readiness(), Ok(()));

        // A precision of seconds: ready while the bound leaves half a second.
        let mut tsa = development_tsa_with(dir.path(), "[token]\nprecision = \"seconds\"\n");
        for (bound_ms, ready) in [(400, true), (600, false)] {
            tsa.clock = IssuingClock::new(
                Box::new(Bounded(bound_ms * 1_000_000)),
                Duration::from_secs(1),
                Duration::from_micros(1),
            );
            match tsa.readiness() {
                Ok(()) => assert!(ready, "{bound_ms} ms"),
                Err(e) => {
                    assert!(!ready, "{bound_ms} ms: {e}");
                    assert!(e.contains("half of genTime's precision"), "{e}");
                }
            }
        }
    }

    impl TimeSource for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn read(&self) -> Reading {
            Reading {
                unix_ns: self.0,
                bound_ns: 1_000_000,
                state: SyncState::Synchronized,
                reason: "fixed".into(),
            }
        }
    }

    #[test]
    fn a_rollover_takes_effect_at_the_gen_time_the_token_carries() {
        const S: u64 = 1_000_000_000;
        let seconds = "[token]\nprecision = \"seconds\"\n";
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut tsa = development_tsa_with(a.path(), seconds);
        let next = development_tsa_with(b.path(), seconds);
        let old_der = tsa.issuing.load().certificate().der().to_vec();
        let new_der = next.issuing.load().certificate().der().to_vec();
        let issuing = Arc::try_unwrap(next.issuing.into_inner())
            .ok()
            .expect("the only reference");
        let second = crate::clock::system_unix_ns() / S * S;
        tsa.rollover = Some(Rollover::new(second + S / 2, next.signer, issuing));
        let query = query_der();
        // Read 0.7 s past the second, genTime is the whole second: before the rollover instant
        // (0.5 s past it), so the old key signs. Read in the next second, the new key does.
        for (reading, expected) in [
            (second + 7 * S / 10, &old_der),
            (second + S + S / 5, &new_der),
        ] {
            tsa.clock = IssuingClock::new(
                Box::new(Fixed(reading)),
                Duration::from_secs(1),
                Duration::from_micros(1),
            );
            let der = tsa.issue(&query).expect("granted");
            let response = crate::client::read::Response::from_der(&der).unwrap();
            let token = response.token.expect("a token");
            let certificates: Vec<Vec<u8>> = token
                .signed_data
                .certificates
                .iter()
                .flat_map(|set| set.0.iter())
                .map(|c| der::Encode::to_der(c).unwrap())
                .collect();
            assert_eq!(
                certificates,
                std::slice::from_ref(expected),
                "read at {reading}"
            );
        }
    }

    /// The certificate must be valid over the whole window a token may stand for: from its
    /// genTime less the accuracy to its genTime plus the declared accuracy (a signature may
    /// come back that late and still be sent).
    #[test]
    fn the_certificate_covers_gen_time_less_its_accuracy_to_the_declared_accuracy_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let (from, until) = tsa.issuing.load().valid_ns;
        let query = query_der();
        const MS: u64 = 1_000_000;
        // Fixed reads with a bound of 1 ms; 1 s declared.
        for (reading, granted) in [
            (until - MS / 1000, false),
            (until - 999 * MS, false),
            (until - 1_001 * MS, true),
            (from + MS / 2, false),
            (from + 2 * MS, true),
        ] {
            tsa.clock = IssuingClock::new(
                Box::new(Fixed(reading)),
                Duration::from_secs(1),
                Duration::from_micros(1),
            );
            match tsa.issue(&query) {
                Ok(_) => assert!(granted, "granted at {reading} in [{from}, {until}]"),
                Err(refused) => {
                    assert!(!granted, "at {reading}: {refused:?}");
                    assert_eq!(refused.fail_info, FailInfo::SystemFailure);
                    assert_eq!(refused.reason, CERTIFICATE_NOT_VALID);
                }
            }
        }
    }

    #[test]
    fn a_failed_signature_fails_readiness_until_one_succeeds_or_for_a_while() {
        let failure = Moment::new();
        let recent = |at| failure.is_within(SIGNER_FAILURE_HOLD, at);
        let now = std::time::Instant::now;
        assert!(!recent(now()), "none failed yet");
        failure.mark();
        assert!(recent(now()));
        failure.clear();
        assert!(!recent(now()), "one succeeded since");
        failure.mark();
        // Without a request that could succeed (a load balancer took the instance out), the
        // failure stops counting after the hold.
        assert!(!recent(now() + SIGNER_FAILURE_HOLD));
        assert!(recent(now() + SIGNER_FAILURE_HOLD / 2));
    }

    /// A signer whose signatures come back after `stall` (an HSM that stalls).
    struct Stalling {
        inner: Arc<dyn Signer>,
        stall: Duration,
    }

    impl Signer for Stalling {
        fn algorithm(&self) -> crate::alg::SignatureAlgorithm {
            self.inner.algorithm()
        }
        fn public_key(&self) -> &[u8] {
            self.inner.public_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
            std::thread::sleep(self.stall);
            self.inner.sign(message)
        }
    }

    /// A signer whose sessions come free only after `busy`: it gives up within the wait it
    /// is given, which it records.
    struct Busy {
        inner: Arc<dyn Signer>,
        busy: Duration,
        given: std::sync::Mutex<Option<Duration>>,
    }

    impl Signer for Busy {
        fn algorithm(&self) -> crate::alg::SignatureAlgorithm {
            self.inner.algorithm()
        }
        fn public_key(&self) -> &[u8] {
            self.inner.public_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
            self.sign_within(message, Duration::MAX)
        }
        fn sign_within(&self, message: &[u8], wait: Duration) -> Result<Vec<u8>, SignError> {
            *self.given.lock().unwrap() = Some(wait);
            if wait < self.busy {
                return Err(SignError::Late(wait));
            }
            self.inner.sign(message)
        }
    }

    #[test]
    fn a_signer_is_given_what_is_left_of_the_declared_accuracy_to_begin_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let inner = Arc::clone(&tsa.signer);
        let query = query_der();
        // The reading's bound is 1 ms; 100 ms are declared: 99 ms or less are left.
        let declared = Duration::from_millis(100);
        for (busy, granted) in [(Duration::from_millis(10), true), (declared, false)] {
            let signer = Arc::new(Busy {
                inner: Arc::clone(&inner),
                busy,
                given: Default::default(),
            });
            tsa.signer = signer.clone();
            tsa.clock = fixed_now(declared);
            let outcome = tsa.issue(&query);
            let given = signer.given.lock().unwrap().expect("asked to sign");
            // What was left: under the 99 ms, less the little spent since the reading.
            assert!(
                given <= Duration::from_millis(99) && given > Duration::from_millis(50),
                "{given:?}"
            );
            match outcome {
                Ok(_) => assert!(granted, "granted although busy for {busy:?}"),
                Err(refused) => {
                    assert!(!granted, "busy for {busy:?}: {refused:?}");
                    assert_eq!(refused.fail_info, FailInfo::TimeNotAvailable);
                    assert_eq!(tsa.clock.refusals(RefusalKind::SignedLate), 1);
                    assert!(tsa.readiness().unwrap_err().contains("too late"));
                }
            }
        }
    }

    #[test]
    fn a_signature_back_later_than_the_declared_accuracy_allows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let inner = Arc::clone(&tsa.signer);
        let query = query_der();
        // The reading's bound is 1 ms; 100 ms are declared.
        let declared = Duration::from_millis(100);
        for (stall, granted) in [(Duration::from_millis(20), true), (declared, false)] {
            tsa.signer = Arc::new(Stalling {
                inner: Arc::clone(&inner),
                stall,
            });
            tsa.clock = fixed_now(declared);
            match tsa.issue(&query) {
                Ok(_) => assert!(granted, "a signature {stall:?} late was granted"),
                Err(refused) => {
                    assert!(
                        !granted,
                        "a signature {stall:?} late was refused: {refused:?}"
                    );
                    assert_eq!(refused.fail_info, FailInfo::TimeNotAvailable);
                    assert_eq!(tsa.clock.refusals(RefusalKind::SignedLate), 1);
                    // Readiness holds off what a balancer would send into the same wait.
                    let not_ready = tsa.readiness().unwrap_err();
                    assert!(not_ready.contains("too late"), "{not_ready}");
                }
            }
        }
    }

    /// `requests` at once (a tenth of the lane's wait apart) to a TSA with one place in its
    /// signer's lane and signatures that take `stall`; their outcomes in order.
    fn through_one_place(stall: Duration, requests: usize) -> Vec<(Vec<u8>, Outcome)> {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        tsa.signer = Arc::new(Stalling {
            inner: Arc::clone(&tsa.signer),
            stall,
        });
        tsa.blocking_lane = Arc::new(tokio::sync::Semaphore::new(1));
        let tsa = Arc::new(tsa);
        let query = Bytes::from(
            crate::client::Query::for_data(crate::alg::DigestAlgorithm::Sha256, b"x")
                .unwrap()
                .to_der()
                .unwrap(),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..requests {
                tasks.push(tokio::spawn({
                    let (tsa, query) = (Arc::clone(&tsa), query.clone());
                    async move { tsa.respond(query, &Client::ANONYMOUS).await }
                }));
                tokio::time::sleep(LANE_WAIT / 10).await;
            }
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            outcomes
        })
    }

    #[test]
    fn a_request_behind_a_signer_that_ends_nothing_is_refused() {
        // The one place is held by a signature three times the lane's wait long.
        let outcomes = through_one_place(3 * LANE_WAIT, 2);
        assert_eq!(outcomes[0].1, Outcome::Granted);
        assert_eq!(outcomes[1].1, Outcome::Rejected(FailInfo::SystemFailure));
        let response = crate::client::read::Response::from_der(&outcomes[1].0).unwrap();
        assert!(
            format!("{response:?}").contains("ended no signature"),
            "{response:?}"
        );
    }

    #[test]
    fn a_request_behind_a_slow_signer_that_moves_waits_its_turn() {
        // Signatures of 0.6 × the lane's wait, one at a time: the fourth waits about twice the
        // lane's wait, while one ends every 0.6 of it.
        let outcomes = through_one_place(LANE_WAIT * 6 / 10, 4);
        for (i, (_, outcome)) in outcomes.iter().enumerate() {
            assert_eq!(*outcome, Outcome::Granted, "request {i}");
        }
    }

    /// A signer whose signatures wait until its gate opens, counting those it makes.
    struct Gated {
        inner: Arc<dyn Signer>,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
        signed: AtomicU64,
    }

    impl Signer for Gated {
        fn algorithm(&self) -> crate::alg::SignatureAlgorithm {
            self.inner.algorithm()
        }
        fn public_key(&self) -> &[u8] {
            self.inner.public_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
            let open = self.open.lock().unwrap();
            drop(self.opened.wait_while(open, |open| !*open).unwrap());
            self.signed.fetch_add(1, Ordering::Relaxed);
            self.inner.sign(message)
        }
    }

    #[test]
    fn a_batch_whose_client_went_away_signs_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let gated = Arc::new(Gated {
            inner: Arc::clone(&tsa.signer),
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            signed: AtomicU64::new(0),
        });
        tsa.signer = gated.clone();
        const LANES: usize = 2;
        tsa.blocking_lane = Arc::new(tokio::sync::Semaphore::new(LANES));
        let tsa = Arc::new(tsa);
        let items = vec![Bytes::from(query_der()); 10 * BATCH_CHUNK];
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Its client goes away while the first chunks wait at the gate: hyper drops the
            // request's future.
            let answered = tokio::time::timeout(
                Duration::from_millis(300),
                tsa.respond_batch(items, &Client::ANONYMOUS),
            )
            .await;
            assert!(
                answered.is_err(),
                "nothing is signed while the gate is shut"
            );
        });
        *gated.open.lock().unwrap() = true;
        gated.opened.notify_all();
        // Until the chunks that were running have ended: no signature for half a second.
        let mut signed = u64::MAX;
        while signed != gated.signed.load(Ordering::Relaxed) {
            signed = gated.signed.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(
            signed, LANES as u64,
            "each running chunk ends with the item it was signing, of {} in a chunk",
            BATCH_CHUNK
        );
        assert_eq!(tsa.blocking_lane.available_permits(), LANES);
    }

    /// A request reads the first signer's and the rollover's [`Issuing`] of one reload: while
    /// a reload stores them (its count odd, or moved on meanwhile), it reads them again.
    #[test]
    fn a_request_reads_both_signers_of_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let tsa = Arc::new(development_tsa(dir.path()));
        tsa.reloading.store(1, Ordering::SeqCst);
        let reader = {
            let tsa = Arc::clone(&tsa);
            std::thread::spawn(move || tsa.generation().0)
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "it waits for the reload's end");
        tsa.reloading.store(2, Ordering::SeqCst);
        let first = reader.join().unwrap();
        assert!(Arc::ptr_eq(&first, &tsa.issuing.load_full()));
    }

    /// A signer that panics at its `.1`th signature (counting from 1), and signs the others.
    struct PanicsOnce(Arc<dyn Signer>, u64, AtomicU64);

    impl Signer for PanicsOnce {
        fn algorithm(&self) -> crate::alg::SignatureAlgorithm {
            self.0.algorithm()
        }
        fn public_key(&self) -> &[u8] {
            self.0.public_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
            if self.2.fetch_add(1, Ordering::SeqCst) + 1 == self.1 {
                panic!("a fault in one item");
            }
            self.0.sign(message)
        }
    }

    /// A fault (a panic) while one item of a batch is issued answers that item alone with
    /// systemFailure; the others, of its chunk too, are granted.
    #[test]
    fn a_fault_in_one_batch_item_spoils_that_item_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        tsa.signer = Arc::new(PanicsOnce(Arc::clone(&tsa.signer), 2, AtomicU64::new(0)));
        // A lane for each chunk: none waits for another (whose fault, with its backtrace
        // printed, may take longer than the tests' wait for a lane that does not move).
        tsa.blocking_lane = Arc::new(tokio::sync::Semaphore::new(8));
        let tsa = Arc::new(tsa);
        let items = vec![Bytes::from(query_der()); 4];
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let answers = runtime.block_on(tsa.respond_batch(items, &Client::ANONYMOUS));
        let outcomes: Vec<bool> = answers
            .iter()
            .map(|(der, outcome)| {
                let granted = crate::client::read::Response::from_der(der)
                    .unwrap()
                    .token
                    .is_some();
                assert_eq!(granted, matches!(outcome, Outcome::Granted));
                granted
            })
            .collect();
        // Which item met the fault depends on how the chunks ran; one did, alone.
        assert_eq!(
            outcomes.iter().filter(|granted| **granted).count(),
            3,
            "{outcomes:?}"
        );
    }

    /// Random serials, each after a wait (as for a reservation the writer is slow to make).
    struct Slow(Duration);

    impl SerialAllocator for Slow {
        fn next(&self) -> Result<crate::protocol::Serial, SerialError> {
            std::thread::sleep(self.0);
            RandomSerials::new().next()
        }
    }

    #[test]
    fn a_serial_that_waited_has_the_time_read_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsa = development_tsa(dir.path());
        let wait = Duration::from_millis(50);
        tsa.serials = Box::new(Slow(wait));
        let query = query_der();
        let asked = crate::clock::system_unix_ns();
        let der = tsa.issue(&query).expect("granted");
        let response = crate::client::read::Response::from_der(&der).unwrap();
        let gen_time = response
            .token
            .expect("a token")
            .tst_info()
            .gen_time
            .unix_ns();
        assert!(
            gen_time >= asked + wait.as_nanos() as u64,
            "genTime {} ms after the request, the serial took {wait:?}",
            (gen_time.saturating_sub(asked)) / 1_000_000
        );
    }
}
