//! The token verifier against certificate paths that a forger or a careless CA makes: tokens
//! issued by the crate's own template under rcgen-made PKIs, each judged by the verifier and by
//! `openssl ts -verify`, which must agree.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::Datelike;
use der::{Decode, Encode, Tagged};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tsa::alg::{oid, DigestAlgorithm};
use tsa::client::read::Response;
use tsa::client::verify::{verify, Expectation, ValidAt};
use tsa::client::Query;
use tsa::protocol::{parse_request, RequestRules, Serial, Stamp, TemplateOptions, TokenTemplate};
use tsa::signer::software::{RsaPadding, SoftwareSigner};
use tsa::signer::Signer;
use x509_cert::Certificate;

const YEAR: Duration = Duration::from_secs(365 * 86_400);
const DATA: &[u8] = b"an e-invoice";

/// (year, month, day) of `t`, as `rcgen::date_time_ymd` takes them.
fn ymd(t: SystemTime) -> (i32, u8, u8) {
    let d = chrono::DateTime::<chrono::Utc>::from(t);
    (d.year(), d.month() as u8, d.day() as u8)
}

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// Certificate parameters named `cn`, valid over `from..to`.
fn params(cn: &str, from: SystemTime, to: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let ((y0, m0, d0), (y1, m1, d1)) = (ymd(from), ymd(to));
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    p
}

/// A CA, its path length constrained to `path_len` when given.
fn ca(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = params(cn, now - 5 * YEAR, now + 5 * YEAR);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// The TSU profile (`tsa init`'s: end entity, digitalSignature, id-kp-timeStamping alone and
/// critical), valid over `from..to`.
fn tsu(from: SystemTime, to: SystemTime) -> CertificateParams {
    let mut p = tsa::pki::tsu_certificate_params().unwrap();
    let dates = params("", from, to);
    (p.not_before, p.not_after) = (dates.not_before, dates.not_after);
    p
}

fn current_tsu() -> CertificateParams {
    let now = SystemTime::now();
    tsu(now - YEAR, now + YEAR)
}

fn cert(c: &rcgen::Certificate) -> Certificate {
    Certificate::from_der(c.der()).unwrap()
}

/// A root, the certificates between it and the TSU (issuer first), the TSU's certificate and
/// key.
struct Pki {
    root: Certificate,
    /// What signs for the root (its CRLs).
    root_issuer: Issuer<'static, KeyPair>,
    between: Vec<Certificate>,
    /// What signs for each of `between` (their CRLs).
    between_issuers: Vec<Issuer<'static, KeyPair>>,
    tsu: Certificate,
    tsu_key: KeyPair,
}

/// `root` signs `path[0]`, which signs `path[1]`, …; the last one signs `tsu`.
fn pki(root: CertificateParams, path: Vec<CertificateParams>, tsu: CertificateParams) -> Pki {
    let root_key = key();
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(
        root.clone(),
        KeyPair::from_pem(&root_key.serialize_pem()).unwrap(),
    );
    let mut issuer = Issuer::new(root, root_key);
    let mut between = Vec::new();
    let mut between_issuers = Vec::new();
    for params in path {
        let k = key();
        between.push(cert(&params.signed_by(&k, &issuer).unwrap()));
        between_issuers.push(Issuer::new(
            params.clone(),
            KeyPair::from_pem(&k.serialize_pem()).unwrap(),
        ));
        issuer = Issuer::new(params, k);
    }
    let tsu_key = key();
    let tsu = cert(&tsu.signed_by(&tsu_key, &issuer).unwrap());
    Pki {
        root: cert(&root_cert),
        root_issuer,
        between,
        between_issuers,
        tsu,
        tsu_key,
    }
}

fn rules(digest: DigestAlgorithm) -> RequestRules {
    RequestRules {
        accepted_digests: vec![digest],
        default_policy: oid::ETSI_BASELINE_POLICY,
        other_policies: vec![],
        max_len: 8 * 1024,
    }
}

/// A token stamping [`DATA`] with `digest` at `at`, signed by the PKI's TSU with its path (and
/// the TSU's name in TSTInfo): (the reply, its query).
fn stamp(pki: &Pki, digest: DigestAlgorithm, at: SystemTime) -> (Vec<u8>, Vec<u8>) {
    stamp_as(pki, &pki.tsu.to_der().unwrap(), digest, at)
}

/// [`stamp`], the TSU's certificate carried as `tsu_der`.
fn stamp_as(
    pki: &Pki,
    tsu_der: &[u8],
    digest: DigestAlgorithm,
    at: SystemTime,
) -> (Vec<u8>, Vec<u8>) {
    let signer =
        SoftwareSigner::from_pkcs8(&pki.tsu_key.serialize_der(), RsaPadding::Pkcs1).unwrap();
    let chain: Vec<Vec<u8>> = pki.between.iter().map(|c| c.to_der().unwrap()).collect();
    let template = TokenTemplate::new(
        tsu_der,
        &chain,
        signer.algorithm(),
        TemplateOptions {
            include_tsa_name: true,
            ..Default::default()
        },
    )
    .unwrap();
    let query = Query::for_data(digest, DATA).unwrap().to_der().unwrap();
    let request = parse_request(&query, &rules(digest)).unwrap();
    let unix_ns = at.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let serial = Serial::from_unsigned(&[0x12, 0x34]).unwrap();
    let stamp = Stamp::new(unix_ns, 1_000_000, template.precision(), serial);
    let tbs = template.to_be_signed(&request, &stamp).unwrap();
    let signature = signer.sign(tbs.message()).unwrap();
    (template.assemble(&tbs, &signature), query)
}

/// The verifier's judgement of `reply` with the PKI's root trusted.
fn ours(pki: &Pki, reply: &[u8], query: &[u8], at: ValidAt) -> Result<(), String> {
    let response = Response::from_der(reply).unwrap();
    verify(
        response.token.as_ref().unwrap(),
        &Expectation {
            data: Some(DATA),
            query: Some(query),
            trusted: vec![pki.root.clone()],
            at,
            ..Default::default()
        },
    )
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
}

/// `openssl ts -verify`'s judgement, at `at` (now when `None`).
fn openssl(pki: &Pki, reply: &[u8], query: &[u8], at: Option<SystemTime>, dir: &Path) -> bool {
    std::fs::write(dir.join("r.tsr"), reply).unwrap();
    std::fs::write(dir.join("q.tsq"), query).unwrap();
    let pem = der::EncodePem::to_pem(&pki.root, der::pem::LineEnding::LF).unwrap();
    std::fs::write(dir.join("root.pem"), pem).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["ts", "-verify", "-in", "r.tsr", "-queryfile", "q.tsq"])
        .args(["-CAfile", "root.pem"])
        .current_dir(dir);
    if let Some(at) = at {
        let seconds = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        cmd.args(["-attime", &seconds.to_string()]);
    }
    cmd.output().unwrap().status.success()
}

