//! `tsa client`: the `[[auth.client]]` entries of the configuration. `new-key` makes an API
//! key (shown once; the configuration keeps its SHA-256), `cert-id` the lines that map a TLS
//! client certificate to a client.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use tsa::server::auth::{hex, new_api_key, PeerCertificate};

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ClientCommand {
    /// A new random API key for a client. The `[[auth.client]]` lines go to standard output
    /// (append them to the configuration); the key itself to standard error, or to
    /// `--key-out`: it is not stored anywhere else and cannot be shown again.
    NewKey {
        /// The client's name, recorded in the archive with its tokens.
        #[arg(long)]
        name: String,
        /// Write the key into this file (mode 0600) instead of standard error.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Replace --key-out where it exists (another client's key?).
        #[arg(long, requires = "key_out")]
        force: bool,
        /// Tokens per second for this client; 0: no limit.
        #[arg(long, default_value_t = 0.0)]
        rate_per_s: f64,
        /// Tokens the client may take at once; 0: one second's worth.
        #[arg(long, default_value_t = 0)]
        burst: u32,
    },
    /// The `[[auth.client]]` lines that map a TLS client certificate (PEM or DER) to a client:
    /// its SHA-256 fingerprint, and its subject and issuer as an alternative.
    CertId {
        /// The client certificate.
        #[arg(long)]
        cert: PathBuf,
        /// The client's name.
        #[arg(long)]
        name: String,
    },
}

pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    match &args.command {
        ClientCommand::NewKey {
            name,
            key_out,
            rate_per_s,
            burst,
            force,
        } => {
            if let Some(path) = key_out {
                super::not_replacing(path, *force)?;
            }
            let (key, hash) = new_api_key();
            match key_out {
                Some(path) => {
                    super::init::write_secret(path, &format!("{key}\n"))?;
                    eprintln!(
                        "tsa: the API key of {name:?} is in {} (the configuration keeps only its hash)",
                        path.display()
                    );
                }
                None => eprintln!(
                    "tsa: the API key of {name:?}; give it to the client now, it cannot be shown again \
                     (the configuration keeps only its hash):\n{key}"
                ),
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "[[auth.client]]\nname = {}\napi_key_sha256 = \"{hash}\"\nrate_per_s = {rate_per_s}\nburst = {burst}",
                toml_string(name)
            )?;
            Ok(())
        }
        ClientCommand::CertId { cert, name } => {
            let bytes =
                std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let der = match der::pem::decode_vec(&bytes) {
                Ok((_, der)) => der,
                Err(_) => bytes,
            };
            let id = PeerCertificate::from_der(&der);
            let Ok(certificate) = <x509_cert::Certificate as der::Decode>::from_der(&der) else {
                anyhow::bail!("{} is not an X.509 certificate", cert.display());
            };
            let tbs = certificate.tbs_certificate();
            println!(
                "[[auth.client]]\nname = {}\ncertificate_sha256 = \"{}\"\n\
                 # or any certificate with this subject that this CA (one of client_ca) issues\n\
                 # itself, not through an intermediate CA:\n\
                 # certificate_subject = {}\n# certificate_issuer = {}",
                toml_string(name),
                hex(&id.sha256),
                toml_string(&tbs.subject().to_string()),
                toml_string(&tbs.issuer().to_string())
            );
            Ok(())
        }
    }
}

/// A TOML basic string, quoted and escaped.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}
