//! The server: it builds the TSA from the configuration and serves it over HTTP.
//!
//! [`build`] composes protocol, clock, signer and serials; [`issue`] is the request path;
//! [`http`] is routing and limits only.

mod history;
mod http;
mod issue;
mod metrics;
mod status;
mod systemd;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
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
use crate::config::{ClockSource, Config, ServerConfig, SignerConfig};
use crate::protocol::{RequestRules, TemplateOptions, TokenTemplate};
use crate::signer::{
    certificate::TsuCertificate, pkcs11::Pkcs11Signer, software::SoftwareSigner, Signer,
};

pub use issue::{Client, Issuing, Outcome, Tsa};

/// Builds the TSA, refusing with a clear message whatever would make it issue bad tokens.
/// Call it inside a tokio runtime: the disciplined clock starts its tasks there.
pub fn build(config: &Config) -> anyhow::Result<Tsa> {
    let signer: Arc<dyn Signer> = match &config.signer {
        SignerConfig::Software {
            key, rsa_padding, ..
        } => Arc::new(SoftwareSigner::load(key, *rsa_padding)?),
        SignerConfig::Pkcs11(pkcs11) => Arc::new(Pkcs11Signer::open(pkcs11)?),
    };
    let issuing = issuing(config, signer.as_ref())?;
    tracing::info!(
        event = "key_loaded",
        subject = %issuing.certificate().subject(),
        algorithm = signer.algorithm().name(),
        "signing key and certificate loaded"
    );

    let max_accuracy = Duration::from_millis(config.clock.max_accuracy_ms);
    let source: Box<dyn TimeSource> = match config.clock.source {
        ClockSource::Kernel => Box::new(KernelClock::new()),
        ClockSource::Development => {
            tracing::warn!(
                event = "development_clock",
                declared_accuracy_ms = config.clock.development_accuracy_ms,
                policy = %oid::DEVELOPMENT_POLICY,
                "DEVELOPMENT CLOCK: the system clock is trusted without any check. Every token \
                 carries the development policy {} and must never be relied on.",
                oid::DEVELOPMENT_POLICY
            );
            let declared = Duration::from_millis(config.clock.development_accuracy_ms);
            Box::new(DevelopmentClock::new(declared))
        }
        ClockSource::Disciplined => Box::new(SharedSource(DisciplinedClock::start(
            config.clock.disciplined()?,
        ))),
    };

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let blocking_lane = signer.max_in_flight().unwrap_or(cores).max(1);

    let clock = IssuingClock::new(
        source,
        max_accuracy,
        Duration::from_nanos(config.token.precision.unit_ns().min(1_000)),
    );
    let archive = match config.archive.enabled {
        true => Some(Arc::new(open_archive(config, &signer, &issuing)?)),
        false => None,
    };
    let serials: Box<dyn crate::archive::serial::SerialAllocator> = match &archive {
        Some(archive) => {
            // genTime never goes back across a restart.
            clock.set_floor(archive.gen_time_floor_ns());
            Box::new(archive.serials())
        }
        None => Box::new(RandomSerials::new()),
    };

    Ok(Tsa {
        issuing: ArcSwap::from_pointee(issuing),
        clock,
        signer,
        serials,
        archive,
        signer_ok: AtomicBool::new(true),
        blocking_lane: Arc::new(tokio::sync::Semaphore::new(blocking_lane)),
        metrics: metrics::Metrics::default(),
    })
}

/// The reloadable part: request rules, certificate and chain, token template. The
/// development clock forces the development policy; any other clock refuses it.
pub fn issuing(config: &Config, signer: &dyn Signer) -> anyhow::Result<Issuing> {
    let (cert_path, chain) = match &config.signer {
        SignerConfig::Software {
            certificate, chain, ..
        } => (certificate, chain),
        SignerConfig::Pkcs11(pkcs11) => (&pkcs11.certificate, &pkcs11.chain),
    };
    let certificate = TsuCertificate::load(cert_path, chain)?;
    certificate
        .check(signer, SystemTime::now())
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
}

/// The addresses the server listens on once bound.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

/// Binds both listeners, reports them through `on_bound`, and serves until `shutdown`
/// resolves; then stops accepting and lets requests in flight finish.
pub async fn serve(
    tsa: Arc<Tsa>,
    config: &ServerConfig,
    on_bound: impl FnOnce(Bound),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let public = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    on_bound(Bound {
        public: public.local_addr()?,
        admin: admin.local_addr()?,
    });
    tokio::spawn(systemd::supervise(tsa.clone()));
    tokio::spawn(history::run(tsa.clone()));
    let served = http::run(tsa.clone(), config, public, admin, shutdown).await;
    if let Some(archive) = tsa.archive() {
        // What is queued, a last signed checkpoint and the state file.
        archive.close();
    }
    served
}

/// The archive, its checkpoints signed with the TSA's own key.
fn open_archive(
    config: &Config,
    signer: &Arc<dyn Signer>,
    issuing: &Issuing,
) -> anyhow::Result<crate::archive::Archive> {
    use der::Encode;
    let key = Arc::clone(signer);
    let checkpoint_signer = crate::archive::CheckpointSigner {
        sign: Box::new(move |message| key.sign(message).map_err(|e| e.to_string())),
        algorithm: signer.algorithm().algorithm_identifier().to_der()?,
        certificate: issuing.certificate().der().to_vec(),
    };
    crate::archive::Archive::open(&config.archive, checkpoint_signer)
}
