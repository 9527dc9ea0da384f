//! The real `openssl ts` client: query → HTTP → reply → `openssl ts -verify`, for every key
//! algorithm `tsa init` makes, every SHA-2 imprint, with and without the certificate, and the
//! token options of the configuration. RSA-PSS tokens, which `openssl ts -verify` cannot check,
//! go through `openssl cms -verify` and `tsa verify`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{curl_post, ok, openssl, run, Server, TSA};
use tsa::alg::{oid, DigestAlgorithm};
use tsa::client::read::Response;
use tsa::client::Query;
use tsa::protocol::FailInfo;

const DEV_POLICY: &str = "1.3.6.1.4.1.32473.3161.1";
const QUERY_TYPE: &str = "application/timestamp-query";
const REPLY_TYPE: &str = "application/timestamp-reply";

/// Writes the document to stamp into `work` and returns its bytes.
fn document(work: &Path) -> Vec<u8> {
    let data = format!(
        "the document to stamp, written at {:?}\n",
        SystemTime::now()
    );
    std::fs::write(work.join("data.bin"), &data).unwrap();
    data.into_bytes()
}

/// POSTs `req.tsq` from `work`, saves `reply.tsr` there and returns the decoded reply.
fn post_query(server: &Server, work: &Path) -> (Vec<u8>, Response) {
    let (status, content_type, body) = curl_post(&server.url, &work.join("req.tsq"), QUERY_TYPE);
    assert_eq!(status, 200);
    assert_eq!(content_type, REPLY_TYPE);
    std::fs::write(work.join("reply.tsr"), &body).unwrap();
    let response = Response::from_der(&body).expect("the reply decodes");
    (body, response)
}

/// `openssl ts -reply -text` of `reply.tsr` in `work`.
fn reply_text(work: &Path) -> String {
    let text = openssl(&["ts", "-reply", "-in", "reply.tsr", "-text"], work);
    String::from_utf8(text.stdout).unwrap()
}

/// `openssl ts -verify` of `reply.tsr` against `req.tsq` and the server's CA, plus `extra`.
fn openssl_verify(server: &Server, work: &Path, extra: &[&str]) -> std::process::Output {
    let ca = server.ca();
    let mut args = vec![
        "ts",
        "-verify",
        "-in",
        "reply.tsr",
        "-queryfile",
        "req.tsq",
        "-CAfile",
        ca.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(Command::new("openssl").args(&args).current_dir(work))
}

fn assert_verified(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Verification: OK"),
        "openssl ts -verify failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asks for a stamp of a fresh document with `query_args` and checks the reply with
/// `openssl ts -reply` and `openssl ts -verify` (with the TSU certificate as `-untrusted`
/// when the query did not ask for it). Returns the decoded reply.
fn stamp_and_verify(server: &Server, work: &Path, query_args: &[&str]) -> Response {
    let data = document(work);
    let mut args = vec!["ts", "-query", "-data", "data.bin", "-out", "req.tsq"];
    args.extend_from_slice(query_args);
    openssl(&args, work);
    let (_, response) = post_query(server, work);
    let text = reply_text(work);
    assert!(text.contains("Status: Granted."), "{text}");
    assert!(response.granted());
    let token = response.token.as_ref().unwrap();

    // The imprint is the digest of the data with the algorithm the query named.
    let tst = token.tst_info();
    let digest = DigestAlgorithm::from_oid(&tst.message_imprint.hash_algorithm.oid).unwrap();
    assert!(
        query_args.contains(&format!("-{}", digest.name()).as_str()),
        "imprint algorithm {} was not asked for ({query_args:?})",
        digest.name()
    );
    assert_eq!(
        tst.message_imprint.hashed_message.as_bytes(),
        digest.digest(&data).unwrap()
    );

    let cert_req = query_args.contains(&"-cert");
    let has_certs = token
        .signed_data
        .certificates
        .as_ref()
        .is_some_and(|c| !c.0.is_empty());
    assert_eq!(has_certs, cert_req, "certificates present iff -cert");
    if cert_req {
        assert_verified(&openssl_verify(server, work, &[]));
    } else {
        // Without the certificate in the token openssl cannot find the signer …
        let without = openssl_verify(server, work, &[]);
        assert!(
            !String::from_utf8_lossy(&without.stdout).contains("Verification: OK"),
            "verified a token that carries no certificate without -untrusted"
        );
        // … until it is given the TSU certificate.
        let untrusted = server.path("tsa-cert.pem");
        assert_verified(&openssl_verify(
            server,
            work,
            &["-untrusted", untrusted.to_str().unwrap()],
        ));
    }
    response
}

/// Every combination of SHA-2 imprint, `-cert` and `-tspolicy` against one server.
fn verify_matrix(init_args: &[&str]) {
    let server = Server::start(init_args, "");
    let work = tempfile::tempdir().unwrap();
    let mut serials = Vec::new();
    for digest in ["-sha256", "-sha384", "-sha512"] {
        for cert in [true, false] {
            for policy in [true, false] {
                let mut args = vec![digest];
                if cert {
                    args.push("-cert");
                }
                if policy {
                    args.extend(["-tspolicy", DEV_POLICY]);
                }
                let response = stamp_and_verify(&server, work.path(), &args);
                let tst_policy = response.token.as_ref().unwrap().tst_info().policy;
                assert_eq!(tst_policy.to_string(), DEV_POLICY, "{args:?}");
                let text = reply_text(work.path());
                assert!(
                    text.contains(&format!("Policy OID: {DEV_POLICY}")),
                    "{text}"
                );
                assert!(text.contains("TSA: unspecified"), "{text}");
                serials.push(
                    response
                        .token
                        .as_ref()
                        .unwrap()
                        .tst_info()
                        .serial_number
                        .as_bytes()
                        .to_vec(),
                );
            }
        }
    }
    let n = serials.len();
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), n, "a serial number was issued twice");
}

