//! The real `openssl ts` client: query → HTTP → reply → `openssl ts -verify`.

mod common;

use common::{curl_post, openssl, Server};
use std::path::Path;

/// Asks for a stamp of `data` with `query_args` and verifies the reply with `openssl ts`.
fn stamp_and_verify(server: &Server, work: &Path, query_args: &[&str]) -> Vec<u8> {
    std::fs::write(work.join("data.bin"), b"the document to stamp\n").unwrap();
    let mut args = vec!["ts", "-query", "-data", "data.bin", "-out", "req.tsq"];
    args.extend_from_slice(query_args);
    openssl(&args, work);
    let (status, content_type, body) =
        curl_post(&server.url, &work.join("req.tsq"), "application/timestamp-query");
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/timestamp-reply");
    std::fs::write(work.join("reply.tsr"), &body).unwrap();
    let text = openssl(&["ts", "-reply", "-in", "reply.tsr", "-text"], work);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("Status: Granted."), "{text}");
    let ca = server.ca();
    let verified = openssl(
        &["ts", "-verify", "-in", "reply.tsr", "-queryfile", "req.tsq", "-CAfile", ca.to_str().unwrap()],
        work,
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("Verification: OK"));
    body
}

#[test]
fn p256_token_verifies_with_openssl() {
    let server = Server::start(&["--algorithm", "p256"], "");
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);
}
