//! PEM files of the TLS endpoints (the HTTPS listener, the client, the PostgreSQL archive):
//! certificate chains, private keys and CRLs, read with rustls's own PEM reader.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Every certificate of a PEM file, in order; at least one.
pub fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// Every certificate revocation list of a file: PEM (`X509 CRL` blocks, at least one) or a
/// single DER CRL.
pub fn crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read CRLs from {}", path.display()))?;
    if crls.is_empty() {
        bail!("{} holds no CRL (PEM X509 CRL or DER)", path.display());
    }
    Ok(crls)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// The private key of a PEM file that the service holds (the HTTPS listener's, the archive's
/// PostgreSQL client key), refused like the signing key when users other than its owner and
/// its group may read it: a key that others can read is a key that others may have.
pub fn service_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let cannot = || format!("cannot read a private key from {}", path.display());
    let file = File::open(path).with_context(cannot)?;
    crate::files::ensure_private(&file, &format_args!("the private key {}", path.display()))?;
    PrivateKeyDer::from_pem_reader(BufReader::new(file)).with_context(cannot)
}

/// A CRL's `nextUpdate`, Unix seconds (`None` without one); an error where the CRL cannot be
/// read as RFC 5280 has it (its nextUpdate is then not known).
pub fn crl_next_update_s(der: &[u8]) -> anyhow::Result<Option<u64>> {
    use der::Decode;
    let list = x509_cert::crl::CertificateList::<x509_cert::certificate::Rfc5280>::from_der(der)
        .map_err(|e| {
            anyhow::anyhow!("a CRL that cannot be read ({e}): its nextUpdate is not known")
        })?;
    Ok(list
        .tbs_cert_list
        .next_update
        .map(|t| t.to_unix_duration().as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_chain_and_refuses_files_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap();
        let chain = dir.path().join("chain.pem");
        std::fs::write(&chain, format!("{}{}", pki.tsu_cert_pem, pki.ca_cert_pem)).unwrap();
        assert_eq!(certificates(&chain).unwrap().len(), 2);
        let key = dir.path().join("key.pem");
        std::fs::write(&key, &pki.tsu_key_pem).unwrap();
        assert!(private_key(&key).is_ok());

        let err = certificates(&key).unwrap_err().to_string();
        assert!(err.ends_with("key.pem holds no PEM certificate"), "{err}");
        let err = private_key(&chain).unwrap_err().to_string();
        assert!(err.contains("cannot read a private key from"), "{err}");

        // The service's own keys: 0600 or 0640, and read like any other key.
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        mode(&key, 0o644);
        let err = format!("{:#}", service_private_key(&key).unwrap_err());
        assert!(err.contains("is open to other users (mode 0644)"), "{err}");
        for private in [0o600, 0o640] {
            mode(&key, private);
            assert_eq!(
                service_private_key(&key).unwrap().secret_der(),
                private_key(&key).unwrap().secret_der()
            );
        }
        mode(&chain, 0o600);
        let err = service_private_key(&chain).unwrap_err().to_string();
        assert!(err.contains("cannot read a private key from"), "{err}");
        let err = format!(
            "{:#}",
            service_private_key(&dir.path().join("none")).unwrap_err()
        );
        assert!(err.contains("cannot read a private key from"), "{err}");
        let err = format!("{:#}", crls(&chain).unwrap_err());
        assert!(err.contains("holds no CRL"), "{err}");
        let missing = dir.path().join("missing.pem");
        assert!(format!("{:#}", certificates(&missing).unwrap_err()).contains("missing.pem"));
    }
}
