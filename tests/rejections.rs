//! Every way a request is refused, over real HTTP: PKIStatus rejection (2), exactly the
//! failInfo bit RFC 3161 names for the case, a statusString, and no token.
//!
//! Malformed requests start from a real `openssl ts -query` and are changed in one place,
//! either by decoding them into the crate's `TimeStampReq`, changing a field and encoding
//! again, or by editing the octets where DER itself is what is broken.

mod common;

use std::path::Path;

use common::{curl_post, openssl, Server};
use der::asn1::{IntRef, ObjectIdentifier, OctetString, OctetStringRef};
use der::{Decode, Encode};
use tsa::client::read::Response;
use tsa::protocol::asn1::TimeStampReq;
use tsa::protocol::FailInfo;

const QUERY_TYPE: &str = "application/timestamp-query";
const REPLY_TYPE: &str = "application/timestamp-reply";

/// A query made by `openssl ts -query` over a small file, with `args` (e.g. `-sha256 -cert`).
fn openssl_query(work: &Path, args: &[&str]) -> Vec<u8> {
    std::fs::write(
        work.join("data.bin"),
        b"a document that will not be stamped\n",
    )
    .unwrap();
    let mut all = vec!["ts", "-query", "-data", "data.bin", "-out", "req.tsq"];
    all.extend_from_slice(args);
    openssl(&all, work);
    std::fs::read(work.join("req.tsq")).unwrap()
}

/// POSTs `body` as a time-stamp query; the HTTP status must be 200 and the body a reply.
fn post(server: &Server, work: &Path, body: &[u8]) -> Response {
    let file = work.join("body.bin");
    std::fs::write(&file, body).unwrap();
    let (status, content_type, reply) = curl_post(&server.url, &file, QUERY_TYPE);
    assert_eq!(status, 200, "RFC 3161 answers every query with 200");
    assert_eq!(content_type, REPLY_TYPE);
    std::fs::write(work.join("reply.tsr"), &reply).unwrap();
    Response::from_der(&reply).expect("the reply is a DER TimeStampResp")
}

/// Asserts a rejection with exactly `expected` as failInfo; returns its statusString.
fn assert_rejected(response: &Response, expected: FailInfo, what: &str) -> String {
    assert_eq!(response.status, 2, "{what}: PKIStatus");
    assert_eq!(
        response.fail_bits,
        vec![usize::from(expected.bit())],
        "{what}: failInfo bits"
    );
    assert_eq!(response.fail_info(), Some(expected), "{what}");
    assert!(
        response.token.is_none(),
        "{what}: a rejection carries no token"
    );
    let text = response.status_text.join("; ");
    assert!(!text.trim().is_empty(), "{what}: no statusString");
    text
}

/// Posts `body` and asserts the rejection; openssl must read the reply as a rejection too.
fn expect_rejection(server: &Server, work: &Path, body: &[u8], expected: FailInfo, what: &str) {
    let response = post(server, work, body);
    let text = assert_rejected(&response, expected, what);
    let printed = openssl(&["ts", "-reply", "-in", "reply.tsr", "-text"], work);
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.contains("Status: Rejected."), "{what}: {printed}");
    assert!(
        printed.contains(&text),
        "{what}: statusString {text:?} in {printed}"
    );
}

/// Decodes `der`, lets `change` edit the request, and encodes it again.
fn edited<'a>(der: &'a [u8], change: impl FnOnce(&mut TimeStampReq<'a>)) -> Vec<u8> {
    let mut req = TimeStampReq::from_der(der).expect("openssl's query decodes");
    change(&mut req);
    req.to_der().unwrap()
}

/// A control: the unchanged openssl query is granted by the same server.
fn assert_granted(server: &Server, work: &Path, body: &[u8]) {
    let response = post(server, work, body);
    assert!(response.granted(), "{:?}", response.status_text);
    assert!(response.token.is_some());
}

#[test]
fn sha1_and_md5_imprints_are_bad_alg() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_granted(&server, w, &openssl_query(w, &["-sha256"]));
    for digest in ["-sha1", "-md5"] {
        let query = openssl_query(w, &[digest, "-cert"]);
        expect_rejection(&server, w, &query, FailInfo::BadAlg, digest);
    }
}

#[test]
fn unknown_or_parameterised_hash_algorithm_is_bad_alg() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha256", "-cert"]);
    assert_granted(&server, w, &query);

    // 2.16.840.1.101.3.4.2.127: an arc beside SHA-256 that names no hash.
    let unknown = edited(&query, |r| {
        r.message_imprint.hash_algorithm.oid =
            ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.127");
    });
    expect_rejection(&server, w, &unknown, FailInfo::BadAlg, "unknown hash OID");

    // SHA-256 with parameters other than NULL.
    let params = OctetStringRef::new(b"salt").unwrap();
    let with_params = edited(&query, |r| {
        r.message_imprint.hash_algorithm.parameters = Some(params.into());
    });
    expect_rejection(
        &server,
        w,
        &with_params,
        FailInfo::BadAlg,
        "hash parameters",
    );

    // Absent parameters are as good as NULL.
    let absent = edited(&query, |r| {
        r.message_imprint.hash_algorithm.parameters = None
    });
    assert!(absent.len() < query.len());
    assert_granted(&server, w, &absent);
}

