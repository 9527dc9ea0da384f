//! The server: it builds the TSA from the configuration and serves it over HTTP.
//!
//! [`build`] composes protocol, clock, signer and serials; `issue` is the request path;
//! `http` is routing and limits only.

mod admission;
pub mod auth;
mod fd_limit;
mod history;
mod http;
mod issue;
mod metrics;
mod reply;
mod status;
mod systemd;
mod tls;
mod write_timeout;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;

use crate::alg::oid;
use crate::archive::serial::RandomSerials;
use crate::clock::service::DisciplinedClock;
use crate::clock::{
    development::DevelopmentClock, kernel::KernelClock, IssuingClock, Reading, TimeSource,
};
use crate::config::{ClockSource, Config, Misconfigured, ServerConfig, SignerConfig};
use crate::protocol::{RequestRules, TemplateOptions, TokenTemplate};
use crate::signer::{
    certificate::TsuCertificate, pkcs11::Pkcs11Signer, software::SoftwareSigner, Signer,
};

pub use http::serve_stream;
pub use issue::{Client, Issuing, Outcome, Rollover, Tsa};

/// Builds the TSA, refusing with a clear message whatever would make it issue bad tokens.
/// Call it inside a tokio runtime: the disciplined clock starts its tasks there.
pub fn build(config: &Config) -> anyhow::Result<Tsa> {
    let signer = open_signer(&config.signer)?;
    let rollover_at_ns = match &config.rollover {
        Some(planned) => Some(planned.at_unix_ns()?),
        None => None,
    };
    // What the configuration and its certificates decide is `Misconfigured`: refused at a
    // start, it is refused at every one.
    let issuing = issuing(
        config,
        &config.signer,
        signer.as_ref(),
        first_valid_at(rollover_at_ns, SystemTime::now()),
    )
    .context(Misconfigured)?;
    tracing::info!(
        event = "key_loaded",
        subject = %issuing.certificate().subject(),
        serial = %issuing.certificate().serial_hex(),
        certificate_sha256 = %issuing.certificate().sha256_hex(),
        algorithm = signer.algorithm().name(),
        "signing key and certificate loaded"
    );
    let rollover = match &config.rollover {
        Some(planned) => Some(plan_rollover(config, planned, &issuing)?),
        None => None,
    };

    let max_accuracy = Duration::from_millis(config.clock.max_accuracy_ms);
    let source: Box<dyn TimeSource> = match config.clock.source {
        ClockSource::Kernel => Box::new(KernelClock::new(config.clock.chronyd_command)),
        ClockSource::Development => {
            tracing::warn!(
                event = "development_clock",
                declared_accuracy_ms = config.clock.development_accuracy_ms,
                policy = %oid::DEVELOPMENT_POLICY,
                "DEVELOPMENT CLOCK: the system clock is trusted without any check. Every token \
                 carries the development policy {} and must never be relied on.",
                oid::DEVELOPMENT_POLICY
            );
            // Honest about what stands behind it: the kernel's own view of the system clock.
            use crate::clock::kernel::{Adjtimex, KernelApi};
            let kernel = Adjtimex.state();
            if kernel.unsynchronized() {
                tracing::warn!(
                    kernel_max_error_us = kernel.max_error_us,
                    "the kernel does not count the system clock synchronized (no time daemon \
                     disciplines it here, or it lost its sources): nothing vouches for the \
                     development clock's declared accuracy"
                );
            }
            let declared = Duration::from_millis(config.clock.development_accuracy_ms);
            Box::new(DevelopmentClock::new(declared))
        }
        ClockSource::Disciplined => {
            let c = &config.clock;
            if c.min_agreeing < 2 && !c.ntp_servers.is_empty() {
                tracing::warn!(
                    min_agreeing = c.min_agreeing,
                    step_confirm_rounds = c.step_confirm_rounds,
                    "clock.min_agreeing = 1: a single NTP server can be selected alone, and its \
                     answers are not authenticated (one that lies, or a forged one, sets the \
                     time; a step is followed after step_confirm_rounds); configure at least \
                     three independent servers and min_agreeing = 3"
                );
            }
            Box::new(SharedSource(DisciplinedClock::start(c.disciplined()?)))
        }
    };

    // The planned rollover, where its instant has passed: its key is in force from the start.
    let in_force = rollover
        .as_ref()
        .filter(|next| crate::clock::system_unix_ns() >= next.at_ns);
    // The lane of the signer in force at start (the rollover task resizes it at the instant,
    // from whatever size it has).
    let blocking_lane = match in_force {
        Some(next) => lane_for(next.signer.as_ref()),
        None => lane_for(signer.as_ref()),
    };

    let clock = IssuingClock::new(
        source,
        max_accuracy,
        Duration::from_nanos(config.token.precision.unit_ns().min(1_000)),
    );
    // The key in force signs the archive's checkpoints from the start (before the rollover
    // task hands them over, the archive's opening would be signed by the old key, whose
    // certificate may have expired since).
    let archive = match (config.archive.enabled, in_force) {
        (false, _) => None,
        (true, Some(next)) => Some(Arc::new(open_archive(
            config,
            &next.signer,
            &next.issuing.load(),
        )?)),
        (true, None) => Some(Arc::new(open_archive(config, &signer, &issuing)?)),
    };
    // A rollover still to come: its key takes the checkpoints over at the first one after a
    // token it signed, if the rollover task (by the system clock) has not handed them over.
    if let (Some(archive), Some(next)) = (&archive, &rollover) {
        let certificate = next.issuing.load().certificate().der().to_vec();
        let signer = checkpoint_signer(&next.signer, &certificate)?;
        match in_force {
            // Signing already (the opening too): the writer knows it as the rollover's.
            Some(_) => archive.set_checkpoint_signer(signer),
            None => archive.plan_checkpoint_signer(next.at_ns, signer),
        }
    }
    let serials: Box<dyn crate::archive::serial::SerialAllocator> = match &archive {
        Some(archive) => {
            // genTime never goes back across a restart.
            clock.set_floor(archive.gen_time_floor_ns());
            Box::new(archive.serials())
        }
        None => Box::new(RandomSerials::new()),
    };

    let admission = admission::Admission::new(config.server.max_queue, config.server.queue_wait());
    if let Some(archive) = &archive {
        archive.set_load(admission.depth_gauge());
    }
    let max_batches =
        (config.server.max_batches_in_flight).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    Ok(Tsa {
        issuing: ArcSwap::from_pointee(issuing),
        reloading: std::sync::atomic::AtomicU64::new(0),
        clock,
        signer,
        serials,
        archive,
        signer_failure: issue::Moment::new(),
        lane_moved: issue::Moment::new(),
        blocking_lane: Arc::new(tokio::sync::Semaphore::new(blocking_lane)),
        lane_places: std::sync::atomic::AtomicUsize::new(blocking_lane),
        metrics: metrics::Metrics::default(),
        admission,
        batches: Arc::new(tokio::sync::Semaphore::new(max_batches)),
        max_batches,
        client_batches: admission::ClientBatches::new(max_batches),
        lookups: Arc::new(tokio::sync::Semaphore::new(http::MAX_LOOKUPS)),
        connections: admission::Connections::new(fd_limit::fit(config.server.max_connections)),
        addresses: admission::Addresses::new(
            config.server.max_connections_per_address,
            config.server.max_batches_in_flight,
        ),
        connection_rate: admission::ConnectionRate::new(
            config.server.new_connections_per_address_per_s,
            config.server.new_connections_per_address_burst,
        ),
        auth_failures: admission::ConnectionRate::for_failures(
            config.server.auth_failures_per_address_per_s,
            config.server.auth_failures_per_address_burst,
            match config.server.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
        ),
        auth: ArcSwap::from_pointee(auth::Auth::new(&config.auth)?),
        rollover,
        tls: arc_swap::ArcSwapOption::empty(),
        credential_reloads: std::sync::atomic::AtomicU64::new(0),
    })
}

