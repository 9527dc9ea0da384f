//! The `tsa` command.

mod cli;

use clap::{Parser, Subcommand};
use std::io::Write;

/// An RFC 3161 Time-Stamp Authority.
#[derive(Debug, Parser)]
#[command(name = "tsa", version, about)]
struct Cli {
    /// Log as JSON lines (one object per event) instead of human-readable text. Also
    /// TSA_LOG_FORMAT=json. Levels and filters from RUST_LOG (default info).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a development PKI and configuration in a state directory.
    Init(cli::init::InitArgs),
    /// Serve RFC 3161 over HTTP.
    Serve(cli::serve::ServeArgs),
    /// Ask a TSA for a time-stamp token.
    Request(Box<cli::request::RequestArgs>),
    /// Verify a time-stamp response against data and a CA.
    Verify(cli::verify::VerifyArgs),
    /// Print a time-stamp response or request in human-readable form.
    Inspect(cli::inspect::InspectArgs),
    /// Show a running server's clock: state, offset, frequency, bound and sources.
    Clock(cli::clock::ClockArgs),
    /// Check the configured signer as a start does (its key, certificate and chain), sign once,
    /// and with --signatures time its raw signing rate.
    Check(cli::check::CheckArgs),
    /// HSM keys through PKCS#11: SoftHSM2 tokens, key generation, CSRs, certificates, checks.
    Hsm(cli::hsm::HsmArgs),
    /// The token archive: verify its chains and checkpoints, look up, export, prune, events.
    Archive(cli::archive::ArchiveArgs),
    /// Clients of `[auth]`: new API keys, client certificate identities.
    Client(cli::client::ClientArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = cli.log_json || std::env::var("TSA_LOG_FORMAT").is_ok_and(|f| f == "json");
    // Logs go to stderr under RUST_LOG's filter; every event with an `event` field (clock,
    // key, HSM, …) also goes to the token archive when one is open, whatever the log level.
    use tracing_subscriber::prelude::*;
    let registry = tracing_subscriber::registry().with(tsa::archive::events::layer());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(logs.json().with_filter(filter)).init();
    } else {
        registry.with(logs.with_filter(filter)).init();
    }
    let result = match &cli.command {
        Command::Init(args) => cli::init::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Request(args) => cli::request::run(args),
        Command::Verify(args) => cli::verify::run(args),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Clock(args) => cli::clock::run(args),
        Command::Check(args) => cli::check::run(args),
        Command::Hsm(args) => cli::hsm::run(args),
        Command::Archive(args) => cli::archive::run(args),
        Command::Client(args) => cli::client::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`, which panics where stderr is gone (a closed pipe).
            let _ = writeln!(std::io::stderr(), "tsa: {e:#}");
            // A PIN the token refused, or a configuration that cannot be used: a restart
            // would meet it again (see the systemd units).
            let pin_refused = e
                .chain()
                .any(|c| c.is::<tsa::signer::pkcs11::pool::PinRefused>());
            let misconfigured = e.downcast_ref::<tsa::config::Misconfigured>().is_some();
            // Both EX_CONFIG.
            match pin_refused || misconfigured {
                true => std::process::ExitCode::from(tsa::config::Misconfigured::EXIT_STATUS),
                false => std::process::ExitCode::FAILURE,
            }
        }
    }
}