/// Both verifiers accept (`true`) or both refuse the token, judged now.
fn both(pki: &Pki, accept: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let (reply, query) = stamp(pki, DigestAlgorithm::Sha256, SystemTime::now());
    assert_eq!(
        openssl(pki, &reply, &query, None, dir.path()),
        accept,
        "openssl ts -verify"
    );
    let judged = ours(pki, &reply, &query, ValidAt::Now);
    assert_eq!(judged.is_ok(), accept, "the verifier: {judged:?}");
    judged
}

#[test]
fn a_tsu_under_the_root_or_an_intermediate_ca_verifies() {
    both(&pki(ca("Root", Some(0)), vec![], current_tsu()), true).unwrap();
    both(
        &pki(
            ca("Root", None),
            vec![ca("Issuing CA", Some(0))],
            current_tsu(),
        ),
        true,
    )
    .unwrap();
}

/// The certificates of a reply's token as they lie in its `certificates` field (a decoder
/// into a `SetOfVec` would sort them).
fn certificates_in_order(reply: &[u8]) -> Vec<Vec<u8>> {
    use der::asn1::AnyRef;
    fn fields(der: &[u8]) -> Vec<AnyRef<'_>> {
        Vec::<AnyRef<'_>>::from_der(der).unwrap()
    }
    let token = fields(reply)[1].to_der().unwrap();
    let content_info = fields(&token);
    let signed_data = fields(content_info[1].value());
    let set = signed_data
        .iter()
        .find(|f| {
            f.tag()
                == der::Tag::ContextSpecific {
                    constructed: true,
                    number: der::TagNumber(0),
                }
        })
        .expect("a certificates field");
    let mut reader = der::SliceReader::new(set.value()).unwrap();
    let mut out = Vec::new();
    while !der::Reader::is_finished(&reader) {
        out.push(AnyRef::decode(&mut reader).unwrap().to_der().unwrap());
    }
    out
}

