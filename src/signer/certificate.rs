//! The TSU certificate: loaded once, checked against its key and the ETSI EN 319 422 profile.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use der::{Decode, Encode};
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages};
use x509_cert::Certificate;

use super::Signer;
use crate::alg::oid;

/// The signing certificate and the chain that goes with it.
pub struct TsuCertificate {
    der: Vec<u8>,
    chain: Vec<Vec<u8>>,
    cert: Certificate,
}

impl TsuCertificate {
    /// Reads `path` (PEM, the TSU certificate first, optionally followed by its chain) and the
    /// extra chain files.
    pub fn load(path: &Path, chain_files: &[PathBuf]) -> anyhow::Result<Self> {
        let mut certs = read_pem_certificates(path)?;
        if certs.is_empty() {
            bail!("{} holds no certificate", path.display());
        }
        let der = certs.remove(0);
        for file in chain_files {
            certs.extend(read_pem_certificates(file)?);
        }
        Self::from_der(der, certs)
    }

    pub fn from_der(der: Vec<u8>, chain: Vec<Vec<u8>>) -> anyhow::Result<Self> {
        let cert = Certificate::from_der(&der).context("the TSU certificate is not valid DER")?;
        Ok(Self { der, chain, cert })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    pub fn subject(&self) -> String {
        self.cert.tbs_certificate().subject().to_string()
    }

    pub fn not_before(&self) -> SystemTime {
        self.cert
            .tbs_certificate()
            .validity()
            .not_before
            .to_system_time()
    }

    pub fn not_after(&self) -> SystemTime {
        self.cert
            .tbs_certificate()
            .validity()
            .not_after
            .to_system_time()
    }

    /// The certificate and chain as PEM, for `GET /certs`.
    pub fn chain_pem(&self) -> String {
        std::iter::once(&self.der)
            .chain(&self.chain)
            .map(|der| {
                der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
                    .expect("PEM encoding of DER cannot fail")
            })
            .collect()
    }

    /// Refuses a certificate that a verifier would refuse, or that the profile forbids: a key
    /// that is not the signer's, a CA certificate, one outside its validity period, or one
    /// whose extended key usage is not exactly id-kp-timeStamping, marked critical (RFC 3161
    /// 2.3, ETSI EN 319 422 7.2).
    pub fn check(&self, signer: &dyn Signer, now: SystemTime) -> anyhow::Result<()> {
        let tbs = self.cert.tbs_certificate();
        let subject = tbs.subject();

        let spki = tbs.subject_public_key_info();
        let cert_key = spki.subject_public_key.raw_bytes();
        if cert_key != signer.public_key() {
            bail!("the certificate of {subject} does not belong to the signing key");
        }
        let expected_key_alg = if signer.algorithm().is_rsa() {
            oid::RSA_ENCRYPTION
        } else {
            oid::EC_PUBLIC_KEY
        };
        if spki.algorithm.oid != expected_key_alg {
            bail!(
                "the certificate of {subject} has key algorithm {}, the key is {}",
                spki.algorithm.oid,
                signer.algorithm().name()
            );
        }

        let validity = tbs.validity();
        let (not_before, not_after) = (
            validity.not_before.to_system_time(),
            validity.not_after.to_system_time(),
        );
        if now < not_before {
            bail!(
                "the certificate of {subject} is not valid before {}",
                validity.not_before
            );
        }
        if now > not_after {
            bail!(
                "the certificate of {subject} expired at {}",
                validity.not_after
            );
        }

        let ext_err = |e: der::Error| anyhow::anyhow!("the certificate of {subject}: {e}");
        if let Some((_, bc)) = tbs.get_extension::<BasicConstraints>().map_err(ext_err)? {
            if bc.ca {
                bail!("the certificate of {subject} is a CA certificate; a TSU certificate must not be");
            }
        }
        match tbs.get_extension::<ExtendedKeyUsage>().map_err(ext_err)? {
            None => bail!(
                "the certificate of {subject} has no extended key usage; it needs id-kp-timeStamping, critical"
            ),
            Some((critical, eku)) => {
                if eku.0 != [oid::KP_TIME_STAMPING] {
                    bail!(
                        "the certificate of {subject} must have id-kp-timeStamping as its only extended key usage, it has {:?}",
                        eku.0.iter().map(ToString::to_string).collect::<Vec<_>>()
                    );
                }
                if !critical {
                    bail!("the extended key usage of the certificate of {subject} must be critical");
                }
            }
        }
        if let Some((_, ku)) = tbs.get_extension::<KeyUsage>().map_err(ext_err)? {
            if !(ku.0.contains(KeyUsages::DigitalSignature)
                || ku.0.contains(KeyUsages::NonRepudiation))
            {
                bail!("the key usage of the certificate of {subject} allows neither digitalSignature nor nonRepudiation");
            }
        }
        Ok(())
    }

    /// Time left before the certificate expires (zero once it has).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after().duration_since(now).unwrap_or_default()
    }
}

/// Every `CERTIFICATE` block of a PEM file, as DER.
pub fn read_pem_certificates(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = Certificate::load_pem_chain(&pem)
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    certs
        .iter()
        .map(|c| c.to_der().context("re-encoding a certificate"))
        .collect()
}
