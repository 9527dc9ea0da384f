//! Prometheus metrics, served as OpenMetrics text on the admin listener (`GET /metrics`).
//!
//! Counters and histograms are updated on the request path; the clock, the certificate and the
//! build are read when scraped (a collector). Every label value comes from a bounded set — an
//! outcome, a failInfo name, a refusal kind, a configured source name — never from a client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::issue::Outcome;
use super::Tsa;
use crate::clock::{RefusalKind, SyncState};
use crate::protocol::FailInfo;

type Labels = Vec<(&'static str, String)>;

/// The request-path instruments.
pub struct Metrics {
    requests: Family<Labels, Counter>,
    /// The `requests` series, made once so that counting allocates nothing.
    granted: Counter,
    /// By the failInfo's place in [`FailInfo::ALL`].
    rejected: [Counter; FailInfo::ALL.len()],
    tokens: Counter,
    request_duration: Histogram,
    signer_duration: Histogram,
    signer_errors: Counter,
    /// Requests rejected (any failInfo), for the status page's rates.
    rejections: Counter,
    /// Requests and connections refused by overload control, by what was full; each series
    /// also held by itself (created at start, counted without a look-up: under overload this
    /// is the most frequent answer).
    overloads: Family<Labels, Counter>,
    overloaded: [Counter; Overload::ALL.len()],
    /// Requests refused by client authentication and quotas, by reason; each series also
    /// held by itself (created at start, so that they read 0 before the first refusal).
    auth_refusals: Family<Labels, Counter>,
    auth_refused: [Counter; 4],
    /// The status page's history, sampled from these counters and the clock.
    pub(super) history: super::history::History,
}

impl Default for Metrics {
    fn default() -> Self {
        // 50 µs to about 52 s: past the server's own longest waits (a queue wait, the signer's
        // lane, a read timeout, an archive commit), which a quantile would otherwise pin at
        // the last bucket.
        let buckets = || exponential_buckets(50e-6, 2.0, 21);
        let requests = Family::<Labels, Counter>::default();
        let auth_refusals = Family::<Labels, Counter>::default();
        let overloads = Family::<Labels, Counter>::default();
        let series = |outcome: &str, fail_info: &str| {
            let labels = vec![("outcome", outcome.into()), ("fail_info", fail_info.into())];
            requests.get_or_create(&labels).clone()
        };
        Self {
            granted: series("granted", "none"),
            rejected: FailInfo::ALL.map(|f| series("rejected", f.name())),
            requests,
            tokens: Counter::default(),
            request_duration: Histogram::new(buckets()),
            signer_duration: Histogram::new(buckets()),
            signer_errors: Counter::default(),
            rejections: Counter::default(),
            overloaded: Overload::ALL.map(|what| {
                overloads
                    .get_or_create(&vec![("limit", what.name().into())])
                    .clone()
            }),
            overloads,
            auth_refused: AuthRefusal::ALL.map(|why| {
                auth_refusals
                    .get_or_create(&vec![("reason", why.name().into())])
                    .clone()
            }),
            auth_refusals,
            history: Default::default(),
        }
    }
}

impl Metrics {
    /// One answered time-stamp request (also those refused at the HTTP level).
    pub fn request(&self, outcome: Outcome, duration: Duration) {
        match outcome {
            Outcome::Granted => {
                self.tokens.inc();
                self.granted.inc();
            }
            Outcome::Rejected(fail) => {
                self.rejections.inc();
                let at = FailInfo::ALL.iter().position(|f| *f == fail);
                self.rejected[at.expect("every failInfo is in ALL")].inc();
            }
        }
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// A request refused by client authentication (401) or its client's quota (429).
    pub fn auth_refused(&self, why: AuthRefusal) {
        self.auth_refused[why as usize].inc();
    }

    /// A request or a connection refused by overload control.
    pub fn overloaded(&self, what: Overload) {
        self.overloaded[what as usize].inc();
    }

    /// Tokens issued and requests rejected since start.
    pub fn totals(&self) -> (u64, u64) {
        (self.tokens.get(), self.rejections.get())
    }

    pub fn signature(&self, duration: Duration, ok: bool) {
        self.signer_duration.observe(duration.as_secs_f64());
        if !ok {
            self.signer_errors.inc();
        }
    }

    /// The registry with the instruments and the scrape-time collector over `tsa`.
    fn registry(tsa: Arc<Tsa>) -> Registry {
        let m = &tsa.metrics;
        let mut r = Registry::with_prefix("tsa");
        r.register(
            "requests",
            "Time-stamp requests answered, by outcome and failInfo",
            m.requests.clone(),
        );
        r.register(
            "tokens_issued",
            "Time-stamp tokens issued",
            m.tokens.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a request's headers to its reply",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "signer_duration",
            "Time of one signature by the signing key",
            Unit::Seconds,
            m.signer_duration.clone(),
        );
        r.register(
            "signer_errors",
            "Signatures that failed",
            m.signer_errors.clone(),
        );
        r.register(
            "overload_refusals",
            "Requests (limit=queue), connections (limit=connections, on the admin listener \
             limit=admin_connections) and batches (limit=batches) refused with 503 because the \
             server was full, or because their client address had its share \
             (limit=connections_per_address, limit=batches_per_address) or opened connections \
             faster than its rate (limit=new_connections_per_address), or their client had its \
             share of the batch places (limit=batches_per_client)",
            m.overloads.clone(),
        );
        r.register(
            "auth_refusals",
            "Requests refused for want of credentials (reason=unauthenticated, 401), with wrong \
             ones (reason=invalid_credentials, 401) or over their client's quota (reason=quota, 429)",
            m.auth_refusals.clone(),
        );
        if let Some(archive) = tsa.archive() {
            let stats = archive.commit_stats();
            r.register_with_unit(
                "archive_commit_duration",
                "Time of one archive commit, from its write to its records durable (a transaction and its fsync)",
                Unit::Seconds,
                stats.duration.clone(),
            );
            r.register(
                "archive_commit_records",
                "Token records in one archive commit (group commit)",
                stats.records.clone(),
            );
        }
        r.register_collector(Box::new(Scraped(tsa.clone())));
        r
    }
}

/// Why client authentication refused a request.
#[derive(Clone, Copy, Debug)]
pub enum AuthRefusal {
    Unauthenticated = 0,
    InvalidCredentials = 1,
    Quota = 2,
    /// The address made more failed authentications than `server.auth_failures_per_address_*`
    /// allows.
    AddressFailures = 3,
}

impl AuthRefusal {
    const ALL: [AuthRefusal; 4] = [
        AuthRefusal::Unauthenticated,
        AuthRefusal::InvalidCredentials,
        AuthRefusal::Quota,
        AuthRefusal::AddressFailures,
    ];

    fn name(self) -> &'static str {
        match self {
            AuthRefusal::Unauthenticated => "unauthenticated",
            AuthRefusal::InvalidCredentials => "invalid_credentials",
            AuthRefusal::Quota => "quota",
            AuthRefusal::AddressFailures => "address_failures",
        }
    }
}

/// What overload control found full.
#[derive(Clone, Copy, Debug)]
pub enum Overload {
    /// `server.max_queue`: requests admitted and not yet answered.
    Queue = 0,
    /// `server.max_connections`.
    Connections = 1,
    /// `server.max_batches_in_flight`: batch bodies being read or answered.
    Batches = 2,
    /// `server.admin_max_connections`: the admin listener's connections.
    AdminConnections = 3,
    /// `server.max_connections_per_address`: one client address's connections.
    ConnectionsPerAddress = 4,
    /// One client address's batches in flight (half of `server.max_batches_in_flight`, while
    /// `server.max_connections_per_address` is set).
    BatchesPerAddress = 5,
    /// `server.new_connections_per_address_per_s`: one client address's new connections.
    NewConnectionsPerAddress = 6,
    /// One client's batches in flight (half of `server.max_batches_in_flight`, while `[auth]`
    /// names clients; the anonymous callers are one client).
    BatchesPerClient = 7,
}

impl Overload {
    const ALL: [Overload; 8] = [
        Overload::Queue,
        Overload::Connections,
        Overload::Batches,
        Overload::AdminConnections,
        Overload::ConnectionsPerAddress,
        Overload::BatchesPerAddress,
        Overload::NewConnectionsPerAddress,
        Overload::BatchesPerClient,
    ];

    fn name(self) -> &'static str {
        match self {
            Overload::Queue => "queue",
            Overload::Connections => "connections",
            Overload::Batches => "batches",
            Overload::AdminConnections => "admin_connections",
            Overload::ConnectionsPerAddress => "connections_per_address",
            Overload::BatchesPerAddress => "batches_per_address",
            Overload::NewConnectionsPerAddress => "new_connections_per_address",
            Overload::BatchesPerClient => "batches_per_client",
        }
    }
}