#[test]
fn p256_tokens_verify_with_openssl() {
    verify_matrix(&["--algorithm", "p256"]);
}

#[test]
fn p384_tokens_verify_with_openssl() {
    verify_matrix(&["--algorithm", "p384"]);
}

#[test]
fn rsa2048_pkcs1_tokens_verify_with_openssl() {
    verify_matrix(&["--algorithm", "rsa2048"]);
}

#[test]
fn rsa3072_pkcs1_tokens_verify_with_openssl() {
    rsa_verify_matrix(3072);
}

#[test]
fn rsa4096_pkcs1_tokens_verify_with_openssl() {
    rsa_verify_matrix(4096);
}

/// [`verify_matrix`] for an RSA key of `bits` (PKCS#1 v1.5), once `tsa init` is seen to make
/// a TSU key of that size.
fn rsa_verify_matrix(bits: u32) {
    let algorithm = format!("rsa{bits}");
    let dir = Server::init(&["--algorithm", &algorithm], "");
    let text = openssl(
        &["x509", "-in", "tsa-cert.pem", "-noout", "-text"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("Public-Key: ({bits} bit)")),
        "{text}"
    );
    drop(dir);
    verify_matrix(&["--algorithm", &algorithm]);
}

/// `openssl ts -verify` does not take RSASSA-PSS; `openssl cms -verify` does, on the token
/// itself, and so does `tsa verify`.
#[test]
fn rsa2048_pss_tokens_verify_with_openssl_cms_and_tsa_verify() {
    let server = Server::start(&["--algorithm", "rsa2048", "--pss"], "");
    let other = Server::start(&["--algorithm", "rsa2048", "--pss"], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ca = server.ca();
    let ca = ca.to_str().unwrap();
    for digest in ["-sha256", "-sha384", "-sha512"] {
        document(w);
        openssl(
            &[
                "ts", "-query", "-data", "data.bin", digest, "-cert", "-out", "req.tsq",
            ],
            w,
        );
        let (_, response) = post_query(&server, w);
        let token = response.token.expect("granted");
        common::openssl_token_out(w);
        assert_eq!(std::fs::read(w.join("token.der")).unwrap(), token.der);

        let printed = openssl(
            &[
                "cms",
                "-cmsout",
                "-print",
                "-inform",
                "DER",
                "-in",
                "token.der",
            ],
            w,
        );
        let printed = String::from_utf8(printed.stdout).unwrap();
        assert!(printed.contains("rsassaPss"), "{printed}");

        for purpose in ["timestampsign", "any"] {
            let cms = |ca: &str| {
                run(Command::new("openssl").current_dir(w).args([
                    "cms",
                    "-verify",
                    "-inform",
                    "DER",
                    "-in",
                    "token.der",
                    "-binary",
                    "-CAfile",
                    ca,
                    "-purpose",
                    purpose,
                    "-out",
                    "tstinfo.der",
                ]))
            };
            let out = cms(ca);
            assert!(
                out.status.success(),
                "openssl cms -verify -purpose {purpose}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // What was signed is the TSTInfo the crate decodes from the token.
            assert_eq!(
                std::fs::read(w.join("tstinfo.der")).unwrap(),
                token.tst_info_der
            );
            // Another CA does not vouch for this signer.
            let wrong = cms(other.ca().to_str().unwrap());
            assert!(!wrong.status.success(), "verified against the wrong CA");
        }

        let verify = |ca: &str| {
            run(Command::new(TSA).current_dir(w).args([
                "verify",
                "--in",
                "reply.tsr",
                "--data",
                "data.bin",
                "--query",
                "req.tsq",
                "--ca",
                ca,
            ]))
        };
        let out = verify(ca);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("Verification: OK"),
            "tsa verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!verify(other.ca().to_str().unwrap()).status.success());
    }
}

/// The subject of a PEM certificate as `openssl ts -text` prints a DirName.
fn subject_oneline(cert: &Path) -> String {
    let out = ok(Command::new("openssl").args([
        "x509",
        "-noout",
        "-subject",
        "-nameopt",
        "compat",
        "-in",
        cert.to_str().unwrap(),
    ]));
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .strip_prefix("subject=")
        .expect("subject= prefix")
        .to_string()
}

#[test]
fn include_tsa_name_puts_the_tsu_subject_in_tstinfo() {
    let server = Server::start(&[], "[token]\ninclude_tsa_name = true\n");
    let work = tempfile::tempdir().unwrap();
    let response = stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);
    assert!(response.token.unwrap().tst_info().tsa.is_some());
    let text = reply_text(work.path());
    let subject = subject_oneline(&server.path("tsa-cert.pem"));
    assert!(
        text.contains(&format!("TSA: DirName:{subject}\n")),
        "no TSA: DirName:{subject} in\n{text}"
    );
    // And without the certificate in the token.
    stamp_and_verify(&server, work.path(), &["-sha512"]);
}

/// The OIDs of the token's signed attributes.
fn signed_attribute_oids(response: &Response) -> Vec<String> {
    let token = response.token.as_ref().unwrap();
    let signer = token.signed_data.signer_infos.0.get(0).unwrap();
    signer
        .signed_attrs
        .as_ref()
        .unwrap()
        .iter()
        .map(|a| a.oid.to_string())
        .collect()
}

#[test]
fn ess_cert_id_v1_adds_signing_certificate_and_still_verifies() {
    let v1 = oid::SIGNING_CERTIFICATE.to_string();
    let v2 = oid::SIGNING_CERTIFICATE_V2.to_string();
    let work = tempfile::tempdir().unwrap();

    let plain = Server::start(&[], "");
    let attrs = signed_attribute_oids(&stamp_and_verify(
        &plain,
        work.path(),
        &["-sha256", "-cert"],
    ));
    assert!(attrs.contains(&v2) && !attrs.contains(&v1), "{attrs:?}");

    for algorithm in ["p256", "rsa2048"] {
        let server = Server::start(
            &["--algorithm", algorithm],
            "[token]\ness_cert_id_v1 = true\n",
        );
        for args in [&["-sha256", "-cert"][..], &["-sha384"][..]] {
            let attrs = signed_attribute_oids(&stamp_and_verify(&server, work.path(), args));
            assert!(attrs.contains(&v1) && attrs.contains(&v2), "{attrs:?}");
        }
    }
}

/// `tsa init`, then `edit` on the configuration as a TOML table, then `tsa serve`.
fn start_edited(init_args: &[&str], edit: impl FnOnce(&mut toml::Table)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new(TSA)
        .arg("init")
        .arg("--dir")
        .arg(dir.path())
        .args(init_args));
    let path = dir.path().join("tsa.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    edit(&mut config);
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    Server::serve(dir)
}

fn section<'t>(config: &'t mut toml::Table, name: &str) -> &'t mut toml::Table {
    config
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
}

