//! Interop with BouncyCastle (Debian's libbcpkix-java, libbcprov-java, libbcutil-java) on the
//! JDK: `tests/interop/java/TsaInterop.java`, compiled with javac into a temporary directory,
//! asks the TSA for a token over HttpURLConnection, checks it with
//! `TimeStampResponse.validate(request)` and verifies its signature with
//! `JcaSimpleSignerInfoVerifierBuilder`; this test reads what it printed and checks the same
//! exchange with the crate, `openssl ts -verify` and `tsa verify`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, run, Server, TSA};
use der::Decode;
use tsa::alg::{oid, DigestAlgorithm};
use tsa::client::read::Response;
use tsa::protocol::asn1::TimeStampReq;

const JARS: [&str; 3] = ["bcprov.jar", "bcpkix.jar", "bcutil.jar"];

/// The BouncyCastle jars: from `TSA_TEST_BC_JARS` (a class path) or Debian's /usr/share/java.
fn bc_classpath() -> String {
    if let Ok(cp) = std::env::var("TSA_TEST_BC_JARS") {
        return cp;
    }
    let jars: Vec<PathBuf> = JARS
        .iter()
        .map(|j| Path::new("/usr/share/java").join(j))
        .collect();
    for jar in &jars {
        assert!(
            jar.exists(),
            "{} is missing: run scripts/test.sh, which installs libbcprov-java, libbcpkix-java \
             and libbcutil-java",
            jar.display()
        );
    }
    jars.iter()
        .map(|j| j.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The Java client, compiled into its own temporary directory.
struct JavaClient {
    classes: tempfile::TempDir,
    classpath: String,
}

impl JavaClient {
    fn compile() -> JavaClient {
        let classpath = bc_classpath();
        let classes = tempfile::tempdir().unwrap();
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/java/TsaInterop.java");
        ok(Command::new("javac")
            .arg("-cp")
            .arg(&classpath)
            .arg("-d")
            .arg(classes.path())
            .arg(&source));
        assert!(classes.path().join("TsaInterop.class").exists());
        JavaClient { classes, classpath }
    }

    /// Runs one exchange; returns what the client printed and the directory with req.tsq and
    /// reply.tsr.
    fn exchange(
        &self,
        server: &Server,
        data: &[u8],
        ca: &Path,
        policy: Option<&str>,
    ) -> (HashMap<String, String>, tempfile::TempDir) {
        let out = tempfile::tempdir().unwrap();
        let data_file = out.path().join("data.bin");
        std::fs::write(&data_file, data).unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args(["60", "java", "-cp"])
            .arg(format!(
                "{}:{}",
                self.classes.path().display(),
                self.classpath
            ))
            .arg("TsaInterop")
            .arg(&server.url)
            .arg(&data_file)
            .arg(ca)
            .arg(out.path());
        if let Some(policy) = policy {
            cmd.arg(policy);
        }
        let output = ok(&mut cmd);
        let stdout = String::from_utf8(output.stdout).unwrap();
        let fields = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (fields, out)
    }
}

/// An INTEGER's content octets as BigInteger.toString(16) writes a positive value.
fn hex_unsigned(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_string()
}

fn field<'f>(fields: &'f HashMap<String, String>, key: &str) -> &'f str {
    fields
        .get(key)
        .unwrap_or_else(|| panic!("the Java client printed no {key}: {fields:?}"))
}