#[test]
fn the_certificates_are_in_der_order_whatever_the_chain_order() {
    // Two CAs between root and TSU; the TSU's certificate (a long subject, a TSU's extensions)
    // is longer than theirs, so DER's order (X.690 § 11.6) puts the CAs first.
    let pki = pki(
        ca("Root", None),
        vec![ca("Policy CA", Some(1)), ca("Issuing CA", Some(0))],
        current_tsu(),
    );
    let (reply, _) = stamp(&pki, DigestAlgorithm::Sha256, SystemTime::now());
    let tsu = pki.tsu.to_der().unwrap();
    let chain: Vec<Vec<u8>> = pki.between.iter().map(|c| c.to_der().unwrap()).collect();
    assert!(
        chain.iter().all(|c| c.as_slice() < tsu.as_slice()),
        "the test needs CAs that sort first"
    );
    let mut expected = chain.clone();
    expected.push(tsu);
    expected.sort();
    assert_eq!(certificates_in_order(&reply), expected);
    both(&pki, true).unwrap();
}

#[test]
fn an_end_entity_certificate_cannot_issue_a_tsu_certificate() {
    // A TLS server certificate under the trusted root, whose key signs a TSU certificate of
    // its own making.
    let now = SystemTime::now();
    let mut server = params("localhost", now - YEAR, now + YEAR);
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let forged = pki(ca("Root", Some(0)), vec![server], current_tsu());
    let error = both(&forged, false).unwrap_err();
    assert!(error.contains("no valid path"), "{error}");
}

#[test]
fn a_trusted_certificate_signs_the_path_only_as_a_ca_valid_then() {
    let now = SystemTime::now();
    // A pinned TSU certificate (an end entity) whose key signs a TSU certificate of its own
    // making: as a trust anchor it is a name and a key, and it is no CA.
    let pinned = pki(current_tsu(), vec![], current_tsu());
    let error = both(&pinned, false).unwrap_err();
    assert!(error.contains("not a CA"), "{error}");
    // A root CA that has expired.
    let mut expired = ca("Root", None);
    let dates = params("", now - 5 * YEAR, now - YEAR);
    (expired.not_before, expired.not_after) = (dates.not_before, dates.not_after);
    let error = both(&pki(expired, vec![], current_tsu()), false).unwrap_err();
    assert!(error.contains("not valid"), "{error}");
}

#[test]
fn a_ca_whose_key_usage_does_not_allow_signing_certificates_issues_no_tsu() {
    let mut crl_signer = ca("CRL signer", Some(0));
    crl_signer.key_usages = vec![KeyUsagePurpose::CrlSign];
    let error = both(
        &pki(ca("Root", None), vec![crl_signer], current_tsu()),
        false,
    )
    .unwrap_err();
    assert!(error.contains("key usage"), "{error}");
}

#[test]
fn a_gen_time_outside_the_certificate_or_ahead_of_the_clock_is_refused() {
    let now = SystemTime::now();
    let p = pki(ca("Root", Some(0)), vec![], current_tsu());
    let dir = tempfile::tempdir().unwrap();
    // Before the certificate existed (it is valid from a year ago), and a day ahead: the
    // certificate is valid now, as openssl checks it, but not for those times.
    for gen_time in [now - 3 * YEAR, now + Duration::from_secs(86_400)] {
        let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, gen_time);
        assert!(openssl(&p, &reply, &query, None, dir.path()));
        let error = ours(&p, &reply, &query, ValidAt::Now).unwrap_err();
        assert!(
            error.contains("outside the signer's certificate") || error.contains("ahead"),
            "{error}"
        );
    }
    let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, now);
    ours(&p, &reply, &query, ValidAt::Now).unwrap();
}

