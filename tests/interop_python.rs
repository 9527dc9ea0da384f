//! Interop with Trail of Bits' `rfc3161-client` (PyPI), installed by `scripts/test.sh` into
//! the virtual environment `target/pyenv`: `tests/interop/python/rfc3161_client_check.py`
//! asks the TSA for a token with the library's request builder and verifies it with its
//! `Verifier` against the development root CA, the nonce and the policy; this test reads what
//! it printed and checks the same exchange with the crate and `openssl ts -verify`.
//!
//! The library verifies through OpenSSL's PKCS7_verify, which does not take RSASSA-PSS, so
//! PSS tokens are left to the openssl cms and BouncyCastle tests.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, run, Server};
use der::Decode;
use tsa::alg::{oid, DigestAlgorithm};
use tsa::client::read::Response;
use tsa::protocol::asn1::TimeStampReq;

/// The venv's interpreter: `TSA_TEST_PYTHON`, or `target/pyenv/bin/python`.
fn python() -> PathBuf {
    let python = std::env::var_os("TSA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which installs rfc3161-client into target/pyenv",
        python.display()
    );
    let import = run(Command::new(&python).args(["-c", "import rfc3161_client"]));
    assert!(
        import.status.success(),
        "rfc3161-client is not installed for {}: run scripts/test.sh",
        python.display()
    );
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/python/rfc3161_client_check.py")
}

/// One exchange by the Python client; what it printed and the directory with req.tsq and
/// reply.tsr.
fn exchange(
    server: &Server,
    data: &[u8],
    hash: &str,
    ca: &Path,
    policy: Option<&str>,
) -> (HashMap<String, String>, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let data_file = out.path().join("data.bin");
    std::fs::write(&data_file, data).unwrap();
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg(python())
        .arg(script())
        .arg("--url")
        .arg(&server.url)
        .arg("--data")
        .arg(&data_file)
        .arg("--ca")
        .arg(ca)
        .arg("--out")
        .arg(out.path())
        .args(["--hash", hash]);
    if let Some(policy) = policy {
        cmd.args(["--policy", policy]);
    }
    let output = ok(&mut cmd);
    let fields = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (fields, out)
}

fn field<'f>(fields: &'f HashMap<String, String>, key: &str) -> &'f str {
    fields
        .get(key)
        .unwrap_or_else(|| panic!("the Python client printed no {key}: {fields:?}"))
}

/// An INTEGER's content octets as Python's `format(n, "x")` writes a positive value.
fn hex_unsigned(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A granted, verified exchange whose every detail agrees with the crate and openssl; the
/// token carries `certificates` certificates.
fn check_granted(server: &Server, hash: &str, certificates: usize) {
    let digest = DigestAlgorithm::from_name(hash).unwrap();
    let data = format!("stamped by rfc3161-client with {hash} via {}", server.url).into_bytes();
    let policy = oid::DEVELOPMENT_POLICY.to_string();
    let (f, out) = exchange(server, &data, hash, &server.ca(), Some(&policy));
    assert_eq!(field(&f, "http_status"), "200");
    assert_eq!(field(&f, "content_type"), "application/timestamp-reply");
    assert_eq!(field(&f, "pki_status"), "0");
    assert_eq!(field(&f, "verified"), "true", "{f:?}");
    assert_eq!(field(&f, "request_nonce"), field(&f, "token_nonce"));
    assert_eq!(field(&f, "policy"), policy);
    assert_eq!(field(&f, "hash_oid"), digest.oid().to_string());
    assert_eq!(field(&f, "imprint"), hex(&digest.digest(&data).unwrap()));
    assert_eq!(field(&f, "certificates"), certificates.to_string());

    let request_der = std::fs::read(out.path().join("req.tsq")).unwrap();
    let reply_der = std::fs::read(out.path().join("reply.tsr")).unwrap();
    let request = TimeStampReq::from_der(&request_der).expect("the library's request decodes");
    assert!(request.cert_req);
    let response = Response::from_der(&reply_der).unwrap();
    let tst = response.token.as_ref().expect("granted").tst_info();
    let nonce = request.nonce.expect("a nonce").as_bytes();
    assert_eq!(tst.nonce.unwrap().as_bytes(), nonce);
    assert_eq!(field(&f, "request_nonce"), hex_unsigned(nonce));
    assert_eq!(
        field(&f, "serial"),
        hex_unsigned(tst.serial_number.as_bytes())
    );
    // rfc3161-client reads genTime to the whole second.
    assert_eq!(
        field(&f, "gen_time_s"),
        (tst.gen_time.unix_ns() / 1_000_000_000).to_string()
    );

    let ca = server.ca();
    let verified = run(Command::new("openssl").current_dir(out.path()).args([
        "ts",
        "-verify",
        "-in",
        "reply.tsr",
        "-queryfile",
        "req.tsq",
        "-CAfile",
        ca.to_str().unwrap(),
    ]));
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("Verification: OK"),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}

#[test]
fn rfc3161_client_verifies_p256_tokens() {
    let server = Server::start(&["--algorithm", "p256"], "");
    for hash in ["sha256", "sha512"] {
        check_granted(&server, hash, 1);
    }
}

#[test]
fn rfc3161_client_verifies_p384_tokens() {
    let server = Server::start(&["--algorithm", "p384"], "");
    for hash in ["sha256", "sha512"] {
        check_granted(&server, hash, 1);
    }
}

#[test]
fn rfc3161_client_verifies_rsa2048_tokens() {
    let server = Server::start(&["--algorithm", "rsa2048"], "");
    for hash in ["sha256", "sha512"] {
        check_granted(&server, hash, 1);
    }
}

/// With a chain configured the token carries the root CA's certificate beside the TSU's, in
/// DER order (the shorter root's first): rfc3161-client reads SET OF strictly (it refused the
/// TSU's certificate put first with InvalidSetOrdering) and verifies the token.
#[test]
fn rfc3161_client_verifies_tokens_that_carry_a_chain() {
    let server = Server::start(&[], "[signer]\nchain = [\"ca-cert.pem\"]\n");
    check_granted(&server, "sha256", 2);
}

#[test]
fn rfc3161_client_refuses_another_ca_and_another_policy() {
    let server = Server::start(&[], "");
    let other = Server::start(&[], "");
    let (f, _out) = exchange(&server, b"wrong CA", "sha256", &other.ca(), None);
    assert_eq!(field(&f, "pki_status"), "0");
    assert_eq!(field(&f, "verified"), "false");
    assert!(field(&f, "error").contains("verify"), "{f:?}");

    // The token carries the development policy; a relying party that wants another refuses.
    let baseline = oid::ETSI_BASELINE_POLICY.to_string();
    let (f, _out) = exchange(
        &server,
        b"wrong policy",
        "sha256",
        &server.ca(),
        Some(&baseline),
    );
    assert_eq!(field(&f, "pki_status"), "0");
    assert_eq!(field(&f, "policy"), oid::DEVELOPMENT_POLICY.to_string());
    assert_eq!(field(&f, "verified"), "false");
    assert!(field(&f, "error").contains("Policy"), "{f:?}");
}
