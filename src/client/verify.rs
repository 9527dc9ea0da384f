//! Verifying a token the way a relying party does: the imprint (and the request's nonce,
//! policy and certReq), the CMS signature over the signed attributes, messageDigest,
//! ESSCertID(v2) against the signer's certificate, the `tsa` name against the signer, the
//! signer certificate's time-stamping profile, and its path to a trusted CA, validated by
//! rustls's `webpki` (basic constraints, path length, name constraints, critical extensions,
//! validity) at a chosen time: now by default, as `openssl ts -verify` does.

use anyhow::{bail, ensure, Context};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use cms::cert::CertificateChoices;
use cms::signed_data::{SignerIdentifier, SignerInfo};
use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use rustls::pki_types::{CertificateDer, UnixTime};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};
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
    /// CRLs (DER), one current CRL per issuer (two of one issuer are refused, as is one past
    /// its nextUpdate now): when given, the signer's certificate must have its status in one
    /// of them and not be revoked, and no CA certificate on its path may be revoked by one of
    /// them; none: no revocation checked.
    pub crls: Vec<Vec<u8>>,
    /// Further certificates, for a token issued without them (certReq false).
    pub untrusted: Vec<Certificate>,
    /// When the signer's certificate path must be valid.
    pub at: ValidAt,
}

/// When the signer's certificate path must be valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValidAt {
    /// Now, as `openssl ts -verify` checks: a token whose certificate has expired (or whose key
    /// may since have leaked) needs other evidence.
    #[default]
    Now,
    /// At the token's own genTime, for a token whose certificate has expired since. This takes
    /// the token's word for its time, and a CRL (if given) lists an expired certificate no
    /// more: only for keys known not to have been compromised since (for example, tokens kept
    /// in one's own archive since they came).
    GenTime,
    /// At this time.
    Time(std::time::SystemTime),
}

/// Certificates a token (and the caller) may bring for the path; more are refused, so that a
/// token cannot make path building try thousands.
const MAX_CERTIFICATES: usize = 32;

/// How far a genTime may lie ahead of the verifying machine's clock: two clocks kept by NTP
/// differ by far less; a token from further ahead was not made at its genTime.
const MAX_CLOCK_DIFFERENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// id-kp-timeStamping's DER content octets, as `webpki` takes an extended key usage.
const KP_TIME_STAMPING_DER: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08];

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
    ensure!(
        tst.accuracy.is_none_or(|a| a.is_in_range()),
        "the accuracy's millis or micros are outside 1..999"
    );
    // RFC 3161 2.4.2 takes extensions as RFC 5280 does: one marked critical that the verifier
    // does not know refuses the token (none is known here).
    if let Some(critical) = tst.extensions.iter().flatten().find(|e| e.critical) {
        bail!(
            "the token carries an extension marked critical that this verifier does not know: {}",
            critical.extn_id
        );
    }

    // The imprint.
    let imprint_oid = tst.message_imprint.hash_algorithm.oid;
    let imprint_alg = DigestAlgorithm::from_oid(&imprint_oid)
        .with_context(|| format!("unknown imprint algorithm {imprint_oid}"))?;
    ensure!(
        !imprint_alg.is_broken(),
        "the token stamps a {} imprint: that digest is broken (collisions), so the token proves \
         nothing about one document",
        imprint_alg.name()
    );
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
    let cert_req = match expect.query {
        Some(query) => answers(token, query)?,
        None => false,
    };

    // The signer.
    let signer_info = only_signer_info(token)?;
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
    // Before any is looked at: a token cannot make the search try thousands.
    ensure!(
        included.len() + expect.untrusted.len() <= MAX_CERTIFICATES,
        "more than {MAX_CERTIFICATES} certificates to find the signer's among"
    );
    let candidates: Vec<&Certificate> = included
        .iter()
        .chain(&expect.untrusted)
        .chain(&expect.trusted)
        .collect();
    let (signer_cert, signer_der) = signed_by_one(
        token,
        signer_info,
        &candidates,
        "the signer's certificate is neither in the token nor given",
    )?;
    ensure!(
        !cert_req || included.contains(signer_cert),
        "the request set certReq but the token does not carry the signer's certificate"
    );

    // The signer's certificate: the name the token gives, its profile, its path.
    if let Some(tsa) = &tst.tsa {
        check_tsa_name(tsa, signer_cert)?;
    }
    check_tsu_profile(signer_cert)?;
    let gen_time = tst.gen_time;
    let at = match expect.at {
        ValidAt::Now => std::time::SystemTime::now(),
        ValidAt::GenTime => {
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(gen_time.unix_ns())
        }
        ValidAt::Time(at) => at,
    };
    check_path(token, signer_cert, &signer_der, &included, expect, at)?;
    // Whatever the validation time, the token's own time must lie within the signer's
    // certificate (a key cannot vouch for years its certificate never covered) and not ahead
    // of this machine's clock by more than clocks differ.
    let gen_at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(gen_time.unix_ns());
    let validity = signer_cert.tbs_certificate().validity();
    // Clocks differ: a TSU certificate dated by its CA's clock may begin a little after the
    // TSA's first genTimes.
    ensure!(
        validity.not_before.to_system_time() <= gen_at + MAX_CLOCK_DIFFERENCE
            && gen_at <= validity.not_after.to_system_time(),
        "genTime {gen_time} lies outside the signer's certificate validity ({} to {})",
        validity.not_before,
        validity.not_after
    );
    ensure!(
        gen_at <= std::time::SystemTime::now() + MAX_CLOCK_DIFFERENCE,
        "genTime {gen_time} is ahead of this machine's clock by more than {} s",
        MAX_CLOCK_DIFFERENCE.as_secs()
    );

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
        signer: shown(signer_cert.tbs_certificate().subject()),
    })
}

