//! The fuzz corpora as regression tests, on the stable toolchain and without cargo-fuzz:
//! every input under `fuzz/corpus/<target>/` (what the fuzzer kept for its coverage) and
//! `fuzz/artifacts-found/<target>/` (inputs that once found a bug) goes through the same
//! check as the fuzz target (`fuzz/checks/<target>.rs`), which panics when a property fails.

use std::path::Path;

#[path = "../fuzz/checks/batch_decode.rs"]
mod batch_decode;
#[path = "../fuzz/checks/http_connection.rs"]
mod http_connection;
#[path = "../fuzz/checks/parse_request.rs"]
mod parse_request;
#[path = "../fuzz/checks/request_canonical.rs"]
mod request_canonical;
#[path = "../fuzz/checks/request_roundtrip.rs"]
mod request_roundtrip;

/// Runs `check` on every file of the target's corpus and found artifacts; returns how many.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in [
        fuzz.join("corpus").join(target),
        fuzz.join("artifacts-found").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its check", path.display());
            count += 1;
        }
    }
    count
}

/// A corpus that is missing or nearly empty would make these tests pass vacuously.
const MIN_INPUTS: usize = 100;

#[test]
fn batch_decode_corpus() {
    assert!(replay("batch_decode", batch_decode::check) >= MIN_INPUTS);
}

#[test]
fn http_connection_corpus() {
    assert!(replay("http_connection", http_connection::check) >= 10);
}

#[test]
fn parse_request_corpus() {
    assert!(replay("parse_request", parse_request::check) >= MIN_INPUTS);
}

#[test]
fn request_roundtrip_corpus() {
    assert!(replay("request_roundtrip", request_roundtrip::check) >= MIN_INPUTS);
}

#[test]
fn request_canonical_corpus() {
    assert!(replay("request_canonical", request_canonical::check) >= MIN_INPUTS);
}

/// The tolerated form of certReq FALSE (`01 01 00`) where those three octets push the outer
/// length past 127, so that it takes an octet more: the tolerated form still (the check
/// counted exactly three octets more, and failed such an input); a FALSE after the
/// extensions, out of DER's order, is not parsed at all.
#[test]
fn an_explicit_false_that_lengthens_the_outer_length_is_the_tolerated_form() {
    let sequence = |content: &[u8]| -> Vec<u8> {
        let mut out = vec![0x30];
        match content.len() {
            n @ 0..=127 => out.push(n as u8),
            n => out.extend_from_slice(&[0x81, n as u8]),
        }
        out.extend_from_slice(content);
        out
    };
    let mut content = vec![0x02, 0x01, 0x01]; // version v1
                                              // messageImprint: SHA-256 with NULL parameters, 32 octets.
    content.extend_from_slice(&[
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ]);
    content.extend_from_slice(&[7; 32]);
    // A nonce of 70 octets: 126 octets of content, one octet of length.
    content.extend_from_slice(&[0x02, 70, 0x01]);
    content.extend_from_slice(&[0x55; 69]);
    assert_eq!(content.len(), 126);
    let der = sequence(&content);
    request_canonical::check(&der);
    let mut with_false = content.clone();
    with_false.extend_from_slice(&[0x01, 0x01, 0x00]);
    let tolerated = sequence(&with_false);
    assert_eq!(tolerated.len(), der.len() + 4);
    assert!(<tsa::protocol::asn1::TimeStampReq as der::Decode>::from_der(&tolerated).is_ok());
    request_canonical::check(&tolerated);
}
