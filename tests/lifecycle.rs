//! Lifecycle: SIGHUP reloads the certificate chain and the reloadable settings without
//! dropping connections (and refuses a bad reload); issuance stops when the signing
//! certificate has less validity left than configured.

mod common;
#[path = "common/wire.rs"]
mod wire;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ok, openssl, Server};
use tsa::client::read::Response;
use tsa::protocol::FailInfo;
use wire::Conn;

/// A certificate for `key` with `subject`, issued by the development CA in `dir`, with the TSU
/// profile (EKU id-kp-timeStamping only, critical).
fn issue_cert(dir: &Path, key: &str, subject: &str, out: &str) {
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n",
    )
    .unwrap();
    openssl(
        &[
            "req", "-new", "-key", key, "-subj", subject, "-out", "tsu.csr",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "tsu.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-out",
            out,
        ],
        dir,
    );
}

/// Posts `query` on the keep-alive `conn`: the decoded reply.
fn post(conn: &mut Conn, query: &[u8]) -> Response {
    wire::decode(&conn.post("/", query))
}

fn subject_of(server: &Server) -> String {
    let out = ok(Command::new("curl").args(["-sS", &format!("{}certs", server.url)]));
    let pem = server.path("served.pem");
    std::fs::write(&pem, &out.stdout).unwrap();
    let out = openssl(
        &["x509", "-in", pem.to_str().unwrap(), "-noout", "-subject"],
        server.dir.path(),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One `openssl ts -query` (SHA-256 of "x", no certificate asked) posted with curl: the reply
/// of a 200.
fn stamp_once(server: &Server) -> Response {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("data.bin"), b"x").unwrap();
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-out", "req.tsq",
        ],
        work.path(),
    );
    let (status, _, body) = common::curl_post(
        &server.url,
        &work.path().join("req.tsq"),
        "application/timestamp-query",
    );
    assert_eq!(status, 200);
    Response::from_der(&body).unwrap()
}

#[test]
fn sighup_reloads_the_certificate_and_settings_without_dropping_connections() {
    let server = Server::start(&[], "");
    let dir = server.dir.path().to_path_buf();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("data.bin"), b"e-invoice 7").unwrap();
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
        ],
        work.path(),
    );
    let query = std::fs::read(work.path().join("req.tsq")).unwrap();

    let mut conn = Conn::open(&server.url);
    let before = post(&mut conn, &query);
    assert!(before.granted());
    assert!(subject_of(&server).contains("Development Time-Stamping Unit"));

    // A renewed certificate for the same key, and millisecond genTimes.
    issue_cert(
        &dir,
        "tsa-key.pem",
        "/CN=Renewed TSU/O=Development TSA (not for production)",
        "renewed.pem",
    );
    std::fs::copy(dir.join("renewed.pem"), dir.join("tsa-cert.pem")).unwrap();
    let config = std::fs::read_to_string(dir.join("tsa.toml")).unwrap();
    std::fs::write(
        dir.join("tsa.toml"),
        config.replace("precision = \"micros\"", "precision = \"millis\""),
    )
    .unwrap();
    server.signal("HUP");

    let mut renewed = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        if subject_of(&server).contains("Renewed TSU") {
            renewed = true;
            break;
        }
    }
    assert!(renewed, "the reload did not take effect");
    // The same connection, still open, now gets tokens of the new certificate.
    let after = post(&mut conn, &query);
    assert!(after.granted());
    let tst = after.token.as_ref().unwrap().tst_info();
    assert_eq!(
        tst.gen_time.unix_ns() % 1_000_000,
        0,
        "millisecond precision after the reload"
    );
    std::fs::write(
        work.path().join("reply.tsr"),
        after.token.as_ref().map(|t| t.der.clone()).unwrap(),
    )
    .unwrap();
    let ca = server.ca();
    openssl(
        &[
            "ts",
            "-verify",
            "-token_in",
            "-in",
            "reply.tsr",
            "-queryfile",
            "req.tsq",
            "-CAfile",
            ca.to_str().unwrap(),
        ],
        work.path(),
    );
}

/// A reload applies `[server.tls]` only of `[server]`: a changed request size limit stays the
/// start's (the HTTP body limit is set at start, and the request rules keep to it), and the
/// log says that the rest of `[server]` waits for a restart.
#[test]
fn a_reload_keeps_the_servers_limits_and_says_so() {
    let dir = Server::init(&[], "");
    let server = Server::serve_logged(dir);
    let config_path = server.path("tsa.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        // The smallest limit allowed, under the ~67 octets of the request below: applied, it
        // would refuse it.
        common::merge_toml(&config, "[server]\nmax_request_bytes = 64\n"),
    )
    .unwrap();
    server.signal("HUP");
    let log = || std::fs::read_to_string(server.path(Server::LOG)).unwrap_or_default();
    common::wait_until(|| log().contains("reload_partial"), "the reload's warning");

    let response = stamp_once(&server);
    assert!(response.granted(), "{:?}", response.status_text);
}

#[test]
fn a_bad_reload_is_refused_and_the_running_certificate_kept() {
    let server = Server::start(&[], "");
    let dir = server.dir.path().to_path_buf();
    // A certificate for another key: the reload must refuse it.
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "other-key.pem",
        ],
        &dir,
    );
    issue_cert(&dir, "other-key.pem", "/CN=Someone Else", "other.pem");
    std::fs::copy(dir.join("other.pem"), dir.join("tsa-cert.pem")).unwrap();
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(subject_of(&server).contains("Development Time-Stamping Unit"));
    assert!(stamp_once(&server).granted());
}

