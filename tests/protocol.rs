//! The pure protocol core, fed directly: request round trips, rejection of malformed input
//! without panics, and tokens checked by an independent CMS decoder and the verifier.

use der::{Decode, Encode};
use proptest::prelude::*;
use tsa::alg::{oid, DigestAlgorithm};
use tsa::client::read::Response;
use tsa::client::verify::{verify, Expectation};
use tsa::client::Query;
use tsa::pki::{DevPki, KeyAlgorithm};
use tsa::protocol::asn1::TimeStampReq;
use tsa::protocol::{
    parse_request, Accuracy, FailInfo, GenTime, Precision, RequestRules, Serial, Stamp,
    TemplateOptions, TokenTemplate,
};
use tsa::signer::software::{RsaPadding, SoftwareSigner};
use tsa::signer::Signer;
use x509_cert::Certificate;

fn rules() -> RequestRules {
    RequestRules {
        accepted_digests: DigestAlgorithm::DEFAULT_ACCEPTED.to_vec(),
        default_policy: oid::ETSI_BASELINE_POLICY,
        other_policies: vec![oid::DEVELOPMENT_POLICY],
        max_len: 8 * 1024,
    }
}

fn digest_strategy() -> impl Strategy<Value = DigestAlgorithm> {
    prop::sample::select(DigestAlgorithm::DEFAULT_ACCEPTED.to_vec())
}

fn query_strategy() -> impl Strategy<Value = Query> {
    (
        digest_strategy(),
        any::<[u8; 64]>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 1..40)),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(digest, bytes, nonce, cert_req, policy)| Query {
            digest,
            hashed_message: bytes[..digest.output_len()].to_vec(),
            policy: policy.then_some(oid::DEVELOPMENT_POLICY),
            // Any magnitude, made a minimal positive INTEGER.
            nonce: nonce.and_then(|n| Serial::from_unsigned(&n).map(|s| s.as_bytes().to_vec())),
            cert_req,
        })
}