/// A granted exchange: what BouncyCastle says agrees with what the crate decodes, and the
/// request and reply also verify with `tsa verify` (and `openssl ts -verify` unless PSS).
fn check_granted(server: &Server, client: &JavaClient, pss: bool) {
    let data = format!("stamped by BouncyCastle via {}", server.url).into_bytes();
    let policy = oid::DEVELOPMENT_POLICY.to_string();
    let (f, out) = client.exchange(server, &data, &server.ca(), Some(&policy));
    assert_eq!(field(&f, "http_status"), "200");
    assert_eq!(field(&f, "content_type"), "application/timestamp-reply");
    assert_eq!(field(&f, "pki_status"), "0");
    assert_eq!(field(&f, "validate"), "ok");
    assert_eq!(field(&f, "signature"), "ok");
    assert_eq!(field(&f, "chain"), "ok");
    assert_eq!(field(&f, "certificates"), "1");
    assert_eq!(field(&f, "request_nonce"), field(&f, "token_nonce"));
    assert_eq!(field(&f, "policy"), policy);

    let request_der = std::fs::read(out.path().join("req.tsq")).unwrap();
    let reply_der = std::fs::read(out.path().join("reply.tsr")).unwrap();
    let request = TimeStampReq::from_der(&request_der).expect("BouncyCastle's request decodes");
    assert!(request.cert_req);
    let response = Response::from_der(&reply_der).unwrap();
    let token = response.token.as_ref().expect("granted");
    let tst = token.tst_info();
    let nonce = request.nonce.expect("a nonce").as_bytes().to_vec();
    assert_eq!(tst.nonce.unwrap().as_bytes(), nonce.as_slice());
    assert_eq!(field(&f, "request_nonce"), hex_unsigned(&nonce));
    assert_eq!(
        field(&f, "serial"),
        hex_unsigned(tst.serial_number.as_bytes())
    );
    let digest: String = DigestAlgorithm::Sha256
        .digest(&data)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(field(&f, "imprint"), digest);
    assert_eq!(
        field(&f, "gen_time_ms"),
        (tst.gen_time.unix_ns() / 1_000_000).to_string()
    );
    let accuracy = tst.accuracy.expect("accuracy");
    let show = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    assert_eq!(
        field(&f, "accuracy_seconds"),
        show(accuracy.seconds.map(u64::from))
    );
    assert_eq!(
        field(&f, "accuracy_millis"),
        show(accuracy.millis.map(u64::from))
    );
    assert_eq!(
        field(&f, "accuracy_micros"),
        show(accuracy.micros.map(u64::from))
    );
    let signer_info = token.signed_data.signer_infos.0.get(0).unwrap();
    assert_eq!(
        field(&f, "signature_algorithm"),
        signer_info.signature_algorithm.oid.to_string()
    );
    assert_eq!(
        field(&f, "signature_algorithm") == oid::RSASSA_PSS.to_string(),
        pss
    );

    let ca = server.ca();
    let verified = ok(Command::new(TSA).current_dir(out.path()).args([
        "verify",
        "--in",
        "reply.tsr",
        "--data",
        "data.bin",
        "--query",
        "req.tsq",
        "--ca",
        ca.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&verified.stdout).contains("Verification: OK"));
    if !pss {
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
}

#[test]
fn bouncycastle_validates_tokens_of_every_key_algorithm() {
    let client = JavaClient::compile();
    for (init, pss) in [
        (&["--algorithm", "p256"][..], false),
        (&["--algorithm", "p384"][..], false),
        (&["--algorithm", "rsa2048"][..], false),
        (&["--algorithm", "rsa2048", "--pss"][..], true),
    ] {
        let server = Server::start(init, "");
        check_granted(&server, &client, pss);
    }
}

#[test]
fn bouncycastle_validates_tokens_with_tsa_name_and_ess_cert_id_v1() {
    let client = JavaClient::compile();
    let server = Server::start(
        &[],
        "[token]\ninclude_tsa_name = true\ness_cert_id_v1 = true\n",
    );
    check_granted(&server, &client, false);
    let (f, _out) = client.exchange(&server, b"names", &server.ca(), None);
    assert_eq!(field(&f, "validate"), "ok");
    assert_eq!(field(&f, "signature"), "ok");
    assert_eq!(field(&f, "ess_cert_id_v1"), "true");
    assert_eq!(field(&f, "ess_cert_id_v2"), "true");
    // GeneralName directoryName (tag 4) with the signer's subject.
    assert_eq!(field(&f, "tsa"), format!("4: {}", field(&f, "signer")));

    let plain = Server::start(&[], "");
    let (f, _out) = client.exchange(&plain, b"no names", &plain.ca(), None);
    assert_eq!(field(&f, "signature"), "ok");
    assert_eq!(field(&f, "tsa"), "none");
    assert_eq!(field(&f, "ess_cert_id_v1"), "false");
    assert_eq!(field(&f, "ess_cert_id_v2"), "true");
}

#[test]
fn bouncycastle_reads_rejections_and_refuses_another_ca() {
    let client = JavaClient::compile();
    let server = Server::start(&[], "");
    let other = Server::start(&[], "");

    // A token verified against a CA that did not issue the TSU certificate.
    let (f, _out) = client.exchange(&server, b"wrong CA", &other.ca(), None);
    assert_eq!(field(&f, "pki_status"), "0");
    assert_eq!(field(&f, "signature"), "ok");
    assert!(field(&f, "chain").starts_with("FAILED"), "{f:?}");

    // A policy the TSA does not offer: BouncyCastle reads the status and the failInfo bit.
    let (f, out) = client.exchange(&server, b"wrong policy", &server.ca(), Some("1.2.3.4.5"));
    assert_eq!(field(&f, "http_status"), "200");
    assert_eq!(field(&f, "pki_status"), "2");
    assert_eq!(field(&f, "fail_info"), "unacceptedPolicy");
    assert_eq!(field(&f, "token"), "none");
    let response =
        Response::from_der(&std::fs::read(out.path().join("reply.tsr")).unwrap()).unwrap();
    assert_eq!(field(&f, "status_string"), response.status_text.join(""));
    assert!(field(&f, "status_string").contains("1.2.3.4.5"));
}