/// A certificate's name as messages show it: with the control and reordering characters a
/// certificate may hold escaped ([`super::printable`]).
fn shown(name: &x509_cert::name::Name) -> String {
    super::printable(&name.to_string())
}

/// The token's SignerInfo: a token has exactly one.
fn only_signer_info(token: &Token) -> anyhow::Result<&SignerInfo> {
    let signer_infos = &token.signed_data.signer_infos.0;
    ensure!(
        signer_infos.len() == 1,
        "a token has exactly one SignerInfo, this one {}",
        signer_infos.len()
    );
    Ok(signer_infos.get(0).expect("one"))
}

/// Whether `token`'s CMS signature is that of one of `signers`, taken as they are (no path, no
/// validity period, no profile): for the tokens an archive holds, against the TSU certificates
/// that issued them. The signed attributes (contentType, messageDigest over TSTInfo,
/// signingCertificate) and the signature are checked as [`verify`] checks them.
pub fn verify_signed_by(token: &Token, signers: &[Certificate]) -> anyhow::Result<()> {
    signer_among(token, signers).map(|_| ())
}

/// [`verify_signed_by`], returning which of `signers` signed.
pub fn signer_among<'c>(
    token: &Token,
    signers: &'c [Certificate],
) -> anyhow::Result<&'c Certificate> {
    let signer_info = only_signer_info(token)?;
    let candidates: Vec<&Certificate> = signers.iter().collect();
    signed_by_one(
        token,
        signer_info,
        &candidates,
        "the token's signer is none of the trusted certificates",
    )
    .map(|(cert, _)| cert)
}

/// The signer's certificate among `candidates`, and its DER: of those the sid names (a token
/// may bring one that only looks like the signer's, with its issuer and serial), the first
/// whose key signed and that the signed attributes bind ([`check_signed_by`]); `none` when
/// the sid names none of them.
fn signed_by_one<'c>(
    token: &Token,
    signer_info: &SignerInfo,
    candidates: &[&'c Certificate],
    none: &'static str,
) -> anyhow::Result<(&'c Certificate, Vec<u8>)> {
    let mut refused = None;
    for cert in find_signers(&signer_info.sid, candidates) {
        // As the token carries it, where it does: ESSCertID hashes those octets.
        let der = match token.carried_der(cert) {
            Some(der) => der.to_vec(),
            None => cert.to_der()?,
        };
        match check_signed_by(token, signer_info, cert, &der) {
            Ok(()) => return Ok((cert, der)),
            Err(e) => {
                refused.get_or_insert(e);
            }
        }
    }
    Err(refused.unwrap_or_else(|| anyhow::anyhow!(none)))
}

/// The token's signed attributes (contentType, messageDigest, signingCertificate(V2)) and
/// its signature over them, by `signer_cert` (DER `signer_der`).
fn check_signed_by(
    token: &Token,
    signer_info: &SignerInfo,
    signer_cert: &Certificate,
    signer_der: &[u8],
) -> anyhow::Result<()> {
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
    ensure!(
        !digest_alg.is_broken(),
        "the signature covers a {} digest, which is broken",
        digest_alg.name()
    );
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
        signer_der,
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
    .context("the token's signature does not verify")
}

