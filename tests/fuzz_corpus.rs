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