/// `reply` with its token's SignedData changed by `change` (in its unsigned parts, or the
/// signature no longer verifies).
fn with_signed_data(
    reply: &[u8],
    change: impl FnOnce(&mut cms::signed_data::SignedData),
) -> Vec<u8> {
    let fields = Vec::<der::asn1::AnyRef<'_>>::from_der(reply).unwrap();
    let mut content_info =
        cms::content_info::ContentInfo::from_der(&fields[1].to_der().unwrap()).unwrap();
    let mut signed_data: cms::signed_data::SignedData = content_info.content.decode_as().unwrap();
    change(&mut signed_data);
    content_info.content = der::Any::encode_from(&signed_data).unwrap();
    let mut body = fields[0].to_der().unwrap();
    body.extend(content_info.to_der().unwrap());
    der::asn1::AnyRef::new(der::Tag::Sequence, &body)
        .unwrap()
        .to_der()
        .unwrap()
}

#[test]
fn a_signer_named_by_its_key_identifier_or_behind_a_look_alike_is_found() {
    let p = pki(ca("Root", Some(0)), vec![], current_tsu());
    let (reply, _) = stamp(&p, DigestAlgorithm::Sha256, SystemTime::now());
    let expect = |untrusted: Vec<Certificate>| Expectation {
        data: Some(DATA),
        trusted: vec![p.root.clone()],
        untrusted,
        ..Default::default()
    };
    // RFC 5652 5.3: the sid may be the subject key identifier (outside the signed attributes).
    let ski = p
        .tsu
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::SubjectKeyIdentifier>()
        .unwrap()
        .expect("the TSU certificate has a subject key identifier")
        .1;
    let by_ski = with_signed_data(&reply, |sd| {
        let mut infos = sd.signer_infos.0.clone().into_vec();
        infos[0].sid = cms::signed_data::SignerIdentifier::SubjectKeyIdentifier(ski.clone());
        sd.signer_infos = cms::signed_data::SignerInfos(infos.try_into().unwrap());
    });
    let response = Response::from_der(&by_ski).unwrap();
    verify(response.token.as_ref().unwrap(), &expect(vec![])).unwrap();
    // A certificate with the TSU's issuer and serial but another key, in the token in place
    // of the TSU's; the real one given apart is still found.
    let mut look_alike = current_tsu();
    look_alike.serial_number = Some(rcgen::SerialNumber::from_slice(
        p.tsu.tbs_certificate().serial_number().as_bytes(),
    ));
    let look_alike = cert(&look_alike.signed_by(&key(), &p.root_issuer).unwrap());
    assert_eq!(
        look_alike.tbs_certificate().issuer(),
        p.tsu.tbs_certificate().issuer()
    );
    let swapped = with_signed_data(&reply, |sd| {
        sd.certificates = Some(cms::signed_data::CertificateSet(
            vec![cms::cert::CertificateChoices::Certificate(
                look_alike.clone(),
            )]
            .try_into()
            .unwrap(),
        ));
    });
    let response = Response::from_der(&swapped).unwrap();
    let token = response.token.as_ref().unwrap();
    verify(token, &expect(vec![])).unwrap_err();
    verify(token, &expect(vec![p.tsu.clone()])).unwrap();
}

#[test]
fn with_cert_req_the_signers_certificate_must_be_in_the_token() {
    let p = pki(
        ca("Root", None),
        vec![ca("Issuing CA", Some(0))],
        current_tsu(),
    );
    let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, SystemTime::now());
    // The certificates lie outside the signature: the token stays valid without the TSU's,
    // which the verifier is then given apart.
    let tsu_der = p.tsu.to_der().unwrap();
    let without_tsu = with_signed_data(&reply, |signed_data| {
        let kept: Vec<cms::cert::CertificateChoices> = signed_data
        .certificates
        .take()
        .unwrap()
        .0
        .into_vec()
        .into_iter()
        .filter(|c| !matches!(c, cms::cert::CertificateChoices::Certificate(c) if c.to_der().unwrap() == tsu_der))
        .collect();
        assert_eq!(kept.len(), 1, "the issuing CA's certificate is left");
        signed_data.certificates = Some(cms::signed_data::CertificateSet(kept.try_into().unwrap()));
    });

    let response = Response::from_der(&without_tsu).unwrap();
    fn expectation<'a>(p: &Pki, query: Option<&'a [u8]>) -> Expectation<'a> {
        Expectation {
            data: Some(DATA),
            query,
            trusted: vec![p.root.clone()],
            untrusted: vec![p.tsu.clone()],
            ..Default::default()
        }
    }
    let token = response.token.as_ref().unwrap();
    // Given apart, the certificate verifies the token…
    verify(token, &expectation(&p, None)).unwrap();
    // …but not as the answer to a request that asked for it in the token.
    let error = verify(token, &expectation(&p, Some(&query))).unwrap_err();
    assert!(format!("{error:#}").contains("certReq"), "{error:#}");
    // Nor when only checked against the request (no trusted CAs): a certificate is there,
    // the issuing CA's, but not the signer's.
    let error = tsa::client::verify::answers_query(token, &query).unwrap_err();
    assert!(
        format!("{error:#}").contains("does not carry the signer's certificate"),
        "{error:#}"
    );
    let response = Response::from_der(&reply).unwrap();
    tsa::client::verify::answers_query(response.token.as_ref().unwrap(), &query).unwrap();
}