/// Whether `token` answers the DER request `query`: the same message imprint, the nonce
/// where the request had one, the requested policy (if it named one), and with certReq the
/// certificate that signed the token among its certificates (its signature and signed
/// attributes checked with it), without it none. Checks nothing about whom the signer is:
/// [`verify`] does (the signer's profile and path), and calls this when it is given the
/// query.
pub fn answers_query(token: &Token, query: &[u8]) -> anyhow::Result<()> {
    answers(token, query).map(|_| ())
}

/// [`answers_query`], and whether the query set certReq.
fn answers(token: &Token, query: &[u8]) -> anyhow::Result<bool> {
    let tst = token.tst_info();
    let req = TimeStampReq::from_der(query).context("the query is not a TimeStampReq")?;
    ensure!(
        req.message_imprint == tst.message_imprint,
        "the token's message imprint is not the request's"
    );
    // RFC 3161 2.4.2: the nonce MUST be present, and equal, where the request had one; where
    // it had none, one in the token binds nothing (OpenSSL does not look either).
    if let Some(nonce) = req.nonce {
        ensure!(
            tst.nonce.map(|n| n.as_bytes()) == Some(nonce.as_bytes()),
            "the token's nonce is not the request's"
        );
    }
    if let Some(policy) = req.req_policy {
        ensure!(
            policy == tst.policy,
            "the token's policy {} is not the requested {policy}",
            tst.policy
        );
    }
    // RFC 3161 2.4.1: with certReq the signer's certificate MUST be present ([`verify`]
    // checks it is the signer's); without it the certificates field MUST NOT be.
    let certificates = token.signed_data.certificates.as_ref();
    if req.cert_req {
        // One that signed: a token carrying only its CA's certificate would not do (a
        // reply checked against its query only, without trusted CAs, is saved on this).
        let included: Vec<&Certificate> = certificates
            .iter()
            .flat_map(|set| set.0.iter())
            .filter_map(|choice| match choice {
                CertificateChoices::Certificate(c) => Some(c),
                _ => None,
            })
            .take(MAX_CERTIFICATES + 1)
            .collect();
        ensure!(
            included.len() <= MAX_CERTIFICATES,
            "more than {MAX_CERTIFICATES} certificates to find the signer's among"
        );
        signed_by_one(
            token,
            only_signer_info(token)?,
            &included,
            "the request set certReq but the token does not carry the signer's certificate",
        )?;
    } else {
        ensure!(
            certificates.is_none(),
            "the request did not set certReq but the token has a certificates field"
        );
    }
    Ok(req.cert_req)
}

/// The candidates the sid names: by issuer and serial number, or by subject key identifier
/// (RFC 5652 5.3 allows either), in the candidates' order, each once.
fn find_signers<'c>(
    sid: &SignerIdentifier,
    candidates: &[&'c Certificate],
) -> Vec<&'c Certificate> {
    let named = |c: &Certificate| match sid {
        SignerIdentifier::IssuerAndSerialNumber(ias) => {
            c.tbs_certificate().issuer() == &ias.issuer
                && c.tbs_certificate().serial_number() == &ias.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(ski) => c
            .tbs_certificate()
            .get_extension::<x509_cert::ext::pkix::SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .is_some_and(|(_, own)| own.0 == ski.0),
    };
    let mut found: Vec<&Certificate> = Vec::new();
    for &c in candidates {
        if named(c) && !found.contains(&c) {
            found.push(c);
        }
    }
    found
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
            !alg.is_broken(),
            "ESSCertIDv2 binds the signer's certificate with {}, a broken digest",
            alg.name()
        );
        ensure!(
            alg.digest(cert_der).as_deref() == Some(first.cert_hash.as_bytes()),
            "ESSCertIDv2 does not match the signer's certificate"
        );
        ensure!(
            issuer_matches(&first.issuer_serial),
            "ESSCertIDv2 names another issuer and serial"
        );
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
    }
    ensure!(
        v2.is_some() || v1.is_some(),
        "neither signingCertificateV2 nor signingCertificate is present"
    );
    Ok(())
}