#[test]
fn imprint_length_mismatch_is_bad_data_format() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha256", "-cert"]);
    let digest = TimeStampReq::from_der(&query)
        .unwrap()
        .message_imprint
        .hashed_message
        .as_bytes()
        .to_vec();
    assert_eq!(digest.len(), 32);
    let short = digest[..31].to_vec();
    let sha1_sized = digest[..20].to_vec();
    let mut long = digest.clone();
    long.push(0);
    for (what, imprint) in [
        ("31 octets", short),
        ("20 octets", sha1_sized),
        ("33 octets", long),
    ] {
        let body = edited(&query, |r| {
            r.message_imprint.hashed_message = OctetStringRef::new(&imprint).unwrap();
        });
        expect_rejection(&server, w, &body, FailInfo::BadDataFormat, what);
    }
}

#[test]
fn bytes_that_are_not_one_der_request_are_bad_data_format() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha384", "-cert"]);
    assert_granted(&server, w, &query);

    let mut trailing = query.clone();
    trailing.extend_from_slice(&[0x00, 0x00]);
    let mut twice = query.clone();
    twice.extend_from_slice(&query);
    let truncated = query[..query.len() - 1].to_vec();
    // The outer SEQUENCE's length in the long form (0x81 n) where the short form is DER.
    assert!(query[1] < 0x80);
    let mut long_form = vec![0x30, 0x81];
    long_form.extend_from_slice(&query[1..]);

    let cases: [(&str, &[u8]); 7] = [
        ("two trailing zero octets", &trailing),
        ("the request twice", &twice),
        ("one octet missing", &truncated),
        ("a non-minimal length", &long_form),
        ("text", b"this is not a time-stamp request\n"),
        ("a bare NULL", &[0x05, 0x00]),
        ("an empty body", b""),
    ];
    for (what, body) in cases {
        expect_rejection(&server, w, body, FailInfo::BadDataFormat, what);
    }
}

#[test]
fn version_2_is_bad_request() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha256", "-cert"]);
    // By hand: SEQUENCE header, then INTEGER 1 (02 01 01) becomes INTEGER 2.
    assert_eq!(query[2..5], [0x02, 0x01, 0x01]);
    let mut v2 = query.clone();
    v2[4] = 0x02;
    expect_rejection(&server, w, &v2, FailInfo::BadRequest, "version 2");
    // And through the structure, version 0.
    let v0 = edited(&query, |r| r.version = IntRef::new(&[0]).unwrap());
    expect_rejection(&server, w, &v0, FailInfo::BadRequest, "version 0");
}

#[test]
fn a_request_extension_is_unaccepted_extension() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha256", "-cert"]);
    for critical in [false, true] {
        let body = edited(&query, |r| {
            r.extensions = Some(vec![x509_cert::ext::Extension {
                // An extension under RFC 5612's documentation arc.
                extn_id: ObjectIdentifier::new_unwrap("1.3.6.1.4.1.32473.1"),
                critical,
                extn_value: OctetString::new(vec![0x05, 0x00]).unwrap(),
            }]);
        });
        assert!(body.len() > query.len());
        expect_rejection(
            &server,
            w,
            &body,
            FailInfo::UnacceptedExtension,
            "a request extension",
        );
    }
}

#[test]
fn a_policy_the_tsa_does_not_offer_is_unaccepted_policy() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let dev = tsa::alg::oid::DEVELOPMENT_POLICY.to_string();
    assert_granted(
        &server,
        w,
        &openssl_query(w, &["-sha256", "-tspolicy", &dev]),
    );
    // The development clock offers the development policy only: not even the ETSI baseline
    // policy that is the configuration's default otherwise.
    let baseline = tsa::alg::oid::ETSI_BASELINE_POLICY.to_string();
    // A UUID OID (X.667, 2.25 and 128 bits) is a policy like any other: its arc is too large
    // for the `const-oid` crate, not for DER.
    let uuid = "2.25.329800735698586629295641978511506172918";
    for policy in ["1.2.3.4.5", baseline.as_str(), uuid] {
        let query = openssl_query(w, &["-sha256", "-cert", "-tspolicy", policy]);
        expect_rejection(&server, w, &query, FailInfo::UnacceptedPolicy, policy);
    }
}

/// `certReq` written out as an explicit FALSE is BER, not DER, yet tolerated (see
/// `parse_request`): the token is granted and carries no certificate.
#[test]
fn explicit_cert_req_false_is_tolerated() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let query = openssl_query(w, &["-sha256"]);
    assert!(query[1] < 0x7d, "short-form length");
    let mut ber = query.clone();
    ber.extend_from_slice(&[0x01, 0x01, 0x00]);
    ber[1] += 3;
    let response = post(&server, w, &ber);
    assert!(response.granted(), "{:?}", response.status_text);
    let token = response.token.unwrap();
    assert!(token
        .signed_data
        .certificates
        .as_ref()
        .is_none_or(|c| c.0.is_empty()));
}