/// The signer a `[signer]` section names, its key loaded (software) or found on its token
/// and probed (PKCS#11).
pub fn open_signer(config: &SignerConfig) -> anyhow::Result<Arc<dyn Signer>> {
    Ok(match config {
        SignerConfig::Software {
            key, rsa_padding, ..
        } => Arc::new(SoftwareSigner::load(key, *rsa_padding).context(Misconfigured)?),
        SignerConfig::Pkcs11(pkcs11) => Arc::new(Pkcs11Signer::open(pkcs11)?),
    })
}

/// When the first signer's certificate must be valid: now, unless a planned rollover's instant
/// (`rollover_at_ns`) has passed, after which that signer signs nothing more and its
/// certificate may expire without stopping a restart or a reload.
fn first_valid_at(rollover_at_ns: Option<u64>, now: SystemTime) -> Option<SystemTime> {
    match rollover_at_ns {
        Some(at_ns) if SystemTime::UNIX_EPOCH + Duration::from_nanos(at_ns) <= now => None,
        _ => Some(now),
    }
}

/// The second signer of a planned rollover, checked as it will be used: its certificate
/// valid at the rollover instant.
fn plan_rollover(
    config: &Config,
    planned: &crate::config::RolloverConfig,
    first: &Issuing,
) -> anyhow::Result<Rollover> {
    let at_ns = planned.at_unix_ns()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(at_ns);
    let signer = open_signer(&planned.signer).context("rollover.signer")?;
    let issuing = issuing(
        config,
        &planned.signer,
        signer.as_ref(),
        Some(at.max(SystemTime::now())),
    )
    .context("rollover.signer")
    .context(Misconfigured)?;
    // A token needs its certificate valid over the declared accuracy around its genTime.
    let declared_ns = config.clock.max_accuracy_ms.saturating_mul(1_000_000);
    if first.issues_until_ns() < at_ns.saturating_add(declared_ns) {
        let until = SystemTime::UNIX_EPOCH + Duration::from_nanos(first.issues_until_ns());
        tracing::warn!(
            not_after = %chrono::DateTime::<chrono::Utc>::from(first.certificate().not_after()),
            issues_until = %chrono::DateTime::<chrono::Utc>::from(until),
            "the current signing certificate stops issuing (its path's expiry, less \
             token.min_certificate_validity_days and the declared accuracy) before the planned \
             rollover: no tokens will be issued in between"
        );
    }
    let next_from_ns = issuing
        .certificate()
        .path_validity()
        .0
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    if at_ns < next_from_ns.saturating_add(declared_ns) {
        tracing::warn!(
            at = %planned.at,
            "the planned rollover's certificate (or its chain) becomes valid less than the \
             declared accuracy before the instant: tokens just after it will be refused"
        );
    }
    tracing::info!(
        event = "key_rollover_planned",
        at = %planned.at,
        subject = %issuing.certificate().subject(),
        algorithm = signer.algorithm().name(),
        "a key rollover is planned: from then on tokens are signed by this key"
    );
    Ok(Rollover::new(at_ns, signer, issuing))
}