/// Reads an integer setting of the served configuration.
fn setting(server: &Server, table: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(server.path("tsa.toml")).unwrap();
    let config: toml::Table = text.parse().unwrap();
    config[table][key].as_integer().unwrap() as u64
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Sleeps until the system clock's fraction of a second is `at_ms`.
fn wait_for_fraction(at_ms: u64) {
    let frac_ms = unix_ns(SystemTime::now()) % 1_000_000_000 / 1_000_000;
    let wait = (at_ms + 1000 - frac_ms) % 1000;
    std::thread::sleep(Duration::from_millis(wait));
}

/// One stamp with `openssl ts -query` and curl; the wall clock just before and after.
struct Timed {
    send_ns: u64,
    recv_ns: u64,
    response: Response,
}

fn timed_stamp(server: &Server, work: &Path, send_at_ms: Option<u64>) -> Timed {
    document(work);
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
        ],
        work,
    );
    if let Some(at) = send_at_ms {
        wait_for_fraction(at);
    }
    let send_ns = unix_ns(SystemTime::now());
    let (_, response) = post_query(server, work);
    let recv_ns = unix_ns(SystemTime::now());
    Timed {
        send_ns,
        recv_ns,
        response,
    }
}

/// genTime ± accuracy covers some instant between sending and receiving.
fn assert_covers(t: &Timed) {
    let tst = t.response.token.as_ref().unwrap().tst_info();
    let gen = tst.gen_time.unix_ns();
    let acc = tst.accuracy.expect("accuracy is always present").as_ns();
    assert!(
        gen.saturating_sub(acc) <= t.recv_ns,
        "genTime - accuracy after the reply"
    );
    assert!(
        gen + acc >= t.send_ns,
        "genTime + accuracy before the request"
    );
}