/// The TSU certificate's profile (RFC 3161 § 2.3, as `openssl ts -verify` checks it): the only
/// extended key usage id-kp-timeStamping, marked critical; a key usage, where there is one,
/// that allows digitalSignature or nonRepudiation and nothing else.
fn check_tsu_profile(cert: &Certificate) -> anyhow::Result<()> {
    let tbs = cert.tbs_certificate();
    match tbs.get_extension::<ExtendedKeyUsage>()? {
        Some((true, eku)) if eku.0 == [oid::KP_TIME_STAMPING] => {}
        Some((false, _)) => bail!("the signer's extended key usage is not critical"),
        Some(_) => bail!("the signer's extended key usage is not exactly id-kp-timeStamping"),
        None => bail!("the signer's certificate has no extended key usage"),
    }
    if let Some((_, usage)) = tbs.get_extension::<KeyUsage>()? {
        let signing = KeyUsages::DigitalSignature | KeyUsages::NonRepudiation;
        ensure!(
            !(usage.0 & signing).is_empty(),
            "the signer's key usage allows neither digitalSignature nor nonRepudiation"
        );
        ensure!(
            (usage.0 & !signing).is_empty(),
            "the signer's key usage allows more than digitalSignature and nonRepudiation"
        );
    }
    Ok(())
}

/// The `tsa` field of TSTInfo names the signer: its subject, or one of its subject
/// alternative names (as `openssl ts -verify` requires).
fn check_tsa_name(tsa: &der::asn1::AnyRef<'_>, cert: &Certificate) -> anyhow::Result<()> {
    let name =
        GeneralName::from_der(&tsa.to_der()?).context("the tsa field is not a GeneralName")?;
    let tbs = cert.tbs_certificate();
    if matches!(&name, GeneralName::DirectoryName(n) if n == tbs.subject()) {
        return Ok(());
    }
    let alternatives = tbs.get_extension::<SubjectAltName>()?;
    ensure!(
        alternatives.is_some_and(|(_, san)| san.0.contains(&name)),
        "the token's tsa field names someone other than its signer {}",
        shown(tbs.subject())
    );
    Ok(())
}