/// At start and at each reload (`[server.tls]` is reloaded): a warning where client
/// certificates are required on the HTTPS listener but the plain one is not on loopback.
fn warn_of_the_plain_listener(config: &ServerConfig) {
    if config.https_listen.is_some()
        && config.tls.require_client_certificate
        && !config.listen.ip().is_loopback()
    {
        tracing::warn!(
            listen = %config.listen,
            "server.tls.require_client_certificate holds on the HTTPS listener only: the plain \
             listener (server.listen) is not on loopback and serves whoever [auth] lets in \
             there (anonymous callers unless auth.anonymous = false); put it on loopback, or \
             firewall it, where every client must present a certificate"
        );
    }
}

/// Rebuilds what a reload replaces (SIGHUP): request rules, certificates and chains, token
/// templates, for the current signer and the planned one, and the HTTPS listener's
/// certificate, key, client CAs and CRLs. The keys themselves, the rollover instant and the
/// listeners stay as they were started; `config.server` is the one the server started with
/// but for `[server.tls]` (the request rules take its `max_request_bytes`, which the HTTP
/// limits were set from). Nothing changes unless all of it can be built.
pub fn reload(tsa: &Tsa, config: &Config) -> anyhow::Result<()> {
    // The instant, however written (`+02:00`, fractions of a second).
    let planned_at_ns = config
        .rollover
        .as_ref()
        .map(|r| r.at_unix_ns())
        .transpose()?;
    if planned_at_ns != tsa.rollover.as_ref().map(|r| r.at_ns) {
        bail!("[rollover] changed: a planned rollover is set at start; restart to change it");
    }
    let now = SystemTime::now();
    let rollover_at_ns = tsa.rollover.as_ref().map(|r| r.at_ns);
    let first = issuing(
        config,
        &config.signer,
        tsa.first_signer(),
        first_valid_at(rollover_at_ns, now),
    )?;
    let next = match (&config.rollover, &tsa.rollover) {
        (Some(planned), Some(rollover)) => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(rollover.at_ns);
            Some(issuing(
                config,
                &planned.signer,
                rollover.signer.as_ref(),
                Some(at.max(now)),
            )?)
        }
        _ => None,
    };
    let tls = match (&config.server.https_listen, tsa.tls.load().is_some()) {
        (Some(_), true) => Some(tls::acceptor(&config.server.tls)?),
        _ => None,
    };
    tsa.reload(first, next);
    // (Tokens take their times in ticks of their own generation's precision.)
    tsa.clock.set_tick(Duration::from_nanos(
        config.token.precision.unit_ns().min(1_000),
    ));
    if let Some(acceptor) = tls {
        // Requests authenticated under the old configuration authenticate again (a
        // certificate the new CRL revokes); `Tsa::reload_clients`, which follows, tells them
        // again once the clients are in place too.
        tsa.tls.store(Some(Arc::new(acceptor)));
        tsa.credential_reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        warn_of_the_plain_listener(&config.server);
        tracing::info!(
            event = "tls_certificate_reloaded",
            "the HTTPS listener's certificate, key, client CAs and CRLs reloaded; new connections use them"
        );
    }
    Ok(())
}

