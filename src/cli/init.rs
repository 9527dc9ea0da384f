//! `tsa init`: a development PKI (root CA and TSU certificate) and a configuration file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tsa::files;
use tsa::pki::{DevPki, KeyAlgorithm};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The state directory to create the PKI and configuration in.
    #[arg(long, default_value = "state")]
    pub dir: PathBuf,
    /// The TSU key's algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    pub algorithm: KeyAlgorithm,
    /// Sign with RSA-PSS instead of PKCS#1 v1.5 (RSA keys only). `openssl ts -verify` refuses
    /// PSS tokens (OpenSSL's TS code assumes PKCS#1 v1.5); `openssl cms -verify` and `tsa
    /// verify` take them.
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
    /// Enable the token archive (a token log beside an SQLite database, in the state
    /// directory) and structured serials.
    #[arg(long)]
    pub archive: bool,
    /// Keep the TSU key in a SoftHSM2 token inside the state directory (`softhsm/`, PIN in
    /// `hsm-pin`), used through PKCS#11; the CA key stays a file.
    #[arg(long)]
    pub hsm: bool,
    /// Also an HTTPS listener: a TLS server certificate for localhost from the development CA
    /// (`tls-cert.pem`), a client CA (`client-ca-cert.pem`) and a client certificate
    /// (`client-cert.pem`) mapped to the client "dev-client" for mutual TLS.
    #[arg(long)]
    pub tls: bool,
    /// The HTTPS listener written into the configuration (with `--tls`).
    #[arg(long, default_value = "127.0.0.1:3443")]
    pub https_listen: String,
}

/// The client that `tsa init --tls` makes a certificate for.
pub const DEV_CLIENT: &str = "dev-client";

pub const CONFIG_FILE: &str = "tsa.toml";

/// What `tsa init` writes (or, for a key moved into SoftHSM2, removes) besides the
/// configuration.
const WRITES: &[&str] = &[
    "ca-key.pem",
    "ca-cert.pem",
    "tsa-key.pem",
    "tsa-cert.pem",
    "tsa-csr.pem",
    "tls-cert.pem",
    "tls-key.pem",
    "client-ca-cert.pem",
    "client-ca-key.pem",
    "client-cert.pem",
    "client-key.pem",
    HSM_DIR,
    HSM_PIN,
    HSM_SO_PIN,
];

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let config_path = args.dir.join(CONFIG_FILE);
    if config_path.exists() && !args.force {
        println!(
            "{} exists already; keeping it (use --force to start over)",
            config_path.display()
        );
        return Ok(());
    }
    // Without its configuration the directory may still hold keys (another instance's, or
    // a production key beside its own configuration file): never replace them unasked.
    if !args.force {
        if let Some(found) = WRITES.iter().map(|n| args.dir.join(n)).find(|p| p.exists()) {
            anyhow::bail!(
                "{} exists: tsa init writes a development PKI and would replace it (use --force \
                 to start over, or another --dir)",
                found.display()
            );
        }
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;

    let padding = if args.pss { "pss" } else { "pkcs1" };
    let signer = if args.hsm {
        hsm_pki(args, padding)?
    } else {
        let pki = DevPki::generate(args.algorithm)?;
        write_secret(&args.dir.join("ca-key.pem"), &pki.ca_key_pem)?;
        write_public(&args.dir.join("ca-cert.pem"), &pki.ca_cert_pem)?;
        write_secret(&args.dir.join("tsa-key.pem"), &pki.tsu_key_pem)?;
        write_public(&args.dir.join("tsa-cert.pem"), &pki.tsu_cert_pem)?;
        format!(
            r#"[signer]
kind = "software"
key = "tsa-key.pem"
certificate = "tsa-cert.pem"
rsa_padding = "{padding}"
"#
        )
    };

    let (https, auth) = match args.tls {
        true => dev_tls(args)?,
        false => (String::new(), String::new()),
    };
    let config = format!(
        r#"# Made by `tsa init`: a development PKI and the development clock.
# Tokens from this configuration carry the development policy and prove nothing.
# See config/tsa.example.toml for every setting.

[server]
listen = "{listen}"
admin_listen = "{admin}"
{https}
{signer}
[clock]
source = "development"
development_accuracy_ms = 100

[token]
precision = "micros"

[archive]
# Every token recorded (archive.tokens/ beside archive.sqlite here) before it is sent;
# structured serials.
enabled = {archive}
{auth}"#,
        listen = args.listen,
        admin = args.admin_listen,
        archive = args.archive,
    );
    write_public(&config_path, &config)?;
    println!(
        "development PKI ({:?}{}) and configuration written to {}",
        args.algorithm,
        if args.hsm { ", key in SoftHSM2" } else { "" },
        args.dir.display()
    );
    Ok(())
}

/// The token label, key label and files of `tsa init --hsm`.
const HSM_TOKEN: &str = "tsa";
const HSM_KEY: &str = "tsa-tsu";
const HSM_DIR: &str = "softhsm";
const HSM_PIN: &str = "hsm-pin";
const HSM_SO_PIN: &str = "hsm-so-pin";

