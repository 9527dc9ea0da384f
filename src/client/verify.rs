//! Verifying a token the way a relying party does: the imprint (and the request's nonce,
//! policy and certReq), the CMS signature over the signed attributes, messageDigest,
//! ESSCertID(v2) against the signer's certificate, the signer certificate's time-stamping
//! profile, and its chain to a trusted CA.

use anyhow::{bail, ensure, Context};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use cms::cert::CertificateChoices;
use cms::signed_data::{SignerIdentifier, SignerInfo};
use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::Certificate;

use super::read::Token;
use crate::alg::{oid, DigestAlgorithm};
use crate::protocol::asn1::{SigningCertificate, SigningCertificateV2, TimeStampReq};
use crate::protocol::GenTime;

/// What the relying party expects of the token.
#[derive(Default)]
pub struct Expectation<'a> {
    /// The data that was stamped (hashed with the token's imprint algorithm)…
    pub data: Option<&'a [u8]>,
    /// …or the digest itself.
    pub digest: Option<&'a [u8]>,
    /// The request, when it is at hand: nonce, policy and certReq are checked against it.
    pub query: Option<&'a [u8]>,
    /// Trust anchors.
    pub trusted: Vec<Certificate>,
    /// Further certificates, for a token issued without them (certReq false).
    pub untrusted: Vec<Certificate>,
}

/// What a verified token says.
#[derive(Debug)]
pub struct Verified {
    pub gen_time: GenTime,
    pub accuracy_ns: Option<u64>,
    pub serial_hex: String,
    pub policy: ObjectIdentifier,
    pub signer: String,
}