/// RFC 3161 2.4.2: a nonce in the token is checked where the request had one; where it had
/// none, a token with one still answers it (as OpenSSL takes it).
#[test]
fn a_nonce_is_checked_where_the_request_had_one() {
    use tsa::protocol::asn1::TimeStampReq;
    let p = pki(ca("Root", Some(0)), vec![], current_tsu());
    let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, SystemTime::now());
    let response = Response::from_der(&reply).unwrap();
    let token = response.token.as_ref().unwrap();
    assert!(token.tst_info().nonce.is_some(), "stamped with a nonce");
    let mut request = TimeStampReq::from_der(&query).unwrap();
    request.nonce = None;
    let without = request.to_der().unwrap();
    tsa::client::verify::answers_query(token, &without).unwrap();
    let other = der::asn1::IntRef::new(&[0x01, 0x02, 0x03]).unwrap();
    request.nonce = Some(other);
    let error = tsa::client::verify::answers_query(token, &request.to_der().unwrap()).unwrap_err();
    assert!(error.to_string().contains("nonce"), "{error}");
}

/// A CRL of `issuer` (issued two years ago) revoking the certificates of `revoked` serials,
/// current until `next`.
fn crl(issuer: &Issuer<'static, KeyPair>, next: SystemTime, revoked: &[&[u8]]) -> Vec<u8> {
    let (y, m, d) = ymd(next);
    let (y0, m0, d0) = ymd(SystemTime::now() - 2 * YEAR);
    rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(y0, m0, d0),
        next_update: rcgen::date_time_ymd(y, m, d),
        crl_number: 1u64.into(),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: rcgen::date_time_ymd(y0, m0, d0),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(issuer)
    .unwrap()
    .der()
    .to_vec()
}

#[test]
fn a_crl_given_must_vouch_for_the_signers_certificate() {
    let p = pki(ca("Root", Some(0)), vec![], current_tsu());
    let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, SystemTime::now());
    let response = Response::from_der(&reply).unwrap();
    let token = response.token.as_ref().unwrap();
    let serial = p.tsu.tbs_certificate().serial_number().as_bytes().to_vec();
    let root_crl = |revoked: &[&[u8]]| crl(&p.root_issuer, SystemTime::now() + 5 * YEAR, revoked);
    let judge = |crls: Vec<Vec<u8>>| {
        verify(
            token,
            &Expectation {
                data: Some(DATA),
                query: Some(&query),
                trusted: vec![p.root.clone()],
                crls,
                ..Default::default()
            },
        )
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    judge(vec![]).unwrap();
    judge(vec![root_crl(&[])]).unwrap();
    let error = judge(vec![root_crl(&[&serial])]).unwrap_err();
    assert!(error.contains("evoked"), "{error}");
    // A CRL of another CA says nothing of this certificate: its status is unknown.
    let other = pki(ca("Other root", Some(0)), vec![], current_tsu());
    let foreign = crl(&other.root_issuer, SystemTime::now() + 5 * YEAR, &[]);
    judge(vec![foreign]).unwrap_err();
    // Two CRLs of the root: refused (only the first would be read, and the revoking one
    // missed).
    let error = judge(vec![root_crl(&[]), root_crl(&[&serial])]).unwrap_err();
    assert!(error.contains("two CRLs of one issuer"), "{error}");

    // The same through `tsa verify --crl`, from a PEM file and a DER file.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("r.tsr"), &reply).unwrap();
    std::fs::write(d.join("q.tsq"), &query).unwrap();
    std::fs::write(d.join("data"), DATA).unwrap();
    let lf = der::pem::LineEnding::LF;
    std::fs::write(
        d.join("root.pem"),
        der::EncodePem::to_pem(&p.root, lf).unwrap(),
    )
    .unwrap();
    let empty = der::pem::encode_string("X509 CRL", lf, &root_crl(&[])).unwrap();
    std::fs::write(d.join("empty.pem"), empty).unwrap();
    std::fs::write(d.join("revoking.der"), root_crl(&[&serial])).unwrap();
    let run = |crl: &str| {
        Command::new(env!("CARGO_BIN_EXE_tsa"))
            .args([
                "verify", "--in", "r.tsr", "--data", "data", "--query", "q.tsq",
            ])
            .args(["--ca", "root.pem", "--crl", crl])
            .current_dir(d)
            .output()
            .unwrap()
    };
    let kept = run("empty.pem");
    assert!(
        kept.status.success(),
        "{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    let refused = run("revoking.der");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("evoked"),
        "{stderr}"
    );
}

