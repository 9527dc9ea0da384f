//! `tsa serve`: run the TSA until SIGTERM or Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tsa::config::{Config, Misconfigured, ServerConfig};
use tsa::server;
use tsa::signer::software::RsaPadding;

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file.
    #[arg(long, short, default_value = "state/tsa.toml")]
    pub config: PathBuf,
    /// Override server.listen (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Override server.admin_listen.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
}

/// The configuration at `args.config`, with the command line's overrides.
fn load(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.server.admin_listen = admin;
    }
    Ok(config)
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = load(args).context(Misconfigured)?;
    // The PKCS#11 modules' environment, while this is the only thread.
    tsa::signer::pkcs11::apply_module_envs(config.pkcs11_signers())?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if config.server.workers > 0 {
        runtime.worker_threads(config.server.workers);
    }
    let runtime = runtime.build()?;
    let ca_hint = args
        .config
        .parent()
        .map(|d| d.join("ca-cert.pem"))
        .filter(|p| p.exists());
    let pss = std::iter::once(&config.signer)
        .chain(config.rollover.as_ref().map(|r| &r.signer))
        .any(|s| s.rsa_padding() == Some(RsaPadding::Pss));
    if pss {
        tracing::warn!(
            "the signer uses RSA-PSS: `openssl ts -verify` (OpenSSL's TS API, and tools built \
             on it) refuses such tokens (its PKCS#7 code assumes PKCS#1 v1.5); `openssl cms \
             -verify`, `tsa verify`, Java and BouncyCastle take them"
        );
    }
    // Refused at load under the ETSI policy; under the operator's own, said.
    for digest in config.digests()?.iter().filter(|d| d.is_broken()) {
        tracing::warn!(
            digest = digest.name(),
            "token.accepted_digests lists {}, whose collisions can be made: a token over such \
             an imprint may be shown for another document than the one stamped",
            digest.name()
        );
    }
    let served = runtime.block_on(async {
        // Installed before anything else: a SIGHUP while the server is built (an HSM's login,
        // the archive's recovery) took the default action and ended the process. One that
        // comes before the listeners are bound waits for them (`serve` installs the HTTPS
        // listener's TLS configuration, which a reload replaces, and says READY first).
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let tsa = Arc::new(server::build(&config)?);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(reload_on_sighup(
            hup,
            bound_rx,
            tsa.clone(),
            args.clone(),
            config.clone(),
        ));
        server::serve(
            tsa,
            &config.server,
            |bound| {
                announce(bound, &config.server.path, ca_hint, pss);
                let _ = bound_tx.send(());
            },
            shutdown_signal(),
        )
        .await
    });
    // Requests in flight have had their time (`serve` waits for them); blocking work still
    // running now is stuck (a signature inside an HSM module that does not answer) and must
    // not keep the process from exiting, as dropping the runtime would.
    let started = std::time::Instant::now();
    runtime.shutdown_timeout(BLOCKING_SHUTDOWN);
    if started.elapsed() >= BLOCKING_SHUTDOWN {
        tracing::warn!(
            waited_ms = BLOCKING_SHUTDOWN.as_millis() as u64,
            "blocking work (a signature inside an HSM module that does not answer?) is still \
             running; exiting without it"
        );
    }
    let stuck = match &served {
        Ok(stopped) => *stopped == server::Stopped::SignerStuck,
        Err(e) => e.chain().any(|c| c.is::<server::SignerHung>()),
    };
    if stuck {
        exit_past_stuck_signer(&served);
    }
    served.map(|_| ())
}

/// Ends the process at once, without the exit handlers (`_exit`): a thread is still inside a
/// signer's module that does not answer, and the module's handlers, which `exit` runs, could
/// wait for that thread for good or tear the module down under it. Everything of the TSA's
/// own (listeners, archive, its lease) is closed by now. Status 75 after a hung signer
/// ([`server::SignerHung`]), for the service manager to start the TSA anew.
fn exit_past_stuck_signer(served: &anyhow::Result<server::Stopped>) -> ! {
    use std::io::Write;
    let status = match served {
        Ok(_) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "tsa: {e:#}");
            match e.chain().any(|c| c.is::<server::SignerHung>()) {
                true => server::SignerHung::EXIT_STATUS,
                false => 1,
            }
        }
    };
    tracing::warn!(
        exit_status = status,
        "a signer's module does not answer: exiting without its exit handlers"
    );
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; nothing runs after it.
    unsafe { libc::_exit(status.into()) }
}