/// The reloadable part for one signer: request rules, certificate and chain, token template,
/// with the certificate checked against the key and for validity at `valid_at` (see
/// [`TsuCertificate::check`]). The
/// development clock forces the development policy; any other clock refuses it.
pub fn issuing(
    config: &Config,
    signer_config: &SignerConfig,
    signer: &dyn Signer,
    valid_at: Option<SystemTime>,
) -> anyhow::Result<Issuing> {
    let (cert_path, chain) = signer_config.certificates();
    let certificate = TsuCertificate::load(cert_path, chain)?;
    certificate
        .check(signer, valid_at)
        .context("the TSU certificate cannot be used")?;

    let (mut default_policy, mut other_policies) = config.policies()?;
    if config.clock.source == ClockSource::Development {
        default_policy = oid::DEVELOPMENT_POLICY;
        other_policies.clear();
    } else if default_policy == oid::DEVELOPMENT_POLICY
        || other_policies.contains(&oid::DEVELOPMENT_POLICY)
    {
        bail!(
            "the development policy {} is for the development clock only",
            oid::DEVELOPMENT_POLICY
        );
    }

    let template = TokenTemplate::new(
        certificate.der(),
        certificate.chain(),
        signer.algorithm(),
        TemplateOptions {
            include_tsa_name: config.token.include_tsa_name,
            ess_cert_id_v1: config.token.ess_cert_id_v1,
            precision: config.token.precision,
        },
    )
    .context("cannot encode the token template from the certificate")?;

    let min_left = Duration::from_secs(config.token.min_certificate_validity_days * 86_400);
    Ok(Issuing::new(
        RequestRules {
            accepted_digests: config.digests()?,
            default_policy,
            other_policies,
            max_len: config.server.max_request_bytes,
        },
        template,
        certificate,
        min_left,
    ))
}