#[test]
fn millis_precision_truncates_gentime_and_verifies() {
    let server = start_edited(&[], |c| {
        section(c, "token").insert("precision".into(), "millis".into());
    });
    let work = tempfile::tempdir().unwrap();
    for _ in 0..5 {
        let t = timed_stamp(&server, work.path(), None);
        assert_covers(&t);
        let tst = t.response.token.as_ref().unwrap().tst_info();
        assert_eq!(tst.gen_time.unix_ns() % 1_000_000, 0, "{}", tst.gen_time);
        assert_verified(&openssl_verify(&server, work.path(), &[]));
    }
}

/// Seconds precision adds what truncation removed (up to 1 s) to the declared accuracy of the
/// development clock. With a raised maximum accuracy every request is granted, whole seconds.
#[test]
fn seconds_precision_with_raised_max_accuracy_is_granted() {
    let server = start_edited(&[], |c| {
        section(c, "token").insert("precision".into(), "seconds".into());
        section(c, "clock").insert("max_accuracy_ms".into(), 2_000.into());
    });
    let declared_ns = setting(&server, "clock", "development_accuracy_ms") * 1_000_000;
    let max_ns = setting(&server, "clock", "max_accuracy_ms") * 1_000_000;
    let work = tempfile::tempdir().unwrap();
    let (mut early, mut late) = (0, 0);
    // Alternately early and late in the second (late ones need more than 1 s of accuracy),
    // until both were seen twice; bounded, since a slow request may slip into the next second.
    for attempt in 0..16 {
        if early >= 2 && late >= 2 {
            break;
        }
        let t = timed_stamp(
            &server,
            work.path(),
            Some(if attempt % 2 == 0 { 200 } else { 930 }),
        );
        assert!(t.response.granted(), "{:?}", t.response.status_text);
        assert_covers(&t);
        let tst = t.response.token.as_ref().unwrap().tst_info();
        let gen = tst.gen_time.unix_ns();
        let acc = tst.accuracy.unwrap().as_ns();
        assert_eq!(gen % 1_000_000_000, 0, "{}", tst.gen_time);
        assert!(acc >= declared_ns && acc <= max_ns, "accuracy {acc} ns");
        // The clock was read at or after sending: truncation removed at least that much.
        assert!(
            acc >= declared_ns + t.send_ns.saturating_sub(gen),
            "accuracy {acc} ns"
        );
        let same_second = t.send_ns / 1_000_000_000 == t.recv_ns / 1_000_000_000;
        let from = t.send_ns % 1_000_000_000;
        if same_second && from > 1_000_000_000 - declared_ns {
            assert!(acc > 1_000_000_000, "late in the second, accuracy {acc} ns");
            late += 1;
        } else if same_second && t.recv_ns % 1_000_000_000 < 1_000_000_000 - declared_ns {
            early += 1;
        }
        assert_verified(&openssl_verify(&server, work.path(), &[]));
        let text = reply_text(work.path());
        if acc > 1_000_000_000 {
            assert!(text.contains("Accuracy: 0x01 seconds"), "{text}");
        }
    }
    assert!(early >= 2 && late >= 2, "early {early}, late {late}");
}

