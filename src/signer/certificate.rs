//! The TSU certificate: loaded once, checked against its key and the ETSI EN 319 422 profile.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use der::{Decode, Encode};
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages};
use x509_cert::Certificate;

use super::Signer;
use crate::alg::{oid, SignatureAlgorithm};

/// The signing certificate and the chain that goes with it.
pub struct TsuCertificate {
    der: Vec<u8>,
    chain: Vec<Vec<u8>>,
    cert: Certificate,
    /// `chain`, decoded.
    chain_certs: Vec<Certificate>,
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
        ensure_der(&cert, &der).context("the TSU certificate")?;
        let chain_certs = chain
            .iter()
            .enumerate()
            .map(|(i, der)| {
                Certificate::from_der(der).with_context(|| {
                    format!("certificate {} of the TSU certificate's chain", i + 1)
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            der,
            chain,
            cert,
            chain_certs,
        })
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

    /// The serial number in hex: with the issuer, what names this certificate (and so its
    /// key) in key events, where a renewed certificate often keeps the subject.
    pub fn serial_hex(&self) -> String {
        crate::archive::record::hex(self.cert.tbs_certificate().serial_number().as_bytes())
    }

    /// The SHA-256 of the certificate's DER in hex, as `openssl x509 -fingerprint -sha256`
    /// shows it (without colons).
    pub fn sha256_hex(&self) -> String {
        crate::archive::record::hex(&crate::archive::record::sha256(&self.der))
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

    /// When its whole path is valid: the latest notBefore and the earliest notAfter of the
    /// certificate and its chain (an intermediate that expires first ends what verifiers can
    /// check, though the TSU certificate runs on).
    pub fn path_validity(&self) -> (SystemTime, SystemTime) {
        let mut validity = (self.not_before(), self.not_after());
        for cert in &self.chain_certs {
            let v = cert.tbs_certificate().validity();
            validity.0 = validity.0.max(v.not_before.to_system_time());
            validity.1 = validity.1.min(v.not_after.to_system_time());
        }
        validity
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
    /// that is not the signer's, a CA certificate, one whose extended key usage is not exactly
    /// id-kp-timeStamping, marked critical (RFC 3161 2.3, ETSI EN 319 422 7.2), and, for one
    /// that signs from `now` on, one outside its validity period then or whose key usage
    /// verifiers refuse ([`Self::check_signing_key_usage`]). `now` is `None` for a
    /// certificate no longer used to sign (the first one after a rollover).
    pub fn check(&self, signer: &dyn Signer, now: Option<SystemTime>) -> anyhow::Result<()> {
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
        // An EC point of the same length on another curve (brainpoolP256r1 beside P-256)
        // would pass the comparison of the key's octets; verifiers would take the curve of the
        // certificate, and every token would fail.
        let curve = match signer.algorithm() {
            SignatureAlgorithm::EcdsaP256Sha256 => Some(oid::SECP256R1),
            SignatureAlgorithm::EcdsaP384Sha384 => Some(oid::SECP384R1),
            _ => None,
        };
        if let Some(curve) = curve {
            let named = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok());
            if named != Some(curve) {
                bail!(
                    "the certificate of {subject} names the curve {}, the key is {}",
                    named.map_or("(none)".to_string(), |c| c.to_string()),
                    signer.algorithm().name()
                );
            }
        }

        let validity = tbs.validity();
        let (not_before, not_after) = (
            validity.not_before.to_system_time(),
            validity.not_after.to_system_time(),
        );
        if now.is_some_and(|now| now < not_before) {
            bail!(
                "the certificate of {subject} is not valid before {}",
                validity.not_before
            );
        }
        if now.is_some_and(|now| now > not_after) {
            bail!(
                "the certificate of {subject} expired at {}",
                validity.not_after
            );
        }
        self.check_profile()?;
        self.check_chain(now)?;
        if now.is_some() {
            self.check_signing_key_usage()?;
            self.check_critical_extensions()?;
        }
        Ok(())
    }

    /// The chain as tokens (with certReq) and `GET /certs` hand it to verifiers: each of its
    /// certificates issued the one before it (the TSU certificate first), by name and by
    /// signature, as a CA whose key usage allows signing certificates, and, for a certificate
    /// that signs from `now` on, is valid then. A wrong, misordered or expired intermediate
    /// would be served with every token while verifiers could build no path.
    fn check_chain(&self, now: Option<SystemTime>) -> anyhow::Result<()> {
        use crate::client::verify::{check_issuing_ca, verify_signature, BadSignature};
        let below = std::iter::once((&self.cert, &self.der[..])).chain(
            self.chain_certs
                .iter()
                .zip(self.chain.iter().map(Vec::as_slice)),
        );
        for (i, ((cert, octets), issuer)) in below.zip(&self.chain_certs).enumerate() {
            let (tbs, by) = (cert.tbs_certificate(), issuer.tbs_certificate());
            let which = || format!("certificate {} of the TSU certificate's chain", i + 1);
            if tbs.issuer() != by.subject() {
                bail!(
                    "{} ({}) did not issue {}, issued by {}: the chain follows the TSU \
                     certificate up, each certificate the issuer of the one before it",
                    which(),
                    by.subject(),
                    tbs.subject(),
                    tbs.issuer()
                );
            }
            // A self-issued certificate (a root listed as its own issuer) is its own trust
            // anchor: verifiers do not check its signature (old roots are signed with SHA-1).
            let self_issued = tbs.issuer() == tbs.subject();
            let checked = match self_issued {
                true => Ok(()),
                false => verify_signature(
                    by.subject_public_key_info(),
                    cert.signature_algorithm(),
                    None,
                    tbs_octets(octets)?,
                    cert.signature().raw_bytes(),
                ),
            };
            match checked {
                Ok(()) => {}
                Err(e) if e.is::<BadSignature>() => bail!(
                    "{} ({}) has the name of the issuer of {} but not its key",
                    which(),
                    by.subject(),
                    tbs.subject()
                ),
                // An algorithm the TSA does not verify (brainpool, P-521, SHA-1): the
                // verifiers' to judge.
                Err(e) => tracing::warn!(
                    "cannot check that {} ({}) signed {}: {e:#}",
                    which(),
                    by.subject(),
                    tbs.subject()
                ),
            }
            check_issuing_ca(issuer).with_context(which)?;
            let validity = by.validity();
            if now.is_some_and(|now| {
                now < validity.not_before.to_system_time()
                    || now > validity.not_after.to_system_time()
            }) {
                bail!(
                    "{} ({}) is not valid now (from {} to {}): verifiers build no path through it",
                    which(),
                    by.subject(),
                    validity.not_before,
                    validity.not_after
                );
            }
        }
        Ok(())
    }

    /// No critical extension but those verifiers process (RFC 5280 4.2: a certificate with a
    /// critical extension the verifier does not recognize is refused, and every token with
    /// it), for a certificate that signs tokens.
    pub fn check_critical_extensions(&self) -> anyhow::Result<()> {
        // RFC 5280's, as OpenSSL and the JDK process them.
        const KNOWN: [&str; 12] = [
            "2.5.29.14", // subjectKeyIdentifier
            "2.5.29.15", // keyUsage
            "2.5.29.17", // subjectAltName
            "2.5.29.19", // basicConstraints
            "2.5.29.30", // nameConstraints
            "2.5.29.31", // cRLDistributionPoints
            "2.5.29.32", // certificatePolicies
            "2.5.29.33", // policyMappings
            "2.5.29.35", // authorityKeyIdentifier
            "2.5.29.36", // policyConstraints
            "2.5.29.37", // extKeyUsage
            "2.5.29.54", // inhibitAnyPolicy
        ];
        let tbs = self.cert.tbs_certificate();
        let unknown = tbs
            .extensions()
            .into_iter()
            .flatten()
            .find(|e| e.critical && !KNOWN.contains(&e.extn_id.to_string().as_str()));
        if let Some(e) = unknown {
            bail!(
                "the certificate of {} has a critical extension {} that verifiers do not \
                 process: they refuse the certificate, and every token it signs",
                tbs.subject(),
                e.extn_id
            );
        }
        Ok(())
    }

    /// The TSU profile alone: not a CA, id-kp-timeStamping as the only extended key usage,
    /// critical, and a key usage (if any) that allows signing (digitalSignature or
    /// nonRepudiation). What a certificate that signed once must have had: checkpoints and
    /// tokens of an older certificate are checked against this.
    pub fn check_profile(&self) -> anyhow::Result<()> {
        let tbs = self.cert.tbs_certificate();
        let subject = tbs.subject();
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
            let signing = KeyUsages::DigitalSignature | KeyUsages::NonRepudiation;
            if (ku.0 & signing).is_empty() {
                bail!("the key usage of the certificate of {subject} allows neither digitalSignature nor nonRepudiation");
            }
        }
        Ok(())
    }

    /// A key usage (if any) of digitalSignature or nonRepudiation and nothing else, for a
    /// certificate that signs tokens: OpenSSL's time-stamping purpose refuses one whose key
    /// usage holds another bit (`openssl ts -verify`: "unsupported certificate purpose"),
    /// such as the keyEncipherment many RSA certificates carry. Java before 17 refuses one
    /// without digitalSignature, which is why the development PKI's has it alone.
    pub fn check_signing_key_usage(&self) -> anyhow::Result<()> {
        let tbs = self.cert.tbs_certificate();
        let subject = tbs.subject();
        let usage = tbs
            .get_extension::<KeyUsage>()
            .map_err(|e| anyhow::anyhow!("the certificate of {subject}: {e}"))?;
        if let Some((_, ku)) = usage {
            let others = ku.0 & !(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation);
            if !others.is_empty() {
                let names: Vec<String> = others.into_iter().map(|f| format!("{f:?}")).collect();
                bail!(
                    "the key usage of the certificate of {subject} allows {} besides signing: \
                     verifiers (openssl ts -verify) refuse a time-stamping certificate whose \
                     key usage holds more than digitalSignature and nonRepudiation",
                    names.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Time left before the certificate expires (zero once it has).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after().duration_since(now).unwrap_or_default()
    }
}

/// Every `CERTIFICATE` block of a PEM file, its octets as they are (tokens carry them, and
/// their ESS identifier hashes them), each a certificate that decodes. Only the TSU
/// certificate must be in DER exactly ([`TsuCertificate::from_der`]): tokens name it.
pub fn read_pem_certificates(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let not_pem = || format!("{} is not a PEM certificate file", path.display());
    let blocks = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(not_pem)?;
    if blocks.is_empty() {
        bail!("{}", not_pem());
    }
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            let which = || format!("certificate {} of {}", i + 1, path.display());
            Certificate::from_der(&block).with_context(which)?;
            Ok(block.to_vec())
        })
        .collect()
}

/// The octets of a certificate's tbsCertificate, as they are (what its issuer signed).
fn tbs_octets(certificate: &[u8]) -> anyhow::Result<&[u8]> {
    use der::{Reader, SliceReader};
    let outer = der::asn1::AnyRef::from_der(certificate)?;
    Ok(SliceReader::new(outer.value())?.tlv_bytes()?)
}

/// Refuses a certificate whose octets are not the DER of what they decode to (a `der` reading
/// sorts a SET OF, such as a multi-valued RDN, that came unsorted): the names a token gives
/// its signer (`sid`, ESS `issuerSerial`, `tsa`) are encoded from the decoded certificate and
/// would not match its octets, which verifiers compare.
fn ensure_der(cert: &Certificate, octets: &[u8]) -> anyhow::Result<()> {
    if cert.to_der()? != octets {
        bail!(
            "is not in DER (a SET OF out of order, say: a multi-valued name component); tokens \
             would name it by other octets than its own, which verifiers refuse: have it issued \
             again in DER"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use der::{Reader, SliceReader};

    use super::*;

    /// A TLV with a DER length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        match len {
            0..=0x7f => out.push(len as u8),
            0x80..=0xff => out.extend([0x81, len as u8]),
            _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// `certificate` with its subject replaced by `subject` (the signature no longer fits, which
    /// loading does not check).
    fn with_subject(certificate: &[u8], subject: &[u8]) -> Vec<u8> {
        let mut cert = SliceReader::new(certificate).unwrap();
        cert.sequence(|cert| {
            let tbs = cert.sequence(|tbs| {
                let mut fields = Vec::new();
                while !tbs.is_finished() {
                    fields.push(tbs.tlv_bytes()?);
                }
                Ok::<_, der::Error>(fields)
            })?;
            let (algorithm, signature) = (cert.tlv_bytes()?, cert.tlv_bytes()?);
            // version, serialNumber, signature, issuer, validity, subject, …
            let mut tbs_content = Vec::new();
            for (i, field) in tbs.iter().enumerate() {
                tbs_content.extend_from_slice(if i == 5 { subject } else { field });
            }
            let content = [
                tlv(0x30, &tbs_content),
                algorithm.to_vec(),
                signature.to_vec(),
            ];
            Ok::<_, der::Error>(tlv(0x30, &content.concat()))
        })
        .unwrap()
    }

    /// A key usage beyond digitalSignature and nonRepudiation (as many RSA certificates carry
    /// keyEncipherment) is refused for a certificate that signs, not for one that signed once
    /// (its checkpoints and tokens are still checked); one without either is refused for
    /// both; either of them alone is the profile.
    #[test]
    fn a_key_usage_beyond_signing_is_refused() {
        use rcgen::KeyUsagePurpose::*;
        let certificate = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let der = crate::pki::tsu_certificate_with_key_usages(usages);
            TsuCertificate::from_der(der, Vec::new()).unwrap()
        };
        let with = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let certificate = certificate(usages);
            let signed_once = certificate.check_profile();
            signed_once
                .and_then(|()| certificate.check_signing_key_usage())
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(with(vec![DigitalSignature]), Ok(()));
        assert_eq!(with(vec![ContentCommitment]), Ok(()));
        assert_eq!(with(vec![DigitalSignature, ContentCommitment]), Ok(()));
        for others in [KeyEncipherment, KeyAgreement, KeyCertSign] {
            let refused = with(vec![DigitalSignature, others]).unwrap_err();
            assert!(refused.contains("besides signing"), "{refused}");
            let signed_once = certificate(vec![DigitalSignature, others]).check_profile();
            assert!(signed_once.is_ok(), "{others:?}: {signed_once:?}");
        }
        let refused = with(vec![DigitalSignature, KeyEncipherment]).unwrap_err();
        assert!(
            refused.contains("allows KeyEncipherment besides"),
            "{refused}"
        );
        let refused = with(vec![KeyEncipherment]).unwrap_err();
        assert!(refused.contains("allows neither"), "{refused}");
    }

    #[test]
    fn validity_is_checked_at_the_instant_given_or_not_at_all() {
        use crate::signer::software::{RsaPadding, SoftwareSigner};
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap();
        let der = Certificate::load_pem_chain(pki.tsu_cert_pem.as_bytes()).unwrap()[0]
            .to_der()
            .unwrap();
        let certificate = TsuCertificate::from_der(der, Vec::new()).unwrap();
        let key = der::pem::decode_vec(pki.tsu_key_pem.as_bytes()).unwrap().1;
        let signer = SoftwareSigner::from_pkcs8(&key, RsaPadding::Pkcs1).unwrap();
        assert!(certificate.check(&signer, Some(SystemTime::now())).is_ok());
        let later = certificate.not_after() + std::time::Duration::from_secs(1);
        let error = certificate.check(&signer, Some(later)).unwrap_err();
        assert!(format!("{error:#}").contains("expired"), "{error:#}");
        // A certificate no longer used to sign (the first one after a rollover).
        assert!(certificate.check(&signer, None).is_ok());
    }

    #[test]
    fn the_certificate_must_name_the_keys_curve() {
        use crate::signer::software::{RsaPadding, SoftwareSigner};
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap();
        let der = Certificate::load_pem_chain(pki.tsu_cert_pem.as_bytes()).unwrap()[0]
            .to_der()
            .unwrap();
        let key = der::pem::decode_vec(pki.tsu_key_pem.as_bytes()).unwrap().1;
        let signer = SoftwareSigner::from_pkcs8(&key, RsaPadding::Pkcs1).unwrap();
        // prime256v1 (1.2.840.10045.3.1.7) made prime192v1 (…3.1.1): the same point.
        let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let at = der.windows(p256.len()).position(|w| w == p256).unwrap();
        let mut other = der.clone();
        other[at + p256.len() - 1] = 0x01;
        let check = |der: Vec<u8>| {
            TsuCertificate::from_der(der, Vec::new())
                .unwrap()
                .check(&signer, Some(SystemTime::now()))
                .map_err(|e| format!("{e:#}"))
        };
        check(der).unwrap();
        let error = check(other).unwrap_err();
        assert!(
            error.contains("names the curve 1.2.840.10045.3.1.1"),
            "{error}"
        );
    }

    #[test]
    fn the_chain_must_issue_the_tsu_certificate_up_to_its_end() {
        use crate::signer::software::{RsaPadding, SoftwareSigner};
        let first = |pem: &str| {
            Certificate::load_pem_chain(pem.as_bytes()).unwrap()[0]
                .to_der()
                .unwrap()
        };
        let (a, b) = (
            crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap(),
            crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P384).unwrap(),
        );
        let (tsu, ca, other_ca) = (
            first(&a.tsu_cert_pem),
            first(&a.ca_cert_pem),
            first(&b.ca_cert_pem),
        );
        let key = der::pem::decode_vec(a.tsu_key_pem.as_bytes()).unwrap().1;
        let signer = SoftwareSigner::from_pkcs8(&key, RsaPadding::Pkcs1).unwrap();
        let check = |chain: Vec<Vec<u8>>, now| {
            TsuCertificate::from_der(tsu.clone(), chain)
                .unwrap()
                .check(&signer, now)
                .map_err(|e| format!("{e:#}"))
        };
        let now = Some(SystemTime::now());
        check(vec![], now).unwrap();
        check(vec![ca.clone()], now).unwrap();
        // A root repeated issues itself.
        check(vec![ca.clone(), ca.clone()], now).unwrap();
        // Another CA of the same name (two development PKIs): its key did not sign.
        let error = check(vec![other_ca.clone()], now).unwrap_err();
        assert!(error.contains("not its key"), "{error}");
        // Out of order, or a certificate that issued nothing here; also for a certificate
        // no longer used to sign.
        for chain in [vec![tsu.clone()], vec![ca.clone(), tsu.clone()]] {
            let error = check(chain.clone(), now).unwrap_err();
            assert!(error.contains("did not issue"), "{error}");
            assert!(check(chain, None).is_err());
        }
    }

    #[test]
    fn a_certificate_that_is_not_der_is_refused_not_reencoded() {
        let pki = crate::pki::DevPki::generate(crate::pki::KeyAlgorithm::P256).unwrap();
        let der = Certificate::load_pem_chain(pki.tsu_cert_pem.as_bytes()).unwrap()[0]
            .to_der()
            .unwrap();
        assert!(TsuCertificate::from_der(der.clone(), Vec::new()).is_ok());
        // One name component of two values, organizationName before commonName: DER sorts a
        // SET OF by the encodings, which puts 2.5.4.3 first.
        let atv = |arc: u8, value: &[u8]| {
            tlv(
                0x30,
                &[tlv(0x06, &[0x55, 0x04, arc]), tlv(0x0c, value)].concat(),
            )
        };
        let unsorted = tlv(0x31, &[atv(10, b"Org"), atv(3, b"TSU")].concat());
        let sorted = tlv(0x31, &[atv(3, b"TSU"), atv(10, b"Org")].concat());
        let good = with_subject(&der, &tlv(0x30, &sorted));
        assert!(TsuCertificate::from_der(good, Vec::new()).is_ok());
        let bad = with_subject(&der, &tlv(0x30, &unsorted));
        let error = TsuCertificate::from_der(bad.clone(), Vec::new())
            .err()
            .expect("refused");
        assert!(format!("{error:#}").contains("not in DER"), "{error:#}");
        // Read from PEM, it is refused too; read as a chain certificate, its octets are kept
        // as they are (they were re-encoded: the CA's signature was no longer over them).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsu.pem");
        let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &bad).unwrap();
        std::fs::write(&path, pem).unwrap();
        assert_eq!(read_pem_certificates(&path).unwrap(), [bad]);
        let error = TsuCertificate::load(&path, &[]).err().expect("refused");
        assert!(format!("{error:#}").contains("not in DER"), "{error:#}");
    }
}
