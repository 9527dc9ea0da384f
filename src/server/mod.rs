//! The server: it builds the TSA from the configuration and serves it over HTTP.
//!
//! [`build`] composes protocol, clock, signer and serials; [`issue`] is the request path;
//! [`http`] is routing and limits only.

mod http;
mod issue;
mod metrics;
mod systemd;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};

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

pub use issue::{Outcome, Tsa};

/// Builds the TSA, refusing with a clear message whatever would make it issue bad tokens.
/// Call it inside a tokio runtime: the disciplined clock starts its tasks there.
pub fn build(config: &Config) -> anyhow::Result<Tsa> {
    let (signer, certificate): (Arc<dyn Signer>, TsuCertificate) = match &config.signer {
        SignerConfig::Software {
            key,
            certificate,
            chain,
            rsa_padding,
        } => (
            Arc::new(SoftwareSigner::load(key, *rsa_padding)?),
            TsuCertificate::load(certificate, chain)?,
        ),
        SignerConfig::Pkcs11(pkcs11) => (
            Arc::new(Pkcs11Signer::open(pkcs11)?),
            TsuCertificate::load(&pkcs11.certificate, &pkcs11.chain)?,
        ),
    };
    certificate
        .check(signer.as_ref(), SystemTime::now())
        .context("the TSU certificate cannot be used")?;
    tracing::info!(
        event = "key_loaded",
        subject = %certificate.subject(),
        algorithm = signer.algorithm().name(),
        "signing key and certificate loaded"
    );

    let (mut default_policy, mut other_policies) = config.policies()?;
    let refuse_development_policy = || {
        if default_policy == oid::DEVELOPMENT_POLICY
            || other_policies.contains(&oid::DEVELOPMENT_POLICY)
        {
            bail!(
                "the development policy {} is for the development clock only",
                oid::DEVELOPMENT_POLICY
            );
        }
        Ok(())
    };
    let max_accuracy = Duration::from_millis(config.clock.max_accuracy_ms);
    let source: Box<dyn TimeSource> = match config.clock.source {
        ClockSource::Kernel => {
            refuse_development_policy()?;
            Box::new(KernelClock::new())
        }
        ClockSource::Development => {
            let declared = Duration::from_millis(config.clock.development_accuracy_ms);
            tracing::warn!(
                event = "development_clock",
                declared_accuracy_ms = config.clock.development_accuracy_ms,
                policy = %oid::DEVELOPMENT_POLICY,
                "DEVELOPMENT CLOCK: the system clock is trusted without any check. Every token \
                 carries the development policy {} and must never be relied on.",
                oid::DEVELOPMENT_POLICY
            );
            default_policy = oid::DEVELOPMENT_POLICY;
            other_policies.clear();
            Box::new(DevelopmentClock::new(declared))
        }
        ClockSource::Disciplined => {
            refuse_development_policy()?;
            let clock = DisciplinedClock::start(config.clock.disciplined()?);
            Box::new(SharedSource(clock))
        }
    };

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

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let blocking_lane = signer.max_in_flight().unwrap_or(cores).max(1);

    Ok(Tsa {
        rules: RequestRules {
            accepted_digests: config.digests()?,
            default_policy,
            other_policies,
        },
        template,
        clock: IssuingClock::new(
            source,
            max_accuracy,
            Duration::from_nanos(config.token.precision.unit_ns().min(1_000)),
        ),
        signer,
        serials: Box::new(RandomSerials::new()),
        certificate,
        signer_ok: AtomicBool::new(true),
        blocking_lane: Arc::new(tokio::sync::Semaphore::new(blocking_lane)),
        metrics: metrics::Metrics::default(),
    })
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
    http::run(tsa, config, public, admin, shutdown).await
}