/// How long the exit waits for blocking work still running after the server stopped.
const BLOCKING_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// Tells the operator (and tests, which read the first line) where the TSA listens.
fn announce(bound: server::Bound, path: &str, ca: Option<PathBuf>, pss: bool) {
    let url = format!("http://{}{}", bound.public, path);
    let https = bound
        .https
        .map(|addr| format!(" and https://{addr}{path}"))
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "tsa: serving RFC 3161 on {url}{https} (admin http://{})",
        bound.admin
    );
    let ca = ca
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "CA.pem".into());
    // `openssl ts -verify` refuses RSA-PSS tokens (its PKCS#7 code assumes PKCS#1 v1.5).
    let verify = match pss {
        false => format!("openssl ts -verify -in reply.tsr -queryfile req.tsq -CAfile {ca}"),
        true => format!("tsa verify --in reply.tsr --query req.tsq --data README.md --ca {ca}"),
    };
    let _ = writeln!(
        out,
        "ask for a stamp:\n  \
         openssl ts -query -data README.md -sha256 -cert -out req.tsq\n  \
         curl -sS -H 'Content-Type: application/timestamp-query' --data-binary @req.tsq {url} -o reply.tsr\n  \
         openssl ts -reply -in reply.tsr -text\n  \
         {verify}"
    );
    if let Some(addr) = bound.https {
        let _ = writeln!(
            out,
            "over HTTPS (with --cert client-cert.pem --key client-key.pem for mutual TLS):\n  \
             curl -sS --cacert {ca} -H 'Content-Type: application/timestamp-query' --data-binary @req.tsq https://{addr}{path} -o reply.tsr"
        );
    }
    let _ = out.flush();
}

/// SIGHUP (`systemctl reload`): the certificate chain and the reloadable settings (policies,
/// accepted digests, token options, the clients of `[auth]` and their quotas, the HTTPS
/// listener's certificate, key, client CAs and CRLs) are read again and swapped in without
/// dropping a connection; what stays as started is said by [`keep_started`]. A configuration
/// that does not load, a changed clock, or a certificate that does not fit the key, is
/// refused and the running one kept.
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    bound: tokio::sync::oneshot::Receiver<()>,
    tsa: Arc<server::Tsa>,
    args: ServeArgs,
    running: Config,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("cannot install a SIGHUP handler; reload needs a restart");
        return;
    };
    // Not before the server is up (a signal meanwhile waits in `hup`).
    if bound.await.is_err() {
        return;
    }
    while hup.recv().await.is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let result = load(&args).and_then(|mut config| {
            let kept = keep_started(&mut config, &running)?;
            let auth = server::auth::Auth::new(&config.auth)?;
            server::reload(&tsa, &config).map_err(|e| {
                // A new key beside its new certificate: the certificate is checked against
                // the running key, which a reload keeps.
                let not_the_key = e.chain().any(|c| c.to_string().contains(NOT_THE_KEY));
                match kept.key_changed && not_the_key {
                    true => e.context(
                        "a signer's key settings changed too, and a reload keeps the key \
                         loaded at start: restart to sign with a new key",
                    ),
                    false => e,
                }
            })?;
            if !kept.settings.is_empty() {
                tracing::warn!(
                    event = "reload_partial",
                    kept = %kept.settings.join("; "),
                    "settings that changed stay as they are until a restart"
                );
            }
            Ok(auth)
        });
        match result {
            Ok(auth) => tsa.reload_clients(auth),
            Err(e) => {
                tracing::error!(event = "reload_refused", error = %format!("{e:#}"), "reload refused; the running configuration stays")
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// Puts back into a reloaded `config` what stays as the server `running` started: the
/// listeners, paths, limits and timeouts of `[server]` (but `[server.tls]`; the request rules
/// keep the start's size limit with them), `[archive]`, and the signing keys' settings (their
/// certificates and chains are read again). Returns what changed there, for the log. A
/// changed `[clock]` refuses the reload: the tokens' policy and declared accuracy rest on the
/// clock the server runs, which only a restart replaces (a development clock reloaded as
/// another would otherwise have lifted the development policy off its tokens).
/// What a reload kept as the server started: the settings that changed there, for the log,
/// and whether a signing key's settings were among them.
struct Kept {
    settings: Vec<&'static str>,
    key_changed: bool,
}

/// The words of the refusal of a certificate that is not the running key's
/// (`TsuCertificate::check`).
const NOT_THE_KEY: &str = "does not belong to the signing key";

fn keep_started(config: &mut Config, running: &Config) -> anyhow::Result<Kept> {
    if config.clock != running.clock {
        anyhow::bail!(
            "[clock] changed: the clock is set at start, and the tokens' policy and accuracy \
             with it; restart to change it"
        );
    }
    let mut kept = Vec::new();
    let server = ServerConfig {
        tls: config.server.tls.clone(),
        ..running.server.clone()
    };
    if config.server != server {
        kept.push("[server] besides [server.tls]: listeners, paths, limits and timeouts");
    }
    config.server = server;
    if config.archive != running.archive {
        kept.push("[archive]");
    }
    config.archive = running.archive.clone();
    let signer = running.signer.with_certificates_of(&config.signer);
    let mut key_changed = config.signer != signer;
    if key_changed {
        kept.push("[signer] besides its certificate and chain: the key loaded at start");
    }
    config.signer = signer;
    // A rollover planned, dropped or moved is refused by `server::reload`.
    if let (Some(planned), Some(started)) = (&mut config.rollover, &running.rollover) {
        let signer = started.signer.with_certificates_of(&planned.signer);
        if planned.signer != signer {
            key_changed = true;
            kept.push(
                "[rollover.signer] besides its certificate and chain: the key loaded at start",
            );
        }
        planned.signer = signer;
    }
    Ok(Kept {
        settings: kept,
        key_changed,
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