/// A source the server shares with its background tasks.
struct SharedSource<T>(Arc<T>);

impl<T: TimeSource> TimeSource for SharedSource<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn read(&self) -> Reading {
        self.0.read()
    }
    fn report(&self) -> String {
        self.0.report()
    }
    fn views(&self) -> Option<crate::clock::ClockViews> {
        self.0.views()
    }
    fn alive(&self) -> bool {
        self.0.alive()
    }
    fn recent_events(&self) -> Vec<crate::clock::ClockEvent> {
        self.0.recent_events()
    }
    fn logs_its_changes(&self) -> bool {
        self.0.logs_its_changes()
    }
}

/// The addresses the server listens on once bound.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener (`server.https_listen`).
    pub https: Option<SocketAddr>,
}

/// How the server stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every part closed.
    Closed,
    /// A thread is still inside a signer's module that does not answer ([`Signer::stuck`]):
    /// the process must end without running the module's exit handlers, which could wait for
    /// that thread for good or tear the module down under it.
    SignerStuck,
}

/// Binds both listeners, reports them through `on_bound`, and serves until `shutdown`
/// resolves, or until a signer needs a new process ([`Signer::needs_restart`]: then the
/// result is a [`SignerHung`] error, and a signer is stuck); then closes the listeners (a new
/// connection is refused at once), lets requests in flight finish, for up to 10 s, and
/// closes the archive.
pub async fn serve(
    tsa: Arc<Tsa>,
    config: &ServerConfig,
    on_bound: impl FnOnce(Bound),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Stopped> {
    let public = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    if !config.admin_listen.ip().is_loopback() {
        tracing::warn!(
            admin_listen = %config.admin_listen,
            "the admin listener is not on loopback: it asks for no credentials, and its \
             /archive look-ups hand out any client's token by serial or imprint (and how often \
             an imprint was stamped), /metrics and /status the server's state, to whoever \
             reaches it; keep it on a management network that a firewall closes to others"
        );
    }
    warn_of_the_plain_listener(config);
    let https = match config.https_listen {
        Some(addr) => {
            let acceptor = tls::acceptor(&config.tls).context(Misconfigured)?;
            tsa.tls.store(Some(Arc::new(acceptor)));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (HTTPS)"))?;
            Some(listener)
        }
        None => None,
    };
    on_bound(Bound {
        public: public.local_addr()?,
        admin: admin.local_addr()?,
        https: match &https {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        },
    });
    tokio::spawn(systemd::supervise(tsa.clone()));
    tokio::spawn(history::run(tsa.clone()));
    tokio::spawn(roll_over(tsa.clone()));
    let mut hung = None;
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            reason = signer_hung(&tsa) => hung = Some(reason),
        }
    };
    let served = http::run(tsa.clone(), config, public, admin, https, stop).await;
    let stuck = hung.is_some() || tsa.signers().any(|signer| signer.stuck());
    if let Some(archive) = tsa.archive() {
        // What is queued, a last signed checkpoint and the state file; with a signer stuck
        // the writer may be inside it, signing a checkpoint: it is given a few seconds.
        archive.close_within(stuck.then_some(STUCK_ARCHIVE_CLOSE));
    }
    match (hung, stuck) {
        (Some(reason), _) => served.and(Err(SignerHung(reason).into())),
        (None, true) => served.map(|()| Stopped::SignerStuck),
        (None, false) => served.map(|()| Stopped::Closed),
    }
}

/// The server stopped because its signer needs a new process: a call inside the HSM module
/// has not returned for `exit_after_hung_ms`. `tsa serve` exits with [`SignerHung::EXIT_STATUS`],
/// which the systemd units restart.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the TSA stopped for its service manager to start it anew")]
pub struct SignerHung(pub String);

