//! `tsa hsm …`: a SoftHSM2 token for development, key pairs generated on a token, CSRs signed
//! by the token key, installing the issued certificate, and checking a configuration against
//! its token. Every subcommand but `softhsm-init` reads module, token, key and PIN from the
//! `[signer]` section of a configuration (`kind = "pkcs11"`). See `hsm/README.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context};
use tsa::config::{Config, SignerConfig};
use tsa::pki::KeyAlgorithm;
use tsa::signer::certificate::TsuCertificate;
use tsa::signer::pkcs11::token::{self, Module, TokenKey};
use tsa::signer::pkcs11::{key, KeyKind, PinSource, Pkcs11Config, Pkcs11Signer};
use tsa::signer::Signer;

#[derive(Debug, clap::Args)]
pub struct HsmArgs {
    #[command(subcommand)]
    pub command: HsmCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum HsmCommand {
    /// Create a SoftHSM2 token in a directory of its own (development and tests).
    SofthsmInit(SofthsmInitArgs),
    /// Generate the configured key pair on the token (sensitive, not extractable).
    Keygen(KeygenArgs),
    /// Write a certificate signing request signed by the token key.
    Csr(CsrArgs),
    /// Check an issued certificate against the token key and the TSU profile, and install it
    /// where the configuration expects it.
    InstallCert(InstallCertArgs),
    /// Open the configured key as the server would, check the certificate, sign and verify;
    /// optionally measure the signing rate.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct SofthsmInitArgs {
    /// The directory for softhsm2.conf and the token files.
    #[arg(long)]
    pub dir: PathBuf,
    /// The token's label.
    #[arg(long, default_value = "tsa")]
    pub label: String,
    /// The user PIN file; a random PIN is written there (mode 0600) if it does not exist.
    #[arg(long)]
    pub pin_file: PathBuf,
    /// The SO PIN file; a random PIN is written there (mode 0600) if it does not exist.
    #[arg(long)]
    pub so_pin_file: PathBuf,
    /// The SoftHSM2 module (found in the usual places otherwise).
    #[arg(long)]
    pub module: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The configuration whose [signer] names the token, the key label (and id) and the PIN.
    #[arg(long, short, default_value = "state/tsa.toml")]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value = "p256")]
    pub algorithm: KeyAlgorithm,
}

#[derive(Debug, clap::Args)]
pub struct CsrArgs {
    #[arg(long, short, default_value = "state/tsa.toml")]
    pub config: PathBuf,
    /// The subject, such as "C=VN,O=Example TSA,CN=Example TSU 1".
    #[arg(long)]
    pub subject: String,
    /// Where to write the PEM request.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InstallCertArgs {
    #[arg(long, short, default_value = "state/tsa.toml")]
    pub config: PathBuf,
    /// The issued certificate (PEM), optionally followed by its chain.
    #[arg(long)]
    pub cert: PathBuf,
}

/// `tsa hsm check` takes what `tsa check` takes.
pub use super::check::CheckArgs;

pub fn run(args: &HsmArgs) -> anyhow::Result<()> {
    match &args.command {
        HsmCommand::SofthsmInit(a) => softhsm_init(a),
        HsmCommand::Keygen(a) => keygen(a),
        HsmCommand::Csr(a) => csr(a),
        HsmCommand::InstallCert(a) => install_cert(a),
        HsmCommand::Check(a) => check(a),
    }
}

/// The `[signer]` of a configuration, which must be `kind = "pkcs11"`; `module_env` applied.
fn pkcs11_config(path: &Path) -> anyhow::Result<Pkcs11Config> {
    let config = Config::load(path)?;
    let SignerConfig::Pkcs11(pkcs11) = config.signer else {
        bail!(
            "the [signer] of {} is not kind = \"pkcs11\"",
            path.display()
        );
    };
    pkcs11.apply_module_env();
    Ok(*pkcs11)
}

pub fn key_kind(algorithm: KeyAlgorithm) -> KeyKind {
    match algorithm {
        KeyAlgorithm::P256 => KeyKind::EcP256,
        KeyAlgorithm::P384 => KeyKind::EcP384,
        KeyAlgorithm::Rsa2048 => KeyKind::Rsa { bits: 2048 },
        KeyAlgorithm::Rsa3072 => KeyKind::Rsa { bits: 3072 },
        KeyAlgorithm::Rsa4096 => KeyKind::Rsa { bits: 4096 },
    }
}

/// Writes a random PIN (32 hex digits) to `path`, mode 0600, unless the file exists.
pub fn ensure_pin_file(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut random = [0u8; 16];
    aws_lc_rs::rand::fill(&mut random).expect("the system RNG");
    let pin = zeroize::Zeroizing::new(key::hex(&random));
    super::init::write_secret(path, &format!("{}\n", pin.as_str()))
}

fn softhsm_init(args: &SofthsmInitArgs) -> anyhow::Result<()> {
    let conf = token::write_softhsm_conf(&args.dir)?;
    std::env::set_var("SOFTHSM2_CONF", &conf);
    ensure_pin_file(&args.pin_file)?;
    ensure_pin_file(&args.so_pin_file)?;
    let module_path = match &args.module {
        Some(m) => m.clone(),
        None => token::softhsm_module()?,
    };
    let module = Module::load(&module_path)?;
    token::init_token(
        &module,
        &args.label,
        &PinSource::File(args.so_pin_file.clone()),
        &PinSource::File(args.pin_file.clone()),
    )?;
    println!(
        "SoftHSM2 token '{}' initialized in {}\n  module = \"{}\"\n  module_env = {{ SOFTHSM2_CONF = \"{}\" }}",
        args.label,
        args.dir.display(),
        module_path.display(),
        conf.display()
    );
    Ok(())
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let config = pkcs11_config(&args.config)?;
    let selector = config.key_selector()?;
    let label = selector
        .label
        .clone()
        .context("keygen needs signer.key_label in the configuration")?;
    let id = selector.id.clone().unwrap_or_else(token::random_id);
    let module = Module::load(&config.module)?;
    let session = token::open_session(&module, &config.token_selector(), &config.pin_source()?)?;
    token::generate_key_pair(&session, key_kind(args.algorithm), &label, &id)?;
    let key = TokenKey::find(&session, &selector)?;
    // A key event (ETSI EN 319 421): in the operator's log, with the public key's hash.
    tracing::info!(
        event = "hsm_key_generated",
        token = %config.token_selector(),
        key_label = %label,
        key_id = %key::hex(&id),
        key = %key.info().kind.describe(),
        public_key_sha256 = %key::hex(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &key.info().public_key)
                .as_ref()
        ),
        "key pair generated on the token"
    );
    println!(
        "generated {} key '{}' (id {}) on {}: sensitive, not extractable",
        key.info().kind.describe(),
        label,
        key::hex(&id),
        config.token_selector()
    );
    if config.key_id.is_none() {
        println!("add key_id = \"{}\" to [signer]", key::hex(&id));
    }
    Ok(())
}