#[test]
fn too_little_certificate_validity_left_stops_issuance() {
    // The development certificate is valid for about three years; ask for ten years left.
    let server = Server::start(&[], "[token]\nmin_certificate_validity_days = 3650\n");
    let response = stamp_once(&server);
    assert_eq!(response.fail_info(), Some(FailInfo::SystemFailure));
    assert!(
        response.status_text.join(" ").contains("certificate"),
        "{:?}",
        response.status_text
    );
    // Readiness says so too: a balancer sends such an instance nothing.
    let ready = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .arg(format!("{}/health/ready", server.admin_url))
        .output()
        .unwrap();
    let ready = String::from_utf8_lossy(&ready.stdout);
    assert!(
        ready.ends_with("503") && ready.contains("certificate"),
        "{ready}"
    );
}

/// The DER of a PEM certificate file.
fn cert_der(path: &Path) -> Vec<u8> {
    let out = openssl(
        &["x509", "-in", path.to_str().unwrap(), "-outform", "DER"],
        path.parent().unwrap(),
    );
    out.stdout
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_planned_rollover_changes_key_and_certificate_at_its_instant() {
    // A second key (P-384, where the first is P-256) and its certificate from the same CA.
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new(common::TSA)
        .args(["init", "--dir"])
        .arg(dir.path()));
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "next-key.pem",
        ],
        dir.path(),
    );
    issue_cert(
        dir.path(),
        "next-key.pem",
        "/CN=TSU after rollover",
        "next-cert.pem",
    );
    let first = cert_der(&dir.path().join("tsa-cert.pem"));
    let next = cert_der(&dir.path().join("next-cert.pem"));

    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let config = dir.path().join("tsa.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let extra = format!(
        "[rollover]\nat = \"{}\"\n[rollover.signer]\nkind = \"software\"\nkey = \"next-key.pem\"\ncertificate = \"next-cert.pem\"\n",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    std::fs::write(&config, common::merge_toml(&text, &extra)).unwrap();
    let server = Server::serve(dir);
    let subject = subject_of(&server);
    assert!(
        subject.contains("Development Time-Stamping Unit"),
        "before: the first certificate, not {subject}"
    );
    assert!(!subject_of(&server).contains("after rollover"));

    // Tokens on one keep-alive connection until well past the instant.
    let at_ns = at.timestamp_nanos_opt().unwrap() as u64;
    let mut conn = Conn::open(&server.url);
    let (mut before, mut after) = (0, 0);
    let work = server.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline && after < 20 {
        let query = tsa::client::Query::for_data(
            tsa::alg::DigestAlgorithm::Sha256,
            format!("rollover {before} {after}").as_bytes(),
        )
        .unwrap();
        let der = query.to_der().unwrap();
        let response = post(&mut conn, &der);
        let token = response.token.expect("granted");
        let gen_time = token.tst_info().gen_time.unix_ns();
        let (signed_by_first, signed_by_next) =
            (contains(&token.der, &first), contains(&token.der, &next));
        assert!(
            signed_by_first != signed_by_next,
            "one certificate per token"
        );
        if gen_time < at_ns {
            assert!(signed_by_first, "genTime before the rollover, new key");
            before += 1;
        } else {
            assert!(signed_by_next, "genTime after the rollover, old key");
            after += 1;
        }
        // Every tenth token on each side is checked by openssl against the CA.
        if (before + after) % 10 == 0 {
            std::fs::write(work.join("q.tsq"), &der).unwrap();
            std::fs::write(work.join("t.tst"), &token.der).unwrap();
            let verify = openssl(
                &[
                    "ts",
                    "-verify",
                    "-queryfile",
                    "q.tsq",
                    "-in",
                    "t.tst",
                    "-token_in",
                    "-CAfile",
                    "../ca-cert.pem",
                ],
                &work,
            );
            assert!(
                verify.status.success(),
                "{}",
                String::from_utf8_lossy(&verify.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(before > 0 && after >= 20, "before {before}, after {after}");
    assert!(
        subject_of(&server).contains("after rollover"),
        "after: /certs serves the new certificate"
    );
}

#[test]
fn tsa_init_never_replaces_keys_it_did_not_write_unless_forced() {
    // A directory with a key but no configuration of tsa init's: another instance's, or a
    // production key whose configuration lives elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("tsa-key.pem");
    std::fs::write(&key, "PRODUCTION KEY").unwrap();
    for hsm in [false, true] {
        let mut init = Command::new(common::TSA);
        init.args(["init", "--dir"]).arg(dir.path());
        if hsm {
            init.arg("--hsm");
        }
        let out = init.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "init replaced the key: {stderr}");
        assert!(stderr.contains("tsa-key.pem exists"), "{stderr}");
        assert_eq!(std::fs::read(&key).unwrap(), b"PRODUCTION KEY");
        assert!(!dir.path().join("tsa.toml").exists());
    }
    // Asked to start over, it does.
    ok(Command::new(common::TSA)
        .args(["init", "--force", "--dir"])
        .arg(dir.path()));
    assert_ne!(std::fs::read(&key).unwrap(), b"PRODUCTION KEY");
    assert!(dir.path().join("tsa.toml").exists());
}