proptest! {
    #[test]
    fn requests_round_trip(query in query_strategy()) {
        let der = query.to_der().unwrap();
        let req = parse_request(&der, &rules()).unwrap();
        prop_assert_eq!(req.digest, query.digest);
        prop_assert_eq!(req.message_imprint.hashed_message.as_bytes(), &query.hashed_message[..]);
        prop_assert_eq!(req.nonce.map(|n| n.as_bytes().to_vec()), query.nonce.clone());
        prop_assert_eq!(req.cert_req, query.cert_req);
        prop_assert_eq!(req.policy, query.policy.unwrap_or(oid::ETSI_BASELINE_POLICY));
        // Soundness: decode, encode, decode, encode gives the same octets.
        let again = TimeStampReq::from_der(&der).unwrap().to_der().unwrap();
        prop_assert_eq!(&again, &der);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(rejection) = parse_request(&bytes, &rules()) {
            let resp = Response::from_der(&rejection.to_der()).unwrap();
            prop_assert_eq!(resp.status, 2);
            prop_assert!(resp.token.is_none());
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        query in query_strategy(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut der = query.to_der().unwrap();
        for (at, byte, kind) in edits {
            let i = at.index(der.len());
            match kind {
                0 => der[i] = byte,
                1 => { der.remove(i); }
                _ => der.insert(i, byte),
            }
        }
        let _ = parse_request(&der, &rules());
    }

    #[test]
    fn gen_time_round_trips(ns in 0u64..=4_102_444_800_000_000_000, p in 0usize..4) {
        let precision = [Precision::Seconds, Precision::Millis, Precision::Micros, Precision::Nanos][p];
        let t = GenTime::truncated(ns, precision);
        prop_assert!(t.unix_ns() <= ns);
        let der = t.to_der().unwrap();
        prop_assert_eq!(GenTime::from_der(&der).unwrap(), t);
    }

    #[test]
    fn accuracy_covers_and_is_tight(ns in 0u64..10_000_000_000) {
        let a = Accuracy::covering_ns(ns);
        // Never exact (an empty Accuracy): at least a microsecond.
        prop_assert!(a.as_ns() >= ns.max(1) && a.as_ns() < ns + 1_000 + 1);
        let der = a.to_der().unwrap();
        prop_assert_eq!(Accuracy::from_der(&der).unwrap(), a);
    }
}

#[test]
fn an_exact_reading_still_states_a_microsecond_of_accuracy() {
    // A clock bound of 0 on a reading that truncation leaves whole: not `30 00`, which
    // RFC 3161 reads as an exact time.
    let a = Accuracy::covering_ns(0);
    assert_eq!(a.micros, Some(1));
    assert_eq!(a.to_der().unwrap(), [0x30, 0x03, 0x81, 0x01, 0x01]);
}

#[test]
fn millis_and_micros_outside_1_to_999_are_out_of_range() {
    let of = |millis, micros| Accuracy {
        seconds: None,
        millis,
        micros,
    };
    assert!(of(Some(999), Some(1)).is_in_range());
    assert!(of(None, None).is_in_range());
    for (millis, micros) in [
        (Some(0), None),
        (Some(1_000), None),
        (None, Some(0)),
        (None, Some(1_000)),
    ] {
        assert!(!of(millis, micros).is_in_range(), "{millis:?} {micros:?}");
    }
}

#[test]
fn rejections_carry_the_rfc_3161_fail_info() {
    let good = Query {
        digest: DigestAlgorithm::Sha256,
        hashed_message: vec![7; 32],
        policy: None,
        nonce: Some(vec![1, 2, 3]),
        cert_req: false,
    };
    let fail = |q: &Query| {
        parse_request(&q.to_der().unwrap(), &rules())
            .unwrap_err()
            .fail_info
    };

    let sha1 = Query {
        digest: DigestAlgorithm::Sha1,
        hashed_message: vec![7; 20],
        ..good.clone()
    };
    assert_eq!(fail(&sha1), FailInfo::BadAlg);
    let md5 = Query {
        digest: DigestAlgorithm::Md5,
        hashed_message: vec![7; 16],
        ..good.clone()
    };
    assert_eq!(fail(&md5), FailInfo::BadAlg);
    let short = Query {
        hashed_message: vec![7; 31],
        ..good.clone()
    };
    assert_eq!(fail(&short), FailInfo::BadDataFormat);
    let policy = Query {
        policy: Some(const_oid::ObjectIdentifier::new_unwrap("1.2.3.4")),
        ..good.clone()
    };
    assert_eq!(fail(&policy), FailInfo::UnacceptedPolicy);

    let mut trailing = good.to_der().unwrap();
    trailing.push(0);
    assert_eq!(
        parse_request(&trailing, &rules()).unwrap_err().fail_info,
        FailInfo::BadDataFormat
    );

    // Version 2: the INTEGER right after the outer SEQUENCE header.
    let mut v2 = good.to_der().unwrap();
    assert_eq!(&v2[2..5], &[0x02, 0x01, 0x01]);
    v2[4] = 2;
    assert_eq!(
        parse_request(&v2, &rules()).unwrap_err().fail_info,
        FailInfo::BadRequest
    );

    // SHA-1 accepted when configured.
    let mut lenient = rules();
    lenient.accepted_digests.push(DigestAlgorithm::Sha1);
    assert!(parse_request(&sha1.to_der().unwrap(), &lenient).is_ok());
}

struct Fixture {
    template: TokenTemplate,
    signer: SoftwareSigner,
    ca: Certificate,
}

fn fixture(alg: KeyAlgorithm, padding: RsaPadding, options: TemplateOptions) -> Fixture {
    let pki = DevPki::generate(alg).unwrap();
    let (_, key) = der::pem::decode_vec(pki.tsu_key_pem.as_bytes()).unwrap();
    let signer = SoftwareSigner::from_pkcs8(&key, padding).unwrap();
    let cert = Certificate::from_pem(pki.tsu_cert_pem.as_bytes()).unwrap();
    let template =
        TokenTemplate::new(&cert.to_der().unwrap(), &[], signer.algorithm(), options).unwrap();
    Fixture {
        template,
        signer,
        ca: Certificate::from_pem(pki.ca_cert_pem.as_bytes()).unwrap(),
    }
}

use der::DecodePem;

fn issue(f: &Fixture, query: &Query, unix_ns: u64) -> Vec<u8> {
    let der = query.to_der().unwrap();
    let req = parse_request(&der, &rules()).unwrap();
    let serial = Serial::from_unsigned(&[0x80, 1, 2, 3]).unwrap();
    let stamp = Stamp::new(unix_ns, 50_000_000, f.template.precision(), serial);
    let tbs = f.template.to_be_signed(&req, &stamp).unwrap();
    let sig = f.signer.sign(tbs.message()).unwrap();
    f.template.assemble(&tbs, &sig)
}

#[test]
fn tokens_decode_with_cms_and_verify_for_every_algorithm() {
    let query = Query::for_data(DigestAlgorithm::Sha384, b"document").unwrap();
    let cases = [
        (KeyAlgorithm::P256, RsaPadding::Pkcs1),
        (KeyAlgorithm::P384, RsaPadding::Pkcs1),
        (KeyAlgorithm::Rsa2048, RsaPadding::Pkcs1),
        (KeyAlgorithm::Rsa2048, RsaPadding::Pss),
    ];
    for (alg, padding) in cases {
        let f = fixture(
            alg,
            padding,
            TemplateOptions {
                include_tsa_name: true,
                ess_cert_id_v1: true,
                precision: Precision::Micros,
            },
        );
        let now = tsa::clock::system_unix_ns();
        let der = issue(&f, &query, now);
        let resp = Response::from_der(&der).unwrap();
        let token = resp.token.as_ref().unwrap();
        // An independent decoder accepts the whole SignedData (done inside Token::from_der);
        // version 3, one digest algorithm, the certificate because certReq was set.
        assert_eq!(token.signed_data.version, cms::content_info::CmsVersion::V3);
        assert_eq!(token.signed_data.digest_algorithms.len(), 1);
        // SHA-2 digest algorithms with their parameters absent, as RFC 5754 § 2 has CMS
        // writers generate them.
        let signer = &token.signed_data.signer_infos.0.as_slice()[0];
        for digest_alg in token
            .signed_data
            .digest_algorithms
            .iter()
            .chain([&signer.digest_alg])
        {
            assert_eq!(digest_alg.parameters, None, "{alg:?}/{padding:?}");
        }
        assert_eq!(token.signed_data.certificates.as_ref().unwrap().0.len(), 1);
        let tst = token.tst_info();
        assert_eq!(tst.gen_time.unix_ns(), now - now % 1_000);
        assert!(tst.tsa.is_some());
        assert!(!tst.ordering);
        assert_eq!(tst.serial_number.as_bytes(), &[0x00, 0x80, 1, 2, 3]);
        let verified = verify(
            token,
            &Expectation {
                data: Some(b"document"),
                query: Some(&query.to_der().unwrap()),
                trusted: vec![f.ca.clone()],
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{alg:?}/{padding:?}: {e:#}"));
        // The bound plus what truncation to microseconds removed, rounded up to a microsecond.
        let expected = (50_000_000 + now % 1_000).div_ceil(1_000) * 1_000;
        assert_eq!(verified.accuracy_ns, Some(expected));
        // A changed document does not verify.
        assert!(verify(
            token,
            &Expectation {
                data: Some(b"other"),
                trusted: vec![f.ca.clone()],
                ..Default::default()
            }
        )
        .is_err());
    }
}

#[test]
fn certificates_only_when_asked_and_signature_tampering_is_caught() {
    let f = fixture(
        KeyAlgorithm::P256,
        RsaPadding::Pkcs1,
        TemplateOptions::default(),
    );
    let mut query = Query::for_data(DigestAlgorithm::Sha256, b"x").unwrap();
    query.cert_req = false;
    let der = issue(&f, &query, tsa::clock::system_unix_ns());
    let resp = Response::from_der(&der).unwrap();
    let token = resp.token.unwrap();
    assert!(token.signed_data.certificates.is_none());
    // Without certificates the verifier needs the signer's certificate from elsewhere.
    let expect = Expectation {
        data: Some(b"x"),
        trusted: vec![f.ca.clone()],
        ..Default::default()
    };
    assert!(verify(&token, &expect).is_err());

    // Flip one octet of the TSTInfo's serial inside the token: messageDigest no longer matches.
    let mut tampered = der.clone();
    let at = tampered
        .windows(5)
        .position(|w| w == [0x00, 0x80, 1, 2, 3])
        .unwrap();
    tampered[at + 4] ^= 1;
    let token = Response::from_der(&tampered).unwrap().token.unwrap();
    let expect = Expectation {
        data: Some(b"x"),
        trusted: vec![f.ca.clone()],
        untrusted: vec![],
        ..Default::default()
    };
    assert!(verify(&token, &expect).is_err());
}
