//! `tsa inspect` on what openssl and the TSA write: a request, a granted reply, a refusal, the
//! token alone, and a request whose policy is an OID that this TSA cannot read.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{curl_post, openssl, Server, TSA};

fn inspect(dir: &Path, file: &str) -> Output {
    Command::new(TSA)
        .current_dir(dir)
        .args(["inspect", file])
        .output()
        .expect("run tsa inspect")
}

/// What `tsa inspect` printed of a file it could read.
fn inspected(dir: &Path, file: &str) -> String {
    let out = inspect(dir, file);
    assert!(
        out.status.success(),
        "tsa inspect {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `openssl ts -query` for `doc.txt` in `dir` with SHA-256 and `args`, written to `out`.
fn query(dir: &Path, args: &[&str], out: &str) {
    let mut all = vec!["ts", "-query", "-data", "doc.txt", "-sha256"];
    all.extend(args);
    all.extend(["-out", out]);
    openssl(&all, dir);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn requests_replies_and_tokens_in_words() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("doc.txt"), "an invoice").unwrap();
    let digest = hex(&tsa::alg::DigestAlgorithm::Sha256
        .digest(b"an invoice")
        .unwrap());

    query(w, &["-cert"], "req.tsq");
    let request = inspected(w, "req.tsq");
    assert!(request.starts_with("Time-stamp request\n"), "{request}");
    for line in [
        "Hash Algorithm: sha256".to_string(),
        format!("Message data: {digest}"),
        "Policy OID: unspecified".into(),
        "Certificate required: yes".into(),
    ] {
        assert!(request.contains(&line), "{line} in:\n{request}");
    }

    let (status, _, reply) = curl_post(
        &server.url,
        &w.join("req.tsq"),
        "application/timestamp-query",
    );
    assert_eq!(status, 200);
    std::fs::write(w.join("reply.tsr"), &reply).unwrap();
    let granted = inspected(w, "reply.tsr");
    assert!(granted.contains("Status: Granted."), "{granted}");
    assert!(
        granted.contains(&format!("Message data: {digest}")),
        "{granted}"
    );
    let dev_policy = tsa::alg::oid::DEVELOPMENT_POLICY.to_string();
    assert!(
        granted.contains(&format!("Policy OID: {dev_policy}")),
        "{granted}"
    );

    // The token alone, as openssl writes it out of the reply.
    common::openssl_token_out(w);
    let token = inspected(w, "token.der");
    assert!(token.starts_with("TST info:\n"), "{token}");
    assert!(
        token.contains(&format!("Message data: {digest}")),
        "{token}"
    );

    // A refusal: a policy this TSA does not offer.
    query(w, &["-tspolicy", "1.2.3.4.5"], "other.tsq");
    let (_, _, refusal) = curl_post(
        &server.url,
        &w.join("other.tsq"),
        "application/timestamp-query",
    );
    std::fs::write(w.join("refusal.tsr"), &refusal).unwrap();
    let refused = inspected(w, "refusal.tsr");
    assert!(refused.contains("Status: Rejected."), "{refused}");
    assert!(refused.contains("unacceptedPolicy"), "{refused}");
    assert!(refused.contains("TST info: not included"), "{refused}");
}

#[test]
fn a_request_with_a_uuid_policy_is_named_with_the_answer_it_gets() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("doc.txt"), "an invoice").unwrap();
    let uuid = "2.25.329800735698586629295641978511506172918";
    query(w, &["-tspolicy", uuid], "req.tsq");
    let out = inspect(w, "req.tsq");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("unacceptedPolicy"), "{error}");
    assert!(error.contains(uuid), "{error}");

    // Bytes that are none of the three still say so.
    std::fs::write(w.join("junk.der"), [0x30, 0x03, 0x02, 0x01, 0x01]).unwrap();
    let out = inspect(w, "junk.der");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("neither a time-stamp request, response nor token"),
        "{error}"
    );
}