/// A SoftHSM2 token in `<dir>/softhsm`, the TSU key pair generated on it, a CSR signed by it
/// (`tsa-csr.pem`) and a development CA that certifies it. Returns the `[signer]` section.
fn hsm_pki(args: &InitArgs, padding: &str) -> anyhow::Result<String> {
    use tsa::signer::pkcs11::token::{self, Module, TokenKey};
    use tsa::signer::pkcs11::{key::hex, KeySelector, PinSource, TokenSelector};

    let softhsm_dir = args.dir.join(HSM_DIR);
    if args.force && softhsm_dir.exists() {
        std::fs::remove_dir_all(&softhsm_dir)
            .with_context(|| format!("cannot remove {}", softhsm_dir.display()))?;
    }
    let conf = token::write_softhsm_conf(&softhsm_dir)?;
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let (pin_file, so_pin_file) = (args.dir.join(HSM_PIN), args.dir.join(HSM_SO_PIN));
    for file in [&pin_file, &so_pin_file] {
        if args.force && file.exists() {
            std::fs::remove_file(file)?;
        }
        super::hsm::ensure_pin_file(file)?;
    }
    let module_path = token::softhsm_module()?;
    let module = Module::load(&module_path)?;
    let pin = PinSource::File(pin_file);
    token::init_token(&module, HSM_TOKEN, &PinSource::File(so_pin_file), &pin)?;
    let session = token::open_session(
        &module,
        &TokenSelector {
            label: Some(HSM_TOKEN.into()),
            slot: None,
        },
        &pin,
    )?;
    let id = token::random_id();
    token::generate_key_pair(&session, super::hsm::key_kind(args.algorithm), HSM_KEY, &id)?;
    let key = TokenKey::find(
        &session,
        &KeySelector {
            label: Some(HSM_KEY.into()),
            id: Some(id.clone()),
        },
    )?;
    let csr = token::csr_pem(
        &key,
        token::parse_subject(
            "C=VN,O=Development TSA (not for production),CN=Development Time-Stamping Unit",
        )?,
    )?;
    write_public(&args.dir.join("tsa-csr.pem"), csr)?;
    let pki = tsa::pki::DevPkiForKey::generate(args.algorithm, &key)?;
    write_secret(&args.dir.join("ca-key.pem"), &pki.ca_key_pem)?;
    write_public(&args.dir.join("ca-cert.pem"), &pki.ca_cert_pem)?;
    write_public(&args.dir.join("tsa-cert.pem"), &pki.tsu_cert_pem)?;
    let _ = std::fs::remove_file(args.dir.join("tsa-key.pem"));
    Ok(format!(
        r#"[signer]
# The TSU key lives in a SoftHSM2 token (softhsm/), used through PKCS#11; see hsm/README.md.
kind = "pkcs11"
module = "{module}"
module_env = {{ SOFTHSM2_CONF = "{conf}" }}
token_label = "{HSM_TOKEN}"
key_label = "{HSM_KEY}"
key_id = "{id}"
pin_file = "{HSM_PIN}"
sessions = 4
certificate = "tsa-cert.pem"
rsa_padding = "{padding}"
"#,
        module = module_path.display(),
        conf = conf.display(),
        id = hex(&id),
    ))
}

/// The TLS files of `--tls`; returns the `https_listen` line with `[server.tls]`, and the
/// `[auth]` section with the development client.
fn dev_tls(args: &InitArgs) -> anyhow::Result<(String, String)> {
    let ca_key = std::fs::read_to_string(args.dir.join("ca-key.pem"))?;
    let tls = tsa::pki::DevTls::generate(&ca_key, DEV_CLIENT)?;
    write_public(&args.dir.join("tls-cert.pem"), &tls.server_cert_pem)?;
    write_secret(&args.dir.join("tls-key.pem"), &tls.server_key_pem)?;
    write_public(
        &args.dir.join("client-ca-cert.pem"),
        &tls.client_ca_cert_pem,
    )?;
    write_secret(&args.dir.join("client-ca-key.pem"), &tls.client_ca_key_pem)?;
    write_public(&args.dir.join("client-cert.pem"), &tls.client_cert_pem)?;
    write_secret(&args.dir.join("client-key.pem"), &tls.client_key_pem)?;
    let fingerprint = tsa::server::auth::PeerCertificate::from_der(&tls.client_cert_der).sha256;
    let https = format!(
        r#"# HTTPS: the same routes over TLS (curl --cacert ca-cert.pem https://{listen}/).
https_listen = "{listen}"

[server.tls]
# Issued by the development root CA (ca-cert.pem) for localhost, 127.0.0.1 and ::1.
certificate = "tls-cert.pem"
key = "tls-key.pem"
# Client certificates of this CA are verified (mutual TLS); client-cert.pem is one.
client_ca = ["client-ca-cert.pem"]
require_client_certificate = false
"#,
        listen = args.https_listen,
    );
    let auth = format!(
        r#"
[auth]
# Requests without credentials are served; `tsa client new-key` makes API keys.
anonymous = true

[[auth.client]]
# client-cert.pem: curl --cert client-cert.pem --key client-key.pem --cacert ca-cert.pem …
name = "{DEV_CLIENT}"
certificate_sha256 = "{fingerprint}"
"#,
        fingerprint = tsa::server::auth::hex(&fingerprint),
    );
    Ok((https, auth))
}

/// Writes a private key (or PIN, or API key) durably, readable by its owner alone.
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    files::replace(path, contents.as_bytes(), files::SECRET)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a certificate, request or configuration durably.
fn write_public(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    files::replace(path, contents.as_ref(), files::PUBLIC)
        .with_context(|| format!("cannot write {}", path.display()))
}