/// Encodes all metrics of `tsa` in the OpenMetrics text format.
pub fn encode(tsa: &Arc<Tsa>) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &Metrics::registry(tsa.clone()))
        .expect("writing to a String cannot fail");
    text
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What is read when scraped: build, certificate, clock and its sources.
struct Scraped(Arc<Tsa>);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Labels, f64)],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut metric = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let tsa = &self.0;
        let none: Labels = vec![];
        gauge(
            &mut e,
            "build_info",
            "The build of this TSA",
            None,
            &[(vec![("version", env!("CARGO_PKG_VERSION").into())], 1.0)],
        )?;
        let certificate = tsa.certificate();
        let left = certificate.remaining(SystemTime::now()).as_secs_f64();
        gauge(
            &mut e,
            "certificate_expiry",
            "Time until the TSU certificate expires",
            Some(&Unit::Seconds),
            &[(none.clone(), left)],
        )?;
        // Issuing stops token.min_certificate_validity_days before the expiry.
        let issuing_left = certificate
            .issues_until_ns()
            .saturating_sub(crate::clock::system_unix_ns()) as f64
            / 1e9;
        gauge(
            &mut e,
            "certificate_issuing_left",
            "Time until the TSU certificate stops issuing (its expiry less token.min_certificate_validity_days)",
            Some(&Unit::Seconds),
            &[(none.clone(), issuing_left)],
        )?;

        // The HTTPS listener's own: an expired certificate, or client CRLs past their
        // nextUpdate, fail handshakes while the rest says ready.
        if let Some(tls) = tsa.tls.load().as_ref() {
            let now_s = crate::clock::system_unix_ns() as f64 / 1e9;
            if let Some(not_after) = tls.not_after_s() {
                gauge(
                    &mut e,
                    "tls_certificate_expiry",
                    "Time until the HTTPS listener's certificate expires (negative: expired)",
                    Some(&Unit::Seconds),
                    &[(none.clone(), not_after as f64 - now_s)],
                )?;
            }
            if let Some(until) = tls.crls_until_s() {
                gauge(
                    &mut e,
                    "tls_client_crl_next_update",
                    "Time until the earliest client CRL's nextUpdate (negative: past it, client certificates are refused until fresh CRLs are reloaded)",
                    Some(&Unit::Seconds),
                    &[(none.clone(), until as f64 - now_s)],
                )?;
            }
        }
        gauge(
            &mut e,
            "queue_depth",
            "Time-stamp requests admitted and not yet answered (a batch: one per chunk of 64 items)",
            None,
            &[(none.clone(), tsa.admission.depth() as f64)],
        )?;
        gauge(
            &mut e,
            "queue_waiting",
            "Time-stamp requests waiting for a place in the queue (server.queue_wait_ms)",
            None,
            &[(none.clone(), tsa.admission.waiting() as f64)],
        )?;
        gauge(
            &mut e,
            "queue_limit",
            "The most requests admitted at once (server.max_queue)",
            None,
            &[(none.clone(), tsa.admission.max_queue() as f64)],
        )?;
        gauge(
            &mut e,
            "batches_in_flight",
            "Batches being read, answered or sent (server.max_batches_in_flight)",
            None,
            &[(
                none.clone(),
                tsa.max_batches
                    .saturating_sub(tsa.batches.available_permits()) as f64,
            )],
        )?;
        gauge(
            &mut e,
            "open_connections",
            "Open connections on the public listener",
            None,
            &[(none.clone(), tsa.connections.count() as f64)],
        )?;
        gauge(
            &mut e,
            "client_addresses",
            "Client addresses with a public connection open (counted while \
             server.max_connections_per_address is set; an IPv6 /64 is one)",
            None,
            &[(none.clone(), tsa.addresses.count() as f64)],
        )?;
        gauge(
            &mut e,
            "connection_rate_addresses",
            "Client addresses whose allowance of new connections is refilling (kept while \
             server.new_connections_per_address_per_s is set; an IPv6 /64 is one)",
            None,
            &[(none.clone(), tsa.connection_rate.count() as f64)],
        )?;

        if let Some(archive) = tsa.archive() {
            gauge(
                &mut e,
                "archive_queue_depth",
                "Token records and events waiting for the archive's next commit",
                None,
                &[(none.clone(), archive.queue_depth() as f64)],
            )?;
            if let Some(behind) = archive.imprint_index_behind() {
                gauge(
                    &mut e,
                    "archive_imprint_index_behind",
                    "Archived token records not yet in the imprint index (look-ups by imprint \
                     read them from the archive itself)",
                    None,
                    &[(none.clone(), behind as f64)],
                )?;
            }
        }

        let clock = tsa.clock();
        let reading = clock.reading();
        let states = [
            SyncState::Synchronized,
            SyncState::Holdover,
            SyncState::Unsynchronized,
        ];
        let state_series: Vec<(Labels, f64)> = states
            .iter()
            .map(|s| {
                (
                    vec![("state", s.name().into())],
                    f64::from(u8::from(*s == reading.state)),
                )
            })
            .collect();
        gauge(
            &mut e,
            "clock_state",
            "The clock's state (1 for the current one)",
            None,
            &state_series,
        )?;
        // +Inf while unbounded (unsynchronized, or just resumed): an alert on the bound fires
        // then, where a series left out would go quiet.
        let bound = match reading.bound_ns {
            u64::MAX => f64::INFINITY,
            ns => ns as f64 / 1e9,
        };
        gauge(
            &mut e,
            "clock_error_bound",
            "The clock's error bound now (+Inf while unbounded)",
            Some(&Unit::Seconds),
            &[(none.clone(), bound)],
        )?;
        gauge(
            &mut e,
            "clock_declared_accuracy",
            "The accuracy the TSA declares; it refuses to stamp beyond it",
            Some(&Unit::Seconds),
            &[(none.clone(), clock.max_bound().as_secs_f64())],
        )?;
        {
            let mut metric = e.encode_descriptor(
                "clock_refusals",
                "Requests refused with timeNotAvailable, by reason",
                None,
                MetricType::Counter,
            )?;
            for kind in RefusalKind::ALL {
                let labels: Labels = vec![("reason", kind.name().into())];
                ConstCounter::new(clock.refusals(kind)).encode(metric.encode_family(&labels)?)?;
            }
        }

        let Some(views) = clock.views() else {
            return Ok(());
        };
        if let Some(system) = &views.system {
            if let Some(offset) = system.offset_ns {
                gauge(
                    &mut e,
                    "clock_offset",
                    "UTC minus the local (monotonic) clock, as the discipline estimates it",
                    Some(&Unit::Seconds),
                    &[(none.clone(), offset as f64 / 1e9)],
                )?;
            }
            if let Some(ppm) = system.frequency_ppm {
                gauge(
                    &mut e,
                    "clock_frequency_ppm",
                    "How much faster UTC runs than the local clock, in parts per million",
                    None,
                    &[(none.clone(), ppm)],
                )?;
            }
        }
        let per_source = |f: &dyn Fn(&crate::clock::discipline::SourceView) -> Option<f64>| {
            views
                .sources
                .iter()
                .filter_map(|v| f(v).map(|x| (vec![("source", v.name.clone())], x)))
                .collect::<Vec<_>>()
        };
        let seconds = |ns: i128| ns as f64 / 1e9;
        gauge(
            &mut e,
            "clock_source_offset",
            "A source's filtered offset (UTC − local)",
            Some(&Unit::Seconds),
            &per_source(&|v| v.offset_ns.map(|n| seconds(n.into()))),
        )?;
        gauge(
            &mut e,
            "clock_source_delay",
            "A source's round-trip delay",
            Some(&Unit::Seconds),
            &per_source(&|v| v.delay_ns.map(|n| seconds(n.into()))),
        )?;
        gauge(&mut e, "clock_source_distance", "A source's root distance (its dispersion: half the delays, dispersion, precision, jitter, age)", Some(&Unit::Seconds),
            &per_source(&|v| v.distance_ns.map(|n| seconds(n.into()))))?;
        gauge(
            &mut e,
            "clock_source_reach",
            "A source's reach register: the last eight polls, newest in the lowest bit",
            None,
            &per_source(&|v| Some(f64::from(v.reach))),
        )?;
        let selections: Vec<(Labels, f64)> = views
            .sources
            .iter()
            .map(|v| {
                (
                    vec![
                        ("source", v.name.clone()),
                        ("selection", v.selection.name().into()),
                    ],
                    1.0,
                )
            })
            .collect();
        gauge(
            &mut e,
            "clock_source_selection",
            "A source's selection at the last update (1 for the current one)",
            None,
            &selections,
        )?;
        Ok(())
    }
}
