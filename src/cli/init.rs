//! `tsa init`: a development PKI (root CA and TSU certificate) and a configuration file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tsa::pki::{DevPki, KeyAlgorithm};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The state directory to create the PKI and configuration in.
    #[arg(long, default_value = "state")]
    pub dir: PathBuf,
    /// The TSU key's algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    pub algorithm: KeyAlgorithm,
    /// Sign with RSA-PSS instead of PKCS#1 v1.5 (RSA keys only).
    #[arg(long)]
    pub pss: bool,
    /// The public listener written into the configuration.
    #[arg(long, default_value = "127.0.0.1:3180")]
    pub listen: String,
    /// The admin listener written into the configuration.
    #[arg(long, default_value = "127.0.0.1:3181")]
    pub admin_listen: String,
    /// Replace an existing PKI and configuration.
    #[arg(long)]
    pub force: bool,
}

pub const CONFIG_FILE: &str = "tsa.toml";

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let config_path = args.dir.join(CONFIG_FILE);
    if config_path.exists() && !args.force {
        println!(
            "{} exists already; keeping it (use --force to start over)",
            config_path.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;

    let pki = DevPki::generate(args.algorithm)?;
    write_secret(&args.dir.join("ca-key.pem"), &pki.ca_key_pem)?;
    std::fs::write(args.dir.join("ca-cert.pem"), &pki.ca_cert_pem)?;
    write_secret(&args.dir.join("tsa-key.pem"), &pki.tsu_key_pem)?;
    std::fs::write(args.dir.join("tsa-cert.pem"), &pki.tsu_cert_pem)?;

    let padding = if args.pss { "pss" } else { "pkcs1" };
    let config = format!(
        r#"# Made by `tsa init`: a development PKI and the development clock.
# Tokens from this configuration carry the development policy and prove nothing.
# See config/tsa.example.toml for every setting.

[server]
listen = "{listen}"
admin_listen = "{admin}"

[signer]
kind = "software"
key = "tsa-key.pem"
certificate = "tsa-cert.pem"
rsa_padding = "{padding}"

[clock]
source = "development"
development_accuracy_ms = 100

[token]
precision = "micros"
"#,
        listen = args.listen,
        admin = args.admin_listen,
    );
    std::fs::write(&config_path, config)?;
    println!(
        "development PKI ({:?}) and configuration written to {}",
        args.algorithm,
        args.dir.display()
    );
    Ok(())
}

fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