/// The signer's certificate path to a trusted CA, valid at `at`: built and checked by `webpki`
/// from the token's certificates and the caller's, with id-kp-timeStamping required of every
/// certificate on it that restricts its extended key usage. A trusted certificate that is the
/// signer's own (a pinned TSU certificate) needs no path, only to be valid at `at`.
fn check_path(
    token: &Token,
    leaf: &Certificate,
    leaf_der: &[u8],
    included: &[Certificate],
    expect: &Expectation<'_>,
    at: std::time::SystemTime,
) -> anyhow::Result<()> {
    ensure!(!expect.trusted.is_empty(), "no trusted CA given");
    let seconds = at
        .duration_since(std::time::UNIX_EPOCH)
        .context("a validation time before 1970")?;
    if expect.trusted.iter().any(|t| t == leaf) {
        ensure!(
            expect.crls.is_empty(),
            "CRLs are checked along a path from a trusted CA: give the TSU certificate's CA as \
             trusted, not the TSU certificate itself"
        );
        ensure!(
            valid_at(leaf, at),
            "the signer's certificate {} is not valid at the validation time",
            shown(leaf.tbs_certificate().subject())
        );
        return Ok(());
    }
    let others: Vec<&Certificate> = included
        .iter()
        .chain(&expect.untrusted)
        .filter(|c| *c != leaf)
        .collect();
    ensure!(
        others.len() <= MAX_CERTIFICATES,
        "more than {MAX_CERTIFICATES} certificates to build the signer's path from"
    );
    for cert in std::iter::once(leaf).chain(others.iter().copied()) {
        ensure!(
            cert.signature_algorithm() == cert.tbs_certificate().signature(),
            "the certificate {} names two different signature algorithms",
            shown(cert.tbs_certificate().subject())
        );
    }
    // A certificate the token carries, as it carries it (the signatures on the path are over
    // those octets); the caller's, as decoded.
    let der = |c: &Certificate| match token.carried_der(c) {
        Some(der) => Ok(CertificateDer::from(der.to_vec())),
        None => c.to_der().map(CertificateDer::from),
    };
    let trusted = expect
        .trusted
        .iter()
        .map(der)
        .collect::<Result<Vec<_>, _>>()?;
    // A bundle of trusted roots (a system's CA file) may hold some that `webpki` cannot take
    // as anchors; the others still serve. `anchored[i]` is the trusted certificate of anchor i.
    let (anchors, anchored): (Vec<_>, Vec<&Certificate>) = trusted
        .iter()
        .zip(&expect.trusted)
        .filter_map(|(der, cert)| {
            let anchor = webpki::anchor_from_trusted_cert(der).ok()?;
            Some((anchor.to_owned(), cert))
        })
        .unzip();
    ensure!(
        !anchors.is_empty(),
        "none of the trusted CA certificates can be used as a trust anchor"
    );
    let intermediates = others
        .iter()
        .map(|c| der(c))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf_der = CertificateDer::from(leaf_der);
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| anyhow::anyhow!("the signer's certificate cannot be used: {e}"))?;
    let crls = expect
        .crls
        .iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der)
                .map(webpki::CertRevocationList::Owned)
                .map_err(|e| anyhow::anyhow!("a CRL given cannot be read: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_crls_given(&expect.crls, &crls)?;
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    // The signer's certificate, as `openssl ts -verify -crl_check` checks it: its status must
    // be in a CRL given (a CRL of another issuer says nothing), and not revoked; and every CA
    // certificate on its path that a CRL given covers must not be revoked either (one the
    // CRLs say nothing of passes, as without CRLs).
    let revocation = |depth, status| {
        webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|options| {
                options
                    .with_depth(depth)
                    .with_status_policy(status)
                    // A CRL past its nextUpdate says nothing of revocations since.
                    .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                    .build()
            })
    };
    let verify_path = |revocation| {
        end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::since_unix_epoch(seconds),
            webpki::KeyUsage::required_if_present(KP_TIME_STAMPING_DER),
            revocation,
            None,
        )
    };
    let path = verify_path(revocation(
        webpki::RevocationCheckDepth::EndEntity,
        webpki::UnknownStatusPolicy::Deny,
    ))
    .map_err(|e| {
        let hint = match e {
            webpki::Error::UnsupportedCriticalExtension => {
                " (a certificate on the path marks critical an extension this verifier does \
                     not process, such as policy constraints: check it with openssl ts -verify)"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "the signer's certificate {} has no valid path to a trusted CA: {e}{hint}",
            shown(leaf.tbs_certificate().subject())
        )
    })?;
    if let Some(whole) = revocation(
        webpki::RevocationCheckDepth::Chain,
        webpki::UnknownStatusPolicy::Allow,
    ) {
        verify_path(Some(whole)).map_err(|e| {
            anyhow::anyhow!(
                "the signer's certificate {} has no path to a trusted CA that the CRLs given \
                 leave standing: {e}",
                shown(leaf.tbs_certificate().subject())
            )
        })?;
    }

    // `webpki` takes a trust anchor as a name and a key; a trusted CA certificate's own path
    // length constraint binds the path too (as OpenSSL holds it).
    let anchor = path.anchor();
    // `webpki` checks nothing of an anchor but its name and key, and nothing of a CA's key
    // usage: as RFC 5280 6.1.4 (k) and (n) and OpenSSL hold them, the trusted certificate
    // that signed the path must be valid at the validation time, and it and every CA below it
    // must be a CA whose key usage, where it has one, allows signing certificates (a pinned
    // TSU certificate's key signs no certificate that this verifier accepts). Any trusted
    // certificate of that name and key that is so will do (a renewed root beside the old one).
    let named: Vec<&Certificate> = anchors
        .iter()
        .zip(&anchored)
        .filter(|(a, _)| {
            a.subject == anchor.subject
                && a.subject_public_key_info == anchor.subject_public_key_info
        })
        .map(|(_, cert)| *cert)
        .collect();
    ensure!(!named.is_empty(), "the path ends at no trusted certificate");
    let usable = |root: &Certificate| -> anyhow::Result<()> {
        ensure!(
            valid_at(root, at),
            "the trusted CA certificate {} is not valid at the validation time",
            shown(root.tbs_certificate().subject())
        );
        check_issuing_ca(root)
    };
    let mut refused = None;
    let mut root = None;
    for cert in &named {
        match usable(cert) {
            Ok(()) => {
                root = Some(*cert);
                break;
            }
            Err(e) => {
                refused.get_or_insert(e);
            }
        }
    }
    let Some(root) = root else {
        return Err(refused.expect("a trusted certificate was tried"));
    };
    let intermediates = path
        .intermediate_certificates()
        .map(|c| Certificate::from_der(c.der().as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    for issuer in &intermediates {
        check_issuing_ca(issuer)?;
    }
    let below = intermediates.len();
    if let Some((_, constraints)) = root.tbs_certificate().get_extension::<BasicConstraints>()? {
        if let Some(max) = constraints.path_len_constraint {
            ensure!(
                below <= usize::from(max),
                "the signer's path has {below} CA certificates below {}, which allows {max}",
                shown(root.tbs_certificate().subject())
            );
        }
    }
    Ok(())
}

/// The CRLs given (`der`, read by `webpki` as `read`) as the path check needs them: one per
/// issuer and distribution point (`webpki` reads the first of an issuer's only: a later one
/// that revokes the signer would go unread), and each current now, whatever the validation
/// time (a CRL past its nextUpdate says nothing of revocations since, and a validation at
/// genTime would otherwise take one that expired before the key was revoked).
fn check_crls_given(
    der: &[Vec<u8>],
    read: &[webpki::CertRevocationList<'_>],
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now();
    let mut seen = std::collections::HashSet::new();
    for (der, crl) in der.iter().zip(read) {
        ensure!(
            seen.insert((
                crl.issuer().to_vec(),
                crl.issuing_distribution_point().map(<[u8]>::to_vec)
            )),
            "two CRLs of one issuer are given: give its current one alone"
        );
        let next_update_s = crate::pem::crl_next_update_s(der)
            .context("a CRL given")?
            .context("a CRL given has no nextUpdate: when it stops vouching is not known")?;
        let next_update = std::time::UNIX_EPOCH + std::time::Duration::from_secs(next_update_s);
        ensure!(
            next_update > now,
            "a CRL given is past its nextUpdate ({}): it says nothing of revocations since",
            chrono::DateTime::<chrono::Utc>::from(next_update).to_rfc3339()
        );
    }
    Ok(())
}

/// Whether `at` lies within `cert`'s validity.
fn valid_at(cert: &Certificate, at: std::time::SystemTime) -> bool {
    let validity = cert.tbs_certificate().validity();
    validity.not_before.to_system_time() <= at && at <= validity.not_after.to_system_time()
}

/// A certificate that signed another on the signer's path: a CA (basicConstraints cA) whose
/// key usage, if it has one, includes keyCertSign.
pub(crate) fn check_issuing_ca(cert: &Certificate) -> anyhow::Result<()> {
    let tbs = cert.tbs_certificate();
    // A version 1 root (no extensions at all) is taken as a CA where it is trusted, as
    // OpenSSL takes it.
    let v1_root = tbs.version() == x509_cert::Version::V1 && tbs.issuer() == tbs.subject();
    let ca = v1_root
        || tbs
            .get_extension::<BasicConstraints>()?
            .is_some_and(|(_, bc)| bc.ca);
    ensure!(
        ca,
        "{} signs a certificate on the signer's path but is not a CA certificate",
        shown(tbs.subject())
    );
    if let Some((_, usage)) = tbs.get_extension::<KeyUsage>()? {
        ensure!(
            usage.0.contains(KeyUsages::KeyCertSign),
            "{} signs a certificate on the signer's path but its key usage does not allow it",
            shown(tbs.subject())
        );
    }
    Ok(())
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
        .map_err(|_| BadSignature.into())
}

/// A signature checked and found not to verify ([`verify_signature`]'s other errors are of
/// algorithms it does not check).
#[derive(Debug, thiserror::Error)]
#[error("bad signature")]
pub struct BadSignature;

/// RSASSA-PSS-params (RFC 4055 section 3.1); an absent field takes its DEFAULT (SHA-1, MGF1
/// with SHA-1, 20 octets of salt, trailer 1).
#[derive(der::Sequence)]
struct PssParams {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    hash: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    mask_gen: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    salt_len: Option<u32>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    trailer: Option<u32>,
}

/// The verifier for RSASSA-PSS with these parameters: SHA-256, SHA-384 or SHA-512, MGF1 with
/// the same hash, a salt as long as the hash and the trailer 1 (what aws-lc-rs verifies, and
/// what this TSA and others issue). A hash identifier's parameters may be absent or NULL:
/// RFC 4055 section 2.1 has verifiers accept both.
fn pss_verifier(
    alg: &AlgorithmIdentifierOwned,
) -> anyhow::Result<&'static dyn VerificationAlgorithm> {
    let unsupported = || anyhow::anyhow!("unsupported RSASSA-PSS parameters");
    let params = alg.parameters.as_ref().ok_or_else(unsupported)?;
    let params: PssParams = params.decode_as().map_err(|_| unsupported())?;
    let hash_of = |id: &AlgorithmIdentifierOwned| {
        let plain = id.parameters.as_ref().is_none_or(|p| p.is_null());
        DigestAlgorithm::from_oid(&id.oid).filter(|_| plain)
    };
    let hash = params
        .hash
        .as_ref()
        .and_then(hash_of)
        .ok_or_else(unsupported)?;
    let mgf_hash = params
        .mask_gen
        .as_ref()
        .filter(|m| m.oid == oid::MGF1)
        .and_then(|m| m.parameters.as_ref())
        .and_then(|p| p.decode_as::<AlgorithmIdentifierOwned>().ok())
        .and_then(|id| hash_of(&id));
    ensure!(
        mgf_hash == Some(hash)
            && params.salt_len == Some(hash.output_len() as u32)
            && params.trailer.unwrap_or(1) == 1,
        unsupported()
    );
    Ok(match hash {
        DigestAlgorithm::Sha256 => &signature::RSA_PSS_2048_8192_SHA256,
        DigestAlgorithm::Sha384 => &signature::RSA_PSS_2048_8192_SHA384,
        DigestAlgorithm::Sha512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return Err(unsupported()),
    })
}

/// Reads the signer's algorithm info for display.
pub fn signer_info(token: &Token) -> Option<&SignerInfo> {
    token.signed_data.signer_infos.0.get(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevPki, DevTls, KeyAlgorithm};
    use crate::protocol::asn1::{EssCertId, EssCertIdV2};
    use der::asn1::{Ia5String, OctetStringRef};
    use der::DecodePem;

    /// The key usage as `openssl ts -verify` takes it: digitalSignature or nonRepudiation,
    /// and nothing else.
    #[test]
    fn a_signer_whose_key_usage_holds_more_than_signing_is_refused() {
        use rcgen::KeyUsagePurpose::*;
        let profile = |usages: Vec<rcgen::KeyUsagePurpose>| {
            let der = crate::pki::tsu_certificate_with_key_usages(usages);
            check_tsu_profile(&Certificate::from_der(&der).unwrap()).map_err(|e| e.to_string())
        };
        assert_eq!(profile(vec![DigitalSignature]), Ok(()));
        assert_eq!(profile(vec![ContentCommitment]), Ok(()));
        let refused = profile(vec![DigitalSignature, KeyEncipherment]).unwrap_err();
        assert!(refused.contains("more than"), "{refused}");
        let refused = profile(vec![KeyEncipherment]).unwrap_err();
        assert!(refused.contains("neither"), "{refused}");
    }

    #[test]
    fn pss_parameters_are_read_not_compared_octet_for_octet() {
        use crate::alg::SignatureAlgorithm as S;
        for alg in [S::RsaPssSha256, S::RsaPssSha384, S::RsaPssSha512] {
            assert!(pss_verifier(&alg.algorithm_identifier()).is_ok(), "{alg:?}");
        }
        let id = |oid, parameters: Option<der::Any>| AlgorithmIdentifierOwned { oid, parameters };
        let null = || Some(der::Any::from(der::asn1::Null));
        let pss = |hash_params: Option<der::Any>, mgf_hash, salt_len, trailer| {
            let params = PssParams {
                hash: Some(id(oid::SHA256, hash_params)),
                mask_gen: Some(id(
                    oid::MGF1,
                    Some(der::Any::encode_from(&id(mgf_hash, null())).unwrap()),
                )),
                salt_len: Some(salt_len),
                trailer,
            };
            id(
                oid::RSASSA_PSS,
                Some(der::Any::encode_from(&params).unwrap()),
            )
        };
        // The SHA-256 identifier with its parameters absent or NULL, the trailer written out.
        assert!(pss_verifier(&pss(None, oid::SHA256, 32, None)).is_ok());
        assert!(pss_verifier(&pss(null(), oid::SHA256, 32, Some(1))).is_ok());
        for (why, alg) in [
            ("salt", pss(None, oid::SHA256, 20, None)),
            ("MGF1 hash", pss(None, oid::SHA384, 32, None)),
            ("trailer", pss(None, oid::SHA256, 32, Some(2))),
            (
                "hash parameters",
                pss(
                    Some(der::Any::encode_from(&1u8).unwrap()),
                    oid::SHA256,
                    32,
                    None,
                ),
            ),
            ("no parameters", id(oid::RSASSA_PSS, None)),
            (
                "the DEFAULT SHA-1",
                id(
                    oid::RSASSA_PSS,
                    Some(
                        der::Any::encode_from(&PssParams {
                            hash: None,
                            mask_gen: None,
                            salt_len: None,
                            trailer: None,
                        })
                        .unwrap(),
                    ),
                ),
            ),
        ] {
            assert!(pss_verifier(&alg).is_err(), "{why}");
        }
    }

    #[test]
    fn names_are_shown_with_reordering_and_control_characters_escaped() {
        use std::str::FromStr;
        let name = x509_cert::name::Name::from_str("CN=Good TSA\u{202e}ASI fo\u{9b}").unwrap();
        let text = shown(&name);
        assert!(
            !text.contains('\u{202e}') && !text.contains('\u{9b}'),
            "{text}"
        );
        assert!(text.contains("Good TSA\\u{202e}"), "{text}");
    }

    fn tsu() -> Certificate {
        let pki = DevPki::generate(KeyAlgorithm::P256).unwrap();
        Certificate::from_pem(pki.tsu_cert_pem.as_bytes()).unwrap()
    }

    fn any(name: &GeneralName) -> Vec<u8> {
        name.to_der().unwrap()
    }

    #[test]
    fn the_tsa_name_is_the_signers_subject_or_one_of_its_alternative_names() {
        let cert = tsu();
        let check = |name: &GeneralName, cert: &Certificate| {
            let der = any(name);
            check_tsa_name(&der::asn1::AnyRef::from_der(&der).unwrap(), cert)
        };
        let subject = cert.tbs_certificate().subject().clone();
        check(&GeneralName::DirectoryName(subject), &cert).unwrap();
        let issuer = cert.tbs_certificate().issuer().clone();
        assert!(check(&GeneralName::DirectoryName(issuer), &cert).is_err());

        let pki = DevPki::generate(KeyAlgorithm::P256).unwrap();
        let tls = DevTls::generate(&pki.ca_key_pem, "client").unwrap();
        let server = Certificate::from_pem(tls.server_cert_pem.as_bytes()).unwrap();
        let localhost = GeneralName::DnsName(Ia5String::new("localhost").unwrap());
        check(&localhost, &server).unwrap();
        let other = GeneralName::DnsName(Ia5String::new("tsa.example").unwrap());
        assert!(check(&other, &server).is_err());
    }

    #[test]
    fn a_signing_certificate_attribute_with_policies_is_read() {
        let cert = tsu();
        let der = cert.to_der().unwrap();
        let sha256 = DigestAlgorithm::Sha256.digest(&der).unwrap();
        // policies: SEQUENCE OF PolicyInformation, here one with anyPolicy.
        let policies = [0x30, 0x08, 0x30, 0x06, 0x06, 0x04, 0x55, 0x1d, 0x20, 0x00];
        let v2 = SigningCertificateV2 {
            certs: vec![EssCertIdV2 {
                hash_algorithm: None,
                cert_hash: OctetStringRef::new(&sha256).unwrap(),
                issuer_serial: None,
            }],
            policies: Some(der::AnyRef::from_der(&policies).unwrap()),
        }
        .to_der()
        .ok();
        check_ess(&v2, &None, &cert, &der).unwrap();
    }

    #[test]
    fn both_ess_identifiers_must_name_the_signer_when_both_are_present() {
        let cert = tsu();
        let der = cert.to_der().unwrap();
        let sha256 = DigestAlgorithm::Sha256.digest(&der).unwrap();
        let sha1 = DigestAlgorithm::Sha1.digest(&der).unwrap();
        let wrong = [0u8; 20];
        let v2 = SigningCertificateV2 {
            certs: vec![EssCertIdV2 {
                hash_algorithm: None,
                cert_hash: OctetStringRef::new(&sha256).unwrap(),
                issuer_serial: None,
            }],
            policies: None,
        }
        .to_der()
        .ok();
        let v1 = |hash: &[u8]| {
            SigningCertificate {
                certs: vec![EssCertId {
                    cert_hash: OctetStringRef::new(hash).unwrap(),
                    issuer_serial: None,
                }],
                policies: None,
            }
            .to_der()
            .ok()
        };
        check_ess(&v2, &None, &cert, &der).unwrap();
        check_ess(&None, &v1(&sha1), &cert, &der).unwrap();
        check_ess(&v2, &v1(&sha1), &cert, &der).unwrap();
        assert!(check_ess(&v2, &v1(&wrong), &cert, &der).is_err());
        assert!(check_ess(&None, &None, &cert, &der).is_err());
    }
}