/// With the default maximum accuracy, a seconds-precision token is refused with
/// timeNotAvailable when the clock is read late in a second (declared accuracy + truncation
/// over the maximum) and granted early in it.
#[test]
fn seconds_precision_over_max_accuracy_is_time_not_available() {
    let server = start_edited(&[], |c| {
        section(c, "token").insert("precision".into(), "seconds".into());
    });
    let config: toml::Table = std::fs::read_to_string(server.path("tsa.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(config["clock"].get("max_accuracy_ms").is_none());
    let max_ns = tsa::config::ClockConfig::default().max_accuracy_ms * 1_000_000;
    let declared_ns = setting(&server, "clock", "development_accuracy_ms") * 1_000_000;
    // Refused iff declared + (reading − genTime) > max, i.e. the reading's fraction of a
    // second is over max − declared (rounded up to whole µs: keep a margin either side).
    let threshold_ns = max_ns - declared_ns;
    let work = tempfile::tempdir().unwrap();
    let (mut refused, mut granted) = (0, 0);
    // Alternately early and late in the second until both outcomes were seen twice; bounded,
    // since a slow request may slip into the next second.
    for attempt in 0..16 {
        if granted >= 2 && refused >= 2 {
            break;
        }
        let t = timed_stamp(
            &server,
            work.path(),
            Some(if attempt % 2 == 0 { 200 } else { 930 }),
        );
        let same_second = t.send_ns / 1_000_000_000 == t.recv_ns / 1_000_000_000;
        let (from, to) = (t.send_ns % 1_000_000_000, t.recv_ns % 1_000_000_000);
        if t.response.granted() {
            assert_covers(&t);
            let tst = t.response.token.as_ref().unwrap().tst_info();
            assert_eq!(tst.gen_time.unix_ns() % 1_000_000_000, 0);
            assert!(tst.accuracy.unwrap().as_ns() <= max_ns);
            assert!(
                !(same_second && from > threshold_ns + 1_000_000),
                "granted although read at {from}..{to} ns into the second"
            );
            granted += 1;
        } else {
            assert_eq!(t.response.status, 2);
            assert_eq!(t.response.fail_info(), Some(FailInfo::TimeNotAvailable));
            assert!(!t.response.status_text.is_empty());
            assert!(t.response.token.is_none());
            assert!(
                !(same_second && to < threshold_ns - 1_000_000),
                "refused although read at {from}..{to} ns into the second"
            );
            let text = reply_text(work.path());
            assert!(text.contains("Status: Rejected"), "{text}");
            assert!(text.contains("time source is not available"), "{text}");
            refused += 1;
        }
    }
    assert!(
        granted >= 2 && refused >= 2,
        "granted {granted}, refused {refused}"
    );
}

/// A 160-bit nonce (21 content octets: the high bit is set, so a leading 0x00) is echoed
/// exactly; openssl compares it too.
#[test]
fn large_nonce_is_echoed_exactly() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let data = document(w);
    let seed = DigestAlgorithm::Sha256.digest(&data).unwrap();
    let mut nonce = vec![0x00];
    nonce.extend_from_slice(&seed[..20]);
    nonce[1] |= 0x80;
    let mut query = Query::for_data(DigestAlgorithm::Sha256, &data).unwrap();
    query.nonce = Some(nonce.clone());
    std::fs::write(w.join("req.tsq"), query.to_der().unwrap()).unwrap();

    let (_, response) = post_query(&server, w);
    let tst = response.token.as_ref().expect("granted").tst_info();
    assert_eq!(tst.nonce.expect("a nonce").as_bytes(), nonce.as_slice());

    let text = reply_text(w);
    let hex: String = nonce[1..].iter().map(|b| format!("{b:02X}")).collect();
    assert!(text.contains(&format!("Nonce: 0x{hex}\n")), "{text}");
    assert_verified(&openssl_verify(&server, w, &[]));

    // openssl checks the nonce: a query with another one does not verify this reply.
    nonce[20] ^= 1;
    query.nonce = Some(nonce);
    std::fs::write(w.join("req.tsq"), query.to_der().unwrap()).unwrap();
    let out = openssl_verify(&server, w, &[]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Verification: OK"));
}