pub fn verify(token: &Token, expect: &Expectation<'_>) -> anyhow::Result<Verified> {
    let tst = token.tst_info();
    ensure!(tst.version == 1, "TSTInfo version {} is not 1", tst.version);

    // The imprint.
    let imprint_oid = tst.message_imprint.hash_algorithm.oid;
    let imprint_alg = DigestAlgorithm::from_oid(&imprint_oid)
        .with_context(|| format!("unknown imprint algorithm {imprint_oid}"))?;
    let expected_digest = match (expect.data, expect.digest) {
        (Some(data), _) => imprint_alg
            .digest(data)
            .with_context(|| format!("cannot compute {}", imprint_alg.name()))?,
        (None, Some(digest)) => digest.to_vec(),
        (None, None) => bail!("nothing to check the imprint against: give the data or its digest"),
    };
    ensure!(
        tst.message_imprint.hashed_message.as_bytes() == expected_digest.as_slice(),
        "the token's message imprint does not match the data"
    );

    // The request.
    if let Some(query) = expect.query {
        answers_query(token, query)?;
    }

    // The signer.
    let signer_infos = &token.signed_data.signer_infos.0;
    ensure!(
        signer_infos.len() == 1,
        "a token has exactly one SignerInfo, this one {}",
        signer_infos.len()
    );
    let signer_info = signer_infos.get(0).expect("one");
    let included: Vec<Certificate> = token
        .signed_data
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|choice| match choice {
            CertificateChoices::Certificate(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let candidates: Vec<&Certificate> = included
        .iter()
        .chain(&expect.untrusted)
        .chain(&expect.trusted)
        .collect();
    let signer_cert = find_signer(&signer_info.sid, &candidates)
        .context("the signer's certificate is neither in the token nor given")?;
    let signer_der = signer_cert.to_der()?;

    // Signed attributes: contentType, messageDigest, signingCertificate(V2).
    let attrs = signer_info
        .signed_attrs
        .as_ref()
        .context("the token has no signed attributes")?;
    let attr = |oid: ObjectIdentifier| -> anyhow::Result<Option<Vec<u8>>> {
        let mut found = attrs.iter().filter(|a| a.oid == oid);
        let Some(a) = found.next() else {
            return Ok(None);
        };
        ensure!(
            found.next().is_none() && a.values.len() == 1,
            "attribute {oid} must appear once with one value"
        );
        Ok(Some(a.values.get(0).expect("one").to_der()?))
    };
    let content_type = attr(oid::CONTENT_TYPE)?.context("the contentType attribute is missing")?;
    ensure!(
        ObjectIdentifier::from_der(&content_type)? == oid::CT_TST_INFO,
        "the contentType attribute is not id-ct-TSTInfo"
    );
    let digest_alg_oid = signer_info.digest_alg.oid;
    let digest_alg = DigestAlgorithm::from_oid(&digest_alg_oid)
        .with_context(|| format!("unknown digest algorithm {digest_alg_oid}"))?;
    let message_digest =
        attr(oid::MESSAGE_DIGEST)?.context("the messageDigest attribute is missing")?;
    let message_digest = der::asn1::OctetString::from_der(&message_digest)?;
    ensure!(
        Some(message_digest.as_bytes().to_vec()) == digest_alg.digest(&token.tst_info_der),
        "messageDigest does not match TSTInfo"
    );
    check_ess(
        &attr(oid::SIGNING_CERTIFICATE_V2)?,
        &attr(oid::SIGNING_CERTIFICATE)?,
        signer_cert,
        &signer_der,
    )?;

    // The signature over the DER SET OF signed attributes.
    let signed = attrs.to_der()?;
    let spki = signer_cert.tbs_certificate().subject_public_key_info();
    verify_signature(
        spki,
        &signer_info.signature_algorithm,
        Some(digest_alg),
        &signed,
        signer_info.signature.as_bytes(),
    )
    .context("the token's signature does not verify")?;

    // The signer's certificate: profile, validity at genTime, chain.
    check_tsu_profile(signer_cert)?;
    let gen_time = tst.gen_time;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(gen_time.unix_ns());
    check_chain(signer_cert, &included, expect, at)?;

    Ok(Verified {
        gen_time,
        accuracy_ns: tst.accuracy.map(|a| a.as_ns()),
        serial_hex: tst
            .serial_number
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        policy: tst.policy,
        signer: signer_cert.tbs_certificate().subject().to_string(),
    })
}

/// Whether `token` answers the DER request `query`: the same message imprint and nonce, the
/// requested policy (if it named one), and the certificate present exactly when certReq asked
/// for it. Checks nothing about the signature or the signer: [`verify`] does, and calls this
/// when it is given the query.
pub fn answers_query(token: &Token, query: &[u8]) -> anyhow::Result<()> {
    let tst = token.tst_info();
    let req = TimeStampReq::from_der(query).context("the query is not a TimeStampReq")?;
    ensure!(
        req.message_imprint == tst.message_imprint,
        "the token's message imprint is not the request's"
    );
    ensure!(
        req.nonce.map(|n| n.as_bytes()) == tst.nonce.map(|n| n.as_bytes()),
        "the token's nonce is not the request's"
    );
    if let Some(policy) = req.req_policy {
        ensure!(
            policy == tst.policy,
            "the token's policy {} is not the requested {policy}",
            tst.policy
        );
    }
    let has_certs = token
        .signed_data
        .certificates
        .as_ref()
        .is_some_and(|c| !c.0.is_empty());
    ensure!(
        has_certs == req.cert_req,
        "the request set certReq={} but the token {} certificates",
        req.cert_req,
        if has_certs { "carries" } else { "carries no" }
    );
    Ok(())
}

fn find_signer<'c>(
    sid: &SignerIdentifier,
    candidates: &[&'c Certificate],
) -> Option<&'c Certificate> {
    let SignerIdentifier::IssuerAndSerialNumber(ias) = sid else {
        return None;
    };
    candidates.iter().copied().find(|c| {
        c.tbs_certificate().issuer() == &ias.issuer
            && c.tbs_certificate().serial_number() == &ias.serial_number
    })
}

fn check_ess(
    v2: &Option<Vec<u8>>,
    v1: &Option<Vec<u8>>,
    cert: &Certificate,
    cert_der: &[u8],
) -> anyhow::Result<()> {
    let tbs = cert.tbs_certificate();
    let issuer_matches = |is: &Option<crate::protocol::asn1::IssuerSerial>| {
        match is {
        None => true,
        Some(is) => {
            is.serial_number == *tbs.serial_number()
                && is.issuer.iter().any(|n| matches!(n, x509_cert::ext::pkix::name::GeneralName::DirectoryName(name) if name == tbs.issuer()))
        }
    }
    };
    if let Some(v2) = v2 {
        let sc =
            SigningCertificateV2::from_der(v2).context("signingCertificateV2 does not decode")?;
        let first = sc
            .certs
            .first()
            .context("signingCertificateV2 names no certificate")?;
        let alg = match &first.hash_algorithm {
            None => DigestAlgorithm::Sha256,
            Some(a) => DigestAlgorithm::from_oid(&a.oid).context("unknown ESSCertIDv2 hash")?,
        };
        ensure!(
            alg.digest(cert_der).as_deref() == Some(first.cert_hash.as_bytes()),
            "ESSCertIDv2 does not match the signer's certificate"
        );
        ensure!(
            issuer_matches(&first.issuer_serial),
            "ESSCertIDv2 names another issuer and serial"
        );
        return Ok(());
    }
    if let Some(v1) = v1 {
        let sc = SigningCertificate::from_der(v1).context("signingCertificate does not decode")?;
        let first = sc
            .certs
            .first()
            .context("signingCertificate names no certificate")?;
        ensure!(
            DigestAlgorithm::Sha1.digest(cert_der).as_deref() == Some(first.cert_hash.as_bytes()),
            "ESSCertID does not match the signer's certificate"
        );
        ensure!(
            issuer_matches(&first.issuer_serial),
            "ESSCertID names another issuer and serial"
        );
        return Ok(());
    }
    bail!("neither signingCertificateV2 nor signingCertificate is present")
}

fn check_tsu_profile(cert: &Certificate) -> anyhow::Result<()> {
    match cert.tbs_certificate().get_extension::<ExtendedKeyUsage>()? {
        Some((true, eku)) if eku.0 == [oid::KP_TIME_STAMPING] => Ok(()),
        Some((false, _)) => bail!("the signer's extended key usage is not critical"),
        Some(_) => bail!("the signer's extended key usage is not exactly id-kp-timeStamping"),
        None => bail!("the signer's certificate has no extended key usage"),
    }
}

fn check_chain(
    leaf: &Certificate,
    included: &[Certificate],
    expect: &Expectation<'_>,
    at: std::time::SystemTime,
) -> anyhow::Result<()> {
    ensure!(!expect.trusted.is_empty(), "no trusted CA given");
    let mut cert = leaf;
    for _ in 0..8 {
        let validity = cert.tbs_certificate().validity();
        ensure!(
            validity.not_before.to_system_time() <= at && at <= validity.not_after.to_system_time(),
            "{} was not valid at genTime",
            cert.tbs_certificate().subject()
        );
        let issuer_name = cert.tbs_certificate().issuer();
        let tbs_der = cert.tbs_certificate().to_der()?;
        let signed_by = |issuer: &Certificate| {
            issuer.tbs_certificate().subject() == issuer_name
                && verify_signature(
                    issuer.tbs_certificate().subject_public_key_info(),
                    cert.signature_algorithm(),
                    None,
                    &tbs_der,
                    cert.signature().raw_bytes(),
                )
                .is_ok()
        };
        if expect.trusted.iter().any(signed_by) || expect.trusted.iter().any(|t| t == cert) {
            return Ok(());
        }
        cert = included
            .iter()
            .chain(&expect.untrusted)
            .find(|c| *c != cert && signed_by(c))
            .with_context(|| {
                format!(
                    "no trusted issuer found for {}",
                    cert.tbs_certificate().subject()
                )
            })?;
    }
    bail!("the certificate chain is too long")
}

/// Verifies `signature` over `message` with the key in `spki`, by the algorithm `alg`
/// (`digest` is the SignerInfo's digest, for an `rsaEncryption` signature algorithm).
pub fn verify_signature(
    spki: &SubjectPublicKeyInfoOwned,
    alg: &AlgorithmIdentifierOwned,
    digest: Option<DigestAlgorithm>,
    message: &[u8],
    signature: &[u8],
) -> anyhow::Result<()> {
    let key_oid = spki.algorithm.oid;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    use DigestAlgorithm as D;
    let verifier: &'static dyn VerificationAlgorithm = if key_oid == oid::EC_PUBLIC_KEY {
        let hash = match alg.oid {
            o if o == oid::ECDSA_WITH_SHA256 => D::Sha256,
            o if o == oid::ECDSA_WITH_SHA384 => D::Sha384,
            o if o == oid::ECDSA_WITH_SHA512 => D::Sha512,
            o => bail!("signature algorithm {o} does not fit an EC key"),
        };
        match (curve, hash) {
            (Some(c), D::Sha256) if c == oid::SECP256R1 => &signature::ECDSA_P256_SHA256_ASN1,
            (Some(c), D::Sha384) if c == oid::SECP256R1 => &signature::ECDSA_P256_SHA384_ASN1,
            (Some(c), D::Sha256) if c == oid::SECP384R1 => &signature::ECDSA_P384_SHA256_ASN1,
            (Some(c), D::Sha384) if c == oid::SECP384R1 => &signature::ECDSA_P384_SHA384_ASN1,
            (Some(c), D::Sha512) if c == oid::SECP384R1 => &signature::ECDSA_P384_SHA512_ASN1,
            _ => bail!("unsupported curve and hash {curve:?} / {}", hash.name()),
        }
    } else if key_oid == oid::RSA_ENCRYPTION {
        let hash = match alg.oid {
            o if o == oid::SHA256_WITH_RSA => D::Sha256,
            o if o == oid::SHA384_WITH_RSA => D::Sha384,
            o if o == oid::SHA512_WITH_RSA => D::Sha512,
            o if o == oid::RSA_ENCRYPTION => digest.context("rsaEncryption needs a digest")?,
            o if o == oid::RSASSA_PSS => {
                return verify_rsa(spki, pss_verifier(alg)?, message, signature);
            }
            o => bail!("signature algorithm {o} does not fit an RSA key"),
        };
        let params: &'static dyn VerificationAlgorithm = match hash {
            D::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            D::Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            D::Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            other => bail!("RSA with {} is not supported", other.name()),
        };
        params
    } else {
        bail!("unsupported key algorithm {key_oid}")
    };
    verify_rsa(spki, verifier, message, signature)
}

