//! `tsa init`: a development PKI (root CA and TSU certificate) and a configuration file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{Datelike, Duration as ChronoDuration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, RsaKeySize,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

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

    let ca_key = new_key(args.algorithm)?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let tsu_key = new_key(args.algorithm)?;
    let tsu_cert = tsu_params()?.signed_by(&tsu_key, &issuer)?;

    write_secret(&args.dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    std::fs::write(args.dir.join("ca-cert.pem"), ca_cert.pem())?;
    write_secret(&args.dir.join("tsa-key.pem"), &tsu_key.serialize_pem())?;
    std::fs::write(args.dir.join("tsa-cert.pem"), tsu_cert.pem())?;

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

fn new_key(algorithm: KeyAlgorithm) -> anyhow::Result<KeyPair> {
    Ok(match algorithm {
        KeyAlgorithm::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyAlgorithm::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        KeyAlgorithm::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)?
        }
        KeyAlgorithm::Rsa3072 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)?
        }
        KeyAlgorithm::Rsa4096 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)?
        }
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "VN");
    dn.push(
        DnType::OrganizationName,
        "Development TSA (not for production)",
    );
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Validity from yesterday (clock skew between machines) for `years`.
fn validity(params: &mut CertificateParams, years: i32) {
    let start = Utc::now() - ChronoDuration::days(1);
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(start.year() + years, start.month() as u8, 1);
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![])?;
    params.distinguished_name = name("Development TSA Root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 10);
    Ok(params)
}

/// The TSU profile of ETSI EN 319 422: end entity, digitalSignature, and id-kp-timeStamping as
/// the only extended key usage, marked critical (rcgen writes EKU non-critical, so it is added
/// as a custom extension).
fn tsu_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![])?;
    params.distinguished_name = name("Development Time-Stamping Unit");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // SEQUENCE { OBJECT IDENTIFIER 1.3.6.1.5.5.7.3.8 }
    let eku = vec![
        0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08,
    ];
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 37], eku);
    ext.set_criticality(true);
    params.custom_extensions.push(ext);
    validity(&mut params, 3);
    Ok(params)
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