impl SignerHung {
    /// `EX_TEMPFAIL` of sysexits.h: a new start may succeed.
    pub const EXIT_STATUS: u8 = 75;
}

/// How long a server stopping with a signer stuck waits for the archive's writer.
const STUCK_ARCHIVE_CLOSE: Duration = Duration::from_secs(5);

/// Resolves, with the reason, once a signer (either key of a planned rollover) needs a new
/// process (checked every second).
async fn signer_hung(tsa: &Tsa) -> String {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(reason) = tsa.signers().find_map(|signer| signer.needs_restart()) {
            tracing::error!(
                event = "signer_hung_exit",
                reason = %reason,
                exit_status = SignerHung::EXIT_STATUS,
                "the signer does not answer; stopping for a new start"
            );
            return reason;
        }
    }
}

/// The archive, its checkpoints signed with the TSA's own key.
fn open_archive(
    config: &Config,
    signer: &Arc<dyn Signer>,
    issuing: &Issuing,
) -> anyhow::Result<crate::archive::Archive> {
    let checkpoints = checkpoint_signer(signer, issuing.certificate().der())?;
    // The server admits `max_queue` requests, a batch's chunk of items per place, and a batch
    // larger than the whole queue alone: twice what they can queue leaves room for requests
    // whose clients left while the writer was slow.
    let admitted = (config.server.max_queue)
        .saturating_mul(issue::BATCH_CHUNK)
        .max(config.server.max_batch_items);
    let max_queued = admitted.saturating_mul(2);
    crate::archive::Archive::open(&config.archive, checkpoints, max_queued)
}

/// What signs the archive's checkpoints and anchors now, outside a server (`tsa archive
/// prune`): the configured signer, or a planned rollover's once its instant has passed.
pub fn archive_signer(config: &Config) -> anyhow::Result<crate::archive::CheckpointSigner> {
    let now = SystemTime::now();
    let signer_config = match &config.rollover {
        Some(planned)
            if SystemTime::UNIX_EPOCH + Duration::from_nanos(planned.at_unix_ns()?) <= now =>
        {
            &planned.signer
        }
        _ => &config.signer,
    };
    let signer = open_signer(signer_config)?;
    let issuing = issuing(config, signer_config, signer.as_ref(), Some(now))?;
    checkpoint_signer(&signer, issuing.certificate().der())
}

fn checkpoint_signer(
    signer: &Arc<dyn Signer>,
    certificate: &[u8],
) -> anyhow::Result<crate::archive::CheckpointSigner> {
    use der::Encode;
    let key = Arc::clone(signer);
    // The archive's writer signs, and every commit waits meanwhile: an HSM whose sessions are
    // all busy gets a second, not the pool's usual wait (the checkpoint is tried again later).
    const WAIT: Duration = Duration::from_secs(1);
    Ok(crate::archive::CheckpointSigner {
        sign: Box::new(move |message| key.sign_within(message, WAIT).map_err(|e| e.to_string())),
        algorithm: signer.algorithm().algorithm_identifier().to_der()?,
        certificate: certificate.to_vec(),
    })
}

/// Issuances of `signer` that may block at once (the blocking lane's places): its sessions,
/// or one a core.
fn lane_for(signer: &dyn Signer) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    signer.max_in_flight().unwrap_or(cores).max(1)
}

/// How long before a planned rollover its key's health is watched (and a failure logged).
const ROLLOVER_WATCH: Duration = Duration::from_secs(600);