fn verify_rsa(
    spki: &SubjectPublicKeyInfoOwned,
    verifier: &'static dyn VerificationAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> anyhow::Result<()> {
    UnparsedPublicKey::new(verifier, spki.subject_public_key.raw_bytes())
        .verify(message, signature)
        .map_err(|_| anyhow::anyhow!("bad signature"))
}

/// RSASSA-PSS parameters as RFC 4055 writes them: the hash, MGF1 with the same hash, and a
/// salt as long as the hash (the only form the TSA issues and aws-lc-rs verifies).
fn pss_verifier(
    alg: &AlgorithmIdentifierOwned,
) -> anyhow::Result<&'static dyn VerificationAlgorithm> {
    use crate::alg::SignatureAlgorithm as S;
    for (candidate, verifier) in [
        (S::RsaPssSha256, &signature::RSA_PSS_2048_8192_SHA256),
        (S::RsaPssSha384, &signature::RSA_PSS_2048_8192_SHA384),
        (S::RsaPssSha512, &signature::RSA_PSS_2048_8192_SHA512),
    ] {
        if candidate.algorithm_identifier() == *alg {
            return Ok(verifier);
        }
    }
    bail!("unsupported RSASSA-PSS parameters")
}

/// Reads the signer's algorithm info for display.
pub fn signer_info(token: &Token) -> Option<&SignerInfo> {
    token.signed_data.signer_infos.0.get(0)
}