fn csr(args: &CsrArgs) -> anyhow::Result<()> {
    let config = pkcs11_config(&args.config)?;
    let subject = token::parse_subject(&args.subject)?;
    let module = Module::load(&config.module)?;
    let session = token::open_session(&module, &config.token_selector(), &config.pin_source()?)?;
    let key = TokenKey::find(&session, &config.key_selector()?)?;
    let pem = token::csr_pem(&key, subject)?;
    tsa::files::replace(&args.out, pem.as_bytes(), tsa::files::PUBLIC)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "certificate signing request for the {} token key written to {}",
        key.info().kind.describe(),
        args.out.display()
    );
    Ok(())
}

/// The token key as a `Signer` for the certificate check, without the session pool.
struct PublicOnly {
    algorithm: tsa::alg::SignatureAlgorithm,
    public_key: Vec<u8>,
}

impl Signer for PublicOnly {
    fn algorithm(&self) -> tsa::alg::SignatureAlgorithm {
        self.algorithm
    }
    fn public_key(&self) -> &[u8] {
        &self.public_key
    }
    fn sign(&self, _: &[u8]) -> Result<Vec<u8>, tsa::signer::SignError> {
        Err(tsa::signer::SignError::Failed("public key only".into()))
    }
}

fn install_cert(args: &InstallCertArgs) -> anyhow::Result<()> {
    let config = pkcs11_config(&args.config)?;
    let module = Module::load(&config.module)?;
    let session = token::open_session(&module, &config.token_selector(), &config.pin_source()?)?;
    let key = TokenKey::find(&session, &config.key_selector()?)?;
    let (_, algorithm) = key.info().kind.scheme(config.rsa_padding);
    let certificate = TsuCertificate::load(&args.cert, &[])?;
    certificate
        .check(
            &PublicOnly {
                algorithm,
                public_key: key.info().public_key.clone(),
            },
            Some(SystemTime::now()),
        )
        .context("the certificate cannot be installed")?;
    let pem = std::fs::read(&args.cert)?;
    if args.cert.canonicalize().ok() != config.certificate.canonicalize().ok() {
        // Replaced whole: a reload, or a start after a crash, never reads half of it.
        tsa::files::replace(&config.certificate, &pem, tsa::files::PUBLIC)
            .with_context(|| format!("cannot write {}", config.certificate.display()))?;
    }
    tracing::info!(
        event = "certificate_installed",
        subject = %certificate.subject(),
        serial = %certificate.serial_hex(),
        sha256 = %certificate.sha256_hex(),
        path = %config.certificate.display(),
        "TSU certificate of the token key installed"
    );
    println!(
        "the certificate of {} belongs to the token key; installed as {}",
        certificate.subject(),
        config.certificate.display()
    );
    Ok(())
}

fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let config = pkcs11_config(&args.config)?;
    let signer = Arc::new(Pkcs11Signer::open(&config)?);
    let info = signer.key_info();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "key: {} '{}' (id {}) on {}, signing with {}",
        info.kind.describe(),
        info.label,
        key::hex(&info.id),
        config.token_selector(),
        signer.algorithm().name()
    )?;
    let p = &info.protection;
    writeln!(
        out,
        "attributes: CKA_SENSITIVE={:?} CKA_EXTRACTABLE={:?} CKA_ALWAYS_SENSITIVE={:?} \
         CKA_NEVER_EXTRACTABLE={:?} CKA_PRIVATE={:?} CKA_SIGN={:?}{}{}{}",
        p.sensitive,
        p.extractable,
        p.always_sensitive,
        p.never_extractable,
        p.private,
        p.sign,
        if p.is_protected() {
            ""
        } else {
            "  <- WARNING: the key can leave the token"
        },
        if p.never_left_the_token() {
            String::new()
        } else {
            "  <- WARNING: not generated on the token, or extractable once".into()
        },
        if p.other_uses.is_empty() {
            String::new()
        } else {
            format!("  <- WARNING: also allows {}", p.other_uses.join(", "))
        }
    )?;
    let certificate = TsuCertificate::load(&config.certificate, &config.chain)?;
    certificate
        .check(signer.as_ref(), Some(SystemTime::now()))
        .context("the TSU certificate cannot be used")?;
    writeln!(
        out,
        "certificate: {} matches the key and the TSU profile",
        certificate.subject()
    )?;
    let message = b"tsa hsm check";
    // The PKCS#11 signer verifies each signature on the host before it hands it back.
    signer.sign(message)?;
    writeln!(out, "signature: made by the token, verified on the host")?;
    if args.signatures > 0 {
        let signer: Arc<dyn Signer> = signer;
        let (total, elapsed) = super::time_signatures(&signer, args.signatures, args.threads)?;
        writeln!(
            out,
            "rate: {total} signatures (each checked on the host) on {} thread(s) in \
             {:.2} s = {:.0}/s",
            args.threads.max(1),
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        )?;
    }
    Ok(())
}