/// Waits for the planned rollover's instant (by the system clock, in steps of at most a
/// minute so that a stepped clock cannot delay it much), logging meanwhile when the new key
/// cannot sign in its last minutes before; then resizes the blocking lane to the new signer,
/// records the key event and hands the archive's checkpoints to the new key. Tokens change
/// keys by their own genTime in the request path, whatever this task does.
async fn roll_over(tsa: Arc<Tsa>) {
    let Some(next) = tsa.rollover() else { return };
    // A start after the instant: the rollover happened before, recorded then as
    // `key_rollover` (or, where the server was stopped across the instant, only as this
    // start's `key_loaded` of the new key, which names the instant).
    let passed_before_start = crate::clock::system_unix_ns() >= next.at_ns;
    let mut healthy = true;
    loop {
        let now = crate::clock::system_unix_ns();
        if now >= next.at_ns {
            break;
        }
        let left = Duration::from_nanos(next.at_ns - now);
        if left <= ROLLOVER_WATCH {
            let health = next.signer.health();
            match (&health, healthy) {
                (Err(reason), true) => tracing::error!(
                    event = "rollover_key_unusable",
                    at = %next.at,
                    reason,
                    "the planned rollover's key cannot sign: every token from the rollover on \
                     will be refused unless it recovers"
                ),
                (Ok(()), false) => {
                    tracing::info!(at = %next.at, "the planned rollover's key signs again")
                }
                _ => {}
            }
            healthy = health.is_ok();
        }
        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
    }
    let places = lane_for(next.signer.as_ref());
    let was = tsa
        .lane_places
        .swap(places, std::sync::atomic::Ordering::Relaxed);
    resize(&tsa.blocking_lane, was, places);
    let issuing = next.issuing.load();
    let certificate = issuing.certificate();
    if passed_before_start {
        tracing::info!(
            event = "key_loaded",
            rollover_at = %next.at,
            subject = %certificate.subject(),
            serial = %certificate.serial_hex(),
            certificate_sha256 = %certificate.sha256_hex(),
            algorithm = next.signer.algorithm().name(),
            "the planned rollover's key and certificate loaded: its instant has passed, tokens \
             are signed by it"
        );
    } else {
        tracing::warn!(
            event = "key_rollover",
            at = %next.at,
            subject = %certificate.subject(),
            serial = %certificate.serial_hex(),
            certificate_sha256 = %certificate.sha256_hex(),
            algorithm = next.signer.algorithm().name(),
            "planned key rollover: tokens are now signed by the new key"
        );
    }
    if let Some(archive) = tsa.archive() {
        match checkpoint_signer(&next.signer, issuing.certificate().der()) {
            Ok(signer) => archive.set_checkpoint_signer(signer),
            Err(e) => tracing::error!(error = %e, "archive checkpoints keep the old key"),
        }
    }
}

/// Gives `lane` `to` places instead of `from`: more at once, fewer as the places in use
/// come back.
fn resize(lane: &Arc<tokio::sync::Semaphore>, from: usize, to: usize) {
    if to > from {
        lane.add_permits(to - from);
    } else if from > to {
        let lane = Arc::clone(lane);
        tokio::spawn(async move {
            if let Ok(places) = lane.acquire_many_owned((from - to) as u32).await {
                places.forget();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lane_resized_gives_and_takes_places() {
        let lane = Arc::new(tokio::sync::Semaphore::new(4));
        resize(&lane, 4, 6);
        assert_eq!(lane.available_permits(), 6);
        // Two places in use: the lane shrinks to 2 as they come back.
        let busy = Arc::clone(&lane).acquire_many_owned(2).await.unwrap();
        resize(&lane, 6, 2);
        tokio::task::yield_now().await;
        assert_eq!(lane.available_permits(), 0);
        drop(busy);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(lane.available_permits(), 2);
    }

    #[test]
    fn the_first_certificate_need_not_be_valid_once_the_rollover_has_passed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ns =
            |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert_eq!(first_valid_at(None, now), Some(now));
        let ahead = ns(now + Duration::from_secs(60));
        assert_eq!(first_valid_at(Some(ahead), now), Some(now));
        let passed = ns(now - Duration::from_secs(60));
        assert_eq!(first_valid_at(Some(passed), now), None);
    }
}