/// A CRL given must be current now, whatever the validation time (a validation at a past
/// time or at genTime must not take a CRL that expired before the key was revoked); and one
/// that revokes a CA certificate on the signer's path refuses the token, as one that revokes
/// the signer's certificate does.
#[test]
fn crls_given_are_current_and_bind_the_whole_path() {
    let p = pki(
        ca("Root", None),
        vec![ca("Issuing CA", None)],
        current_tsu(),
    );
    let (reply, query) = stamp(&p, DigestAlgorithm::Sha256, SystemTime::now());
    let response = Response::from_der(&reply).unwrap();
    let token = response.token.as_ref().unwrap();
    let judge = |crls: Vec<Vec<u8>>, at: ValidAt| {
        verify(
            token,
            &Expectation {
                data: Some(DATA),
                query: Some(&query),
                trusted: vec![p.root.clone()],
                crls,
                at,
                ..Default::default()
            },
        )
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    let later = SystemTime::now() + YEAR;
    let issuing = &p.between_issuers[0];
    judge(vec![crl(issuing, later, &[])], ValidAt::Now).unwrap();
    // The issuing CA's CRL expired 3 months ago: refused now, and half a year ago too.
    let expired = crl(issuing, SystemTime::now() - YEAR / 4, &[]);
    let half_a_year_ago = ValidAt::Time(SystemTime::now() - YEAR / 2);
    for at in [ValidAt::Now, half_a_year_ago] {
        let error = judge(vec![expired.clone()], at).unwrap_err();
        assert!(error.contains("nextUpdate"), "{error}");
    }
    // The root's CRL revokes the issuing CA: refused, beside the issuing CA's own.
    let issuing_serial = p.between[0]
        .tbs_certificate()
        .serial_number()
        .as_bytes()
        .to_vec();
    let revoking_root = crl(&p.root_issuer, later, &[&issuing_serial]);
    let error = judge(vec![crl(issuing, later, &[]), revoking_root], ValidAt::Now).unwrap_err();
    assert!(error.contains("evoked"), "{error}");
    judge(
        vec![crl(issuing, later, &[]), crl(&p.root_issuer, later, &[])],
        ValidAt::Now,
    )
    .unwrap();
}

/// DER's tag, length and `content`.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n => {
            let octets: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            out.push(0x80 | octets.len() as u8);
            out.extend(octets);
        }
    }
    out.extend_from_slice(content);
    out
}

/// `cert_der` with its first non-critical extension's `critical FALSE` written out (a DEFAULT
/// value DER leaves out, which some issuers write), signed again by `issuer`: a certificate
/// that decodes to the same one and encodes again to other octets.
fn with_critical_false_written(cert_der: &[u8], issuer: &Issuer<'static, KeyPair>) -> Vec<u8> {
    use der::asn1::AnyRef;
    use der::{Reader, SliceReader};
    let elements = |der: &[u8]| -> Vec<Vec<u8>> {
        let mut reader = SliceReader::new(AnyRef::from_der(der).unwrap().value()).unwrap();
        let mut out = Vec::new();
        while !reader.is_finished() {
            out.push(AnyRef::decode(&mut reader).unwrap().to_der().unwrap());
        }
        out
    };
    let parts = elements(cert_der);
    let mut tbs = elements(&parts[0]);
    let extensions_at = tbs.iter().position(|e| e[0] == 0xa3).unwrap();
    let mut extensions = elements(&elements(&tbs[extensions_at])[0]);
    let plain = extensions
        .iter()
        .position(|e| elements(e).len() == 2)
        .expect("a non-critical extension");
    let fields = elements(&extensions[plain]);
    extensions[plain] = tlv(
        0x30,
        &[fields[0].clone(), vec![0x01, 0x01, 0x00], fields[1].clone()].concat(),
    );
    tbs[extensions_at] = tlv(0xa3, &tlv(0x30, &extensions.concat()));
    let tbs = tlv(0x30, &tbs.concat());
    use rcgen::SigningKey;
    let signature = issuer.key().sign(&tbs).unwrap();
    let bits = tlv(0x03, &[&[0u8][..], &signature].concat());
    tlv(0x30, &[tbs, parts[1].clone(), bits].concat())
}

/// A TSU certificate as its issuer wrote it, not as DER has it (`critical FALSE` written
/// out): ESSCertIDv2 and the path's signatures are over the octets the token carries, which
/// the verifier takes as they are (it hashed the certificate encoded again, and refused a
/// token `openssl ts -verify` takes).
#[test]
fn a_certificate_carried_as_its_issuer_wrote_it_is_verified_as_carried() {
    let p = pki(ca("Root", None), vec![], current_tsu());
    let written = with_critical_false_written(&p.tsu.to_der().unwrap(), &p.root_issuer);
    let decoded = Certificate::from_der(&written).unwrap();
    assert_ne!(
        decoded.to_der().unwrap(),
        written,
        "encoded again, it differs"
    );
    let (reply, query) = stamp_as(&p, &written, DigestAlgorithm::Sha256, SystemTime::now());
    ours(&p, &reply, &query, ValidAt::Now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(openssl(&p, &reply, &query, None, dir.path()));
}

#[test]
fn a_path_longer_than_the_root_allows_is_refused() {
    let deep = pki(
        ca("Root", Some(0)),
        vec![ca("Issuing CA", None)],
        current_tsu(),
    );
    both(&deep, false).unwrap_err();
}

#[test]
fn a_tsu_key_usage_without_signatures_or_an_unknown_critical_extension_is_refused() {
    let mut encipherment = current_tsu();
    encipherment.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    let error = both(&pki(ca("Root", Some(0)), vec![], encipherment), false).unwrap_err();
    assert!(error.contains("key usage"), "{error}");

    let mut unknown = current_tsu();
    let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 32473, 99], vec![5, 0]);
    ext.set_criticality(true);
    unknown.custom_extensions.push(ext);
    both(&pki(ca("Root", Some(0)), vec![], unknown), false).unwrap_err();
}

#[test]
fn an_expired_tsu_certificate_verifies_only_when_asked_to_at_gen_time() {
    let now = SystemTime::now();
    let old = pki(ca("Root", Some(0)), vec![], tsu(now - 3 * YEAR, now - YEAR));
    let gen_time = now - 2 * YEAR;
    let (reply, query) = stamp(&old, DigestAlgorithm::Sha256, gen_time);
    let dir = tempfile::tempdir().unwrap();
    assert!(!openssl(&old, &reply, &query, None, dir.path()));
    let error = ours(&old, &reply, &query, ValidAt::Now).unwrap_err();
    assert!(error.contains("no valid path"), "{error}");
    assert!(openssl(&old, &reply, &query, Some(gen_time), dir.path()));
    ours(&old, &reply, &query, ValidAt::GenTime).unwrap();
    ours(&old, &reply, &query, ValidAt::Time(gen_time)).unwrap();
    // After the certificate expired, not even its own genTime helps a later token.
    let (late, late_query) = stamp(&old, DigestAlgorithm::Sha256, now - YEAR / 2);
    ours(&old, &late, &late_query, ValidAt::GenTime).unwrap_err();
}

#[test]
fn a_token_of_a_broken_digest_is_refused() {
    let pki = pki(ca("Root", Some(0)), vec![], current_tsu());
    let (reply, query) = stamp(&pki, DigestAlgorithm::Sha1, SystemTime::now());
    let error = ours(&pki, &reply, &query, ValidAt::Now).unwrap_err();
    assert!(error.contains("broken"), "{error}");
}
